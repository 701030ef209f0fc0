//! The PostgreSQL store for cluster mode (issue 24), in progress: [`PgDb`] implements the
//! store's [`Accounts`], [`Rooms`], [`Moderation`], [`FileMeta`] and, in the submodules,
//! [`Messages`](crate::store::Messages) ([`messages`]: appends with sequence numbers per
//! conversation assigned in PostgreSQL, safe with several nodes appending at once; history,
//! search, acks, catch-up, retention, ranges), `Chat` ([`chat`]), `Devices` ([`devices`]) and
//! `Groups` ([`groups`]) with the same behaviour as SQLite's [`crate::store::Db`] (the
//! conformance suite, `tests/store_conformance.rs`, runs the same tests on both).
//!
//! What `Db` seals under the data key, `PgDb` seals the same way, with the same additional
//! data (file names and hashes, room topics, E2EE group states and GroupInfos), so it is
//! opened with the data key, and refuses a database whose key check another key wrote.
//!
//! Why the synchronous `postgres` crate: the store thread runs every operation synchronously
//! on its own thread, one at a time, and `postgres` is exactly tokio-postgres (the client
//! DEPENDENCIES.md names) driven by a small current-thread runtime that the client owns, the
//! wrapper maintained with it rather than one of ours. One connection per store thread, so no
//! pool yet: deadpool-postgres comes with the async readers that will want several. The hot
//! statements (appends, catch-up, ranges) are prepared once per connection and kept
//! ([`messages`]); the others are prepared when they run (one more round trip over loopback).
//!
//! Never call it from async code: the client blocks on its own runtime, which on a tokio
//! worker thread would panic. The store thread is a plain thread.
//!
//! No TLS to PostgreSQL yet: connect over the Unix socket or loopback only (the test kit does);
//! tokio-postgres-rustls comes with the `--store postgres://` option.
//!
//! Acknowledged means committed: every session sets `synchronous_commit = on` itself, whatever
//! the server's default, so a commit that returned is on the primary's disk.
//!
//! Names are compared and sorted bytewise (`COLLATE "C"` on every text key), as SQLite does,
//! so lists come back in the same order whatever locale the database was created with.

use std::cell::RefCell;
use std::time::{Duration, Instant};

mod chat;
mod devices;
mod groups;
pub mod messages;

use postgres::{Client, NoTls, Transaction};

use conclave_proto::Conv;

use crate::at_rest::DataKey;
use crate::guard::{Ban, BanTarget};
use crate::store::{
    Accounts, Backend, CommitObserver, Durability, FileMeta, FileRow, KEY_CHECK_AD,
    KEY_CHECK_PLAIN, Moderation, RecipientState, RoomRow, Rooms, StoreError, UserRow,
    conv_from_key, conv_key, open_file_meta, seal_file_meta,
};

/// The schema this build writes; a database at a higher version was written by a newer build.
/// Each version adds to the one before (a database at an older version is brought up to this
/// one at connect).
pub const SCHEMA_VERSION: i64 = 6;

/// Schema version 5: the cluster's audit, a copy of each node's records (the node's file in
/// its data directory stays the tamper-evident chain; each line carries its chain hash).
const SCHEMA_V5: &str = r#"
CREATE TABLE audit_copy (
    id        BIGSERIAL PRIMARY KEY,
    node      TEXT COLLATE "C" NOT NULL,
    stored_ms BIGINT NOT NULL,
    line      TEXT NOT NULL
);
CREATE INDEX audit_copy_node ON audit_copy (node, id);
"#;

/// Schema version 6: end-to-end commits marked in `messages`, under an index of their own.
const SCHEMA_V6: &str = r#"
ALTER TABLE messages ADD COLUMN mls_commit BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX messages_mls_commits ON messages (conv_id, seq) WHERE mls_commit;
"#;

