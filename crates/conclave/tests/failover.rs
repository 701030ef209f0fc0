//! Several `--server` addresses with the real binary: `conclave client --json --server A,B`
//! moving to B when A dies under a stream of messages, a list of dead addresses refused with
//! each named, `conclave doctor --server A,B` probing each, and a client through a real
//! HAProxy in TCP mode (TLS passes through it, so the fingerprint pin holds) that moves to
//! another backend when the one it used dies.
//!
//! The test kit's relays stand for the nodes of a cluster: each forwards to the same server.
//! Every wait is bounded by a timeout and every loop by a count.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::relay::{Relay, RelayConfig};
use common::{
    JsonClient, PW, PW_VAR, Polled, Server, WAIT, client_cmd, client_fails, conclave, run,
};
use serde_json::{Value, json};

/// Most lines read while waiting for a stream's messages.
const MAX_LINES: usize = 10_000;

fn add_users(data: &Path, names: &[&str]) {
    for name in names {
        let mut cmd = conclave(["user", "--data-dir"]);
        cmd.arg(data)
            .args(["add", name, "--password-env", PW_VAR])
            .env(PW_VAR, PW);
        run("user add", cmd).assert_success();
    }
}

/// A started server with accounts alice and bob.
fn server(data: &Path) -> Server {
    add_users(data, &["alice", "bob"]);
    Server::start(data, &[], &[])
}

fn json_client(server: &Server, list: &str, user: &str, state: &Path) -> JsonClient {
    let mut cmd = client_cmd(list, user, state, PW);
    cmd.args([
        "--fingerprint",
        &server.fingerprint,
        "--reconnect-for",
        "30",
    ]);
    JsonClient::connect(user, cmd)
}

/// `quit` for a client that saw a reconnect ([`JsonClient::quit`] requires none): the reply,
/// a clean exit, only JSON on stdout.
fn quit_after_a_move(mut c: JsonClient) {
    c.send(json!({"cmd": "quit", "id": "bye"}));
    c.ok(json!("bye"));
    c.proc.wait_exit(WAIT);
    let f = c.proc.finish();
    c.check_all_json(&f);
    f.assert_success();
}

/// A loopback address nothing listens on (bound, then released).
fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    drop(l);
    addr
}

/// What a stream sent: text → (conversation key, seq).
type Sent = HashMap<String, (String, u64)>;

fn conv_key(v: &Value) -> String {
    match v.get("room").and_then(Value::as_str) {
        Some(room) => format!("room {room}"),
        None => format!("direct {}", v["to"]),
    }
}

/// Alice sends `n` messages (odd ones to bob directly, even ones to the room), pausing
/// `pause` between them, and calls `at(i)` before message `i`; then collects every reply:
/// all `ok`, no (conversation, seq) twice.
fn stream(alice: &mut JsonClient, n: usize, pause: Duration, mut at: impl FnMut(usize)) -> Sent {
    for i in 0..n {
        at(i);
        let text = format!("alice {i:04}");
        let cmd = if i % 2 == 1 {
            json!({"cmd": "send", "to": ["bob"], "text": text, "id": i})
        } else {
            json!({"cmd": "send", "room": "general", "text": text, "id": i})
        };
        alice.send(cmd);
        std::thread::sleep(pause);
    }
    let mut sent = Sent::new();
    let mut seqs = HashSet::new();
    for i in 0..n {
        let r = alice.ok(json!(i));
        let seq = r["seq"].as_u64().expect("seq");
        let conv = if i % 2 == 1 { "direct" } else { "room" };
        assert!(seqs.insert((conv, seq)), "{conv} seq {seq} twice");
        sent.insert(format!("alice {i:04}"), (conv.to_string(), seq));
    }
    sent
}

