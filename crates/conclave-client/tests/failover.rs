//! Several `--server` addresses: the client library against the real server (in-process, real
//! TLS, real SQLite) behind the test kit's TCP relays, each relay standing for a node of a
//! cluster. A relay that dies under a steady stream of messages moves the client to the next
//! address, and the client ends with every message exactly once, in order per conversation.
//!
//! Every wait is bounded by a timeout and every loop by a count.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::relay::{Relay, RelayConfig, Rng};
use common::{TestServer, add_users, full_history};
use conclave_client::proto::{Body, Conv, ConvRef, Event, Message, Reply, Request, Target};
use conclave_client::trust::{KnownServers, TrustError};
use conclave_client::{Client, ClientError, ClientEvent, ConnectOptions, Events, Reconnect, Trust};

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(20);

fn options(srv: &TestServer, user: &str, state: &std::path::Path, servers: &str) -> ConnectOptions {
    let mut opts = common::options(srv, user, state, WAIT);
    opts.server = servers.to_string();
    opts.ack_interval = Duration::from_millis(50);
    opts.reconnect = Reconnect {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(400),
        max_attempts: Some(200),
        give_up_after: WAIT,
    };
    opts
}

async fn connect(opts: ConnectOptions) -> (Client, Events, conclave_client::Session) {
    tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn caught_up(events: &mut Events) {
    for _ in 0..20 {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("an event in time")
            .expect("events go on");
        if matches!(e, ClientEvent::Server(Event::CaughtUp { .. })) {
            return;
        }
    }
    panic!("no caught_up");
}

/// The streams send faster than the default request rate per connection allows.
fn fast(c: &mut conclave_server::Config) {
    c.limits.requests_per_second = 100_000;
}

/// A loopback port nothing listens on (bound, then released).
fn dead_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    drop(l);
    addr
}

fn room_send(text: &str, key: String) -> Request {
    Request::Send {
        target: Target::Room {
            room: "general".into(),
            except: vec![],
        },
        body: Body::text(text),
        idempotency_key: Some(key),
        refs: None,
    }
}

fn dm_send(to: &str, text: &str, key: String) -> Request {
    Request::Send {
        target: Target::Users {
            to: vec![to.into()],
        },
        body: Body::text(text),
        idempotency_key: Some(key),
        refs: None,
    }
}

/// Sends `n` messages from `client`, a few in flight at a time, alternating between the room
/// and a direct message to `to` when `to` is given; returns each send's result, in order.
fn stream(
    client: Client,
    who: &'static str,
    to: Option<&'static str>,
    n: usize,
    pause: Duration,
    progress: tokio::sync::watch::Sender<usize>,
) -> tokio::task::JoinHandle<Vec<(String, Result<Reply, ClientError>)>> {
    const IN_FLIGHT: usize = 4;
    tokio::spawn(async move {
        let mut in_flight = std::collections::VecDeque::new();
        let mut results = Vec::new();
        for i in 0..n {
            let text = format!("{who} {i:04}");
            let key = format!("{who}-key-{i}");
            let req = match to {
                Some(to) if i % 2 == 1 => dm_send(to, &text, key),
                _ => room_send(&text, key),
            };
            let pending = client.submit(req).await.expect("submit");
            in_flight.push_back((text, pending));
            while in_flight.len() >= IN_FLIGHT {
                let Some((text, p)) = in_flight.pop_front() else {
                    break;
                };
                results.push((text, p.reply().await));
            }
            progress.send_replace(i + 1);
            tokio::time::sleep(pause).await;
        }
        while let Some((text, p)) = in_flight.pop_front() {
            results.push((text, p.reply().await));
        }
        results
    })
}

/// Every send succeeded, and no two share a (conversation, seq).
fn check_receipts(results: &[(String, Result<Reply, ClientError>)]) -> HashMap<String, u64> {
    let mut seqs = HashMap::new();
    for (text, r) in results {
        match r {
            Ok(Reply::Sent { seq, .. }) => {
                assert!(seqs.insert(text.clone(), *seq).is_none(), "{text} twice");
            }
            other => panic!("send {text:?}: {other:?}"),
        }
    }
    seqs
}

