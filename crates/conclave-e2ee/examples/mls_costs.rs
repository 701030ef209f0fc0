//! Measures what end-to-end encryption costs in rooms of N members: joining by invite and by
//! external commit, a kick, and an application message, in time and bytes, through the real
//! code paths (`device::Device` with its SQLite state, `ds::GroupState` as the server).
//!
//! ```text
//! cargo run --release -p conclave-e2ee --example mls_costs -- \
//!     [--sizes 10,100,1000] [--reps 5] [--messages 21] [--batch 100] [--build invite,join] \
//!     [--dir PATH]
//! ```
//!
//! For each size the room is built first (not timed): N real devices, each in its own state
//! directory under `--dir` (default: the system's temporary directory). Two ways of building
//! it leave different ratchet trees, and the costs of commits depend on the tree:
//! - `invite`: the creator adds the others in batches of `--batch` key packages per commit,
//!   and every invitee joins from the Welcome. Add-only commits carry no update path, so
//!   every parent node of the tree stays blank: the state of a room right after its members
//!   were invited, and the worst case for the next commit that needs a path.
//! - `join`: the others join one after another by external commit, each with an update path,
//!   so every parent node is filled: a room that grew by joins, or one whose members have all
//!   committed since (the best case).
//!
//! Two members are measured: the *committer* (who invites, commits the kicks and sends the
//! messages) and the *watcher* (whose processing is what "a member processes" means). In an
//! `invite` room they are the creator and the first invitee, and the watcher follows every
//! commit; in a `join` room they are the last two joiners (only the server follows every
//! join). The other members go stale once built: what they would spend on a commit or a
//! message is what the watcher spends, each on its own device.
//!
//! Then, `--reps` times: a new device is invited (N → N + 1 members) and kicked (N + 1 → N),
//! another joins by external commit (N → N + 1) and is kicked (N + 1 → N); then `--messages`
//! short texts go from the committer to the watcher. Each figure is the median of its
//! samples, as wall-clock time and as the thread's CPU time. Each device operation is one
//! SQLite transaction with `synchronous = FULL`, so its wall time includes a sync.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Instant;

use conclave_e2ee::device::{Device, Processed};
use conclave_e2ee::ds::{GroupState, ServerSigner};
use conclave_e2ee::payload::Payload;
use tempfile::TempDir;

const PASSWORD: &str = "bench-password";
/// The short text of the message rows.
const TEXT: &str = "lunch at 12:30?";
/// Bounds on the run.
const MAX_SIZE: usize = 5_000;
const MAX_SIZES: usize = 8;
const MAX_REPS: usize = 50;
const MAX_MESSAGES: usize = 1_000;
const MAX_BATCH: usize = 1_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    Invite,
    Join,
}

impl Build {
    fn name(self) -> &'static str {
        match self {
            Build::Invite => "invite",
            Build::Join => "join",
        }
    }
}

