//! The tamper-evident audit log: who connected from where, who logged in or failed to, joins,
//! kicks, bans, votes, limits hit, admin actions, as hash-chained JSON lines in
//! `DATA_DIR/audit/`.
//!
//! Each record is one line of canonical JSON (keys sorted) carrying `seq`, one more than the
//! record before it, `prev`, the hash of the record before it, and `hash`, the SHA-256 of `prev`'s
//! 32 bytes followed by the record's canonical JSON without `hash`. Editing, removing, inserting
//! or reordering a record breaks the chain at that line, and [`verify`] says where. What the chain
//! cannot prove on its own: that nobody with write access rewrote everything from some point on,
//! or cut records off the end. Copying the newest `hash` somewhere else now and then (a ticket, a
//! second machine) anchors everything before it.
//!
//! **Message text is never logged.** There is no field for it, and callers must not put it (or
//! passwords, keys, invite codes) in `reason` or in the extra fields.
//!
//! Recording never blocks and never fails: [`AuditLog::record`] puts the event on a bounded
//! channel to a writer thread. If the channel is full the event is dropped and counted, and an
//! `audit_dropped` record with the count is written once there is room again, so a flood can
//! cost records but never stalls the server and never hides that records were lost.
//!
//! Files: `audit.log` is written to; past [`AuditConfig::max_file_bytes`] it is renamed
//! `audit-<first seq, 12 digits>.log` and a new `audit.log` continues the chain. At most
//! [`AuditConfig::keep_files`] renamed files are kept. The directory is 0700, the files 0600.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::fsutil;

/// The audit log's folder inside the data directory.
pub const AUDIT_DIR: &str = "audit";
/// The file being written.
pub const CURRENT_FILE: &str = "audit.log";
/// Held locked (`flock`) by the one process writing the log.
pub const LOCK_FILE: &str = "audit.lock";
/// `prev` of the very first record: the chain's genesis.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest line a reader accepts; longer ones are reported, not loaded. Records written here
/// stay far below it (see [`MAX_TEXT_CHARS`] and [`MAX_EXTRA_BYTES`]).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// `user`, `room` and `reason` are cut to this many characters.
pub const MAX_TEXT_CHARS: usize = 1024;
/// Extra fields whose JSON is longer than this are replaced by `{"extra_truncated_bytes": N}`.
pub const MAX_EXTRA_BYTES: usize = 8 * 1024;
/// Unsynced writes are fsynced at most this long after they were written.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Records taken off the channel per write to the OS.
const WRITE_BATCH: usize = 1024;
/// How much of a file's end is read to find its last record when opening.
const TAIL_WINDOW_BYTES: u64 = 4 * MAX_LINE_BYTES as u64;
/// After a failed rotation, the next attempt waits this long.
const ROTATE_RETRY: Duration = Duration::from_secs(60);
/// [`verify`] lists at most this many problems (and then says how many more there were).
pub const MAX_PROBLEMS: usize = 1000;
/// Field names the record itself uses; extra fields with these names get an `x_` prefix.
const RESERVED_KEYS: [&str; 10] = [
    "seq", "ts", "kind", "ip", "port", "user", "room", "reason", "prev", "hash",
];

/// The audit log's tunables.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `audit.log` is rotated before a record would take it past this size.
    pub max_file_bytes: u64,
    /// Rotated files kept; the oldest beyond this are deleted (and the chain then starts at a
    /// later record: [`VerifyReport::anchored`] becomes false).
    pub keep_files: usize,
    /// Records waiting for the writer thread; more are dropped and counted.
    pub queue_records: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_file_bytes: 16 * 1024 * 1024,
            keep_files: 20,
            queue_records: 65_536,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error(
        "the audit log in {} is being written by another process (another conclave server on this data directory?)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("not an audit record: {0}")]
    BadRecord(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |error| AuditError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What happened. Stored as its snake_case name (`login_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Start,
    Stop,
    Connect,
    Disconnect,
    LoginOk,
    LoginFailed,
    Register,
    Join,
    Part,
    Kick,
    Ban,
    Unban,
    Vote,
    VoteResult,
    Limit,
    IpRejected,
    Admin,
    /// A notice to everyone online (never its text).
    Announce,
    Reload,
    Error,
    Alert,
    AuditDropped,
    AuditRecovered,
    /// A message deleted by someone other than its author (never its text).
    MessageDeleted,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Kind; 24] = [
        Kind::Start,
        Kind::Stop,
        Kind::Connect,
        Kind::Disconnect,
        Kind::LoginOk,
        Kind::LoginFailed,
        Kind::Register,
        Kind::Join,
        Kind::Part,
        Kind::Kick,
        Kind::Ban,
        Kind::Unban,
        Kind::Vote,
        Kind::VoteResult,
        Kind::Limit,
        Kind::IpRejected,
        Kind::Admin,
        Kind::Announce,
        Kind::Reload,
        Kind::Error,
        Kind::Alert,
        Kind::AuditDropped,
        Kind::AuditRecovered,
        Kind::MessageDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Stop => "stop",
            Kind::Connect => "connect",
            Kind::Disconnect => "disconnect",
            Kind::LoginOk => "login_ok",
            Kind::LoginFailed => "login_failed",
            Kind::Register => "register",
            Kind::Join => "join",
            Kind::Part => "part",
            Kind::Kick => "kick",
            Kind::Ban => "ban",
            Kind::Unban => "unban",
            Kind::Vote => "vote",
            Kind::VoteResult => "vote_result",
            Kind::Limit => "limit",
            Kind::IpRejected => "ip_rejected",
            Kind::Admin => "admin",
            Kind::Announce => "announce",
            Kind::Reload => "reload",
            Kind::Error => "error",
            Kind::Alert => "alert",
            Kind::AuditDropped => "audit_dropped",
            Kind::AuditRecovered => "audit_recovered",
            Kind::MessageDeleted => "message_deleted",
        }
    }

    /// The kind named `s` (its stored name, case-insensitive; `-` may stand for `_`).
    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The details of an event. Absent fields are left out of the record.
///
/// Never put message text, passwords, keys or invite codes here.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub room: Option<String>,
    pub reason: Option<String>,
    /// Anything else (`count`, `by`, `limit`, ...). Keys that clash with the record's own
    /// fields (`seq`, `ts`, `kind`, `ip`, ...) are stored with an `x_` prefix.
    pub extra: Map<String, Value>,
}

impl Fields {
    pub fn new() -> Self {
        Fields::default()
    }

    /// The peer's address and port. An IPv4-mapped IPv6 address (`::ffff:203.0.113.7`, as a
    /// dual-stack socket reports IPv4 peers) is stored as the IPv4 address, so IPv4 filters
    /// match it.
    pub fn ip(mut self, addr: SocketAddr) -> Self {
        self.ip = Some(addr.ip().to_canonical());
        self.port = Some(addr.port());
        self
    }

    /// An address without a port (an IP rule, a ban).
    pub fn ip_addr(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip.to_canonical());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn room(mut self, room: impl Into<String>) -> Self {
        self.room = Some(room.into());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// An extra field. A value that cannot be represented as JSON is stored as a string saying
    /// so (recording never fails).
    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        let value = serde_json::to_value(value)
            .unwrap_or_else(|e| Value::String(format!("(not representable: {e})")));
        let key = if RESERVED_KEYS.contains(&key) {
            format!("x_{key}")
        } else {
            key.to_string()
        };
        self.extra.insert(key, value);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Canonical JSON and the chain
// ---------------------------------------------------------------------------------------------

/// Writes `value` as canonical JSON: no whitespace, object keys sorted (recursively), strings and
/// numbers as serde_json writes them. Independent of serde_json's `preserve_order` feature.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_json_scalar(scalar, out),
    }
}

fn write_json_scalar(value: &Value, out: &mut Vec<u8>) {
    // Writing a scalar `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

fn canonical_map(map: &BTreeMap<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_scalar(&Value::String(k.clone()), &mut out);
        out.push(b':');
        write_canonical(v, &mut out);
    }
    out.push(b'}');
    out
}

/// `SHA-256(prev || body)`.
fn chain_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(&h.finalize());
    out
}

fn decode_hash(hex_str: &str) -> Option<[u8; 32]> {
    if hex_str.len() != 64 || hex_str.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).ok()?;
    Some(out)
}

