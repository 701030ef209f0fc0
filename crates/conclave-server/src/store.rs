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
//! [`Db`] is the synchronous core (also used directly by `conclave user ...` on a data directory
//! when no server runs); [`Store`] is the async handle. Keep this interface narrow: a
//! PostgreSQL store will implement the same operations later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use conclave_proto::{Body, Conv, Message};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::at_rest::DataKey;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "conclave.db";
/// Most appends committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Operations waiting for the store thread; senders wait (back-pressure) beyond this.
pub const STORE_QUEUE: usize = 16 * 1024;

const SCHEMA_VERSION: i64 = 1;
const SCHEMA: &str = "
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
    created_ms INTEGER NOT NULL
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
    conv_id  INTEGER NOT NULL REFERENCES convs(id),
    seq      INTEGER NOT NULL,
    msg_id   TEXT NOT NULL UNIQUE,
    sender   TEXT NOT NULL,
    ts_ms    INTEGER NOT NULL,
    body     BLOB NOT NULL,
    except_list TEXT,
    idem_key TEXT,
    PRIMARY KEY (conv_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_idem ON messages(sender, idem_key) WHERE idem_key IS NOT NULL;
";

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
}

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

fn conv_from_key(key: &str) -> Conv {
    match key.split_once(':') {
        Some(("r", room)) => Conv::Room(room.to_string()),
        Some((_, users)) => Conv::Direct(users.split(',').map(str::to_string).collect()),
        None => Conv::Room(key.to_string()),
    }
}

