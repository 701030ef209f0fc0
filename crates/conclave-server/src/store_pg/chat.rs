//! [`Chat`] on PostgreSQL: room topics (sealed under the data key with the same additional
//! data as `Db`'s, [`topic_ad`]), display names, whether an account shares its read markers,
//! the read markers; and what reads the messages table: the target of an act or reply, and
//! threads.
//!
//! `target` and `thread` read the `messages` and `convs` tables of `Messages` (schema version
//! 3, `store_pg::messages`), whose columns are SQLite's: `messages(conv_id, seq, msg_id, sender,
//! ts_ms, body, except_list, reply_to, act_on, act_kind, act_applied, edited_ms, edits,
//! deleted, reactions)`, the flags `BOOLEAN`, the numbers `BIGINT`.

use conclave_proto::Message;
use conclave_proto::chat::ReadMarker;

use super::{PgDb, col};
use crate::store::{
    Chat, ChatRows, ExtraCols, MESSAGE_OVERHEAD_BYTES, ReadMoved, StoreError, TargetRow,
    conv_from_key, conv_key, extra_of, open_body, open_reactions, topic_ad,
};

/// Schema version 4, part one: topics, profiles and read markers, as SQLite's `chat` tables
/// (`user` is a reserved word in PostgreSQL: the columns are `user_name`, `by_user`).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE room_topics (
    room    TEXT COLLATE "C" PRIMARY KEY REFERENCES rooms(name) ON DELETE CASCADE,
    topic   BYTEA NOT NULL,
    by_user TEXT NOT NULL,
    ts_ms   BIGINT NOT NULL
);
CREATE TABLE profiles (
    user_name    TEXT COLLATE "C" PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    display_name TEXT,
    share_reads  BOOLEAN NOT NULL DEFAULT TRUE
);
CREATE TABLE read_markers (
    user_name TEXT COLLATE "C" NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    conv      TEXT COLLATE "C" NOT NULL,
    seq       BIGINT NOT NULL,
    ts_ms     BIGINT NOT NULL,
    PRIMARY KEY (conv, user_name)
);
"#;

/// The [`ExtraCols`] as PostgreSQL selects them (prefixed with `m.`), in their order.
const EXTRA_COLS: &str =
    "m.reply_to, m.act_on, m.act_kind, m.edited_ms, m.edits, m.deleted, m.reactions";

fn extra_cols(r: &postgres::Row, i: usize) -> Result<ExtraCols, StoreError> {
    Ok(ExtraCols {
        reply_to: col(r, i)?,
        act_on: col(r, i + 1)?,
        act_kind: col(r, i + 2)?,
        edited_ms: col(r, i + 3)?,
        edits: col(r, i + 4)?,
        deleted: col(r, i + 5)?,
        reactions: col(r, i + 6)?,
    })
}

impl Chat for PgDb {
    /// In the order `Db` gives them: topics by room, profiles by account.
    fn chat_load(&self) -> Result<ChatRows, StoreError> {
        let mut client = self.client.borrow_mut();
        // One snapshot, as one SQLite read would be.
        let mut tx = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let mut rows = ChatRows::default();
        for r in tx.query("SELECT room, topic FROM room_topics ORDER BY room", &[])? {
            let (room, sealed): (String, Vec<u8>) = (col(&r, 0)?, col(&r, 1)?);
            let plain = self
                .key
                .open(&topic_ad(&room), &sealed)
                .map_err(|_| StoreError::Corrupt)?;
            let text = String::from_utf8(plain).map_err(|_| StoreError::Corrupt)?;
            rows.topics.push((room, text));
        }
        for r in tx.query(
            "SELECT user_name, display_name, share_reads FROM profiles
             WHERE display_name IS NOT NULL OR NOT share_reads ORDER BY user_name",
            &[],
        )? {
            let (user, name, share): (String, Option<String>, bool) =
                (col(&r, 0)?, col(&r, 1)?, col(&r, 2)?);
            if let Some(name) = name {
                rows.display_names.push((user.clone(), name));
            }
            if !share {
                rows.private_reads.push(user);
            }
        }
        tx.commit()?;
        Ok(rows)
    }

    fn set_topic(
        &mut self,
        room: &str,
        topic: &str,
        by: &str,
        ts_ms: i64,
    ) -> Result<(), StoreError> {
        let client = self.client.get_mut();
        if topic.is_empty() {
            client.execute("DELETE FROM room_topics WHERE room = $1", &[&room])?;
        } else {
            let sealed = self.key.seal(&topic_ad(room), topic.as_bytes());
            client.execute(
                "INSERT INTO room_topics (room, topic, by_user, ts_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (room) DO UPDATE SET topic = excluded.topic,
                     by_user = excluded.by_user, ts_ms = excluded.ts_ms",
                &[&room, &sealed, &by, &ts_ms],
            )?;
        }
        Ok(())
    }

