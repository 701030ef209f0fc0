//! End-to-end encryption through `conclave client --json` against the real `conclave serve`:
//! rooms are end-to-end by default, invitations and joins add devices, the kind of each room
//! is listed, safety numbers are shown, and `"e2ee": false` makes a server-encrypted room.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn client(server: &Server, user: &str, state: &Path) -> JsonClient {
    let mut cmd = client_cmd(&server.addr(), user, state, PW);
    cmd.args(["--register", "--fingerprint", &server.fingerprint]);
    JsonClient::connect(user, cmd)
}

#[test]
fn json_e2ee_rooms_devices_and_server_encrypted_rooms() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[], &[]);
    let (sa, sb, sc) = (tempdir(), tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path());
    let mut bob = client(&server, "bob", sb.path());
    let mut carol = client(&server, "carol", sc.path());

    // A new room is end-to-end; Bob is invited (his device gets a Welcome).
    alice.send(json!({"cmd": "create_room", "room": "sec", "private": true, "id": 1}));
    assert_eq!(alice.ok(json!(1))["e2ee"], true);
    alice.send(json!({"cmd": "invite", "room": "sec", "user": "bob", "id": 2}));
    alice.ok(json!(2));
    let joined = bob.expect("joined the group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "sec"
    });
    assert!(
        joined["note"]
            .as_str()
            .is_some_and(|n| n.contains("before"))
    );
    bob.send(json!({"cmd": "rooms", "id": 3}));
    let rooms = bob.ok(json!(3));
    let sec = rooms["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .find(|r| r["room"] == "sec")
        .cloned()
        .expect("sec listed");
    assert_eq!(sec["e2ee"], true);

    let secret = "json-secret-words-31";
    alice.send(json!({"cmd": "send", "room": "sec", "text": secret, "id": 4}));
    alice.ok(json!(4));
    let m = bob.message(secret);
    assert_eq!(m["from"], "alice");
    assert_eq!(m["e2ee"], true, "{m}");
    // Bob's history and search of it are his device's own.
    bob.send(json!({"cmd": "history", "room": "sec", "id": 5}));
    let h = bob.ok(json!(5));
    assert!(
        h["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .any(|m| m["text"] == secret)
    );
    bob.send(json!({"cmd": "search", "query": "secret words", "id": 6}));
    let found = bob.ok(json!(6));
    assert!(
        found["results"]
            .as_array()
            .expect("results")
            .iter()
            .any(|m| m["text"] == secret)
    );

    // Safety numbers: Alice's own device, and what Bob sees of it match.
    alice.send(json!({"cmd": "devices", "id": 7}));
    let mine = alice.ok(json!(7));
    let fp = mine["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string();
    bob.send(json!({"cmd": "devices", "user": "alice", "id": 8}));
    let hers = bob.ok(json!(8));
    let listed = hers["devices"].as_array().expect("devices");
    assert!(
        listed
            .iter()
            .any(|d| d["fingerprint"] == fp.as_str() && d["seen"] == true),
        "{hers}"
    );

    // A server-encrypted room on request: the server can search it for anyone in it.
    alice.send(json!({"cmd": "create_room", "room": "open", "e2ee": false, "id": 9}));
    assert_eq!(alice.ok(json!(9))["e2ee"], false);
    carol.send(json!({"cmd": "join", "room": "open", "id": 10}));
    carol.ok(json!(10));
    alice.send(json!({"cmd": "send", "room": "open", "text": "plain-ish words 32", "id": 11}));
    alice.ok(json!(11));
    let m = carol.message("plain-ish words 32");
    assert_eq!(m["e2ee"], false, "{m}");
    carol.send(json!({"cmd": "rooms", "id": 12}));
    let rooms = carol.ok(json!(12));
    let open = rooms["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .find(|r| r["room"] == "open")
        .cloned()
        .expect("open listed");
    assert_eq!(open["e2ee"], false);

    // Commands given without waiting keep their order: a new end-to-end room, three sends to
    // it, and the history, which has all three in the order given.
    alice.send(json!({"cmd": "create_room", "room": "order", "id": 13}));
    for (i, text) in ["first 41", "second 42", "third 43"].iter().enumerate() {
        alice.send(json!({"cmd": "send", "room": "order", "text": text, "id": 14 + i}));
    }
    alice.send(json!({"cmd": "history", "room": "order", "id": 17}));
    assert_eq!(alice.ok(json!(13))["e2ee"], true);
    let seqs: Vec<u64> = (14..17)
        .map(|id| alice.ok(json!(id))["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let h = alice.ok(json!(17));
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["first 41", "second 42", "third 43"], "{h}");

    // Carol is not in "sec": she never saw the secret.
    assert!(carol.seen.iter().all(|v| v["text"] != secret));
    for c in [&mut alice, &mut bob, &mut carol] {
        c.send(json!({"cmd": "quit", "id": 99}));
        c.ok(json!(99));
    }
}

/// `history` with `thread` in an end-to-end room is answered by the client from its device's
/// own history: readable text, the root first, then the replies in order (the server's rows
/// there are MLS ciphertext).
#[test]
fn json_threads_in_an_end_to_end_room_are_readable() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let (sa, sb) = (tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path());
    let mut bob = client(&server, "bob", sb.path());
    alice.send(json!({"cmd": "create_room", "room": "rig", "id": 1}));
    assert_eq!(alice.ok(json!(1))["e2ee"], true);
    bob.send(json!({"cmd": "join", "room": "rig", "id": 2}));
    bob.ok(json!(2));
    alice.send(json!({"cmd": "send", "room": "rig", "text": "which cable", "id": 3}));
    let root = alice.ok(json!(3));
    let root_id = root["msg_id"].as_str().expect("msg_id").to_string();
    bob.message("which cable");
    bob.send(
        json!({"cmd": "send", "room": "rig", "text": "the blue one", "reply_to": root_id, "id": 4}),
    );
    bob.ok(json!(4));
    bob.send(json!({"cmd": "send", "room": "rig", "text": "not a reply", "id": 5}));
    bob.ok(json!(5));
    alice.message("the blue one");
    alice.message("not a reply");
    for (c, id) in [(&mut alice, 6), (&mut bob, 7)] {
        c.send(json!({"cmd": "history", "thread": root_id, "limit": 50, "id": id}));
        let t = c.ok(json!(id));
        let texts: Vec<&str> = t["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        assert_eq!(texts, vec!["which cable", "the blue one"], "{t}");
        assert_eq!(t["messages"][1]["reply_to"], json!(root_id), "{t}");
    }
}
