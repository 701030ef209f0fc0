//! [`Devices`] on PostgreSQL: which devices of an account asked for history and what the
//! account decided, the chunks waiting for a device, each account's backup segments, revoked
//! devices. As in `Db`, all of it is ciphertext sealed by the clients.
//!
//! Across nodes: a chunk for a device is stored under a lock on that device's request row
//! (`SELECT … FOR UPDATE`), so the limit of bytes waiting holds when two nodes store at once,
//! and chunk ids (a sequence) grow in commit order for each device: a device that fetched up
//! to an id never finds an older id committed later. A backup segment is stored under a
//! transaction-scoped advisory lock on its account, so the account's limit holds too.

use conclave_proto::{BackupChunk, Bytes, TransferChunk, WaitingDevice};

use super::{PgDb, col};
use crate::store::{Devices, PutOutcome, StoreError};

/// Schema version 4, part two: as SQLite's `devices` tables.
pub(super) const SCHEMA: &str = r#"
CREATE TABLE device_requests (
    user_name    TEXT COLLATE "C" NOT NULL,
    device       TEXT COLLATE "C" NOT NULL,
    transfer_key BYTEA NOT NULL,
    signature    BYTEA NOT NULL,
    since_ms     BIGINT NOT NULL,
    addr         TEXT NOT NULL,
    state        TEXT NOT NULL,
    PRIMARY KEY (user_name, device)
);
CREATE TABLE device_transfers (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_name   TEXT COLLATE "C" NOT NULL,
    device      TEXT COLLATE "C" NOT NULL,
    from_device TEXT NOT NULL,
    transfer    TEXT COLLATE "C" NOT NULL,
    idx         BIGINT NOT NULL,
    data        BYTEA NOT NULL,
    UNIQUE (user_name, device, transfer, idx)
);
CREATE INDEX device_transfers_device ON device_transfers(user_name, device, id);
CREATE TABLE backup_segments (
    user_name TEXT COLLATE "C" NOT NULL,
    key_id    TEXT COLLATE "C" NOT NULL,
    idx       BIGINT NOT NULL,
    data      BYTEA NOT NULL,
    PRIMARY KEY (user_name, key_id, idx)
);
CREATE TABLE device_revoked (
    user_name  TEXT COLLATE "C" NOT NULL,
    device     TEXT COLLATE "C" NOT NULL,
    sig_key    BYTEA NOT NULL,
    revoked_ms BIGINT NOT NULL,
    PRIMARY KEY (user_name, device)
);
"#;

/// The first key of the advisory lock a backup is written under (the second is a hash of the
/// account name); "bkup" in ASCII, apart from the schema lock's single 64-bit key.
const BACKUP_LOCK: i32 = 0x626b_7570;

