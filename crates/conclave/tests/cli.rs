//! End-to-end tests of the real `conclave` binary: `serve` on loopback with real TLS and a
//! temporary data directory, the operator commands on that directory, and JSON-lines clients.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

const PW2: &str = "another fine password";

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// `conclave user --data-dir D ARGS` with the password in [`PW_VAR`].
fn user_cmd(data: &Path, args: &[&str], password: Option<&str>) -> Finished {
    let mut cmd = conclave(["user", "--data-dir"]);
    cmd.arg(data).args(args).env_remove(PW_VAR);
    if let Some(pw) = password {
        cmd.env(PW_VAR, pw);
    }
    run("user", cmd)
}

/// `conclave user list` as (name, role) pairs.
fn user_list(data: &Path) -> Vec<(String, String)> {
    let f = user_cmd(data, &["list"], None);
    f.assert_success();
    f.stdout
        .iter()
        .map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next().expect("a name").to_string();
            let role = w.next().unwrap_or_else(|| panic!("no role in {l:?}"));
            assert_eq!(w.next(), None, "{l:?}");
            (name, role.to_string())
        })
        .collect()
}

fn fingerprint_cmd(data: &Path) -> Finished {
    let mut cmd = conclave(["fingerprint", "--data-dir"]);
    cmd.arg(data);
    run("fingerprint", cmd)
}

#[test]
fn first_start_creates_identity_and_prints_how_to_connect() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[], &[]);
    let fp = server.fingerprint.clone();

    assert!(
        server.banner[0].starts_with("Created a new TLS key"),
        "{:#?}",
        server.banner
    );
    assert!(
        server
            .banner
            .iter()
            .any(|l| l.contains("SHA-256") && l.contains(&colon_upper(&fp))),
        "the fingerprint line: {:#?}",
        server.banner
    );
    // On loopback the auto policy is open, so the printed command registers.
    assert_eq!(
        server.client_command(),
        format!(
            "conclave client --json --server {} --user YOUR_NAME --register --fingerprint {fp}",
            server.addr()
        )
    );

    let f = fingerprint_cmd(&data);
    f.assert_success();
    assert_eq!(
        f.stdout_text(),
        format!("{fp}\n"),
        "exactly the fingerprint"
    );
    assert!(is_fingerprint(&fp));

    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("tls/key.pem")), 0o600, "TLS key");
    assert_eq!(mode(&data.join("data.key")), 0o600, "data key");
    assert_eq!(mode(&data.join("conclave.db")), 0o600, "database");

    // The printed command works as printed (plus a password and a state dir).
    let state = tempdir();
    let words: Vec<String> = server
        .client_command()
        .split_whitespace()
        .skip(1)
        .map(|w| if w == "YOUR_NAME" { "zed" } else { w }.to_string())
        .collect();
    let mut cmd = conclave(&words);
    cmd.arg("--state-dir")
        .arg(state.path())
        .args(["--password-env", PW_VAR])
        .env(PW_VAR, PW)
        .env("HOME", state.path());
    let zed = JsonClient::connect("zed", cmd);
    assert_eq!(zed.connected["user"], "zed");
    assert_eq!(zed.connected["fingerprint"], fp.as_str());
    assert_eq!(zed.connected["trust"], "fingerprint");
    assert_eq!(zed.connected["tls"], "TLS 1.3");
    assert_eq!(zed.connected["key_exchange"], "X25519MLKEM768");
    assert_eq!(zed.connected["post_quantum"], true);
    assert_eq!(zed.connected["server"], server.addr().as_str());
    zed.quit();

    server.stop().assert_success();

    // A second start reuses the key.
    let again = Server::start(&data, &[], &[]);
    assert_eq!(again.fingerprint, fp);
    assert!(
        !again.banner.iter().any(|l| l.contains("Created")),
        "{:#?}",
        again.banner
    );
    again.stop().assert_success();
    assert_eq!(fingerprint_cmd(&data).stdout_text(), format!("{fp}\n"));
}

#[test]
fn fingerprint_without_a_certificate_says_to_start_the_server() {
    let tmp = tempdir();
    for data in [tmp.path().join("missing"), tmp.path().to_path_buf()] {
        let f = fingerprint_cmd(&data);
        f.assert_failure().assert_stderr_has("conclave serve");
        assert!(f.stdout.is_empty(), "{f:#?}");
        assert!(f.stderr.contains("start the server"), "{f:#?}");
    }
    assert!(!tmp.path().join("missing").exists(), "nothing is created");
}

