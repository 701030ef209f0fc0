//! The JSON shapes `conclave client --json` prints: replies, events and errors.
//!
//! Pure functions from protocol values to `serde_json::Value`, so the shapes documented in
//! docs/json-client.md are pinned by tests here.

use conclave_proto::{Conv, Event, Message, Reply, RoomInfo, UserPresence};
use serde_json::{Map, Value, json};

use crate::connection::{ClientEvent, Session};
use crate::error::ClientError;

/// A message, as in the `message` event and in `history` replies. An edit, delete or
/// reaction is its own event (`edited`, `deleted`, `reaction`), naming the message it acts on.
pub fn message(m: &Message) -> Value {
    if let Some(act) = m.extra.as_ref().and_then(|x| x.acts_on.as_ref()) {
        return crate::json::chat::act(m, act);
    }
    let mut out = Map::new();
    out.insert("event".into(), json!("message"));
    conv_fields_into(&mut out, m);
    let state = m.extra.as_ref().and_then(|x| x.state.as_ref());
    if state.is_some_and(|s| s.deleted) {
        out.insert("deleted".into(), json!(true));
    } else {
        match m.body.as_text() {
            Some(text) => {
                out.insert("text".into(), json!(text));
                // Plain text keeps the shape it always had; the rest say how to show it.
                if let Some(kind) = m.body.text_kind() {
                    if kind.markdown {
                        out.insert("format".into(), json!("markdown"));
                    }
                    if kind.action {
                        out.insert("action".into(), json!(true));
                    }
                }
            }
            None => {
                out.insert("content_type".into(), json!(m.body.content_type));
                out.insert("data_hex".into(), json!(hex::encode(&m.body.data)));
            }
        }
    }
    out.insert("msg_id".into(), json!(m.msg_id));
    out.insert("seq".into(), json!(m.seq));
    out.insert("ts".into(), json!(m.ts_ms));
    if let Some(x) = &m.extra {
        crate::json::chat::extra_into(&mut out, x);
    }
    Value::Object(out)
}

/// The conversation and sender of a message: `room` or `to`, and `from`.
pub(crate) fn conv_fields_into(out: &mut Map<String, Value>, m: &Message) {
    match &m.conv {
        Conv::Room(room) => {
            out.insert("room".into(), json!(room));
        }
        Conv::Direct(participants) => {
            out.insert("to".into(), json!(direct_recipients(participants, &m.from)));
        }
    }
    out.insert("from".into(), json!(m.from));
}

/// The participants of a direct conversation other than the sender, sorted; a note to
/// oneself is addressed to oneself.
pub fn direct_recipients(participants: &[String], from: &str) -> Vec<String> {
    let mut to: Vec<String> = participants
        .iter()
        .filter(|p| p.as_str() != from)
        .cloned()
        .collect();
    if to.is_empty() {
        to.push(from.to_string());
    }
    to.sort();
    to.dedup();
    to
}

