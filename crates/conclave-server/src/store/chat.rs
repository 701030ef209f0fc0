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
//!
//! Replies, edits, deletes and reactions in the store.
//!
//! An act (edit, delete, reaction) is stored as a message of its own, so catch-up delivers it
//! in order like any message. In a server-encrypted conversation the store also applies it
//! to its target in the same transaction: an edit reseals the target's body with the new text
//! and replaces its search tokens, a delete replaces the body with nothing and drops its
//! tokens, a reaction updates the target's sealed reaction list. Text an act made obsolete is
//! removed too: an edit empties the earlier edits of the same message, a delete empties every
//! act on it. With `secure_delete` on, SQLite overwrites what it frees, so none of the old
//! ciphertext or tokens stays in the file. In an end-to-end conversation the bodies are MLS
//! ciphertext: the store keeps the reference (for the rules) and applies nothing.

use conclave_proto::chat::{ActKind, ActsOn, Extra, MsgState, Reaction, Refs, apply_reaction};
use conclave_proto::{Body, Conv, Message};
use rusqlite::{OptionalExtension, params};

use super::{Db, StoreError, conv_from_key, seal_ad};
use crate::at_rest::DataKey;

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

/// What a room's topic is sealed with (the PostgreSQL store seals it the same way).
pub(crate) fn topic_ad(room: &str) -> Vec<u8> {
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

/// Schema version 4 adds these columns and indexes.
pub(super) const ACTS_SCHEMA: &str = "
ALTER TABLE messages ADD COLUMN reply_to TEXT;
ALTER TABLE messages ADD COLUMN act_on TEXT;
ALTER TABLE messages ADD COLUMN act_kind INTEGER;
ALTER TABLE messages ADD COLUMN act_applied INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edited_ms INTEGER;
ALTER TABLE messages ADD COLUMN edits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN reactions BLOB;
CREATE INDEX messages_act_on ON messages(act_on) WHERE act_on IS NOT NULL;
CREATE INDEX messages_reply_to ON messages(reply_to) WHERE reply_to IS NOT NULL;
";

/// How often at most the search index is merged to drop the tokens of edited and deleted
/// messages for good (an FTS5 delete leaves the old entry in its segment until a merge).
pub const INDEX_OPTIMIZE_EVERY_MS: i64 = 2_000;

pub(super) fn kind_code(k: ActKind) -> i64 {
    match k {
        ActKind::Edit => 1,
        ActKind::Delete => 2,
        ActKind::React => 3,
        ActKind::Unreact => 4,
    }
}

pub(crate) fn kind_of(code: i64) -> Option<ActKind> {
    Some(match code {
        1 => ActKind::Edit,
        2 => ActKind::Delete,
        3 => ActKind::React,
        4 => ActKind::Unreact,
        _ => return None,
    })
}

pub(crate) fn reactions_ad(msg_id: &str) -> Vec<u8> {
    format!("conclave-reactions-v1|{msg_id}").into_bytes()
}

/// Whether a body is an end-to-end (MLS) payload, which the server cannot apply.
pub(crate) fn is_mls(body: &Body) -> bool {
    body.content_type.starts_with("application/mls-")
}

/// What the rules need to know of a message someone acts on or replies to.
#[derive(Debug, Clone)]
pub struct TargetRow {
    pub msg_id: String,
    pub conv: Conv,
    pub from: String,
    pub seq: u64,
    pub ts_ms: i64,
    /// Room members the message was not for (blockcast).
    pub except: Vec<String>,
    /// The message is itself an act (one cannot edit or react to an edit).
    pub is_act: bool,
    pub deleted: bool,
    pub edits: u32,
    /// Reactions on it: (emoji, user) pairs (server-encrypted conversations), or reactions
    /// minus their withdrawals (end-to-end, where the server sees only the kind of act).
    pub reactions: usize,
}

/// The columns of a stored row that become a message's [`Extra`].
pub(crate) struct ExtraCols {
    pub reply_to: Option<String>,
    pub act_on: Option<String>,
    pub act_kind: Option<i64>,
    pub edited_ms: Option<i64>,
    pub edits: i64,
    pub deleted: bool,
    pub reactions: Option<Vec<u8>>,
}

/// The select list for [`ExtraCols`], in order.
pub(super) const EXTRA_COLS: &str =
    "reply_to, act_on, act_kind, edited_ms, edits, deleted, reactions";

/// A stored message as the readers of `messages` select it (`msg_id, seq, sender, ts_ms, body,`
/// then [`EXTRA_COLS`]): id, sequence, sender, time, sealed body, the extra columns.
pub(super) type StoredRow = (String, i64, String, i64, Vec<u8>, ExtraCols);

/// Reads a [`StoredRow`].
pub(super) fn read_stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        ExtraCols::read(r, 5)?,
    ))
}