/// What a reader collected: its messages in order, and the addresses it reconnected to.
struct Seen {
    messages: Vec<Message>,
    reconnected_to: Vec<String>,
}

/// Reads events until `expected` messages arrived and the last reconnect is done (bounded by
/// count and time).
fn read_all(mut events: Events, expected: usize) -> tokio::task::JoinHandle<(Seen, Events)> {
    tokio::spawn(async move {
        let mut seen = Seen {
            messages: Vec::new(),
            reconnected_to: Vec::new(),
        };
        let mut reconnecting = false;
        for _ in 0..expected * 4 + 200 {
            if seen.messages.len() >= expected && !reconnecting {
                break;
            }
            match tokio::time::timeout(WAIT, events.recv()).await {
                Ok(Some(ClientEvent::Server(Event::Message(m)))) => seen.messages.push(m),
                Ok(Some(ClientEvent::Disconnected {
                    reconnecting: true, ..
                })) => reconnecting = true,
                Ok(Some(ClientEvent::Disconnected { message, .. })) => {
                    panic!("the session ended: {message}")
                }
                Ok(Some(ClientEvent::Reconnected { server, .. })) => {
                    reconnecting = false;
                    seen.reconnected_to.push(server);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        (seen, events)
    })
}

/// The messages of `seen` from `from`, per conversation: sequence numbers strictly rising
/// (in order, none twice) and every one of `sent` (text → seq) there exactly once.
fn check_delivery(seen: &[Message], from: &str, sent: &HashMap<String, u64>) {
    let mut last: HashMap<Conv, u64> = HashMap::new();
    let mut texts = HashSet::new();
    for m in seen.iter().filter(|m| m.from == from) {
        if let Some(prev) = last.insert(m.conv.clone(), m.seq) {
            assert!(m.seq > prev, "{:?}: seq {} after {prev}", m.conv, m.seq);
        }
        let text = m.body.as_text().expect("text").to_string();
        assert_eq!(sent.get(&text), Some(&m.seq), "{text}");
        assert!(texts.insert(text.clone()), "{text} delivered twice");
    }
    assert_eq!(
        texts.len(),
        sent.len(),
        "every message from {from} delivered"
    );
}

/// The room's history holds every send of `sent` once, with its receipt's seq, and nothing
/// else.
async fn check_history(client: &Client, sent: &[&HashMap<String, u64>]) {
    let history = full_history(client, ConvRef::Room("general".into())).await;
    let room_sends: usize = sent
        .iter()
        .map(|s| s.keys().filter(|t| !is_dm_text(t)).count())
        .sum();
    assert_eq!(history.len(), room_sends, "each room send stored once");
    for (k, m) in history.iter().enumerate() {
        assert_eq!(m.seq, k as u64 + 1);
        let text = m.body.as_text().expect("text");
        assert!(sent.iter().any(|s| s.get(text) == Some(&m.seq)), "{text}");
    }
}

/// Stream texts of odd numbers from alice are her direct messages (see [`stream`]).
fn is_dm_text(text: &str) -> bool {
    text.starts_with("alice ")
        && text
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n % 2 == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_under_a_stream_moves_the_client_to_the_next_with_nothing_lost_or_twice() {
    const N: usize = 300;
    const BOB_N: usize = 60;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), fast).await;
    let relay1 = Relay::start(srv.addr, RelayConfig::delay_ms(0.5, 1));
    let relay2 = Relay::start(srv.addr, RelayConfig::delay_ms(0.5, 2));
    let list = format!("{},{}", relay1.addr(), relay2.addr());
    let state = tempfile::tempdir().expect("state");

    // Bob through the relays; alice straight to the server, streaming to the room and to bob.
    let (bob, mut bob_events, session) = connect(options(&srv, "bob", state.path(), &list)).await;
    assert_eq!(session.server, relay1.addr(), "the first address first");
    assert_eq!(bob.connected_to(), relay1.addr());
    assert_eq!(
        bob.server(),
        relay1.addr(),
        "the list is known by its first address"
    );
    let direct = srv.addr.to_string();
    let (alice, mut alice_events, _) = connect(options(&srv, "alice", state.path(), &direct)).await;
    caught_up(&mut bob_events).await;
    caught_up(&mut alice_events).await;

    // Bob receives alice's N; his own sends come back only as receipts.
    let reader = read_all(bob_events, N);
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0);
    let alice_stream = stream(
        alice.clone(),
        "alice",
        Some("bob"),
        N,
        Duration::from_millis(2),
        progress_tx,
    );
    let (bob_progress, _) = tokio::sync::watch::channel(0);
    let bob_stream = stream(
        bob.clone(),
        "bob",
        None,
        BOB_N,
        Duration::from_millis(8),
        bob_progress,
    );

    // A third of the way in, relay 1 dies: its connections are cut and its port refuses.
    tokio::time::timeout(WAIT, progress.wait_for(|n| *n >= N / 3))
        .await
        .expect("the stream gets going")
        .expect("progress");
    let killed_at = Instant::now();
    drop(relay1);
    eprintln!("relay 1 killed after {} sends", *progress.borrow());

    let alice_results = tokio::time::timeout(WAIT * 2, alice_stream)
        .await
        .expect("alice's sends answered in time")
        .expect("alice's stream");
    let bob_results = tokio::time::timeout(WAIT * 2, bob_stream)
        .await
        .expect("bob's sends answered in time")
        .expect("bob's stream");
    let (seen, mut bob_events) = tokio::time::timeout(WAIT * 2, reader)
        .await
        .expect("bob reads in time")
        .expect("reader");
    eprintln!(
        "all answered and read {:?} after the kill",
        killed_at.elapsed()
    );

    let alice_sent = check_receipts(&alice_results);
    let bob_sent = check_receipts(&bob_results);
    assert_eq!((alice_sent.len(), bob_sent.len()), (N, BOB_N));
    assert_eq!(
        seen.reconnected_to,
        [relay2.addr()],
        "moved to relay 2, once"
    );
    assert_eq!(bob.connected_to(), relay2.addr());
    assert!(relay2.accepted() >= 1);
    // Everything alice sent reached bob once, in order per conversation (room and direct);
    // none of bob's own sends came back to him.
    check_delivery(&seen.messages, "alice", &alice_sent);
    assert!(seen.messages.iter().all(|m| m.from == "alice"));
    assert_eq!(seen.messages.len(), N);
    check_history(&bob, &[&alice_sent, &bob_sent]).await;
    // Nothing more is on its way.
    bob.ping().await.expect("ping");
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..1000 {
        match bob_events.try_recv() {
            Some(ClientEvent::Server(Event::Message(m))) => panic!("late message {m:?}"),
            Some(_) => {}
            None => break,
        }
    }
    alice.quit().await.expect("alice quits");
    bob.quit().await.expect("bob quits");
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_address_connects_to_the_second_and_pins_under_the_first() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), fast).await;
    let dead = dead_port();
    let state = tempfile::tempdir().expect("state");
    let list = format!("{dead},{}", srv.addr);

    let mut opts = options(&srv, "bob", state.path(), &list);
    opts.trust = Trust::TrustOnFirstUse;
    let started = Instant::now();
    let (bob, mut events, session) = connect(opts).await;
    assert!(started.elapsed() < WAIT);
    assert_eq!(session.server, srv.addr.to_string());
    assert_eq!(bob.connected_to(), srv.addr.to_string());
    caught_up(&mut events).await;
    // The certificate is pinned under the list's first address, for every address of it.
    let known = KnownServers::load(&KnownServers::path_in(state.path())).expect("known");
    assert_eq!(
        known.find(&dead).map(|k| k.fingerprint.as_str()),
        Some(srv.fingerprint.as_str())
    );
    assert!(known.find(&srv.addr.to_string()).is_none());
    bob.quit().await.expect("quit");

    // The next start needs no flag: the pin (kept under the first address) is used.
    let mut opts = options(&srv, "bob", state.path(), &list);
    opts.trust = Trust::PinnedOnly;
    let (bob, _events, session) = connect(opts).await;
    assert_eq!(session.trust.as_str(), "known");
    bob.quit().await.expect("quit");
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_certificate_is_refused_loudly_and_named() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), fast).await;
    // Another server with its own TLS identity (not a node of this cluster).
    let other_dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(other_dir.path(), &["bob"]);
    let other = TestServer::start(other_dir, "127.0.0.1:0".parse().unwrap(), fast).await;
    assert_ne!(srv.fingerprint, other.fingerprint);
    let state = tempfile::tempdir().expect("state");
    let dead = dead_port();

    // The pin is srv's; the first address is dead, the second presents another certificate:
    // refused (the third, srv itself, is not tried: a mismatch is a warning, not an outage).
    let list = format!("{dead},{},{}", other.addr, srv.addr);
    let opts = options(&srv, "bob", state.path(), &list);
    let err = match tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("in time")
    {
        Err(e) => e,
        Ok(_) => panic!("connected to a server with another certificate"),
    };
    let text = err.to_string();
    assert!(
        matches!(err, ClientError::Trust(TrustError::Mismatch { .. })),
        "{err:?}"
    );
    assert!(text.contains("IS NOT THE EXPECTED ONE"), "{text}");
    assert!(
        text.contains(&other.addr.to_string()),
        "names the address: {text}"
    );
    other.stop(WAIT).await;
    srv.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_dead_is_one_clear_error_in_bounded_time() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), fast).await;
    let state = tempfile::tempdir().expect("state");
    let refused = dead_port();
    // A listener that never accepts: TCP connects (the backlog), TLS never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();

    let mut opts = options(
        &srv,
        "bob",
        state.path(),
        &format!("{refused},{silent_addr}"),
    );
    opts.connect_timeout = Duration::from_secs(1);
    opts.handshake_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = match tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("gives up in time")
    {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    let took = started.elapsed();
    let text = err.to_string();
    assert!(matches!(err, ClientError::NoServer { .. }), "{err:?}");
    assert_eq!(err.code(), "connect");
    assert!(
        text.starts_with("could not connect to any of the 2 addresses in --server: "),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "could not connect to {refused}: connection refused"
        )),
        "{text}"
    );
    assert!(text.contains(&silent_addr), "{text}");
    assert!(
        text.contains("did not finish the TLS handshake within 1 s"),
        "{text}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(silent);
    srv.stop(WAIT).await;
}

