//! File transfer through `conclave client --json` against the real `conclave serve`: the
//! contract's `send_file` / `accept_file`, their events, and the window option.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn client(server: &Server, user: &str, state: &Path, extra: &[&str]) -> JsonClient {
    let mut cmd = client_cmd(&server.addr(), user, state, PW);
    cmd.args(["--register", "--fingerprint", &server.fingerprint]);
    cmd.args(extra);
    JsonClient::connect(user, cmd)
}

fn write_file(path: &Path, size: usize) -> String {
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(path, &data).expect("write");
    hex::encode(Sha256::digest(&data))
}

#[test]
fn json_send_file_and_accept_file_with_progress_and_done() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let (sa, sb, sc) = (tempdir(), tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path(), &["--window", "256K"]);
    let mut bob = client(&server, "bob", sb.path(), &[]);
    let mut carol = client(&server, "carol", sc.path(), &[]);
    let work = tempdir();
    let src = work.path().join("report.bin");
    let sha = write_file(&src, 3 * 1024 * 1024 + 5);

    alice.send(json!({"cmd": "send_file", "path": src, "room": "general",
                      "except": ["carol"], "id": 1}));
    let sent = alice.ok(json!(1));
    let file_id = sent["file_id"].as_str().expect("file_id").to_string();
    assert_eq!(sent["sha256"], sha.as_str());
    assert_eq!(sent["size"], 3 * 1024 * 1024 + 5);
    let up = alice.expect("upload progress", |v| v["event"] == "file_progress");
    assert_eq!(up["direction"], "upload");
    assert_eq!(up["file_id"], file_id.as_str());

    let offer = bob.expect("a file offer", |v| v["event"] == "file_offer");
    assert_eq!(offer["file_id"], file_id.as_str());
    assert_eq!(offer["from"], "alice");
    assert_eq!(offer["room"], "general");
    assert_eq!(offer["except"], json!(["carol"]));
    assert_eq!(offer["name"], "report.bin");
    assert_eq!(offer["sha256"], sha.as_str());
    assert_eq!(offer["relay_ready"], true);

    let down = tempdir();
    bob.send(json!({"cmd": "accept_file", "file_id": file_id, "dir": down.path(), "id": 2}));
    let got = bob.ok(json!(2));
    assert_eq!(got["via"], "relay");
    let path = got["path"].as_str().expect("path").to_string();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&src).unwrap());
    let done = bob.expect("file_done", |v| v["event"] == "file_done");
    assert_eq!(done["direction"], "download");
    assert!(
        bob.seen
            .iter()
            .any(|v| v["event"] == "file_progress" && v["direction"] == "download")
    );
    let rec = alice.expect("file_received", |v| v["event"] == "file_received");
    assert_eq!(rec["by"], "bob");

    // Carol, excepted, has no offer, and accepting by id is refused.
    carol.send(json!({"cmd": "files", "id": 3}));
    assert_eq!(carol.ok(json!(3))["files"], json!([]));
    carol.send(json!({"cmd": "accept_file", "file_id": file_id, "dir": down.path(), "id": 4}));
    let r = carol.reply(json!(4));
    assert_eq!(r["error"]["code"], "not_found", "{r}");

    // Errors of the contract's file commands are clear and typed.
    alice.send(json!({"cmd": "send_file", "path": work.path().join("missing"), "room": "general", "id": 5}));
    let r = alice.reply(json!(5));
    assert_eq!(r["error"]["code"], "path_not_found", "{r}");
    alice.send(json!({"cmd": "send_file", "path": src, "room": "general", "window": 10, "id": 6}));
    let r = alice.reply(json!(6));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    alice.send(
        json!({"cmd": "send_file", "path": src, "room": "general", "p2p": true,
                      "congestion": "warp", "id": 8}),
    );
    let r = alice.reply(json!(8));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("bbr"),
        "{r}"
    );
    bob.send(json!({"cmd": "decline_file", "file_id": "not-an-id", "id": 7}));
    let r: Value = bob.reply(json!(7));
    assert_eq!(r["error"]["code"], "not_found", "{r}");

    alice.quit();
    bob.quit();
    carol.quit();
    server.stop().assert_success();
}

