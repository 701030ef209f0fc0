//! Everyday chat, the presence side (issue #20, part B): typing notices, read markers, topics,
//! away, display names, `/me` and Markdown sends, and mentions.
//!
//! Mentions are found here, in the client, after decryption: in an end-to-end conversation
//! the server never sees the text, so it cannot tell who was mentioned. [`Attention`] counts,
//! per conversation, unread messages and mentions separately, and knows which conversations
//! are muted; the JSON client and the terminal UI both use it.
//!
//! Replies, edits, deletes and reactions (see [`conclave_proto::chat`]).
//!
//! An act names only the message; the library asks the server where that message is
//! ([`Request::MessageInfo`]) and sends the act to the same conversation, so it goes the way
//! any send goes there (encrypted in an end-to-end conversation, resent with its idempotency
//! key after a reconnect).

use std::collections::{HashMap, HashSet};

use conclave_proto::chat::{
    ActKind, ActsOn, CONTENT_TYPE_DELETE, MessageInfo, ReadMarker, Refs, TextKind,
};
use conclave_proto::{Body, Conv, ConvRef, Message, Reply, Request, Target};

use crate::SendReceipt;
use crate::connection::Client;
use crate::connection::unexpected;
use crate::error::ClientError;

/// Most conversations [`Attention`] keeps counts for; beyond it the ones with nothing
/// unread are forgotten first.
pub const MAX_ATTENTION_CONVS: usize = 4096;

impl Client {
    /// Tells the conversation's other members that this user is typing (not stored). The
    /// server takes one per conversation per typing interval (3 s by default).
    pub async fn typing(&self, conv: ConvRef) -> Result<(), ClientError> {
        self.request(Request::Typing { conv }).await.map(drop)
    }

    /// Marks a conversation read up to `seq` (a marker only moves forward).
    pub async fn mark_read(&self, conv: ConvRef, seq: u64) -> Result<(), ClientError> {
        self.request(Request::Read { conv, seq }).await.map(drop)
    }

    /// How far the conversation's members who share their markers have read.
    pub async fn read_markers(&self, conv: ConvRef) -> Result<Vec<ReadMarker>, ClientError> {
        match self.request(Request::ReadMarkers { conv }).await? {
            Reply::ReadMarkers(m) => Ok(m),
            other => Err(unexpected("read_markers", &other)),
        }
    }

    /// Shows this account's read markers to others (the default), or keeps them private.
    pub async fn share_reads(&self, share: bool) -> Result<(), ClientError> {
        self.request(Request::ShareReads { share }).await.map(drop)
    }

    /// Sets (or with an empty text clears) a room's topic: its owner or an admin.
    pub async fn set_topic(&self, room: &str, topic: &str) -> Result<(), ClientError> {
        self.request(Request::SetTopic {
            room: room.to_string(),
            topic: topic.to_string(),
        })
        .await
        .map(drop)
    }

    /// Away with a message (`Some`), or back (`None`).
    /// The message stays set across reconnects of this session.
    pub async fn away(&self, text: Option<&str>) -> Result<(), ClientError> {
        self.request(Request::Away {
            text: text.map(str::to_string),
        })
        .await
        .map(drop)
    }

    /// Sets (or with `None` clears) this account's display name.
    pub async fn set_display_name(&self, name: Option<&str>) -> Result<(), ClientError> {
        self.request(Request::SetDisplayName {
            name: name.map(str::to_string),
        })
        .await
        .map(drop)
    }

    /// Sends text of a kind: Markdown, an action (`/me`), or both. The kind is the body's
    /// content type, so in an end-to-end conversation it is encrypted with the text.
    pub async fn send_text(
        &self,
        target: Target,
        text: &str,
        kind: TextKind,
    ) -> Result<SendReceipt, ClientError> {
        self.send(target, Body::text_of_kind(text, kind), None)
            .await
    }
}

/// How a message concerns the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mention {
    /// `@me`.
    Me,
    /// `@room`, from the room's owner.
    Room,
}

/// Whether `text` mentions `me` (`@me`, any case, as a whole name), or is an `@room` from
/// the room's owner (`from_owner`). A mention is `@` at the start or after a character that
/// cannot be part of a name, followed by a name; trailing `.` and `-` are punctuation.
pub fn mention_in(text: &str, me: &str, from_owner: bool) -> Option<Mention> {
    let mut found = None;
    let is_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        if c == '@' && !prev.is_some_and(is_name) {
            let rest = &text[i + 1..];
            let end = rest.find(|c: char| !is_name(c)).unwrap_or(rest.len());
            let name = rest[..end].trim_end_matches(['.', '-']);
            if !name.is_empty() {
                if name.eq_ignore_ascii_case(me) {
                    return Some(Mention::Me);
                }
                if from_owner && name.eq_ignore_ascii_case("room") {
                    found = Some(Mention::Room);
                }
            }
        }
        prev = Some(c);
    }
    found
}

