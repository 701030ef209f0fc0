//! End-to-end tests of the core: accounts, rooms, the four kinds of addressing, and the
//! refusals, against a real server over real TLS on loopback.

mod common;

use std::time::Duration;

use common::*;
use conclave_proto::*;
use conclave_server::RegistrationPolicy;

const PW: &str = "password123";

#[tokio::test]
async fn register_login_and_refusals() {
    let srv = TestServer::start(|_| {}).await;
    let _alice = Raw::register(&srv, "Alice").await;

    // Name taken, case-insensitively.
    let mut c = Raw::connect(&srv).await;
    let r = c
        .request(Request::Register {
            user: "ALICE".into(),
            password: PW.into(),
            server_password: None,
            invite_code: None,
        })
        .await;
    assert_eq!(code(r), ErrorCode::NameTaken);
    // Bad name and short password.
    for (user, pw, want) in [
        ("bad name", PW, ErrorCode::InvalidName),
        ("bob", "short", ErrorCode::BadRequest),
    ] {
        let r = c
            .request(Request::Register {
                user: user.into(),
                password: pw.into(),
                server_password: None,
                invite_code: None,
            })
            .await;
        assert_eq!(code(r), want);
    }
    // Requests before login are refused.
    assert_eq!(
        code(c.request(Request::Rooms).await),
        ErrorCode::NotLoggedIn
    );

    // Wrong password and unknown account get the same answer.
    let wrong = c
        .request(Request::Login {
            user: "alice".into(),
            password: "not the password".into(),
            server_password: None,
            resume: vec![],
        })
        .await
        .expect_err("wrong password");
    let unknown = c
        .request(Request::Login {
            user: "nobody".into(),
            password: "not the password".into(),
            server_password: None,
            resume: vec![],
        })
        .await
        .expect_err("unknown user");
    assert_eq!(wrong, unknown);
    assert_eq!(wrong.code, ErrorCode::AuthFailed);

    // The right password works, with any case of the name.
    let r = c
        .request(Request::Login {
            user: "aLiCe".into(),
            password: PW.into(),
            server_password: None,
            resume: vec![],
        })
        .await
        .expect("login");
    assert_eq!(
        r,
        Reply::LoggedIn {
            user: "alice".into(),
            admin: false,
            rooms: vec!["general".into()],
        }
    );
    assert_eq!(
        code(
            c.request(Request::Login {
                user: "alice".into(),
                password: PW.into(),
                server_password: None,
                resume: vec![]
            })
            .await
        ),
        ErrorCode::AlreadyLoggedIn
    );
    srv.stop().await;
}

#[tokio::test]
async fn server_password_and_registration_policies() {
    let srv = TestServer::start(|c| {
        c.server_password = Some("letmein-please".into());
        c.registration = RegistrationPolicy::Closed;
    })
    .await;
    srv.add_user("carol", PW, false);
    let mut c = Raw::connect(&srv).await;
    let login = |sp: Option<&str>| Request::Login {
        user: "carol".into(),
        password: PW.into(),
        server_password: sp.map(str::to_string),
        resume: vec![],
    };
    assert_eq!(
        code(c.request(login(None)).await),
        ErrorCode::ServerPassword
    );
    assert_eq!(
        code(c.request(login(Some("wrong"))).await),
        ErrorCode::ServerPassword
    );
    let r = c
        .request(Request::Register {
            user: "dave".into(),
            password: PW.into(),
            server_password: Some("letmein-please".into()),
            invite_code: None,
        })
        .await;
    assert_eq!(code(r), ErrorCode::RegistrationClosed);
    assert!(c.request(login(Some("letmein-please"))).await.is_ok());
    srv.stop().await;

    // Invite-only: a code made by an admin works once.
    let srv = TestServer::start(|c| c.registration = RegistrationPolicy::Invite).await;
    let code_text = conclave_server::accounts::new_invite_code();
    {
        let config = conclave_server::Config::new(srv.dir.path());
        let mut db = conclave_server::server::open_db(&config).expect("db");
        db.add_invite_code(&conclave_server::accounts::invite_code_hash(&code_text))
            .expect("code");
    }
    let reg = |user: &str, code: Option<&str>| Request::Register {
        user: user.into(),
        password: PW.into(),
        server_password: None,
        invite_code: code.map(str::to_string),
    };
    let mut c = Raw::connect(&srv).await;
    assert_eq!(
        code(c.request(reg("erin", None)).await),
        ErrorCode::InviteRequired
    );
    assert_eq!(
        code(c.request(reg("erin", Some("bogus"))).await),
        ErrorCode::InviteRequired
    );
    assert!(c.request(reg("erin", Some(&code_text))).await.is_ok());
    let mut c2 = Raw::connect(&srv).await;
    assert_eq!(
        code(c2.request(reg("frank", Some(&code_text))).await),
        ErrorCode::InviteRequired,
        "a code is spent once"
    );
    srv.stop().await;
}