#[test]
fn user_add_list_passwd_del_and_invite() {
    let tmp = tempdir();
    let data = tmp.path().join("data");

    let f = user_cmd(
        &data,
        &["add", "alice", "--admin", "--password-env", PW_VAR],
        Some(PW),
    );
    f.assert_success();
    assert_eq!(f.stdout_text(), "created admin alice\n");
    let f = user_cmd(&data, &["add", "Bob", "--password-env", PW_VAR], Some(PW));
    f.assert_success();
    assert_eq!(f.stdout_text(), "created user bob\n");
    user_cmd(&data, &["add", "dave", "--password-env", PW_VAR], Some(PW)).assert_success();

    // An existing name, in any case.
    let f = user_cmd(&data, &["add", "BOB", "--password-env", PW_VAR], Some(PW));
    f.assert_failure().assert_stderr_has("exists");
    // The variable is not set.
    let f = user_cmd(&data, &["add", "carol", "--password-env", PW_VAR], None);
    f.assert_failure()
        .assert_stderr_has(PW_VAR)
        .assert_stderr_has("not set");

    let mut list = user_list(&data);
    list.sort();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        list,
        pairs(&[("alice", "admin"), ("bob", "user"), ("dave", "user")])
    );

    let server = Server::start(&data, &["--registration", "invite"], &[]);
    let fp = server.fingerprint.clone();
    let addr = server.addr();
    let state = tempdir();
    let login = |user: &str, pw: &str| {
        let mut cmd = client_cmd(&addr, user, state.path(), pw);
        cmd.args(["--fingerprint", &fp]);
        cmd
    };

    let alice = JsonClient::connect("alice", login("alice", PW));
    assert_eq!(alice.connected["admin"], true);
    assert_eq!(alice.connected["rooms"], json!(["general"]));
    let bob = JsonClient::connect("bob", login("bob", PW));
    assert_eq!(bob.connected["admin"], false);
    bob.quit();

    // passwd (while the server runs): the old password fails, the new one works.
    let f = user_cmd(
        &data,
        &["passwd", "bob", "--password-env", PW_VAR],
        Some(PW2),
    );
    f.assert_success();
    assert_eq!(f.stdout_text(), "password changed for bob\n");
    client_fails("bob, old password", login("bob", PW))
        .assert_stderr_has("wrong user name or password");
    JsonClient::connect("bob", login("bob", PW2)).quit();

    // del: the account is gone.
    let f = user_cmd(&data, &["del", "dave"], None);
    f.assert_success();
    assert!(f.stdout_text().starts_with("deleted dave"), "{f:#?}");
    client_fails("dave, deleted", login("dave", PW))
        .assert_stderr_has("wrong user name or password");
    user_cmd(&data, &["del", "dave"], None)
        .assert_failure()
        .assert_stderr_has("no account");
    let mut list = user_list(&data);
    list.sort();
    assert_eq!(list, pairs(&[("alice", "admin"), ("bob", "user")]));

    // An invite code registers once.
    let f = user_cmd(&data, &["invite"], None);
    f.assert_success();
    assert_eq!(f.stdout.len(), 1, "{f:#?}");
    let code = f.stdout[0].trim().to_string();
    assert!(
        code.len() >= 16 && !code.contains(char::is_whitespace),
        "{code:?}"
    );
    let register = |user: &str, code: Option<&str>| {
        let mut cmd = login(user, PW);
        cmd.arg("--register");
        if let Some(code) = code {
            cmd.args(["--invite-code-env", "CONCLAVE_TEST_INVITE"])
                .env("CONCLAVE_TEST_INVITE", code);
        }
        cmd
    };
    client_fails("gina, no code", register("gina", None)).assert_stderr_has("invit");
    let erin = JsonClient::connect("erin", register("erin", Some(&code)));
    assert_eq!(erin.connected["user"], "erin");
    assert_eq!(erin.connected["rooms"], json!(["general"]));
    erin.quit();
    client_fails("frank, used code", register("frank", Some(&code)))
        .assert_stderr_has("invite code");
    assert!(
        !user_list(&data)
            .iter()
            .any(|(n, _)| n == "frank" || n == "gina"),
        "refused registrations create nothing"
    );

    alice.quit();
    server.stop().assert_success();
}