/// The text of a Markdown message outside its code spans and code blocks (a name quoted in
/// code is not a mention), pieces separated by spaces.
pub fn outside_code(markdown: &str) -> String {
    use pulldown_cmark::{Event as Md, Parser, Tag, TagEnd};
    let mut out = String::with_capacity(markdown.len());
    let mut in_block = false;
    for ev in Parser::new(markdown) {
        match ev {
            Md::Start(Tag::CodeBlock(_)) => in_block = true,
            Md::End(TagEnd::CodeBlock) => in_block = false,
            Md::Text(t) | Md::Html(t) | Md::InlineHtml(t) if !in_block => out.push_str(&t),
            Md::Code(_) | Md::SoftBreak | Md::HardBreak => out.push(' '),
            Md::Start(_) | Md::End(_) => out.push(' '),
            _ => {}
        }
    }
    out
}

/// Unread messages and mentions of one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub unread: u32,
    pub mentions: u32,
}

/// Per conversation: unread messages and, counted apart, mentions of me; which
/// conversations are muted (a muted one still counts, but [`Attention::on_message`] says
/// not to ring).
#[derive(Debug, Clone, Default)]
pub struct Attention {
    counts: HashMap<Conv, Counts>,
    muted: HashSet<Conv>,
    /// Room → owner, for `@room`.
    owners: HashMap<String, String>,
}

/// What one message means for the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noticed {
    pub mention: Option<Mention>,
    /// A mention in a conversation that is not muted: ring the bell, show it.
    pub alert: bool,
}

impl Attention {
    /// Records a room's owner (from `rooms`), for `@room`.
    pub fn set_owner(&mut self, room: &str, owner: Option<&str>) {
        match owner {
            Some(o) => self.owners.insert(room.to_string(), o.to_string()),
            None => self.owners.remove(room),
        };
    }

    /// Whether the owner of `room` is known (else `@room` cannot be judged yet).
    pub fn knows_owner(&self, room: &str) -> bool {
        self.owners.contains_key(room)
    }

    /// Whether `m` from `m.from` counts as from its room's owner.
    pub fn from_owner(&self, m: &Message) -> bool {
        match &m.conv {
            Conv::Room(r) => self.owners.get(r).is_some_and(|o| *o == m.from),
            Conv::Direct(_) => false,
        }
    }

    /// A message arrived for `me`: counts it as unread (and as a mention when it is one,
    /// unless `seen`: the reader is looking at the conversation). Own messages do not count.
    pub fn on_message(&mut self, m: &Message, me: &str, seen: bool) -> Noticed {
        if m.from == me {
            return Noticed {
                mention: None,
                alert: false,
            };
        }
        let markdown = m.body.text_kind().is_some_and(|k| k.markdown);
        let mention = m.body.as_text().and_then(|t| {
            if markdown {
                mention_in(&outside_code(t), me, self.from_owner(m))
            } else {
                mention_in(t, me, self.from_owner(m))
            }
        });
        if !seen {
            self.make_room(&m.conv);
            let c = self.counts.entry(m.conv.clone()).or_default();
            c.unread = c.unread.saturating_add(1);
            if mention.is_some() {
                c.mentions = c.mentions.saturating_add(1);
            }
        }
        Noticed {
            mention,
            alert: mention.is_some() && !self.muted.contains(&m.conv),
        }
    }

    fn make_room(&mut self, conv: &Conv) {
        if self.counts.len() >= MAX_ATTENTION_CONVS && !self.counts.contains_key(conv) {
            self.counts.retain(|_, c| c.unread > 0);
            if self.counts.len() >= MAX_ATTENTION_CONVS
                && let Some(k) = self.counts.keys().next().cloned()
            {
                self.counts.remove(&k);
            }
        }
    }

    /// The reader has read the conversation: its counts start over.
    pub fn read(&mut self, conv: &Conv) {
        self.counts.remove(conv);
    }

    pub fn counts(&self, conv: &Conv) -> Counts {
        self.counts.get(conv).copied().unwrap_or_default()
    }

