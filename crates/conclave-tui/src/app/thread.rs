//! Choosing a message and opening its thread: Alt-Up / Alt-Down select a message of the
//! conversation (Esc lets go), `/reply`, `/edit`, `/delete`, `/react` and `/thread` act on the
//! selected message (else on the last suitable one), and `/thread` opens the thread pane, where
//! what is typed answers the thread's first message.

use conclave_client::proto::{Message, Reply, Request};

use super::{Action, App, Failure, Pending};
use crate::buffer::{ConvKey, Entry, EntryKind};
use crate::layout;
use crate::thread::{THREAD_PAGE, ThreadPane};
use crate::view;

/// A test of an entry for a command (the entry, my name).
pub(super) type Pick = fn(&Entry, &str) -> bool;

impl App {
    /// Moves the selection one message up (older) or down; down past the newest lets go.
    pub(super) fn select_message(&mut self, up: bool) {
        let i = self.current.min(self.buffers.len() - 1);
        let b = &mut self.buffers[i];
        let with_ids: Vec<usize> = (0..b.entries.len())
            .filter(|&n| b.entries[n].msg_id().is_some())
            .collect();
        let at = b.selected.as_deref().and_then(|id| {
            with_ids
                .iter()
                .position(|&n| b.entries[n].msg_id() == Some(id))
        });
        let next = match (at, up) {
            (None, true) => with_ids.last().copied(),
            (None, false) => None,
            (Some(p), true) => with_ids.get(p.saturating_sub(1)).copied(),
            (Some(p), false) => with_ids.get(p + 1).copied(),
        };
        b.selected = next.and_then(|n| b.entries[n].msg_id().map(str::to_string));
        let seq = next.and_then(|n| b.entries[n].seq());
        match seq {
            Some(seq) => self.keep_in_view(i, seq),
            None => self.buffers[i].scroll = 0,
        }
    }

    /// Scrolls buffer `i` only as far as needed for the message `seq` to be in view.
    fn keep_in_view(&mut self, i: usize, seq: u64) {
        let width = layout::chat_width(self.size, self.members_visible_for(i));
        let mut rows = layout::chat_rows(self.size);
        if self.thread_shown_for(i) {
            rows = layout::thread_split(rows as u16).0 as usize;
        }
        let tz = self.tz.clone();
        let b = &mut self.buffers[i];
        if let Some(below) = view::rows_from(b, seq, width, &tz) {
            // The first row of the message between `scroll` and `scroll + rows` from the bottom.
            if below <= b.scroll {
                b.scroll = below.saturating_sub(1);
            } else if below > b.scroll + rows {
                b.scroll = below - rows;
            }
        }
    }

    /// Who reacted to the selected message, with what: "👍 bob, carol · 🎉 dave".
    pub fn selected_reactions(&self) -> Option<String> {
        let b = self.current_buffer();
        let line = self.lines.get(&b.key)?.get(b.selected.as_deref()?)?;
        if line.reactions.is_empty() {
            return None;
        }
        let names = self.nick_labels();
        let parts: Vec<String> = line
            .reactions
            .iter()
            .map(|(emoji, users)| {
                let who: Vec<&str> = users
                    .iter()
                    .map(|u| names.get(u).map_or(u.as_str(), String::as_str))
                    .collect();
                format!("{} {}", crate::text::sanitize(emoji, false), who.join(", "))
            })
            .collect();
        Some(parts.join(" · "))
    }

    /// Whether the thread pane is shown under buffer `i`.
    pub fn thread_shown_for(&self, i: usize) -> bool {
        match (&self.thread, self.buffers.get(i)) {
            (Some(p), Some(b)) => p.key == b.key,
            _ => false,
        }
    }

    /// The message a command acts on: the selected one when it passes `selected` (else an
    /// error saying why), otherwise the newest that passes `last`.
    pub(super) fn target_message(
        &self,
        selected: Pick,
        last: Pick,
        what: &str,
    ) -> Result<String, String> {
        let me = self.me();
        let b = self.current_buffer();
        if let Some(id) = &b.selected
            && let Some(e) = b.entries.iter().find(|e| e.msg_id() == Some(id.as_str()))
        {
            return if selected(e, me) {
                Ok(id.clone())
            } else {
                Err(format!(
                    "the selected message is not a {what} (Esc lets go of it)"
                ))
            };
        }
        b.entries
            .iter()
            .rev()
            .find(|e| e.msg_id().is_some() && last(e, me))
            .and_then(|e| e.msg_id().map(str::to_string))
            .ok_or_else(|| format!("there is no {what} here yet"))
    }