/// The seeds of [`seeded_relay_deaths_and_cuts_lose_nothing`]: `FAILOVER_SEEDS=1,2,3` to
/// choose (a failure prints its seed).
fn seeds() -> Vec<u64> {
    match std::env::var("FAILOVER_SEEDS") {
        Ok(list) => list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .take(100)
            .collect(),
        Err(_) => vec![11, 12, 13],
    }
}

/// Three relays; for each seed a plan of when (after how many sends) which relay dies for
/// good and which one's connections are cut, two deaths and one cut per run, so the client
/// wraps around the list past dead addresses. At the end bob has every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_relay_deaths_and_cuts_lose_nothing() {
    const N: usize = 160;
    for seed in seeds() {
        eprintln!("seed {seed}");
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        add_users(dir.path(), &["alice", "bob"]);
        let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), fast).await;
        let mut relays: Vec<Option<Relay>> = (0..3)
            .map(|i| {
                Some(Relay::start(
                    srv.addr,
                    RelayConfig::delay_ms(0.3, seed * 10 + i),
                ))
            })
            .collect();
        let addrs: Vec<String> = relays
            .iter()
            .map(|r| r.as_ref().map(|r| r.addr()).unwrap_or_default())
            .collect();
        let state = tempfile::tempdir().expect("state");
        let (bob, mut bob_events, _) =
            connect(options(&srv, "bob", state.path(), &addrs.join(","))).await;
        let (alice, mut alice_events, _) =
            connect(options(&srv, "alice", state.path(), &srv.addr.to_string())).await;
        caught_up(&mut bob_events).await;
        caught_up(&mut alice_events).await;

        // The plan: at three distinct points, two relays die (in a random order) and the
        // survivor's connections are cut once.
        let mut rng = Rng::new(seed);
        let mut order = [0usize, 1, 2];
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut points: Vec<usize> = Vec::new();
        for _ in 0..100 {
            if points.len() == 3 {
                break;
            }
            let p = 10 + rng.below((N - 30) as u64) as usize;
            if points.iter().all(|q| p.abs_diff(*q) >= 15) {
                points.push(p);
            }
        }
        points.sort();
        assert_eq!(points.len(), 3, "seed {seed}: no plan");
        let cut_at = rng.below(3) as usize;
        let mut plan: Vec<(usize, usize, bool)> = Vec::new(); // (after sends, relay, dies)
        let mut dying = order[..2].iter();
        for (k, p) in points.iter().enumerate() {
            if k == cut_at {
                plan.push((*p, order[2], false));
            } else if let Some(r) = dying.next() {
                plan.push((*p, *r, true));
            }
        }
        eprintln!("seed {seed}: plan (after sends, relay, dies) {plan:?}");

        let reader = read_all(bob_events, N);
        let (progress_tx, mut progress) = tokio::sync::watch::channel(0);
        let alice_stream = stream(
            alice.clone(),
            "alice",
            Some("bob"),
            N,
            Duration::from_millis(2),
            progress_tx,
        );
        for (after, relay, dies) in &plan {
            tokio::time::timeout(WAIT, progress.wait_for(|n| *n >= *after))
                .await
                .expect("the stream goes on")
                .expect("progress");
            if *dies {
                drop(relays[*relay].take());
            } else if let Some(r) = &relays[*relay] {
                r.cut_all();
            }
        }
        let results = tokio::time::timeout(WAIT * 2, alice_stream)
            .await
            .expect("alice's sends answered in time")
            .expect("alice's stream");
        let (seen, _events) = tokio::time::timeout(WAIT * 2, reader)
            .await
            .expect("bob reads in time")
            .expect("reader");
        let sent = check_receipts(&results);
        assert_eq!(sent.len(), N, "seed {seed}");
        check_delivery(&seen.messages, "alice", &sent);
        assert_eq!(seen.messages.len(), N, "seed {seed}");
        // Bob ends on the survivor, the only address left.
        assert_eq!(bob.connected_to(), addrs[order[2]], "seed {seed}");
        assert!(
            seen.reconnected_to.iter().all(|a| addrs.contains(a)),
            "seed {seed}: {:?}",
            seen.reconnected_to
        );
        eprintln!("seed {seed}: reconnected to {:?}", seen.reconnected_to);
        check_history(&bob, &[&sent]).await;
        alice.quit().await.expect("alice quits");
        bob.quit().await.expect("bob quits");
        srv.stop(WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_gone_after_a_drop_ends_the_session_naming_each() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().unwrap(), fast).await;
    let relay1 = Relay::start(srv.addr, RelayConfig::delay_ms(0.0, 1));
    let relay2 = Relay::start(srv.addr, RelayConfig::delay_ms(0.0, 2));
    let (a1, a2) = (relay1.addr(), relay2.addr());
    let state = tempfile::tempdir().expect("state");
    let mut opts = options(&srv, "bob", state.path(), &format!("{a1},{a2}"));
    opts.reconnect.max_attempts = Some(4);
    let (bob, mut events, _) = connect(opts).await;
    caught_up(&mut events).await;
    let started = Instant::now();
    drop(relay2);
    drop(relay1);
    let mut last = None;
    for _ in 0..20 {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("in time")
        {
            Some(ClientEvent::Disconnected {
                reconnecting: false,
                message,
                ..
            }) => {
                last = Some(message);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    let message = last.expect("a final disconnected event");
    assert!(
        message.contains("gave up reconnecting after 4 attempt(s)"),
        "{message}"
    );
    assert!(message.contains("(last errors: "), "{message}");
    for a in [&a1, &a2] {
        assert!(
            message.contains(&format!("could not connect to {a}: connection refused")),
            "{message}"
        );
    }
    // Four attempts, two rounds of the list: bounded by the policy (25 to 50 ms before each
    // try of the first round, 50 to 100 ms of the second).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(bob.is_closed());
    srv.stop(WAIT).await;
}
