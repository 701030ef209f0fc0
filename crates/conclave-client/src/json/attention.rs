//! The JSON client's mentions and unread counts ([`crate::chat::Attention`]): message events
//! carry `"mention"` when they mention this user, `unread` lists the counts, `read` resets a
//! conversation's, `mute` silences a conversation's mention alerts (`"alert": false`).

use std::sync::{Arc, Mutex};

use conclave_proto::{Conv, ConvRef, Message};
use serde_json::{Map, Value, json};

use crate::chat::{Attention, Mention};
use crate::connection::Client;

/// Shared by the event forwarder (which counts) and the driver (which reads and resets).
#[derive(Clone, Default)]
pub struct SharedAttention(Arc<Mutex<Attention>>);

impl SharedAttention {
    fn lock(&self) -> std::sync::MutexGuard<'_, Attention> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a message event and marks its line: `"mention": "me"` or `"room"`, and
    /// `"alert": false` when its conversation is muted.
    pub async fn annotate(
        &self,
        client: Option<&Client>,
        m: &Message,
        line: &mut Map<String, Value>,
    ) {
        let me = match client {
            Some(c) => c.user().to_string(),
            None => return,
        };
        // `@room` counts only from the room's owner: learn the owners the first time one
        // is needed (one `rooms` request).
        if let (Conv::Room(room), Some(text), Some(client)) = (&m.conv, m.body.as_text(), client)
            && text.contains("@room")
            && !self.lock().knows_owner(room)
            && let Ok(rooms) = client.rooms().await
        {
            let mut a = self.lock();
            for r in &rooms {
                a.set_owner(&r.room, r.owner.as_deref());
            }
            if !a.knows_owner(room) {
                // A room without an owner: nobody may `@room` it.
                a.set_owner(room, Some(""));
            }
        }
        let noticed = self.lock().on_message(m, &me, false);
        if let Some(mention) = noticed.mention {
            let what = match mention {
                Mention::Me => "me",
                Mention::Room => "room",
            };
            line.insert("mention".into(), json!(what));
            if !noticed.alert {
                line.insert("alert".into(), json!(false));
            }
        }
    }

    /// The conversation was read: its counts start over.
    pub fn read(&self, client: &Client, conv: &ConvRef) {
        let conv = client.conv_of(conv);
        self.lock().read(&conv);
    }

    pub fn mute(&self, client: &Client, conv: &ConvRef, muted: bool) {
        let conv = client.conv_of(conv);
        self.lock().set_muted(&conv, muted);
    }

    /// The `unread` reply: `"conversations"`, each with `room` or `with`, `unread`,
    /// `mentions` and `muted`.
    pub fn unread(&self, me: &str) -> Map<String, Value> {
        let a = self.lock();
        let mut list: Vec<(Conv, Value)> = a
            .all()
            .map(|(conv, c)| {
                let mut v = match conv {
                    Conv::Room(r) => json!({"room": r}),
                    Conv::Direct(users) => {
                        json!({"with": super::render::direct_recipients(users, me)})
                    }
                };
                if let Value::Object(m) = &mut v {
                    m.insert("unread".into(), json!(c.unread));
                    m.insert("mentions".into(), json!(c.mentions));
                    m.insert("muted".into(), json!(a.is_muted(conv)));
                }
                (conv.clone(), v)
            })
            .collect();
        list.sort_by(|x, y| x.0.cmp(&y.0));
        let mut out = Map::new();
        out.insert(
            "conversations".into(),
            Value::Array(list.into_iter().map(|(_, v)| v).collect()),
        );
        out
    }
}
