//! The lifecycle of end-to-end rooms under latency (issue #18): real `conclave serve` and
//! real `conclave client --json` processes, every client connection through the test relay
//! (`common::relay`), and after every step a check of THE RULE:
//!
//! > a member reads every message whose send is ordered after their `join` (or invite
//! > acceptance) reply, up to their removal; nobody reads anything ordered outside their
//! > membership.
//!
//! Steps run one at a time and each waits for its reply, so "ordered after" is "sent at a later
//! step". A message whose send got an ok reply at step k must appear (a `message` event with its
//! text, within [`DELIVERY`]) on every online device of every member at step k, and on the
//! devices that were offline then when they come back (the catch-up at login), unless their
//! user was removed (or banned) before they came back; it must never appear on a device of a
//! non-member, nor twice on one device. No stdout line may show ciphertext (`data_hex`, or a
//! `content_type` `application/mls-*`), and unreadable items come as
//! `{"event":"e2ee","kind":"unreadable","reason":…}` (for a new device, at most one per
//! conversation).
//!
//! * `random_*`: seeded random sequences of steps over 4–6 users (see [`Action`]).
//!   `LIFECYCLE_SEED=N` replays one seed, `LIFECYCLE_SEEDS=a..b` (or a count `N`: seeds
//!   `1..=N`) runs many, `LIFECYCLE_STEPS` sets the steps per seed, `LIFECYCLE_DELAY_MS` the
//!   relay's one-way delay. A failure prints its seed and the full step list.
//! * scripted cases at the relay settings 0, 0.5, 5 and 50 ms one way (50 ms is `#[ignore]`):
//!   the four cases of the issue and a few more membership changes.
//! * `relay_*`: the relay itself.
//!
//! `scripts/lifecycle.sh N [DELAY_MS]` runs N seeds on a release build.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::relay::{Relay, Rng};
use common::*;
use serde_json::{Value, json};

/// A message must reach every device that should read it within this.
const DELIVERY: Duration = Duration::from_secs(15);
/// A command's reply must come within this.
const REPLY: Duration = Duration::from_secs(30);
/// A started client must be caught up within this.
const LOGIN: Duration = Duration::from_secs(30);
/// Clients must be back after a server restart or a cut within this.
const BACK: Duration = Duration::from_secs(40);
/// A client must exit within this after `quit`, a kill or a ban.
const EXIT: Duration = Duration::from_secs(15);
/// The last look for late (forbidden or repeated) deliveries at the end of a run.
const FINAL_DRAIN: Duration = Duration::from_secs(2);
/// How long a wait sleeps when no device has printed anything.
const IDLE: Duration = Duration::from_millis(2);
/// Lines of each device's output shown in a failure report.
const TAIL: usize = 40;
/// Characters of a JSON line quoted in a violation.
const SHORT: usize = 300;
/// Devices a user has at most at once (not counting replaced ones).
const MAX_DEVICES: usize = 3;
/// Rooms a random run creates at most.
const MAX_ROOMS: usize = 4;

const NAMES: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

type DevId = usize;
type UserId = usize;

/// A conversation: a room by name, or the sorted participants of a direct one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Conv {
    Room(String),
    Direct(Vec<String>),
}

impl fmt::Display for Conv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conv::Room(r) => write!(f, "#{r}"),
            Conv::Direct(u) => write!(f, "dm:{}", u.join("+")),
        }
    }
}

/// What a device must do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Read it (as a `message` event), once.
    Required,
    /// May read it once, or be told it is unreadable; need not (sent while its user was
    /// banned, before the device existed, or its user was removed while the device was
    /// offline).
    Optional,
}

#[derive(Debug)]
struct Msg {
    text: String,
    conv: Conv,
    from: DevId,
    step: usize,
    seq: Option<u64>,
    msg_id: Option<String>,
    /// Devices absent from this map must never read it.
    want: BTreeMap<DevId, Want>,
}

struct User {
    name: String,
    banned: bool,
}

struct Room {
    name: String,
    owner: UserId,
    private: bool,
    members: BTreeSet<UserId>,
    invited: BTreeSet<UserId>,
    /// Voted out: may not rejoin (for the server's 10 minutes).
    blocked: BTreeSet<UserId>,
}

struct Device {
    user: UserId,
    label: String,
    state: PathBuf,
    client: Option<JsonClient>,
    /// Replaced by a new device: never started again.
    retired: bool,
    /// Added by a `NewDevice` step (not one of the users' first devices).
    fresh: bool,
    /// Caught up in the current run.
    ready: bool,
    /// An exit is expected (quit, kill, ban): not a failure.
    expect_exit: bool,
    /// Runs started (1 = the first).
    runs: u32,
    next_id: u64,
    replies: HashMap<u64, Value>,
    /// `reconnected` events in this run.
    reconnects: u32,
    /// Texts read in this run, and in any run.
    seen_run: HashSet<String>,
    seen_ever: HashSet<String>,
    /// Texts read in a run that did not end cleanly (kill, ban): may come once more.
    may_repeat: HashSet<String>,
    /// `unreadable` notices of this run, per conversation.
    unreadable_run: HashMap<Conv, u32>,
    /// The stdout and stderr of finished runs (tails), for reports.
    past: Vec<String>,
}

impl Device {
    fn online(&self) -> bool {
        self.client.is_some() && self.ready
    }
}

/// One step, with everything it needs chosen.
#[derive(Debug, Clone)]
enum Action {
    Create {
        dev: DevId,
        room: String,
        private: bool,
    },
    Join {
        dev: DevId,
        room: usize,
    },
    Part {
        dev: DevId,
        room: usize,
    },
    Invite {
        dev: DevId,
        room: usize,
        user: UserId,
        accept: Option<DevId>,
    },
    Kick {
        dev: DevId,
        room: usize,
        user: UserId,
    },
    Votekick {
        voters: [DevId; 2],
        room: usize,
        user: UserId,
    },
    Ban {
        user: UserId,
    },
    Unban {
        user: UserId,
        back: bool,
    },
    SendRoom {
        dev: DevId,
        room: usize,
        count: usize,
    },
    SendDirect {
        dev: DevId,
        to: UserId,
    },
    Reconnect {
        dev: DevId,
    },
    Offline {
        dev: DevId,
    },
    Online {
        dev: DevId,
    },
    Kill9 {
        dev: DevId,
    },
    NewDevice {
        user: UserId,
        replace: Option<DevId>,
    },
    /// A device's own history of a room, or of a direct conversation (`with`).
    History {
        dev: DevId,
        room: Option<usize>,
        with: Option<UserId>,
    },
    ServerRestart,
    Cut,
}

impl Action {
    fn kind(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Join { .. } => "join",
            Action::Part { .. } => "part",
            Action::Invite { .. } => "invite",
            Action::Kick { .. } => "kick",
            Action::Votekick { .. } => "votekick",
            Action::Ban { .. } => "ban",
            Action::Unban { .. } => "unban",
            Action::SendRoom { .. } => "send_room",
            Action::SendDirect { .. } => "send_direct",
            Action::Reconnect { .. } => "reconnect",
            Action::Offline { .. } => "offline",
            Action::Online { .. } => "online",
            Action::Kill9 { .. } => "kill9",
            Action::NewDevice { .. } => "new_device",
            Action::History { .. } => "history",
            Action::ServerRestart => "server_restart",
            Action::Cut => "cut",
        }
    }
}

/// The world: server, relay, devices, and the model of who is where.
struct World {
    seed: u64,
    delay_ms: f64,
    rng: Rng,
    tmp: tempfile::TempDir,
    data: PathBuf,
    server: Option<Server>,
    port: u16,
    fingerprint: String,
    /// One relay per user (users' paths differ, as on real networks), all to the server.
    relays: Vec<Relay>,
    users: Vec<User>,
    devs: Vec<Device>,
    rooms: Vec<Room>,
    msgs: Vec<Msg>,
    by_text: HashMap<String, usize>,
    by_seq: HashMap<(Conv, u64), usize>,
    /// `unreadable` notices not yet matched to a message: (device, run, conv, seq, reason).
    unreadable: Vec<(DevId, u32, Conv, u64, String)>,
    step: usize,
    /// Every step so far, as printed on failure (shared with the caller, which prints it
    /// after a panic).
    log: Arc<Mutex<Vec<String>>>,
    /// Rule violations of the current step.
    violations: Vec<String>,
    /// Things worth knowing that break no rule (reported at the end).
    notes: Vec<String>,
    next_text: u64,
    /// Steps run, per kind.
    kinds: BTreeMap<&'static str, usize>,
    /// Rooms are server-encrypted (`LIFECYCLE_PLAIN=1`): a check of the test itself against
    /// the plain paths (direct messages stay end-to-end).
    plain: bool,
}

/// Names and texts carry the seed so that a failure names its run.
fn texts_prefix(seed: u64) -> String {
    format!("lc{seed}")
}

fn conclave_toml() -> &'static str {
    // The test opens many connections from one address: no rate limits or automatic bans.
    "[limits]\nrequests_per_second = 100000\nrequest_burst = 100000\n\n\
     [security]\nconnections_per_ip_per_minute = 100000\nmax_connections_per_ip = 1000\n\
     auto_ban = false\n\n[anomaly]\nenabled = false\n"
}