/// An event line.
pub fn event(e: &Event) -> Value {
    match e {
        Event::Message(m) => message(m),
        Event::Join { room, user } => json!({"event": "join", "room": room, "user": user}),
        // Handled by the end-to-end layer; never shown.
        Event::E2eeWelcome { conv, .. } => {
            json!({"event": "e2ee_welcome", "conv": format!("{conv:?}")})
        }
        Event::Part { room, user } => json!({"event": "part", "room": room, "user": user}),
        Event::Presence { user, online } => {
            json!({"event": "presence", "user": user, "online": online})
        }
        Event::Invited { room, by } => json!({"event": "invited", "room": room, "by": by}),
        Event::Announce { from, text, ts_ms } => {
            json!({"event": "announce", "from": from, "text": text, "ts": ts_ms})
        }
        Event::Kicked {
            room,
            user,
            by,
            reason,
        } => json!({"event": "kicked", "room": room, "user": user, "by": by, "reason": reason}),
        Event::VoteKick {
            room,
            target,
            voter,
            votes,
            needed,
        } => json!({
            "event": "votekick", "room": room, "target": target, "voter": voter,
            "votes": votes, "needed": needed
        }),
        Event::CaughtUp { count, truncated } => {
            json!({"event": "caught_up", "count": count, "truncated": truncated})
        }
        Event::Disconnect { reason, message } => {
            json!({"event": "disconnected", "reason": reason.as_str(), "message": message})
        }
        Event::FileOffer(o) => file_offer(o),
        Event::FileReady { file_id } => json!({"event": "file_ready", "file_id": file_id}),
        Event::FileRelayWanted { file_id, by } => {
            json!({"event": "file_relay_wanted", "file_id": file_id, "by": by})
        }
        Event::FileReceived {
            file_id,
            by,
            via_p2p,
        } => json!({
            "event": "file_received", "file_id": file_id, "by": by,
            "via": if *via_p2p { "p2p" } else { "relay" }
        }),
        Event::FileDeclined { file_id, by } => {
            json!({"event": "file_declined", "file_id": file_id, "by": by})
        }
        Event::FileCancelled { file_id, by } => {
            json!({"event": "file_cancelled", "file_id": file_id, "by": by})
        }
        // Turned into `e2ee` events by the end-to-end layer (see `device_notice`).
        Event::DeviceWaiting(w) => json!({
            "event": "e2ee", "kind": if w.state == "waiting" { "device_waiting" } else { "device_decided" },
            "device": w.device, "state": w.state,
            "safety_number": conclave_e2ee::key_fingerprint(&w.signature_key),
            "since": w.since_ms, "address": w.addr,
        }),
        Event::TransferReady { device } => {
            json!({"event": "transfer_ready", "device": device})
        }
        // Everyday chat, part B.
        Event::Typing { conv, user } => {
            let mut v = json!({"event": "typing", "user": user});
            add_conv(&mut v, conv, user);
            v
        }
        Event::Read { conv, user, seq } => {
            let mut v = json!({"event": "read", "user": user, "seq": seq});
            add_conv(&mut v, conv, user);
            v
        }
        Event::Topic { room, topic, by } => {
            json!({"event": "topic", "room": room, "topic": topic, "by": by})
        }
        Event::Away { user, text } => match text {
            Some(t) => json!({"event": "away", "user": user, "text": t}),
            None => json!({"event": "back", "user": user}),
        },
        Event::DisplayName { user, name } => {
            json!({"event": "display_name", "user": user, "name": name})
        }
    }
}

/// `"room"`, or for a direct conversation `"to"`: its participants other than `user`, as in
/// message events.
fn add_conv(v: &mut Value, conv: &Conv, user: &str) {
    if let Value::Object(m) = v {
        match conv {
            Conv::Room(room) => {
                m.insert("room".into(), json!(room));
            }
            Conv::Direct(participants) => {
                m.insert("to".into(), json!(direct_recipients(participants, user)));
            }
        }
    }
}

/// A file offer, as in the `file_offer` event and the `files` reply.
pub fn file_offer(o: &conclave_proto::FileOffer) -> Value {
    let mut out = Map::new();
    out.insert("event".into(), json!("file_offer"));
    out.insert("file_id".into(), json!(o.file_id));
    out.insert("from".into(), json!(o.from));
    match &o.conv {
        Conv::Room(room) => {
            out.insert("room".into(), json!(room));
            if !o.except.is_empty() {
                out.insert("except".into(), json!(o.except));
            }
        }
        Conv::Direct(participants) => {
            out.insert("to".into(), json!(direct_recipients(participants, &o.from)));
        }
    }
    out.insert("name".into(), json!(o.name));
    out.insert("size".into(), json!(o.size));
    out.insert("sha256".into(), json!(hex::encode(o.sha256)));
    out.insert("ts".into(), json!(o.ts_ms));
    out.insert("expires".into(), json!(o.expires_ms));
    out.insert("relay_ready".into(), json!(o.relay_ready));
    out.insert("p2p".into(), json!(o.p2p.is_some()));
    Value::Object(out)
}

/// A `file_progress` event.
pub fn file_progress(p: &crate::files::FileProgress) -> Value {
    let mut v = json!({
        "event": "file_progress",
        "file_id": p.file_id,
        "direction": p.direction.as_str(),
        "bytes": p.bytes,
        "total": p.total,
        "rate": p.rate.round(),
        "eta_s": p.eta_s.map(|e| (e * 10.0).round() / 10.0),
    });
    if let (Some(peer), Value::Object(m)) = (&p.peer, &mut v) {
        m.insert("peer".into(), json!(peer));
    }
    v
}

