//! Conversations as the screen keeps them: one [`Buffer`] per room or direct conversation,
//! plus the status buffer, each a bounded list of [`Entry`]s.
//!
//! Messages are never shown twice: an entry with a message id that is already in the buffer
//! is dropped (the client library already drops duplicate events; this also covers history
//! pages that overlap what arrived live). Older history is put in front; live messages at the
//! end, in the order the library delivers them (sequence order per conversation).

use std::collections::{BTreeMap, HashSet, VecDeque};

use conclave_proto::chat::TextKind;
use conclave_proto::{Conv, ConvRef, Message, Target};

use crate::text::sanitize;

/// Most entries a buffer keeps; the oldest go first (scrolling up loads them again).
pub const MAX_ENTRIES_PER_BUFFER: usize = 10_000;

/// Which conversation a buffer shows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvKey {
    /// The client's own buffer: server notices, command output with no conversation.
    Status,
    /// A room (canonical name).
    Room(String),
    /// A direct conversation, named by the *other* participants (sorted, canonical); a note to
    /// oneself is `[me]`.
    Direct(Vec<String>),
}

impl ConvKey {
    /// The key of a protocol conversation, seen by `me`.
    pub fn from_conv(conv: &Conv, me: &str) -> ConvKey {
        match conv {
            Conv::Room(room) => ConvKey::Room(room.clone()),
            Conv::Direct(people) => {
                let others: Vec<String> = people.iter().filter(|p| *p != me).cloned().collect();
                if others.is_empty() {
                    ConvKey::Direct(vec![me.to_string()])
                } else {
                    ConvKey::Direct(others)
                }
            }
        }
    }

    /// How the sidebar and the status bar name it: `#room`, `@bob,carol`.
    pub fn label(&self) -> String {
        match self {
            ConvKey::Status => "conclave".to_string(),
            ConvKey::Room(room) => format!("#{room}"),
            ConvKey::Direct(people) => format!("@{}", people.join(",")),
        }
    }

    pub fn room(&self) -> Option<&str> {
        match self {
            ConvKey::Room(room) => Some(room),
            _ => None,
        }
    }

    /// Where a message typed in this buffer goes.
    pub fn target(&self, except: Vec<String>) -> Option<Target> {
        match self {
            ConvKey::Status => None,
            ConvKey::Room(room) => Some(Target::Room {
                room: room.clone(),
                except,
            }),
            ConvKey::Direct(people) => Some(Target::Users { to: people.clone() }),
        }
    }

    /// The conversation for a history request.
    pub fn conv_ref(&self) -> Option<ConvRef> {
        match self {
            ConvKey::Status => None,
            ConvKey::Room(room) => Some(ConvRef::Room(room.clone())),
            ConvKey::Direct(people) => Some(ConvRef::With(people.clone())),
        }
    }
}

/// The state of one of my own sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendState {
    /// Stored by the server (or someone else's message).
    Delivered,
    /// Waiting for the server's receipt; the number ties the receipt to the entry.
    Sending(u64),
    /// Refused or lost (a notice says why).
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Info,
    Error,
    Join,
    Part,
    Kick,
    Announce,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Message {
        from: String,
        msg_id: Option<String>,
        seq: Option<u64>,
        state: SendState,
    },
    Notice(NoticeKind),
}

/// One thing shown in a conversation. `text` is sanitized (newlines kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ts_ms: i64,
    pub kind: EntryKind,
    pub text: String,
    /// The text names me.
    pub mention: bool,
    /// An action (`/me`): shown as "* alice waves" (`text` starts with the sender's name).
    pub action: bool,
    /// Styles of a formatted (Markdown) message over `text`; empty for plain text.
    pub styles: Vec<crate::markdown::StyleRun>,
}

impl Entry {
    pub fn notice(ts_ms: i64, kind: NoticeKind, text: &str) -> Entry {
        Entry {
            ts_ms,
            kind: EntryKind::Notice(kind),
            text: sanitize(text, true),
            mention: false,
            action: false,
            styles: Vec::new(),
        }
    }

    /// One of my own sends as it is shown while under way (and after).
    pub fn mine(ts_ms: i64, me: &str, text: &str, kind: TextKind, local: u64) -> Entry {
        let (text, styles) = shown_text(me, text, kind);
        Entry {
            ts_ms,
            kind: EntryKind::Message {
                from: me.to_string(),
                msg_id: None,
                seq: None,
                state: SendState::Sending(local),
            },
            text,
            mention: false,
            action: kind.action,
            styles,
        }
    }

