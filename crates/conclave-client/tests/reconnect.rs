//! History that is never lost, end to end: the client library and the JSON client against the
//! real server (in-process, real TLS, real SQLite in a temporary directory), including a
//! server that stops and starts again on the same port while messages flow.
//!
//! Every wait is bounded by a timeout and every loop by a count.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users, full_history};
use conclave_client::json::{self, JsonOptions};
use conclave_client::proto::{
    Body, Conv, ConvRef, DisconnectReason, Event, Message, Reply, Request, Target,
};
use conclave_client::{Client, ClientError, ClientEvent, ConnectOptions, Events, Reconnect};
use conclave_server::Config;
use conclave_server::store::NewMessage;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &Path) -> Config {
    Config::new(dir)
}

fn options(srv: &TestServer, user: &str, state: &Path) -> ConnectOptions {
    let mut opts = common::options(srv, user, state, WAIT);
    opts.ack_interval = Duration::from_millis(50);
    opts.reconnect = Reconnect {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(400),
        max_attempts: Some(100),
        give_up_after: WAIT,
    };
    opts
}

async fn connect(opts: ConnectOptions) -> (Client, Events) {
    let (client, events, _session) = tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("connect");
    (client, events)
}

async fn next_event(events: &mut Events) -> ClientEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("events go on")
}

/// Events until (and including) the first that matches; at most `max`.
async fn events_until(
    events: &mut Events,
    max: usize,
    done: impl Fn(&ClientEvent) -> bool,
) -> Vec<ClientEvent> {
    let mut got = Vec::new();
    for _ in 0..max {
        let e = next_event(events).await;
        let stop = done(&e);
        got.push(e);
        if stop {
            return got;
        }
    }
    panic!("no matching event within {max}: {got:#?}");
}

fn messages(events: &[ClientEvent]) -> Vec<&Message> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Server(Event::Message(m)) => Some(m),
            _ => None,
        })
        .collect()
}

fn is_caught_up(e: &ClientEvent) -> bool {
    matches!(e, ClientEvent::Server(Event::CaughtUp { .. }))
}

/// Proves no message is left to come: a round trip, a moment, then no message event waiting
/// (presence changes may be).
async fn assert_quiet(client: &Client, events: &mut Events) {
    client.ping().await.expect("ping");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rest = Vec::new();
    // Bounded by the event queue.
    while let Some(e) = events.try_recv() {
        rest.push(e);
    }
    assert!(
        rest.iter()
            .all(|e| matches!(e, ClientEvent::Server(Event::Presence { .. }))),
        "{rest:#?}"
    );
}

fn is_presence(e: &ClientEvent) -> bool {
    matches!(e, ClientEvent::Server(Event::Presence { .. }))
}

fn room_send(text: &str, key: Option<String>) -> Request {
    Request::Send {
        target: Target::Room {
            room: "general".into(),
            except: vec![],
        },
        body: Body::text(text),
        idempotency_key: key,
        refs: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_are_delivered_once_to_a_fresh_client() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), |_| {}).await;
    let state = tempfile::tempdir().expect("state");

    // Bob is offline; alice writes to him and to the room.
    let (alice, _alice_events) = connect(options(&srv, "alice", state.path())).await;
    let dm = alice
        .send_to_users(&["bob".to_string()], "are you there?")
        .await
        .expect("dm");
    let room = alice
        .send_to_room("general", "hello room", &[])
        .await
        .expect("room message");
    assert!(!dm.duplicate && !room.duplicate);

    // A fresh client (no cursors, like a new process) gets both, once.
    let (bob, mut bob_events) = connect(options(&srv, "bob", state.path())).await;
    let got = events_until(&mut bob_events, 10, is_caught_up).await;
    let mut texts: Vec<(&str, u64, &str)> = messages(&got)
        .iter()
        .map(|m| (m.body.as_text().unwrap(), m.seq, m.msg_id.as_str()))
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        vec![
            ("are you there?", dm.seq, dm.msg_id.as_str()),
            ("hello room", room.seq, room.msg_id.as_str()),
        ]
    );
    assert_eq!(
        got.last(),
        Some(&ClientEvent::Server(Event::CaughtUp {
            count: 2,
            truncated: false
        }))
    );
    assert_quiet(&bob, &mut bob_events).await;
    let dm_conv = Conv::Direct(vec!["alice".into(), "bob".into()]);
    let mut cursors = bob.cursors();
    cursors.sort_by(|a, b| a.conv.cmp(&b.conv));
    assert_eq!(
        cursors
            .iter()
            .map(|c| (c.conv.clone(), c.seq))
            .collect::<Vec<_>>(),
        vec![(Conv::Room("general".into()), room.seq), (dm_conv, dm.seq)]
    );
    // Quitting acknowledges what was received: the next fresh client gets nothing again.
    bob.quit().await.expect("quit");
    let (bob, mut bob_events) = connect(options(&srv, "bob", state.path())).await;
    assert_eq!(
        next_event(&mut bob_events).await,
        ClientEvent::Server(Event::CaughtUp {
            count: 0,
            truncated: false
        })
    );

    // The periodic acknowledgement (no quit) does the same.
    let later = alice
        .send_to_room("general", "one more", &[])
        .await
        .expect("send");
    match next_event(&mut bob_events).await {
        ClientEvent::Server(Event::Message(m)) => assert_eq!(m.msg_id, later.msg_id),
        other => panic!("{other:?}"),
    }
    // Bounded wait for the ack (sent every 50 ms) to be recorded.
    let mut acknowledged = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (probe, mut probe_events) = connect(options(&srv, "bob", state.path())).await;
        let first = next_event(&mut probe_events).await;
        probe.close();
        if matches!(first, ClientEvent::Server(Event::CaughtUp { count: 0, .. })) {
            acknowledged = true;
            break;
        }
    }
    assert!(acknowledged, "the periodic ack was never recorded");
    bob.close();
    alice.quit().await.expect("alice quits");
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_stream_loses_nothing_and_repeats_nothing() {
    restart_mid_stream(None).await;
}

