//! History for new devices and recovery-key backups (issue 21): which devices of an account
//! asked for history and what the account decided, the sealed chunks waiting for a device,
//! and each account's backup segments. All of it is ciphertext the server cannot open
//! (sealed by the clients); the server sees only sizes, counts and times.

use conclave_proto::{BackupChunk, Bytes, TransferChunk, WaitingDevice};
use rusqlite::{OptionalExtension, params};

use super::{Db, StoreError};

/// Created at open when missing (an addition that needs no schema version of its own).
pub(super) const DEVICES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS device_requests (
    user         TEXT NOT NULL,
    device       TEXT NOT NULL,
    transfer_key BLOB NOT NULL,
    signature    BLOB NOT NULL,
    since_ms     INTEGER NOT NULL,
    addr         TEXT NOT NULL,
    state        TEXT NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_transfers (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user        TEXT NOT NULL,
    device      TEXT NOT NULL,
    from_device TEXT NOT NULL,
    transfer    TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    data        BLOB NOT NULL,
    UNIQUE (user, device, transfer, idx)
);
CREATE TABLE IF NOT EXISTS backup_segments (
    user   TEXT NOT NULL,
    key_id TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (user, key_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_revoked (
    user       TEXT NOT NULL,
    device     TEXT NOT NULL,
    sig_key    BLOB NOT NULL,
    revoked_ms INTEGER NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
";

/// What became of a chunk or segment to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// The device is not approved (waiting, rejected, or unknown).
    NotApproved,
    /// The limit is reached.
    Full,
}

impl Db {
    /// Records that `device` asks for history with this transfer key. Only a device of an
    /// account that had other devices before it waits; one that was decided on keeps its
    /// state.
    /// Returns the device's row when it is waiting.
    pub fn device_announce(
        &mut self,
        user: &str,
        device: &str,
        transfer_key: &[u8],
        signature: &[u8],
        now_ms: i64,
        addr: &str,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        let tx = self.conn.transaction()?;
        // Devices registered before this one (the account's first device never waits).
        let others: i64 = tx.query_row(
            "SELECT COUNT(*) FROM e2ee_devices WHERE user = ?1 AND device <> ?2
             AND created_ms <= (SELECT created_ms FROM e2ee_devices WHERE user = ?1 AND device = ?2)",
            params![user, device],
            |r| r.get(0),
        )?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM device_requests WHERE user = ?1 AND device = ?2",
                params![user, device],
                |r| r.get(0),
            )
            .optional()?;
        match state.as_deref() {
            None if others > 0 => {
                tx.execute(
                    "INSERT INTO device_requests
                     (user, device, transfer_key, signature, since_ms, addr, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'waiting')",
                    params![user, device, transfer_key, signature, now_ms, addr],
                )?;
            }
            Some("waiting") => {
                tx.execute(
                    "UPDATE device_requests SET transfer_key = ?3, signature = ?4, addr = ?5
                     WHERE user = ?1 AND device = ?2",
                    params![user, device, transfer_key, signature, addr],
                )?;
            }
            _ => {}
        }
        tx.commit()?;
        Ok(self
            .device_requests(user)?
            .into_iter()
            .find(|w| w.device == device && w.state == "waiting"))
    }

    /// Every device of `user` that asked for history, with its state, oldest first.
    pub fn device_requests(&self, user: &str) -> Result<Vec<WaitingDevice>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT r.device, d.sig_key, r.transfer_key, r.signature, r.since_ms, r.addr, r.state
             FROM device_requests r JOIN e2ee_devices d ON d.user = r.user AND d.device = r.device
             WHERE r.user = ?1 ORDER BY r.since_ms, r.device",
        )?;
        let rows = st.query_map([user], |r| {
            Ok(WaitingDevice {
                device: r.get(0)?,
                signature_key: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                transfer_key: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                signature: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                since_ms: r.get(4)?,
                addr: r.get(5)?,
                state: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Approves or rejects a device that asked. A rejected device's waiting chunks are
    /// deleted. `None` when no such device asked.
    pub fn device_decide(
        &mut self,
        user: &str,
        device: &str,
        approve: bool,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        let state = if approve { "approved" } else { "rejected" };
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE device_requests SET state = ?3 WHERE user = ?1 AND device = ?2",
            params![user, device, state],
        )?;
        if !approve {
            tx.execute(
                "DELETE FROM device_transfers WHERE user = ?1 AND device = ?2",
                params![user, device],
            )?;
        }
        tx.commit()?;
        if n == 0 {
            return Ok(None);
        }
        Ok(self
            .device_requests(user)?
            .into_iter()
            .find(|w| w.device == device))
    }

    /// Removes a device from its account for good (rejected, or removed by another device of
    /// the account): it is recorded as revoked (so it cannot publish itself again), and its
    /// registration, key packages, Welcomes, request and waiting chunks are deleted (so no one
    /// can add it to a group, and a new device no longer accepts history signed by it).
    /// Returns its request row as it was, with the state `removed`; `None` when the account
    /// has no such device.
    pub fn device_revoke(
        &mut self,
        user: &str,
        device: &str,
        now_ms: i64,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        let before = self
            .device_requests(user)?
            .into_iter()
            .find(|w| w.device == device);
        let tx = self.conn.transaction()?;
        let sig_key: Option<Vec<u8>> = tx
            .query_row(
                "SELECT sig_key FROM e2ee_devices WHERE user = ?1 AND device = ?2",
                params![user, device],
                |r| r.get(0),
            )
            .optional()?;
        let Some(sig_key) = sig_key else {
            return Ok(None);
        };
        tx.execute(
            "INSERT OR REPLACE INTO device_revoked (user, device, sig_key, revoked_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![user, device, sig_key, now_ms],
        )?;
        for table in [
            "e2ee_devices",
            "e2ee_key_packages",
            "e2ee_welcomes",
            "device_requests",
            "device_transfers",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE user = ?1 AND device = ?2"),
                params![user, device],
            )?;
        }
        tx.commit()?;
        Ok(Some(match before {
            Some(w) => WaitingDevice {
                state: "removed".into(),
                ..w
            },
            None => WaitingDevice {
                device: device.to_string(),
                signature_key: Bytes::from(sig_key),
                transfer_key: Bytes::new(),
                signature: Bytes::new(),
                since_ms: now_ms,
                addr: String::new(),
                state: "removed".into(),
            },
        }))
    }

    /// Which of these devices were removed from their account ([`Db::device_revoke`]).
    pub fn devices_revoked(
        &self,
        devices: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM device_revoked WHERE user = ?1 AND device = ?2")?;
        let mut out = Vec::new();
        for (u, d) in devices {
            if st.exists(params![u, d])? {
                out.push((u.clone(), d.clone()));
            }
        }
        Ok(out)
    }

    /// Stores a chunk for an approved device, within `limit_bytes` waiting for it.
    #[allow(clippy::too_many_arguments)]
    pub fn transfer_put(
        &mut self,
        user: &str,
        device: &str,
        from_device: &str,
        transfer: &str,
        index: u32,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError> {
        let tx = self.conn.transaction()?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM device_requests WHERE user = ?1 AND device = ?2",
                params![user, device],
                |r| r.get(0),
            )
            .optional()?;
        if state.as_deref() != Some("approved") {
            return Ok(PutOutcome::NotApproved);
        }
        let waiting: i64 = tx.query_row(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM device_transfers
             WHERE user = ?1 AND device = ?2",
            params![user, device],
            |r| r.get(0),
        )?;
        if waiting as u64 + data.len() as u64 > limit_bytes {
            return Ok(PutOutcome::Full);
        }
        tx.execute(
            "INSERT OR IGNORE INTO device_transfers (user, device, from_device, transfer, idx, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![user, device, from_device, transfer, index, data],
        )?;
        tx.commit()?;
        Ok(PutOutcome::Stored)
    }

    /// Chunks waiting for a device after id `after`: at most `max` of them, and no more
    /// than `max_bytes` (always at least one when any waits).
    pub fn transfer_fetch(
        &self,
        user: &str,
        device: &str,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<TransferChunk>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, from_device, transfer, idx, data FROM device_transfers
             WHERE user = ?1 AND device = ?2 AND id > ?3 ORDER BY id LIMIT ?4",
        )?;
        let mut rows = st.query(params![user, device, after as i64, max as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = rows.next()? {
            let data: Vec<u8> = r.get(4)?;
            if !out.is_empty() && bytes + data.len() > max_bytes {
                break;
            }
            bytes += data.len();
            out.push(TransferChunk {
                id: r.get::<_, i64>(0)? as u64,
                from_device: r.get(1)?,
                transfer: r.get(2)?,
                index: r.get(3)?,
                data: Bytes::from(data),
            });
        }
        Ok(out)
    }

    /// The device took every chunk up to id `through`.
    pub fn transfer_ack(
        &mut self,
        user: &str,
        device: &str,
        through: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM device_transfers WHERE user = ?1 AND device = ?2 AND id <= ?3",
            params![user, device, through as i64],
        )?;
        Ok(())
    }

    /// Appends a segment to an account's backup, within `limit_bytes` for the account.
    pub fn backup_put(
        &mut self,
        user: &str,
        key_id: &str,
        index: u64,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError> {
        let tx = self.conn.transaction()?;
        let used: i64 = tx.query_row(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM backup_segments WHERE user = ?1",
            [user],
            |r| r.get(0),
        )?;
        if used as u64 + data.len() as u64 > limit_bytes {
            return Ok(PutOutcome::Full);
        }
        tx.execute(
            "INSERT OR IGNORE INTO backup_segments (user, key_id, idx, data) VALUES (?1, ?2, ?3, ?4)",
            params![user, key_id, index as i64, data],
        )?;
        tx.commit()?;
        Ok(PutOutcome::Stored)
    }

    /// Segments of an account's backup under `key_id` after `after`, bounded like
    /// [`Db::transfer_fetch`].
    pub fn backup_fetch(
        &self,
        user: &str,
        key_id: &str,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<BackupChunk>, StoreError> {
        let after = after.map(|a| a as i64).unwrap_or(-1);
        let mut st = self.conn.prepare_cached(
            "SELECT idx, data FROM backup_segments
             WHERE user = ?1 AND key_id = ?2 AND idx > ?3 ORDER BY idx LIMIT ?4",
        )?;
        let mut rows = st.query(params![user, key_id, after, max as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = rows.next()? {
            let data: Vec<u8> = r.get(1)?;
            if !out.is_empty() && bytes + data.len() > max_bytes {
                break;
            }
            bytes += data.len();
            out.push(BackupChunk {
                index: r.get::<_, i64>(0)? as u64,
                data: Bytes::from(data),
            });
        }
        Ok(out)
    }

    /// Deletes an account's backup segments (all, or all but those under `keep`).
    pub fn backup_drop(&mut self, user: &str, keep: Option<&str>) -> Result<(), StoreError> {
        match keep {
            Some(k) => self.conn.execute(
                "DELETE FROM backup_segments WHERE user = ?1 AND key_id <> ?2",
                params![user, k],
            )?,
            None => self
                .conn
                .execute("DELETE FROM backup_segments WHERE user = ?1", [user])?,
        };
        Ok(())
    }
}
