//! The JSON client's contract for everyday chat's presence side (issue #20, part B), with the
//! real binary: `typing`, `read` / `read_markers` / `share_reads`, `set_room` with `topic`,
//! `away` / `back` in `who`, `display_name`, `send` with `"action"` and `"format"`, and the
//! client's own mention counting (`"mention"` on message events, `unread`, `mute`).

mod common;

use common::*;
use serde_json::json;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn json_clients_use_presence_and_count_mentions() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let fp = server.fingerprint.clone();
    let addr = server.addr();
    let client = |user: &str, state: &std::path::Path| {
        let mut cmd = client_cmd(&addr, user, state, PW);
        cmd.args(["--register", "--fingerprint", &fp]);
        JsonClient::connect(user, cmd)
    };
    let (a_state, b_state) = (tempdir(), tempdir());
    let mut alice = client("alice", a_state.path());
    let mut bob = client("bob", b_state.path());

    // An action in Markdown that mentions alice.
    bob.send(
        json!({"cmd": "send", "room": "general", "text": "waves at **@alice**",
        "action": true, "format": "markdown", "id": 1}),
    );
    let sent = bob.ok(json!(1));
    let m = alice.message("waves at **@alice**");
    assert_eq!(m["action"], true, "{m}");
    assert_eq!(m["format"], "markdown", "{m}");
    assert_eq!(m["mention"], "me", "{m}");
    assert!(m.get("alert").is_none(), "{m}");
    // A plain message keeps its old shape, and counts as unread only.
    bob.send(json!({"cmd": "send", "room": "general", "text": "plain words", "id": 2}));
    bob.ok(json!(2));
    let m = alice.message("plain words");
    assert!(
        m.get("format").is_none() && m.get("action").is_none(),
        "{m}"
    );
    assert!(m.get("mention").is_none(), "{m}");
    alice.send(json!({"cmd": "unread", "id": 3}));
    let u = alice.ok(json!(3));
    assert_eq!(
        u["conversations"],
        json!([{"room": "general", "unread": 2, "mentions": 1, "muted": false}]),
        "{u}"
    );

    // Read: bob hears it, alice's counts start over, the marker is listed.
    alice.send(json!({"cmd": "read", "room": "general", "seq": sent["seq"], "id": 4}));
    alice.ok(json!(4));
    let r = bob.expect("a read event", |v| v["event"] == "read");
    assert_eq!(r["user"], "alice", "{r}");
    assert_eq!(r["room"], "general", "{r}");
    assert_eq!(r["seq"], sent["seq"], "{r}");
    alice.send(json!({"cmd": "unread", "id": 5}));
    assert_eq!(alice.ok(json!(5))["conversations"], json!([]));
    bob.send(json!({"cmd": "read_markers", "room": "general", "id": 6}));
    let markers = bob.ok(json!(6));
    assert_eq!(markers["markers"][0]["user"], "alice", "{markers}");
    // Private: bob no longer sees alice's marker.
    alice.send(json!({"cmd": "share_reads", "share": false, "id": 7}));
    alice.ok(json!(7));
    bob.send(json!({"cmd": "read_markers", "room": "general", "id": 8}));
    assert_eq!(bob.ok(json!(8))["markers"], json!([]));

    // Muted: still counted, but no alert.
    alice.send(json!({"cmd": "mute", "room": "general", "id": 9}));
    alice.ok(json!(9));
    bob.send(json!({"cmd": "send", "room": "general", "text": "@alice again", "id": 10}));
    bob.ok(json!(10));
    let m = alice.message("@alice again");
    assert_eq!(m["mention"], "me", "{m}");
    assert_eq!(m["alert"], false, "{m}");

    // Typing, in the room and in a direct conversation.
    alice.send(json!({"cmd": "typing", "room": "general", "id": 11}));
    alice.ok(json!(11));
    let t = bob.expect("a typing event", |v| v["event"] == "typing");
    assert_eq!(
        t,
        json!({"event": "typing", "room": "general", "user": "alice"})
    );
    alice.send(json!({"cmd": "typing", "with": "bob", "id": 12}));
    alice.ok(json!(12));
    let t = bob.expect("a direct typing event", |v| {
        v["event"] == "typing" && v.get("to").is_some()
    });
    assert_eq!(
        t,
        json!({"event": "typing", "to": ["bob"], "user": "alice"})
    );
    // Again at once: rate-limited.
    alice.send(json!({"cmd": "typing", "room": "general", "id": 13}));
    let r = alice.reply(json!(13));
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");

    // Topic: alice creates a room (its owner) and sets it; bob sees it.
    alice.send(json!({"cmd": "create_room", "room": "ops", "e2ee": false, "id": 14}));
    alice.ok(json!(14));
    bob.send(json!({"cmd": "join", "room": "ops", "id": 15}));
    bob.ok(json!(15));
    bob.send(json!({"cmd": "set_room", "room": "ops", "topic": "mine", "id": 16}));
    assert_eq!(bob.reply(json!(16))["error"]["code"], "forbidden");
    alice.send(json!({"cmd": "set_room", "room": "ops", "topic": "release week", "id": 17}));
    alice.ok(json!(17));
    let t = bob.expect("a topic event", |v| v["event"] == "topic");
    assert_eq!(
        t,
        json!({"event": "topic", "room": "ops", "topic": "release week", "by": "alice"})
    );
    bob.send(json!({"cmd": "rooms", "id": 18}));
    let rooms = bob.ok(json!(18));
    let ops = rooms["rooms"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["room"] == "ops").cloned())
        .expect("ops listed");
    assert_eq!(ops["topic"], "release week", "{ops}");

    // Away and back, in who; a display name.
    bob.send(json!({"cmd": "away", "text": "lunch", "id": 19}));
    bob.ok(json!(19));
    let a = alice.expect("an away event", |v| v["event"] == "away");
    assert_eq!(a, json!({"event": "away", "user": "bob", "text": "lunch"}));
    bob.send(json!({"cmd": "display_name", "name": "Bob B.", "id": 20}));
    bob.ok(json!(20));
    alice.send(json!({"cmd": "who", "id": 21}));
    let who = alice.ok(json!(21));
    let b = who["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["user"] == "bob").cloned())
        .expect("bob listed");
    assert_eq!(b["away"], "lunch", "{b}");
    assert_eq!(b["display_name"], "Bob B.", "{b}");
    bob.send(json!({"cmd": "back", "id": 22}));
    bob.ok(json!(22));
    let a = alice.expect("a back event", |v| v["event"] == "back");
    assert_eq!(a, json!({"event": "back", "user": "bob"}));

    // Bad input says what to do.
    bob.send(json!({"cmd": "read", "room": "general", "id": 23}));
    let r = bob.reply(json!(23));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("seq")),
        "{r}"
    );
    bob.send(json!({"cmd": "send", "room": "general", "text": "x", "format": "html", "id": 24}));
    assert_eq!(bob.reply(json!(24))["error"]["code"], "bad_request");

    alice.quit();
    bob.quit();
    server.stop().assert_success();
}
