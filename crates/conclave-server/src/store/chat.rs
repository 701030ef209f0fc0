//! Everyday chat's stored presence (issue #20, part B): room topics, display names, whether an
//! account shares its read markers, and the read markers themselves. Typing and away are
//! never stored.
//!
//! These tables are created if absent at every open (`CREATE TABLE IF NOT EXISTS`) rather
//! than by a schema version: they are independent of every other table's shape, so a data
//! directory of any version gains them without a migration step, and an older build that
//! opens it ignores them.
//!
//! A topic is sealed with the data key like a message body (it is text people write; it may
//! say more than a room name). Display names are account metadata, stored like account
//! names; read markers are numbers.

use rusqlite::{OptionalExtension, params};

use super::{Db, StoreError};

pub(super) const CHAT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS room_topics (
    room  TEXT PRIMARY KEY REFERENCES rooms(name) ON DELETE CASCADE,
    topic BLOB NOT NULL,
    by    TEXT NOT NULL,
    ts_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profiles (
    user         TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    display_name TEXT,
    share_reads  INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_markers (
    user  TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    conv  TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
";

/// What the server loads at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatRows {
    /// Room → topic.
    pub topics: Vec<(String, String)>,
    /// User → display name.
    pub display_names: Vec<(String, String)>,
    /// Accounts that keep their read markers to themselves.
    pub private_reads: Vec<String>,
}

/// What moving a read marker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMoved {
    /// The marker is now at the given sequence number.
    Moved,
    /// It was already there or further on: nothing changed.
    Unchanged,
    /// The conversation has no message with that number yet (its newest is this one).
    Beyond { last_seq: u64 },
}

fn topic_ad(room: &str) -> Vec<u8> {
    format!("conclave-topic-v1:{room}").into_bytes()
}

impl Db {
    pub(super) fn create_chat_tables(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        conn.execute_batch(CHAT_SCHEMA)
    }

    /// Topics, display names and privacy choices, for the server's memory.
    pub fn chat_load(&self) -> Result<ChatRows, StoreError> {
        let mut rows = ChatRows::default();
        let sealed: Vec<(String, Vec<u8>)> = {
            let mut st = self.conn.prepare("SELECT room, topic FROM room_topics")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        for (room, topic) in sealed {
            let plain = self
                .key
                .open(&topic_ad(&room), &topic)
                .map_err(|_| StoreError::Corrupt)?;
            let text = String::from_utf8(plain).map_err(|_| StoreError::Corrupt)?;
            rows.topics.push((room, text));
        }
        let mut st = self.conn.prepare(
            "SELECT user, display_name, share_reads FROM profiles
             WHERE display_name IS NOT NULL OR share_reads = 0",
        )?;
        let profiles = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })?;
        for p in profiles {
            let (user, name, share) = p?;
            if let Some(name) = name {
                rows.display_names.push((user.clone(), name));
            }
            if !share {
                rows.private_reads.push(user);
            }
        }
        Ok(rows)
    }

    /// Sets a room's topic; an empty one removes it.
    pub fn set_topic(
        &mut self,
        room: &str,
        topic: &str,
        by: &str,
        ts_ms: i64,
    ) -> Result<(), StoreError> {
        if topic.is_empty() {
            self.conn
                .execute("DELETE FROM room_topics WHERE room = ?1", [room])?;
        } else {
            let sealed = self.key.seal(&topic_ad(room), topic.as_bytes());
            self.conn.execute(
                "INSERT INTO room_topics (room, topic, by, ts_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(room) DO UPDATE SET topic = ?2, by = ?3, ts_ms = ?4",
                params![room, sealed, by, ts_ms],
            )?;
        }
        Ok(())
    }

    pub fn set_display_name(&mut self, user: &str, name: Option<&str>) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO profiles (user, display_name) VALUES (?1, ?2)
             ON CONFLICT(user) DO UPDATE SET display_name = ?2",
            params![user, name],
        )?;
        Ok(())
    }

    pub fn set_share_reads(&mut self, user: &str, share: bool) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO profiles (user, share_reads) VALUES (?1, ?2)
             ON CONFLICT(user) DO UPDATE SET share_reads = ?2",
            params![user, share],
        )?;
        Ok(())
    }

    /// Moves `user`'s read marker in conversation `conv` (its storage key) forward to `seq`.
    pub fn set_read(
        &mut self,
        user: &str,
        conv: &str,
        seq: u64,
        ts_ms: i64,
    ) -> Result<ReadMoved, StoreError> {
        let last: i64 = self
            .conn
            .query_row("SELECT last_seq FROM convs WHERE key = ?1", [conv], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let last = u64::try_from(last).unwrap_or(0);
        if seq > last {
            return Ok(ReadMoved::Beyond { last_seq: last });
        }
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let changed = self.conn.execute(
            "INSERT INTO read_markers (user, conv, seq, ts_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(conv, user) DO UPDATE SET seq = ?3, ts_ms = ?4 WHERE seq < ?3",
            params![user, conv, seq, ts_ms],
        )?;
        Ok(if changed > 0 {
            ReadMoved::Moved
        } else {
            ReadMoved::Unchanged
        })
    }

    /// Every read marker of a conversation (the caller leaves out the private ones).
    pub fn read_markers(
        &self,
        conv: &str,
    ) -> Result<Vec<conclave_proto::chat::ReadMarker>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT user, seq, ts_ms FROM read_markers WHERE conv = ?1 ORDER BY user")?;
        let rows = st.query_map([conv], |r| {
            Ok(conclave_proto::chat::ReadMarker {
                user: r.get(0)?,
                seq: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                ts_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
