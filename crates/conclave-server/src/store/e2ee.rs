//! End-to-end encryption records: devices and their key packages, each conversation's public
//! group state (sealed like everything else), and the Welcome mailbox of each device.

use rusqlite::{OptionalExtension, params};

use super::{Db, StoreError};

/// Schema version 3 adds these tables.
pub(super) const E2EE_SCHEMA: &str = "
CREATE TABLE e2ee_devices (
    user       TEXT NOT NULL,
    device     TEXT NOT NULL,
    sig_key    BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
CREATE TABLE e2ee_key_packages (
    id     INTEGER PRIMARY KEY,
    user   TEXT NOT NULL,
    device TEXT NOT NULL,
    kp     BLOB NOT NULL
);
CREATE INDEX e2ee_key_packages_device ON e2ee_key_packages(user, device);
CREATE TABLE e2ee_groups (
    conv          TEXT PRIMARY KEY,
    group_id      BLOB NOT NULL,
    state         BLOB NOT NULL,
    applied_seq   INTEGER NOT NULL,
    group_info    BLOB NOT NULL,
    removal_epoch INTEGER NOT NULL DEFAULT 0,
    pending       TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE e2ee_welcomes (
    id      INTEGER PRIMARY KEY,
    user    TEXT NOT NULL,
    device  TEXT NOT NULL,
    conv    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    welcome BLOB NOT NULL
);
CREATE INDEX e2ee_welcomes_device ON e2ee_welcomes(user, device);
";

/// What the server's MLS signature key is sealed with (the PostgreSQL store seals it the
/// same way).
pub(crate) const SIGNER_AD: &[u8] = b"conclave-e2ee-signer-v1";

/// Most key packages kept per device.
pub const MAX_KEY_PACKAGES: usize = 100;

/// A conversation's group as stored (state and GroupInfo opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    pub conv: String,
    pub group_id: Vec<u8>,
    pub state: Vec<u8>,
    pub applied_seq: u64,
    pub group_info: Vec<u8>,
    pub removal_epoch: u64,
    /// Users whose removal is pending (proposed, not yet committed).
    pub pending: Vec<String>,
}

/// A stored Welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeRow {
    pub id: u64,
    pub conv: String,
    pub seq: u64,
    pub welcome: Vec<u8>,
}

/// What a group's state and GroupInfo are sealed with (the PostgreSQL store seals them the
/// same way).
pub(crate) fn state_ad(conv: &str, what: &str) -> Vec<u8> {
    format!("conclave-e2ee-v1|{what}|{conv}").into_bytes()
}

