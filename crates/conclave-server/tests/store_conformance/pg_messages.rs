//! What only PostgreSQL's `Messages` has: several nodes appending to the same conversations
//! at once, one idempotency key raced from two nodes, a batch cut short by a stopped server,
//! and the upgrade of a schema version 2 database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use conclave_proto::Conv;
use conclave_server::store::{Accounts, Appended, Messages, NewMessage, StoreError};
use conclave_server::store_pg::{PgDb, SCHEMA_VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::messages::{lobby, text};
use super::{key, postgres_kit};

/// The seed of the randomized tests: `CONCLAVE_TEST_SEED`, else a fixed one (printed, so a
/// failure can be replayed).
fn seed() -> u64 {
    let seed = std::env::var("CONCLAVE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c0_ffee);
    println!("seed {seed} (replay with CONCLAVE_TEST_SEED={seed})");
    seed
}

fn room(name: &str) -> Conv {
    Conv::Room(name.to_string())
}

/// Two nodes (two connections on two threads) append random batches to the same three
/// conversations at once, each batch naming them in a random order: every conversation's
/// numbers are 1..=N with no gap and no repeat, each message is stored exactly once with the
/// number its node was told, and a batch's messages in one conversation get consecutive
/// numbers.
#[test]
fn postgres_concurrent_appends_are_gap_free() {
    const NODES: usize = 2;
    const ROUNDS: usize = 40;
    const MAX_BATCH: usize = 8;
    let seed = seed();
    let pg = postgres_kit::PgServer::start();
    let convs = [room("a"), room("b"), room("c")];
    let barrier = Arc::new(Barrier::new(NODES));
    let nodes: Vec<_> = (0..NODES)
        .map(|node| {
            let config = pg.tcp_config();
            let barrier = barrier.clone();
            let convs = convs.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(node as u64));
                let mut db = PgDb::connect(&config, key()).expect("connect");
                let mut answers: Vec<Vec<Appended>> = Vec::new();
                for round in 0..ROUNDS {
                    let n = rng.random_range(1..=MAX_BATCH);
                    let batch: Vec<NewMessage> = (0..n)
                        .map(|i| {
                            let conv = &convs[rng.random_range(0..convs.len())];
                            text(
                                conv,
                                &format!("node{node}"),
                                &format!("n{node} r{round} i{i}"),
                            )
                        })
                        .collect();
                    barrier.wait();
                    answers.push(db.append_batch(&batch).expect("append"));
                }
                answers
            })
        })
        .collect();
    let answers: Vec<Vec<Appended>> = nodes
        .into_iter()
        .flat_map(|t| t.join().expect("node thread"))
        .collect();

    // What each node was told, by message text.
    let mut told: HashMap<String, (String, u64)> = HashMap::new();
    for batch in &answers {
        let mut per_conv: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for a in batch {
            assert!(!a.duplicate);
            let text = a.msg.body.as_text().expect("text").to_string();
            let conv = conclave_server::store::conv_key(&a.msg.conv);
            per_conv.entry(conv.clone()).or_default().push(a.msg.seq);
            assert!(
                told.insert(text, (a.msg.msg_id.clone(), a.msg.seq))
                    .is_none(),
                "each text is sent once"
            );
        }
        for (conv, seqs) in per_conv {
            let first = seqs[0];
            assert_eq!(
                seqs,
                (first..first + seqs.len() as u64).collect::<Vec<_>>(),
                "a batch's messages in {conv} are consecutive"
            );
        }
    }
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    let mut stored = 0usize;
    for conv in &convs {
        let (msgs, more) = db.conv_range(conv, 0, None, 10_000).expect("range");
        assert!(!more);
        let seqs: Vec<u64> = msgs.iter().map(|a| a.msg.seq).collect();
        assert_eq!(
            seqs,
            (1..=msgs.len() as u64).collect::<Vec<_>>(),
            "{conv:?}: gap-free from 1"
        );
        for a in &msgs {
            let text = a.msg.body.as_text().expect("text");
            assert_eq!(
                told.get(text),
                Some(&(a.msg.msg_id.clone(), a.msg.seq)),
                "stored as its node was told"
            );
        }
        stored += msgs.len();
    }
    assert_eq!(stored, told.len(), "each message exactly once");
    assert_eq!(db.integrity_check().expect("check"), "ok");
}

