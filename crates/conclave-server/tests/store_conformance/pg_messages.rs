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
    super::downgrade(&pg.tcp_config(), 2);
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

/// One backend in the differential test, with the message ids it gave out (ids differ between
/// backends; a message is compared by where it is: `conversation#number`).
struct Side {
    db: Box<dyn super::Tested>,
    pos_of: HashMap<String, String>,
    id_at: HashMap<String, String>,
}

impl Side {
    fn learn(&mut self, answers: &[Appended]) {
        for a in answers {
            let at = format!(
                "{}#{}",
                conclave_server::store::conv_key(&a.msg.conv),
                a.msg.seq
            );
            self.pos_of.insert(a.msg.msg_id.clone(), at.clone());
            self.id_at.insert(at, a.msg.msg_id.clone());
        }
    }

    /// A message as both backends must agree on it: ids as positions, times left out.
    fn norm(&self, m: &conclave_proto::Message) -> String {
        let pos = |id: &str| {
            self.pos_of
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("?{id}"))
        };
        let extra = m.extra.as_ref().map(|e| {
            (
                e.reply_to.as_deref().map(pos),
                e.acts_on.as_ref().map(|a| (pos(&a.msg_id), a.kind)),
                e.state.as_ref().map(|s| {
                    (
                        s.edited_ms.is_some(),
                        s.edits,
                        s.deleted,
                        s.reactions.clone(),
                    )
                }),
            )
        });
        format!(
            "{} {:?} from {} body {:?} {:?} extra {extra:?}",
            pos(&m.msg_id),
            m.conv,
            m.from,
            m.body.content_type,
            String::from_utf8_lossy(&m.body.data)
        )
    }

    fn norm_all(&self, msgs: &[conclave_proto::Message]) -> Vec<String> {
        msgs.iter().map(|m| self.norm(m)).collect()
    }
}

/// A range as compared: each message normalised with its exceptions, and whether more remain.
type NormRange = (Vec<(String, Vec<String>)>, bool);

/// What a random batch holds, the same for both backends (targets by position).
struct Spec {
    conv: Conv,
    from: &'static str,
    text: String,
    except: Vec<String>,
    key: Option<String>,
    reply_to: Option<String>,
    act: Option<(String, conclave_proto::ActKind)>,
}

impl Spec {
    fn message(&self, side: &Side) -> NewMessage {
        let id = |at: &String| side.id_at.get(at).cloned().unwrap_or_default();
        let refs = (self.reply_to.is_some() || self.act.is_some()).then(|| {
            Box::new(conclave_proto::Refs {
                reply_to: self.reply_to.as_ref().map(id),
                acts_on: self.act.as_ref().map(|(at, kind)| conclave_proto::ActsOn {
                    msg_id: id(at),
                    kind: *kind,
                }),
            })
        });
        NewMessage {
            except: self.except.clone(),
            idempotency_key: self.key.clone(),
            refs,
            ..text(&self.conv, self.from, &self.text)
        }
    }
}