impl Db {
    /// Registers a device (or confirms it) and stores key packages, up to the limit. Returns
    /// how many the device has.
    pub fn e2ee_publish(
        &mut self,
        user: &str,
        device: &str,
        sig_key: &[u8],
        kps: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        let tx = self.conn.transaction()?;
        let known: Option<Vec<u8>> = tx
            .query_row(
                "SELECT sig_key FROM e2ee_devices WHERE user = ?1 AND device = ?2",
                params![user, device],
                |r| r.get(0),
            )
            .optional()?;
        match known {
            Some(k) if k != sig_key => return Err(StoreError::Exists),
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO e2ee_devices (user, device, sig_key, created_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![user, device, sig_key, now_ms],
                )?;
            }
        }
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM e2ee_key_packages WHERE user = ?1 AND device = ?2",
            params![user, device],
            |r| r.get(0),
        )?;
        let room = MAX_KEY_PACKAGES.saturating_sub(count as usize);
        for kp in kps.iter().take(room) {
            tx.execute(
                "INSERT INTO e2ee_key_packages (user, device, kp) VALUES (?1, ?2, ?3)",
                params![user, device, kp],
            )?;
        }
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM e2ee_key_packages WHERE user = ?1 AND device = ?2",
            params![user, device],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(count as u32)
    }

    /// The devices of `user`: (device, signature key).
    pub fn e2ee_devices(&self, user: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, sig_key FROM e2ee_devices WHERE user = ?1 ORDER BY created_ms, device",
        )?;
        let rows = st.query_map([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Takes one key package of every device of each user, atomically: each is given out
    /// once. Devices with none left are skipped (they join by external commit).
    pub fn e2ee_claim(
        &mut self,
        users: &[String],
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut out = Vec::new();
        for user in users {
            let devices: Vec<String> = {
                let mut st =
                    tx.prepare_cached("SELECT device FROM e2ee_devices WHERE user = ?1")?;
                st.query_map([user], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            for device in devices {
                let row: Option<(i64, Vec<u8>)> = tx
                    .query_row(
                        "SELECT id, kp FROM e2ee_key_packages WHERE user = ?1 AND device = ?2
                         ORDER BY id LIMIT 1",
                        params![user, device],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((id, kp)) = row {
                    tx.execute("DELETE FROM e2ee_key_packages WHERE id = ?1", [id])?;
                    out.push((user.clone(), device, kp));
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Every conversation's group.
    pub fn e2ee_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT conv, group_id, state, applied_seq, group_info, removal_epoch, pending
             FROM e2ee_groups",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (conv, group_id, state, applied, gi, removal_epoch, pending) = row?;
            out.push(GroupRow {
                state: self
                    .key
                    .open(&state_ad(&conv, "state"), &state)
                    .map_err(|_| StoreError::Corrupt)?,
                group_info: self
                    .key
                    .open(&state_ad(&conv, "group_info"), &gi)
                    .map_err(|_| StoreError::Corrupt)?,
                conv,
                group_id,
                applied_seq: applied as u64,
                removal_epoch: removal_epoch as u64,
                pending: pending
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Saves a conversation's group (insert, or replace a state that is not newer: one
    /// whose `applied_seq` is at most this one's). A group never moves back to an older
    /// state: the PostgreSQL store, where two nodes may save the same group at once, keeps
    /// the same rule, and on one node nothing saves an older state anyway.
    pub fn e2ee_put_group(&mut self, g: &GroupRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO e2ee_groups
                 (conv, group_id, state, applied_seq, group_info, removal_epoch, pending)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(conv) DO UPDATE SET group_id = excluded.group_id,
                 state = excluded.state, applied_seq = excluded.applied_seq,
                 group_info = excluded.group_info, removal_epoch = excluded.removal_epoch,
                 pending = excluded.pending
             WHERE applied_seq <= excluded.applied_seq",
            params![
                g.conv,
                g.group_id,
                self.key.seal(&state_ad(&g.conv, "state"), &g.state),
                g.applied_seq as i64,
                self.key
                    .seal(&state_ad(&g.conv, "group_info"), &g.group_info),
                g.removal_epoch as i64,
                g.pending.join(","),
            ],
        )?;
        Ok(())
    }

    /// Drops a conversation's group (when its room is deleted).
    pub fn e2ee_delete_group(&mut self, conv: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM e2ee_groups WHERE conv = ?1", [conv])?;
        Ok(())
    }

    /// Puts a Welcome in each of these devices' mailboxes.
    pub fn e2ee_add_welcomes(
        &mut self,
        devices: &[(String, String)],
        conv: &str,
        seq: u64,
        welcome: &[u8],
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut out = Vec::new();
        for (user, device) in devices {
            tx.execute(
                "INSERT INTO e2ee_welcomes (user, device, conv, seq, welcome)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![user, device, conv, seq as i64, welcome],
            )?;
            out.push((user.clone(), device.clone(), tx.last_insert_rowid() as u64));
        }
        tx.commit()?;
        Ok(out)
    }

    /// The Welcomes waiting for a device, oldest first.
    pub fn e2ee_welcomes(&self, user: &str, device: &str) -> Result<Vec<WelcomeRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, conv, seq, welcome FROM e2ee_welcomes
             WHERE user = ?1 AND device = ?2 ORDER BY id",
        )?;
        let rows = st.query_map(params![user, device], |r| {
            Ok(WelcomeRow {
                id: r.get::<_, i64>(0)? as u64,
                conv: r.get(1)?,
                seq: r.get::<_, i64>(2)? as u64,
                welcome: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a processed Welcome of this device.
    pub fn e2ee_welcome_done(
        &mut self,
        user: &str,
        device: &str,
        id: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM e2ee_welcomes WHERE id = ?1 AND user = ?2 AND device = ?3",
            params![id as i64, user, device],
        )?;
        Ok(())
    }

    /// The commits of a conversation after `after`, in order: (seq, sender, MLS bytes). Used
    /// to bring a group's stored state up to its log after a crash.
    pub fn e2ee_commits_after(
        &mut self,
        conv: &str,
        after: u64,
        commit_type: &str,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, StoreError> {
        let Some(conv_id) = self.existing_conv_id(conv)? else {
            return Ok(Vec::new());
        };
        let rows: Vec<(String, i64, String, Vec<u8>)> = {
            let mut st = self.conn.prepare(
                "SELECT msg_id, seq, sender, body FROM messages
                 WHERE conv_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            st.query_map(params![conv_id, after as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (msg_id, seq, sender, sealed) in rows {
            let body = self.open_body(&msg_id, conv, seq, &sealed)?;
            if body.content_type == commit_type {
                out.push((seq as u64, sender, body.data));
            }
        }
        Ok(out)
    }
}

impl Db {
    /// The server's MLS signature key (sealed in `meta`), created on first use.
    pub fn e2ee_signer_bytes(
        &mut self,
        fresh: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        const AD: &[u8] = SIGNER_AD;
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'e2ee_signer'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(sealed) = sealed {
            return self.key.open(AD, &sealed).map_err(|_| StoreError::Corrupt);
        }
        let bytes = fresh();
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('e2ee_signer', ?1)",
            [self.key.seal(AD, &bytes)],
        )?;
        Ok(bytes)
    }
}
