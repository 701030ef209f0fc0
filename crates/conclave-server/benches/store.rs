//! Store benchmarks: durable appends with group commit (1, 10 and 100 concurrent senders),
//! a history page of 100, and search, on a history of 1,000,000 messages.
//!
//! `cargo bench -p conclave-server --bench store`. The million-message database is built once
//! (about a minute) under `target/bench-data/` and reused. Method and figures:
//! docs/benchmarks.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use conclave_proto::{Body, Conv};
use conclave_server::at_rest::DataKey;
use conclave_server::search;
use conclave_server::store::{AppendJob, Db, Done, NewMessage, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::sync::{mpsc, oneshot};

const HISTORY_MESSAGES: u64 = 1_000_000;
const ROOMS: u64 = 10;

/// A deterministic vocabulary and a Zipf-like word picker, so the index has common and rare
/// words like real chat.
struct Words {
    vocab: Vec<String>,
    state: u64,
}

impl Words {
    fn new() -> Words {
        let vocab = (0..20_000).map(|i| format!("w{i:05}")).collect();
        Words {
            vocab,
            state: 0x9E37_79B9_7F4A_7C15,
        }
    }
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn word(&mut self) -> &str {
        // Squaring a uniform number skews towards small indexes (common words).
        let u = (self.next_u64() % 10_000) as f64 / 10_000.0;
        let i = ((u * u) * self.vocab.len() as f64) as usize;
        &self.vocab[i.min(self.vocab.len() - 1)]
    }
    fn sentence(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| self.word().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn bench_dir(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "../../target".into());
    let dir = PathBuf::from(target).join("bench-data").join(name);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The million-message database, built on first use.
fn big_db() -> Db {
    let dir = bench_dir("million");
    let ready = dir.join("ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        let key = DataKey::load_or_create(&dir).expect("key");
        let mut db = Db::open(&dir, key).expect("db");
        let mut words = Words::new();
        let started = Instant::now();
        let batch_size = 10_000;
        for b in 0..HISTORY_MESSAGES / batch_size {
            let batch: Vec<NewMessage> = (0..batch_size)
                .map(|i| NewMessage {
                    conv: Conv::Room(format!("room{}", (b * batch_size + i) % ROOMS)),
                    from: "bench".into(),
                    body: Body::text(words.sentence(8)),
                    except: vec![],
                    idempotency_key: None,
                    refs: None,
                })
                .collect();
            db.append_batch(&batch).expect("append");
        }
        eprintln!(
            "built {HISTORY_MESSAGES} messages in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        std::fs::write(&ready, b"ok").expect("mark");
    }
    let key = DataKey::load_or_create(&dir).expect("key");
    Db::open(&dir, key).expect("db")
}

fn durable_appends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = bench_dir("appends");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    let key = DataKey::load_or_create(&dir).expect("key");
    let db = Db::open(&dir, key).expect("db");
    let (sink, mut done) = mpsc::channel::<Done<oneshot::Sender<()>>>(16 * 1024);
    let (store, _thread) = Store::start(db, sink);
    rt.spawn(async move {
        while let Some(d) = done.recv().await {
            if let Done::Appended { ctx, .. } = d {
                let _ = ctx.send(());
            }
        }
    });
    let mut group = c.benchmark_group("durable_append");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    for senders in [1usize, 10, 100] {
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{senders}_senders")),
            &senders,
            |b, &senders| {
                b.to_async(&rt).iter_custom(|iters| {
                    let store = store.clone();
                    async move {
                        let per = (iters as usize).div_ceil(senders);
                        let started = Instant::now();
                        let mut tasks = Vec::new();
                        for s in 0..senders {
                            let store = store.clone();
                            tasks.push(tokio::spawn(async move {
                                for i in 0..per {
                                    let (tx, rx) = oneshot::channel();
                                    store
                                        .append(AppendJob {
                                            msg: NewMessage {
                                                conv: Conv::Room(format!("r{}", s % 10)),
                                                from: format!("u{s}"),
                                                body: Body::text(format!(
                                                    "message {i} from sender {s} about the deploy"
                                                )),
                                                except: vec![],
                                                idempotency_key: None,
                                                refs: None,
                                            },
                                            ctx: tx,
                                        })
                                        .await
                                        .expect("queued");
                                    rx.await.expect("committed");
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.expect("sender");
                        }
                        // Per message: the total over the messages actually sent.
                        started
                            .elapsed()
                            .mul_f64(iters as f64 / (per * senders) as f64)
                    }
                })
            },
        );
    }
    group.finish();
}

/// One transaction of 1000 appends, called directly: the per-message cost of the store without
/// any waiting for senders.
fn append_batch(c: &mut Criterion) {
    let dir = bench_dir("batch");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    let key = DataKey::load_or_create(&dir).expect("key");
    let mut db = Db::open(&dir, key).expect("db");
    let mut words = Words::new();
    let mut group = c.benchmark_group("append_batch");
    group.throughput(Throughput::Elements(1000));
    for (name, idem) in [("1000_plain", false), ("1000_with_idempotency_keys", true)] {
        let mut n = 0u64;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    (0..1000)
                        .map(|i| {
                            n += 1;
                            NewMessage {
                                conv: Conv::Room(format!("room{}", i % 10)),
                                from: format!("u{}", i % 100),
                                body: Body::text(words.sentence(8)),
                                except: vec![],
                                idempotency_key: idem.then(|| format!("k{n}")),
                                refs: None,
                            }
                        })
                        .collect::<Vec<_>>()
                },
                |batch| db.append_batch(&batch).expect("append"),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn history_and_search(c: &mut Criterion) {
    let mut db = big_db();
    let room = Conv::Room("room3".into());
    let mut group = c.benchmark_group("million");
    group.bench_function("history_page_100_newest", |b| {
        b.iter(|| db.history(&room, "bench", None, 100).expect("history"))
    });
    group.bench_function("history_page_100_deep", |b| {
        b.iter(|| {
            db.history(&room, "bench", Some(50_000), 100)
                .expect("history")
        })
    });
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("room{r}")).collect();
    for (name, q) in [
        ("search_rare_word", "w19999"),
        ("search_two_words", "w00100 w00200"),
        ("search_common_word", "w00001"),
    ] {
        let words = search::words(q);
        group.bench_function(name, |b| {
            b.iter(|| {
                db.search("bench", &rooms, false, &words, None, 50)
                    .expect("search")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append_batch, durable_appends, history_and_search);
criterion_main!(benches);
