//! The web client in a real headless Chromium (Debian's `chromium`, driven by playwright-core
//! from web/test/browser.ts) against the real `conclave serve`, with a `conclave client
//! --json` user on the other side: an end-to-end room and direct messages both ways, a file
//! both ways with its hash checked, a reload that keeps the device and the history, messages
//! sent while the tab was closed arriving once, a kicked web user who can no longer read, a
//! server-encrypted room, everyday chat, the search and thread panes, display names, read
//! receipts, mentions and notifications, a blockcast from the browser, new devices of the
//! account approved and rejected in the page, invite codes, a second tab, password rooms and
//! an admin's commands. Screenshots of the main screens go to docs/web/.
//!
//! Needs Node.js, `npm ci` in web/ and `apt-get install chromium chromium-driver` (CI's
//! .ci/run does all three); without them this test fails and says what is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one browser step may take (the page's own waits are shorter).
const STEP: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The browser peer: a Node process speaking JSON lines.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Browser {
    fn start(url: &str) -> Browser {
        let web = repo().join("web");
        assert!(
            web.join("node_modules/playwright-core/package.json")
                .exists(),
            "web/node_modules is missing: run `npm ci` in {} (CI does) before `cargo test`",
            web.display()
        );
        assert!(
            Path::new(CHROMIUM).exists(),
            "no Chromium at {CHROMIUM}: `apt-get install chromium chromium-driver` (CI's .ci/run does)"
        );
        let mut child = Command::new("node")
            .args(["scripts/run-ts.mjs", "test/browser.ts"])
            .current_dir(&web)
            .env("CONCLAVE_URL", url)
            .env("CHROMIUM", CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` ({e}): install Node.js 20+ and run `npm ci` in web/")
            });
        let stdin = child.stdin.take().expect("stdin");
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Browser {
            child,
            stdin,
            lines,
        }
    }

    #[track_caller]
    fn call(&mut self, req: Value) -> Value {
        writeln!(self.stdin, "{req}").expect("write to the browser peer");
        self.stdin.flush().expect("flush");
        let line = self.lines.recv_timeout(STEP).unwrap_or_else(|_| {
            panic!("the browser peer did not answer {req} in time (see stderr)")
        });
        let v: Value = serde_json::from_str(&line).expect("the browser peer's reply is JSON");
        assert!(
            v["ok"] == json!(true),
            "browser step {req} failed: {}",
            v["error"]
        );
        v
    }

    fn op(&mut self, op: &str, args: Value) -> Value {
        let mut req = args;
        req["op"] = json!(op);
        self.call(req)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(server: &Server, user: &str, state: &Path) -> JsonClient {
    let mut cmd = client_cmd(&server.addr(), user, state, PW);
    cmd.args(["--register", "--fingerprint", &server.fingerprint]);
    JsonClient::connect(user, cmd)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Where the screenshots go: `$CONCLAVE_WEB_SCREENSHOTS` (relative to the repository; set it
/// to `docs/web` to refresh docs/web.md's pictures), else a folder under the system's temp.
fn shots_dir() -> PathBuf {
    match std::env::var_os("CONCLAVE_WEB_SCREENSHOTS") {
        Some(d) => repo().join(d),
        None => std::env::temp_dir().join("conclave-web-screenshots"),
    }
}

fn shot(b: &mut Browser, name: &str, width: u32, height: u32) {
    let path = shots_dir().join(format!("{name}.png"));
    b.op(
        "screenshot",
        json!({"path": path.to_string_lossy(), "width": width, "height": height}),
    );
}

#[test]
fn web_user_and_json_user_in_e2ee_rooms_dms_files_reload_offline_and_kick() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let url = format!("https://127.0.0.1:{}/", server.port);
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = client(&server, "bob", bob_state.path());
    let mut web = Browser::start(&url);

    // Sign-in screen, then a new account.
    web.op("open", json!({}));
    shot(&mut web, "sign-in", 900, 600);
    web.op("register", json!({"user": "alice", "password": PW}));

    // An end-to-end room made in the browser; the JSON user is invited (a Welcome).
    web.op("type", json!({"text": "/create lab"}));
    web.op("has_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/invite bob"}));
    bob.expect("bob joins lab's group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "lab"
    });
    bob.send(json!({"cmd": "join", "room": "lab", "id": 1}));
    bob.ok(json!(1));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "hello from json", "id": 2}));
    bob.ok(json!(2));
    web.op("wait_text", json!({"text": "hello from json"}));
    web.op("type", json!({"text": "hi from the web"}));
    let m = bob.message("hi from the web");
    assert_eq!(m["from"], "alice");
    assert_eq!(m["e2ee"], true, "{m}");
    let marker = web.op("marker", json!({}));
    assert_eq!(marker["marker"], "End-to-end encrypted");
    shot(&mut web, "room", 1100, 700);

    // Direct messages both ways, end-to-end.
    bob.send(json!({"cmd": "send", "to": ["alice"], "text": "dm from json", "id": 3}));
    bob.ok(json!(3));
    web.op("has_conv", json!({"name": "bob"}));
    let title = web.op("wait_title", json!({"contains": "(1)"}));
    assert!(
        title["title"]
            .as_str()
            .is_some_and(|t| t.starts_with("(1)")),
        "{title}"
    );
    web.op("open_conv", json!({"name": "bob"}));
    web.op("wait_text", json!({"text": "dm from json"}));
    web.op("type", json!({"text": "/msg bob dm from the web"}));
    let m = bob.message("dm from the web");
    assert_eq!(m["from"], "alice");
    assert_eq!(m["e2ee"], true, "{m}");
    shot(&mut web, "direct", 1100, 700);

    // Blockcast from the JSON user in the end-to-end room, leaving carol out: the web user
    // opens it (its key came in the direct conversation); carol never gets it.
    let carol_state = tempfile::tempdir().expect("tmp");
    let mut carol = client(&server, "carol", carol_state.path());
    web.op("open_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/invite carol"}));
    carol.expect("carol joins lab's group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "lab"
    });
    carol.send(json!({"cmd": "join", "room": "lab", "id": 1}));
    carol.ok(json!(1));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "not for carol", "except": ["carol"], "id": 30}));
    bob.ok(json!(30));
    web.op("wait_text", json!({"text": "not for carol"}));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "for everyone again", "id": 31}));
    bob.ok(json!(31));
    carol.message("for everyone again");
    assert!(
        !carol.saw_message("not for carol"),
        "a left-out member read a blockcast"
    );

    // A file from the browser to the JSON user, end-to-end (sealed), hash checked.
    web.op("open_conv", json!({"name": "#lab"}));
    let files = tempfile::tempdir().expect("tmp");
    let up = files.path().join("notes.txt");
    let up_bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&up, &up_bytes).expect("write");
    web.op("attach", json!({"path": up.to_string_lossy()}));
    let offer = bob.expect("bob is offered notes.txt", |v| {
        v["event"] == "file_offer" && v["name"] == "notes.txt"
    });
    assert_eq!(offer["sha256"], sha256_hex(&up_bytes), "{offer}");
    let got = files.path().join("bob");
    std::fs::create_dir_all(&got).expect("dir");
    bob.send(json!({"cmd": "accept_file", "file_id": offer["file_id"], "dir": got.to_string_lossy(), "id": 4}));
    let done = bob.expect("bob's download", |v| v["event"] == "file_done");
    let path = done["path"].as_str().expect("path");
    assert_eq!(
        sha256_hex(&std::fs::read(path).expect("read")),
        sha256_hex(&up_bytes)
    );

    // A file from the JSON user to the browser.
    let down = files.path().join("report.bin");
    let down_bytes: Vec<u8> = (0..150_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&down, &down_bytes).expect("write");
    bob.send(json!({"cmd": "send_file", "path": down.to_string_lossy(), "room": "lab", "id": 5}));
    bob.ok(json!(5));
    web.op("wait_text", json!({"text": "report.bin"}));
    let saved = files.path().join("saved.bin");
    web.op(
        "save_file",
        json!({"name": "report.bin", "path": saved.to_string_lossy()}),
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&saved).expect("read")),
        sha256_hex(&down_bytes)
    );

    // A reload keeps the device and the history (sealed in IndexedDB).
    web.op("reload", json!({}));
    web.op("sign_in", json!({"user": "alice", "password": PW}));
    web.op("open_conv", json!({"name": "#lab"}));
    web.op("wait_text", json!({"text": "hello from json"}));
    web.op("wait_text", json!({"text": "hi from the web"}));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "after the reload", "id": 6}));
    bob.ok(json!(6));
    web.op("wait_text", json!({"text": "after the reload"}));

    // Messages sent while the tab was closed arrive, once each.
    web.op("close", json!({}));
    for (i, t) in ["while closed one", "while closed two"].iter().enumerate() {
        bob.send(json!({"cmd": "send", "room": "lab", "text": t, "id": 10 + i}));
        bob.ok(json!(10 + i));
    }
    web.op("open", json!({}));
    web.op("sign_in", json!({"user": "alice", "password": PW}));
    web.op("open_conv", json!({"name": "#lab"}));
    for t in ["while closed one", "while closed two", "after the reload"] {
        web.op("wait_text", json!({"text": t}));
        let n = web.op("count_text", json!({"text": t}));
        assert_eq!(n["count"], 1, "{t:?} shown {n}");
    }

    // The About box shows the bundle's SHA-256 the server reports.
    let about = web.op("about", json!({}));
    let hash = about["bundle_sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(hash.len(), 64, "{about}");
    // The same as the one the server printed at start (and `conclave doctor` prints).
    let printed = server
        .banner
        .iter()
        .find_map(|l| l.split_once("(bundle SHA-256 "))
        .map(|(_, h)| h.trim_end_matches(')').to_string())
        .expect("the server prints the bundle's SHA-256");
    assert_eq!(hash, printed);
    shot(&mut web, "about", 1100, 700);
    web.op("close_dialog", json!({}));

    // A room of the JSON user's: the web user joins, is kicked, and reads nothing after.
    bob.send(json!({"cmd": "create_room", "room": "ops", "id": 20}));
    bob.ok(json!(20));
    web.op("type", json!({"text": "/join ops"}));
    web.op("has_conv", json!({"name": "#ops"}));
    bob.send(json!({"cmd": "send", "room": "ops", "text": "before the kick", "id": 21}));
    bob.ok(json!(21));
    web.op("wait_text", json!({"text": "before the kick"}));
    web.op("type", json!({"text": "web says hi in ops"}));
    bob.message("web says hi in ops");
    bob.send(json!({"cmd": "kick", "room": "ops", "user": "alice", "reason": "test", "id": 22}));
    bob.ok(json!(22));
    web.op("wait_text", json!({"text": "alice was removed by bob"}));
    bob.send(json!({"cmd": "send", "room": "ops", "text": "secret after the kick", "id": 23}));
    bob.ok(json!(23));
    // The message is out; give the browser time to (not) show it.
    std::thread::sleep(Duration::from_secs(2));
    let n = web.op("count_text", json!({"text": "secret after the kick"}));
    assert_eq!(n["count"], 0, "a kicked web user read a later message");

    // Keyboard: Alt-Down / Alt-Up move between conversations; the composer keeps the focus.
    web.op("open_conv", json!({"name": "#lab"}));
    let before = web.op("conv_title", json!({}))["title"].clone();
    web.op("press", json!({"key": "Alt+ArrowDown"}));
    let after = web.op("conv_title", json!({}))["title"].clone();
    assert_ne!(before, after, "Alt-Down changed the conversation");
    web.op("press", json!({"key": "Alt+ArrowUp"}));
    assert_eq!(web.op("conv_title", json!({}))["title"], before);

    // The dark theme, and a phone's width.
    web.op("type", json!({"text": "/theme"}));
    let theme = web.op("theme", json!({}));
    assert!(
        theme["theme"] == "dark" || theme["theme"] == "light",
        "{theme}"
    );
    shot(&mut web, "room-dark", 1100, 700);
    web.op("type", json!({"text": "/theme"}));
    shot(&mut web, "phone", 390, 740);
}

#[test]
fn web_user_in_a_server_encrypted_room_and_ten_thousand_messages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let url = format!("https://127.0.0.1:{}/", server.port);
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = client(&server, "bob", bob_state.path());
    bob.send(json!({"cmd": "create_room", "room": "town", "e2ee": false, "id": 1}));
    assert_eq!(bob.ok(json!(1))["e2ee"], false);
    bob.send(
        json!({"cmd": "send", "room": "town", "text": "history before the web user", "id": 2}),
    );
    bob.ok(json!(2));
    for i in 1..=70 {
        let text = format!("old-{i:02}");
        bob.send(json!({"cmd": "send", "room": "town", "text": text, "id": 1000 + i}));
        bob.ok(json!(1000 + i));
    }

    let mut web = Browser::start(&url);
    web.op("open", json!({"path": "#bench"}));
    let started = std::time::Instant::now();
    web.op("register", json!({"user": "carol", "password": PW}));
    // A figure for docs/benchmarks.md (Argon2id in the page is most of it).
    eprintln!(
        "figure: from the sign-in click to the first room shown: {} ms",
        started.elapsed().as_millis()
    );
    web.op("type", json!({"text": "/join town"}));
    web.op("has_conv", json!({"name": "#town"}));
    // A server-encrypted room shows its history to newcomers: the newest page at once, older
    // ones as the timeline is scrolled up.
    web.op("wait_text", json!({"text": "old-70"}));
    let n = web.op("count_text", json!({"text": "old-01"}));
    assert_eq!(n["count"], 0, "only the newest page is loaded at first");
    web.op(
        "scroll_up_until",
        json!({"text": "history before the web user"}),
    );
    web.op("scroll_up_until", json!({"text": "old-01"}));
    let marker = web.op("marker", json!({}));
    assert_eq!(marker["marker"], "Server-encrypted");
    web.op("type", json!({"text": "plain hello from the web"}));
    let m = bob.message("plain hello from the web");
    assert_eq!(m["e2ee"], false, "{m}");
    bob.send(json!({"cmd": "send", "room": "town", "text": "plain hello from json", "id": 3}));
    bob.ok(json!(3));
    web.op("wait_text", json!({"text": "plain hello from json"}));

    // Files both ways in a server-encrypted room (relayed as they are), hashes checked.
    let files = tempfile::tempdir().expect("tmp");
    let down = files.path().join("plain-report.txt");
    let down_bytes: Vec<u8> = (0..90_000u32).map(|i| (i % 97) as u8).collect();
    std::fs::write(&down, &down_bytes).expect("write");
    bob.send(json!({"cmd": "send_file", "path": down.to_string_lossy(), "room": "town", "id": 4}));
    bob.ok(json!(4));
    web.op("wait_text", json!({"text": "plain-report.txt"}));
    let saved = files.path().join("saved.txt");
    web.op(
        "save_file",
        json!({"name": "plain-report.txt", "path": saved.to_string_lossy()}),
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&saved).expect("read")),
        sha256_hex(&down_bytes)
    );
    let up = files.path().join("from-web.txt");
    let up_bytes: Vec<u8> = (0..70_000u32).map(|i| (i % 89) as u8).collect();
    std::fs::write(&up, &up_bytes).expect("write");
    web.op("attach", json!({"path": up.to_string_lossy()}));
    let offer = bob.expect("bob is offered from-web.txt", |v| {
        v["event"] == "file_offer" && v["name"] == "from-web.txt"
    });
    let got = files.path().join("bob");
    std::fs::create_dir_all(&got).expect("dir");
    bob.send(json!({"cmd": "accept_file", "file_id": offer["file_id"], "dir": got.to_string_lossy(), "id": 5}));
    let done = bob.expect("bob's download", |v| v["event"] == "file_done");
    assert_eq!(
        sha256_hex(&std::fs::read(done["path"].as_str().expect("path")).expect("read")),
        sha256_hex(&up_bytes)
    );

    // 10,000 messages in the timeline: only the visible rows are in the page.
    let n = web.op(
        "eval",
        json!({"expr": "window.__conclaveFill ? window.__conclaveFill(10000) : -1"}),
    );
    assert_eq!(n["value"], 10000, "{n}");
    let rows = web.op("rendered_rows", json!({}));
    let rows = rows["rows"].as_u64().expect("rows");
    assert!(
        rows > 0 && rows < 200,
        "{rows} rows rendered for 10,000 messages"
    );
    // Scrolled to the middle: still only the rows in view, and they are the middle ones.
    let mid = web.op(
        "eval",
        json!({"expr": "(async () => { const t = document.querySelector('.timeline'); t.scrollTop = t.scrollHeight / 2; await new Promise((r) => setTimeout(r, 300)); return [document.querySelectorAll('.timeline .rows > .row').length, document.querySelector('.timeline .rows').textContent.includes('benchmark row 5')]; })()"}),
    );
    let in_view = mid["value"][0].as_u64().unwrap_or(0);
    assert!(in_view > 0 && in_view < 200, "{mid}");
    assert_eq!(mid["value"][1], true, "the middle rows are shown: {mid}");
    let heap = web.op(
        "eval",
        json!({"expr": "performance.memory ? performance.memory.usedJSHeapSize : -1"}),
    );
    eprintln!(
        "figure: JS heap with 10,000 messages in one room: {} MiB; rows in the page: {rows}",
        heap["value"].as_f64().unwrap_or(-1.0) / 1048576.0
    );
}

#[test]
fn web_user_reconnects_through_a_jittery_relay_without_loss_or_duplicates() {
    use common::relay::Relay;
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    // 30 ms each way with jitter, and cuts.
    let relay = Relay::to(&server.addr(), 30.0, 0x22);
    let url = format!("https://{}/", relay.addr());
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = client(&server, "bob", bob_state.path());
    let mut web = Browser::start(&url);
    web.op("open", json!({}));
    web.op("register", json!({"user": "dave", "password": PW}));
    web.op("type", json!({"text": "/create net"}));
    web.op("has_conv", json!({"name": "#net"}));
    web.op("type", json!({"text": "/invite bob"}));
    bob.expect("bob joins net's group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "net"
    });
    bob.send(json!({"cmd": "join", "room": "net", "id": 1}));
    bob.ok(json!(1));
    let mut id = 100;
    for round in 0..3 {
        let cut = relay.cut_all();
        assert!(
            cut > 0,
            "round {round}: the browser's connection went through the relay"
        );
        let texts = [
            format!("while cut {round} a"),
            format!("while cut {round} b"),
        ];
        for t in &texts {
            id += 1;
            bob.send(json!({"cmd": "send", "room": "net", "text": t, "id": id}));
            bob.ok(json!(id));
        }
        for t in &texts {
            web.op("wait_text", json!({"text": t}));
        }
        let back = format!("web is back {round}");
        web.op("type", json!({"text": back}));
        let m = bob.message(&back);
        assert_eq!(m["e2ee"], true, "{m}");
        web.op("wait_text", json!({"text": back}));
        for t in texts.iter().chain(std::iter::once(&back)) {
            let n = web.op("count_text", json!({"text": t}));
            let log = web.op("log", json!({}));
            assert_eq!(
                n["count"], 1,
                "round {round}: {t:?} shown {n}: {}",
                log["log"]
            );
        }
    }
    let seen = bob
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["text"] == "web is back 0")
        .count();
    assert_eq!(seen, 1, "bob got a web message twice");

    // Edits and reactions through the relay, both ways, one of them across a cut.
    bob.send(json!({"cmd": "send", "room": "net", "text": "bob over the relay", "id": 200}));
    let bob_id = bob.ok(json!(200))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    web.op("wait_text", json!({"text": "bob over the relay"}));
    web.op(
        "row_action",
        json!({"text": "bob over the relay", "action": "React", "emoji": "👍"}),
    );
    let r = bob.expect("dave's reaction", |v| {
        v["event"] == "reaction" && v["from"] == "dave"
    });
    assert_eq!(r["msg_id"], bob_id.as_str(), "{r}");
    web.op("type", json!({"text": "/edit web is back 2, edited"}));
    let e = bob.expect("dave's edit", |v| {
        v["event"] == "edited" && v["from"] == "dave"
    });
    assert_eq!(e["text"], "web is back 2, edited", "{e}");
    assert!(relay.cut_all() > 0, "the browser's connection was cut");
    bob.send(
        json!({"cmd": "edit", "msg_id": bob_id, "text": "bob over the relay, edited", "id": 201}),
    );
    bob.ok(json!(201));
    bob.send(json!({"cmd": "react", "msg_id": bob_id, "emoji": "🎉", "id": 202}));
    bob.ok(json!(202));
    let row = web.op(
        "row",
        json!({"text": "bob over the relay, edited", "contains": "🎉 1"}),
    );
    let text = row["text"].as_str().unwrap_or_default();
    assert!(text.contains("(edited)") && text.contains("👍 1"), "{row}");
    web.op(
        "row",
        json!({"text": "web is back 2, edited", "contains": "(edited)"}),
    );
}

/// Everyday chat between a web user and a JSON user, end-to-end (edits, deletes, reactions,
/// replies, `/me`, Markdown, typing, read markers, the topic) and in a server-encrypted room
/// (edit, delete, react), both ways.
#[test]
fn web_user_and_json_user_everyday_chat_in_e2ee_and_server_rooms() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let url = format!("https://127.0.0.1:{}/", server.port);
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = client(&server, "bob", bob_state.path());
    let mut web = Browser::start(&url);
    web.op("open", json!({}));
    web.op("register", json!({"user": "alice", "password": PW}));
    web.op("type", json!({"text": "/create lab"}));
    web.op("has_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/invite bob"}));
    bob.expect("bob joins lab's group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "lab"
    });
    bob.send(json!({"cmd": "join", "room": "lab", "id": 1}));
    bob.ok(json!(1));

    // The JSON user's end-to-end edit changes the web line.
    bob.send(json!({"cmd": "send", "room": "lab", "text": "typo heer", "id": 2}));
    let sent = bob.ok(json!(2));
    let typo_id = sent["msg_id"].as_str().expect("msg_id").to_string();
    web.op("wait_text", json!({"text": "typo heer"}));
    bob.send(json!({"cmd": "edit", "msg_id": typo_id, "text": "typo fixed", "id": 3}));
    bob.ok(json!(3));
    web.op("row", json!({"text": "typo fixed", "contains": "(edited)"}));
    web.op("wait_no_text", json!({"text": "typo heer"}));

    // Reactions both ways, with who reacted.
    web.op(
        "row_action",
        json!({"text": "typo fixed", "action": "React", "emoji": "👍"}),
    );
    let r = bob.expect("alice's reaction", |v| {
        v["event"] == "reaction" && v["from"] == "alice"
    });
    assert_eq!(r["msg_id"], typo_id.as_str(), "{r}");
    assert_eq!(r["emoji"], "👍", "{r}");
    assert_eq!(r["on"], true, "{r}");
    bob.send(json!({"cmd": "react", "msg_id": typo_id, "emoji": "🎉", "id": 4}));
    bob.ok(json!(4));
    let row = web.op("row", json!({"text": "typo fixed", "contains": "🎉 1"}));
    let titles = row["titles"].to_string();
    assert!(
        titles.contains("bob reacted with 🎉") && titles.contains("alice reacted with 👍"),
        "{row}"
    );

    // The web user's message, edited with /edit; the JSON user sees the new text.
    web.op("type", json!({"text": "web line"}));
    let m = bob.message("web line");
    let web_id = m["msg_id"].as_str().expect("msg_id").to_string();
    web.op("type", json!({"text": "/edit web line fixed"}));
    let e = bob.expect("alice's edit", |v| {
        v["event"] == "edited" && v["from"] == "alice"
    });
    assert_eq!(e["msg_id"], web_id.as_str(), "{e}");
    assert_eq!(e["text"], "web line fixed", "{e}");

    // Replies both ways: the web shows the quoted start of the original.
    bob.send(
        json!({"cmd": "send", "room": "lab", "text": "json answer", "reply_to": web_id, "id": 5}),
    );
    let answer_id = bob.ok(json!(5))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    web.op(
        "row",
        json!({"text": "json answer", "contains": "↪ alice: web line fixed"}),
    );
    web.op(
        "row_action",
        json!({"text": "json answer", "action": "Reply"}),
    );
    web.op("type", json!({"text": "web answer"}));
    let m = bob.message("web answer");
    assert_eq!(m["reply_to"], answer_id.as_str(), "{m}");
    assert_eq!(m["e2ee"], true, "{m}");

    // /me and Markdown (rendered as elements; HTML and a javascript: link stay text).
    web.op("type", json!({"text": "/me waves"}));
    let m = bob.message("waves");
    assert_eq!(m["action"], true, "{m}");
    bob.send(json!({"cmd": "send", "room": "lab", "format": "markdown",
        "text": "**strong words** [bad](javascript:alert(1)) <img src=x onerror=alert(1)> [good](https://example.org/)", "id": 6}));
    bob.ok(json!(6));
    web.op("wait_text", json!({"text": "strong words"}));
    let v = web.op("eval", json!({"expr": "JSON.stringify({strong: document.querySelectorAll('.timeline .text strong').length, img: document.querySelectorAll('.timeline img').length, js: document.querySelectorAll('.timeline a[href^=\"javascript\"]').length, good: Array.from(document.querySelectorAll('.timeline a')).map(a => a.getAttribute('href') + ' ' + a.getAttribute('rel'))})"}));
    let v: Value = serde_json::from_str(v["value"].as_str().expect("a string")).expect("json");
    assert_eq!(v["strong"], 1, "{v}");
    assert_eq!(v["img"], 0, "{v}");
    assert_eq!(v["js"], 0, "{v}");
    assert_eq!(
        v["good"],
        json!(["https://example.org/ noopener noreferrer"]),
        "{v}"
    );
    web.op("wait_text", json!({"text": "<img src=x onerror=alert(1)>"}));

    // Deletes both ways.
    web.op("type", json!({"text": "/delete"}));
    let d = bob.expect("alice's delete", |v| {
        v["event"] == "deleted" && v["from"] == "alice"
    });
    assert!(d["msg_id"] != Value::Null && d["from"] == "alice", "{d}");
    bob.send(json!({"cmd": "delete", "msg_id": answer_id, "id": 7}));
    bob.ok(json!(7));
    web.op("wait_no_text", json!({"text": "json answer"}));

    // Typing and read markers from the JSON user; the topic from the web user.
    bob.send(json!({"cmd": "typing", "room": "lab", "id": 8}));
    bob.ok(json!(8));
    web.op(
        "wait_in",
        json!({"selector": "#typing", "text": "bob is typing"}),
    );
    let seq = d["seq"].as_u64().expect("seq");
    bob.send(json!({"cmd": "read", "room": "lab", "seq": seq, "id": 9}));
    bob.ok(json!(9));
    web.op(
        "wait_in",
        json!({"selector": "#read-by", "text": "Read by bob"}),
    );
    web.op("type", json!({"text": "/topic release week"}));
    let t = bob.expect("the topic", |v| v["event"] == "topic");
    assert_eq!(t["topic"], "release week", "{t}");
    web.op(
        "wait_in",
        json!({"selector": "#conv-topic", "text": "release week"}),
    );
    bob.send(json!({"cmd": "away", "text": "lunch", "id": 10}));
    bob.ok(json!(10));
    web.op(
        "wait_in",
        json!({"selector": "aside[aria-label=Members]", "text": "away: lunch"}),
    );
    shot(&mut web, "everyday-chat", 1100, 700);

    // A server-encrypted room: edit, delete and react both ways.
    bob.send(json!({"cmd": "create_room", "room": "town", "e2ee": false, "id": 11}));
    assert_eq!(bob.ok(json!(11))["e2ee"], false);
    web.op("type", json!({"text": "/join town"}));
    web.op("has_conv", json!({"name": "#town"}));
    bob.send(json!({"cmd": "send", "room": "town", "text": "plain typo", "id": 12}));
    let plain_id = bob.ok(json!(12))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    web.op("wait_text", json!({"text": "plain typo"}));
    bob.send(json!({"cmd": "edit", "msg_id": plain_id, "text": "plain fixed", "id": 13}));
    bob.ok(json!(13));
    web.op(
        "row",
        json!({"text": "plain fixed", "contains": "(edited)"}),
    );
    web.op(
        "row_action",
        json!({"text": "plain fixed", "action": "React", "emoji": "👀"}),
    );
    let r = bob.expect("alice's plain reaction", |v| {
        v["event"] == "reaction" && v["emoji"] == "👀"
    });
    assert_eq!(r["msg_id"], plain_id.as_str(), "{r}");
    bob.send(json!({"cmd": "react", "msg_id": plain_id, "emoji": "👍", "id": 14}));
    bob.ok(json!(14));
    web.op("row", json!({"text": "plain fixed", "contains": "👍 1"}));
    web.op("type", json!({"text": "plain from web"}));
    let m = bob.message("plain from web");
    assert_eq!(m["e2ee"], false, "{m}");
    let plain_web_id = m["msg_id"].as_str().expect("msg_id").to_string();
    web.op(
        "row_action",
        json!({"text": "plain from web", "action": "Edit"}),
    );
    web.op("type", json!({"text": "plain from web, edited"}));
    let e = bob.expect("alice's plain edit", |v| {
        v["event"] == "edited" && v["msg_id"] == plain_web_id.as_str()
    });
    assert_eq!(e["text"], "plain from web, edited", "{e}");
    web.op(
        "row_action",
        json!({"text": "plain from web, edited", "action": "Delete"}),
    );
    bob.expect("alice's plain delete", |v| {
        v["event"] == "deleted" && v["msg_id"] == plain_web_id.as_str()
    });
    bob.send(json!({"cmd": "delete", "msg_id": plain_id, "id": 15}));
    bob.ok(json!(15));
    web.op("wait_no_text", json!({"text": "plain fixed"}));
}

/// Reads what `c` prints for `d` (bounded), for checks that something did *not* come.
fn drain(c: &mut JsonClient, d: Duration) {
    let end = std::time::Instant::now() + d;
    for _ in 0..10_000 {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        if let Polled::Closed = c.poll(left) {
            break;
        }
    }
}

/// The search pane (the server's search in a server-encrypted room, the browser's own history
/// in an end-to-end one), the thread pane (from the server and from local history, live,
/// answering in it), a display name, typing and away seen by a JSON user, the read-receipts
/// switch, `@room` counted only from the room's owner, a desktop notification on a mention,
/// and a blockcast (`/except`) from the browser in an end-to-end room.
#[test]
fn web_user_searches_threads_names_receipts_mentions_and_blockcast() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let url = format!("https://127.0.0.1:{}/", server.port);
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = client(&server, "bob", bob_state.path());
    let carol_state = tempfile::tempdir().expect("tmp");
    let mut carol = client(&server, "carol", carol_state.path());

    // A server-encrypted room of bob's with a thread whose start is older than the page a
    // newcomer gets.
    bob.send(json!({"cmd": "create_room", "room": "town", "e2ee": false, "id": 1}));
    assert_eq!(bob.ok(json!(1))["e2ee"], false);
    bob.send(json!({"cmd": "send", "room": "town", "text": "which cable for the rack", "id": 2}));
    let cable_id = bob.ok(json!(2))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    bob.send(json!({"cmd": "send", "room": "town", "text": "the red one", "reply_to": cable_id, "id": 3}));
    bob.ok(json!(3));
    for i in 0..55 {
        let text = format!("filler-{i:02}");
        bob.send(json!({"cmd": "send", "room": "town", "text": text, "id": 100 + i}));
        bob.ok(json!(100 + i));
    }
    bob.send(json!({"cmd": "send", "room": "town", "text": "or the blue one", "reply_to": cable_id, "id": 4}));
    bob.ok(json!(4));

    let mut web = Browser::start(&url);
    web.op("open", json!({}));
    web.op("register", json!({"user": "alice", "password": PW}));
    web.op("type", json!({"text": "/create lab"}));
    web.op("has_conv", json!({"name": "#lab"}));
    for (who, c) in [("bob", &mut bob), ("carol", &mut carol)] {
        web.op("type", json!({"text": format!("/invite {who}")}));
        c.expect("joins lab's group", |v| {
            v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "lab"
        });
        c.send(json!({"cmd": "join", "room": "lab", "id": 5}));
        c.ok(json!(5));
    }

    // A thread in the end-to-end room, from the browser's own history; answered in the pane.
    bob.send(json!({"cmd": "send", "room": "lab", "text": "the cable drawer is locked", "id": 6}));
    bob.ok(json!(6));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "lunch at noon?", "id": 7}));
    let lunch_id = bob.ok(json!(7))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    bob.send(json!({"cmd": "send", "room": "lab", "text": "pizza", "reply_to": lunch_id, "id": 8}));
    bob.ok(json!(8));
    web.op("wait_text", json!({"text": "pizza"}));
    web.op(
        "row_action",
        json!({"text": "lunch at noon?", "action": "Thread"}),
    );
    web.op(
        "wait_in",
        json!({"selector": "#thread-pane", "text": "pizza"}),
    );
    web.op(
        "wait_in",
        json!({"selector": "#thread-title", "text": "bob: lunch at noon? · 1 reply"}),
    );
    web.op("thread_reply", json!({"text": "yes please"}));
    let m = bob.message("yes please");
    assert_eq!(m["reply_to"], lunch_id.as_str(), "{m}");
    assert_eq!(m["e2ee"], true, "{m}");
    web.op(
        "wait_in",
        json!({"selector": "#thread-title", "text": "2 replies"}),
    );

    // A thread of the server-encrypted room: its start and first reply come from the server.
    web.op("type", json!({"text": "/join town"}));
    web.op("has_conv", json!({"name": "#town"}));
    web.op("wait_text", json!({"text": "or the blue one"}));
    assert_eq!(
        web.op("count_text", json!({"text": "which cable for the rack"}))["count"],
        0
    );
    web.op(
        "row_action",
        json!({"text": "or the blue one", "action": "Thread"}),
    );
    for t in ["which cable for the rack", "the red one", "or the blue one"] {
        web.op("wait_in", json!({"selector": "#thread-pane", "text": t}));
    }
    // Live: a new reply shows in the open pane.
    bob.send(json!({"cmd": "send", "room": "town", "text": "green is fine too", "reply_to": cable_id, "id": 9}));
    bob.ok(json!(9));
    web.op(
        "wait_in",
        json!({"selector": "#thread-pane", "text": "green is fine too"}),
    );
    web.op("thread_reply", json!({"text": "red it is"}));
    let m = bob.message("red it is");
    assert_eq!(m["reply_to"], cable_id.as_str(), "{m}");
    assert_eq!(m["e2ee"], false, "{m}");
    shot(&mut web, "thread", 1100, 700);

    // Search: the server finds the server-encrypted lines, the browser its end-to-end ones.
    let found = web.op("search", json!({"query": "cable"}));
    let hits = found["hits"].to_string();
    assert!(hits.contains("which cable for the rack"), "{found}");
    assert!(
        hits.contains("the cable drawer is locked") && hits.contains("from this device's history"),
        "{found}"
    );
    shot(&mut web, "search", 1100, 700);
    // A result older than what is loaded: the conversation opens at it.
    web.op("open_conv", json!({"name": "#lab"}));
    let shown = web.op("click_hit", json!({"text": "which cable for the rack"}));
    assert_eq!(shown["title"], "#town", "{shown}");
    assert!(
        shown["found"]
            .as_str()
            .is_some_and(|t| t.contains("which cable for the rack")),
        "{shown}"
    );
    let nothing = web.op("search", json!({"query": "zebra"}));
    assert!(
        nothing["status"]
            .as_str()
            .is_some_and(|t| t.contains("Nothing found")),
        "{nothing}"
    );
    web.op("press", json!({"key": "Escape"}));
    // A reply's quote opens its thread, with the original that is not loaded in the timeline.
    web.op(
        "eval",
        json!({"expr": "(async () => { const t = document.querySelector('.timeline'); for (let i = 0; i < 20; i++) { t.scrollTop = t.scrollHeight; await new Promise((r) => setTimeout(r, 50)); } return 0; })()"}),
    );
    web.op("click_quote", json!({"text": "or the blue one"}));
    web.op(
        "wait_in",
        json!({"selector": "#thread-title", "text": "bob: which cable for the rack"}),
    );
    web.op("press", json!({"key": "Escape"}));

    // A display name, typing and away, seen by the JSON user.
    web.op("open_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/name Alice A."}));
    let d = bob.expect("alice's display name", |v| {
        v["event"] == "display_name" && v["user"] == "alice"
    });
    assert_eq!(d["name"], "Alice A.", "{d}");
    web.op("type", json!({"text": "typed by hand"}));
    let t = bob.expect("alice typing", |v| {
        v["event"] == "typing" && v["user"] == "alice"
    });
    assert_eq!(t["room"], "lab", "{t}");
    bob.message("typed by hand");
    web.op("type", json!({"text": "/away at lunch"}));
    let a = bob.expect("alice away", |v| {
        v["event"] == "away" && v["user"] == "alice"
    });
    assert_eq!(a["text"], "at lunch", "{a}");
    bob.send(json!({"cmd": "who", "room": "lab", "id": 10}));
    let who = bob.ok(json!(10));
    let me = who["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["user"] == "alice"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(me["display_name"], "Alice A.", "{who}");
    web.op("type", json!({"text": "/back"}));
    bob.expect("alice back", |v| {
        v["event"] == "back" && v["user"] == "alice"
    });

    // Read markers: shared by default, private after `/receipts off`.
    bob.send(json!({"cmd": "send", "room": "lab", "text": "read me", "id": 11}));
    let seq = bob.ok(json!(11))["seq"].as_u64().expect("seq");
    web.op("wait_text", json!({"text": "read me"}));
    bob.expect("alice's read marker", |v| {
        v["event"] == "read"
            && v["user"] == "alice"
            && v["room"] == "lab"
            && v["seq"].as_u64() >= Some(seq)
    });
    web.op("type", json!({"text": "/receipts off"}));
    web.op(
        "wait_text",
        json!({"text": "your read markers are private now"}),
    );
    bob.send(json!({"cmd": "send", "room": "lab", "text": "read me privately", "id": 12}));
    let private_seq = bob.ok(json!(12))["seq"].as_u64().expect("seq");
    web.op("wait_text", json!({"text": "read me privately"}));
    drain(&mut bob, Duration::from_secs(2));
    assert!(
        !bob.seen.iter().any(|v| v["event"] == "read"
            && v["user"] == "alice"
            && v["room"] == "lab"
            && v["seq"].as_u64() >= Some(private_seq)),
        "a private read marker reached bob"
    );

    // `@room` counts only from the room's owner (bob owns town, carol does not).
    carol.send(json!({"cmd": "join", "room": "town", "id": 13}));
    carol.ok(json!(13));
    carol
        .send(json!({"cmd": "send", "room": "town", "text": "@room not from the owner", "id": 14}));
    carol.ok(json!(14));
    bob.send(json!({"cmd": "send", "room": "town", "text": "@room standup now", "id": 15}));
    bob.ok(json!(15));
    let item = web.op("nav_item", json!({"name": "#town", "contains": "@1"}));
    std::thread::sleep(Duration::from_millis(500));
    let item2 = web.op("nav_item", json!({"name": "#town"}));
    assert!(
        item2["text"].as_str().is_some_and(|t| t.contains("@1")),
        "{item} then {item2}"
    );

    // A desktop notification for a mention while the tab is hidden.
    web.op("visibility", json!({"hidden": true}));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "@alice look here", "id": 16}));
    bob.ok(json!(16));
    let mut notes = Value::Null;
    for _ in 0..100 {
        notes = web.op("notifications", json!({}))["notes"].clone();
        if notes.to_string().contains("@alice look here") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let note = notes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["body"] == "@alice look here"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(note["title"], "bob in #lab", "{notes}");
    web.op("visibility", json!({"hidden": false}));

    // `/mute`: a mention in the muted room is still counted but makes no notification;
    // `/unmute` brings them back.
    web.op("open_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/mute"}));
    web.op("nav_item", json!({"name": "#lab", "contains": "(muted)"}));
    web.op("visibility", json!({"hidden": true}));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "@alice while muted", "id": 161}));
    bob.ok(json!(161));
    web.op("wait_text", json!({"text": "@alice while muted"}));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "@alice unmute check", "id": 162}));
    bob.ok(json!(162));
    web.op("wait_text", json!({"text": "@alice unmute check"}));
    let notes = web.op("notifications", json!({}))["notes"].clone();
    assert!(
        !notes.to_string().contains("while muted") && !notes.to_string().contains("unmute check"),
        "a muted room notified: {notes}"
    );
    web.op("nav_item", json!({"name": "#lab", "contains": "@"}));
    web.op("visibility", json!({"hidden": false}));
    web.op("type", json!({"text": "/unmute"}));
    web.op("visibility", json!({"hidden": true}));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "@alice after unmute", "id": 163}));
    bob.ok(json!(163));
    let mut notes = Value::Null;
    for _ in 0..100 {
        notes = web.op("notifications", json!({}))["notes"].clone();
        if notes.to_string().contains("@alice after unmute") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        notes.to_string().contains("@alice after unmute"),
        "no notification after /unmute: {notes}"
    );
    web.op("visibility", json!({"hidden": false}));

    // Blockcast from the browser in the end-to-end room: carol is left out and reads nothing
    // of it; bob reads it.
    web.op("open_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/except carol a secret for bob"}));
    let m = bob.message("a secret for bob");
    assert_eq!(m["e2ee"], true, "{m}");
    assert_eq!(m["room"], "lab", "{m}");
    web.op("wait_text", json!({"text": "a secret for bob"}));
    web.op("type", json!({"text": "for all again"}));
    carol.message("for all again");
    bob.message("for all again");
    assert!(
        !carol.saw_message("a secret for bob"),
        "a left-out member read a blockcast"
    );
}

/// New devices of the web user's account: a native device that asks for history shows in the
/// page with its safety number; approved there, it gets the browser's end-to-end history
/// (sealed to it as a native approver seals it) and reads it; another one, rejected there, is
/// out of the account.
#[test]
fn web_user_approves_and_rejects_new_devices_of_the_account() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let url = format!("https://127.0.0.1:{}/", server.port);
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = client(&server, "bob", bob_state.path());
    let mut web = Browser::start(&url);
    web.op("open", json!({}));
    web.op("register", json!({"user": "alice", "password": PW}));
    web.op("type", json!({"text": "/create lab"}));
    web.op("has_conv", json!({"name": "#lab"}));
    web.op("type", json!({"text": "/invite bob"}));
    bob.expect("bob joins lab's group", |v| {
        v["event"] == "e2ee" && v["kind"] == "joined" && v["room"] == "lab"
    });
    bob.send(json!({"cmd": "join", "room": "lab", "id": 1}));
    bob.ok(json!(1));
    bob.send(json!({"cmd": "send", "room": "lab", "text": "before the new device", "id": 2}));
    bob.ok(json!(2));
    web.op("wait_text", json!({"text": "before the new device"}));
    web.op("type", json!({"text": "from the web before"}));
    bob.message("from the web before");

    // A second device of alice's (a native one) asks; the page shows it with its number.
    let laptop_state = tempfile::tempdir().expect("tmp");
    let mut cmd = client_cmd(&server.addr(), "alice", laptop_state.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    let mut laptop = JsonClient::connect("alice-laptop", cmd);
    laptop.send(json!({"cmd": "devices", "id": 1}));
    let me = laptop.ok(json!(1));
    let device = me["device"].as_str().expect("device").to_string();
    let number = me["fingerprint"].as_str().expect("fingerprint").to_string();
    web.op(
        "wait_in",
        json!({"selector": "#devices-waiting", "text": device}),
    );
    web.op(
        "wait_in",
        json!({"selector": "#devices-waiting", "text": number}),
    );
    shot(&mut web, "new-device", 1100, 700);
    web.op("click", json!({"name": format!("Approve {device}")}));
    let got = laptop.expect("history_received", |v| {
        v["event"] == "e2ee" && v["kind"] == "history_received"
    });
    assert_eq!(
        (got["conversations"].clone(), got["messages"].clone()),
        (json!(1), json!(2)),
        "{got}"
    );
    laptop.send(json!({"cmd": "history", "room": "lab", "limit": 50, "id": 2}));
    let h = laptop.ok(json!(2));
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        ["before the new device", "from the web before"],
        "{h}"
    );
    web.op(
        "wait_text",
        json!({"text": format!("sent 2 messages of 1 conversations to your device {device}")}),
    );

    // A third one, rejected in the page: it is out of the account.
    let stranger_state = tempfile::tempdir().expect("tmp");
    let mut cmd = client_cmd(&server.addr(), "alice", stranger_state.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    let mut stranger = JsonClient::connect("alice-stranger", cmd);
    stranger.send(json!({"cmd": "devices", "id": 1}));
    let other = stranger.ok(json!(1))["device"]
        .as_str()
        .expect("device")
        .to_string();
    web.op(
        "wait_in",
        json!({"selector": "#devices-waiting", "text": other}),
    );
    web.op("click", json!({"name": format!("Reject {other}")}));
    let gone = stranger.expect("disconnected", |v| v["event"] == "disconnected");
    assert_eq!(gone["reason"], "kicked", "{gone}");
    stranger.proc.wait_exit(WAIT);
    let out = stranger.proc.finish();
    assert!(!out.stdout_text().contains("from the web before"));

    // The other way: the browser is the new device of an account whose native device has
    // history; approved there, the page gets that history (with its reactions and edits).
    let erin_state = tempfile::tempdir().expect("tmp");
    let mut erin = client(&server, "erin", erin_state.path());
    erin.send(json!({"cmd": "create_room", "room": "notes", "id": 1}));
    erin.ok(json!(1));
    erin.send(json!({"cmd": "send", "room": "notes", "text": "erin's first note", "id": 2}));
    let first = erin.ok(json!(2))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    erin.send(json!({"cmd": "send", "room": "notes", "text": "erin's typo", "id": 3}));
    let typo = erin.ok(json!(3))["msg_id"]
        .as_str()
        .expect("msg_id")
        .to_string();
    erin.send(json!({"cmd": "react", "msg_id": first, "emoji": "👍", "id": 4}));
    erin.ok(json!(4));
    erin.send(json!({"cmd": "edit", "msg_id": typo, "text": "erin's second note", "id": 5}));
    erin.ok(json!(5));
    web.op("type", json!({"text": "/quit"}));
    web.op("sign_in", json!({"user": "erin", "password": PW}));
    let w = erin.expect("the browser's device waiting", |v| {
        v["event"] == "e2ee" && v["kind"] == "device_waiting"
    });
    erin.send(json!({"cmd": "approve_device", "device": w["device"], "id": 6}));
    let approved = erin.ok(json!(6));
    assert_eq!(approved["conversations"], 1, "{approved}");
    web.op("wait_text", json!({"text": "messages of 1 conversations"}));
    web.op("open_conv", json!({"name": "#notes"}));
    web.op(
        "row",
        json!({"text": "erin's first note", "contains": "👍 1"}),
    );
    web.op(
        "row",
        json!({"text": "erin's second note", "contains": "(edited)"}),
    );
    // And the page takes part from then on, end-to-end.
    web.op("type", json!({"text": "from erin's browser"}));
    let m = erin.message("from erin's browser");
    assert_eq!(m["e2ee"], true, "{m}");
    erin.send(json!({"cmd": "send", "room": "notes", "text": "erin's third note", "id": 7}));
    erin.ok(json!(7));
    web.op("wait_text", json!({"text": "erin's third note"}));
}

/// A `conclave user` command on the data directory (through the admin socket while serving).
fn user_cmd(data: &Path, args: &[&str], password: Option<&str>) -> Finished {
    let mut cmd = conclave(["user", "--data-dir"]);
    cmd.arg(data).args(args).env_remove(PW_VAR);
    if let Some(pw) = password {
        cmd.env(PW_VAR, pw);
    }
    run("user", cmd)
}

/// A JSON client of an existing account on a server with a server password.
fn gated_client(server: &Server, user: &str, state: &Path) -> Command {
    let mut cmd = client_cmd(&server.addr(), user, state, PW);
    cmd.args([
        "--fingerprint",
        &server.fingerprint,
        "--server-password-env",
        "CONCLAVE_TEST_SPW",
    ])
    .env("CONCLAVE_TEST_SPW", "gate");
    cmd
}

/// A server with a server password and invite-only registration: the web registers with an
/// invite code (and is refused without one), a second tab of the same account is refused,
/// password rooms both ways (one of them end-to-end), and an admin's `/announce`, `/ban` and
/// `/unban` from the browser.
#[test]
fn web_user_with_invite_code_password_rooms_second_tab_and_admin_commands() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    for (name, admin) in [("alice", true), ("bob", false), ("mallory", false)] {
        let mut args = vec!["add", name, "--password-env", PW_VAR];
        if admin {
            args.push("--admin");
        }
        user_cmd(&data, &args, Some(PW)).assert_success();
    }
    let server = Server::start(
        &data,
        &[
            "--registration",
            "invite",
            "--server-password-env",
            "CONCLAVE_TEST_SPW",
        ],
        &[("CONCLAVE_TEST_SPW", "gate")],
    );
    let url = format!("https://127.0.0.1:{}/", server.port);
    let bob_state = tempfile::tempdir().expect("tmp");
    let mut bob = JsonClient::connect("bob", gated_client(&server, "bob", bob_state.path()));
    let mut web = Browser::start(&url);
    web.op("open", json!({}));

    // Registration needs the server password and an invite code; a code registers once.
    let no_code = web.op(
        "register_fails",
        json!({"user": "carol", "password": PW, "server_password": "gate"}),
    );
    assert!(
        no_code["error"]
            .as_str()
            .is_some_and(|e| e.contains("invit")),
        "{no_code}"
    );
    let f = user_cmd(&data, &["invite"], None);
    f.assert_success();
    let code = f.stdout[0].trim().to_string();
    let wrong_gate = web.op(
        "register_fails",
        json!({"user": "carol", "password": PW, "server_password": "wrong", "invite": code}),
    );
    assert!(
        wrong_gate["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{wrong_gate}"
    );
    web.op(
        "register",
        json!({"user": "carol", "password": PW, "server_password": "gate", "invite": code}),
    );
    web.op("type", json!({"text": "/quit"}));
    let again = web.op(
        "register_fails",
        json!({"user": "dave", "password": PW, "server_password": "gate", "invite": code}),
    );
    assert!(
        again["error"]
            .as_str()
            .is_some_and(|e| e.contains("invite code")),
        "{again}"
    );

    // The admin signs in; a second tab of the same account is refused, saying why.
    web.op(
        "sign_in",
        json!({"user": "alice", "password": PW, "server_password": "gate"}),
    );
    let second = web.op(
        "second_tab",
        json!({"user": "alice", "password": PW, "server_password": "gate"}),
    );
    assert!(
        second["error"]
            .as_str()
            .is_some_and(|e| e.contains("signed in in another tab")),
        "{second}"
    );
    // The first tab goes on.
    web.op("type", json!({"text": "/who"}));
    web.op("wait_text", json!({"text": "bob"}));

    // A password room of the JSON user's: refused without the password, joined with it.
    bob.send(json!({"cmd": "create_room", "room": "vault", "password": "sesame", "id": 1}));
    bob.ok(json!(1));
    web.op("type", json!({"text": "/join vault"}));
    web.op("wait_text", json!({"text": "needs a password"}));
    web.op("type", json!({"text": "/join vault wrong"}));
    web.op("wait_text", json!({"text": "wrong password"}));
    web.op("type", json!({"text": "/join vault sesame"}));
    web.op("has_conv", json!({"name": "#vault"}));
    bob.send(json!({"cmd": "send", "room": "vault", "text": "inside the vault", "id": 2}));
    bob.ok(json!(2));
    web.op("wait_text", json!({"text": "inside the vault"}));
    web.op("type", json!({"text": "the web is in the vault"}));
    bob.message("the web is in the vault");

    // An end-to-end password room made in the browser.
    web.op("type", json!({"text": "/create den hunter2"}));
    web.op("has_conv", json!({"name": "#den"}));
    bob.send(json!({"cmd": "join", "room": "den", "id": 3}));
    assert!(bob.reply(json!(3))["error"] != Value::Null);
    bob.send(json!({"cmd": "join", "room": "den", "password": "hunter2", "id": 4}));
    bob.ok(json!(4));
    web.op("wait_text", json!({"text": "bob joined"}));
    bob.send(json!({"cmd": "send", "room": "den", "text": "bob in the den", "id": 5}));
    bob.ok(json!(5));
    web.op("wait_text", json!({"text": "bob in the den"}));
    web.op("type", json!({"text": "the web in the den"}));
    let m = bob.message("the web in the den");
    assert_eq!(m["e2ee"], true, "{m}");

    // Admin commands from the browser.
    web.op("type", json!({"text": "/announce maintenance at five"}));
    let a = bob.expect("the announcement", |v| v["event"] == "announce");
    assert_eq!(a["text"], "maintenance at five", "{a}");
    assert_eq!(a["from"], "alice", "{a}");
    let m_state = tempfile::tempdir().expect("tmp");
    let mut mallory =
        JsonClient::connect("mallory", gated_client(&server, "mallory", m_state.path()));
    web.op("type", json!({"text": "/ban mallory spamming"}));
    web.op("wait_text", json!({"text": "banned mallory"}));
    let gone = mallory.expect("mallory's disconnect", |v| v["event"] == "disconnected");
    assert_eq!(gone["reason"], "banned", "{gone}");
    mallory.proc.wait_exit(WAIT);
    let refused = client_fails(
        "mallory, banned",
        gated_client(&server, "mallory", m_state.path()),
    );
    assert!(refused.stderr.contains("ban"), "{refused:#?}");
    web.op("type", json!({"text": "/unban mallory"}));
    web.op("wait_text", json!({"text": "unbanned mallory"}));
    let back = JsonClient::connect("mallory", gated_client(&server, "mallory", m_state.path()));
    assert_eq!(back.connected["user"], "mallory");
}
