//! The bus's wire encoding: one version byte, then postcard.
//!
//! A commit notice is `[WIRE_VERSION] postcard(header) [frame]`: the header names the
//! conversation, sequence number, message id, `except` list and whether a frame follows; the
//! frame, when present, runs to the end of the payload and is exactly what an outbox queues
//! (4-byte big-endian length, then the `ServerFrame::Event(Event::Message)` body). The decoder
//! returns it as a slice of the received buffer, after checking once that it decodes to the
//! message the header names, so a node never forwards bytes it has not understood.
//!
//! An event is `[WIRE_VERSION] postcard(node, event)`, exactly (no trailing bytes).
//!
//! A node refuses a payload of another version rather than guessing: a rolling upgrade that
//! changes the encoding bumps [`WIRE_VERSION`] and must teach the old version's decoder first.
//! Everything a peer sends is checked (sizes before decoding, names, lengths); nothing here
//! panics on input.

use bytes::{BufMut, Bytes, BytesMut};
use conclave_proto::{Conv, Event, FRAME_HEADER_BYTES, ServerFrame};
use serde::{Deserialize, Serialize};

use super::{
    Audience, ClusterEvent, Commit, MAX_ANNOUNCE_BYTES, MAX_MSG_ID_BYTES, MAX_NAMES,
    MAX_NODE_BYTES, MAX_NOTICE_BYTES, MAX_REASON_BYTES,
};

/// The encoding's version, the first byte of every payload.
///
/// Version 2: the cluster events of `cluster_events` (presence heartbeats, votes, notices,
/// store hints); version 1's events had other fields. Commit notices are unchanged.
pub const WIRE_VERSION: u8 = 2;
/// The largest sequence number a notice may carry (PostgreSQL's `bigint`), so that counting on
/// from any received one cannot overflow.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// A payload that is not a valid notice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty payload")]
    Empty,
    #[error("payload of {0} bytes is over the limit of {MAX_NOTICE_BYTES}")]
    TooLarge(usize),
    #[error(
        "encoding version {0} is not known to this node (it speaks {WIRE_VERSION}); upgrade it"
    )]
    UnknownVersion(u8),
    #[error("malformed notice: {0}")]
    Malformed(String),
    #[error("invalid notice: {0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> WireError {
    WireError::Invalid(what.into())
}

#[derive(Serialize)]
struct CommitHeadRef<'a> {
    node: &'a str,
    conv: &'a Conv,
    seq: u64,
    msg_id: &'a str,
    except: &'a [String],
    inline: bool,
}

#[derive(Deserialize)]
struct CommitHead {
    node: String,
    conv: Conv,
    seq: u64,
    msg_id: String,
    except: Vec<String>,
    inline: bool,
}

#[derive(Serialize)]
struct EventRef<'a> {
    node: &'a str,
    event: &'a ClusterEvent,
}

#[derive(Deserialize)]
struct EventOwned {
    node: String,
    event: ClusterEvent,
}

/// Encodes `commit` as published by `node`; refuses what a receiver would refuse.
pub fn encode_commit(node: &str, commit: &Commit) -> Result<Bytes, WireError> {
    check_node(node)?;
    check_commit_head(&commit.conv, commit.seq, &commit.msg_id, &commit.except)?;
    let head = CommitHeadRef {
        node,
        conv: &commit.conv,
        seq: commit.seq,
        msg_id: &commit.msg_id,
        except: &commit.except,
        inline: commit.frame.is_some(),
    };
    let head = postcard::to_stdvec(&head).map_err(|e| WireError::Malformed(e.to_string()))?;
    let frame_len = commit.frame.as_ref().map_or(0, Bytes::len);
    let total = 1 + head.len() + frame_len;
    if total > MAX_NOTICE_BYTES {
        return Err(WireError::TooLarge(total));
    }
    let mut out = BytesMut::with_capacity(total);
    out.put_u8(WIRE_VERSION);
    out.extend_from_slice(&head);
    if let Some(frame) = &commit.frame {
        out.extend_from_slice(frame);
    }
    Ok(out.freeze())
}

