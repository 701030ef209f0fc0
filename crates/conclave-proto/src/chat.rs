//! Everyday chat, the presence side (issue #20, part B): how a text body says it is Markdown or
//! an action (`/me`), read markers, and the limits clients and servers agree on by default.
//!
//! The format and the action flag are the body's *content type*, not fields next to it: in
//! an end-to-end conversation the content type travels inside the MLS ciphertext (see
//! `conclave-e2ee`'s `Payload::Body`), so the server never learns whether a message is
//! formatted or an action.
//!
//! Everyday chat on top of messages: replies, edits, deletes and reactions.
//!
//! An edit, a delete or a reaction is itself a sequenced message of the conversation (a
//! [`crate::Request::Send`] with [`Refs::acts_on`]), so ordering, resume, catch-up, acks and
//! end-to-end delivery work for them exactly as for any message, and a member removed from a
//! conversation is cut off from them at the same point. The server checks the rules from the
//! cleartext reference alone (which message, which kind of act); in an end-to-end
//! conversation the new text and the emoji travel only inside the MLS ciphertext.

use serde::{Deserialize, Serialize};

use crate::CONTENT_TYPE_TEXT;

/// Content type of a text body written in the Markdown subset (bold, italic, inline code,
/// code blocks, links, quotes). Clients render it; plain text stays the default.
pub const CONTENT_TYPE_MARKDOWN: &str = "text/markdown";
/// Content type of a plain-text action (`/me waves`).
pub const CONTENT_TYPE_ACTION: &str = "text/plain; action";
/// Content type of a Markdown action.
pub const CONTENT_TYPE_MARKDOWN_ACTION: &str = "text/markdown; action";

/// How a text body is meant to be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TextKind {
    /// The text is in the Markdown subset (else plain: shown exactly as written).
    pub markdown: bool,
    /// An action: shown as "* alice waves".
    pub action: bool,
}

impl TextKind {
    /// Plain text, not an action: [`CONTENT_TYPE_TEXT`].
    pub const PLAIN: TextKind = TextKind {
        markdown: false,
        action: false,
    };

    /// The content type that carries this kind.
    pub fn content_type(self) -> &'static str {
        match (self.markdown, self.action) {
            (false, false) => CONTENT_TYPE_TEXT,
            (true, false) => CONTENT_TYPE_MARKDOWN,
            (false, true) => CONTENT_TYPE_ACTION,
            (true, true) => CONTENT_TYPE_MARKDOWN_ACTION,
        }
    }

    /// The kind a content type names, if it is one of the four text types (exactly: a
    /// content type is compared as it is, so there is one spelling of each).
    pub fn of_content_type(content_type: &str) -> Option<TextKind> {
        let (markdown, action) = match content_type {
            CONTENT_TYPE_TEXT => (false, false),
            CONTENT_TYPE_MARKDOWN => (true, false),
            CONTENT_TYPE_ACTION => (false, true),
            CONTENT_TYPE_MARKDOWN_ACTION => (true, true),
            _ => return None,
        };
        Some(TextKind { markdown, action })
    }
}

/// How far one member has read a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadMarker {
    pub user: String,
    /// The newest sequence number read.
    pub seq: u64,
    /// When the marker was last moved, milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

/// Default longest room topic, in characters.
pub const DEFAULT_MAX_TOPIC_CHARS: usize = 300;
/// Default longest away message, in characters.
pub const DEFAULT_MAX_AWAY_CHARS: usize = 200;
/// Default longest display name, in characters.
pub const DEFAULT_MAX_DISPLAY_NAME_CHARS: usize = 64;
/// Default shortest time between two typing notices of one connection in one conversation;
/// clients send one at most this often while the user types.
pub const DEFAULT_TYPING_INTERVAL_MS: u64 = 3_000;
/// How long a client shows "typing" after a notice without a new one or a message.
pub const TYPING_SHOWN_MS: i64 = 6_000;

/// Content type of the body of a [`ActKind::Delete`] in a server-encrypted conversation (the
/// body is empty).
pub const CONTENT_TYPE_DELETE: &str = "application/vnd.conclave.delete";

/// Default longest reaction, in bytes of UTF-8 (an emoji with its modifiers fits easily).
pub const DEFAULT_MAX_EMOJI_BYTES: usize = 32;

/// What a sent message refers to, besides its conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refs {
    /// It answers this message (same conversation): a reply, shown with the start of the
    /// original; the replies to a message are its thread.
    pub reply_to: Option<String>,
    /// It changes this earlier message of the same conversation.
    pub acts_on: Option<ActsOn>,
}

/// An act on an earlier message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActsOn {
    pub msg_id: String,
    pub kind: ActKind,
}

