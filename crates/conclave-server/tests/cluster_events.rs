//! Cluster-wide events (issue 24) between real servers in one process: each node is a real
//! `Server` on its own loopback port with real TLS clients, joined to one `LocalCluster` (the
//! in-process bus), with the reader of its bus and its presence task run here as the cluster
//! mode runs them.
//!
//! Each node has its own SQLite store (SQLite cannot be shared by two servers). Where an
//! event makes the receiving node read the store (rooms, accounts), the test writes the same
//! change into the receiving node's store first, standing in for the shared PostgreSQL, so
//! what is checked is what the event does on the receiving node. Those tests should also run
//! as multi-process tests on one PostgreSQL once the store is shared.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use conclave_proto::*;
use conclave_server::bus::{
    Bus, BusCounts, BusStream, ClusterEvent, Commit, Incoming, LocalBus, LocalCluster, PublishError,
};
use conclave_server::cluster_events::{self, Timing};
use conclave_server::state::Shared;
use conclave_server::store::RoomRow;
use conclave_server::{Config, Server};
use futures_util::StreamExt;

/// A node's bus that can die: once `dead`, it publishes nothing and hears nothing, as a node
/// that lost power (no goodbye, no logouts reach the others).
struct Mortal {
    inner: LocalBus,
    dead: Arc<AtomicBool>,
}

impl Bus for Mortal {
    fn node(&self) -> &str {
        self.inner.node()
    }
    fn publish_commit(&self, commit: Commit) -> Result<(), PublishError> {
        if self.dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.publish_commit(commit)
    }
    fn publish_event(&self, event: ClusterEvent) -> Result<(), PublishError> {
        if self.dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.publish_event(event)
    }
    fn take_incoming(&self) -> Option<BusStream> {
        let dead = self.dead.clone();
        let s = self.inner.take_incoming()?;
        Some(Box::pin(s.filter(move |_| {
            let alive = !dead.load(Ordering::SeqCst);
            async move { alive }
        })))
    }
    fn counts(&self) -> BusCounts {
        self.inner.counts()
    }
}

struct Node {
    srv: TestServer,
    shared: Arc<Shared>,
    dead: Arc<AtomicBool>,
}

/// Fast enough for a test, slow enough that a loaded machine does not miss a heartbeat's
/// time to live (no assertion depends on it: only the dead node's expiry waits for it).
const FAST: Timing = Timing {
    heartbeat: Duration::from_millis(200),
    ttl: Duration::from_secs(2),
};

/// Accounts every node's store holds before it starts: `(name, admin)`, all in `general`.
const ACCOUNTS: &[(&str, bool)] = &[
    ("alice", true),
    ("bob", false),
    ("carol", false),
    ("mallory", false),
];

/// Writes into a node's store directly (the stand-in for the shared store).
fn mirror(dir: &std::path::Path, f: impl FnOnce(&mut conclave_server::store::Db)) {
    let config = Config::new(dir);
    let mut db = conclave_server::server::open_db(&config).expect("db");
    f(&mut db);
}

async fn node(cluster: &LocalCluster, name: &str, timing: Timing) -> Node {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    mirror(dir.path(), |db| {
        for (user, admin) in ACCOUNTS {
            let hash = conclave_server::accounts::hash_password("password123").expect("hash");
            db.create_user(user, &hash, *admin).expect("create");
            db.add_member("general", user).expect("member");
        }
    });
    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let mut server = Server::bind(config).await.expect("server binds");
    let dead = Arc::new(AtomicBool::new(false));
    let bus = Arc::new(Mortal {
        inner: cluster.join(name),
        dead: dead.clone(),
    });
    let mut incoming = bus.take_incoming().expect("the stream");
    server.set_bus(bus).expect("bus set before run");
    let shared = server.shared();
    // The node's reader of the bus: the cluster mode's fan-out task does this for events.
    let reader = shared.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = reader.shutdown.cancelled() => return,
                n = incoming.next() => n,
            };
            match next {
                Some(Incoming::Event { node, event }) => {
                    cluster_events::apply(&reader, &node, event)
                }
                Some(Incoming::Reset(_)) => cluster_events::reset(&reader),
                Some(Incoming::Commit { .. }) => {}
                None => return,
            }
        }
    });
    tokio::spawn(cluster_events::presence_task(shared.clone(), timing));
    let addr = server.local_addr();
    let fingerprint = server.fingerprint().to_string();
    let token = server.shutdown_token();
    let handle = tokio::spawn(async move {
        server.run().await.expect("server runs");
    });
    Node {
        srv: TestServer {
            addr,
            fingerprint,
            dir,
            token,
            handle,
        },
        shared,
        dead,
    }
}

