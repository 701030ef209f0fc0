//! File transfer through the relay, end to end: the client library against the real server
//! (in-process, real TLS, real SQLite and file store in a temporary directory).
//!
//! Every wait is bounded by a timeout and every loop by a count.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users};
use conclave_client::proto::{Conv, Event, FileOffer, Target};
use conclave_client::{
    Client, ClientError, ClientEvent, ConnectOptions, Events, FileOptions, Reconnect, Via,
};
use conclave_server::Config;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(30);

async fn setup(names: &[&str], tweak: impl Fn(&mut Config)) -> (TestServer, TempDir) {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), names);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), tweak).await;
    (srv, tempfile::tempdir().expect("state dir"))
}

fn options(srv: &TestServer, user: &str, state: &Path) -> ConnectOptions {
    let mut opts = common::options(srv, user, state, WAIT);
    opts.reconnect = Reconnect {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(400),
        max_attempts: Some(200),
        give_up_after: WAIT,
    };
    opts
}

async fn connect(srv: &TestServer, user: &str, state: &Path) -> (Client, Events) {
    let (client, events, _) =
        tokio::time::timeout(WAIT, Client::connect(options(srv, user, state)))
            .await
            .expect("connect in time")
            .expect("connect");
    (client, events)
}

/// A file of `size` pseudo-random bytes (seeded), containing `marker` at its start.
fn make_file(dir: &Path, name: &str, size: usize, marker: &[u8]) -> (PathBuf, [u8; 32]) {
    let mut data = Vec::with_capacity(size);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ size as u64;
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    let m = marker.len().min(size);
    data[..m].copy_from_slice(&marker[..m]);
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("write file");
    (path, Sha256::digest(&data).into())
}

/// Waits for the next file offer (skipping other events).
async fn next_offer(events: &mut Events) -> FileOffer {
    for _ in 0..1000 {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("an offer in time")
            .expect("events go on");
        if let ClientEvent::Server(Event::FileOffer(o)) = e {
            return *o;
        }
    }
    panic!("no file offer");
}

/// Waits for a server event matching `f`.
async fn next_matching(events: &mut Events, f: impl Fn(&Event) -> bool) -> Event {
    for _ in 0..1000 {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("the event in time")
            .expect("events go on");
        if let ClientEvent::Server(ev) = e
            && f(&ev)
        {
            return ev;
        }
    }
    panic!("no matching event");
}

/// Proves no file offer is waiting: a round trip, a moment, then none queued.
async fn assert_no_offer(client: &Client, events: &mut Events) {
    client.ping().await.expect("ping");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..10_000 {
        match events.try_recv() {
            Some(ClientEvent::Server(Event::FileOffer(o))) => panic!("unexpected offer {o:?}"),
            Some(_) => {}
            None => return,
        }
    }
}

fn room(room: &str, except: &[&str]) -> Target {
    Target::Room {
        room: room.into(),
        except: except.iter().map(|s| s.to_string()).collect(),
    }
}

fn code(e: &ClientError) -> &str {
    e.code()
}

