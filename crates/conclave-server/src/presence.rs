//! Everyday chat's presence state (issue #20, part B): room topics, display names, away
//! messages, who keeps their read markers private, and each connection's budget for typing
//! notices, read markers and changes. Plain state and decisions, time passed in, no I/O:
//! `cmd::presence` wires it to the hub, the store and the connections.
//!
//! Lock order: when both are needed, the hub's lock is taken before this one.

use std::collections::{HashMap, HashSet, VecDeque};

use conclave_proto::{ErrorBody, ErrorCode, RoomInfo, UserPresence};

use crate::store::ChatRows;

/// Conversations whose last typing notice or read marker one connection remembers; beyond
/// it, entries older than their interval are dropped, and if none is that old the request
/// is refused (`rate_limited`). The request rate alone keeps a connection far below it.
pub const MAX_TRACKED_CONVS: usize = 512;

/// Topics, display names, away messages, read-marker privacy: what `who`, `rooms` and the
/// presence requests read.
#[derive(Debug, Default)]
pub struct Presence {
    topics: HashMap<String, String>,
    display_names: HashMap<String, String>,
    private_reads: HashSet<String>,
    /// Away messages of online users (cleared when their last connection closes).
    away: HashMap<String, String>,
    /// In a cluster: how long this node's word on its online users holds on the others, in ms
    /// (0: not in a cluster, or its presence task has not started).
    pub cluster_ttl_ms: u64,
    /// In a cluster: when this node last sent its online users because another node asked
    /// (`ClusterEvent::Online` with `ask`), in ms; answers are at most one a second.
    pub cluster_answered_ms: i64,
}

impl Presence {
    /// The state stored at the last run (away messages are not stored).
    pub fn from_rows(rows: ChatRows) -> Presence {
        Presence {
            topics: rows.topics.into_iter().collect(),
            display_names: rows.display_names.into_iter().collect(),
            private_reads: rows.private_reads.into_iter().collect(),
            away: HashMap::new(),
            cluster_ttl_ms: 0,
            cluster_answered_ms: 0,
        }
    }

    pub fn topic(&self, room: &str) -> Option<&str> {
        self.topics.get(room).map(String::as_str)
    }

    /// Sets a topic; an empty one clears it.
    pub fn set_topic(&mut self, room: &str, topic: &str) {
        if topic.is_empty() {
            self.topics.remove(room);
        } else {
            self.topics.insert(room.to_string(), topic.to_string());
        }
    }

    pub fn display_name(&self, user: &str) -> Option<&str> {
        self.display_names.get(user).map(String::as_str)
    }

    pub fn set_display_name(&mut self, user: &str, name: Option<&str>) {
        match name {
            Some(n) => self.display_names.insert(user.to_string(), n.to_string()),
            None => self.display_names.remove(user),
        };
    }

    /// Whether `user`'s read markers are shown to others.
    pub fn shares_reads(&self, user: &str) -> bool {
        !self.private_reads.contains(user)
    }

    pub fn set_share_reads(&mut self, user: &str, share: bool) {
        if share {
            self.private_reads.remove(user);
        } else {
            self.private_reads.insert(user.to_string());
        }
    }

    pub fn away(&self, user: &str) -> Option<&str> {
        self.away.get(user).map(String::as_str)
    }

    /// Away with a message, or back. Returns whether anything changed.
    pub fn set_away(&mut self, user: &str, text: Option<&str>) -> bool {
        match text {
            Some(t) => self.away.insert(user.to_string(), t.to_string()).as_deref() != Some(t),
            None => self.away.remove(user).is_some(),
        }
    }

    /// The account's last connection closed: it is not away any more, it is offline.
    pub fn went_offline(&mut self, user: &str) {
        self.away.remove(user);
    }

    /// An account was deleted.
    pub fn forget_user(&mut self, user: &str) {
        self.away.remove(user);
        self.display_names.remove(user);
        self.private_reads.remove(user);
    }

    /// Adds display names and away messages to a `who` answer.
    pub fn fill_users(&self, users: &mut [UserPresence]) {
        for u in users {
            u.display_name = self.display_name(&u.user).map(str::to_string);
            u.away = if u.online {
                self.away(&u.user).map(str::to_string)
            } else {
                None
            };
        }
    }

    /// Adds topics to a `rooms` answer.
    pub fn fill_rooms(&self, rooms: &mut [RoomInfo]) {
        for r in rooms {
            r.topic = self.topic(&r.room).map(str::to_string);
        }
    }
}

/// One connection's budget for typing notices, read markers and changes (topic, away,
/// display name, read-marker privacy). Lives in the connection's state, so it goes with it.
#[derive(Debug, Default)]
pub struct ConnBudget {
    typing: HashMap<String, i64>,
    reads: HashMap<String, i64>,
    changes: VecDeque<i64>,
}

/// Why a request was refused by the budget: retry after this many milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub i64);

fn allow_per_conv(
    map: &mut HashMap<String, i64>,
    conv: &str,
    now_ms: i64,
    interval_ms: i64,
) -> Result<(), RetryAfter> {
    if let Some(&last) = map.get(conv) {
        let next = last.saturating_add(interval_ms);
        if now_ms < next {
            return Err(RetryAfter(next - now_ms));
        }
    }
    if map.len() >= MAX_TRACKED_CONVS && !map.contains_key(conv) {
        map.retain(|_, last| now_ms < last.saturating_add(interval_ms));
        if map.len() >= MAX_TRACKED_CONVS {
            return Err(RetryAfter(interval_ms));
        }
    }
    map.insert(conv.to_string(), now_ms);
    Ok(())
}