#[test]
fn json_clients_talk_through_a_server() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let fp = server.fingerprint.clone();
    let addr = server.addr();

    let alice_state = tempdir();
    let mut cmd = client_cmd(&addr, "alice", alice_state.path(), PW);
    cmd.args(["--register", "--trust-on-first-use"]);
    let mut alice = JsonClient::connect("alice", cmd);
    assert_eq!(alice.connected["trust"], "new");
    assert_eq!(alice.connected["fingerprint"], fp.as_str());
    let pins = std::fs::read_to_string(alice_state.path().join("known_servers"))
        .expect("known_servers written");
    assert!(
        pins.lines().any(|l| l.trim() == format!("{addr} {fp}")),
        "{pins}"
    );
    let stderr = alice
        .proc
        .stderr_when(WAIT, |text| shows_fingerprint(text, &fp));
    assert!(
        shows_fingerprint(&stderr, &fp),
        "TOFU shows the fingerprint on stderr: {stderr}"
    );

    // The colon-separated upper-case form is accepted, as is plain hex.
    let bob_state = tempdir();
    let mut cmd = client_cmd(&addr, "bob", bob_state.path(), PW);
    cmd.args(["--register", "--fingerprint", &colon_upper(&fp)]);
    let mut bob = JsonClient::connect("bob", cmd);
    assert_eq!(bob.connected["trust"], "fingerprint");
    let carol_state = tempdir();
    let mut cmd = client_cmd(&addr, "carol", carol_state.path(), PW);
    cmd.args(["--register", "--fingerprint", &fp]);
    let mut carol = JsonClient::connect("carol", cmd);
    assert_eq!(carol.connected["rooms"], json!(["general"]));

    // Broadcast.
    alice.send(json!({"cmd": "send", "room": "general", "text": "hello room", "id": 1}));
    let sent = alice.ok(json!(1));
    assert!(sent["msg_id"].is_string(), "{sent}");
    assert!(sent["seq"].as_u64().is_some_and(|s| s >= 1), "{sent}");
    assert!(sent["ts"].as_u64().is_some_and(|t| t > 0), "{sent}");
    for c in [&mut bob, &mut carol] {
        let m = c.message("hello room");
        assert_eq!(m["room"], "general", "{m}");
        assert_eq!(m["from"], "alice", "{m}");
        assert_eq!(m["msg_id"], sent["msg_id"], "{m}");
        assert_eq!(m["seq"], sent["seq"], "{m}");
        assert_eq!(m["ts"], sent["ts"], "{m}");
        assert!(m.get("id").is_none(), "events carry no id: {m}");
    }

    // Unicast: to bob only. The id comes back whatever its type.
    alice.send(json!({"cmd": "send", "to": ["bob"], "text": "psst bob", "id": "two"}));
    alice.ok(json!("two"));
    let m = bob.message("psst bob");
    assert_eq!(m["from"], "alice", "{m}");
    assert_eq!(m["to"], json!(["bob"]), "{m}");
    assert!(m.get("room").is_none(), "{m}");

    // Blockcast: the room except carol.
    let id3 = json!({"n": 3});
    alice.send(
        json!({"cmd": "send", "room": "general", "text": "not for carol",
        "except": ["carol"], "id": id3}),
    );
    alice.ok(id3);
    assert_eq!(bob.message("not for carol")["room"], "general");

    // A later broadcast reaches carol; fan-out is in commit order, so had she been sent the
    // earlier ones they would have come first.
    alice.send(json!({"cmd": "send", "room": "general", "text": "sentinel", "id": 4}));
    alice.ok(json!(4));
    carol.message("sentinel");
    bob.message("sentinel");
    assert!(!carol.saw_message("psst bob"), "{:#?}", carol.seen);
    assert!(!carol.saw_message("not for carol"), "{:#?}", carol.seen);
    assert!(
        !alice.saw_message("hello room"),
        "the sender gets a reply, not an event"
    );

    // Bad input gets a JSON error line, with the id when there was one.
    carol.send_raw("this is not json");
    let e = carol.expect("an error for a non-JSON line", |v| v.get("error").is_some());
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    assert!(e.get("id").is_none(), "{e}");
    carol.send(json!({"cmd": "fly", "id": 5}));
    let e = carol.reply(json!(5));
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    assert!(e["error"]["message"].is_string(), "{e}");

    // History holds what was said, oldest first.
    bob.send(json!({"cmd": "history", "room": "general", "limit": 10, "id": "h"}));
    let h = bob.ok(json!("h"));
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, ["hello room", "not for carol", "sentinel"]);

    for c in [alice, bob, carol] {
        c.quit();
    }
    server.stop().assert_success();
}

#[test]
fn unknown_and_changed_certificates_are_refused() {
    let tmp = tempdir();
    let state = tempdir();
    let first = Server::start(&tmp.path().join("one"), &[], &[]);
    let old_fp = first.fingerprint.clone();
    let addr = first.addr();

    let mut cmd = client_cmd(&addr, "alice", state.path(), PW);
    cmd.arg("--register");
    let f = client_fails("unknown server", cmd);
    assert!(shows_fingerprint(&f.stderr, &old_fp), "{f:#?}");
    f.assert_stderr_has("--fingerprint")
        .assert_stderr_has("--trust-on-first-use");
    let pins = std::fs::read_to_string(state.path().join("known_servers")).unwrap_or_default();
    assert!(!pins.contains(&old_fp), "refused means not pinned: {pins}");

    let mut cmd = client_cmd(&addr, "alice", state.path(), PW);
    cmd.args(["--register", "--trust-on-first-use"]);
    let alice = JsonClient::connect("alice", cmd);
    assert_eq!(alice.connected["trust"], "new");
    alice.quit();
    let alice = JsonClient::connect("alice", client_cmd(&addr, "alice", state.path(), PW));
    assert_eq!(alice.connected["trust"], "known");
    alice.quit();
    first.stop().assert_success();

    // A new server (new data dir, so a new certificate) on the same port.
    let second = start_on_freed_port(&tmp.path().join("two"), &addr);
    assert_eq!(second.port, port_of(&addr));
    let new_fp = second.fingerprint.clone();
    assert_ne!(new_fp, old_fp);

    let f = client_fails(
        "changed certificate",
        client_cmd(&addr, "alice", state.path(), PW),
    );
    assert!(shows_fingerprint(&f.stderr, &old_fp), "{f:#?}");
    assert!(shows_fingerprint(&f.stderr, &new_fp), "{f:#?}");
    f.assert_stderr_has("known_servers");
    assert!(f.stderr.contains("differs"), "{f:#?}");

    // A wrong --fingerprint is refused the same way, naming both.
    let other_state = tempdir();
    let mut cmd = client_cmd(&addr, "alice", other_state.path(), PW);
    cmd.args(["--fingerprint", &old_fp]);
    let f = client_fails("wrong --fingerprint", cmd);
    assert!(shows_fingerprint(&f.stderr, &old_fp), "{f:#?}");
    assert!(shows_fingerprint(&f.stderr, &new_fp), "{f:#?}");

    // Trust on first use does not override an existing pin.
    let mut cmd = client_cmd(&addr, "alice", state.path(), PW);
    cmd.arg("--trust-on-first-use");
    let f = client_fails("changed certificate, TOFU", cmd);
    assert!(shows_fingerprint(&f.stderr, &new_fp), "{f:#?}");
    let pins = std::fs::read_to_string(state.path().join("known_servers")).expect("pins");
    assert!(pins.contains(&old_fp) && !pins.contains(&new_fp), "{pins}");

    second.stop().assert_success();
}