#[tokio::test]
async fn relay_to_a_room_with_except_reaches_exactly_the_right_set_intact() {
    let (srv, state) = setup(&["alice", "bob", "carol", "dave"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, mut alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let (carol, mut carol_ev) = connect(&srv, "carol", state.path()).await;
    // Not chunk-aligned, over several chunks.
    let (path, sha) = make_file(work.path(), "data.bin", 1_000_003, b"");
    let progress = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = progress.clone();
    let opts = FileOptions {
        window: Some(256 * 1024),
        progress: Some(Arc::new(move |p| {
            seen.lock().unwrap().push(p.bytes);
        })),
        ..Default::default()
    };
    let sent = alice
        .send_file(&path, room("general", &["carol"]), opts)
        .await
        .expect("send");
    assert_eq!(sent.size, 1_000_003);
    assert_eq!(sent.sha256, hex::encode(sha));
    assert_eq!(progress.lock().unwrap().last(), Some(&1_000_003));

    let offer = next_offer(&mut bob_ev).await;
    assert_eq!(offer.file_id, sent.file_id);
    assert_eq!(offer.from, "alice");
    assert_eq!(offer.name, "data.bin");
    assert_eq!(offer.size, 1_000_003);
    assert_eq!(offer.sha256, sha);
    assert_eq!(offer.conv, Conv::Room("general".into()));
    assert_eq!(offer.except, vec!["carol".to_string()]);
    assert!(offer.relay_ready);
    assert_no_offer(&carol, &mut carol_ev).await;
    // Carol cannot fetch it even knowing its id.
    let down = tempfile::tempdir().expect("down");
    let e = carol
        .accept_file(&sent.file_id, down.path(), FileOptions::default())
        .await
        .expect_err("carol is excepted");
    assert_eq!(code(&e), "not_found", "{e}");

    let got = bob
        .accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect("accept");
    assert_eq!(got.via, Via::Relay);
    assert_eq!(got.path, down.path().join("data.bin"));
    assert_eq!(
        std::fs::read(&got.path).unwrap(),
        std::fs::read(&path).unwrap()
    );
    // No part file is left behind.
    assert_eq!(std::fs::read_dir(down.path()).unwrap().count(), 1);
    // The sender hears that bob has it.
    let ev = next_matching(&mut alice_ev, |e| matches!(e, Event::FileReceived { .. })).await;
    assert_eq!(
        ev,
        Event::FileReceived {
            file_id: sent.file_id.clone(),
            by: "bob".into(),
            via_p2p: false
        }
    );
    // A second accept of the same file names the copy "data (1).bin".
    let again = bob
        .accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect("accept again");
    assert_eq!(again.path, down.path().join("data (1).bin"));

    // Dave was offline: the offer waits for him and comes at login.
    let (dave, mut dave_ev) = connect(&srv, "dave", state.path()).await;
    let offer = next_offer(&mut dave_ev).await;
    assert_eq!(offer.file_id, sent.file_id);
    let got = dave
        .accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect("dave accepts later");
    assert_eq!(
        std::fs::read(&got.path).unwrap(),
        std::fs::read(&path).unwrap()
    );
    drop((alice, bob, carol, dave));
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn to_users_and_private_rooms_never_reach_others() {
    let (srv, state) = setup(&["alice", "bob", "carol"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let (carol, mut carol_ev) = connect(&srv, "carol", state.path()).await;
    let (path, _) = make_file(work.path(), "note.txt", 5000, b"to bob only");
    let to_bob = Target::Users {
        to: vec!["bob".into()],
    };
    let sent = alice
        .send_file(&path, to_bob, FileOptions::default())
        .await
        .expect("send to bob");
    let offer = next_offer(&mut bob_ev).await;
    assert_eq!(offer.file_id, sent.file_id);
    assert_eq!(offer.conv, Conv::Direct(vec!["alice".into(), "bob".into()]));
    assert_no_offer(&carol, &mut carol_ev).await;

    alice.create_room("ops", true, None).await.expect("create");
    alice.invite("ops", "bob").await.expect("invite");
    bob.join("ops", None).await.expect("join");
    let (secret, _) = make_file(work.path(), "plan.txt", 70_000, b"private plan");
    let sent = alice
        .send_file(&secret, room("ops", &[]), FileOptions::default())
        .await
        .expect("send to ops");
    let offer = next_offer(&mut bob_ev).await;
    assert_eq!(offer.file_id, sent.file_id);
    assert_no_offer(&carol, &mut carol_ev).await;
    let down = tempfile::tempdir().expect("down");
    let e = carol
        .accept_file(&sent.file_id, down.path(), FileOptions::default())
        .await
        .expect_err("carol is no member");
    assert_eq!(code(&e), "not_found");
    // A non-member cannot send into the private room either.
    let e = carol
        .send_file(&path, room("ops", &[]), FileOptions::default())
        .await
        .expect_err("not a member");
    assert_eq!(code(&e), "no_such_room", "{e}");
    drop((alice, bob, carol));
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn every_refusal_is_clear() {
    let (srv, state) = setup(&["alice", "bob"], |c| {
        c.files.max_file_bytes = 200_000;
        c.files.quota_bytes_per_user = 300_000;
        c.files.expiry_secs = 3;
    })
    .await;
    let work = tempfile::tempdir().expect("work");
    let (alice, mut alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let general = || room("general", &[]);
    let opts = FileOptions::default;

    // Too large.
    let (big, _) = make_file(work.path(), "big.bin", 200_001, b"");
    let e = alice
        .send_file(&big, general(), opts())
        .await
        .expect_err("too large");
    assert_eq!(code(&e), "too_large");
    assert!(e.to_string().contains("accepts files up to"), "{e}");

    // Quota: two files of 150,000 fit, a third does not.
    let (f1, _) = make_file(work.path(), "one.bin", 150_000, b"");
    alice
        .send_file(&f1, general(), opts())
        .await
        .expect("first");
    alice
        .send_file(&f1, general(), opts())
        .await
        .expect("second");
    let e = alice
        .send_file(&f1, general(), opts())
        .await
        .expect_err("over quota");
    assert_eq!(code(&e), "quota_exceeded");
    assert!(e.to_string().contains("quota"), "{e}");

    // The path is missing, or not a readable file.
    let e = alice
        .send_file(&work.path().join("nope.bin"), general(), opts())
        .await
        .expect_err("missing");
    assert_eq!(code(&e), "path_not_found");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = alice
        .send_file(work.path(), general(), opts())
        .await
        .expect_err("a directory");
    assert_eq!(code(&e), "unreadable");

    // The target directory is not usable.
    let first = next_offer(&mut bob_ev).await;
    let e = bob
        .accept_file(&first.file_id, &work.path().join("no/such/dir"), opts())
        .await
        .expect_err("no directory");
    assert_eq!(code(&e), "not_writable");
    let e = bob
        .accept_file(&first.file_id, &f1, opts())
        .await
        .expect_err("a file, not a directory");
    assert_eq!(code(&e), "not_writable");
    assert!(e.to_string().contains("not a directory"), "{e}");

    // The recipient declines: the sender is told, and the file is no longer offered.
    bob.decline_file(&first.file_id).await.expect("decline");
    let ev = next_matching(&mut alice_ev, |e| matches!(e, Event::FileDeclined { .. })).await;
    assert_eq!(
        ev,
        Event::FileDeclined {
            file_id: first.file_id.clone(),
            by: "bob".into()
        }
    );
    let e = bob
        .accept_file(&first.file_id, work.path(), opts())
        .await
        .expect_err("declined");
    assert_eq!(code(&e), "declined");
    let pending = bob.pending_files().await.expect("pending");
    assert!(pending.iter().all(|o| o.file_id != first.file_id));

    // Expired: after 3 s the file is refused as expired.
    let second = next_offer(&mut bob_ev).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let e = bob
        .accept_file(&second.file_id, work.path(), opts())
        .await
        .expect_err("expired");
    assert_eq!(code(&e), "expired", "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    // And expired files no longer count against the quota.
    alice
        .send_file(&f1, general(), opts())
        .await
        .expect("quota freed");
    drop((alice, bob));
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn downloads_resume_from_a_part_file_and_uploads_survive_a_server_restart() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), |_| {}).await;
    let addr = srv.addr;
    let state = tempfile::tempdir().expect("state");
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;

    // Upload 24 MiB with a small window while the server restarts underneath.
    let (path, sha) = make_file(work.path(), "big.bin", 24 * 1024 * 1024 + 17, b"");
    let uploading = {
        let alice = alice.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let opts = FileOptions {
                window: Some(128 * 1024),
                ..Default::default()
            };
            alice.send_file(&path, room("general", &[]), opts).await
        })
    };
    // 50 ms: since the server's TLS got faster (November 22) the whole upload can finish
    // within 300 ms.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !uploading.is_finished(),
        "the upload must still run when the server stops"
    );
    let dir = srv.stop(WAIT).await;
    let srv = TestServer::start(dir, addr, |_| {}).await;
    let sent = tokio::time::timeout(Duration::from_secs(120), uploading)
        .await
        .expect("upload finishes in time")
        .expect("task")
        .expect("upload completes after the restart");
    assert_eq!(sent.sha256, hex::encode(sha));

    let offer = next_offer(&mut bob_ev).await;
    assert_eq!(offer.file_id, sent.file_id);
    // A download that stopped after 5 MiB + 3 bytes left its part file: the next attempt
    // continues from there.
    let down = tempfile::tempdir().expect("down");
    let original = std::fs::read(&path).unwrap();
    let short: String = offer.file_id.chars().filter(|c| *c != '-').collect();
    let part = down.path().join(format!(".big.bin.{short}.part"));
    let cut = 5 * 1024 * 1024 + 3;
    std::fs::write(&part, &original[..cut]).unwrap();
    let got = bob
        .accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect("resumed download");
    assert_eq!(got.resumed_from, cut as u64);
    assert_eq!(std::fs::read(&got.path).unwrap(), original);
    assert!(!part.exists());

    // A corrupted part file is caught by the hash and discarded.
    let mut bad = original[..cut].to_vec();
    bad[1000] ^= 0xff;
    std::fs::write(&part, &bad).unwrap();
    let e = bob
        .accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect_err("hash mismatch");
    assert_eq!(code(&e), "hash_mismatch");
    assert!(!part.exists());
    drop((alice, bob));
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn no_plaintext_of_a_file_reaches_the_data_directory() {
    let (srv, state) = setup(&["alice", "bob"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _a) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let marker = b"CONCLAVE-FILE-MARKER-7f3a9c41e2";
    // The marker repeated through the file, and in its name.
    let mut data = Vec::new();
    for i in 0..20_000u32 {
        data.extend_from_slice(marker);
        data.extend_from_slice(&i.to_le_bytes());
    }
    let name = "CONCLAVE-NAME-MARKER-55d1.txt";
    let path = work.path().join(name);
    std::fs::write(&path, &data).unwrap();
    let sent = alice
        .send_file(&path, room("general", &[]), FileOptions::default())
        .await
        .expect("send");
    let offer = next_offer(&mut bob_ev).await;
    let down = tempfile::tempdir().expect("down");
    bob.accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect("accept");
    drop((alice, bob));
    let dir = srv.stop(WAIT).await;
    let mut scanned = 0;
    let mut stack = vec![dir.path().to_path_buf()];
    for _ in 0..10_000 {
        let Some(d) = stack.pop() else { break };
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                for needle in [&marker[..], name.as_bytes()] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle),
                        "plaintext in {}",
                        p.display()
                    );
                }
                scanned += 1;
            }
        }
    }
    assert!(scanned >= 3, "scanned {scanned} files");
    // The stored file is there, sealed: larger than the plaintext by the per-chunk overhead.
    let stored = dir.path().join("files").join(&sent.file_id);
    assert!(std::fs::metadata(&stored).unwrap().len() > data.len() as u64);
}

