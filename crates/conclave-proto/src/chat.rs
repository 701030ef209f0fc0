//! Everyday chat, the presence side (issue #20, part B): how a text body says it is Markdown or
//! an action (`/me`), read markers, and the limits clients and servers agree on by default.
//!
//! The format and the action flag are the body's *content type*, not fields next to it: in
//! an end-to-end conversation the content type travels inside the MLS ciphertext (see
//! `conclave-e2ee`'s `Payload::Body`), so the server never learns whether a message is
//! formatted or an action.

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
