//! The thread pane (pure): one message and the replies to it, shown under the conversation.
//!
//! It keeps its own [`Buffer`] (so replies are never shown twice and stay bounded) and its own
//! line states (edits, deletions and reactions apply to it as to the conversation). What is
//! typed while it is open answers in the thread.

use conclave_proto::Message;

use crate::acts::{self, Lines};
use crate::buffer::{Buffer, ConvKey, Entry};

/// Replies asked for when a thread opens (the server's page limit bounds it too).
pub const THREAD_PAGE: u32 = 200;

#[derive(Debug, Clone)]
pub struct ThreadPane {
    /// The conversation the thread is in.
    pub key: ConvKey,
    /// The message the replies answer.
    pub root: String,
    /// The root (once loaded) then the replies, oldest first.
    pub buffer: Buffer,
    lines: Lines,
    /// The thread's messages are still being fetched.
    pub loading: bool,
}

impl ThreadPane {
    pub fn new(key: ConvKey, root: String) -> ThreadPane {
        ThreadPane {
            buffer: Buffer::new(key.clone()),
            key,
            root,
            lines: Lines::new(),
            loading: true,
        }
    }

    /// Whether `m` belongs in this pane: the root, or a reply to it, in this conversation.
    pub fn holds(&self, key: &ConvKey, m: &Message) -> bool {
        key == &self.key
            && (m.msg_id == self.root
                || m.extra.as_ref().and_then(|x| x.reply_to.as_deref()) == Some(self.root.as_str()))
    }

    /// Adds a message of the thread (its state shown: edited, deleted, reactions).
    pub fn add(&mut self, m: &Message, me: &str) {
        let mut entry = Entry::message(m, me);
        let line = acts::line_of(m, &entry.text, None);
        entry.text = line.text();
        self.lines.insert(m.msg_id.clone(), line);
        if m.msg_id == self.root {
            // The root goes first, whenever it comes.
            let mut page = vec![entry];
            page.extend(self.buffer.entries.drain(..));
            let mut fresh = Buffer::new(self.key.clone());
            for e in page {
                fresh.push(e);
            }
            self.buffer = fresh;
        } else {
            self.buffer.push(entry);
        }
    }

    /// The first page of the thread came.
    pub fn loaded(&mut self, messages: &[Message], me: &str) {
        for m in messages {
            self.add(m, me);
        }
        self.loading = false;
    }

    /// An act (edit, delete, reaction) on one of the pane's messages.
    pub fn apply(&mut self, m: &Message) -> bool {
        acts::apply(&mut self.buffer, &mut self.lines, m)
    }

    /// Replies shown (the root is not one).
    pub fn replies(&self) -> usize {
        self.buffer
            .entries
            .iter()
            .filter(|e| e.msg_id() != Some(self.root.as_str()))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::chat::Extra;
    use conclave_proto::{Body, Conv};

    fn msg(id: &str, seq: u64, reply_to: Option<&str>) -> Message {
        Message {
            msg_id: id.into(),
            conv: Conv::Room("lab".into()),
            from: "bob".into(),
            seq,
            ts_ms: seq as i64,
            body: Body::text(id),
            extra: reply_to.map(|r| {
                Box::new(Extra {
                    reply_to: Some(r.into()),
                    ..Extra::default()
                })
            }),
        }
    }

    #[test]
    fn the_root_comes_first_and_nothing_twice() {
        let key = ConvKey::Room("lab".into());
        let mut p = ThreadPane::new(key.clone(), "r".into());
        let reply = msg("a", 2, Some("r"));
        assert!(p.holds(&key, &reply));
        assert!(!p.holds(&key, &msg("x", 3, None)));
        assert!(!p.holds(&ConvKey::Room("other".into()), &reply));
        // A live reply before the page, then the page with the root and that reply again.
        p.add(&reply, "alice");
        p.loaded(
            &[msg("r", 1, None), reply.clone(), msg("b", 4, Some("r"))],
            "alice",
        );
        let ids: Vec<_> = p.buffer.entries.iter().filter_map(|e| e.msg_id()).collect();
        assert_eq!(ids, vec!["r", "a", "b"]);
        assert_eq!(p.replies(), 2);
        assert!(!p.loading);
    }
}
