//! Starved of resources: the real server with its data directory on a small file system that
//! fills up, and with too few file descriptors.
//!
//! Full disk: the data directory is on a tmpfs of a fixed size (mounted by the test; it is
//! skipped, saying so, where mounting is not allowed). Once the disk is full, a send and an
//! upload are refused with `storage_full`; history, `who` and the connection keep working; the
//! server logs it once; after space is freed the same sends succeed again by themselves and
//! reach the other client; the database passes its integrity check.
//!
//! File descriptors: the running server's descriptor limit is lowered (prlimit) to a few above
//! what it uses; connections beyond it are closed at once (the peer is not left hanging), the
//! server says so, and once the held connections go a new client logs in normally.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

/// A tmpfs of `mib` MiB on a fresh directory, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Option<Tmpfs> {
        let dir = tempdir();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system holding `dir` with `filler` until a write fails (bounded).
fn fill(filler: &Path) -> u64 {
    let mut f = std::fs::File::create(filler).expect("filler");
    let block = vec![0x5a_u8; 64 * 1024];
    let mut written = 0u64;
    for _ in 0..100_000 {
        match f.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

#[test]
fn a_full_disk_refuses_writes_clearly_keeps_serving_and_recovers() {
    let Some(fs) = Tmpfs::mount(48) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); see docs/reliability.md");
        return;
    };
    let data = fs.path.join("data");
    let server = Server::start(&data, &[], &[("CONCLAVE_LOG", "info")]);
    let (sa, sb) = (tempdir(), tempdir());
    let mut alice = client(&server, "alice", sa.path());
    let mut bob = client(&server, "bob", sb.path());
    alice
        .send(json!({"cmd": "send", "room": "general", "text": "before the disk filled", "id": 1}));
    alice.ok(json!(1));
    bob.message("before the disk filled");

    let filler = fs.path.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0, "the filler wrote something");

    // Sends until one is refused: SQLite may still have room in its write-ahead log for a few
    // (bounded; each is 4 KiB, far more than the slack).
    let pad = "x".repeat(4000);
    let mut refused = None;
    let mut accepted_while_full = 0;
    for i in 0..2000 {
        let id = json!(100 + i);
        alice.send(
            json!({"cmd": "send", "room": "general", "text": format!("full {i} {pad}"), "id": id}),
        );
        let r = alice.reply(id);
        if r["ok"] == true {
            accepted_while_full += 1;
            continue;
        }
        refused = Some(r);
        break;
    }
    let refused = refused.expect("a send is refused once the disk is full");
    assert_eq!(refused["error"]["code"], "storage_full", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("disk is full"),
        "{refused}"
    );

    // An upload is refused the same way.
    let work = tempdir();
    let src = work.path().join("big.bin");
    std::fs::write(&src, vec![7u8; 2 * 1024 * 1024]).expect("source file");
    alice.send(json!({"cmd": "send_file", "path": src, "room": "general", "id": 5000}));
    let up = alice.reply(json!(5000));
    assert_eq!(up["error"]["code"], "storage_full", "{up}");

    // Reads, presence and the connections keep working.
    // Enough to reach back past the sends accepted while the disk was full (bounded).
    let limit = (accepted_while_full + 10).min(500);
    bob.send(json!({"cmd": "history", "room": "general", "limit": limit, "id": 2}));
    let h = bob.ok(json!(2));
    assert!(
        h["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["text"] == "before the disk filled")),
        "{h}"
    );
    bob.send(json!({"cmd": "who", "id": 3}));
    let who = bob.ok(json!(3));
    assert!(who["users"].to_string().contains("alice"), "{who}");
    alice.send(json!({"cmd": "rooms", "id": 4}));
    alice.ok(json!(4));
    let logged = server.proc.stderr_when(WAIT, |e| e.contains("disk full"));
    assert!(
        logged.contains("disk full"),
        "the server logs the full disk"
    );
    assert_eq!(
        logged.matches("disk full: new messages").count(),
        1,
        "logged once, not at every refusal"
    );

    // Space comes back: the next send works, without a restart, and reaches bob.
    std::fs::remove_file(&filler).expect("free space");
    let mut recovered = false;
    for i in 0..50 {
        let id = json!(6000 + i);
        alice.send(
            json!({"cmd": "send", "room": "general", "text": format!("after {i}"), "id": id}),
        );
        if alice.reply(id)["ok"] == true {
            bob.message(&format!("after {i}"));
            recovered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(recovered, "writes work again once space is back");
    alice.send(json!({"cmd": "send_file", "path": src, "room": "general", "id": 7000}));
    alice.ok(json!(7000));
    let back = server
        .proc
        .stderr_when(WAIT, |e| e.contains("disk space is back"));
    assert!(back.contains("disk space is back"));
    eprintln!(
        "disk full: {filled} filler bytes, {accepted_while_full} sends still fitted, then storage_full; recovered"
    );

    drop(alice.quit());
    drop(bob.quit());
    server.stop().assert_success();
    let key = conclave_server::at_rest::DataKey::load_or_create(&data).expect("key");
    let db = conclave_server::store::Db::open(&data, key).expect("db");
    assert_eq!(db.integrity_check().expect("check"), "ok");
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Lowers the open-file limit of a running process.
fn set_nofile(pid: u32, n: usize) -> bool {
    Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{n}")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the server closes this connection (end of stream or reset) within `within`.
fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let _ = tcp.set_read_timeout(Some(within));
    let mut buf = [0u8; 64];
    match tcp.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn out_of_file_descriptors_refuses_cleanly_and_resumes() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    // Held connections must stay open while the limit bites: a long handshake timeout.
    std::fs::write(
        data.join("conclave.toml"),
        "[limits]\nhandshake_timeout_ms = 60000\n",
    )
    .expect("config");
    let server = Server::start(&data, &[], &[("CONCLAVE_LOG", "info")]);
    let pid = server.proc.pid();
    let headroom = 12;
    let limit = fd_count(pid) + headroom;
    if !set_nofile(pid, limit) {
        eprintln!("SKIPPED: prlimit cannot lower the server's descriptor limit here");
        return;
    }

    // Connections that hold a descriptor each (they never start TLS).
    let mut held = Vec::new();
    for _ in 0..headroom * 2 {
        match TcpStream::connect(server.addr()) {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // The ones beyond the limit are closed at once instead of waiting in the backlog.
    let started = Instant::now();
    let mut refused = 0;
    for tcp in held.iter_mut().rev().take(headroom / 2) {
        if closed_within(tcp, Duration::from_secs(5)) {
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "connections beyond the descriptor limit are refused"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let said = server
        .proc
        .stderr_when(WAIT, |e| e.contains("out of file descriptors"));
    assert!(
        said.contains("out of file descriptors"),
        "the server says why"
    );
    assert_eq!(
        said.matches("out of file descriptors").count(),
        1,
        "once, not per connection"
    );

    // The held connections go; service resumes: a client registers, sends and is answered.
    drop(held);
    let state = tempdir();
    let mut alice = None;
    for _ in 0..50 {
        let mut cmd = client_cmd(&server.addr(), "alice", state.path(), PW);
        cmd.args(["--register", "--fingerprint", &server.fingerprint]);
        let mut proc = Proc::spawn("client alice", cmd);
        if let Some(line) = proc.next_line(WAIT)
            && line.contains("\"connected\"")
        {
            alice = Some(proc);
            break;
        }
        drop(proc);
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut alice = alice.expect("a client connects once descriptors are free");
    alice.write_line(
        &json!({"cmd": "send", "room": "general", "text": "back", "id": 1}).to_string(),
    );
    let reply = alice.expect_line("the send's reply", |l| l.contains("\"id\":1"));
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(
        server
            .proc
            .stderr_when(WAIT, |e| e.contains("available again"))
            .contains("available again")
    );
    drop(alice);
    server.stop().assert_success();
}