fn truncate_chars(s: &str) -> String {
    match s.char_indices().nth(MAX_TEXT_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// The position in the chain after some record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chain {
    next_seq: u64,
    prev: [u8; 32],
}

impl Chain {
    const GENESIS: Chain = Chain {
        next_seq: 1,
        prev: [0; 32],
    };
}

/// Builds the line (without its newline) for the record at `chain`; returns it and its hash.
fn build_line(
    chain: Chain,
    ts: jiff::Timestamp,
    kind: Kind,
    fields: &Fields,
) -> (Vec<u8>, [u8; 32]) {
    let mut m: BTreeMap<String, Value> = BTreeMap::new();
    let mut extra_json = Vec::new();
    write_canonical(&Value::Object(fields.extra.clone()), &mut extra_json);
    if extra_json.len() > MAX_EXTRA_BYTES {
        m.insert(
            "extra_truncated_bytes".to_string(),
            Value::from(extra_json.len()),
        );
    } else {
        m.extend(fields.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    m.insert("seq".into(), Value::from(chain.next_seq));
    m.insert("ts".into(), Value::String(format!("{ts:.3}")));
    m.insert("kind".into(), Value::String(kind.as_str().into()));
    if let Some(ip) = fields.ip {
        m.insert("ip".into(), Value::String(ip.to_string()));
    }
    if let Some(port) = fields.port {
        m.insert("port".into(), Value::from(port));
    }
    for (key, value) in [
        ("user", &fields.user),
        ("room", &fields.room),
        ("reason", &fields.reason),
    ] {
        if let Some(v) = value {
            m.insert(key.into(), Value::String(truncate_chars(v)));
        }
    }
    m.insert("prev".into(), Value::String(hex::encode(chain.prev)));
    let hash = chain_hash(&chain.prev, &canonical_map(&m));
    m.insert("hash".into(), Value::String(hex::encode(hash)));
    (canonical_map(&m), hash)
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// One parsed record.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub ts: jiff::Timestamp,
    /// The kind's stored name (a newer server may write kinds this one does not know).
    pub kind: String,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub room: Option<String>,
    pub reason: Option<String>,
    /// Every other field, except `prev` and `hash`.
    pub extra: Map<String, Value>,
    /// The previous record's hash (hex).
    pub prev: String,
    /// This record's hash (hex).
    pub hash: String,
    /// The line exactly as stored, without its newline.
    pub raw: String,
}

impl Record {
    /// The kind, if this version knows it.
    pub fn known_kind(&self) -> Option<Kind> {
        Kind::parse(&self.kind)
    }
}

fn bad(what: impl Into<String>) -> AuditError {
    AuditError::BadRecord(what.into())
}

fn take_string(m: &mut Map<String, Value>, key: &str) -> Result<Option<String>, AuditError> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("\"{key}\" is not a string"))),
    }
}

/// Parses a line; also returns the whole object (for re-serialising and hashing).
fn decode(line: &str) -> Result<(Map<String, Value>, Record), AuditError> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let Value::Object(all) = value else {
        return Err(bad("not a JSON object"));
    };
    let mut m = all.clone();
    let seq = m
        .remove("seq")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("\"seq\" is missing or not a whole number"))?;
    let ts_text = take_string(&mut m, "ts")?.ok_or_else(|| bad("\"ts\" is missing"))?;
    let ts: jiff::Timestamp = ts_text
        .parse()
        .map_err(|e| bad(format!("\"ts\" {ts_text:?} is not a timestamp ({e})")))?;
    let kind = take_string(&mut m, "kind")?.ok_or_else(|| bad("\"kind\" is missing"))?;
    let ip = match take_string(&mut m, "ip")? {
        None => None,
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| bad(format!("\"ip\" {s:?} is not an IP address")))?,
        ),
    };
    let port = match m.remove("port") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| bad("\"port\" is not a port number"))?,
        ),
    };
    let user = take_string(&mut m, "user")?;
    let room = take_string(&mut m, "room")?;
    let reason = take_string(&mut m, "reason")?;
    let mut hash_field = |key: &str| -> Result<String, AuditError> {
        let s = take_string(&mut m, key)?.ok_or_else(|| bad(format!("\"{key}\" is missing")))?;
        if decode_hash(&s).is_none() {
            return Err(bad(format!("\"{key}\" is not 64 lower-case hex digits")));
        }
        Ok(s)
    };
    let prev = hash_field("prev")?;
    let hash = hash_field("hash")?;
    let record = Record {
        seq,
        ts,
        kind,
        ip,
        port,
        user,
        room,
        reason,
        extra: m,
        prev,
        hash,
        raw: line.to_string(),
    };
    Ok((all, record))
}

/// Parses one stored line (without its newline). Checks the shape, not the chain: see
/// [`verify`].
pub fn parse_line(line: &str) -> Result<Record, AuditError> {
    decode(line).map(|(_, r)| r)
}

/// What is wrong with a parsed record on its own (its form and its hash), if anything.
fn self_check(all: &Map<String, Value>, record: &Record) -> Vec<String> {
    let mut issues = Vec::new();
    let mut canonical = Vec::with_capacity(record.raw.len());
    write_canonical(&Value::Object(all.clone()), &mut canonical);
    if canonical != record.raw.as_bytes() {
        issues.push("the line is not in canonical form (it was edited)".to_string());
    }
    let mut body = all.clone();
    body.remove("hash");
    let mut body_json = Vec::with_capacity(record.raw.len());
    write_canonical(&Value::Object(body), &mut body_json);
    let ok = decode_hash(&record.prev)
        .is_some_and(|prev| hex::encode(chain_hash(&prev, &body_json)) == record.hash);
    if !ok {
        issues.push("its hash does not match its contents (the record was altered)".to_string());
    }
    issues
}

/// One line read by [`LineReader`].
#[derive(Debug, Clone)]
pub struct RawLine {
    /// 1-based line number in its file.
    pub number: u64,
    /// The line without its newline (invalid UTF-8 replaced), at most [`MAX_LINE_BYTES`].
    pub text: String,
    /// False for the last line of a file when it has no newline (yet).
    pub complete: bool,
    /// The line was longer than [`MAX_LINE_BYTES`]; `text` holds only its start.
    pub too_long: bool,
    /// Bytes of the file this line took, newline included.
    pub bytes: u64,
}