/// At the upgrade to version 6: marks the commits already stored, in the conversations that
/// have an end-to-end group (their bodies are sealed: each is opened to read its type).
fn mark_commits(tx: &mut Transaction<'_>, key: &DataKey) -> Result<(), StoreError> {
    let rows = tx.query(
        "SELECT m.gseq, m.msg_id, m.seq, c.key, m.body FROM messages m
         JOIN convs c ON c.id = m.conv_id
         WHERE c.key IN (SELECT conv FROM e2ee_groups)",
        &[],
    )?;
    for r in rows {
        let (gseq, msg_id, seq, conv): (i64, String, i64, String) =
            (col(&r, 0)?, col(&r, 1)?, col(&r, 2)?, col(&r, 3)?);
        let sealed: Vec<u8> = col(&r, 4)?;
        let body = crate::store::open_body(key, &msg_id, &conv, seq, &sealed)?;
        if body.content_type == conclave_e2ee::CT_COMMIT {
            tx.execute(
                "UPDATE messages SET mls_commit = TRUE WHERE gseq = $1",
                &[&gseq],
            )?;
        }
    }
    Ok(())
}

/// Any two nodes opening the same database take this advisory lock (a fixed key:
/// "conclave" in ASCII) while they check and create the schema, so they never race.
const SCHEMA_LOCK: i64 = 0x636f_6e63_6c61_7665;

/// Schema version 1: accounts, rooms, moderation, and the conversations and acknowledged
/// positions that joining a room sets (the messages tables came with `Messages`, as version 3:
/// [`messages::SCHEMA_V3`]).
const SCHEMA_V1: &str = r#"
CREATE TABLE conclave_meta (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE users (
    name       TEXT COLLATE "C" PRIMARY KEY,
    pw_hash    TEXT NOT NULL,
    admin      BOOLEAN NOT NULL DEFAULT FALSE,
    created_ms BIGINT NOT NULL
);
CREATE TABLE rooms (
    name       TEXT COLLATE "C" PRIMARY KEY,
    private    BOOLEAN NOT NULL,
    pw_hash    TEXT,
    owner      TEXT COLLATE "C",
    created_ms BIGINT NOT NULL,
    votekick   BOOLEAN NOT NULL DEFAULT TRUE
);
CREATE TABLE bans (
    kind       TEXT COLLATE "C" NOT NULL,
    target     TEXT COLLATE "C" NOT NULL,
    until_ms   BIGINT,
    reason     TEXT NOT NULL,
    by_user    TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, target)
);
CREATE TABLE ip_rules (
    action     TEXT COLLATE "C" NOT NULL,
    cidr       TEXT COLLATE "C" NOT NULL,
    created_ms BIGINT NOT NULL,
    added      BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (action, cidr)
);
CREATE TABLE room_bans (
    room      TEXT COLLATE "C" NOT NULL,
    user_name TEXT COLLATE "C" NOT NULL,
    until_ms  BIGINT NOT NULL,
    PRIMARY KEY (room, user_name)
);
CREATE TABLE members (
    room      TEXT COLLATE "C" NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
    user_name TEXT COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    joined_ms BIGINT NOT NULL,
    PRIMARY KEY (room, user_name)
);
CREATE INDEX members_user ON members(user_name);
CREATE TABLE room_invites (
    room      TEXT COLLATE "C" NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
    user_name TEXT COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    PRIMARY KEY (room, user_name)
);
CREATE TABLE invite_codes (
    code_hash  TEXT COLLATE "C" PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    used_by    TEXT
);
CREATE TABLE convs (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key      TEXT COLLATE "C" NOT NULL UNIQUE,
    last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE acks (
    user_name TEXT COLLATE "C" NOT NULL,
    conv_id   BIGINT NOT NULL REFERENCES convs(id),
    seq       BIGINT NOT NULL,
    PRIMARY KEY (user_name, conv_id)
);
"#;

/// Schema version 2: files (`FileMeta`), as SQLite's schema version 2 has them: the file rows
/// (name and hash sealed in `meta`) and each recipient's state (0 offered, 1 declined,
/// 2 received) and whether they wait for the relay copy.
const SCHEMA_V2: &str = r#"
CREATE TABLE files (
    file_id     TEXT COLLATE "C" PRIMARY KEY,
    sender      TEXT COLLATE "C" NOT NULL,
    conv        TEXT COLLATE "C" NOT NULL,
    except_list TEXT NOT NULL,
    meta        BYTEA NOT NULL,
    size        BIGINT NOT NULL,
    chunk_size  BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    complete    BOOLEAN NOT NULL DEFAULT FALSE,
    p2p         BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX files_sender ON files(sender);
CREATE INDEX files_expires ON files(expires_ms);
CREATE TABLE file_recipients (
    file_id     TEXT COLLATE "C" NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
    user_name   TEXT COLLATE "C" NOT NULL,
    state       SMALLINT NOT NULL DEFAULT 0,
    wants_relay BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (file_id, user_name)
);
CREATE INDEX file_recipients_user ON file_recipients(user_name, state);
"#;

/// A synchronous PostgreSQL store: one connection, used from one thread at a time.
///
/// The client sits in a `RefCell` because the store's read methods take `&self` while every
/// query needs the client mutably; `PgDb` is `Send` (the store thread owns it) and not `Sync`.
pub struct PgDb {
    client: RefCell<Client>,
    key: DataKey,
    /// `Messages`' search key, conversation ids and prepared statements.
    msgs: messages::MessagesState,
    /// How to connect again when PostgreSQL closed the connection (a restart, a failover).
    config: postgres::Config,
    /// When the last attempt to connect again was made (at most one a second).
    last_reconnect: Option<Instant>,
    /// Told how long each batch of messages took to commit (the store thread takes it).
    on_commit: Option<CommitObserver>,
}

/// How long a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the store thread tries to connect again while PostgreSQL is unreachable.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDb").finish_non_exhaustive()
    }
}