fn p2p(window: Option<u64>) -> FileOptions {
    FileOptions {
        p2p: true,
        window,
        p2p_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

#[tokio::test]
async fn p2p_serves_three_recipients_in_parallel_without_the_relay() {
    let (srv, state) = setup(&["alice", "bob", "carol", "dave"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, mut alice_ev) = connect(&srv, "alice", state.path()).await;
    let mut others = Vec::new();
    for name in ["bob", "carol", "dave"] {
        others.push((name, connect(&srv, name, state.path()).await));
    }
    let (path, sha) = make_file(work.path(), "p2p.bin", 3 * 1024 * 1024 + 11, b"");
    let sending = {
        let alice = alice.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let mut opts = p2p(Some(1 << 20));
            opts.congestion = Some("bbr".into());
            alice.send_file_any(&path, room("general", &[]), opts).await
        })
    };
    let mut receiving = Vec::new();
    for (name, (client, mut events)) in others {
        let offer = next_offer(&mut events).await;
        assert!(offer.p2p.is_some(), "{name}: a direct offer");
        assert!(!offer.relay_ready);
        assert_eq!(offer.sha256, sha);
        let down = tempfile::tempdir().expect("down");
        receiving.push(tokio::spawn(async move {
            let got = client
                .accept_file(&offer.file_id, down.path(), p2p(None))
                .await
                .expect("direct accept");
            let bytes = std::fs::read(&got.path).unwrap();
            (got, bytes, down, client)
        }));
    }
    let original = std::fs::read(&path).unwrap();
    for r in receiving {
        let (got, bytes, _down, _client) = tokio::time::timeout(WAIT, r)
            .await
            .expect("in time")
            .expect("task");
        assert_eq!(got.via, Via::P2p, "{got:?}");
        assert_eq!(got.fallback, None);
        assert!(bytes == original, "intact");
    }
    let sent = tokio::time::timeout(WAIT, sending)
        .await
        .expect("sender settles")
        .expect("task")
        .expect("send");
    assert!(!sent.relayed, "nobody needed the relay");
    // The server never held the bytes: its stored file is empty.
    let stored = srv.dir.path().join("files").join(&sent.file_id);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), 0);
    let ev = next_matching(&mut alice_ev, |e| matches!(e, Event::FileReceived { .. })).await;
    assert!(matches!(ev, Event::FileReceived { via_p2p: true, .. }));
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn p2p_falls_back_to_the_relay_when_the_sender_cannot_be_reached() {
    let (srv, state) = setup(&["alice", "bob"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let (path, _) = make_file(work.path(), "far.bin", 700_001, b"");
    // Announce a UDP port where nothing listens (as behind a firewall).
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let mut opts = p2p(None);
    opts.p2p_advertise = Some(vec![dead]);
    let sending = {
        let alice = alice.clone();
        let path = path.clone();
        tokio::spawn(async move {
            alice
                .send_file_any(
                    &path,
                    Target::Users {
                        to: vec!["bob".into()],
                    },
                    opts,
                )
                .await
        })
    };
    let offer = next_offer(&mut bob_ev).await;
    assert_eq!(
        offer.p2p.as_ref().map(|p| p.addrs.clone()),
        Some(vec![dead])
    );
    let down = tempfile::tempdir().expect("down");
    let got = bob
        .accept_file(&offer.file_id, down.path(), p2p(None))
        .await
        .expect("accept through the relay");
    assert_eq!(got.via, Via::Relay);
    let why = got.fallback.clone().expect("says why it fell back");
    assert!(why.contains("no direct connection"), "{why}");
    assert_eq!(
        std::fs::read(&got.path).unwrap(),
        std::fs::read(&path).unwrap()
    );
    let sent = tokio::time::timeout(WAIT, sending)
        .await
        .expect("sender settles")
        .expect("task")
        .expect("send");
    assert!(sent.relayed, "the relay copy was uploaded on demand");
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn p2p_to_an_offline_recipient_uploads_to_the_relay_at_once() {
    let (srv, state) = setup(&["alice", "bob", "carol"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let (path, _) = make_file(work.path(), "both.bin", 400_000, b"");
    let sending = {
        let alice = alice.clone();
        let path = path.clone();
        tokio::spawn(async move {
            alice
                .send_file_any(&path, room("general", &[]), p2p(None))
                .await
        })
    };
    let offer = next_offer(&mut bob_ev).await;
    let down = tempfile::tempdir().expect("down");
    let got = bob
        .accept_file(&offer.file_id, down.path(), p2p(None))
        .await
        .expect("bob direct");
    assert_eq!(got.via, Via::P2p);
    let sent = tokio::time::timeout(WAIT, sending)
        .await
        .expect("sender settles")
        .expect("task")
        .expect("send");
    assert!(sent.relayed, "carol was offline: the relay copy was made");
    // Carol comes later and gets it from the relay.
    let (carol, mut carol_ev) = connect(&srv, "carol", state.path()).await;
    let offer = next_offer(&mut carol_ev).await;
    assert!(offer.relay_ready);
    assert!(offer.p2p.is_none());
    let got = carol
        .accept_file(&offer.file_id, down.path(), FileOptions::default())
        .await
        .expect("carol from the relay");
    assert_eq!(got.via, Via::Relay);
    assert_eq!(
        std::fs::read(&got.path).unwrap(),
        std::fs::read(&path).unwrap()
    );
    srv.stop(WAIT).await;
}

#[tokio::test]
async fn a_login_sends_no_more_offers_than_its_queue_takes() {
    // 80 files wait for bob; his outbound queue holds 64 frames. A login used to queue every
    // pending offer at once (up to `max_pending_offers`, 200), dropping him as too slow at every
    // login. Now a login sends a quarter of the queue (16) and `files` lists them all.
    const FILES: usize = 80;
    let (srv, state) = setup(&["alice", "bob"], |c| {
        c.limits.outbound_queue_frames = 64;
        c.limits.requests_per_second = 100_000;
        c.limits.request_burst = 100_000;
    })
    .await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let to_bob = Target::Users {
        to: vec!["bob".into()],
    };
    for i in 0..FILES {
        let (path, _) = make_file(work.path(), &format!("f{i}.bin"), 10, b"x");
        alice
            .send_file(&path, to_bob.clone(), FileOptions::default())
            .await
            .expect("send while bob is offline");
    }

    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let listed = match bob
        .request(conclave_client::proto::Request::Files)
        .await
        .expect("files")
    {
        conclave_client::proto::Reply::Files(f) => f,
        other => panic!("{other:?}"),
    };
    assert_eq!(listed.len(), FILES, "files lists every pending offer");
    // The login's offers came before the reply; nothing else may have cut the connection.
    let mut at_login = 0;
    for _ in 0..10_000 {
        match bob_ev.try_recv() {
            Some(ClientEvent::Server(Event::FileOffer(_))) => at_login += 1,
            Some(ClientEvent::Disconnected {
                reason, message, ..
            }) => {
                panic!("bob was dropped: {reason:?} {message}")
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(at_login, 16, "a quarter of the queue at login");
    bob.ping().await.expect("bob is still connected");
    assert!(
        bob_ev.try_recv().is_none(),
        "no disconnection after the login"
    );
    drop((alice, bob));
    srv.stop(WAIT).await;
}

/// A peer-to-peer sender whose client dies: the recipient's accept ends soon with
/// `not_ready` (it used to wait ten minutes for a relay copy nobody would upload).
#[tokio::test]
async fn p2p_sender_gone_ends_the_accept_with_not_ready() {
    let (srv, state) = setup(&["alice", "bob"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let (path, _) = make_file(work.path(), "note.txt", 300_000, b"");
    let sending = {
        let (alice, path) = (alice.clone(), path.clone());
        tokio::spawn(async move {
            alice
                .send_file_any(&path, room("general", &[]), p2p(None))
                .await
        })
    };
    let offer = next_offer(&mut bob_ev).await;
    assert!(offer.p2p.is_some());
    // Alice's client dies: its serving stops and the server sees her go.
    sending.abort();
    alice.close();
    drop(alice);
    for _ in 0..100 {
        if !srv_online(&bob, "alice").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down = tempfile::tempdir().expect("down");
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(
        WAIT,
        bob.accept_file(&offer.file_id, down.path(), p2p(None)),
    )
    .await
    .expect("the accept ends in time")
    .expect_err("nothing to fetch");
    assert_eq!(code(&e), "not_ready", "{e}");
    assert!(e.to_string().contains("offline"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    srv.stop(WAIT).await;
}

async fn srv_online(client: &Client, user: &str) -> bool {
    match client
        .request(conclave_client::proto::Request::Who { room: None })
        .await
    {
        Ok(conclave_client::proto::Reply::Users(users)) => {
            users.iter().any(|u| u.user == user && u.online)
        }
        _ => true,
    }
}

/// `cancel_file`: the sender learns the id at the offer, cancels, its send ends with
/// `cancelled`, the recipient is told and cannot take the file any more.
#[tokio::test]
async fn a_sender_cancels_a_p2p_file() {
    let (srv, state) = setup(&["alice", "bob"], |_| {}).await;
    let work = tempfile::tempdir().expect("work");
    let (alice, _alice_ev) = connect(&srv, "alice", state.path()).await;
    let (bob, mut bob_ev) = connect(&srv, "bob", state.path()).await;
    let (path, _) = make_file(work.path(), "draft.bin", 200_000, b"");
    let (id_tx, mut id_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut opts = p2p(None);
    opts.on_offer = Some(Arc::new(move |id: &str| {
        let _ = id_tx.send(id.to_string());
    }));
    let sending = {
        let (alice, path) = (alice.clone(), path.clone());
        tokio::spawn(async move { alice.send_file_any(&path, room("general", &[]), opts).await })
    };
    let file_id = tokio::time::timeout(WAIT, id_rx.recv())
        .await
        .expect("the id in time")
        .expect("an id");
    let offer = next_offer(&mut bob_ev).await;
    assert_eq!(offer.file_id, file_id);
    // Only the sender may cancel.
    let e = bob.cancel_file(&file_id).await.expect_err("not bob's");
    assert_eq!(code(&e), "not_found", "{e}");
    alice.cancel_file(&file_id).await.expect("cancel");
    let e = tokio::time::timeout(WAIT, sending)
        .await
        .expect("the send ends")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(code(&e), "cancelled", "{e}");
    let ev = next_matching(&mut bob_ev, |e| matches!(e, Event::FileCancelled { .. })).await;
    assert_eq!(
        ev,
        Event::FileCancelled {
            file_id: file_id.clone(),
            by: "alice".into()
        }
    );
    let down = tempfile::tempdir().expect("down");
    let e = bob
        .accept_file(&file_id, down.path(), FileOptions::default())
        .await
        .expect_err("gone");
    assert_eq!(code(&e), "not_found", "{e}");
    // And a relay file already sent can be withdrawn too.
    let (path, _) = make_file(work.path(), "old.bin", 1000, b"");
    let sent = alice
        .send_file(&path, room("general", &[]), FileOptions::default())
        .await
        .expect("relay send");
    alice
        .cancel_file(&sent.file_id)
        .await
        .expect("cancel a stored file");
    let e = alice
        .cancel_file(&sent.file_id)
        .await
        .expect_err("already withdrawn");
    assert_eq!(code(&e), "not_found", "{e}");
    srv.stop(WAIT).await;
}
