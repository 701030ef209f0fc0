//! History that is never lost: offline delivery, resume, search, encryption at rest, keys and
//! retention, against a real server over real TLS.

mod common;

use std::time::Duration;

use common::*;
use conclave_proto::*;

const PW: &str = "password123";

fn login_req(user: &str, resume: Vec<Cursor>) -> Request {
    Request::Login {
        user: user.into(),
        password: PW.into(),
        server_password: None,
        resume,
    }
}

/// Collects message events until `CaughtUp`; returns them and the count it announced.
async fn until_caught_up(c: &mut Raw) -> (Vec<Message>, u32) {
    let mut got = Vec::new();
    loop {
        match c
            .event(|e| matches!(e, Event::Message(_) | Event::CaughtUp { .. }))
            .await
        {
            Event::Message(m) => got.push(m),
            Event::CaughtUp { count, .. } => return (got, count),
            _ => unreachable!(),
        }
    }
}

fn texts(ms: &[Message]) -> Vec<&str> {
    ms.iter().map(|m| m.body.as_text().unwrap_or("")).collect()
}

#[tokio::test]
async fn messages_sent_while_offline_are_delivered_at_the_next_login_once() {
    let srv = TestServer::start(|_| {}).await;
    srv.add_user("bob", PW, false);
    let mut alice = Raw::register(&srv, "alice").await;
    alice
        .send_room("general", "room while away")
        .await
        .expect("sent");
    alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            body: Body::text("dm while away"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect("sent");

    let mut bob = Raw::connect(&srv).await;
    bob.request(login_req("bob", vec![])).await.expect("login");
    let (got, count) = until_caught_up(&mut bob).await;
    let mut t = texts(&got);
    t.sort();
    assert_eq!(t, vec!["dm while away", "room while away"]);
    assert_eq!(count, 2);

    // Acknowledged: the next login brings nothing again.
    let cursors: Vec<Cursor> = got
        .iter()
        .map(|m| Cursor {
            conv: m.conv.clone(),
            seq: m.seq,
        })
        .collect();
    bob.request(Request::Ack { cursors }).await.expect("ack");
    drop(bob);
    let mut bob = Raw::connect(&srv).await;
    bob.request(login_req("bob", vec![])).await.expect("login");
    let (got, count) = until_caught_up(&mut bob).await;
    assert!(got.is_empty() && count == 0, "{got:?}");
    srv.stop().await;
}

#[tokio::test]
async fn resume_cursors_bring_exactly_what_was_missed() {
    let srv = TestServer::start(|_| {}).await;
    srv.add_user("bob", PW, false);
    let mut alice = Raw::register(&srv, "alice").await;
    for i in 1..=5 {
        alice
            .send_room("general", &format!("m{i}"))
            .await
            .expect("sent");
    }
    let mut bob = Raw::connect(&srv).await;
    bob.request(login_req(
        "bob",
        vec![Cursor {
            conv: Conv::Room("general".into()),
            seq: 3,
        }],
    ))
    .await
    .expect("login");
    let (got, _) = until_caught_up(&mut bob).await;
    assert_eq!(texts(&got), vec!["m4", "m5"]);
    srv.stop().await;
}

#[tokio::test]
async fn catching_up_while_others_send_loses_and_doubles_nothing() {
    // Pipelining faster than the default request rate is the point here.
    let srv = TestServer::start(|c| c.limits.request_burst = 1000).await;
    srv.add_user("bob", PW, false);
    let mut alice = Raw::register(&srv, "alice").await;
    const N: u64 = 300;
    // Alice pipelines a stream; bob logs in part-way through it.
    let sender = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..N {
            let id = alice.send_room_frame("general", &format!("s{i}")).await;
            ids.push(id);
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for id in ids {
            alice.reply_to(id).await.expect("stored");
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut bob = Raw::connect(&srv).await;
    bob.request(login_req(
        "bob",
        vec![Cursor {
            conv: Conv::Room("general".into()),
            seq: 0,
        }],
    ))
    .await
    .expect("login");
    tokio::time::timeout(WAIT, sender)
        .await
        .expect("sender done")
        .expect("task");
    let mut seqs = Vec::new();
    for _ in 0..N {
        seqs.push(bob.message().await.seq);
    }
    assert_eq!(
        seqs,
        (1..=N).collect::<Vec<_>>(),
        "every message once, in order"
    );
    bob.no_message_within(Duration::from_millis(100)).await;
    srv.stop().await;
}

#[tokio::test]
async fn search_finds_only_what_the_caller_may_see() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut carol = Raw::register(&srv, "carol").await;
    alice
        .request(Request::CreateRoom {
            room: "ops".into(),
            private: true,
            password: None,
        })
        .await
        .expect("room");
    alice
        .send_room("general", "Deploy at five")
        .await
        .expect("sent");
    alice
        .send_room("ops", "deploy the secret build")
        .await
        .expect("sent");
    alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            body: Body::text("déploy tonight?"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect("sent");
    let search = |q: &str, room: Option<&str>| Request::Search {
        query: q.into(),
        room: room.map(str::to_string),
        limit: 50,
        before: None,
    };
    let results = |r: Result<Reply, ErrorBody>| match r {
        Ok(Reply::Results(v)) => v,
        other => panic!("{other:?}"),
    };
    let a = results(alice.request(search("DEPLOY", None)).await);
    assert_eq!(a.len(), 3, "alice sees all three");
    assert!(
        a[0].msg_id > a[1].msg_id && a[1].msg_id > a[2].msg_id,
        "newest first"
    );
    let b = results(bob.request(search("deploy", None)).await);
    let mut bt = texts(&b);
    bt.sort();
    assert_eq!(bt, vec!["Deploy at five", "déploy tonight?"]);
    let c = results(carol.request(search("deploy", None)).await);
    assert_eq!(texts(&c), vec!["Deploy at five"]);
    assert_eq!(
        code(carol.request(search("deploy", Some("ops"))).await),
        ErrorCode::NoSuchRoom,
        "a private room answers like a missing one"
    );
    let g = results(alice.request(search("deploy five", Some("general"))).await);
    assert_eq!(texts(&g), vec!["Deploy at five"]);
    assert_eq!(
        code(alice.request(search("  ?! ", None)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(alice.request(search(&"word ".repeat(200), None)).await),
        ErrorCode::TooLarge
    );
    srv.stop().await;
}

/// Every file under `dir`, recursively.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.is_file() {
                // Regular files only (not the admin socket).
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn no_message_text_is_stored_in_plaintext() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let _bob = Raw::register(&srv, "bob").await;
    let marker = format!("zqxmarker{}", std::process::id());
    for i in 0..20 {
        alice
            .send_room("general", &format!("{marker} number {i}"))
            .await
            .expect("sent");
    }
    alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            body: Body::text(format!("direct {marker}")),
            idempotency_key: None,
            refs: None,
        })
        .await
        .expect("sent");
    // Searching works, so the index holds the word, blinded.
    let r = alice
        .request(Request::Search {
            query: marker.clone(),
            room: None,
            limit: 50,
            before: None,
        })
        .await;
    assert!(
        matches!(r, Ok(Reply::Results(ref v)) if v.len() == 21),
        "{r:?}"
    );
    // Look at the live files (WAL included) and again after a clean stop.
    let scan = |dir: &std::path::Path| {
        let all = files(dir);
        assert!(all.iter().any(|p| p.ends_with("conclave.db")));
        for p in all {
            let bytes = std::fs::read(&p).expect("read");
            for needle in [marker.as_bytes(), marker.to_uppercase().as_bytes()] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "plaintext marker found in {}",
                    p.display()
                );
            }
        }
    };
    scan(srv.dir.path());
    let dir = srv.stop().await;
    scan(dir.path());
}

