//! Durable storage: SQLite (WAL) owned by one dedicated thread.
//!
//! Why a thread: SQLite calls block, and one writer is all SQLite allows anyway. Async code
//! talks to it through a bounded channel, which is also where group commit happens: the thread
//! takes every append waiting in the channel (up to [`MAX_BATCH`]) and commits them in one
//! transaction with one sync, so a thousand concurrent senders cost one fsync, not a thousand.
//!
//! Appends are answered in commit order on a separate channel (the commit sink), so the server
//! fans messages out in exactly the order their sequence numbers were assigned.
//!
//! The store thread's time per message bounds the store's throughput, so what an append needs
//! that depends on no database and on no sequence number (the body's encoding, its search
//! tokens: [`Prepared`]) is computed by the sender's task in [`Store::append`]; the store
//! thread assigns the id and sequence number, seals, and inserts.
//!
//! [`Db`] is the synchronous core (also used directly by `conclave user ...` on a data directory
//! when no server runs); [`Store`] is the async handle. Keep this interface narrow: a
//! PostgreSQL store will implement the same operations later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use conclave_proto::{Body, Conv, MAX_PAGE_BYTES, Message};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::at_rest::DataKey;
use crate::search::{self, SearchKey};

mod backend;
mod chat;
mod devices;
mod e2ee;
mod files;
pub use backend::{
    Accounts, Backend, Chat, Devices, Durability, FileMeta, Groups, Messages, Moderation, Rooms,
};
pub use chat::TargetRow;
pub use chat::{ChatRows, ReadMoved};
pub(crate) use chat::{ExtraCols, extra_of, open_reactions, topic_ad};
pub(crate) use chat::{columns as act_columns, is_mls, reactions_ad};
pub use devices::PutOutcome;
pub use e2ee::{GroupRow, MAX_KEY_PACKAGES, WelcomeRow};
pub(crate) use e2ee::{SIGNER_AD, state_ad};
pub use files::{FileRow, RecipientState};
pub(crate) use files::{open_meta as open_file_meta, seal_meta as seal_file_meta};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "conclave.db";
/// SQLite's `synchronous` for every commit: `FULL`, so a message is on disk (its WAL frames
/// synced) before it is acknowledged or delivered. Only a build with the `bench-no-sync`
/// feature, which `bench/compare.sh` makes in a target directory of its own to measure the
/// pipeline without the sync (the paced median's floor), uses `NORMAL`; that build says so at
/// start and is never one to serve from.
#[cfg(not(feature = "bench-no-sync"))]
pub const SYNCHRONOUS: &str = "FULL";
#[cfg(feature = "bench-no-sync")]
pub const SYNCHRONOUS: &str = "NORMAL";

/// Most appends committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Operations waiting for the store thread; senders wait (back-pressure) beyond this.
pub const STORE_QUEUE: usize = 16 * 1024;

const SCHEMA_VERSION: i64 = 4;
const SCHEMA: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    pw_hash    TEXT NOT NULL,
    admin      INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE rooms (
    name       TEXT PRIMARY KEY,
    private    INTEGER NOT NULL,
    pw_hash    TEXT,
    owner      TEXT,
    created_ms INTEGER NOT NULL,
    votekick   INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE TABLE bans (
    kind       TEXT NOT NULL,
    target     TEXT NOT NULL,
    until_ms   INTEGER,
    reason     TEXT NOT NULL,
    by         TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, target)
) WITHOUT ROWID;
CREATE TABLE ip_rules (
    action     TEXT NOT NULL,
    cidr       TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (action, cidr)
) WITHOUT ROWID;
CREATE TABLE room_bans (
    room     TEXT NOT NULL,
    user     TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE members (
    room      TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
    user      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    joined_ms INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE room_invites (
    room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE invite_codes (
    code_hash  TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    used_by    TEXT
) WITHOUT ROWID;
CREATE TABLE convs (
    id       INTEGER PRIMARY KEY,
    key      TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE messages (
    gseq     INTEGER PRIMARY KEY,
    conv_id  INTEGER NOT NULL REFERENCES convs(id),
    seq      INTEGER NOT NULL,
    msg_id   TEXT NOT NULL UNIQUE,
    sender   TEXT NOT NULL,
    ts_ms    INTEGER NOT NULL,
    body     BLOB NOT NULL,
    except_list TEXT,
    idem_key TEXT
);
CREATE UNIQUE INDEX messages_conv_seq ON messages(conv_id, seq);
CREATE UNIQUE INDEX messages_idem ON messages(sender, idem_key) WHERE idem_key IS NOT NULL;
CREATE TABLE conv_members (
    user    TEXT NOT NULL,
    conv_id INTEGER NOT NULL REFERENCES convs(id),
    PRIMARY KEY (user, conv_id)
) WITHOUT ROWID;
CREATE TABLE acks (
    user    TEXT NOT NULL,
    conv_id INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (user, conv_id)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE search_index USING fts5(
    tokens, content = '', contentless_delete = 1, detail = none
);
";
pub(crate) const KEY_CHECK_AD: &[u8] = b"conclave-key-check-v1";
pub(crate) const KEY_CHECK_PLAIN: &[u8] = b"conclave data key check";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {error}")]
    Open { path: PathBuf, error: String },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("already exists")]
    Exists,
    #[error("the store has stopped")]
    Stopped,
    #[error(
        "the database was written by a newer Conclave (schema {found}, this build knows {SCHEMA_VERSION}); upgrade Conclave"
    )]
    TooNew { found: i64 },
    #[error("a stored message does not decrypt: the data key is wrong or the record was altered")]
    Corrupt,
    #[error(
        "the data key does not match the database in {0}: a wrong passphrase (--data-key-env), or a data.key from another data directory. Nothing was changed; start again with the right key"
    )]
    WrongKey(PathBuf),
    #[error("the database could not be synced to disk: {message}")]
    Sync { message: String, full: bool },
    /// PostgreSQL (the cluster store, `store_pg`) refused or failed: its SQLSTATE code when
    /// the server sent one, and a sentence saying what happened.
    #[error("PostgreSQL: {message}")]
    Postgres {
        code: Option<String>,
        message: String,
    },
}

impl StoreError {
    /// SQLite could not write for lack of space (`SQLITE_FULL`: the disk, or the file system
    /// holding the data directory, is full). Nothing was stored; the same write succeeds once
    /// space is freed.
    pub fn disk_full(&self) -> bool {
        matches!(
            self,
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull
        ) || matches!(self, StoreError::Sync { full: true, .. })
    }

    fn sync(e: &std::io::Error) -> StoreError {
        StoreError::Sync {
            message: e.to_string(),
            full: e.raw_os_error() == Some(libc::ENOSPC),
        }
    }
}

/// The error text the store thread reports for a batch refused by [`StoreError::disk_full`].
pub const DISK_FULL: &str = "disk full";

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The storage key of a conversation: `r:ROOM` or `d:USER,USER,...` (names cannot contain
/// `:` or `,`, so keys are unambiguous).
pub fn conv_key(conv: &Conv) -> String {
    match conv {
        Conv::Room(r) => format!("r:{r}"),
        Conv::Direct(users) => format!("d:{}", users.join(",")),
    }
}

pub fn conv_from_key(key: &str) -> Conv {
    match key.split_once(':') {
        Some(("r", room)) => Conv::Room(room.to_string()),
        Some((_, users)) => Conv::Direct(users.split(',').map(str::to_string).collect()),
        None => Conv::Room(key.to_string()),
    }
}

/// What a message adds to a reply besides its body (ids, names, conversation, numbers), at most
/// for usual names; only used to keep pages under [`MAX_PAGE_BYTES`].
pub(crate) const MESSAGE_OVERHEAD_BYTES: usize = 256;

/// Keeps a history or search page under [`MAX_PAGE_BYTES`], counted as its messages arrive
/// newest first, so that the rows past the budget are neither read on nor decrypted. The
/// newest are kept, so paging on from the page's oldest leaves no gap.
#[derive(Default)]
pub(crate) struct PageBudget {
    bytes: usize,
    taken: usize,
}

impl PageBudget {
    /// Whether a message with `body`, the next newest, still fits (the first always does).
    pub(crate) fn admits(&mut self, body: &Body) -> bool {
        self.bytes += body.data.len() + body.content_type.len() + MESSAGE_OVERHEAD_BYTES;
        if self.taken > 0 && self.bytes > MAX_PAGE_BYTES {
            return false;
        }
        self.taken += 1;
        true
    }
}

/// The associated data a message body is sealed under (both backends).
pub(crate) fn seal_ad(msg_id: &str, conv_key: &str, seq: u64) -> Vec<u8> {
    let mut ad = Vec::new();
    seal_ad_into(&mut ad, msg_id, conv_key, seq);
    ad
}

/// [`seal_ad`] written into `ad` (reused from one message to the next).
fn seal_ad_into(ad: &mut Vec<u8>, msg_id: &str, conv_key: &str, seq: u64) {
    use std::io::Write as _;
    ad.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(ad, "conclave-msg-v1|{msg_id}|{conv_key}|{seq}");
}

/// The search index's tokens of a text body, separated by spaces (`None`: no words).
fn tokens_of(key: &SearchKey, body: &Body) -> Option<String> {
    key.tokens_text(body.as_text()?)
}

/// The id of the conversation with storage key `key`, created if new; `cache` remembers it.
fn conv_id_in(
    conn: &Connection,
    cache: &mut HashMap<String, i64>,
    key: &str,
) -> Result<i64, StoreError> {
    if let Some(&id) = cache.get(key) {
        return Ok(id);
    }
    let created = conn.execute("INSERT OR IGNORE INTO convs (key) VALUES (?1)", [key])? == 1;
    let id: i64 = conn.query_row("SELECT id FROM convs WHERE key = ?1", [key], |r| r.get(0))?;
    if created && let Conv::Direct(users) = conv_from_key(key) {
        for u in users {
            conn.execute(
                "INSERT OR IGNORE INTO conv_members (user, conv_id) VALUES (?1, ?2)",
                params![u, id],
            )?;
        }
    }
    cache.insert(key.to_string(), id);
    Ok(id)
}

/// Where a retried send (the same sender and idempotency key) was stored, if it was.
fn stored_retry(conn: &Connection, m: &NewMessage) -> Result<Option<Placed>, StoreError> {
    let Some(idem) = &m.idempotency_key else {
        return Ok(None);
    };
    Ok(conn
        .prepare_cached(
            "SELECT msg_id, seq, ts_ms FROM messages WHERE sender = ?1 AND idem_key = ?2",
        )?
        .query_row(params![m.from, idem], |r| {
            Ok(Placed {
                msg_id: r.get(0)?,
                seq: r.get::<_, i64>(1)? as u64,
                ts_ms: r.get(2)?,
                duplicate: true,
            })
        })
        .optional()?)
}

/// The next sequence number of conversation `conv_id` in this batch: read once per batch,
/// then counted in `seqs` (written back at the batch's end).
fn next_seq(
    conn: &Connection,
    seqs: &mut HashMap<i64, i64>,
    conv_id: i64,
) -> Result<i64, StoreError> {
    if let Some(s) = seqs.get_mut(&conv_id) {
        *s += 1;
        return Ok(*s);
    }
    let last: i64 = conn
        .prepare_cached("SELECT last_seq FROM convs WHERE id = ?1")?
        .query_row([conv_id], |r| r.get(0))?;
    seqs.insert(conv_id, last + 1);
    Ok(last + 1)
}

/// The `except_list` column: `,name,name,` (searched with `instr`), or NULL for none.
fn except_list(except: &[String]) -> Option<String> {
    (!except.is_empty()).then(|| format!(",{},", except.join(",")))
}

/// Whether a message acts on an earlier one (edits, deletes, reactions).
fn is_act(m: &NewMessage) -> bool {
    m.refs.as_ref().is_some_and(|r| r.acts_on.is_some())
}

const INSERT_MESSAGE: &str =
    "INSERT INTO messages (conv_id, seq, msg_id, sender, ts_ms, body, except_list, idem_key,
                                       reply_to, act_on, act_kind, act_applied)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// The index rows waiting in memory as the JSON object `{"GSEQ": "TOKENS", ...}` that the
