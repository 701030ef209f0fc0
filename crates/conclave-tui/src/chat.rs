//! Everyday chat's presence side as the screen keeps it (issue #20, part B): topics, who is
//! typing, read markers ("read by"), away messages, display names, muted conversations, and
//! when to send this user's own typing notices and read markers. Pure: time passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use conclave_proto::chat::{DEFAULT_TYPING_INTERVAL_MS, TYPING_SHOWN_MS};

use crate::buffer::ConvKey;

/// Most people shown typing in one conversation (the rest are "and others").
pub const MAX_TYPING_SHOWN: usize = 3;
/// Most read markers kept per conversation (a room's members who share them).
pub const MAX_READERS_PER_CONV: usize = 10_000;

#[derive(Debug, Clone)]
pub struct ChatState {
    /// Ring the terminal bell on a mention (`--no-bell` turns it off).
    pub bell: bool,
    /// Put mentions in the terminal window's title (`--no-title` turns it off).
    pub set_title: bool,
    /// Room → topic.
    pub topics: HashMap<String, String>,
    /// Room → owner (for `@room`).
    pub owners: HashMap<String, String>,
    /// User → away message (while they are away).
    pub away: HashMap<String, String>,
    /// User → display name.
    pub display_names: HashMap<String, String>,
    /// Conversation → (user → shown typing until, ms).
    typing: HashMap<ConvKey, BTreeMap<String, i64>>,
    /// Conversation → (user → newest sequence number read).
    reads: HashMap<ConvKey, BTreeMap<String, u64>>,
    /// Conversations whose mentions neither ring nor change the title.
    pub muted: HashSet<ConvKey>,
    /// The last typing notice sent: where and when.
    typing_sent: Option<(ConvKey, i64)>,
    /// The read marker last sent per conversation.
    read_sent: HashMap<ConvKey, u64>,
    /// The title last set (`None`: never set).
    pub title: Option<String>,
}

impl Default for ChatState {
    fn default() -> Self {
        ChatState {
            bell: true,
            set_title: true,
            topics: HashMap::new(),
            owners: HashMap::new(),
            away: HashMap::new(),
            display_names: HashMap::new(),
            typing: HashMap::new(),
            reads: HashMap::new(),
            muted: HashSet::new(),
            typing_sent: None,
            read_sent: HashMap::new(),
            title: None,
        }
    }
}

impl ChatState {
    /// `user` is typing in `key` (a notice came at `now_ms`).
    pub fn on_typing(&mut self, key: ConvKey, user: &str, now_ms: i64) {
        let map = self.typing.entry(key).or_default();
        map.retain(|_, until| *until > now_ms);
        map.insert(user.to_string(), now_ms + TYPING_SHOWN_MS);
    }

    /// A message from `user` in `key`: they are done typing it.
    pub fn on_message(&mut self, key: &ConvKey, user: &str) {
        if let Some(map) = self.typing.get_mut(key) {
            map.remove(user);
        }
    }

    /// Who is typing in `key` at `now_ms`, sorted.
    pub fn typing_in(&self, key: &ConvKey, now_ms: i64) -> Vec<&str> {
        self.typing.get(key).map_or_else(Vec::new, |m| {
            m.iter()
                .filter(|(_, until)| **until > now_ms)
                .map(|(u, _)| u.as_str())
                .collect()
        })
    }

    /// The line under a conversation: "bob is typing…", "bob and carol are typing…".
    pub fn typing_line(&self, key: &ConvKey, now_ms: i64) -> Option<String> {
        let who = self.typing_in(key, now_ms);
        match who.as_slice() {
            [] => None,
            [one] => Some(format!("{one} is typing…")),
            [a, b] => Some(format!("{a} and {b} are typing…")),
            many if many.len() <= MAX_TYPING_SHOWN => Some(format!(
                "{} and {} are typing…",
                many[..many.len() - 1].join(", "),
                many[many.len() - 1]
            )),
            many => Some(format!(
                "{} and {} others are typing…",
                many[..MAX_TYPING_SHOWN].join(", "),
                many.len() - MAX_TYPING_SHOWN
            )),
        }
    }

    /// Whether to tell the server this user is typing in `key` now (at most once per
    /// typing interval, the server's default).
    pub fn should_send_typing(&mut self, key: &ConvKey, now_ms: i64) -> bool {
        let interval = i64::try_from(DEFAULT_TYPING_INTERVAL_MS).unwrap_or(i64::MAX);
        if let Some((k, at)) = &self.typing_sent
            && k == key
            && now_ms < at.saturating_add(interval)
        {
            return false;
        }
        self.typing_sent = Some((key.clone(), now_ms));
        true
    }

    /// A sent message ends this user's typing: the next keystroke may say so again.
    pub fn sent_message(&mut self) {
        self.typing_sent = None;
    }

    /// `user` read `key` up to `seq` (markers only move forward).
    pub fn on_read(&mut self, key: ConvKey, user: &str, seq: u64) {
        let map = self.reads.entry(key).or_default();
        if map.len() >= MAX_READERS_PER_CONV && !map.contains_key(user) {
            return;
        }
        let m = map.entry(user.to_string()).or_insert(0);
        *m = (*m).max(seq);
    }