#[tokio::test]
async fn a_wrong_data_key_stops_the_start_and_changes_nothing() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    alice.send_room("general", "keep me").await.expect("sent");
    drop(alice);
    let dir = srv.stop().await;
    let key_path = dir.path().join("data.key");
    let good_key = std::fs::read(&key_path).expect("key");
    std::fs::write(&key_path, [9u8; 32]).expect("swap key");
    let db_before = std::fs::read(dir.path().join("conclave.db")).expect("db");
    let mut config = conclave_server::Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let err = conclave_server::Server::bind(config.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("data key does not match"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("conclave.db")).expect("db"),
        db_before,
        "nothing written"
    );
    // A damaged key file says so.
    std::fs::write(&key_path, b"short").expect("damage");
    let err = conclave_server::Server::bind(config.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("damaged"), "{err}");
    // The right key works again.
    std::fs::write(&key_path, &good_key).expect("restore");
    let srv = TestServer::start_in(dir, |_| {}).await;
    let mut alice = Raw::login(&srv, "alice", PW).await;
    let r = alice
        .request(Request::History {
            conv: ConvRef::Room("general".into()),
            limit: 5,
            before: None,
        })
        .await;
    assert!(
        matches!(r, Ok(Reply::Messages(ref v)) if v.len() == 1),
        "{r:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_passphrase_key_opens_only_with_the_same_passphrase() {
    let srv =
        TestServer::start(|c| c.data_key_passphrase = Some("long passphrase one".into())).await;
    let mut alice = Raw::register(&srv, "alice").await;
    alice
        .send_room("general", "sealed by passphrase")
        .await
        .expect("sent");
    drop(alice);
    let dir = srv.stop().await;
    assert!(!dir.path().join("data.key").exists(), "no key on disk");
    let mut config = conclave_server::Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.data_key_passphrase = Some("wrong passphrase".into());
    let err = conclave_server::Server::bind(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("data key does not match"), "{err}");
    let srv = TestServer::start_in(dir, |c| {
        c.data_key_passphrase = Some("long passphrase one".into())
    })
    .await;
    let mut alice = Raw::login(&srv, "alice", PW).await;
    let r = alice
        .request(Request::History {
            conv: ConvRef::Room("general".into()),
            limit: 5,
            before: None,
        })
        .await;
    assert!(
        matches!(r, Ok(Reply::Messages(ref v)) if v.len() == 1),
        "{r:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn retention_deletes_in_the_background() {
    let srv = TestServer::start(|c| {
        c.retention.max_messages = 3;
        c.retention.interval_s = 1;
    })
    .await;
    let mut alice = Raw::register(&srv, "alice").await;
    for i in 1..=8 {
        alice
            .send_room("general", &format!("r{i}"))
            .await
            .expect("sent");
    }
    // The clean-up runs every second; wait for it, bounded.
    let mut last = Vec::new();
    for _ in 0..50 {
        let r = alice
            .request(Request::History {
                conv: ConvRef::Room("general".into()),
                limit: 50,
                before: None,
            })
            .await;
        let Ok(Reply::Messages(v)) = r else {
            panic!("{r:?}")
        };
        last = v.iter().map(|m| m.seq).collect::<Vec<_>>();
        if last == vec![6, 7, 8] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, vec![6, 7, 8]);
    srv.stop().await;
}

#[tokio::test]
async fn history_refusals() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let h = |limit| Request::History {
        conv: ConvRef::Room("general".into()),
        limit,
        before: None,
    };
    assert_eq!(code(alice.request(h(0)).await), ErrorCode::BadRequest);
    assert_eq!(code(alice.request(h(100_000)).await), ErrorCode::BadRequest);
    let r = alice
        .request(Request::History {
            conv: ConvRef::Room("nowhere".into()),
            limit: 5,
            before: None,
        })
        .await;
    assert_eq!(code(r), ErrorCode::NoSuchRoom);
    srv.stop().await;
}

