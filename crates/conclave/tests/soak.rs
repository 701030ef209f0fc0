//! Soak: a few hundred clients with churn against the real server binary for a bounded time,
//! reporting the server's memory, file descriptors and the delivery latency over time, and
//! checking that nothing grows.
//!
//! Ignored in the normal suite (it runs for minutes): `scripts/soak.sh` runs it in release mode
//! (`SOAK_SECS`, default 600; `SOAK_CLIENTS`, default 300; `SOAK_REPORT`, a CSV file of the
//! samples). Each client loops: connect and log in, chat in its room (rooms of 20) for a
//! random while, quit, stay away for a random while. Asserted at the end: resident memory
//! over the last quarter is not above the second quarter's by more than 10% + 16 MiB; the
//! descriptor count is back near its idle level once the clients are gone; every message
//! acknowledged to a sender reached the members of its room who were connected throughout
//! (counted, not required: churn makes "throughout" fuzzy) and no client saw an error other
//! than a disconnect it asked for.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use conclave_bench::conclave_driver::{BENCH_PASSWORD, account};
use conclave_client::proto::{Body, Event, Request, Target};
use conclave_client::{Auth, Client, ClientEvent, ConnectOptions, Reconnect, Trust};

const ROOM_SIZE: usize = 20;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// splitmix64.
fn rand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    /// Delivery latencies (µs) since the last sample.
    window: std::sync::Mutex<Vec<u64>>,
}

async fn virtual_user(
    i: usize,
    addr: String,
    fingerprint: String,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = 0x50A4 + i as u64;
    let user = account(i);
    let room = format!("soak-{}", i / ROOM_SIZE);
    // Bounded by the stop flag and by a count of sessions.
    for _ in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut opts = ConnectOptions::new(
            addr.clone(),
            Auth::Login {
                user: user.clone(),
                password: BENCH_PASSWORD.into(),
                server_password: None,
            },
        );
        opts.trust = Trust::Fingerprint(fingerprint.clone());
        opts.reconnect = Reconnect::never();
        let connected = tokio::time::timeout(Duration::from_secs(30), Client::connect(opts)).await;
        let Ok(Ok((client, mut events, _session))) = connected else {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        stats.connects.fetch_add(1, Ordering::Relaxed);
        // The first member makes the room (the others get `room_exists`), then joins.
        let _ = client
            .request(Request::CreateRoom {
                room: room.clone(),
                private: false,
                password: None,
            })
            .await;
        let _ = client
            .request(Request::Join {
                room: room.clone(),
                password: None,
            })
            .await;
        let reader = {
            let stats = stats.clone();
            tokio::spawn(async move {
                // Messages of the catch-up at login were sent while this client was away:
                // latency counts only live ones.
                let mut live = false;
                while let Some(ev) = events.recv().await {
                    if let ClientEvent::Server(Event::CaughtUp { .. }) = ev {
                        live = true;
                    }
                    if let ClientEvent::Server(Event::Message(m)) = ev {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        if !live {
                            continue;
                        }
                        let text = m.body.as_text().unwrap_or_default();
                        if let Some(t) = text
                            .strip_prefix("t=")
                            .and_then(|r| r.split(' ').next())
                            .and_then(|t| t.parse::<u64>().ok())
                        {
                            let us = conclave_bench::measure::now_ns().saturating_sub(t) / 1000;
                            stats.window.lock().expect("lock").push(us);
                        }
                    }
                }
            })
        };
        // Chat for 5 to 35 s, a message every 1 to 3 s.
        let session_end = Instant::now() + Duration::from_secs(5 + rand(&mut rng) % 30);
        while Instant::now() < session_end && !stop.load(Ordering::Relaxed) {
            let text = format!(
                "t={} from {user} soak chatter",
                conclave_bench::measure::now_ns()
            );
            let r = client
                .send(
                    Target::Room {
                        room: room.clone(),
                        except: vec![],
                    },
                    Body::text(text),
                    None,
                )
                .await;
            match r {
                Ok(_) => stats.sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
            };
            tokio::time::sleep(Duration::from_millis(1000 + rand(&mut rng) % 2000)).await;
        }
        let _ = client.quit().await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        // Away for 0 to 10 s.
        tokio::time::sleep(Duration::from_millis(rand(&mut rng) % 10_000)).await;
    }
}

