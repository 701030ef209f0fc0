//! Replies, edits, deletes and reactions (see [`conclave_proto::chat`]).
//!
//! An act names only the message; the library asks the server where that message is
//! ([`Request::MessageInfo`]) and sends the act to the same conversation, so it goes the way
//! any send goes there (encrypted in an end-to-end conversation, resent with its idempotency
//! key after a reconnect).

use conclave_proto::chat::{ActKind, ActsOn, CONTENT_TYPE_DELETE, MessageInfo, Refs};
use conclave_proto::{Body, Conv, Message, Reply, Request, Target};

use crate::connection::unexpected;
use crate::{Client, ClientError, SendReceipt};

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
