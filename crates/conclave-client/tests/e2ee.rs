//! End-to-end encryption with the real server (in-process, real TLS, real SQLite) and real
//! clients: only the members of a room's MLS group read it.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users, connect_e2ee as connect, grep_dir};
use conclave_client::e2ee::E2eeNotice;
use conclave_client::proto::{Bytes, ConvRef, ErrorCode, Event, Request};
use conclave_client::{Client, ClientError, ClientEvent, Events};

const WAIT: Duration = Duration::from_secs(30);

/// Waits (bounded) for the first event that `f` picks.
#[track_caller]
fn wait_for<'a, T: 'a>(
    events: &'a mut Events,
    mut f: impl FnMut(&ClientEvent) -> Option<T> + 'a,
) -> impl std::future::Future<Output = T> + 'a {
    let line = std::panic::Location::caller().line();
    async move {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = events.recv().await.expect("events go on");
                if let Some(t) = f(&e) {
                    return t;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the event comes in time (line {line})"))
    }
}

fn text_in(e: &ClientEvent, room: &str) -> Option<String> {
    match e {
        ClientEvent::Server(Event::Message(m)) if matches!(&m.conv, conclave_client::proto::Conv::Room(r) if r == room) => {
            m.body.as_text().map(str::to_string)
        }
        _ => None,
    }
}

/// Nothing more arrives for a while that `f` picks (bounded).
async fn none_for(events: &mut Events, d: Duration, mut f: impl FnMut(&ClientEvent) -> bool) {
    let _ = tokio::time::timeout(d, async {
        while let Some(e) = events.recv().await {
            assert!(!f(&e), "unexpected event: {e:?}");
        }
    })
    .await;
}

async fn setup(names: &[&str], tweak: impl Fn(&mut conclave_server::Config)) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), names);
    TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), tweak).await
}

