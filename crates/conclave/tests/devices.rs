//! Your history on every device through `conclave client --json` against the real
//! `conclave serve` (issue 21): `device_waiting` on the old device, `approve_device` /
//! `reject_device` / `remove_device` (the device is out of the account and reads nothing
//! sent afterwards), `history_received` on the new one, `backup_enable` (the recovery key in
//! groups) and `--recovery-key-env` restoring on a fresh state directory; the key is found
//! nowhere in the server's data directory or its log.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn client(server: &Server, user: &str, state: &Path, register: bool) -> JsonClient {
    let mut cmd = client_cmd(&server.addr(), user, state, PW);
    if register {
        cmd.arg("--register");
    }
    cmd.args(["--fingerprint", &server.fingerprint]);
    JsonClient::connect(user, cmd)
}

fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[test]
fn json_devices_approve_reject_backup_and_restore() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[], &[]);
    let (sa, sb) = (tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path(), true);
    let mut bob = client(&server, "bob", sb.path(), true);
    alice.send(json!({"cmd": "create_room", "room": "lab", "id": 1}));
    alice.ok(json!(1));
    bob.send(json!({"cmd": "join", "room": "lab", "id": 2}));
    bob.ok(json!(2));
    for i in 0..5 {
        alice.send(
            json!({"cmd": "send", "room": "lab", "text": format!("old-{i}-orchid"), "id": 10 + i}),
        );
        alice.ok(json!(10 + i));
    }

    // A second device of Alice: the first one is told, with its safety number.
    let s2 = tempdir();
    let mut laptop = client(&server, "alice", s2.path(), false);
    laptop.send(json!({"cmd": "devices", "id": 20}));
    let me = laptop.ok(json!(20));
    let waiting = alice.expect("device_waiting", |v| {
        v["event"] == "e2ee" && v["kind"] == "device_waiting"
    });
    assert_eq!(waiting["device"], me["device"]);
    assert_eq!(waiting["safety_number"], me["fingerprint"]);
    assert!(waiting["address"].as_str().is_some_and(|a| !a.is_empty()));
    assert!(waiting["since"].as_i64().is_some_and(|t| t > 0));
    alice.send(json!({"cmd": "approve_device", "device": me["device"], "id": 21}));
    let approved = alice.ok(json!(21));
    assert_eq!(approved["messages"], 5);
    assert_eq!(approved["conversations"], 1);
    let got = laptop.expect("history_received", |v| {
        v["event"] == "e2ee" && v["kind"] == "history_received"
    });
    assert_eq!(
        (got["conversations"].clone(), got["messages"].clone()),
        (json!(1), json!(5))
    );
    // The approver's safety number, and that its key is the one the room's group shows.
    alice.send(json!({"cmd": "devices", "id": 24}));
    let approver = alice.ok(json!(24));
    assert_eq!(got["safety_number"], approver["fingerprint"]);
    assert_eq!(got["approver_in_group"], true);
    laptop.send(json!({"cmd": "history", "room": "lab", "limit": 50, "id": 22}));
    let h = laptop.ok(json!(22));
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        [
            "old-0-orchid",
            "old-1-orchid",
            "old-2-orchid",
            "old-3-orchid",
            "old-4-orchid"
        ]
    );
    laptop.send(json!({"cmd": "search", "query": "orchid", "id": 23}));
    assert_eq!(
        laptop.ok(json!(23))["results"].as_array().map(Vec::len),
        Some(5)
    );

    // A third one is rejected: it is told nothing, and an approval of a device that never
    // asked says so.
    let s3 = tempdir();
    let mut stranger = client(&server, "alice", s3.path(), false);
    let w = alice.expect("device_waiting", |v| v["kind"] == "device_waiting");
    alice.send(json!({"cmd": "reject_device", "device": w["device"], "id": 30}));
    alice.ok(json!(30));
    alice.send(json!({"cmd": "approve_device", "device": "00aa", "id": 31}));
    assert_eq!(alice.reply(json!(31))["error"]["code"], "not_found");
    // Rejected, it is out of the account: disconnected, and it never saw the history.
    let gone = stranger.expect("disconnected", |v| v["event"] == "disconnected");
    assert_eq!(gone["reason"], "kicked");
    stranger.proc.wait_exit(WAIT);
    let out = stranger.proc.finish();
    assert!(!out.stdout_text().contains("orchid"));

    // The backup: a recovery key in groups of four, shown once.
    alice.send(json!({"cmd": "backup_enable", "id": 40}));
    let key = alice.ok(json!(40))["recovery_key"]
        .as_str()
        .expect("recovery_key")
        .to_string();
    assert_eq!(key.split('-').count(), 13);
    alice.quit().assert_success();
    laptop.quit().assert_success();

    // Every device gone; a fresh one restores from the key.
    drop((sa, s2));
    let fresh = tempdir();
    let mut cmd = client_cmd(&server.addr(), "alice", fresh.path(), PW);
    cmd.args([
        "--fingerprint",
        &server.fingerprint,
        "--recovery-key-env",
        "CONCLAVE_TEST_RK",
    ])
    .env("CONCLAVE_TEST_RK", &key);
    let mut restored = JsonClient::connect("alice", cmd);
    let got = restored.expect("history_received", |v| {
        v["event"] == "e2ee" && v["kind"] == "history_received"
    });
    assert_eq!(got["from"], "backup");
    assert_eq!(got["messages"], 5);
    restored.send(json!({"cmd": "search", "query": "orchid", "id": 50}));
    assert_eq!(
        restored.ok(json!(50))["results"].as_array().map(Vec::len),
        Some(5)
    );
    restored.quit().assert_success();

    // A wrong key stops the client with an error.
    let other = tempdir();
    let mut cmd = client_cmd(&server.addr(), "alice", other.path(), PW);
    cmd.args([
        "--fingerprint",
        &server.fingerprint,
        "--recovery-key-env",
        "CONCLAVE_TEST_RK",
    ])
    .env(
        "CONCLAVE_TEST_RK",
        "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA",
    );
    run("client with a wrong key", cmd)
        .assert_failure()
        .assert_stderr_has("no backup under this recovery key");

    // Neither the key nor the text is anywhere in the server's data directory (database,
    // WAL, audit log) or its log output.
    let compact = key.replace('-', "");
    for needle in [key.as_bytes(), compact.as_bytes(), b"orchid"] {
        assert!(
            grep_dir(&data, needle).is_empty(),
            "found in the server's data directory"
        );
    }
    let log = server.proc.stderr();
    assert!(!log.contains(&key) && !log.contains(&compact));
    drop(bob.quit());
}

