//! Cluster mode end to end: `conclave serve --store postgres://… --bus nats://… --node NAME`
//! processes on one throwaway PostgreSQL 15 and one nats-server (Debian's packages, started by
//! the test kits in temporary directories on loopback), the second node prepared by copying the
//! first node's data directory, real JSON clients on different nodes.
//!
//! - two nodes: the four addressings (room, direct, several recipients, a room with `except`)
//!   across nodes, each message once and in order, the same history on both;
//! - three nodes, one killed with SIGKILL under a stream: the clients on it move to another
//!   node (`--server A,B`), no acknowledged message is lost and none is shown twice;
//! - nats-server restarted under a stream: the nodes notice the gap and read the rest from
//!   PostgreSQL;
//! - an announcement, a kick and a ban made through one node act on the other node's
//!   connections, and a vote-kick counts the votes cast on both nodes;
//! - PostgreSQL stopped and started again under a stream: sends are refused with a clear error
//!   while it is down, the node connects again by itself, nothing acknowledged is lost or
//!   shown twice.
//!
//! Every wait is bounded by a timeout and every loop by a count.

mod common;

#[path = "../../conclave-server/tests/common/nats.rs"]
mod nats_kit;
#[path = "../../conclave-server/tests/common/postgres.rs"]
mod postgres_kit;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{JsonClient, PW, PW_VAR, Polled, Server, WAIT, client_cmd, conclave, run};
use serde_json::{Value, json};

/// Most lines read while waiting for messages.
const MAX_LINES: usize = 20_000;

/// A throwaway PostgreSQL and nats-server, and the nodes' data directories.
struct Cluster {
    pg: postgres_kit::PgServer,
    nats: nats_kit::NatsServer,
    tmp: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster {
            pg: postgres_kit::PgServer::start(),
            nats: nats_kit::NatsServer::start(),
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn store_url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/postgres",
            postgres_kit::SUPERUSER,
            self.pg.port
        )
    }

    fn data_dir(&self, node: &str) -> PathBuf {
        self.tmp.path().join(node)
    }

    fn start_node(&self, node: &str) -> Server {
        let data = self.data_dir(node);
        let (store, bus) = (self.store_url(), self.nats.url());
        // Every node keeps file contents in one shared directory (`[files] dir`); here a
        // directory of this machine stands for the shared mount.
        let config = self.tmp.path().join(format!("{node}.toml"));
        let shared_files = self.tmp.path().join("shared-files");
        std::fs::write(
            &config,
            format!("[files]\ndir = {:?}\n", shared_files.display().to_string()),
        )
        .expect("write the node's configuration");
        let config = config.display().to_string();
        Server::start(
            &data,
            &[
                "--config", &config, "--store", &store, "--bus", &bus, "--node", node,
            ],
            &[],
        )
    }

    /// Starts the first node once (creating its TLS identity, data key and the shared schema),
    /// adds the accounts through it, stops it, and copies its data directory for each other
    /// node: a copy of the first node's data directory prepares another (DESIGN.md).
    fn prepare(&self, nodes: &[&str], users: &[&str]) {
        self.prepare_with_admins(nodes, users, &[]);
    }

    /// [`Cluster::prepare`], `admins` with the admin role.
    fn prepare_with_admins(&self, nodes: &[&str], users: &[&str], admins: &[&str]) {
        let first = self.start_node(nodes[0]);
        for name in users {
            let mut cmd = conclave(["user", "--data-dir"]);
            cmd.arg(&first.data_dir)
                .args(["add", name, "--password-env", PW_VAR])
                .env(PW_VAR, PW);
            if admins.contains(name) {
                cmd.arg("--admin");
            }
            run("user add", cmd).assert_success();
        }
        first.stop().assert_success();
        for node in &nodes[1..] {
            copy_dir(&self.data_dir(nodes[0]), &self.data_dir(node));
        }
    }
}

/// `cp -a`, leaving out the admin socket (a live server's, gone after a clean stop anyway).
fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp -a failed");
    for entry in std::fs::read_dir(to).expect("read copy").flatten() {
        if entry.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        }) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn json_client(pin: &str, list: &str, user: &str, state: &Path) -> JsonClient {
    let mut cmd = client_cmd(list, user, state, PW);
    cmd.args(["--fingerprint", pin, "--reconnect-for", "60"]);
    let mut c = JsonClient::connect(user, cmd);
    c.expect("caught_up", |v| v["event"] == "caught_up");
    c
}

