//! The NATS bus against a real `nats-server` (Debian's package; the kit fails with how to
//! install it when it is missing): two nodes in both directions, a NATS restart, a slow
//! consumer, malformed payloads. A fake in-memory store stands in for PostgreSQL: it assigns
//! sequence numbers and answers the followers' reads, and every node's follower is fed its own
//! commits (as the dispatcher will) and the other node's notices.

#[path = "common/nats.rs"]
mod nats;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conclave_proto::{Body, Conv, Event, Message, ServerFrame};
use conclave_server::bus::{
    Bus, BusStream, ClusterEvent, Commit, DEFAULT_MAX_INLINE_FRAME_BYTES, Follower, FollowerLimits,
    Incoming, Step,
};
use conclave_server::bus_nats::{NatsBus, NatsConfig};
use futures_util::StreamExt;
use nats::NatsServer;

/// Upper bound for any wait in these tests.
const WAIT: Duration = Duration::from_secs(20);
/// Messages a fake store read returns at most (the real store pages too).
const PAGE: usize = 16;

/// PostgreSQL's part: every conversation's messages, in sequence order.
#[derive(Clone, Default)]
struct FakeStore(Arc<Mutex<HashMap<Conv, Vec<Commit>>>>);

impl FakeStore {
    /// Commits a message (the next sequence number) and returns its notice.
    fn commit(&self, conv: &Conv, from: &str) -> Commit {
        let mut map = self.0.lock().expect("store lock");
        let log = map.entry(conv.clone()).or_default();
        let seq = log.len() as u64 + 1;
        let msg = Message {
            msg_id: format!("{from}-{seq}"),
            conv: conv.clone(),
            from: from.into(),
            seq,
            ts_ms: 0,
            body: Body::text(format!("message {seq} from {from}")),
            extra: None,
        };
        let frame =
            conclave_server::outbox::encode(&ServerFrame::Event(Event::Message(msg.clone())));
        let c = Commit::new(&msg, &[], frame, DEFAULT_MAX_INLINE_FRAME_BYTES);
        log.push(c.clone());
        c
    }

    /// Answers a follower's read: at most a page; complete through; cut short.
    fn read(&self, conv: &Conv, after: u64, through: Option<u64>) -> (Vec<Commit>, u64, bool) {
        let map = self.0.lock().expect("store lock");
        let log = map.get(conv).map(Vec::as_slice).unwrap_or_default();
        let head = log.len() as u64;
        let end = through.map_or(head, |t| t.min(head));
        let items: Vec<Commit> = log
            .iter()
            .filter(|c| c.seq > after && c.seq <= end)
            .take(PAGE)
            .cloned()
            .collect();
        let cut = end > after + PAGE as u64;
        let complete = if cut {
            items.last().map_or(after, |c| c.seq)
        } else {
            end.max(after)
        };
        (items, complete, cut)
    }

    fn head(&self, conv: &Conv) -> u64 {
        let map = self.0.lock().expect("store lock");
        map.get(conv).map_or(0, |l| l.len() as u64)
    }
}

/// A node's fan-out side: its bus stream and follower, and what it delivered.
struct Node {
    name: String,
    bus: Arc<dyn Bus>,
    incoming: BusStream,
    follower: Follower<Commit>,
    store: FakeStore,
    delivered: HashMap<Conv, Vec<u64>>,
    events: Vec<(String, ClusterEvent)>,
    resets: usize,
    fetches: usize,
}

impl Node {
    fn new(bus: Arc<dyn Bus>, store: &FakeStore, convs: &[Conv]) -> Node {
        let incoming = bus.take_incoming().expect("the stream, once");
        let mut follower = Follower::new(FollowerLimits::default());
        for c in convs {
            assert!(follower.follow(c.clone(), 0));
        }
        Node {
            name: bus.node().to_string(),
            bus,
            incoming,
            follower,
            store: store.clone(),
            delivered: HashMap::new(),
            events: Vec::new(),
            resets: 0,
            fetches: 0,
        }
    }