/// PostgreSQL's errors as the store reports them: the SQLSTATE code, and the server's own
/// sentence (with its detail) or the client's (a closed connection, an unreachable server).
impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        if let Some(db) = e.as_db_error() {
            let mut message = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                message.push_str(": ");
                message.push_str(detail);
            }
            return StoreError::Postgres {
                code: Some(db.code().code().to_string()),
                message,
            };
        }
        let message = if e.is_closed() {
            "the connection to PostgreSQL is closed (the server stopped or the network failed); \
             nothing was stored by this operation"
                .to_string()
        } else {
            e.to_string()
        };
        StoreError::Postgres {
            code: None,
            message,
        }
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl PgDb {
    /// Connects with a libpq-style connection string (`host=/run/postgresql dbname=conclave`,
    /// or `postgresql://…`), sets `synchronous_commit = on` for the session, creates, upgrades
    /// or checks the schema, and checks that `key` is the data key this database was first
    /// opened with (the first connect records it).
    pub fn connect(config: &str, key: DataKey) -> Result<PgDb, StoreError> {
        let config: postgres::Config =
            config
                .parse()
                .map_err(|e: postgres::Error| StoreError::Postgres {
                    code: None,
                    message: format!("the PostgreSQL connection string is not valid: {e}"),
                })?;
        PgDb::connect_config(&config, key)
    }

    /// [`PgDb::connect`] with a parsed configuration (cluster mode's `--store`, with the
    /// password added from the environment or its file).
    pub fn connect_config(config: &postgres::Config, key: DataKey) -> Result<PgDb, StoreError> {
        let mut client = open_client(config)?;
        create_schema(&mut client, &key)?;
        Ok(PgDb {
            client: RefCell::new(client),
            msgs: messages::MessagesState::new(&key),
            key,
            config: config.clone(),
            last_reconnect: None,
            on_commit: None,
        })
    }

    /// Who is told how long each batch of messages took to commit.
    pub fn on_commit(&mut self, observer: CommitObserver) {
        self.on_commit = Some(observer);
    }

    /// When PostgreSQL closed the connection (it restarted, or a failover moved it), connects
    /// again, at most once a second; the operations in between fail with a clear error and
    /// nothing of them is stored. The statements prepared on the old connection are dropped.
    fn reconnect_if_closed(&mut self) {
        if !self.client.get_mut().is_closed() {
            return;
        }
        if self
            .last_reconnect
            .is_some_and(|at| at.elapsed() < RECONNECT_EVERY)
        {
            return;
        }
        self.last_reconnect = Some(Instant::now());
        match open_client(&self.config) {
            Ok(client) => {
                *self.client.get_mut() = client;
                self.msgs.connection_replaced();
                tracing::info!("connected to PostgreSQL again");
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL is still unreachable"),
        }
    }

    /// Whether the connection to PostgreSQL is open (it may still fail at the next statement).
    pub fn is_connected(&self) -> bool {
        !self.client.borrow().is_closed()
    }
}

/// Opens a connection with `synchronous_commit = on` for the session.
fn open_client(config: &postgres::Config) -> Result<Client, StoreError> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let mut client = config.connect(NoTls).map_err(|e| {
        let hosts = format!("{:?}", config.get_hosts());
        let inner = StoreError::from(e);
        StoreError::Postgres {
            code: None,
            message: format!(
                "could not connect to PostgreSQL at {hosts}: {inner}; is it running, and does \
                     the connection string name the right host, port, user and database?"
            ),
        }
    })?;
    client.batch_execute("SET synchronous_commit = on")?;
    Ok(client)
}