/// The same seeded random operations on SQLite's `Db` and on `PgDb` (appends with keys,
/// exceptions, replies and acts; history, search, acks, catch-up, ranges, retention by count)
/// give the same answers, compared with ids as positions and times left out.
#[test]
fn postgres_agrees_with_sqlite_on_random_operations() {
    use conclave_proto::ActKind;
    use conclave_server::store::{Retention, RoomRow};
    const OPS: usize = 300;
    const USERS: [&str; 3] = ["alice", "bob", "carol"];
    const WORDS: [&str; 5] = ["deploy", "five", "lunch", "café", "ship"];
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temporary directory");
    let pg = postgres_kit::PgServer::start();
    let mut sides = [
        Side {
            db: Box::new(conclave_server::store::Db::open(dir.path(), key()).expect("SQLite")),
            pos_of: HashMap::new(),
            id_at: HashMap::new(),
        },
        Side {
            db: Box::new(PgDb::connect(&pg.tcp_config(), key()).expect("PostgreSQL")),
            pos_of: HashMap::new(),
            id_at: HashMap::new(),
        },
    ];
    let convs = [
        room("r1"),
        room("r2"),
        Conv::Direct(vec!["alice".into(), "bob".into()]),
        Conv::Direct(vec!["bob".into(), "carol".into()]),
    ];
    for side in &mut sides {
        for u in USERS {
            side.db.create_user(u, "h", false).expect("user");
        }
        for r in ["r1", "r2"] {
            side.db
                .create_room(&RoomRow {
                    name: r.into(),
                    private: false,
                    pw_hash: None,
                    owner: None,
                    members: Vec::new(),
                    invited: Vec::new(),
                    votekick: true,
                })
                .expect("room");
        }
        side.db.add_member("r1", "alice").expect("join");
        side.db.add_member("r1", "bob").expect("join");
        side.db.add_member("r2", "carol").expect("join");
    }
    // Positions of the messages appended so far, and of those that can be acted on.
    let mut positions: Vec<String> = Vec::new();
    let mut targets: Vec<(usize, String)> = Vec::new();
    for op in 0..OPS {
        let what = rng.random_range(0..10);
        let ctx = format!("seed {seed}, operation {op} (kind {what})");
        match what {
            0..=3 => {
                let n = rng.random_range(1..=4);
                let specs: Vec<Spec> = (0..n)
                    .map(|_| {
                        let c = rng.random_range(0..convs.len());
                        let words = rng.random_range(1..=3);
                        let text: Vec<&str> = (0..words)
                            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                            .collect();
                        let in_conv: Vec<&String> = targets
                            .iter()
                            .filter(|(tc, _)| *tc == c)
                            .map(|(_, at)| at)
                            .collect();
                        let pick = |rng: &mut StdRng| -> Option<String> {
                            (!in_conv.is_empty())
                                .then(|| in_conv[rng.random_range(0..in_conv.len())].clone())
                        };
                        let act = if rng.random_bool(0.3) {
                            let kind = [
                                ActKind::Edit,
                                ActKind::Delete,
                                ActKind::React,
                                ActKind::Unreact,
                            ][rng.random_range(0..4)];
                            pick(&mut rng).map(|at| (at, kind))
                        } else {
                            None
                        };
                        let reply_to = if act.is_none() && rng.random_bool(0.2) {
                            pick(&mut rng)
                        } else {
                            None
                        };
                        let text = match act {
                            Some((_, ActKind::React | ActKind::Unreact)) => {
                                ["👍", "🎉"][rng.random_range(0..2)].to_string()
                            }
                            _ => text.join(" "),
                        };
                        Spec {
                            conv: convs[c].clone(),
                            from: USERS[rng.random_range(0..USERS.len())],
                            text,
                            except: if rng.random_bool(0.2) {
                                vec![USERS[rng.random_range(0..USERS.len())].to_string()]
                            } else {
                                Vec::new()
                            },
                            key: rng
                                .random_bool(0.3)
                                .then(|| format!("k{}", rng.random_range(0..8))),
                            reply_to,
                            act,
                        }
                    })
                    .collect();
                let mut answers = Vec::new();
                for side in &mut sides {
                    let batch: Vec<NewMessage> = specs.iter().map(|s| s.message(side)).collect();
                    let out = side.db.append_batch(&batch).expect("append");
                    side.learn(&out);
                    let norm: Vec<(String, bool)> = out
                        .iter()
                        .map(|a| (side.norm(&a.msg), a.duplicate))
                        .collect();
                    answers.push(norm);
                }
                assert_eq!(answers[0], answers[1], "{ctx}: append");
                // What is new (not a duplicate) can be acted on when it is no act itself.
                let out_pos: Vec<String> = answers[0]
                    .iter()
                    .map(|(n, _)| n.split(' ').next().unwrap_or_default().to_string())
                    .collect();
                for ((spec, at), (_, dup)) in specs.iter().zip(out_pos).zip(&answers[0]) {
                    if !dup {
                        positions.push(at.clone());
                        if spec.act.is_none() {
                            let c = convs.iter().position(|c| *c == spec.conv).unwrap_or(0);
                            targets.push((c, at));
                        }
                    }
                }
            }
            4 => {
                let conv = &convs[rng.random_range(0..convs.len())];
                let viewer = USERS[rng.random_range(0..USERS.len())];
                let before = rng.random_bool(0.5).then(|| rng.random_range(0..30));
                let limit = rng.random_range(0..12);
                let got: Vec<Vec<String>> = sides
                    .iter_mut()
                    .map(|s| {
                        let h = s.db.history(conv, viewer, before, limit).expect("history");
                        s.norm_all(&h)
                    })
                    .collect();
                assert_eq!(got[0], got[1], "{ctx}: history");
            }
            5 => {
                let viewer = USERS[rng.random_range(0..USERS.len())];
                let rooms: Vec<String> = ["r1", "r2"]
                    .iter()
                    .filter(|_| rng.random_bool(0.7))
                    .map(|r| r.to_string())
                    .collect();
                let direct = rng.random_bool(0.5);
                let query: String = (0..rng.random_range(1..=2))
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect::<Vec<_>>()
                    .join(" ");
                let before_at = (rng.random_bool(0.3) && !positions.is_empty())
                    .then(|| positions[rng.random_range(0..positions.len())].clone());
                let limit = rng.random_range(1..10);
                let got: Vec<Vec<String>> = sides
                    .iter_mut()
                    .map(|s| {
                        let before = before_at.as_ref().and_then(|at| s.id_at.get(at).cloned());
                        let found =
                            s.db.search(
                                viewer,
                                &rooms,
                                direct,
                                &conclave_server::search::words(&query),
                                before.as_deref(),
                                limit,
                            )
                            .expect("search");
                        s.norm_all(&found)
                    })
                    .collect();
                assert_eq!(got[0], got[1], "{ctx}: search {query:?}");
            }
            6 => {
                let user = USERS[rng.random_range(0..USERS.len())];
                let cursors: Vec<(Conv, u64)> = (0..rng.random_range(0..3))
                    .map(|_| {
                        (
                            convs[rng.random_range(0..convs.len())].clone(),
                            rng.random_range(0..30),
                        )
                    })
                    .collect();
                for s in &mut sides {
                    s.db.ack(user, &cursors).expect("ack");
                }
            }
            7 => {
                let user = USERS[rng.random_range(0..USERS.len())];
                let resume: Vec<(Conv, u64)> = (0..rng.random_range(0..2))
                    .map(|_| {
                        (
                            convs[rng.random_range(0..convs.len())].clone(),
                            rng.random_range(0..30),
                        )
                    })
                    .collect();
                let per_conv = rng.random_range(0..20);
                // All in: which conversations fill a smaller total first is not promised.
                let got: Vec<(Vec<String>, bool)> = sides
                    .iter_mut()
                    .map(|s| {
                        let (msgs, truncated) =
                            s.db.catch_up(user, &resume, per_conv, 10_000)
                                .expect("catch up");
                        let mut norm = s.norm_all(&msgs);
                        norm.sort();
                        (norm, truncated)
                    })
                    .collect();
                assert_eq!(got[0], got[1], "{ctx}: catch-up");
            }
            8 => {
                let conv = &convs[rng.random_range(0..convs.len())];
                let after = rng.random_range(0..20);
                let through = rng.random_bool(0.5).then(|| rng.random_range(0..30));
                let limit = rng.random_range(0..10);
                let got: Vec<NormRange> = sides
                    .iter_mut()
                    .map(|s| {
                        let (msgs, more) =
                            s.db.conv_range(conv, after, through, limit).expect("range");
                        let norm = msgs
                            .iter()
                            .map(|a| (s.norm(&a.msg), a.except.clone()))
                            .collect();
                        (norm, more)
                    })
                    .collect();
                assert_eq!(got[0], got[1], "{ctx}: range");
            }
            _ => {
                if rng.random_bool(0.3) {
                    let keep = rng.random_range(3..15);
                    let rule = |_: &str| Retention {
                        max_age_days: None,
                        max_messages: Some(keep),
                    };
                    let now = conclave_server::store::now_ms();
                    let got: Vec<u64> = sides
                        .iter_mut()
                        .map(|s| s.db.apply_retention(now, &rule).expect("retention"))
                        .collect();
                    assert_eq!(got[0], got[1], "{ctx}: retention");
                }
            }
        }
    }
    for s in &sides {
        assert_eq!(s.db.integrity_check().expect("check"), "ok");
    }
}