/// index flush's one statement reads with `json_each`: each message once (the last entry for
/// it wins, as an edit's tokens replace the text's), in ascending order (FTS5 writes a segment
/// whenever a row id is lower than the one before). Written directly: tokens are hex digits
/// and spaces, which need no escaping (anything else is escaped by `serde_json`).
fn index_rows_json(pending: &[(i64, String)]) -> String {
    let mut seen = std::collections::HashSet::with_capacity(pending.len());
    let mut rows: Vec<(i64, &str)> = pending
        .iter()
        .rev()
        .filter(|(g, _)| seen.insert(*g))
        .map(|(g, t)| (*g, t.as_str()))
        .collect();
    rows.sort_unstable_by_key(|(g, _)| *g);
    let mut out = String::with_capacity(2 + rows.iter().map(|(_, t)| t.len() + 26).sum::<usize>());
    out.push('{');
    for (i, (g, t)) in rows.into_iter().enumerate() {
        use std::fmt::Write as _;
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{g}\":");
        if t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ') {
            out.push('"');
            out.push_str(t);
            out.push('"');
        } else {
            out.push_str(&serde_json::Value::String(t.to_string()).to_string());
        }
    }
    out.push('}');
    out
}

/// The part of an append that needs neither the database nor the message's sequence number:
/// the body's plaintext encoding and its search tokens. [`Store::append`] computes it in the
/// sender's task, before the request reaches the store thread, whose time per message bounds
/// the store's throughput (docs/benchmarks.md, "The store thread's CPU per message"). A
/// message that reaches [`Db::append_batch`] without it is prepared there.
pub struct Prepared {
    /// The body as it is sealed (postcard).
    plain: Vec<u8>,
    /// The index tokens of its text; `None` for no words and for acts (an edit indexes its
    /// target's new text on the store thread).
    tokens: Option<String>,
}

/// Prepares messages for SQLite's store (see [`Prepared`]): holds the search key.
#[derive(Clone)]
pub struct Preparer {
    search: SearchKey,
}

impl Preparer {
    /// What the store thread would otherwise compute for `m`.
    pub fn prepare(&self, m: &NewMessage) -> Prepared {
        prepare(&self.search, m)
    }
}

fn prepare(search: &SearchKey, m: &NewMessage) -> Prepared {
    let is_act = m.refs.as_ref().is_some_and(|r| r.acts_on.is_some());
    Prepared {
        plain: postcard::to_stdvec(&m.body).unwrap_or_default(),
        tokens: if is_act {
            None
        } else {
            tokens_of(search, &m.body)
        },
    }
}

/// The names of a stored blockcast exception list (`,a,b,`; `None` when there is none).
pub(crate) fn parse_except_list(stored: Option<&str>) -> Vec<String> {
    stored
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Opens a stored message body sealed under [`seal_ad`] (both stores).
pub(crate) fn open_body(
    key: &DataKey,
    msg_id: &str,
    conv_key: &str,
    seq: i64,
    sealed: &[u8],
) -> Result<Body, StoreError> {
    let plain = key
        .open(&seal_ad(msg_id, conv_key, seq as u64), sealed)
        .map_err(|_| StoreError::Corrupt)?;
    postcard::from_bytes(&plain).map_err(|_| StoreError::Corrupt)
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub pw_hash: String,
    pub admin: bool,
    pub created_ms: i64,
}

/// A room as stored, with its members and pending invites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRow {
    pub name: String,
    pub private: bool,
    pub pw_hash: Option<String>,
    pub owner: Option<String>,
    pub members: Vec<String>,
    pub invited: Vec<String>,
    /// Whether vote-kicks are allowed in this room.
    pub votekick: bool,
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conv: Conv,
    pub from: String,
    pub body: Body,
    /// Room members who must not receive it (blockcast).
    pub except: Vec<String>,
    pub idempotency_key: Option<String>,
    /// A reply, or an act on an earlier message (see [`conclave_proto::chat`]).
    pub refs: Option<Box<conclave_proto::Refs>>,
}

/// Where an append was stored: its id, sequence number and time, and whether it was a retry
/// of a message already stored.
struct Placed {
    msg_id: String,
    seq: u64,
    ts_ms: i64,
    duplicate: bool,
}

impl NewMessage {
    /// This message as stored at `at`.
    fn appended(&self, at: Placed) -> Appended {
        self.clone().into_appended(at)
    }

    /// This message as stored under `msg_id` and `seq` (for the other backends).
    pub(crate) fn appended_as(
        &self,
        msg_id: String,
        seq: u64,
        ts_ms: i64,
        duplicate: bool,
    ) -> Appended {
        self.appended(Placed {
            msg_id,
            seq,
            ts_ms,
            duplicate,
        })
    }

