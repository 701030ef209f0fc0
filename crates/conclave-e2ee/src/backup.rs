//! The recovery-key backup (issue 21): the local history, encrypted continuously to a key
//! only the account's person holds, stored on the server as ciphertext.
//!
//! The recovery key is 32 random bytes, shown once as 52 base-32 characters in groups of
//! four. HKDF-SHA256 derives from it the sealing key and the backup's id (what the server files
//! the segments under; it says nothing about the key). Segments are the rows added to the
//! history store since the last one ([`crate::transfer::Row`]s), sealed with
//! XChaCha20-Poly1305 (random 24-byte nonce) bound to the account, the backup's id and the
//! segment's index. Which rows are new is kept by a trigger on the history table, so every
//! writer of history (whatever kind of row) is backed up without knowing it.

use hkdf::Hkdf;
use rusqlite::{OptionalExtension, params};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::E2eeError;
use crate::device::Device;
use crate::history::HistoryKey;
use crate::transfer::{MAX_CHUNK_BYTES, MAX_CHUNK_ROWS, Row};

const ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
const KEY_AD: &[u8] = b"conclave-backup-key-v1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conclave_backup (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    key        BLOB NOT NULL,
    key_id     TEXT NOT NULL,
    next_index INTEGER NOT NULL,
    cursor     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conclave_backup_log (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    conv TEXT NOT NULL,
    seq  INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS conclave_history_backup AFTER INSERT ON conclave_history
WHEN EXISTS (SELECT 1 FROM conclave_backup)
BEGIN
    INSERT INTO conclave_backup_log (conv, seq) VALUES (NEW.conv, NEW.seq);
END;
";

/// A recovery key.
pub struct RecoveryKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl RecoveryKey {
    /// A new random key.
    pub fn generate() -> RecoveryKey {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
        RecoveryKey { bytes }
    }

    /// Reads a key as shown (groups, spaces, dashes and case do not matter).
    pub fn parse(text: &str) -> Result<RecoveryKey, E2eeError> {
        let bad = || {
            E2eeError::Refused(
                "that is not a recovery key: it is 52 letters and digits in groups of four, as shown when the backup was turned on".into(),
            )
        };
        let mut acc: u64 = 0;
        let mut bits = 0u32;
        let mut out = Zeroizing::new(Vec::with_capacity(33));
        let mut count = 0;
        for c in text.chars() {
            if c == '-' || c.is_whitespace() {
                continue;
            }
            let c = c.to_ascii_uppercase() as u8;
            let v = ALPHABET.iter().position(|a| *a == c).ok_or_else(bad)? as u64;
            count += 1;
            acc = (acc << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        if count != 52 || out.len() != 32 {
            return Err(bad());
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&out);
        Ok(RecoveryKey { bytes })
    }

    /// The key as a person copies it: 52 characters in groups of four.
    pub fn display(&self) -> String {
        let mut chars = String::new();
        let mut acc: u64 = 0;
        let mut bits = 0u32;
        for b in self.bytes.iter() {
            acc = (acc << 8) | *b as u64;
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                chars.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            chars.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
        }
        chars
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }

    fn derive(&self, what: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(Some(b"conclave-backup-v1"), &self.bytes[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit.
        let _ = hk.expand(what, &mut out[..]);
        out
    }

    /// The backup's id on the server (derived; reveals nothing of the key).
    pub fn key_id(&self) -> String {
        hex::encode(&self.derive(b"id")[..16])
    }

    fn sealer(&self) -> BackupSealer {
        BackupSealer {
            key: HistoryKey::from_bytes(&self.derive(b"seal")),
            key_id: self.key_id(),
        }
    }

    /// Opens one segment of the backup of `user` stored at `index`.
    pub fn open_segment(&self, user: &str, index: u64, data: &[u8]) -> Result<Vec<Row>, E2eeError> {
        let s = self.sealer();
        let plain = Zeroizing::new(
            s.key
                .open(segment_ad(user, &s.key_id, index).as_bytes(), data)
                .map_err(|_| {
                    E2eeError::Refused(
                        "a backup segment does not open with this recovery key".into(),
                    )
                })?,
        );
        postcard::from_bytes(&plain)
            .map_err(|e| E2eeError::Malformed(format!("a backup segment: {e}")))
    }
}

struct BackupSealer {
    key: HistoryKey,
    key_id: String,
}

fn segment_ad(user: &str, key_id: &str, index: u64) -> String {
    format!("conclave-backup-segment-v1|{user}|{key_id}|{index}")
}

/// A segment ready to be stored on the server.
pub struct Segment {
    pub key_id: String,
    pub index: u64,
    pub data: Vec<u8>,
    /// The log position it covers up to (give it to [`Device::backup_done`]).
    pub through: i64,
    pub rows: usize,
}

impl Device {
    fn backup_schema(&self) -> Result<(), E2eeError> {
        self.conn.execute_batch(SCHEMA)?;
        Ok(())
    }

    /// Turns the backup on under a new recovery key (replacing any earlier one): every row
    /// of the local history is queued for it, and later rows as they are written. Returns
    /// the key (to show once) and the id of the backup it replaces, if any.
    pub fn backup_enable(&self) -> Result<(RecoveryKey, Option<String>), E2eeError> {
        self.backup_schema()?;
        let key = RecoveryKey::generate();
        let old = self.backup_key_id()?;
        self.tx(|d| {
            d.conn.execute("DELETE FROM conclave_backup", [])?;
            d.conn.execute("DELETE FROM conclave_backup_log", [])?;
            d.conn.execute(
                "INSERT INTO conclave_backup (id, key, key_id, next_index, cursor)
                 VALUES (1, ?1, ?2, 0, 0)",
                params![d.history.seal(KEY_AD, &key.bytes[..]), key.key_id()],
            )?;
            d.conn.execute(
                "INSERT INTO conclave_backup_log (conv, seq)
                 SELECT conv, seq FROM conclave_history ORDER BY rowid",
                [],
            )?;
            Ok(())
        })?;
        Ok((key, old))
    }

    /// Adopts a recovery key given at restore: new rows of this device go to the same backup,
    /// after the segments already there (`next_index`).
    pub fn backup_adopt(&self, key: &RecoveryKey, next_index: u64) -> Result<(), E2eeError> {
        self.backup_schema()?;
        self.tx(|d| {
            d.conn.execute("DELETE FROM conclave_backup", [])?;
            d.conn.execute("DELETE FROM conclave_backup_log", [])?;
            d.conn.execute(
                "INSERT INTO conclave_backup (id, key, key_id, next_index, cursor)
                 VALUES (1, ?1, ?2, ?3, 0)",
                params![
                    d.history.seal(KEY_AD, &key.bytes[..]),
                    key.key_id(),
                    next_index as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Turns the backup off on this device; the id of the backup it was writing.
    pub fn backup_disable(&self) -> Result<Option<String>, E2eeError> {
        self.backup_schema()?;
        let old = self.backup_key_id()?;
        self.tx(|d| {
            d.conn.execute("DELETE FROM conclave_backup", [])?;
            d.conn.execute("DELETE FROM conclave_backup_log", [])?;
            Ok(())
        })?;
        Ok(old)
    }

    /// The id of the backup this device writes, if it writes one.
    pub fn backup_key_id(&self) -> Result<Option<String>, E2eeError> {
        self.backup_schema()?;
        Ok(self
            .conn
            .query_row("SELECT key_id FROM conclave_backup WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The next segment of rows not yet in the backup, if the backup is on and there are any.
    pub fn backup_next(&self) -> Result<Option<Segment>, E2eeError> {
        self.backup_schema()?;
        let row: Option<(Vec<u8>, i64, i64)> = self
            .conn
            .query_row(
                "SELECT key, next_index, cursor FROM conclave_backup WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((sealed_key, index, cursor)) = row else {
            return Ok(None);
        };
        let raw = Zeroizing::new(self.history.open(KEY_AD, &sealed_key)?);
        let mut bytes = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(E2eeError::WrongKey);
        }
        bytes.copy_from_slice(&raw);
        let key = RecoveryKey { bytes };
        let mut st = self.conn.prepare(
            "SELECT l.id, h.conv, h.seq, h.sender, h.ts_ms, h.record
             FROM conclave_backup_log l JOIN conclave_history h ON h.conv = l.conv AND h.seq = l.seq
             WHERE l.id > ?1 ORDER BY l.id LIMIT ?2",
        )?;
        let mut q = st.query(params![cursor, MAX_CHUNK_ROWS as i64])?;
        let mut rows = Vec::new();
        let mut through = cursor;
        let mut size = 0usize;
        while let Some(r) = q.next()? {
            through = r.get(0)?;
            let conv: String = r.get(1)?;
            let seq: i64 = r.get(2)?;
            let record: Vec<u8> = r.get(5)?;
            let ad = format!("conclave-local-v1|{conv}|{seq}");
            let Ok(payload) = self.history.open(ad.as_bytes(), &record) else {
                continue;
            };
            size += payload.len() + 32;
            let state = self.local_state(&conv, seq as u64)?;
            rows.push(Row {
                state,
                conv,
                seq: seq as u64,
                sender: r.get(3)?,
                ts_ms: r.get(4)?,
                payload,
            });
            if size >= MAX_CHUNK_BYTES {
                break;
            }
        }
        drop(q);
        if through == cursor {
            // Log entries whose rows are gone: nothing to store; skip past them.
            let last: i64 = self.conn.query_row(
                "SELECT COALESCE(MAX(id), 0) FROM conclave_backup_log",
                [],
                |r| r.get(0),
            )?;
            if last > cursor {
                self.conn.execute(
                    "UPDATE conclave_backup SET cursor = ?1 WHERE id = 1",
                    [last],
                )?;
            }
            return Ok(None);
        }
        let plain = Zeroizing::new(
            postcard::to_allocvec(&rows).map_err(|e| E2eeError::Malformed(e.to_string()))?,
        );
        let s = key.sealer();
        let index = index as u64;
        let data = s
            .key
            .seal(segment_ad(self.user(), &s.key_id, index).as_bytes(), &plain);
        Ok(Some(Segment {
            key_id: s.key_id,
            index,
            data,
            through,
            rows: rows.len(),
        }))
    }

    /// The server stored `segment`: the next one starts after it.
    pub fn backup_done(&self, segment: &Segment) -> Result<(), E2eeError> {
        self.tx(|d| {
            d.conn.execute(
                "UPDATE conclave_backup SET next_index = ?1 + 1, cursor = ?2
                 WHERE id = 1 AND key_id = ?3",
                params![segment.index as i64, segment.through, segment.key_id],
            )?;
            d.conn.execute(
                "DELETE FROM conclave_backup_log WHERE id <= ?1",
                [segment.through],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_keys_read_back_as_shown_and_typos_are_refused() {
        let k = RecoveryKey::generate();
        let shown = k.display();
        assert_eq!(shown.len(), 52 + 12);
        let back = RecoveryKey::parse(&shown.to_lowercase().replace('-', " ")).unwrap();
        assert_eq!(back.key_id(), k.key_id());
        assert!(RecoveryKey::parse(&shown[..shown.len() - 1]).is_err());
        assert!(RecoveryKey::parse("hello").is_err());
        assert_ne!(RecoveryKey::generate().key_id(), k.key_id());
    }
}