impl PgDb {
    /// The schema version stored in the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let mut client = self.client.borrow_mut();
        read_version(&mut client.transaction()?)
    }
}

fn read_version(tx: &mut Transaction<'_>) -> Result<i64, StoreError> {
    let exists: bool = tx
        .query_one("SELECT to_regclass('conclave_meta') IS NOT NULL", &[])?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    let row = tx.query_opt(
        "SELECT value FROM conclave_meta WHERE key = 'schema_version'",
        &[],
    )?;
    let Some(row) = row else { return Ok(0) };
    let value: String = row.try_get(0)?;
    value.parse().map_err(|_| StoreError::Postgres {
        code: None,
        message: format!("conclave_meta holds a schema version that is not a number: {value:?}"),
    })
}

/// Creates the schema in an empty database, brings an older one up to [`SCHEMA_VERSION`] or
/// checks a current one, and checks the data key, all in one transaction under an advisory
/// lock (a failed upgrade leaves the database as it was).
fn create_schema(client: &mut Client, key: &DataKey) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    let version = read_version(&mut tx)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found: version });
    }
    if version < 1 {
        tx.batch_execute(SCHEMA_V1)?;
    }
    if version < 2 {
        tx.batch_execute(SCHEMA_V2)?;
    }
    if version < 3 {
        tx.batch_execute(messages::SCHEMA_V3)?;
    }
    if version < 4 {
        // Chat, devices, end-to-end groups.
        tx.batch_execute(chat::SCHEMA)?;
        tx.batch_execute(devices::SCHEMA)?;
        tx.batch_execute(groups::SCHEMA)?;
    }
    if version < 5 {
        tx.batch_execute(SCHEMA_V5)?;
    }
    if version < 6 {
        tx.batch_execute(SCHEMA_V6)?;
        mark_commits(&mut tx, key)?;
    }
    if version < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO conclave_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&SCHEMA_VERSION.to_string()],
        )?;
    }
    // A wrong key must stop the server before it writes anything sealed under it.
    let check = tx.query_opt(
        "SELECT value FROM conclave_meta WHERE key = 'key_check'",
        &[],
    )?;
    match check {
        Some(row) => {
            let sealed = hex::decode(col::<String>(&row, 0)?).unwrap_or_default();
            if key.open(KEY_CHECK_AD, &sealed).ok().as_deref() != Some(KEY_CHECK_PLAIN) {
                return Err(StoreError::Postgres {
                    code: None,
                    message: "the data key does not match this database: it was first opened \
                              with another key (a wrong passphrase, or another node's data.key). \
                              Nothing was changed; start again with the right key"
                        .to_string(),
                });
            }
        }
        None => {
            tx.execute(
                "INSERT INTO conclave_meta (key, value) VALUES ('key_check', $1)",
                &[&hex::encode(key.seal(KEY_CHECK_AD, KEY_CHECK_PLAIN))],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Reads a column; a type that does not match the schema is an error, never a panic.
fn col<'a, T: postgres::types::FromSql<'a>>(
    r: &'a postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    Ok(r.try_get(i)?)
}

fn user_row(r: &postgres::Row) -> Result<UserRow, StoreError> {
    Ok(UserRow {
        name: col(r, 0)?,
        pw_hash: col(r, 1)?,
        admin: col(r, 2)?,
        created_ms: col(r, 3)?,
    })
}

impl Accounts for PgDb {
    fn create_user(&mut self, name: &str, pw_hash: &str, admin: bool) -> Result<(), StoreError> {
        let n = self.client.get_mut().execute(
            "INSERT INTO users (name, pw_hash, admin, created_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
            &[&name, &pw_hash, &admin, &now_ms()],
        )?;
        if n == 0 {
            return Err(StoreError::Exists);
        }
        Ok(())
    }

    fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        let row = self.client.borrow_mut().query_opt(
            "SELECT name, pw_hash, admin, created_ms FROM users WHERE name = $1",
            &[&name],
        )?;
        row.as_ref().map(user_row).transpose()
    }

    fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT name, pw_hash, admin, created_ms FROM users ORDER BY name",
            &[],
        )?;
        rows.iter().map(user_row).collect()
    }

    fn set_password(&mut self, name: &str, pw_hash: &str) -> Result<bool, StoreError> {
        Ok(self.client.get_mut().execute(
            "UPDATE users SET pw_hash = $2 WHERE name = $1",
            &[&name, &pw_hash],
        )? == 1)
    }

    fn set_admin(&mut self, name: &str, admin: bool) -> Result<bool, StoreError> {
        Ok(self.client.get_mut().execute(
            "UPDATE users SET admin = $2 WHERE name = $1",
            &[&name, &admin],
        )? == 1)
    }

    fn delete_user(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .client
            .get_mut()
            .execute("DELETE FROM users WHERE name = $1", &[&name])?
            == 1)
    }

    fn add_invite_code(&mut self, code_hash: &str) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO invite_codes (code_hash, created_ms) VALUES ($1, $2)",
            &[&code_hash, &now_ms()],
        )?;
        Ok(())
    }

    /// The code's row is locked by the `UPDATE` until the transaction ends, so of two nodes
    /// spending the same code at once, the second waits, then finds it spent (or free again
    /// if the first rolled back because the name was taken).
    fn register_with_code(
        &mut self,
        code_hash: &str,
        name: &str,
        pw_hash: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let spent = tx.execute(
            "UPDATE invite_codes SET used_by = $2 WHERE code_hash = $1 AND used_by IS NULL",
            &[&code_hash, &name],
        )?;
        if spent == 0 {
            return Ok(false);
        }
        let n = tx.execute(
            "INSERT INTO users (name, pw_hash, admin, created_ms) VALUES ($1, $2, FALSE, $3)
             ON CONFLICT (name) DO NOTHING",
            &[&name, &pw_hash, &now_ms()],
        )?;
        if n == 0 {
            // Dropping the transaction rolls it back: the code stays unspent.
            return Err(StoreError::Exists);
        }
        tx.commit()?;
        Ok(true)
    }
}