/// Decodes a commit notice: the publishing node and the commit (its frame a slice of
/// `payload`).
pub fn decode_commit(payload: &Bytes) -> Result<(String, Commit), WireError> {
    let body = versioned(payload)?;
    let (head, rest) = postcard::take_from_bytes::<CommitHead>(body)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    check_node(&head.node)?;
    check_commit_head(&head.conv, head.seq, &head.msg_id, &head.except)?;
    let frame = if head.inline {
        check_frame(rest, &head)?;
        Some(payload.slice(payload.len() - rest.len()..))
    } else if rest.is_empty() {
        None
    } else {
        return Err(WireError::Malformed(format!(
            "{} unexpected bytes after a notice without a frame",
            rest.len()
        )));
    };
    let commit = Commit {
        conv: head.conv,
        seq: head.seq,
        msg_id: head.msg_id,
        except: head.except,
        frame,
    };
    Ok((head.node, commit))
}

/// Encodes a cluster event as published by `node`.
pub fn encode_event(node: &str, event: &ClusterEvent) -> Result<Bytes, WireError> {
    check_node(node)?;
    check_event(event)?;
    let mut out = vec![WIRE_VERSION];
    let body = postcard::to_stdvec(&EventRef { node, event })
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    out.extend_from_slice(&body);
    if out.len() > MAX_NOTICE_BYTES {
        return Err(WireError::TooLarge(out.len()));
    }
    Ok(Bytes::from(out))
}

/// Decodes a cluster event: the publishing node and the event.
pub fn decode_event(payload: &[u8]) -> Result<(String, ClusterEvent), WireError> {
    let body = versioned(payload)?;
    let (e, rest) = postcard::take_from_bytes::<EventOwned>(body)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} unexpected bytes after the event",
            rest.len()
        )));
    }
    check_node(&e.node)?;
    check_event(&e.event)?;
    Ok((e.node, e.event))
}

/// The payload after its version byte, once its size and version are acceptable.
fn versioned(payload: &[u8]) -> Result<&[u8], WireError> {
    if payload.len() > MAX_NOTICE_BYTES {
        return Err(WireError::TooLarge(payload.len()));
    }
    match payload.split_first() {
        None => Err(WireError::Empty),
        Some((&WIRE_VERSION, body)) => Ok(body),
        Some((&v, _)) => Err(WireError::UnknownVersion(v)),
    }
}

/// The frame after a header: a length prefix that matches, and a body that is the message the
/// header names.
fn check_frame(frame: &[u8], head: &CommitHead) -> Result<(), WireError> {
    let Some((len, body)) = frame.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(WireError::Malformed(
            "a frame shorter than its length".into(),
        ));
    };
    if u32::from_be_bytes(*len) as usize != body.len() {
        return Err(WireError::Malformed(format!(
            "the frame's length says {} bytes, {} follow",
            u32::from_be_bytes(*len),
            body.len()
        )));
    }
    match conclave_proto::decode_server(body) {
        Ok(ServerFrame::Event(Event::Message(m)))
            if m.conv == head.conv && m.seq == head.seq && m.msg_id == head.msg_id =>
        {
            Ok(())
        }
        Ok(ServerFrame::Event(Event::Message(_))) => Err(invalid(
            "the frame's message is not the one the notice names",
        )),
        Ok(_) => Err(invalid("the frame is not a message event")),
        Err(e) => Err(WireError::Malformed(format!("the frame: {e}"))),
    }
}

/// The checks [`encode_commit`] makes, without encoding.
pub fn check_commit(node: &str, commit: &Commit) -> Result<(), WireError> {
    check_node(node)?;
    check_commit_head(&commit.conv, commit.seq, &commit.msg_id, &commit.except)
}

/// The checks [`encode_event`] makes, without encoding.
pub fn check_event_of(node: &str, event: &ClusterEvent) -> Result<(), WireError> {
    check_node(node)?;
    check_event(event)
}