/// A row count as SQLite's `LIMIT` takes it (a limit past `i64::MAX` is no limit).
fn limit(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

const REQUEST_QUERY: &str = "SELECT r.device, d.sig_key, r.transfer_key, r.signature, r.since_ms,
        r.addr, r.state
    FROM device_requests r JOIN e2ee_devices d ON d.user_name = r.user_name AND d.device = r.device
    WHERE r.user_name = $1";

fn request_row(r: &postgres::Row) -> Result<WaitingDevice, StoreError> {
    Ok(WaitingDevice {
        device: col(r, 0)?,
        signature_key: Bytes::from(col::<Vec<u8>>(r, 1)?),
        transfer_key: Bytes::from(col::<Vec<u8>>(r, 2)?),
        signature: Bytes::from(col::<Vec<u8>>(r, 3)?),
        since_ms: col(r, 4)?,
        addr: col(r, 5)?,
        state: col(r, 6)?,
    })
}

/// One device's request row, as [`Devices::device_requests`] lists it.
fn request_of(
    c: &mut impl postgres::GenericClient,
    user: &str,
    device: &str,
) -> Result<Option<WaitingDevice>, StoreError> {
    let row = c.query_opt(
        &format!("{REQUEST_QUERY} AND r.device = $2"),
        &[&user, &device],
    )?;
    row.as_ref().map(request_row).transpose()
}

impl Devices for PgDb {
    fn device_announce(
        &mut self,
        user: &str,
        device: &str,
        transfer_key: &[u8],
        signature: &[u8],
        now_ms: i64,
        addr: &str,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        // Devices registered before this one (the account's first device never waits).
        let others: i64 = col(
            &tx.query_one(
                "SELECT COUNT(*) FROM e2ee_devices WHERE user_name = $1 AND device <> $2
                 AND created_ms <= (SELECT created_ms FROM e2ee_devices
                                    WHERE user_name = $1 AND device = $2)",
                &[&user, &device],
            )?,
            0,
        )?;
        let state: Option<String> = tx
            .query_opt(
                "SELECT state FROM device_requests WHERE user_name = $1 AND device = $2
                 FOR UPDATE",
                &[&user, &device],
            )?
            .map(|r| col(&r, 0))
            .transpose()?;
        match state.as_deref() {
            None if others > 0 => {
                // Another node may have inserted it meanwhile: then its row stands.
                tx.execute(
                    "INSERT INTO device_requests
                     (user_name, device, transfer_key, signature, since_ms, addr, state)
                     VALUES ($1, $2, $3, $4, $5, $6, 'waiting') ON CONFLICT DO NOTHING",
                    &[&user, &device, &transfer_key, &signature, &now_ms, &addr],
                )?;
            }
            Some("waiting") => {
                tx.execute(
                    "UPDATE device_requests SET transfer_key = $3, signature = $4, addr = $5
                     WHERE user_name = $1 AND device = $2",
                    &[&user, &device, &transfer_key, &signature, &addr],
                )?;
            }
            _ => {}
        }
        let row = request_of(&mut tx, user, device)?;
        tx.commit()?;
        Ok(row.filter(|w| w.state == "waiting"))
    }

    fn device_requests(&self, user: &str) -> Result<Vec<WaitingDevice>, StoreError> {
        let rows = self.client.borrow_mut().query(
            &format!("{REQUEST_QUERY} ORDER BY r.since_ms, r.device"),
            &[&user],
        )?;
        rows.iter().map(request_row).collect()
    }

    fn device_decide(
        &mut self,
        user: &str,
        device: &str,
        approve: bool,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        let state = if approve { "approved" } else { "rejected" };
        let mut tx = self.client.get_mut().transaction()?;
        let n = tx.execute(
            "UPDATE device_requests SET state = $3 WHERE user_name = $1 AND device = $2",
            &[&user, &device, &state],
        )?;
        if !approve {
            tx.execute(
                "DELETE FROM device_transfers WHERE user_name = $1 AND device = $2",
                &[&user, &device],
            )?;
        }
        let row = if n == 0 {
            None
        } else {
            request_of(&mut tx, user, device)?
        };
        tx.commit()?;
        Ok(row)
    }

    fn device_revoke(
        &mut self,
        user: &str,
        device: &str,
        now_ms: i64,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let sig_key: Option<Vec<u8>> = tx
            .query_opt(
                "SELECT sig_key FROM e2ee_devices WHERE user_name = $1 AND device = $2
                 FOR UPDATE",
                &[&user, &device],
            )?
            .map(|r| col(&r, 0))
            .transpose()?;
        let Some(sig_key) = sig_key else {
            return Ok(None);
        };
        let before = request_of(&mut tx, user, device)?;
        tx.execute(
            "INSERT INTO device_revoked (user_name, device, sig_key, revoked_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_name, device) DO UPDATE SET sig_key = excluded.sig_key,
                 revoked_ms = excluded.revoked_ms",
            &[&user, &device, &sig_key, &now_ms],
        )?;
        for table in [
            "e2ee_devices",
            "e2ee_key_packages",
            "e2ee_welcomes",
            "device_requests",
            "device_transfers",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE user_name = $1 AND device = $2"),
                &[&user, &device],
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

    /// In the order asked (one query for all of them).
    fn devices_revoked(
        &self,
        devices: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let (users, names): (Vec<&str>, Vec<&str>) = devices
            .iter()
            .map(|(u, d)| (u.as_str(), d.as_str()))
            .unzip();
        let rows = self.client.borrow_mut().query(
            "SELECT x.u, x.d FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(u, d, n)
             WHERE EXISTS (SELECT 1 FROM device_revoked r
                           WHERE r.user_name = x.u AND r.device = x.d)
             ORDER BY x.n",
            &[&users, &names],
        )?;
        rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
    }

    fn transfer_put(
        &mut self,
        user: &str,
        device: &str,
        from_device: &str,
        transfer: &str,
        index: u32,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        // The device's row stays locked until the chunk is committed (see the module doc).
        let state: Option<String> = tx
            .query_opt(
                "SELECT state FROM device_requests WHERE user_name = $1 AND device = $2
                 FOR UPDATE",
                &[&user, &device],
            )?
            .map(|r| col(&r, 0))
            .transpose()?;
        if state.as_deref() != Some("approved") {
            return Ok(PutOutcome::NotApproved);
        }
        let waiting: i64 = col(
            &tx.query_one(
                "SELECT coalesce(sum(length(data)), 0)::BIGINT FROM device_transfers
                 WHERE user_name = $1 AND device = $2",
                &[&user, &device],
            )?,
            0,
        )?;
        if waiting.max(0) as u64 + data.len() as u64 > limit_bytes {
            return Ok(PutOutcome::Full);
        }
        tx.execute(
            "INSERT INTO device_transfers (user_name, device, from_device, transfer, idx, data)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                &user,
                &device,
                &from_device,
                &transfer,
                &i64::from(index),
                &data,
            ],
        )?;
        tx.commit()?;
        Ok(PutOutcome::Stored)
    }

    fn transfer_fetch(
        &self,
        user: &str,
        device: &str,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<TransferChunk>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT id, from_device, transfer, idx, data FROM device_transfers
             WHERE user_name = $1 AND device = $2 AND id > $3 ORDER BY id LIMIT $4",
            // As `Db` compares it (an id past i64::MAX wraps, as SQLite reads it).
            &[&user, &device, &(after as i64), &limit(max)],
        )?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in rows {
            let data: Vec<u8> = col(&r, 4)?;
            if !out.is_empty() && bytes + data.len() > max_bytes {
                break;
            }
            bytes += data.len();
            out.push(TransferChunk {
                id: col::<i64>(&r, 0)?.max(0) as u64,
                from_device: col(&r, 1)?,
                transfer: col(&r, 2)?,
                index: u32::try_from(col::<i64>(&r, 3)?).unwrap_or(u32::MAX),
                data: Bytes::from(data),
            });
        }
        Ok(out)
    }

    fn transfer_ack(&mut self, user: &str, device: &str, through: u64) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "DELETE FROM device_transfers WHERE user_name = $1 AND device = $2 AND id <= $3",
            &[&user, &device, &(through as i64)],
        )?;
        Ok(())
    }

    fn backup_put(
        &mut self,
        user: &str,
        key_id: &str,
        index: u64,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        // The account's backup is written by one node at a time (see the module doc).
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&BACKUP_LOCK, &user],
        )?;
        let used: i64 = col(
            &tx.query_one(
                "SELECT coalesce(sum(length(data)), 0)::BIGINT FROM backup_segments
                 WHERE user_name = $1",
                &[&user],
            )?,
            0,
        )?;
        if used.max(0) as u64 + data.len() as u64 > limit_bytes {
            return Ok(PutOutcome::Full);
        }
        tx.execute(
            "INSERT INTO backup_segments (user_name, key_id, idx, data) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&user, &key_id, &(index as i64), &data],
        )?;
        tx.commit()?;
        Ok(PutOutcome::Stored)
    }

    fn backup_fetch(
        &self,
        user: &str,
        key_id: &str,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<BackupChunk>, StoreError> {
        let after = after.map(|a| a as i64).unwrap_or(-1);
        let rows = self.client.borrow_mut().query(
            "SELECT idx, data FROM backup_segments
             WHERE user_name = $1 AND key_id = $2 AND idx > $3 ORDER BY idx LIMIT $4",
            &[&user, &key_id, &after, &limit(max)],
        )?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in rows {
            let data: Vec<u8> = col(&r, 1)?;
            if !out.is_empty() && bytes + data.len() > max_bytes {
                break;
            }
            bytes += data.len();
            out.push(BackupChunk {
                index: col::<i64>(&r, 0)? as u64,
                data: Bytes::from(data),
            });
        }
        Ok(out)
    }

    fn backup_drop(&mut self, user: &str, keep: Option<&str>) -> Result<(), StoreError> {
        let client = self.client.get_mut();
        match keep {
            Some(k) => client.execute(
                "DELETE FROM backup_segments WHERE user_name = $1 AND key_id <> $2",
                &[&user, &k],
            )?,
            None => client.execute("DELETE FROM backup_segments WHERE user_name = $1", &[&user])?,
        };
        Ok(())
    }
}
