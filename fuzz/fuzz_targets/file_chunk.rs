//! File-transfer chunk handling in the file store: a sequence of uploads of chunks at any
//! offset and length (as a sender's `FileChunk` requests carry them), reads at any offset (a
//! recipient's `FileFetch`), damage to the stored records and restarts (which rebuild the
//! upload state from disk and cut a torn tail). Nothing may panic; every read returns the
//! bytes that were uploaded or an error, never other bytes.
#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use conclave_proto::Conv;
use conclave_server::at_rest::DataKey;
use conclave_server::files::FileStore;
use conclave_server::store::FileRow;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const FILE_ID: &str = "01936d7e-8f00-7000-8000-000000000001";

#[derive(Debug, Arbitrary)]
enum Op {
    /// A chunk as a peer might send it: any offset, any length (bounded here by the input).
    Chunk {
        offset: u64,
        len: u16,
        wrong: bool,
    },
    /// The next chunk an honest sender would send.
    Next,
    Read {
        offset: u64,
    },
    /// Damage on disk: one byte, or a cut.
    Flip {
        at: u32,
        xor: u8,
    },
    Truncate {
        len: u32,
    },
    Restart,
}

#[derive(Debug, Arbitrary)]
struct Input {
    size: u16,
    chunk: u8,
    true_hash: bool,
    seed: u8,
    ops: Vec<Op>,
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new().tempdir_in("/dev/shm")
        } else {
            tempfile::tempdir()
        };
        base.expect("a temporary directory").keep()
    })
}

fn key() -> DataKey {
    DataKey::from_bytes(&[7u8; 32]).expect("a key")
}

fuzz_target!(|input: Input| {
    let data_dir = dir();
    let content: Vec<u8> = (0..u64::from(input.size))
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(input.seed))
        .collect();
    let chunk_size = [512u32, 1024, 4096][usize::from(input.chunk % 3)];
    let sha256: [u8; 32] = if input.true_hash {
        Sha256::digest(&content).into()
    } else {
        [input.seed; 32]
    };
    let row = FileRow {
        file_id: FILE_ID.to_string(),
        sender: "alice".to_string(),
        conv: Conv::Room("general".to_string()),
        except: Vec::new(),
        name: "f".to_string(),
        sha256,
        size: content.len() as u64,
        chunk_size,
        created_ms: 0,
        expires_ms: i64::MAX,
        complete: false,
        p2p: false,
    };
    let mut store = FileStore::open(data_dir, key()).expect("file store");
    store.delete(FILE_ID);
    store.create(FILE_ID).expect("create");
    let path = data_dir.join("files").join(FILE_ID);
    let mut complete = false;
    // A wrong chunk is stored until the final hash check refuses the whole upload; reads of
    // an incomplete upload (which the server never serves) may then return it.
    let mut tainted = false;
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Chunk { offset, len, wrong } => {
                let start = (offset as usize).min(content.len());
                let end = start.saturating_add(usize::from(len)).min(content.len());
                let mut data = content[start..end].to_vec();
                if wrong && let Some(b) = data.first_mut() {
                    *b ^= 1;
                }
                if let Ok(p) = store.append(&row, offset, &data) {
                    complete |= p.complete;
                    tainted |= wrong;
                }
            }
            Op::Next => {
                if let Ok(at) = store.uploaded(&row) {
                    let start = at as usize;
                    let end = (start + chunk_size as usize).min(content.len());
                    if let Ok(p) = store.append(&row, at, &content[start..end]) {
                        complete |= p.complete;
                    }
                }
            }
            Op::Read { offset } => {
                if let Ok(got) = store.read(&row, offset)
                    && !tainted
                {
                    if offset >= row.size {
                        assert!(got.is_empty(), "read past the end at {offset}");
                        continue;
                    }
                    let start = offset as usize;
                    assert_eq!(
                        &content[start..start + got.len()],
                        &got[..],
                        "read at {offset}"
                    );
                }
            }
            Op::Flip { at, xor } => {
                if let Ok(f) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                {
                    let mut b = [0u8; 1];
                    if f.read_exact_at(&mut b, u64::from(at)).is_ok() {
                        let _ = f.write_all_at(&[b[0] ^ xor], u64::from(at));
                    }
                }
            }
            Op::Truncate { len } => {
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                    let _ = f.set_len(u64::from(len));
                }
            }
            Op::Restart => store = FileStore::open(data_dir, key()).expect("file store"),
        }
    }
    // A completed upload had the right hash: only the true content can complete.
    if complete {
        assert!(input.true_hash);
    }
    store.delete(FILE_ID);
});
