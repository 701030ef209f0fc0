//! Crash safety: the real server is killed with SIGKILL at a random moment while a client
//! streams messages, several times in a row. After each restart every acknowledged message is
//! present exactly once, sequences have no gaps, and SQLite's integrity check passes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use conclave_client::proto::{Body, ConvRef, Reply, Request, Target};
use conclave_client::{Auth, Client, ConnectOptions, Trust};

const ROUNDS: u64 = 5;
const PW: &str = "crash-test-password";
const WAIT: Duration = Duration::from_secs(15);

struct Server {
    child: Child,
    addr: String,
    fingerprint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("CONCLAVE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addr = None;
    let mut fingerprint = None;
    while addr.is_none() || fingerprint.is_none() {
        let line = rx
            .recv_timeout(WAIT)
            .expect("server prints its address and fingerprint");
        if let Some(rest) = line.split("serving on ").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(fp) = line.split("--fingerprint ").nth(1) {
            fingerprint = Some(fp.trim().to_string());
        }
    }
    Server {
        child,
        addr: addr.expect("addr"),
        fingerprint: fingerprint.expect("fingerprint"),
    }
}

async fn connect(srv: &Server, state: &Path) -> Client {
    let mut opts = ConnectOptions::new(
        srv.addr.clone(),
        Auth::Login {
            user: "alice".into(),
            password: PW.into(),
            server_password: None,
        },
    );
    opts.trust = Trust::fingerprint(&srv.fingerprint).expect("fingerprint");
    opts.state_dir = Some(state.to_path_buf());
    // Each restart gets a new port: in-flight sends must fail at the kill, not wait.
    opts.reconnect = conclave_client::Reconnect::never();
    let (client, _events, _session) = tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("connect");
    client
}

/// A small deterministic generator for the kill moments.
fn kill_delay_ms(round: u64) -> u64 {
    let x = (round + 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17);
    30 + x % 250
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args(["user", "add", "alice", "--password-env", "PW", "--data-dir"])
        .arg(dir.path())
        .env("PW", PW)
        .stdout(Stdio::null())
        .status()
        .expect("user add");
    assert!(status.success());

    // Every message the server acknowledged: (text, msg_id, seq).
    let mut acked: Vec<(String, String, u64)> = Vec::new();
    for round in 0..ROUNDS {
        let mut srv = start(dir.path());
        let client = connect(&srv, state.path()).await;
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sender = {
            let client = client.clone();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut pending = std::collections::VecDeque::new();
                // Bounded: at most 100,000 sends per round; the kill comes long before.
                for i in 0..100_000u64 {
                    let text = format!("round {round} message {i}");
                    let req = Request::Send {
                        target: Target::Room {
                            room: "general".into(),
                            except: vec![],
                        },
                        body: Body::text(text.clone()),
                        idempotency_key: Some(format!("r{round}-{i}")),
                    };
                    match client.submit(req).await {
                        Ok(p) => pending.push_back((text, p)),
                        Err(_) => break,
                    }
                    if pending.len() >= 32 {
                        let Some((text, p)) = pending.pop_front() else {
                            break;
                        };
                        match p.reply().await {
                            Ok(Reply::Sent { msg_id, seq, .. }) => {
                                got.push((text, msg_id, seq));
                                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            _ => break,
                        }
                    }
                }
                while let Some((text, p)) = pending.pop_front() {
                    if let Ok(Reply::Sent { msg_id, seq, .. }) = p.reply().await {
                        got.push((text, msg_id, seq));
                    }
                }
                got
            })
        };
        // Kill at a random moment after the stream is under way (bounded wait).
        for _ in 0..1500 {
            if progress.load(std::sync::atomic::Ordering::Relaxed) >= 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(kill_delay_ms(round))).await;
        srv.child.kill().expect("SIGKILL");
        let _ = srv.child.wait();
        let got = tokio::time::timeout(WAIT, sender)
            .await
            .expect("sender stops after the kill")
            .expect("sender task");
        assert!(
            !got.is_empty(),
            "round {round}: some messages were acknowledged"
        );
        acked.extend(got);
        drop(client);
    }

    // Restart once more and read everything back.
    let srv = start(dir.path());
    let client = connect(&srv, state.path()).await;
    let mut history = Vec::new();
    let mut before = None;
    for _ in 0..10_000 {
        let page = match client
            .request(Request::History {
                conv: ConvRef::Room("general".into()),
                limit: 500,
                before,
            })
            .await
            .expect("history")
        {
            Reply::Messages(m) => m,
            other => panic!("{other:?}"),
        };
        if page.is_empty() {
            break;
        }
        before = page.first().map(|m| m.seq);
        history.splice(0..0, page);
    }
    let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "sequences have no gaps"
    );
    let mut by_text = std::collections::HashMap::new();
    for m in &history {
        let text = m.body.as_text().expect("text").to_string();
        assert!(
            by_text
                .insert(text.clone(), (m.msg_id.clone(), m.seq))
                .is_none(),
            "stored twice: {text}"
        );
    }
    for (text, msg_id, seq) in &acked {
        assert_eq!(
            by_text.get(text),
            Some(&(msg_id.clone(), *seq)),
            "acknowledged message missing or changed: {text}"
        );
    }
    drop(client);
    drop(srv);

    let key = conclave_server::at_rest::DataKey::load_or_create(dir.path()).expect("key");
    let db = conclave_server::store::Db::open(dir.path(), key).expect("db");
    assert_eq!(db.integrity_check().expect("check"), "ok");
    eprintln!(
        "{ROUNDS} SIGKILLs: {} acknowledged, {} stored, all intact",
        acked.len(),
        history.len()
    );
}