/// Starts a server on the port a stopped one used. Another socket on this machine may hold the
/// port for a moment (a client's ephemeral port), so a few bounded retries.
fn start_on_freed_port(data: &Path, addr: &str) -> Server {
    const ATTEMPTS: usize = 50;
    for _ in 0..ATTEMPTS {
        match Server::try_start_on(data, addr, &[], &[]) {
            Ok(server) => return server,
            Err(f) if f.stderr.contains("in use") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(f) => panic!("serve on {addr} failed: {f:#?}"),
        }
    }
    panic!("{addr} stayed in use");
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .expect("port")
        .1
        .parse()
        .expect("port")
}

#[test]
fn serve_explains_a_port_in_use_and_a_bad_listen_address() {
    let tmp = tempdir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut cmd = conclave(["serve", "--data-dir"]);
    cmd.arg(tmp.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")]);
    let f = run("serve, port in use", cmd);
    f.assert_failure()
        .assert_stderr_has("in use")
        .assert_stderr_has("--listen")
        .assert_stderr_has(&port.to_string());
    assert!(!f.stdout.iter().any(|l| l.contains("serving on")), "{f:#?}");
    drop(taken);

    let mut cmd = conclave(["serve", "--data-dir"]);
    cmd.arg(tmp.path().join("data"))
        .args(["--listen", "nonsense"]);
    let f = run("serve, bad listen", cmd);
    f.assert_failure()
        .assert_stderr_has("\"nonsense\"")
        .assert_stderr_has("ADDR:PORT");
    assert!(f.stdout.is_empty(), "{f:#?}");
}

#[test]
fn sigterm_disconnects_clients_and_keeps_acknowledged_messages() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let state = tempdir();
    let server = Server::start(&data, &[], &[]);
    let fp = server.fingerprint.clone();

    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    cmd.args(["--register", "--fingerprint", &fp, "--reconnect-for", "0"]);
    let mut alice = JsonClient::connect("alice", cmd);
    alice.send(json!({"cmd": "send", "room": "general", "text": "durable", "id": 1}));
    let sent = alice.ok(json!(1));

    server.sigterm();
    let d = alice.expect("a disconnected event", |v| v["event"] == "disconnected");
    assert_eq!(d["reason"], "shutdown", "{d}");
    assert_eq!(d["reconnecting"], false, "{d}");
    assert!(d["message"].is_string(), "{d}");
    let f = alice.proc.finish();
    f.assert_failure();
    alice.check_all_json(&f);
    assert_eq!(
        alice.seen.last().map(|v| &v["event"]),
        Some(&json!("disconnected")),
        "nothing follows the disconnected event: {:#?}",
        alice.seen
    );
    server.wait().assert_success();

    let server = Server::start(&data, &[], &[]);
    assert_eq!(server.fingerprint, fp);
    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    cmd.args(["--fingerprint", &fp]);
    let mut alice = JsonClient::connect("alice", cmd);
    alice.send(json!({"cmd": "history", "room": "general", "id": "h"}));
    let h = alice.ok(json!("h"));
    let messages = h["messages"].as_array().expect("messages");
    assert!(
        messages
            .iter()
            .any(|m| m["msg_id"] == sent["msg_id"] && m["text"] == "durable"),
        "{h}"
    );
    alice.quit();
    server.stop().assert_success();
}

