//! [`Groups`] on PostgreSQL: end-to-end devices and their key packages, each conversation's
//! group (its state and GroupInfo sealed under the data key with the same additional data as
//! `Db`'s, [`state_ad`]), the Welcome mailbox of each device, the commit log (read from the
//! messages table), and the server's MLS signature key (sealed, in `conclave_meta`), which
//! every node reads.
//!
//! Across nodes:
//! - A group never moves back: [`Groups::e2ee_put_group`] replaces a stored state only if its
//!   `applied_seq` is not newer, in one statement (`INSERT … ON CONFLICT DO UPDATE … WHERE`),
//!   so of two nodes saving the same group at once the state that ordered more commits stays,
//!   whichever commits last. (SQLite's `Db` keeps the same rule.)
//! - A key package is given out once: [`Groups::e2ee_claim`] deletes the oldest package of a
//!   device that no other transaction holds (`FOR UPDATE SKIP LOCKED`), so two nodes claiming
//!   at once take different packages and neither waits for the other.
//! - Publishing for one device runs under a lock on its registration row, so the limit of
//!   [`MAX_KEY_PACKAGES`] holds, and two nodes registering one device with different keys
//!   cannot both succeed.

use super::{PgDb, col};
use crate::store::{
    GroupRow, Groups, MAX_KEY_PACKAGES, SIGNER_AD, StoreError, WelcomeRow, open_body, state_ad,
};