struct Args {
    sizes: Vec<usize>,
    reps: usize,
    messages: usize,
    batch: usize,
    builds: Vec<Build>,
    dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sizes: vec![10, 100, 1000],
        reps: 5,
        messages: 21,
        batch: 100,
        builds: vec![Build::Invite, Build::Join],
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--sizes" => {
                args.sizes = value
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--reps" => args.reps = value.parse().map_err(|e| bad(&e))?,
            "--messages" => args.messages = value.parse().map_err(|e| bad(&e))?,
            "--batch" => args.batch = value.parse().map_err(|e| bad(&e))?,
            "--build" => {
                args.builds = value
                    .split(',')
                    .map(|b| match b.trim() {
                        "invite" => Ok(Build::Invite),
                        "join" => Ok(Build::Join),
                        other => Err(format!("--build {other:?}: invite or join")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--dir" => args.dir = PathBuf::from(value),
            other => return Err(format!("unknown option {other}; see the example's header")),
        }
    }
    if args.sizes.is_empty()
        || args.sizes.len() > MAX_SIZES
        || args.sizes.iter().any(|&n| !(2..=MAX_SIZE).contains(&n))
    {
        return Err(format!(
            "--sizes: 1 to {MAX_SIZES} sizes, each 2 to {MAX_SIZE}"
        ));
    }
    if !(1..=MAX_REPS).contains(&args.reps) {
        return Err(format!("--reps: 1 to {MAX_REPS}"));
    }
    if !(1..=MAX_MESSAGES).contains(&args.messages) {
        return Err(format!("--messages: 1 to {MAX_MESSAGES}"));
    }
    if !(1..=MAX_BATCH).contains(&args.batch) {
        return Err(format!("--batch: 1 to {MAX_BATCH}"));
    }
    let repeated = args.builds.len() == 2 && args.builds[0] == args.builds[1];
    if args.builds.is_empty() || args.builds.len() > 2 || repeated {
        return Err("--build: invite, join or both (each once)".to_string());
    }
    Ok(args)
}

/// Adds what was being done to an error.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> Option<u64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (rc == 0).then(|| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// What one operation cost: wall-clock time, and CPU time of this thread (without the waits
/// for the disk), in milliseconds.
#[derive(Clone, Copy)]
struct Cost {
    wall_ms: f64,
    cpu_ms: Option<f64>,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost {
            wall_ms: self.wall_ms + other.wall_ms,
            cpu_ms: self.cpu_ms.zip(other.cpu_ms).map(|(a, b)| a + b),
        }
    }
}

/// Runs `f`, returning its result and what it cost.
fn timed<R>(f: impl FnOnce() -> R) -> (R, Cost) {
    let cpu_before = thread_cpu_ns();
    let start = Instant::now();
    let r = f();
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let cpu_ms = match (cpu_before, thread_cpu_ns()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6),
        _ => None,
    };
    (r, Cost { wall_ms, cpu_ms })
}

/// Samples by metric: milliseconds for times, counts for bytes.
#[derive(Default)]
struct Samples(BTreeMap<String, Vec<f64>>);

impl Samples {
    fn bytes(&mut self, metric: &str, n: usize) {
        self.0.entry(metric.to_string()).or_default().push(n as f64);
    }

    fn time(&mut self, metric: &str, cost: Cost) {
        self.0
            .entry(format!("{metric}.wall"))
            .or_default()
            .push(cost.wall_ms);
        if let Some(cpu) = cost.cpu_ms {
            self.0.entry(format!("{metric}.cpu")).or_default().push(cpu);
        }
    }

    fn median(&self, metric: &str) -> Option<f64> {
        let mut v = self.0.get(metric)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

/// One device and the directory that holds its state (deleted after the device closed: fields
/// drop in order).
struct Member {
    device: Device,
    _dir: TempDir,
}

fn open_member(root: &Path, user: &str) -> Result<Member, String> {
    let dir = tempfile::Builder::new()
        .prefix("mls-costs-")
        .tempdir_in(root)
        .ctx("a temporary state directory")?;
    let device = Device::open(dir.path(), user, PASSWORD).ctx(user)?;
    Ok(Member { device, _dir: dir })
}

/// Resident memory of this process in MiB (Linux `/proc/self/statm`), to watch the run's size.
fn rss_mib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096 / (1024 * 1024)
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Opens devices for `users` on every core (each derives its history key with Argon2), each
/// with one key package.
fn open_members(root: &Path, users: &[String]) -> Result<Vec<(Member, Vec<u8>)>, String> {
    let chunk = users.len().div_ceil(threads()).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|u| {
                            let m = open_member(root, u)?;
                            let kp = m.device.key_packages(1).ctx("key package")?;
                            let kp = kp.into_iter().next().ok_or("no key package")?;
                            Ok((m, kp))
                        })
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(users.len());
        for h in handles {
            out.extend(h.join().map_err(|_| "a device thread panicked")??);
        }
        Ok(out)
    })
}

