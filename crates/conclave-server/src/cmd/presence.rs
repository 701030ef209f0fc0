//! Everyday chat's presence requests (issue #20, part B): typing notices, read markers and
//! their privacy switch, room topics, away, display names.
//!
//! Who may: typing and read markers need membership of the conversation (a room's member, a
//! direct conversation's participant); a topic is set by the room's owner or an admin (as
//! every other room setting); away, display name and privacy are the caller's own.
//! Every one is bounded: typing and read markers per connection and conversation in time
//! (`[presence] typing_interval_ms`, `read_interval_ms`), changes per connection per minute
//! (`changes_per_minute`), texts in length (`max_topic_chars`, ...), besides the request
//! rate of every request.
//!
//! Typing and away are never stored. In an end-to-end conversation these are metadata the
//! server sees (like presence): who types where, how far they read, the topic.

use conclave_proto::{
    Conv, ConvRef, ErrorBody, ErrorCode, Event, Reply, Request, RoomInfo, Target, UserPresence,
};

use super::store_error;
use crate::bus::ClusterEvent;
use crate::cluster_events;
use crate::conn::{Conn, broadcast};
use crate::presence::{ConnBudget, check_text, rate_limited};
use crate::store::{ReadMoved, conv_key, now_ms};

/// One presence request.
pub async fn handle(conn: &mut Conn, user: &str, req: Request) -> Result<Reply, ErrorBody> {
    match req {
        Request::Typing { conv } => typing(conn, user, conv),
        Request::Read { conv, seq } => read(conn, user, conv, seq).await,
        Request::ReadMarkers { conv } => read_markers(conn, user, conv).await,
        Request::ShareReads { share } => share_reads(conn, user, share).await,
        Request::SetTopic { room, topic } => set_topic(conn, user, room, topic).await,
        Request::Away { text } => away(conn, user, text),
        Request::SetDisplayName { name } => display_name(conn, user, name).await,
        _ => Err(ErrorBody::new(
            ErrorCode::Internal,
            "internal error: not a presence request",
        )),
    }
}

fn presence(conn: &Conn) -> std::sync::MutexGuard<'_, crate::presence::Presence> {
    conn.shared
        .presence
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn budget(conn: &mut Conn) -> &mut ConnBudget {
    conn.presence_budget.get_or_insert_with(Default::default)
}

/// The conversation `conv` names, if `user` belongs to it (the same checks as a send).
fn member_conv(conn: &Conn, user: &str, conv: ConvRef) -> Result<Conv, ErrorBody> {
    let target = match conv {
        ConvRef::Room(room) => Target::Room {
            room,
            except: Vec::new(),
        },
        ConvRef::With(to) => Target::Users { to },
    };
    conn.shared
        .hub
        .lock()
        .check_send(user, &target, 0)
        .map(|c| c.conv)
}

fn typing(conn: &mut Conn, user: &str, conv: ConvRef) -> Result<Reply, ErrorBody> {
    let interval = conn.shared.config().presence.typing_interval_ms;
    let conv = member_conv(conn, user, conv)?;
    budget(conn)
        .typing(&conv_key(&conv), now_ms(), interval)
        .map_err(|r| rate_limited("typing notices come", r))?;
    let me = [user.to_string()];
    let hub = conn.shared.hub.lock();
    let event = Event::Typing {
        conv: conv.clone(),
        user: user.to_string(),
    };
    broadcast(hub.recipients(&conv, &me, None), event.clone());
    drop(hub);
    notify_conv(conn, &conv, user, event);
    Ok(Reply::Ok)
}

async fn read(conn: &mut Conn, user: &str, conv: ConvRef, seq: u64) -> Result<Reply, ErrorBody> {
    let interval = conn.shared.config().presence.read_interval_ms;
    let conv = member_conv(conn, user, conv)?;
    let key = conv_key(&conv);
    let now = now_ms();
    budget(conn)
        .read(&key, now, interval)
        .map_err(|r| rate_limited("read markers come", r))?;
    let who = user.to_string();
    let moved = conn
        .shared
        .store
        .call(move |db| db.set_read(&who, &key, seq, now))
        .await
        .map_err(store_error)?;
    match moved {
        ReadMoved::Beyond { last_seq } => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "there is no message {seq} in this conversation yet (its newest is {last_seq}); \
                 mark the sequence number of a message you have"
            ),
        )),
        ReadMoved::Unchanged => Ok(Reply::Ok),
        ReadMoved::Moved => {
            let shared = presence(conn).shares_reads(user);
            let event = Event::Read {
                conv: conv.clone(),
                user: user.to_string(),
                seq,
            };
            let hub = conn.shared.hub.lock();
            if shared {
                broadcast(hub.recipients(&conv, &[], Some(conn.sid)), event.clone());
                drop(hub);
                // On the other nodes, every member (the reader's own connections too).
                match &conv {
                    Conv::Room(room) => {
                        cluster_events::notify_room(&conn.shared, room, &[], &event)
                    }
                    Conv::Direct(users) => {
                        cluster_events::notify_users(&conn.shared, users, &event)
                    }
                }
            } else {
                // Private: only this account's other connections (its other devices).
                broadcast(
                    hub.sessions_of(std::iter::once(user), Some(conn.sid)),
                    event.clone(),
                );
                drop(hub);
                cluster_events::notify_users(&conn.shared, &[user.to_string()], &event);
            }
            Ok(Reply::Ok)
        }
    }
}

