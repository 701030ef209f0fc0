//! The file store: uploaded files, sealed chunk by chunk, in `files/` inside the data directory.
//!
//! Layout: one file per upload, `files/<file id>`, mode 0600, a sequence of fixed-size records.
//! Record `i` holds plaintext bytes `[i * chunk, min((i + 1) * chunk, size))` sealed with
//! XChaCha20-Poly1305 under the file sub-key of the data key: a random 24-byte nonce, the
//! ciphertext, the 16-byte tag. Its associated data names the file and the record index, so a
//! record cannot be moved to another place or another file unnoticed. Because records have a
//! fixed size, any offset is found without an index, and downloads resume anywhere.
//!
//! Uploads append records strictly in order. Chunks are not synced one by one (that would
//! cost a sync per 128 KiB); the file is synced once, when the last chunk arrives and the
//! SHA-256 of the whole matches what the sender announced, and only then is the file marked
//! complete in the database and offered. An upload interrupted by a crash resumes from its
//! last whole, authentic record: [`FileStore::uploaded`] re-reads and re-hashes what is there
//! and cuts off a torn tail.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::at_rest::DataKey;
use crate::store::{FileRow, RecipientState};

/// Directory of stored files inside the data directory.
pub const FILES_DIR: &str = "files";
/// Largest chunk of an upload or download.
pub const MAX_CHUNK_BYTES: u32 = 128 * 1024;
/// Room a chunk frame needs besides its data (request id, file id, offset, encoding: under
/// 100 bytes), with a margin.
pub const CHUNK_FRAME_OVERHEAD: usize = 512;
/// Chunks are a multiple of this.
const CHUNK_ALIGN: usize = 512;
/// Nonce and tag around each sealed record.
pub const RECORD_OVERHEAD: u64 = 24 + 16;
/// Uploads whose hashing state is kept in memory; beyond it the oldest are dropped (and
/// recovered from disk when they continue).
const MAX_LIVE_UPLOADS: usize = 1024;

/// The chunk size for a frame limit (at least 1024, which the configuration enforces): as
/// large as fits, at most [`MAX_CHUNK_BYTES`], a multiple of 512.
pub fn chunk_size_for(max_frame_bytes: usize) -> u32 {
    let room = max_frame_bytes.saturating_sub(CHUNK_FRAME_OVERHEAD) / CHUNK_ALIGN * CHUNK_ALIGN;
    u32::try_from(room)
        .unwrap_or(MAX_CHUNK_BYTES)
        .clamp(CHUNK_ALIGN as u32, MAX_CHUNK_BYTES)
}

/// File rows and recipient states, cached briefly so a transfer of thousands of chunks does
/// not ask the store thread (busy with message commits) for each one. Plain data: the callers
/// read the store on a miss and put what they read.
#[derive(Default)]
pub struct FilesCache {
    rows: Mutex<HashMap<String, (FileRow, std::time::Instant)>>,
    recipients: Mutex<HashMap<(String, String), CachedState>>,
}

type CachedState = (Option<RecipientState>, std::time::Instant);