/// A node name: 1 to [`MAX_NODE_BYTES`] bytes, no control characters.
pub fn check_node(node: &str) -> Result<(), WireError> {
    if node.is_empty() || node.len() > MAX_NODE_BYTES {
        return Err(invalid(format!(
            "a node name must have 1 to {MAX_NODE_BYTES} bytes"
        )));
    }
    if node.chars().any(char::is_control) {
        return Err(invalid("a node name has control characters"));
    }
    Ok(())
}

/// A canonical account or room name (what the store and the hub hold).
fn check_name(name: &str, what: &str) -> Result<(), WireError> {
    match conclave_proto::names::canonical(name) {
        Ok(c) if c == name => Ok(()),
        _ => Err(invalid(format!("{what} is not a canonical name"))),
    }
}

fn check_names(names: &[String], what: &str) -> Result<(), WireError> {
    if names.len() > MAX_NAMES {
        return Err(invalid(format!("more than {MAX_NAMES} names in {what}")));
    }
    names.iter().try_for_each(|n| check_name(n, what))
}

fn check_commit_head(
    conv: &Conv,
    seq: u64,
    msg_id: &str,
    except: &[String],
) -> Result<(), WireError> {
    match conv {
        Conv::Room(room) => check_name(room, "the room")?,
        Conv::Direct(users) => {
            check_names(users, "the participants")?;
            if users.is_empty() || users.windows(2).any(|w| w[0] >= w[1]) {
                return Err(invalid(
                    "a direct conversation's participants must be sorted and unique",
                ));
            }
        }
    }
    if seq == 0 || seq > MAX_SEQ {
        return Err(invalid(format!("a sequence number must be 1 to {MAX_SEQ}")));
    }
    if msg_id.is_empty() || msg_id.len() > MAX_MSG_ID_BYTES {
        return Err(invalid(format!(
            "a message id must have 1 to {MAX_MSG_ID_BYTES} bytes"
        )));
    }
    check_names(except, "the except list")
}

fn check_text(text: &str, max: usize, what: &str) -> Result<(), WireError> {
    if text.len() > max {
        return Err(invalid(format!("{what} is longer than {max} bytes")));
    }
    Ok(())
}

/// Longest topic, display name or away message in an event, in bytes (the configured limits
/// are in characters and far below it).
pub const MAX_SHOWN_TEXT_BYTES: usize = 16 * 1024;

fn check_ms(ms: Option<i64>, what: &str) -> Result<(), WireError> {
    match ms {
        Some(t) if t < 0 => Err(invalid(format!("{what} is before 1970"))),
        _ => Ok(()),
    }
}

