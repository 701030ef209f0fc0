//! `conclave monitor` (JSON lines against a live server with traffic), `serve
//! --metrics-listen`, and `conclave doctor` (passes on a fresh server, fails on planted
//! problems), through the real binary.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn register(server: &Server, user: &str, state: &Path) -> JsonClient {
    let mut cmd = client_cmd(&server.addr(), user, state, PW);
    cmd.args(["--fingerprint", &server.fingerprint, "--register"]);
    JsonClient::connect(user, cmd)
}

fn parse(line: &str) -> Value {
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    assert!(v.is_object(), "{line}");
    v
}

fn connection<'a>(snapshot: &'a Value, user: &str) -> Option<&'a Value> {
    snapshot["connections"]
        .as_array()?
        .iter()
        .find(|c| c["user"] == user)
}

/// `GET /metrics` over plain HTTP; the body.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connects");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn monitor_prints_json_lines_that_follow_live_traffic_and_metrics_count_it() {
    let data = tempdir();
    let state = tempdir();
    let server = Server::start(data.path(), &["--metrics-listen", "127.0.0.1:0"], &[]);
    let metrics = server
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("Metrics: http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line in {:#?}", server.banner))
        .to_string();
    assert!(metrics.starts_with("127.0.0.1:"), "{metrics}");
    let mut alice = register(&server, "alice", state.path());
    let mut bob = register(&server, "bob", state.path());

    let mut cmd = conclave(["monitor", "--data-dir"]);
    cmd.arg(data.path())
        .args(["--interval", "0.2", "--count", "200", "--sort", "user"]);
    let mut monitor = Proc::spawn("monitor", cmd);
    let first = parse(&monitor.next_line(WAIT).expect("a first line"));
    for key in ["server", "totals", "connections", "alerts"] {
        assert!(first.get(key).is_some(), "no {key} in {first}");
    }
    assert!(first.get("ok").is_none(), "{first}");
    let a0 = connection(&first, "alice").unwrap_or_else(|| panic!("alice in {first:#}"));
    assert_eq!(a0["tls"], "TLS 1.3");
    assert_eq!(a0["key_exchange"], "X25519MLKEM768");
    assert_eq!(a0["ip"], "127.0.0.1");
    assert!(connection(&first, "bob").is_some(), "{first:#}");
    assert_eq!(first["totals"]["connections"], 2);
    let bytes_before = a0["bytes_in"].as_u64().expect("bytes_in");

    for i in 0..10 {
        let id = json!(format!("m{i}"));
        alice.send(
            json!({"cmd": "send", "room": "general", "text": format!("hello {i}"), "id": id}),
        );
        alice.ok(id);
    }
    for i in 0..10 {
        bob.message(&format!("hello {i}"));
    }
    // Within a few lines the monitor shows the messages, the bytes and a non-zero rate.
    let line = monitor.expect_line("the traffic", |l| {
        let v = parse(l);
        v["totals"]["messages_total"].as_u64() >= Some(10)
            && connection(&v, "alice").is_some_and(|a| {
                a["messages_in"] == 10 && a["bytes_in"].as_u64() > Some(bytes_before)
            })
    });
    let v = parse(&line);
    assert!(
        v["totals"]["deliveries_total"].as_u64() >= Some(10),
        "{v:#}"
    );
    let bob_row = connection(&v, "bob").expect("bob");
    assert!(bob_row["frames_out"].as_u64() >= Some(10), "{bob_row}");
    monitor.expect_line("a message rate", |l| {
        parse(l)["totals"]["messages_per_s"].as_f64() > Some(0.0)
    });
    drop(monitor);

    let body = scrape(&metrics);
    assert_eq!(
        sample(&body, "conclave_messages_total{kind=\"room\"}"),
        Some(10.0)
    );
    assert_eq!(
        sample(&body, "conclave_deliveries_total{kind=\"room\"}"),
        Some(10.0)
    );
    assert_eq!(sample(&body, "conclave_connections"), Some(2.0));
    assert_eq!(sample(&body, "conclave_registrations_total"), Some(2.0));

    alice.quit();
    bob.quit();
    server.stop().assert_success();
}

