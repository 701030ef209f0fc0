//! Everyday chat's presence side (issue #20, part B) against a real server over real TLS:
//! typing notices (passed on, never stored, rate-limited), read markers (stored, survive a
//! restart, passed on, hidden by the privacy switch), topics (owner or admin only, shown,
//! persisted, sealed at rest, bounded), away and display names in `who`, and the text kinds
//! (`/me`, Markdown) passing through as content types. In a room and in a direct
//! conversation; end-to-end rooms are in conclave-client's tests/presence.rs.

mod common;

use std::time::Duration;

use common::*;
use conclave_proto::chat::TextKind;
use conclave_proto::*;

fn room(r: &str) -> ConvRef {
    ConvRef::Room(r.into())
}

fn with(u: &str) -> ConvRef {
    ConvRef::With(vec![u.into()])
}

/// Events of a kind seen so far, after a round trip that proves the server handled every
/// request sent before (events to this connection are queued before the round trip's reply).
async fn seen(c: &mut Raw, pred: impl Fn(&Event) -> bool) -> usize {
    let _ = c.request(Request::Ping { nonce: 7 }).await;
    c.events.iter().filter(|e| pred(e)).count()
}

/// Registers and waits until the connection is caught up: only then does it receive live
/// traffic (typing notices included).
async fn live(srv: &TestServer, user: &str) -> Raw {
    let mut c = Raw::register(srv, user).await;
    c.event(|e| matches!(e, Event::CaughtUp { .. })).await;
    c
}

/// Logs in and waits until caught up.
async fn live_login(srv: &TestServer, user: &str) -> Raw {
    let mut c = Raw::login(srv, user, "password123").await;
    c.event(|e| matches!(e, Event::CaughtUp { .. })).await;
    c
}

fn is_typing(e: &Event) -> bool {
    matches!(e, Event::Typing { .. })
}

fn is_read(e: &Event) -> bool {
    matches!(e, Event::Read { .. })
}