#[tokio::test]
async fn all_four_kinds_of_addressing() {
    let srv = TestServer::start(|_| {}).await;
    srv.add_user("admin", PW, true);
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut carol = Raw::register(&srv, "carol").await;
    let mut dave = Raw::register(&srv, "dave").await;

    // Broadcast: every member; the sender gets the id and sequence number back.
    let r = alice
        .send_room("general", "hello room")
        .await
        .expect("sent");
    let Reply::Sent { seq, msg_id, .. } = r else {
        panic!("{r:?}")
    };
    for c in [&mut bob, &mut carol, &mut dave] {
        let m = c.message().await;
        assert_eq!(m.body.as_text(), Some("hello room"));
        assert_eq!((m.seq, &m.msg_id, m.from.as_str()), (seq, &msg_id, "alice"));
        assert_eq!(m.conv, Conv::Room("general".into()));
    }

    // Blockcast: the room minus carol.
    alice
        .request(Request::Send {
            target: Target::Room {
                room: "general".into(),
                except: vec!["carol".into()],
            },
            body: Body::text("not for carol"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect("sent");
    assert_eq!(bob.message().await.body.as_text(), Some("not for carol"));
    assert_eq!(dave.message().await.body.as_text(), Some("not for carol"));
    carol.no_message_within(Duration::from_millis(200)).await;

    // Unicast: only bob.
    alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            body: Body::text("just bob"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect("sent");
    let m = bob.message().await;
    assert_eq!(m.body.as_text(), Some("just bob"));
    assert_eq!(m.conv, Conv::Direct(vec!["alice".into(), "bob".into()]));
    carol.no_message_within(Duration::from_millis(100)).await;
    dave.no_message_within(Duration::from_millis(100)).await;

    // Multicast: bob and carol, not dave.
    alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into(), "carol".into()],
            },
            body: Body::text("bob and carol"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect("sent");
    assert_eq!(bob.message().await.body.as_text(), Some("bob and carol"));
    assert_eq!(carol.message().await.body.as_text(), Some("bob and carol"));
    dave.no_message_within(Duration::from_millis(100)).await;

    // Unknown recipients are named.
    let e = alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into(), "zed".into()],
            },
            body: Body::text("x"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code, ErrorCode::NoSuchUser);
    assert!(e.message.contains("zed"), "{}", e.message);

    // Announce: admins only, to everyone online.
    assert_eq!(
        code(alice.request(Request::Announce { text: "hi".into() }).await),
        ErrorCode::Forbidden
    );
    let mut admin = Raw::login(&srv, "admin", PW).await;
    admin
        .request(Request::Announce {
            text: "maintenance at 5".into(),
        })
        .await
        .expect("announce");
    for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let e = c.event(|e| matches!(e, Event::Announce { .. })).await;
        assert!(matches!(e, Event::Announce { ref text, .. } if text == "maintenance at 5"));
    }

    // Direct history is keyed by the participants.
    let h = bob
        .request(Request::History {
            conv: ConvRef::With(vec!["alice".into()]),
            limit: 10,
            before: None,
        })
        .await
        .expect("history");
    let Reply::Messages(ms) = h else { panic!() };
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].body.as_text(), Some("just bob"));
    srv.stop().await;
}

