//! End to end: the real `conclave chat` in a real terminal (tmux), against a real server,
//! talking with a JSON client. Keys go in with `tmux send-keys`; the screen comes out with
//! `tmux capture-pane`, polled until it shows what is expected or a deadline passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::{JsonClient, PW, PW_VAR, Server, client_cmd, colon_upper};
use serde_json::json;

/// Terminal size of the panes.
const COLUMNS: u16 = 120;
const ROWS: u16 = 32;
/// How long a screen may take to show something.
const SCREEN_WAIT: Duration = Duration::from_secs(20);
/// How often the screen is read while waiting.
const POLL: Duration = Duration::from_millis(100);

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: String,
    /// Where the exit statuses are written.
    dir: PathBuf,
}

fn tmux_installed() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Tmux {
    fn new(tag: &str, dir: &Path) -> Tmux {
        Tmux {
            socket: format!("conclave-test-{}-{tag}", std::process::id()),
            dir: dir.to_path_buf(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("tmux {args:?}: {e}"))
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `conclave chat ARGS` in a new session `name`, with `env` set.
    fn start_chat(&self, name: &str, args: &[&str], env: &[(&str, &str)]) {
        let mut command = shell_quote(common::bin());
        command.push_str(" chat");
        for a in args {
            command.push(' ');
            command.push_str(&shell_quote(a));
        }
        let (w, h) = (COLUMNS.to_string(), ROWS.to_string());
        let mut tmux_args: Vec<String> = ["new-session", "-d", "-s", name, "-x", &w, "-y", &h]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (k, v) in env {
            tmux_args.push("-e".into());
            tmux_args.push(format!("{k}={v}"));
        }
        let status = self.status_file(name);
        command.push_str(&format!(
            "; echo $? > {}",
            shell_quote(status.to_str().expect("a UTF-8 temporary path"))
        ));
        tmux_args.push(command);
        let refs: Vec<&str> = tmux_args.iter().map(String::as_str).collect();
        self.ok(&refs);
    }

    /// Types `text` literally, then Enter.
    fn type_line(&self, name: &str, text: &str) {
        self.ok(&["send-keys", "-t", name, "-l", text]);
        self.ok(&["send-keys", "-t", name, "Enter"]);
    }

    fn key(&self, name: &str, key: &str) {
        self.ok(&["send-keys", "-t", name, key]);
    }

    fn screen(&self, name: &str) -> String {
        self.ok(&["capture-pane", "-p", "-t", name])
    }

    /// Waits until the screen shows every one of `needles`; panics with the screen after
    /// [`SCREEN_WAIT`].
    #[track_caller]
    fn wait_for(&self, name: &str, needles: &[&str]) -> String {
        let deadline = Instant::now() + SCREEN_WAIT;
        let max_polls = SCREEN_WAIT.as_millis() / POLL.as_millis() + 1;
        let mut screen = String::new();
        for _ in 0..max_polls {
            screen = self.screen(name);
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(POLL);
        }
        let missing: Vec<&&str> = needles.iter().filter(|n| !screen.contains(**n)).collect();
        panic!("{name}: the screen never showed {missing:?} within {SCREEN_WAIT:?}:\n{screen}");
    }

    /// Waits for the program in `name` to exit; returns its exit status (written by the
    /// shell that runs it: tmux does not always learn a dead pane's status).
    #[track_caller]
    fn wait_exit(&self, name: &str) -> i32 {
        let path = self.status_file(name);
        let max_polls = SCREEN_WAIT.as_millis() / POLL.as_millis() + 1;
        for _ in 0..max_polls {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(status) = text.trim().parse()
            {
                return status;
            }
            thread::sleep(POLL);
        }
        panic!(
            "{name}: conclave chat did not exit within {SCREEN_WAIT:?}:\n{}",
            self.screen(name)
        );
    }

    fn status_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.status"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn chat_args<'a>(addr: &'a str, user: &'a str, state: &'a Path) -> Vec<&'a str> {
    vec![
        "--server",
        addr,
        "--user",
        user,
        "--password-env",
        PW_VAR,
        "--state-dir",
        state.to_str().expect("a UTF-8 temporary path"),
    ]
}

#[test]
fn two_people_talk_through_the_terminal_client() {
    if !tmux_installed() {
        eprintln!(
            "SKIPPED two_people_talk_through_the_terminal_client: tmux is not installed \
             (apt-get install tmux)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let addr = server.addr();
    let fp = server.fingerprint.clone();

    // Bob: a JSON client.
    let bob_state = tmp.path().join("bob");
    let mut cmd = client_cmd(&addr, "bob", &bob_state, PW);
    cmd.args(["--register", "--fingerprint", &fp]);
    let mut bob = JsonClient::connect("bob", cmd);

    // Alice: the terminal client, first contact: the fingerprint is shown and confirmed.
    let tmux = Tmux::new("talk", tmp.path());
    let alice_state = tmp.path().join("alice");
    let mut args = chat_args(&addr, "alice", &alice_state);
    args.push("--register");
    let home = alice_state.to_string_lossy().into_owned();
    let env = [(PW_VAR, PW), ("HOME", home.as_str())];
    tmux.start_chat("alice", &args, &env);
    let first_half = &colon_upper(&fp)[..47];
    tmux.wait_for("alice", &["Is this the right server?", first_half]);
    tmux.key("alice", "y");
    tmux.wait_for(
        "alice",
        &[
            "● connected",
            "TLS 1.3 X25519MLKEM768",
            "[#general]",
            "#general",
        ],
    );
    let pins = std::fs::read_to_string(alice_state.join("known_servers")).expect("a pin");
    assert!(pins.contains(&fp), "{pins}");

    // Bob speaks in the room; Alice sees it.
    bob.send(json!({"cmd": "send", "room": "general", "text": "hello alice from bob", "id": 1}));
    bob.ok(json!(1));
    tmux.wait_for("alice", &["bob │ hello alice from bob"]);

    // Alice answers; Bob gets it.
    tmux.type_line("alice", "hi bob, from the terminal");
    let m = bob.message("hi bob, from the terminal");
    assert_eq!(m["room"], "general");
    assert_eq!(m["from"], "alice");
    tmux.wait_for("alice", &["alice │ hi bob, from the terminal"]);

    // Alt-Up selects Bob's message; /reply answers it and /thread opens its thread.
    bob.send(
        json!({"cmd": "send", "room": "general", "text": "which cable for the rig", "id": 10}),
    );
    let asked = bob.ok(json!(10));
    tmux.wait_for("alice", &["bob │ which cable for the rig"]);
    tmux.key("alice", "M-Up");
    tmux.wait_for("alice", &["bob ▶ which cable for the rig", "[selected:"]);
    tmux.type_line("alice", "/reply the blue one");
    let m = bob.message("the blue one");
    assert_eq!(m["reply_to"], asked["msg_id"], "{m}");
    tmux.wait_for("alice", &["↪ bob: which cable for the rig │ the blue one"]);
    tmux.key("alice", "M-Up");
    tmux.key("alice", "M-Up");
    tmux.type_line("alice", "/thread");
    tmux.wait_for(
        "alice",
        &[
            "thread · bob: which cable for the rig · 1 replies",
            "alice │ the blue one",
        ],
    );
    tmux.type_line("alice", "and a spare");
    let m = bob.message("and a spare");
    assert_eq!(m["reply_to"], asked["msg_id"], "{m}");
    tmux.wait_for("alice", &["2 replies"]);
    tmux.key("alice", "Escape");

    // A direct message opens a conversation with an unread count.
    bob.send(json!({"cmd": "send", "to": ["alice"], "text": "just for you", "id": 2}));
    bob.ok(json!(2));
    tmux.wait_for("alice", &["@bob", "act:"]);
    tmux.type_line("alice", "/msg bob and just for you");
    let m = bob.message("and just for you");
    assert_eq!(m["to"], json!(["bob"]));
    tmux.wait_for(
        "alice",
        &["@bob · direct conversation with bob", "bob │ just for you"],
    );

    // Commands answer on the screen.
    tmux.type_line("alice", "/who");
    tmux.wait_for("alice", &["online (2): alice, bob"]);

    // Files, both ways. Alice offers one to Bob (the conversation on screen); he takes it.
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "minutes of the meeting\n".repeat(1000)).expect("write a file");
    tmux.type_line("alice", &format!("/file {}", notes.display()));
    let offer = bob.expect("a file_offer", |v| v["event"] == "file_offer");
    assert_eq!(offer["from"], "alice");
    assert_eq!(offer["name"], "notes.txt");
    tmux.wait_for("alice", &["offered notes.txt (23000 bytes) to @bob"]);
    let bob_dir = tmp.path().join("bob-files");
    std::fs::create_dir_all(&bob_dir).expect("a directory");
    bob.send(json!({"cmd": "accept_file", "file_id": offer["file_id"], "dir": bob_dir, "id": 3}));
    bob.ok(json!(3));
    assert_eq!(
        std::fs::read(bob_dir.join("notes.txt")).expect("received"),
        std::fs::read(&notes).expect("sent")
    );
    tmux.wait_for("alice", &["bob received your file"]);
    // Bob offers one to Alice; she sees the offer and accepts it.
    let photo = tmp.path().join("photo.bin");
    std::fs::write(&photo, vec![7u8; 300_000]).expect("write a file");
    bob.send(json!({"cmd": "send_file", "path": photo, "to": ["alice"], "id": 4}));
    let sent = bob.ok(json!(4));
    let file_id = sent["file_id"].as_str().expect("a file id").to_string();
    tmux.wait_for("alice", &["bob offers the file photo.bin"]);
    let alice_dir = tmp.path().join("alice-files");
    std::fs::create_dir_all(&alice_dir).expect("a directory");
    tmux.type_line(
        "alice",
        &format!("/accept {file_id} {}", alice_dir.display()),
    );
    tmux.wait_for("alice", &["received 300000 bytes into"]);
    assert_eq!(
        std::fs::read(alice_dir.join("photo.bin")).expect("received"),
        vec![7u8; 300_000]
    );

    // Rooms of both kinds, each marked in the status bar; the server lists their kind.
    tmux.type_line("alice", "/create lab");
    tmux.wait_for("alice", &["[#lab]", "E2EE"]);
    tmux.type_line("alice", "/create plain server");
    tmux.wait_for("alice", &["[#plain]", "server-enc"]);
    bob.send(json!({"cmd": "rooms", "id": 5}));
    let rooms = bob.ok(json!(5));
    let kind = |name: &str| {
        rooms["rooms"]
            .as_array()
            .expect("rooms")
            .iter()
            .find(|r| r["room"] == name)
            .map(|r| r["e2ee"].clone())
    };
    assert_eq!(kind("lab"), Some(json!(true)), "{rooms}");
    assert_eq!(kind("plain"), Some(json!(false)), "{rooms}");

    // Quit: exit status 0.
    tmux.type_line("alice", "/quit");
    assert_eq!(tmux.wait_exit("alice"), 0);

    // Next time the pin is known: straight in, and the history is there.
    let args = chat_args(&addr, "alice", &alice_state);
    tmux.start_chat("again", &args, &env);
    let screen = tmux.wait_for(
        "again",
        &[
            "● connected",
            "bob │ hello alice from bob",
            "alice │ hi bob, from the terminal",
        ],
    );
    assert!(!screen.contains("Is this the right server?"), "{screen}");
    tmux.key("again", "C-c");
    assert_eq!(tmux.wait_exit("again"), 0);
    bob.quit().assert_success();
}

/// `conclave chat --server RELAY1,RELAY2`: relay 1 dies, the chat moves to relay 2 (the status
/// bar names it), shows what came meanwhile once, and keeps talking. The pin is kept under
/// the first address, and the next start with the same list needs no flag.
#[test]
fn the_terminal_client_moves_to_the_next_address_when_one_dies() {
    if !tmux_installed() {
        eprintln!(
            "SKIPPED the_terminal_client_moves_to_the_next_address_when_one_dies: tmux is not \
             installed (apt-get install tmux)"
        );
        return;
    }
    use common::relay::{Relay, RelayConfig};
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let addr = server.addr();
    let fp = server.fingerprint.clone();
    let target = addr.parse().expect("the server's address");
    let relay1 = Relay::start(target, RelayConfig::delay_ms(0.3, 1));
    let relay2 = Relay::start(target, RelayConfig::delay_ms(0.3, 2));
    let (a1, a2) = (relay1.addr(), relay2.addr());
    let list = format!("{a1},{a2}");

    let bob_state = tmp.path().join("bob");
    let mut cmd = client_cmd(&addr, "bob", &bob_state, PW);
    cmd.args(["--register", "--fingerprint", &fp]);
    let mut bob = JsonClient::connect("bob", cmd);

    let tmux = Tmux::new("failover", tmp.path());
    let alice_state = tmp.path().join("alice");
    let mut args = chat_args(&list, "alice", &alice_state);
    args.extend(["--register", "--fingerprint", &fp]);
    let home = alice_state.to_string_lossy().into_owned();
    let env = [(PW_VAR, PW), ("HOME", home.as_str())];
    tmux.start_chat("alice", &args, &env);
    tmux.wait_for("alice", &["● connected", &a1, "[#general]"]);
    let pins = std::fs::read_to_string(alice_state.join("known_servers")).expect("a pin");
    assert!(
        pins.contains(&format!("{a1} {fp}")),
        "pinned under the first address: {pins}"
    );
    assert!(!pins.contains(&a2), "{pins}");

    // Relay 1 dies; bob writes while alice is moving to relay 2.
    drop(relay1);
    bob.send(json!({"cmd": "send", "room": "general", "text": "sent while you moved", "id": 1}));
    bob.ok(json!(1));
    let screen = tmux.wait_for("alice", &["● connected", &a2, "bob │ sent while you moved"]);
    assert_eq!(
        screen.matches("bob │ sent while you moved").count(),
        1,
        "shown once:\n{screen}"
    );
    tmux.type_line("alice", "hello through the second address");
    let m = bob.message("hello through the second address");
    assert_eq!(m["from"], "alice");
    tmux.type_line("alice", "/quit");
    assert_eq!(tmux.wait_exit("alice"), 0);

    // The next start with the same list is let in by the pin, through relay 2 (relay 1 is
    // gone), without --fingerprint.
    let args = chat_args(&list, "alice", &alice_state);
    tmux.start_chat("again", &args, &env);
    let screen = tmux.wait_for("again", &["● connected", &a2]);
    assert!(!screen.contains("Is this the right server?"), "{screen}");
    tmux.key("again", "C-c");
    assert_eq!(tmux.wait_exit("again"), 0);
    drop(relay2);
    bob.quit().assert_success();
}

/// Grep for a secret in every file under `dir`.
fn files_with(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// Issue 21 in the real terminal: `/restore` asks for the recovery key in a field that shows
/// only dots, restores the history on a fresh state directory, and the key is nowhere on the
/// screen or in the state directory (its chat.log included); `--recovery-key-env` does the
/// same without typing.
#[test]
fn restore_in_the_terminal_asks_for_the_key_without_showing_it() {
    if !tmux_installed() {
        eprintln!(
            "SKIPPED restore_in_the_terminal_asks_for_the_key_without_showing_it: tmux is not \
             installed (apt-get install tmux)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let addr = server.addr();
    let fp = server.fingerprint.clone();

    // Alice's first device (a JSON client) writes some history and a backup, then is gone.
    let first = tmp.path().join("first");
    let mut cmd = client_cmd(&addr, "alice", &first, PW);
    cmd.args(["--register", "--fingerprint", &fp]);
    let mut alice = JsonClient::connect("alice", cmd);
    alice.send(json!({"cmd": "create_room", "room": "lab", "id": 1}));
    alice.ok(json!(1));
    for i in 0..3 {
        alice.send(
            json!({"cmd": "send", "room": "lab", "text": format!("old poppy {i}"), "id": 10 + i}),
        );
        alice.ok(json!(10 + i));
    }
    alice.send(json!({"cmd": "backup_enable", "id": 2}));
    let key = alice.ok(json!(2))["recovery_key"]
        .as_str()
        .expect("a recovery key")
        .to_string();
    alice.quit().assert_success();
    std::fs::remove_dir_all(&first).expect("the first device is gone");
    // Two groups of the key: what a screen that showed it would show.
    let group = key[..9].to_string();

    // A fresh computer: /restore, the key typed into the masked field.
    let tmux = Tmux::new("restore", tmp.path());
    let fresh = tmp.path().join("fresh");
    let mut args = chat_args(&addr, "alice", &fresh);
    args.extend(["--fingerprint", fp.as_str()]);
    let home = fresh.to_string_lossy().into_owned();
    let env = [(PW_VAR, PW), ("HOME", home.as_str())];
    tmux.start_chat("fresh", &args, &env);
    tmux.wait_for("fresh", &["● connected"]);
    tmux.type_line("fresh", "/restore");
    tmux.wait_for(
        "fresh",
        &["[recovery key]", "type or paste your recovery key"],
    );
    tmux.ok(&["send-keys", "-t", "fresh", "-l", &key]);
    let screen = tmux.wait_for("fresh", &["[recovery key] ••••••••••"]);
    assert!(
        !screen.contains(&group),
        "the key is on the screen:\n{screen}"
    );
    tmux.key("fresh", "Enter");
    let screen = tmux.wait_for("fresh", &["restored 3 messages of 1 conversations"]);
    assert!(
        !screen.contains(&group),
        "the key is on the screen:\n{screen}"
    );
    tmux.type_line("fresh", "/search poppy");
    tmux.wait_for("fresh", &["old poppy 2"]);
    tmux.key("fresh", "Escape");
    tmux.type_line("fresh", "/quit");
    assert_eq!(tmux.wait_exit("fresh"), 0);
    let compact = key.replace('-', "");
    for needle in [key.as_str(), compact.as_str()] {
        let hits = files_with(&fresh, needle);
        assert!(hits.is_empty(), "the key is in {hits:?}");
    }
    assert!(
        fresh.join("chat.log").exists(),
        "chat.log is where the check looked"
    );

    // Another fresh computer, the key from the environment.
    let other = tmp.path().join("other");
    let mut args = chat_args(&addr, "alice", &other);
    args.extend([
        "--fingerprint",
        fp.as_str(),
        "--recovery-key-env",
        "CONCLAVE_TEST_RK",
    ]);
    let home = other.to_string_lossy().into_owned();
    let env = [
        (PW_VAR, PW),
        ("HOME", home.as_str()),
        ("CONCLAVE_TEST_RK", key.as_str()),
    ];
    tmux.start_chat("other", &args, &env);
    let screen = tmux.wait_for("other", &["restored 3 messages of 1 conversations"]);
    assert!(
        !screen.contains(&group),
        "the key is on the screen:\n{screen}"
    );
    tmux.type_line("other", "/quit");
    assert_eq!(tmux.wait_exit("other"), 0);
    assert!(files_with(&other, &compact).is_empty());
}
