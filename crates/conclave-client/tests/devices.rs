//! Your history on every device (issue 21), with the real server (in-process, real TLS, real
//! SQLite in temporary directories) and real clients, each device its own state directory:
//! a new device is shown to the account's other devices, gets the history only when one of
//! them approves it (also across a server restart, and while another device is offline),
//! reads it through `history` and `search`; a rejected device gets nothing; and the
//! recovery-key backup restores everything on a fresh device after every device is gone,
//! without the key ever reaching the server.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users, connect_e2ee as connect, grep_dir, none_for};
use conclave_client::devices::DeviceNotice;
use conclave_client::e2ee::E2eeNotice;
use conclave_client::proto::{Bytes, ConvRef, ErrorCode, Request};
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

fn waiting(e: &ClientEvent) -> Option<(String, String)> {
    match e {
        ClientEvent::E2ee(E2eeNotice::Device(DeviceNotice::Waiting {
            device,
            safety_number,
            ..
        })) => Some((device.clone(), safety_number.clone())),
        _ => None,
    }
}

fn received(e: &ClientEvent) -> Option<(u32, u64)> {
    match e {
        ClientEvent::E2ee(E2eeNotice::Device(DeviceNotice::Received {
            conversations,
            messages,
            ..
        })) => Some((*conversations, *messages)),
        _ => None,
    }
}

/// The approver's safety number in `history_received`, and whether its key is the one its
/// leaf has in a group the new device is in.
fn received_from(e: &ClientEvent) -> Option<(Option<String>, bool)> {
    match e {
        ClientEvent::E2ee(E2eeNotice::Device(DeviceNotice::Received {
            safety_number,
            approver_in_group,
            ..
        })) => Some((safety_number.clone(), *approver_in_group)),
        _ => None,
    }
}

async fn texts(c: &Client, room: &str) -> Vec<String> {
    c.history(ConvRef::Room(room.into()), 500, None)
        .await
        .expect("history")
        .iter()
        .filter_map(|m| m.body.as_text().map(str::to_string))
        .collect()
}

async fn direct_texts(c: &Client, with: &str) -> Vec<String> {
    c.history(ConvRef::With(vec![with.into()]), 500, None)
        .await
        .expect("history")
        .iter()
        .filter_map(|m| m.body.as_text().map(str::to_string))
        .collect()
}

fn id_of(c: &Client) -> (String, String) {
    c.device_fingerprint().expect("a device")
}