    /// Commits on this node: stored, delivered locally through the follower, published.
    fn send(&mut self, conv: &Conv) {
        let c = self.store.commit(conv, &self.name);
        let mut out = Vec::new();
        self.follower.notice(c.clone(), &mut out);
        self.run(out);
        // A full queue is fine: the notice is owed, and the store has the message.
        let _ = self.bus.publish_commit(c);
    }

    /// Carries out the follower's steps, reading the fake store for its fetches.
    fn run(&mut self, mut steps: Vec<Step<Commit>>) {
        let mut rounds = 0;
        while !steps.is_empty() {
            rounds += 1;
            assert!(
                rounds < 100_000,
                "{}: the follower never settles",
                self.name
            );
            let mut next = Vec::new();
            for s in steps {
                match s {
                    Step::Deliver(c) => {
                        let seen = self.delivered.entry(c.conv.clone()).or_default();
                        assert_eq!(
                            c.seq,
                            seen.last().copied().unwrap_or(0) + 1,
                            "{}: {:?} out of order or twice",
                            self.name,
                            c.conv
                        );
                        assert!(c.frame.is_some(), "a delivery carries its frame");
                        seen.push(c.seq);
                    }
                    Step::Fetch(f) => {
                        self.fetches += 1;
                        let (items, complete, cut) = self.store.read(&f.conv, f.after, f.through);
                        self.follower
                            .fetched(f.id, &f.conv, items, complete, cut, &mut next);
                    }
                }
            }
            steps = next;
        }
    }

    fn take(&mut self, incoming: Incoming) {
        let mut out = Vec::new();
        match incoming {
            Incoming::Commit { node, commit } => {
                assert_ne!(node, self.name, "a node never hears itself");
                self.follower.notice(commit, &mut out);
            }
            Incoming::Event { node, event } => {
                assert_ne!(node, self.name, "a node never hears itself");
                self.events.push((node, event));
            }
            Incoming::Reset(_) => {
                self.resets += 1;
                self.follower.reset(&mut out);
            }
        }
        self.run(out);
    }