#[tokio::test]
async fn private_rooms_invitations_and_passwords() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut mallory = Raw::register(&srv, "mallory").await;

    alice
        .request(Request::CreateRoom {
            room: "ops".into(),
            private: true,
            password: None,
        })
        .await
        .expect("created");
    assert_eq!(
        code(
            alice
                .request(Request::CreateRoom {
                    room: "OPS".into(),
                    private: false,
                    password: None
                })
                .await
        ),
        ErrorCode::RoomExists
    );
    alice
        .send_room("ops", "secret ops talk")
        .await
        .expect("sent");

    // Mallory can neither see, join, post to nor read it.
    let Reply::Rooms(rooms) = mallory.request(Request::Rooms).await.expect("rooms") else {
        panic!()
    };
    assert!(rooms.iter().all(|r| r.room != "ops"));
    let join = Request::Join {
        room: "ops".into(),
        password: None,
    };
    assert_eq!(
        code(mallory.request(join.clone()).await),
        ErrorCode::NoSuchRoom
    );
    assert_eq!(
        code(mallory.send_room("ops", "let me in").await),
        ErrorCode::NoSuchRoom
    );
    let hist = Request::History {
        conv: ConvRef::Room("ops".into()),
        limit: 10,
        before: None,
    };
    assert_eq!(
        code(mallory.request(hist.clone()).await),
        ErrorCode::NoSuchRoom
    );
    assert_eq!(
        code(
            mallory
                .request(Request::Who {
                    room: Some("ops".into())
                })
                .await
        ),
        ErrorCode::NoSuchRoom
    );

    // Bob is invited, told, and can join; Alice sees him join.
    alice
        .request(Request::Invite {
            room: "ops".into(),
            user: "bob".into(),
        })
        .await
        .expect("invite");
    let e = bob.event(|e| matches!(e, Event::Invited { .. })).await;
    assert_eq!(
        e,
        Event::Invited {
            room: "ops".into(),
            by: "alice".into()
        }
    );
    let Reply::Joined { members, .. } = bob.request(join).await.expect("joined") else {
        panic!()
    };
    assert_eq!(members, vec!["alice".to_string(), "bob".to_string()]);
    let e = alice
        .event(|e| matches!(e, Event::Join { room, .. } if room == "ops"))
        .await;
    assert_eq!(
        e,
        Event::Join {
            room: "ops".into(),
            user: "bob".into()
        }
    );
    let Reply::Messages(ms) = bob.request(hist).await.expect("history") else {
        panic!()
    };
    assert_eq!(ms[0].body.as_text(), Some("secret ops talk"));
    alice.send_room("ops", "welcome bob").await.expect("sent");
    assert_eq!(bob.message().await.body.as_text(), Some("welcome bob"));
    mallory.no_message_within(Duration::from_millis(100)).await;

    // Part: notice to the others; then bob can no longer post.
    bob.request(Request::Part { room: "ops".into() })
        .await
        .expect("part");
    let e = alice.event(|e| matches!(e, Event::Part { .. })).await;
    assert_eq!(
        e,
        Event::Part {
            room: "ops".into(),
            user: "bob".into()
        }
    );
    assert_eq!(
        code(bob.send_room("ops", "still here?").await),
        ErrorCode::NoSuchRoom
    );

    // A public room with a password.
    alice
        .request(Request::CreateRoom {
            room: "lounge".into(),
            private: false,
            password: Some("sesame-open".into()),
        })
        .await
        .expect("created");
    let j = |pw: Option<&str>| Request::Join {
        room: "lounge".into(),
        password: pw.map(str::to_string),
    };
    assert_eq!(
        code(mallory.request(j(None)).await),
        ErrorCode::RoomPassword
    );
    assert_eq!(
        code(mallory.request(j(Some("wrong"))).await),
        ErrorCode::RoomPassword
    );
    assert!(mallory.request(j(Some("sesame-open"))).await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn presence_who_and_several_connections() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob1 = Raw::register(&srv, "bob").await;
    let e = alice.event(|e| matches!(e, Event::Presence { .. })).await;
    assert_eq!(
        e,
        Event::Presence {
            user: "bob".into(),
            online: true
        }
    );
    let mut bob2 = Raw::login(&srv, "bob", PW).await;
    let Reply::Users(users) = alice
        .request(Request::Who { room: None })
        .await
        .expect("who")
    else {
        panic!()
    };
    let bob = users.iter().find(|u| u.user == "bob").expect("bob online");
    assert_eq!(bob.connections, 2);

    // Both of bob's connections receive; bob's other connection sees what bob sent.
    alice.send_room("general", "to both").await.expect("sent");
    assert_eq!(bob1.message().await.body.as_text(), Some("to both"));
    assert_eq!(bob2.message().await.body.as_text(), Some("to both"));
    bob1.send_room("general", "from bob1").await.expect("sent");
    assert_eq!(bob2.message().await.body.as_text(), Some("from bob1"));

    // Quit: offline only after the last connection goes.
    bob1.request(Request::Quit).await.expect("quit ok");
    assert_eq!(
        bob1.disconnect_event().await.map(|d| d.0),
        Some(DisconnectReason::Quit)
    );
    drop(bob2);
    let e = alice
        .event(|e| matches!(e, Event::Presence { online: false, .. }))
        .await;
    assert_eq!(
        e,
        Event::Presence {
            user: "bob".into(),
            online: false
        }
    );
    let Reply::Users(users) = alice
        .request(Request::Who {
            room: Some("general".into()),
        })
        .await
        .expect("who")
    else {
        panic!()
    };
    assert!(users.iter().any(|u| u.user == "bob" && !u.online));
    assert!(users.iter().any(|u| u.user == "alice" && u.online));
    srv.stop().await;
}