/// Bob's `message` events until every text of `sent` came and a reconnect under way is
/// over (its catch-up's messages come before its `reconnected` event), bounded by lines and
/// time; and the `reconnected` events among them.
fn read_messages(bob: &mut JsonClient, sent: &Sent) -> (Vec<Value>, Vec<Value>) {
    let deadline = Instant::now() + WAIT * 3;
    let mut messages = Vec::new();
    let mut reconnected = Vec::new();
    let mut reconnecting = false;
    for _ in 0..MAX_LINES {
        let mine = messages
            .iter()
            .filter(|m: &&Value| m["from"] == "alice")
            .count();
        if (mine >= sent.len() && !reconnecting) || Instant::now() > deadline {
            break;
        }
        match bob.poll(Duration::from_millis(200)) {
            Polled::Line(v) if v["event"] == "message" => messages.push(v),
            Polled::Line(v) if v["event"] == "reconnected" => {
                reconnecting = false;
                reconnected.push(v);
            }
            Polled::Line(v) if v["event"] == "disconnected" => {
                assert_eq!(v["reconnecting"], true, "bob's session ended: {v}");
                reconnecting = true;
            }
            Polled::Line(_) | Polled::Quiet => {}
            Polled::Closed => panic!("bob's client ended"),
        }
    }
    (messages, reconnected)
}

/// Every message of `sent` reached bob exactly once, with its seq, and in order per
/// conversation.
fn check_once_in_order(messages: &[Value], sent: &Sent) {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut texts = HashSet::new();
    for m in messages.iter().filter(|m| m["from"] == "alice") {
        let text = m["text"].as_str().expect("text").to_string();
        let seq = m["seq"].as_u64().expect("seq");
        let (conv, sent_seq) = sent.get(&text).unwrap_or_else(|| panic!("unknown {m}"));
        assert_eq!(seq, *sent_seq, "{text}");
        assert_eq!(conv_key(m).split(' ').next(), Some(conv.as_str()), "{m}");
        if let Some(prev) = last.insert(conv.clone(), seq) {
            assert!(seq > prev, "{conv}: seq {seq} after {prev}");
        }
        assert!(texts.insert(text.clone()), "{text} delivered twice");
    }
    assert_eq!(texts.len(), sent.len(), "every message delivered");
}

#[test]
fn the_json_client_moves_to_the_second_address_when_the_first_dies_under_a_stream() {
    const N: usize = 120;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let srv = server(&data);
    let target = srv.addr().parse().expect("server address");
    let relay1 = Relay::start(target, RelayConfig::delay_ms(0.5, 1));
    let relay2 = Relay::start(target, RelayConfig::delay_ms(0.5, 2));
    let (a1, a2) = (relay1.addr(), relay2.addr());
    let state = tempfile::tempdir().expect("state");

    let mut bob = json_client(&srv, &format!("{a1},{a2}"), "bob", state.path());
    assert_eq!(bob.connected["server"], a1);
    assert_eq!(bob.connected["servers"], json!([a1, a2]));
    bob.expect("caught_up", |v| v["event"] == "caught_up");
    let mut alice = json_client(&srv, &srv.addr(), "alice", state.path());
    alice.expect("caught_up", |v| v["event"] == "caught_up");

    // A third of the way in, relay 1 dies: its connections are cut and its port refuses.
    let mut relay1 = Some(relay1);
    let sent = stream(&mut alice, N, Duration::from_millis(5), |i| {
        if i == N / 3 {
            drop(relay1.take());
        }
    });
    let (messages, reconnected) = read_messages(&mut bob, &sent);
    check_once_in_order(&messages, &sent);
    assert_eq!(reconnected.len(), 1, "{reconnected:?}");
    assert_eq!(reconnected[0]["server"], a2, "moved to the second address");

    // Bob's own sends go through the second address; the room's history has each message
    // once, in order.
    bob.send(json!({"cmd": "send", "room": "general", "text": "bob after the move", "id": "b"}));
    let r = bob.ok(json!("b"));
    bob.send(json!({"cmd": "history", "room": "general", "limit": 500, "id": "h"}));
    let history = bob.ok(json!("h"));
    let history = history["messages"].as_array().expect("messages");
    assert_eq!(history.len(), N / 2 + 1);
    for (k, m) in history.iter().enumerate() {
        assert_eq!(m["seq"], json!(k + 1));
    }
    assert_eq!(history.last().map(|m| &m["seq"]), Some(&r["seq"]));
    assert!(relay2.accepted() >= 1);
    alice.quit();
    quit_after_a_move(bob);
    srv.stop().assert_success();
}