/// Reads lines with a bound on each one's length, so a damaged file cannot exhaust memory.
pub struct LineReader<R> {
    inner: R,
    number: u64,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R) -> Self {
        LineReader { inner, number: 0 }
    }

    /// The next line, or `None` at the end.
    pub fn next_line(&mut self) -> io::Result<Option<RawLine>> {
        let mut buf: Vec<u8> = Vec::new();
        let mut bytes = 0u64;
        let mut too_long = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                if bytes == 0 {
                    return Ok(None);
                }
                return Ok(Some(self.line(buf, false, too_long, bytes)));
            }
            let (chunk, used, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(buf.len());
            if chunk.len() > room {
                too_long = true;
            }
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.inner.consume(used);
            bytes += used as u64;
            if done {
                return Ok(Some(self.line(buf, true, too_long, bytes)));
            }
        }
    }

    fn line(&mut self, buf: Vec<u8>, complete: bool, too_long: bool, bytes: u64) -> RawLine {
        self.number += 1;
        RawLine {
            number: self.number,
            text: String::from_utf8(buf)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            complete,
            too_long,
            bytes,
        }
    }
}

/// `audit-000000000042.log` (or `audit-000000000042-1.log`) → (42, 1).
fn rotated_key(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_prefix("audit-")?.strip_suffix(".log")?;
    let (seq, n) = match stem.split_once('-') {
        Some((seq, n)) => (seq, n.parse().ok()?),
        None => (stem, 0),
    };
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((seq.parse().ok()?, n))
}

/// The seq of the first record of a rotated file, from its name (`audit-000000000042.log` → 42);
/// `None` for `audit.log` and other names.
pub fn rotated_seq(path: &Path) -> Option<u64> {
    rotated_key(path.file_name()?.to_str()?).map(|(seq, _)| seq)
}