fn removed_user(e: &ClientEvent, who: &str) -> Option<()> {
    match e {
        ClientEvent::E2ee(E2eeNotice::Members { removed, .. })
            if removed.iter().any(|r| r.starts_with(&format!("{who}/"))) =>
        {
            Some(())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_member_catches_up_votekick_and_concurrent_commits() {
    let srv = setup(&["alice", "bob", "carol", "dave", "erin"], |c| {
        c.votekick.votes = 2;
        c.votekick.fraction = 0.0;
    })
    .await;
    let states: Vec<_> = (0..5)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, b_ev) = connect(&srv, "bob", states[1].path()).await;
    let (carol, mut c_ev) = connect(&srv, "carol", states[2].path()).await;
    let (dave, _d_ev) = connect(&srv, "dave", states[3].path()).await;
    let (erin, mut e_ev) = connect(&srv, "erin", states[4].path()).await;
    alice
        .create_room_e2ee("ops", false, None)
        .await
        .expect("create");
    bob.join("ops", None).await.expect("bob joins");
    carol.join("ops", None).await.expect("carol joins");

    // Bob goes offline; meanwhile the group changes several times.
    bob.close();
    drop(b_ev);
    // Two members add people at the same moment: the server takes one commit per epoch, the
    // other client follows and tries again; nobody forks.
    let (r1, r2) = tokio::join!(dave.join("ops", None), erin.join("ops", None));
    r1.expect("dave joins");
    r2.expect("erin joins");
    carol.part("ops").await.expect("carol leaves");
    wait_for(&mut a_ev, |e| removed_user(e, "carol")).await;

    // Bob comes back: the commits he missed are applied in order, and he reads what follows.
    let (bob, mut b_ev) = connect(&srv, "bob", states[1].path()).await;
    alice
        .send_to_room("ops", "for-everyone-now", &[])
        .await
        .expect("send");
    assert_eq!(
        wait_for(&mut b_ev, |e| text_in(e, "ops")).await,
        "for-everyone-now"
    );
    assert_eq!(
        wait_for(&mut e_ev, |e| text_in(e, "ops")).await,
        "for-everyone-now"
    );
    none_for(&mut c_ev, Duration::from_millis(300), |e| {
        text_in(e, "ops").is_some()
    })
    .await;

    // A vote-kick: two votes remove Erin, and she reads nothing after it.
    for voter in [&alice, &bob] {
        let _ = voter
            .request(Request::VoteKick {
                room: "ops".into(),
                user: "erin".into(),
            })
            .await
            .expect("vote");
    }
    wait_for(&mut b_ev, |e| removed_user(e, "erin")).await;
    bob.send_to_room("ops", "after-the-vote", &[])
        .await
        .expect("send");
    assert_eq!(
        wait_for(&mut a_ev, |e| text_in(e, "ops")).await,
        "after-the-vote"
    );
    none_for(&mut e_ev, Duration::from_millis(300), |e| {
        text_in(e, "ops").is_some()
    })
    .await;
    drop((alice, bob, carol, dave, erin));
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2ee_files_and_direct_messages() {
    let srv = setup(&["alice", "bob", "carol", "dave"], |_| {}).await;
    let states: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, mut b_ev) = connect(&srv, "bob", states[1].path()).await;
    let (carol, mut c_ev) = connect(&srv, "carol", states[2].path()).await;
    alice
        .create_room_e2ee("share", false, None)
        .await
        .expect("create");
    bob.join("share", None).await.expect("join");
    carol.join("share", None).await.expect("join");
    alice
        .request(Request::Kick {
            room: Some("share".into()),
            user: "carol".into(),
            reason: None,
        })
        .await
        .expect("kick");
    wait_for(&mut b_ev, |e| removed_user(e, "carol")).await;

    // A file: encrypted by Alice, relayed as ciphertext, opened by Bob under its real name.
    let marker = b"TOP-SECRET-FILE-MARKER-1234";
    let src_dir = tempfile::tempdir().expect("src");
    let src = src_dir.path().join("plans.txt");
    let mut content = marker.to_vec();
    content.extend((0..200_000u32).map(|i| (i % 251) as u8));
    std::fs::write(&src, &content).expect("write");
    let sent = alice
        .send_file_any(
            &src,
            conclave_client::proto::Target::Room {
                room: "share".into(),
                except: vec![],
            },
            Default::default(),
        )
        .await
        .expect("send file");
    let offer = wait_for(&mut b_ev, |e| match e {
        ClientEvent::Server(Event::FileOffer(o)) => Some(o.file_id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(offer, sent.file_id);
    let inbox = tempfile::tempdir().expect("inbox");
    let got = bob
        .accept_file(&sent.file_id, inbox.path(), Default::default())
        .await
        .expect("accept");
    assert_eq!(
        got.path.file_name().and_then(|n| n.to_str()),
        Some("plans.txt")
    );
    assert_eq!(std::fs::read(&got.path).expect("read"), content);
    // The removed member was not offered it, and the server holds only ciphertext.
    none_for(&mut c_ev, Duration::from_millis(300), |e| {
        matches!(e, ClientEvent::Server(Event::FileOffer(_)))
    })
    .await;
    assert!(
        carol
            .accept_file(&sent.file_id, inbox.path(), Default::default())
            .await
            .is_err()
    );
    assert!(grep_dir(srv.dir.path(), marker).is_empty());
    assert!(grep_dir(srv.dir.path(), b"plans.txt").is_empty());

    // A direct message is end-to-end encrypted too once both have devices.
    alice
        .send_to_users(&["bob".to_string()], "a-private-word-77")
        .await
        .expect("dm");
    let dm = wait_for(&mut b_ev, |e| match e {
        ClientEvent::Server(Event::Message(m))
            if matches!(&m.conv, conclave_client::proto::Conv::Direct(_)) =>
        {
            m.body.as_text().map(str::to_string)
        }
        _ => None,
    })
    .await;
    assert_eq!(dm, "a-private-word-77");
    let raw = bob
        .history_raw(ConvRef::With(vec!["alice".into()]), 50, None)
        .await
        .expect("raw");
    assert!(
        raw.iter()
            .all(|m| m.body.content_type.starts_with("application/mls-"))
    );
    assert!(grep_dir(srv.dir.path(), b"a-private-word-77").is_empty());

    // A note to myself: a conversation of one, end-to-end encrypted like any other.
    alice
        .send_to_users(&["alice".to_string()], "note-to-self-55")
        .await
        .expect("a note to myself");
    let notes = alice
        .history(ConvRef::With(vec!["alice".into()]), 10, None)
        .await
        .expect("my notes");
    assert_eq!(
        notes
            .iter()
            .filter_map(|m| m.body.as_text())
            .collect::<Vec<_>>(),
        vec!["note-to-self-55"]
    );
    assert!(grep_dir(srv.dir.path(), b"note-to-self-55").is_empty());

    // Dave has never used an end-to-end client: a direct message to him is server-encrypted
    // (readable by him, not end to end); the conversation has no group.
    let dave_state = tempfile::tempdir().expect("state");
    let opts = common::options(&srv, "dave", dave_state.path(), WAIT);
    let (dave, mut d_ev, _) = tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("connect");
    for word in ["plain-to-dave-1", "plain-to-dave-2"] {
        alice
            .send_to_users(&["dave".to_string()], word)
            .await
            .expect("dm to dave");
        let got = wait_for(&mut d_ev, |e| match e {
            ClientEvent::Server(Event::Message(m)) => m.body.as_text().map(str::to_string),
            _ => None,
        })
        .await;
        assert_eq!(got, word);
    }
    let dave_conv = conclave_client::proto::Conv::Direct(vec!["alice".into(), "dave".into()]);
    assert!(!alice.is_e2ee(&dave_conv));
    drop((alice, bob, carol, dave));
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2ee_room_invite_join_kick_restart() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob", "carol", "dave"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, mut b_ev) = connect(&srv, "bob", states[1].path()).await;
    let (carol, mut c_ev) = connect(&srv, "carol", states[2].path()).await;

    // Alice creates an end-to-end room and invites Bob (his device is added with a key
    // package); Carol joins it herself (external commit).
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    alice.invite("lab", "bob").await.expect("invite bob");
    wait_for(&mut b_ev, |e| {
        matches!(e, ClientEvent::E2ee(E2eeNotice::Joined { .. })).then_some(())
    })
    .await;
    carol.join("lab", None).await.expect("carol joins");
    let rooms = carol.rooms().await.expect("rooms");
    assert!(rooms.iter().any(|r| r.room == "lab" && r.e2ee));

    let secret = "the-launch-code-is-orange-42";
    alice.send_to_room("lab", secret, &[]).await.expect("send");
    assert_eq!(wait_for(&mut b_ev, |e| text_in(e, "lab")).await, secret);
    assert_eq!(wait_for(&mut c_ev, |e| text_in(e, "lab")).await, secret);
    bob.send_to_room("lab", "bob-says-hi", &[])
        .await
        .expect("bob sends");
    assert_eq!(
        wait_for(&mut a_ev, |e| text_in(e, "lab")).await,
        "bob-says-hi"
    );

    // The server refuses readable text in the room, and forged or replayed commits.
    let plain = conclave_client::proto::Request::Send {
        target: conclave_client::proto::Target::Room {
            room: "lab".into(),
            except: vec![],
        },
        body: conclave_client::proto::Body::text("not encrypted"),
        idempotency_key: None,
        refs: None,
    };
    match bob.request(plain).await {
        Err(ClientError::Server(b)) => assert_eq!(b.code, ErrorCode::E2eeRequired),
        other => panic!("plain text accepted: {other:?}"),
    }
    let log = bob
        .history_raw(ConvRef::Room("lab".into()), 50, None)
        .await
        .expect("raw log");
    // What the server holds and hands out for the room (its log, as any member may fetch it)
    // is MLS only: the text is nowhere in it.
    assert!(
        log.iter()
            .all(|m| m.body.content_type.starts_with("application/mls-"))
    );
    assert!(log.iter().all(|m| {
        !m.body
            .data
            .windows(secret.len())
            .any(|w| w == secret.as_bytes())
    }));
    let old_commit = log
        .iter()
        .find(|m| m.body.content_type == conclave_e2ee::CT_COMMIT)
        .expect("a commit in the log");
    let replay = Request::E2eeCommit {
        conv: ConvRef::Room("lab".into()),
        commit: Bytes::from(old_commit.body.data.clone()),
        group_info: Bytes::from(vec![0u8; 8]),
        welcome: None,
    };
    match bob.request(replay).await {
        Err(ClientError::Server(b)) => assert_eq!(b.code, ErrorCode::StaleEpoch),
        other => panic!("a replayed commit was accepted: {other:?}"),
    }
    let mut forged = old_commit.body.data.clone();
    let n = forged.len();
    forged[n - 10] ^= 0x55;
    let forged = Request::E2eeCommit {
        conv: ConvRef::Room("lab".into()),
        commit: Bytes::from(forged),
        group_info: Bytes::from(vec![0u8; 8]),
        welcome: None,
    };
    assert!(
        bob.request(forged).await.is_err(),
        "a forged commit was accepted"
    );

    // The room's owner kicks Carol: the server proposes her removal, a member commits it,
    // and she cannot read what follows.
    alice
        .request(Request::Kick {
            room: Some("lab".into()),
            user: "carol".into(),
            reason: Some("test".into()),
        })
        .await
        .expect("kick");
    wait_for(&mut c_ev, |e| {
        matches!(e, ClientEvent::Server(Event::Kicked { .. })).then_some(())
    })
    .await;
    // A member's client commits the server's removal of Carol's device (Alice's or Bob's:
    // both hear of it).
    wait_for(&mut b_ev, |e| match e {
        ClientEvent::E2ee(E2eeNotice::Members { removed, .. })
            if removed.iter().any(|r| r.starts_with("carol/")) =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    let after = "after-the-kick-purple-7";
    alice
        .send_to_room("lab", after, &[])
        .await
        .expect("send after kick");
    assert_eq!(wait_for(&mut b_ev, |e| text_in(e, "lab")).await, after);
    none_for(&mut c_ev, Duration::from_millis(500), |e| {
        text_in(e, "lab").is_some_and(|t| t == after)
    })
    .await;

    // Dave joins later: he reads what comes next, not what came before.
    let (dave, mut d_ev) = connect(&srv, "dave", states[3].path()).await;
    dave.join("lab", None).await.expect("dave joins");
    let local = dave
        .history(ConvRef::Room("lab".into()), 50, None)
        .await
        .expect("history");
    assert!(local.iter().all(|m| m.body.as_text() != Some(secret)));
    bob.send_to_room("lab", "welcome-dave", &[])
        .await
        .expect("send");
    assert_eq!(
        wait_for(&mut d_ev, |e| text_in(e, "lab")).await,
        "welcome-dave"
    );

    // Bob's client restarts from its state directory and keeps working; his history is kept
    // locally and searchable.
    bob.close();
    drop(b_ev);
    let (bob, mut b_ev) = connect(&srv, "bob", states[1].path()).await;
    alice
        .send_to_room("lab", "still-secret-9", &[])
        .await
        .expect("send");
    assert_eq!(
        wait_for(&mut b_ev, |e| text_in(e, "lab")).await,
        "still-secret-9"
    );
    let found = bob
        .search("launch code", Some("lab"), 10, None)
        .await
        .expect("search");
    assert!(found.iter().any(|m| m.body.as_text() == Some(secret)));

    // Neither the server's data directory nor any client's state holds the text in clear.
    for needle in [secret.as_bytes(), after.as_bytes()] {
        assert!(grep_dir(dir.path(), needle).is_empty());
        for s in &states {
            assert!(grep_dir(s.path(), needle).is_empty());
        }
    }
    drop((alice, carol, dave, bob));
    srv.stop(WAIT).await;
}

fn p2p_options() -> conclave_client::FileOptions {
    conclave_client::FileOptions {
        p2p: true,
        p2p_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

/// The next file offer (skipping other events), as the application sees it.
async fn next_offer(events: &mut Events) -> conclave_client::proto::FileOffer {
    wait_for(events, |e| match e {
        ClientEvent::Server(Event::FileOffer(o)) => Some((**o).clone()),
        _ => None,
    })
    .await
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2ee_files_peer_to_peer_and_their_fallback() {
    use conclave_client::Via;
    use conclave_client::proto::Target;
    use sha2::Digest;

    let srv = setup(&["alice", "bob"], |_| {}).await;
    let states: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, mut b_ev) = connect(&srv, "bob", states[1].path()).await;
    alice
        .create_room_e2ee("vault", false, None)
        .await
        .expect("create");
    bob.join("vault", None).await.expect("join");

    // Several STREAM chunks, not a multiple of one; a marker in the content and the name.
    let marker = b"P2P-E2EE-CONTENT-MARKER-90ab";
    let name = "P2P-E2EE-NAME-MARKER-c4d2.txt";
    let src_dir = tempfile::tempdir().expect("src");
    let src = src_dir.path().join(name);
    let mut content = Vec::new();
    for i in 0..9_000u32 {
        content.extend_from_slice(marker);
        content.extend_from_slice(&i.to_le_bytes());
    }
    std::fs::write(&src, &content).expect("write");
    let sha: [u8; 32] = sha2::Sha256::digest(&content).into();

    // Peer to peer: the sender serves the ciphertext itself. It returns only once Bob has it,
    // so it runs beside him; the description reached him before the transfer began.
    let sending = {
        let (alice, src) = (alice.clone(), src.clone());
        tokio::spawn(async move {
            let target = Target::Room {
                room: "vault".into(),
                except: vec![],
            };
            alice.send_file_any(&src, target, p2p_options()).await
        })
    };
    let offer = next_offer(&mut b_ev).await;
    assert_eq!(offer.name, name, "the real name, from the description");
    assert_eq!(offer.size, content.len() as u64);
    assert_eq!(offer.sha256, sha);
    assert!(offer.p2p.is_some(), "a direct offer");
    assert!(!offer.relay_ready);
    let inbox = tempfile::tempdir().expect("inbox");
    let got = tokio::time::timeout(
        WAIT,
        bob.accept_file(&offer.file_id, inbox.path(), p2p_options()),
    )
    .await
    .expect("accept in time")
    .expect("accept");
    assert_eq!(got.via, Via::P2p, "{got:?}");
    assert_eq!(got.fallback, None);
    assert_eq!(got.path, inbox.path().join(name));
    assert_eq!(got.size, content.len() as u64);
    let bytes = std::fs::read(&got.path).expect("read");
    assert!(bytes == content, "intact");
    let got_sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    assert_eq!(got_sha, sha);
    // Neither the ciphertext nor a temporary file is left beside it.
    assert_eq!(names_in(inbox.path()), vec![name.to_string()]);
    let sent = tokio::time::timeout(WAIT, sending)
        .await
        .expect("the sender settles")
        .expect("task")
        .expect("send");
    assert_eq!(sent.file_id, offer.file_id);
    assert_eq!(sent.name, name);
    assert_eq!(sent.sha256, hex::encode(sha));
    assert!(!sent.relayed, "nobody needed the relay");
    // The server never held a byte of it: its stored file is empty.
    let stored = srv.dir.path().join("files").join(&sent.file_id);
    assert_eq!(std::fs::metadata(&stored).expect("stored").len(), 0);

    // Peer to peer that cannot connect (an address where nothing listens) falls back to the
    // relay, which gets the ciphertext on demand; a direct conversation this time.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let sending = {
        let (alice, src) = (alice.clone(), src.clone());
        tokio::spawn(async move {
            let mut opts = p2p_options();
            opts.p2p_advertise = Some(vec![dead]);
            let target = Target::Users {
                to: vec!["bob".into()],
            };
            alice.send_file_any(&src, target, opts).await
        })
    };
    let offer = next_offer(&mut b_ev).await;
    assert_eq!(offer.name, name);
    assert!(matches!(
        offer.conv,
        conclave_client::proto::Conv::Direct(_)
    ));
    let got = tokio::time::timeout(
        WAIT,
        bob.accept_file(&offer.file_id, inbox.path(), p2p_options()),
    )
    .await
    .expect("accept in time")
    .expect("accept through the relay");
    assert_eq!(got.via, Via::Relay);
    assert!(got.fallback.is_some());
    let (stem, ext) = name.rsplit_once('.').expect("ext");
    assert_eq!(got.path, inbox.path().join(format!("{stem} (1).{ext}")));
    assert!(std::fs::read(&got.path).expect("read") == content, "intact");
    let sent = tokio::time::timeout(WAIT, sending)
        .await
        .expect("the sender settles")
        .expect("task")
        .expect("send");
    assert!(sent.relayed, "the relay copy was uploaded on demand");

    // What the server keeps: neither the content nor the name, in any file.
    drop((alice, bob));
    let dir = srv.stop(WAIT).await;
    assert!(grep_dir(dir.path(), marker).is_empty());
    assert!(grep_dir(dir.path(), name.as_bytes()).is_empty());
}
