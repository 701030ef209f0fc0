//! `PgDb`'s [`Messages`]: appends with per-conversation sequence numbers, history, search,
//! acks and catch-up, retention, and the range a cluster node reads when the bus lost a
//! notice, with exactly the behaviour of SQLite's [`crate::store::Db`] (the conformance suite
//! runs the same tests on both), and what several nodes appending at once need on top.
//!
//! # Sequence numbers across nodes
//!
//! A batch is one transaction. It first finds which of its messages are retries (a stored
//! message with the same sender and idempotency key: those are answered `duplicate: true` with
//! the first message's id and number, and write nothing), then takes each conversation it
//! writes to in a fixed order (sorted by key) with one statement that creates it if needed and
//! reserves the batch's numbers: `INSERT INTO convs … ON CONFLICT (key) DO UPDATE SET
//! last_seq = convs.last_seq + n RETURNING …`. The row stays locked until the commit, so
//! another node appending to the same conversation waits, then continues from the committed
//! number: numbers are never reused or skipped, and each conversation's messages commit in
//! sequence order (a reader sees a prefix of every conversation). Taking the locks in one order
//! means two nodes' batches never wait on each other in a circle; if PostgreSQL still reports
//! a deadlock or a serialization failure, the whole batch is tried again from the start (at
//! most [`APPEND_ATTEMPTS`] times, then a clear error). So is a batch that lost a race for an
//! idempotency key to another node (the unique index `messages_idem`, `ON CONFLICT DO
//! NOTHING`): the second attempt finds the first node's message and answers it as a duplicate.
//! Nothing of a failed attempt is written (its transaction is rolled back). One case stays
//! open, as with any database: a connection that breaks while the commit is under way leaves
//! it unknown whether the batch committed; the error says the connection closed, and a client
//! that sends again with its idempotency key gets its message once either way.
//!
//! Each batch costs a fixed number of round trips, whatever its size: the lookup of retries
//! (only when a message carries a key), one statement per conversation, one insert of every
//! message (`unnest` of arrays), one insert of every message's search tokens, the commit. Acts (edits,
//! deletes, reactions) add a few statements each, applied in batch order as `Db` applies them.
//! The statements of the hot paths (`append_batch`, `catch_up`, `conv_range`, `history`) are
//! prepared once per connection and kept.
//!
//! Bodies are sealed under the data key with the same associated data as `Db`'s
//! ([`crate::store::seal_ad`]: message id, conversation key, sequence number), so a row opens
//! only where it was written; reactions likewise.
//!
//! # Search
//!
//! `Db`'s index holds, for each message, the HMAC tokens of its words under the search key
//! ([`crate::search`]), never a word; so does `search_index` here: one row per message with
//! its tokens as an array, under a GIN index (an inverted index from each token to the rows
//! that have it, whose new entries go to a pending list merged in bulk, so an insert stays
//! cheap as FTS5's segments keep SQLite's). A query computes the tokens of its words, finds
//! through that index the messages that have all of them (`tokens @> query`), then opens each
//! candidate and checks the words are really there, as `Db` does. The tokens are written in
//! the message's own transaction (one more statement per batch), so there is nothing waiting
//! in memory: [`Messages::flush_index`] is a no-op, and so is [`Messages::optimize_index`]
//! (PostgreSQL merges the pending list itself, and the tokens of edited or deleted messages
//! are deleted rows, whose space autovacuum reuses). A message's tokens go with it (`ON DELETE
//! CASCADE`).
//!
//! # Catch-up
//!
//! A catch-up reads in one read-only `REPEATABLE READ` transaction: one snapshot for every
//! conversation, in which each conversation's messages are exactly its numbers up to its
//! `last_seq` (what commits after the snapshot comes on the bus).
//!
//! # Integrity check
//!
//! PostgreSQL checks its own pages; [`Messages::integrity_check`] checks what the store
//! promises on top: in every conversation the stored numbers are gap-free from the oldest kept
//! (retention deletes only a conversation's oldest) to its `last_seq`, and every sealed body and
//! reaction list opens under the data key. "ok" when all holds, else the first problems found.

use std::collections::HashMap;

use conclave_proto::chat::{ActKind, ActsOn, Reaction, apply_reaction};
use conclave_proto::{Body, Conv, Message};
use postgres::{Client, IsolationLevel, Statement, Transaction};

use super::{PgDb, col};
use crate::at_rest::DataKey;
use crate::search::{self, SearchKey};
use crate::store::{
    Appended, ExtraCols, Messages, NewMessage, PageBudget, Retention, StoreError, act_columns,
    conv_from_key, conv_key, extra_of, is_mls, open_body, open_reactions, parse_except_list,
    reactions_ad, seal_ad,
};

