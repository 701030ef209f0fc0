//! Edits, deletes, reactions and replies in the local history of end-to-end conversations.
//!
//! The server cannot apply them (it holds only ciphertext), so each device does, as it
//! processes the conversation's log in order: an edit replaces the local record of the
//! message with the new text (only when it comes from the message's author), a delete
//! replaces it with nothing, a reaction updates the message's reaction list. The act's own
//! record keeps no text once applied, so no old text stays in the local history. Each
//! message's server id, reply reference and state are kept sealed beside its record.

use rusqlite::{OptionalExtension, params};

use super::Device;
use crate::E2eeError;
use crate::payload::{ACT_DELETE, ACT_EDIT, ACT_REACT, ACT_UNREACT, Payload};

/// What a local history entry carries besides its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalState {
    pub reply_to: Option<String>,
    pub edited_ms: Option<i64>,
    pub edits: u32,
    pub deleted: bool,
    /// Each emoji with who reacted, in the order they first did.
    pub reactions: Vec<(String, Vec<String>)>,
}

/// Content type of a deleted message's record.
const DELETED: &str = "application/vnd.conclave.delete";

fn state_ad(conv: &str, seq: u64) -> Vec<u8> {
    format!("conclave-state-v1|{conv}|{seq}").into_bytes()
}

impl Device {
    /// Remembers the server id (and reply reference) of the message at `seq`, to find it when
    /// an act names it.
    pub fn note_message(
        &self,
        conv: &str,
        seq: u64,
        msg_id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), E2eeError> {
        let state = LocalState {
            reply_to: reply_to.map(str::to_string),
            ..LocalState::default()
        };
        self.put_state(conv, seq, msg_id, &state)
    }

    pub(crate) fn put_state(
        &self,
        conv: &str,
        seq: u64,
        msg_id: &str,
        state: &LocalState,
    ) -> Result<(), E2eeError> {
        let plain =
            postcard::to_allocvec(state).map_err(|e| E2eeError::Malformed(e.to_string()))?;
        self.conn.execute(
            "INSERT OR REPLACE INTO conclave_msg_state (conv, seq, msg_id, state) VALUES (?1, ?2, ?3, ?4)",
            params![conv, seq as i64, msg_id, self.history.seal(&state_ad(conv, seq), &plain)],
        )?;
        Ok(())
    }

