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