/// Whether a JSON value shows ciphertext anywhere: a `data_hex` field, or a `content_type`
/// of MLS.
fn shows_ciphertext(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, x)| {
            k == "data_hex"
                || (k == "content_type"
                    && x.as_str().is_some_and(|s| s.starts_with("application/mls")))
                || shows_ciphertext(x)
        }),
        Value::Array(a) => a.iter().any(shows_ciphertext),
        _ => false,
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// A JSON value shown in a report: at most [`SHORT`] characters of it.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(SHORT) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl World {
    /// A server with `delays_ms.len()` users, each one's devices through a relay of that
    /// one-way delay, one device each, all caught up.
    fn new(seed: u64, delay_ms: f64, delays_ms: &[f64], log: Arc<Mutex<Vec<String>>>) -> World {
        let users = delays_ms.len();
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::write(data.join("conclave.toml"), conclave_toml()).expect("conclave.toml");
        for name in &NAMES[..users] {
            let mut cmd = conclave(["user", "add", name, "--password-env", PW_VAR, "--data-dir"]);
            cmd.arg(&data).env(PW_VAR, PW);
            run(&format!("user add {name}"), cmd).assert_success();
        }
        let server = Server::start(&data, &[], &[]);
        let port = server.port;
        let fingerprint = server.fingerprint.clone();
        let relays = delays_ms
            .iter()
            .enumerate()
            .map(|(u, &ms)| Relay::to(&server.addr(), ms, seed ^ 0x5EED ^ ((u as u64) << 32)))
            .collect();
        let mut w = World {
            seed,
            delay_ms,
            rng: Rng::new(seed),
            tmp,
            data,
            server: Some(server),
            port,
            fingerprint,
            relays,
            users: NAMES[..users]
                .iter()
                .map(|n| User {
                    name: n.to_string(),
                    banned: false,
                })
                .collect(),
            devs: Vec::new(),
            rooms: Vec::new(),
            msgs: Vec::new(),
            by_text: HashMap::new(),
            by_seq: HashMap::new(),
            unreadable: Vec::new(),
            step: 0,
            log,
            violations: Vec::new(),
            notes: Vec::new(),
            next_text: 0,
            kinds: BTreeMap::new(),
            plain: env_var("LIFECYCLE_PLAIN").is_some_and(|v| v == "1"),
        };
        w.record(format!(
            "seed {seed}, relay {delay_ms} ms, users (one-way delay of each one's relay, + up to half as jitter): {}",
            w.users
                .iter()
                .zip(delays_ms)
                .map(|(u, ms)| format!("{} {ms:.2} ms", u.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if w.plain {
            w.record("LIFECYCLE_PLAIN=1: rooms are server-encrypted".into());
        }
        for u in 0..users {
            let d = w.add_device(u);
            w.start(d);
        }
        w.check();
        w
    }

    fn record(&self, line: String) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn fail(&mut self, dev: Option<DevId>, what: String) {
        let who = dev
            .map(|d| format!("{}: ", self.devs[d].label))
            .unwrap_or_default();
        self.violations
            .push(format!("step {}: {who}{what}", self.step));
    }

    fn note(&mut self, what: String) {
        self.notes.push(format!("step {}: {what}", self.step));
    }

    // ---- devices -------------------------------------------------------------------------

    fn add_device(&mut self, user: UserId) -> DevId {
        let n = self.devs.iter().filter(|d| d.user == user).count() + 1;
        let label = format!("{}/{n}", self.users[user].name);
        let state = self
            .tmp
            .path()
            .join(format!("state-{}-{n}", self.users[user].name));
        self.devs.push(Device {
            user,
            label,
            state,
            client: None,
            retired: false,
            fresh: false,
            ready: false,
            expect_exit: false,
            runs: 0,
            next_id: 1,
            replies: HashMap::new(),
            reconnects: 0,
            seen_run: HashSet::new(),
            seen_ever: HashSet::new(),
            may_repeat: HashSet::new(),
            unreadable_run: HashMap::new(),
            past: Vec::new(),
        });
        self.devs.len() - 1
    }

    /// Starts a device's client (same state dir as before) and waits until it is caught up.
    fn start(&mut self, d: DevId) {
        let user = self.users[self.devs[d].user].name.clone();
        let dev = &mut self.devs[d];
        assert!(
            dev.client.is_none() && !dev.retired,
            "{} cannot start",
            dev.label
        );
        let relay = self.relays[self.devs[d].user].addr();
        let dev = &mut self.devs[d];
        let mut cmd = client_cmd(&relay, &user, &dev.state, PW);
        cmd.args(["--fingerprint", &self.fingerprint]);
        let client = JsonClient::connect(&dev.label, cmd);
        let connected = client.connected.clone();
        dev.client = Some(client);
        dev.runs += 1;
        dev.ready = false;
        dev.expect_exit = false;
        dev.reconnects = 0;
        dev.seen_run.clear();
        dev.unreadable_run.clear();
        self.observe(d, connected);
        let deadline = Instant::now() + LOGIN;
        if !self.wait_until(deadline, |w| w.devs[d].ready || w.devs[d].client.is_none()) {
            self.fail(
                Some(d),
                format!("no caught_up within {LOGIN:?} of starting"),
            );
        }
    }

    /// Ends a device's run: `quit` (clean) or SIGKILL; waits for the exit.
    fn stop(&mut self, d: DevId, clean: bool) {
        self.devs[d].expect_exit = true;
        if clean {
            let r = self.call(d, json!({"cmd": "quit"}));
            if r.as_ref().is_some_and(|r| r["ok"] != true) {
                self.fail(Some(d), format!("quit: {}", r.unwrap_or_default()));
            }
        } else if let Some(c) = self.devs[d].client.as_mut() {
            c.proc.kill9();
        }
        let deadline = Instant::now() + EXIT;
        if !self.wait_until(deadline, |w| w.devs[d].client.is_none()) {
            self.fail(Some(d), format!("did not exit within {EXIT:?}"));
            if let Some(c) = self.devs[d].client.as_mut() {
                c.proc.kill9();
            }
            self.closed(d);
        }
        if !clean {
            self.unclean_end(d);
        }
    }

    /// The device's stdout ended: collects the run.
    fn closed(&mut self, d: DevId) {
        let Some(mut c) = self.devs[d].client.take() else {
            return;
        };
        let status = c.proc.wait_exit(EXIT);
        let dev = &mut self.devs[d];
        dev.ready = false;
        dev.past.push(format!(
            "--- run {} of {} ({status}) stdout:\n{}\n--- stderr:\n{}",
            dev.runs,
            dev.label,
            tail(&c.proc.stdout, TAIL),
            tail(
                &c.proc
                    .stderr()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>(),
                TAIL
            )
        ));
        let expected = dev.expect_exit;
        if !expected {
            let last = c.seen.last().cloned().unwrap_or_default();
            self.fail(
                Some(d),
                format!("exited unexpectedly ({status}); last line {last}"),
            );
        } else if !status.success() && status.code().is_some() {
            // A ban ends the client with a non-zero status; a quit must not.
            let banned = self.users[self.devs[d].user].banned;
            if !banned {
                self.fail(Some(d), format!("exited with {status} after quit"));
            }
        }
    }

    /// Reads whatever the devices printed (without waiting); whether anything came.
    fn pump(&mut self) -> bool {
        let mut any = false;
        for d in 0..self.devs.len() {
            // A device that prints a lot does not starve the others: a bounded batch each.
            for _ in 0..256 {
                let Some(c) = self.devs[d].client.as_mut() else {
                    break;
                };
                match c.poll(Duration::ZERO) {
                    Polled::Line(v) => {
                        any = true;
                        self.observe(d, v);
                    }
                    Polled::Quiet => break,
                    Polled::Closed => {
                        self.closed(d);
                        break;
                    }
                }
            }
        }
        any
    }

    /// Reads the devices' output until `done` holds or the deadline passes; whether it held.
    fn wait_until(&mut self, deadline: Instant, mut done: impl FnMut(&World) -> bool) -> bool {
        loop {
            let any = self.pump();
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if !any {
                thread::sleep(IDLE);
            }
        }
    }

    /// Sends a command with a fresh id and waits for its reply.
    fn call(&mut self, d: DevId, mut cmd: Value) -> Option<Value> {
        let id = self.issue(d, &mut cmd)?;
        self.reply(d, id, &cmd)
    }

    /// Writes a command with a fresh id (without waiting); its id.
    fn issue(&mut self, d: DevId, cmd: &mut Value) -> Option<u64> {
        let dev = &mut self.devs[d];
        let id = dev.next_id;
        dev.next_id += 1;
        cmd["id"] = json!(id);
        let Some(c) = dev.client.as_mut() else {
            self.fail(Some(d), format!("not running for {cmd}"));
            return None;
        };
        c.send(cmd.clone());
        Some(id)
    }

    fn reply(&mut self, d: DevId, id: u64, cmd: &Value) -> Option<Value> {
        let deadline = Instant::now() + REPLY;
        let got = self.wait_until(deadline, |w| {
            w.devs[d].replies.contains_key(&id) || w.devs[d].client.is_none()
        });
        match self.devs[d].replies.remove(&id) {
            Some(r) => Some(r),
            None if !got => {
                self.fail(Some(d), format!("no reply within {REPLY:?} to {cmd}"));
                None
            }
            None => {
                if !self.devs[d].expect_exit {
                    self.fail(Some(d), format!("exited before replying to {cmd}"));
                }
                None
            }
        }
    }

    /// A command that must succeed; its reply.
    fn call_ok(&mut self, d: DevId, cmd: Value) -> Option<Value> {
        let r = self.call(d, cmd.clone())?;
        if r["ok"] != true {
            self.fail(Some(d), format!("{cmd} failed: {r}"));
            return None;
        }
        Some(r)
    }

    // ---- what devices print --------------------------------------------------------------

    fn observe(&mut self, d: DevId, v: Value) {
        if shows_ciphertext(&v) {
            self.fail(Some(d), format!("ciphertext shown: {}", short(&v)));
        }
        if v.get("event").is_none() {
            if let Some(id) = v.get("id").and_then(Value::as_u64) {
                self.devs[d].replies.insert(id, v);
            }
            return;
        }
        match v["event"].as_str().unwrap_or_default() {
            "message" => self.on_message(d, &v),
            "e2ee" if v["kind"] == "unreadable" => self.on_unreadable(d, &v),
            "caught_up" => {
                let dev = &mut self.devs[d];
                dev.ready = true;
                let shown = dev.seen_run.len() + dev.unreadable_run.values().sum::<u32>() as usize;
                let count = v["count"].as_u64().unwrap_or(0) as usize;
                if dev.fresh && dev.runs == 1 && count > shown {
                    let label = dev.label.clone();
                    self.note(format!(
                        "{label}: caught up {count} item(s) at its first login, printed {shown} (messages and unreadable notices)"
                    ));
                }
            }
            "reconnected" => self.devs[d].reconnects += 1,
            "disconnected" if v["reconnecting"] != true => {
                let banned = self.users[self.devs[d].user].banned;
                let expected = self.devs[d].expect_exit || (banned && v["reason"] == "banned");
                if !expected {
                    self.fail(Some(d), format!("gave up its connection: {v}"));
                }
            }
            _ => {}
        }
    }

    fn on_message(&mut self, d: DevId, v: &Value) {
        let Some(text) = v["text"].as_str() else {
            self.fail(Some(d), format!("a message without text: {v}"));
            return;
        };
        let Some(&i) = self.by_text.get(text) else {
            if text.starts_with(&texts_prefix(self.seed)) {
                self.fail(Some(d), format!("read a message nobody sent: {v}"));
            }
            return;
        };
        let m = &self.msgs[i];
        let mut problems = Vec::new();
        if d == m.from {
            // After a kill its own messages may come once in the catch-up (nothing had told
            // the server that this device has them); never otherwise.
            if !self.devs[d].may_repeat.remove(text) {
                problems.push(format!("its own message {text:?} came back as an event"));
            }
            return self.fail_all(d, problems);
        } else if !m.want.contains_key(&d) {
            problems.push(format!(
                "read {text:?} (sent at step {} to {}) outside its membership",
                m.step, m.conv
            ));
        }
        let from = &self.users[self.devs[m.from].user].name;
        if v["from"] != from.as_str() {
            problems.push(format!(
                "{text:?} shown from {} (sent by {from})",
                v["from"]
            ));
        }
        match &m.conv {
            Conv::Room(r) if v["room"] != r.as_str() => {
                problems.push(format!("{text:?} shown in {} (sent to #{r})", v["room"]));
            }
            Conv::Direct(users) => {
                let mut shown: BTreeSet<String> = v["to"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                shown.insert(from.clone());
                if shown.into_iter().collect::<Vec<_>>() != *users {
                    problems.push(format!(
                        "{text:?} shown to {} (sent in {})",
                        v["to"], m.conv
                    ));
                }
            }
            Conv::Room(_) => {}
        }
        let e2ee = !(self.plain && matches!(m.conv, Conv::Room(_)));
        if v["e2ee"] != e2ee {
            problems.push(format!(
                "{text:?} shown with e2ee {} (expected {e2ee}): {v}",
                v["e2ee"]
            ));
        }
        if let Some(id) = &m.msg_id
            && v["msg_id"] != id.as_str()
        {
            problems.push(format!(
                "{text:?} with msg_id {} (sent as {id})",
                v["msg_id"]
            ));
        }
        let dev = &mut self.devs[d];
        if !dev.seen_run.insert(text.to_string()) {
            problems.push(format!("read {text:?} twice in one run"));
        } else if !dev.seen_ever.insert(text.to_string()) && !dev.may_repeat.remove(text) {
            problems.push(format!(
                "read {text:?} again in a later run (the earlier one ended cleanly)"
            ));
        }
        self.fail_all(d, problems);
    }

    fn fail_all(&mut self, d: DevId, problems: Vec<String>) {
        for p in problems {
            self.fail(Some(d), p);
        }
    }

    /// A run that did not end cleanly: what it read, and what it sent, may come once more.
    fn unclean_end(&mut self, d: DevId) {
        let own: Vec<String> = self
            .msgs
            .iter()
            .filter(|m| m.from == d)
            .map(|m| m.text.clone())
            .collect();
        let dev = &mut self.devs[d];
        dev.may_repeat.extend(dev.seen_run.iter().cloned());
        dev.may_repeat.extend(own);
    }

    fn on_unreadable(&mut self, d: DevId, v: &Value) {
        if v["reason"].as_str().is_none_or(|r| r.trim().is_empty()) {
            self.fail(Some(d), format!("unreadable without a reason: {v}"));
        }
        let me = self.users[self.devs[d].user].name.clone();
        let conv = if let Some(r) = v["room"].as_str() {
            Conv::Room(r.to_string())
        } else {
            let mut users: BTreeSet<String> = match &v["with"] {
                Value::String(s) => [s.clone()].into(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
                _ => BTreeSet::new(),
            };
            users.insert(me);
            Conv::Direct(users.into_iter().collect())
        };
        let dev = &mut self.devs[d];
        let first_run_of_new = dev.fresh && dev.runs == 1;
        let n = dev.unreadable_run.entry(conv.clone()).or_default();
        *n += 1;
        if first_run_of_new && *n == 2 {
            // A new device (not a user's first): one notice per conversation, not per message.
            self.fail(
                Some(d),
                format!("a second unreadable notice for {conv} on a new device: {v}"),
            );
        }
        match v["seq"].as_u64() {
            Some(seq) => {
                let run = self.devs[d].runs;
                let reason = v["reason"].as_str().unwrap_or_default().to_string();
                self.unreadable.push((d, run, conv, seq, reason));
            }
            None => self.note(format!(
                "{}: unreadable without seq: {v}",
                self.devs[d].label
            )),
        }
    }

    /// Matches the unreadable notices to messages (once every send has its reply): a message
    /// the device must read may not be one.
    fn resolve_unreadable(&mut self) {
        let pending = std::mem::take(&mut self.unreadable);
        for (d, run, conv, seq, reason) in pending {
            let label = self.devs[d].label.clone();
            match self.by_seq.get(&(conv.clone(), seq)).copied() {
                None => self.note(format!(
                    "{label} (run {run}): unreadable {conv} seq {seq} is none of the test's messages ({reason})"
                )),
                Some(i) => {
                    let (text, step) = (self.msgs[i].text.clone(), self.msgs[i].step);
                    let already = self.devs[d].seen_ever.contains(&text);
                    match self.msgs[i].want.get(&d).copied() {
                        Some(Want::Required) if !already => self.fail(
                            Some(d),
                            format!("cannot read {text:?} (step {step}, {conv} seq {seq}), which it must: {reason}"),
                        ),
                        Some(Want::Required) if !self.devs[d].may_repeat.contains(&text) => {
                            self.fail(
                                Some(d),
                                format!("{text:?} (read already) came again as unreadable: {reason}"),
                            )
                        }
                        Some(_) => {}
                        None => self.note(format!(
                            "{label} (run {run}): unreadable notice for {text:?} (step {step}), from outside its membership: {reason}"
                        )),
                    }
                }
            }
        }
    }

    // ---- the rule ------------------------------------------------------------------------

    /// Waits (bounded) until every online device has read every message it must have read,
    /// then fails the run if anything broke the rule.
    fn settle(&mut self) {
        let deadline = Instant::now() + DELIVERY;
        self.wait_until(deadline, |w| w.missing().is_empty());
        for (d, text) in self.missing() {
            let m = &self.msgs[self.by_text[&text]];
            let what = format!(
                "did not read {text:?} (step {}, {} seq {:?}) within {DELIVERY:?}",
                m.step, m.conv, m.seq
            );
            self.fail(Some(d), what);
        }
        self.resolve_unreadable();
        self.check();
    }

    /// (device, text) of every message an online device must have read and has not.
    fn missing(&self) -> Vec<(DevId, String)> {
        let mut out = Vec::new();
        for m in &self.msgs {
            if m.seq.is_none() {
                continue;
            }
            for (&d, want) in &m.want {
                if *want == Want::Required
                    && self.devs[d].online()
                    && !self.devs[d].seen_ever.contains(&m.text)
                {
                    out.push((d, m.text.clone()));
                }
            }
        }
        out
    }

    /// Panics with a full report if the current step broke the rule.
    fn check(&mut self) {
        if self.violations.is_empty() {
            return;
        }
        let mut involved: BTreeSet<DevId> = BTreeSet::new();
        for v in &self.violations {
            for (d, dev) in self.devs.iter().enumerate() {
                if v.contains(&format!(" {}: ", dev.label)) {
                    involved.insert(d);
                }
            }
        }
        let mut report = format!(
            "THE RULE was broken (seed {}, relay {} ms):\n  {}\n",
            self.seed,
            self.delay_ms,
            self.violations.join("\n  ")
        );
        for d in involved {
            let dev = &self.devs[d];
            for p in &dev.past {
                report.push_str(p);
                report.push('\n');
            }
            if let Some(c) = &dev.client {
                report.push_str(&format!(
                    "--- {} (running, run {}) stdout:\n{}\n--- stderr:\n{}\n",
                    dev.label,
                    dev.runs,
                    tail(&c.proc.stdout, TAIL),
                    tail(
                        &c.proc
                            .stderr()
                            .lines()
                            .map(String::from)
                            .collect::<Vec<_>>(),
                        TAIL
                    )
                ));
            }
        }
        if let Some(server) = &self.server {
            let warnings: Vec<String> = server
                .proc
                .stderr()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .map(String::from)
                .collect();
            report.push_str(&format!(
                "--- server warnings and errors (last {TAIL}):\n{}\n",
                tail(&warnings, TAIL)
            ));
        }
        if !self.notes.is_empty() {
            report.push_str(&format!("notes so far:\n  {}\n", self.notes.join("\n  ")));
        }
        self.violations.clear();
        // Without the panic hook: the caller prints the report once, with the step list.
        panic::resume_unwind(Box::new(report));
    }

    /// The end of a run: a last look for late deliveries, then every client quits.
    fn finish(&mut self) {
        let until = Instant::now() + FINAL_DRAIN;
        self.wait_until(until, |_| false);
        self.settle();
        for d in 0..self.devs.len() {
            if self.devs[d].client.is_some() {
                self.stop(d, true);
            }
        }
        self.resolve_unreadable();
        self.check();
    }

    // ---- the model -----------------------------------------------------------------------

    fn member(&self, u: UserId, r: usize) -> bool {
        self.rooms[r].members.contains(&u)
    }

    fn live_devices_of(&self, u: UserId) -> Vec<DevId> {
        (0..self.devs.len())
            .filter(|&d| self.devs[d].user == u && !self.devs[d].retired)
            .collect()
    }

    fn online_devices(&self) -> Vec<DevId> {
        (0..self.devs.len())
            .filter(|&d| self.devs[d].online())
            .collect()
    }

    fn online_devices_of(&self, u: UserId) -> Vec<DevId> {
        self.live_devices_of(u)
            .into_iter()
            .filter(|&d| self.devs[d].online())
            .collect()
    }

    fn room_index(&self, name: &str) -> usize {
        self.rooms
            .iter()
            .position(|r| r.name == name)
            .unwrap_or_else(|| panic!("no room {name} in the model"))
    }

    /// A user left a room (part, kick, vote): their devices that were offline need not read
    /// what they had not read yet.
    fn removed(&mut self, u: UserId, r: usize) {
        self.rooms[r].members.remove(&u);
        let conv = Conv::Room(self.rooms[r].name.clone());
        self.relax(u, |m| m.conv == conv);
    }

    /// Messages of the user's offline devices matching `which` become optional.
    fn relax(&mut self, u: UserId, which: impl Fn(&Msg) -> bool) {
        let offline: Vec<DevId> = self
            .live_devices_of(u)
            .into_iter()
            .filter(|&d| !self.devs[d].online())
            .collect();
        for m in self.msgs.iter_mut().filter(|m| which(m)) {
            for d in &offline {
                if let Some(w) = m.want.get_mut(d)
                    && !self.devs[*d].seen_ever.contains(&m.text)
                {
                    *w = Want::Optional;
                }
            }
        }
    }

    /// Who must read a message sent now by `from` to `conv`.
    fn audience(&self, from: DevId, conv: &Conv) -> BTreeMap<DevId, Want> {
        let users: Vec<UserId> = match conv {
            Conv::Room(r) => self.rooms[self.room_index(r)]
                .members
                .iter()
                .copied()
                .collect(),
            Conv::Direct(names) => (0..self.users.len())
                .filter(|&u| names.contains(&self.users[u].name))
                .collect(),
        };
        let mut want = BTreeMap::new();
        for u in users {
            for d in self.live_devices_of(u) {
                if d != from {
                    let w = if self.users[u].banned {
                        Want::Optional
                    } else {
                        Want::Required
                    };
                    want.insert(d, w);
                }
            }
        }
        want
    }

    fn new_text(&mut self, from: DevId) -> String {
        self.next_text += 1;
        format!(
            "{}-s{}-{}-m{}",
            texts_prefix(self.seed),
            self.step,
            self.devs[from].label.replace('/', "."),
            self.next_text
        )
    }

    // ---- steps ---------------------------------------------------------------------------

    /// Runs one step, records it, and checks the rule.
    fn act(&mut self, a: Action) -> String {
        self.step += 1;
        *self.kinds.entry(a.kind()).or_default() += 1;
        let what = self.describe(&a);
        self.record(format!("{:>3}: {what}", self.step));
        let outcome = match a.clone() {
            Action::Create { dev, room, private } => self.create(dev, &room, private),
            Action::Join { dev, room } => self.join(dev, room),
            Action::Part { dev, room } => self.part(dev, room),
            Action::Invite {
                dev,
                room,
                user,
                accept,
            } => self.invite(dev, room, user, accept),
            Action::Kick { dev, room, user } => self.kick(dev, room, user),
            Action::Votekick { voters, room, user } => self.votekick(voters, room, user),
            Action::Ban { user } => self.ban(user),
            Action::Unban { user, back } => self.unban(user, back),
            Action::SendRoom { dev, room, count } => self.send_room(dev, room, count),
            Action::SendDirect { dev, to } => self.send_direct(dev, to),
            Action::Reconnect { dev } => {
                self.stop(dev, true);
                self.start(dev);
                "back".into()
            }
            Action::Offline { dev } => {
                self.stop(dev, true);
                "offline".into()
            }
            Action::Online { dev } => {
                self.start(dev);
                "back".into()
            }
            Action::Kill9 { dev } => {
                self.stop(dev, false);
                self.start(dev);
                "killed and back".into()
            }
            Action::NewDevice { user, replace } => self.new_device(user, replace),
            Action::ServerRestart => self.server_restart(),
            Action::Cut => self.cut(),
            Action::History { dev, room, with } => {
                let n = match (room, with) {
                    (Some(r), _) => self.check_history(dev, r).len(),
                    (None, Some(u)) => self.check_direct_history(dev, u).len(),
                    (None, None) => 0,
                };
                format!("{n} readable rows")
            }
        };
        if !outcome.is_empty() {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(last) = log.last_mut() {
                last.push_str(&format!(" -> {outcome}"));
            }
        }
        self.check();
        self.settle();
        outcome
    }

    fn describe(&self, a: &Action) -> String {
        let dev = |d: &DevId| self.devs[*d].label.clone();
        let room = |r: &usize| format!("#{}", self.rooms[*r].name);
        let user = |u: &UserId| self.users[*u].name.clone();
        match a {
            Action::Create {
                dev: d,
                room,
                private,
            } => format!(
                "{} create_room #{room}{}",
                dev(d),
                if *private { " (private)" } else { "" }
            ),
            Action::Join { dev: d, room: r } => format!("{} join {}", dev(d), room(r)),
            Action::Part { dev: d, room: r } => format!("{} part {}", dev(d), room(r)),
            Action::Invite {
                dev: d,
                room: r,
                user: u,
                accept,
            } => format!(
                "{} invite {} to {}{}",
                dev(d),
                user(u),
                room(r),
                accept
                    .map(|a| format!(", {} accepts (join)", dev(&a)))
                    .unwrap_or_default()
            ),
            Action::Kick {
                dev: d,
                room: r,
                user: u,
            } => {
                format!("{} kick {} from {}", dev(d), user(u), room(r))
            }
            Action::Votekick {
                voters,
                room: r,
                user: u,
            } => format!(
                "{} and {} votekick {} from {}",
                dev(&voters[0]),
                dev(&voters[1]),
                user(u),
                room(r)
            ),
            Action::Ban { user: u } => format!("admin ban {}", user(u)),
            Action::Unban { user: u, back } => format!(
                "admin unban {}{}",
                user(u),
                if *back {
                    ", their devices come back"
                } else {
                    ""
                }
            ),
            Action::SendRoom {
                dev: d,
                room: r,
                count,
            } => format!("{} send {count} to {}", dev(d), room(r)),
            Action::SendDirect { dev: d, to } => {
                format!("{} send to {} (direct)", dev(d), user(to))
            }
            Action::Reconnect { dev: d } => format!("{} quit and reconnect", dev(d)),
            Action::Offline { dev: d } => format!("{} quit (offline)", dev(d)),
            Action::Online { dev: d } => format!("{} start again", dev(d)),
            Action::Kill9 { dev: d } => format!("{} kill -9 and restart", dev(d)),
            Action::NewDevice { user: u, replace } => format!(
                "{} logs in on a new device{}",
                user(u),
                replace
                    .map(|r| format!(" replacing {}", dev(&r)))
                    .unwrap_or_else(|| " (additional)".into())
            ),
            Action::ServerRestart => "server restart (SIGTERM, start again)".into(),
            Action::Cut => "relay cuts every connection".into(),
            Action::History {
                dev: d,
                room: r,
                with,
            } => match (r, with) {
                (Some(r), _) => format!("{} history {}", dev(d), room(r)),
                (_, Some(u)) => format!("{} history with {}", dev(d), user(u)),
                _ => format!("{} history", dev(d)),
            },
        }
    }

    fn create(&mut self, d: DevId, name: &str, private: bool) -> String {
        let Some(r) = self.call_ok(
            d,
            json!({"cmd": "create_room", "room": name, "private": private, "e2ee": !self.plain}),
        ) else {
            return "failed".into();
        };
        if r["e2ee"] != !self.plain {
            self.fail(
                Some(d),
                format!("a new room is not as asked (e2ee {}): {r}", !self.plain),
            );
        }
        let owner = self.devs[d].user;
        self.rooms.push(Room {
            name: name.to_string(),
            owner,
            private,
            members: [owner].into(),
            invited: BTreeSet::new(),
            blocked: BTreeSet::new(),
        });
        "ok".into()
    }

    fn join(&mut self, d: DevId, r: usize) -> String {
        let name = self.rooms[r].name.clone();
        if self
            .call_ok(d, json!({"cmd": "join", "room": name}))
            .is_none()
        {
            return "failed".into();
        }
        let u = self.devs[d].user;
        self.rooms[r].members.insert(u);
        self.rooms[r].invited.remove(&u);
        self.check_members(r);
        "ok".into()
    }

    fn part(&mut self, d: DevId, r: usize) -> String {
        let name = self.rooms[r].name.clone();
        if self
            .call_ok(d, json!({"cmd": "part", "room": name}))
            .is_none()
        {
            return "failed".into();
        }
        self.removed(self.devs[d].user, r);
        self.check_members(r);
        "ok".into()
    }

    fn invite(&mut self, d: DevId, r: usize, u: UserId, accept: Option<DevId>) -> String {
        let (name, user) = (self.rooms[r].name.clone(), self.users[u].name.clone());
        if self
            .call_ok(d, json!({"cmd": "invite", "room": name, "user": user}))
            .is_none()
        {
            return "failed".into();
        }
        // In an end-to-end room the invitation adds the user's devices to the group, and that
        // makes the user a member (today's design); else they are invited and must join. The
        // server's count of members says which.
        let before = self.rooms[r].members.len();
        let member = match self.listed_members(d, r) {
            Some(n) if n == before + 1 => true,
            Some(n) if n == before => false,
            other => {
                self.fail(
                    Some(d),
                    format!("after the invitation the server lists {other:?} members of #{name}, the model {before} or {}", before + 1),
                );
                false
            }
        };
        if member {
            self.rooms[r].members.insert(u);
        } else {
            self.rooms[r].invited.insert(u);
        }
        let how = if member {
            "a member by the invitation"
        } else {
            "invited"
        };
        match accept {
            Some(a) => format!("ok, {how}; accepted (join): {}", self.join(a, r)),
            None => format!("ok, {how}"),
        }
    }

    /// The server's count of a room's members, as `rooms` lists it to device `d`.
    fn listed_members(&mut self, d: DevId, r: usize) -> Option<usize> {
        let name = self.rooms[r].name.clone();
        let reply = self.call_ok(d, json!({"cmd": "rooms"}))?;
        let listed = reply["rooms"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["room"] == name.as_str()))
            .and_then(|x| x["members"].as_u64());
        listed.map(|n| n as usize)
    }

    /// After a membership change: the server counts as many members as the model.
    fn check_members(&mut self, r: usize) {
        let viewer = self
            .online_devices()
            .into_iter()
            .find(|&d| !self.rooms[r].private || self.member(self.devs[d].user, r));
        let Some(v) = viewer else { return };
        let listed = self.listed_members(v, r);
        let model = &self.rooms[r].members;
        // A room nobody is in may be gone from the list.
        let agree = listed == Some(model.len()) || (listed.is_none() && model.is_empty());
        if !agree {
            let names: Vec<&str> = model.iter().map(|&u| self.users[u].name.as_str()).collect();
            let what = format!(
                "the server lists {listed:?} members of #{}, the model {} ({})",
                self.rooms[r].name,
                model.len(),
                names.join(", ")
            );
            self.fail(Some(v), what);
        }
    }

    fn kick(&mut self, d: DevId, r: usize, u: UserId) -> String {
        let (name, user) = (self.rooms[r].name.clone(), self.users[u].name.clone());
        let cmd = json!({"cmd": "kick", "room": name, "user": user, "reason": "lifecycle"});
        if self.call_ok(d, cmd).is_none() {
            return "failed".into();
        }
        self.removed(u, r);
        self.check_members(r);
        "ok".into()
    }

    fn votekick(&mut self, voters: [DevId; 2], r: usize, u: UserId) -> String {
        let (name, user) = (self.rooms[r].name.clone(), self.users[u].name.clone());
        let mut outcome = Vec::new();
        for v in voters {
            let Some(reply) =
                self.call_ok(v, json!({"cmd": "votekick", "room": name, "user": user}))
            else {
                return "failed".into();
            };
            outcome.push(format!("{}/{}", reply["votes"], reply["needed"]));
            if reply["kicked"] == true {
                self.removed(u, r);
                self.rooms[r].blocked.insert(u);
                self.check_members(r);
                return format!("votes {}; kicked", outcome.join(", "));
            }
        }
        self.fail(
            None,
            format!("two votes did not kick {user}: {}", outcome.join(", ")),
        );
        "not kicked".into()
    }

    /// `conclave admin ARGS` on the data directory (the running server's admin socket).
    fn admin(&mut self, args: &[&str]) -> bool {
        let mut cmd = conclave(["admin", "--data-dir"]);
        cmd.arg(&self.data).args(args);
        let f = run("admin", cmd);
        if !f.status.success() {
            self.fail(None, format!("conclave admin {args:?} failed: {f:#?}"));
        }
        f.status.success()
    }

    fn ban(&mut self, u: UserId) -> String {
        let user = self.users[u].name.clone();
        let online: Vec<DevId> = self
            .live_devices_of(u)
            .into_iter()
            .filter(|&d| self.devs[d].client.is_some())
            .collect();
        for &d in &online {
            self.devs[d].expect_exit = true;
        }
        self.users[u].banned = true;
        if !self.admin(&["ban", &user, "--reason", "lifecycle"]) {
            return "failed".into();
        }
        let deadline = Instant::now() + EXIT;
        if !self.wait_until(deadline, |w| {
            online.iter().all(|&d| w.devs[d].client.is_none())
        }) {
            for &d in &online {
                if self.devs[d].client.is_some() {
                    self.fail(Some(d), format!("still connected {EXIT:?} after the ban"));
                }
            }
        }
        for &d in &online {
            self.unclean_end(d);
        }
        // What the banned user's devices had not read yet, they need not read.
        self.relax(u, |_| true);
        format!("{} device(s) disconnected", online.len())
    }

    fn unban(&mut self, u: UserId, back: bool) -> String {
        let user = self.users[u].name.clone();
        if !self.admin(&["unban", &user]) {
            return "failed".into();
        }
        self.users[u].banned = false;
        if back {
            for d in self.live_devices_of(u) {
                if self.devs[d].client.is_none() {
                    self.start(d);
                }
            }
        }
        "ok".into()
    }

    /// Sends `count` messages to a room at once (without waiting between them), then waits
    /// for every reply.
    fn send_room(&mut self, d: DevId, r: usize, count: usize) -> String {
        let conv = Conv::Room(self.rooms[r].name.clone());
        let mut sent = Vec::new();
        for _ in 0..count {
            let text = self.new_text(d);
            let mut cmd = json!({"cmd": "send", "room": self.rooms[r].name, "text": text});
            let i = self.register(d, &conv, &text);
            let Some(id) = self.issue(d, &mut cmd) else {
                return "failed".into();
            };
            sent.push((i, id, cmd));
        }
        self.collect_sends(d, sent)
    }

    fn send_direct(&mut self, d: DevId, to: UserId) -> String {
        let me = self.users[self.devs[d].user].name.clone();
        let them = self.users[to].name.clone();
        let mut users = vec![me, them.clone()];
        users.sort();
        let conv = Conv::Direct(users);
        let text = self.new_text(d);
        let mut cmd = json!({"cmd": "send", "to": [them], "text": text});
        let i = self.register(d, &conv, &text);
        let Some(id) = self.issue(d, &mut cmd) else {
            return "failed".into();
        };
        self.collect_sends(d, vec![(i, id, cmd)])
    }

    /// Adds a message to the model before it is sent (another device may print it before the
    /// sender's reply is read).
    fn register(&mut self, from: DevId, conv: &Conv, text: &str) -> usize {
        let want = self.audience(from, conv);
        self.msgs.push(Msg {
            text: text.to_string(),
            conv: conv.clone(),
            from,
            step: self.step,
            seq: None,
            msg_id: None,
            want,
        });
        let i = self.msgs.len() - 1;
        self.by_text.insert(text.to_string(), i);
        i
    }

    fn collect_sends(&mut self, d: DevId, sent: Vec<(usize, u64, Value)>) -> String {
        let mut seqs = Vec::new();
        for (i, id, cmd) in sent {
            let Some(r) = self.reply(d, id, &cmd) else {
                return "failed".into();
            };
            if r["ok"] != true {
                self.fail(Some(d), format!("{cmd} failed: {r}"));
                return "failed".into();
            }
            let (Some(seq), Some(msg_id)) = (r["seq"].as_u64(), r["msg_id"].as_str()) else {
                self.fail(Some(d), format!("a send reply without seq or msg_id: {r}"));
                return "failed".into();
            };
            let m = &mut self.msgs[i];
            m.seq = Some(seq);
            m.msg_id = Some(msg_id.to_string());
            let key = (m.conv.clone(), seq);
            if self.by_seq.insert(key, i).is_some() {
                self.fail(
                    Some(d),
                    format!("seq {seq} given twice in {}", self.msgs[i].conv),
                );
            }
            seqs.push(seq.to_string());
        }
        format!("seq {}", seqs.join(","))
    }

    fn new_device(&mut self, u: UserId, replace: Option<DevId>) -> String {
        if let Some(old) = replace {
            if self.devs[old].client.is_some() {
                self.stop(old, true);
            }
            self.devs[old].retired = true;
        }
        let d = self.add_device(u);
        self.devs[d].fresh = true;
        // What the user's conversations held before this device existed, it may read (or be
        // told it cannot), never must.
        for m in &mut self.msgs {
            let others = m.want.keys().any(|&o| self.devs[o].user == u);
            let sender = self.devs[m.from].user == u;
            if others || sender {
                m.want.insert(d, Want::Optional);
            }
        }
        self.start(d);
        format!("{} ready", self.devs[d].label)
    }

    fn server_restart(&mut self) -> String {
        let online: Vec<(DevId, u32)> = (0..self.devs.len())
            .filter(|&d| self.devs[d].client.is_some())
            .map(|d| (d, self.devs[d].reconnects))
            .collect();
        if let Some(server) = self.server.take() {
            let f = server.stop();
            if !f.status.success() {
                self.note(format!("the server exited with {} on SIGTERM", f.status));
            }
        }
        let server = Server::start_on(&self.data, &format!("127.0.0.1:{}", self.port), &[], &[]);
        assert_eq!(
            server.fingerprint, self.fingerprint,
            "the same TLS identity"
        );
        self.server = Some(server);
        self.wait_back(&online)
    }

    fn cut(&mut self) -> String {
        let online: Vec<(DevId, u32)> = (0..self.devs.len())
            .filter(|&d| self.devs[d].client.is_some())
            .map(|d| (d, self.devs[d].reconnects))
            .collect();
        let n: usize = self.relays.iter().map(|r| r.cut_all()).sum();
        format!("{n} connection(s) cut; {}", self.wait_back(&online))
    }

    /// Waits until each of these devices printed one more `reconnected` than it had.
    fn wait_back(&mut self, before: &[(DevId, u32)]) -> String {
        let deadline = Instant::now() + BACK;
        let start = Instant::now();
        let back = self.wait_until(deadline, |w| {
            before
                .iter()
                .all(|&(d, n)| w.devs[d].client.is_none() || w.devs[d].reconnects > n)
        });
        if !back {
            for &(d, n) in before {
                if self.devs[d].reconnects <= n {
                    self.fail(Some(d), format!("not reconnected within {BACK:?}"));
                }
            }
        }
        format!("all back in {:.1} s", start.elapsed().as_secs_f64())
    }

    /// The device's own history of a room: every row a readable message it was allowed to
    /// read (never ciphertext, which `observe` checks on every line).
    fn check_history(&mut self, d: DevId, r: usize) -> Vec<String> {
        let name = self.rooms[r].name.clone();
        self.history_rows(d, json!({"cmd": "history", "room": name, "limit": 200}))
    }

    /// The same for the direct conversation with `u`.
    fn check_direct_history(&mut self, d: DevId, u: UserId) -> Vec<String> {
        let with = self.users[u].name.clone();
        self.history_rows(d, json!({"cmd": "history", "with": with, "limit": 200}))
    }

    fn history_rows(&mut self, d: DevId, cmd: Value) -> Vec<String> {
        let Some(h) = self.call_ok(d, cmd) else {
            return Vec::new();
        };
        let mut texts = Vec::new();
        for m in h["messages"].as_array().cloned().unwrap_or_default() {
            match m["text"].as_str() {
                None => self.fail(
                    Some(d),
                    format!("a history row without text: {}", short(&m)),
                ),
                Some(t) => {
                    if let Some(&i) = self.by_text.get(t) {
                        let sender = self.devs[self.msgs[i].from].user == self.devs[d].user;
                        // Server-encrypted rooms give newcomers their history.
                        let room = matches!(self.msgs[i].conv, Conv::Room(_));
                        let before = self.plain && room;
                        if !sender && !before && !self.msgs[i].want.contains_key(&d) {
                            self.fail(
                                Some(d),
                                format!("history shows {t:?} from outside its membership"),
                            );
                        }
                    }
                    texts.push(t.to_string());
                }
            }
        }
        texts
    }

    // ---- random choice -------------------------------------------------------------------

    fn choose(&mut self) -> Action {
        let online = self.online_devices();
        for _ in 0..200 {
            if let Some(a) = self.try_choose(&online) {
                return a;
            }
        }
        // Nothing fits (everyone offline or banned): bring someone back.
        let offline: Vec<DevId> = (0..self.devs.len())
            .filter(|&d| {
                let dev = &self.devs[d];
                dev.client.is_none() && !dev.retired && !self.users[dev.user].banned
            })
            .collect();
        if let Some(&dev) = offline.first() {
            return Action::Online { dev };
        }
        let user = (0..self.users.len())
            .find(|&u| self.users[u].banned)
            .expect("someone is banned when nobody can act");
        Action::Unban { user, back: true }
    }

    fn try_choose(&mut self, online: &[DevId]) -> Option<Action> {
        const KINDS: [(&str, u64); 18] = [
            ("history", 3),
            ("create", 6),
            ("join", 14),
            ("part", 6),
            ("invite", 7),
            ("kick", 4),
            ("votekick", 3),
            ("ban", 3),
            ("unban", 10),
            ("send_room", 30),
            ("send_direct", 10),
            ("reconnect", 5),
            ("offline", 4),
            ("online", 10),
            ("kill9", 4),
            ("new_device", 3),
            ("server_restart", 3),
            ("cut", 2),
        ];
        let total: u64 = KINDS.iter().map(|k| k.1).sum();
        let mut x = self.rng.below(total);
        let kind = KINDS
            .iter()
            .find(|(_, w)| {
                if x < *w {
                    true
                } else {
                    x -= w;
                    false
                }
            })
            .map(|k| k.0)
            .expect("a kind");
        let n_rooms = self.rooms.len();
        // (device, room) pairs where the device's user is / is not a member.
        let pairs = |w: &World, member: bool| -> Vec<(DevId, usize)> {
            online
                .iter()
                .flat_map(|&d| (0..n_rooms).map(move |r| (d, r)))
                .filter(|&(d, r)| w.member(w.devs[d].user, r) == member)
                .collect()
        };
        if self.rooms.is_empty() && kind != "create" {
            return None;
        }
        match kind {
            "create" => {
                if n_rooms >= MAX_ROOMS || online.is_empty() {
                    return None;
                }
                let dev = *self.rng.pick(online);
                let private = self.rng.chance(0.5);
                Some(Action::Create {
                    dev,
                    room: format!("r{}", n_rooms + 1),
                    private,
                })
            }
            "join" => {
                let c: Vec<_> = pairs(self, false)
                    .into_iter()
                    .filter(|&(d, r)| {
                        let (u, room) = (self.devs[d].user, &self.rooms[r]);
                        !room.blocked.contains(&u) && (!room.private || room.invited.contains(&u))
                    })
                    .collect();
                if c.is_empty() {
                    return None;
                }
                let (dev, room) = *self.rng.pick(&c);
                Some(Action::Join { dev, room })
            }
            "part" => {
                let c = pairs(self, true);
                if c.is_empty() {
                    return None;
                }
                let (dev, room) = *self.rng.pick(&c);
                Some(Action::Part { dev, room })
            }
            "invite" => {
                let c: Vec<(DevId, usize, UserId)> = pairs(self, true)
                    .into_iter()
                    .filter(|&(_, r)| self.rooms[r].private)
                    .flat_map(|(d, r)| (0..self.users.len()).map(move |u| (d, r, u)))
                    .filter(|&(_, r, u)| {
                        // A voted-out user cannot be invited back for a while (refused).
                        !self.member(u, r)
                            && !self.rooms[r].invited.contains(&u)
                            && !self.rooms[r].blocked.contains(&u)
                            && !self.users[u].banned
                    })
                    .collect();
                if c.is_empty() {
                    return None;
                }
                let (dev, room, user) = *self.rng.pick(&c);
                let devs = self.online_devices_of(user);
                let accept = if !devs.is_empty()
                    && !self.rooms[room].blocked.contains(&user)
                    && self.rng.chance(0.7)
                {
                    Some(*self.rng.pick(&devs))
                } else {
                    None
                };
                Some(Action::Invite {
                    dev,
                    room,
                    user,
                    accept,
                })
            }
            "kick" => {
                let c: Vec<(DevId, usize, UserId)> = pairs(self, true)
                    .into_iter()
                    .filter(|&(d, r)| self.rooms[r].owner == self.devs[d].user)
                    .flat_map(|(d, r)| {
                        self.rooms[r]
                            .members
                            .iter()
                            .map(move |&u| (d, r, u))
                            .collect::<Vec<_>>()
                    })
                    .filter(|&(d, _, u)| u != self.devs[d].user)
                    .collect();
                if c.is_empty() {
                    return None;
                }
                let (dev, room, user) = *self.rng.pick(&c);
                Some(Action::Kick { dev, room, user })
            }
            "votekick" => {
                let mut c = Vec::new();
                for r in 0..n_rooms {
                    for &target in &self.rooms[r].members {
                        // One online device each of two other members.
                        let voters: Vec<DevId> = self.rooms[r]
                            .members
                            .iter()
                            .filter(|&&u| u != target)
                            .filter_map(|&u| self.online_devices_of(u).first().copied())
                            .collect();
                        if voters.len() >= 2 {
                            c.push((r, target, voters));
                        }
                    }
                }
                if c.is_empty() {
                    return None;
                }
                let (room, user, voters) = self.rng.pick(&c).clone();
                let a = *self.rng.pick(&voters);
                let rest: Vec<DevId> = voters.into_iter().filter(|&v| v != a).collect();
                let b = *self.rng.pick(&rest);
                Some(Action::Votekick {
                    voters: [a, b],
                    room,
                    user,
                })
            }
            "ban" => {
                let c: Vec<UserId> = (0..self.users.len())
                    .filter(|&u| !self.users[u].banned)
                    .collect();
                if self.users.iter().filter(|u| u.banned).count() >= 2 || c.is_empty() {
                    return None;
                }
                Some(Action::Ban {
                    user: *self.rng.pick(&c),
                })
            }
            "unban" => {
                let c: Vec<UserId> = (0..self.users.len())
                    .filter(|&u| self.users[u].banned)
                    .collect();
                if c.is_empty() {
                    return None;
                }
                let user = *self.rng.pick(&c);
                let back = self.rng.chance(0.5);
                Some(Action::Unban { user, back })
            }
            "send_room" => {
                let c = pairs(self, true);
                if c.is_empty() {
                    return None;
                }
                let (dev, room) = *self.rng.pick(&c);
                let count = if self.rng.chance(0.2) { 5 } else { 1 };
                Some(Action::SendRoom { dev, room, count })
            }
            "send_direct" => {
                if online.is_empty() {
                    return None;
                }
                let dev = *self.rng.pick(online);
                let others: Vec<UserId> = (0..self.users.len())
                    .filter(|&u| u != self.devs[dev].user)
                    .collect();
                Some(Action::SendDirect {
                    dev,
                    to: *self.rng.pick(&others),
                })
            }
            "reconnect" | "offline" | "kill9" => {
                if online.len() < 2 {
                    return None;
                }
                let dev = *self.rng.pick(online);
                Some(match kind {
                    "reconnect" => Action::Reconnect { dev },
                    "offline" => Action::Offline { dev },
                    _ => Action::Kill9 { dev },
                })
            }
            "online" => {
                let c: Vec<DevId> = (0..self.devs.len())
                    .filter(|&d| {
                        let dev = &self.devs[d];
                        dev.client.is_none() && !dev.retired && !self.users[dev.user].banned
                    })
                    .collect();
                if c.is_empty() {
                    return None;
                }
                Some(Action::Online {
                    dev: *self.rng.pick(&c),
                })
            }
            "new_device" => {
                let c: Vec<UserId> = (0..self.users.len())
                    .filter(|&u| !self.users[u].banned)
                    .filter(|&u| self.live_devices_of(u).len() < MAX_DEVICES)
                    .collect();
                if c.is_empty() {
                    return None;
                }
                let user = *self.rng.pick(&c);
                let old = self.live_devices_of(user);
                let replace = if !old.is_empty() && self.rng.chance(0.5) {
                    Some(*self.rng.pick(&old))
                } else {
                    None
                };
                Some(Action::NewDevice { user, replace })
            }
            "history" => {
                if online.is_empty() {
                    return None;
                }
                let dev = *self.rng.pick(online);
                let rooms: Vec<usize> = (0..n_rooms)
                    .filter(|&r| self.member(self.devs[dev].user, r))
                    .collect();
                if !rooms.is_empty() && self.rng.chance(0.7) {
                    let room = Some(*self.rng.pick(&rooms));
                    return Some(Action::History {
                        dev,
                        room,
                        with: None,
                    });
                }
                let others: Vec<UserId> = (0..self.users.len())
                    .filter(|&u| u != self.devs[dev].user)
                    .collect();
                Some(Action::History {
                    dev,
                    room: None,
                    with: Some(*self.rng.pick(&others)),
                })
            }
            "server_restart" => Some(Action::ServerRestart),
            "cut" => Some(Action::Cut),
            other => unreachable!("kind {other}"),
        }
    }
}

// ---- running seeds -------------------------------------------------------------------------

/// What one seed's run did.
struct RunResult {
    seed: u64,
    steps: usize,
    messages: usize,
    secs: f64,
    /// The failure report (with the seed and the step list), if it failed.
    failure: Option<String>,
    notes: Vec<String>,
    kinds: BTreeMap<&'static str, usize>,
    log: Vec<String>,
}

/// Runs one seed: a world of 4–6 users and `steps` random steps, the rule checked after each.
fn run_seed(seed: u64, delay_ms: f64, steps: usize) -> RunResult {
    let log = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    type Stats = (usize, usize, Vec<String>, BTreeMap<&'static str, usize>);
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let (l, s) = (log.clone(), stats.clone());
    let outcome = panic::catch_unwind(AssertUnwindSafe(move || {
        let mut rng = Rng::new(seed ^ 0xA5A5);
        let users = 4 + rng.below(3) as usize;
        // Each user's path: a quarter to twice the setting.
        let delays: Vec<f64> = (0..users)
            .map(|_| delay_ms * (0.25 + 1.75 * rng.unit()))
            .collect();
        let mut w = World::new(seed, delay_ms, &delays, l);
        for _ in 0..steps {
            let a = w.choose();
            w.act(a);
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = w.step;
            s.1 = w.msgs.len();
            s.3 = w.kinds.clone();
        }
        w.finish();
        s.lock().unwrap_or_else(|e| e.into_inner()).2 = w.notes.clone();
    }));
    let (_, messages, notes, kinds) = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Every step started (the failing one too): the log's numbered lines.
    let steps_done = log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .count();
    let failure = outcome.err().map(|p| {
        format!(
            "LIFECYCLE FAILURE: seed {seed} (replay: LIFECYCLE_SEED={seed} LIFECYCLE_DELAY_MS={delay_ms} LIFECYCLE_STEPS={steps} cargo test -p conclave --test lifecycle random_lifecycle -- --nocapture)\nsteps:\n{}\n{}",
            log.lock().unwrap_or_else(|e| e.into_inner()).join("\n"),
            panic_text(&p)
        )
    });
    RunResult {
        seed,
        steps: steps_done,
        messages,
        secs: started.elapsed().as_secs_f64(),
        failure,
        notes,
        kinds,
        log: log.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

/// The seeds to run: `LIFECYCLE_SEED=N`, `LIFECYCLE_SEEDS=a..b` (inclusive) or `=N` (1..=N),
/// else `default`.
fn seeds(default: &[u64]) -> Vec<u64> {
    if let Some(s) = env_var("LIFECYCLE_SEED") {
        return vec![s.trim().parse().expect("LIFECYCLE_SEED is a number")];
    }
    if let Some(s) = env_var("LIFECYCLE_SEEDS") {
        let s = s.trim();
        if let Some((a, b)) = s.split_once("..") {
            let a: u64 = a.parse().expect("LIFECYCLE_SEEDS=a..b: a is a number");
            let b: u64 = b
                .trim_start_matches('=')
                .parse()
                .expect("LIFECYCLE_SEEDS=a..b: b is a number");
            return (a..=b).collect();
        }
        let n: u64 = s.parse().expect("LIFECYCLE_SEEDS is a count or a..b");
        return (1..=n).collect();
    }
    default.to_vec()
}

/// Runs the seeds and prints a summary; panics (with every failure's report) if any failed.
fn run_seeds(default_seeds: &[u64], default_delay_ms: f64, default_steps: usize) {
    let delay_ms: f64 = env_var("LIFECYCLE_DELAY_MS")
        .map(|s| s.parse().expect("LIFECYCLE_DELAY_MS is a number"))
        .unwrap_or(default_delay_ms);
    let steps: usize = env_var("LIFECYCLE_STEPS")
        .map(|s| s.parse().expect("LIFECYCLE_STEPS is a number"))
        .unwrap_or(default_steps);
    let seeds = seeds(default_seeds);
    let mut results = Vec::new();
    for &seed in &seeds {
        let r = run_seed(seed, delay_ms, steps);
        println!(
            "LIFECYCLE seed {} relay {delay_ms} ms: {} steps, {} messages, {:.1} s: {}",
            r.seed,
            r.steps,
            r.messages,
            r.secs,
            if r.failure.is_some() { "FAIL" } else { "ok" }
        );
        if env_var("LIFECYCLE_VERBOSE").is_some() {
            println!("  {}", r.log.join("\n  "));
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
        if let Some(f) = &r.failure {
            eprintln!("{f}\n");
        }
        results.push(r);
    }
    let failed: Vec<&RunResult> = results.iter().filter(|r| r.failure.is_some()).collect();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &results {
        for (k, n) in &r.kinds {
            *kinds.entry(k).or_default() += n;
        }
    }
    println!(
        "LIFECYCLE STEPS by kind: {}",
        kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "LIFECYCLE SUMMARY: relay {delay_ms} ms, {} seeds, {} steps, {} messages, {} failed{}",
        results.len(),
        results.iter().map(|r| r.steps).sum::<usize>(),
        results.iter().map(|r| r.messages).sum::<usize>(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(
                " (seeds {})",
                failed
                    .iter()
                    .map(|r| r.seed.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    );
    if !failed.is_empty() {
        let first = failed[0].failure.as_deref().unwrap_or_default();
        panic!(
            "{} of {} seeds broke the rule: {:?}; the first:\n{first}",
            failed.len(),
            results.len(),
            failed.iter().map(|r| r.seed).collect::<Vec<_>>()
        );
    }
}

/// Whether any `LIFECYCLE_*` variable is set (then only [`random_lifecycle`] runs, with them).
fn env_given() -> bool {
    [
        "LIFECYCLE_SEED",
        "LIFECYCLE_SEEDS",
        "LIFECYCLE_DELAY_MS",
        "LIFECYCLE_STEPS",
    ]
    .iter()
    .any(|v| env_var(v).is_some())
}

/// The bounded run of `cargo test`: seeds 1 to 3, 25 steps each, at 0.5 ms one way. The
/// `LIFECYCLE_*` variables override it (`scripts/lifecycle.sh` uses them; a failure prints the
/// line that replays it).
#[test]
fn random_lifecycle() {
    run_seeds(&[1, 2, 3], 0.5, 25);
}

/// The same at 5 ms one way, seeds 4 to 6; skipped when `LIFECYCLE_*` variables are set.
#[test]
fn random_lifecycle_5ms() {
    if env_given() {
        return;
    }
    run_seeds(&[4, 5, 6], 5.0, 25);
}

// ---- scripted cases ------------------------------------------------------------------------

/// A world of alice, bob, carol and dave (one device each), through a relay of `delay_ms`,
/// for a scripted case; prints the step list if it fails.
fn scripted(delay_ms: f64, case: impl FnOnce(&mut World)) {
    scripted_with(delay_ms, &[delay_ms; 4], case);
}

/// The same with alice on a slower path than the others: four times the setting, plus 1 ms.
fn scripted_slow_alice(delay_ms: f64, case: impl FnOnce(&mut World)) {
    let slow = delay_ms * 4.0 + 1.0;
    scripted_with(delay_ms, &[slow, delay_ms, delay_ms, delay_ms], case);
}

fn scripted_with(delay_ms: f64, delays_ms: &[f64], case: impl FnOnce(&mut World)) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let outcome = panic::catch_unwind(AssertUnwindSafe(move || {
        let mut w = World::new(0, delay_ms, delays_ms, l);
        case(&mut w);
        w.finish();
    }));
    if let Err(p) = outcome {
        panic!(
            "scripted case failed at relay {delay_ms} ms; steps:\n{}\n{}",
            log.lock().unwrap_or_else(|e| e.into_inner()).join("\n"),
            panic_text(&p)
        );
    }
}

const ALICE: UserId = 0;
const BOB: UserId = 1;
const CAROL: UserId = 2;
const DAVE: UserId = 3;
/// The first device of each user is its user's number.
const A1: DevId = 0;
const B1: DevId = 1;
const C1: DevId = 2;
const D1: DevId = 3;

impl World {
    fn create_room(&mut self, dev: DevId, private: bool) -> usize {
        let room = format!("r{}", self.rooms.len() + 1);
        self.act(Action::Create { dev, room, private });
        self.rooms.len() - 1
    }

    fn say(&mut self, dev: DevId, room: usize) {
        self.act(Action::SendRoom {
            dev,
            room,
            count: 1,
        });
    }

    /// Whether device `d` read a message of step `step`.
    fn read_step(&self, d: DevId, step: usize) -> bool {
        self.msgs
            .iter()
            .filter(|m| m.step == step)
            .all(|m| self.devs[d].seen_ever.contains(&m.text))
    }
}

/// (a) alice creates a room, bob joins (reply ok), alice at once sends 10 messages: bob reads
/// all 10; likewise for carol (one at a time) and dave (at once) joining after him.
fn case_join_then_burst(w: &mut World) {
    let r = w.create_room(A1, false);
    w.act(Action::Join { dev: B1, room: r });
    w.act(Action::SendRoom {
        dev: A1,
        room: r,
        count: 10,
    });
    let step = w.step;
    assert!(w.read_step(B1, step), "bob read all ten");
    // Ten more one at a time, after carol joins; and ten at once again after dave joins (the
    // race is a matter of timing: each join is another chance to lose it).
    w.act(Action::Join { dev: C1, room: r });
    for _ in 0..10 {
        w.say(A1, r);
    }
    w.act(Action::Join { dev: D1, room: r });
    w.act(Action::SendRoom {
        dev: A1,
        room: r,
        count: 10,
    });
}

/// (b) bob parts, then joins again: he reads the next messages (and nothing sent meanwhile).
fn case_part_then_rejoin(w: &mut World) {
    let r = w.create_room(A1, false);
    w.act(Action::Join { dev: B1, room: r });
    w.say(A1, r);
    w.act(Action::Part { dev: B1, room: r });
    w.say(A1, r);
    w.act(Action::Join { dev: B1, room: r });
    for _ in 0..3 {
        w.say(A1, r);
    }
    w.say(B1, r);
}

/// (c) ban then unban, with bob offline during it, and then online when banned: bob reads the
/// next messages, and his history of the room has no ciphertext rows.
fn case_ban_unban(w: &mut World) {
    let r = w.create_room(A1, false);
    w.act(Action::Join { dev: B1, room: r });
    w.act(Action::Join { dev: C1, room: r });
    w.say(A1, r);
    // Offline during the ban.
    w.act(Action::Offline { dev: B1 });
    w.act(Action::Ban { user: BOB });
    w.say(A1, r);
    w.act(Action::Unban {
        user: BOB,
        back: false,
    });
    w.act(Action::Online { dev: B1 });
    // Right after coming back, and after the next messages: never a ciphertext row.
    w.act(Action::History {
        dev: B1,
        room: Some(r),
        with: None,
    });
    w.say(A1, r);
    w.say(C1, r);
    w.act(Action::History {
        dev: B1,
        room: Some(r),
        with: None,
    });
    // Online when banned.
    w.act(Action::Ban { user: BOB });
    w.say(C1, r);
    w.act(Action::Unban {
        user: BOB,
        back: true,
    });
    w.act(Action::History {
        dev: B1,
        room: Some(r),
        with: None,
    });
    w.say(A1, r);
    w.say(B1, r);
    w.act(Action::History {
        dev: B1,
        room: Some(r),
        with: None,
    });
}

/// (d) a second device of bob (a fresh state dir): it reads room and direct messages sent
/// after it logged in; of what came before, at most one unreadable notice per conversation,
/// never ciphertext. Then a replacement device, likewise.
fn case_second_device(w: &mut World) {
    let r = w.create_room(A1, false);
    w.act(Action::Join { dev: B1, room: r });
    for _ in 0..3 {
        w.say(A1, r);
        w.act(Action::SendDirect { dev: A1, to: BOB });
    }
    w.act(Action::NewDevice {
        user: BOB,
        replace: None,
    });
    let b2 = w.devs.len() - 1;
    // Its history of what came before: nothing readable, and never ciphertext.
    w.act(Action::History {
        dev: b2,
        room: Some(r),
        with: None,
    });
    w.act(Action::History {
        dev: b2,
        room: None,
        with: Some(ALICE),
    });
    w.say(A1, r);
    w.act(Action::SendDirect { dev: A1, to: BOB });
    w.act(Action::SendDirect { dev: B1, to: ALICE });
    w.say(B1, r);
    w.act(Action::SendDirect { dev: b2, to: ALICE });
    w.say(b2, r);
    w.act(Action::History {
        dev: b2,
        room: Some(r),
        with: None,
    });
    w.act(Action::History {
        dev: b2,
        room: None,
        with: Some(ALICE),
    });
    // A replacement: bob/3 instead of bob/1.
    w.act(Action::NewDevice {
        user: BOB,
        replace: Some(B1),
    });
    w.say(A1, r);
    w.act(Action::SendDirect { dev: A1, to: BOB });
    w.say(b2, r);
}

/// Invite, leave, invite again (a private room): bob reads while a member, not between.
fn case_invite_leave_reinvite(w: &mut World) {
    let r = w.create_room(A1, true);
    w.act(Action::Invite {
        dev: A1,
        room: r,
        user: BOB,
        accept: Some(B1),
    });
    w.say(A1, r);
    w.act(Action::Part { dev: B1, room: r });
    w.say(A1, r);
    w.act(Action::Invite {
        dev: A1,
        room: r,
        user: BOB,
        accept: None,
    });
    w.say(A1, r);
    w.act(Action::Join { dev: B1, room: r });
    w.say(A1, r);
    w.say(B1, r);
}

/// Kick, ban, unban, rejoin: bob reads the next message.
fn case_kick_unban_rejoin(w: &mut World) {
    let r = w.create_room(A1, false);
    w.act(Action::Join { dev: B1, room: r });
    w.act(Action::Join { dev: C1, room: r });
    w.say(A1, r);
    w.act(Action::Kick {
        dev: A1,
        room: r,
        user: BOB,
    });
    w.say(A1, r);
    w.act(Action::Ban { user: BOB });
    w.act(Action::Unban {
        user: BOB,
        back: true,
    });
    w.act(Action::Join { dev: B1, room: r });
    w.say(A1, r);
    w.say(C1, r);
    w.say(B1, r);
}

/// A device offline across several epochs (others join and leave meanwhile) reads what was
/// sent while it was away, and the next message.
fn case_offline_across_epochs(w: &mut World) {
    let r = w.create_room(A1, false);
    w.act(Action::Join { dev: B1, room: r });
    w.say(A1, r);
    w.act(Action::Offline { dev: B1 });
    w.act(Action::Join { dev: C1, room: r });
    w.say(A1, r);
    w.act(Action::Join { dev: D1, room: r });
    w.act(Action::Part { dev: C1, room: r });
    w.say(D1, r);
    w.act(Action::Kick {
        dev: A1,
        room: r,
        user: DAVE,
    });
    w.act(Action::Join { dev: C1, room: r });
    w.say(C1, r);
    w.act(Action::Online { dev: B1 });
    w.say(A1, r);
    w.say(B1, r);
    let _ = CAROL;
}

/// One test per relay setting for each case: `CASE::ms_0`, `ms_0_5`, `ms_5`, and the ignored
/// `ms_50`.
macro_rules! at_relay_settings {
    ($($name:ident => $run:path, $case:path;)*) => {$(
        mod $name {
            #[test]
            fn ms_0() {
                $run(0.0, $case);
            }
            #[test]
            fn ms_0_5() {
                $run(0.5, $case);
            }
            #[test]
            fn ms_5() {
                $run(5.0, $case);
            }
            #[test]
            #[ignore = "slow: 50 ms one way; scripts/lifecycle.sh runs it"]
            fn ms_50() {
                $run(50.0, $case);
            }
        }
    )*};
}

at_relay_settings! {
    join_then_burst => super::scripted, super::case_join_then_burst;
    join_then_burst_slow_sender => super::scripted_slow_alice, super::case_join_then_burst;
    part_then_rejoin => super::scripted, super::case_part_then_rejoin;
    ban_unban => super::scripted, super::case_ban_unban;
    second_device => super::scripted, super::case_second_device;
    invite_leave_reinvite => super::scripted, super::case_invite_leave_reinvite;
    kick_unban_rejoin => super::scripted, super::case_kick_unban_rejoin;
    offline_across_epochs => super::scripted, super::case_offline_across_epochs;
}

// ---- the relay ---------------------------------------------------------------------------

/// An echo server on loopback: every connection gets back what it sends.
fn echo_server() -> (String, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let t = thread::spawn(move || {
        for c in l.incoming().take(8) {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, t)
}

fn connect(relay: &Relay) -> TcpStream {
    let s = TcpStream::connect(relay.addr()).expect("connect to the relay");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// A round trip through the relay takes at least twice the one-way delay.
#[test]
fn relay_delays_both_ways() {
    let (echo, _t) = echo_server();
    for ms in [0.0, 0.5, 5.0, 50.0] {
        let relay = Relay::to(&echo, ms, 7);
        let mut s = connect(&relay);
        let start = Instant::now();
        s.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("echo");
        let rtt = start.elapsed();
        assert_eq!(&buf, b"ping");
        let min = Duration::from_secs_f64(2.0 * ms / 1000.0);
        // Delay plus at most half as jitter, each way, plus scheduling.
        let max = Duration::from_secs_f64(3.0 * ms / 1000.0) + Duration::from_millis(100);
        assert!(
            rtt >= min && rtt <= max,
            "{ms} ms one way: round trip {rtt:?}"
        );
        assert_eq!(relay.accepted(), 1);
    }
}

/// Many small writes with jitter come out whole and in order.
#[test]
fn relay_keeps_order_under_jitter() {
    let (echo, _t) = echo_server();
    let relay = Relay::to(&echo, 2.0, 11);
    let mut s = connect(&relay);
    let mut reader = s.try_clone().expect("clone");
    let total = 200 * 1000;
    let r = thread::spawn(move || {
        let mut got = Vec::with_capacity(total);
        let mut buf = [0u8; 8192];
        while got.len() < total {
            let n = reader.read(&mut buf).expect("read");
            assert!(n > 0, "closed early after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let mut sent = Vec::with_capacity(total);
    for i in 0..1000u32 {
        let chunk: Vec<u8> = (0..200u32).map(|j| ((i * 7 + j) % 251) as u8).collect();
        s.write_all(&chunk).expect("write");
        sent.extend_from_slice(&chunk);
        if i % 100 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let got = r.join().expect("reader");
    assert!(got == sent, "bytes reordered or changed");
}

/// `stall` holds every byte until released; `cut_all` closes the connections, and new ones
/// are forwarded again.
#[test]
fn relay_stalls_and_cuts() {
    let (echo, _t) = echo_server();
    let relay = Relay::to(&echo, 0.0, 3);
    let mut s = connect(&relay);
    s.write_all(b"a").expect("write");
    let mut one = [0u8; 1];
    s.read_exact(&mut one).expect("echo");
    relay.stall(true);
    s.write_all(b"b").expect("write");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(s.read(&mut one).is_err(), "nothing passes while stalled");
    relay.stall(false);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.read_exact(&mut one).expect("released");
    assert_eq!(&one, b"b");
    assert_eq!(relay.open(), 1);
    assert_eq!(relay.cut_all(), 1);
    match s.read(&mut one) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("read {n} bytes after the cut"),
    }
    let mut again = connect(&relay);
    again.write_all(b"c").expect("write");
    again.read_exact(&mut one).expect("echo after the cut");
    assert_eq!(&one, b"c");
    assert_eq!(relay.accepted(), 2);
    drop(again);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.open() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(relay.open(), 0, "closed connections leave the list");
}

/// A target that is down: the connection is closed at once, and counted.
#[test]
fn relay_refuses_when_the_target_is_down() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let relay = Relay::to(&format!("127.0.0.1:{port}"), 0.5, 1);
    let mut s = connect(&relay);
    let mut one = [0u8; 1];
    match s.read(&mut one) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("read {n} bytes from nowhere"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.refused() == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(relay.refused(), 1);
}