/// Logs in and waits until caught up (only then does a connection receive live traffic).
async fn live(n: &Node, user: &str) -> Raw {
    let mut c = Raw::login(&n.srv, user, "password123").await;
    c.event(|e| matches!(e, Event::CaughtUp { .. })).await;
    c
}

fn who_online(r: Result<Reply, ErrorBody>) -> HashSet<String> {
    match r {
        Ok(Reply::Users(users)) => users
            .into_iter()
            .filter(|u| u.online)
            .map(|u| u.user)
            .collect(),
        other => panic!("who: {other:?}"),
    }
}

fn presence_of(user: &'static str, online: bool) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Presence { user: u, online: o } if u == user && *o == online)
}

/// Waits (bounded in count and time) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test]
async fn presence_on_one_node_is_seen_on_the_other_and_ends_with_the_user_or_the_node() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut alice = live(&a, "alice").await;
    let bob = live(&b, "bob").await;
    alice.event(presence_of("bob", true)).await;
    let online = who_online(alice.request(Request::Who { room: None }).await);
    assert!(online.contains("bob"), "{online:?}");
    // `who general` on A too: bob is a member, online on B.
    let online = who_online(
        alice
            .request(Request::Who {
                room: Some("general".into()),
            })
            .await,
    );
    assert!(
        online.contains("bob") && online.contains("alice"),
        "{online:?}"
    );

    // Online while any node says so: bob on both, his connection on B goes, he stays online.
    let mut bob_a = live(&a, "bob").await;
    // B knows he is on A too before his connection there goes.
    eventually("B sees bob on A", || {
        b.shared.hub.lock().online_elsewhere("bob")
    })
    .await;
    drop(bob);
    eventually("B saw bob's connection close", || {
        !b.shared.hub.lock().online_here("bob")
    })
    .await;
    // An announcement through B orders the check after B's "offline" notice on the bus.
    let mut alice_b = live(&b, "alice").await;
    alice_b
        .request(Request::Announce {
            text: "after bob left b".into(),
        })
        .await
        .expect("announce");
    alice
        .event(|e| matches!(e, Event::Announce { text, .. } if text == "after bob left b"))
        .await;
    assert!(
        !alice.events.iter().any(presence_of("bob", false)),
        "bob is still online on A: {:?}",
        alice.events
    );
    assert!(who_online(alice.request(Request::Who { room: None }).await).contains("bob"));
    drop(alice_b);

    // His connection on A goes too; on B his peers see him offline.
    let mut carol_b = live(&b, "carol").await;
    assert!(who_online(carol_b.request(Request::Who { room: None }).await).contains("bob"));
    let _ = bob_a.request(Request::Quit).await;
    carol_b.event(presence_of("bob", false)).await;
    assert!(!who_online(carol_b.request(Request::Who { room: None }).await).contains("bob"));
    alice.event(presence_of("bob", false)).await;
    alice.events.clear();

    // A node that stops says goodbye: its users go offline on the others at once.
    let _bob = live(&b, "bob").await;
    alice.event(presence_of("bob", true)).await;
    b.srv.stop().await;
    alice.event(presence_of("bob", false)).await;
    let online = who_online(alice.request(Request::Who { room: None }).await);
    assert!(
        !online.contains("bob") && !online.contains("carol"),
        "{online:?}"
    );
    a.srv.stop().await;
}