    /// This message as stored at `at`, without copying it.
    fn into_appended(self, at: Placed) -> Appended {
        let extra = self.refs.and_then(|r| {
            let conclave_proto::Refs { reply_to, acts_on } = *r;
            (reply_to.is_some() || acts_on.is_some()).then(|| {
                Box::new(conclave_proto::Extra {
                    reply_to,
                    acts_on,
                    state: None,
                })
            })
        });
        Appended {
            msg: Message {
                msg_id: at.msg_id,
                conv: self.conv,
                from: self.from,
                seq: at.seq,
                ts_ms: at.ts_ms,
                body: self.body,
                extra,
            },
            except: self.except,
            duplicate: at.duplicate,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct Appended {
    pub msg: Message,
    pub except: Vec<String>,
    /// The send was a retry of a message already stored; nothing new was written.
    pub duplicate: bool,
}

/// The synchronous store.
pub struct Db {
    conn: Connection,
    key: DataKey,
    search: SearchKey,
    conv_ids: HashMap<String, i64>,
    /// Search tokens of committed messages not yet in the index: (global sequence, tokens).
    /// Kept out of the message's own transaction so a durable commit costs only the message;
    /// flushed by [`Db::flush_index`] (before every search and retention run, and regularly),
    /// and rebuilt from the messages at open after a crash.
    pending_index: Vec<(i64, String)>,
    /// Index entries were deleted (edits, deletes) since the last merge of the index.
    index_removed: bool,
    last_optimize_ms: i64,
    /// Told how long each message batch took to commit (the metrics' histogram).
    on_commit: Option<CommitObserver>,
    /// SQLite's `synchronous` between the index flushes (which never sync): [`SYNCHRONOUS`],
    /// or `NORMAL` on the store thread, whose syncer syncs the WAL after each commit itself.
    synchronous: &'static str,
    /// When the store thread checkpoints the WAL.
    checkpoints: Checkpoints,
}

/// Receives the duration of each committed batch of messages.
pub type CommitObserver = Box<dyn Fn(std::time::Duration) + Send>;

/// How long messages are kept. `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age_days: Option<u32>,
    pub max_messages: Option<u64>,
}

impl Db {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path, key: DataKey) -> Result<Db, StoreError> {
        let path = data_dir.join(DB_FILE);
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.clone(),
            error: e.to_string(),
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {SYNCHRONOUS};
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;
             PRAGMA secure_delete = ON;"
        ))
        .map_err(open_err)?;
        // The database holds only ciphertext bodies, but keep it private like every secret.
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found: version });
        }
        if version == 0 {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} {} {} {} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;",
                files::FILES_SCHEMA,
                e2ee::E2EE_SCHEMA,
                chat::ACTS_SCHEMA
            ))
            .map_err(open_err)?;
        } else {
            if version == 1 {
                // Version 2 added file transfer.
                conn.execute_batch(&format!(
                    "BEGIN; {} PRAGMA user_version = 2; COMMIT;",
                    files::FILES_SCHEMA
                ))
                .map_err(open_err)?;
            }
            if version <= 2 {
                // Version 3 added end-to-end encryption.
                conn.execute_batch(&format!(
                    "BEGIN; {} PRAGMA user_version = 3; COMMIT;",
                    e2ee::E2EE_SCHEMA
                ))
                .map_err(open_err)?;
            }
            if version <= 3 {
                // Version 4 added replies, edits, deletes and reactions.
                conn.execute_batch(&format!(
                    "BEGIN; {} PRAGMA user_version = 4; COMMIT;",
                    chat::ACTS_SCHEMA
                ))
                .map_err(open_err)?;
            }
        }
        conn.execute_batch(devices::DEVICES_SCHEMA)
            .map_err(open_err)?;
        // A wrong key must stop the server before it writes anything sealed under it.
        let check: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(open_err)?;
        match check {
            Some(sealed) => {
                if key.open(KEY_CHECK_AD, &sealed).ok().as_deref() != Some(KEY_CHECK_PLAIN) {
                    return Err(StoreError::WrongKey(data_dir.to_path_buf()));
                }
            }
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
                    [key.seal(KEY_CHECK_AD, KEY_CHECK_PLAIN)],
                )
                .map_err(open_err)?;
            }
        }
        // Everyday chat's presence tables (topics, display names, read markers): created if
        // absent, whatever the schema version (see `store::chat`); after the key check, so a
        // wrong key writes nothing.
        Db::create_chat_tables(&conn).map_err(open_err)?;
        let search = SearchKey::new(&key.subkey("conclave search index v1"));
        Db {
            conn,
            key,
            search,
            conv_ids: HashMap::new(),
            on_commit: None,
            synchronous: SYNCHRONOUS,
            checkpoints: Checkpoints::new(CheckpointPolicy::default()),
            pending_index: Vec::new(),
            index_removed: false,
            last_optimize_ms: 0,
        }
        .reindex_tail()
    }

    /// Most messages whose tokens wait in memory before they are written regardless.
    pub const MAX_PENDING_INDEX: usize = 4096;

    /// Indexes the messages committed after the last index flush (after a crash, their tokens
    /// were only in memory). Called at open.
    fn reindex_tail(mut self) -> Result<Db, StoreError> {
        let done: i64 = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'indexed_through'",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0);
        // Messages after the mark, and the messages that edits after the mark changed.
        let rows: Vec<(i64, String, i64, String, Vec<u8>)> = {
            let mut st = self.conn.prepare(
                "SELECT m.gseq, m.msg_id, m.seq, c.key, m.body FROM messages m
                 JOIN convs c ON c.id = m.conv_id
                 WHERE m.act_on IS NULL AND m.deleted = 0
                   AND (m.gseq > ?1 OR m.msg_id IN
                        (SELECT act_on FROM messages WHERE gseq > ?1 AND act_applied = 1 AND act_kind = 1))
                 ORDER BY m.gseq",
            )?;
            st.query_map([done], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?
        };
        for (gseq, msg_id, seq, key, sealed) in rows {
            let body = self.open_body(&msg_id, &key, seq, &sealed)?;
            if let Some(tokens) = self.tokens_of(&body) {
                // A message indexed just before a crash is replaced, not doubled.
                self.conn
                    .execute("DELETE FROM search_index WHERE rowid = ?1", [gseq])?;
                self.pending_index.push((gseq, tokens));
            }
        }
        self.flush_index()?;
        Ok(self)
    }

    fn tokens_of(&self, body: &Body) -> Option<String> {
        tokens_of(&self.search, body)
    }

    /// Writes the waiting search tokens in one transaction. It is not synced on its own: the
    /// index can always be rebuilt from the (synced) messages, which [`Db::open`] does.
    pub fn flush_index(&mut self) -> Result<(), StoreError> {
        self.optimize_index_if_due()?;
        let Some(last) = self.pending_index.iter().map(|(g, _)| *g).max() else {
            return Ok(());
        };
        let rows = index_rows_json(&self.pending_index);
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE")?;
        let result = (|| -> Result<(), rusqlite::Error> {
            // One statement: FTS5 flushes its pending terms at every statement.
            self.conn
                .prepare_cached(
                    "INSERT INTO search_index (rowid, tokens) SELECT CAST(key AS INTEGER), value FROM json_each(?1)",
                )?
                .execute([rows])?;
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('indexed_through', ?1)",
                [last.to_string().into_bytes()],
            )?;
            self.conn.execute_batch("COMMIT")
        })();
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.conn
            .execute_batch(&format!("PRAGMA synchronous = {}", self.synchronous))?;
        result?;
        self.pending_index.clear();
        Ok(())
    }

    /// Merges the search index when entries were deleted (edits, deletes) and the last merge
    /// is [`chat::INDEX_OPTIMIZE_EVERY_MS`] old: FTS5 keeps a deleted entry's tokens in its
    /// segment until a merge, and no old token may stay in the file.
    fn optimize_index_if_due(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        if !self.index_removed || now - self.last_optimize_ms < chat::INDEX_OPTIMIZE_EVERY_MS {
            return Ok(());
        }
        self.conn
            .execute_batch("INSERT INTO search_index (search_index) VALUES ('optimize')")?;
        self.index_removed = false;
        self.last_optimize_ms = now;
        Ok(())
    }

    /// Merges the search index now if entries were deleted since the last merge.
    pub fn optimize_index(&mut self) -> Result<(), StoreError> {
        self.flush_index()?;
        self.last_optimize_ms = 0;
        self.optimize_index_if_due()
    }

    /// Reports the duration of every batch of messages committed from now on.
    pub fn on_commit(&mut self, observer: CommitObserver) {
        self.on_commit = Some(observer);
    }

    pub fn create_user(
        &mut self,
        name: &str,
        pw_hash: &str,
        admin: bool,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO users (name, pw_hash, admin, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, pw_hash, admin, now_ms()],
        )?;
        if n == 0 {
            return Err(StoreError::Exists);
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, pw_hash, admin, created_ms FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok(UserRow {
                        name: r.get(0)?,
                        pw_hash: r.get(1)?,
                        admin: r.get(2)?,
                        created_ms: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT name, pw_hash, admin, created_ms FROM users ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(UserRow {
                name: r.get(0)?,
                pw_hash: r.get(1)?,
                admin: r.get(2)?,
                created_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a password hash; false when the user does not exist.
    pub fn set_password(&mut self, name: &str, pw_hash: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE users SET pw_hash = ?2 WHERE name = ?1",
            params![name, pw_hash],
        )? == 1)
    }

    /// Gives or takes the admin role; false when the user does not exist.
    pub fn set_admin(&mut self, name: &str, admin: bool) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE users SET admin = ?2 WHERE name = ?1",
            params![name, admin],
        )? == 1)
    }

    /// Deletes an account and its memberships; false when it does not exist.
    pub fn delete_user(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM users WHERE name = ?1", [name])?
            == 1)
    }

    /// Stores the hash of a one-time invite code.
    pub fn add_invite_code(&mut self, code_hash: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO invite_codes (code_hash, created_ms) VALUES (?1, ?2)",
            params![code_hash, now_ms()],
        )?;
        Ok(())
    }

    /// Creates an account with an invite code, atomically: the code is spent only if the account
    /// is created, and a code is never spent twice.
    pub fn register_with_code(
        &mut self,
        code_hash: &str,
        name: &str,
        pw_hash: &str,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let spent = tx.execute(
            "UPDATE invite_codes SET used_by = ?2 WHERE code_hash = ?1 AND used_by IS NULL",
            params![code_hash, name],
        )?;
        if spent == 0 {
            return Ok(false);
        }
        let n = tx.execute(
            "INSERT OR IGNORE INTO users (name, pw_hash, admin, created_ms) VALUES (?1, ?2, 0, ?3)",
            params![name, pw_hash, now_ms()],
        )?;
        if n == 0 {
            return Err(StoreError::Exists);
        }
        tx.commit()?;
        Ok(true)
    }

    pub fn create_room(&mut self, room: &RoomRow) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO rooms (name, private, pw_hash, owner, created_ms, votekick) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![room.name, room.private, room.pw_hash, room.owner, now_ms(), room.votekick],
        )?;
        if n == 0 {
            return Err(StoreError::Exists);
        }
        for m in &room.members {
            tx.execute(
                "INSERT OR IGNORE INTO members (room, user, joined_ms) VALUES (?1, ?2, ?3)",
                params![room.name, m, now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every room with its members and invites (loaded once at start into the hub).
    pub fn rooms(&self) -> Result<Vec<RoomRow>, StoreError> {
        let mut rooms: Vec<RoomRow> = {
            let mut st = self.conn.prepare(
                "SELECT name, private, pw_hash, owner, votekick FROM rooms ORDER BY name",
            )?;
            st.query_map([], |r| {
                Ok(RoomRow {
                    name: r.get(0)?,
                    private: r.get(1)?,
                    pw_hash: r.get(2)?,
                    owner: r.get(3)?,
                    members: Vec::new(),
                    invited: Vec::new(),
                    votekick: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?
        };
        let index: HashMap<String, usize> = rooms
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        for (table, invited) in [("members", false), ("room_invites", true)] {
            let mut st = self
                .conn
                .prepare(&format!("SELECT room, user FROM {table} ORDER BY user"))?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (room, user) = row?;
                if let Some(&i) = index.get(&room) {
                    if invited {
                        rooms[i].invited.push(user);
                    } else {
                        rooms[i].members.push(user);
                    }
                }
            }
        }
        Ok(rooms)
    }

    /// Adds a member (and clears their invite). What the room said before they joined does not
    /// count as missed: their acknowledged position starts at the room's newest message.
    pub fn add_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        let conv_id = self.conv_id(&format!("r:{room}"))?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO members (room, user, joined_ms) VALUES (?1, ?2, ?3)",
            params![room, user, now_ms()],
        )?;
        tx.execute(
            "DELETE FROM room_invites WHERE room = ?1 AND user = ?2",
            params![room, user],
        )?;
        tx.execute(
            "INSERT INTO acks (user, conv_id, seq) SELECT ?1, id, last_seq FROM convs WHERE id = ?2
             ON CONFLICT (user, conv_id) DO UPDATE SET seq = max(seq, excluded.seq)",
            params![user, conv_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records what `user` has received (positions only move forward).
    pub fn ack(&mut self, user: &str, cursors: &[(Conv, u64)]) -> Result<(), StoreError> {
        let tx_ids: Vec<(i64, u64)> = cursors
            .iter()
            .filter_map(|(c, s)| {
                self.existing_conv_id(&conv_key(c))
                    .ok()
                    .flatten()
                    .map(|id| (id, *s))
            })
            .collect();
        let tx = self.conn.transaction()?;
        for (conv_id, seq) in tx_ids {
            tx.execute(
                "INSERT INTO acks (user, conv_id, seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user, conv_id) DO UPDATE SET seq = max(seq, excluded.seq)",
                params![user, conv_id, seq.min(i64::MAX as u64) as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// What `user` missed: for each of their conversations, the messages after the client's
    /// cursor (`resume`) or else after their acknowledged position; at most `per_conv` (the
    /// newest) per conversation and `total` in all. Returns them (each conversation in order)
    /// and whether anything was left out.
    pub fn catch_up(
        &mut self,
        user: &str,
        resume: &[(Conv, u64)],
        per_conv: u32,
        total: u32,
    ) -> Result<(Vec<Message>, bool), StoreError> {
        let resume: HashMap<String, u64> = resume.iter().map(|(c, s)| (conv_key(c), *s)).collect();
        let convs: Vec<(i64, String, i64, Option<i64>)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT c.id, c.key, c.last_seq, a.seq FROM convs c
                 LEFT JOIN acks a ON a.user = ?1 AND a.conv_id = c.id
                 WHERE c.key IN (SELECT 'r:' || room FROM members WHERE user = ?1)
                    OR c.id IN (SELECT conv_id FROM conv_members WHERE user = ?1)",
            )?;
            st.query_map([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        let mut truncated = false;
        for (conv_id, key, last_seq, acked) in convs {
            let from = resume
                .get(&key)
                .map(|s| (*s).min(i64::MAX as u64) as i64)
                .or(acked)
                .unwrap_or(0);
            if last_seq <= from {
                continue;
            }
            let room_left = total.saturating_sub(out.len() as u32);
            let take = per_conv.min(room_left);
            if (last_seq - from) as u64 > u64::from(take) {
                truncated = true;
            }
            if take == 0 {
                continue;
            }
            let rows: Vec<chat::StoredRow> = {
                let mut st = self.conn.prepare_cached(&format!(
                    "SELECT msg_id, seq, sender, ts_ms, body, {} FROM messages
                     WHERE conv_id = ?1 AND seq > ?2
                       AND (except_list IS NULL OR instr(except_list, ',' || ?3 || ',') = 0)
                     ORDER BY seq DESC LIMIT ?4",
                    chat::EXTRA_COLS
                ))?;
                st.query_map(params![conv_id, from, user, take], chat::read_stored)?
                    .collect::<Result<_, _>>()?
            };
            let conv = conv_from_key(&key);
            for (msg_id, seq, from, ts_ms, sealed, cols) in rows.into_iter().rev() {
                let body = self.open_body(&msg_id, &key, seq, &sealed)?;
                // Live delivery carries no state: the acts after it follow in order.
                let extra = self.extra_of(&msg_id, cols, false)?;
                out.push(Message {
                    msg_id,
                    conv: conv.clone(),
                    from,
                    seq: seq as u64,
                    ts_ms,
                    body,
                    extra,
                });
            }
        }
        Ok((out, truncated))
    }

    /// Rooms `user` belongs to, as stored.
    pub fn rooms_of_user(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT room FROM members WHERE user = ?1 ORDER BY room")?;
        let rows = st.query_map([user], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM members WHERE room = ?1 AND user = ?2",
            params![room, user],
        )?;
        Ok(())
    }

    /// Every stored ban (expired ones are removed first).
    pub fn bans(&mut self, now_ms: i64) -> Result<Vec<crate::guard::Ban>, StoreError> {
        self.conn.execute(
            "DELETE FROM bans WHERE until_ms IS NOT NULL AND until_ms <= ?1",
            [now_ms],
        )?;
        let mut st = self
            .conn
            .prepare("SELECT kind, target, until_ms, reason, by, created_ms FROM bans")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, target, until_ms, reason, by, created_ms) = row?;
            let target = match kind.as_str() {
                "user" => crate::guard::BanTarget::User(target),
                _ => match target.parse() {
                    Ok(net) => crate::guard::BanTarget::Net(net),
                    Err(_) => continue,
                },
            };
            out.push(crate::guard::Ban {
                target,
                until_ms,
                reason,
                by,
                created_ms,
            });
        }
        Ok(out)
    }

    pub fn add_ban(&mut self, ban: &crate::guard::Ban) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO bans (kind, target, until_ms, reason, by, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                ban.target.kind(),
                ban.target.value(),
                ban.until_ms,
                ban.reason,
                ban.by,
                ban.created_ms
            ],
        )?;
        Ok(())
    }

    /// Removes a ban; false when there was none.
    pub fn remove_ban(&mut self, target: &crate::guard::BanTarget) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM bans WHERE kind = ?1 AND target = ?2",
            params![target.kind(), target.value()],
        )? == 1)
    }

    /// The persisted IP rules: (allow, deny).
    pub fn ip_rules(&self) -> Result<(Vec<ipnet::IpNet>, Vec<ipnet::IpNet>), StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT action, cidr FROM ip_rules ORDER BY created_ms")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let (mut allow, mut deny) = (Vec::new(), Vec::new());
        for row in rows {
            let (action, cidr) = row?;
            if let Ok(net) = cidr.parse() {
                if action == "allow" {
                    allow.push(net);
                } else {
                    deny.push(net);
                }
            }
        }
        Ok((allow, deny))
    }

    /// Adds (`add`) or removes an IP rule; returns whether anything changed.
    pub fn set_ip_rule(
        &mut self,
        action: &str,
        net: &ipnet::IpNet,
        add: bool,
    ) -> Result<bool, StoreError> {
        let n = if add {
            self.conn.execute(
                "INSERT OR IGNORE INTO ip_rules (action, cidr, created_ms) VALUES (?1, ?2, ?3)",
                params![action, net.to_string(), now_ms()],
            )?
        } else {
            self.conn.execute(
                "DELETE FROM ip_rules WHERE action = ?1 AND cidr = ?2",
                params![action, net.to_string()],
            )?
        };
        Ok(n == 1)
    }

    /// Keeps `user` out of `room` until `until_ms` (a vote-kick).
    pub fn add_room_ban(
        &mut self,
        room: &str,
        user: &str,
        until_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO room_bans (room, user, until_ms) VALUES (?1, ?2, ?3)",
            params![room, user, until_ms],
        )?;
        Ok(())
    }

    /// Active room bans: (room, user, until_ms).
    pub fn room_bans(&mut self, now_ms: i64) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.conn
            .execute("DELETE FROM room_bans WHERE until_ms <= ?1", [now_ms])?;
        let mut st = self
            .conn
            .prepare("SELECT room, user, until_ms FROM room_bans")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Turns vote-kick on or off for a room.
    pub fn set_room_votekick(&mut self, room: &str, on: bool) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE rooms SET votekick = ?2 WHERE name = ?1",
            params![room, on],
        )?;
        Ok(())
    }

    /// Creates a public room with no owner if no room has that name (the default room).
    pub fn ensure_public_room(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO rooms (name, private, pw_hash, owner, created_ms) VALUES (?1, 0, NULL, NULL, ?2)",
            params![name, now_ms()],
        )?;
        Ok(())
    }

    pub fn add_room_invite(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO room_invites (room, user) VALUES (?1, ?2)",
            params![room, user],
        )?;
        Ok(())
    }

    fn conv_id(&mut self, key: &str) -> Result<i64, StoreError> {
        conv_id_in(&self.conn, &mut self.conv_ids, key)
    }

    fn existing_conv_id(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        if let Some(&id) = self.conv_ids.get(key) {
            return Ok(Some(id));
        }
        Ok(self
            .conn
            .query_row("SELECT id FROM convs WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Appends messages in one transaction (one sync). Either all are stored or none.
    pub fn append_batch(&mut self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        let placed = self.append_placed(batch, Vec::new())?;
        Ok(batch
            .iter()
            .zip(placed)
            .map(|(m, at)| m.appended(at))
            .collect())
    }

    /// [`Db::append_batch`] of messages the caller gives up, with what their senders prepared
    /// (in order; `None`, or a shorter list, where nothing was): the store thread's way.
    pub fn append_prepared(
        &mut self,
        batch: Vec<NewMessage>,
        prepared: Vec<Option<Prepared>>,
    ) -> Result<Vec<Appended>, StoreError> {
        let placed = self.append_placed(&batch, prepared)?;
        Ok(batch
            .into_iter()
            .zip(placed)
            .map(|(m, at)| m.into_appended(at))
            .collect())
    }

    fn append_placed(
        &mut self,
        batch: &[NewMessage],
        prepared: Vec<Option<Prepared>>,
    ) -> Result<Vec<Placed>, StoreError> {
        // A failed batch must not leave cached conversation ids that were rolled back.
        let cached = self.conv_ids.len();
        let started = std::time::Instant::now();
        let result = self.append_batch_inner(batch, prepared);
        if let (Ok(_), Some(observe)) = (&result, &self.on_commit) {
            observe(started.elapsed());
        }
        if result.is_err() && self.conv_ids.len() != cached {
            self.conv_ids.clear();
        }
        result
    }

    fn append_batch_inner(
        &mut self,
        batch: &[NewMessage],
        prepared: Vec<Option<Prepared>>,
    ) -> Result<Vec<Placed>, StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut prepared = prepared.into_iter();
        let mut out = Vec::with_capacity(batch.len());
        let mut index: Vec<(i64, String)> = Vec::new();
        // Each conversation's last sequence number is read once per batch, counted here, and
        // written back once at the end.
        let mut seqs: HashMap<i64, i64> = HashMap::new();
        let mut rest = batch;
        while let Some(first) = rest.first() {
            // Runs of messages that act on no other go in through one held statement; an act
            // (which reads and changes its target) goes alone.
            let plain = rest.iter().take_while(|m| !is_act(m)).count();
            let done = if plain == 0 {
                let prep = prepared.next().flatten();
                self.append_one(first, prep, &mut seqs, &mut index)
                    .map(|placed| {
                        out.push(placed);
                        1
                    })
            } else {
                self.append_plain(
                    &rest[..plain],
                    &mut prepared,
                    &mut seqs,
                    &mut index,
                    &mut out,
                )
                .map(|()| plain)
            };
            match done {
                Ok(n) => rest = &rest[n..],
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
        }

        for (conv_id, last) in seqs {
            if let Err(e) = self
                .conn
                .prepare_cached("UPDATE convs SET last_seq = ?2 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![conv_id, last]))
            {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        // Committed: its search tokens wait for the next index flush.
        self.pending_index.extend(index);
        if self.pending_index.len() >= Self::MAX_PENDING_INDEX {
            // The messages are stored; an index failure is logged and healed at next open.
            if let Err(e) = self.flush_index() {
                tracing::warn!(error = %e, "search index flush failed");
            }
        }
        Ok(out)
    }

    /// Appends messages that act on no other message, in order, with one prepared statement
    /// held for all of them (the same rows as [`Db::append_one`] writes for each).
    fn append_plain(
        &mut self,
        run: &[NewMessage],
        prepared: &mut impl Iterator<Item = Option<Prepared>>,
        seqs: &mut HashMap<i64, i64>,
        index: &mut Vec<(i64, String)>,
        out: &mut Vec<Placed>,
    ) -> Result<(), StoreError> {
        let mut insert = self.conn.prepare_cached(INSERT_MESSAGE)?;
        let mut ad = Vec::new();
        for m in run {
            let prep = prepared.next().flatten();
            if let Some(retry) = stored_retry(&self.conn, m)? {
                out.push(retry);
                continue;
            }
            let key = conv_key(&m.conv);
            let conv_id = conv_id_in(&self.conn, &mut self.conv_ids, &key)?;
            let seq = next_seq(&self.conn, seqs, conv_id)?;
            let msg_id = uuid::Uuid::now_v7().to_string();
            let ts_ms = now_ms();
            let Prepared { plain, tokens } = match prep {
                Some(p) => p,
                None => prepare(&self.search, m),
            };
            seal_ad_into(&mut ad, &msg_id, &key, seq as u64);
            let sealed = self.key.seal(&ad, &plain);
            let (reply_to, act_on, act_kind) = chat::columns(m.refs.as_deref());
            insert.execute(params![
                conv_id,
                seq,
                msg_id,
                m.from,
                ts_ms,
                sealed,
                except_list(&m.except),
                m.idempotency_key,
                reply_to,
                act_on,
                act_kind,
                false
            ])?;
            if let Some(tokens) = tokens {
                index.push((self.conn.last_insert_rowid(), tokens));
            }
            out.push(Placed {
                msg_id,
                seq: seq as u64,
                ts_ms,
                duplicate: false,
            });
        }
        Ok(())
    }

    fn append_one(
        &mut self,
        m: &NewMessage,
        prep: Option<Prepared>,
        seqs: &mut HashMap<i64, i64>,
        index: &mut Vec<(i64, String)>,
    ) -> Result<Placed, StoreError> {
        if let Some(retry) = stored_retry(&self.conn, m)? {
            return Ok(retry);
        }
        let key = conv_key(&m.conv);
        let conv_id = self.conv_id(&key)?;
        let seq = next_seq(&self.conn, seqs, conv_id)?;
        let msg_id = uuid::Uuid::now_v7().to_string();
        let ts_ms = now_ms();
        let Prepared { plain, tokens } = match prep {
            Some(p) => p,
            None => prepare(&self.search, m),
        };
        let sealed = self.key.seal(&seal_ad(&msg_id, &key, seq as u64), &plain);
        let except = except_list(&m.except);
        let (reply_to, act_on, act_kind) = chat::columns(m.refs.as_deref());
        let acts_on = m.refs.as_ref().and_then(|r| r.acts_on.as_ref());
        // Acts in server-encrypted conversations are applied to their target here.
        let applied = acts_on.is_some() && !chat::is_mls(&m.body);
        self.conn.prepare_cached(INSERT_MESSAGE)?.execute(params![
            conv_id,
            seq,
            msg_id,
            m.from,
            ts_ms,
            sealed,
            except,
            m.idempotency_key,
            reply_to,
            act_on,
            act_kind,
            applied
        ])?;
        let gseq = self.conn.last_insert_rowid();
        match acts_on {
            None => {
                if let Some(tokens) = tokens {
                    index.push((gseq, tokens));
                }
            }
            Some(act) if applied => {
                if let Some((target, tokens)) =
                    self.apply_act(gseq, &key, &m.from, act, &m.body, ts_ms)?
                {
                    index.retain(|(g, _)| *g != target);
                    if let Some(t) = tokens {
                        index.push((target, t));
                    }
                }
            }
            Some(_) => {}
        }
        Ok(Placed {
            msg_id,
            seq: seq as u64,
            ts_ms,
            duplicate: false,
        })
    }

    /// What [`Store::append`] prepares for this database (see [`Prepared`]).
    pub fn preparer(&self) -> Preparer {
        Preparer {
            search: self.search.clone(),
        }
    }

    /// A page of history for `viewer`, oldest first: up to `limit` messages before `before`
    /// (or the newest), fewer when their bodies pass [`MAX_PAGE_BYTES`]. Blockcast messages
    /// that excluded the viewer are left out.
    pub fn history(
        &mut self,
        conv: &Conv,
        viewer: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let key = conv_key(conv);
        let Some(conv_id) = self.existing_conv_id(&key)? else {
            return Ok(Vec::new());
        };
        let before = before
            .map(|b| b.min(i64::MAX as u64) as i64)
            .unwrap_or(i64::MAX);
        // Acts the server applied are in their targets' state, not in history. (End-to-end
        // conversations' acts are MLS messages of the log, which clients read through it.)
        let rows: Vec<chat::StoredRow> = {
            let mut st = self.conn.prepare_cached(&format!(
                "SELECT msg_id, seq, sender, ts_ms, body, {} FROM messages
                 WHERE conv_id = ?1 AND seq < ?2 AND act_applied = 0
                   AND (except_list IS NULL OR instr(except_list, ',' || ?3 || ',') = 0)
                 ORDER BY seq DESC LIMIT ?4",
                chat::EXTRA_COLS
            ))?;
            st.query_map(params![conv_id, before, viewer, limit], chat::read_stored)?
                .collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        let mut budget = PageBudget::default();
        for (msg_id, seq, from, ts_ms, sealed, cols) in rows {
            let body = self.open_body(&msg_id, &key, seq, &sealed)?;
            if !budget.admits(&body) {
                break;
            }
            let extra = self.extra_of(&msg_id, cols, true)?;
            out.push(Message {
                msg_id,
                conv: conv_from_key(&key),
                from,
                seq: seq as u64,
                ts_ms,
                body,
                extra,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// The messages of `conv` with a sequence number above `after` and at most `through`
    /// (`None`: up to the newest), oldest first, at most `limit`, each with its blockcast
    /// exceptions (`duplicate` is false); and whether more remain in that range. What a
    /// cluster node reads when the bus lost a notice (`bus::Fetch`).
    pub fn conv_range(
        &mut self,
        conv: &Conv,
        after: u64,
        through: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<Appended>, bool), StoreError> {
        let key = conv_key(conv);
        let Some(conv_id) = self.existing_conv_id(&key)? else {
            return Ok((Vec::new(), false));
        };
        let after = after.min(i64::MAX as u64) as i64;
        let through = through
            .map(|t| t.min(i64::MAX as u64) as i64)
            .unwrap_or(i64::MAX);
        // One more than asked: whether more remain.
        let rows: Vec<(chat::StoredRow, Option<String>)> = {
            let mut st = self.conn.prepare_cached(&format!(
                "SELECT msg_id, seq, sender, ts_ms, body, {}, except_list FROM messages
                 WHERE conv_id = ?1 AND seq > ?2 AND seq <= ?3
                 ORDER BY seq LIMIT ?4",
                chat::EXTRA_COLS
            ))?;
            st.query_map(
                params![conv_id, after, through, i64::from(limit) + 1],
                |r| Ok((chat::read_stored(r)?, r.get(12)?)),
            )?
            .collect::<Result<_, _>>()?
        };
        let more = rows.len() > limit as usize;
        let mut out = Vec::with_capacity(rows.len().min(limit as usize));
        for ((msg_id, seq, from, ts_ms, sealed, cols), except) in
            rows.into_iter().take(limit as usize)
        {
            let body = self.open_body(&msg_id, &key, seq, &sealed)?;
            // As live delivery has it: no state, the acts after it follow in order.
            let extra = self.extra_of(&msg_id, cols, false)?;
            out.push(Appended {
                msg: Message {
                    msg_id,
                    conv: conv.clone(),
                    from,
                    seq: seq as u64,
                    ts_ms,
                    body,
                    extra,
                },
                except: parse_except_list(except.as_deref()),
                duplicate: false,
            });
        }
        Ok((out, more))
    }

    fn open_body(
        &self,
        msg_id: &str,
        key: &str,
        seq: i64,
        sealed: &[u8],
    ) -> Result<Body, StoreError> {
        open_body(&self.key, msg_id, key, seq, sealed)
    }

    /// Messages containing every word of `query_words` (normalised with [`search::words`]) in
    /// the rooms `rooms` and, if `direct`, the viewer's direct conversations; newest first, at
    /// most `limit` (fewer when their bodies pass [`MAX_PAGE_BYTES`]), older than message id
    /// `before` when given.
    pub fn search(
        &mut self,
        viewer: &str,
        rooms: &[String],
        direct: bool,
        query_words: &[String],
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.flush_index()?;
        if query_words.is_empty() {
            return Ok(Vec::new());
        }
        let mut conv_ids: Vec<i64> = Vec::new();
        for r in rooms {
            if let Some(id) = self.existing_conv_id(&format!("r:{r}"))? {
                conv_ids.push(id);
            }
        }
        if direct {
            let mut st = self
                .conn
                .prepare_cached("SELECT conv_id FROM conv_members WHERE user = ?1")?;
            for id in st.query_map([viewer], |r| r.get::<_, i64>(0))? {
                conv_ids.push(id?);
            }
        }
        if conv_ids.is_empty() {
            return Ok(Vec::new());
        }
        let before_gseq: i64 = match before {
            None => i64::MAX,
            Some(id) => self
                .conn
                .prepare_cached("SELECT gseq FROM messages WHERE msg_id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?
                .unwrap_or(0),
        };
        let ids_json = format!(
            "[{}]",
            conv_ids
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        // Tokens are hex, so quoting them makes an exact-token AND query.
        let matcher = query_words
            .iter()
            .map(|w| format!("\"{}\"", self.search.token_text(w)))
            .collect::<Vec<_>>()
            .join(" AND ");
        /// msg_id, seq, sender, ts_ms, sealed body, conversation key, the chat columns.
        type SearchRow = (String, i64, String, i64, Vec<u8>, String, chat::ExtraCols);
        let rows: Vec<SearchRow> = {
            let mut st = self.conn.prepare_cached(
                "SELECT m.msg_id, m.seq, m.sender, m.ts_ms, m.body, c.key,
                        m.reply_to, m.act_on, m.act_kind, m.edited_ms, m.edits, m.deleted, m.reactions
                 FROM search_index f
                 JOIN messages m ON m.gseq = f.rowid
                 JOIN convs c ON c.id = m.conv_id
                 WHERE search_index MATCH ?1 AND f.rowid < ?2
                   AND m.conv_id IN (SELECT value FROM json_each(?3))
                   AND (m.except_list IS NULL OR instr(m.except_list, ',' || ?4 || ',') = 0)
                 ORDER BY f.rowid DESC LIMIT ?5",
            )?;
            st.query_map(
                params![matcher, before_gseq, ids_json, viewer, limit],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        chat::ExtraCols::read(r, 6)?,
                    ))
                },
            )?
            .collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        let mut budget = PageBudget::default();
        for (msg_id, seq, from, ts_ms, sealed, key, cols) in rows {
            let body = self.open_body(&msg_id, &key, seq, &sealed)?;
            // Truncated tokens can collide; the opened text decides.
            if !body
                .as_text()
                .is_some_and(|t| search::matches_all(t, query_words))
            {
                continue;
            }
            if !budget.admits(&body) {
                break;
            }
            let extra = self.extra_of(&msg_id, cols, true)?;
            out.push(Message {
                msg_id,
                conv: conv_from_key(&key),
                from,
                seq: seq as u64,
                ts_ms,
                body,
                extra,
            });
        }
        Ok(out)
    }

    /// Deletes messages (and their index entries) past their retention. `rule_for` gives the
    /// rule for a conversation key. Returns how many messages were deleted.
    pub fn apply_retention(
        &mut self,
        now_ms: i64,
        rule_for: &dyn Fn(&str) -> Retention,
    ) -> Result<u64, StoreError> {
        self.flush_index()?;
        let convs: Vec<(i64, String, i64)> = {
            let mut st = self.conn.prepare("SELECT id, key, last_seq FROM convs")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut deleted = 0u64;
        for (conv_id, key, last_seq) in convs {
            let rule = rule_for(&key);
            let mut cutoff: i64 = 0;
            if let Some(n) = rule.max_messages {
                cutoff = cutoff.max(last_seq - n.min(i64::MAX as u64) as i64);
            }
            if let Some(days) = rule.max_age_days {
                let before_ms = now_ms - i64::from(days) * 86_400_000;
                let by_age: Option<i64> = self.conn.query_row(
                    "SELECT max(seq) FROM messages WHERE conv_id = ?1 AND ts_ms < ?2",
                    params![conv_id, before_ms],
                    |r| r.get(0),
                )?;
                cutoff = cutoff.max(by_age.unwrap_or(0));
            }
            if cutoff <= 0 {
                continue;
            }
            deleted += self.delete_through(conv_id, cutoff)?;
        }
        Ok(deleted)
    }

    /// Deletes a conversation's messages with `seq <= cutoff` and their index entries, in
    /// bounded transactions (so commits are never stalled for long).
    fn delete_through(&mut self, conv_id: i64, cutoff: i64) -> Result<u64, StoreError> {
        const CHUNK: i64 = 1000;
        let mut deleted = 0u64;
        loop {
            let tx = self.conn.transaction()?;
            let gseqs: Vec<i64> = {
                let mut st = tx.prepare_cached(
                    "SELECT gseq FROM messages WHERE conv_id = ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
                )?;
                st.query_map(params![conv_id, cutoff, CHUNK], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            if gseqs.is_empty() {
                return Ok(deleted);
            }
            for g in &gseqs {
                tx.execute("DELETE FROM search_index WHERE rowid = ?1", [g])?;
                tx.execute("DELETE FROM messages WHERE gseq = ?1", [g])?;
            }
            tx.commit()?;
            deleted += gseqs.len() as u64;
        }
    }

    /// Runs SQLite's own consistency check; "ok" when sound.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

/// An append waiting for its commit, with whatever the caller needs when it is answered.
pub struct AppendJob<C> {
    pub msg: NewMessage,
    pub ctx: C,
}

/// What the store thread reports on the commit sink, in the order it did the work.
pub enum Done<C> {
    /// An append was committed (or failed).
    Appended {
        result: Result<Appended, String>,
        ctx: C,
    },
    /// A catch-up was read: every message committed before it is included, every later one
    /// comes after it on the sink.
    CaughtUp {
        result: Result<(Vec<Message>, bool), String>,
        /// On a cluster node ([`Store::start_marking`]): the newest sequence number of each of
        /// the user's rooms, read just before the catch-up (empty otherwise).
        marks: Vec<(Conv, u64)>,
        ctx: C,
    },
}

/// A catch-up request: see [`Db::catch_up`].
pub struct CatchUpJob<C> {
    pub user: String,
    pub resume: Vec<(Conv, u64)>,
    pub per_conv: u32,
    pub total: u32,
    pub ctx: C,
}

/// A call's work on the store thread, returning how to answer once what it wrote is synced
/// (given the sync's error, if it failed).
type Call = Box<dyn FnOnce(&mut dyn Backend) -> Answer + Send>;
type Answer = Box<dyn FnOnce(Option<StoreError>) + Send>;

enum Op<C> {
    /// An append, with what its sender prepared (see [`Prepared`]).
    Append(AppendJob<C>, Option<Prepared>),
    CatchUp(CatchUpJob<C>),
    Call(Call),
    Stop,
}

/// The async handle to the store thread. Cheap to clone.
pub struct Store<C> {
    tx: mpsc::Sender<Op<C>>,
    /// What senders compute before queueing an append (the backend's [`Backend::preparer`]).
    preparer: Option<Preparer>,
}

impl<C> Clone for Store<C> {
    fn clone(&self) -> Self {
        Store {
            tx: self.tx.clone(),
            preparer: self.preparer.clone(),
        }
    }
}

/// Joins the store thread; dropping every [`Store`] handle first lets it drain and stop.
pub struct StoreThread(JoinHandle<()>);

impl StoreThread {
    /// Waits until every queued operation is done and the database is closed.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl<C: Send + 'static> Store<C> {
    /// Starts the store thread on SQLite's `db`. Committed appends are answered on `sink`.
    pub fn start(db: Db, sink: mpsc::Sender<Done<C>>) -> (Store<C>, StoreThread) {
        Self::start_with(db, sink, CheckpointPolicy::default())
    }

    /// [`Store::start`] with its own checkpoint timing (tests use short ones).
    pub fn start_with(
        mut db: Db,
        sink: mpsc::Sender<Done<C>>,
        checkpoints: CheckpointPolicy,
    ) -> (Store<C>, StoreThread) {
        db.checkpoints = Checkpoints::new(checkpoints);
        Self::start_on(Box::new(db), sink)
    }

    /// Starts the store thread on any backend.
    pub fn start_on(
        backend: Box<dyn Backend>,
        sink: mpsc::Sender<Done<C>>,
    ) -> (Store<C>, StoreThread) {
        Self::spawn(backend, sink, false)
    }

    /// Starts the store thread of a cluster node: as [`Store::start_on`], and each catch-up
    /// also reports the newest sequence number of the user's rooms, read before it
    /// ([`Done::CaughtUp`]'s `marks`), where the node starts following the rooms it did not
    /// follow yet.
    pub fn start_marking(
        backend: Box<dyn Backend>,
        sink: mpsc::Sender<Done<C>>,
    ) -> (Store<C>, StoreThread) {
        Self::spawn(backend, sink, true)
    }

    fn spawn(
        backend: Box<dyn Backend>,
        sink: mpsc::Sender<Done<C>>,
        marks: bool,
    ) -> (Store<C>, StoreThread) {
        let (tx, rx) = mpsc::channel(STORE_QUEUE);
        let preparer = backend.preparer();
        let handle = std::thread::Builder::new()
            .name("conclave-store".into())
            .spawn(move || run(backend, rx, sink, marks))
            .map(StoreThread);
        match handle {
            Ok(h) => (Store { tx, preparer }, h),
            // Spawning a thread fails only when the OS is out of resources at start.
            Err(e) => panic!("cannot start the store thread: {e}"),
        }
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Backend) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (done, wait) = oneshot::channel();
        let op: Call = Box::new(move |db| {
            let result = f(db);
            Box::new(move |sync_error: Option<StoreError>| {
                let _ = done.send(match (result, sync_error) {
                    (Ok(_), Some(e)) => Err(e),
                    (result, _) => result,
                });
            })
        });
        self.tx
            .send(Op::Call(op))
            .await
            .map_err(|_| StoreError::Stopped)?;
        wait.await.map_err(|_| StoreError::Stopped)?
    }

    /// Queues `f` on the store thread without waiting for it (for a `Drop`, or from a plain
    /// thread): it runs after everything queued before it. When the queue is full a task
    /// sends it (on a plain thread, this waits).
    pub fn call_detached(&self, f: impl FnOnce(&mut dyn Backend) + Send + 'static)
    where
        C: Send + 'static,
    {
        let op: Call = Box::new(move |db| {
            f(db);
            Box::new(|_| {})
        });
        match self.tx.try_send(Op::Call(op)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.tx.clone();
                    rt.spawn(async move {
                        let _ = tx.send(op).await;
                    });
                } else {
                    // A plain thread (the audit log's writer) may wait.
                    let _ = self.tx.blocking_send(op);
                }
            }
        }
    }

    /// Operations waiting for the store thread.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Asks the thread to finish everything queued before this call, then stop.
    pub async fn stop(&self) {
        let _ = self.tx.send(Op::Stop).await;
    }

    /// Queues a catch-up; its answer arrives on the commit sink, in order with commits.
    pub async fn catch_up(&self, job: CatchUpJob<C>) -> Result<(), StoreError> {
        self.tx
            .send(Op::CatchUp(job))
            .await
            .map_err(|_| StoreError::Stopped)
    }

    /// Queues an append; its answer arrives on the commit sink. What the append needs that
    /// depends on no database (the body's encoding, its search tokens) is computed here, by
    /// the caller, so the store thread does not.
    pub async fn append(&self, job: AppendJob<C>) -> Result<(), StoreError> {
        let prepared = self.preparer.as_ref().map(|p| p.prepare(&job.msg));
        self.tx
            .send(Op::Append(job, prepared))
            .await
            .map_err(|_| StoreError::Stopped)
    }
}

/// When the store thread copies the WAL's committed pages into the database file (a
/// checkpoint), so that the WAL starts over from its beginning instead of growing.
///
/// The store thread is the database's only writer, and it checkpoints between two of its own
/// operations, after the last commit's messages went to the dispatcher: nothing is appended
/// while the checkpoint runs, so it always copies everything, and the next commit restarts the
/// WAL and overwrites its first pages (on this kind of disk a sync of overwritten pages is
/// cheaper than one that grows the file). A checkpoint on another thread, as before, never
/// finished under steady traffic (a commit every few milliseconds always left new frames
/// behind it), so the WAL grew by every commit's pages for as long as the traffic lasted: about
/// 10 MB a second at 500 messages a second. SQLite's own automatic checkpoint is off: it runs
/// inside the commit that crosses 1,000 pages, and that commit's messages would wait for it.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    /// A checkpoint is due this long after the last one, at the first moment no operation is
    /// waiting for the store thread.
    pub when_idle_after: std::time::Duration,
    /// And at the latest this long after the last one, even with operations waiting (steady
    /// full-speed traffic), which bounds the WAL to about this much traffic.
    pub at_latest: std::time::Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            when_idle_after: std::time::Duration::from_secs(1),
            at_latest: std::time::Duration::from_secs(3),
        }
    }
}

/// Checkpoint bookkeeping on the store thread.
struct Checkpoints {
    policy: CheckpointPolicy,
    last: std::time::Instant,
    /// Something may have been written since the last checkpoint.
    dirty: bool,
    /// The connection's count of written rows when last looked at.
    changes: u64,
}

impl Checkpoints {
    fn new(policy: CheckpointPolicy) -> Checkpoints {
        Checkpoints {
            policy,
            last: std::time::Instant::now(),
            dirty: false,
            changes: 0,
        }
    }

    /// Checkpoints when one is due. `waiting`: operations are queued for the store thread.
    fn after_op(&mut self, conn: &Connection, waiting: bool) {
        let changes = conn.total_changes();
        self.dirty |= changes != self.changes;
        self.changes = changes;
        if !self.dirty {
            return;
        }
        let since = self.last.elapsed();
        let due =
            since >= self.policy.at_latest || (since >= self.policy.when_idle_after && !waiting);
        if !due {
            return;
        }
        // (busy, frames in the WAL, frames copied). Busy only if another connection (an admin
        // command on the same data directory) holds a snapshot; then it is tried again later.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        }) {
            Ok((0, frames, copied)) if frames == copied => self.dirty = false,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; it is retried"),
        }
        self.last = std::time::Instant::now();
    }
}

/// Whether the syncer syncs the WAL (every build but the `bench-no-sync` one).
const SYNC_WAL: bool = !cfg!(feature = "bench-no-sync");

/// What the store thread did in one operation, handed to the syncer: whether it may have
/// written (then the WAL is synced before anything is answered), and the answers.
struct Round<C> {
    wrote: bool,
    /// When a batch of messages started (for the commit-duration histogram).
    batch_started: Option<std::time::Instant>,
    answers: Vec<Finish<C>>,
}

enum Finish<C> {
    Done(Done<C>),
    Answer(Answer),
}

/// Rounds waiting for the syncer; the store thread waits beyond this (back-pressure).
const SYNC_QUEUE: usize = 256;

/// The store thread: runs every operation in order on the database, with SQLite's
/// `synchronous = NORMAL` (a commit writes the WAL without syncing it), and hands what each
/// operation answers to the syncer thread ([`sync_run`]), which syncs the WAL once for every
/// commit made since its last sync and only then answers them, in the same order. So the store
/// thread commits the next batch while the previous one is being synced (a sync costs more
/// than a batch's work on most disks), nothing is answered, delivered or read back by anyone
/// before it is on disk, and one sync serves every commit that waited for it.
///
/// Why this is as durable as `synchronous = FULL`: in WAL mode a commit only appends frames to
/// the WAL (the database file changes only in checkpoints, which sync the WAL before and the
/// database after copying, with `NORMAL` too). Once `fdatasync` of the WAL returns, the
/// commit's frames, and every frame before them, are on disk, and recovery replays them.
fn run<C: Send + 'static>(
    mut db: Box<dyn Backend>,
    mut rx: mpsc::Receiver<Op<C>>,
    sink: mpsc::Sender<Done<C>>,
    marks: bool,
) {
    let wal = match db.durability() {
        Durability::SyncFile(path) => Some(path),
        Durability::AtCommit => None,
    };
    let (rounds, rounds_rx) = std::sync::mpsc::sync_channel::<Round<C>>(SYNC_QUEUE);
    let observer = db.take_commit_observer();
    let syncer = std::thread::Builder::new()
        .name("conclave-sync".into())
        .spawn(move || sync_run(rounds_rx, wal, sink, observer));
    let syncer = match syncer {
        Ok(h) => h,
        // Spawning a thread fails only when the OS is out of resources at start.
        Err(e) => panic!("cannot start the store's sync thread: {e}"),
    };
    let mut pending: Option<Op<C>> = None;
    loop {
        let op = match pending.take() {
            Some(op) => op,
            None => match rx.blocking_recv() {
                Some(op) => op,
                None => break,
            },
        };
        let changes = db.changes();
        let round = match op {
            Op::Call(f) => {
                let answer = f(&mut *db);
                Round {
                    wrote: db.changes() != changes,
                    batch_started: None,
                    answers: vec![Finish::Answer(answer)],
                }
            }
            Op::Stop => break,
            Op::CatchUp(job) => {
                let marks = if marks {
                    room_marks(&mut *db, &job.user)
                } else {
                    Vec::new()
                };
                let result = db
                    .catch_up(&job.user, &job.resume, job.per_conv, job.total)
                    .map_err(|e| e.to_string());
                Round {
                    wrote: false,
                    batch_started: None,
                    answers: vec![Finish::Done(Done::CaughtUp {
                        result,
                        marks,
                        ctx: job.ctx,
                    })],
                }
            }
            Op::Append(first, prepared) => {
                let started = std::time::Instant::now();
                let mut msgs = vec![first.msg];
                let mut ctxs = vec![first.ctx];
                let mut preps = vec![prepared];
                while msgs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Op::Append(j, p)) => {
                            msgs.push(j.msg);
                            ctxs.push(j.ctx);
                            preps.push(p);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let answers = match db.append_prepared(msgs, preps) {
                    Ok(done) => done
                        .into_iter()
                        .zip(ctxs)
                        .map(|(a, ctx)| Finish::Done(Done::Appended { result: Ok(a), ctx }))
                        .collect(),
                    Err(e) => {
                        if !e.disk_full() {
                            tracing::error!(error = %e, "message batch could not be stored");
                        }
                        let error = refusal_text(&e);
                        ctxs.into_iter()
                            .map(|ctx| {
                                Finish::Done(Done::Appended {
                                    result: Err(error.clone()),
                                    ctx,
                                })
                            })
                            .collect()
                    }
                };
                Round {
                    wrote: true,
                    batch_started: Some(started),
                    answers,
                }
            }
        };
        if rounds.send(round).is_err() {
            break; // the syncer is gone (it panicked): nothing can be answered any more
        }
        db.maintain(pending.is_some() || !rx.is_empty());
    }
    // Everything done so far is synced and answered before the database is closed.
    drop(rounds);
    let _ = syncer.join();
    db.close();
}

/// The newest sequence number of each room of `user` (rooms that cannot be read are left out:
/// the node then follows them from the first notice it sees).
fn room_marks(db: &mut dyn Backend, user: &str) -> Vec<(Conv, u64)> {
    let rooms = match db.rooms_of_user(user) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not read a user's rooms before a catch-up");
            return Vec::new();
        }
    };
    rooms
        .into_iter()
        .filter_map(|room| {
            let conv = Conv::Room(room);
            newest_seq(db, &conv).ok().map(|seq| (conv, seq))
        })
        .collect()
}

/// The newest sequence number of `conv` (0 before its first message), through the store's
/// interface: moving a read marker to a number beyond every message writes nothing and answers
/// [`ReadMoved::Beyond`] with the newest, as [`Chat::set_read`]'s contract says. (A method of
/// its own on [`Messages`] would say it more plainly; this one needs no new backend code.)
pub fn newest_seq(db: &mut dyn Backend, conv: &Conv) -> Result<u64, StoreError> {
    match db.set_read("", &conv_key(conv), u64::MAX, 0)? {
        ReadMoved::Beyond { last_seq } => Ok(last_seq),
        // No message has number u64::MAX: never reached.
        ReadMoved::Moved | ReadMoved::Unchanged => Err(StoreError::Corrupt),
    }
}

impl Backend for Db {
    /// SQLite's automatic checkpoint off (the store thread checkpoints between operations, see
    /// [`CheckpointPolicy`]), and commits that write the WAL without syncing it: the syncer
    /// syncs it (see [`run`]). Without a WAL file to name, commits keep syncing themselves.
    fn durability(&mut self) -> Durability {
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_autocheckpoint = 0") {
            tracing::warn!(error = %e, "could not turn SQLite's automatic checkpoint off");
        }
        let Some(wal) = self.conn.path().map(|p| PathBuf::from(format!("{p}-wal"))) else {
            return Durability::AtCommit;
        };
        match self.conn.execute_batch("PRAGMA synchronous = NORMAL") {
            Ok(()) => {
                self.synchronous = "NORMAL";
                Durability::SyncFile(wal)
            }
            Err(e) => {
                tracing::warn!(error = %e, "commits sync themselves (no deferred sync)");
                Durability::AtCommit
            }
        }
    }

    fn changes(&self) -> u64 {
        self.conn.total_changes()
    }

    fn maintain(&mut self, waiting: bool) {
        self.checkpoints.after_op(&self.conn, waiting);
    }

    fn close(&mut self) {
        if let Err(e) = self.optimize_index() {
            tracing::warn!(error = %e, "search index flush at shutdown failed (rebuilt at next start)");
        }
        // Leave a clean database: fold the WAL back into the main file.
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    }

    fn take_commit_observer(&mut self) -> Option<CommitObserver> {
        self.on_commit.take()
    }

    fn preparer(&self) -> Option<Preparer> {
        Some(Db::preparer(self))
    }

    fn append_prepared(
        &mut self,
        batch: Vec<NewMessage>,
        prepared: Vec<Option<Prepared>>,
    ) -> Result<Vec<Appended>, StoreError> {
        Db::append_prepared(self, batch, prepared)
    }
}

/// The syncer: takes every round waiting, syncs the WAL once if any of them wrote, then
/// answers them in order. `wal`: the file to sync; `None` when commits sync themselves.
fn sync_run<C>(
    rounds: std::sync::mpsc::Receiver<Round<C>>,
    wal: Option<PathBuf>,
    sink: mpsc::Sender<Done<C>>,
    observer: Option<CommitObserver>,
) {
    let mut waiting: Vec<Round<C>> = Vec::new();
    while let Ok(first) = rounds.recv() {
        waiting.push(first);
        while waiting.len() < SYNC_QUEUE {
            match rounds.try_recv() {
                Ok(r) => waiting.push(r),
                Err(_) => break,
            }
        }
        let failed = match &wal {
            Some(path) if SYNC_WAL && waiting.iter().any(|r| r.wrote) => {
                sync_file(path).err().map(|e| {
                    tracing::error!(error = %e, path = %path.display(), "the WAL could not be synced: the commits waiting for it are refused");
                    e
                })
            }
            _ => None,
        };
        // What the senders of the batches this sync covered are told (once for all of them).
        let refused = failed.as_ref().map(|e| refusal_text(&StoreError::sync(e)));
        for round in waiting.drain(..) {
            if let (Some(started), Some(observe), None) = (round.batch_started, &observer, &failed)
            {
                observe(started.elapsed());
            }
            for finish in round.answers {
                match finish {
                    Finish::Answer(answer) => answer(failed.as_ref().map(StoreError::sync)),
                    Finish::Done(done) => {
                        let done = match (done, &refused) {
                            (Done::Appended { result: Ok(_), ctx }, Some(text)) => Done::Appended {
                                result: Err(text.clone()),
                                ctx,
                            },
                            (done, _) => done,
                        };
                        // Without waiting when there is room (most of the time): a
                        // `blocking_send` costs a parker and a waker for every message.
                        if let Err(mpsc::error::TrySendError::Full(done)) = sink.try_send(done) {
                            let _ = sink.blocking_send(done);
                        }
                    }
                }
            }
        }
    }
}

/// What the senders of a batch that could not be stored (or synced) are told.
fn refusal_text(e: &StoreError) -> String {
    if e.disk_full() {
        DISK_FULL.to_string()
    } else {
        e.to_string()
    }
}

/// `fdatasync` of a file, opened by its path for the purpose (the WAL keeps its inode while the
/// database is open, but a descriptor kept open would outlive a file replaced under it).
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = DataKey::load_or_create(dir.path()).expect("key");
        let db = Db::open(dir.path(), key).expect("open");
        (dir, db)
    }

    fn msg(conv: Conv, from: &str, text: &str, idem: Option<&str>) -> NewMessage {
        NewMessage {
            conv,
            from: from.into(),
            body: Body::text(text),
            except: Vec::new(),
            idempotency_key: idem.map(str::to_string),
            refs: None,
        }
    }

    #[test]
    fn index_rows_are_each_message_once_in_order_with_its_last_tokens() {
        let pending = vec![
            (10, "aa bb".to_string()),
            (9, "cc".to_string()),
            (10, "dd".to_string()),
            (100, "q\"\\".to_string()),
        ];
        let json = index_rows_json(&pending);
        assert_eq!(json, r#"{"9":"cc","10":"dd","100":"q\"\\"}"#);
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(parsed.len(), 3);
        assert_eq!(index_rows_json(&[]), "{}");
    }

    #[test]
    fn a_page_fits_its_budget_but_never_holds_nothing() {
        let body = |bytes: usize| Body {
            content_type: String::new(),
            data: vec![0; bytes],
        };
        let taken = |sizes: &[usize]| {
            let mut b = PageBudget::default();
            sizes.iter().take_while(|&&n| b.admits(&body(n))).count()
        };
        assert_eq!(taken(&[100; 500]), 500);
        assert_eq!(
            taken(&[60_000; 100]),
            MAX_PAGE_BYTES / (60_000 + MESSAGE_OVERHEAD_BYTES)
        );
        assert_eq!(
            taken(&[MAX_PAGE_BYTES * 2, 10]),
            1,
            "one message even over the budget"
        );
    }

    #[tokio::test]
    async fn steady_commits_still_let_the_wal_start_over() {
        let (d, db) = db();
        let (sink, mut done) = mpsc::channel::<Done<()>>(64);
        let policy = CheckpointPolicy {
            when_idle_after: std::time::Duration::from_millis(20),
            at_latest: std::time::Duration::from_millis(100),
        };
        let (store, thread) = Store::start_with(db, sink, policy);
        let room = Conv::Room("general".into());
        // One message at a time, the next sent as soon as the last is stored: a commit each,
        // and never a pause long enough for a checkpoint on another thread to catch up.
        const APPENDS: usize = 400;
        for i in 0..APPENDS {
            let job = AppendJob {
                msg: msg(room.clone(), "alice", &format!("message {i}"), None),
                ctx: (),
            };
            store.append(job).await.expect("queued");
            let reply = tokio::time::timeout(std::time::Duration::from_secs(10), done.recv())
                .await
                .expect("stored in time");
            assert!(
                matches!(reply, Some(Done::Appended { result: Ok(_), .. })),
                "message {i} stored"
            );
        }
        // Frames in the WAL now: only what came after its last restart. Every commit writes
        // at least two pages (the row and its index), so without restarts there would be
        // 2 * APPENDS or more.
        // (Asked from a second connection. The store thread may be checkpointing itself just
        // after the last answer; then this one is busy and reports -1, and is asked again.)
        let path = d.path().join(DB_FILE);
        let frames = tokio::task::spawn_blocking(move || {
            let c = Connection::open(path).expect("second connection");
            let mut tries = 0;
            loop {
                let (busy, frames) = c
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                    })
                    .expect("checkpoint");
                tries += 1;
                if busy == 0 || tries == 100 {
                    break frames;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
        .await
        .expect("checkpoint task");
        assert!(
            (0..APPENDS as i64).contains(&frames),
            "{frames} frames in the WAL after {APPENDS} commits: it never started over"
        );
        let history = store
            .call(move |db| db.history(&room, "bob", None, 10))
            .await
            .expect("history");
        assert_eq!(history.last().map(|m| m.seq), Some(APPENDS as u64));
        drop(store);
        thread.join();
    }

    /// Answers wait for the syncer: when the WAL cannot be synced, a committed batch is not
    /// acknowledged (its senders are told why), nor is a call that wrote; a read still is.
    #[tokio::test]
    async fn nothing_written_is_acknowledged_unless_the_wal_was_synced() {
        let (dir, db) = db();
        let (sink, mut done) = mpsc::channel::<Done<()>>(64);
        let (store, thread) = Store::start(db, sink);
        let room = Conv::Room("general".into());
        let append = |text: &str| AppendJob {
            msg: msg(room.clone(), "alice", text, None),
            ctx: (),
        };
        let wait = std::time::Duration::from_secs(10);
        store.append(append("before")).await.expect("queued");
        let first = tokio::time::timeout(wait, done.recv())
            .await
            .expect("in time");
        assert!(matches!(first, Some(Done::Appended { result: Ok(_), .. })));
        // The WAL's name is gone (SQLite still writes to its open file): it cannot be opened
        // to be synced, as when the disk fails.
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        std::fs::remove_file(&wal).expect("the WAL exists while the database is open");
        store.append(append("after")).await.expect("queued");
        match tokio::time::timeout(wait, done.recv())
            .await
            .expect("in time")
        {
            Some(Done::Appended { result: Err(e), .. }) => {
                assert!(e.contains("could not be synced"), "{e}")
            }
            _ => panic!("a batch whose sync failed was acknowledged"),
        }
        let wrote = store
            .call(|db| db.create_user("carol", "hash", false))
            .await;
        assert!(
            matches!(wrote, Err(StoreError::Sync { .. })),
            "a write is refused: {wrote:?}"
        );
        let read = store
            .call(|db| db.users())
            .await
            .expect("a read is answered");
        assert!(!read.is_empty());
        drop(store);
        thread.join();
    }

    #[test]
    fn sequences_are_per_conversation_and_gap_free() {
        let (_d, mut db) = db();
        let room = Conv::Room("general".into());
        let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
        let out = db
            .append_batch(&[
                msg(room.clone(), "alice", "a", None),
                msg(dm.clone(), "alice", "b", None),
                msg(room.clone(), "bob", "c", None),
            ])
            .expect("append");
        let seqs: Vec<u64> = out.iter().map(|a| a.msg.seq).collect();
        assert_eq!(seqs, vec![1, 1, 2]);
        let h = db.history(&room, "carol", None, 10).expect("history");
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].body.as_text(), Some("a"));
        assert_eq!(h[1].seq, 2);
    }

    #[test]
    fn a_range_of_a_conversation_comes_in_pages_with_its_exceptions() {
        let (_d, mut db) = db();
        let room = Conv::Room("general".into());
        let mut batch: Vec<NewMessage> = (1..=5)
            .map(|i| msg(room.clone(), "alice", &format!("m{i}"), None))
            .collect();
        batch[2].except = vec!["bob".into(), "carol".into()];
        batch.push(msg(Conv::Room("other".into()), "alice", "x", None));
        db.append_batch(&batch).expect("append");
        let seqs = |r: &(Vec<Appended>, bool)| r.0.iter().map(|a| a.msg.seq).collect::<Vec<_>>();
        let all = db.conv_range(&room, 0, None, 10).expect("range");
        assert_eq!((seqs(&all), all.1), (vec![1, 2, 3, 4, 5], false));
        assert_eq!(all.0[2].except, ["bob", "carol"], "exceptions kept");
        assert!(all.0[1].except.is_empty() && !all.0[1].duplicate);
        assert_eq!(all.0[4].msg.body.as_text(), Some("m5"));
        let page = db.conv_range(&room, 1, None, 2).expect("range");
        assert_eq!((seqs(&page), page.1), (vec![2, 3], true), "cut short");
        let bounded = db.conv_range(&room, 1, Some(3), 2).expect("range");
        assert_eq!(
            (seqs(&bounded), bounded.1),
            (vec![2, 3], false),
            "the range ends at 3"
        );
        let empty = db.conv_range(&room, 5, None, 10).expect("range");
        assert_eq!((seqs(&empty), empty.1), (vec![], false));
        let none = db
            .conv_range(&Conv::Room("nowhere".into()), 0, None, 10)
            .expect("range");
        assert!(none.0.is_empty() && !none.1);
    }

    #[test]
    fn idempotency_key_stores_once() {
        let (_d, mut db) = db();
        let room = Conv::Room("general".into());
        let a = db
            .append_batch(&[msg(room.clone(), "alice", "x", Some("k"))])
            .expect("append");
        let b = db
            .append_batch(&[msg(room.clone(), "alice", "x", Some("k"))])
            .expect("append");
        assert!(!a[0].duplicate);
        assert!(b[0].duplicate);
        assert_eq!(a[0].msg.msg_id, b[0].msg.msg_id);
        assert_eq!(db.history(&room, "alice", None, 10).expect("h").len(), 1);
    }

    #[test]
    fn blockcast_is_hidden_from_the_excluded_in_history() {
        let (_d, mut db) = db();
        let room = Conv::Room("general".into());
        let mut m = msg(room.clone(), "alice", "secret plan", None);
        m.except = vec!["carol".into()];
        db.append_batch(&[m]).expect("append");
        assert_eq!(db.history(&room, "bob", None, 10).expect("h").len(), 1);
        assert_eq!(db.history(&room, "carol", None, 10).expect("h").len(), 0);
    }

    #[test]
    fn search_finds_all_words_in_visible_conversations_only() {
        let (_d, mut db) = db();
        let general = Conv::Room("general".into());
        let ops = Conv::Room("ops".into());
        let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
        db.append_batch(&[
            msg(general.clone(), "alice", "We DEPLOY on Friday", None),
            msg(ops.clone(), "bob", "deploy friday secret", None),
            msg(dm.clone(), "bob", "Déploiement friday?", None),
            msg(general.clone(), "bob", "deploy maybe monday", None),
        ])
        .expect("append");
        let q = search::words("friday deploy");
        let found = db
            .search("alice", &["general".into()], true, &q, None, 10)
            .expect("search");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].body.as_text(), Some("We DEPLOY on Friday"));
        let q = search::words("deploiement");
        let found = db
            .search("alice", &["general".into()], true, &q, None, 10)
            .expect("search");
        assert_eq!(
            found.len(),
            1,
            "accent-insensitive, direct conversations included"
        );
        let found = db
            .search("carol", &["general".into()], true, &q, None, 10)
            .expect("search");
        assert!(found.is_empty(), "not carol's conversation");
        let q = search::words("deploy");
        let all = db
            .search(
                "alice",
                &["general".into(), "ops".into()],
                true,
                &q,
                None,
                10,
            )
            .expect("search");
        assert_eq!(all.len(), 3);
        assert!(all[0].msg_id > all[1].msg_id, "newest first");
        let page = db
            .search(
                "alice",
                &["general".into(), "ops".into()],
                true,
                &q,
                Some(&all[0].msg_id),
                10,
            )
            .expect("search");
        assert_eq!(page.len(), 2);
    }

    #[test]
    fn retention_removes_messages_and_their_index_entries() {
        let (_d, mut db) = db();
        let room = Conv::Room("r".into());
        let batch: Vec<_> = (0..10)
            .map(|i| msg(room.clone(), "a", &format!("word{i} common"), None))
            .collect();
        db.append_batch(&batch).expect("append");
        let rooms = vec!["r".to_string()];
        let found = |db: &mut Db, q: &str| {
            db.search("a", &rooms, false, &search::words(q), None, 100)
                .expect("search")
                .len()
        };
        assert_eq!(found(&mut db, "common"), 10);
        let n = db
            .apply_retention(now_ms(), &|_| Retention {
                max_age_days: None,
                max_messages: Some(4),
            })
            .expect("retention");
        assert_eq!(n, 6);
        let h = db.history(&room, "a", None, 100).expect("h");
        assert_eq!(
            h.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![7, 8, 9, 10]
        );
        assert_eq!(found(&mut db, "common"), 4);
        assert_eq!(
            found(&mut db, "word2"),
            0,
            "index entry gone with its message"
        );
        // By age: everything is younger than a day.
        let n = db
            .apply_retention(now_ms(), &|_| Retention {
                max_age_days: Some(1),
                max_messages: None,
            })
            .expect("retention");
        assert_eq!(n, 0);
        let n = db
            .apply_retention(now_ms() + 2 * 86_400_000, &|_| Retention {
                max_age_days: Some(1),
                max_messages: None,
            })
            .expect("retention");
        assert_eq!(n, 4);
        assert_eq!(found(&mut db, "common"), 0);
    }

    #[test]
    fn a_wrong_key_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = DataKey::load_or_create(dir.path()).expect("key");
        drop(Db::open(dir.path(), key).expect("open"));
        let other = DataKey::from_bytes(&[7u8; 32]).expect("key");
        match Db::open(dir.path(), other) {
            Err(StoreError::WrongKey(_)) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a wrong key must be refused"),
        }
    }

    #[test]
    fn catch_up_uses_cursors_then_acks_and_skips_history_before_joining() {
        let (_d, mut db) = db();
        let room = Conv::Room("general".into());
        db.ensure_public_room("general").expect("room");
        db.create_user("alice", "h", false).expect("user");
        db.create_user("bob", "h", false).expect("user");
        db.add_member("general", "alice").expect("member");
        db.append_batch(&[msg(room.clone(), "alice", "before bob", None)])
            .expect("append");
        db.add_member("general", "bob").expect("member");
        let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
        db.append_batch(&[
            msg(room.clone(), "alice", "r2", None),
            msg(room.clone(), "alice", "r3", None),
            msg(dm.clone(), "alice", "d1", None),
        ])
        .expect("append");
        let texts = |v: &[Message]| {
            v.iter()
                .map(|m| m.body.as_text().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };
        let (got, truncated) = db.catch_up("bob", &[], 100, 100).expect("catch up");
        let mut t = texts(&got);
        t.sort();
        assert_eq!(t, vec!["d1", "r2", "r3"]);
        assert!(!truncated);
        db.ack("bob", &[(room.clone(), 2)]).expect("ack");
        let (got, _) = db.catch_up("bob", &[], 100, 100).expect("catch up");
        let mut t = texts(&got);
        t.sort();
        assert_eq!(t, vec!["d1", "r3"]);
        // A client's own cursor wins over the account's acknowledged position.
        let (got, _) = db
            .catch_up("bob", &[(room.clone(), 3), (dm.clone(), 1)], 100, 100)
            .expect("catch up");
        assert!(got.is_empty());
        // Limits: newest first kept, the rest flagged.
        let (got, truncated) = db
            .catch_up("bob", &[(room.clone(), 0)], 1, 100)
            .expect("catch up");
        assert!(truncated);
        assert!(texts(&got).contains(&"r3".to_string()));
        assert!(!texts(&got).contains(&"r2".to_string()));
    }

    #[test]
    fn index_tokens_lost_in_a_crash_are_rebuilt_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let room = Conv::Room("r".into());
        let rooms = vec!["r".to_string()];
        {
            let key = DataKey::load_or_create(dir.path()).expect("key");
            let mut db = Db::open(dir.path(), key).expect("open");
            db.append_batch(&[msg(room.clone(), "a", "alpha flushed", None)])
                .expect("append");
            db.flush_index().expect("flush");
            db.append_batch(&[msg(room.clone(), "a", "beta pending", None)])
                .expect("append");
            assert!(!db.pending_index.is_empty());
            // Dropped without a flush: the crash case.
        }
        let key = DataKey::load_or_create(dir.path()).expect("key");
        let mut db = Db::open(dir.path(), key).expect("reopen");
        let found = |db: &mut Db, q: &str| {
            db.search("a", &rooms, false, &search::words(q), None, 10)
                .expect("search")
                .len()
        };
        assert_eq!(found(&mut db, "beta"), 1, "rebuilt from the stored message");
        assert_eq!(found(&mut db, "alpha"), 1, "indexed before, not doubled");
        // A search flushes what waits, so it never misses a stored message.
        db.append_batch(&[msg(room.clone(), "a", "gamma fresh", None)])
            .expect("append");
        assert_eq!(found(&mut db, "gamma"), 1);
    }

    #[test]
    fn paging_backwards() {
        let (_d, mut db) = db();
        let room = Conv::Room("r".into());
        let batch: Vec<_> = (0..10)
            .map(|i| msg(room.clone(), "a", &format!("m{i}"), None))
            .collect();
        db.append_batch(&batch).expect("append");
        let page = db.history(&room, "a", Some(5), 3).expect("h");
        assert_eq!(
            page.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }
}