fn seal_ad(msg_id: &str, conv_key: &str, seq: u64) -> Vec<u8> {
    format!("conclave-msg-v1|{msg_id}|{conv_key}|{seq}").into_bytes()
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
    conv_ids: HashMap<String, i64>,
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
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;",
        )
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
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(open_err)?;
        }
        Ok(Db {
            conn,
            key,
            conv_ids: HashMap::new(),
        })
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
            "INSERT OR IGNORE INTO rooms (name, private, pw_hash, owner, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![room.name, room.private, room.pw_hash, room.owner, now_ms()],
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
            let mut st = self
                .conn
                .prepare("SELECT name, private, pw_hash, owner FROM rooms ORDER BY name")?;
            st.query_map([], |r| {
                Ok(RoomRow {
                    name: r.get(0)?,
                    private: r.get(1)?,
                    pw_hash: r.get(2)?,
                    owner: r.get(3)?,
                    members: Vec::new(),
                    invited: Vec::new(),
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

    /// Adds a member (and clears their invite).
    pub fn add_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO members (room, user, joined_ms) VALUES (?1, ?2, ?3)",
            params![room, user, now_ms()],
        )?;
        tx.execute(
            "DELETE FROM room_invites WHERE room = ?1 AND user = ?2",
            params![room, user],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn remove_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM members WHERE room = ?1 AND user = ?2",
            params![room, user],
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
        if let Some(&id) = self.conv_ids.get(key) {
            return Ok(id);
        }
        self.conn
            .execute("INSERT OR IGNORE INTO convs (key) VALUES (?1)", [key])?;
        let id: i64 = self
            .conn
            .query_row("SELECT id FROM convs WHERE key = ?1", [key], |r| r.get(0))?;
        self.conv_ids.insert(key.to_string(), id);
        Ok(id)
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
        // A failed batch must not leave cached conversation ids that were rolled back.
        let cached = self.conv_ids.len();
        let result = self.append_batch_inner(batch);
        if result.is_err() && self.conv_ids.len() != cached {
            self.conv_ids.clear();
        }
        result
    }

    fn append_batch_inner(&mut self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            match self.append_one(m) {
                Ok(a) => out.push(a),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        Ok(out)
    }

    fn append_one(&mut self, m: &NewMessage) -> Result<Appended, StoreError> {
        let key = conv_key(&m.conv);
        if let Some(idem) = &m.idempotency_key {
            let found = self
                .conn
                .prepare_cached(
                    "SELECT msg_id, seq, ts_ms FROM messages WHERE sender = ?1 AND idem_key = ?2",
                )?
                .query_row(params![m.from, idem], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .optional()?;
            if let Some((msg_id, seq, ts_ms)) = found {
                return Ok(Appended {
                    msg: Message {
                        msg_id,
                        conv: m.conv.clone(),
                        from: m.from.clone(),
                        seq: seq as u64,
                        ts_ms,
                        body: m.body.clone(),
                    },
                    except: m.except.clone(),
                    duplicate: true,
                });
            }
        }
        let conv_id = self.conv_id(&key)?;
        let seq: i64 = self
            .conn
            .prepare_cached(
                "UPDATE convs SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
            )?
            .query_row([conv_id], |r| r.get(0))?;
        let msg_id = uuid::Uuid::now_v7().to_string();
        let ts_ms = now_ms();
        let plain = postcard::to_stdvec(&m.body).unwrap_or_default();
        let sealed = self.key.seal(&seal_ad(&msg_id, &key, seq as u64), &plain);
        let except = if m.except.is_empty() {
            None
        } else {
            Some(format!(",{},", m.except.join(",")))
        };
        self.conn
            .prepare_cached(
                "INSERT INTO messages (conv_id, seq, msg_id, sender, ts_ms, body, except_list, idem_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                conv_id,
                seq,
                msg_id,
                m.from,
                ts_ms,
                sealed,
                except,
                m.idempotency_key
            ])?;
        Ok(Appended {
            msg: Message {
                msg_id,
                conv: m.conv.clone(),
                from: m.from.clone(),
                seq: seq as u64,
                ts_ms,
                body: m.body.clone(),
            },
            except: m.except.clone(),
            duplicate: false,
        })
    }

    /// A page of history for `viewer`, oldest first: up to `limit` messages before `before`
    /// (or the newest). Blockcast messages that excluded the viewer are left out.
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
        let mut st = self.conn.prepare_cached(
            "SELECT msg_id, seq, sender, ts_ms, body FROM messages
             WHERE conv_id = ?1 AND seq < ?2
               AND (except_list IS NULL OR instr(except_list, ',' || ?3 || ',') = 0)
             ORDER BY seq DESC LIMIT ?4",
        )?;
        let rows = st.query_map(params![conv_id, before, viewer, limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (msg_id, seq, from, ts_ms, sealed) = row?;
            let plain = self
                .key
                .open(&seal_ad(&msg_id, &key, seq as u64), &sealed)
                .map_err(|_| StoreError::Corrupt)?;
            let body: Body = postcard::from_bytes(&plain).map_err(|_| StoreError::Corrupt)?;
            out.push(Message {
                msg_id,
                conv: conv_from_key(&key),
                from,
                seq: seq as u64,
                ts_ms,
                body,
            });
        }
        out.reverse();
        Ok(out)
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

/// The answer to an append, delivered on the commit sink in commit order.
pub struct Committed<C> {
    pub result: Result<Appended, String>,
    pub ctx: C,
}

type Call = Box<dyn FnOnce(&mut Db) + Send>;

enum Op<C> {
    Append(AppendJob<C>),
    Call(Call),
    Stop,
}

/// The async handle to the store thread. Cheap to clone.
pub struct Store<C> {
    tx: mpsc::Sender<Op<C>>,
}

impl<C> Clone for Store<C> {
    fn clone(&self) -> Self {
        Store {
            tx: self.tx.clone(),
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
    /// Starts the store thread on `db`. Committed appends are answered on `sink`.
    pub fn start(db: Db, sink: mpsc::Sender<Committed<C>>) -> (Store<C>, StoreThread) {
        let (tx, rx) = mpsc::channel(STORE_QUEUE);
        let handle = std::thread::Builder::new()
            .name("conclave-store".into())
            .spawn(move || run(db, rx, sink))
            .map(StoreThread);
        match handle {
            Ok(h) => (Store { tx }, h),
            // Spawning a thread fails only when the OS is out of resources at start.
            Err(e) => panic!("cannot start the store thread: {e}"),
        }
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (done, wait) = oneshot::channel();
        let op: Call = Box::new(move |db| {
            let _ = done.send(f(db));
        });
        self.tx
            .send(Op::Call(op))
            .await
            .map_err(|_| StoreError::Stopped)?;
        wait.await.map_err(|_| StoreError::Stopped)?
    }

    /// Asks the thread to finish everything queued before this call, then stop.
    pub async fn stop(&self) {
        let _ = self.tx.send(Op::Stop).await;
    }

    /// Queues an append; its answer arrives on the commit sink.
    pub async fn append(&self, job: AppendJob<C>) -> Result<(), StoreError> {
        self.tx
            .send(Op::Append(job))
            .await
            .map_err(|_| StoreError::Stopped)
    }
}

fn run<C>(mut db: Db, mut rx: mpsc::Receiver<Op<C>>, sink: mpsc::Sender<Committed<C>>) {
    let mut pending: Option<Op<C>> = None;
    loop {
        let op = match pending.take() {
            Some(op) => op,
            None => match rx.blocking_recv() {
                Some(op) => op,
                None => break,
            },
        };
        match op {
            Op::Call(f) => f(&mut db),
            Op::Stop => break,
            Op::Append(first) => {
                let mut jobs = vec![first];
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Op::Append(j)) => jobs.push(j),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let (msgs, ctxs): (Vec<_>, Vec<_>) =
                    jobs.into_iter().map(|j| (j.msg, j.ctx)).unzip();
                match db.append_batch(&msgs) {
                    Ok(done) => {
                        for (a, ctx) in done.into_iter().zip(ctxs) {
                            let _ = sink.blocking_send(Committed { result: Ok(a), ctx });
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "message batch could not be stored");
                        for ctx in ctxs {
                            let _ = sink.blocking_send(Committed {
                                result: Err(e.to_string()),
                                ctx,
                            });
                        }
                    }
                }
            }
        }
    }
    // Leave a clean database: fold the WAL back into the main file.
    let _ = db.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
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
        }
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
