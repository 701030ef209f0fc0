//! Tiny runs against a real server (in this process, real TLS, a temporary data directory):
//! the report's invariants, never its speed.

use std::time::Duration;

use conclave_bench::{BenchArgs, Report, bench};
use conclave_server::{Config, Server};

struct TestServer {
    addr: String,
    fingerprint: String,
    dir: tempfile::TempDir,
    token: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

async fn start() -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    // As bench's own server: senders at full speed are not flooding.
    config.limits.requests_per_second = 1_000_000;
    config.limits.request_burst = 1_000_000;
    let server = Server::bind(config).await.expect("server binds");
    let addr = server.local_addr().to_string();
    let fingerprint = server.fingerprint().to_string();
    let token = server.shutdown_token();
    let handle = tokio::spawn(async move { server.run().await.expect("server runs") });
    TestServer {
        addr,
        fingerprint,
        dir,
        token,
        handle,
    }
}

impl TestServer {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

fn assert_ok(r: &Report) {
    assert_eq!(r.errors, 0, "errors: {:?}", r.error_samples);
    assert_eq!(r.disconnects, 0);
    assert!(r.complete, "{:?}", r.notes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fanout_delivers_every_message_to_every_other_member() {
    let srv = start().await;
    let args = BenchArgs {
        server: Some(srv.addr.clone()),
        fingerprint: Some(srv.fingerprint.to_uppercase()),
        data_dir: Some(srv.dir.path().to_path_buf()),
        // This process stands in for the server's: the figures exist, their values do not
        // matter here.
        server_pid: Some(std::process::id()),
        clients: Some(20),
        rooms: Some(2),
        senders: Some(2),
        messages: Some(50),
        timeout: Some(60),
        ..BenchArgs::default()
    };
    let r = bench(args, 1).await.expect("bench runs");
    assert_ok(&r);
    assert_eq!(r.clients_connected, 20);
    assert_eq!((r.sent, r.accepted), (100, 100));
    // Two rooms of 10; each message reaches the 9 members other than its sender.
    assert_eq!(r.expected_deliveries, 2 * 50 * 9);
    assert_eq!(r.deliveries, r.expected_deliveries);
    let l = &r.latency_ms;
    assert_eq!(l.samples, r.deliveries);
    let (p50, p90, p99, max) = (
        l.p50.unwrap(),
        l.p90.unwrap(),
        l.p99.unwrap(),
        l.max.unwrap(),
    );
    assert!(p50 <= p90 && p90 <= p99 && p99 <= max, "{l:?}");
    // The receivers (raw clients; the senders use the client library and receive nothing
    // here) also stamp each message's arrival at their socket: never later than the receipt
    // by their task.
    let s = &r.socket_latency_ms;
    assert!(
        s.samples > 0 && s.samples <= r.deliveries,
        "stamped receipts: {s:?}"
    );
    assert!(s.max.unwrap() <= max, "{s:?} against {l:?}");

    let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
    for key in [
        "deliveries_per_sec",
        "server_cpu_us_per_delivery",
        "server_rss_kib_per_conn",
        "errors",
    ] {
        assert!(!json[key].is_null(), "{key} in {json}");
    }
    for key in ["p50", "p90", "p99", "max"] {
        assert!(json["latency_ms"][key].is_number(), "latency_ms.{key}");
        assert!(
            json["socket_latency_ms"][key].is_number(),
            "socket_latency_ms.{key}"
        );
    }
    assert!(r.to_table().contains("deliveries per second"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_register_over_the_wire_and_stay_up() {
    let srv = start().await;
    let args = BenchArgs {
        server: Some(srv.addr.clone()),
        fingerprint: Some(srv.fingerprint.clone()),
        clients: Some(6),
        senders: Some(0),
        rooms: Some(0),
        hold: Some(1),
        timeout: Some(60),
        ..BenchArgs::default()
    };
    let r = bench(args.clone(), 1).await.expect("bench runs");
    assert_ok(&r);
    assert_eq!(r.clients_connected, 6);
    assert_eq!(r.deliveries, 0);
    assert!(r.server_rss_kib_per_conn.is_none(), "no --server-pid");
    // The accounts exist now: a second run logs in to them.
    let again = bench(args, 1).await.expect("bench runs");
    assert_ok(&again);
    assert_eq!(again.clients_connected, 6);
    srv.stop().await;
}