#[test]
fn window_option_is_checked() {
    let state = tempdir();
    let mut cmd = client_cmd("127.0.0.1:9", "alice", state.path(), PW);
    cmd.args(["--window", "lots"]);
    let f = run("bad window", cmd);
    f.assert_failure();
    assert!(f.stderr.contains("not a size"), "{}", f.stderr);
}

/// A peer-to-peer `send_file` replies at once with its `file_id` (the sender goes on serving
/// in the background and says how it ended with an event); `cancel_file` withdraws it: the
/// sender's send ends with `file_failed` (`cancelled`), the recipient gets `file_cancelled`
/// and can no longer accept it, and chat went on meanwhile.
#[test]
fn json_p2p_send_file_replies_at_once_and_cancel_file_withdraws_it() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let (sa, sb, sc) = (tempdir(), tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path(), &[]);
    let mut bob = client(&server, "bob", sb.path(), &[]);
    // Carol never answers: the send would otherwise serve for ten minutes.
    let mut carol = client(&server, "carol", sc.path(), &[]);
    // A room without end-to-end encryption keeps this about files alone.
    alice.send(json!({"cmd": "create_room", "room": "swap", "e2ee": false, "id": 1}));
    alice.ok(json!(1));
    for c in [&mut bob, &mut carol] {
        c.send(json!({"cmd": "join", "room": "swap", "id": 2}));
        c.ok(json!(2));
    }
    let work = tempdir();
    let src = work.path().join("note.txt");
    write_file(&src, 64 * 1024);

    alice.send(json!({"cmd": "send_file", "path": src, "room": "swap", "p2p": true, "id": 3}));
    let reply = alice.ok(json!(3));
    let file_id = reply["file_id"].as_str().expect("file_id").to_string();
    assert_eq!(reply["p2p"], true, "{reply}");
    assert_eq!(reply["serving"], true, "{reply}");
    // The client is not blocked: a message goes through while it serves.
    alice.send(json!({"cmd": "send", "room": "swap", "text": "still here", "id": 4}));
    alice.ok(json!(4));
    let offer = bob.expect("the offer", |v| v["event"] == "file_offer");
    assert_eq!(offer["file_id"], file_id.as_str());
    assert_eq!(offer["p2p"], true);
    bob.message("still here");

    // Only the sender can cancel it.
    bob.send(json!({"cmd": "cancel_file", "file_id": file_id, "id": 5}));
    assert_eq!(bob.reply(json!(5))["error"]["code"], "not_found");
    alice.send(json!({"cmd": "cancel_file", "file_id": file_id, "id": 6}));
    let r = alice.ok(json!(6));
    assert_eq!(r["file_id"], file_id.as_str());
    let failed = alice.expect("the send's end", |v| v["event"] == "file_failed");
    assert_eq!(failed["file_id"], file_id.as_str());
    assert_eq!(failed["error"]["code"], "cancelled", "{failed}");
    for c in [&mut bob, &mut carol] {
        let ev = c.expect("file_cancelled", |v| v["event"] == "file_cancelled");
        assert_eq!(ev["file_id"], file_id.as_str());
        assert_eq!(ev["by"], "alice");
    }
    let down = tempdir();
    bob.send(json!({"cmd": "accept_file", "file_id": file_id, "dir": down.path(), "id": 7}));
    assert_eq!(bob.reply(json!(7))["error"]["code"], "not_found");
    bob.send(json!({"cmd": "files", "id": 8}));
    assert_eq!(bob.ok(json!(8))["files"], json!([]));

    // Not blocked on quit either: the send is over.
    let started = std::time::Instant::now();
    alice.quit();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    bob.quit();
    carol.quit();
    server.stop().assert_success();
}