#[test]
fn a_list_of_dead_addresses_fails_at_once_naming_each() {
    let state = tempfile::tempdir().expect("state");
    let (d1, d2) = (dead_addr(), dead_addr());
    let mut cmd = client_cmd(&format!("{d1},{d2}"), "bob", state.path(), PW);
    cmd.args(["--fingerprint", &"ab".repeat(32)]);
    let started = Instant::now();
    let f = client_fails("client", cmd);
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    for needle in [
        "could not connect to any of the 2 addresses in --server",
        &format!("could not connect to {d1}: connection refused"),
        &format!("could not connect to {d2}: connection refused"),
        "[connect]",
    ] {
        f.assert_stderr_has(needle);
    }
}

#[test]
fn doctor_probes_every_address_of_a_list() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let srv = server(&data);
    let target = srv.addr().parse().expect("server address");
    let relay1 = Relay::start(target, RelayConfig::delay_ms(0.0, 1));
    let relay2 = Relay::start(target, RelayConfig::delay_ms(0.0, 2));
    let list = format!("{},{}", relay1.addr(), relay2.addr());
    let mut cmd = conclave(["doctor", "--json", "--data-dir"]);
    cmd.arg(&data).args(["--server", &list]);
    let f = run("doctor", cmd);
    let report: Value = serde_json::from_str(f.stdout_text().trim()).expect("one JSON report");
    let probes: Vec<&Value> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["check"] == "tls_probe")
        .collect();
    assert_eq!(probes.len(), 2, "{report:#}");
    for (probe, relay) in probes.iter().zip([&relay1, &relay2]) {
        assert_eq!(probe["server"], relay.addr());
        assert_eq!(probe["status"], "ok", "{probe:#}");
        assert!(
            probe["summary"]
                .as_str()
                .is_some_and(|s| s.starts_with(&relay.addr()))
        );
        let findings = probe["findings"].to_string();
        assert!(
            findings.contains("the same certificate as in the data directory"),
            "{findings}"
        );
    }
    srv.stop().assert_success();
}