/// Members join from a Welcome, on every core.
fn join_all(members: &mut [Member], conv: &str, welcome: &[u8], seq: u64) -> Result<(), String> {
    let chunk = members.len().div_ceil(threads()).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = members
            .chunks_mut(chunk)
            .map(|part| {
                s.spawn(move || {
                    for m in part.iter() {
                        m.device
                            .join_welcome(conv, welcome, seq)
                            .ctx("join from the Welcome")?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a join thread panicked")??;
        }
        Ok(())
    })
}

fn expect_commit(p: Processed, what: &str) -> Result<(), String> {
    match p {
        Processed::Commit { .. } => Ok(()),
        other => Err(format!("{what}: expected a commit, got {other:?}")),
    }
}

/// One room (one conversation of the size's devices): the server's state and log position,
/// and the two devices that are measured.
struct Room<'a> {
    root: &'a Path,
    conv: String,
    server: ServerSigner,
    state: GroupState,
    /// Sequence number of the last entry of the conversation's log.
    seq: u64,
    /// The newest GroupInfo (with the ratchet tree): what an external joiner downloads.
    group_info: Vec<u8>,
    /// The member who invites, commits the kicks and sends the messages.
    committer: &'a Device,
    /// The member whose processing is measured.
    watcher: &'a Device,
    /// Devices that joined during the measurements, kept until the room goes.
    guests: Vec<Member>,
}

impl<'a> Room<'a> {
    /// Builds a room of all of `members` (not timed); `members[0]` creates it.
    /// `key_packages[i]` is `members[i]`'s, for invitations.
    fn build(
        root: &'a Path,
        members: &'a mut [Member],
        key_packages: &[Vec<u8>],
        how: Build,
        batch: usize,
    ) -> Result<Room<'a>, String> {
        let n = members.len();
        let start = Instant::now();
        let room = match how {
            Build::Invite => {
                let (head, rest) = members.split_at_mut(2);
                let [creator, watcher] = head else {
                    return Err("a room needs at least two members".into());
                };
                let mut room = Room::create(root, how, &creator.device)?;
                room.watcher = &watcher.device;
                room.build_by_invites(rest, key_packages, batch)?;
                room
            }
            Build::Join => {
                let members: &'a [Member] = members;
                let mut room = Room::create(root, how, &members[0].device)?;
                room.build_by_joins(&members[1..])?;
                room
            }
        };
        eprintln!(
            "  room of {n} built by {} in {:.1} s ({} MiB resident)",
            how.name(),
            start.elapsed().as_secs_f64(),
            rss_mib()
        );
        let members = room.committer.members(&room.conv).ctx("members")?.len();
        let server_members = room.state.members().ctx("server members")?.len();
        if members != n || server_members != n {
            return Err(format!(
                "built {members} members ({server_members} for the server), not {n}"
            ));
        }
        Ok(room)
    }

    /// `creator` creates the room's group and the server follows it.
    fn create(root: &'a Path, how: Build, creator: &'a Device) -> Result<Room<'a>, String> {
        let conv = format!("r:{}", how.name());
        let server = ServerSigner::generate().ctx("server key")?;
        let gi = creator.create_group(&conv, server.public()).ctx("create")?;
        let state =
            GroupState::create(&gi, creator.user(), server.public()).ctx("server follows")?;
        Ok(Room {
            root,
            conv,
            server,
            state,
            seq: 0,
            group_info: gi,
            committer: creator,
            watcher: creator,
            guests: Vec::new(),
        })
    }

    /// Accepts a commit as the next entry of the log, once the server validated it.
    fn validate(&mut self, commit: &[u8], author: &str) -> Result<(u64, Cost), String> {
        let (v, cost) = timed(|| self.state.validate_commit(commit, author));
        self.state = v.ctx("the server refused a commit")?.into_state();
        self.seq += 1;
        Ok((self.seq, cost))
    }

    /// The creator adds the watcher alone, then the `rest` in batches; everyone joins from
    /// the Welcomes, and the watcher follows the later commits.
    fn build_by_invites(
        &mut self,
        rest: &mut [Member],
        key_packages: &[Vec<u8>],
        batch: usize,
    ) -> Result<(), String> {
        let conv = self.conv.clone();
        let creator = self.committer.user().to_string();
        let mut from = 1;
        let mut others = Some(rest);
        while from < key_packages.len() {
            let to = if from == 1 {
                2
            } else {
                (from + batch).min(key_packages.len())
            };
            let out = self
                .committer
                .add_members(&conv, &key_packages[from..to])
                .ctx("add")?;
            let (seq, _) = self.validate(&out.commit, &creator)?;
            self.committer.confirm(&conv, seq).ctx("confirm")?;
            let welcome = out.welcome.ok_or("an add without a Welcome")?;
            if from == 1 {
                self.watcher
                    .join_welcome(&conv, &welcome, seq)
                    .ctx("the watcher joins")?;
            } else {
                let p = self.watcher.process(&conv, seq, &creator, 0, &out.commit);
                expect_commit(p.ctx("the watcher processes")?, "the watcher")?;
                let (now, later) = others.take().unwrap_or_default().split_at_mut(to - from);
                join_all(now, &conv, &welcome, seq)?;
                others = Some(later);
            }
            self.group_info = out.group_info;
            from = to;
        }
        Ok(())
    }

    /// The `joiners` join by external commit one after another, each with the GroupInfo of
    /// the commit before. Only the server follows every join; the last joiner becomes the
    /// committer, and the one before it (which processes the last join) the watcher.
    fn build_by_joins(&mut self, joiners: &'a [Member]) -> Result<(), String> {
        let conv = self.conv.clone();
        let mut previous = self.committer;
        for (i, m) in joiners.iter().enumerate() {
            let joiner = &m.device;
            let user = joiner.user().to_string();
            let out = joiner
                .join_external(&conv, &self.group_info)
                .ctx("external join")?;
            let (seq, _) = self.validate(&out.commit, &user)?;
            joiner.confirm_join(&conv, seq).ctx("confirm join")?;
            if i + 1 == joiners.len() {
                let p = previous.process(&conv, seq, &user, 0, &out.commit);
                expect_commit(p.ctx("the watcher processes")?, "the watcher")?;
                self.watcher = previous;
                self.committer = joiner;
            }
            previous = joiner;
            self.group_info = out.group_info;
        }
        Ok(())
    }

    fn guest(&mut self) -> Result<Member, String> {
        open_member(self.root, &format!("g{}", self.guests.len() + 1))
    }

    /// A new device is invited by the committer; returns its user.
    fn invite(&mut self, s: &mut Samples) -> Result<String, String> {
        let conv = self.conv.clone();
        let me = self.committer.user().to_string();
        let guest = self.guest()?;
        let user = guest.device.user().to_string();
        let kp = guest.device.key_packages(1).ctx("key package")?;
        let (out, cost) = timed(|| self.committer.add_members(&conv, &kp));
        let out = out.ctx("add")?;
        s.time("invite.build", cost);
        s.bytes("invite.commit_bytes", out.commit.len());
        let welcome = out.welcome.ok_or("an add without a Welcome")?;
        s.bytes("invite.welcome_bytes", welcome.len());
        let (seq, cost) = self.validate(&out.commit, &me)?;
        s.time("invite.server", cost);
        let (state, cost) = timed(|| self.state.to_bytes());
        state.ctx("server state")?;
        s.time("invite.server_store", cost);
        let (r, cost) = timed(|| self.committer.confirm(&conv, seq));
        r.ctx("confirm")?;
        s.time("invite.confirm", cost);
        let (p, cost) = timed(|| self.watcher.process(&conv, seq, &me, 0, &out.commit));
        expect_commit(p.ctx("the watcher processes")?, "the watcher")?;
        s.time("invite.member", cost);
        let (r, cost) = timed(|| guest.device.join_welcome(&conv, &welcome, seq));
        r.ctx("the guest joins")?;
        s.time("invite.welcome", cost);
        self.group_info = out.group_info;
        self.guests.push(guest);
        Ok(user)
    }

    /// A new device joins by external commit with the newest GroupInfo; returns its user.
    fn join(&mut self, s: &mut Samples) -> Result<String, String> {
        let conv = self.conv.clone();
        let guest = self.guest()?;
        let user = guest.device.user().to_string();
        s.bytes("join.group_info_bytes", self.group_info.len());
        let (out, cost) = timed(|| guest.device.join_external(&conv, &self.group_info));
        let out = out.ctx("external join")?;
        s.time("join.build", cost);
        s.bytes("join.commit_bytes", out.commit.len());
        let (seq, cost) = self.validate(&out.commit, &user)?;
        s.time("join.server", cost);
        let (r, cost) = timed(|| guest.device.confirm_join(&conv, seq));
        r.ctx("confirm join")?;
        s.time("join.confirm", cost);
        let (p, cost) = timed(|| self.watcher.process(&conv, seq, &user, 0, &out.commit));
        expect_commit(p.ctx("the watcher processes")?, "the watcher")?;
        s.time("join.member", cost);
        let p = self.committer.process(&conv, seq, &user, 0, &out.commit);
        expect_commit(p.ctx("the committer processes")?, "the committer")?;
        self.group_info = out.group_info;
        self.guests.push(guest);
        Ok(user)
    }

    /// The server proposes the removal of `user`'s devices and the committer commits it.
    fn kick(&mut self, user: &str, s: &mut Samples) -> Result<(), String> {
        let conv = self.conv.clone();
        let me = self.committer.user().to_string();
        let (props, cost) = timed(|| self.state.remove_proposals(&self.server, user));
        let props = props.ctx("remove proposals")?;
        s.time("kick.propose", cost);
        s.bytes(
            "kick.proposal_bytes",
            props.iter().map(Vec::len).sum::<usize>(),
        );
        let mut member = Cost {
            wall_ms: 0.0,
            cpu_ms: Some(0.0),
        };
        for p in &props {
            self.seq += 1;
            let seq = self.seq;
            let got = self.committer.process(&conv, seq, "", 0, p);
            if !matches!(
                got.ctx("the committer processes the proposal")?,
                Processed::Proposal
            ) {
                return Err("the committer did not queue the proposal".into());
            }
            let (got, cost) = timed(|| self.watcher.process(&conv, seq, "", 0, p));
            if !matches!(
                got.ctx("the watcher processes the proposal")?,
                Processed::Proposal
            ) {
                return Err("the watcher did not queue the proposal".into());
            }
            s.time("kick.member_proposal", cost);
            member = member + cost;
        }
        let (out, cost) = timed(|| self.committer.commit_pending(&conv));
        let out = out.ctx("commit the removal")?.ok_or("nothing pending")?;
        s.time("kick.build", cost);
        s.bytes("kick.commit_bytes", out.commit.len());
        let (seq, cost) = self.validate(&out.commit, &me)?;
        s.time("kick.server", cost);
        let (r, cost) = timed(|| self.committer.confirm(&conv, seq));
        r.ctx("confirm")?;
        s.time("kick.confirm", cost);
        let (p, cost) = timed(|| self.watcher.process(&conv, seq, &me, 0, &out.commit));
        expect_commit(p.ctx("the watcher processes")?, "the watcher")?;
        s.time("kick.member_commit", cost);
        s.time("kick.member_total", member + cost);
        self.group_info = out.group_info;
        Ok(())
    }

    /// The committer sends a short text; the server checks it; the watcher decrypts it.
    fn message(&mut self, s: &mut Samples) -> Result<(), String> {
        let conv = self.conv.clone();
        let me = self.committer.user().to_string();
        let payload = Payload::Body {
            content_type: "text/plain".into(),
            data: TEXT.as_bytes().to_vec(),
        };
        let (m, cost) = timed(|| self.committer.encrypt(&conv, &payload));
        let m = m.ctx("encrypt")?;
        s.time("msg.encrypt", cost);
        s.bytes("msg.ciphertext_bytes", m.len());
        let min_epoch = self.state.epoch().ctx("epoch")?;
        let (r, cost) = timed(|| self.state.check_app(&m, min_epoch, min_epoch));
        r.ctx("server checks the message")?;
        s.time("msg.server", cost);
        self.seq += 1;
        let seq = self.seq;
        let (p, cost) = timed(|| self.watcher.process(&conv, seq, &me, 0, &m));
        s.time("msg.decrypt", cost);
        match p.ctx("the watcher decrypts")? {
            Processed::App {
                payload: Payload::Body { data, .. },
                ..
            } if data == TEXT.as_bytes() => Ok(()),
            other => Err(format!("the watcher read {other:?}, not the text")),
        }
    }
}