    /// The state of the local entry at `seq`, if this device knows its id.
    pub fn local_state(
        &self,
        conv: &str,
        seq: u64,
    ) -> Result<Option<(String, LocalState)>, E2eeError> {
        let row: Option<(String, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT msg_id, state FROM conclave_msg_state WHERE conv = ?1 AND seq = ?2",
                params![conv, seq as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((msg_id, sealed)) = row else {
            return Ok(None);
        };
        let Ok(plain) = self.history.open(&state_ad(conv, seq), &sealed) else {
            // Sealed under an earlier password's key.
            return Ok(Some((msg_id, LocalState::default())));
        };
        let state =
            postcard::from_bytes(&plain).map_err(|e| E2eeError::Malformed(e.to_string()))?;
        Ok(Some((msg_id, state)))
    }

    /// Applies an act (already recorded at `act_seq`) from `from` to the message it names.
    /// Returns whether anything changed. An edit by anyone but the author, or an act on a
    /// message this device does not hold, changes nothing.
    pub fn apply_act(
        &self,
        conv: &str,
        act_seq: u64,
        from: &str,
        ts_ms: i64,
        act: &Payload,
    ) -> Result<bool, E2eeError> {
        let Payload::Act {
            msg_id,
            kind,
            content_type,
            data,
        } = act
        else {
            return Ok(false);
        };
        self.tx(|d| {
            // The act's own record keeps no text.
            let emptied = Payload::Act {
                msg_id: msg_id.clone(),
                kind: *kind,
                content_type: String::new(),
                data: Vec::new(),
            };
            let act_row: Option<(String, i64)> = d
                .conn
                .query_row(
                    "SELECT sender, ts_ms FROM conclave_history WHERE conv = ?1 AND seq = ?2",
                    params![conv, act_seq as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((sender, ts)) = act_row {
                d.put_history(conv, act_seq, &sender, ts, &emptied)?;
            }
            let target: Option<i64> = d
                .conn
                .query_row(
                    "SELECT seq FROM conclave_msg_state WHERE conv = ?1 AND msg_id = ?2",
                    params![conv, msg_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(seq) = target.map(|s| s as u64) else {
                return Ok(false);
            };
            let Some(entry) = d
                .history_rows(
                    "SELECT conv, seq, sender, ts_ms, record FROM conclave_history
                     WHERE conv = ?1 AND seq = ?2",
                    &[&conv, &(seq as i64)],
                )?
                .into_iter()
                .next()
            else {
                return Ok(false);
            };
            let (_, mut state) = d.local_state(conv, seq)?.unwrap_or_default();
            if state.deleted || !matches!(entry.payload, Payload::Body { .. }) {
                return Ok(false);
            }
            match *kind {
                ACT_EDIT => {
                    if entry.from != from || data.is_empty() {
                        return Ok(false);
                    }
                    let new = Payload::Body {
                        content_type: content_type.clone(),
                        data: data.clone(),
                    };
                    d.put_history(conv, seq, &entry.from, entry.ts_ms, &new)?;
                    state.edited_ms = Some(ts_ms);
                    state.edits += 1;
                }
                ACT_DELETE => {
                    // Who may delete (the author, the room's owner, an admin) is the server's
                    // check; the act is signed by its sender, whom the server named.
                    let gone = Payload::Body {
                        content_type: DELETED.into(),
                        data: Vec::new(),
                    };
                    d.put_history(conv, seq, &entry.from, entry.ts_ms, &gone)?;
                    state.deleted = true;
                    state.reactions.clear();
                }
                ACT_REACT | ACT_UNREACT => {
                    let Ok(emoji) = std::str::from_utf8(data) else {
                        return Ok(false);
                    };
                    let on = *kind == ACT_REACT;
                    let pos = state.reactions.iter().position(|(e, _)| e == emoji);
                    match (pos, on) {
                        (Some(i), true) => {
                            if !state.reactions[i].1.iter().any(|u| u == from) {
                                state.reactions[i].1.push(from.to_string());
                            }
                        }
                        (None, true) => state
                            .reactions
                            .push((emoji.to_string(), vec![from.to_string()])),
                        (Some(i), false) => {
                            state.reactions[i].1.retain(|u| u != from);
                            if state.reactions[i].1.is_empty() {
                                state.reactions.remove(i);
                            }
                        }
                        (None, false) => {}
                    }
                    // The row is written again as it is, so a reaction moves it past a running
                    // transfer's snapshot and into the backup's log, as an edit does.
                    d.put_history(conv, seq, &entry.from, entry.ts_ms, &entry.payload)?;
                }
                _ => return Ok(false),
            }
            d.put_state(conv, seq, msg_id, &state)?;
            Ok(true)
        })
    }

    /// A thread in the local history: the conversation of the message `root`, its sequence,
    /// then the sequences of its replies after `after`, oldest first, at most `limit` of them.
    /// `None` when this device does not hold `root`. (The reply references are sealed, so the
    /// conversation's states are opened one by one; a conversation's local history is bounded
    /// by what this device received.)
    pub fn thread(
        &self,
        root: &str,
        limit: u32,
        after: Option<u64>,
    ) -> Result<Option<(String, u64, Vec<u64>)>, E2eeError> {
        let found: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT conv, seq FROM conclave_msg_state WHERE msg_id = ?1 ORDER BY seq LIMIT 1",
                params![root],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((conv, root_seq)) = found else {
            return Ok(None);
        };
        let from = after.map_or(root_seq, |a| (a.min(i64::MAX as u64) as i64).max(root_seq));
        let candidates: Vec<i64> = {
            let mut st = self.conn.prepare_cached(
                "SELECT seq FROM conclave_msg_state WHERE conv = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            st.query_map(params![conv, from], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut replies = Vec::new();
        for seq in candidates {
            if replies.len() >= limit as usize {
                break;
            }
            let seq = seq as u64;
            if let Some((_, state)) = self.local_state(&conv, seq)?
                && state.reply_to.as_deref() == Some(root)
            {
                replies.push(seq);
            }
        }
        Ok(Some((conv, root_seq as u64, replies)))
    }
}