#[tokio::test]
async fn the_users_of_a_node_that_dies_without_a_word_go_offline_after_the_expiry() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut alice = live(&a, "alice").await;
    let _bob = live(&b, "bob").await;
    alice.event(presence_of("bob", true)).await;
    // B loses power: nothing more from it, not even its connections' logouts.
    b.dead.store(true, Ordering::SeqCst);
    b.srv.stop().await;
    alice.event(presence_of("bob", false)).await;
    assert!(!who_online(alice.request(Request::Who { room: None }).await).contains("bob"));
    a.srv.stop().await;
}

#[tokio::test]
async fn a_kick_on_one_node_removes_the_users_connections_on_the_others_from_the_room() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut alice = live(&a, "alice").await;
    let mut bob = live(&b, "bob").await;
    let mut carol_b = live(&b, "carol").await;
    alice.event(presence_of("bob", true)).await;
    alice.event(presence_of("carol", true)).await;
    // The shared store would hold the removal: B's stand-in does too.
    mirror(b.srv.dir.path(), |db| {
        db.remove_member("general", "bob").expect("removed");
    });
    alice
        .request(Request::Kick {
            room: Some("general".into()),
            user: "bob".into(),
            reason: Some("off topic".into()),
        })
        .await
        .expect("kicked");
    for c in [&mut bob, &mut carol_b] {
        let e = c
            .event(|e| matches!(e, Event::Kicked { user, .. } if user == "bob"))
            .await;
        assert_eq!(
            e,
            Event::Kicked {
                room: Some("general".into()),
                user: "bob".into(),
                by: "alice".into(),
                reason: "off topic".into(),
            }
        );
    }
    assert_eq!(
        code(bob.send_room("general", "still here?").await),
        ErrorCode::NotMember
    );
    // Kicked off the server from A: his connections on B close.
    alice
        .request(Request::Kick {
            room: None,
            user: "carol".into(),
            reason: Some("enough".into()),
        })
        .await
        .expect("carol is online on B, so the kick is not refused");
    let (reason, message) = carol_b.disconnect_event().await.expect("closed");
    assert_eq!(reason, DisconnectReason::Kicked);
    assert!(message.contains("enough"), "{message}");
    a.srv.stop().await;
    b.srv.stop().await;
}

#[tokio::test]
async fn bans_on_one_node_close_connections_and_refuse_them_on_the_others() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut alice = live(&a, "alice").await;
    let mut bob1 = live(&b, "bob").await;
    let mut bob2 = live(&b, "bob").await;
    alice
        .request(Request::Ban {
            user: Some("bob".into()),
            ip: None,
            duration_s: Some(3600),
            reason: Some("spam".into()),
        })
        .await
        .expect("banned");
    for c in [&mut bob1, &mut bob2] {
        let (reason, message) = c.disconnect_event().await.expect("closed");
        assert_eq!(reason, DisconnectReason::Banned);
        assert!(message.contains("spam"), "{message}");
    }
    // B's guard refuses his next login (its store does not even hold the ban).
    let mut again = Raw::connect(&b.srv).await;
    let r = again
        .request(Request::Login {
            user: "bob".into(),
            password: "password123".into(),
            server_password: None,
            resume: vec![],
        })
        .await;
    assert_eq!(code(r), ErrorCode::Forbidden);

    // An address ban from A's operator is in B's guard too.
    let answer = admin(
        &a.srv,
        serde_json::json!({"cmd": "ban", "ip": "192.0.2.0/24", "reason": "scanner"}),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let ip: std::net::IpAddr = "192.0.2.7".parse().expect("ip");
    eventually("B refuses the banned range", || {
        b.shared
            .guard()
            .ip_ban(ip, conclave_server::store::now_ms())
            .is_some()
    })
    .await;
    a.srv.stop().await;
    b.srv.stop().await;
}