    /// Who (other than `me`) has read `key` up to `seq` or further, sorted.
    pub fn read_by(&self, key: &ConvKey, seq: u64, me: &str) -> Vec<&str> {
        self.reads.get(key).map_or_else(Vec::new, |m| {
            m.iter()
                .filter(|(u, s)| **s >= seq && u.as_str() != me)
                .map(|(u, _)| u.as_str())
                .collect()
        })
    }

    /// The read marker to send for `key` whose newest message is `newest`, if it moved.
    pub fn read_to_send(&mut self, key: &ConvKey, newest: u64) -> Option<u64> {
        let sent = self.read_sent.get(key).copied().unwrap_or(0);
        if newest > sent {
            self.read_sent.insert(key.clone(), newest);
            Some(newest)
        } else {
            None
        }
    }

    /// A name as the members pane and `who` show it: "Bob B. (bob)" with a display name.
    pub fn shown_name(&self, user: &str) -> String {
        match self.display_names.get(user) {
            Some(d) => format!("{} ({user})", crate::text::sanitize(d, false)),
            None => user.to_string(),
        }
    }

    /// The names shown beside messages, by account: the display name where it cannot be
    /// mistaken for someone else (no other account is called that and no one else shows the
    /// same name); other accounts show their account name. `accounts`: the account names known.
    pub fn nick_labels(&self, accounts: &BTreeSet<String>) -> HashMap<String, String> {
        let mut uses: HashMap<String, usize> = HashMap::new();
        for d in self.display_names.values() {
            *uses.entry(d.trim().to_lowercase()).or_default() += 1;
        }
        self.display_names
            .iter()
            .filter_map(|(user, d)| {
                let low = d.trim().to_lowercase();
                let taken = (accounts.contains(&low) || self.display_names.contains_key(&low))
                    && low != *user;
                let shown = crate::text::sanitize(d.trim(), false);
                (uses.get(&low) == Some(&1) && !taken && !shown.is_empty())
                    .then(|| (user.clone(), shown))
            })
            .collect()
    }

    /// The window title for this many mentions waiting.
    pub fn title_for(mentions: u32, latest: Option<&str>) -> String {
        match (mentions, latest) {
            (0, _) => "conclave".to_string(),
            (n, Some(where_)) => format!("conclave · {n} mention(s), latest in {where_}"),
            (n, None) => format!("conclave · {n} mention(s)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> ConvKey {
        ConvKey::Room("general".into())
    }

    #[test]
    fn display_names_beside_messages_cannot_pass_for_someone_else() {
        let mut c = ChatState::default();
        let accounts: BTreeSet<String> = ["alice", "bob", "carol", "dave"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        c.display_names.insert("bob".into(), "Bob B.".into());
        c.display_names.insert("carol".into(), "Alice".into());
        c.display_names.insert("dave".into(), "Sam".into());
        c.display_names.insert("erin".into(), "sam".into());
        let l = c.nick_labels(&accounts);
        assert_eq!(l.get("bob").map(String::as_str), Some("Bob B."));
        assert_eq!(l.get("carol"), None, "another account is called alice");
        assert_eq!(l.get("dave"), None, "two show as sam");
        assert_eq!(l.get("erin"), None);
    }

    #[test]
    fn typing_shows_for_a_while_and_ends_with_the_message() {
        let mut c = ChatState::default();
        c.on_typing(room(), "bob", 1_000);
        c.on_typing(room(), "carol", 2_000);
        assert_eq!(
            c.typing_line(&room(), 2_500).as_deref(),
            Some("bob and carol are typing…")
        );
        c.on_message(&room(), "carol");
        assert_eq!(
            c.typing_line(&room(), 2_500).as_deref(),
            Some("bob is typing…")
        );
        assert_eq!(c.typing_line(&room(), 1_000 + TYPING_SHOWN_MS), None);
    }

    #[test]
    fn own_typing_is_sent_once_per_interval() {
        let mut c = ChatState::default();
        assert!(c.should_send_typing(&room(), 0));
        assert!(!c.should_send_typing(&room(), 1_000));
        let other = ConvKey::Direct(vec!["bob".into()]);
        assert!(c.should_send_typing(&other, 1_000));
        assert!(c.should_send_typing(&room(), 1_500));
        c.sent_message();
        assert!(c.should_send_typing(&room(), 1_600));
    }

    #[test]
    fn read_by_lists_who_reached_a_message() {
        let mut c = ChatState::default();
        c.on_read(room(), "bob", 5);
        c.on_read(room(), "carol", 3);
        c.on_read(room(), "bob", 2);
        c.on_read(room(), "alice", 9);
        assert_eq!(c.read_by(&room(), 4, "alice"), ["bob"]);
        assert_eq!(c.read_by(&room(), 3, "alice"), ["bob", "carol"]);
        assert_eq!(c.read_to_send(&room(), 7), Some(7));
        assert_eq!(c.read_to_send(&room(), 7), None);
        assert_eq!(c.read_to_send(&room(), 8), Some(8));
    }
}