/// Schema version 3: messages (sealed bodies, replies and acts, as SQLite's schema version 4
/// has them), the members of direct conversations, and the search index (each message's
/// tokens, under a GIN index).
pub(super) const SCHEMA_V3: &str = r#"
CREATE TABLE messages (
    gseq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conv_id     BIGINT NOT NULL REFERENCES convs(id),
    seq         BIGINT NOT NULL,
    msg_id      TEXT COLLATE "C" NOT NULL UNIQUE,
    sender      TEXT COLLATE "C" NOT NULL,
    ts_ms       BIGINT NOT NULL,
    body        BYTEA NOT NULL,
    except_list TEXT COLLATE "C",
    idem_key    TEXT COLLATE "C",
    reply_to    TEXT COLLATE "C",
    act_on      TEXT COLLATE "C",
    act_kind    BIGINT,
    act_applied BOOLEAN NOT NULL DEFAULT FALSE,
    edited_ms   BIGINT,
    edits       BIGINT NOT NULL DEFAULT 0,
    deleted     BOOLEAN NOT NULL DEFAULT FALSE,
    reactions   BYTEA
);
CREATE UNIQUE INDEX messages_conv_seq ON messages(conv_id, seq);
CREATE UNIQUE INDEX messages_idem ON messages(sender, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX messages_act_on ON messages(act_on) WHERE act_on IS NOT NULL;
CREATE INDEX messages_reply_to ON messages(reply_to) WHERE reply_to IS NOT NULL;
CREATE TABLE conv_members (
    user_name TEXT COLLATE "C" NOT NULL,
    conv_id   BIGINT NOT NULL REFERENCES convs(id),
    PRIMARY KEY (user_name, conv_id)
);
CREATE TABLE search_index (
    gseq    BIGINT PRIMARY KEY REFERENCES messages(gseq) ON DELETE CASCADE,
    conv_id BIGINT NOT NULL,
    tokens  BIGINT[] NOT NULL
);
CREATE INDEX search_index_tokens ON search_index USING gin (tokens);
"#;

/// Most attempts at one batch when PostgreSQL reports a deadlock or a serialization failure,
/// or another node stored a message with the same idempotency key first.
pub const APPEND_ATTEMPTS: usize = 3;

/// Messages deleted per transaction by retention (commits are never stalled for long).
const RETENTION_CHUNK: i64 = 1000;

/// Rows opened per query by the integrity check.
const CHECK_CHUNK: i64 = 1000;

/// Problems the integrity check lists before it stops looking.
const CHECK_MAX_PROBLEMS: usize = 10;

/// The select list every reader of messages starts with: id, number, sender, time, sealed
/// body, then the columns that become a message's [`Extra`] (5 to 11, as [`ExtraCols`]).
const STORED_COLS: &str = "m.msg_id, m.seq, m.sender, m.ts_ms, m.body, m.reply_to, m.act_on, \
                           m.act_kind, m.edited_ms, m.edits, m.deleted, m.reactions";

/// What `PgDb` keeps for its messages: the search key, the ids of conversations it has seen
/// committed, and its prepared statements.
pub(super) struct MessagesState {
    search: SearchKey,
    conv_ids: HashMap<String, i64>,
    statements: Option<Statements>,
}

impl MessagesState {
    pub(super) fn new(key: &DataKey) -> MessagesState {
        MessagesState {
            // The same derivation as `Db`'s: the tokens of both backends are equal.
            search: SearchKey::new(&key.subkey("conclave search index v1")),
            conv_ids: HashMap::new(),
            statements: None,
        }
    }

    /// A new connection replaced the old one: its prepared statements are gone with it.
    pub(super) fn connection_replaced(&mut self) {
        self.statements = None;
    }

    /// The hot statements, prepared on first use on this connection.
    fn statements(&mut self, client: &mut Client) -> Result<Statements, StoreError> {
        if let Some(s) = &self.statements {
            return Ok(s.clone());
        }
        let s = Statements::prepare(client)?;
        self.statements = Some(s.clone());
        Ok(s)
    }
}

/// Prepared statements (each a handle on the connection's server-side statement; cloning one
/// is cheap).
#[derive(Clone)]
struct Statements {
    find_retries: Statement,
    take_conv: Statement,
    insert_messages: Statement,
    insert_tokens: Statement,
    catch_up_convs: Statement,
    catch_up_rows: Statement,
    conv_range: Statement,
    history: Statement,
}

impl Statements {
    fn prepare(c: &mut Client) -> Result<Statements, StoreError> {
        Ok(Statements {
            find_retries: c.prepare(
                "SELECT m.sender, m.idem_key, m.msg_id, m.seq, m.ts_ms
                 FROM messages m JOIN unnest($1::text[], $2::text[]) AS k(sender, idem_key)
                   ON m.sender = k.sender AND m.idem_key = k.idem_key
                 WHERE m.idem_key IS NOT NULL",
            )?,
            // Creates the conversation or reserves `$2` more numbers in it, and locks its row
            // to the commit. `xmax = 0`: the row is new (this statement inserted it).
            take_conv: c.prepare(
                "INSERT INTO convs (key, last_seq) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET last_seq = convs.last_seq + excluded.last_seq
                 RETURNING id, last_seq, (xmax = 0)",
            )?,
            insert_messages: c.prepare(
                "INSERT INTO messages (conv_id, seq, msg_id, sender, ts_ms, body, except_list,
                                       idem_key, reply_to, act_on, act_kind, act_applied,
                                       mls_commit)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[],
                                      $5::bigint[], $6::bytea[], $7::text[], $8::text[],
                                      $9::text[], $10::text[], $11::bigint[], $12::bool[],
                                      $13::bool[])
                 ON CONFLICT (sender, idem_key) WHERE idem_key IS NOT NULL DO NOTHING
                 RETURNING msg_id, gseq",
            )?,
            // Each message's tokens come as an array literal (`{1,2,3}`): `unnest` cannot
            // take an array of arrays of different lengths.
            insert_tokens: c.prepare(
                "INSERT INTO search_index (gseq, conv_id, tokens)
                 SELECT g, c, t::bigint[] FROM unnest($1::bigint[], $2::bigint[], $3::text[])
                   AS u(g, c, t)",
            )?,
            catch_up_convs: c.prepare(
                "SELECT c.id, c.key, c.last_seq, a.seq FROM convs c
                 LEFT JOIN acks a ON a.user_name = $1 AND a.conv_id = c.id
                 WHERE c.key IN (SELECT 'r:' || room FROM members WHERE user_name = $1)
                    OR c.id IN (SELECT conv_id FROM conv_members WHERE user_name = $1)
                 ORDER BY c.id",
            )?,
            catch_up_rows: c.prepare(&format!(
                "SELECT {STORED_COLS} FROM messages m
                 WHERE m.conv_id = $1 AND m.seq > $2
                   AND (m.except_list IS NULL OR strpos(m.except_list, ',' || $3 || ',') = 0)
                 ORDER BY m.seq DESC LIMIT $4"
            ))?,
            conv_range: c.prepare(&format!(
                "SELECT {STORED_COLS}, m.except_list FROM messages m
                 JOIN convs c ON c.id = m.conv_id
                 WHERE c.key = $1 AND m.seq > $2 AND m.seq <= $3
                 ORDER BY m.seq LIMIT $4"
            ))?,
            // Acts the server applied are in their targets' state, not in history.
            history: c.prepare(&format!(
                "SELECT {STORED_COLS} FROM messages m
                 WHERE m.conv_id = $1 AND m.seq < $2 AND NOT m.act_applied
                   AND (m.except_list IS NULL OR strpos(m.except_list, ',' || $3 || ',') = 0)
                 ORDER BY m.seq DESC LIMIT $4"
            ))?,
        })
    }
}