impl Rooms for PgDb {
    fn create_room(&mut self, room: &RoomRow) -> Result<(), StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let n = tx.execute(
            "INSERT INTO rooms (name, private, pw_hash, owner, created_ms, votekick)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
            &[
                &room.name,
                &room.private,
                &room.pw_hash,
                &room.owner,
                &now_ms(),
                &room.votekick,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Exists);
        }
        for m in &room.members {
            tx.execute(
                "INSERT INTO members (room, user_name, joined_ms) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&room.name, m, &now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn rooms(&self) -> Result<Vec<RoomRow>, StoreError> {
        let mut client = self.client.borrow_mut();
        // One snapshot for the rooms and their members, as one SQLite read would be.
        let mut tx = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let mut rooms: Vec<RoomRow> = tx
            .query(
                "SELECT name, private, pw_hash, owner, votekick FROM rooms ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(RoomRow {
                    name: col(r, 0)?,
                    private: col(r, 1)?,
                    pw_hash: col(r, 2)?,
                    owner: col(r, 3)?,
                    members: Vec::new(),
                    invited: Vec::new(),
                    votekick: col(r, 4)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        let index: std::collections::HashMap<String, usize> = rooms
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        for (table, invited) in [("members", false), ("room_invites", true)] {
            let rows = tx.query(
                &format!("SELECT room, user_name FROM {table} ORDER BY user_name"),
                &[],
            )?;
            for row in rows {
                let (room, user): (String, String) = (col(&row, 0)?, col(&row, 1)?);
                if let Some(&i) = index.get(&room) {
                    if invited {
                        rooms[i].invited.push(user);
                    } else {
                        rooms[i].members.push(user);
                    }
                }
            }
        }
        tx.commit()?;
        Ok(rooms)
    }

    fn add_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        let key = format!("r:{room}");
        let mut tx = self.client.get_mut().transaction()?;
        tx.execute(
            "INSERT INTO convs (key) VALUES ($1) ON CONFLICT (key) DO NOTHING",
            &[&key],
        )?;
        tx.execute(
            "INSERT INTO members (room, user_name, joined_ms) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            &[&room, &user, &now_ms()],
        )?;
        tx.execute(
            "DELETE FROM room_invites WHERE room = $1 AND user_name = $2",
            &[&room, &user],
        )?;
        tx.execute(
            "INSERT INTO acks (user_name, conv_id, seq) SELECT $1, id, last_seq FROM convs WHERE key = $2
             ON CONFLICT (user_name, conv_id) DO UPDATE SET seq = GREATEST(acks.seq, excluded.seq)",
            &[&user, &key],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn rooms_of_user(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT room FROM members WHERE user_name = $1 ORDER BY room",
            &[&user],
        )?;
        rows.iter().map(|r| col(r, 0)).collect()
    }

    fn remove_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "DELETE FROM members WHERE room = $1 AND user_name = $2",
            &[&room, &user],
        )?;
        Ok(())
    }