/// The fields of a `send_file` reply.
pub fn file_sent(s: &crate::files::FileSent) -> Map<String, Value> {
    let v = json!({
        "file_id": s.file_id,
        "name": s.name,
        "size": s.size,
        "sha256": s.sha256,
        "relayed": s.relayed,
        "elapsed_ms": s.elapsed.as_millis() as u64,
        "throughput": s.throughput.round(),
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The fields of a peer-to-peer `send_file` reply, sent as soon as the offer exists.
pub fn file_offered(file_id: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("file_id".into(), json!(file_id));
    m.insert("p2p".into(), json!(true));
    m.insert("serving".into(), json!(true));
    m
}

/// The end of a peer-to-peer send whose reply came at the offer: `file_sent`, with the
/// fields a relay send's reply has.
pub fn file_sent_event(s: &crate::files::FileSent) -> Value {
    let mut m = file_sent(s);
    m.insert("event".into(), json!("file_sent"));
    Value::Object(m)
}

/// A peer-to-peer send that failed (or was cancelled) after its reply: `file_failed`.
pub fn file_failed_event(file_id: &str, e: &crate::ClientError) -> Value {
    json!({
        "event": "file_failed",
        "file_id": file_id,
        "error": {"code": e.code(), "message": e.to_string()},
    })
}

/// The fields of an `accept_file` reply (and of the `file_done` event).
pub fn file_received(r: &crate::files::FileReceived) -> Map<String, Value> {
    let v = json!({
        "file_id": r.file_id,
        "path": r.path.display().to_string(),
        "size": r.size,
        "via": r.via.as_str(),
        "fallback": r.fallback,
        "resumed_from": r.resumed_from,
        "elapsed_ms": r.elapsed.as_millis() as u64,
        "throughput": r.throughput.round(),
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `{"id":..,"ok":true, ...fields}` from ready-made fields.
pub fn ok_fields(id: Option<Value>, mut map: Map<String, Value>) -> Value {
    map.insert("ok".into(), json!(true));
    with_id(map, id)
}

/// An event line for anything [`crate::Events`] yields.
pub fn client_event(e: &ClientEvent) -> Value {
    match e {
        ClientEvent::Server(e) => event(e),
        ClientEvent::Disconnected {
            reason,
            message,
            reconnecting,
        } => json!({
            "event": "disconnected",
            "reason": reason.as_str(),
            "message": message,
            "reconnecting": reconnecting,
        }),
        ClientEvent::Reconnected {
            missed,
            truncated,
            server,
        } => {
            json!({"event": "reconnected", "missed": missed, "truncated": truncated, "server": server})
        }
        ClientEvent::E2ee(n) => e2ee_notice(n),
    }
}

fn conv_fields(conv: &conclave_proto::Conv) -> Value {
    match conv {
        conclave_proto::Conv::Room(r) => json!({"room": r}),
        conclave_proto::Conv::Direct(users) => json!({"with": users}),
    }
}

/// End-to-end encryption news, as `e2ee` events (`"kind"` says which).
fn e2ee_notice(n: &crate::e2ee::E2eeNotice) -> Value {
    use crate::e2ee::E2eeNotice as N;
    if let N::Device(d) = n {
        return device_notice(d);
    }
    let (kind, conv, mut extra) = match n {
        N::Device(_) => return json!({}),
        N::Joined { conv } => (
            "joined",
            conv,
            json!({
                "note": "end-to-end encrypted: messages from before you joined cannot be read"
            }),
        ),
        N::Members {
            conv,
            epoch,
            added,
            removed,
        } => (
            "members",
            conv,
            json!({"epoch": epoch, "added": added, "removed": removed}),
        ),
        N::NewDevice {
            conv,
            user,
            device,
            fingerprint,
            changed,
        } => (
            "new_device",
            conv,
            json!({"user": user, "device": device, "fingerprint": fingerprint, "changed": changed}),
        ),
        N::Removed { conv } => ("removed", conv, json!({})),
        N::Unreadable { conv, seq, reason } => {
            ("unreadable", conv, json!({"seq": seq, "reason": reason}))
        }
    };
    if let (Value::Object(m), Value::Object(c)) = (&mut extra, conv_fields(conv)) {
        m.extend(c);
        m.insert("event".into(), json!("e2ee"));
        m.insert("kind".into(), json!(kind));
    }
    extra
}

/// News about the account's devices and history (issue 21), as `e2ee` events.
fn device_notice(d: &crate::devices::DeviceNotice) -> Value {
    use crate::devices::DeviceNotice as D;
    match d {
        D::Waiting {
            device,
            safety_number,
            since_ms,
            addr,
        } => json!({
            "event": "e2ee", "kind": "device_waiting", "device": device,
            "safety_number": safety_number, "since": since_ms, "address": addr,
        }),
        D::Decided { device, state } => json!({
            "event": "e2ee", "kind": "device_decided", "device": device, "state": state,
        }),
        D::Received {
            conversations,
            messages,
            from,
            safety_number,
            approver_in_group,
        } => json!({
            "event": "e2ee", "kind": "history_received", "conversations": conversations,
            "messages": messages, "from": from, "safety_number": safety_number,
            "approver_in_group": approver_in_group,
        }),
        D::Progress {
            direction,
            device,
            done,
            total,
        } => json!({
            "event": "e2ee", "kind": "history_progress", "direction": direction,
            "device": device, "messages": done, "total": total,
        }),
    }
}

/// The first line after login. `servers` is every `--server` address in order (`server` is
/// the one connected to).
pub fn connected(s: &Session, servers: &crate::ServerList) -> Value {
    let servers: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    json!({
        "event": "connected",
        "user": s.user,
        "server": s.server,
        "servers": servers,
        "fingerprint": s.fingerprint,
        "trust": s.trust.as_str(),
        "admin": s.admin,
        "rooms": s.rooms,
        "tls": s.tls_version,
        "key_exchange": s.key_exchange,
        "post_quantum": crate::is_post_quantum(&s.key_exchange),
    })
}

fn room_info(r: &RoomInfo) -> Value {
    let mut v = json!({
        "room": r.room,
        "private": r.private,
        "has_password": r.has_password,
        "members": r.members,
        "online": r.online,
        "member": r.member,
        "owner": r.owner,
        "e2ee": r.e2ee,
    });
    if let (Value::Object(m), Some(topic)) = (&mut v, &r.topic) {
        m.insert("topic".into(), json!(topic));
    }
    v
}

fn user_presence(u: &UserPresence) -> Value {
    let mut v = json!({
        "user": u.user,
        "online": u.online,
        "connections": u.connections,
        "admin": u.admin,
    });
    if let Value::Object(m) = &mut v {
        if let Some(away) = &u.away {
            m.insert("away".into(), json!(away));
        }
        if let Some(name) = &u.display_name {
            m.insert("display_name".into(), json!(name));
        }
    }
    v
}

/// The result fields of a successful reply (without `ok` and `id`).
fn reply_fields(reply: &Reply) -> Map<String, Value> {
    let value = match reply {
        Reply::Ok => json!({}),
        Reply::LoggedIn { user, admin, rooms } => {
            json!({"user": user, "admin": admin, "rooms": rooms})
        }
        Reply::Sent {
            msg_id,
            seq,
            ts_ms,
            duplicate,
        } => json!({"msg_id": msg_id, "seq": seq, "ts": ts_ms, "duplicate": duplicate}),
        Reply::Joined { room, members } => json!({"room": room, "members": members}),
        Reply::Rooms(rooms) => json!({"rooms": rooms.iter().map(room_info).collect::<Vec<_>>()}),
        Reply::Users(users) => {
            json!({"users": users.iter().map(user_presence).collect::<Vec<_>>()})
        }
        Reply::Messages(messages) => {
            json!({"messages": messages.iter().map(message).collect::<Vec<_>>()})
        }
        Reply::Results(messages) => {
            json!({"results": messages.iter().map(message).collect::<Vec<_>>()})
        }
        Reply::Pong { nonce } => json!({"nonce": nonce}),
        Reply::E2eeReady { key_packages, .. } => json!({"key_packages": key_packages}),
        Reply::E2eeKeyPackages(k) => json!({"key_packages": k.len()}),
        Reply::E2eeGroupInfo(g) => json!({"e2ee": g.is_some()}),
        Reply::E2eeDevices(d) => json!({"devices": d.iter().map(|d| json!({
            "user": d.user,
            "device": d.device,
            "fingerprint": conclave_e2ee::key_fingerprint(&d.signature_key),
        })).collect::<Vec<_>>()}),
        Reply::E2eeConvs(convs) => {
            json!({"conversations": convs.iter().map(conv_fields).collect::<Vec<_>>()})
        }
        Reply::DevicesWaiting(w) => json!({"devices": w.iter().map(|w| json!({
            "device": w.device,
            "state": w.state,
            "safety_number": conclave_e2ee::key_fingerprint(&w.signature_key),
            "since": w.since_ms,
            "address": w.addr,
        })).collect::<Vec<_>>()}),
        Reply::TransferChunks(c) => json!({"chunks": c.len()}),
        Reply::BackupChunks(c) => json!({"segments": c.len()}),
        Reply::VoteCounted {
            votes,
            needed,
            kicked,
        } => json!({"votes": votes, "needed": needed, "kicked": kicked}),
        Reply::Files(offers) => {
            json!({"files": offers.iter().map(file_offer).collect::<Vec<_>>()})
        }
        Reply::FileCreated {
            file_id,
            chunk_size,
            uploaded,
            expires_ms,
            relay_needed,
            ..
        } => json!({
            "file_id": file_id, "chunk_size": chunk_size, "uploaded": uploaded,
            "expires": expires_ms, "relay_needed": relay_needed
        }),
        Reply::FileUploaded {
            uploaded,
            complete,
            chunk_size,
        } => json!({"uploaded": uploaded, "complete": complete, "chunk_size": chunk_size}),
        Reply::FileData { offset, data } => json!({"offset": offset, "bytes": data.0.len()}),
        Reply::ReadMarkers(markers) => json!({"markers": markers.iter().map(|m| json!({
            "user": m.user, "seq": m.seq, "ts": m.ts_ms
        })).collect::<Vec<_>>()}),
        Reply::MessageInfo(info) => crate::json::chat::message_info(info),
    };
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn with_id(mut map: Map<String, Value>, id: Option<Value>) -> Value {
    if let Some(id) = id {
        map.insert("id".into(), id);
    }
    Value::Object(map)
}

/// `{"id":..,"ok":true, ...fields}`.
pub fn ok(id: Option<Value>, reply: &Reply) -> Value {
    let mut map = reply_fields(reply);
    map.insert("ok".into(), json!(true));
    with_id(map, id)
}

/// `{"id":..,"error":{"code":..,"message":..}}`.
pub fn error(id: Option<Value>, code: &str, message: &str) -> Value {
    let mut map = Map::new();
    map.insert("error".into(), json!({"code": code, "message": message}));
    with_id(map, id)
}

/// A request's outcome as a reply line.
pub fn result(id: Option<Value>, result: &Result<Reply, ClientError>) -> Value {
    match result {
        Ok(reply) => ok(id, reply),
        Err(e) => client_error(id, e),
    }
}

pub fn client_error(id: Option<Value>, e: &ClientError) -> Value {
    error(id, e.code(), &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::{Body, DisconnectReason, ErrorBody, ErrorCode};

    fn msg(conv: Conv, from: &str, body: Body) -> Message {
        Message {
            msg_id: "0190-abc".into(),
            conv,
            from: from.into(),
            seq: 7,
            ts_ms: 1_700_000_000_123,
            body,
            extra: None,
        }
    }

    #[test]
    fn room_message_shape() {
        let m = msg(Conv::Room("general".into()), "alice", Body::text("hi"));
        assert_eq!(
            message(&m),
            json!({"event":"message","room":"general","from":"alice","text":"hi",
                   "msg_id":"0190-abc","seq":7,"ts":1_700_000_000_123_i64})
        );
        assert_eq!(event(&Event::Message(m.clone())), message(&m));
    }

    #[test]
    fn direct_message_is_to_the_others_sorted() {
        let m = msg(
            Conv::Direct(vec!["alice".into(), "bob".into(), "carol".into()]),
            "bob",
            Body::text("hi"),
        );
        let v = message(&m);
        assert_eq!(v["to"], json!(["alice", "carol"]));
        assert!(v.get("room").is_none());
        let note = msg(Conv::Direct(vec!["alice".into()]), "alice", Body::text("x"));
        assert_eq!(message(&note)["to"], json!(["alice"]));
    }

    #[test]
    fn opaque_bodies_are_hex() {
        let m = msg(
            Conv::Room("r".into()),
            "a",
            Body {
                content_type: "application/x-e2e".into(),
                data: vec![1, 0xab],
            },
        );
        let v = message(&m);
        assert_eq!(v["content_type"], json!("application/x-e2e"));
        assert_eq!(v["data_hex"], json!("01ab"));
        assert!(v.get("text").is_none());
    }

    #[test]
    fn event_shapes() {
        let cases = [
            (
                Event::Join {
                    room: "r".into(),
                    user: "u".into(),
                },
                json!({"event":"join","room":"r","user":"u"}),
            ),
            (
                Event::Part {
                    room: "r".into(),
                    user: "u".into(),
                },
                json!({"event":"part","room":"r","user":"u"}),
            ),
            (
                Event::Presence {
                    user: "u".into(),
                    online: false,
                },
                json!({"event":"presence","user":"u","online":false}),
            ),
            (
                Event::Invited {
                    room: "r".into(),
                    by: "b".into(),
                },
                json!({"event":"invited","room":"r","by":"b"}),
            ),
            (
                Event::Announce {
                    from: "admin".into(),
                    text: "t".into(),
                    ts_ms: 5,
                },
                json!({"event":"announce","from":"admin","text":"t","ts":5}),
            ),
            (
                Event::Disconnect {
                    reason: DisconnectReason::SlowConsumer,
                    message: "m".into(),
                },
                json!({"event":"disconnected","reason":"slow_consumer","message":"m"}),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(event(&e), want);
        }
    }

    #[test]
    fn connection_event_shapes() {
        assert_eq!(
            client_event(&ClientEvent::Disconnected {
                reason: DisconnectReason::Shutdown,
                message: "bye".into(),
                reconnecting: true
            }),
            json!({"event":"disconnected","reason":"shutdown","message":"bye","reconnecting":true})
        );
        assert_eq!(
            client_event(&ClientEvent::Reconnected {
                missed: 3,
                truncated: false,
                server: "h:2".into(),
            }),
            json!({"event":"reconnected","missed":3,"truncated":false,"server":"h:2"})
        );
        let e = Event::CaughtUp {
            count: 2,
            truncated: true,
        };
        assert_eq!(
            client_event(&ClientEvent::Server(e)),
            json!({"event":"caught_up","count":2,"truncated":true})
        );
    }

    #[test]
    fn reply_shapes() {
        assert_eq!(ok(Some(json!(1)), &Reply::Ok), json!({"id":1,"ok":true}));
        assert_eq!(ok(None, &Reply::Ok), json!({"ok":true}));
        assert_eq!(
            ok(
                Some(json!("s")),
                &Reply::Sent {
                    msg_id: "m".into(),
                    seq: 3,
                    ts_ms: 9,
                    duplicate: false
                }
            ),
            json!({"id":"s","ok":true,"msg_id":"m","seq":3,"ts":9,"duplicate":false})
        );
        assert_eq!(
            ok(
                None,
                &Reply::Joined {
                    room: "g".into(),
                    members: vec!["a".into()]
                }
            ),
            json!({"ok":true,"room":"g","members":["a"]})
        );
        assert_eq!(
            ok(
                None,
                &Reply::Users(vec![UserPresence {
                    user: "a".into(),
                    online: true,
                    connections: 2,
                    admin: false,
                    display_name: None,
                    away: None,
                }])
            ),
            json!({"ok":true,"users":[{"user":"a","online":true,"connections":2,"admin":false}]})
        );
        assert_eq!(
            ok(
                None,
                &Reply::Rooms(vec![RoomInfo {
                    room: "g".into(),
                    private: false,
                    has_password: false,
                    members: 3,
                    online: 1,
                    member: true,
                    owner: None,
                    e2ee: false,
                    topic: None,
                }])
            ),
            json!({"ok":true,"rooms":[{"room":"g","private":false,"has_password":false,
                   "members":3,"online":1,"member":true,"owner":null,"e2ee":false}]})
        );
        let m = msg(Conv::Room("g".into()), "a", Body::text("x"));
        assert_eq!(
            ok(None, &Reply::Messages(vec![m.clone()])),
            json!({"ok":true,"messages":[message(&m)]})
        );
    }

    #[test]
    fn error_shapes() {
        assert_eq!(
            error(Some(json!(2)), "bad_request", "no"),
            json!({"id":2,"error":{"code":"bad_request","message":"no"}})
        );
        let e = ClientError::Server(ErrorBody::new(ErrorCode::NotMember, "join it first"));
        assert_eq!(
            result(None, &Err(e)),
            json!({"error":{"code":"not_member","message":"join it first"}})
        );
        let e = ClientError::disconnected(DisconnectReason::Shutdown, "bye");
        assert_eq!(
            client_error(None, &e)["error"]["code"],
            json!("disconnected")
        );
    }
}