    /// `/thread`: opens the selected message's thread (the thread it is in, for a reply), or
    /// closes the pane.
    pub(super) fn toggle_thread(&mut self) -> Vec<Action> {
        if self.thread.take().is_some() && self.current_buffer().selected.is_none() {
            return Vec::new();
        }
        let key = self.current_buffer().key.clone();
        let Some(id) = self.current_buffer().selected.clone() else {
            self.error("select a message first (Alt-Up), then /thread");
            return Vec::new();
        };
        let root = self
            .lines
            .get(&key)
            .and_then(|l| l.get(&id))
            .and_then(|l| l.reply_to.clone())
            .unwrap_or(id);
        self.buffers[self.current].selected = None;
        self.thread = Some(ThreadPane::new(key.clone(), root.clone()));
        vec![self.request(
            Pending::Thread {
                key,
                root: root.clone(),
            },
            Request::Thread {
                msg_id: root,
                limit: THREAD_PAGE,
                after: None,
            },
        )]
    }

    /// The thread's first page came (or could not be read).
    pub(super) fn thread_page(
        &mut self,
        key: ConvKey,
        root: String,
        result: Result<Reply, Failure>,
    ) -> Vec<Action> {
        let me = self.me().to_string();
        match result {
            Ok(Reply::Messages(messages)) => {
                if let Some(p) = &mut self.thread
                    && p.key == key
                    && p.root == root
                {
                    p.loaded(&messages, &me);
                }
            }
            Ok(_) => self.error("the server answered the thread with an unexpected reply"),
            Err(f) => {
                if self.thread.as_ref().is_some_and(|p| p.root == root) {
                    self.thread = None;
                }
                self.error(&format!("cannot open the thread: {}", f.message));
            }
        }
        Vec::new()
    }

    /// A message or act arrived in `key`: the thread pane shows it if it is the thread's.
    pub(super) fn thread_event(&mut self, key: &ConvKey, m: &Message) {
        let me = self.me().to_string();
        let Some(p) = &mut self.thread else { return };
        if m.extra.as_ref().is_some_and(|x| x.acts_on.is_some()) {
            if &p.key == key {
                p.apply(m);
            }
        } else if p.holds(key, m) {
            p.add(m, &me);
        }
    }

    /// What I type while the pane is open goes to the thread, when the pane is shown.
    pub(super) fn thread_root_for_typing(&self) -> Option<(ConvKey, String)> {
        let p = self.thread.as_ref()?;
        self.thread_shown_for(self.current)
            .then(|| (p.key.clone(), p.root.clone()))
    }

    /// My reply, under way, also shows in the pane.
    pub(super) fn thread_mine(&mut self, key: &ConvKey, root: &str, entry: &Entry) {
        if let Some(p) = &mut self.thread
            && &p.key == key
            && p.root == root
        {
            p.buffer.push(entry.clone());
        }
    }

    /// The receipt (or failure) of my send `local`, for the pane's copy.
    pub(super) fn thread_receipt(&mut self, local: u64, sent: Option<(&str, u64, i64)>) {
        if let Some(p) = &mut self.thread {
            match sent {
                Some((msg_id, seq, ts_ms)) => p.buffer.confirm_send(local, msg_id, seq, ts_ms),
                None => p.buffer.fail_send(local),
            }
        }
    }
}

/// Picks: any message; one of mine; one from someone else.
pub(super) fn any(e: &Entry, _: &str) -> bool {
    matches!(e.kind, EntryKind::Message { .. })
}

pub(super) fn mine(e: &Entry, me: &str) -> bool {
    matches!(&e.kind, EntryKind::Message { from, .. } if from == me)
}

pub(super) fn others(e: &Entry, me: &str) -> bool {
    matches!(&e.kind, EntryKind::Message { from, .. } if from != me)
}