fn check_event(event: &ClusterEvent) -> Result<(), WireError> {
    match event {
        ClusterEvent::Presence { user, .. } => check_name(user, "the user"),
        ClusterEvent::Online { users, .. } => check_names(users, "the online users"),
        ClusterEvent::Leaving | ClusterEvent::BansChanged | ClusterEvent::IpRulesChanged => Ok(()),
        ClusterEvent::Kicked {
            room,
            user,
            by,
            reason,
            banned_until_ms,
        } => {
            check_name(room, "the room")?;
            check_name(user, "the user")?;
            check_text(by, MAX_NODE_BYTES, "who kicked")?;
            check_text(reason, MAX_REASON_BYTES, "the reason")?;
            check_ms(*banned_until_ms, "the room ban's end")
        }
        ClusterEvent::KickedOff { user, by, reason } => {
            check_name(user, "the user")?;
            check_text(by, MAX_NODE_BYTES, "who kicked")?;
            check_text(reason, MAX_REASON_BYTES, "the reason")
        }
        ClusterEvent::Banned {
            user,
            until_ms,
            by,
            reason,
        } => {
            check_name(user, "the user")?;
            check_ms(*until_ms, "the ban's end")?;
            check_text(by, MAX_NODE_BYTES, "who banned")?;
            check_text(reason, MAX_REASON_BYTES, "the reason")
        }
        ClusterEvent::AddressBanned {
            until_ms,
            by,
            reason,
            ..
        } => {
            check_ms(*until_ms, "the ban's end")?;
            check_text(by, MAX_NODE_BYTES, "who banned")?;
            check_text(reason, MAX_REASON_BYTES, "the reason")
        }
        ClusterEvent::Announce { from, text } => {
            check_name(from, "the sender")?;
            check_text(text, MAX_ANNOUNCE_BYTES, "the announcement")
        }
        ClusterEvent::RoomChanged { room, notice, to } => {
            check_name(room, "the room")?;
            check_names(to, "the notice's recipients")?;
            match notice {
                Some(e) if !super::notice_allowed(e) => {
                    Err(invalid("the room's notice is not a kind that may travel"))
                }
                _ => Ok(()),
            }
        }
        ClusterEvent::AccountChanged { user } => check_name(user, "the user"),
        ClusterEvent::Vote {
            room,
            target,
            voter,
            at_ms,
        } => {
            check_name(room, "the room")?;
            check_name(target, "the target")?;
            check_name(voter, "the voter")?;
            check_ms(Some(*at_ms), "the vote's time")
        }
        ClusterEvent::Topic { room, topic, by } => {
            check_name(room, "the room")?;
            check_name(by, "who set the topic")?;
            check_text(topic, MAX_SHOWN_TEXT_BYTES, "the topic")
        }
        ClusterEvent::DisplayName { user, name } => {
            check_name(user, "the user")?;
            check_text(
                name.as_deref().unwrap_or(""),
                MAX_SHOWN_TEXT_BYTES,
                "the display name",
            )
        }
        ClusterEvent::Away { user, text } => {
            check_name(user, "the user")?;
            check_text(
                text.as_deref().unwrap_or(""),
                MAX_SHOWN_TEXT_BYTES,
                "the away message",
            )
        }
        ClusterEvent::Notify { to, event } => {
            match to {
                Audience::Users(users) => check_names(users, "the recipients")?,
                Audience::Room { room, except } => {
                    check_name(room, "the room")?;
                    check_names(except, "the except list")?;
                }
            }
            if super::notice_allowed(event) {
                Ok(())
            } else {
                Err(invalid("the notice is not a kind that may travel"))
            }
        }
        ClusterEvent::ReadsShared { user, .. } => check_name(user, "the user"),
        ClusterEvent::FileChanged { file_id, users } => {
            if file_id.is_empty() || file_id.len() > MAX_MSG_ID_BYTES {
                return Err(invalid(format!(
                    "a file id must have 1 to {MAX_MSG_ID_BYTES} bytes"
                )));
            }
            check_names(users, "the recipients")
        }
        ClusterEvent::E2eeGroup { conv } => check_conv_key(conv),
        ClusterEvent::Welcomes { welcomes } => {
            if welcomes.len() > MAX_NAMES {
                return Err(invalid(format!("more than {MAX_NAMES} Welcomes")));
            }
            for (user, device, _) in welcomes {
                check_name(user, "a Welcome's user")?;
                if device.is_empty() || device.len() > MAX_DEVICE_BYTES {
                    return Err(invalid(format!(
                        "a device name must have 1 to {MAX_DEVICE_BYTES} bytes"
                    )));
                }
            }
            Ok(())
        }
    }
}

/// Most bytes of a device name in a [`ClusterEvent::Welcomes`].
const MAX_DEVICE_BYTES: usize = 256;