/// Alice's first device and Bob talk in an end-to-end room and directly: `n` room messages
/// `room-0`… and one direct message.
async fn history_of_two(
    srv: &TestServer,
    a_state: &Path,
    b_state: &Path,
    n: usize,
) -> (Client, Events, Client, Events) {
    let (alice, a_ev) = connect(srv, "alice", a_state).await;
    let (bob, b_ev) = connect(srv, "bob", b_state).await;
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.join("lab", None).await.expect("bob joins");
    for i in 0..n {
        let who = if i % 2 == 0 { &alice } else { &bob };
        who.send_to_room("lab", &format!("room-{i} launch-code"), &[])
            .await
            .expect("send");
    }
    alice
        .send(
            conclave_client::proto::Target::Users {
                to: vec!["bob".into()],
            },
            conclave_client::proto::Body::text("direct-purple-7"),
            None,
        )
        .await
        .expect("direct");
    (alice, a_ev, bob, b_ev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_gets_history_once_approved_across_a_server_restart() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev, _bob, _b_ev) =
        history_of_two(&srv, states[0].path(), states[1].path(), 20).await;
    // Alice's own history, as her first device has it (Bob's last messages may still be on
    // their way to it: bounded wait).
    let mut have = 0;
    for _ in 0..200 {
        have = texts(&alice, "lab").await.len();
        if have >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(have, 20);

    // Alice logs in on a second computer: her first device is told, with its safety number.
    let (laptop, mut l_ev) = connect(&srv, "alice", states[2].path()).await;
    let (laptop_id, laptop_number) = id_of(&laptop);
    let (dev, number) = wait_for(&mut a_ev, waiting).await;
    assert_eq!(
        (dev.as_str(), number.as_str()),
        (laptop_id.as_str(), laptop_number.as_str())
    );
    // Not approved yet: it reads nothing from before it came.
    assert!(texts(&laptop, "lab").await.is_empty());

    // The server restarts; the request survives it.
    let addr = srv.addr;
    let dir = srv.stop(WAIT).await;
    let srv = TestServer::start(dir.clone(), addr, |_| {}).await;
    // The first device approves once both are back (requests wait for the reconnect).
    let sent = tokio::time::timeout(WAIT, async {
        loop {
            match alice.approve_device(&laptop_id, |_, _| {}).await {
                Ok(r) => return r,
                Err(ClientError::Server(e)) if e.code == ErrorCode::NotFound => {
                    panic!("the request was lost across the restart: {e:?}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("approved in time");
    assert_eq!((sent.conversations, sent.messages), (2, 21));

    let (got, (number, in_group)) =
        wait_for(&mut l_ev, |e| Some((received(e)?, received_from(e)?))).await;
    assert_eq!(got, (2, 21));
    // The approver's safety number, bound to the key its leaf has in the groups the laptop
    // joined (not only to the server's device list).
    assert_eq!(number, Some(id_of(&alice).1));
    assert!(in_group);
    let room = texts(&laptop, "lab").await;
    assert_eq!(room.len(), 20, "{room:?}");
    assert_eq!(room[0], "room-0 launch-code");
    assert_eq!(room[19], "room-19 launch-code");
    assert_eq!(
        direct_texts(&laptop, "bob").await,
        vec!["direct-purple-7".to_string()]
    );
    let found = laptop
        .search("launch-code", Some("lab"), 100, None)
        .await
        .expect("search");
    assert_eq!(found.len(), 20);
    // ... and goes on reading what comes next, like any device.
    alice
        .send_to_room("lab", "after-approval", &[])
        .await
        .expect("send");
    tokio::time::timeout(WAIT, async {
        while !texts(&laptop, "lab")
            .await
            .iter()
            .any(|t| t == "after-approval")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the new message arrives");
    // What the server held for the laptop was ciphertext only, and is gone once taken.
    for needle in [&b"launch-code"[..], b"direct-purple-7"] {
        assert!(grep_dir(dir.path(), needle).is_empty());
    }
    drop((alice, laptop));
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_device_is_approved_while_the_second_is_offline_and_a_rejected_one_gets_nothing() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..5)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev, _bob, _b_ev) =
        history_of_two(&srv, states[0].path(), states[1].path(), 6).await;

    // A second device comes, is approved, takes its history and goes offline.
    let (second, mut s_ev) = connect(&srv, "alice", states[2].path()).await;
    let (second_id, _) = id_of(&second);
    assert_eq!(wait_for(&mut a_ev, waiting).await.0, second_id);
    alice
        .approve_device(&second_id, |_, _| {})
        .await
        .expect("approve");
    assert_eq!(wait_for(&mut s_ev, received).await, (2, 7));
    second.close();
    drop(s_ev);

    // A third device while the second is away: the first approves it.
    let (third, mut t_ev) = connect(&srv, "alice", states[3].path()).await;
    let (third_id, _) = id_of(&third);
    assert_eq!(wait_for(&mut a_ev, waiting).await.0, third_id);
    let seen = std::sync::Mutex::new(Vec::new());
    let report = alice
        .approve_device(&third_id, |done, total| {
            seen.lock().expect("lock").push((done, total))
        })
        .await
        .expect("approve third");
    assert_eq!(report.messages, 7);
    assert_eq!(seen.lock().expect("lock").last(), Some(&(7, 7)));
    assert_eq!(wait_for(&mut t_ev, received).await, (2, 7));
    assert_eq!(texts(&third, "lab").await.len(), 6);

    // A fourth device is rejected: nothing is sent to it, and the server refuses to store
    // anything for it.
    let (fourth, mut f_ev) = connect(&srv, "alice", states[4].path()).await;
    let (fourth_id, _) = id_of(&fourth);
    assert_eq!(wait_for(&mut a_ev, waiting).await.0, fourth_id);
    alice.reject_device(&fourth_id).await.expect("reject");
    let refused = alice
        .request(Request::TransferPut {
            device: fourth_id.clone(),
            transfer: "0123abcd".into(),
            index: 0,
            data: Bytes::from(vec![1, 2, 3]),
        })
        .await
        .expect_err("refused");
    assert!(matches!(refused, ClientError::Server(ref e) if e.code == ErrorCode::Forbidden));
    none_for(&mut f_ev, Duration::from_millis(1500), |e| {
        received(e).is_some()
    })
    .await;
    assert!(texts(&fourth, "lab").await.is_empty());
    assert!(direct_texts(&fourth, "bob").await.is_empty());

    // The second device is removed later (rejected after its approval): it keeps what it
    // had, nothing more can be sent to it, and it cannot come back.
    alice
        .remove_device(&second_id)
        .await
        .expect("remove the second");
    let refused = alice.approve_device("ffff0000", |_, _| {}).await;
    assert!(refused.is_err());
    let refused = alice
        .request(Request::TransferPut {
            device: second_id.clone(),
            transfer: "0123abcd".into(),
            index: 0,
            data: Bytes::from(vec![1]),
        })
        .await
        .expect_err("refused");
    assert!(matches!(refused, ClientError::Server(ref e) if e.code == ErrorCode::Forbidden));
    let refused = comes_back(&srv, "alice", states[2].path(), &srv.addr.to_string()).await;
    assert!(refused.contains("removed"), "{refused}");
    let kept = local_texts(states[2].path(), &srv.addr.to_string(), "r:lab");
    assert_eq!(kept.len(), 6, "{kept:?}");
    drop((alice, third, fourth));
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_key_restores_everything_on_a_fresh_device_and_never_reaches_the_server() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev, bob, _b_ev) =
        history_of_two(&srv, states[0].path(), states[1].path(), 10).await;
    let key = alice.backup_enable().await.expect("backup on");
    // Shown in groups a person can copy.
    assert_eq!(key.split('-').count(), 13);
    assert!(key.split('-').all(|g| g.len() == 4));
    let key_id = conclave_e2ee::backup::RecoveryKey::parse(&key)
        .expect("parses")
        .key_id();
    let segments = |c: &Client| {
        let c = c.clone();
        let key_id = key_id.clone();
        async move {
            match c
                .request(Request::BackupFetch {
                    key_id,
                    after: None,
                })
                .await
                .expect("fetch")
            {
                conclave_client::proto::Reply::BackupChunks(s) => s.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let before = segments(&alice).await;
    assert!(before >= 1);
    // Later messages are appended on their own (about once a second).
    bob.send_to_room("lab", "later-green-3", &[])
        .await
        .expect("send");
    tokio::time::timeout(WAIT, async {
        while segments(&alice).await <= before {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the backup grows");

    // Every device of Alice is gone.
    alice.close();
    drop(alice);
    let a_state = states.into_iter().next().expect("state");
    drop(a_state);

    // A fresh device with the recovery key: everything is back.
    let fresh = tempfile::tempdir().expect("state");
    let (restored, _r_ev) = connect(&srv, "alice", fresh.path()).await;
    let wrong = conclave_e2ee::backup::RecoveryKey::generate().display();
    assert!(restored.restore_backup(&wrong, |_| {}).await.is_err());
    let (convs, messages) = restored
        .restore_backup(&key, |_| {})
        .await
        .expect("restore");
    assert_eq!((convs, messages), (2, 12));
    let room = texts(&restored, "lab").await;
    assert_eq!(room.len(), 11, "{room:?}");
    assert!(room.iter().any(|t| t == "later-green-3"));
    assert_eq!(
        direct_texts(&restored, "bob").await,
        vec!["direct-purple-7".to_string()]
    );
    let found = restored
        .search("green", None, 10, None)
        .await
        .expect("search");
    assert_eq!(found.len(), 1);

    // The key never reached the server: not in its data directory (database, WAL, audit log).
    let compact = key.replace('-', "");
    for needle in [key.as_bytes(), compact.as_bytes(), b"later-green-3"] {
        assert!(
            grep_dir(dir.path(), needle).is_empty(),
            "found in the server's data"
        );
    }

    // The backup can be turned off: it is deleted from the server.
    restored.backup_disable().await.expect("off");
    assert_eq!(segments(&restored).await, 0);
    drop((restored, bob));
    srv.stop(WAIT).await;
}

/// Seeds a device's local history directly (as if it had been there for a long time):
/// `n` direct messages with Bob and `n` with Carol.
fn seed(srv: &TestServer, state: &Path, n: u64) {
    use conclave_e2ee::payload::Payload;
    use conclave_e2ee::transfer::Row;
    let dir = conclave_client::e2ee::device_dir(state, &srv.addr.to_string(), "alice");
    let device =
        conclave_e2ee::device::Device::open(&dir, "alice", common::PASSWORD).expect("device");
    for conv in ["d:alice,bob", "d:alice,carol"] {
        let rows: Vec<Row> = (1..=n)
            .map(|i| Row {
                state: None,
                conv: conv.into(),
                seq: i,
                sender: "alice".into(),
                ts_ms: 1_700_000_000_000 + i as i64,
                payload: Payload::Body {
                    content_type: "text/plain".into(),
                    data: format!("old {conv} {i}").into_bytes(),
                }
                .encode()
                .expect("encode"),
            })
            .collect();
        device.import_rows(&rows).expect("seed");
    }
}

/// A transfer cut in the middle (the new device's connection goes through the test kit's
/// relay, 5 ms one way with jitter, and is cut as soon as the first chunk is in) resumes
/// after the reconnect: every message arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_in_the_middle_resumes_through_the_relay() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob", "carol"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let (a_state, n_state) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("n"),
    );
    seed(&srv, a_state.path(), 1500);
    let (alice, mut a_ev) = connect(&srv, "alice", a_state.path()).await;

    let relay =
        common::relay::Relay::start(srv.addr, common::relay::RelayConfig::delay_ms(5.0, 21));
    let mut opts = common::options(&srv, "alice", n_state.path(), WAIT);
    opts.server = relay.addr();
    let (laptop, events, _) = Client::connect(opts).await.expect("connect via the relay");
    let mut l_ev = laptop
        .enable_e2ee(events, n_state.path(), common::PASSWORD)
        .await
        .expect("e2ee on");
    let (id, _) = id_of(&laptop);
    assert_eq!(wait_for(&mut a_ev, waiting).await.0, id);

    let approve = {
        let alice = alice.clone();
        let id = id.clone();
        tokio::spawn(async move { alice.approve_device(&id, |_, _| {}).await })
    };
    // The first chunk is in: cut the new device's connection.
    wait_for(&mut l_ev, |e| {
        matches!(
            e,
            ClientEvent::E2ee(E2eeNotice::Device(DeviceNotice::Progress {
                direction: "receive",
                ..
            }))
        )
        .then_some(())
    })
    .await;
    assert!(relay.cut_all() >= 1);
    let report = approve.await.expect("task").expect("approved");
    assert_eq!((report.conversations, report.messages), (2, 3000));
    assert!(report.chunks >= 6);
    let (got, (_, in_group)) =
        wait_for(&mut l_ev, |e| Some((received(e)?, received_from(e)?))).await;
    assert_eq!(got, (2, 3000));
    // A history seeded without any group: the approver is known only from the server's list,
    // and the notice says so.
    assert!(!in_group);
    for with in ["bob", "carol"] {
        let got = laptop
            .history(ConvRef::With(vec![with.into()]), 5000, None)
            .await
            .expect("history");
        assert_eq!(got.len(), 1500, "with {with}");
        let seqs: std::collections::BTreeSet<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs.len(), 1500);
        assert_eq!(
            got[0].body.as_text(),
            Some(format!("old d:alice,{with} 1").as_str())
        );
    }
    drop((alice, laptop));
    srv.stop(WAIT).await;
}

/// Signs in again with a device's state directory (through `server`, the address it used,
/// which names its state), expecting end-to-end encryption to be refused: the error's text.
async fn comes_back(srv: &TestServer, user: &str, state: &Path, server: &str) -> String {
    let mut opts = common::options(srv, user, state, WAIT);
    opts.server = server.to_string();
    let (c, events, _) = tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("the password still signs in");
    let err = match c.enable_e2ee(events, state, common::PASSWORD).await {
        Ok(_) => panic!("a removed device published itself again"),
        Err(e) => e.to_string(),
    };
    c.close();
    err
}

/// The texts a device's local history holds for a conversation (opened from its state
/// directory as its client would, with the account's password).
fn local_texts(state: &Path, server: &str, conv: &str) -> Vec<String> {
    let dir = conclave_client::e2ee::device_dir(state, server, "alice");
    let device =
        conclave_e2ee::device::Device::open(&dir, "alice", common::PASSWORD).expect("device");
    device
        .history(conv, 1000, None)
        .expect("history")
        .into_iter()
        .filter_map(|e| match e.payload {
            conclave_e2ee::payload::Payload::Body { data, .. } => String::from_utf8(data).ok(),
            _ => None,
        })
        .collect()
}

/// What a removed device's state could still open of a room's log: every entry the server
/// stores after the last one the device processed (fetched by a plain session of the
/// account, as anyone with the password could), processed with the device's keys. Returns
/// the texts it decrypts.
async fn what_the_state_opens(
    srv: &TestServer,
    state: &Path,
    server: &str,
    room: &str,
) -> Vec<String> {
    let mut opts = common::options(srv, "alice", state, WAIT);
    opts.state_dir = None;
    let (plain, _events, _) = Client::connect(opts).await.expect("plain session");
    let log = match plain
        .request(Request::History {
            conv: ConvRef::Room(room.into()),
            limit: 500,
            before: None,
        })
        .await
        .expect("the log")
    {
        conclave_client::proto::Reply::Messages(m) => m,
        other => panic!("unexpected {other:?}"),
    };
    plain.close();
    assert!(!log.is_empty());
    let key = format!("r:{room}");
    let dir = conclave_client::e2ee::device_dir(state, server, "alice");
    let device =
        conclave_e2ee::device::Device::open(&dir, "alice", common::PASSWORD).expect("device");
    let mut opened = Vec::new();
    for m in log {
        if let Ok(conclave_e2ee::device::Processed::App {
            payload: conclave_e2ee::payload::Payload::Body { data, .. },
            ..
        }) = device.process(&key, m.seq, &m.from, m.ts_ms, &m.body.data)
        {
            opened.push(String::from_utf8_lossy(&data).into_owned());
        }
    }
    opened
}

/// Sends `n` messages each way between Alice's remaining device and Bob, then checks that
/// each side has all of the other's (nothing lost while the removal was committed).
async fn talk_after(alice: &Client, bob: &Client, n: usize) {
    for i in 0..n {
        alice
            .send_to_room("lab", &format!("after-alice-{i} secret-sauce"), &[])
            .await
            .expect("alice sends after the removal");
        bob.send_to_room("lab", &format!("after-bob-{i} secret-sauce"), &[])
            .await
            .expect("bob sends after the removal");
    }
    for (who, from) in [(alice, "bob"), (bob, "alice")] {
        tokio::time::timeout(WAIT, async {
            loop {
                let got = texts(who, "lab").await;
                let have = (0..n)
                    .filter(|i| got.contains(&format!("after-{from}-{i} secret-sauce")))
                    .count();
                if have == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("every message from {from} arrives"));
    }
}

/// A device removed while online (its connection, and Bob's, through the test kit's relay with
/// delay and jitter): it is disconnected at once, cannot publish itself again, and its state
/// directory opens nothing sent after the removal, while Alice's other device and Bob go on
/// talking without losing a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_reads_nothing_sent_after_and_the_others_go_on_through_the_relay() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let (a_state, b_state, l_state) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
        tempfile::tempdir().expect("l"),
    );
    let jitter = |seed| {
        let mut c = common::relay::RelayConfig::delay_ms(3.0, seed);
        c.jitter = Duration::from_millis(6);
        c
    };
    let (alice, mut a_ev) = connect(&srv, "alice", a_state.path()).await;
    let b_relay = common::relay::Relay::start(srv.addr, jitter(7));
    let mut opts = common::options(&srv, "bob", b_state.path(), WAIT);
    opts.server = b_relay.addr();
    let (bob, events, _) = Client::connect(opts).await.expect("bob via the relay");
    let mut b_ev = bob
        .enable_e2ee(events, b_state.path(), common::PASSWORD)
        .await
        .expect("e2ee on");
    // Bob's events are read (the checks below look at his history).
    tokio::spawn(async move { while b_ev.recv().await.is_some() {} });
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.join("lab", None).await.expect("bob joins");
    for i in 0..4 {
        bob.send_to_room("lab", &format!("before-{i}"), &[])
            .await
            .expect("send");
    }
    alice
        .send_to_room("lab", "early-from-alice", &[])
        .await
        .expect("send");

    // Alice's laptop, through its own relay: approved, it has the history and reads along.
    let l_relay = common::relay::Relay::start(srv.addr, jitter(11));
    let mut opts = common::options(&srv, "alice", l_state.path(), WAIT);
    opts.server = l_relay.addr();
    let (laptop, events, _) = Client::connect(opts).await.expect("laptop via the relay");
    let mut l_ev = laptop
        .enable_e2ee(events, l_state.path(), common::PASSWORD)
        .await
        .expect("e2ee on");
    let (laptop_id, _) = id_of(&laptop);
    assert_eq!(wait_for(&mut a_ev, waiting).await.0, laptop_id);
    alice
        .approve_device(&laptop_id, |_, _| {})
        .await
        .expect("approve");
    assert_eq!(wait_for(&mut l_ev, received).await.1, 5);
    bob.send_to_room("lab", "live-before", &[])
        .await
        .expect("send");
    tokio::time::timeout(WAIT, async {
        while !texts(&laptop, "lab")
            .await
            .iter()
            .any(|t| t == "live-before")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the laptop reads along");

    // Alice removes it from her first device: its session ends for good.
    alice
        .remove_device(&laptop_id)
        .await
        .expect("remove the laptop");
    let (reason, message) = wait_for(&mut l_ev, |e| match e {
        ClientEvent::Disconnected {
            reason,
            message,
            reconnecting: false,
        } => Some((*reason, message.clone())),
        _ => None,
    })
    .await;
    assert_eq!(reason, conclave_client::proto::DisconnectReason::Kicked);
    assert!(message.contains("removed"), "{message}");
    // A second removal says there is no such device.
    let again = alice.remove_device(&laptop_id).await.expect_err("gone");
    assert!(matches!(again, ClientError::Server(ref e) if e.code == ErrorCode::NotFound));

    talk_after(&alice, &bob, 5).await;
    laptop.close();
    drop((laptop, l_ev));

    // It cannot sign in as that device again, and what its state holds or could open of the
    // log stops at the removal.
    let via = l_relay.addr();
    let refused = comes_back(&srv, "alice", l_state.path(), &via).await;
    assert!(refused.contains("removed"), "{refused}");
    let opened = what_the_state_opens(&srv, l_state.path(), &via, "lab").await;
    assert!(
        opened.iter().all(|t| !t.contains("after-")),
        "the removed device opened {opened:?}"
    );
    let kept = local_texts(l_state.path(), &via, "r:lab");
    assert!(kept.iter().any(|t| t == "live-before"), "{kept:?}");
    assert!(kept.iter().all(|t| !t.contains("after-")), "{kept:?}");
    assert!(grep_dir(l_state.path(), b"secret-sauce").is_empty());
    // The account's device list no longer has it (a new device accepts no history it signs).
    let listed = match alice
        .request(Request::E2eeDevices {
            user: "alice".into(),
        })
        .await
        .expect("devices")
    {
        conclave_client::proto::Reply::E2eeDevices(d) => d,
        other => panic!("unexpected {other:?}"),
    };
    assert!(listed.iter().all(|d| d.device != laptop_id));
    drop((alice, bob));
    srv.stop(WAIT).await;
}

/// A device removed while it is offline: when it comes back it is refused, and its state opens
/// what was sent before the removal (it had those keys) but nothing sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_removed_while_offline_opens_nothing_sent_after_the_removal() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev, bob, _b_ev) =
        history_of_two(&srv, states[0].path(), states[1].path(), 2).await;
    let (laptop, mut l_ev) = connect(&srv, "alice", states[2].path()).await;
    let (laptop_id, _) = id_of(&laptop);
    assert_eq!(wait_for(&mut a_ev, waiting).await.0, laptop_id);
    alice
        .approve_device(&laptop_id, |_, _| {})
        .await
        .expect("approve");
    wait_for(&mut l_ev, received).await;
    laptop.close();
    drop((laptop, l_ev));

    bob.send_to_room("lab", "while-away", &[])
        .await
        .expect("send");
    alice
        .remove_device(&laptop_id)
        .await
        .expect("remove it while it is away");
    talk_after(&alice, &bob, 3).await;

    let server = srv.addr.to_string();
    let refused = comes_back(&srv, "alice", states[2].path(), &server).await;
    assert!(refused.contains("removed"), "{refused}");
    let opened = what_the_state_opens(&srv, states[2].path(), &server, "lab").await;
    assert!(
        opened.iter().any(|t| t == "while-away"),
        "what was sent before the removal still opens with its keys: {opened:?}"
    );
    assert!(
        opened.iter().all(|t| !t.contains("after-")),
        "the removed device opened {opened:?}"
    );
    drop((alice, bob));
    srv.stop(WAIT).await;
}