#[tokio::test]
async fn pages_of_large_messages_stay_under_what_a_client_accepts() {
    // 40 messages of 60,000 bytes: a page of 100 would be 2.4 MB, and 70 of them more than a
    // client takes in one frame (CLIENT_MAX_FRAME_BYTES). Pages hold at most MAX_PAGE_BYTES of
    // bodies; paging on collects every message once, in order.
    const N: usize = 40;
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    for i in 0..N {
        let text = format!("big{i} needle {}", "x".repeat(60_000));
        alice.send_room("general", &text).await.expect("sent");
    }
    let size = |ms: &[Message]| ms.iter().map(|m| m.body.data.len()).sum::<usize>();

    let mut seen = Vec::new();
    let mut before = None;
    for _ in 0..N + 1 {
        let page = match alice
            .request(Request::History {
                conv: ConvRef::Room("general".into()),
                limit: 100,
                before,
            })
            .await
        {
            Ok(Reply::Messages(m)) => m,
            other => panic!("{other:?}"),
        };
        if page.is_empty() {
            break;
        }
        assert!(size(&page) <= MAX_PAGE_BYTES, "{} bytes", size(&page));
        assert!(
            page.len() >= 10 || page.first().map(|m| m.seq) == Some(1),
            "a page still holds many, unless it is the last: {}",
            page.len()
        );
        if before.is_none() {
            assert_eq!(
                page.last().map(|m| m.seq),
                Some(N as u64),
                "the newest first"
            );
        }
        before = page.first().map(|m| m.seq);
        seen.splice(0..0, page.iter().map(|m| m.seq));
    }
    assert_eq!(seen, (1..=N as u64).collect::<Vec<_>>());

    let mut found = Vec::new();
    let mut before = None;
    for _ in 0..N + 1 {
        let page = match alice
            .request(Request::Search {
                query: "needle".into(),
                room: None,
                limit: 100,
                before: before.clone(),
            })
            .await
        {
            Ok(Reply::Results(m)) => m,
            other => panic!("{other:?}"),
        };
        if page.is_empty() {
            break;
        }
        assert!(size(&page) <= MAX_PAGE_BYTES, "{} bytes", size(&page));
        before = page.last().map(|m| m.msg_id.clone());
        found.extend(page.iter().map(|m| m.seq));
    }
    assert_eq!(found, (1..=N as u64).rev().collect::<Vec<_>>());
    srv.stop().await;
}