impl ExtraCols {
    /// Reads the [`EXTRA_COLS`] starting at column `i`.
    pub fn read(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<ExtraCols> {
        Ok(ExtraCols {
            reply_to: r.get(i)?,
            act_on: r.get(i + 1)?,
            act_kind: r.get(i + 2)?,
            edited_ms: r.get(i + 3)?,
            edits: r.get(i + 4)?,
            deleted: r.get::<_, i64>(i + 5)? != 0,
            reactions: r.get(i + 6)?,
        })
    }
}

impl Db {
    /// The message `msg_id` as the rules need it, if it exists and `viewer` was not left out
    /// of it (blockcast). Whether `viewer` belongs to its conversation is the caller's check.
    pub fn target(&mut self, msg_id: &str, viewer: &str) -> Result<Option<TargetRow>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT m.gseq, m.seq, m.sender, m.ts_ms, m.except_list, m.act_on, m.deleted,
                        m.edits, m.reactions, c.key
                 FROM messages m JOIN convs c ON c.id = m.conv_id WHERE m.msg_id = ?1",
            )?
            .query_row([msg_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)? != 0,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<Vec<u8>>>(8)?,
                    r.get::<_, String>(9)?,
                ))
            })
            .optional()?;
        let Some((_gseq, seq, from, ts_ms, except, act_on, deleted, edits, sealed, key)) = row
        else {
            return Ok(None);
        };
        let except: Vec<String> = except
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if except.iter().any(|e| e == viewer) {
            return Ok(None);
        }
        let reactions = match sealed {
            Some(s) => conclave_proto::chat::reaction_count(&self.open_reactions(msg_id, &s)?),
            None => {
                // End-to-end: count the acts the server saw.
                let n: i64 = self
                    .conn
                    .prepare_cached(
                        "SELECT coalesce(sum(CASE act_kind WHEN 3 THEN 1 WHEN 4 THEN -1 ELSE 0 END), 0)
                         FROM messages WHERE act_on = ?1 AND act_applied = 0",
                    )?
                    .query_row([msg_id], |r| r.get(0))?;
                n.max(0) as usize
            }
        };
        Ok(Some(TargetRow {
            msg_id: msg_id.to_string(),
            conv: conv_from_key(&key),
            from,
            seq: seq as u64,
            ts_ms,
            except,
            is_act: act_on.is_some(),
            deleted,
            edits: edits.max(0) as u32,
            reactions,
        }))
    }

    fn open_reactions(&self, msg_id: &str, sealed: &[u8]) -> Result<Vec<Reaction>, StoreError> {
        open_reactions(&self.key, msg_id, sealed)
    }

    fn seal_reactions(&self, msg_id: &str, reactions: &[Reaction]) -> Vec<u8> {
        let list: Vec<(&str, &[String])> = reactions
            .iter()
            .map(|r| (r.emoji.as_str(), r.users.as_slice()))
            .collect();
        let plain = postcard::to_stdvec(&list).unwrap_or_default();
        self.key.seal(&reactions_ad(msg_id), &plain)
    }

    /// The [`Extra`] of a stored row; `with_state` for history (the message's current state).
    pub(super) fn extra_of(
        &self,
        msg_id: &str,
        cols: ExtraCols,
        with_state: bool,
    ) -> Result<Option<Box<Extra>>, StoreError> {
        extra_of(&self.key, msg_id, cols, with_state)
    }

    /// Applies an act stored at `act_gseq` (same transaction) to its target in a
    /// server-encrypted conversation. A target that is gone or deleted meanwhile is left
    /// alone. Returns the target's global sequence and new search tokens when its text changed.
    pub(super) fn apply_act(
        &mut self,
        act_gseq: i64,
        conv_key: &str,
        from: &str,
        act: &ActsOn,
        body: &Body,
        ts_ms: i64,
    ) -> Result<Option<(i64, Option<String>)>, StoreError> {
        let target = self
            .conn
            .prepare_cached(
                "SELECT m.gseq, m.seq, m.deleted, m.reactions FROM messages m
                 JOIN convs c ON c.id = m.conv_id
                 WHERE m.msg_id = ?1 AND c.key = ?2 AND m.act_on IS NULL",
            )?
            .query_row(params![act.msg_id, conv_key], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)? != 0,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .optional()?;
        let Some((gseq, seq, deleted, sealed_reactions)) = target else {
            return Ok(None);
        };
        if deleted {
            return Ok(None);
        }
        let ad = seal_ad(&act.msg_id, conv_key, seq as u64);
        match act.kind {
            ActKind::Edit => {
                let plain = postcard::to_stdvec(body).unwrap_or_default();
                let sealed = self.key.seal(&ad, &plain);
                self.conn
                    .prepare_cached(
                        "UPDATE messages SET body = ?2, edited_ms = ?3, edits = edits + 1
                         WHERE gseq = ?1",
                    )?
                    .execute(params![gseq, sealed, ts_ms])?;
                // The earlier edits' text is obsolete: empty their bodies.
                self.empty_acts(&act.msg_id, conv_key, Some(act_gseq), Some(1))?;
                self.drop_tokens(gseq)?;
                Ok(Some((gseq, self.tokens_of(body))))
            }
            ActKind::Delete => {
                let plain = postcard::to_stdvec(&Body::text("")).unwrap_or_default();
                let sealed = self.key.seal(&ad, &plain);
                self.conn
                    .prepare_cached(
                        "UPDATE messages SET body = ?2, deleted = 1, reactions = NULL
                         WHERE gseq = ?1",
                    )?
                    .execute(params![gseq, sealed])?;
                self.empty_acts(&act.msg_id, conv_key, Some(act_gseq), None)?;
                self.drop_tokens(gseq)?;
                Ok(Some((gseq, None)))
            }
            ActKind::React | ActKind::Unreact => {
                let Some(emoji) = body.as_text() else {
                    return Ok(None);
                };
                let mut list = match &sealed_reactions {
                    Some(s) => self.open_reactions(&act.msg_id, s)?,
                    None => Vec::new(),
                };
                if apply_reaction(&mut list, emoji, from, act.kind == ActKind::React) {
                    let sealed = if list.is_empty() {
                        None
                    } else {
                        Some(self.seal_reactions(&act.msg_id, &list))
                    };
                    self.conn
                        .prepare_cached("UPDATE messages SET reactions = ?2 WHERE gseq = ?1")?
                        .execute(params![gseq, sealed])?;
                }
                Ok(None)
            }
        }
    }

    /// Empties the bodies of the acts on `target` (of `kind` only, when given), except the
    /// one at `keep`.
    fn empty_acts(
        &mut self,
        target: &str,
        conv_key: &str,
        keep: Option<i64>,
        kind: Option<i64>,
    ) -> Result<(), StoreError> {
        let rows: Vec<(i64, String, i64)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT gseq, msg_id, seq FROM messages
                 WHERE act_on = ?1 AND act_applied = 1 AND (?2 IS NULL OR act_kind = ?2)",
            )?;
            st.query_map(params![target, kind], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?
        };
        let empty = postcard::to_stdvec(&Body::text("")).unwrap_or_default();
        for (gseq, msg_id, seq) in rows {
            if Some(gseq) == keep && kind.is_some() {
                continue;
            }
            let sealed = self
                .key
                .seal(&seal_ad(&msg_id, conv_key, seq as u64), &empty);
            self.conn
                .prepare_cached("UPDATE messages SET body = ?2 WHERE gseq = ?1")?
                .execute(params![gseq, sealed])?;
        }
        Ok(())
    }

    /// Removes a message's search tokens, written or waiting.
    fn drop_tokens(&mut self, gseq: i64) -> Result<(), StoreError> {
        self.pending_index.retain(|(g, _)| *g != gseq);
        let n = self
            .conn
            .prepare_cached("DELETE FROM search_index WHERE rowid = ?1")?
            .execute([gseq])?;
        if n > 0 {
            self.index_removed = true;
        }
        Ok(())
    }

    /// A thread: the message `root` and then its replies (oldest first, after `after`, at
    /// most `limit`), with their current state. `None` when `root` does not exist or was not
    /// for `viewer`.
    pub fn thread(
        &mut self,
        root: &str,
        viewer: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        let Some(t) = self.target(root, viewer)? else {
            return Ok(None);
        };
        let key = super::conv_key(&t.conv);
        let mut out = Vec::new();
        let sql = format!(
            "SELECT msg_id, seq, sender, ts_ms, body, {EXTRA_COLS} FROM messages
             WHERE (msg_id = ?1 OR (reply_to = ?1 AND seq > ?2))
               AND act_on IS NULL
               AND (except_list IS NULL OR instr(except_list, ',' || ?3 || ',') = 0)
             ORDER BY seq LIMIT ?4"
        );
        let after = after.map(|a| a.min(i64::MAX as u64) as i64).unwrap_or(0);
        let rows: Vec<StoredRow> = {
            let mut st = self.conn.prepare_cached(&sql)?;
            st.query_map(
                params![root, after, viewer, i64::from(limit) + 1],
                read_stored,
            )?
            .collect::<Result<_, _>>()?
        };
        let mut bytes = 0usize;
        for (msg_id, seq, from, ts_ms, sealed, cols) in rows {
            let body = self.open_body(&msg_id, &key, seq, &sealed)?;
            bytes += body.data.len() + super::MESSAGE_OVERHEAD_BYTES;
            if !out.is_empty() && bytes > conclave_proto::MAX_PAGE_BYTES {
                break;
            }
            let extra = self.extra_of(&msg_id, cols, true)?;
            out.push(Message {
                msg_id,
                conv: t.conv.clone(),
                from,
                seq: seq as u64,
                ts_ms,
                body,
                extra,
            });
        }
        Ok(Some(out))
    }
}

