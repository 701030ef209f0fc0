//! The store thread's CPU per durably appended message, counted, not timed: a fixed number of
//! messages from concurrent senders (the workload of `store`'s `durable_append/100_senders`),
//! each acknowledged only after the sync that covers it, and then the CPU time each of the
//! store's threads used (`/proc/self/task/TID/schedstat`), per message.
//!
//! `cargo bench -p conclave-server --bench store_cpu [-- MESSAGES [SENDERS [RUNS]]]`
//! (defaults 200,000, 100 and 3). Wall-clock rates are printed too, but on a shared machine
//! only the CPU per message (and `perf stat -e instructions:u` on the whole binary, which runs
//! a fixed amount of work) compares one build with another. Method and figures:
//! docs/benchmarks.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use conclave_proto::{Body, Conv};
use conclave_server::at_rest::DataKey;
use conclave_server::store::{AppendJob, Db, Done, NewMessage, Store};
use tokio::sync::{mpsc, oneshot};

/// CPU time (on-CPU nanoseconds) of this process's threads named `name`.
fn thread_cpu_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// CPU time of the whole process (user and system), in nanoseconds.
fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

fn arg(n: usize, default: usize) -> usize {
    // Criterion-style flags (`--bench`) that cargo passes are skipped.
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let messages = arg(0, 200_000).max(1);
    let senders = arg(1, 100).clamp(1, 10_000);
    let runs = arg(2, 3).clamp(1, 100);
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "../../target".into());
    let dir = PathBuf::from(target).join("bench-data").join("store-cpu");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench directory");
    let key = DataKey::load_or_create(&dir).expect("key");
    let mut db = Db::open(&dir, key).expect("db");
    let batches = Arc::new(AtomicU64::new(0));
    let counted = batches.clone();
    db.on_commit(Box::new(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (sink, mut done) = mpsc::channel::<Done<oneshot::Sender<()>>>(16 * 1024);
    let (store, thread) = Store::start(db, sink);
    rt.spawn(async move {
        while let Some(d) = done.recv().await {
            if let Done::Appended { ctx, result } = d {
                assert!(result.is_ok(), "append failed: {result:?}");
                let _ = ctx.send(());
            }
        }
    });
    println!(
        "{messages} messages from {senders} senders, each acknowledged after its sync; CPU per message:"
    );
    let per = messages.div_ceil(senders);
    for run in 0..runs {
        let (store0, sync0, proc0, batches0) = (
            thread_cpu_ns("conclave-store"),
            thread_cpu_ns("conclave-sync"),
            process_cpu_ns(),
            batches.load(Ordering::Relaxed),
        );
        let started = Instant::now();
        rt.block_on(async {
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
                        // Bounded: a commit that never comes fails the run.
                        tokio::time::timeout(Duration::from_secs(60), rx)
                            .await
                            .expect("committed within a minute")
                            .expect("answered");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("sender");
            }
        });
        let wall = started.elapsed();
        let n = (per * senders) as f64;
        let us = |ns: u64| ns as f64 / 1000.0 / n;
        let commits = batches.load(Ordering::Relaxed) - batches0;
        println!(
            "run {}: {:.0} msg/s; store thread {:.2} µs, syncer {:.2} µs, whole process {:.2} µs; {} commits of {:.0} on average",
            run + 1,
            n / wall.as_secs_f64(),
            us(thread_cpu_ns("conclave-store") - store0),
            us(thread_cpu_ns("conclave-sync") - sync0),
            us(process_cpu_ns() - proc0),
            commits,
            n / commits.max(1) as f64,
        );
    }
    drop(store);
    thread.join();
    let _ = std::fs::remove_dir_all(&dir);
}