    /// A stored message; `me` decides mentions.
    pub fn message(m: &Message, me: &str) -> Entry {
        let kind = m.body.text_kind().unwrap_or_default();
        let (text, styles) = match m.body.as_text() {
            Some(text) => shown_text(&m.from, text, kind),
            None => (
                format!(
                    "[{} bytes of {}]",
                    m.body.data.len(),
                    sanitize(&m.body.content_type, false)
                ),
                Vec::new(),
            ),
        };
        let mention = m.from != me && mentions(&outside_code(&text, &styles), me);
        Entry {
            ts_ms: m.ts_ms,
            kind: EntryKind::Message {
                from: m.from.clone(),
                msg_id: Some(m.msg_id.clone()),
                seq: Some(m.seq),
                state: SendState::Delivered,
            },
            text,
            mention,
            action: kind.action,
            styles,
        }
    }

    pub fn msg_id(&self) -> Option<&str> {
        match &self.kind {
            EntryKind::Message {
                msg_id: Some(id), ..
            } => Some(id),
            _ => None,
        }
    }

    pub fn seq(&self) -> Option<u64> {
        match &self.kind {
            EntryKind::Message { seq, .. } => *seq,
            _ => None,
        }
    }
}

/// What a text message shows: sanitized text (rendered, for Markdown), its styles, and for an
/// action the sender's name in front.
fn shown_text(from: &str, text: &str, kind: TextKind) -> (String, Vec<crate::markdown::StyleRun>) {
    let (mut shown, mut styles) = if kind.markdown {
        crate::markdown::render(text)
    } else {
        (sanitize(text, true), Vec::new())
    };
    if kind.action {
        let prefix = format!("{from} ");
        let n = prefix.chars().count();
        for r in &mut styles {
            r.start += n;
            r.end += n;
        }
        shown.insert_str(0, &prefix);
    }
    (shown, styles)
}

/// The rendered text with its code spans and blocks blanked (a name in code is no mention).
fn outside_code(text: &str, styles: &[crate::markdown::StyleRun]) -> String {
    if !styles.iter().any(|r| r.marks.code) {
        return text.to_string();
    }
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            let code = styles
                .iter()
                .any(|r| r.marks.code && r.start <= i && i < r.end);
            if code { ' ' } else { c }
        })
        .collect()
}

/// Whether `text` names `me` as a word (case does not matter; `@me` counts).
pub fn mentions(text: &str, me: &str) -> bool {
    if me.is_empty() {
        return false;
    }
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !is_name_char(c))
        .any(|word| word.trim_end_matches(['.', '-']) == me)
}

/// Presence of a member as last heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Presence {
    pub online: bool,
    pub admin: bool,
}

/// Whether older history can still be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryState {
    /// Unknown: more may exist.
    #[default]
    More,
    /// A request is under way.
    Loading,
    /// The beginning of the conversation is loaded.
    Complete,
}

#[derive(Debug, Clone)]
pub struct Buffer {
    pub key: ConvKey,
    pub entries: VecDeque<Entry>,
    ids: HashSet<String>,
    /// Messages that came while another buffer was shown.
    pub unread: u32,
    /// One of them names me (or it is a direct conversation).
    pub mention: bool,
    /// How many of them mention me (counted apart from `unread`).
    pub mentions: u32,
    /// Rooms: members and their presence.
    pub members: BTreeMap<String, Presence>,
    pub history: HistoryState,
    /// Rows scrolled up from the bottom (0: following new messages).
    pub scroll: usize,
    /// A message to bring into view once loaded (a search result jumped to).
    pub jump_to: Option<u64>,
    /// The entry to highlight (the search result jumped to).
    pub highlight: Option<String>,
    /// The message chosen with Alt-Up / Alt-Down, which `/reply`, `/edit`, `/delete`,
    /// `/react` and `/thread` act on.
    pub selected: Option<String>,
}

impl Buffer {
    pub fn new(key: ConvKey) -> Buffer {
        Buffer {
            key,
            entries: VecDeque::new(),
            ids: HashSet::new(),
            unread: 0,
            mention: false,
            mentions: 0,
            members: BTreeMap::new(),
            history: HistoryState::More,
            scroll: 0,
            jump_to: None,
            highlight: None,
            selected: None,
        }
    }

