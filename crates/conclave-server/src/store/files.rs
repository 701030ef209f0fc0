//! File records: who sent what to whom, and where each recipient stands. The bytes themselves
//! live in the file store (`crate::files`), sealed chunk by chunk; here are the name and hash
//! (sealed too), the size, the target and the recipients.

use conclave_proto::{Conv, FileOffer};
use rusqlite::{OptionalExtension, params};

use super::{Db, StoreError, conv_from_key, conv_key};

/// Schema version 2 adds these tables.
pub(super) const FILES_SCHEMA: &str = "
CREATE TABLE files (
    file_id     TEXT PRIMARY KEY,
    sender      TEXT NOT NULL,
    conv        TEXT NOT NULL,
    except_list TEXT NOT NULL,
    meta        BLOB NOT NULL,
    size        INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    complete    INTEGER NOT NULL DEFAULT 0,
    p2p         INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX files_sender ON files(sender);
CREATE INDEX files_expires ON files(expires_ms);
CREATE TABLE file_recipients (
    file_id     TEXT NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
    user        TEXT NOT NULL,
    state       INTEGER NOT NULL DEFAULT 0,
    wants_relay INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (file_id, user)
) WITHOUT ROWID;
CREATE INDEX file_recipients_user ON file_recipients(user, state);
";

/// Where a recipient stands with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientState {
    Offered = 0,
    Declined = 1,
    Received = 2,
}

impl RecipientState {
    fn from_i64(v: i64) -> RecipientState {
        match v {
            1 => RecipientState::Declined,
            2 => RecipientState::Received,
            _ => RecipientState::Offered,
        }
    }
}

/// A file as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    pub file_id: String,
    pub sender: String,
    pub conv: Conv,
    pub except: Vec<String>,
    pub name: String,
    pub sha256: [u8; 32],
    pub size: u64,
    pub chunk_size: u32,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub complete: bool,
    /// The sender offered it peer to peer (and uploads it only when someone needs the relay).
    pub p2p: bool,
}

impl FileRow {
    /// The offer as a recipient sees it (without a peer-to-peer invitation).
    pub fn offer(&self) -> FileOffer {
        FileOffer {
            file_id: self.file_id.clone(),
            from: self.sender.clone(),
            conv: self.conv.clone(),
            except: self.except.clone(),
            name: self.name.clone(),
            size: self.size,
            sha256: self.sha256,
            chunk_size: self.chunk_size,
            ts_ms: self.created_ms,
            expires_ms: self.expires_ms,
            relay_ready: self.complete,
            p2p: None,
        }
    }
}

fn meta_ad(file_id: &str) -> Vec<u8> {
    format!("conclave-file-meta-v1|{file_id}").into_bytes()
}

/// A file's name and hash sealed under the data key, bound to its id (every backend stores
/// them this way).
pub(crate) fn seal_meta(
    key: &crate::at_rest::DataKey,
    row: &FileRow,
) -> Result<Vec<u8>, StoreError> {
    let meta = postcard::to_stdvec(&(&row.name, &row.sha256)).map_err(|_| StoreError::Corrupt)?;
    Ok(key.seal(&meta_ad(&row.file_id), &meta))
}

/// The name and hash of a file, opened; a wrong key or an altered record is `Corrupt`.
pub(crate) fn open_meta(
    key: &crate::at_rest::DataKey,
    file_id: &str,
    sealed: &[u8],
) -> Result<(String, [u8; 32]), StoreError> {
    let meta = key
        .open(&meta_ad(file_id), sealed)
        .map_err(|_| StoreError::Corrupt)?;
    postcard::from_bytes(&meta).map_err(|_| StoreError::Corrupt)
}

type RawRow = (
    String,
    String,
    String,
    String,
    Vec<u8>,
    i64,
    i64,
    i64,
    i64,
    bool,
    bool,
);

const ROW_COLUMNS: &str = "file_id, sender, conv, except_list, meta, size, chunk_size, created_ms, expires_ms, complete, p2p";

