//! Crash safety: the real server is killed with SIGKILL at random moments under a mixed load
//! (one client streams messages, another creates rooms that a third joins, and uploads files),
//! many times in a row, always on the same port. The clients are never restarted: they
//! reconnect and resume by themselves. After the last restart: every acknowledged message is
//! stored exactly once with its acknowledged id and sequence, sequences have no gaps, the
//! reading client received every acknowledged message exactly once, every room whose creation
//! and join were acknowledged exists with its member, every completed upload downloads intact
//! and is offered exactly once, and SQLite's integrity check passes.
//!
//! `CRASH_ROUNDS` sets the number of kills (default 5 here; `scripts/crash.sh` runs 25) and
//! `CRASH_SEED` the seed of the kill moments.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use conclave_client::proto::{Body, ConvRef, Event, Reply, Request, Target};
use conclave_client::{Auth, Client, ClientEvent, ConnectOptions, FileOptions, Reconnect, Trust};
use sha2::{Digest, Sha256};

const PW: &str = "crash-test-password";
const WAIT: Duration = Duration::from_secs(20);
/// Bytes of each uploaded file: several chunks, so kills land mid-upload too.
const FILE_BYTES: usize = 600 * 1024;
/// Rooms bob creates and files he uploads, at most (each upload must show in carol's listing of
/// pending offers at the end, `max_pending_offers` below).
const MAX_UPLOADS: u64 = 1_000;

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port, reused by every restart so that clients find the server again.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `conclave serve` on the port; returns once it serves (bounded), with the fingerprint.
fn start(dir: &Path, port: u16) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
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
    let mut serving = false;
    let mut fingerprint = None;
    for _ in 0..1000 {
        if serving && fingerprint.is_some() {
            break;
        }
        let line = rx
            .recv_timeout(WAIT)
            .expect("server prints its address and fingerprint");
        serving |= line.contains("serving on ");
        if let Some(fp) = line.split("--fingerprint ").nth(1) {
            fingerprint = Some(fp.trim().to_string());
        }
    }
    (Server { child }, fingerprint.expect("fingerprint"))
}

fn add_user(dir: &Path, name: &str) {
    let status = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args(["user", "add", name, "--password-env", "PW", "--data-dir"])
        .arg(dir)
        .env("PW", PW)
        .stdout(Stdio::null())
        .status()
        .expect("user add");
    assert!(status.success());
}

async fn connect(
    port: u16,
    fingerprint: &str,
    user: &str,
    state: &Path,
) -> (Client, conclave_client::Events) {
    let mut opts = ConnectOptions::new(
        format!("127.0.0.1:{port}"),
        Auth::Login {
            user: user.into(),
            password: PW.into(),
            server_password: None,
        },
    );
    opts.trust = Trust::fingerprint(fingerprint).expect("fingerprint");
    opts.state_dir = Some(state.join(user));
    // Back quickly after each restart; a request waits out a restart instead of failing.
    opts.reconnect = Reconnect {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(400),
        max_attempts: None,
        give_up_after: Duration::from_secs(600),
    };
    opts.request_timeout = Duration::from_secs(60);
    let (client, events, _session) = tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("connect");
    (client, events)
}