#[tokio::test]
async fn typing_goes_to_the_other_members_only_is_rate_limited_and_not_stored() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    let mut carol = live(&srv, "carol").await;

    // In a room: every other member hears it, not the typer.
    assert_eq!(
        alice
            .request(Request::Typing {
                conv: room("general")
            })
            .await,
        Ok(Reply::Ok)
    );
    let e = bob.event(is_typing).await;
    assert_eq!(
        e,
        Event::Typing {
            conv: Conv::Room("general".into()),
            user: "alice".into()
        }
    );
    carol.event(is_typing).await;
    assert_eq!(seen(&mut alice, is_typing).await, 0);

    // Again at once: refused, and passed on to nobody.
    let r = alice
        .request(Request::Typing {
            conv: room("general"),
        })
        .await;
    assert_eq!(code(r), ErrorCode::RateLimited);
    assert_eq!(seen(&mut bob, is_typing).await, 0);

    // In a direct conversation: only its participant.
    assert_eq!(
        alice.request(Request::Typing { conv: with("bob") }).await,
        Ok(Reply::Ok)
    );
    match bob.event(is_typing).await {
        Event::Typing { conv, user } => {
            assert_eq!(conv, Conv::Direct(vec!["alice".into(), "bob".into()]));
            assert_eq!(user, "alice");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(seen(&mut carol, is_typing).await, 0);

    // Not a member: refused like a send.
    assert!(matches!(
        alice
            .request(Request::CreateRoom {
                room: "ops".into(),
                private: true,
                password: None
            })
            .await,
        Ok(Reply::Joined { .. })
    ));
    let r = bob.request(Request::Typing { conv: room("ops") }).await;
    assert_eq!(code(r), ErrorCode::NoSuchRoom);
    let r = bob
        .request(Request::Typing {
            conv: with("nobody"),
        })
        .await;
    assert_eq!(code(r), ErrorCode::NoSuchUser);

    // Never stored: the conversations' history is empty.
    match bob
        .request(Request::History {
            conv: room("general"),
            limit: 10,
            before: None,
        })
        .await
    {
        Ok(Reply::Messages(m)) => assert!(m.is_empty(), "{m:?}"),
        other => panic!("{other:?}"),
    }
    match bob
        .request(Request::History {
            conv: with("alice"),
            limit: 10,
            before: None,
        })
        .await
    {
        Ok(Reply::Messages(m)) => assert!(m.is_empty(), "{m:?}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn typing_may_come_again_after_the_interval() {
    let srv = TestServer::start(|c| c.presence.typing_interval_ms = 200).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    assert_eq!(
        alice
            .request(Request::Typing {
                conv: room("general")
            })
            .await,
        Ok(Reply::Ok)
    );
    bob.event(is_typing).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        alice
            .request(Request::Typing {
                conv: room("general")
            })
            .await,
        Ok(Reply::Ok)
    );
    bob.event(is_typing).await;
}

#[tokio::test]
async fn read_markers_are_passed_on_survive_a_restart_and_can_be_kept_private() {
    let srv = TestServer::start(|c| c.presence.read_interval_ms = 0).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    for i in 0..3 {
        assert!(matches!(
            alice.send_room("general", &format!("m{i}")).await,
            Ok(Reply::Sent { .. })
        ));
    }
    let _ = bob.message().await;
    assert_eq!(
        bob.request(Request::Read {
            conv: room("general"),
            seq: 2
        })
        .await,
        Ok(Reply::Ok)
    );
    assert_eq!(
        alice.event(is_read).await,
        Event::Read {
            conv: Conv::Room("general".into()),
            user: "bob".into(),
            seq: 2
        }
    );
    // A marker only moves forward; a marker past the newest message is refused.
    assert_eq!(
        bob.request(Request::Read {
            conv: room("general"),
            seq: 1
        })
        .await,
        Ok(Reply::Ok)
    );
    let r = bob
        .request(Request::Read {
            conv: room("general"),
            seq: 99,
        })
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    assert_eq!(seen(&mut alice, is_read).await, 0);

    // A direct conversation.
    let sent = alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            body: Body::text("psst"),
            idempotency_key: None,
            refs: None,
        })
        .await;
    let Ok(Reply::Sent { seq: dm_seq, .. }) = sent else {
        panic!("{sent:?}")
    };
    assert_eq!(
        bob.request(Request::Read {
            conv: with("alice"),
            seq: dm_seq
        })
        .await,
        Ok(Reply::Ok)
    );
    match alice.event(is_read).await {
        Event::Read { conv, user, seq } => {
            assert_eq!(conv, Conv::Direct(vec!["alice".into(), "bob".into()]));
            assert_eq!((user.as_str(), seq), ("bob", dm_seq));
        }
        other => panic!("{other:?}"),
    }

    // After a restart the markers are still there.
    drop((alice, bob));
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |c| c.presence.read_interval_ms = 0).await;
    let mut alice = live_login(&srv, "alice").await;
    let mut bob = live_login(&srv, "bob").await;
    let mut bob2 = live_login(&srv, "bob").await;
    let markers = |r: Result<Reply, ErrorBody>| match r {
        Ok(Reply::ReadMarkers(m)) => m.into_iter().map(|m| (m.user, m.seq)).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let r = alice
        .request(Request::ReadMarkers {
            conv: room("general"),
        })
        .await;
    assert_eq!(markers(r), vec![("bob".to_string(), 2)]);
    let r = alice
        .request(Request::ReadMarkers { conv: with("bob") })
        .await;
    assert_eq!(markers(r), vec![("bob".to_string(), dm_seq)]);

    // Private: others see neither the marker nor its moves; bob's other connection does.
    assert_eq!(
        bob.request(Request::ShareReads { share: false }).await,
        Ok(Reply::Ok)
    );
    let r = alice
        .request(Request::ReadMarkers {
            conv: room("general"),
        })
        .await;
    assert!(markers(r).is_empty());
    let r = bob
        .request(Request::ReadMarkers {
            conv: room("general"),
        })
        .await;
    assert_eq!(
        markers(r),
        vec![("bob".to_string(), 2)],
        "one's own stays visible"
    );
    assert_eq!(
        bob.request(Request::Read {
            conv: room("general"),
            seq: 3
        })
        .await,
        Ok(Reply::Ok)
    );
    assert_eq!(
        bob2.event(is_read).await,
        Event::Read {
            conv: Conv::Room("general".into()),
            user: "bob".into(),
            seq: 3
        }
    );
    assert_eq!(seen(&mut alice, is_read).await, 0);

    // The choice survives a restart too.
    drop((alice, bob, bob2));
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |_| {}).await;
    let mut alice = live_login(&srv, "alice").await;
    let r = alice
        .request(Request::ReadMarkers {
            conv: room("general"),
        })
        .await;
    assert!(markers(r).is_empty());
    let mut bob = live_login(&srv, "bob").await;
    assert_eq!(
        bob.request(Request::ShareReads { share: true }).await,
        Ok(Reply::Ok)
    );
    let r = alice
        .request(Request::ReadMarkers {
            conv: room("general"),
        })
        .await;
    assert_eq!(markers(r), vec![("bob".to_string(), 3)]);
}