/// `remove_device` through `conclave client --json`: the removed device's client is told and
/// stops, it cannot sign in as that device again, and nothing sent afterwards appears in its
/// output or its state directory, while the others go on talking.
#[test]
fn json_remove_device_stops_it_and_it_reads_nothing_after() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[], &[]);
    let (sa, sb, sl) = (tempdir(), tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path(), true);
    let mut bob = client(&server, "bob", sb.path(), true);
    alice.send(json!({"cmd": "create_room", "room": "lab", "id": 1}));
    alice.ok(json!(1));
    bob.send(json!({"cmd": "join", "room": "lab", "id": 2}));
    bob.ok(json!(2));
    let mut laptop = client(&server, "alice", sl.path(), false);
    laptop.send(json!({"cmd": "devices", "id": 3}));
    let me = laptop.ok(json!(3));
    let w = alice.expect("device_waiting", |v| v["kind"] == "device_waiting");
    assert_eq!(w["device"], me["device"]);
    alice.send(json!({"cmd": "approve_device", "device": me["device"], "id": 4}));
    alice.ok(json!(4));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "before-lily", "id": 5}));
    bob.ok(json!(5));
    laptop.message("before-lily");

    alice.send(json!({"cmd": "remove_device", "device": me["device"], "id": 6}));
    let removed = alice.ok(json!(6));
    assert_eq!(removed["state"], "removed");
    let gone = laptop.expect("disconnected", |v| v["event"] == "disconnected");
    assert_eq!(gone["reason"], "kicked");
    laptop.proc.wait_exit(WAIT);
    let out = laptop.proc.finish();

    for i in 0..3 {
        let (a, b) = (format!("after-tulip-a{i}"), format!("after-tulip-b{i}"));
        alice.send(json!({"cmd": "send", "room": "lab", "text": a, "id": 10 + i}));
        alice.ok(json!(10 + i));
        bob.send(json!({"cmd": "send", "room": "lab", "text": b, "id": 20 + i}));
        bob.ok(json!(20 + i));
        bob.message(&a);
        alice.message(&b);
    }

    // The same state directory cannot come back as that device.
    let mut cmd = client_cmd(&server.addr(), "alice", sl.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    client_fails("the removed device", cmd).assert_stderr_has("removed");
    assert!(out.stdout_text().contains("before-lily"));
    assert!(!out.stdout_text().contains("tulip"));
    assert!(grep_dir(sl.path(), b"tulip").is_empty());
    alice.quit().assert_success();
    bob.quit().assert_success();
}