/// The same sender's same idempotency key sent from two nodes at the same moment, each time
/// with another message of each node's own in the same conversation: the keyed message is
/// stored once, both nodes are answered with its id and number (one of them as the
/// duplicate), and no number is lost to the race.
#[test]
fn postgres_idempotency_key_raced_is_stored_once() {
    const ROUNDS: usize = 20;
    let pg = postgres_kit::PgServer::start();
    let barrier = Arc::new(Barrier::new(2));
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let config = pg.tcp_config();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut db = PgDb::connect(&config, key()).expect("connect");
                let mut answers = Vec::new();
                for round in 0..ROUNDS {
                    let batch = [
                        NewMessage {
                            idempotency_key: Some(format!("key-{round}")),
                            ..text(&lobby(), "alice", &format!("keyed {round}"))
                        },
                        text(&lobby(), "alice", &format!("own {node} {round}")),
                    ];
                    barrier.wait();
                    answers.push(db.append_batch(&batch).expect("append"));
                }
                answers
            })
        })
        .collect();
    let answers: Vec<Vec<Vec<Appended>>> = nodes
        .into_iter()
        .map(|t| t.join().expect("node thread"))
        .collect();
    for (round, (a, b)) in answers[0].iter().zip(&answers[1]).enumerate() {
        let (a, b) = (&a[0], &b[0]);
        assert_eq!(
            (&a.msg.msg_id, a.msg.seq),
            (&b.msg.msg_id, b.msg.seq),
            "round {round}: one message for both"
        );
        assert_eq!(
            [a.duplicate, b.duplicate].iter().filter(|d| !**d).count(),
            1,
            "round {round}: exactly one node stored it"
        );
    }
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    let (msgs, _) = db.conv_range(&lobby(), 0, None, 1000).expect("range");
    assert_eq!(
        msgs.iter().map(|a| a.msg.seq).collect::<Vec<_>>(),
        (1..=3 * ROUNDS as u64).collect::<Vec<_>>(),
        "gap-free: no number lost to the race"
    );
    let texts: HashSet<&str> = msgs.iter().filter_map(|a| a.msg.body.as_text()).collect();
    assert_eq!(texts.len(), 3 * ROUNDS, "each message once");
    assert_eq!(db.integrity_check().expect("check"), "ok");
}

/// A batch that PostgreSQL stops under (it waits on a row another transaction holds, its
/// numbers reserved and its first messages inserted) fails with a `StoreError`, not a panic;
/// after the restart nothing of it is there, and numbering goes on with no gap.
#[test]
fn postgres_stopped_mid_batch_leaves_nothing_half_written() {
    let mut pg = postgres_kit::PgServer::start();
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    db.append_batch(&[
        text(&room("a"), "alice", "a1"),
        text(&room("b"), "alice", "b1"),
    ])
    .expect("append");
    // Another session holds an uncommitted message with the key the batch's last message
    // carries: the batch's insert waits for it, after taking both conversations.
    let mut holder =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    let mut hold = holder.transaction().expect("begin");
    hold.execute(
        "INSERT INTO messages (conv_id, seq, msg_id, sender, ts_ms, body, idem_key)
         SELECT id, 1000, 'held', 'alice', 0, '\\x00', 'held-key' FROM convs WHERE key = 'r:a'",
        &[],
    )
    .expect("hold the key");
    let config = pg.tcp_config();
    let appender = std::thread::spawn(move || {
        let mut db = PgDb::connect(&config, key()).expect("connect");
        db.append_batch(&[
            text(&room("a"), "alice", "a2"),
            text(&room("b"), "alice", "b2"),
            NewMessage {
                idempotency_key: Some("held-key".into()),
                ..text(&room("a"), "alice", "a3")
            },
        ])
    });
    // Bounded: at most 200 looks, 10 s in all.
    let mut watcher =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    let started = Instant::now();
    let mut waiting = false;
    for _ in 0..200 {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .expect("look")
            .get(0);
        if n > 0 {
            waiting = true;
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(waiting, "the batch never waited on the held row");
    pg.stop();
    drop(hold);
    match appender.join().expect("the appender must not panic") {
        Err(StoreError::Postgres { message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected a PostgreSQL error, got {other:?}"),
    }
    pg.restart();
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect after restart");
    for (conv, first) in [(room("a"), "a1"), (room("b"), "b1")] {
        let (msgs, _) = db.conv_range(&conv, 0, None, 10).expect("range");
        assert_eq!(
            msgs.iter()
                .filter_map(|a| a.msg.body.as_text())
                .collect::<Vec<_>>(),
            [first],
            "nothing of the cut batch in {conv:?}"
        );
    }
    assert_eq!(db.integrity_check().expect("check"), "ok");
    let next = db
        .append_batch(&[
            text(&room("a"), "alice", "a2"),
            text(&room("b"), "alice", "b2"),
        ])
        .expect("append after restart");
    assert_eq!(
        next.iter().map(|a| a.msg.seq).collect::<Vec<_>>(),
        [2, 2],
        "no number was lost"
    );
}

/// A database at schema version 2 (before messages) is brought up to the current version at
/// connect, keeping its rows, and messages then work.
#[test]
fn postgres_schema_upgrades_from_version_2() {
    let pg = postgres_kit::PgServer::start();
    let mut first = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    first.create_user("alice", "h", true).expect("create");
    drop(first);
    let mut admin =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    admin
        .batch_execute(
            "DROP TABLE search_tokens; DROP TABLE messages; DROP TABLE conv_members;
             UPDATE conclave_meta SET value = '2' WHERE key = 'schema_version';",
        )
        .expect("make it a version 2 database");
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect to version 2");
    assert_eq!(db.schema_version().expect("version"), SCHEMA_VERSION);
    assert!(db.user("alice").expect("read").is_some(), "rows survive");
    let out = db
        .append_batch(&[text(&lobby(), "alice", "hello")])
        .expect("append");
    assert_eq!(out[0].msg.seq, 1);
    let page = db.history(&lobby(), "alice", None, 10).expect("history");
    assert_eq!(page, [out[0].msg.clone()]);
}