/// `quit`, tolerating reconnects seen before: the reply, a clean exit, only JSON on stdout.
fn quit(mut c: JsonClient) {
    c.send(json!({"cmd": "quit", "id": "bye"}));
    c.ok(json!("bye"));
    c.proc.wait_exit(WAIT);
    let f = c.proc.finish();
    c.check_all_json(&f);
    f.assert_success();
}

/// What was acknowledged: text → (conversation, seq).
type Sent = HashMap<String, (String, u64)>;

fn conv_of(v: &Value) -> String {
    match v.get("room").and_then(Value::as_str) {
        Some(room) => format!("room {room}"),
        None => {
            let mut users: Vec<String> = v["to"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            if let Some(from) = v["from"].as_str() {
                users.push(from.to_string());
            }
            users.sort();
            users.dedup();
            format!("direct {}", users.join(","))
        }
    }
}

/// `from` sends one direct message to `to` (whose first one makes the conversation's
/// end-to-end group: creation, commit and Welcome, requests that are not sent again after a
/// reconnect) and `to` reads it, so a stream that follows is only sends, each sent again with
/// its idempotency key when a connection breaks.
fn warm_up(from: &mut JsonClient, to: &mut JsonClient) {
    let to_name = to.user.clone();
    from.send(json!({"cmd": "send", "to": [to_name], "text": "warm-up", "id": "warm"}));
    from.ok(json!("warm"));
    to.message("warm-up");
}

/// `who` sends `n` messages, the odd ones to bob directly, the even ones to the room, calling
/// `at(i)` before message `i`; then collects every reply: each `ok`, no (conversation, seq)
/// twice.
fn stream(who: &mut JsonClient, n: usize, pause: Duration, mut at: impl FnMut(usize)) -> Sent {
    let me = who.user.clone();
    for i in 0..n {
        at(i);
        let text = format!("{me} {i:04}");
        let cmd = if i % 2 == 1 {
            json!({"cmd": "send", "to": ["bob"], "text": text, "id": i})
        } else {
            json!({"cmd": "send", "room": "general", "text": text, "id": i})
        };
        who.send(cmd);
        std::thread::sleep(pause);
    }
    let mut sent = Sent::new();
    let mut seqs = HashSet::new();
    for i in 0..n {
        let r = who.ok(json!(i));
        let seq = r["seq"].as_u64().expect("seq");
        let conv = if i % 2 == 1 { "direct" } else { "room" };
        assert!(
            seqs.insert((conv, seq)),
            "{conv} seq {seq} acknowledged twice"
        );
        sent.insert(format!("{me} {i:04}"), (conv.to_string(), seq));
    }
    sent
}

/// `reader`'s `message` events from `from` until every text of `sent` came and no reconnect
/// is under way, bounded by lines and time.
fn read_messages(reader: &mut JsonClient, from: &str, sent: &Sent) -> Vec<Value> {
    let deadline = Instant::now() + WAIT * 4;
    let mut messages: Vec<Value> = Vec::new();
    let mut reconnecting = false;
    for _ in 0..MAX_LINES {
        let have = messages
            .iter()
            .filter(|m| {
                m["from"] == from && m["text"].as_str().is_some_and(|t| sent.contains_key(t))
            })
            .count();
        if (have >= sent.len() && !reconnecting) || Instant::now() > deadline {
            break;
        }
        match reader.poll(Duration::from_millis(200)) {
            Polled::Line(v) if v["event"] == "message" => messages.push(v),
            Polled::Line(v) if v["event"] == "reconnected" => reconnecting = false,
            Polled::Line(v) if v["event"] == "disconnected" => {
                assert_eq!(v["reconnecting"], true, "the session ended: {v}");
                reconnecting = true;
            }
            Polled::Line(_) | Polled::Quiet => {}
            Polled::Closed => panic!("{}'s client ended", reader.user),
        }
    }
    messages
}

/// Every message of `sent` came exactly once, with its acknowledged seq, in order per
/// conversation.
fn check_once_in_order(messages: &[Value], from: &str, sent: &Sent) {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut texts = HashSet::new();
    for m in messages.iter().filter(|m| m["from"] == from) {
        let text = m["text"].as_str().expect("text").to_string();
        let seq = m["seq"].as_u64().expect("seq");
        let Some((conv, sent_seq)) = sent.get(&text) else {
            continue;
        };
        assert_eq!(seq, *sent_seq, "{text}: delivered with another seq");
        assert!(conv_of(m).starts_with(conv.as_str()), "{m}");
        if let Some(prev) = last.insert(conv.clone(), seq) {
            assert!(seq > prev, "{conv}: seq {seq} after {prev}");
        }
        assert!(texts.insert(text.clone()), "{text} delivered twice");
    }
    let missing: Vec<&String> = sent.keys().filter(|t| !texts.contains(*t)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}

/// The room's history as seen through `c`: (seq, text), oldest first.
fn history(c: &mut JsonClient, id: &str) -> Vec<(u64, String)> {
    c.send(json!({"cmd": "history", "room": "general", "limit": 500, "id": id}));
    let h = c.ok(json!(id));
    h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["text"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn two_nodes_deliver_every_addressing_across_nodes_once_and_in_order() {
    let cluster = Cluster::start();
    cluster.prepare(&["n1", "n2"], &["alice", "bob", "carol"]);
    let n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    assert_eq!(
        n1.fingerprint, n2.fingerprint,
        "one TLS identity for the cluster"
    );
    let pin = n1.fingerprint.clone();
    let state = tempfile::tempdir().expect("state");

    let mut alice = json_client(&pin, &n1.addr(), "alice", state.path());
    let mut bob = json_client(&pin, &n2.addr(), "bob", state.path());
    let mut carol = json_client(&pin, &n1.addr(), "carol", state.path());

    // The four addressings, from a node to the other and back.
    let sends = [
        json!({"cmd": "send", "room": "general", "text": "to the room", "id": "r"}),
        json!({"cmd": "send", "to": ["bob"], "text": "to bob", "id": "d"}),
        json!({"cmd": "send", "to": ["bob", "carol"], "text": "to both", "id": "m"}),
        json!({"cmd": "send", "room": "general", "text": "not for carol", "except": ["carol"], "id": "b"}),
    ];
    for s in &sends {
        alice.send(s.clone());
        let id = s["id"].clone();
        alice.ok(id);
    }
    for text in ["to the room", "to bob", "to both", "not for carol"] {
        bob.message(text);
    }
    for text in ["to the room", "to both"] {
        carol.message(text);
    }
    bob.send(json!({"cmd": "send", "to": ["alice"], "text": "bob answers", "id": "a"}));
    bob.ok(json!("a"));
    alice.message("bob answers");
    // Carol (on alice's node) never got the blockcast message: after a marker sent later in
    // the same room, it still has not come.
    alice.send(json!({"cmd": "send", "room": "general", "text": "marker", "id": "k"}));
    alice.ok(json!("k"));
    carol.message("marker");
    assert!(
        !carol.saw_message("not for carol"),
        "blockcast reached carol"
    );

    // A stream from n1 to n2, then from n2 to n1, interleaved in the room.
    let sent = stream(&mut alice, 60, Duration::from_millis(2), |_| {});
    check_once_in_order(&read_messages(&mut bob, "alice", &sent), "alice", &sent);
    let back = stream(&mut bob, 40, Duration::from_millis(2), |_| {});
    let room_back: Sent = back
        .iter()
        .filter(|(_, (c, _))| c == "room")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    check_once_in_order(
        &read_messages(&mut carol, "bob", &room_back),
        "bob",
        &room_back,
    );

    // One history, the same on both nodes, with no gap.
    let h1 = history(&mut alice, "h1");
    let h2 = history(&mut bob, "h2");
    assert_eq!(h1, h2, "the same history on both nodes");
    for (k, (seq, _)) in h1.iter().enumerate() {
        assert_eq!(*seq, k as u64 + 1, "history without a gap");
    }

    quit(alice);
    quit(bob);
    quit(carol);

    // The cluster's audit is in PostgreSQL too: each node's records, under its name.
    let key = conclave_server::at_rest::DataKey::load_or_create(&cluster.data_dir("n1"))
        .expect("the data key");
    let db = conclave_server::store_pg::PgDb::connect(&cluster.pg.tcp_config(), key)
        .expect("connect to the cluster's store");
    let deadline = Instant::now() + WAIT;
    loop {
        let n1_lines = db.audit_lines("n1", 10_000).expect("n1's audit");
        let n2_lines = db.audit_lines("n2", 10_000).expect("n2's audit");
        let login_of = |lines: &[String], user: &str| {
            lines.iter().any(|l| {
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|v| v["kind"] == "login_ok" && v["user"] == user)
            })
        };
        if login_of(&n1_lines, "alice")
            && login_of(&n1_lines, "carol")
            && login_of(&n2_lines, "bob")
        {
            assert!(!login_of(&n1_lines, "bob"), "bob logged in on n2 only");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the logins are not in the cluster's audit: n1 {n1_lines:?}, n2 {n2_lines:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    n1.stop().assert_success();
    n2.stop().assert_success();
}

#[test]
fn a_node_killed_under_a_stream_loses_and_duplicates_nothing() {
    const N: usize = 120;
    let cluster = Cluster::start();
    cluster.prepare(&["n1", "n2", "n3"], &["alice", "bob"]);
    let mut n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    let n3 = cluster.start_node("n3");
    let pin = n1.fingerprint.clone();
    let state = tempfile::tempdir().expect("state");

    // Both start on n1; bob would move to n2, alice to n3.
    let mut bob = json_client(
        &pin,
        &format!("{},{}", n1.addr(), n2.addr()),
        "bob",
        state.path(),
    );
    let mut alice = json_client(
        &pin,
        &format!("{},{}", n1.addr(), n3.addr()),
        "alice",
        state.path(),
    );
    assert_eq!(bob.connected["server"], n1.addr());
    warm_up(&mut alice, &mut bob);

    let sent = stream(&mut alice, N, Duration::from_millis(5), |i| {
        if i == N / 3 {
            n1.proc.kill9();
        }
    });
    let messages = read_messages(&mut bob, "alice", &sent);
    check_once_in_order(&messages, "alice", &sent);

    // After the move both are on live nodes, and the history has every message once.
    let h = history(&mut bob, "h");
    assert_eq!(h.len(), N / 2, "{h:?}");
    let texts: HashSet<&String> = h.iter().map(|(_, t)| t).collect();
    assert_eq!(texts.len(), N / 2, "no message stored twice");
    quit(alice);
    quit(bob);
    n2.stop().assert_success();
    n3.stop().assert_success();
}

#[test]
fn a_nats_restart_under_a_stream_is_filled_from_postgres() {
    const N: usize = 100;
    let mut cluster = Cluster::start();
    cluster.prepare(&["n1", "n2"], &["alice", "bob"]);
    let n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    let pin = n1.fingerprint.clone();
    let state = tempfile::tempdir().expect("state");
    let mut alice = json_client(&pin, &n1.addr(), "alice", state.path());
    let mut bob = json_client(&pin, &n2.addr(), "bob", state.path());
    warm_up(&mut alice, &mut bob);

    let sent = {
        let nats = &mut cluster.nats;
        stream(&mut alice, N, Duration::from_millis(5), |i| {
            if i == N / 4 {
                nats.kill();
            }
            if i == N / 2 {
                nats.restart();
            }
        })
    };
    check_once_in_order(&read_messages(&mut bob, "alice", &sent), "alice", &sent);
    // Live again after the restart.
    alice.send(json!({"cmd": "send", "to": ["bob"], "text": "after nats", "id": "x"}));
    alice.ok(json!("x"));
    bob.message("after nats");
    quit(alice);
    quit(bob);
    n1.stop().assert_success();
    n2.stop().assert_success();
}

/// What a stream that may meet refusals got: the acknowledged (as [`stream`] returns them)
/// and the refused, with their error replies.
struct Outcome {
    acked: Sent,
    refused: Vec<(String, Value)>,
}

/// [`stream`], where a send may be refused (its reply an error) instead of acknowledged.
fn stream_with_refusals(
    who: &mut JsonClient,
    n: usize,
    pause: Duration,
    mut at: impl FnMut(usize),
) -> Outcome {
    let me = who.user.clone();
    let mut out = Outcome {
        acked: Sent::new(),
        refused: Vec::new(),
    };
    let mut seqs = HashSet::new();
    for i in 0..n {
        at(i);
        let text = format!("{me} {i:04}");
        let cmd = if i % 2 == 1 {
            json!({"cmd": "send", "to": ["bob"], "text": text, "id": i})
        } else {
            json!({"cmd": "send", "room": "general", "text": text, "id": i})
        };
        who.send(cmd);
        // One at a time: the outcome of each send is known before the next one.
        let r = who.reply(json!(i));
        if r.get("error").is_some() {
            out.refused.push((text, r));
        } else {
            let seq = r["seq"].as_u64().expect("seq");
            let conv = if i % 2 == 1 { "direct" } else { "room" };
            assert!(
                seqs.insert((conv, seq)),
                "{conv} seq {seq} acknowledged twice"
            );
            out.acked.insert(text, (conv.to_string(), seq));
        }
        std::thread::sleep(pause);
    }
    out
}

#[test]
fn postgres_down_under_a_stream_refuses_sends_clearly_and_loses_nothing() {
    const N: usize = 90;
    let mut cluster = Cluster::start();
    cluster.prepare(&["n1", "n2"], &["alice", "bob"]);
    let n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    let pin = n1.fingerprint.clone();
    let state = tempfile::tempdir().expect("state");
    let mut alice = json_client(&pin, &n1.addr(), "alice", state.path());
    let mut bob = json_client(&pin, &n2.addr(), "bob", state.path());
    warm_up(&mut alice, &mut bob);

    // PostgreSQL is stopped (immediate, as a crash) a third of the way in and started again
    // at two thirds; the stream goes on throughout.
    let out = {
        let pg = &mut cluster.pg;
        stream_with_refusals(&mut alice, N, Duration::from_millis(20), |i| {
            if i == N / 3 {
                pg.stop();
            }
            if i == 2 * N / 3 {
                pg.restart();
            }
        })
    };
    assert!(
        !out.refused.is_empty(),
        "sends were refused while PostgreSQL was down"
    );
    for (text, r) in &out.refused {
        assert!(r.get("seq").is_none(), "{text}: not acknowledged: {r}");
        let error = r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            // A plain send: "could not be stored"; an end-to-end one, refused while its group's
            // lock is taken: "a storage error".
            error.contains("stor") && error.contains("try again"),
            "{text}: the refusal says what happened and what to do: {r}"
        );
    }
    let mut out = out;
    // The node connects again by itself (PostgreSQL may still be recovering from the crash
    // when the stream ends): sends are acknowledged again within a bounded time.
    let deadline = Instant::now() + WAIT * 3;
    for attempt in 0.. {
        let (id, text) = (format!("back{attempt}"), format!("alice back {attempt}"));
        alice.send(json!({"cmd": "send", "room": "general", "text": text, "id": id}));
        let r = alice.reply(json!(id));
        if r.get("error").is_none() {
            let seq = r["seq"].as_u64().expect("seq");
            out.acked.insert(text, ("room".to_string(), seq));
            break;
        }
        out.refused.push((text, r.clone()));
        assert!(
            Instant::now() < deadline && attempt < 200,
            "sends still refused long after PostgreSQL came back: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Everything acknowledged reaches bob on the other node once and in order, before,
    // during and after.
    check_once_in_order(
        &read_messages(&mut bob, "alice", &out.acked),
        "alice",
        &out.acked,
    );
    let h = history(&mut bob, "h");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &h {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    for (t, (conv, _)) in &out.acked {
        if conv == "room" {
            assert_eq!(counts.get(t.as_str()), Some(&1), "{t} once in history");
        }
    }
    // A refused send is not in the history, unless the connection broke while its commit was
    // under way (then it may have been stored, and is there once).
    for (t, _) in &out.refused {
        assert!(
            counts.get(t.as_str()).is_none_or(|n| *n == 1),
            "{t} stored twice"
        );
    }
    quit(alice);
    quit(bob);
    n1.stop().assert_success();
    n2.stop().assert_success();
}

#[test]
fn two_nodes_share_files_and_end_to_end_rooms() {
    let cluster = Cluster::start();
    cluster.prepare(&["n1", "n2"], &["alice", "bob"]);
    let n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    let pin = n1.fingerprint.clone();
    let (sa, sb) = (
        tempfile::tempdir().expect("state"),
        tempfile::tempdir().expect("state"),
    );
    let mut alice = json_client(&pin, &n1.addr(), "alice", sa.path());
    let mut bob = json_client(&pin, &n2.addr(), "bob", sb.path());

    // An end-to-end room made on n1; bob, on n2, is invited: his device's Welcome comes
    // through his node, and both read each other.
    alice.send(json!({"cmd": "create_room", "room": "sec", "private": true, "id": 1}));
    assert_eq!(alice.ok(json!(1))["e2ee"], true);
    alice.send(json!({"cmd": "invite", "room": "sec", "user": "bob", "id": 2}));
    alice.ok(json!(2));
    bob.expect("joined the group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "sec"
    });
    alice.send(json!({"cmd": "send", "room": "sec", "text": "secret from n1", "id": 3}));
    alice.ok(json!(3));
    let m = bob.message("secret from n1");
    assert_eq!(m["e2ee"], true, "{m}");
    bob.send(json!({"cmd": "send", "room": "sec", "text": "secret from n2", "id": 4}));
    bob.ok(json!(4));
    assert_eq!(alice.message("secret from n2")["e2ee"], true);
    // Several in a row each way: one order for both.
    for i in 0..10 {
        let (who, text) = if i % 2 == 0 {
            (&mut alice, format!("a{i}"))
        } else {
            (&mut bob, format!("b{i}"))
        };
        who.send(json!({"cmd": "send", "room": "sec", "text": text, "id": 100 + i}));
        who.ok(json!(100 + i));
    }
    bob.message("a8");
    alice.message("b9");
    let order = |c: &JsonClient| -> Vec<String> {
        c.seen
            .iter()
            .filter(|v| v["event"] == "message" && v["room"] == "sec")
            .filter_map(|v| v["text"].as_str().map(str::to_string))
            .filter(|t| t.len() <= 3)
            .collect()
    };
    let mine_a: Vec<String> = order(&alice);
    let mine_b: Vec<String> = order(&bob);
    // Each sees the other's, in the one order the store gave them.
    let others_a: Vec<&String> = mine_a.iter().filter(|t| t.starts_with('b')).collect();
    let others_b: Vec<&String> = mine_b.iter().filter(|t| t.starts_with('a')).collect();
    assert_eq!(others_a.len(), 5, "{mine_a:?}");
    assert_eq!(others_b.len(), 5, "{mine_b:?}");

    // A file uploaded through n1 is fetched through n2.
    let work = tempfile::tempdir().expect("work");
    let src = work.path().join("report.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &bytes).expect("write");
    alice.send(json!({"cmd": "send_file", "path": src, "to": ["bob"], "id": 5}));
    let sent = alice.ok(json!(5));
    let file_id = sent["file_id"].as_str().expect("file_id").to_string();
    let offer = bob.expect("a file offer", |v| v["event"] == "file_offer");
    assert_eq!(offer["file_id"], file_id.as_str());
    let down = tempfile::tempdir().expect("down");
    bob.send(json!({"cmd": "accept_file", "file_id": file_id, "dir": down.path(), "id": 6}));
    let got = bob.ok(json!(6));
    let path = got["path"].as_str().expect("path").to_string();
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
    alice.expect("file_received", |v| v["event"] == "file_received");

    quit(alice);
    quit(bob);
    n1.stop().assert_success();
    n2.stop().assert_success();
}

#[test]
fn announcements_kicks_and_bans_act_on_every_node() {
    let cluster = Cluster::start();
    cluster.prepare_with_admins(&["n1", "n2"], &["alice", "bob", "carol"], &["alice"]);
    let n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    let pin = n1.fingerprint.clone();
    let state = tempfile::tempdir().expect("state");
    let mut alice = json_client(&pin, &n1.addr(), "alice", state.path());
    let mut bob = json_client(&pin, &n2.addr(), "bob", state.path());
    let mut carol = json_client(&pin, &n2.addr(), "carol", state.path());

    // The operator's announcement on n1 reaches n2's connections.
    let mut cmd = conclave(["admin", "--data-dir"]);
    cmd.arg(cluster.data_dir("n1"))
        .args(["announce", "maintenance at five"]);
    run("admin announce", cmd).assert_success();
    for c in [&mut bob, &mut carol] {
        let a = c.expect("the announcement", |v| v["event"] == "announce");
        assert_eq!(a["text"], "maintenance at five");
    }

    // An admin on n1 removes bob from the room: bob and carol, on n2, see it, and bob's
    // sends to the room are refused there.
    alice.send(
        json!({"cmd": "kick", "room": "general", "user": "bob", "reason": "test", "id": "k"}),
    );
    alice.ok(json!("k"));
    for c in [&mut bob, &mut carol] {
        let k = c.expect("the kick", |v| v["event"] == "kicked");
        assert_eq!(k["room"], "general");
        assert_eq!(k["user"], "bob");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        bob.send(json!({"cmd": "send", "room": "general", "text": "still here?", "id": "s"}));
        let r = bob.reply(json!("s"));
        if r.get("error").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob still sends to the room on n2: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A ban through n1's operator console closes bob's connection on n2 and refuses his
    // next login there.
    let mut cmd = conclave(["admin", "--data-dir"]);
    cmd.arg(cluster.data_dir("n1"))
        .args(["ban", "bob", "--for", "1h", "--reason", "test"]);
    run("admin ban", cmd).assert_success();
    let d = bob.expect("the ban's disconnect", |v| v["event"] == "disconnected");
    assert_eq!(d["reason"], "banned", "{d}");
    let mut again = client_cmd(&n2.addr(), "bob", state.path(), PW);
    again.args(["--fingerprint", &pin]);
    let f = common::client_fails("bob again", again);
    assert!(
        f.stdout_text().contains("banned") || f.stderr.contains("banned"),
        "bob's login on n2 is refused as banned: {f:#?}"
    );

    quit(alice);
    quit(carol);
    n1.stop().assert_success();
    n2.stop().assert_success();
}

#[test]
fn a_vote_kick_counts_the_votes_of_every_node() {
    let cluster = Cluster::start();
    cluster.prepare(&["n1", "n2"], &["alice", "carol", "mallory"]);
    let n1 = cluster.start_node("n1");
    let n2 = cluster.start_node("n2");
    let pin = n1.fingerprint.clone();
    let state = tempfile::tempdir().expect("state");
    let mut alice = json_client(&pin, &n1.addr(), "alice", state.path());
    let mut carol = json_client(&pin, &n2.addr(), "carol", state.path());
    let mut mallory = json_client(&pin, &n2.addr(), "mallory", state.path());

    // One vote on n1: not enough (2 needed).
    alice.send(json!({"cmd": "votekick", "room": "general", "user": "mallory", "id": "v1"}));
    let r = alice.ok(json!("v1"));
    assert_eq!(r["votes"], 1, "{r}");
    assert_eq!(r["kicked"], false, "{r}");
    // The second on n2 counts the first: mallory is voted out there.
    let deadline = Instant::now() + WAIT;
    let kicked = loop {
        carol.send(json!({"cmd": "votekick", "room": "general", "user": "mallory", "id": "v2"}));
        let r = carol.reply(json!("v2"));
        assert!(r.get("error").is_none(), "{r}");
        if r["kicked"] == true {
            break r;
        }
        // n1's vote has not reached n2 yet: a vote again is the same vote.
        assert!(
            Instant::now() < deadline,
            "n1's vote never counted on n2: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(kicked["votes"], 2, "{kicked}");
    let k = mallory.expect("the vote's kick", |v| v["event"] == "kicked");
    assert_eq!(k["by"], "vote", "{k}");
    // And n1 sees it too.
    let k = alice.expect("the kick on n1", |v| v["event"] == "kicked");
    assert_eq!(k["user"], "mallory");
    mallory.send(json!({"cmd": "send", "room": "general", "text": "back?", "id": "s"}));
    let r = mallory.reply(json!("s"));
    assert!(
        r.get("error").is_some(),
        "a voted-out user still sends to the room: {r}"
    );

    quit(alice);
    quit(carol);
    quit(mallory);
    n1.stop().assert_success();
    n2.stop().assert_success();
}