/// A message's reactions, opened (sealed under [`reactions_ad`]).
pub(crate) fn open_reactions(
    key: &DataKey,
    msg_id: &str,
    sealed: &[u8],
) -> Result<Vec<Reaction>, StoreError> {
    let plain = key
        .open(&reactions_ad(msg_id), sealed)
        .map_err(|_| StoreError::Corrupt)?;
    let list: Vec<(String, Vec<String>)> =
        postcard::from_bytes(&plain).map_err(|_| StoreError::Corrupt)?;
    Ok(list
        .into_iter()
        .map(|(emoji, users)| Reaction { emoji, users })
        .collect())
}

/// The [`Extra`] of a stored row; `with_state` for history (the message's current state).
/// Both stores build it here from the same columns.
pub(crate) fn extra_of(
    key: &DataKey,
    msg_id: &str,
    cols: ExtraCols,
    with_state: bool,
) -> Result<Option<Box<Extra>>, StoreError> {
    let acts_on = match (cols.act_on, cols.act_kind.and_then(kind_of)) {
        (Some(id), Some(kind)) => Some(ActsOn { msg_id: id, kind }),
        _ => None,
    };
    let state = if with_state && (cols.edits > 0 || cols.deleted || cols.reactions.is_some()) {
        let reactions = match &cols.reactions {
            Some(s) if !cols.deleted => open_reactions(key, msg_id, s)?,
            _ => Vec::new(),
        };
        Some(MsgState {
            edited_ms: cols.edited_ms,
            edits: cols.edits.max(0) as u32,
            deleted: cols.deleted,
            reactions,
        })
    } else {
        None
    };
    if cols.reply_to.is_none() && acts_on.is_none() && state.is_none() {
        return Ok(None);
    }
    Ok(Some(Box::new(Extra {
        reply_to: cols.reply_to,
        acts_on,
        state,
    })))
}

/// The refs a stored act or reply carries, for the insert.
pub(crate) fn columns(refs: Option<&Refs>) -> (Option<&str>, Option<&str>, Option<i64>) {
    match refs {
        None => (None, None, None),
        Some(r) => (
            r.reply_to.as_deref(),
            r.acts_on.as_ref().map(|a| a.msg_id.as_str()),
            r.acts_on.as_ref().map(|a| kind_code(a.kind)),
        ),
    }
}
