//! The screen's decisions for everyday chat's presence side (issue #20, part B): `/me`,
//! `/md`, `/topic`, `/away`, `/back`, `/name`, `/mute`, `/receipts`; typing notices and
//! read markers sent and shown; mentions counted apart from unread, with the bell and the
//! window title; topics, away messages and display names from the server.

use conclave_client::chat::{Mention, mention_in};
use conclave_client::proto::chat::TextKind;
use conclave_client::proto::{Event, Message, Reply, Request, UserPresence};

use super::{Action, App, ConnState, Failure, Pending, Phase};
use crate::buffer::{ConvKey, Entry, NoticeKind};
use crate::chat::ChatState;
use crate::command::Command;
use crate::text::sanitize;

impl App {
    pub(super) fn chat_command(&mut self, cmd: Command) -> Vec<Action> {
        match cmd {
            Command::Me { text } => {
                let key = self.current_buffer().key.clone();
                let kind = TextKind {
                    markdown: false,
                    action: true,
                };
                self.send_kind(key, Vec::new(), &text, kind)
            }
            Command::Md { text } => {
                let key = self.current_buffer().key.clone();
                let kind = TextKind {
                    markdown: true,
                    action: false,
                };
                self.send_kind(key, Vec::new(), &text, kind)
            }
            Command::Topic { text: None } => {
                let Some(room) = self.current_room("/topic") else {
                    return Vec::new();
                };
                let text = match self.chat.topics.get(&room) {
                    Some(t) => format!("topic of #{room}: {}", sanitize(t, false)),
                    None => format!("#{room} has no topic; /topic TEXT sets one (owner, admins)"),
                };
                self.say(NoticeKind::Info, &text);
                Vec::new()
            }
            Command::Topic { text: Some(topic) } => {
                let Some(room) = self.current_room("/topic") else {
                    return Vec::new();
                };
                let done = if topic.is_empty() {
                    format!("the topic of #{room} is cleared")
                } else {
                    format!("the topic of #{room} is set")
                };
                vec![self.request(Pending::Done(done), Request::SetTopic { room, topic })]
            }
            Command::Away { text } => {
                let done = "you are away (/back when you return)".to_string();
                let text = Some(text.unwrap_or_default());
                vec![self.request(Pending::Done(done), Request::Away { text })]
            }
            Command::Back => {
                let done = "welcome back".to_string();
                vec![self.request(Pending::Done(done), Request::Away { text: None })]
            }
            Command::Name { name } => {
                let done = match &name {
                    Some(n) => format!("your display name is now {}", sanitize(n, false)),
                    None => "your display name is removed".to_string(),
                };
                vec![self.request(Pending::Done(done), Request::SetDisplayName { name })]
            }
            Command::Mute(muted) => {
                let key = self.current_buffer().key.clone();
                if key == ConvKey::Status {
                    self.error("/mute works in a room or a direct conversation");
                    return Vec::new();
                }
                let text = if muted {
                    self.chat.muted.insert(key.clone());
                    format!(
                        "{} is muted: mentions are counted but do not ring",
                        key.label()
                    )
                } else {
                    self.chat.muted.remove(&key);
                    format!("{} is not muted any more", key.label())
                };
                self.say(NoticeKind::Info, &text);
                let mut muted: Vec<ConvKey> = self.chat.muted.iter().cloned().collect();
                muted.sort();
                vec![Action::RememberMuted(muted)]
            }
            Command::ReadReceipts(share) => {
                let done = if share {
                    "others see how far you have read".to_string()
                } else {
                    "how far you have read is private now".to_string()
                };
                vec![self.request(Pending::Done(done), Request::ShareReads { share })]
            }
            _ => Vec::new(),
        }
    }

    /// Whether `m` mentions me: the buffer's own rule (my name as a word), or an `@room`
    /// from the room's owner. Marks the entry.
    pub(super) fn chat_mention(&mut self, m: &Message, entry: &mut Entry) -> bool {
        let me = self.me().to_string();
        if m.from == me {
            return false;
        }
        if !entry.mention
            && let (conclave_client::proto::Conv::Room(room), Some(text)) =
                (&m.conv, m.body.as_text())
        {
            let from_owner = self.chat.owners.get(room).is_some_and(|o| *o == m.from);
            let markdown = m.body.text_kind().is_some_and(|k| k.markdown);
            let text = if markdown {
                std::borrow::Cow::Owned(conclave_client::chat::outside_code(text))
            } else {
                std::borrow::Cow::Borrowed(text)
            };
            if mention_in(&text, &me, from_owner) == Some(Mention::Room) {
                entry.mention = true;
            }
        }
        entry.mention
    }

    /// After a message was added to buffer `i`: it ends its sender's typing; a mention is
    /// counted (unless seen as it came) and rings, unless the conversation is muted.
    pub(super) fn chat_message(
        &mut self,
        i: usize,
        key: &ConvKey,
        m: &Message,
        mention: bool,
        seen: bool,
    ) -> Vec<Action> {
        self.chat.on_message(key, &m.from);
        if !mention {
            return Vec::new();
        }
        if !seen && let Some(b) = self.buffers.get_mut(i) {
            b.mentions = b.mentions.saturating_add(1);
        }
        let mut actions = Vec::new();
        if self.chat.muted.contains(key) {
            return actions;
        }
        if self.chat.bell {
            actions.push(Action::Bell);
        }
        if self.chat.set_title && !seen {
            let title = ChatState::title_for(self.mentions_waiting(), Some(&key.label()));
            self.chat.title = Some(title.clone());
            actions.push(Action::SetTitle(title));
        }
        actions
    }