impl Db {
    /// Records a new file and its recipients (the sender is not one).
    pub fn create_file(&mut self, row: &FileRow, recipients: &[String]) -> Result<(), StoreError> {
        let sealed = seal_meta(&self.key, row)?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO files (file_id, sender, conv, except_list, meta, size, chunk_size,
                                created_ms, expires_ms, complete, p2p)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                row.file_id,
                row.sender,
                conv_key(&row.conv),
                row.except.join(","),
                sealed,
                row.size as i64,
                row.chunk_size,
                row.created_ms,
                row.expires_ms,
                row.complete,
                row.p2p
            ],
        )?;
        for user in recipients {
            tx.execute(
                "INSERT OR IGNORE INTO file_recipients (file_id, user) VALUES (?1, ?2)",
                params![row.file_id, user],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn file_from_raw(&self, raw: RawRow) -> Result<FileRow, StoreError> {
        let (
            file_id,
            sender,
            conv,
            except,
            sealed,
            size,
            chunk_size,
            created_ms,
            expires_ms,
            complete,
            p2p,
        ) = raw;
        let (name, sha256) = open_meta(&self.key, &file_id, &sealed)?;
        Ok(FileRow {
            file_id,
            sender,
            conv: conv_from_key(&conv),
            except: except
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            name,
            sha256,
            size: size.max(0) as u64,
            chunk_size: u32::try_from(chunk_size).unwrap_or(0),
            created_ms,
            expires_ms,
            complete,
            p2p,
        })
    }

    fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
            r.get(10)?,
        ))
    }

    /// A file by id.
    pub fn file(&self, file_id: &str) -> Result<Option<FileRow>, StoreError> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {ROW_COLUMNS} FROM files WHERE file_id = ?1"),
                [file_id],
                Self::raw_row,
            )
            .optional()?;
        raw.map(|r| self.file_from_raw(r)).transpose()
    }

    /// A recipient's state for a file; `None` if `user` is not a recipient.
    pub fn file_recipient(
        &self,
        file_id: &str,
        user: &str,
    ) -> Result<Option<RecipientState>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT state FROM file_recipients WHERE file_id = ?1 AND user = ?2",
                params![file_id, user],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(RecipientState::from_i64))
    }

    /// Sets a recipient's state. Returns false if `user` is not a recipient.
    pub fn set_file_recipient(
        &mut self,
        file_id: &str,
        user: &str,
        state: RecipientState,
    ) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE file_recipients SET state = ?3 WHERE file_id = ?1 AND user = ?2",
            params![file_id, user, state as i64],
        )? > 0)
    }

    /// Marks that `user` waits for the relay copy.
    pub fn want_relay(&mut self, file_id: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE file_recipients SET wants_relay = 1 WHERE file_id = ?1 AND user = ?2",
            params![file_id, user],
        )? > 0)
    }

    /// Marks a file's upload complete (its hash checked); returns the recipients still waiting
    /// for it (offered, neither taken nor declined): a relayed file is offered to them now; for
    /// a peer-to-peer file they are told its relay copy is ready.
    pub fn complete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError> {
        self.conn.execute(
            "UPDATE files SET complete = 1 WHERE file_id = ?1",
            [file_id],
        )?;
        let mut st = self
            .conn
            .prepare("SELECT user FROM file_recipients WHERE file_id = ?1 AND state = 0")?;
        let users = st
            .query_map([file_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(users)
    }

    /// Files offered to `user` and not yet taken or declined, unexpired, oldest first.
    pub fn pending_files(
        &self,
        user: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<FileRow>, StoreError> {
        let raws: Vec<RawRow> = {
            let mut st = self.conn.prepare_cached(&format!(
                "SELECT {} FROM files f JOIN file_recipients r ON r.file_id = f.file_id
                 WHERE r.user = ?1 AND r.state = 0 AND f.expires_ms > ?2
                 ORDER BY f.created_ms LIMIT ?3",
                ROW_COLUMNS
                    .split(", ")
                    .map(|c| format!("f.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))?;
            st.query_map(params![user, now_ms, limit], Self::raw_row)?
                .collect::<Result<_, _>>()?
        };
        raws.into_iter().map(|r| self.file_from_raw(r)).collect()
    }

    /// Bytes of unexpired files sent by `user` (what counts against the quota).
    pub fn file_bytes_of(&self, user: &str, now_ms: i64) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT coalesce(sum(size), 0) FROM files WHERE sender = ?1 AND expires_ms > ?2",
            params![user, now_ms],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// Removes the records of files expired at `now_ms`, and returns their ids (the caller
    /// deletes their bytes).
    pub fn expire_files(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT file_id FROM files WHERE expires_ms <= ?1")?;
            st.query_map([now_ms], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let tx = self.conn.transaction()?;
        for id in &ids {
            tx.execute("DELETE FROM file_recipients WHERE file_id = ?1", [id])?;
            tx.execute("DELETE FROM files WHERE file_id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Deletes a file's records (the sender withdrew it); returns the recipients who had
    /// neither taken nor declined it (the caller tells them, and deletes the bytes).
    pub fn delete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError> {
        let tx = self.conn.transaction()?;
        let waiting: Vec<String> = {
            let mut st =
                tx.prepare("SELECT user FROM file_recipients WHERE file_id = ?1 AND state = ?2")?;
            st.query_map(params![file_id, RecipientState::Offered as i64], |r| {
                r.get(0)
            })?
            .collect::<Result<_, _>>()?
        };
        tx.execute("DELETE FROM file_recipients WHERE file_id = ?1", [file_id])?;
        tx.execute("DELETE FROM files WHERE file_id = ?1", [file_id])?;
        tx.commit()?;
        Ok(waiting)
    }

    /// Every file id on record (to find stray bytes in the file store).
    pub fn file_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare("SELECT file_id FROM files")?;
        let ids = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// The key that seals stored file chunks (a sub-key of the data key).
    pub fn file_key(&self) -> crate::at_rest::DataKey {
        let sub = self.key.subkey("conclave stored files v1");
        match crate::at_rest::DataKey::from_bytes(&sub[..]) {
            Some(k) => k,
            // A 32-byte sub-key is always a valid key.
            None => unreachable!("sub-keys are 32 bytes"),
        }
    }
}