    fn add_room_ban(&mut self, room: &str, user: &str, until_ms: i64) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO room_bans (room, user_name, until_ms) VALUES ($1, $2, $3)
             ON CONFLICT (room, user_name) DO UPDATE SET until_ms = excluded.until_ms",
            &[&room, &user, &until_ms],
        )?;
        Ok(())
    }

    fn room_bans(&mut self, now_ms: i64) -> Result<Vec<(String, String, i64)>, StoreError> {
        let client = self.client.get_mut();
        client.execute("DELETE FROM room_bans WHERE until_ms <= $1", &[&now_ms])?;
        let rows = client.query(
            "SELECT room, user_name, until_ms FROM room_bans ORDER BY room, user_name",
            &[],
        )?;
        rows.iter()
            .map(|r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?)))
            .collect()
    }

    fn set_room_votekick(&mut self, room: &str, on: bool) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "UPDATE rooms SET votekick = $2 WHERE name = $1",
            &[&room, &on],
        )?;
        Ok(())
    }

    fn ensure_public_room(&mut self, name: &str) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO rooms (name, private, pw_hash, owner, created_ms)
             VALUES ($1, FALSE, NULL, NULL, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &now_ms()],
        )?;
        Ok(())
    }

    fn add_room_invite(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO room_invites (room, user_name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&room, &user],
        )?;
        Ok(())
    }
}

impl Moderation for PgDb {
    fn bans(&mut self, now_ms: i64) -> Result<Vec<Ban>, StoreError> {
        let client = self.client.get_mut();
        client.execute(
            "DELETE FROM bans WHERE until_ms IS NOT NULL AND until_ms <= $1",
            &[&now_ms],
        )?;
        let rows = client.query(
            "SELECT kind, target, until_ms, reason, by_user, created_ms FROM bans
             ORDER BY kind, target",
            &[],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let (kind, target): (String, String) = (col(&r, 0)?, col(&r, 1)?);
            let target = match kind.as_str() {
                "user" => BanTarget::User(target),
                _ => match target.parse() {
                    Ok(net) => BanTarget::Net(net),
                    Err(_) => continue,
                },
            };
            out.push(Ban {
                target,
                until_ms: col(&r, 2)?,
                reason: col(&r, 3)?,
                by: col(&r, 4)?,
                created_ms: col(&r, 5)?,
            });
        }
        Ok(out)
    }

    fn add_ban(&mut self, ban: &Ban) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO bans (kind, target, until_ms, reason, by_user, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (kind, target) DO UPDATE SET until_ms = excluded.until_ms,
                 reason = excluded.reason, by_user = excluded.by_user,
                 created_ms = excluded.created_ms",
            &[
                &ban.target.kind(),
                &ban.target.value(),
                &ban.until_ms,
                &ban.reason,
                &ban.by,
                &ban.created_ms,
            ],
        )?;
        Ok(())
    }

    fn remove_ban(&mut self, target: &BanTarget) -> Result<bool, StoreError> {
        Ok(self.client.get_mut().execute(
            "DELETE FROM bans WHERE kind = $1 AND target = $2",
            &[&target.kind(), &target.value()],
        )? == 1)
    }

    fn ip_rules(&self) -> Result<(Vec<ipnet::IpNet>, Vec<ipnet::IpNet>), StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT action, cidr FROM ip_rules ORDER BY created_ms, added",
            &[],
        )?;
        let (mut allow, mut deny) = (Vec::new(), Vec::new());
        for r in rows {
            let (action, cidr): (String, String) = (col(&r, 0)?, col(&r, 1)?);
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

    fn set_ip_rule(
        &mut self,
        action: &str,
        net: &ipnet::IpNet,
        add: bool,
    ) -> Result<bool, StoreError> {
        let client = self.client.get_mut();
        let cidr = net.to_string();
        let n = if add {
            client.execute(
                "INSERT INTO ip_rules (action, cidr, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (action, cidr) DO NOTHING",
                &[&action, &cidr, &now_ms()],
            )?
        } else {
            client.execute(
                "DELETE FROM ip_rules WHERE action = $1 AND cidr = $2",
                &[&action, &cidr],
            )?
        };
        Ok(n == 1)
    }
}