    fn set_display_name(&mut self, user: &str, name: Option<&str>) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO profiles (user_name, display_name) VALUES ($1, $2)
             ON CONFLICT (user_name) DO UPDATE SET display_name = excluded.display_name",
            &[&user, &name],
        )?;
        Ok(())
    }

    fn set_share_reads(&mut self, user: &str, share: bool) -> Result<(), StoreError> {
        self.client.get_mut().execute(
            "INSERT INTO profiles (user_name, share_reads) VALUES ($1, $2)
             ON CONFLICT (user_name) DO UPDATE SET share_reads = excluded.share_reads",
            &[&user, &share],
        )?;
        Ok(())
    }

    /// The marker only moves forward, in one statement: of two nodes moving it at once, the
    /// further position stays.
    fn set_read(
        &mut self,
        user: &str,
        conv: &str,
        seq: u64,
        ts_ms: i64,
    ) -> Result<ReadMoved, StoreError> {
        let client = self.client.get_mut();
        let last: i64 =
            match client.query_opt("SELECT last_seq FROM convs WHERE key = $1", &[&conv])? {
                Some(r) => col(&r, 0)?,
                None => 0,
            };
        let last = u64::try_from(last).unwrap_or(0);
        if seq > last {
            return Ok(ReadMoved::Beyond { last_seq: last });
        }
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let changed = client.execute(
            "INSERT INTO read_markers (user_name, conv, seq, ts_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (conv, user_name) DO UPDATE SET seq = excluded.seq, ts_ms = excluded.ts_ms
             WHERE read_markers.seq < excluded.seq",
            &[&user, &conv, &seq, &ts_ms],
        )?;
        Ok(if changed > 0 {
            ReadMoved::Moved
        } else {
            ReadMoved::Unchanged
        })
    }

    fn read_markers(&self, conv: &str) -> Result<Vec<ReadMarker>, StoreError> {
        let rows = self.client.borrow_mut().query(
            "SELECT user_name, seq, ts_ms FROM read_markers WHERE conv = $1 ORDER BY user_name",
            &[&conv],
        )?;
        rows.iter()
            .map(|r| {
                Ok(ReadMarker {
                    user: col(r, 0)?,
                    seq: u64::try_from(col::<i64>(r, 1)?).unwrap_or(0),
                    ts_ms: col(r, 2)?,
                })
            })
            .collect()
    }

    /// Needs the messages tables (schema version 3, the `Messages` half).
    fn target(&mut self, msg_id: &str, viewer: &str) -> Result<Option<TargetRow>, StoreError> {
        let client = self.client.get_mut();
        let row = client.query_opt(
            "SELECT m.seq, m.sender, m.ts_ms, m.except_list, m.act_on, m.deleted, m.edits,
                    m.reactions, c.key
             FROM messages m JOIN convs c ON c.id = m.conv_id WHERE m.msg_id = $1",
            &[&msg_id],
        )?;
        let Some(r) = row else { return Ok(None) };
        let except: Option<String> = col(&r, 3)?;
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
        let sealed: Option<Vec<u8>> = col(&r, 7)?;
        let reactions = match sealed {
            Some(s) => {
                conclave_proto::chat::reaction_count(&open_reactions(&self.key, msg_id, &s)?)
            }
            None => {
                // End-to-end: count the acts the server saw.
                let n: i64 = col(
                    &client.query_one(
                        "SELECT coalesce(sum(CASE act_kind WHEN 3 THEN 1 WHEN 4 THEN -1 ELSE 0 END), 0)::BIGINT
                         FROM messages WHERE act_on = $1 AND NOT act_applied",
                        &[&msg_id],
                    )?,
                    0,
                )?;
                n.max(0) as usize
            }
        };
        let key: String = col(&r, 8)?;
        let act_on: Option<String> = col(&r, 4)?;
        Ok(Some(TargetRow {
            msg_id: msg_id.to_string(),
            conv: conv_from_key(&key),
            from: col(&r, 1)?,
            seq: col::<i64>(&r, 0)?.max(0) as u64,
            ts_ms: col(&r, 2)?,
            except,
            is_act: act_on.is_some(),
            deleted: col(&r, 5)?,
            edits: col::<i64>(&r, 6)?.clamp(0, i64::from(u32::MAX)) as u32,
            reactions,
        }))
    }

    /// Needs the messages tables (schema version 3, the `Messages` half).
    fn thread(
        &mut self,
        root: &str,
        viewer: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        let Some(t) = self.target(root, viewer)? else {
            return Ok(None);
        };
        let key = conv_key(&t.conv);
        let after = after.map(|a| a.min(i64::MAX as u64) as i64).unwrap_or(0);
        let rows = self.client.get_mut().query(
            &format!(
                "SELECT m.msg_id, m.seq, m.sender, m.ts_ms, m.body, {EXTRA_COLS} FROM messages m
                 WHERE (m.msg_id = $1 OR (m.reply_to = $1 AND m.seq > $2))
                   AND m.act_on IS NULL
                   AND (m.except_list IS NULL OR strpos(m.except_list, ',' || $3 || ',') = 0)
                 ORDER BY m.seq LIMIT $4"
            ),
            &[&root, &after, &viewer, &(i64::from(limit) + 1)],
        )?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in rows {
            let msg_id: String = col(&r, 0)?;
            let seq: i64 = col(&r, 1)?;
            let sealed: Vec<u8> = col(&r, 4)?;
            let body = open_body(&self.key, &msg_id, &key, seq, &sealed)?;
            bytes += body.data.len() + MESSAGE_OVERHEAD_BYTES;
            if !out.is_empty() && bytes > conclave_proto::MAX_PAGE_BYTES {
                break;
            }
            let extra = extra_of(&self.key, &msg_id, extra_cols(&r, 5)?, true)?;
            out.push(Message {
                msg_id,
                conv: t.conv.clone(),
                from: col(&r, 2)?,
                seq: seq.max(0) as u64,
                ts_ms: col(&r, 3)?,
                body,
                extra,
            });
        }
        Ok(Some(out))
    }
}
