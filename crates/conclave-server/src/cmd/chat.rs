//! Replies, edits, deletes and reactions: the rules, checked before such a send is queued;
//! the lookup of a message by id; threads.
//!
//! The rules: a reply or an act names a message of the same conversation that the sender may
//! see; only the author edits (within `messages.edit_window_s`, at most `messages.max_edits`
//! times); the author, the room's owner or an admin deletes (a delete by anyone else is
//! audited, without text); reacting needs membership (the send's own check) and an emoji of
//! at most `messages.max_emoji_bytes`; a message holds at most `messages.max_reactions`. An
//! act on a deleted message, or on an act, is refused. They are sends, so the connection's
//! request rate and sends in flight bound them like any message.

use conclave_proto::chat::{ActKind, CONTENT_TYPE_DELETE, MessageInfo, Refs, check_emoji};
use conclave_proto::{Body, Conv, ErrorBody, ErrorCode, Reply};

use super::store_error;
use crate::conn::Conn;
use crate::store::TargetRow;

/// Longest message id accepted in a reference (a UUID is 36 characters).
pub const MAX_MSG_ID_BYTES: usize = 64;

fn no_such_message(id: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!(
            "there is no message {id:?} in this conversation that you can see; check the msg_id"
        ),
    )
}

async fn lookup(conn: &Conn, user: &str, msg_id: &str) -> Result<Option<TargetRow>, ErrorBody> {
    if msg_id.len() > MAX_MSG_ID_BYTES {
        return Err(no_such_message(msg_id));
    }
    let (id, viewer) = (msg_id.to_string(), user.to_string());
    conn.shared
        .store
        .call(move |db| db.target(&id, &viewer))
        .await
        .map_err(store_error)
}

/// What a checked act changes in the send: who must not receive it (the target's own
/// blockcast list) and, for a delete in a server-encrypted conversation, its body.
pub struct CheckedRefs {
    pub except: Option<Vec<String>>,
    pub body: Option<Body>,
    /// The audit record to write once the act is committed (a delete of another's message).
    pub audit: Option<(crate::audit::Kind, crate::audit::Fields)>,
}