    /// The smallest sequence number loaded (where the next history page ends).
    pub fn oldest_seq(&self) -> Option<u64> {
        self.entries.iter().filter_map(Entry::seq).min()
    }

    pub fn has_seq(&self, seq: u64) -> bool {
        self.entries.iter().any(|e| e.seq() == Some(seq))
    }

    /// Appends; false (and nothing changes) if the message is already here.
    pub fn push(&mut self, entry: Entry) -> bool {
        if let Some(id) = entry.msg_id() {
            if self.ids.contains(id) {
                return false;
            }
            self.ids.insert(id.to_string());
        }
        self.entries.push_back(entry);
        while self.entries.len() > MAX_ENTRIES_PER_BUFFER {
            if let Some(old) = self.entries.pop_front()
                && let Some(id) = old.msg_id()
            {
                self.ids.remove(id);
            }
            self.history = HistoryState::More;
        }
        true
    }

    /// Puts a page of older messages (oldest first) in front. An empty page, or one that
    /// starts at the first message, means the beginning was reached; a shorter page than asked
    /// does not (the server cuts pages of large messages). Returns how many were new.
    pub fn prepend_history(&mut self, page: Vec<Entry>) -> usize {
        let reached_start =
            page.is_empty() || page.first().and_then(Entry::seq).is_some_and(|s| s <= 1);
        let room = MAX_ENTRIES_PER_BUFFER.saturating_sub(self.entries.len());
        let fresh: Vec<Entry> = page
            .into_iter()
            .filter(|e| e.msg_id().is_none_or(|id| !self.ids.contains(id)))
            .collect();
        let skip = fresh.len().saturating_sub(room);
        let added = fresh.len() - skip;
        for entry in fresh.into_iter().skip(skip).rev() {
            if let Some(id) = entry.msg_id() {
                self.ids.insert(id.to_string());
            }
            self.entries.push_front(entry);
        }
        self.history = if reached_start && skip == 0 {
            HistoryState::Complete
        } else {
            HistoryState::More
        };
        added
    }

    /// The receipt for my send number `local` came: the entry gets its id and position.
    pub fn confirm_send(&mut self, local: u64, msg_id: &str, seq: u64, ts_ms: i64) {
        let duplicate = self.ids.contains(msg_id);
        let position = self.entries.iter().position(|e| {
            matches!(&e.kind, EntryKind::Message { state: SendState::Sending(n), .. } if *n == local)
        });
        let Some(position) = position else { return };
        if duplicate {
            // Already here (a history page brought it first): keep one.
            self.entries.remove(position);
            return;
        }
        if let Some(entry) = self.entries.get_mut(position) {
            entry.ts_ms = ts_ms;
            if let EntryKind::Message {
                msg_id: id,
                seq: s,
                state,
                ..
            } = &mut entry.kind
            {
                *id = Some(msg_id.to_string());
                *s = Some(seq);
                *state = SendState::Delivered;
            }
            self.ids.insert(msg_id.to_string());
        }
    }