/// How long a cached row or recipient state is trusted.
const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// Most cached entries of each kind (the cache is emptied when full).
const CACHE_ENTRIES: usize = 4096;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FilesCache {
    /// The row of file `id`, if cached and fresh.
    pub fn row(&self, id: &str) -> Option<FileRow> {
        let rows = locked(&self.rows);
        rows.get(id)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(row, _)| row.clone())
    }

    pub fn put_row(&self, id: &str, row: &FileRow) {
        let mut rows = locked(&self.rows);
        if rows.len() >= CACHE_ENTRIES {
            rows.clear();
        }
        rows.insert(id.to_string(), (row.clone(), std::time::Instant::now()));
    }

    /// A recipient's state (itself maybe none), if cached and fresh.
    pub fn recipient(&self, file_id: &str, user: &str) -> Option<Option<RecipientState>> {
        let map = locked(&self.recipients);
        map.get(&(file_id.to_string(), user.to_string()))
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(state, _)| *state)
    }

    pub fn put_recipient(&self, file_id: &str, user: &str, state: Option<RecipientState>) {
        let mut map = locked(&self.recipients);
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(
            (file_id.to_string(), user.to_string()),
            (state, std::time::Instant::now()),
        );
    }

    pub fn forget(&self, file_id: &str) {
        locked(&self.rows).remove(file_id);
    }

    pub fn forget_recipient(&self, file_id: &str, user: &str) {
        locked(&self.recipients).remove(&(file_id.to_string(), user.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_their_frames() {
        assert_eq!(chunk_size_for(256 * 1024), MAX_CHUNK_BYTES);
        assert_eq!(chunk_size_for(1024), 512);
        assert_eq!(chunk_size_for(4096), 3584);
        for max in [1024usize, 1500, 4096, 70_000, 131_072 + 600] {
            let chunk = chunk_size_for(max) as usize;
            let frame = conclave_proto::encode_client(&conclave_proto::ClientFrame {
                id: u64::MAX,
                req: conclave_proto::Request::FileChunk {
                    file_id: uuid::Uuid::now_v7().hyphenated().to_string(),
                    offset: u64::MAX,
                    data: conclave_proto::Chunk(vec![0xff; chunk]),
                },
            });
            assert!(frame.len() <= max, "{max}: {}", frame.len());
        }
    }

    /// Found by the crash test (SIGKILL between the last chunk's write and the database's
    /// "complete"): after the restart every chunk is on disk, and the sender's resent last
    /// chunk must complete the file instead of being taken for an already stored one (which
    /// left the file neither complete nor resumable).
    #[test]
    fn a_resent_last_chunk_completes_a_file_whose_completion_was_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = || DataKey::from_bytes(&[9u8; 32]).expect("key");
        let data: Vec<u8> = (0..1300u32).map(|i| (i * 7) as u8).collect();
        let row = FileRow {
            file_id: "01936d7e-8f00-7000-8000-000000000002".to_string(),
            sender: "alice".into(),
            conv: conclave_proto::Conv::Room("general".into()),
            except: Vec::new(),
            name: "f".into(),
            sha256: Sha256::digest(&data).into(),
            size: data.len() as u64,
            chunk_size: 512,
            created_ms: 0,
            expires_ms: i64::MAX,
            complete: false,
            p2p: false,
        };
        let store = FileStore::open(dir.path(), key()).expect("store");
        store.create(&row.file_id).expect("create");
        let mut last = None;
        for at in (0..data.len()).step_by(512) {
            let end = (at + 512).min(data.len());
            last = Some(
                store
                    .append(&row, at as u64, &data[at..end])
                    .expect("append"),
            );
        }
        assert_eq!(last.map(|p| p.complete), Some(true));
        // The process dies before the database says "complete"; a new one starts.
        drop(store);
        let store = FileStore::open(dir.path(), key()).expect("store");
        assert_eq!(store.uploaded(&row).expect("uploaded"), row.size);
        let p = store
            .append(&row, 1024, &data[1024..])
            .expect("resent last chunk");
        assert_eq!(
            p,
            Progress {
                uploaded: row.size,
                complete: true
            }
        );
        assert_eq!(store.read(&row, 0).expect("read"), &data[..512]);
    }
}

/// A file id from a peer, checked: the canonical text of a UUID (so it is safe as a path).
pub fn parse_id(id: &str) -> Option<String> {
    uuid::Uuid::parse_str(id)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
    #[error("expected the chunk at offset {expected}")]
    WrongOffset { expected: u64 },
    #[error("a chunk must be {expected} bytes here")]
    WrongLength { expected: u64 },
    #[error("the file's SHA-256 does not match the one offered")]
    HashMismatch,
    #[error("a stored chunk does not decrypt")]
    Corrupt,
}

/// What an upload's chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub uploaded: u64,
    /// The last chunk arrived, the hash matched and the file is synced.
    pub complete: bool,
}

struct Upload {
    uploaded: u64,
    hasher: Sha256,
}

/// The stored files. Blocking I/O: call from `spawn_blocking`.
pub struct FileStore {
    dir: PathBuf,
    key: DataKey,
    uploads: Mutex<HashMap<String, Arc<Mutex<Upload>>>>,
}

fn record_ad(file_id: &str, index: u64) -> Vec<u8> {
    format!("conclave-file-chunk-v1|{file_id}|{index}").into_bytes()
}

impl FileStore {
    /// Opens (creating) `files/` in the data directory.
    pub fn open(data_dir: &Path, key: DataKey) -> io::Result<FileStore> {
        FileStore::open_in(&data_dir.join(FILES_DIR), key)
    }