/// The cost of one small durable SQLite transaction in the same place: the floor under every
/// device operation.
fn sync_floor(root: &Path, reps: usize) -> Result<Samples, String> {
    let dir = tempfile::tempdir_in(root).ctx("a temporary directory")?;
    let conn = rusqlite::Connection::open(dir.path().join("floor.db")).ctx("sqlite")?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER);",
    )
    .ctx("sqlite")?;
    let mut s = Samples::default();
    for i in 0..reps {
        let (r, cost) = timed(|| {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; INSERT OR REPLACE INTO t VALUES (1, {i}); COMMIT;"
            ))
        });
        r.ctx("sqlite")?;
        s.time("floor", cost);
    }
    Ok(s)
}

/// The rows of a table: (metric, label); a metric ending in `_bytes` is a size, any other a
/// time; an empty metric is a heading.
const ROWS: &[(&str, &str)] = &[
    ("", "**Join by invite** (N → N + 1)"),
    ("invite.build", "inviter builds the add commit and Welcome"),
    ("invite.commit_bytes", "add commit"),
    ("invite.welcome_bytes", "Welcome"),
    ("invite.server", "server validates the commit"),
    ("invite.server_store", "server serialises the new state"),
    ("invite.confirm", "inviter merges it once accepted"),
    ("invite.member", "a member processes the commit"),
    ("invite.welcome", "the newcomer joins from the Welcome"),
    ("", "**Join by external commit** (N → N + 1)"),
    (
        "join.group_info_bytes",
        "GroupInfo with ratchet tree (downloaded)",
    ),
    ("join.build", "joiner builds the external commit"),
    ("join.commit_bytes", "external commit"),
    ("join.server", "server validates the commit"),
    ("join.confirm", "joiner merges it once accepted"),
    ("join.member", "a member processes the commit"),
    ("", "**Kick** (N + 1 → N)"),
    ("kick.propose", "server signs the Remove proposal"),
    ("kick.proposal_bytes", "Remove proposal"),
    ("kick.member_proposal", "a member processes the proposal"),
    ("kick.build", "a member builds the commit"),
    ("kick.commit_bytes", "commit"),
    ("kick.server", "server validates the commit"),
    ("kick.confirm", "committer merges it once accepted"),
    ("kick.member_commit", "another member processes the commit"),
    (
        "kick.member_total",
        "that member in all (proposal and commit)",
    ),
    ("", "**Message** (a 15-byte text)"),
    ("msg.encrypt", "sender encrypts"),
    ("msg.ciphertext_bytes", "ciphertext"),
    ("msg.server", "server checks group and epoch"),
    ("msg.decrypt", "a member decrypts it (and stores it sealed)"),
    ("", "**Room**"),
    ("room.state_bytes", "server's stored group state"),
];