#[tokio::test]
async fn membership_and_sequences_survive_a_restart() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    alice
        .request(Request::CreateRoom {
            room: "club".into(),
            private: true,
            password: None,
        })
        .await
        .expect("created");
    for i in 0..3 {
        alice
            .send_room("club", &format!("m{i}"))
            .await
            .expect("sent");
    }
    drop(alice);
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |_| {}).await;
    let mut alice = Raw::connect(&srv).await;
    let r = alice
        .request(Request::Login {
            user: "alice".into(),
            password: PW.into(),
            server_password: None,
            resume: vec![],
        })
        .await
        .expect("login");
    assert_eq!(
        r,
        Reply::LoggedIn {
            user: "alice".into(),
            admin: false,
            rooms: vec!["club".into(), "general".into()]
        }
    );
    let Reply::Sent { seq, .. } = alice
        .send_room("club", "after restart")
        .await
        .expect("sent")
    else {
        panic!()
    };
    assert_eq!(seq, 4, "the sequence goes on without a gap");
    srv.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_and_keeps_acknowledged_messages() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    alice
        .send_room("general", "before shutdown")
        .await
        .expect("acked");
    srv.token.cancel();
    let (reason, _) = alice.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Shutdown);
    let dir = {
        tokio::time::timeout(WAIT, srv.handle)
            .await
            .expect("stops")
            .expect("task");
        srv.dir
    };
    let srv = TestServer::start_in(dir, |_| {}).await;
    let mut alice = Raw::login(&srv, "alice", PW).await;
    let Reply::Messages(ms) = alice
        .request(Request::History {
            conv: ConvRef::Room("general".into()),
            limit: 10,
            before: None,
        })
        .await
        .expect("history")
    else {
        panic!()
    };
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].body.as_text(), Some("before shutdown"));
    srv.stop().await;
}

#[tokio::test]
async fn pipelined_sends_and_large_writes_are_handled_in_order() {
    let srv = TestServer::start(|c| c.limits.request_burst = 1000).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    // 200 frames in one write: many frames per TLS record, answered in order.
    let mut all = Vec::new();
    for i in 0..200u64 {
        let body = encode_client(&ClientFrame {
            id: 1000 + i,
            req: Request::Send {
                target: Target::Room {
                    room: "general".into(),
                    except: vec![],
                },
                body: Body::text(format!("burst {i}")),
                idempotency_key: None,
                refs: None,
            },
        });
        all.extend_from_slice(&frame_bytes(&body));
    }
    tokio::io::AsyncWriteExt::write_all(&mut alice.w, &all)
        .await
        .expect("write");
    for i in 0..200u64 {
        let r = alice.reply_to(1000 + i).await.expect("sent");
        assert!(
            matches!(r, Reply::Sent { seq, .. } if seq == i + 1),
            "{r:?}"
        );
    }
    for i in 0..200u64 {
        let m = bob.message().await;
        assert_eq!(m.seq, i + 1);
        assert_eq!(m.body.as_text(), Some(format!("burst {i}").as_str()));
    }
    // A pasted page of text (60 KB), under the message limit.
    let page = "lorem ipsum dolor sit amet ".repeat(2200);
    alice.send_room("general", &page).await.expect("sent");
    assert_eq!(bob.message().await.body.as_text(), Some(page.as_str()));
    // Over the message limit: a clear error, and the connection goes on.
    let huge = "x".repeat(DEFAULT_MAX_MESSAGE_BYTES + 1);
    assert_eq!(
        code(alice.send_room("general", &huge).await),
        ErrorCode::TooLarge
    );
    assert!(alice.send_room("general", "still fine").await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn idempotent_retry_is_stored_and_delivered_once() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let send = || Request::Send {
        target: Target::Room {
            room: "general".into(),
            except: vec![],
        },
        body: Body::text("once"),
        idempotency_key: Some("key-1".into()),
        refs: None,
    };
    let a = alice.request(send()).await.expect("first");
    let b = alice.request(send()).await.expect("retry");
    match (a, b) {
        (
            Reply::Sent {
                msg_id: m1,
                duplicate: false,
                ..
            },
            Reply::Sent {
                msg_id: m2,
                duplicate: true,
                ..
            },
        ) => assert_eq!(m1, m2),
        other => panic!("{other:?}"),
    }
    assert_eq!(bob.message().await.body.as_text(), Some("once"));
    bob.no_message_within(Duration::from_millis(200)).await;
    srv.stop().await;
}