/// A small deterministic generator (splitmix64) for the kill moments.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Alice's messages in the room after `after` (a sequence number), from history, newest
/// pages first (bounded).
async fn backfill(carol: &Client, after: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut before = None;
    // A page can fail when the server is killed meanwhile: ask again once it is back (bounded),
    // or the messages of the gap would never be read.
    let mut failures = 0;
    for _ in 0..2000 {
        let reply = carol
            .request(Request::History {
                conv: ConvRef::Room("general".into()),
                limit: 500,
                before,
            })
            .await;
        let page = match reply {
            Ok(Reply::Messages(page)) => page,
            other => {
                failures += 1;
                assert!(failures <= 100, "history kept failing: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(first) = page.first().map(|m| m.seq) else {
            break;
        };
        out.extend(
            page.iter()
                .filter(|m| m.seq > after && m.from == "alice")
                .map(|m| m.body.as_text().unwrap_or_default().to_string()),
        );
        if first <= after + 1 {
            break;
        }
        before = Some(first);
    }
    out
}

fn general() -> Target {
    Target::Room {
        room: "general".into(),
        except: vec![],
    }
}

#[derive(Default)]
struct Load {
    /// Alice has sent all she will (her loop is bounded).
    alice_done: AtomicBool,
    /// Alice's acknowledged messages: text → (msg_id, seq).
    acked: Mutex<HashMap<String, (String, u64)>>,
    /// Alice's sends that failed (unknown fate: stored at most once).
    failed_sends: AtomicUsize,
    /// Rooms created by bob and joined by carol, both acknowledged.
    rooms: Mutex<Vec<String>>,
    /// Completed uploads: file id → SHA-256 (hex).
    files: Mutex<HashMap<String, String>>,
    failed_ops: AtomicUsize,
    stop: AtomicBool,
    /// What carol received from alice, in order.
    carol_got: Mutex<Vec<String>>,
    /// Alice's messages carol read from history after a truncated catch-up.
    carol_backfilled: Mutex<HashSet<String>>,
    carol_stop: AtomicBool,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_mixed_load_loses_nothing() {
    let rounds = env_u64("CRASH_ROUNDS", 5);
    let seed = env_u64("CRASH_SEED", 0xC0FFEE);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let files_dir = tempfile::tempdir().expect("tempdir");
    for u in ["alice", "bob", "carol"] {
        add_user(dir.path(), u);
    }
    // The load is as fast as the server takes it: the per-connection request rate limit (50
    // per second by default, then `flooding`, which ends a client for good) is not what this
    // test is about (a release build takes more than 5,000 sends a second from alice alone),
    // nor the cap on the offers listed at once (200 by default; bob uploads at most
    // `MAX_UPLOADS`, so every upload fits in one listing).
    std::fs::write(
        dir.path().join("conclave.toml"),
        "[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\n\n\
         [files]\nmax_pending_offers = 1024\n",
    )
    .expect("config");
    let port = free_port();
    let (mut srv, fingerprint) = start(dir.path(), port);
    let (alice, alice_events) = connect(port, &fingerprint, "alice", state.path()).await;
    let (bob, bob_events) = connect(port, &fingerprint, "bob", state.path()).await;
    // Events must be read: a client whose application lets its event queue fill stops reading
    // its connection (bounded memory), and would not even notice the server going away.
    for mut events in [alice_events, bob_events] {
        tokio::spawn(async move { while events.recv().await.is_some() {} });
    }
    let (carol, mut carol_events) = connect(port, &fingerprint, "carol", state.path()).await;
    let load = Arc::new(Load::default());

    // Carol reads everything, across every restart: alice's messages as they come.
    let carol_reader = {
        let load = load.clone();
        let carol = carol.clone();
        tokio::spawn(async move {
            let (mut reconnects, mut truncated) = (0u32, 0u32);
            // Why carol's connection dropped, and how often (for the report).
            let mut drops: HashMap<String, u32> = HashMap::new();
            // The highest sequence number carol has seen in the room, and what it was when the
            // connection last dropped (a catch-up comes before `Reconnected`).
            let (mut last_seq, mut at_drop) = (0u64, 0u64);
            // Bounded: ends when the test says so, or after an hour.
            let deadline = Instant::now() + Duration::from_secs(3600);
            while Instant::now() < deadline && !load.carol_stop.load(Ordering::Relaxed) {
                let ev =
                    tokio::time::timeout(Duration::from_millis(200), carol_events.recv()).await;
                match ev {
                    Ok(Some(ClientEvent::Server(Event::Message(m)))) => {
                        last_seq = last_seq.max(m.seq);
                        if m.from == "alice" {
                            let text = m.body.as_text().unwrap_or_default().to_string();
                            load.carol_got.lock().expect("lock").push(text);
                        }
                    }
                    // More was missed than a login sends (`max_catchup_per_conv`): like any
                    // application, page back through history for the gap.
                    Ok(Some(ClientEvent::Reconnected {
                        truncated: true, ..
                    })) => {
                        reconnects += 1;
                        truncated += 1;
                        let gap = backfill(&carol, at_drop).await;
                        load.carol_backfilled.lock().expect("lock").extend(gap);
                    }
                    Ok(Some(ClientEvent::Reconnected { .. })) => reconnects += 1,
                    Ok(Some(ClientEvent::Disconnected { reason, .. })) => {
                        at_drop = last_seq;
                        *drops.entry(format!("{reason:?}")).or_default() += 1;
                    }
                    Ok(None) => break,
                    _ => {}
                }
            }
            (reconnects, truncated, drops)
        })
    };

    // Alice streams messages, 16 in flight; each send retries across reconnects by itself.
    let alice_task = {
        let load = load.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut inflight = tokio::task::JoinSet::new();
            // Bounded: 500,000 messages at most.
            for i in 0..500_000u64 {
                if load.stop.load(Ordering::Relaxed) {
                    break;
                }
                while inflight.len() >= 16 {
                    let _ = inflight.join_next().await;
                }
                let alice = alice.clone();
                let load = load.clone();
                inflight.spawn(async move {
                    let text = format!("message {i}");
                    match alice
                        .send(general(), Body::text(text.clone()), Some(format!("m{i}")))
                        .await
                    {
                        Ok(r) => {
                            load.acked
                                .lock()
                                .expect("lock")
                                .insert(text, (r.msg_id, r.seq));
                        }
                        Err(_) => {
                            load.failed_sends.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            load.alice_done.store(true, Ordering::Relaxed);
            while inflight.join_next().await.is_some() {}
        })
    };

    // Bob creates rooms (carol joins them) and uploads files to the room.
    let bob_task = {
        let load = load.clone();
        let bob = bob.clone();
        let carol = carol.clone();
        let files_dir = files_dir.path().to_path_buf();
        tokio::spawn(async move {
            for n in 0..MAX_UPLOADS {
                if load.stop.load(Ordering::Relaxed) {
                    break;
                }
                let room = format!("crash-{n}");
                let created = bob
                    .request(Request::CreateRoom {
                        room: room.clone(),
                        private: false,
                        password: None,
                    })
                    .await;
                let joined = match created {
                    Ok(_) => carol
                        .request(Request::Join {
                            room: room.clone(),
                            password: None,
                        })
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                if joined {
                    load.rooms.lock().expect("lock").push(room);
                } else {
                    load.failed_ops.fetch_add(1, Ordering::Relaxed);
                }
                let content: Vec<u8> = (0..FILE_BYTES)
                    .map(|i| (i as u64).wrapping_mul(n + 7).wrapping_shr(3) as u8)
                    .collect();
                let path = files_dir.join(format!("upload-{n}.bin"));
                if std::fs::write(&path, &content).is_err() {
                    continue;
                }
                match bob
                    .send_file(&path, general(), FileOptions::default())
                    .await
                {
                    Ok(sent) => {
                        load.files
                            .lock()
                            .expect("lock")
                            .insert(sent.file_id, sent.sha256);
                    }
                    Err(_) => {
                        load.failed_ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let mut rng = seed;
    let mut kill_times_ms = Vec::new();
    for round in 0..rounds {
        // Let the load get under way in this life of the server (bounded wait), then kill it at
        // a random moment.
        // The clients must come back by themselves after every kill: a life in which alice gets
        // nothing acknowledged means they did not (the check at the end would pass without).
        let before = load.acked.lock().expect("lock").len();
        let mut resumed = false;
        for _ in 0..3000 {
            if load.acked.lock().expect("lock").len() >= before + 5 {
                resumed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            resumed || load.alice_done.load(Ordering::Relaxed),
            "round {round}: no message acknowledged within 30 s of the server's start ({before} so far, {} sends failed): the clients did not resume",
            load.failed_sends.load(Ordering::Relaxed)
        );
        let delay = 50 + next(&mut rng) % 1200;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        srv.child.kill().expect("SIGKILL");
        let _ = srv.child.wait();
        kill_times_ms.push(delay);
        drop(srv);
        eprintln!(
            "round {round}: killed {delay} ms in; {} acknowledged so far",
            load.acked.lock().expect("lock").len()
        );
        (srv, _) = start(dir.path(), port);
    }

    // The last life: let the load run a little, then stop it and let everything settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(120), alice_task)
        .await
        .expect("alice settles")
        .expect("alice task");
    tokio::time::timeout(Duration::from_secs(120), bob_task)
        .await
        .expect("bob settles")
        .expect("bob task");
    let acked = load.acked.lock().expect("lock").clone();

    // History: every acknowledged message exactly once, as acknowledged; no gaps.
    let mut history = Vec::new();
    let mut before = None;
    for _ in 0..10_000 {
        let page = match carol
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
    let mut by_text = HashMap::new();
    for m in history.iter().filter(|m| m.from == "alice") {
        let text = m.body.as_text().expect("text").to_string();
        assert!(
            by_text
                .insert(text.clone(), (m.msg_id.clone(), m.seq))
                .is_none(),
            "stored twice: {text}"
        );
    }
    for (text, id_seq) in &acked {
        assert_eq!(
            by_text.get(text),
            Some(id_seq),
            "acknowledged message missing or changed: {text}"
        );
    }

    // Carol, never restarted, received every acknowledged message exactly once.
    for _ in 0..600 {
        let complete = {
            let got = load.carol_got.lock().expect("lock");
            let backfilled = load.carol_backfilled.lock().expect("lock");
            let have: HashSet<&String> = got.iter().chain(backfilled.iter()).collect();
            acked.keys().all(|t| have.contains(t))
        };
        if complete {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.carol_stop.store(true, Ordering::Relaxed);
    let (reconnects, truncated, drops) =
        tokio::time::timeout(Duration::from_secs(10), carol_reader)
            .await
            .expect("carol's reader ends")
            .expect("carol task");
    let got = load.carol_got.lock().expect("lock").clone();
    let mut seen = HashSet::new();
    for t in &got {
        assert!(seen.insert(t.clone()), "carol received twice: {t}");
    }
    let backfilled = load.carol_backfilled.lock().expect("lock").clone();
    let mut never: Vec<u64> = acked
        .iter()
        .filter(|(text, _)| !seen.contains(*text) && !backfilled.contains(*text))
        .map(|(_, (_, seq))| *seq)
        .collect();
    never.sort_unstable();
    assert!(
        never.is_empty(),
        "carol never received {} acknowledged messages, seqs {:?}..{:?} ({reconnects} reconnects, {truncated} catch-ups truncated, drops {drops:?})",
        never.len(),
        never.first(),
        never.last()
    );

    // Rooms: created and joined, still there with carol in them.
    let rooms = load.rooms.lock().expect("lock").clone();
    let listed = match carol.request(Request::Rooms).await.expect("rooms") {
        Reply::Rooms(r) => r,
        other => panic!("{other:?}"),
    };
    let member_of: HashSet<String> = listed
        .iter()
        .filter(|r| r.member)
        .map(|r| r.room.clone())
        .collect();
    for room in &rooms {
        assert!(
            member_of.contains(room),
            "room {room} lost (or carol's membership)"
        );
    }

    // Files: every completed upload is offered once and downloads intact.
    let files = load.files.lock().expect("lock").clone();
    let offered = match carol.request(Request::Files).await.expect("files") {
        Reply::Files(f) => f,
        other => panic!("{other:?}"),
    };
    let mut offer_count: HashMap<String, usize> = HashMap::new();
    for o in &offered {
        *offer_count.entry(o.file_id.clone()).or_default() += 1;
    }
    let missing: Vec<&String> = files
        .keys()
        .filter(|id| offer_count.get(*id) != Some(&1))
        .collect();
    if !missing.is_empty() {
        drop(srv);
        let key = conclave_server::at_rest::DataKey::load_or_create(dir.path()).expect("key");
        let db = conclave_server::store::Db::open(dir.path(), key).expect("db");
        for id in &missing {
            eprintln!(
                "file {id}: row {:?}, carol {:?}, offers {:?}",
                db.file(id)
                    .map(|r| r.map(|r| (r.complete, r.size, r.created_ms))),
                db.file_recipient(id, "carol"),
                offer_count.get(*id)
            );
        }
        panic!(
            "{} completed uploads not offered exactly once",
            missing.len()
        );
    }
    let download = tempfile::tempdir().expect("tempdir");
    for (file_id, sha) in &files {
        assert_eq!(
            offer_count.get(file_id),
            Some(&1),
            "file {file_id} offered exactly once"
        );
        let got = carol
            .accept_file(file_id, download.path(), FileOptions::default())
            .await
            .unwrap_or_else(|e| panic!("download of {file_id}: {e}"));
        let bytes = std::fs::read(&got.path).expect("downloaded file");
        assert_eq!(bytes.len(), FILE_BYTES);
        assert_eq!(
            &hex::encode(Sha256::digest(&bytes)),
            sha,
            "file {file_id} intact"
        );
    }
    drop((alice, bob, carol));
    drop(srv);

    let key = conclave_server::at_rest::DataKey::load_or_create(dir.path()).expect("key");
    let db = conclave_server::store::Db::open(dir.path(), key).expect("db");
    assert_eq!(db.integrity_check().expect("check"), "ok");
    eprintln!(
        "{rounds} SIGKILLs (seed {seed:#x}, kill delays {kill_times_ms:?} ms): {} messages acknowledged ({} sends failed), {} stored, carol received {} live after {reconnects} reconnects ({truncated} catch-ups truncated, {} read from history; drops {drops:?}); {} rooms created and joined, {} uploads completed and verified ({} operations failed at a kill); integrity ok",
        acked.len(),
        load.failed_sends.load(Ordering::Relaxed),
        history.len(),
        got.len(),
        backfilled.len(),
        rooms.len(),
        files.len(),
        load.failed_ops.load(Ordering::Relaxed),
    );
    assert!(
        !acked.is_empty() && !files.is_empty(),
        "the load made progress"
    );
}