    /// Every conversation with something unread.
    pub fn all(&self) -> impl Iterator<Item = (&Conv, Counts)> {
        self.counts.iter().map(|(k, c)| (k, *c))
    }

    pub fn set_muted(&mut self, conv: &Conv, muted: bool) {
        if muted {
            self.muted.insert(conv.clone());
        } else {
            self.muted.remove(conv);
        }
    }

    pub fn is_muted(&self, conv: &Conv) -> bool {
        self.muted.contains(conv)
    }
}

/// [`conclave_e2ee::payload::Payload::Act`]'s code for a kind of act.
pub(crate) fn act_code(kind: ActKind) -> u8 {
    use conclave_e2ee::payload::{ACT_DELETE, ACT_EDIT, ACT_REACT, ACT_UNREACT};
    match kind {
        ActKind::Edit => ACT_EDIT,
        ActKind::Delete => ACT_DELETE,
        ActKind::React => ACT_REACT,
        ActKind::Unreact => ACT_UNREACT,
    }
}

impl Client {
    /// Where a message is (its conversation, author and sequence), if this account may see it.
    pub async fn message_info(&self, msg_id: &str) -> Result<MessageInfo, ClientError> {
        match self
            .request(Request::MessageInfo {
                msg_id: msg_id.to_string(),
            })
            .await?
        {
            Reply::MessageInfo(info) => Ok(info),
            other => Err(unexpected("message_info", &other)),
        }
    }

    /// The send target that reaches a conversation.
    fn target_of(&self, conv: &Conv) -> Target {
        match conv {
            Conv::Room(room) => Target::Room {
                room: room.clone(),
                except: Vec::new(),
            },
            Conv::Direct(users) => {
                let others: Vec<String> = users
                    .iter()
                    .filter(|u| u.as_str() != self.user())
                    .cloned()
                    .collect();
                Target::Users {
                    to: if others.is_empty() {
                        vec![self.user().to_string()]
                    } else {
                        others
                    },
                }
            }
        }
    }

    /// Edits, deletes or reacts to the message `msg_id`. `content` is the new text of an
    /// edit or the emoji of a reaction (ignored for a delete).
    pub async fn act(
        &self,
        msg_id: &str,
        kind: ActKind,
        content: &str,
    ) -> Result<SendReceipt, ClientError> {
        let info = self.message_info(msg_id).await?;
        let body = match kind {
            ActKind::Delete => Body {
                content_type: CONTENT_TYPE_DELETE.to_string(),
                data: Vec::new(),
            },
            ActKind::Edit | ActKind::React | ActKind::Unreact => Body::text(content),
        };
        let refs = Refs {
            reply_to: None,
            acts_on: Some(ActsOn {
                msg_id: info.msg_id,
                kind,
            }),
        };
        self.send_with_refs(self.target_of(&info.conv), body, None, Some(Box::new(refs)))
            .await
    }

    /// Replaces the text of one of this account's messages.
    pub async fn edit(&self, msg_id: &str, text: &str) -> Result<SendReceipt, ClientError> {
        self.act(msg_id, ActKind::Edit, text).await
    }

    /// Deletes a message (this account's own; any in a room it owns; any, as an admin).
    pub async fn delete(&self, msg_id: &str) -> Result<SendReceipt, ClientError> {
        self.act(msg_id, ActKind::Delete, "").await
    }

    /// Adds (`on`) or takes back a reaction.
    pub async fn react(
        &self,
        msg_id: &str,
        emoji: &str,
        on: bool,
    ) -> Result<SendReceipt, ClientError> {
        let kind = if on { ActKind::React } else { ActKind::Unreact };
        self.act(msg_id, kind, emoji).await
    }

    /// Answers the message `reply_to` with `text`, in its conversation.
    pub async fn reply(&self, reply_to: &str, text: &str) -> Result<SendReceipt, ClientError> {
        let info = self.message_info(reply_to).await?;
        let refs = Refs {
            reply_to: Some(info.msg_id),
            acts_on: None,
        };
        self.send_with_refs(
            self.target_of(&info.conv),
            Body::text(text),
            None,
            Some(Box::new(refs)),
        )
        .await
    }