/// A row read with [`STORED_COLS`]: id, number, sender, time, sealed body, the extra columns.
struct Stored {
    msg_id: String,
    seq: i64,
    from: String,
    ts_ms: i64,
    sealed: Vec<u8>,
    cols: ExtraCols,
}

fn stored(r: &postgres::Row) -> Result<Stored, StoreError> {
    Ok(Stored {
        msg_id: col(r, 0)?,
        seq: col(r, 1)?,
        from: col(r, 2)?,
        ts_ms: col(r, 3)?,
        sealed: col(r, 4)?,
        cols: ExtraCols {
            reply_to: col(r, 5)?,
            act_on: col(r, 6)?,
            act_kind: col(r, 7)?,
            edited_ms: col(r, 8)?,
            edits: col(r, 9)?,
            deleted: col(r, 10)?,
            reactions: col(r, 11)?,
        },
    })
}

/// A `u64` position as PostgreSQL's `BIGINT` (positions past `i64::MAX` do not occur; they
/// read as the largest).
fn pos(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Why one attempt at a batch did not commit.
enum AttemptError {
    /// Worth trying again from the start: a deadlock, a serialization failure, or another node
    /// stored a message with one of the batch's idempotency keys first.
    Retry(String),
    Fail(StoreError),
}

impl From<postgres::Error> for AttemptError {
    fn from(e: postgres::Error) -> AttemptError {
        let code = e.code().map(|c| c.code().to_string());
        match code.as_deref() {
            // serialization_failure, deadlock_detected
            Some("40001") | Some("40P01") => AttemptError::Retry(StoreError::from(e).to_string()),
            _ => AttemptError::Fail(e.into()),
        }
    }
}

impl From<StoreError> for AttemptError {
    fn from(e: StoreError) -> AttemptError {
        AttemptError::Fail(e)
    }
}

/// A message's search tokens as written: its global number, its conversation, the tokens as an
/// array literal.
type Tokens = (i64, i64, String);

/// Conversation keys and their ids, as a committed batch learned them.
type ConvIds = Vec<(String, i64)>;

/// One message of a batch as it will be inserted.
struct Row {
    conv_id: i64,
    seq: i64,
    msg_id: String,
    ts_ms: i64,
    sealed: Vec<u8>,
    except: Option<String>,
}

impl PgDb {
    fn seal_body(&self, msg_id: &str, key: &str, seq: i64, body: &Body) -> Vec<u8> {
        let plain = postcard::to_stdvec(body).unwrap_or_default();
        self.key.seal(&seal_ad(msg_id, key, seq as u64), &plain)
    }

    fn seal_reactions(&self, msg_id: &str, reactions: &[Reaction]) -> Vec<u8> {
        let list: Vec<(&str, &[String])> = reactions
            .iter()
            .map(|r| (r.emoji.as_str(), r.users.as_slice()))
            .collect();
        let plain = postcard::to_stdvec(&list).unwrap_or_default();
        self.key.seal(&reactions_ad(msg_id), &plain)
    }

    /// The search tokens of a text body's words, as an array literal (`{1,2,3}`); `None` for
    /// a body with no words.
    fn tokens_of(&self, body: &Body) -> Option<String> {
        use std::fmt::Write as _;
        let mut out = String::from("{");
        search::for_each_word(body.as_text()?, |w| {
            if out.len() > 1 {
                out.push(',');
            }
            let _ = write!(out, "{}", self.msgs.search.token(w));
        });
        out.push('}');
        (out.len() > 2).then_some(out)
    }

    /// A stored row as a message of conversation `conv` (its storage key `key`).
    fn message(
        &self,
        row: Stored,
        conv: &Conv,
        key: &str,
        with_state: bool,
    ) -> Result<Message, StoreError> {
        let body = open_body(&self.key, &row.msg_id, key, row.seq, &row.sealed)?;
        let extra = extra_of(&self.key, &row.msg_id, row.cols, with_state)?;
        Ok(Message {
            msg_id: row.msg_id,
            conv: conv.clone(),
            from: row.from,
            seq: row.seq as u64,
            ts_ms: row.ts_ms,
            body,
            extra,
        })
    }

    /// The id of a conversation, if it exists (cached once seen: ids never change).
    fn existing_conv_id(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        if let Some(&id) = self.msgs.conv_ids.get(key) {
            return Ok(Some(id));
        }
        let row = self
            .client
            .get_mut()
            .query_opt("SELECT id FROM convs WHERE key = $1", &[&key])?;
        let id = row.map(|r| col::<i64>(&r, 0)).transpose()?;
        if let Some(id) = id {
            self.msgs.conv_ids.insert(key.to_string(), id);
        }
        Ok(id)
    }

    /// One attempt at a batch: everything in one transaction, committed at the end.
    fn append_attempt(
        &self,
        batch: &[NewMessage],
        st: &Statements,
    ) -> Result<(Vec<Appended>, ConvIds), AttemptError> {
        let keys: Vec<String> = batch.iter().map(|m| conv_key(&m.conv)).collect();
        // Borrowed through the cell, so the sealing helpers (`&self`) stay usable meanwhile.
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction()?;

        // Retries of messages already stored, found before any lock (a committed message
        // stays; one committed meanwhile by another node makes the insert below conflict).
        let (senders, idems): (Vec<&str>, Vec<&str>) = batch
            .iter()
            .filter_map(|m| Some((m.from.as_str(), m.idempotency_key.as_deref()?)))
            .unzip();
        let mut stored: HashMap<(String, String), (String, i64, i64)> = HashMap::new();
        if !senders.is_empty() {
            for r in tx.query(&st.find_retries, &[&senders, &idems])? {
                stored.insert(
                    (col(&r, 0)?, col(&r, 1)?),
                    (col(&r, 2)?, col(&r, 3)?, col(&r, 4)?),
                );
            }
        }
        // Which messages are new: not stored, and not a repeat of an earlier one in the batch.
        let mut first_in_batch: HashMap<(&str, &str), usize> = HashMap::new();
        let mut is_new = vec![false; batch.len()];
        let mut repeat_of: Vec<Option<usize>> = vec![None; batch.len()];
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for (i, m) in batch.iter().enumerate() {
            if let Some(idem) = m.idempotency_key.as_deref() {
                if stored.contains_key(&(m.from.clone(), idem.to_string())) {
                    continue;
                }
                if let Some(&first) = first_in_batch.get(&(m.from.as_str(), idem)) {
                    repeat_of[i] = Some(first);
                    continue;
                }
                first_in_batch.insert((m.from.as_str(), idem), i);
            }
            is_new[i] = true;
            *counts.entry(keys[i].as_str()).or_insert(0) += 1;
        }

        // Each conversation written to, in key order: created if needed, its numbers reserved
        // and its row locked to the commit.
        let mut conv_order: Vec<&str> = counts.keys().copied().collect();
        conv_order.sort_unstable();
        let mut next: HashMap<&str, (i64, i64)> = HashMap::new();
        let mut seen_ids: Vec<(String, i64)> = Vec::new();
        for key in conv_order {
            let n = counts[key];
            let r = tx.query_one(&st.take_conv, &[&key, &n])?;
            let (id, last, created): (i64, i64, bool) = (col(&r, 0)?, col(&r, 1)?, col(&r, 2)?);
            if created && let Conv::Direct(users) = conv_from_key(key) {
                tx.execute(
                    "INSERT INTO conv_members (user_name, conv_id) SELECT unnest($1::text[]), $2
                     ON CONFLICT DO NOTHING",
                    &[&users, &id],
                )?;
            }
            next.insert(key, (id, last - n + 1));
            seen_ids.push((key.to_string(), id));
        }

        // Every new message in one insert.
        let ts_ms = crate::store::now_ms();
        let mut rows: Vec<Option<Row>> = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            if !is_new[i] {
                rows.push(None);
                continue;
            }
            let key = keys[i].as_str();
            let Some(slot) = next.get_mut(key) else {
                rows.push(None);
                continue;
            };
            let (conv_id, seq) = *slot;
            slot.1 += 1;
            let msg_id = uuid::Uuid::now_v7().to_string();
            let sealed = self.seal_body(&msg_id, key, seq, &m.body);
            let except = (!m.except.is_empty()).then(|| format!(",{},", m.except.join(",")));
            rows.push(Some(Row {
                conv_id,
                seq,
                msg_id,
                ts_ms,
                sealed,
                except,
            }));
        }
        let new: Vec<(&NewMessage, &Row)> = batch
            .iter()
            .zip(&rows)
            .filter_map(|(m, r)| Some((m, r.as_ref()?)))
            .collect();
        let mut gseqs: HashMap<String, i64> = HashMap::new();
        if !new.is_empty() {
            let conv_ids: Vec<i64> = new.iter().map(|(_, r)| r.conv_id).collect();
            let seqs: Vec<i64> = new.iter().map(|(_, r)| r.seq).collect();
            let msg_ids: Vec<&str> = new.iter().map(|(_, r)| r.msg_id.as_str()).collect();
            let senders: Vec<&str> = new.iter().map(|(m, _)| m.from.as_str()).collect();
            let times: Vec<i64> = new.iter().map(|(_, r)| r.ts_ms).collect();
            let bodies: Vec<&[u8]> = new.iter().map(|(_, r)| r.sealed.as_slice()).collect();
            let excepts: Vec<Option<&str>> = new.iter().map(|(_, r)| r.except.as_deref()).collect();
            let idem: Vec<Option<&str>> = new
                .iter()
                .map(|(m, _)| m.idempotency_key.as_deref())
                .collect();
            let cols: Vec<_> = new
                .iter()
                .map(|(m, _)| act_columns(m.refs.as_deref()))
                .collect();
            let reply_to: Vec<Option<&str>> = cols.iter().map(|c| c.0).collect();
            let act_on: Vec<Option<&str>> = cols.iter().map(|c| c.1).collect();
            let act_kind: Vec<Option<i64>> = cols.iter().map(|c| c.2).collect();
            // Acts in server-encrypted conversations are applied to their target (below).
            let applied: Vec<bool> = new
                .iter()
                .map(|(m, _)| acts_on(m).is_some() && !is_mls(&m.body))
                .collect();
            // End-to-end commits are marked, so a cluster node finds a group's commits without
            // opening every message after its state (`Groups::e2ee_commits_after`).
            let commits: Vec<bool> = new
                .iter()
                .map(|(m, _)| m.body.content_type == conclave_e2ee::CT_COMMIT)
                .collect();
            for r in tx.query(
                &st.insert_messages,
                &[
                    &conv_ids, &seqs, &msg_ids, &senders, &times, &bodies, &excepts, &idem,
                    &reply_to, &act_on, &act_kind, &applied, &commits,
                ],
            )? {
                gseqs.insert(col(&r, 0)?, col(&r, 1)?);
            }
            if gseqs.len() != new.len() {
                // Another node stored one of these idempotency keys after the lookup above;
                // its numbers were reserved here: start again (this attempt is rolled back).
                return Err(AttemptError::Retry(
                    "another node stored a message with the same idempotency key at the same \
                     moment"
                        .to_string(),
                ));
            }
        }

        // Search tokens, and acts applied in batch order.
        let mut tokens: Vec<Tokens> = Vec::new();
        for (m, r) in &new {
            let gseq = gseqs.get(&r.msg_id).copied().unwrap_or(0);
            match acts_on(m) {
                None => tokens.extend(self.tokens_of(&m.body).map(|t| (gseq, r.conv_id, t))),
                Some(act) if !is_mls(&m.body) => {
                    self.apply_act(&mut tx, m, r, act, &mut tokens)?;
                }
                Some(_) => {}
            }
        }
        if !tokens.is_empty() {
            let g: Vec<i64> = tokens.iter().map(|t| t.0).collect();
            let c: Vec<i64> = tokens.iter().map(|t| t.1).collect();
            let t: Vec<&str> = tokens.iter().map(|t| t.2.as_str()).collect();
            tx.execute(&st.insert_tokens, &[&g, &c, &t])?;
        }
        tx.commit()?;

        let out = batch
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if let Some(r) = &rows[i] {
                    return m.appended_as(r.msg_id.clone(), r.seq as u64, r.ts_ms, false);
                }
                if let Some(first) = repeat_of[i]
                    && let Some(r) = &rows[first]
                {
                    return m.appended_as(r.msg_id.clone(), r.seq as u64, r.ts_ms, true);
                }
                let idem = m.idempotency_key.clone().unwrap_or_default();
                match stored.get(&(m.from.clone(), idem)) {
                    Some((msg_id, seq, ts)) => {
                        m.appended_as(msg_id.clone(), *seq as u64, *ts, true)
                    }
                    // Unreachable: every message is new, a repeat, or stored.
                    None => m.appended_as(String::new(), 0, ts_ms, true),
                }
            })
            .collect();
        Ok((out, seen_ids))
    }

    /// Applies the act `m` (stored as `r`, same transaction) to its target in a
    /// server-encrypted conversation, as `Db::apply_act` does. A target that is gone or
    /// deleted meanwhile is left alone. The target's search tokens are replaced in `tokens`
    /// (this batch's) and in the table.
    fn apply_act(
        &self,
        tx: &mut Transaction<'_>,
        m: &NewMessage,
        r: &Row,
        act: &ActsOn,
        tokens: &mut Vec<Tokens>,
    ) -> Result<(), StoreError> {
        let key = conv_key(&m.conv);
        let target = tx.query_opt(
            "SELECT gseq, seq, deleted, reactions FROM messages
             WHERE msg_id = $1 AND conv_id = $2 AND act_on IS NULL",
            &[&act.msg_id, &r.conv_id],
        )?;
        let Some(target) = target else {
            return Ok(());
        };
        let (gseq, seq, deleted, sealed_reactions): (i64, i64, bool, Option<Vec<u8>>) = (
            col(&target, 0)?,
            col(&target, 1)?,
            col(&target, 2)?,
            col(&target, 3)?,
        );
        if deleted {
            return Ok(());
        }
        let mut drop_tokens = |tx: &mut Transaction<'_>| -> Result<(), StoreError> {
            tokens.retain(|(g, _, _)| *g != gseq);
            tx.execute("DELETE FROM search_index WHERE gseq = $1", &[&gseq])?;
            Ok(())
        };
        match act.kind {
            ActKind::Edit => {
                let sealed = self.seal_body(&act.msg_id, &key, seq, &m.body);
                tx.execute(
                    "UPDATE messages SET body = $2, edited_ms = $3, edits = edits + 1
                     WHERE gseq = $1",
                    &[&gseq, &sealed, &r.ts_ms],
                )?;
                // The earlier edits' text is obsolete: empty their bodies.
                self.empty_acts(tx, &act.msg_id, r, &key, Some(1))?;
                drop_tokens(tx)?;
                tokens.extend(self.tokens_of(&m.body).map(|t| (gseq, r.conv_id, t)));
            }
            ActKind::Delete => {
                let sealed = self.seal_body(&act.msg_id, &key, seq, &Body::text(""));
                tx.execute(
                    "UPDATE messages SET body = $2, deleted = TRUE, reactions = NULL
                     WHERE gseq = $1",
                    &[&gseq, &sealed],
                )?;
                self.empty_acts(tx, &act.msg_id, r, &key, None)?;
                drop_tokens(tx)?;
            }
            ActKind::React | ActKind::Unreact => {
                let Some(emoji) = m.body.as_text() else {
                    return Ok(());
                };
                let mut list = match &sealed_reactions {
                    Some(s) => open_reactions(&self.key, &act.msg_id, s)?,
                    None => Vec::new(),
                };
                if apply_reaction(&mut list, emoji, &m.from, act.kind == ActKind::React) {
                    let sealed =
                        (!list.is_empty()).then(|| self.seal_reactions(&act.msg_id, &list));
                    tx.execute(
                        "UPDATE messages SET reactions = $2 WHERE gseq = $1",
                        &[&gseq, &sealed],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Empties the bodies of the applied acts on `target` stored up to the act `r` (of
    /// `kind` only, when given, and then not `r` itself), as `Db::empty_acts` does.
    fn empty_acts(
        &self,
        tx: &mut Transaction<'_>,
        target: &str,
        r: &Row,
        key: &str,
        kind: Option<i64>,
    ) -> Result<(), StoreError> {
        let rows = tx.query(
            "SELECT gseq, msg_id, seq FROM messages
             WHERE act_on = $1 AND conv_id = $2 AND act_applied AND seq <= $3
               AND ($4::bigint IS NULL OR act_kind = $4)",
            &[&target, &r.conv_id, &r.seq, &kind],
        )?;
        for row in rows {
            let (gseq, msg_id, seq): (i64, String, i64) =
                (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
            if seq == r.seq && kind.is_some() {
                continue;
            }
            let sealed = self.seal_body(&msg_id, key, seq, &Body::text(""));
            tx.execute(
                "UPDATE messages SET body = $2 WHERE gseq = $1",
                &[&gseq, &sealed],
            )?;
        }
        Ok(())
    }
}

fn acts_on(m: &NewMessage) -> Option<&ActsOn> {
    m.refs.as_ref().and_then(|r| r.acts_on.as_ref())
}

impl Messages for PgDb {
    /// A no-op: the tokens are written in their messages' own transaction.
    fn flush_index(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A no-op: PostgreSQL needs no merge (deleted token rows are gone; autovacuum reuses
    /// their space).
    fn optimize_index(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn ack(&mut self, user: &str, cursors: &[(Conv, u64)]) -> Result<(), StoreError> {
        if cursors.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = cursors.iter().map(|(c, _)| conv_key(c)).collect();
        let seqs: Vec<i64> = cursors.iter().map(|(_, s)| pos(*s)).collect();
        // One statement (so one transaction); a conversation named twice counts its furthest.
        self.client.get_mut().execute(
            "INSERT INTO acks (user_name, conv_id, seq)
             SELECT $1, c.id, max(k.seq) FROM unnest($2::text[], $3::bigint[]) AS k(key, seq)
             JOIN convs c ON c.key = k.key GROUP BY c.id
             ON CONFLICT (user_name, conv_id) DO UPDATE SET seq = GREATEST(acks.seq, excluded.seq)",
            &[&user, &keys, &seqs],
        )?;
        Ok(())
    }

    fn catch_up(
        &mut self,
        user: &str,
        resume: &[(Conv, u64)],
        per_conv: u32,
        total: u32,
    ) -> Result<(Vec<Message>, bool), StoreError> {
        let resume: HashMap<String, u64> = resume.iter().map(|(c, s)| (conv_key(c), *s)).collect();
        let st = self.msgs.statements(self.client.get_mut())?;
        let mut tx = self
            .client
            .get_mut()
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let convs = tx.query(&st.catch_up_convs, &[&user])?;
        let mut read: Vec<(String, Vec<Stored>)> = Vec::new();
        let mut taken = 0u32;
        let mut truncated = false;
        for c in convs {
            let (conv_id, key, last_seq, acked): (i64, String, i64, Option<i64>) =
                (col(&c, 0)?, col(&c, 1)?, col(&c, 2)?, col(&c, 3)?);
            let from = resume.get(&key).map(|s| pos(*s)).or(acked).unwrap_or(0);
            if last_seq <= from {
                continue;
            }
            let take = per_conv.min(total.saturating_sub(taken));
            if (last_seq - from) as u64 > u64::from(take) {
                truncated = true;
            }
            if take == 0 {
                continue;
            }
            let rows = tx.query(
                &st.catch_up_rows,
                &[&conv_id, &from, &user, &i64::from(take)],
            )?;
            let rows: Vec<Stored> = rows.iter().map(stored).collect::<Result<_, _>>()?;
            taken += rows.len() as u32;
            read.push((key, rows));
        }
        tx.commit()?;
        let mut out = Vec::new();
        for (key, rows) in read {
            let conv = conv_from_key(&key);
            for row in rows.into_iter().rev() {
                // Live delivery carries no state: the acts after it follow in order.
                out.push(self.message(row, &conv, &key, false)?);
            }
        }
        Ok((out, truncated))
    }

    fn append_batch(&mut self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let st = self.msgs.statements(self.client.get_mut())?;
        let mut why = String::new();
        for _ in 0..APPEND_ATTEMPTS {
            match self.append_attempt(batch, &st) {
                Ok((out, seen)) => {
                    self.msgs.conv_ids.extend(seen);
                    return Ok(out);
                }
                Err(AttemptError::Retry(reason)) => why = reason,
                Err(AttemptError::Fail(e)) => return Err(e),
            }
        }
        Err(StoreError::Postgres {
            code: None,
            message: format!(
                "the batch of {} messages was refused {APPEND_ATTEMPTS} times by conflicts with \
                 other nodes (last: {why}); nothing of it was stored, send again",
                batch.len()
            ),
        })
    }

    fn history(
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
        let before = before.map(pos).unwrap_or(i64::MAX);
        let st = self.msgs.statements(self.client.get_mut())?;
        let rows = self.client.get_mut().query(
            &st.history,
            &[&conv_id, &before, &viewer, &i64::from(limit)],
        )?;
        let mut out = Vec::new();
        let mut budget = PageBudget::default();
        for r in &rows {
            let row = stored(r)?;
            let body = open_body(&self.key, &row.msg_id, &key, row.seq, &row.sealed)?;
            if !budget.admits(&body) {
                break;
            }
            let extra = extra_of(&self.key, &row.msg_id, row.cols, true)?;
            out.push(Message {
                msg_id: row.msg_id,
                conv: conv_from_key(&key),
                from: row.from,
                seq: row.seq as u64,
                ts_ms: row.ts_ms,
                body,
                extra,
            });
        }
        out.reverse();
        Ok(out)
    }

    fn search(
        &mut self,
        viewer: &str,
        rooms: &[String],
        direct: bool,
        query_words: &[String],
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        if query_words.is_empty() {
            return Ok(Vec::new());
        }
        let mut conv_ids: Vec<i64> = Vec::new();
        for r in rooms {
            if let Some(id) = self.existing_conv_id(&format!("r:{r}"))? {
                conv_ids.push(id);
            }
        }
        let client = self.client.get_mut();
        if direct {
            for r in client.query(
                "SELECT conv_id FROM conv_members WHERE user_name = $1",
                &[&viewer],
            )? {
                conv_ids.push(col(&r, 0)?);
            }
        }
        if conv_ids.is_empty() {
            return Ok(Vec::new());
        }
        let before_gseq: i64 = match before {
            None => i64::MAX,
            Some(id) => client
                .query_opt("SELECT gseq FROM messages WHERE msg_id = $1", &[&id])?
                .map(|r| col(&r, 0))
                .transpose()?
                .unwrap_or(0),
        };
        let mut tokens: Vec<i64> = query_words
            .iter()
            .map(|w| self.msgs.search.token(w))
            .collect();
        tokens.sort_unstable();
        tokens.dedup();
        // The messages that have every token: found through the tokens' index, never a word.
        let rows = client.query(
            &format!(
                "SELECT {STORED_COLS}, c.key FROM messages m
                 JOIN convs c ON c.id = m.conv_id
                 JOIN search_index s ON s.gseq = m.gseq
                 WHERE s.tokens @> $1 AND s.conv_id = ANY($2) AND s.gseq < $3
                   AND (m.except_list IS NULL OR strpos(m.except_list, ',' || $4 || ',') = 0)
                 ORDER BY m.gseq DESC LIMIT $5"
            ),
            &[&tokens, &conv_ids, &before_gseq, &viewer, &i64::from(limit)],
        )?;
        let mut out = Vec::new();
        let mut budget = PageBudget::default();
        for r in &rows {
            let key: String = col(r, 12)?;
            let row = stored(r)?;
            let body = open_body(&self.key, &row.msg_id, &key, row.seq, &row.sealed)?;
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
            let extra = extra_of(&self.key, &row.msg_id, row.cols, true)?;
            out.push(Message {
                msg_id: row.msg_id,
                conv: conv_from_key(&key),
                from: row.from,
                seq: row.seq as u64,
                ts_ms: row.ts_ms,
                body,
                extra,
            });
        }
        Ok(out)
    }

    fn apply_retention(
        &mut self,
        now_ms: i64,
        rule_for: &dyn Fn(&str) -> Retention,
    ) -> Result<u64, StoreError> {
        let client = self.client.get_mut();
        let convs = client.query("SELECT id, key, last_seq FROM convs ORDER BY id", &[])?;
        let mut deleted = 0u64;
        for c in convs {
            let (conv_id, key, last_seq): (i64, String, i64) =
                (col(&c, 0)?, col(&c, 1)?, col(&c, 2)?);
            let rule = rule_for(&key);
            let mut cutoff: i64 = 0;
            if let Some(n) = rule.max_messages {
                cutoff = cutoff.max(last_seq - pos(n));
            }
            if let Some(days) = rule.max_age_days {
                let before_ms = now_ms - i64::from(days) * 86_400_000;
                let by_age: Option<i64> = col(
                    &client.query_one(
                        "SELECT max(seq) FROM messages WHERE conv_id = $1 AND ts_ms < $2",
                        &[&conv_id, &before_ms],
                    )?,
                    0,
                )?;
                cutoff = cutoff.max(by_age.unwrap_or(0));
            }
            if cutoff <= 0 {
                continue;
            }
            // In bounded transactions (each statement its own); the tokens go with their
            // messages. Each round deletes at least one row or ends the loop, so it ends.
            loop {
                let n = client.execute(
                    "DELETE FROM messages WHERE gseq IN (
                         SELECT gseq FROM messages WHERE conv_id = $1 AND seq <= $2
                         ORDER BY seq LIMIT $3)",
                    &[&conv_id, &cutoff, &RETENTION_CHUNK],
                )?;
                if n == 0 {
                    break;
                }
                deleted += n;
            }
        }
        Ok(deleted)
    }

    fn integrity_check(&self) -> Result<String, StoreError> {
        let mut problems: Vec<String> = Vec::new();
        let mut client = self.client.borrow_mut();
        let convs = client.query(
            "SELECT c.key, c.last_seq, count(m.seq), min(m.seq), max(m.seq)
             FROM convs c LEFT JOIN messages m ON m.conv_id = c.id
             GROUP BY c.id, c.key, c.last_seq ORDER BY c.id",
            &[],
        )?;
        for c in convs {
            let (key, last, count, min, max): (String, i64, i64, Option<i64>, Option<i64>) = (
                col(&c, 0)?,
                col(&c, 1)?,
                col(&c, 2)?,
                col(&c, 3)?,
                col(&c, 4)?,
            );
            if let (Some(min), Some(max)) = (min, max)
                && (max != last || count != max - min + 1)
            {
                problems.push(format!(
                    "conversation {key}: {count} messages numbered {min} to {max}, its last \
                     number is {last} (gaps, or numbers past the last)"
                ));
            }
        }
        let mut after = 0i64;
        let mut unreadable = 0u64;
        // Each round reads rows past the last one seen, or ends the loop.
        loop {
            let rows = client.query(
                "SELECT m.gseq, m.msg_id, m.seq, m.body, m.reactions, c.key FROM messages m
                 JOIN convs c ON c.id = m.conv_id WHERE m.gseq > $1 ORDER BY m.gseq LIMIT $2",
                &[&after, &CHECK_CHUNK],
            )?;
            let Some(last) = rows.last() else { break };
            after = col(last, 0)?;
            for r in &rows {
                let (msg_id, seq, sealed, reactions, key): (
                    String,
                    i64,
                    Vec<u8>,
                    Option<Vec<u8>>,
                    String,
                ) = (col(r, 1)?, col(r, 2)?, col(r, 3)?, col(r, 4)?, col(r, 5)?);
                let opens = open_body(&self.key, &msg_id, &key, seq, &sealed).is_ok()
                    && reactions
                        .as_deref()
                        .is_none_or(|s| open_reactions(&self.key, &msg_id, s).is_ok());
                if !opens {
                    unreadable += 1;
                    if problems.len() < CHECK_MAX_PROBLEMS {
                        problems.push(format!(
                            "message {msg_id} ({key} #{seq}) does not open under the data key"
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            return Ok("ok".to_string());
        }
        if unreadable > 0 {
            problems.push(format!("{unreadable} messages do not open in all"));
        }
        problems.truncate(CHECK_MAX_PROBLEMS + 1);
        Ok(problems.join("; "))
    }

    fn conv_range(
        &mut self,
        conv: &Conv,
        after: u64,
        through: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<Appended>, bool), StoreError> {
        let key = conv_key(conv);
        let st = self.msgs.statements(self.client.get_mut())?;
        let through = through.map(pos).unwrap_or(i64::MAX);
        // One more than asked: whether more remain.
        let rows = self.client.get_mut().query(
            &st.conv_range,
            &[&key, &pos(after), &through, &(i64::from(limit) + 1)],
        )?;
        let more = rows.len() > limit as usize;
        let mut out = Vec::with_capacity(rows.len().min(limit as usize));
        for r in rows.iter().take(limit as usize) {
            let except: Option<String> = col(r, 12)?;
            // As live delivery has it: no state, the acts after it follow in order.
            let msg = self.message(stored(r)?, conv, &key, false)?;
            out.push(Appended {
                msg,
                except: parse_except_list(except.as_deref()),
                duplicate: false,
            });
        }
        Ok((out, more))
    }
}