    /// Takes what arrives until `done` holds, within `WAIT`; panics with what it has.
    async fn until(&mut self, what: &str, done: impl Fn(&Node) -> bool) {
        let deadline = Instant::now() + WAIT;
        for _ in 0..1_000_000 {
            if done(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // A quiet moment: ask again for what stalled (as the node's timer will).
            match tokio::time::timeout(left.min(Duration::from_millis(250)), self.incoming.next())
                .await
            {
                Ok(Some(i)) => self.take(i),
                Ok(None) => panic!("{}: the bus stream ended", self.name),
                Err(_) => {
                    let mut out = Vec::new();
                    self.follower.retry_stalled(&mut out);
                    self.run(out);
                }
            }
        }
        panic!(
            "{}: {what} did not happen within {WAIT:?}; delivered {:?}, resets {}, counts {:?}",
            self.name,
            self.delivered
                .iter()
                .map(|(c, v)| (c, v.len()))
                .collect::<Vec<_>>(),
            self.resets,
            self.bus.counts()
        );
    }

    fn has_all(&self, conv: &Conv, n: u64) -> bool {
        self.delivered.get(conv).map_or(0, Vec::len) as u64 == n
    }
}

fn config(server: &NatsServer, node: &str) -> NatsConfig {
    let mut cfg = NatsConfig::new(&server.url(), "test", node);
    cfg.max_reconnect_delay_ms = 200;
    cfg.connect_timeout_ms = 2_000;
    cfg
}

async fn bus(cfg: NatsConfig) -> Arc<dyn Bus> {
    Arc::new(
        NatsBus::connect(cfg)
            .await
            .expect("connect to the test nats-server"),
    )
}

fn room(name: &str) -> Conv {
    Conv::Room(name.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_notices_both_ways_in_one_order() {
    let server = NatsServer::start();
    let store = FakeStore::default();
    let general = room("general");
    let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
    let convs = [general.clone(), dm.clone()];
    let mut a = Node::new(bus(config(&server, "node-a")).await, &store, &convs);
    let mut b = Node::new(bus(config(&server, "node-b")).await, &store, &convs);
    // Both nodes write into the same room, interleaved; each writes a direct conversation too.
    for i in 0..40 {
        if i % 3 == 0 {
            b.send(&general);
        } else {
            a.send(&general);
        }
        if i % 2 == 0 {
            a.send(&dm);
        }
    }
    a.bus
        .publish_event(ClusterEvent::Announce {
            from: "root".into(),
            text: "maintenance at 5".into(),
        })
        .expect("queued");
    b.bus
        .publish_event(ClusterEvent::Presence {
            user: "bob".into(),
            online: true,
        })
        .expect("queued");
    let (n_general, n_dm) = (store.head(&general), store.head(&dm));
    assert_eq!((n_general, n_dm), (40, 20));
    a.until("a has everything and b's event", |n| {
        n.has_all(&general, n_general) && n.has_all(&dm, n_dm) && !n.events.is_empty()
    })
    .await;
    b.until("b has everything and a's event", |n| {
        n.has_all(&general, n_general) && n.has_all(&dm, n_dm) && !n.events.is_empty()
    })
    .await;
    assert_eq!(
        b.events,
        [(
            "node-a".to_string(),
            ClusterEvent::Announce {
                from: "root".into(),
                text: "maintenance at 5".into()
            }
        )]
    );
    assert_eq!(a.events[0].0, "node-b");
    // Interleaved writers: each node received the other's notices; no node heard itself.
    assert!(a.bus.counts().received > 0 && b.bus.counts().received > 0);
    assert_eq!(b.bus.counts().malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_is_resynchronised_from_the_store() {
    let mut server = NatsServer::start();
    let store = FakeStore::default();
    let general = room("general");
    let ops = room("ops");
    let convs = [general.clone(), ops.clone()];
    // A small publish queue and client buffer, so the outage also overflows them (dropped,
    // then owed without frames).
    let mut a_cfg = config(&server, "node-a");
    a_cfg.publish_queue = 4;
    a_cfg.client_capacity = 4;
    let mut a = Node::new(bus(a_cfg).await, &store, &convs);
    let mut b = Node::new(bus(config(&server, "node-b")).await, &store, &convs);

    for _ in 0..30 {
        a.send(&general);
    }
    b.until("the first 30", |n| n.has_all(&general, 30)).await;
    assert_eq!(b.resets, 0);

    server.kill();
    for i in 0..30 {
        a.send(if i % 2 == 0 { &general } else { &ops });
    }
    server.restart();
    b.until("a reset after the reconnect", |n| n.resets > 0)
        .await;
    for _ in 0..30 {
        a.send(&general);
    }
    let (n_general, n_ops) = (store.head(&general), store.head(&ops));
    assert_eq!((n_general, n_ops), (75, 15));
    b.until("everything, once, in order", |n| {
        n.has_all(&general, n_general) && n.has_all(&ops, n_ops)
    })
    .await;
    assert!(b.fetches > 0, "the gap was read from the store");
    assert!(
        a.bus.counts().publish_dropped > 0,
        "the outage overflowed the publish queue: {:?}",
        a.bus.counts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_resynchronised_from_the_store() {
    let server = NatsServer::start();
    let store = FakeStore::default();
    let general = room("general");
    let convs = [general.clone()];
    let mut a = Node::new(bus(config(&server, "node-a")).await, &store, &convs);
    let mut b_cfg = config(&server, "node-b");
    b_cfg.subscription_capacity = 8;
    let mut b = Node::new(bus(b_cfg).await, &store, &convs);
    // b reads nothing while a sends 300: async-nats keeps 8 and drops the rest.
    for _ in 0..300 {
        a.send(&general);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.until("all 300 after the slow-consumer reset", |n| {
        n.has_all(&general, 300)
    })
    .await;
    assert!(b.resets > 0, "the slow consumer was reported as a reset");
    assert!(b.fetches > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_dropped_and_counted() {
    let server = NatsServer::start();
    let store = FakeStore::default();
    let general = room("general");
    let convs = [general.clone()];
    let mut a = Node::new(bus(config(&server, "node-a")).await, &store, &convs);
    let mut b = Node::new(bus(config(&server, "node-b")).await, &store, &convs);
    let raw = async_nats::connect(server.url()).await.expect("raw client");
    let garbage: [&[u8]; 4] = [b"", b"\x01\xff\xff\xff", b"\x09anything", &[1u8; 64]];
    for g in garbage {
        raw.publish("conclave.test.commit", g.to_vec().into())
            .await
            .expect("publish");
        raw.publish("conclave.test.event", g.to_vec().into())
            .await
            .expect("publish");
    }
    raw.flush().await.expect("flush");
    a.send(&general);
    b.until("the one valid notice", |n| n.has_all(&general, 1))
        .await;
    let deadline = Instant::now() + WAIT;
    while b.bus.counts().malformed < 8 && Instant::now() < deadline {
        if let Ok(Some(i)) =
            tokio::time::timeout(Duration::from_millis(100), b.incoming.next()).await
        {
            b.take(i);
        }
    }
    assert_eq!(b.bus.counts().malformed, 8, "{:?}", b.bus.counts());
    assert!(b.events.is_empty());
}

/// Joining the bus returns only once NATS has the subscriptions: a notice another connection
/// publishes right after is received, a thousand times in a row. (With a socket flush alone,
/// NATS sometimes read the other connection's PUB before this one's SUB: a few tries in a
/// thousand lost their notice, and this test failed in 10 of 10 runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_published_right_after_joining_is_received() {
    const TRIES: u64 = 1000;
    let server = NatsServer::start();
    let store = FakeStore::default();
    let general = room("general");
    let raw = async_nats::connect(server.url()).await.expect("raw client");
    for i in 1..=TRIES {
        let node = format!("node-{i}");
        let b = bus(config(&server, &node)).await;
        let mut incoming = b.take_incoming().expect("the stream, once");
        let commit = store.commit(&general, "elsewhere");
        let payload = conclave_server::bus::wire::encode_commit("elsewhere", &commit)
            .expect("encode a notice");
        raw.publish("conclave.test.commit", payload)
            .await
            .expect("publish");
        raw.flush().await.expect("flush");
        match tokio::time::timeout(Duration::from_secs(5), incoming.next()).await {
            Ok(Some(Incoming::Commit { commit: got, .. })) => assert_eq!(got.seq, commit.seq),
            Ok(other) => panic!("try {i}: expected the notice, got {other:?}"),
            Err(_) => panic!(
                "try {i}: the notice published right after joining never arrived: {:?}",
                b.counts()
            ),
        }
    }
}

/// A subscriber on the check's subject that never answers (an operator watching
/// `conclave.>`) does not stop a node from joining: after the check's timeout it goes on, and
/// notices flow as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscriber_on_the_check_does_not_stop_a_node_joining() {
    let server = NatsServer::start();
    let store = FakeStore::default();
    let general = room("general");
    let watcher = async_nats::connect(server.url()).await.expect("watcher");
    let mut watching = watcher.subscribe("conclave.>").await.expect("subscribe");
    watcher.flush().await.expect("flush");
    let quick = |node: &str| {
        let mut cfg = config(&server, node);
        cfg.confirm_timeout_ms = 300;
        cfg
    };
    let joined = tokio::time::timeout(WAIT, async {
        let a = bus(quick("node-a")).await;
        let b = bus(quick("node-b")).await;
        (a, b)
    })
    .await
    .expect("both nodes joined despite the silent subscriber");
    let mut a = Node::new(joined.0, &store, std::slice::from_ref(&general));
    let mut b = Node::new(joined.1, &store, std::slice::from_ref(&general));
    // The watcher did see the checks: it is why no "no responders" answer came.
    let seen = tokio::time::timeout(Duration::from_secs(5), watching.next())
        .await
        .expect("the watcher saw a message")
        .expect("a message");
    assert_eq!(seen.subject.as_str(), "conclave.test.confirm");
    for _ in 0..20 {
        a.send(&general);
    }
    b.until("the 20 notices", |n| n.has_all(&general, 20)).await;
}