#[tokio::test]
async fn read_markers_are_rate_limited_per_conversation() {
    let srv = TestServer::start(|c| c.presence.read_interval_ms = 60_000).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    for _ in 0..2 {
        let _ = alice.send_room("general", "x").await;
    }
    let ok = bob
        .request(Request::Read {
            conv: room("general"),
            seq: 1,
        })
        .await;
    assert_eq!(ok, Ok(Reply::Ok));
    let r = bob
        .request(Request::Read {
            conv: room("general"),
            seq: 2,
        })
        .await;
    assert_eq!(code(r), ErrorCode::RateLimited);
}

fn topic_of(r: Result<Reply, ErrorBody>, name: &str) -> Option<String> {
    match r {
        Ok(Reply::Rooms(rooms)) => rooms.into_iter().find(|r| r.room == name)?.topic,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn topics_are_set_by_the_owner_shown_to_members_persisted_and_sealed() {
    let srv = TestServer::start(|c| c.presence.max_topic_chars = 40).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    let mut carol = live(&srv, "carol").await;
    assert!(matches!(
        alice
            .request(Request::CreateRoom {
                room: "ops".into(),
                private: false,
                password: None
            })
            .await,
        Ok(Reply::Joined { .. })
    ));
    assert!(matches!(
        bob.request(Request::Join {
            room: "ops".into(),
            password: None
        })
        .await,
        Ok(Reply::Joined { .. })
    ));
    // Not the owner: refused.
    let r = bob
        .request(Request::SetTopic {
            room: "ops".into(),
            topic: "mine now".into(),
        })
        .await;
    assert_eq!(code(r), ErrorCode::Forbidden);
    // Bounded and one line.
    let r = alice
        .request(Request::SetTopic {
            room: "ops".into(),
            topic: "x".repeat(41),
        })
        .await;
    assert_eq!(code(r), ErrorCode::TooLarge);
    let r = alice
        .request(Request::SetTopic {
            room: "ops".into(),
            topic: "two\nlines \u{1b}[2J".into(),
        })
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);

    let topic = "zanzibar release week";
    let r = alice
        .request(Request::SetTopic {
            room: "#OPS".into(),
            topic: topic.into(),
        })
        .await;
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(
        bob.event(|e| matches!(e, Event::Topic { .. })).await,
        Event::Topic {
            room: "ops".into(),
            topic: topic.into(),
            by: "alice".into()
        }
    );
    // Carol is not a member: no event, but `rooms` shows it.
    assert_eq!(
        seen(&mut carol, |e| matches!(e, Event::Topic { .. })).await,
        0
    );
    assert_eq!(
        topic_of(carol.request(Request::Rooms).await, "ops").as_deref(),
        Some(topic)
    );

    drop((alice, bob, carol));
    let dir = srv.stop().await;
    // Sealed at rest: the topic's words are nowhere in the database files.
    for name in ["conclave.db", "conclave.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(name)) {
            assert!(
                !bytes.windows(8).any(|w| w == b"zanzibar"),
                "{name} holds the topic in plaintext"
            );
        }
    }
    let srv = TestServer::start_in(dir, |_| {}).await;
    let mut bob = live_login(&srv, "bob").await;
    assert_eq!(
        topic_of(bob.request(Request::Rooms).await, "ops").as_deref(),
        Some(topic)
    );
    // An admin may change it too; empty clears it.
    srv.add_user("root", "password123", true);
    let mut root = live_login(&srv, "root").await;
    let r = root
        .request(Request::SetTopic {
            room: "ops".into(),
            topic: String::new(),
        })
        .await;
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(
        bob.event(|e| matches!(e, Event::Topic { .. })).await,
        Event::Topic {
            room: "ops".into(),
            topic: String::new(),
            by: "root".into()
        }
    );
    assert_eq!(topic_of(bob.request(Request::Rooms).await, "ops"), None);
}