/// The same through the test kit's relay, which delays every byte each way (with jitter of
/// half the delay): replies, events and the reconnect's catch-up cross each other as they
/// would on a real network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_stream_through_a_relay_of_half_a_millisecond() {
    restart_mid_stream(Some(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_stream_through_a_relay_of_5_ms() {
    restart_mid_stream(Some(5_000)).await;
}

/// Slow (50 ms one way): `cargo test -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn a_server_restart_mid_stream_through_a_relay_of_50_ms() {
    restart_mid_stream(Some(50_000)).await;
}

async fn restart_mid_stream(delay_us: Option<u64>) {
    const N: usize = 200;
    const IN_FLIGHT: usize = 8;
    const BURST_AT: usize = 100;
    const BURST: usize = 24;

    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), |_| {}).await;
    let addr = srv.addr;
    let relay = delay_us.map(|us| {
        common::relay::Relay::start(
            addr,
            common::relay::RelayConfig::delay_ms(us as f64 / 1000.0, us),
        )
    });
    let via = |mut o: ConnectOptions| {
        if let Some(r) = &relay {
            o.server = r.addr().to_string();
        }
        o
    };
    let state = tempfile::tempdir().expect("state");
    let (bob, mut bob_events) = connect(via(options(&srv, "bob", state.path()))).await;
    let (alice, mut alice_events) = connect(via(options(&srv, "alice", state.path()))).await;
    events_until(&mut bob_events, 10, is_caught_up).await;
    events_until(&mut alice_events, 10, is_caught_up).await;

    // Alice streams N messages, a few in flight at a time, each with its own key. Halfway
    // she sends a burst without waiting, and the server stops right after it: those are in
    // flight at the cut (unread, or stored with the reply lost).
    let (burst_tx, burst_rx) = tokio::sync::oneshot::channel();
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut burst_tx = Some(burst_tx);
            let mut in_flight = VecDeque::new();
            let mut receipts: Vec<(usize, Result<Reply, ClientError>)> = Vec::new();
            for i in 0..N {
                let req = room_send(&format!("msg {i:03}"), Some(format!("key-{i}")));
                let pending = alice.submit(req).await.expect("submit");
                in_flight.push_back((i, pending));
                let bursting = (BURST_AT..BURST_AT + BURST).contains(&i);
                if i == BURST_AT + BURST - 1
                    && let Some(tx) = burst_tx.take()
                {
                    let _ = tx.send(());
                }
                while !bursting && in_flight.len() >= IN_FLIGHT {
                    let Some((i, p)) = in_flight.pop_front() else {
                        break;
                    };
                    receipts.push((i, p.reply().await));
                }
                if !bursting && i % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            while let Some((i, p)) = in_flight.pop_front() {
                receipts.push((i, p.reply().await));
            }
            receipts
        })
    };

    // Bob reads everything, in the background.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        // Bounded: N messages plus a few connection events.
        for _ in 0..N + 50 {
            if messages(&got).len() == N
                && got
                    .iter()
                    .any(|e| matches!(e, ClientEvent::Reconnected { .. }))
            {
                break;
            }
            match tokio::time::timeout(WAIT, bob_events.recv()).await {
                Ok(Some(e)) => got.push(e),
                _ => break,
            }
        }
        (got, bob_events)
    });

    // Cut right after the burst.
    tokio::time::timeout(WAIT, burst_rx)
        .await
        .expect("the stream reaches the burst")
        .expect("burst signal");
    let dir = srv.stop(WAIT).await;
    // Down for a moment: the clients' first attempts are refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let srv = TestServer::start(dir, addr, |_| {}).await;
    assert_eq!(srv.addr, addr);

    let receipts = tokio::time::timeout(WAIT * 2, sender)
        .await
        .expect("all sends answered in time")
        .expect("sender");
    let (got, mut bob_events) = tokio::time::timeout(WAIT * 2, reader)
        .await
        .expect("bob reads in time")
        .expect("reader");

    // Every send succeeded exactly once, whatever the cut did to it.
    let mut by_seq: HashMap<u64, (usize, String)> = HashMap::new();
    let mut duplicates = HashSet::new();
    for (i, result) in &receipts {
        match result {
            Ok(Reply::Sent {
                msg_id,
                seq,
                duplicate,
                ..
            }) => {
                assert!(
                    by_seq.insert(*seq, (*i, msg_id.clone())).is_none(),
                    "seq {seq} twice"
                );
                if *duplicate {
                    duplicates.insert(msg_id.clone());
                }
            }
            other => panic!("send {i}: {other:?}"),
        }
    }
    assert_eq!(by_seq.len(), N);
    eprintln!(
        "{} sends were answered as duplicates after the reconnect",
        duplicates.len()
    );

    // The room's history holds each message once, in order, with the receipts' ids.
    let history = full_history(&bob, ConvRef::Room("general".into())).await;
    assert_eq!(history.len(), N, "each send stored exactly once");
    for (k, m) in history.iter().enumerate() {
        assert_eq!(m.seq, k as u64 + 1);
        assert_eq!(m.body.as_text(), Some(format!("msg {k:03}").as_str()));
        assert_eq!(by_seq[&m.seq], (k, m.msg_id.clone()));
    }

    // Bob got every message exactly once, in order, around one disconnect and reconnect.
    let bob_messages = messages(&got);
    let seqs: Vec<u64> = bob_messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>());
    for (m, h) in bob_messages.iter().zip(&history) {
        assert_eq!(m.msg_id, h.msg_id);
    }
    let kinds: Vec<&str> = got
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Disconnected {
                reason,
                reconnecting,
                ..
            } => {
                assert_eq!(*reason, DisconnectReason::Shutdown);
                assert!(*reconnecting);
                Some("disconnected")
            }
            ClientEvent::Reconnected { truncated, .. } => {
                assert!(!truncated);
                Some("reconnected")
            }
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["disconnected", "reconnected"]);
    assert_quiet(&bob, &mut bob_events).await;

    // Alice gets none of her own messages: the catch-up's copies of the sends that were
    // stored but unanswered at the cut are recognised by their receipts.
    let mut alice_got = events_until(&mut alice_events, 10, |e| {
        matches!(e, ClientEvent::Reconnected { .. })
    })
    .await;
    alice_got.retain(|e| !is_presence(e));
    // Straight on loopback the server's goodbye always arrives; through the relay the
    // server's reset (it closes with unread sends) can overtake it, as on a real network.
    assert!(
        matches!(
            alice_got[..],
            [
                ClientEvent::Disconnected {
                    reason,
                    reconnecting: true,
                    ..
                },
                ClientEvent::Reconnected {
                    missed: 0,
                    truncated: false,
                    ..
                }
            ] if reason == DisconnectReason::Shutdown || relay.is_some()
        ),
        "{alice_got:#?}"
    );
    assert_quiet(&alice, &mut alice_events).await;
    assert!(alice.is_connected() && bob.is_connected());
    alice.quit().await.expect("alice quits");
    bob.quit().await.expect("bob quits");
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_on_reconnect_ends_the_session() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), |_| {}).await;
    let addr = srv.addr;
    let state = tempfile::tempdir().expect("state");
    let (bob, mut events) = connect(options(&srv, "bob", state.path())).await;
    events_until(&mut events, 10, is_caught_up).await;

    let dir = srv.stop(WAIT).await;
    // While the server is down, bob's password changes.
    {
        let mut db = conclave_server::server::open_db(&config(dir.path())).expect("db");
        let hash = conclave_server::accounts::hash_password("a new password!").expect("hash");
        assert!(db.set_password("bob", &hash).expect("set password"));
    }
    let srv = TestServer::start(dir, addr, |_| {}).await;

    let got = events_until(&mut events, 10, |e| {
        matches!(
            e,
            ClientEvent::Disconnected {
                reconnecting: false,
                ..
            }
        )
    })
    .await;
    assert!(matches!(
        got[0],
        ClientEvent::Disconnected {
            reason: DisconnectReason::Shutdown,
            reconnecting: true,
            ..
        }
    ));
    match got.last() {
        Some(ClientEvent::Disconnected { message, .. }) => {
            assert!(message.contains("wrong user name or password"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("end"),
        None
    );
    assert!(bob.is_closed());
    assert!(matches!(
        bob.ping().await,
        Err(ClientError::Disconnected { .. })
    ));
    srv.stop(WAIT).await;
}

/// Lines of the JSON client's stdout, one at a time.
struct Lines {
    lines: tokio::io::Lines<BufReader<tokio::io::DuplexStream>>,
}

impl Lines {
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("a line in time")
            .expect("stdout readable")
            .expect("a line, not the end");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_client_reports_disconnected_then_reconnected_and_fails_only_at_the_end() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), |_| {}).await;
    let addr = srv.addr;
    let state = tempfile::tempdir().expect("state");

    let mut opts = options(&srv, "bob", state.path());
    opts.reconnect.max_attempts = Some(3);
    let (mut stdin_w, stdin_r) = tokio::io::duplex(64 * 1024);
    let (stdout_w, stdout_r) = tokio::io::duplex(64 * 1024);
    let client = tokio::spawn(json::run(
        JsonOptions::new(opts),
        BufReader::new(stdin_r),
        stdout_w,
    ));
    let mut out = Lines {
        lines: BufReader::new(stdout_r).lines(),
    };
    assert_eq!(out.next().await["event"], "connected");
    assert_eq!(
        out.next().await,
        json!({"event":"caught_up","count":0,"truncated":false})
    );

    // The server stops; while it is down a message is stored for bob (as if written just
    // before), and it starts again on the same port.
    let dir = srv.stop(WAIT).await;
    let line = out.next().await;
    assert_eq!(line["event"], "disconnected");
    assert_eq!(line["reason"], "shutdown");
    assert_eq!(line["reconnecting"], true);
    assert!(line["message"].is_string());
    {
        let mut db = conclave_server::server::open_db(&config(dir.path())).expect("db");
        db.append_batch(&[NewMessage {
            conv: Conv::Room("general".into()),
            from: "alice".into(),
            body: Body::text("while you were away"),
            except: vec![],
            idempotency_key: None,
            refs: None,
        }])
        .expect("append");
    }
    let srv = TestServer::start(dir, addr, |_| {}).await;
    let line = out.next().await;
    assert_eq!(line["event"], "message");
    assert_eq!(line["text"], "while you were away");
    assert_eq!(
        out.next().await,
        json!({"event":"reconnected","missed":1,"truncated":false,"server":addr.to_string()})
    );

    // Commands work on the new connection, search included.
    stdin_w
        .write_all(b"{\"cmd\":\"search\",\"query\":\"away\",\"room\":\"general\",\"id\":1}\n")
        .await
        .expect("stdin");
    let reply = out.next().await;
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["results"][0]["text"], "while you were away");

    // Stopped for good: the attempts run out, the client says so and fails.
    srv.stop(WAIT).await;
    let line = out.next().await;
    assert_eq!(line["event"], "disconnected");
    assert_eq!(line["reconnecting"], true);
    let line = out.next().await;
    assert_eq!(line["event"], "disconnected");
    assert_eq!(line["reason"], "shutdown");
    assert_eq!(line["reconnecting"], false);
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("gave up reconnecting after 3 attempt(s)")),
        "{line}"
    );
    let result = tokio::time::timeout(WAIT, client)
        .await
        .expect("the JSON client ends")
        .expect("task");
    assert!(
        matches!(
            result,
            Err(ClientError::Disconnected {
                reason: DisconnectReason::Shutdown,
                ..
            })
        ),
        "{result:?}"
    );
    drop(stdin_w);
}