fn rotated_files(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(key) = name.to_str().and_then(rotated_key) {
            found.push((key, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The audit files of `data_dir`, oldest first, `audit.log` last. Empty when there is no log.
pub fn files(data_dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let dir = data_dir.join(AUDIT_DIR);
    let mut out = rotated_files(&dir)?;
    let current = dir.join(CURRENT_FILE);
    if current.is_file() {
        out.push(current);
    }
    Ok(out)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub files: usize,
    /// Records that could be parsed.
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The newest record's hash. Kept somewhere else (a ticket, another machine), it anchors
    /// every record up to that one: rewriting them would change it.
    pub last_hash: Option<String>,
    /// The first record is the genesis record (its `prev` is zeros). False once the oldest
    /// files were rotated away: the chain then starts at `first_seq`.
    pub anchored: bool,
    /// `file:line: what is wrong`, in file order; at most [`MAX_PROBLEMS`] (plus one line
    /// saying how many more).
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Recomputes every hash, and checks every `prev` link and the `seq` order across all files.
pub fn verify(data_dir: &Path) -> Result<VerifyReport, AuditError> {
    let paths = files(data_dir)?;
    let mut report = VerifyReport {
        files: paths.len(),
        ..VerifyReport::default()
    };
    let mut more_problems = 0u64;
    let mut problem = |report: &mut VerifyReport, p: String| {
        if report.problems.len() < MAX_PROBLEMS {
            report.problems.push(p);
        } else {
            more_problems += 1;
        }
    };
    // The last good record: (seq, hash). `resync` after a line that is not a record at all:
    // the next record cannot be linked to what that line was, so only its order is checked.
    let mut last: Option<(u64, String)> = None;
    let mut resync = false;
    for path in &paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let named_seq = rotated_key(&name).map(|(seq, _)| seq);
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                problem(
                    &mut report,
                    format!(
                        "{name}: vanished while being verified (rotated away by a running server?)"
                    ),
                );
                resync = true;
                continue;
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut lines = LineReader::new(BufReader::new(file));
        let mut first_in_file = true;
        while let Some(line) = lines.next_line().map_err(io_err(path))? {
            let at = format!("{name}:{}", line.number);
            let first = std::mem::replace(&mut first_in_file, false);
            if line.too_long {
                problem(
                    &mut report,
                    format!("{at}: longer than {MAX_LINE_BYTES} bytes, not a record"),
                );
                resync = true;
                continue;
            }
            if !line.complete {
                problem(
                    &mut report,
                    format!(
                        "{at}: incomplete record at the end of the file (no newline; a crash while writing?)"
                    ),
                );
                resync = true;
                continue;
            }
            let (all, record) = match decode(&line.text) {
                Ok(d) => d,
                Err(e) => {
                    problem(&mut report, format!("{at}: {e}"));
                    resync = true;
                    continue;
                }
            };
            report.records += 1;
            let mut issues = self_check(&all, &record);
            if first && let Some(named) = named_seq.filter(|&s| s != record.seq) {
                issues.push(format!(
                    "the file is named for seq {named} but starts at seq {}",
                    record.seq
                ));
            }
            match &last {
                None => {
                    report.first_seq = Some(record.seq);
                    report.anchored = record.prev == GENESIS_PREV;
                }
                Some((last_seq, last_hash)) => {
                    let seq = record.seq;
                    if resync {
                        if seq <= *last_seq {
                            issues.push(format!(
                                "seq {seq} comes after the damaged line(s), but the last sound record was seq {last_seq} (out of order)"
                            ));
                        }
                    } else {
                        if seq > last_seq.saturating_add(1) {
                            let missing = seq - last_seq - 1;
                            let s = if missing == 1 { "" } else { "s" };
                            issues.push(format!(
                                "seq {seq} follows seq {last_seq} ({missing} record{s} missing)"
                            ));
                        } else if seq <= *last_seq {
                            issues.push(format!("seq {seq} follows seq {last_seq} (out of order)"));
                        }
                        if record.prev != *last_hash {
                            issues.push(
                                "its prev is not the hash of the record before it (records were removed, inserted or reordered)"
                                    .to_string(),
                            );
                        }
                    }
                }
            }
            if !issues.is_empty() {
                problem(
                    &mut report,
                    format!("{at}: seq {}: {}", record.seq, issues.join("; ")),
                );
            }
            resync = false;
            last = Some((record.seq, record.hash));
        }
    }
    if let Some((seq, hash)) = last {
        report.last_seq = Some(seq);
        report.last_hash = Some(hash);
    }
    if more_problems > 0 {
        report
            .problems
            .push(format!("... and {more_problems} more problems"));
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Opening and recovering
// ---------------------------------------------------------------------------------------------

/// The state of a file's end.
#[derive(Debug)]
struct Tail {
    /// Bytes up to and including the last newline.
    complete_len: u64,
    /// Bytes after the last newline (a record cut short by a crash).
    partial_bytes: u64,
    /// The last complete line: `None` if there is none, else whether it is a sound record.
    last: Option<Option<Chain>>,
    /// The chain after the last sound record near the end, if any.
    last_valid: Option<Chain>,
}

/// A sound record's position in the chain: it parses, is canonical, and its hash is right.
fn sound(line: &[u8]) -> Option<Chain> {
    let text = std::str::from_utf8(line).ok()?;
    let (all, record) = decode(text).ok()?;
    if !self_check(&all, &record).is_empty() {
        return None;
    }
    Some(Chain {
        next_seq: record.seq.checked_add(1)?,
        prev: decode_hash(&record.hash)?,
    })
}

fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL_WINDOW_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(TAIL_WINDOW_BYTES).read_to_end(&mut buf)?;
    let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
        if start == 0 {
            // No complete line at all: everything is a partial record.
            return Ok(Tail {
                complete_len: 0,
                partial_bytes: len,
                last: None,
                last_valid: None,
            });
        }
        // A huge run without a newline: not something a crash leaves behind.
        return Ok(Tail {
            complete_len: len,
            partial_bytes: 0,
            last: Some(None),
            last_valid: None,
        });
    };
    let complete_len = start + last_nl as u64 + 1;
    let mut lines: Vec<&[u8]> = buf[..last_nl].split(|&b| b == b'\n').collect();
    if start > 0 && !lines.is_empty() {
        // The window's first piece may be the end of a longer line.
        lines.remove(0);
    }
    let mut last = None;
    let mut last_valid = None;
    for (i, line) in lines.iter().rev().enumerate() {
        let state = sound(line);
        if i == 0 {
            last = Some(state);
        }
        if state.is_some() {
            last_valid = state;
            break;
        }
    }
    if last.is_none() && start > 0 {
        last = Some(None);
    }
    Ok(Tail {
        complete_len,
        partial_bytes: len - complete_len,
        last,
        last_valid,
    })
}

/// The seq of a file's first record, if its first line is one.
fn first_seq(path: &Path) -> Option<u64> {
    let f = File::open(path).ok()?;
    let line = LineReader::new(BufReader::new(f)).next_line().ok()??;
    parse_line(&line.text).ok().map(|r| r.seq)
}

/// A free name for a rotated file whose first record is `seq`.
fn rotated_path(dir: &Path, seq: u64) -> PathBuf {
    let plain = dir.join(format!("audit-{seq:012}.log"));
    if !plain.exists() {
        return plain;
    }
    // Only after damage or a clock of seqs restarting; keep both files.
    (1..10_000u32)
        .map(|n| dir.join(format!("audit-{seq:012}-{n}.log")))
        .find(|p| !p.exists())
        .unwrap_or(plain)
}

fn open_append(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Takes the writer's lock, so two servers never interleave one chain.
fn lock(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(AuditError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
            tracing::warn!(path = %path.display(), "file locks are not supported here; not guarding the audit log against a second writer");
            Ok(f)
        }
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// Where a chain continues when `audit.log` has no records: after the newest rotated file.
fn chain_from_rotated(dir: &Path, notes: &mut Vec<Fields>) -> Result<Chain, AuditError> {
    let Some(newest) = rotated_files(dir)?.pop() else {
        return Ok(Chain::GENESIS);
    };
    let tail = read_tail(&newest).map_err(io_err(&newest))?;
    let name = newest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match (tail.last, tail.partial_bytes) {
        (Some(Some(chain)), 0) => Ok(chain),
        _ => {
            let chain = tail.last_valid.unwrap_or(Chain::GENESIS);
            notes.push(
                Fields::new()
                    .reason(format!(
                        "the newest rotated file {name} does not end with a sound record; the chain continues after seq {}",
                        chain.next_seq - 1
                    ))
                    .with("file", &name),
            );
            Ok(chain)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

enum Msg {
    Record {
        ts: jiff::Timestamp,
        kind: Kind,
        fields: Box<Fields>,
    },
    /// Write and fsync everything before this, then answer.
    Flush(SyncSender<()>),
    /// Flush, then end the thread.
    Stop,
    /// Tests: the writer says it is held, then waits for `release` (to fill the queue).
    #[cfg(test)]
    Hold {
        held: SyncSender<()>,
        release: Receiver<()>,
    },
}

/// Counters shared by the handles and the writer.
#[derive(Default)]
struct Shared {
    /// Records queued and not yet taken by the writer (at most `queue_records`).
    queued: AtomicUsize,
    /// Records dropped since the last `audit_dropped` record was queued.
    pending_drops: AtomicU64,
    /// Records dropped since the log was opened.
    dropped: AtomicU64,
    /// Told each record's line once it is written to the file (cluster mode: a copy in the
    /// shared store, [`AuditLog::mirror`]).
    mirror: std::sync::OnceLock<Mirror>,
}

/// What [`AuditLog::mirror`] calls with each written record's line (without its newline).
pub type Mirror = Box<dyn Fn(&str) + Send + Sync>;

struct Writer {
    dir: PathBuf,
    config: AuditConfig,
    file: File,
    /// Bytes of `audit.log` handed to the OS.
    file_bytes: u64,
    /// Seq of `audit.log`'s first record (names it when it is rotated); `None` while empty.
    file_first_seq: Option<u64>,
    /// The chain after the last record in `buf`, and after the last one in the file.
    chain: Chain,
    written: Chain,
    buf: Vec<u8>,
    buf_records: u64,
    /// A failed write left bytes that could not be cut off: start the next write on a new line.
    needs_newline: bool,
    synced: bool,
    last_sync: Instant,
    /// Records lost to write errors, reported once writing works again.
    lost_to_errors: u64,
    last_error: Option<String>,
    rotate_after: Option<Instant>,
    shared: Arc<Shared>,
    _lock: File,
}

impl Writer {
    /// Opens `audit.log` in `dir`, finding where the chain continues and repairing what a crash
    /// left behind. Returns notes for `audit_recovered` records.
    fn open(
        dir: PathBuf,
        config: AuditConfig,
        lock: File,
        shared: Arc<Shared>,
    ) -> Result<(Writer, Vec<Fields>), AuditError> {
        let current = dir.join(CURRENT_FILE);
        let mut notes = Vec::new();
        let mut chain = Chain::GENESIS;
        let mut file_first_seq = None;
        let mut continue_from_rotated = true;
        if current.exists() {
            let tail = read_tail(&current).map_err(io_err(&current))?;
            if tail.partial_bytes > 0 {
                let f = open_append(&current).map_err(io_err(&current))?;
                f.set_len(tail.complete_len).map_err(io_err(&current))?;
                f.sync_all().map_err(io_err(&current))?;
                notes.push(
                    Fields::new()
                        .reason("an incomplete record at the end of audit.log (a crash while writing) was removed")
                        .with("file", CURRENT_FILE)
                        .with("dropped_bytes", tail.partial_bytes),
                );
            }
            match tail.last {
                // Empty (or only a partial record): continue after the rotated files.
                None => {}
                Some(Some(after_last)) => {
                    chain = after_last;
                    file_first_seq = first_seq(&current).or(Some(after_last.next_seq - 1));
                    continue_from_rotated = false;
                }
                Some(None) => {
                    // Keep the damaged file as it is (evidence; verify shows the bad line) and
                    // continue the chain after its last sound record, in a new file.
                    let first = first_seq(&current)
                        .or(tail.last_valid.map(|c| c.next_seq - 1))
                        .unwrap_or(0);
                    let kept = rotated_path(&dir, first);
                    fs::rename(&current, &kept).map_err(io_err(&current))?;
                    sync_dir(&dir);
                    let kept_name = kept
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    chain = tail.last_valid.unwrap_or(Chain::GENESIS);
                    notes.push(
                        Fields::new()
                            .reason(format!(
                                "the last line of audit.log is not a sound record; the file was kept as {kept_name} and the chain continues after seq {}",
                                chain.next_seq - 1
                            ))
                            .with("file", &kept_name),
                    );
                    continue_from_rotated = false;
                }
            }
        }
        if continue_from_rotated {
            chain = chain_from_rotated(&dir, &mut notes)?;
        }
        let file = open_append(&current).map_err(io_err(&current))?;
        let file_bytes = file.metadata().map_err(io_err(&current))?.len();
        sync_dir(&dir);
        let writer = Writer {
            dir,
            config,
            file,
            file_bytes,
            file_first_seq: if file_bytes == 0 {
                None
            } else {
                file_first_seq
            },
            chain,
            written: chain,
            buf: Vec::new(),
            buf_records: 0,
            needs_newline: false,
            synced: true,
            last_sync: Instant::now(),
            lost_to_errors: 0,
            last_error: None,
            rotate_after: None,
            shared,
            _lock: lock,
        };
        Ok((writer, notes))
    }

    /// Adds a record to the buffer (rotating first if it would overfill `audit.log`).
    fn append(&mut self, ts: jiff::Timestamp, kind: Kind, fields: Fields) {
        let (mut line, mut hash) = build_line(self.chain, ts, kind, &fields);
        let size_after = self.file_bytes + (self.buf.len() + line.len() + 1) as u64;
        let has_records = self.file_bytes + self.buf.len() as u64 > 0;
        if size_after > self.config.max_file_bytes
            && has_records
            && self.rotate_after.is_none_or(|t| Instant::now() >= t)
        {
            let before = self.chain;
            self.write_out();
            self.rotate();
            if self.chain != before {
                // A failed write rewound the chain: this record now comes at another place.
                (line, hash) = build_line(self.chain, ts, kind, &fields);
            }
        }
        if self.file_bytes == 0 && self.buf.is_empty() {
            self.file_first_seq = Some(self.chain.next_seq);
        }
        self.buf.extend_from_slice(&line);
        self.buf.push(b'\n');
        self.buf_records += 1;
        self.chain = Chain {
            next_seq: self.chain.next_seq + 1,
            prev: hash,
        };
    }

    /// Hands the buffer to the OS. On failure the buffered records are lost (and counted), the
    /// file is cut back to its last whole record, and the chain rewinds to match it.
    fn write_out(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let prefix: &[u8] = if self.needs_newline { b"\n" } else { b"" };
        let result = self
            .file
            .write_all(prefix)
            .and_then(|()| self.file.write_all(&self.buf));
        match result {
            Ok(()) => {
                if let Some(mirror) = self.shared.mirror.get() {
                    for line in self.buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        // Lines are built from JSON: always UTF-8.
                        if let Ok(line) = std::str::from_utf8(line) {
                            mirror(line);
                        }
                    }
                }
                self.file_bytes += (prefix.len() + self.buf.len()) as u64;
                self.needs_newline = false;
                self.written = self.chain;
                self.buf.clear();
                self.buf_records = 0;
                self.synced = false;
                if let Some(error) = self.last_error.take() {
                    tracing::info!("the audit log is being written again");
                    let lost = std::mem::take(&mut self.lost_to_errors);
                    self.append(
                        jiff::Timestamp::now(),
                        Kind::AuditDropped,
                        Fields::new()
                            .reason(format!("could not write to the audit log: {error}"))
                            .with("count", lost),
                    );
                    return self.write_out();
                }
                true
            }
            Err(e) => {
                let lost = self.buf_records;
                if self.last_error.is_none() {
                    tracing::error!(error = %e, dir = %self.dir.display(), "cannot write the audit log; records are being lost");
                }
                self.last_error = Some(e.to_string());
                self.lost_to_errors += lost;
                self.shared.dropped.fetch_add(lost, Ordering::Relaxed);
                if self.file.set_len(self.file_bytes).is_err() {
                    // Could not cut off what may have been half-written: isolate it on its
                    // own line (verify will point at it) instead of merging it with the next.
                    if let Ok(m) = self.file.metadata()
                        && m.len() != self.file_bytes
                    {
                        self.file_bytes = m.len();
                        self.needs_newline = true;
                    }
                }
                if self.file_bytes == 0 {
                    self.file_first_seq = None;
                }
                self.buf.clear();
                self.buf_records = 0;
                self.chain = self.written;
                false
            }
        }
    }

    fn sync(&mut self) {
        if self.synced {
            return;
        }
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "cannot fsync the audit log");
        }
        self.synced = true;
        self.last_sync = Instant::now();
    }

    /// Renames `audit.log` after its first record and starts a new one; deletes the oldest
    /// rotated files beyond `keep_files`.
    fn rotate(&mut self) {
        if let Err(e) = self.try_rotate() {
            tracing::error!(error = %e, "cannot rotate the audit log; writing on in audit.log");
            self.rotate_after = Some(Instant::now() + ROTATE_RETRY);
            return;
        }
        self.rotate_after = None;
        self.prune();
    }

    fn try_rotate(&mut self) -> io::Result<()> {
        self.sync();
        let current = self.dir.join(CURRENT_FILE);
        let first = self.file_first_seq.unwrap_or(self.written.next_seq);
        let target = rotated_path(&self.dir, first);
        fs::rename(&current, &target)?;
        let new = match open_append(&current) {
            Ok(f) => f,
            Err(e) => {
                // Put it back so that what we write keeps a name readers look for.
                let _ = fs::rename(&target, &current);
                return Err(e);
            }
        };
        sync_dir(&self.dir);
        self.file = new;
        self.file_bytes = 0;
        self.file_first_seq = None;
        Ok(())
    }

    fn prune(&self) {
        let rotated = match rotated_files(&self.dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the audit files");
                return;
            }
        };
        let excess = rotated.len().saturating_sub(self.config.keep_files);
        for old in &rotated[..excess] {
            if let Err(e) = fs::remove_file(old) {
                tracing::error!(error = %e, file = %old.display(), "cannot delete an old audit file");
            }
        }
        if excess > 0 {
            sync_dir(&self.dir);
        }
    }

    /// Queues an `audit_dropped` record for the drops counted so far, if any.
    fn note_drops(&mut self) {
        let n = self.shared.pending_drops.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.append(
                jiff::Timestamp::now(),
                Kind::AuditDropped,
                dropped_fields(n),
            );
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let mut flushes: Vec<SyncSender<()>> = Vec::new();
        loop {
            let first = if self.synced {
                rx.recv().ok()
            } else {
                let wait = SYNC_INTERVAL.saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => {
                        self.sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            };
            let Some(first) = first else { break };
            let mut stop = self.handle(first, &mut flushes);
            let mut drained = false;
            for _ in 1..WRITE_BATCH {
                if stop {
                    break;
                }
                match rx.try_recv() {
                    Ok(m) => stop = self.handle(m, &mut flushes),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {
                        drained = true;
                        break;
                    }
                }
            }
            if drained || stop {
                // Everything queued before the drops is written: there is room again.
                self.note_drops();
            }
            self.write_out();
            if !flushes.is_empty() || stop || self.last_sync.elapsed() >= SYNC_INTERVAL {
                self.sync();
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
            if stop {
                break;
            }
        }
        self.note_drops();
        self.write_out();
        self.sync();
    }

    /// Takes one message; true to stop.
    fn handle(&mut self, msg: Msg, flushes: &mut Vec<SyncSender<()>>) -> bool {
        match msg {
            Msg::Record { ts, kind, fields } => {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                self.append(ts, kind, *fields)
            }
            Msg::Flush(reply) => {
                self.note_drops();
                flushes.push(reply);
            }
            Msg::Stop => return true,
            #[cfg(test)]
            Msg::Hold { held, release } => {
                let _ = held.send(());
                let _ = release.recv();
            }
        }
        false
    }
}

fn dropped_fields(count: u64) -> Fields {
    Fields::new()
        .reason("the audit queue was full; records were dropped")
        .with("count", count)
}

// ---------------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------------

struct Inner {
    /// Unbounded as a channel, bounded by `queue_records` through `Shared::queued`: a
    /// `sync_channel` allocates (and initialises) every slot of its capacity at creation,
    /// 2.6 MB for the default 65,536 records, resident for the server's whole life; this one
    /// allocates blocks as records wait and frees them as they are written.
    tx: Sender<Msg>,
    /// Most records waiting at once.
    capacity: usize,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn stop(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread
            && self.tx.send(Msg::Stop).is_ok()
        {
            let _ = thread.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A handle on the audit log; clones share one writer thread. The thread stops at
/// [`AuditLog::close`] or when the last handle is dropped, after writing everything queued.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) `data_dir/audit` and continues its chain. Repairs what a crash left:
    /// an incomplete last record is cut off, a damaged last record makes a new file; either is
    /// noted in an `audit_recovered` record. Fails if another process holds the log.
    pub fn open(data_dir: &Path, config: AuditConfig) -> Result<AuditLog, AuditError> {
        let dir = data_dir.join(AUDIT_DIR);
        fsutil::create_private_dir(&dir).map_err(io_err(&dir))?;
        let lock = lock(&dir)?;
        let shared = Arc::new(Shared::default());
        let queue = config.queue_records.max(1);
        let (mut writer, notes) = Writer::open(dir.clone(), config, lock, shared.clone())?;
        for note in notes {
            writer.append(jiff::Timestamp::now(), Kind::AuditRecovered, note);
        }
        if !writer.write_out() {
            let error = writer.last_error.take().unwrap_or_default();
            return Err(AuditError::Io {
                path: dir.join(CURRENT_FILE),
                error: io::Error::other(error),
            });
        }
        writer.sync();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(&dir))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                capacity: queue,
                shared,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues a record. Never blocks, never fails: when the queue is full the record is
    /// dropped and counted (see [`AuditLog::dropped`]), and an `audit_dropped` record with the
    /// count follows once there is room.
    ///
    /// Never pass message text, passwords, keys or invite codes.
    pub fn record(&self, kind: Kind, fields: Fields) {
        let shared = &self.inner.shared;
        if shared.pending_drops.load(Ordering::Relaxed) > 0 {
            let n = shared.pending_drops.swap(0, Ordering::Relaxed);
            if n > 0 && !self.try_send(Kind::AuditDropped, dropped_fields(n)) {
                shared.pending_drops.fetch_add(n, Ordering::Relaxed);
            }
        }
        if !self.try_send(kind, fields) {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            shared.pending_drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn try_send(&self, kind: Kind, fields: Fields) -> bool {
        let msg = Msg::Record {
            ts: jiff::Timestamp::now(),
            kind,
            fields: Box::new(fields),
        };
        let queued = &self.inner.shared.queued;
        if queued.fetch_add(1, Ordering::AcqRel) >= self.inner.capacity {
            queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.inner.tx.send(msg).is_err() {
            queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Blocks until everything recorded so far is written and fsynced. Returns at once after
    /// [`AuditLog::close`]. Blocking: from async code, call it where blocking is allowed.
    pub fn flush(&self) {
        let (reply, done) = mpsc::sync_channel(1);
        if self.inner.tx.send(Msg::Flush(reply)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Writes everything recorded so far, fsyncs, and stops the writer thread (later records
    /// on any clone are counted as dropped). Calling it again does nothing.
    pub fn close(self) {
        self.flush();
        self.inner.stop();
    }

    /// From now on each record written to the file is also given to `mirror` (once; a second
    /// call is ignored). Cluster mode copies the records into the shared store, so the
    /// cluster's audit is in one place; the file stays the tamper-evident chain of this node.
    /// Called on the writer thread: it must not block for long.
    pub fn mirror(&self, mirror: Mirror) {
        let _ = self.inner.shared.mirror.set(mirror);
    }

    /// Records dropped since the log was opened (queue full, writer stopped, or write errors).
    pub fn dropped(&self) -> u64 {
        self.inner.shared.dropped.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn hold(&self) -> SyncSender<()> {
        let (release_tx, release) = mpsc::sync_channel(1);
        let (held, is_held) = mpsc::sync_channel(1);
        let _ = self.inner.tx.send(Msg::Hold { held, release });
        let _ = is_held.recv_timeout(Duration::from_secs(10));
        release_tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn small(max_file_bytes: u64, keep_files: usize) -> AuditConfig {
        AuditConfig {
            max_file_bytes,
            keep_files,
            ..AuditConfig::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// Records `n` assorted events and closes the log.
    fn write_log(data: &Path, config: AuditConfig, n: usize) {
        let log = AuditLog::open(data, config).expect("open");
        for i in 0..n {
            let fields = Fields::new()
                .ip(addr("203.0.113.7:51234"))
                .user(format!("user{}", i % 3))
                .with("i", i);
            let kind = [Kind::LoginOk, Kind::LoginFailed, Kind::Join, Kind::Kick][i % 4];
            let fields = if kind == Kind::Join || kind == Kind::Kick {
                fields.room("general").reason("spam")
            } else {
                fields
            };
            log.record(kind, fields);
        }
        log.close();
    }

    fn current(data: &Path) -> PathBuf {
        data.join(AUDIT_DIR).join(CURRENT_FILE)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(path, text).expect("write");
    }

    fn verified(data: &Path) -> VerifyReport {
        verify(data).expect("verify")
    }

    #[track_caller]
    fn assert_first_problem_at(report: &VerifyReport, at: &str) {
        let first = report
            .problems
            .first()
            .unwrap_or_else(|| panic!("no problem found, expected one at {at}: {report:#?}"));
        assert!(
            first.starts_with(&format!("{at}:")),
            "first problem should be at {at}: {report:#?}"
        );
    }

    #[test]
    fn the_handle_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync + Clone + 'static>() {}
        send_sync::<AuditLog>();
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_value(kind).expect("serialize");
            assert_eq!(json, Value::String(kind.as_str().into()));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!(Kind::parse("LOGIN-FAILED"), Some(Kind::LoginFailed));
        assert_eq!(Kind::parse("logon"), None);
    }

    #[test]
    fn records_are_canonical_chained_lines() {
        let t = tmp();
        let log = AuditLog::open(t.path(), AuditConfig::default()).expect("open");
        log.record(Kind::Start, Fields::new().with("version", "0.1.0"));
        log.record(
            Kind::LoginFailed,
            Fields::new()
                .ip(addr("[::ffff:203.0.113.7]:51234"))
                .user("alice")
                .reason("wrong password"),
        );
        log.record(
            Kind::Admin,
            Fields::new()
                .ip(addr("[2001:db8::1]:7667"))
                .user("root")
                .with("seq", 99)
                .with("action", "ban"),
        );
        log.flush();
        let stored = lines(&current(t.path()));
        assert_eq!(stored.len(), 3, "{stored:#?}");

        let mut prev = GENESIS_PREV.to_string();
        for (i, line) in stored.iter().enumerate() {
            let value: Value = serde_json::from_str(line).expect("json");
            let obj = value.as_object().expect("object");
            let sorted: BTreeMap<&String, &Value> = obj.iter().collect();
            assert_eq!(
                serde_json::to_string(&sorted).expect("json"),
                *line,
                "canonical: keys sorted, no spaces"
            );
            let r = parse_line(line).expect("parses");
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.prev, prev);
            assert_eq!(r.raw, *line);
            // hash = SHA-256(prev bytes || canonical JSON without "hash")
            let mut body = sorted.clone();
            body.remove(&"hash".to_string());
            let mut hasher = Sha256::new();
            hasher.update(hex::decode(&prev).expect("hex"));
            hasher.update(serde_json::to_string(&body).expect("json"));
            assert_eq!(hex::encode(hasher.finalize()), r.hash);
            // ts has milliseconds and a Z.
            let ts = obj["ts"].as_str().expect("ts");
            assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
            prev = r.hash.clone();
        }
        let start = parse_line(&stored[0]).expect("parse");
        assert_eq!(start.kind, "start");
        assert_eq!(start.ip, None);
        assert!(!stored[0].contains("\"ip\"") && !stored[0].contains("\"user\""));
        let failed = parse_line(&stored[1]).expect("parse");
        assert_eq!(failed.known_kind(), Some(Kind::LoginFailed));
        assert_eq!(
            failed.ip,
            Some("203.0.113.7".parse().expect("ip")),
            "mapped IPv4 stored as IPv4"
        );
        assert_eq!(failed.port, Some(51234));
        assert_eq!(failed.user.as_deref(), Some("alice"));
        assert_eq!(failed.reason.as_deref(), Some("wrong password"));
        let admin = parse_line(&stored[2]).expect("parse");
        assert_eq!(admin.seq, 3, "an extra \"seq\" cannot replace the record's");
        assert_eq!(admin.extra.get("x_seq"), Some(&Value::from(99)));
        assert_eq!(admin.extra.get("action"), Some(&Value::from("ban")));

        let report = verified(t.path());
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.files, 1);
        assert_eq!(report.records, 3);
        assert_eq!(report.first_seq, Some(1));
        assert_eq!(report.last_seq, Some(3));
        assert!(report.anchored);
        log.close();
    }

    #[test]
    fn long_fields_are_bounded() {
        let t = tmp();
        let log = AuditLog::open(t.path(), AuditConfig::default()).expect("open");
        log.record(
            Kind::Error,
            Fields::new()
                .reason("x".repeat(10 * MAX_TEXT_CHARS))
                .with("blob", "y".repeat(2 * MAX_EXTRA_BYTES)),
        );
        log.close();
        let stored = lines(&current(t.path()));
        let r = parse_line(&stored[0]).expect("parse");
        assert_eq!(
            r.reason.as_deref().map(|s| s.chars().count()),
            Some(MAX_TEXT_CHARS + 1)
        );
        assert!(!r.extra.contains_key("blob"));
        assert!(r.extra.contains_key("extra_truncated_bytes"));
        assert!(stored[0].len() < MAX_LINE_BYTES / 4);
        assert!(verified(t.path()).ok());
    }

    #[test]
    fn editing_any_byte_is_detected_at_its_line() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 5);
        let path = current(t.path());
        let original = lines(&path);
        assert!(verified(t.path()).ok());
        let target = 2; // line 3
        for i in 0..original[target].len() {
            let mut edited = original.clone();
            let mut bytes = edited[target].clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            edited[target] = String::from_utf8(bytes).expect("ascii");
            write_lines(&path, &edited);
            let report = verified(t.path());
            assert_first_problem_at(&report, "audit.log:3");
        }
    }

    #[test]
    fn a_deleted_record_is_detected() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 6);
        let path = current(t.path());
        let mut stored = lines(&path);
        stored.remove(2);
        write_lines(&path, &stored);
        let report = verified(t.path());
        assert_first_problem_at(&report, "audit.log:3");
        assert!(
            report.problems[0].contains("1 record missing"),
            "{report:#?}"
        );
        assert_eq!(report.problems.len(), 1, "{report:#?}");
    }

    #[test]
    fn swapped_records_are_detected() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 6);
        let path = current(t.path());
        let mut stored = lines(&path);
        stored.swap(2, 3);
        write_lines(&path, &stored);
        let report = verified(t.path());
        assert_first_problem_at(&report, "audit.log:3");
        assert!(
            report.problems[0].contains("out of order") || report.problems[0].contains("follows")
        );
    }

    #[test]
    fn a_cut_in_the_middle_is_detected() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 8);
        let path = current(t.path());
        let text = fs::read(&path).expect("read");
        let stored = lines(&path);
        // From the middle of line 2 to the middle of line 5.
        let start = stored[0].len() + 1 + stored[1].len() / 2;
        let end = stored[..4].iter().map(|l| l.len() + 1).sum::<usize>() + stored[4].len() / 2;
        let mut cut = text[..start].to_vec();
        cut.extend_from_slice(&text[end..]);
        fs::write(&path, cut).expect("write");
        let report = verified(t.path());
        assert_first_problem_at(&report, "audit.log:2");
    }

    #[test]
    fn a_dropped_tail_or_an_inserted_record_is_detected() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 4);
        let path = current(t.path());
        let stored = lines(&path);
        // A record copied from elsewhere in the chain, inserted: its prev does not fit.
        let mut inserted = stored.clone();
        inserted.insert(3, stored[0].clone());
        write_lines(&path, &inserted);
        assert_first_problem_at(&verified(t.path()), "audit.log:4");
        // A partial line at the end.
        write_lines(&path, &stored);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"seq\":5,\"ts").expect("write");
        assert_first_problem_at(&verified(t.path()), "audit.log:5");
    }

    #[test]
    fn rotation_keeps_the_chain_and_the_file_limit() {
        let t = tmp();
        // About three records per file.
        write_log(t.path(), small(700, 100), 40);
        let paths = files(t.path()).expect("files");
        assert!(paths.len() > 5, "{paths:#?}");
        assert_eq!(paths.last().map(|p| p.ends_with(CURRENT_FILE)), Some(true));
        for p in &paths {
            assert!(fs::metadata(p).expect("stat").len() <= 700, "{p:?}");
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            if let Some((seq, _)) = rotated_key(&name) {
                assert_eq!(first_seq(p), Some(seq), "{name}");
            }
        }
        let report = verified(t.path());
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.records, 40);
        assert!(report.anchored);
        assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(40)));

        // Now keep only 3 rotated files: the oldest go, the chain starts later.
        let t = tmp();
        write_log(t.path(), small(700, 3), 40);
        let paths = files(t.path()).expect("files");
        assert_eq!(paths.len(), 4, "{paths:#?}");
        let report = verified(t.path());
        assert!(report.ok(), "{report:#?}");
        assert!(!report.anchored);
        assert!(report.first_seq > Some(1));
        assert_eq!(report.last_seq, Some(40));
        assert_eq!(report.records, 40 - report.first_seq.expect("first") + 1);
    }

    #[test]
    fn a_tampered_rotated_file_is_named_in_the_report() {
        let t = tmp();
        write_log(t.path(), small(1100, 100), 12);
        let paths = files(t.path()).expect("files");
        let second = &paths[1];
        let mut stored = lines(second);
        assert!(stored.len() >= 3, "{stored:#?}");
        stored.remove(1);
        write_lines(second, &stored);
        let name = second
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_first_problem_at(&verified(t.path()), &format!("{name}:2"));
    }

    #[test]
    fn reopening_continues_seq_and_chain() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 3);
        write_log(t.path(), AuditConfig::default(), 2);
        let log = AuditLog::open(t.path(), AuditConfig::default()).expect("open");
        log.record(Kind::Stop, Fields::new());
        drop(log); // dropping the last handle writes what was queued
        let stored = lines(&current(t.path()));
        let seqs: Vec<u64> = stored
            .iter()
            .map(|l| parse_line(l).expect("parse").seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        let report = verified(t.path());
        assert!(report.ok() && report.anchored, "{report:#?}");
    }

    #[test]
    fn reopening_after_a_crash_between_rename_and_new_file_continues() {
        let t = tmp();
        write_log(t.path(), small(700, 100), 10);
        let cur = current(t.path());
        let first = first_seq(&cur).expect("first seq");
        fs::rename(
            &cur,
            t.path()
                .join(AUDIT_DIR)
                .join(format!("audit-{first:012}.log")),
        )
        .expect("rename");
        write_log(t.path(), small(700, 100), 2);
        let report = verified(t.path());
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.last_seq, Some(12));
    }

    #[test]
    fn a_partial_last_line_is_cut_off_and_noted() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 3);
        let path = current(t.path());
        let partial = b"{\"hash\":\"00";
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(partial).expect("write");
        drop(f);
        write_log(t.path(), AuditConfig::default(), 1);
        let stored = lines(&path);
        assert_eq!(stored.len(), 5, "{stored:#?}");
        let note = parse_line(&stored[3]).expect("parse");
        assert_eq!(note.kind, "audit_recovered");
        assert_eq!(note.seq, 4);
        assert_eq!(
            note.extra.get("dropped_bytes"),
            Some(&Value::from(partial.len()))
        );
        let report = verified(t.path());
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.records, 5);
    }

    #[test]
    fn a_damaged_last_line_starts_a_new_file_and_verify_points_at_it() {
        let t = tmp();
        write_log(t.path(), AuditConfig::default(), 3);
        let path = current(t.path());
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"not a record\n").expect("write");
        drop(f);
        write_log(t.path(), AuditConfig::default(), 1);
        let paths = files(t.path()).expect("files");
        assert_eq!(paths.len(), 2, "{paths:#?}");
        assert!(paths[0].ends_with("audit-000000000001.log"), "{paths:#?}");
        let stored = lines(&path);
        let note = parse_line(&stored[0]).expect("parse");
        assert_eq!(note.kind, "audit_recovered");
        assert_eq!(note.seq, 4, "continues after the last sound record");
        let report = verified(t.path());
        assert_eq!(report.problems.len(), 1, "{report:#?}");
        assert_first_problem_at(&report, "audit-000000000001.log:4");
        assert_eq!(report.records, 5);
    }

    #[test]
    fn a_full_queue_counts_drops_and_says_so() {
        let t = tmp();
        let config = AuditConfig {
            queue_records: 2,
            ..AuditConfig::default()
        };
        let log = AuditLog::open(t.path(), config).expect("open");
        let release = log.hold();
        // The writer is now held; the queue takes two records, the rest are dropped.
        for i in 0..10 {
            log.record(Kind::Connect, Fields::new().with("i", i));
        }
        assert_eq!(log.dropped(), 8);
        release.send(()).expect("release");
        log.flush();
        log.record(Kind::Disconnect, Fields::new());
        log.close();
        let records: Vec<Record> = lines(&current(t.path()))
            .iter()
            .map(|l| parse_line(l).expect("parse"))
            .collect();
        let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["connect", "connect", "audit_dropped", "disconnect"],
            "{records:#?}"
        );
        assert_eq!(records[2].extra.get("count"), Some(&Value::from(8)));
        assert!(verified(t.path()).ok());
    }

    #[test]
    fn records_after_close_are_counted_as_dropped() {
        let t = tmp();
        let log = AuditLog::open(t.path(), AuditConfig::default()).expect("open");
        let other = log.clone();
        log.close();
        other.record(Kind::Join, Fields::new());
        other.flush(); // returns at once
        assert_eq!(other.dropped(), 1);
        other.close(); // again: nothing to do
    }

    #[test]
    fn a_second_writer_is_refused() {
        let t = tmp();
        let log = AuditLog::open(t.path(), AuditConfig::default()).expect("open");
        match AuditLog::open(t.path(), AuditConfig::default()) {
            Err(AuditError::Locked { .. }) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
        log.close();
        AuditLog::open(t.path(), AuditConfig::default())
            .expect("open after close")
            .close();
    }

    #[test]
    fn files_and_folder_are_private() {
        let t = tmp();
        write_log(t.path(), small(700, 100), 10);
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        let dir = t.path().join(AUDIT_DIR);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        let paths = files(t.path()).expect("files");
        assert!(paths.len() > 1);
        for p in paths {
            assert_eq!(mode(&p), 0o600, "{p:?}");
        }
    }

    #[test]
    fn unsynced_writes_reach_the_os_promptly() {
        let t = tmp();
        let log = AuditLog::open(t.path(), AuditConfig::default()).expect("open");
        log.record(Kind::Connect, Fields::new());
        // No flush: the writer hands each batch to the OS at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::metadata(current(t.path()))
            .map(|m| m.len())
            .unwrap_or(0)
            == 0
        {
            assert!(Instant::now() < deadline, "not written within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        log.close();
    }

    #[test]
    fn parse_line_explains_what_is_wrong() {
        for (line, needle) in [
            ("", "not valid JSON"),
            ("[]", "not a JSON object"),
            ("{\"ts\":\"2026-01-01T00:00:00Z\"}", "seq"),
            ("{\"seq\":1,\"ts\":\"yesterday\"}", "\"ts\""),
        ] {
            let e = parse_line(line).expect_err(line).to_string();
            assert!(e.contains(needle), "{line:?} → {e}");
        }
    }

    #[test]
    fn verify_of_no_log_is_empty() {
        let t = tmp();
        let report = verified(t.path());
        assert_eq!(report.files, 0);
        assert_eq!(report.records, 0);
        assert!(report.ok());
    }

    #[test]
    fn line_reader_bounds_lines() {
        let mut data = vec![b'x'; MAX_LINE_BYTES + 10];
        data.extend_from_slice(b"\nshort\npartial");
        let mut r = LineReader::new(BufReader::with_capacity(1000, &data[..]));
        let long = r.next_line().expect("read").expect("line");
        assert!(long.too_long && long.complete);
        assert_eq!(long.text.len(), MAX_LINE_BYTES);
        assert_eq!(long.bytes, MAX_LINE_BYTES as u64 + 11);
        let short = r.next_line().expect("read").expect("line");
        assert_eq!(
            (short.number, short.text.as_str(), short.complete),
            (2, "short", true)
        );
        let partial = r.next_line().expect("read").expect("line");
        assert_eq!(
            (partial.text.as_str(), partial.complete),
            ("partial", false)
        );
        assert!(r.next_line().expect("read").is_none());
    }
}
