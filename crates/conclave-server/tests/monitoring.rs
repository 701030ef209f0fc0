//! Seeing the traffic: the Prometheus endpoint (parsed, present, changing), the monitor's
//! snapshot over the admin socket, each anomaly rule firing on its pattern (alert in the
//! monitor, the audit log and the metrics, and its ban) and not on normal traffic, and the
//! canary that proves message text does not reach the disk.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use conclave_proto::*;
use conclave_server::config::AnomalyRule;
use conclave_server::{Config, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Polling step of the bounded waits below.
const STEP: Duration = Duration::from_millis(50);

/// Starts a test server; returns it with the metrics endpoint's address when it has one.
async fn start(tweak: impl FnOnce(&mut Config)) -> (TestServer, Option<SocketAddr>) {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    tweak(&mut config);
    let server = Server::bind(config).await.expect("server binds");
    let metrics = server.metrics_addr();
    let srv = TestServer {
        addr: server.local_addr(),
        fingerprint: server.fingerprint().to_string(),
        dir,
        token: server.shutdown_token(),
        handle: tokio::spawn(async move { server.run().await.expect("server runs") }),
    };
    (srv, metrics)
}

fn with_metrics(c: &mut Config) {
    c.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
}

/// Lets loopback be banned, so the rules' bans can be seen in a test.
fn bannable(c: &mut Config) {
    c.anomaly.never_ban = vec![];
}

fn rule(window_s: u64, per_address: u32, per_user: u32, ban_minutes: u64) -> AnomalyRule {
    AnomalyRule {
        enabled: Some(true),
        window_s: Some(window_s),
        per_address: Some(per_address),
        per_subnet: Some(0),
        per_user: Some(per_user),
        ban_minutes: Some(ban_minutes),
    }
}

// ---------------------------------------------------------------------------------------------
// The metrics endpoint
// ---------------------------------------------------------------------------------------------

/// `GET path` over plain HTTP/1.1; returns the status line, the headers and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("metrics connects");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        String::from_utf8(raw).expect("utf-8")
    };
    let text = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("metrics answer in time");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// Checks the text format strictly (the exposition format's grammar, as Prometheus reads it)
/// and returns every sample by `name{labels}`; also feeds it to an independent parser.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'), "the text ends with a line feed");
    for line in text.lines() {
        assert!(!line.trim().is_empty(), "no blank lines: {text}");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name), "{line}");
            assert!(!help.trim().is_empty(), "{line}");
            assert!(
                helped.insert(name.to_string()),
                "HELP once per family: {line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE once per family: {line}"
            );
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counters end in _total: {line}");
            }
            assert!(name.starts_with("conclave_"), "{line}");
            continue;
        }
        assert!(
            !line.starts_with('#'),
            "only HELP and TYPE comments: {line}"
        );
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let name = series.split('{').next().expect("name");
        assert!(valid_name(name), "{line}");
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels in braces: {line}"));
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(valid_name(k), "{line}");
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "a TYPE line comes before its samples: {line}"
        );
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
        };
        assert!(v >= 0.0, "no negative counts here: {line}");
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "each series once: {line}"
        );
    }
    // Histograms: cumulative buckets ending in +Inf, which equals _count.
    for (name, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(s, v)| {
                let le = s
                    .strip_prefix(&format!("{name}_bucket{{le=\""))?
                    .strip_suffix("\"}")?;
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le")
                    },
                    *v,
                ))
            })
            .collect();
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            sorted.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}: cumulative"
        );
        let inf = sorted.last().expect("buckets");
        assert!(inf.0.is_infinite(), "{name}: +Inf bucket");
        assert_eq!(
            Some(&inf.1),
            samples.get(&format!("{name}_count")),
            "{name}"
        );
        assert!(samples.contains_key(&format!("{name}_sum")), "{name}");
    }
    // An independent parser reads the same families.
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus-parse reads it");
    for name in types.keys() {
        assert!(
            scrape.samples.iter().any(|s| &s.metric == name),
            "prometheus-parse saw no {name}"
        );
    }
    for s in &scrape.samples {
        if types.get(&s.metric).map(String::as_str) == Some("histogram") {
            assert!(
                matches!(s.value, prometheus_parse::Value::Histogram(_)),
                "{} is a histogram",
                s.metric
            );
        }
    }
    samples
}