/// Checks a send's reply or act against the rules. `conv` is the send's conversation (its
/// membership already checked).
pub async fn check(
    conn: &Conn,
    user: &str,
    conv: &Conv,
    body: &Body,
    refs: &Refs,
) -> Result<CheckedRefs, ErrorBody> {
    let mls = body.content_type.starts_with("application/mls-");
    let mut out = CheckedRefs {
        except: None,
        body: None,
        audit: None,
    };
    if refs.reply_to.is_some() && refs.acts_on.is_some() {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "a message is a reply or an edit, delete or reaction, not both",
        ));
    }
    if let Some(id) = &refs.reply_to {
        let t = lookup(conn, user, id).await?;
        let t = t
            .filter(|t| &t.conv == conv)
            .ok_or_else(|| no_such_message(id))?;
        if t.is_act {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "that id is an edit, delete or reaction; reply to the message itself",
            ));
        }
        if t.deleted {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                "that message was deleted; it cannot be answered",
            ));
        }
    }
    let Some(act) = &refs.acts_on else {
        return Ok(out);
    };
    let limits = conn.shared.config().messages.clone();
    let t = lookup(conn, user, &act.msg_id).await?;
    let t = t
        .filter(|t| &t.conv == conv)
        .ok_or_else(|| no_such_message(&act.msg_id))?;
    if t.is_act {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "that id is an edit, delete or reaction; act on the message itself",
        ));
    }
    if t.deleted {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            "that message was deleted",
        ));
    }
    out.except = (!t.except.is_empty()).then(|| t.except.clone());
    match act.kind {
        ActKind::Edit => {
            if t.from != user {
                return Err(ErrorBody::new(
                    ErrorCode::Forbidden,
                    "only its author can edit a message",
                ));
            }
            if t.edits >= limits.max_edits {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    if limits.max_edits == 0 {
                        "editing is turned off on this server".to_string()
                    } else {
                        format!(
                            "a message can be edited at most {} times; send a new message",
                            limits.max_edits
                        )
                    },
                ));
            }
            let window_ms = limits.edit_window_s.saturating_mul(1000);
            if window_ms > 0 && crate::store::now_ms().saturating_sub(t.ts_ms) > window_ms as i64 {
                return Err(ErrorBody::new(
                    ErrorCode::Expired,
                    format!(
                        "messages can be edited for {} s after sending; send a new message",
                        limits.edit_window_s
                    ),
                ));
            }
            if !mls && body.as_text().is_none_or(|s| s.trim().is_empty()) {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "an edit needs the new text; to remove the message, delete it",
                ));
            }
        }
        ActKind::Delete => {
            let allowed = t.from == user || {
                let hub = conn.shared.hub.lock();
                hub.is_admin(user)
                    || matches!(conv, Conv::Room(r)
                        if hub.room(r).and_then(|r| r.owner.as_deref()) == Some(user))
            };
            if !allowed {
                return Err(ErrorBody::new(
                    ErrorCode::Forbidden,
                    "only its author, the room's owner or an admin can delete a message",
                ));
            }
            if !mls {
                out.body = Some(Body {
                    content_type: CONTENT_TYPE_DELETE.to_string(),
                    data: Vec::new(),
                });
            }
            if t.from != user {
                let mut fields = crate::audit::Fields::new()
                    .ip(conn.peer)
                    .user(user)
                    .with("author", t.from.clone())
                    .with("msg_id", t.msg_id.clone());
                if let Conv::Room(r) = conv {
                    fields = fields.room(r);
                }
                out.audit = Some((crate::audit::Kind::MessageDeleted, fields));
            }
        }
        ActKind::React | ActKind::Unreact => {
            if !mls {
                let emoji = body.as_text().ok_or_else(|| {
                    ErrorBody::new(ErrorCode::BadRequest, "a reaction is a text emoji")
                })?;
                check_emoji(emoji, limits.max_emoji_bytes)
                    .map_err(|m| ErrorBody::new(ErrorCode::BadRequest, m))?;
            }
            if act.kind == ActKind::React && t.reactions >= limits.max_reactions as usize {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    format!("a message holds at most {} reactions", limits.max_reactions),
                ));
            }
        }
    }
    Ok(out)
}

/// Where a message is, for a caller who may see it.
pub async fn message_info(conn: &Conn, user: &str, msg_id: String) -> Result<Reply, ErrorBody> {
    let t = lookup(conn, user, &msg_id)
        .await?
        .filter(|t| may_read(conn, user, &t.conv))
        .ok_or_else(|| no_such_message(&msg_id))?;
    Ok(Reply::MessageInfo(MessageInfo {
        msg_id: t.msg_id,
        conv: t.conv,
        from: t.from,
        seq: t.seq,
        ts_ms: t.ts_ms,
    }))
}

/// Whether `user` belongs to `conv` (a room's member, a direct conversation's participant).
fn may_read(conn: &Conn, user: &str, conv: &Conv) -> bool {
    match conv {
        Conv::Room(r) => conn
            .shared
            .hub
            .lock()
            .room(r)
            .is_some_and(|r| r.members.contains(user)),
        Conv::Direct(users) => users.iter().any(|u| u == user),
    }
}

/// A thread: the message and its replies, oldest first.
pub async fn thread(
    conn: &Conn,
    user: &str,
    msg_id: String,
    limit: u32,
    after: Option<u64>,
) -> Result<Reply, ErrorBody> {
    let max = conn.shared.config().limits.max_history_page;
    if limit == 0 || limit > max {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("limit must be between 1 and {max}"),
        ));
    }
    let t = lookup(conn, user, &msg_id)
        .await?
        .filter(|t| may_read(conn, user, &t.conv))
        .ok_or_else(|| no_such_message(&msg_id))?;
    let viewer = user.to_string();
    let id = t.msg_id.clone();
    let messages = conn
        .shared
        .store
        .call(move |db| db.thread(&id, &viewer, after, limit))
        .await
        .map_err(store_error)?
        .unwrap_or_default();
    Ok(Reply::Messages(messages))
}