    /// A thread: the message `msg_id`, then its replies in order (after sequence `after`, at
    /// most `limit`), each with its current state.
    pub async fn thread(
        &self,
        msg_id: &str,
        limit: u32,
        after: Option<u64>,
    ) -> Result<Vec<Message>, ClientError> {
        // An end-to-end conversation's thread is read from this device's own history.
        if let Some(found) = self.local_thread(msg_id, limit, after) {
            return found;
        }
        match self
            .request(Request::Thread {
                msg_id: msg_id.to_string(),
                limit,
                after,
            })
            .await?
        {
            Reply::Messages(m) => Ok(m),
            other => Err(unexpected("thread", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(conv: Conv, from: &str, text: &str) -> Message {
        Message {
            msg_id: "m".into(),
            conv,
            from: from.into(),
            seq: 1,
            ts_ms: 0,
            body: Body::text(text),
            extra: None,
        }
    }

    #[test]
    fn a_name_in_code_is_not_a_mention() {
        let mut a = Attention::default();
        let mut m = msg(Conv::Room("lab".into()), "alice", "run `@bob --help` first");
        m.body.content_type = conclave_proto::chat::CONTENT_TYPE_MARKDOWN.into();
        assert_eq!(a.on_message(&m, "bob", false).mention, None);
        m.body.data = b"```\n@bob\n```\nthen **@bob** look".to_vec();
        assert_eq!(a.on_message(&m, "bob", false).mention, Some(Mention::Me));
        m.body.data = b"    @bob indented code\n".to_vec();
        assert_eq!(a.on_message(&m, "bob", false).mention, None);
        // Plain text keeps its backticks as text.
        let plain = msg(Conv::Room("lab".into()), "alice", "`@bob`");
        assert_eq!(
            a.on_message(&plain, "bob", false).mention,
            Some(Mention::Me)
        );
    }

    #[test]
    fn mentions_are_whole_names() {
        assert_eq!(mention_in("hi @bob", "bob", false), Some(Mention::Me));
        assert_eq!(mention_in("@Bob: look", "bob", false), Some(Mention::Me));
        assert_eq!(mention_in("thanks @bob.", "bob", false), Some(Mention::Me));
        assert_eq!(mention_in("(@bob)", "bob", false), Some(Mention::Me));
        assert_eq!(mention_in("hi @bobby", "bob", false), None);
        assert_eq!(
            mention_in("mail bob@example.org", "example.org", false),
            None
        );
        assert_eq!(mention_in("hi bob", "bob", false), None);
        assert_eq!(mention_in("@", "bob", false), None);
        assert_eq!(mention_in("all: @room", "bob", true), Some(Mention::Room));
        assert_eq!(mention_in("all: @room", "bob", false), None);
        assert_eq!(mention_in("@room and @bob", "bob", true), Some(Mention::Me));
    }

    #[test]
    fn mentions_count_apart_from_unread_and_mute_silences() {
        let room = Conv::Room("general".into());
        let mut a = Attention::default();
        a.set_owner("general", Some("alice"));
        let n = a.on_message(&msg(room.clone(), "carol", "lunch?"), "bob", false);
        assert_eq!(n.mention, None);
        let n = a.on_message(&msg(room.clone(), "carol", "@bob lunch?"), "bob", false);
        assert!(n.alert);
        // @room counts only from the owner.
        a.on_message(&msg(room.clone(), "carol", "@room"), "bob", false);
        let n = a.on_message(&msg(room.clone(), "alice", "@room deploy"), "bob", false);
        assert_eq!(n.mention, Some(Mention::Room));
        // Own messages do not count.
        a.on_message(&msg(room.clone(), "bob", "@bob"), "bob", false);
        assert_eq!(
            a.counts(&room),
            Counts {
                unread: 4,
                mentions: 2
            }
        );
        a.set_muted(&room, true);
        let n = a.on_message(&msg(room.clone(), "carol", "@bob again"), "bob", false);
        assert_eq!((n.mention, n.alert), (Some(Mention::Me), false));
        assert_eq!(a.counts(&room).mentions, 3);
        a.read(&room);
        assert_eq!(a.counts(&room), Counts::default());
        // Seen as it arrives: not counted.
        a.on_message(&msg(room.clone(), "carol", "@bob"), "bob", true);
        assert_eq!(a.counts(&room), Counts::default());
    }

    #[test]
    fn counts_are_bounded() {
        let mut a = Attention::default();
        for i in 0..MAX_ATTENTION_CONVS + 10 {
            a.on_message(
                &msg(Conv::Direct(vec![format!("u{i}")]), "x", "hi"),
                "me",
                false,
            );
        }
        assert!(a.all().count() <= MAX_ATTENTION_CONVS);
    }
}