#[tokio::test]
async fn announcements_and_file_offers_reach_users_on_other_nodes() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let c = node(&cluster, "c", FAST).await;
    let mut alice = live(&a, "alice").await;
    let mut bob = live(&b, "bob").await;
    let mut carol = live(&c, "carol").await;
    alice
        .request(Request::Announce {
            text: "maintenance at five".into(),
        })
        .await
        .expect("announced");
    let answer = admin(
        &b.srv,
        serde_json::json!({"cmd": "announce", "text": "from the operator"}),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    for user in [&mut bob, &mut carol] {
        user.event(|e| matches!(e, Event::Announce { text, from, .. } if text == "maintenance at five" && from == "alice"))
            .await;
    }
    for user in [&mut alice, &mut carol] {
        user.event(|e| matches!(e, Event::Announce { text, from, .. } if text == "from the operator" && from == "operator"))
            .await;
    }
    // An empty file is complete at once and offered to the recipient wherever they are.
    use sha2::Digest;
    let sha256: [u8; 32] = sha2::Sha256::digest(b"").into();
    let created = alice
        .request(Request::FileOffer {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            name: "empty.txt".into(),
            size: 0,
            sha256,
            p2p: None,
        })
        .await;
    let Ok(Reply::FileCreated { file_id, .. }) = created else {
        panic!("offer: {created:?}");
    };
    let offer = bob.event(|e| matches!(e, Event::FileOffer(_))).await;
    let Event::FileOffer(offer) = offer else {
        unreachable!()
    };
    assert_eq!(offer.file_id, file_id);
    assert_eq!(offer.from, "alice");
    assert!(
        !carol
            .events
            .iter()
            .any(|e| matches!(e, Event::FileOffer(_))),
        "only the recipient"
    );
    for n in [a, b, c] {
        n.srv.stop().await;
    }
}

#[tokio::test]
async fn a_room_created_on_one_node_and_joined_on_another_works_on_both() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut alice = live(&a, "alice").await;
    let mut alice_b = live(&b, "alice").await;
    let mut bob = live(&b, "bob").await;
    // The shared store would hold the new room: B's stand-in does too.
    let row = RoomRow {
        name: "ops".into(),
        private: false,
        pw_hash: None,
        owner: Some("alice".into()),
        members: vec!["alice".into()],
        invited: vec![],
        votekick: true,
    };
    let stored = row.clone();
    mirror(b.srv.dir.path(), move |db| {
        db.create_room(&stored).expect("room")
    });
    let r = alice
        .request(Request::CreateRoom {
            room: "ops".into(),
            private: false,
            password: None,
        })
        .await;
    assert!(matches!(r, Ok(Reply::Joined { .. })), "{r:?}");
    // Alice's connection on B learns of it once B read the room.
    alice_b
        .event(|e| matches!(e, Event::Join { room, user } if room == "ops" && user == "alice"))
        .await;
    let rooms = bob.request(Request::Rooms).await;
    let Ok(Reply::Rooms(rooms)) = rooms else {
        panic!("rooms: {rooms:?}");
    };
    let ops = rooms.iter().find(|r| r.room == "ops").expect("ops on B");
    assert_eq!((ops.members, ops.online), (1, 1));
    // Bob joins on B; A (its stand-in store first) shows alice the join and counts him.
    mirror(a.srv.dir.path(), |db| {
        db.add_member("ops", "bob").expect("member")
    });
    let r = bob
        .request(Request::Join {
            room: "ops".into(),
            password: None,
        })
        .await;
    match r {
        Ok(Reply::Joined { members, .. }) => {
            assert_eq!(members, vec!["alice".to_string(), "bob".to_string()])
        }
        other => panic!("join on B: {other:?}"),
    }
    alice
        .event(|e| matches!(e, Event::Join { room, user } if room == "ops" && user == "bob"))
        .await;
    let online = who_online(
        alice
            .request(Request::Who {
                room: Some("ops".into()),
            })
            .await,
    );
    assert_eq!(
        online,
        ["alice", "bob"].into_iter().map(String::from).collect()
    );
    a.srv.stop().await;
    b.srv.stop().await;
}