/// One sample: seconds, RSS (KiB), descriptors, sessions, sent, received, p50 and p99 (ms).
type Row = (u64, u64, usize, u64, u64, u64, u64, u64);

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run scripts/soak.sh"]
async fn soak_with_churn_shows_no_growth() {
    let secs = env_u64("SOAK_SECS", 600);
    let clients = env_u64("SOAK_CLIENTS", 300) as usize;
    conclave_bench::net::raise_nofile(clients as u64 * 4 + 1024);
    let dir = tempfile::tempdir().expect("tempdir");
    conclave_bench::server_proc::create_accounts(dir.path(), clients).expect("accounts");
    // Every client comes from 127.0.0.1: the per-address limits (64 connections, 120 a
    // minute) are for strangers, not for this test.
    std::fs::write(
        dir.path().join("conclave.toml"),
        "[security]\nmax_connections_per_ip = 100000\nconnections_per_ip_per_minute = 1000000\n",
    )
    .expect("config");
    let srv = Server::start(dir.path(), &[], &[("CONCLAVE_LOG", "warn")]);
    let pid = srv.proc.pid();
    let idle_fds = fd_count(pid);
    let idle_rss = conclave_bench::measure::sample(pid).map_or(0, |s| s.rss_kib);

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..clients {
        tasks.push(tokio::spawn(virtual_user(
            i,
            srv.addr(),
            srv.fingerprint.clone(),
            stats.clone(),
            stop.clone(),
        )));
        // Ramp up over about 10 s.
        tokio::time::sleep(Duration::from_millis(10_000 / clients.max(1) as u64)).await;
    }

    let mut rows: Vec<Row> = Vec::new();
    println!("t_s,rss_kib,fds,connects,sent,received,p50_ms,p99_ms");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE_EVERY.min(deadline.saturating_duration_since(Instant::now())))
            .await;
        let rss = conclave_bench::measure::sample(pid).map_or(0, |s| s.rss_kib);
        let fds = fd_count(pid);
        let mut w = std::mem::take(&mut *stats.window.lock().expect("lock"));
        w.sort_unstable();
        let row = (
            started.elapsed().as_secs(),
            rss,
            fds,
            stats.connects.load(Ordering::Relaxed),
            stats.sent.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
            pct(&w, 0.5) / 1000,
            pct(&w, 0.99) / 1000,
        );
        println!(
            "{},{},{},{},{},{},{},{}",
            row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7
        );
        rows.push(row);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
    }
    // Connections close; descriptors go back (bounded wait).
    let mut end_fds = fd_count(pid);
    for _ in 0..100 {
        end_fds = fd_count(pid);
        if end_fds <= idle_fds + 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end_rss = conclave_bench::measure::sample(pid).map_or(0, |s| s.rss_kib);
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        let mut csv = String::from("t_s,rss_kib,fds,connects,sent,received,p50_ms,p99_ms\n");
        for r in &rows {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7
            ));
        }
        std::fs::write(path, csv).expect("report");
    }
    drop(srv);

    let q = rows.len() / 4;
    let mean = |s: &[Row]| s.iter().map(|r| r.1).sum::<u64>() / s.len().max(1) as u64;
    let (second, last) = (mean(&rows[q..2 * q]), mean(&rows[rows.len() - q..]));
    let p99s: Vec<u64> = rows.iter().map(|r| r.7).collect();
    let by_quarter: HashMap<usize, u64> = (0..4)
        .map(|k| {
            (
                k,
                p99s[k * q..(k + 1) * q].iter().copied().max().unwrap_or(0),
            )
        })
        .collect();
    println!(
        "soak: {secs} s, {clients} clients, {} sessions, {} messages sent, {} delivered, {} errors; RSS idle {idle_rss} KiB, 2nd quarter mean {second} KiB, last quarter mean {last} KiB, after {end_rss} KiB; fds idle {idle_fds}, after {end_fds}; worst p99 per quarter (ms) {:?}",
        stats.connects.load(Ordering::Relaxed),
        stats.sent.load(Ordering::Relaxed),
        stats.received.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        (0..4).map(|k| by_quarter[&k]).collect::<Vec<_>>(),
    );
    assert!(q >= 1, "long enough for quarters");
    assert!(
        last <= second + second / 10 + 16 * 1024,
        "memory grows: {second} KiB -> {last} KiB"
    );
    assert!(
        end_fds <= idle_fds + 8,
        "descriptors leak: idle {idle_fds}, after {end_fds}"
    );
}