    /// Opens the file store in `dir` itself (`[files] dir`: in cluster mode, a directory every
    /// node shares), created private if missing.
    pub fn open_in(dir: &Path, key: DataKey) -> io::Result<FileStore> {
        let dir = dir.to_path_buf();
        crate::fsutil::create_private_dir(&dir)?;
        Ok(FileStore {
            dir,
            key,
            uploads: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, file_id: &str) -> PathBuf {
        self.dir.join(file_id)
    }

    fn uploads(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<Upload>>>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the empty file for a new upload (and syncs the directory entry).
    pub fn create(&self, file_id: &str) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path(file_id))?;
        File::open(&self.dir)?.sync_all()?;
        self.uploads().insert(
            file_id.to_string(),
            Arc::new(Mutex::new(Upload {
                uploaded: 0,
                hasher: Sha256::new(),
            })),
        );
        Ok(())
    }

    /// Deletes a file's bytes (expired, or never recorded).
    pub fn delete(&self, file_id: &str) {
        self.uploads().remove(file_id);
        match std::fs::remove_file(self.path(file_id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file_id, error = %e, "cannot delete a stored file"),
        }
    }

    /// Ids of the files present on disk.
    pub fn on_disk(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(parse_id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn record_len(row: &FileRow, index: u64) -> u64 {
        let chunk = u64::from(row.chunk_size);
        row.size.saturating_sub(index * chunk).min(chunk)
    }

    /// The upload state of `row`: kept in memory, or rebuilt from the records on disk (after
    /// a restart), cutting off a torn tail.
    fn state(&self, row: &FileRow) -> Result<Arc<Mutex<Upload>>, FileError> {
        if let Some(s) = self.uploads().get(&row.file_id) {
            return Ok(s.clone());
        }
        let path = self.path(&row.file_id);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let on_disk = file.metadata()?.len();
        let mut hasher = Sha256::new();
        let mut uploaded = 0u64;
        let mut index = 0u64;
        let mut pos = 0u64;
        while uploaded < row.size {
            let plain_len = Self::record_len(row, index);
            let len = plain_len + RECORD_OVERHEAD;
            if pos + len > on_disk {
                break;
            }
            let mut sealed = vec![0u8; len as usize];
            file.read_exact_at(&mut sealed, pos)?;
            match self.key.open(&record_ad(&row.file_id, index), &sealed) {
                Ok(plain) if plain.len() as u64 == plain_len => hasher.update(&plain),
                _ => break,
            }
            uploaded += plain_len;
            pos += len;
            index += 1;
        }
        if pos != on_disk {
            file.set_len(pos)?;
        }
        let state = Arc::new(Mutex::new(Upload { uploaded, hasher }));
        let mut uploads = self.uploads();
        if uploads.len() >= MAX_LIVE_UPLOADS {
            uploads.clear();
        }
        uploads.insert(row.file_id.clone(), state.clone());
        Ok(state)
    }

    /// Bytes of `row` stored so far.
    pub fn uploaded(&self, row: &FileRow) -> Result<u64, FileError> {
        if row.complete {
            return Ok(row.size);
        }
        let state = self.state(row)?;
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(s.uploaded)
    }

    /// Appends the chunk at `offset`. A chunk already stored (a resend after a reconnect) is
    /// accepted without writing. When the last chunk arrives the whole file's hash is checked
    /// against the offer: on a mismatch the upload starts over from nothing.
    pub fn append(&self, row: &FileRow, offset: u64, data: &[u8]) -> Result<Progress, FileError> {
        if row.complete {
            return Ok(Progress {
                uploaded: row.size,
                complete: true,
            });
        }
        let state = self.state(row)?;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let chunk = u64::from(row.chunk_size);
        let file = OpenOptions::new()
            .write(true)
            .open(self.path(&row.file_id))?;
        // A chunk already stored (a resend after a reconnect) is not written again. When every
        // chunk is stored but the file was never completed (the server was killed between the
        // last write and the check), the resent last chunk completes it below.
        let stored = offset < s.uploaded && offset.saturating_add(data.len() as u64) <= s.uploaded;
        if stored && s.uploaded < row.size {
            return Ok(Progress {
                uploaded: s.uploaded,
                complete: false,
            });
        }
        if !stored {
            if offset != s.uploaded {
                return Err(FileError::WrongOffset {
                    expected: s.uploaded,
                });
            }
            let index = offset / chunk;
            let expected = Self::record_len(row, index);
            if data.len() as u64 != expected || expected == 0 {
                return Err(FileError::WrongLength { expected });
            }
            let sealed = self.key.seal(&record_ad(&row.file_id, index), data);
            file.write_all_at(&sealed, index * (chunk + RECORD_OVERHEAD))?;
            s.hasher.update(data);
            s.uploaded += expected;
            if s.uploaded < row.size {
                return Ok(Progress {
                    uploaded: s.uploaded,
                    complete: false,
                });
            }
        }
        let digest: [u8; 32] = std::mem::take(&mut s.hasher).finalize().into();
        if digest != row.sha256 {
            s.uploaded = 0;
            file.set_len(0)?;
            return Err(FileError::HashMismatch);
        }
        file.sync_all()?;
        drop(s);
        self.uploads().remove(&row.file_id);
        Ok(Progress {
            uploaded: row.size,
            complete: true,
        })
    }

    /// Whether an empty file's (announced) hash is right: an empty upload completes at once.
    pub fn empty_ok(row: &FileRow) -> bool {
        let digest: [u8; 32] = Sha256::digest([]).into();
        row.size == 0 && digest == row.sha256
    }

    /// The plaintext from `offset` to the end of its chunk (empty at the end of the file).
    pub fn read(&self, row: &FileRow, offset: u64) -> Result<Vec<u8>, FileError> {
        if offset >= row.size {
            return Ok(Vec::new());
        }
        let chunk = u64::from(row.chunk_size);
        let index = offset / chunk;
        let plain_len = Self::record_len(row, index);
        let mut sealed = vec![0u8; (plain_len + RECORD_OVERHEAD) as usize];
        let file = File::open(self.path(&row.file_id))?;
        file.read_exact_at(&mut sealed, index * (chunk + RECORD_OVERHEAD))?;
        let mut plain = self
            .key
            .open(&record_ad(&row.file_id, index), &sealed)
            .map_err(|_| FileError::Corrupt)?;
        if plain.len() as u64 != plain_len {
            return Err(FileError::Corrupt);
        }
        let within = (offset - index * chunk) as usize;
        if within > 0 {
            plain.drain(..within);
        }
        Ok(plain)
    }
}