    /// Mentions not yet seen, in conversations that are not muted.
    fn mentions_waiting(&self) -> u32 {
        self.buffers
            .iter()
            .filter(|b| !self.chat.muted.contains(&b.key))
            .map(|b| b.mentions)
            .sum()
    }

    /// Each second: the read marker of the conversation in view (when it moved), and the
    /// title once the mentions were seen.
    pub(super) fn chat_tick(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if !matches!(self.phase, Phase::Chat) || self.conn != ConnState::Connected {
            return actions;
        }
        let i = self.current;
        if let Some(b) = self.buffers.get_mut(i)
            && b.scroll == 0
        {
            b.mentions = 0;
            let key = b.key.clone();
            let newest = b.entries.iter().rev().find_map(Entry::seq);
            if let (Some(conv), Some(newest)) = (key.conv_ref(), newest)
                && let Some(seq) = self.chat.read_to_send(&key, newest)
            {
                actions.push(self.request(Pending::Quiet, Request::Read { conv, seq }));
            }
        }
        // All seen: the title says so again.
        if self.chat.set_title && self.chat.title.is_some() && self.mentions_waiting() == 0 {
            let title = ChatState::title_for(0, None);
            if self.chat.title.as_deref() != Some(title.as_str()) {
                self.chat.title = Some(title.clone());
                actions.push(Action::SetTitle(title));
            }
        }
        actions
    }

    /// A key typed into the input: tell the conversation (at most once per interval), unless
    /// it is a command.
    pub(super) fn chat_typed(&mut self) -> Vec<Action> {
        if self.input.text().starts_with('/') || self.conn != ConnState::Connected {
            return Vec::new();
        }
        let key = self.current_buffer().key.clone();
        let Some(conv) = key.conv_ref() else {
            return Vec::new();
        };
        if !self.chat.should_send_typing(&key, self.now_ms) {
            return Vec::new();
        }
        vec![self.request(Pending::Quiet, Request::Typing { conv })]
    }

    pub(super) fn chat_event(&mut self, event: Event) -> Vec<Action> {
        let me = self.me().to_string();
        match event {
            Event::Typing { conv, user } if user != me => {
                let key = ConvKey::from_conv(&conv, &me);
                self.chat.on_typing(key, &user, self.now_ms);
            }
            Event::Read { conv, user, seq } => {
                let key = ConvKey::from_conv(&conv, &me);
                self.chat.on_read(key, &user, seq);
            }
            Event::Topic { room, topic, by } => {
                let text = if topic.is_empty() {
                    format!("{by} cleared the topic of #{room}")
                } else {
                    format!("{by} set the topic of #{room}: {}", sanitize(&topic, false))
                };
                if topic.is_empty() {
                    self.chat.topics.remove(&room);
                } else {
                    self.chat.topics.insert(room.clone(), topic);
                }
                self.notice_in(&ConvKey::Room(room), NoticeKind::Info, &text);
            }
            Event::Away { user, text } => match text {
                Some(t) => {
                    self.chat.away.insert(user, t);
                }
                None => {
                    self.chat.away.remove(&user);
                }
            },
            Event::DisplayName { user, name } => match name {
                Some(n) => {
                    self.chat.display_names.insert(user, n);
                }
                None => {
                    self.chat.display_names.remove(&user);
                }
            },
            _ => {}
        }
        Vec::new()
    }

    /// Away messages and display names from a `who` answer.
    pub(super) fn chat_users(&mut self, users: &[UserPresence]) {
        for u in users {
            match &u.away {
                Some(a) => self.chat.away.insert(u.user.clone(), a.clone()),
                None => self.chat.away.remove(&u.user),
            };
            match &u.display_name {
                Some(d) => self.chat.display_names.insert(u.user.clone(), d.clone()),
                None => self.chat.display_names.remove(&u.user),
            };
        }
    }

    pub(super) fn chat_reply(
        &mut self,
        pending: Pending,
        result: Result<Reply, Failure>,
    ) -> Vec<Action> {
        match (pending, result) {
            (Pending::ReadMarkers { key }, Ok(Reply::ReadMarkers(markers))) => {
                for m in markers {
                    self.chat.on_read(key.clone(), &m.user, m.seq);
                }
            }
            (Pending::RoomInfo, Ok(Reply::Rooms(rooms))) => {
                for r in rooms {
                    match r.topic {
                        Some(t) => self.chat.topics.insert(r.room.clone(), t),
                        None => self.chat.topics.remove(&r.room),
                    };
                    match r.owner {
                        Some(o) => self.chat.owners.insert(r.room.clone(), o),
                        None => self.chat.owners.remove(&r.room),
                    };
                    self.known_rooms.insert(r.room);
                }
            }
            // Typing notices and read markers: a refusal (too often, a race with a part)
            // is not news.
            (Pending::Quiet, _) => {}
            (_, Err(f)) => {
                tracing::debug!(code = %f.code, "presence request failed");
            }
            (_, Ok(_)) => {}
        }
        Vec::new()
    }
}