#[tokio::test]
async fn votes_to_kick_are_counted_across_nodes() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut carol = live(&a, "carol").await;
    let mut mallory = live(&a, "mallory").await;
    let mut bob = live(&b, "bob").await;
    mallory.event(presence_of("bob", true)).await;
    // The store's side of the vote's outcome, on both stand-ins.
    for dir in [a.srv.dir.path(), b.srv.dir.path()] {
        mirror(dir, |db| {
            db.remove_member("general", "mallory").expect("removed")
        });
    }
    let r = carol
        .request(Request::VoteKick {
            room: "general".into(),
            user: "mallory".into(),
        })
        .await;
    assert_eq!(
        r,
        Ok(Reply::VoteCounted {
            votes: 1,
            needed: 2,
            kicked: false
        })
    );
    // Bob on B sees the vote: B counted it.
    bob.event(|e| matches!(e, Event::VoteKick { voter, votes: 1, .. } if voter == "carol"))
        .await;
    let r = bob
        .request(Request::VoteKick {
            room: "general".into(),
            user: "mallory".into(),
        })
        .await;
    assert_eq!(
        r,
        Ok(Reply::VoteCounted {
            votes: 2,
            needed: 2,
            kicked: true
        })
    );
    // Decided on B, carried out on A too.
    mallory
        .event(|e| matches!(e, Event::Kicked { user, by, .. } if user == "mallory" && by == "vote"))
        .await;
    assert_eq!(
        code(mallory.send_room("general", "hello?").await),
        ErrorCode::NotMember
    );
    // And kept out on A for the vote-kick's ban.
    let r = mallory
        .request(Request::Join {
            room: "general".into(),
            password: None,
        })
        .await;
    assert_eq!(code(r), ErrorCode::Forbidden);
    a.srv.stop().await;
    b.srv.stop().await;
}