/// The columns of a file row, in the order [`PgDb::file_row`] reads them.
const FILE_COLUMNS: &str = "f.file_id, f.sender, f.conv, f.except_list, f.meta, f.size, \
                            f.chunk_size, f.created_ms, f.expires_ms, f.complete, f.p2p";

impl PgDb {
    fn file_row(&self, r: &postgres::Row) -> Result<FileRow, StoreError> {
        let file_id: String = col(r, 0)?;
        let except: String = col(r, 3)?;
        let sealed: Vec<u8> = col(r, 4)?;
        let (name, sha256) = open_file_meta(&self.key, &file_id, &sealed)?;
        let conv: String = col(r, 2)?;
        let conv: Conv = conv_from_key(&conv);
        Ok(FileRow {
            sender: col(r, 1)?,
            conv,
            except: except
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            name,
            sha256,
            size: col::<i64>(r, 5)?.max(0) as u64,
            chunk_size: u32::try_from(col::<i64>(r, 6)?).unwrap_or(0),
            created_ms: col(r, 7)?,
            expires_ms: col(r, 8)?,
            complete: col(r, 9)?,
            p2p: col(r, 10)?,
            file_id,
        })
    }
}

fn state_from_i16(v: i16) -> RecipientState {
    match v {
        1 => RecipientState::Declined,
        2 => RecipientState::Received,
        _ => RecipientState::Offered,
    }
}

