//! Measures moving a device's end-to-end history to a newly approved device (issue 21): the
//! real server in-process (TLS, SQLite in a temporary directory), two real clients of one
//! account, the first device's history seeded with N messages (default 10,000, in 10 direct
//! conversations), then an
//! approval: the time until the new device says `history_received`, and the process's peak
//! resident memory (VmHWM: server and both clients) before and during the transfer.
//!
//!   cargo run --release -p conclave-client --example history_transfer -- 10000
//!
//! Run it with two sizes (10,000 and 40,000) to see that memory does not grow with the
//! history: chunks are read, sealed, stored, fetched and imported a few at a time.

use std::path::Path;
use std::time::{Duration, Instant};

use conclave_client::devices::DeviceNotice;
use conclave_client::e2ee::{E2eeNotice, device_dir};
use conclave_client::{Auth, Client, ClientEvent, ConnectOptions, Events, Trust};
use conclave_e2ee::device::Device;
use conclave_e2ee::payload::Payload;
use conclave_e2ee::transfer::Row;
use conclave_server::{Config, Server};

const PASSWORD: &str = "correct horse battery";
const WAIT: Duration = Duration::from_secs(600);

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Resets the peak so the next reading is the peak since now (Linux: 5 to clear_refs).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn connect(addr: &str, fingerprint: &str, state: &Path) -> (Client, Events) {
    let auth = Auth::Login {
        user: "alice".into(),
        password: PASSWORD.into(),
        server_password: None,
    };
    let mut opts = ConnectOptions::new(addr.to_string(), auth);
    opts.trust = Trust::fingerprint(fingerprint).expect("fingerprint");
    opts.state_dir = Some(state.to_path_buf());
    opts.request_timeout = WAIT;
    let (client, events, _) = Client::connect(opts).await.expect("connect");
    let events = client
        .enable_e2ee(events, state, PASSWORD)
        .await
        .expect("e2ee on");
    (client, events)
}

fn seed(dir: &Path, n: u64) {
    let device = Device::open(dir, "alice", PASSWORD).expect("device");
    let mut seq = 0u64;
    while seq < n {
        let rows: Vec<Row> = (seq..(seq + 1000).min(n))
            .map(|i| Row {
                state: None,
                conv: format!("d:alice,u{}", i % 10),
                seq: i + 1,
                sender: if i % 2 == 0 { "alice" } else { "bob" }.into(),
                ts_ms: 1_700_000_000_000 + i as i64,
                payload: Payload::Body {
                    content_type: "text/plain".into(),
                    data: format!("message number {i} of the benchmark, with a few words in it")
                        .into_bytes(),
                }
                .encode()
                .expect("encode"),
            })
            .collect();
        seq += rows.len() as u64;
        device.import_rows(&rows).expect("seed");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let data = tempfile::tempdir().expect("tempdir");
    {
        let config = Config::new(data.path());
        let mut db = conclave_server::server::open_db(&config).expect("db");
        db.ensure_public_room(&config.default_room).expect("room");
        let hash = conclave_server::accounts::hash_password(PASSWORD).expect("hash");
        db.create_user("alice", &hash, false).expect("user");
    }
    let mut config = Config::new(data.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addr().to_string();
    let fingerprint = server.fingerprint().to_string();
    let token = server.shutdown_token();
    let handle = tokio::spawn(async move { server.run().await.expect("server") });

    let first = tempfile::tempdir().expect("state");
    let started = Instant::now();
    seed(&device_dir(first.path(), &addr, "alice"), n);
    eprintln!("seeded {n} messages in {:?}", started.elapsed());
    let (first_client, mut first_events) = connect(&addr, &fingerprint, first.path()).await;
    let second = tempfile::tempdir().expect("state");
    let (second_client, mut second_events) = connect(&addr, &fingerprint, second.path()).await;
    let (id, _) = second_client.device_fingerprint().expect("device");
    tokio::time::timeout(WAIT, async {
        while let Some(e) = first_events.recv().await {
            if let ClientEvent::E2ee(E2eeNotice::Device(DeviceNotice::Waiting { device, .. })) = e
                && device == id
            {
                return;
            }
        }
    })
    .await
    .expect("device_waiting");

    let peak_before = status_kib("VmHWM:");
    let rss_before = status_kib("VmRSS:");
    reset_peak();
    let started = Instant::now();
    let report = first_client
        .approve_device(&id, |_, _| {})
        .await
        .expect("approve");
    let sent = started.elapsed();
    let got = tokio::time::timeout(WAIT, async {
        while let Some(e) = second_events.recv().await {
            if let ClientEvent::E2ee(E2eeNotice::Device(DeviceNotice::Received {
                conversations,
                messages,
                ..
            })) = e
            {
                return (conversations, messages);
            }
        }
        (0, 0)
    })
    .await
    .expect("history_received");
    let done = started.elapsed();
    let peak_during = status_kib("VmHWM:");
    let found = second_client
        .history(
            conclave_client::proto::ConvRef::With(vec!["u3".into()]),
            u32::MAX,
            None,
        )
        .await
        .expect("history");
    println!(
        "messages={n} chunks={} sent_s={:.2} received_s={:.2} conversations={} messages_received={} \
         in_history_with_u3={} rss_before_kib={rss_before} peak_before_kib={peak_before} \
         peak_during_kib={peak_during}",
        report.chunks,
        sent.as_secs_f64(),
        done.as_secs_f64(),
        got.0,
        got.1,
        found.len(),
    );
    drop((first_client, second_client));
    token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
}