async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, headers, body) = http_get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    parse_exposition(&body)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {:#?}", m.keys()))
}

#[tokio::test]
async fn metrics_parse_are_present_and_follow_the_traffic() {
    let (srv, metrics) = start(with_metrics).await;
    let metrics = metrics.expect("metrics endpoint on");
    assert!(metrics.ip().is_loopback());
    let before = scrape(metrics).await;
    for series in [
        "conclave_up",
        "conclave_connections",
        "conclave_connections_accepted_total",
        "conclave_connections_refused_total{reason=\"banned\"}",
        "conclave_logins_total{result=\"ok\"}",
        "conclave_logins_total{result=\"failed\"}",
        "conclave_messages_total{kind=\"room\"}",
        "conclave_messages_total{kind=\"direct\"}",
        "conclave_deliveries_total{kind=\"room\"}",
        "conclave_deliveries_total{kind=\"catchup\"}",
        "conclave_network_receive_bytes_total",
        "conclave_network_transmit_bytes_total",
        "conclave_outbound_queue_frames",
        "conclave_store_queue_operations",
        "conclave_store_commit_seconds_count",
        "conclave_search_seconds_count",
        "conclave_file_bytes_total{direction=\"received\"}",
        "conclave_limits_hit_total{limit=\"malformed\"}",
        "conclave_bans_total{source=\"automatic\"}",
        "conclave_bans_active",
        "conclave_alerts_total{rule=\"failed_logins\"}",
    ] {
        get(&before, series);
    }
    assert_eq!(get(&before, "conclave_up"), 1.0);
    assert_eq!(get(&before, "conclave_connections"), 0.0);
    // Traffic: two users, four room messages, a direct one, a failed login, a search.
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    for i in 0..4 {
        assert!(
            alice
                .send_room("general", &format!("hello {i}"))
                .await
                .is_ok()
        );
    }
    let r = alice
        .request(Request::Send {
            target: Target::Users {
                to: vec!["bob".into()],
            },
            body: Body::text("psst"),
            idempotency_key: None,
            refs: None,
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
    for _ in 0..5 {
        bob.message().await;
    }
    let r = bob
        .request(Request::Search {
            query: "hello".into(),
            room: None,
            limit: 10,
            before: None,
        })
        .await;
    assert!(
        matches!(r, Ok(Reply::Results(ref v)) if v.len() == 4),
        "{r:?}"
    );
    let mut wrong = Raw::connect(&srv).await;
    let r = wrong
        .request(Request::Login {
            user: "alice".into(),
            password: "not the password".into(),
            server_password: None,
            resume: vec![],
        })
        .await;
    assert_eq!(code(r), ErrorCode::AuthFailed);

    let after = scrape(metrics).await;
    let delta = |s: &str| get(&after, s) - get(&before, s);
    assert_eq!(get(&after, "conclave_connections"), 3.0);
    assert_eq!(delta("conclave_connections_accepted_total"), 3.0);
    assert_eq!(delta("conclave_connections_established_total"), 3.0);
    assert_eq!(delta("conclave_registrations_total"), 2.0);
    assert_eq!(delta("conclave_logins_total{result=\"failed\"}"), 1.0);
    assert_eq!(delta("conclave_messages_total{kind=\"room\"}"), 4.0);
    assert_eq!(delta("conclave_messages_total{kind=\"direct\"}"), 1.0);
    // Room messages go to bob's connection (the sender gets a reply, not an event).
    assert_eq!(delta("conclave_deliveries_total{kind=\"room\"}"), 4.0);
    assert_eq!(delta("conclave_deliveries_total{kind=\"direct\"}"), 1.0);
    assert!(delta("conclave_store_commit_seconds_count") >= 1.0);
    assert!(delta("conclave_store_commit_seconds_sum") > 0.0);
    assert_eq!(delta("conclave_search_seconds_count"), 1.0);
    assert!(delta("conclave_network_receive_bytes_total") > 0.0);
    assert!(delta("conclave_network_transmit_bytes_total") > 0.0);
    assert!(delta("conclave_frames_received_total") >= 9.0);
    assert!(delta("conclave_frames_sent_total") >= 9.0);
    // A connection that ends moves its bytes to the closed total: counters never go back.
    drop(alice);
    drop(wrong);
    let deadline = Instant::now() + WAIT;
    let last = loop {
        let m = scrape(metrics).await;
        if get(&m, "conclave_connections") == 1.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "connections did not close");
        tokio::time::sleep(STEP).await;
    };
    for s in [
        "conclave_network_receive_bytes_total",
        "conclave_network_transmit_bytes_total",
        "conclave_frames_received_total",
        "conclave_frames_sent_total",
    ] {
        assert!(get(&last, s) >= get(&after, s), "{s} went back");
    }
    assert_eq!(
        get(&last, "conclave_disconnects_total{reason=\"quit\"}")
            - get(&before, "conclave_disconnects_total{reason=\"quit\"}"),
        2.0
    );
    // Only /metrics is served.
    let (status, _, _) = http_get(metrics, "/").await;
    assert!(status.contains(" 404 "), "{status}");
    srv.stop().await;
}

#[tokio::test]
async fn metrics_are_off_unless_asked_for() {
    let (srv, metrics) = start(|_| {}).await;
    assert_eq!(metrics, None);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The monitor's snapshot
// ---------------------------------------------------------------------------------------------

async fn monitor(srv: &TestServer) -> Value {
    let m = admin(srv, json!({"cmd": "monitor"})).await;
    assert_eq!(m["ok"], true, "{m}");
    m
}

/// Polls the monitor until `pred` holds (bounded).
async fn monitor_until(srv: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = monitor(srv).await;
        if pred(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "monitor never showed {what}: {m:#}"
        );
        tokio::time::sleep(STEP).await;
    }
}

#[tokio::test]
async fn the_monitor_shows_each_connection_with_rates_rtt_and_queue_and_the_totals() {
    let (srv, _) = start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let m = monitor(&srv).await;
    assert_eq!(m["server"]["registration"], "open");
    assert_eq!(m["server"]["server_password"], false);
    assert_eq!(m["connections_total"], 2);
    let c = &m["connections"][0];
    assert_eq!(c["user"], "alice");
    assert_eq!(c["ip"], "127.0.0.1");
    assert_eq!(c["tls"], "TLS 1.3");
    assert!(
        c["cipher"]
            .as_str()
            .is_some_and(|s| s.starts_with("TLS13_")),
        "{c}"
    );
    assert!(c["bytes_in"].as_u64().is_some_and(|n| n > 0), "{c}");
    assert!(c["frames_out"].as_u64().is_some_and(|n| n >= 1), "{c}");
    assert!(c["queue"].as_u64().is_some(), "{c}");
    // Traffic for a few seconds; the sampler turns it into rates.
    let sending = async {
        for i in 0..40 {
            assert!(alice.send_room("general", &format!("m{i}")).await.is_ok());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let receiving = async {
        for _ in 0..40 {
            bob.message().await;
        }
    };
    tokio::join!(sending, receiving);
    let m = monitor_until(&srv, "rates", |m| {
        m["totals"]["messages_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
            && m["connections"][0]["messages_per_s"]
                .as_f64()
                .is_some_and(|r| r > 0.0)
    })
    .await;
    let t = &m["totals"];
    assert_eq!(t["connections"], 2);
    assert_eq!(t["users_online"], 2);
    assert_eq!(t["messages_total"], 40);
    assert!(
        t["deliveries_total"].as_u64().is_some_and(|n| n >= 40),
        "{t}"
    );
    assert!(t["bytes_in_per_s"].as_f64().is_some_and(|r| r > 0.0), "{t}");
    assert!(
        t["store_commit_ms_mean"].is_number() || t["store_commits_per_s"] == 0.0,
        "{t}"
    );
    assert_eq!(t["logins_failed"], 0);
    let alice_row = &m["connections"][0];
    assert_eq!(alice_row["messages_in"], 40);
    assert!(
        alice_row["rtt_ms"].as_f64().is_some_and(|r| r > 0.0),
        "the kernel's RTT is sampled as data arrives: {alice_row}"
    );
    assert!(m["alerts"].as_array().is_some_and(|a| a.is_empty()), "{m}");
    // Sorting and limits.
    let m = admin(&srv, json!({"cmd": "monitor", "sort": "user", "limit": 1})).await;
    assert_eq!(m["connections"].as_array().map(Vec::len), Some(1));
    assert_eq!(m["connections_total"], 2);
    let m = admin(&srv, json!({"cmd": "monitor", "sort": "loudest"})).await;
    assert_eq!(m["error"]["code"], "bad_request", "{m}");
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Anomaly rules
// ---------------------------------------------------------------------------------------------

/// Audit records of `kind` so far (the writer syncs within a fraction of a second).
fn audit_records(dir: &Path, kind: &str) -> Vec<conclave_server::audit::Record> {
    conclave_server::audit::files(dir)
        .expect("audit files")
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| conclave_server::audit::parse_line(l).ok())
                .collect::<Vec<_>>()
        })
        .filter(|r| r.kind == kind)
        .collect()
}

/// Waits for an alert of `rule`; checks that the audit log and the metrics have it too.
async fn expect_alert(srv: &TestServer, metrics: SocketAddr, rule: &str) -> Value {
    let m = monitor_until(srv, rule, |m| {
        m["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["rule"] == rule))
    })
    .await;
    let alert = m["alerts"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["rule"] == rule))
        .cloned()
        .expect("alert");
    let deadline = Instant::now() + WAIT;
    loop {
        let found = audit_records(srv.dir.path(), "alert")
            .iter()
            .any(|r| r.extra.get("rule").and_then(Value::as_str) == Some(rule));
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {rule} alert in the audit log"
        );
        tokio::time::sleep(STEP).await;
    }
    let scraped = scrape(metrics).await;
    assert!(
        get(
            &scraped,
            &format!("conclave_alerts_total{{rule=\"{rule}\"}}")
        ) >= 1.0,
        "{rule} not counted"
    );
    alert
}

/// Asserts no alert at all so far (in the monitor and the metrics).
async fn expect_no_alerts(srv: &TestServer, metrics: SocketAddr) {
    let m = monitor(srv).await;
    assert_eq!(m["alerts"], json!([]), "{m:#}");
    let scraped = scrape(metrics).await;
    let total: f64 = scraped
        .iter()
        .filter(|(k, _)| k.starts_with("conclave_alerts_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 0.0);
}

async fn bans(srv: &TestServer) -> Vec<Value> {
    admin(srv, json!({"cmd": "bans"})).await["bans"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_connection_flood_alerts_and_bans_the_address_but_normal_connecting_does_not() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        bannable(c);
        c.anomaly.connection_flood = rule(30, 12, 0, 15);
    })
    .await;
    let metrics = metrics.expect("metrics");
    // Normal: a few clients connect and log in.
    let mut clients = Vec::new();
    for name in ["alice", "bob", "carol"] {
        clients.push(Raw::register(&srv, name).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect_no_alerts(&srv, metrics).await;
    // A flood: bare TCP connections, many at once.
    for _ in 0..12 {
        let s = TcpStream::connect(srv.addr).await.expect("connect");
        drop(s);
    }
    let alert = expect_alert(&srv, metrics, "connection_flood").await;
    assert_eq!(alert["scope"], "address");
    assert_eq!(alert["target"], "127.0.0.1");
    assert!(
        alert["action"]
            .as_str()
            .is_some_and(|a| a.starts_with("banned")),
        "{alert}"
    );
    let b = bans(&srv).await;
    assert!(
        b.iter()
            .any(|b| b["target"] == "127.0.0.1/32" && b["by"] == "server"),
        "{b:?}"
    );
    // The ban closed the live connections and refuses new ones before TLS.
    let (reason, _) = clients[0].disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Banned);
    assert!(
        Raw::try_connect(&srv).await.is_none(),
        "refused while banned"
    );
    let scraped = scrape(metrics).await;
    assert!(get(&scraped, "conclave_bans_total{source=\"automatic\"}") >= 1.0);
    assert!(get(&scraped, "conclave_bans_active") >= 1.0);
    assert!(!audit_records(srv.dir.path(), "ban").is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn the_default_never_ban_keeps_loopback_unbanned_but_still_alerts() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        c.anomaly.connection_flood = rule(30, 5, 0, 15);
    })
    .await;
    let metrics = metrics.expect("metrics");
    for _ in 0..5 {
        drop(TcpStream::connect(srv.addr).await.expect("connect"));
    }
    let alert = expect_alert(&srv, metrics, "connection_flood").await;
    assert!(
        alert["action"]
            .as_str()
            .is_some_and(|a| a.contains("never_ban")),
        "{alert}"
    );
    assert!(bans(&srv).await.is_empty());
    assert!(Raw::try_connect(&srv).await.is_some(), "not banned");
    srv.stop().await;
}

async fn failed_login(srv: &TestServer, user: &str) {
    let mut c = Raw::connect(srv).await;
    let r = c
        .request(Request::Login {
            user: user.into(),
            password: "wrong password".into(),
            server_password: None,
            resume: vec![],
        })
        .await;
    assert_eq!(code(r), ErrorCode::AuthFailed);
}

#[tokio::test]
async fn a_burst_of_failed_logins_alerts_per_address_and_per_account() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        bannable(c);
        c.anomaly.failed_logins = rule(60, 6, 3, 15);
    })
    .await;
    let metrics = metrics.expect("metrics");
    srv.add_user("alice", "password123", false);
    // Normal: one mistyped password, then the right one.
    failed_login(&srv, "alice").await;
    let _alice = Raw::login(&srv, "alice", "password123").await;
    expect_no_alerts(&srv, metrics).await;
    // Someone tries alice's account: the account alerts (never banned: it is the victim).
    failed_login(&srv, "alice").await;
    failed_login(&srv, "alice").await;
    let alert = expect_alert(&srv, metrics, "failed_logins").await;
    assert_eq!(alert["scope"], "user");
    assert_eq!(alert["target"], "alice");
    assert!(bans(&srv).await.is_empty());
    // One address tries many accounts: the address alerts and is banned.
    for i in 0..3 {
        failed_login(&srv, &format!("guess{i}")).await;
    }
    let m = monitor_until(&srv, "an address alert", |m| {
        m["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["scope"] == "address"))
    })
    .await;
    assert_eq!(m["totals"]["logins_failed"], 6);
    let b = bans(&srv).await;
    assert!(b.iter().any(|b| b["target"] == "127.0.0.1/32"), "{b:?}");
    srv.stop().await;
}