#[test]
fn monitor_without_a_server_says_so() {
    let data = tempdir();
    let mut cmd = conclave(["monitor", "--data-dir"]);
    cmd.arg(data.path()).args(["--count", "1"]);
    run("monitor", cmd)
        .assert_failure()
        .assert_stderr_has("cannot reach a running server");
    let mut cmd = conclave(["monitor", "--sort", "loudest", "--data-dir"]);
    cmd.arg(data.path());
    run("monitor", cmd).assert_failure();
}

/// `conclave doctor --data-dir D ARGS --json`: the exit and the report.
fn doctor(data: &Path, args: &[&str]) -> (Finished, Value) {
    let mut cmd = conclave(["doctor", "--json", "--data-dir"]);
    cmd.arg(data).args(args);
    let f = run("doctor", cmd);
    assert_eq!(f.stdout.len(), 1, "one JSON line: {f:#?}");
    let report = parse(&f.stdout[0]);
    (f, report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

fn findings(check: &Value) -> String {
    check["findings"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|x| format!("{}: {}", x["status"], x["text"]))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A TLS 1.3 server that offers only the classical X25519 (as a server built before
/// post-quantum key exchange, or a proxy in front of one, does) and answers the protocol hello;
/// serves `connections` connections, then stops.
fn classical_server(data: &Path, connections: usize) -> (String, std::thread::JoinHandle<()>) {
    let id = conclave_server::tls::load_or_create(data).expect("identity");
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .expect("config");
    let config = std::sync::Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let handle = std::thread::spawn(move || {
        for tcp in listener.incoming().take(connections) {
            let Ok(tcp) = tcp else { continue };
            let _ = tcp.set_read_timeout(Some(WAIT));
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut theirs = [0u8; conclave_proto::hello::HELLO_BYTES];
            if tls.read_exact(&mut theirs).is_ok() {
                let ours = conclave_proto::hello::encode(
                    conclave_proto::PROTOCOL_VERSION,
                    conclave_proto::hello::HelloStatus::Ok,
                );
                let _ = tls.write_all(&ours);
                let _ = tls.flush();
            }
        }
    });
    (addr, handle)
}

#[test]
fn doctor_warns_when_the_server_agrees_only_to_a_classical_key_exchange() {
    let data = tempdir();
    // Three probes: ours, X25519 only, TLS 1.2.
    let (addr, server) = classical_server(data.path(), 3);
    let (_, report) = doctor(data.path(), &["--server", &addr]);
    let probe = check(&report, "tls_probe");
    assert_eq!(probe["status"], "warn", "{probe:#}");
    let text = findings(probe);
    assert!(
        text.contains(
            "\"warn\": \"key exchange X25519 is classical although X25519MLKEM768 was offered"
        ),
        "{text}"
    );
    assert!(text.contains("TLS 1.2 refused"), "{text}");
    assert!(
        probe["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("classical key exchange X25519")),
        "{probe:#}"
    );
    server.join().expect("the classical server ends");
}

#[test]
fn doctor_passes_on_a_fresh_server_and_fails_on_planted_problems() {
    let data = tempdir();
    let server = Server::start(data.path(), &[], &[]);
    let addr = server.addr();

    let (f, report) = doctor(data.path(), &["--server", &addr]);
    f.assert_success();
    assert_eq!(report["ok"], true, "{report:#}");
    for c in report["checks"].as_array().expect("checks") {
        assert_eq!(c["status"], "ok", "{c:#}");
    }
    let probe = findings(check(&report, "tls_probe"));
    assert!(probe.contains("TLS 1.3 with TLS13_"), "{probe}");
    assert!(probe.contains("key exchange X25519MLKEM768"), "{probe}");
    assert!(
        probe.contains("a client offering only X25519 is still served (with X25519)"),
        "{probe}"
    );
    assert!(probe.contains("TLS 1.2 refused"), "{probe}");
    assert!(
        probe.contains(&colon_upper(&server.fingerprint)),
        "the fingerprint: {probe}"
    );
    assert!(
        probe.contains("the same certificate as in the data directory"),
        "{probe}"
    );
    let at_rest = check(&report, "plaintext_at_rest");
    assert!(
        findings(at_rest).contains("a fresh canary message was stored"),
        "{at_rest:#}"
    );
    assert!(findings(check(&report, "certificate")).contains("ECDSA P-256"));

    // The plain report says the same, for people.
    let mut cmd = conclave(["doctor", "--data-dir"]);
    cmd.arg(data.path());
    let f = run("doctor", cmd);
    f.assert_success();
    let text = f.stdout_text();
    assert!(text.contains("0 problems, 0 warnings."), "{text}");
    assert!(!text.contains("FAIL"), "{text}");

    // A private key others can read.
    let key = data.path().join("tls").join("key.pem");
    chmod(&key, 0o644);
    let (f, report) = doctor(data.path(), &[]);
    f.assert_failure();
    assert_eq!(report["ok"], false);
    let perms = check(&report, "permissions");
    assert_eq!(perms["status"], "fail", "{perms:#}");
    assert!(findings(perms).contains("tls/key.pem"), "{perms:#}");
    assert!(findings(perms).contains("0644"), "{perms:#}");
    let mut cmd = conclave(["doctor", "--data-dir"]);
    cmd.arg(data.path());
    let f = run("doctor", cmd);
    f.assert_failure();
    assert!(f.stdout_text().contains("FAIL  permissions"), "{f:#?}");
    chmod(&key, 0o600);

    // A canary's text in plaintext in the file store.
    let files = data.path().join("files");
    std::fs::create_dir_all(&files).expect("mkdir");
    chmod(&files, 0o700);
    let leak = files.join("upload-1.bin");
    let mut bytes = vec![0u8; 4096];
    bytes.extend_from_slice(
        format!(
            "{}00112233445566778899aabbccddeeff",
            conclave_server::canary::PREFIX
        )
        .as_bytes(),
    );
    std::fs::write(&leak, &bytes).expect("write");
    chmod(&leak, 0o600);
    let (f, report) = doctor(data.path(), &[]);
    f.assert_failure();
    let at_rest = check(&report, "plaintext_at_rest");
    assert_eq!(at_rest["status"], "fail", "{at_rest:#}");
    assert!(
        findings(at_rest).contains("files/upload-1.bin at byte 4096"),
        "{at_rest:#}"
    );
    assert_eq!(check(&report, "permissions")["status"], "ok");
    std::fs::remove_file(&leak).expect("rm");

    // A probe of something that is not this server.
    let (f, report) = doctor(data.path(), &["--server", "127.0.0.1:1"]);
    f.assert_failure();
    assert_eq!(check(&report, "tls_probe")["status"], "fail");

    // Stopped: checked at rest, still fine.
    server.stop().assert_success();
    let (f, report) = doctor(data.path(), &[]);
    f.assert_success();
    assert!(
        findings(check(&report, "server")).contains("no server runs"),
        "{report:#}"
    );
}

#[test]
fn doctor_flags_open_registration_beyond_loopback_and_limits_switched_off() {
    let data = tempdir();
    Server::start(data.path(), &[], &[]).stop().assert_success();
    let config = data.path().join("conclave.toml");
    std::fs::write(
        &config,
        "listen = \"0.0.0.0:7667\"\nregistration = \"open\"\n",
    )
    .expect("write");
    let (f, report) = doctor(data.path(), &[]);
    f.assert_failure();
    let s = check(&report, "settings");
    assert_eq!(s["status"], "fail", "{s:#}");
    assert!(
        findings(s).contains("registration is open on 0.0.0.0:7667"),
        "{s:#}"
    );

    std::fs::write(
        &config,
        "[security]\nauto_ban = false\n[anomaly]\nenabled = false\n",
    )
    .expect("write");
    let (f, report) = doctor(data.path(), &[]);
    f.assert_success();
    let s = check(&report, "settings");
    assert_eq!(s["status"], "warn", "{s:#}");
    assert!(findings(s).contains("auto_ban = false"), "{s:#}");
    assert!(findings(s).contains("anomaly.enabled = false"), "{s:#}");
    let (f, report) = doctor(data.path(), &["--strict"]);
    f.assert_failure();
    assert_eq!(report["warnings"], 1);

    let mut cmd = conclave(["doctor", "--data-dir"]);
    cmd.arg(data.path().join("nowhere"));
    run("doctor", cmd)
        .assert_failure()
        .assert_stderr_has("there is no data directory");
}