impl ConnBudget {
    /// A typing notice in conversation `conv` (its storage key) at `now_ms`.
    pub fn typing(&mut self, conv: &str, now_ms: i64, interval_ms: u64) -> Result<(), RetryAfter> {
        allow_per_conv(&mut self.typing, conv, now_ms, ms(interval_ms))
    }

    /// A read marker in conversation `conv` at `now_ms`.
    pub fn read(&mut self, conv: &str, now_ms: i64, interval_ms: u64) -> Result<(), RetryAfter> {
        allow_per_conv(&mut self.reads, conv, now_ms, ms(interval_ms))
    }

    /// A change (topic, away, display name, privacy) at `now_ms`: at most `per_minute` in
    /// any 60 seconds.
    pub fn change(&mut self, now_ms: i64, per_minute: u32) -> Result<(), RetryAfter> {
        const MINUTE_MS: i64 = 60_000;
        while self
            .changes
            .front()
            .is_some_and(|&t| t.saturating_add(MINUTE_MS) <= now_ms)
        {
            self.changes.pop_front();
        }
        if self.changes.len() >= per_minute as usize {
            let oldest = self.changes.front().copied().unwrap_or(now_ms);
            return Err(RetryAfter((oldest + MINUTE_MS - now_ms).max(1)));
        }
        self.changes.push_back(now_ms);
        Ok(())
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A free text a person sets (topic, away message, display name), checked: one line, no
/// control characters, at most `max_chars` characters, surrounding spaces removed. `what`
/// names it in the refusal.
pub fn check_text(what: &str, text: &str, max_chars: usize) -> Result<String, ErrorBody> {
    let text = text.trim();
    if text.chars().any(char::is_control) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "the {what} may not contain control characters (new lines, tabs, terminal \
                 escapes); write it on one line"
            ),
        ));
    }
    let n = text.chars().count();
    if n > max_chars {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "the {what} is {n} characters long; at most {max_chars} are allowed, shorten it"
            ),
        ));
    }
    Ok(text.to_string())
}

/// The refusal of a request over its budget.
pub fn rate_limited(what: &str, retry: RetryAfter) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::RateLimited,
        format!(
            "{what} too often; this one was not passed on, send the next one in {} ms",
            retry.0
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_is_limited_per_conversation() {
        let mut b = ConnBudget::default();
        assert_eq!(b.typing("r:a", 1_000, 3_000), Ok(()));
        assert_eq!(b.typing("r:a", 2_000, 3_000), Err(RetryAfter(2_000)));
        // Another conversation has its own interval.
        assert_eq!(b.typing("r:b", 2_000, 3_000), Ok(()));
        assert_eq!(b.typing("r:a", 4_000, 3_000), Ok(()));
        assert_eq!(b.typing("r:a", 4_001, 3_000), Err(RetryAfter(2_999)));
    }

    #[test]
    fn tracked_conversations_are_bounded() {
        let mut b = ConnBudget::default();
        for i in 0..MAX_TRACKED_CONVS {
            assert_eq!(b.read(&format!("r:{i}"), 0, 500), Ok(()));
        }
        // Full of fresh entries: refused.
        assert!(b.read("r:new", 100, 500).is_err());
        // Once they are older than the interval they make room.
        assert_eq!(b.read("r:new", 600, 500), Ok(()));
        assert!(b.reads.len() <= MAX_TRACKED_CONVS);
    }

    #[test]
    fn changes_are_limited_per_minute() {
        let mut b = ConnBudget::default();
        for t in 0..3 {
            assert_eq!(b.change(t, 3), Ok(()));
        }
        assert_eq!(b.change(10, 3), Err(RetryAfter(59_990)));
        assert_eq!(b.change(60_000, 3), Ok(()));
    }

    #[test]
    fn texts_are_one_line_and_bounded() {
        assert_eq!(
            check_text("topic", "  release week  ", 20),
            Ok("release week".into())
        );
        let e = check_text("topic", "a\nb", 20).expect_err("newline");
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = check_text("topic", "x\u{1b}[2J", 20).expect_err("escape");
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = check_text("away message", &"é".repeat(21), 20).expect_err("long");
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert!(e.message.contains("at most 20"));
        assert_eq!(
            check_text("topic", &"é".repeat(20), 20).map(|t| t.chars().count()),
            Ok(20)
        );
    }

    #[test]
    fn away_shows_only_while_online() {
        let mut p = Presence::default();
        assert!(p.set_away("bob", Some("lunch")));
        assert!(!p.set_away("bob", Some("lunch")));
        p.set_display_name("bob", Some("Bob B."));
        let mut users = vec![UserPresence {
            user: "bob".into(),
            online: true,
            connections: 1,
            admin: false,
            display_name: None,
            away: None,
        }];
        p.fill_users(&mut users);
        assert_eq!(users[0].away.as_deref(), Some("lunch"));
        assert_eq!(users[0].display_name.as_deref(), Some("Bob B."));
        p.went_offline("bob");
        p.fill_users(&mut users);
        assert_eq!(users[0].away, None);
        assert_eq!(users[0].display_name.as_deref(), Some("Bob B."));
    }
}
