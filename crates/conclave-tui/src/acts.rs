//! Edits, deletes, reactions and replies as the screen shows them (pure).
//!
//! An act is not a line of its own: it changes the line of the message it names, if that is
//! loaded. A line shows the current text with "(edited)", "(deleted)" instead of a deleted
//! text, the reactions with their counts, and for a reply the quoted start of the original.

use std::collections::HashMap;

use conclave_proto::Message;
use conclave_proto::chat::{ActKind, MsgState};

use crate::buffer::{Buffer, EntryKind};
use crate::text::sanitize;

/// Characters of the original quoted in front of a reply.
pub const QUOTE_CHARS: usize = 30;

/// What a line is made of besides its text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineState {
    /// The text (sanitized), without decorations.
    pub base: String,
    /// The quote in front of a reply.
    pub quote: Option<String>,
    /// The message this one answers (a reply).
    pub reply_to: Option<String>,
    pub edited: bool,
    pub deleted: bool,
    pub reactions: Vec<(String, Vec<String>)>,
}

impl LineState {
    /// The line's text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if let Some(q) = &self.quote {
            out.push_str(q);
        }
        if self.deleted {
            out.push_str("(deleted)");
            return out;
        }
        out.push_str(&self.base);
        if self.edited {
            out.push_str(" (edited)");
        }
        if !self.reactions.is_empty() {
            let r: Vec<String> = self
                .reactions
                .iter()
                .map(|(e, users)| format!("{} {}", sanitize(e, false), users.len()))
                .collect();
            out.push_str(&format!("  [{}]", r.join(" ")));
        }
        out
    }
}

/// The lines' states of one buffer, by message id (only lines that have one).
pub type Lines = HashMap<String, LineState>;

/// The quote of a reply to `reply_to`, from the buffer if the original is loaded.
pub fn quote(buffer: &Buffer, lines: &Lines, reply_to: &str) -> String {
    let original = buffer.entries.iter().find(|e| e.msg_id() == Some(reply_to));
    match original {
        Some(e) => {
            let from = match &e.kind {
                EntryKind::Message { from, .. } => from.as_str(),
                EntryKind::Notice(_) => "",
            };
            let text = lines
                .get(reply_to)
                .map(|l| {
                    if l.deleted {
                        "(deleted)".to_string()
                    } else {
                        l.base.clone()
                    }
                })
                .unwrap_or_else(|| e.text.clone());
            let mut start: String = text.chars().take(QUOTE_CHARS).collect();
            if text.chars().count() > QUOTE_CHARS {
                start.push('…');
            }
            format!("↪ {from}: {} │ ", start.replace('\n', " "))
        }
        None => "↪ (an earlier message) │ ".to_string(),
    }
}

/// The state of a message as it arrives (history items carry their state).
pub fn line_of(m: &Message, base: &str, quote: Option<String>) -> LineState {
    let state: MsgState = m
        .extra
        .as_ref()
        .and_then(|x| x.state.clone())
        .unwrap_or_default();
    LineState {
        base: base.to_string(),
        quote,
        reply_to: m.extra.as_ref().and_then(|x| x.reply_to.clone()),
        edited: state.edits > 0,
        deleted: state.deleted,
        reactions: state
            .reactions
            .into_iter()
            .map(|r| (r.emoji, r.users))
            .collect(),
    }
}

/// Applies an act to the line it names in `buffer`; returns whether a line changed.
pub fn apply(buffer: &mut Buffer, lines: &mut Lines, m: &Message) -> bool {
    let Some(act) = m.extra.as_ref().and_then(|x| x.acts_on.as_ref()) else {
        return false;
    };
    let Some(entry) = buffer
        .entries
        .iter_mut()
        .find(|e| e.msg_id() == Some(act.msg_id.as_str()))
    else {
        return false;
    };
    let line = lines
        .entry(act.msg_id.clone())
        .or_insert_with(|| LineState {
            base: entry.text.clone(),
            ..LineState::default()
        });
    let content = m.body.as_text().unwrap_or("");
    match act.kind {
        ActKind::Edit => {
            if content.is_empty() {
                // Superseded by a later act (a catch-up after being away).
                return false;
            }
            line.base = sanitize(content, true);
            line.edited = true;
        }
        ActKind::Delete => {
            line.deleted = true;
            line.reactions.clear();
        }
        ActKind::React | ActKind::Unreact => {
            let on = act.kind == ActKind::React;
            let pos = line.reactions.iter().position(|(e, _)| e == content);
            match (pos, on) {
                (Some(i), true) => {
                    if !line.reactions[i].1.contains(&m.from) {
                        line.reactions[i].1.push(m.from.clone());
                    }
                }
                (None, true) => line
                    .reactions
                    .push((content.to_string(), vec![m.from.clone()])),
                (Some(i), false) => {
                    line.reactions[i].1.retain(|u| u != &m.from);
                    if line.reactions[i].1.is_empty() {
                        line.reactions.remove(i);
                    }
                }
                (None, false) => {}
            }
        }
    }
    entry.text = line.text();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{ConvKey, Entry};
    use conclave_proto::chat::{ActsOn, Extra};
    use conclave_proto::{Body, Conv};

    fn msg(id: &str, from: &str, text: &str, act: Option<(&str, ActKind)>) -> Message {
        Message {
            msg_id: id.into(),
            conv: Conv::Room("general".into()),
            from: from.into(),
            seq: 1,
            ts_ms: 0,
            body: Body::text(text),
            extra: act.map(|(t, kind)| {
                Box::new(Extra {
                    acts_on: Some(ActsOn {
                        msg_id: t.into(),
                        kind,
                    }),
                    ..Extra::default()
                })
            }),
        }
    }

    #[test]
    fn acts_change_the_line_they_name() {
        let mut b = Buffer::new(ConvKey::Room("general".into()));
        let mut lines = Lines::new();
        b.push(Entry::message(
            &msg("m1", "alice", "deploy at fiev", None),
            "bob",
        ));
        assert!(apply(
            &mut b,
            &mut lines,
            &msg("a1", "alice", "deploy at five", Some(("m1", ActKind::Edit)))
        ));
        assert_eq!(b.entries[0].text, "deploy at five (edited)");
        apply(
            &mut b,
            &mut lines,
            &msg("a2", "bob", "👍", Some(("m1", ActKind::React))),
        );
        apply(
            &mut b,
            &mut lines,
            &msg("a3", "carol", "👍", Some(("m1", ActKind::React))),
        );
        assert_eq!(b.entries[0].text, "deploy at five (edited)  [👍 2]");
        apply(
            &mut b,
            &mut lines,
            &msg("a4", "bob", "👍", Some(("m1", ActKind::Unreact))),
        );
        assert_eq!(b.entries[0].text, "deploy at five (edited)  [👍 1]");
        apply(
            &mut b,
            &mut lines,
            &msg("a5", "alice", "", Some(("m1", ActKind::Delete))),
        );
        assert_eq!(b.entries[0].text, "(deleted)");
        // An act on a message not loaded changes nothing.
        assert!(!apply(
            &mut b,
            &mut lines,
            &msg("a6", "alice", "x", Some(("zz", ActKind::Edit)))
        ));
        let q = quote(&b, &lines, "m1");
        assert_eq!(q, "↪ alice: (deleted) │ ");
    }
}