fn fmt_bytes(v: f64) -> String {
    let digits = (v.round() as u64).to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out} B")
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: &Samples, metric: &str) -> String {
    if metric.is_empty() {
        return String::new();
    }
    if metric.ends_with("_bytes") {
        return s.median(metric).map(fmt_bytes).unwrap_or_default();
    }
    match (
        s.median(&format!("{metric}.wall")),
        s.median(&format!("{metric}.cpu")),
    ) {
        (Some(w), Some(c)) => format!("{} / {}", fmt_ms(w), fmt_ms(c)),
        (Some(w), None) => fmt_ms(w),
        _ => String::new(),
    }
}

fn table(sizes: &[usize], results: &[Samples]) -> String {
    let mut out = String::from("| times in ms: wall / CPU |");
    for n in sizes {
        out.push_str(&format!(" N = {n} |"));
    }
    out.push_str("\n|---|");
    for _ in sizes {
        out.push_str("---:|");
    }
    out.push('\n');
    for (metric, label) in ROWS {
        out.push_str(&format!("| {label} |"));
        for s in results {
            out.push_str(&format!(" {} |", cell(s, metric)));
        }
        out.push('\n');
    }
    out
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let floor = sync_floor(&args.dir, 21)?;
    let floor = cell(&floor, "floor");
    eprintln!("one small durable SQLite transaction here: {floor} ms (wall / CPU, median of 21)");
    let run_start = Instant::now();
    let mut results: Vec<Vec<Samples>> = args.builds.iter().map(|_| Vec::new()).collect();
    for &n in &args.sizes {
        let users: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let (opened, cost) = timed(|| open_members(&args.dir, &users));
        let (mut members, key_packages): (Vec<Member>, Vec<Vec<u8>>) = opened?.into_iter().unzip();
        eprintln!(
            "N = {n}: {n} devices opened in {:.1} s (Argon2 for each history key; {} MiB resident)",
            cost.wall_ms / 1e3,
            rss_mib()
        );
        for (b, &how) in args.builds.iter().enumerate() {
            let mut room = Room::build(&args.dir, &mut members, &key_packages, how, args.batch)?;
            let mut s = Samples::default();
            let start = Instant::now();
            for _ in 0..args.reps {
                let invited = room.invite(&mut s)?;
                room.kick(&invited, &mut s)?;
                let joined = room.join(&mut s)?;
                room.kick(&joined, &mut s)?;
            }
            for _ in 0..args.messages {
                room.message(&mut s)?;
            }
            s.bytes(
                "room.state_bytes",
                room.state.to_bytes().ctx("server state")?.len(),
            );
            eprintln!("  measured in {:.1} s", start.elapsed().as_secs_f64());
            results[b].push(s);
        }
    }
    println!(
        "Medians of {} joins of each kind, {} kicks and {} messages per room; \
         one small durable SQLite transaction: {floor} ms (wall / CPU); \
         the whole run took {:.0} s.\n",
        args.reps,
        2 * args.reps,
        args.messages,
        run_start.elapsed().as_secs_f64()
    );
    for (how, r) in args.builds.iter().zip(&results) {
        let what = match how {
            Build::Invite => "Room built by invitations (every parent node of the tree blank)",
            Build::Join => "Room built by external joins (every parent node filled)",
        };
        println!("#### {what}\n\n{}", table(&args.sizes, r));
    }
    Ok(())
}

fn main() {
    // Every device derives its history key with Argon2 (19 MiB of memory, freed after). With
    // glibc's dynamic mmap threshold those buffers come from the heap after the first, and
    // the small allocations of the next device's SQLite connection land in them, so a process
    // opening 1,000 devices grew by about 15 MiB per device (15 GB). A fixed threshold keeps such
    // buffers in their own mappings, returned when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's policy; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    if let Err(e) = run() {
        eprintln!("mls_costs: {e}");
        std::process::exit(1);
    }
}