    /// My send number `local` failed.
    pub fn fail_send(&mut self, local: u64) {
        for e in self.entries.iter_mut() {
            if let EntryKind::Message { state, .. } = &mut e.kind
                && *state == SendState::Sending(local)
            {
                *state = SendState::Failed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::Body;

    fn msg(seq: u64, from: &str, text: &str) -> Message {
        Message {
            msg_id: format!("id-{seq}"),
            conv: Conv::Room("general".into()),
            from: from.into(),
            seq,
            ts_ms: 1_700_000_000_000 + seq as i64,
            body: Body::text(text),
            extra: None,
        }
    }

    #[test]
    fn keys_name_the_other_people() {
        let conv = Conv::Direct(vec!["alice".into(), "bob".into(), "carol".into()]);
        assert_eq!(
            ConvKey::from_conv(&conv, "bob"),
            ConvKey::Direct(vec!["alice".into(), "carol".into()])
        );
        let me = Conv::Direct(vec!["bob".into()]);
        assert_eq!(
            ConvKey::from_conv(&me, "bob"),
            ConvKey::Direct(vec!["bob".into()])
        );
        assert_eq!(
            ConvKey::Direct(vec!["a".into(), "b".into()]).label(),
            "@a,b"
        );
        assert_eq!(ConvKey::Room("ops".into()).label(), "#ops");
    }

    #[test]
    fn mentions_are_whole_names() {
        assert!(mentions("hey Alice, look", "alice"));
        assert!(mentions("@alice: ping", "alice"));
        assert!(mentions("alice.", "alice"));
        assert!(!mentions("malice aforethought", "alice"));
        assert!(!mentions("alice2 is here", "alice"));
        // Not in code.
        let mut m = msg(1, "bob", "try `alice --help` or\n```\nalice\n```");
        m.body.content_type = conclave_proto::chat::CONTENT_TYPE_MARKDOWN.into();
        assert!(!Entry::message(&m, "alice").mention);
        m.body.data = b"**alice**, see `x`".to_vec();
        assert!(Entry::message(&m, "alice").mention);
    }

    #[test]
    fn history_and_live_never_double() {
        let mut b = Buffer::new(ConvKey::Room("general".into()));
        // Caught up: 4 and 5 came live.
        for s in [4, 5] {
            assert!(b.push(Entry::message(&msg(s, "bob", "x"), "alice")));
        }
        assert!(!b.push(Entry::message(&msg(5, "bob", "x"), "alice")));
        // A page that overlaps: 2..=5, shorter than asked, which does not say it is the
        // start (a page of large messages is cut short too); an empty page does.
        let page: Vec<Entry> = (2..=5)
            .map(|s| Entry::message(&msg(s, "bob", "x"), "alice"))
            .collect();
        assert_eq!(b.prepend_history(page), 2);
        let seqs: Vec<u64> = b.entries.iter().filter_map(Entry::seq).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        assert_eq!(b.history, HistoryState::More);
        assert_eq!(b.prepend_history(Vec::new()), 0);
        assert_eq!(b.history, HistoryState::Complete);
        assert_eq!(b.oldest_seq(), Some(2));
        // A page that starts at the first message is the start.
        let mut c = Buffer::new(ConvKey::Room("general".into()));
        let page: Vec<Entry> = (1..=3)
            .map(|s| Entry::message(&msg(s, "bob", "x"), "alice"))
            .collect();
        assert_eq!(c.prepend_history(page), 3);
        assert_eq!(c.history, HistoryState::Complete);
    }

    #[test]
    fn my_send_is_confirmed_once() {
        let mut b = Buffer::new(ConvKey::Room("general".into()));
        let mine = Entry {
            ts_ms: 0,
            kind: EntryKind::Message {
                from: "alice".into(),
                msg_id: None,
                seq: None,
                state: SendState::Sending(7),
            },
            text: "hi".into(),
            mention: false,
            action: false,
            styles: Vec::new(),
        };
        b.push(mine.clone());
        b.confirm_send(7, "id-9", 9, 42);
        assert_eq!(b.entries[0].seq(), Some(9));
        assert_eq!(b.entries[0].ts_ms, 42);
        // A history page that holds it adds nothing.
        assert_eq!(
            b.prepend_history(vec![Entry::message(&msg(9, "alice", "hi"), "alice")]),
            0
        );
        assert_eq!(b.entries.len(), 1);
        // A receipt for a message a page already brought removes the pending copy.
        b.push(Entry {
            kind: EntryKind::Message {
                from: "alice".into(),
                msg_id: None,
                seq: None,
                state: SendState::Sending(8),
            },
            ..mine
        });
        b.confirm_send(8, "id-9", 9, 42);
        assert_eq!(b.entries.len(), 1);
        b.fail_send(8);
    }

    #[test]
    fn buffers_are_bounded() {
        let mut b = Buffer::new(ConvKey::Room("general".into()));
        for s in 1..=(MAX_ENTRIES_PER_BUFFER as u64 + 5) {
            b.push(Entry::message(&msg(s, "bob", "x"), "alice"));
        }
        assert_eq!(b.entries.len(), MAX_ENTRIES_PER_BUFFER);
        assert_eq!(b.oldest_seq(), Some(6));
        assert_eq!(b.history, HistoryState::More);
        // A full buffer takes no more history.
        let page = vec![Entry::message(&msg(5, "bob", "x"), "alice")];
        assert_eq!(b.prepend_history(page), 0);
    }
}