#[test]
fn server_password_is_required_to_connect() {
    let tmp = tempdir();
    let sp = "the server secret";
    let server = Server::start(
        &tmp.path().join("data"),
        &["--server-password-env", "CONCLAVE_TEST_SP"],
        &[("CONCLAVE_TEST_SP", sp)],
    );
    let state = tempdir();
    let client = |server_pw: Option<&str>, register: bool| {
        let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
        cmd.args(["--fingerprint", &server.fingerprint]);
        if register {
            cmd.arg("--register");
        }
        if let Some(pw) = server_pw {
            cmd.args(["--server-password-env", "CONCLAVE_TEST_CSP"])
                .env("CONCLAVE_TEST_CSP", pw);
        }
        cmd
    };
    client_fails("register, no server password", client(None, true))
        .assert_stderr_has("server password");
    client_fails(
        "register, wrong server password",
        client(Some("guess"), true),
    )
    .assert_stderr_has("wrong server password");
    JsonClient::connect("alice", client(Some(sp), true)).quit();
    client_fails("login, no server password", client(None, false))
        .assert_stderr_has("server password");
    JsonClient::connect("alice", client(Some(sp), false)).quit();
    server.stop().assert_success();

    // The variable must be set.
    let mut cmd = conclave(["serve", "--data-dir"]);
    cmd.arg(tmp.path().join("data"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--server-password-env", "CONCLAVE_TEST_SP"])
        .env_remove("CONCLAVE_TEST_SP");
    run("serve, unset server password", cmd)
        .assert_failure()
        .assert_stderr_has("CONCLAVE_TEST_SP");
}

#[test]
fn closed_registration_refuses_register() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    user_cmd(&data, &["add", "alice", "--password-env", PW_VAR], Some(PW)).assert_success();
    let server = Server::start(&data, &["--registration", "closed"], &[]);
    assert!(
        server
            .banner
            .iter()
            .any(|l| l.starts_with("Registration: closed")),
        "{:#?}",
        server.banner
    );
    assert!(
        !server.client_command().contains("--register"),
        "{}",
        server.client_command()
    );
    let state = tempdir();
    let mut cmd = client_cmd(&server.addr(), "bob", state.path(), PW);
    cmd.args(["--register", "--fingerprint", &server.fingerprint]);
    client_fails("register on a closed server", cmd).assert_stderr_has("registration is closed");
    assert_eq!(user_list(&data).len(), 1);

    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    JsonClient::connect("alice", cmd).quit();
    server.stop().assert_success();

    let mut cmd = conclave(["serve", "--data-dir"]);
    cmd.arg(&data)
        .args(["--listen", "127.0.0.1:0", "--registration", "sometimes"]);
    run("serve, bad policy", cmd)
        .assert_failure()
        .assert_stderr_has("sometimes");
}

/// Ids of every JSON type come back unchanged (replies may come in any order), unknown fields
/// are ignored, and the end of input is a clean exit.
#[test]
fn reply_ids_of_every_type_come_back_and_end_of_input_exits_0() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let state = tempdir();
    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    cmd.args(["--register", "--fingerprint", &server.fingerprint]);
    let mut alice = JsonClient::connect("alice", cmd);
    let ids: [Value; 5] = [
        json!(7),
        json!("seven"),
        json!({"a": [1, 2]}),
        json!([true, null]),
        json!(1.5),
    ];
    for id in &ids {
        alice.send(json!({"cmd": "who", "id": id, "extra_field": 1}));
    }
    for id in &ids {
        let r = alice.ok(id.clone());
        assert!(r["users"].is_array(), "{r}");
    }
    alice.quit();

    // At the end of input, replies still due are printed, then it exits 0 without a quit reply.
    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    let mut alice = JsonClient::connect("alice", cmd);
    alice.send(json!({"cmd": "send", "room": "general", "text": "last words", "id": "s"}));
    alice.send(json!({"cmd": "history", "room": "general", "id": "h"}));
    let f = alice.proc.finish();
    alice.check_all_json(&f);
    f.assert_success();
    let sent = alice.ok(json!("s"));
    let h = alice.ok(json!("h"));
    assert_eq!(h["messages"][0]["msg_id"], sent["msg_id"], "{h}");
    assert!(
        !alice
            .seen
            .iter()
            .any(|v| v["event"] == "disconnected" || v["id"] == "bye"),
        "{:#?}",
        alice.seen
    );
    server.stop().assert_success();
}

/// Starts a server and a client (registered as `user`, pinned by fingerprint).

#[test]
fn client_exits_when_the_server_disconnects_while_input_is_open() {
    let tmp = tempdir();
    let state = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    // Without reconnecting, a lost connection ends the client at once.
    cmd.args([
        "--register",
        "--fingerprint",
        &server.fingerprint,
        "--reconnect-for",
        "0",
    ]);
    let mut alice = JsonClient::connect("alice", cmd);
    server.sigterm();
    alice.expect("a disconnected event", |v| v["event"] == "disconnected");
    // stdin stays open: a bot waiting for its next command.
    let status = alice.proc.wait_exit(WAIT);
    assert!(
        !status.success() && status.code().is_some(),
        "non-zero exit: {status}"
    );
    server.wait().assert_success();
}