/// What an act does. The body carries the rest: the new text of an edit, the emoji of a
/// reaction (in an end-to-end conversation both are inside the ciphertext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActKind {
    /// Replace the text (the author only).
    Edit,
    /// Remove the message (its author, the room's owner, an admin).
    Delete,
    /// Add a reaction.
    React,
    /// Take a reaction back.
    Unreact,
}

impl ActKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActKind::Edit => "edit",
            ActKind::Delete => "delete",
            ActKind::React => "react",
            ActKind::Unreact => "unreact",
        }
    }
}

/// What a stored message carries besides its body. `None` on a [`crate::Message`] means all
/// defaults (a plain message), which keeps the common case one byte on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extra {
    pub reply_to: Option<String>,
    pub acts_on: Option<ActsOn>,
    /// Filled in `history` (and threads) of server-encrypted conversations: the message's
    /// state after every edit, delete and reaction.
    pub state: Option<MsgState>,
}

/// A message's current state, as `history` returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgState {
    /// Time of the last edit, milliseconds since the Unix epoch.
    pub edited_ms: Option<i64>,
    /// How many times it was edited.
    pub edits: u32,
    /// Deleted: the body is empty and there are no reactions.
    pub deleted: bool,
    /// Each emoji with who reacted with it, in the order they first did.
    pub reactions: Vec<Reaction>,
}

/// One emoji on a message and who reacted with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    pub emoji: String,
    pub users: Vec<String>,
}

/// Where a message is, for a client that wants to act on it by id alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    pub msg_id: String,
    pub conv: crate::Conv,
    pub from: String,
    pub seq: u64,
    pub ts_ms: i64,
}

/// Applies one reaction change to a list of reactions; returns whether anything changed.
pub fn apply_reaction(reactions: &mut Vec<Reaction>, emoji: &str, user: &str, on: bool) -> bool {
    let pos = reactions.iter().position(|r| r.emoji == emoji);
    match (pos, on) {
        (Some(i), true) => {
            if reactions[i].users.iter().any(|u| u == user) {
                return false;
            }
            reactions[i].users.push(user.to_string());
            true
        }
        (None, true) => {
            reactions.push(Reaction {
                emoji: emoji.to_string(),
                users: vec![user.to_string()],
            });
            true
        }
        (Some(i), false) => {
            let before = reactions[i].users.len();
            reactions[i].users.retain(|u| u != user);
            let changed = reactions[i].users.len() != before;
            if reactions[i].users.is_empty() {
                reactions.remove(i);
            }
            changed
        }
        (None, false) => false,
    }
}

/// How many (emoji, user) pairs a message holds.
pub fn reaction_count(reactions: &[Reaction]) -> usize {
    reactions.iter().map(|r| r.users.len()).sum()
}

/// Checks an emoji: not empty, at most `max_bytes`, no whitespace or control characters.
pub fn check_emoji(emoji: &str, max_bytes: usize) -> Result<(), String> {
    if emoji.is_empty() {
        return Err("a reaction needs an emoji".into());
    }
    if emoji.len() > max_bytes {
        return Err(format!(
            "a reaction is at most {max_bytes} bytes; use a single emoji"
        ));
    }
    if emoji.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a reaction is one emoji, without spaces or control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod act_tests {
    use super::*;

    #[test]
    fn reactions_add_once_and_remove_to_nothing() {
        let mut r = Vec::new();
        assert!(apply_reaction(&mut r, "👍", "bob", true));
        assert!(!apply_reaction(&mut r, "👍", "bob", true));
        assert!(apply_reaction(&mut r, "👍", "carol", true));
        assert!(apply_reaction(&mut r, "🎉", "bob", true));
        assert_eq!(reaction_count(&r), 3);
        assert!(apply_reaction(&mut r, "👍", "bob", false));
        assert!(apply_reaction(&mut r, "👍", "carol", false));
        assert!(!apply_reaction(&mut r, "👍", "carol", false));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].emoji, "🎉");
    }

    #[test]
    fn emoji_rules() {
        assert!(check_emoji("👍", 32).is_ok());
        assert!(check_emoji("", 32).is_err());
        assert!(check_emoji("a b", 32).is_err());
        assert!(check_emoji(&"x".repeat(33), 32).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_content_type_and_back() {
        for markdown in [false, true] {
            for action in [false, true] {
                let kind = TextKind { markdown, action };
                assert_eq!(TextKind::of_content_type(kind.content_type()), Some(kind));
            }
        }
        assert_eq!(
            TextKind::of_content_type("text/plain"),
            Some(TextKind::PLAIN)
        );
        assert_eq!(TextKind::of_content_type("text/html"), None);
        assert_eq!(TextKind::of_content_type("application/mls-message"), None);
        assert_eq!(TextKind::of_content_type("TEXT/PLAIN"), None);
    }
}