/// A conversation's storage key (`r:ROOM` or `d:A,B,…`) of a bounded length.
fn check_conv_key(conv: &str) -> Result<(), WireError> {
    const MAX_CONV_KEY_BYTES: usize = 64 * 1024;
    let ok = (conv.starts_with("r:") || conv.starts_with("d:"))
        && conv.len() > 2
        && conv.len() <= MAX_CONV_KEY_BYTES
        && !conv.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(invalid("not a conversation's key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::{Body, Message};
    use rand::{Rng, SeedableRng};

    fn message(seq: u64) -> Message {
        Message {
            msg_id: format!("m{seq}"),
            conv: Conv::Room("general".into()),
            from: "alice".into(),
            seq,
            ts_ms: 1,
            body: Body::text("hello"),
            extra: None,
        }
    }

    fn frame_of(m: &Message) -> Bytes {
        let body = conclave_proto::encode_server(&ServerFrame::Event(Event::Message(m.clone())));
        let mut b = BytesMut::new();
        b.put_u32(body.len() as u32);
        b.extend_from_slice(&body);
        b.freeze()
    }

    fn commit(seq: u64) -> Commit {
        let m = message(seq);
        Commit::new(&m, &["carol".into()], frame_of(&m), 1 << 20)
    }

    #[test]
    fn a_commit_round_trips_with_its_frame_as_a_slice() {
        let c = commit(7);
        let bytes = encode_commit("node-a", &c).expect("encodes");
        assert_eq!(bytes[0], WIRE_VERSION);
        let (node, back) = decode_commit(&bytes).expect("decodes");
        assert_eq!(node, "node-a");
        assert_eq!(back, c);
        let frame = back.frame.expect("inline");
        // The frame is the tail of the received buffer, not a copy.
        assert_eq!(
            frame.as_ptr(),
            bytes[bytes.len() - frame.len()..].as_ptr(),
            "zero-copy"
        );
    }

    #[test]
    fn a_large_frame_is_left_out_and_the_notice_still_travels() {
        let m = message(3);
        let c = Commit::new(&m, &[], frame_of(&m), 8);
        assert_eq!(c.frame, None);
        let bytes = encode_commit("a", &c).expect("encodes");
        let (_, back) = decode_commit(&bytes).expect("decodes");
        assert_eq!(back, c);
    }

    /// One of every event.
    fn every_event() -> Vec<ClusterEvent> {
        vec![
            ClusterEvent::Presence {
                user: "bob".into(),
                online: true,
            },
            ClusterEvent::Online {
                users: vec!["alice".into(), "bob".into()],
                ttl_ms: 30_000,
                ask: true,
            },
            ClusterEvent::Leaving,
            ClusterEvent::Kicked {
                room: "general".into(),
                user: "mallory".into(),
                by: "vote".into(),
                reason: "spam".into(),
                banned_until_ms: Some(7),
            },
            ClusterEvent::KickedOff {
                user: "mallory".into(),
                by: "operator".into(),
                reason: "".into(),
            },
            ClusterEvent::Banned {
                user: "mallory".into(),
                until_ms: None,
                by: "root".into(),
                reason: "".into(),
            },
            ClusterEvent::AddressBanned {
                net: "192.0.2.0/24".parse().expect("cidr"),
                until_ms: Some(5),
                by: "server".into(),
                reason: "automatic".into(),
            },
            ClusterEvent::BansChanged,
            ClusterEvent::IpRulesChanged,
            ClusterEvent::Announce {
                from: "root".into(),
                text: "maintenance at 5".into(),
            },
            ClusterEvent::RoomChanged {
                room: "ops".into(),
                notice: Some(Event::Join {
                    room: "ops".into(),
                    user: "bob".into(),
                }),
                to: vec![],
            },
            ClusterEvent::AccountChanged {
                user: "carol".into(),
            },
            ClusterEvent::Vote {
                room: "general".into(),
                target: "mallory".into(),
                voter: "bob".into(),
                at_ms: 1,
            },
            ClusterEvent::Topic {
                room: "ops".into(),
                topic: "deploys".into(),
                by: "bob".into(),
            },
            ClusterEvent::DisplayName {
                user: "bob".into(),
                name: Some("Bob B.".into()),
            },
            ClusterEvent::Away {
                user: "bob".into(),
                text: None,
            },
            ClusterEvent::Notify {
                to: Audience::Room {
                    room: "general".into(),
                    except: vec!["bob".into()],
                },
                event: Event::Typing {
                    conv: Conv::Room("general".into()),
                    user: "alice".into(),
                },
            },
            ClusterEvent::Notify {
                to: Audience::Users(vec!["carol".into()]),
                event: Event::FileReady {
                    file_id: "f1".into(),
                },
            },
            ClusterEvent::ReadsShared {
                user: "bob".into(),
                share: false,
            },
            ClusterEvent::FileChanged {
                file_id: "f1".into(),
                users: vec!["carol".into()],
            },
            ClusterEvent::E2eeGroup {
                conv: "d:alice,bob".into(),
            },
            ClusterEvent::Welcomes {
                welcomes: vec![("bob".into(), "laptop".into(), 7)],
            },
        ]
    }

    #[test]
    fn an_event_round_trips() {
        for e in every_event() {
            let bytes = encode_event("b", &e).expect("encodes");
            assert_eq!(decode_event(&bytes), Ok(("b".into(), e)));
        }
    }

    /// The bytes a node that skips the checks would send.
    fn unchecked(node: &str, event: &ClusterEvent) -> Vec<u8> {
        let mut out = vec![WIRE_VERSION];
        out.extend(postcard::to_stdvec(&EventRef { node, event }).expect("postcard"));
        out
    }

    #[test]
    fn hostile_events_are_refused_on_receipt() {
        let message = Event::Message(message(1));
        let hostile = [
            // A message is never a notice: only the store delivers messages.
            ClusterEvent::Notify {
                to: Audience::Users(vec!["bob".into()]),
                event: message.clone(),
            },
            ClusterEvent::Notify {
                to: Audience::Users(vec!["bob".into()]),
                event: Event::Disconnect {
                    reason: conclave_proto::DisconnectReason::Banned,
                    message: "fake".into(),
                },
            },
            ClusterEvent::RoomChanged {
                room: "ops".into(),
                notice: Some(Event::Presence {
                    user: "bob".into(),
                    online: true,
                }),
                to: vec![],
            },
            ClusterEvent::Notify {
                to: Audience::Users(vec!["Not A Name".into()]),
                event: Event::FileReady {
                    file_id: "f".into(),
                },
            },
            ClusterEvent::Online {
                users: vec!["bob".into(); MAX_NAMES + 1],
                ttl_ms: 1,
                ask: false,
            },
            ClusterEvent::Banned {
                user: "bob".into(),
                until_ms: Some(-1),
                by: "root".into(),
                reason: "".into(),
            },
            ClusterEvent::Topic {
                room: "ops".into(),
                topic: "x".repeat(MAX_SHOWN_TEXT_BYTES + 1),
                by: "bob".into(),
            },
            ClusterEvent::FileChanged {
                file_id: String::new(),
                users: vec![],
            },
            ClusterEvent::E2eeGroup {
                conv: "x:nope".into(),
            },
            ClusterEvent::Welcomes {
                welcomes: vec![("bob".into(), String::new(), 1)],
            },
            ClusterEvent::Kicked {
                room: "general".into(),
                user: "bob".into(),
                by: "x".repeat(MAX_NODE_BYTES + 1),
                reason: "".into(),
                banned_until_ms: None,
            },
        ];
        for e in hostile {
            assert!(encode_event("a", &e).is_err(), "the sender refuses {e:?}");
            assert!(
                matches!(
                    decode_event(&unchecked("a", &e)),
                    Err(WireError::Invalid(_))
                ),
                "the receiver refuses {e:?}"
            );
        }
    }

    #[test]
    fn random_and_damaged_event_payloads_never_panic() {
        // Seeded, so a failure repeats.
        let mut rng = rand::rngs::StdRng::seed_from_u64(24);
        let good: Vec<Vec<u8>> = every_event()
            .iter()
            .map(|e| encode_event("node-a", e).expect("encodes").to_vec())
            .collect();
        for round in 0..20_000u32 {
            let mut b = good[round as usize % good.len()].clone();
            match rng.random_range(0..3) {
                0 => {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                1 => {
                    let cut = rng.random_range(0..b.len());
                    b.truncate(cut);
                }
                _ => {
                    let n = rng.random_range(0..64);
                    b = (0..n).map(|_| rng.random()).collect();
                    if !b.is_empty() {
                        b[0] = WIRE_VERSION;
                    }
                }
            }
            if let Ok((node, e)) = decode_event(&b) {
                // What decodes passed every check: it encodes again.
                assert!(encode_event(&node, &e).is_ok(), "{e:?}");
            }
        }
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut bytes = encode_commit("a", &commit(1)).expect("encodes").to_vec();
        bytes[0] = WIRE_VERSION + 1;
        let err = decode_commit(&Bytes::from(bytes.clone())).expect_err("refused");
        assert_eq!(err, WireError::UnknownVersion(WIRE_VERSION + 1));
        bytes[0] = 1;
        assert_eq!(
            decode_commit(&Bytes::from(bytes)),
            Err(WireError::UnknownVersion(1)),
            "version 1 had other events: refused, not guessed"
        );
        assert!(err.to_string().contains("upgrade"), "{err}");
    }

    #[test]
    fn damaged_payloads_are_refused_never_a_panic() {
        let good = encode_commit("a", &commit(9)).expect("encodes");
        assert_eq!(decode_commit(&Bytes::new()), Err(WireError::Empty));
        // Every truncation, and every single-byte change, decodes to an error or to a valid
        // notice; none panics.
        for cut in 0..good.len() {
            let _ = decode_commit(&good.slice(..cut));
        }
        for i in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = good.to_vec();
                b[i] ^= flip;
                let _ = decode_commit(&Bytes::from(b));
            }
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert!(decode_commit(&Bytes::from(trailing)).is_err());
        let event = encode_event(
            "a",
            &ClusterEvent::RoomChanged {
                room: "x".into(),
                notice: None,
                to: vec![],
            },
        )
        .expect("encodes");
        for cut in 0..event.len() {
            assert!(decode_event(&event[..cut]).is_err());
        }
        let huge = Bytes::from(vec![WIRE_VERSION; MAX_NOTICE_BYTES + 1]);
        assert_eq!(
            decode_commit(&huge),
            Err(WireError::TooLarge(MAX_NOTICE_BYTES + 1))
        );
    }

    #[test]
    fn a_frame_that_is_not_the_named_message_is_refused() {
        let m = message(4);
        let mut c = Commit::new(&m, &[], frame_of(&message(5)), 1 << 20);
        let bytes = encode_commit("a", &c).expect("the sender does not decode its frame");
        assert!(matches!(decode_commit(&bytes), Err(WireError::Invalid(_))));
        c.frame = Some(Bytes::from_static(&[0, 0, 0, 1, 0xff]));
        let bytes = encode_commit("a", &c).expect("encodes");
        assert!(matches!(
            decode_commit(&bytes),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn names_and_sizes_are_checked_both_ways() {
        let mut c = commit(1);
        c.except = vec!["Not Canonical".into()];
        assert!(encode_commit("a", &c).is_err());
        let mut c = commit(1);
        c.conv = Conv::Direct(vec!["bob".into(), "alice".into()]);
        assert!(encode_commit("a", &c).is_err(), "unsorted participants");
        let mut c = commit(1);
        c.seq = 0;
        assert!(encode_commit("a", &c).is_err());
        c.seq = MAX_SEQ + 1;
        assert!(encode_commit("a", &c).is_err());
        assert!(encode_commit("", &commit(1)).is_err());
        assert!(encode_commit(&"n".repeat(MAX_NODE_BYTES + 1), &commit(1)).is_err());
        let long = ClusterEvent::Announce {
            from: "root".into(),
            text: "x".repeat(MAX_ANNOUNCE_BYTES + 1),
        };
        assert!(encode_event("a", &long).is_err());
    }
}