#[tokio::test]
async fn hostile_or_own_events_grant_nothing_and_applying_twice_changes_nothing() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let mut bob = live(&a, "bob").await;
    let shared = &a.shared;
    let message = Message {
        msg_id: "m1".into(),
        conv: Conv::Room("general".into()),
        from: "alice".into(),
        seq: 1,
        ts_ms: 1,
        body: Body::text("forged"),
        extra: None,
    };
    let hostile = vec![
        // A message is only ever delivered from the store.
        ClusterEvent::Notify {
            to: conclave_server::bus::Audience::Users(vec!["bob".into()]),
            event: Event::Message(message.clone()),
        },
        ClusterEvent::RoomChanged {
            room: "general".into(),
            notice: Some(Event::Message(message)),
            to: vec![],
        },
        // A room the store does not have is not made.
        ClusterEvent::RoomChanged {
            room: "secret".into(),
            notice: None,
            to: vec![],
        },
        // An account the store does not have is not made, and is not online.
        ClusterEvent::AccountChanged {
            user: "ghost".into(),
        },
        ClusterEvent::Online {
            users: vec!["ghost".into()],
            ttl_ms: u64::MAX,
            ask: false,
        },
        // A kick of a non-member, a vote from one, a topic for no room: nothing.
        ClusterEvent::Kicked {
            room: "nowhere".into(),
            user: "bob".into(),
            by: "x".into(),
            reason: "".into(),
            banned_until_ms: None,
        },
        ClusterEvent::Vote {
            room: "general".into(),
            target: "bob".into(),
            voter: "ghost".into(),
            at_ms: i64::MAX,
        },
        ClusterEvent::Topic {
            room: "nowhere".into(),
            topic: "x".into(),
            by: "ghost".into(),
        },
    ];
    for event in hostile {
        // Twice: applying is idempotent.
        cluster_events::apply(shared, "evil", event.clone());
        cluster_events::apply(shared, "evil", event);
    }
    // Its own events, as if echoed: ignored.
    cluster_events::apply(
        shared,
        "a",
        ClusterEvent::Announce {
            from: "alice".into(),
            text: "echo".into(),
        },
    );
    // Give the reads the events asked for their turn on the store thread (one thread, in
    // order: once this later read ran, theirs did, if they were sent by then).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = shared.store.call(|db| db.rooms()).await;
    let _ = bob.request(Request::Ping { nonce: 1 }).await;
    assert!(
        !bob.events
            .iter()
            .any(|e| matches!(e, Event::Message(_) | Event::Announce { .. })),
        "{:?}",
        bob.events
    );
    {
        let hub = shared.hub.lock();
        assert!(hub.room("secret").is_none());
        assert!(!hub.knows_user("ghost") && !hub.online("ghost"));
        assert!(hub.room("general").is_some_and(|r| r.votes.is_empty()));
    }
    // The same path does act on what is legitimate (so the checks above can fail).
    cluster_events::apply(
        shared,
        "b",
        ClusterEvent::Announce {
            from: "alice".into(),
            text: "real".into(),
        },
    );
    bob.event(|e| matches!(e, Event::Announce { text, .. } if text == "real"))
        .await;
    // An event not meant for this node's encoding never reaches apply: the bus refuses it.
    let evil = cluster.join("evil");
    assert!(
        evil.publish_event(ClusterEvent::Notify {
            to: conclave_server::bus::Audience::Users(vec!["bob".into()]),
            event: Event::CaughtUp {
                count: 0,
                truncated: false
            },
        })
        .is_err()
    );
    a.srv.stop().await;
}

#[tokio::test]
async fn after_a_reset_a_node_reads_the_store_again_and_asks_for_the_others_presence() {
    // Heartbeats too slow to matter: only the reset brings B up to date.
    let slow = Timing {
        heartbeat: Duration::from_secs(600),
        ttl: Duration::from_secs(1200),
    };
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", slow).await;
    let b = node(&cluster, "b", slow).await;
    // B is cut off the bus while bob logs in on A and the store changes.
    b.dead.store(true, Ordering::SeqCst);
    let _bob = live(&a, "bob").await;
    let row = RoomRow {
        name: "late".into(),
        private: false,
        pw_hash: None,
        owner: None,
        members: vec!["bob".into()],
        invited: vec![],
        votekick: true,
    };
    mirror(b.srv.dir.path(), move |db| {
        db.create_room(&row).expect("room");
        assert!(db.delete_user("mallory").expect("deleted"));
    });
    b.dead.store(false, Ordering::SeqCst);
    {
        let hub = b.shared.hub.lock();
        assert!(!hub.online("bob") && hub.room("late").is_none() && hub.knows_user("mallory"));
    }
    // A answers an ask at most once a second, and answered B's first one at its start.
    tokio::time::sleep(Duration::from_millis(
        cluster_events::ASK_ANSWER_INTERVAL_MS as u64 + 200,
    ))
    .await;
    cluster_events::reset(&b.shared);
    eventually("B read the store and heard A's users", || {
        let hub = b.shared.hub.lock();
        hub.online("bob") && hub.room("late").is_some() && !hub.knows_user("mallory")
    })
    .await;
    a.srv.stop().await;
    b.srv.stop().await;
}