fn presence_of(r: Result<Reply, ErrorBody>, user: &str) -> UserPresence {
    match r {
        Ok(Reply::Users(users)) => users
            .into_iter()
            .find(|u| u.user == user)
            .unwrap_or_else(|| panic!("{user} not listed")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn away_shows_in_who_while_online_and_display_names_persist() {
    let srv = TestServer::start(|c| c.presence.max_away_chars = 20).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    assert_eq!(
        bob.request(Request::Away {
            text: Some("lunch".into())
        })
        .await,
        Ok(Reply::Ok)
    );
    assert_eq!(
        alice.event(|e| matches!(e, Event::Away { .. })).await,
        Event::Away {
            user: "bob".into(),
            text: Some("lunch".into())
        }
    );
    let who = alice.request(Request::Who { room: None }).await;
    assert_eq!(presence_of(who, "bob").away.as_deref(), Some("lunch"));
    let who = alice
        .request(Request::Who {
            room: Some("general".into()),
        })
        .await;
    assert_eq!(presence_of(who, "bob").away.as_deref(), Some("lunch"));
    let r = bob
        .request(Request::Away {
            text: Some("x".repeat(21)),
        })
        .await;
    assert_eq!(code(r), ErrorCode::TooLarge);
    // Back.
    assert_eq!(
        bob.request(Request::Away { text: None }).await,
        Ok(Reply::Ok)
    );
    assert_eq!(
        alice.event(|e| matches!(e, Event::Away { .. })).await,
        Event::Away {
            user: "bob".into(),
            text: None
        }
    );
    // Away ends when the account goes offline.
    assert_eq!(
        bob.request(Request::Away {
            text: Some("gone".into())
        })
        .await,
        Ok(Reply::Ok)
    );
    let _ = bob.request(Request::Quit).await;
    drop(bob);
    let _ = alice
        .event(|e| matches!(e, Event::Presence { online: false, .. }))
        .await;
    let mut bob = live_login(&srv, "bob").await;
    let who = alice.request(Request::Who { room: None }).await;
    assert_eq!(presence_of(who, "bob").away, None);

    // Display names: set, shown, bounded, persisted.
    assert_eq!(
        bob.request(Request::SetDisplayName {
            name: Some("Bob Builder".into())
        })
        .await,
        Ok(Reply::Ok)
    );
    assert_eq!(
        alice
            .event(|e| matches!(e, Event::DisplayName { .. }))
            .await,
        Event::DisplayName {
            user: "bob".into(),
            name: Some("Bob Builder".into())
        }
    );
    let r = bob
        .request(Request::SetDisplayName {
            name: Some("B".repeat(65)),
        })
        .await;
    assert_eq!(code(r), ErrorCode::TooLarge);
    drop((alice, bob));
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |_| {}).await;
    let mut alice = live_login(&srv, "alice").await;
    let _bob = live_login(&srv, "bob").await;
    let who = alice.request(Request::Who { room: None }).await;
    let bob_now = presence_of(who, "bob");
    assert_eq!(bob_now.display_name.as_deref(), Some("Bob Builder"));
    assert_eq!(bob_now.away, None);
}

#[tokio::test]
async fn changes_are_rate_limited() {
    let srv = TestServer::start(|c| c.presence.changes_per_minute = 2).await;
    let mut bob = live(&srv, "bob").await;
    for text in ["a", "b"] {
        let r = bob
            .request(Request::Away {
                text: Some(text.into()),
            })
            .await;
        assert_eq!(r, Ok(Reply::Ok));
    }
    let r = bob
        .request(Request::SetDisplayName {
            name: Some("Bob".into()),
        })
        .await;
    assert_eq!(code(r), ErrorCode::RateLimited);
}

#[tokio::test]
async fn actions_and_markdown_pass_through_as_content_types_and_are_searchable() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = live(&srv, "alice").await;
    let mut bob = live(&srv, "bob").await;
    for (kind, text) in [
        (
            TextKind {
                markdown: false,
                action: true,
            },
            "waves quokka",
        ),
        (
            TextKind {
                markdown: true,
                action: false,
            },
            "**bold** quokka",
        ),
    ] {
        let r = alice
            .request(Request::Send {
                target: Target::Room {
                    room: "general".into(),
                    except: vec![],
                },
                body: Body::text_of_kind(text, kind),
                idempotency_key: None,
                refs: None,
            })
            .await;
        assert!(matches!(r, Ok(Reply::Sent { .. })), "{r:?}");
        let m = bob.message().await;
        assert_eq!(m.body.text_kind(), Some(kind));
        assert_eq!(m.body.as_text(), Some(text));
    }
    match bob
        .request(Request::Search {
            query: "quokka".into(),
            room: None,
            limit: 10,
            before: None,
        })
        .await
    {
        Ok(Reply::Results(r)) => assert_eq!(r.len(), 2, "{r:?}"),
        other => panic!("{other:?}"),
    }
}