#[test]
fn shutdown_tells_every_client_the_reason_shutdown() {
    // Several clients make the race likely to show in one run.
    const CLIENTS: usize = 6;
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[], &[]);
    let states: Vec<_> = (0..CLIENTS).map(|_| tempdir()).collect();
    let mut clients: Vec<JsonClient> = states
        .iter()
        .enumerate()
        .map(|(i, state)| {
            let user = format!("user{i}");
            let mut cmd = client_cmd(&server.addr(), &user, state.path(), PW);
            cmd.args(["--register", "--fingerprint", &server.fingerprint]);
            JsonClient::connect(&user, cmd)
        })
        .collect();
    server.sigterm();
    let reasons: Vec<Value> = clients
        .iter_mut()
        .map(|c| {
            c.expect("a disconnected event", |v| v["event"] == "disconnected")["reason"].clone()
        })
        .collect();
    assert!(
        reasons.iter().all(|r| r == "shutdown"),
        "every client is told the server is shutting down: {reasons:?}"
    );
    server.wait().assert_success();
}

#[test]
fn sigterm_right_after_the_banner_is_graceful() {
    let tmp = tempdir();
    for i in 0..20 {
        let mut cmd = conclave(["serve", "--data-dir"]);
        cmd.arg(tmp.path().join(format!("data{i}")))
            .args(["--listen", "127.0.0.1:0"]);
        let mut serve = Proc::spawn("serve", cmd);
        // "serving on" says it is up; a supervisor may stop it from now on.
        serve.expect_line("the serving line", |l| l.contains(" serving on "));
        assert!(
            catches_sigterm(serve.pid()),
            "round {i}: serve says it is serving but does not catch SIGTERM yet"
        );
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(serve.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let f = serve.finish();
        assert_eq!(f.status.code(), Some(0), "round {i}: a clean exit: {f:#?}");
    }
}

#[test]
fn user_added_while_serving_is_in_the_default_room() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[], &[]);
    user_cmd(&data, &["add", "late", "--password-env", PW_VAR], Some(PW)).assert_success();
    let state = tempdir();
    let mut cmd = client_cmd(&server.addr(), "late", state.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    let mut late = JsonClient::connect("late", cmd);
    late.send(json!({"cmd": "send", "room": "general", "text": "hi", "id": 1}));
    let r = late.reply(json!(1));
    assert_eq!(
        late.connected["rooms"],
        json!(["general"]),
        "user add made it a member of general; the send said: {r}"
    );
    assert_eq!(r["ok"], true, "{r}");
    late.quit();
    server.stop().assert_success();
}

/// `conclave admin ...` against a running server, and `conclave logs` over what it did.
#[test]
fn admin_console_and_logs_through_the_binary() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let d = data.to_str().expect("utf-8 path");
    let server = Server::start(&data, &[], &[]);
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--data-dir", d];
        all.extend_from_slice(args);
        run("admin", conclave(all))
    };
    let f = admin(&["stats"]);
    f.assert_success();
    assert!(f.stdout_text().contains("connections"), "{f:#?}");
    let f = admin(&["--json", "stats"]);
    f.assert_success();
    let v: serde_json::Value = serde_json::from_str(f.stdout_text().trim()).expect("json");
    assert_eq!(v["ok"], true);
    admin(&["deny", "add", "198.51.100.0/24"]).assert_success();
    let f = admin(&["deny", "list"]);
    f.assert_success();
    assert!(f.stdout_text().contains("198.51.100.0/24"), "{f:#?}");
    admin(&["deny", "add", "not-a-network"])
        .assert_failure()
        .assert_stderr_has("CIDR");
    admin(&["ban", "nobody-here"])
        .assert_failure()
        .assert_stderr_has("no user");
    admin(&[
        "ban",
        "--ip",
        "203.0.113.9",
        "--for",
        "2h",
        "--reason",
        "test",
    ])
    .assert_success();
    let f = admin(&["bans"]);
    assert!(f.stdout_text().contains("203.0.113.9/32"), "{f:#?}");
    admin(&["who"]).assert_success();
    drop(server);

    // No server: a clear error.
    admin(&["who"])
        .assert_failure()
        .assert_stderr_has("is `conclave serve");
    // The audit log has what the operator did.
    let f = run(
        "logs",
        conclave(["logs", "--data-dir", d, "--kind", "admin,ban", "--json"]),
    );
    f.assert_success();
    let text = f.stdout_text();
    assert!(
        text.contains("198.51.100.0/24") && text.contains("203.0.113.9"),
        "{text}"
    );
    run("verify", conclave(["logs", "--data-dir", d, "--verify"])).assert_success();
}