#[tokio::test]
async fn connections_that_never_finish_the_handshake_alert_as_a_scan() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        bannable(c);
        c.anomaly.handshake_scan = rule(60, 3, 0, 15);
    })
    .await;
    let metrics = metrics.expect("metrics");
    // Normal: clients that finish the handshake and leave, several times.
    for i in 0..4 {
        let c = Raw::register(&srv, &format!("user{i}")).await;
        drop(c);
    }
    let deadline = Instant::now() + WAIT;
    while monitor(&srv).await["totals"]["connections"] != 0 {
        assert!(Instant::now() < deadline, "connections did not close");
        tokio::time::sleep(STEP).await;
    }
    expect_no_alerts(&srv, metrics).await;
    assert_eq!(
        get(
            &scrape(metrics).await,
            "conclave_handshakes_incomplete_total"
        ),
        0.0
    );
    // A scanner: connects, says something that is not TLS, or nothing, and leaves.
    for i in 0..3 {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        if i % 2 == 0 {
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
        }
        drop(s);
    }
    let alert = expect_alert(&srv, metrics, "handshake_scan").await;
    assert_eq!(alert["target"], "127.0.0.1");
    assert_eq!(
        get(
            &scrape(metrics).await,
            "conclave_handshakes_incomplete_total"
        ),
        3.0
    );
    assert!(!bans(&srv).await.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn malformed_and_oversize_frames_alert() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        c.anomaly.bad_frames = rule(60, 2, 0, 0);
        c.limits.max_frame_bytes = 8 * 1024;
        c.limits.max_message_bytes = 4 * 1024;
    })
    .await;
    let metrics = metrics.expect("metrics");
    // One malformed frame: below the threshold.
    let mut bad = Raw::register(&srv, "mallory").await;
    bad.w
        .write_all(&frame_bytes(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff]))
        .await
        .expect("write");
    let (reason, _) = bad.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Malformed);
    expect_no_alerts(&srv, metrics).await;
    // An oversize one from the same address: the second bad frame alerts.
    let mut big = Raw::connect(&srv).await;
    big.w
        .write_all(&(1u32 << 30).to_be_bytes())
        .await
        .expect("write");
    big.w.flush().await.expect("flush");
    let (reason, _) = big.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::TooLarge);
    let alert = expect_alert(&srv, metrics, "bad_frames").await;
    assert!(
        alert["action"]
            .as_str()
            .is_some_and(|a| a.contains("ban_minutes = 0")),
        "{alert}"
    );
    let scraped = scrape(metrics).await;
    assert_eq!(
        get(&scraped, "conclave_limits_hit_total{limit=\"malformed\"}"),
        1.0
    );
    assert_eq!(
        get(&scraped, "conclave_limits_hit_total{limit=\"too_large\"}"),
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_message_flood_alerts_and_bans_the_user_but_chatting_does_not() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        c.anomaly.message_flood = rule(10, 0, 30, 1);
    })
    .await;
    let metrics = metrics.expect("metrics");
    let mut alice = Raw::register(&srv, "alice").await;
    let mut mallory = Raw::register(&srv, "mallory").await;
    // Normal: alice chats.
    for i in 0..5 {
        assert!(alice.send_room("general", &format!("hi {i}")).await.is_ok());
    }
    // Two sampler ticks see her messages.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    expect_no_alerts(&srv, metrics).await;
    // Mallory floods (within the per-connection rate limit's burst).
    for i in 0..40 {
        mallory
            .send_room_frame("general", &format!("spam {i}"))
            .await;
    }
    let alert = expect_alert(&srv, metrics, "message_flood").await;
    assert_eq!(alert["scope"], "user");
    assert_eq!(alert["target"], "mallory");
    assert!(alert["count"].as_u64().is_some_and(|n| n >= 30), "{alert}");
    let (reason, _) = mallory.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Banned);
    let b = bans(&srv).await;
    assert!(
        b.iter()
            .any(|b| b["kind"] == "user" && b["target"] == "mallory"),
        "{b:?}"
    );
    // Alice is unaffected.
    assert!(alice.send_room("general", "still here").await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn ordinary_use_with_the_default_rules_raises_no_alert() {
    let (srv, metrics) = start(|c| {
        with_metrics(c);
        bannable(c);
    })
    .await;
    let metrics = metrics.expect("metrics");
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(Raw::register(&srv, &format!("user{i}")).await);
    }
    failed_login(&srv, "user0").await;
    for round in 0..10 {
        for (i, u) in users.iter_mut().enumerate() {
            assert!(
                u.send_room("general", &format!("r{round} u{i}"))
                    .await
                    .is_ok()
            );
        }
    }
    // Reconnects.
    for i in 0..3 {
        drop(Raw::login(&srv, &format!("user{i}"), "password123").await);
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    expect_no_alerts(&srv, metrics).await;
    assert!(bans(&srv).await.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn reloading_applies_new_anomaly_rules() {
    let (srv, metrics) = start(with_metrics).await;
    let metrics = metrics.expect("metrics");
    let file = srv.dir.path().join("conclave.toml");
    std::fs::write(
        &file,
        "[anomaly.bad_frames]\nper_address = 1\nper_subnet = 0\nban_minutes = 0\n",
    )
    .expect("write config");
    // The test server was started without a file; point the reload at it.
    let r = admin(&srv, json!({"cmd": "reload"})).await;
    assert_eq!(r["ok"], true, "{r}");
    // The sampler applies new settings within a tick.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut bad = Raw::connect(&srv).await;
    bad.w
        .write_all(&frame_bytes(&[0xff; 9]))
        .await
        .expect("write");
    let _ = bad.disconnect_event().await;
    expect_alert(&srv, metrics, "bad_frames").await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The canary
// ---------------------------------------------------------------------------------------------

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    for _ in 0..10_000 {
        let Some(d) = stack.pop() else { break };
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn a_canary_is_stored_sealed_and_its_text_is_nowhere_on_disk() {
    let (srv, _) = start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    assert!(
        alice
            .send_room("general", "plaintext-probe-7f3a")
            .await
            .is_ok()
    );
    let r = admin(&srv, json!({"cmd": "canary"})).await;
    let canary = r["canary"].as_str().expect("canary text").to_string();
    assert!(
        canary.starts_with(conclave_server::canary::PREFIX),
        "{canary}"
    );
    // Durable (the WAL holds it) and sealed: its text is in no file of the data directory.
    let wal = srv.dir.path().join("conclave.db-wal");
    assert!(
        std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0),
        "the commit is in the WAL"
    );
    assert_eq!(
        files_containing(srv.dir.path(), canary.as_bytes()),
        Vec::<String>::new()
    );
    assert_eq!(
        files_containing(srv.dir.path(), conclave_server::canary::PREFIX.as_bytes()),
        Vec::<String>::new()
    );
    assert_eq!(
        files_containing(srv.dir.path(), b"plaintext-probe-7f3a"),
        Vec::<String>::new()
    );
    // Nobody receives it, and the scan would see plaintext if it were there.
    alice.no_message_within(Duration::from_millis(200)).await;
    std::fs::write(srv.dir.path().join("leak.bin"), canary.as_bytes()).expect("write");
    assert_eq!(files_containing(srv.dir.path(), canary.as_bytes()).len(), 1);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Key exchange groups
// ---------------------------------------------------------------------------------------------

/// A current client gets the hybrid post-quantum group; a client offering only X25519 (an older
/// build, another implementation) is still served, and the monitor, the admin socket's `who`
/// and `/metrics` tell the two apart.
#[tokio::test]
async fn connections_are_counted_by_key_exchange_group_and_a_classical_client_still_connects() {
    let (srv, metrics) = start(with_metrics).await;
    let metrics = metrics.expect("metrics endpoint on");
    let _pq = Raw::register(&srv, "alice").await;
    let mut classical =
        Raw::connect_with(srv.addr, classical_client_config(&srv.fingerprint)).await;
    let r = classical
        .request(Request::Register {
            user: "bob".into(),
            password: "password123".into(),
            server_password: None,
            invite_code: None,
        })
        .await;
    assert!(matches!(r, Ok(Reply::LoggedIn { .. })), "{r:?}");

    let m = monitor_until(&srv, "both connections", |m| {
        m["connections_total"] == 2 && m["connections"][1]["user"] == "bob"
    })
    .await;
    let by_user = |name: &str| {
        m["connections"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["user"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(by_user("alice")["key_exchange"], "X25519MLKEM768", "{m:#}");
    assert_eq!(by_user("bob")["key_exchange"], "X25519", "{m:#}");
    assert_eq!(
        m["totals"]["connections_by_key_exchange"],
        json!({"X25519MLKEM768": 1, "X25519": 1}),
        "{m:#}"
    );

    let who = admin(&srv, json!({"cmd": "who"})).await;
    let groups: Vec<&str> = who["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter_map(|c| c["key_exchange"].as_str())
        .collect();
    assert_eq!(groups.len(), 2, "{who}");
    assert!(
        groups.contains(&"X25519MLKEM768") && groups.contains(&"X25519"),
        "{who}"
    );

    let scraped = scrape(metrics).await;
    let gauge = |group: &str| {
        scraped
            .get(&format!(
                "conclave_connections_by_key_exchange{{group=\"{group}\"}}"
            ))
            .copied()
    };
    assert_eq!(gauge("X25519MLKEM768"), Some(1.0), "{scraped:?}");
    assert_eq!(gauge("X25519"), Some(1.0), "{scraped:?}");
    assert_eq!(gauge("secp256r1"), Some(0.0), "{scraped:?}");

    // The audit log's connect records name the group too.
    let deadline = Instant::now() + WAIT;
    loop {
        let groups: Vec<String> = audit_records(srv.dir.path(), "connect")
            .iter()
            .filter_map(|r| r.extra.get("key_exchange")?.as_str().map(str::to_string))
            .collect();
        if groups.len() == 2 {
            assert!(groups.contains(&"X25519MLKEM768".to_string()), "{groups:?}");
            assert!(groups.contains(&"X25519".to_string()), "{groups:?}");
            break;
        }
        assert!(Instant::now() < deadline, "connect records: {groups:?}");
        tokio::time::sleep(STEP).await;
    }
    srv.stop().await;
}