/// Schema version 4, part three: as SQLite's `e2ee` tables.
pub(super) const SCHEMA: &str = r#"
CREATE TABLE e2ee_devices (
    user_name  TEXT COLLATE "C" NOT NULL,
    device     TEXT COLLATE "C" NOT NULL,
    sig_key    BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (user_name, device)
);
CREATE TABLE e2ee_key_packages (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_name TEXT COLLATE "C" NOT NULL,
    device    TEXT COLLATE "C" NOT NULL,
    kp        BYTEA NOT NULL
);
CREATE INDEX e2ee_key_packages_device ON e2ee_key_packages(user_name, device, id);
CREATE TABLE e2ee_groups (
    conv          TEXT COLLATE "C" PRIMARY KEY,
    group_id      BYTEA NOT NULL,
    state         BYTEA NOT NULL,
    applied_seq   BIGINT NOT NULL,
    group_info    BYTEA NOT NULL,
    removal_epoch BIGINT NOT NULL DEFAULT 0,
    pending       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE e2ee_welcomes (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_name TEXT COLLATE "C" NOT NULL,
    device    TEXT COLLATE "C" NOT NULL,
    conv      TEXT COLLATE "C" NOT NULL,
    seq       BIGINT NOT NULL,
    welcome   BYTEA NOT NULL
);
CREATE INDEX e2ee_welcomes_device ON e2ee_welcomes(user_name, device);
"#;

/// The first key of the groups' advisory locks (the second is the conversation's hash): "gr".
const GROUP_LOCK_SPACE: i32 = 0x6772;

impl PgDb {
    /// A row of `e2ee_groups` (conv, group_id, state, applied_seq, group_info, removal_epoch,
    /// pending), opened.
    fn group_row(&self, r: &postgres::Row) -> Result<GroupRow, StoreError> {
        let conv: String = col(r, 0)?;
        let state: Vec<u8> = col(r, 2)?;
        let gi: Vec<u8> = col(r, 4)?;
        let pending: String = col(r, 6)?;
        Ok(GroupRow {
            state: self
                .key
                .open(&state_ad(&conv, "state"), &state)
                .map_err(|_| StoreError::Corrupt)?,
            group_info: self
                .key
                .open(&state_ad(&conv, "group_info"), &gi)
                .map_err(|_| StoreError::Corrupt)?,
            group_id: col(r, 1)?,
            applied_seq: col::<i64>(r, 3)? as u64,
            removal_epoch: col::<i64>(r, 5)? as u64,
            pending: pending
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            conv,
        })
    }
}

impl Groups for PgDb {
    /// In `conclave_meta` (hex, as the key check), sealed as `Db` seals it. Of two nodes
    /// starting on a new database at once, the first to commit its key wins and the other
    /// reads that one back.
    fn e2ee_signer(&mut self, fresh: &mut dyn FnMut() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let client = self.client.get_mut();
        const READ: &str = "SELECT value FROM conclave_meta WHERE key = 'e2ee_signer'";
        let stored = match client.query_opt(READ, &[])? {
            Some(row) => col::<String>(&row, 0)?,
            None => {
                let sealed = self.key.seal(SIGNER_AD, &fresh());
                client.execute(
                    "INSERT INTO conclave_meta (key, value) VALUES ('e2ee_signer', $1)
                     ON CONFLICT (key) DO NOTHING",
                    &[&hex::encode(sealed)],
                )?;
                col(&client.query_one(READ, &[])?, 0)?
            }
        };
        let sealed = hex::decode(stored).map_err(|_| StoreError::Corrupt)?;
        self.key
            .open(SIGNER_AD, &sealed)
            .map_err(|_| StoreError::Corrupt)
    }

    fn e2ee_publish(
        &mut self,
        user: &str,
        device: &str,
        sig_key: &[u8],
        kps: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        // Registers the device if it is new (a known one keeps its time), then holds its row
        // until the commit.
        tx.execute(
            "INSERT INTO e2ee_devices (user_name, device, sig_key, created_ms)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&user, &device, &sig_key, &now_ms],
        )?;
        let known: Vec<u8> = col(
            &tx.query_one(
                "SELECT sig_key FROM e2ee_devices WHERE user_name = $1 AND device = $2
                 FOR UPDATE",
                &[&user, &device],
            )?,
            0,
        )?;
        if known != sig_key {
            // Dropping the transaction rolls it back.
            return Err(StoreError::Exists);
        }
        let count = |tx: &mut postgres::Transaction<'_>| -> Result<i64, StoreError> {
            col(
                &tx.query_one(
                    "SELECT COUNT(*) FROM e2ee_key_packages WHERE user_name = $1 AND device = $2",
                    &[&user, &device],
                )?,
                0,
            )
        };
        let room = MAX_KEY_PACKAGES.saturating_sub(count(&mut tx)?.max(0) as usize);
        for kp in kps.iter().take(room) {
            tx.execute(
                "INSERT INTO e2ee_key_packages (user_name, device, kp) VALUES ($1, $2, $3)",
                &[&user, &device, kp],
            )?;
        }
        let n = count(&mut tx)?;
        tx.commit()?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn e2ee_devices(&self, user: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT device, sig_key FROM e2ee_devices WHERE user_name = $1
             ORDER BY created_ms, device",
            &[&user],
        )?;
        rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
    }

    /// Users in the order asked, each user's devices by name (as `Db`, whose table is ordered
    /// by its key).
    fn e2ee_claim(
        &mut self,
        users: &[String],
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let mut out = Vec::new();
        for user in users {
            let devices: Vec<String> = tx
                .query(
                    "SELECT device FROM e2ee_devices WHERE user_name = $1 ORDER BY device",
                    &[user],
                )?
                .iter()
                .map(|r| col(r, 0))
                .collect::<Result<_, _>>()?;
            for device in devices {
                let taken = tx.query_opt(
                    "DELETE FROM e2ee_key_packages WHERE id = (
                         SELECT id FROM e2ee_key_packages WHERE user_name = $1 AND device = $2
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING kp",
                    &[user, &device],
                )?;
                if let Some(r) = taken {
                    out.push((user.clone(), device, col(&r, 0)?));
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// By conversation (as `Db`, whose table is ordered by its key).
    fn e2ee_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT conv, group_id, state, applied_seq, group_info, removal_epoch, pending
             FROM e2ee_groups ORDER BY conv",
            &[],
        )?;
        rows.iter().map(|r| self.group_row(r)).collect()
    }

    fn e2ee_group(&self, conv: &str) -> Result<Option<GroupRow>, StoreError> {
        let row = self.client.borrow_mut().query_opt(
            "SELECT conv, group_id, state, applied_seq, group_info, removal_epoch, pending
             FROM e2ee_groups WHERE conv = $1",
            &[&conv],
        )?;
        row.map(|r| self.group_row(&r)).transpose()
    }

    fn e2ee_group_seq(&self, conv: &str) -> Result<Option<u64>, StoreError> {
        let row = self.client.borrow_mut().query_opt(
            "SELECT applied_seq FROM e2ee_groups WHERE conv = $1",
            &[&conv],
        )?;
        row.map(|r| col::<i64>(&r, 0).map(|s| s as u64)).transpose()
    }

    /// A session-level advisory lock in its own key space (`GROUP_LOCK_SPACE`), keyed by a
    /// hash of the conversation: two conversations with the same hash only wait for each
    /// other. PostgreSQL drops it if this node's connection dies.
    fn e2ee_try_lock(&mut self, conv: &str) -> Result<bool, StoreError> {
        let row = self.client.get_mut().query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&GROUP_LOCK_SPACE, &conv],
        )?;
        col(&row, 0)
    }

    fn e2ee_unlock(&mut self, conv: &str) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&GROUP_LOCK_SPACE, &conv],
        )?;
        Ok(())
    }

    /// See the module doc: a newer stored state is kept.
    fn e2ee_put_group(&mut self, g: &GroupRow) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO e2ee_groups
                 (conv, group_id, state, applied_seq, group_info, removal_epoch, pending)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (conv) DO UPDATE SET group_id = excluded.group_id,
                 state = excluded.state, applied_seq = excluded.applied_seq,
                 group_info = excluded.group_info, removal_epoch = excluded.removal_epoch,
                 pending = excluded.pending
             WHERE e2ee_groups.applied_seq <= excluded.applied_seq",
            &[
                &g.conv,
                &g.group_id,
                &self.key.seal(&state_ad(&g.conv, "state"), &g.state),
                // As `Db` stores them (a number past i64::MAX wraps, as in SQLite).
                &(g.applied_seq as i64),
                &self
                    .key
                    .seal(&state_ad(&g.conv, "group_info"), &g.group_info),
                &(g.removal_epoch as i64),
                &g.pending.join(","),
            ],
        )?;
        Ok(())
    }

    fn e2ee_delete_group(&mut self, conv: &str) -> Result<(), StoreError> {
        self.client
            .get_mut()
            .execute("DELETE FROM e2ee_groups WHERE conv = $1", &[&conv])?;
        Ok(())
    }

    fn e2ee_add_welcomes(
        &mut self,
        devices: &[(String, String)],
        conv: &str,
        seq: u64,
        welcome: &[u8],
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let mut out = Vec::new();
        for (user, device) in devices {
            let r = tx.query_one(
                "INSERT INTO e2ee_welcomes (user_name, device, conv, seq, welcome)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[user, device, &conv, &(seq as i64), &welcome],
            )?;
            out.push((user.clone(), device.clone(), col::<i64>(&r, 0)? as u64));
        }
        tx.commit()?;
        Ok(out)
    }

    fn e2ee_welcomes(&self, user: &str, device: &str) -> Result<Vec<WelcomeRow>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT id, conv, seq, welcome FROM e2ee_welcomes
             WHERE user_name = $1 AND device = $2 ORDER BY id",
            &[&user, &device],
        )?;
        rows.iter()
            .map(|r| {
                Ok(WelcomeRow {
                    id: col::<i64>(r, 0)? as u64,
                    conv: col(r, 1)?,
                    seq: col::<i64>(r, 2)? as u64,
                    welcome: col(r, 3)?,
                })
            })
            .collect()
    }

    fn e2ee_welcome_done(&mut self, user: &str, device: &str, id: u64) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "DELETE FROM e2ee_welcomes WHERE id = $1 AND user_name = $2 AND device = $3",
            &[&(id as i64), &user, &device],
        )?;
        Ok(())
    }

    /// Needs the messages tables (schema version 3, the `Messages` half).
    fn e2ee_commits_after(
        &mut self,
        conv: &str,
        after: u64,
        commit_type: &str,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, StoreError> {
        // Commits are marked at insert (schema version 6): only they are read and opened.
        let only_commits = if commit_type == conclave_e2ee::CT_COMMIT {
            "AND m.mls_commit"
        } else {
            ""
        };
        let rows = self.client.get_mut().query(
            &format!(
                "SELECT m.msg_id, m.seq, m.sender, m.body FROM messages m
                 JOIN convs c ON c.id = m.conv_id
                 WHERE c.key = $1 AND m.seq > $2 {only_commits} ORDER BY m.seq"
            ),
            &[&conv, &(after as i64)],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let msg_id: String = col(&r, 0)?;
            let seq: i64 = col(&r, 1)?;
            let sealed: Vec<u8> = col(&r, 3)?;
            let body = open_body(&self.key, &msg_id, conv, seq, &sealed)?;
            if body.content_type == commit_type {
                out.push((seq as u64, col(&r, 2)?, body.data));
            }
        }
        Ok(out)
    }
}