/// Commands that read a data directory refuse a missing one instead of creating
/// `./conclave-data` in whatever folder they run in; `user add` (the first account, before the
/// first start) creates it and says so; doctor's verdict then names what its details say.
#[test]
fn reading_commands_refuse_a_missing_data_directory() {
    let tmp = tempdir();
    let cwd = tmp.path();
    let in_cwd = |args: &[&str]| {
        let mut cmd = conclave(args);
        cmd.current_dir(cwd).env_remove(PW_VAR);
        run("in an empty folder", cmd)
    };
    for args in [
        &["user", "list"][..],
        &["user", "del", "bob"],
        &["user", "admin", "bob"],
        &["user", "invite"],
        &["user", "passwd", "bob", "--password-env", PW_VAR],
        &["logs"],
        &["logs", "--verify"],
        &["admin", "who"],
        &["doctor"],
    ] {
        in_cwd(args)
            .assert_failure()
            .assert_stderr_has("there is no data directory ./conclave-data")
            .assert_stderr_has("--data-dir");
    }
    assert!(
        std::fs::read_dir(cwd).expect("read_dir").next().is_none(),
        "nothing was created in {cwd:?}"
    );

    // A folder that exists but holds no database (say, an empty StateDirectory).
    let empty = cwd.join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    user_cmd(&empty, &["list"], None)
        .assert_failure()
        .assert_stderr_has("has no database");
    assert!(
        std::fs::read_dir(&empty)
            .expect("read_dir")
            .next()
            .is_none()
    );

    // `user add` makes the first account, and the directory, and says where.
    let data = cwd.join("data");
    let f = user_cmd(
        &data,
        &["add", "alice", "--admin", "--password-env", PW_VAR],
        Some(PW),
    );
    f.assert_success()
        .assert_stderr_has("set up a new data directory in");
    assert_eq!(f.stdout_text(), "created admin alice\n");
    assert_eq!(user_list(&data), vec![("alice".into(), "admin".into())]);

    // No TLS key yet: doctor fails, and says the key is missing (not readable by others).
    let mut cmd = conclave(["doctor", "--json", "--data-dir"]);
    cmd.arg(&data);
    let f = run("doctor", cmd);
    f.assert_failure();
    let report: Value = serde_json::from_str(&f.stdout_text()).expect("json");
    let perms = report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == "permissions"))
        .cloned()
        .expect("a permissions check");
    assert_eq!(perms["status"], "fail", "{perms:#}");
    let summary = perms["summary"].as_str().expect("summary");
    assert!(summary.contains("1 secret(s) missing"), "{perms:#}");
    assert!(!summary.contains("readable"), "{perms:#}");
}

/// `conclave user admin NAME [--revoke]` on the data directory and through a running server
/// (where it holds at once for a live session), audited both ways.
#[test]
fn user_admin_gives_and_takes_the_admin_role() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    user_cmd(&data, &["add", "bob", "--password-env", PW_VAR], Some(PW)).assert_success();
    user_cmd(&data, &["admin", "nobody"], None)
        .assert_failure()
        .assert_stderr_has("no account \"nobody\"");

    // Offline, on the data directory.
    let f = user_cmd(&data, &["admin", "Bob"], None);
    f.assert_success();
    assert_eq!(f.stdout_text(), "bob is now an admin\n");
    assert_eq!(user_list(&data), vec![("bob".into(), "admin".into())]);
    let f = user_cmd(&data, &["admin", "bob", "--revoke"], None);
    f.assert_success();
    assert_eq!(f.stdout_text(), "bob is no longer an admin\n");
    assert_eq!(user_list(&data), vec![("bob".into(), "user".into())]);

    // Live, through the admin socket: bob's open session may announce at once.
    let server = Server::start(&data, &[], &[]);
    let state = tempdir();
    let mut cmd = client_cmd(&server.addr(), "bob", state.path(), PW);
    cmd.args(["--fingerprint", &server.fingerprint]);
    let mut bob = JsonClient::connect("bob", cmd);
    bob.send(json!({"cmd": "announce", "text": "not yet", "id": 1}));
    let r = bob.reply(json!(1));
    assert!(r.get("error").is_some(), "a user cannot announce: {r}");
    let f = user_cmd(&data, &["admin", "bob"], None);
    f.assert_success();
    assert_eq!(f.stdout_text(), "bob is now an admin\n");
    bob.send(json!({"cmd": "announce", "text": "now I can", "id": 2}));
    bob.ok(json!(2));
    user_cmd(&data, &["admin", "nobody"], None)
        .assert_failure()
        .assert_stderr_has("no account");
    let f = user_cmd(&data, &["admin", "bob", "--revoke"], None);
    f.assert_success();
    assert_eq!(f.stdout_text(), "bob is no longer an admin\n");
    bob.send(json!({"cmd": "announce", "text": "not again", "id": 3}));
    let r = bob.reply(json!(3));
    assert!(r.get("error").is_some(), "revoked at once: {r}");
    bob.quit();
    server.stop().assert_success();
    assert_eq!(user_list(&data), vec![("bob".into(), "user".into())]);

    // Both ways are in the audit log.
    let mut cmd = conclave(["logs", "--json", "--kind", "admin", "--data-dir"]);
    cmd.arg(&data);
    let f = run("logs", cmd);
    f.assert_success();
    let records: Vec<Value> = f
        .stdout
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let offline = records
        .iter()
        .filter(|r| r["cmd"] == "user_admin" && r["via"] == "data directory")
        .count();
    let live = records
        .iter()
        .filter(|r| r["cmd"] == "user_admin" && r["args"]["user"] == "bob")
        .count();
    assert_eq!(offline, 2, "{records:#?}");
    assert_eq!(live, 2, "{records:#?}");

    // Bob's announcement from his client, under its own kind, without its text.
    let mut cmd = conclave(["logs", "--json", "--kind", "announce", "--data-dir"]);
    cmd.arg(&data);
    let f = run("logs", cmd);
    f.assert_success();
    assert_eq!(f.stdout.len(), 1, "{f:#?}");
    let r: Value = serde_json::from_str(&f.stdout[0]).expect("json");
    assert_eq!(r["user"], "bob", "{r}");
    assert_eq!(r["recipients"], 1, "{r}");
    assert!(!f.stdout[0].contains("now I can"), "{r}");
}