async fn read_markers(conn: &Conn, user: &str, conv: ConvRef) -> Result<Reply, ErrorBody> {
    let conv = member_conv(conn, user, conv)?;
    let key = conv_key(&conv);
    let markers = conn
        .shared
        .store
        .call(move |db| db.read_markers(&key))
        .await
        .map_err(store_error)?;
    let hub = conn.shared.hub.lock();
    let members: std::collections::HashSet<&str> = hub.audience(&conv, &[]).collect();
    let p = presence(conn);
    Ok(Reply::ReadMarkers(
        markers
            .into_iter()
            .filter(|m| members.contains(m.user.as_str()))
            .filter(|m| m.user == user || p.shares_reads(&m.user))
            .collect(),
    ))
}

async fn share_reads(conn: &mut Conn, user: &str, share: bool) -> Result<Reply, ErrorBody> {
    let per_minute = conn.shared.config().presence.changes_per_minute;
    budget(conn)
        .change(now_ms(), per_minute)
        .map_err(|r| rate_limited("changes come", r))?;
    let who = user.to_string();
    conn.shared
        .store
        .call(move |db| db.set_share_reads(&who, share))
        .await
        .map_err(store_error)?;
    presence(conn).set_share_reads(user, share);
    conn.shared.publish(ClusterEvent::ReadsShared {
        user: user.to_string(),
        share,
    });
    Ok(Reply::Ok)
}

async fn set_topic(
    conn: &mut Conn,
    user: &str,
    room: String,
    topic: String,
) -> Result<Reply, ErrorBody> {
    let cfg = conn.shared.config().presence.clone();
    let name = conn.shared.hub.lock().check_set_room(user, &room)?;
    let topic = check_text("topic", &topic, cfg.max_topic_chars)?;
    let now = now_ms();
    budget(conn)
        .change(now, cfg.changes_per_minute)
        .map_err(|r| rate_limited("changes come", r))?;
    let (n, t, by) = (name.clone(), topic.clone(), user.to_string());
    conn.shared
        .store
        .call(move |db| db.set_topic(&n, &t, &by, now))
        .await
        .map_err(store_error)?;
    let hub = conn.shared.hub.lock();
    presence(conn).set_topic(&name, &topic);
    let conv = Conv::Room(name.clone());
    let members = hub.audience(&conv, &[]);
    broadcast(
        hub.sessions_of(members, Some(conn.sid)),
        Event::Topic {
            room: name.clone(),
            topic: topic.clone(),
            by: user.to_string(),
        },
    );
    conn.shared.publish(ClusterEvent::Topic {
        room: name,
        topic,
        by: user.to_string(),
    });
    Ok(Reply::Ok)
}

fn away(conn: &mut Conn, user: &str, text: Option<String>) -> Result<Reply, ErrorBody> {
    let cfg = conn.shared.config().presence.clone();
    let text = match text {
        Some(t) => Some(check_text("away message", &t, cfg.max_away_chars)?),
        None => None,
    };
    budget(conn)
        .change(now_ms(), cfg.changes_per_minute)
        .map_err(|r| rate_limited("changes come", r))?;
    let hub = conn.shared.hub.lock();
    if presence(conn).set_away(user, text.as_deref()) {
        let event = Event::Away {
            user: user.to_string(),
            text: text.clone(),
        };
        tell_peers(conn, &hub, user, event);
        conn.shared.publish(ClusterEvent::Away {
            user: user.to_string(),
            text,
        });
    }
    Ok(Reply::Ok)
}

async fn display_name(
    conn: &mut Conn,
    user: &str,
    name: Option<String>,
) -> Result<Reply, ErrorBody> {
    let cfg = conn.shared.config().presence.clone();
    let name = match name {
        Some(n) => Some(check_text("display name", &n, cfg.max_display_name_chars)?)
            .filter(|n| !n.is_empty()),
        None => None,
    };
    budget(conn)
        .change(now_ms(), cfg.changes_per_minute)
        .map_err(|r| rate_limited("changes come", r))?;
    let (who, n) = (user.to_string(), name.clone());
    conn.shared
        .store
        .call(move |db| db.set_display_name(&who, n.as_deref()))
        .await
        .map_err(store_error)?;
    let hub = conn.shared.hub.lock();
    presence(conn).set_display_name(user, name.as_deref());
    let event = Event::DisplayName {
        user: user.to_string(),
        name: name.clone(),
    };
    tell_peers(conn, &hub, user, event);
    conn.shared.publish(ClusterEvent::DisplayName {
        user: user.to_string(),
        name,
    });
    Ok(Reply::Ok)
}

/// Shows `event` about `user` to `conv`'s members on the other nodes (but `user`).
fn notify_conv(conn: &Conn, conv: &Conv, user: &str, event: Event) {
    match conv {
        Conv::Room(room) => {
            cluster_events::notify_room(&conn.shared, room, &[user.to_string()], &event)
        }
        Conv::Direct(users) => {
            let others: Vec<String> = users.iter().filter(|u| *u != user).cloned().collect();
            cluster_events::notify_users(&conn.shared, &others, &event);
        }
    }
}

/// Those who see `user` come and go (room peers), and `user`'s other connections.
fn tell_peers(conn: &Conn, hub: &crate::hub::Hub<crate::outbox::Outbox>, user: &str, e: Event) {
    let frame = crate::outbox::encode(&conclave_proto::ServerFrame::Event(e));
    for o in hub
        .presence_audience(user)
        .into_iter()
        .chain(hub.sessions_of(std::iter::once(user), Some(conn.sid)))
    {
        o.push(frame.clone());
    }
}

/// Adds display names and away messages to a `who` answer.
pub fn fill_users(conn: &Conn, users: &mut [UserPresence]) {
    presence(conn).fill_users(users);
}

/// Adds topics to a `rooms` answer.
pub fn fill_rooms(conn: &Conn, rooms: &mut [RoomInfo]) {
    presence(conn).fill_rooms(rooms);
}
