//! A busy room's fan-out, with the real server (in-process, real TLS, real SQLite) and real
//! clients: several senders pipelining their sends, so that one group commit holds many of
//! their messages and the dispatcher fans them out as runs (docs/benchmarks.md, "Fan-out of a
//! group commit's run as one buffer"). Every listener must get every message once, in sequence
//! order without a gap; every sender every other sender's messages the same way and none of
//! its own, and a second connection of a sender's account its messages too. Each case runs
//! straight on loopback and through the test kit's relay (delay with seeded jitter).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::relay::{Relay, RelayConfig};
use common::{TestServer, add_users};
use conclave_client::proto::{Conv, Event};
use conclave_client::{Client, ClientEvent, Events};

const WAIT: Duration = Duration::from_secs(30);
const SENDERS: usize = 4;
/// Messages per sender, sent in bursts of [`BURST`] sends in flight at once.
const PER_SENDER: usize = 60;
const BURST: usize = 20;

/// Reads the room's messages until `want` arrived; returns (seq, text) in arrival order.
async fn read_room(events: &mut Events, want: usize, who: &str) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let done = tokio::time::timeout(WAIT, async {
        while got.len() < want {
            match events.recv().await {
                Some(ClientEvent::Server(Event::Message(m)))
                    if m.conv == Conv::Room("lab".into()) =>
                {
                    let text = m.body.as_text().unwrap_or_default().to_string();
                    got.push((m.seq, text));
                }
                Some(_) => {}
                None => panic!("{who}: the events ended after {} messages", got.len()),
            }
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "{who}: only {} of {want} messages arrived",
        got.len()
    );
    got
}

/// In sequence order, each number once and one more than the one before.
fn check_in_order(got: &[(u64, String)], who: &str) {
    for pair in got.windows(2) {
        assert!(
            pair[1].0 > pair[0].0,
            "{who}: seq {} after {} ({:?} after {:?})",
            pair[1].0,
            pair[0].0,
            pair[1].1,
            pair[0].1
        );
    }
}

async fn busy_room(relayed: Option<u64>) {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let names: Vec<String> = (0..SENDERS)
        .map(|i| format!("sender{i}"))
        .chain(["listener0".to_string(), "listener1".to_string()])
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    add_users(dir.path(), &refs);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |c| {
        c.limits.requests_per_second = 100_000;
        c.limits.request_burst = 100_000;
    })
    .await;
    let relay = relayed.map(|us| {
        Relay::start(
            srv.addr,
            RelayConfig::delay_ms(us as f64 / 1000.0, 0xfa11 ^ us),
        )
    });
    let states: Vec<_> = (0..names.len() + 1)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    // Every other connection through the relay (when there is one), the rest straight.
    let connect = |i: usize, user: &str| {
        let via = match (&relay, i % 2) {
            (Some(r), 0) => r.addr().to_string(),
            _ => srv.addr.to_string(),
        };
        let srv = &srv;
        let state = states[i].path().to_path_buf();
        let user = user.to_string();
        async move { common::connect_via(srv, &via, &user, &state, WAIT).await }
    };
    let mut senders: Vec<(Client, Events)> = Vec::new();
    for (i, name) in names.iter().take(SENDERS).enumerate() {
        senders.push(connect(i, name).await);
    }
    let mut listeners: Vec<(String, Client, Events)> = Vec::new();
    for (i, name) in names.iter().enumerate().skip(SENDERS) {
        let (c, e) = connect(i, name).await;
        listeners.push((name.clone(), c, e));
    }
    // A second connection of sender 0's account: it hears sender 0's messages too.
    let (c, e) = connect(names.len(), &names[0]).await;
    listeners.push(("sender0's second connection".into(), c, e));

    senders[0]
        .0
        .create_room("lab", false, None)
        .await
        .expect("create");
    for (c, _) in senders.iter().skip(1) {
        c.join("lab", None).await.expect("join");
    }
    for (_, c, _) in &listeners[..2] {
        c.join("lab", None).await.expect("join");
    }

    // Every sender at once, each with a burst of sends in flight.
    let sends = senders.iter().enumerate().map(|(s, (c, _))| async move {
        let mut receipts: Vec<(u64, String)> = Vec::new();
        for burst in 0..PER_SENDER / BURST {
            let texts: Vec<String> = (0..BURST)
                .map(|k| format!("s{s}-m{}", burst * BURST + k))
                .collect();
            let replies =
                futures_util::future::join_all(texts.iter().map(|t| c.send_to_room("lab", t, &[])))
                    .await;
            for (t, r) in texts.iter().zip(replies) {
                receipts.push((r.expect("send").seq, t.clone()));
            }
        }
        receipts
    });
    let receipts: Vec<Vec<(u64, String)>> = futures_util::future::join_all(sends).await;
    let seq_of: HashMap<String, u64> = receipts
        .iter()
        .flatten()
        .map(|(seq, t)| (t.clone(), *seq))
        .collect();
    let total = SENDERS * PER_SENDER;
    assert_eq!(seq_of.len(), total, "every send answered once");
    let mut seqs: Vec<u64> = seq_of.values().copied().collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), total, "every message its own number");
    assert_eq!(
        seqs.last().copied().unwrap_or(0) - seqs[0] + 1,
        total as u64,
        "numbers without a gap"
    );

    for (who, _, events) in &mut listeners {
        let got = read_room(events, total, who).await;
        check_in_order(&got, who);
        for (seq, text) in &got {
            assert_eq!(seq_of.get(text), Some(seq), "{who}: {text:?} as sent");
        }
    }
    for (s, (_, events)) in senders.iter_mut().enumerate() {
        let who = format!("sender{s}");
        let got = read_room(events, total - PER_SENDER, &who).await;
        check_in_order(&got, &who);
        let own = format!("s{s}-");
        assert!(
            got.iter().all(|(_, t)| !t.starts_with(&own)),
            "{who} got its own message back"
        );
        for (seq, text) in &got {
            assert_eq!(seq_of.get(text), Some(seq), "{who}: {text:?} as sent");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_room_reaches_everyone_once_in_order() {
    busy_room(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_room_reaches_everyone_once_in_order_through_a_jittery_relay() {
    busy_room(Some(400)).await;
}