/// What the operator reads: bans with a date and the time left, which rooms are end-to-end,
/// why each login failed, and announcements under their own kind.
#[test]
fn operator_output_has_dates_reasons_and_encryption() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let d = data.to_str().expect("utf-8 path");
    let server = Server::start(&data, &[], &[]);
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--data-dir", d];
        all.extend_from_slice(args);
        let f = run("admin", conclave(all));
        f.assert_success();
        f
    };

    // Bans: a UTC date and time and the time left, not milliseconds.
    admin(&[
        "ban",
        "--ip",
        "203.0.113.9",
        "--for",
        "2h",
        "--reason",
        "test",
    ]);
    admin(&["ban", "--ip", "198.51.100.1", "--reason", "for good"]);
    let raw: Value =
        serde_json::from_str(admin(&["--json", "bans"]).stdout_text().trim()).expect("json");
    let until_ms = raw["bans"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["target"] == "203.0.113.9/32"))
        .and_then(|b| b["until_ms"].as_i64())
        .expect("a timed ban");
    let date = jiff::Timestamp::from_millisecond(until_ms)
        .expect("a time")
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string();
    let text = admin(&["bans"]).stdout_text();
    assert!(
        text.contains("UNTIL (UTC)") && text.contains("LEFT"),
        "{text}"
    );
    let timed = text
        .lines()
        .find(|l| l.contains("203.0.113.9/32"))
        .expect("the timed ban");
    assert!(timed.contains(&date), "{timed} has {date}");
    assert!(
        timed.contains("2h00m") || timed.contains("1h59m"),
        "{timed}: two hours left"
    );
    assert!(!timed.contains(&until_ms.to_string()), "{timed}");
    let forever = text
        .lines()
        .find(|l| l.contains("198.51.100.1/32"))
        .expect("the permanent ban");
    assert!(forever.contains("for ever"), "{forever}");

    // Rooms: end-to-end or encrypted at rest.
    let state = tempdir();
    let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
    cmd.args(["--register", "--fingerprint", &server.fingerprint]);
    let mut alice = JsonClient::connect("alice", cmd);
    alice.send(json!({"cmd": "create_room", "room": "sealed", "id": 1}));
    assert_eq!(alice.ok(json!(1))["e2ee"], true);
    alice.send(json!({"cmd": "create_room", "room": "plain", "e2ee": false, "id": 2}));
    assert_eq!(alice.ok(json!(2))["e2ee"], false);
    let text = admin(&["rooms"]).stdout_text();
    let row = |room: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(room))
            .unwrap_or_else(|| panic!("{room} in {text}"))
            .to_string()
    };
    assert!(text.contains("ENCRYPTED"), "{text}");
    assert!(row("sealed").contains("end-to-end"), "{text}");
    assert!(row("plain").contains("at rest"), "{text}");
    assert!(row("general").contains("at rest"), "{text}");
    alice.quit();

    // Login failures: the same answer to the client, the reason for the operator.
    let login = |user: &str, pw: &str| {
        let mut cmd = client_cmd(&server.addr(), user, state.path(), pw);
        cmd.args(["--fingerprint", &server.fingerprint]);
        cmd
    };
    client_fails("alice, wrong password", login("alice", PW2))
        .assert_stderr_has("wrong user name or password");
    client_fails("ghost", login("ghost", PW)).assert_stderr_has("wrong user name or password");

    // Announcements, from the operator, are found by their own kind.
    admin(&["announce", "maintenance at 5"]);
    drop(server);

    let logs = |kind: &str| -> Vec<Value> {
        let f = run(
            "logs",
            conclave(["logs", "--data-dir", d, "--kind", kind, "--json"]),
        );
        f.assert_success();
        f.stdout
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    let failed = logs("login_failed");
    let of = |user: &str| {
        failed
            .iter()
            .find(|r| r["user"] == user)
            .unwrap_or_else(|| panic!("a login_failed record for {user}: {failed:#?}"))
            .clone()
    };
    assert_eq!(of("alice")["reason"], "wrong_password");
    assert_eq!(of("alice")["failures"], 1);
    assert_eq!(of("ghost")["reason"], "unknown_account");
    let announced = logs("announce");
    assert_eq!(announced.len(), 1, "{announced:#?}");
    assert_eq!(announced[0]["cmd"], "announce");
    assert!(
        !serde_json::to_string(&announced[0])
            .expect("json")
            .contains("maintenance"),
        "never the text: {announced:#?}"
    );
}