#[tokio::test]
async fn topics_names_away_and_typing_on_one_node_are_shown_on_another() {
    let cluster = LocalCluster::default();
    let a = node(&cluster, "a", FAST).await;
    let b = node(&cluster, "b", FAST).await;
    let mut alice = live(&a, "alice").await;
    let mut bob = live(&b, "bob").await;
    alice.event(presence_of("bob", true)).await;
    // B knows alice is online (on A): an away message is only kept for someone online.
    eventually("B sees alice", || b.shared.hub.lock().online("alice")).await;
    alice
        .request(Request::SetTopic {
            room: "general".into(),
            topic: "release on friday".into(),
        })
        .await
        .expect("topic");
    alice
        .request(Request::SetDisplayName {
            name: Some("Alice A.".into()),
        })
        .await
        .expect("name");
    alice
        .request(Request::Away {
            text: Some("at lunch".into()),
        })
        .await
        .expect("away");
    alice
        .request(Request::Typing {
            conv: ConvRef::Room("general".into()),
        })
        .await
        .expect("typing");
    bob.event(|e| matches!(e, Event::Topic { topic, by, .. } if topic == "release on friday" && by == "alice"))
        .await;
    bob.event(|e| matches!(e, Event::DisplayName { user, name: Some(n) } if user == "alice" && n == "Alice A."))
        .await;
    bob.event(
        |e| matches!(e, Event::Away { user, text: Some(t) } if user == "alice" && t == "at lunch"),
    )
    .await;
    bob.event(|e| matches!(e, Event::Typing { user, .. } if user == "alice"))
        .await;
    // B's own answers show them too.
    let who = bob.request(Request::Who { room: None }).await;
    let Ok(Reply::Users(users)) = who else {
        panic!("who: {who:?}")
    };
    let alice_there = users
        .iter()
        .find(|u| u.user == "alice")
        .expect("alice online");
    assert_eq!(alice_there.display_name.as_deref(), Some("Alice A."));
    assert_eq!(alice_there.away.as_deref(), Some("at lunch"));
    let rooms = bob.request(Request::Rooms).await;
    let Ok(Reply::Rooms(rooms)) = rooms else {
        panic!("rooms: {rooms:?}")
    };
    let general = rooms.iter().find(|r| r.room == "general").expect("general");
    assert_eq!(general.topic.as_deref(), Some("release on friday"));
    a.srv.stop().await;
    b.srv.stop().await;
}

/// Seeded random logins and disconnections of four users over three nodes: once the
/// connections settle, every node says exactly who has a connection somewhere.
#[tokio::test]
async fn presence_converges_on_every_node_after_random_logins_and_logouts() {
    use rand::{Rng, SeedableRng};
    let users = ["alice", "bob", "carol", "mallory"];
    for seed in [7u64, 24] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let cluster = LocalCluster::default();
        let nodes = [
            node(&cluster, "a", FAST).await,
            node(&cluster, "b", FAST).await,
            node(&cluster, "c", FAST).await,
        ];
        let mut open: Vec<(&str, Raw)> = Vec::new();
        for _ in 0..24 {
            if open.is_empty() || rng.random_bool(0.6) {
                let user = users[rng.random_range(0..users.len())];
                let n = &nodes[rng.random_range(0..nodes.len())];
                open.push((user, Raw::login(&n.srv, user, "password123").await));
            } else {
                let i = rng.random_range(0..open.len());
                let (_, mut c) = open.swap_remove(i);
                if rng.random_bool(0.5) {
                    let _ = c.request(Request::Quit).await;
                }
                drop(c);
            }
        }
        let truth: HashSet<&str> = open.iter().map(|(u, _)| *u).collect();
        for (i, n) in nodes.iter().enumerate() {
            eventually(
                &format!("seed {seed}: node {i} agrees on {truth:?}"),
                || {
                    let hub = n.shared.hub.lock();
                    users.iter().all(|u| hub.online(u) == truth.contains(u))
                },
            )
            .await;
        }
        drop(open);
        for n in nodes {
            n.srv.stop().await;
        }
    }
}