/// `haproxy` on PATH (Debian's package puts it in /usr/sbin).
fn haproxy_binary() -> Option<String> {
    ["haproxy", "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("-v")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_string)
}

/// The HAProxy configuration of docs/scaling.md, on loopback: TCP mode (TLS untouched),
/// `balance first` so that every connection goes to the first live node (the test then knows
/// which one to kill; a client that was not on it would never see a reconnect), health checks
/// once a second (each is a connection the server counts against the balancer's address), `on-marked-down shutdown-sessions` and `redispatch` so that clients
/// of a dead node are moved at once.
fn haproxy_config(listen: &str, nodes: &[String]) -> String {
    let mut cfg = format!(
        "global\n\
         \x20   maxconn 1024\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 5m\n\
         \x20   timeout server 5m\n\
         \x20   retries 2\n\
         \x20   option redispatch\n\
         frontend conclave\n\
         \x20   bind {listen}\n\
         \x20   default_backend conclave_nodes\n\
         backend conclave_nodes\n\
         \x20   balance first\n\
         \x20   default-server inter 1s fall 1 rise 2 on-marked-down shutdown-sessions\n"
    );
    for (i, node) in nodes.iter().enumerate() {
        cfg.push_str(&format!("    server node{} {node} check\n", i + 1));
    }
    cfg
}

#[test]
fn a_client_through_haproxy_in_tcp_mode_keeps_its_pin_and_survives_a_backend_dying() {
    let Some(haproxy) = haproxy_binary() else {
        eprintln!(
            "SKIPPED a_client_through_haproxy_in_tcp_mode_keeps_its_pin_and_survives_a_backend_dying: \
             the haproxy binary is missing (apt-get install haproxy; .ci/run installs it)"
        );
        return;
    };
    const N: usize = 60;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let srv = server(&data);
    let target = srv.addr().parse().expect("server address");
    let node1 = Relay::start(target, RelayConfig::delay_ms(0.3, 1));
    let node2 = Relay::start(target, RelayConfig::delay_ms(0.3, 2));
    let listen = dead_addr();
    let cfg_path = tmp.path().join("haproxy.cfg");
    std::fs::write(
        &cfg_path,
        haproxy_config(&listen, &[node1.addr(), node2.addr()]),
    )
    .expect("write haproxy.cfg");
    let mut check = Command::new(&haproxy);
    check.arg("-c").arg("-f").arg(&cfg_path);
    run("haproxy -c", check).assert_success();
    let mut cmd = Command::new(&haproxy);
    // -db: stay in the foreground (the test kit kills it when dropped).
    cmd.arg("-db").arg("-f").arg(&cfg_path);
    let _haproxy = common::Proc::spawn("haproxy", cmd);
    // Bounded: until the frontend accepts.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(&listen).is_err() {
        assert!(
            Instant::now() < deadline,
            "haproxy does not listen on {listen}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Bob through the balancer, pinned to the server's own fingerprint: TLS is end to end.
    let state = tempfile::tempdir().expect("state");
    let mut bob = json_client(&srv, &listen, "bob", state.path());
    assert_eq!(bob.connected["server"], listen);
    assert_eq!(bob.connected["fingerprint"], srv.fingerprint);
    assert_eq!(bob.connected["trust"], "fingerprint");
    assert_eq!(bob.connected["tls"], "TLS 1.3");
    bob.expect("caught_up", |v| v["event"] == "caught_up");
    let mut alice = json_client(&srv, &srv.addr(), "alice", state.path());
    alice.expect("caught_up", |v| v["event"] == "caught_up");

    // Node 1 dies mid-stream: HAProxy cuts its sessions and sends bob's reconnect to node 2.
    let mut node1 = Some(node1);
    let sent = stream(&mut alice, N, Duration::from_millis(10), |i| {
        if i == N / 3 {
            drop(node1.take());
        }
    });
    let (messages, reconnected) = read_messages(&mut bob, &sent);
    check_once_in_order(&messages, &sent);
    assert!(!reconnected.is_empty(), "bob reconnected through haproxy");
    assert!(reconnected.iter().all(|r| r["server"] == listen));
    assert!(node2.open() >= 1, "the reconnect went to node 2");
    alice.quit();
    quit_after_a_move(bob);
    srv.stop().assert_success();
}

/// The configuration shown in docs/scaling.md: the block between "```haproxy" and "```".
fn documented_haproxy_config() -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/scaling.md"
    ))
    .expect("docs/scaling.md");
    let mut lines = doc.lines().skip_while(|l| l.trim() != "```haproxy");
    assert!(
        lines.next().is_some(),
        "no ```haproxy block in docs/scaling.md"
    );
    let block: Vec<&str> = lines.take_while(|l| l.trim() != "```").collect();
    assert!(block.iter().any(|l| l.trim() == "mode tcp"), "{block:#?}");
    block.join("\n") + "\n"
}

#[test]
fn docs_haproxy_configuration_is_valid() {
    let cfg = documented_haproxy_config();
    let Some(haproxy) = haproxy_binary() else {
        eprintln!(
            "SKIPPED docs_haproxy_configuration_is_valid: the haproxy binary is missing \
             (apt-get install haproxy; .ci/run installs it)"
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write");
    let mut check = Command::new(&haproxy);
    check.arg("-c").arg("-f").arg(&path);
    let f = run("haproxy -c", check);
    f.assert_success();
}