impl FileMeta for PgDb {
    fn create_file(&mut self, row: &FileRow, recipients: &[String]) -> Result<(), StoreError> {
        let sealed = seal_file_meta(&self.key, row)?;
        let mut tx = self.client.get_mut().transaction()?;
        tx.execute(
            "INSERT INTO files (file_id, sender, conv, except_list, meta, size, chunk_size,
                                created_ms, expires_ms, complete, p2p)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &row.file_id,
                &row.sender,
                &conv_key(&row.conv),
                &row.except.join(","),
                &sealed,
                // As SQLite stores it (a size past i64::MAX reads back as 0).
                &(row.size as i64),
                &i64::from(row.chunk_size),
                &row.created_ms,
                &row.expires_ms,
                &row.complete,
                &row.p2p,
            ],
        )?;
        for user in recipients {
            tx.execute(
                "INSERT INTO file_recipients (file_id, user_name) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&row.file_id, user],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn file(&self, file_id: &str) -> Result<Option<FileRow>, StoreError> {
        let row = self.client.borrow_mut().query_opt(
            &format!("SELECT {FILE_COLUMNS} FROM files f WHERE f.file_id = $1"),
            &[&file_id],
        )?;
        row.map(|r| self.file_row(&r)).transpose()
    }

    fn file_recipient(
        &self,
        file_id: &str,
        user: &str,
    ) -> Result<Option<RecipientState>, StoreError> {
        let row = self.client.borrow_mut().query_opt(
            "SELECT state FROM file_recipients WHERE file_id = $1 AND user_name = $2",
            &[&file_id, &user],
        )?;
        row.map(|r| col::<i16>(&r, 0).map(state_from_i16))
            .transpose()
    }

    fn set_file_recipient(
        &mut self,
        file_id: &str,
        user: &str,
        state: RecipientState,
    ) -> Result<bool, StoreError> {
        Ok(self.client.get_mut().execute(
            "UPDATE file_recipients SET state = $3 WHERE file_id = $1 AND user_name = $2",
            &[&file_id, &user, &(state as i16)],
        )? > 0)
    }

    fn want_relay(&mut self, file_id: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self.client.get_mut().execute(
            "UPDATE file_recipients SET wants_relay = TRUE WHERE file_id = $1 AND user_name = $2",
            &[&file_id, &user],
        )? > 0)
    }

    /// As `Db` does: the recipients still offered the file (neither declined nor received),
    /// whether or not they called `want_relay`. Lists here come in a fixed order (names or
    /// ids, bytewise) where `Db` promises none.
    fn complete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        tx.execute(
            "UPDATE files SET complete = TRUE WHERE file_id = $1",
            &[&file_id],
        )?;
        let rows = tx.query(
            "SELECT user_name FROM file_recipients WHERE file_id = $1 AND state = 0
             ORDER BY user_name",
            &[&file_id],
        )?;
        tx.commit()?;
        rows.iter().map(|r| col(r, 0)).collect()
    }

    fn pending_files(
        &self,
        user: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<FileRow>, StoreError> {
        let rows = self.client.borrow_mut().query(
            &format!(
                "SELECT {FILE_COLUMNS} FROM files f JOIN file_recipients r ON r.file_id = f.file_id
                 WHERE r.user_name = $1 AND r.state = 0 AND f.expires_ms > $2
                 ORDER BY f.created_ms, f.file_id LIMIT $3"
            ),
            &[&user, &now_ms, &i64::from(limit)],
        )?;
        rows.iter().map(|r| self.file_row(r)).collect()
    }

    fn file_bytes_of(&self, user: &str, now_ms: i64) -> Result<u64, StoreError> {
        // sum() of BIGINT is NUMERIC; back to BIGINT as SQLite's integer sum.
        let row = self.client.borrow_mut().query_one(
            "SELECT coalesce(sum(size), 0)::BIGINT FROM files WHERE sender = $1 AND expires_ms > $2",
            &[&user, &now_ms],
        )?;
        Ok(col::<i64>(&row, 0)?.max(0) as u64)
    }

    fn expire_files(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        // The recipients go with their file (ON DELETE CASCADE).
        let rows = self.client.get_mut().query(
            "DELETE FROM files WHERE expires_ms <= $1 RETURNING file_id",
            &[&now_ms],
        )?;
        let mut ids: Vec<String> = rows.iter().map(|r| col(r, 0)).collect::<Result<_, _>>()?;
        // In id order (`Db` promises no order; a fixed one is one of its).
        ids.sort();
        Ok(ids)
    }

    fn delete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError> {
        let mut tx = self.client.get_mut().transaction()?;
        let rows = tx.query(
            "SELECT user_name FROM file_recipients WHERE file_id = $1 AND state = $2
             ORDER BY user_name",
            &[&file_id, &(RecipientState::Offered as i16)],
        )?;
        let waiting = rows.iter().map(|r| col(r, 0)).collect::<Result<_, _>>()?;
        tx.execute("DELETE FROM files WHERE file_id = $1", &[&file_id])?;
        tx.commit()?;
        Ok(waiting)
    }

    fn file_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client
            .borrow_mut()
            .query("SELECT file_id FROM files ORDER BY file_id", &[])?;
        rows.iter().map(|r| col(r, 0)).collect()
    }
}

/// The store thread runs on `PgDb` in cluster mode: every commit is durable when it returns
/// (`synchronous_commit = on`), so there is no file to sync and no checkpoint to run; between
/// operations it connects again if PostgreSQL closed the connection.
impl Backend for PgDb {
    fn durability(&mut self) -> Durability {
        Durability::AtCommit
    }

    fn changes(&self) -> u64 {
        // Only a backend that syncs a file after its commits needs to know what wrote.
        0
    }

    fn maintain(&mut self, _waiting: bool) {
        self.reconnect_if_closed();
    }

    fn close(&mut self) {}

    fn take_commit_observer(&mut self) -> Option<CommitObserver> {
        self.on_commit.take()
    }

    fn audit_copy(&mut self, node: &str, line: &str) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO audit_copy (node, stored_ms, line) VALUES ($1, $2, $3)",
            &[&node, &now_ms(), &line],
        )?;
        Ok(())
    }
}

impl PgDb {
    /// The audit records `node` copied into the store, oldest first, at most `limit`.
    pub fn audit_lines(&self, node: &str, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT line FROM audit_copy WHERE node = $1 ORDER BY id LIMIT $2",
            &[&node, &limit],
        )?;
        rows.iter().map(|r| col(r, 0)).collect()
    }
}
