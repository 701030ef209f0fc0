//! `conclave doctor`: checks a data directory, and the server running on it, for what an
//! operator would want to know before an attacker does: secrets others can read, a certificate
//! about to expire, risky settings, plaintext message text on disk, and (with `--server`) what
//! the server really offers on the wire.
//!
//! Each check ends `ok`, `warn` or `fail`; a `fail` (or, with `--strict`, a `warn`) makes the
//! exit status non-zero. `--json` prints the same report as one JSON object.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use conclave_server::config::RegistrationPolicy;
use conclave_server::{Config, canary, tls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};

use crate::cli::DataDirArg;

/// A certificate expiring within this many days is a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;
/// Time allowed for each network step of the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Files are scanned in pieces of this size (memory stays bounded whatever their size).
const SCAN_CHUNK_BYTES: usize = 1 << 20;
/// Most files scanned for plaintext (the file store could be large).
const MAX_SCANNED_FILES: usize = 100_000;
/// The file store's folder (file transfer stores files here).
pub const FILES_DIR: &str = "files";

pub const DOCTOR_HELP: &str = "\
Checks: permissions of keys and secrets; the certificate (expiry, key type, key matching);
risky settings (open registration without a server password beyond loopback, limits or
automatic bans switched off); plaintext at rest (a canary message's text searched for in the
database, its WAL, the file store and the audit log; a fresh canary is planted when the server
runs); the running server (over its admin socket); with --server, a live TLS probe (TLS 1.3
accepted, TLS 1.2 refused, the certificate's fingerprint, the protocol hello).

Exit status: 0 when nothing failed, 1 when a check failed (with --strict: or warned).

Examples:
  conclave doctor
  conclave doctor --data-dir /srv/conclave --server chat.example.org:7667
  conclave doctor --server node1.example.org:7667,node2.example.org:7667
  conclave doctor --json | jq '.checks[] | select(.status != \"ok\")'";

#[derive(Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Also probe the server at HOST:PORT over the network (TLS versions, fingerprint, hello);
    /// several addresses separated by commas (the nodes of a cluster, or a balancer and the
    /// nodes behind it) are each probed, and each must present this data directory's
    /// certificate.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT…]")]
    pub server: Option<String>,
    /// The config file, if the server is started with --config.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Treat warnings as problems (non-zero exit).
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's outcome: the worst of its findings.
struct Check {
    name: &'static str,
    /// The address a network probe was about.
    server: Option<String>,
    status: Status,
    summary: String,
    findings: Vec<(Status, String)>,
}

impl Check {
    fn new(name: &'static str) -> Check {
        Check {
            name,
            server: None,
            status: Status::Ok,
            summary: String::new(),
            findings: Vec::new(),
        }
    }

    fn note(&mut self, status: Status, text: impl Into<String>) {
        self.status = self.status.max(status);
        self.findings.push((status, text.into()));
    }

    fn ok(&mut self, text: impl Into<String>) {
        self.note(Status::Ok, text);
    }
    fn warn(&mut self, text: impl Into<String>) {
        self.note(Status::Warn, text);
    }
    fn fail(&mut self, text: impl Into<String>) {
        self.note(Status::Fail, text);
    }

    fn summary(mut self, text: impl Into<String>) -> Check {
        self.summary = text.into();
        self
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let dir = args.data.data_dir.clone();
    crate::cli::require_dir(&dir)?;
    let running = server_info(&dir);
    let mut checks = vec![
        permissions(&dir),
        certificate(&dir),
        settings(&dir, args.config.as_deref(), running.as_ref()),
        running_server(running.as_ref()),
        plaintext_at_rest(&dir, running.is_some()),
        web_client(),
    ];
    if let Some(server) = &args.server {
        // Each address of a list (a cluster's nodes share this directory's certificate).
        let addrs: Vec<String> = match conclave_client::ServerList::parse(server) {
            Ok(list) => list.iter().map(|a| a.to_string()).collect(),
            // The probe says why it is not an address.
            Err(_) => vec![server.clone()],
        };
        let several = addrs.len() > 1;
        for addr in &addrs {
            for mut c in [tls_probe(addr, &dir), web_probe(addr)] {
                c.server = Some(addr.clone());
                if several {
                    c.summary = format!("{addr}: {}", c.summary);
                }
                checks.push(c);
            }
        }
    }
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    let failed = fails > 0 || (args.strict && warns > 0);
    if args.json {
        let report = json!({
            "ok": !failed,
            "data_dir": dir.display().to_string(),
            "problems": fails,
            "warnings": warns,
            "checks": checks.iter().map(|c| json!({
                "check": c.name,
                "server": c.server,
                "status": c.status.as_str(),
                "summary": c.summary,
                "findings": c.findings.iter().map(|(s, t)| json!({"status": s.as_str(), "text": t})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        out(format_args!("{report}\n"));
    } else {
        out(format_args!("conclave doctor: {}\n", dir.display()));
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            out(format_args!("  {tag}  {:<18} {}\n", c.name, c.summary));
            for (s, text) in &c.findings {
                if *s != Status::Ok || c.status == Status::Ok {
                    let mark = match s {
                        Status::Ok => "-",
                        Status::Warn => "! warn:",
                        Status::Fail => "! FAIL:",
                    };
                    out(format_args!("          {mark} {text}\n"));
                }
            }
        }
        out(format_args!(
            "{} problem{}, {} warning{}.\n",
            fails,
            if fails == 1 { "" } else { "s" },
            warns,
            if warns == 1 { "" } else { "s" }
        ));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The web client this binary embeds and serves: its bundle's SHA-256, for comparing with the
/// page's About box (and `/about.json`): a page showing another hash was not served by this
/// binary.
fn web_client() -> Check {
    use conclave_server::web::assets;
    let mut c = Check::new("web client");
    let hash = assets::bundle_sha256();
    if assets::built() {
        c.ok(format!(
            "{} files embedded; the page's About box must show this hash",
            assets::ASSETS.len()
        ));
        c.summary(format!("bundle SHA-256 {hash}"))
    } else {
        // Not a warning: native clients are unaffected, and the page says what to do.
        c.ok(
            "this binary embeds no web client (it was built without Node.js): browsers get a page that says how to build it",
        );
        c.summary(format!("not built (placeholder page, SHA-256 {hash})"))
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn out(text: std::fmt::Arguments<'_>) {
    let _ = std::io::stdout().lock().write_fmt(text);
}

// ---------------------------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------------------------

fn mode_text(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Keys and secrets: readable by their owner only. Folders holding them: closed to others.
fn permissions(dir: &Path) -> Check {
    let mut c = Check::new("permissions");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::metadata(dir) {
        Ok(m) => {
            if m.mode() & 0o077 != 0 {
                c.warn(format!(
                    "the data directory {} is {}: others can list it; chmod 700 {}",
                    dir.display(),
                    mode_text(m.mode()),
                    dir.display()
                ));
            } else {
                c.ok(format!("{} is {}", dir.display(), mode_text(m.mode())));
            }
            if m.uid() != me {
                c.warn(format!(
                    "the data directory belongs to uid {}, not to you (uid {me}); run doctor as the server's user",
                    m.uid()
                ));
            }
        }
        Err(e) => c.fail(format!("cannot read {}: {e}", dir.display())),
    }
    let key = Path::new(tls::TLS_DIR).join(tls::KEY_FILE);
    let secrets: Vec<(PathBuf, &str, bool)> = vec![
        (key, "the TLS private key", true),
        (
            PathBuf::from(conclave_server::at_rest::DATA_KEY_FILE),
            "the data key",
            false,
        ),
        (
            PathBuf::from(conclave_server::store::DB_FILE),
            "the database",
            false,
        ),
        (
            PathBuf::from(format!("{}-wal", conclave_server::store::DB_FILE)),
            "the database's WAL",
            false,
        ),
        (
            PathBuf::from(format!("{}-shm", conclave_server::store::DB_FILE)),
            "the database's shared memory",
            false,
        ),
        (
            PathBuf::from(conclave_server::admin_socket::SOCKET_FILE),
            "the admin socket",
            false,
        ),
    ];
    let passphrase = dir.join(conclave_server::at_rest::SALT_FILE).exists();
    let (mut readable, mut missing, mut lost_key) = (0usize, 0usize, false);
    for (rel, what, required) in secrets {
        let path = dir.join(&rel);
        match std::fs::symlink_metadata(&path) {
            Ok(m) => {
                if m.mode() & 0o077 != 0 {
                    readable += 1;
                    c.fail(format!(
                        "{} ({what}) is {}: others on this machine can read it; chmod 600 {}",
                        rel.display(),
                        mode_text(m.mode()),
                        path.display()
                    ));
                } else {
                    c.ok(format!("{} is {}", rel.display(), mode_text(m.mode())));
                }
            }
            Err(_) if required => {
                missing += 1;
                c.fail(format!(
                    "{} ({what}) is missing: start the server once to create it",
                    rel.display()
                ))
            }
            Err(_) => {}
        }
    }
    if !dir.join(conclave_server::at_rest::DATA_KEY_FILE).exists()
        && !passphrase
        && dir.join(conclave_server::store::DB_FILE).exists()
    {
        lost_key = true;
        c.fail("there is a database but neither data.key nor data.salt: the data key is lost");
    }
    for sub in [tls::TLS_DIR, conclave_server::audit::AUDIT_DIR, FILES_DIR] {
        let path = dir.join(sub);
        if let Ok(m) = std::fs::metadata(&path) {
            if m.mode() & 0o077 != 0 {
                c.warn(format!(
                    "{sub}/ is {}: close it to others (chmod 700 {})",
                    mode_text(m.mode()),
                    path.display()
                ));
            }
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let Ok(m) = entry.metadata() else { continue };
                let name = entry.file_name().to_string_lossy().to_string();
                // The certificate is public by nature; the key was checked above.
                if sub == tls::TLS_DIR && (name == tls::CERT_FILE || name == tls::KEY_FILE) {
                    continue;
                }
                if m.is_file() && m.mode() & 0o077 != 0 {
                    readable += 1;
                    c.fail(format!(
                        "{sub}/{name} is {}: others can read it; chmod 600 {}",
                        mode_text(m.mode()),
                        entry.path().display()
                    ));
                }
            }
        }
    }
    let summary = match c.status {
        Status::Ok => "keys and secrets are private to their owner".to_string(),
        Status::Fail => {
            // The verdict names what the failures are, so it agrees with the details.
            let mut parts = Vec::new();
            if readable > 0 {
                parts.push(format!("{readable} secret(s) readable by others"));
            }
            if missing > 0 {
                parts.push(format!("{missing} secret(s) missing"));
            }
            if lost_key {
                parts.push("the data key is lost".to_string());
            }
            if parts.is_empty() {
                parts.push("the data directory cannot be read".to_string());
            }
            parts.join("; ")
        }
        Status::Warn => "secrets are private; some folders are open to others".to_string(),
    };
    c.summary(summary)
}

// ---------------------------------------------------------------------------------------------
// The certificate
// ---------------------------------------------------------------------------------------------

/// What doctor reads from a certificate.
#[derive(Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: jiff::Timestamp,
    pub not_after: jiff::Timestamp,
    /// "ECDSA P-256", "Ed25519", "RSA 2048", or the algorithm's OID.
    pub key_type: String,
    /// Whether the key type is strong enough.
    pub key_ok: bool,
    /// The DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

/// A DER element: its tag, its contents, the whole encoding, and what follows it.
type Element<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// Reads one DER element off the front of `input`.
fn der(input: &[u8]) -> Option<Element<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((tag, &rest[..len], &input[..header + len], &rest[len..]))
}

fn der_time(tag: u8, v: &[u8]) -> Option<jiff::Timestamp> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.strip_suffix('Z')?;
    let full = match tag {
        // UTCTime: YYMMDDHHMMSS, years 1950-2049.
        0x17 => {
            let yy: i32 = s.get(..2)?.parse().ok()?;
            let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
            format!("{year}{}", s.get(2..)?)
        }
        0x18 => s.to_string(),
        _ => return None,
    };
    if full.len() != 14 || !full.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    t.parse().ok()
}

const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// Reads validity and the public key's type from an X.509 certificate (DER).
pub fn cert_info(cert: &[u8]) -> Option<CertInfo> {
    let (0x30, cert, _, _) = der(cert)? else {
        return None;
    };
    let (0x30, tbs, _, _) = der(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version, if present.
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.3;
    }
    let (_, _, _, rest) = der(rest)?; // serialNumber
    let (_, _, _, rest) = der(rest)?; // signature algorithm
    let (_, _, _, rest) = der(rest)?; // issuer
    let (0x30, validity, _, rest) = der(rest)? else {
        return None;
    };
    let (t1, nb, _, vrest) = der(validity)?;
    let (t2, na, _, _) = der(vrest)?;
    let (_, _, _, rest) = der(rest)?; // subject
    let (0x30, spki_body, spki, _) = der(rest)? else {
        return None;
    };
    let (0x30, alg, _, key_rest) = der(spki_body)? else {
        return None;
    };
    let (0x06, oid, _, params) = der(alg)? else {
        return None;
    };
    let param_oid = der(params).filter(|p| p.0 == 0x06).map(|p| p.1);
    let (key_type, key_ok) = if oid == OID_EC {
        match param_oid {
            Some(p) if p == OID_P256 => ("ECDSA P-256".to_string(), true),
            Some(p) if p == OID_P384 => ("ECDSA P-384".to_string(), true),
            _ => ("ECDSA (another curve)".to_string(), false),
        }
    } else if oid == OID_ED25519 {
        ("Ed25519".to_string(), true)
    } else if oid == OID_RSA {
        let bits = der(key_rest)
            .filter(|k| k.0 == 0x03)
            .and_then(|(_, bits, _, _)| der(bits.get(1..)?))
            .and_then(|(_, seq, _, _)| der(seq))
            .map(|(_, modulus, _, _)| {
                let m = modulus.strip_prefix(&[0]).unwrap_or(modulus);
                m.len() * 8
            })
            .unwrap_or(0);
        (format!("RSA {bits}"), bits >= 2048)
    } else {
        (
            format!("unknown key algorithm (OID {})", hex::encode(oid)),
            false,
        )
    };
    Some(CertInfo {
        not_before: der_time(t1, nb)?,
        not_after: der_time(t2, na)?,
        key_type,
        key_ok,
        spki: spki.to_vec(),
    })
}

fn certificate(dir: &Path) -> Check {
    let mut c = Check::new("certificate");
    let cert_path = dir.join(tls::TLS_DIR).join(tls::CERT_FILE);
    let key_path = dir.join(tls::TLS_DIR).join(tls::KEY_FILE);
    let cert = match CertificateDer::from_pem_file(&cert_path) {
        Ok(cert) => cert,
        Err(e) => {
            c.fail(format!("cannot read {}: {e}", cert_path.display()));
            return c.summary("no readable certificate");
        }
    };
    let Some(info) = cert_info(&cert) else {
        c.fail(format!(
            "{} is not a certificate doctor can read",
            cert_path.display()
        ));
        return c.summary("unreadable certificate");
    };
    let fingerprint = tls::fingerprint(&cert);
    c.ok(format!(
        "SHA-256 {}",
        tls::display_fingerprint(&fingerprint)
    ));
    let now = jiff::Timestamp::now();
    let days_left = (info.not_after.as_second() - now.as_second()) / 86_400;
    if info.not_after <= now {
        c.fail(format!(
            "expired on {}: clients refuse it; move tls/ away and restart to make a new one (clients will see a new fingerprint)",
            info.not_after
        ));
    } else if days_left < EXPIRY_WARNING_DAYS {
        c.warn(format!(
            "expires in {days_left} days, on {}",
            info.not_after
        ));
    } else {
        c.ok(format!("valid until {} ({days_left} days)", info.not_after));
    }
    if info.not_before > now {
        c.warn(format!(
            "not valid before {} (is this machine's clock right?)",
            info.not_before
        ));
    }
    if info.key_ok {
        c.ok(format!("key type {}", info.key_type));
    } else {
        c.fail(format!(
            "key type {}: too weak or unknown; use ECDSA P-256, Ed25519 or RSA of 2048 bits or more",
            info.key_type
        ));
    }
    match PrivateKeyDer::from_pem_file(&key_path) {
        Ok(key) => match rustls::crypto::aws_lc_rs::sign::any_supported_type(&key) {
            Ok(signer) => match signer.public_key() {
                Some(spki) if spki.as_ref() == info.spki.as_slice() => {
                    c.ok("the private key matches the certificate")
                }
                Some(_) => c.fail(
                    "the private key does not match the certificate: the server cannot prove who it is",
                ),
                None => c.warn("cannot tell whether the private key matches the certificate"),
            },
            Err(e) => c.fail(format!("{}: unusable key: {e}", key_path.display())),
        },
        Err(e) => c.fail(format!("cannot read {}: {e}", key_path.display())),
    }
    let summary = format!("{}, valid {} more days", info.key_type, days_left.max(0));
    c.summary(summary)
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

fn settings(dir: &Path, config_file: Option<&Path>, running: Option<&Value>) -> Check {
    let mut c = Check::new("settings");
    let config = match Config::load(dir, config_file) {
        Ok(config) => config,
        Err(e) => {
            c.fail(format!("{e}"));
            return c.summary("the configuration does not load");
        }
    };
    let server = running.map(|r| &r["server"]);
    // What the running server says wins (the command line may have changed it).
    let listen: SocketAddr = server
        .and_then(|s| s["listen"].as_str())
        .and_then(|l| l.parse().ok())
        .unwrap_or(config.listen);
    let registration = server
        .and_then(|s| s["registration"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| config.registration.effective(listen).as_str().to_string());
    let password = server.and_then(|s| s["server_password"].as_bool());
    let exposed = !listen.ip().is_loopback();
    if registration == RegistrationPolicy::Open.as_str() && exposed {
        match password {
            Some(true) => c.ok(format!(
                "registration is open on {listen}, behind a server password"
            )),
            Some(false) => c.fail(format!(
                "registration is open on {listen} without a server password: anyone who can reach it can make an account; use --registration invite or closed, or --server-password-env"
            )),
            None => c.fail(format!(
                "registration is open on {listen}: unless the server is started with --server-password-env, anyone who can reach it can make an account (start it and run doctor again to check)"
            )),
        }
    } else {
        c.ok(format!("registration {registration} on {listen}"));
    }
    let l = &config.limits;
    let sec = &config.security;
    let mut off = |cond: bool, text: &str| {
        if cond {
            c.warn(text.to_string());
        }
    };
    off(
        !sec.auto_ban,
        "security.auto_ban = false: connection floods and login-failure bursts are not banned",
    );
    off(
        !config.anomaly.enabled,
        "anomaly.enabled = false: no anomaly alerts or bans",
    );
    off(
        l.requests_per_second >= 10_000 || l.request_burst >= 100_000,
        "limits.requests_per_second / request_burst are so high there is in effect no request rate limit",
    );
    off(
        sec.connections_per_ip_per_minute >= 100_000,
        "security.connections_per_ip_per_minute is so high there is in effect no connection rate limit",
    );
    off(
        sec.max_connections_per_ip as usize >= l.max_connections,
        "security.max_connections_per_ip is at least limits.max_connections: one address can take every slot",
    );
    off(
        sec.login_failures_per_account >= 1000 || sec.login_failures_per_ip >= 100_000,
        "login lock-out is in effect off (security.login_failures_per_account / per_ip are very high)",
    );
    off(
        l.max_frame_bytes > 64 * 1024 * 1024,
        "limits.max_frame_bytes is over 64 MiB: one client can make the server allocate that much",
    );
    off(
        l.outbound_queue_frames > 1_000_000,
        "limits.outbound_queue_frames is over a million: slow clients can hold a lot of memory",
    );
    off(
        l.handshake_timeout_ms > 60_000 || l.login_timeout_ms > 600_000,
        "handshake or login timeouts are very long: idle unauthenticated connections stay",
    );
    off(
        l.idle_timeout_ms > 86_400_000,
        "limits.idle_timeout_ms is over a day: dead connections stay",
    );
    let metrics = server
        .and_then(|s| s["metrics_listen"].as_str())
        .and_then(|m| m.parse::<SocketAddr>().ok())
        .or(config.metrics.listen);
    if let Some(m) = metrics
        && !m.ip().is_loopback()
    {
        c.warn(format!(
            "metrics are served on {m}, beyond loopback, without authentication"
        ));
    }
    let warns = c.findings.iter().filter(|f| f.0 == Status::Warn).count();
    let summary = match c.status {
        Status::Ok => "no risky settings".to_string(),
        Status::Warn => format!("{warns} risky setting(s)"),
        Status::Fail => "a risky setting must change".to_string(),
    };
    c.summary(summary)
}

// ---------------------------------------------------------------------------------------------
// The running server
// ---------------------------------------------------------------------------------------------

/// The running server's `monitor` answer, if one runs on this data directory.
fn server_info(dir: &Path) -> Option<Value> {
    if !crate::admin::server_running(dir) {
        return None;
    }
    crate::admin::request(dir, &json!({"cmd": "monitor", "limit": 0, "alerts": 10}))
        .ok()
        .filter(|v| v["ok"] == true)
}

fn running_server(running: Option<&Value>) -> Check {
    let mut c = Check::new("server");
    let Some(v) = running else {
        c.ok(
            "no server runs on this data directory (or not as this OS user): checked at rest only",
        );
        return c.summary("not running");
    };
    let s = &v["server"];
    let t = &v["totals"];
    c.ok(format!(
        "version {} on {}, up {} s, {} connection(s)",
        s["version"].as_str().unwrap_or("?"),
        s["listen"].as_str().unwrap_or("?"),
        s["uptime_s"],
        t["connections"]
    ));
    let alerts = v["alerts"].as_array().map_or(0, Vec::len);
    if alerts > 0 {
        c.warn(format!(
            "{alerts} recent anomaly alert(s): see `conclave monitor` or `conclave logs --kind alert`"
        ));
    }
    let summary = format!("running, {} connection(s)", t["connections"]);
    c.summary(summary)
}

// ---------------------------------------------------------------------------------------------
// Plaintext at rest
// ---------------------------------------------------------------------------------------------

/// Where `needle` occurs in `path` (byte offsets, at most a few), reading in bounded pieces.
fn find_in_file(path: &Path, needle: &[u8]) -> std::io::Result<Vec<u64>> {
    let mut f = std::fs::File::open(path)?;
    let mut found = Vec::new();
    let keep = needle.len().saturating_sub(1);
    let mut buf = vec![0u8; SCAN_CHUNK_BYTES + keep];
    let mut carried = 0usize;
    let mut base: u64 = 0;
    loop {
        let n = f.read(&mut buf[carried..])?;
        if n == 0 {
            break;
        }
        let len = carried + n;
        for (i, w) in buf[..len].windows(needle.len()).enumerate() {
            if w == needle {
                found.push(base + i as u64);
                if found.len() >= 5 {
                    return Ok(found);
                }
            }
        }
        let tail = len.min(keep);
        buf.copy_within(len - tail..len, 0);
        base += (len - tail) as u64;
        carried = tail;
    }
    Ok(found)
}

/// The files scanned for plaintext: the database, its WAL, the file store and the audit log.
fn scanned_files(dir: &Path) -> Vec<PathBuf> {
    let db = conclave_server::store::DB_FILE;
    let mut files: Vec<PathBuf> = [db.to_string(), format!("{db}-wal"), format!("{db}-journal")]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .collect();
    let mut stack = vec![
        dir.join(FILES_DIR),
        dir.join(conclave_server::audit::AUDIT_DIR),
    ];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if files.len() >= MAX_SCANNED_FILES {
                return files;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files
}

fn plaintext_at_rest(dir: &Path, running: bool) -> Check {
    let mut c = Check::new("plaintext_at_rest");
    let planted = if running {
        match crate::admin::request(dir, &json!({"cmd": "canary"})).and_then(crate::admin::ok) {
            Ok(v) => v["canary"].as_str().map(str::to_string),
            Err(e) => {
                c.warn(format!("the server did not store a canary: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    match &planted {
        Some(_) => c.ok("a fresh canary message was stored (sealed, committed) by the server"),
        None if !running => c.ok(
            "the server is not running: scanned for canaries stored by earlier runs only (run doctor while it serves for a fresh one)",
        ),
        None => {}
    }
    let files = scanned_files(dir);
    let mut needles: Vec<&[u8]> = vec![canary::PREFIX.as_bytes()];
    if let Some(p) = &planted {
        needles.push(p.as_bytes());
    }
    let mut hits = 0;
    for f in &files {
        for needle in &needles {
            match find_in_file(f, needle) {
                Ok(at) if !at.is_empty() => {
                    hits += 1;
                    let rel = f.strip_prefix(dir).unwrap_or(f);
                    c.fail(format!(
                        "canary text in plaintext in {} at byte {}: message text reached the disk unencrypted",
                        rel.display(),
                        at[0]
                    ));
                    break;
                }
                Ok(_) => {}
                Err(e) => c.warn(format!("cannot read {}: {e}", f.display())),
            }
        }
    }
    c.ok(format!(
        "{} file(s) scanned: the database, its WAL, the file store and the audit log",
        files.len()
    ));
    let summary = if hits > 0 {
        format!("plaintext found in {hits} file(s)")
    } else if planted.is_some() {
        "a fresh canary's text is nowhere on disk".to_string()
    } else {
        "no canary text on disk".to_string()
    };
    c.summary(summary)
}

// ---------------------------------------------------------------------------------------------
// The live TLS probe
// ---------------------------------------------------------------------------------------------

/// Accepts any certificate and keeps it: the probe reports the fingerprint and compares it
/// itself. Signatures are still checked, so the server must hold the certificate's key.
#[derive(Debug, Default)]
struct Capture(Mutex<Option<Vec<u8>>>);

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut c) = self.0.lock() {
            *c = Some(end_entity.to_vec());
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

struct Probe {
    version: String,
    cipher: String,
    /// The key exchange group, e.g. `X25519MLKEM768`.
    kx: &'static str,
    cert: Option<Vec<u8>>,
    hello: Result<(), String>,
}

/// The key exchange groups a probe offers: everything Conclave offers, or only classical X25519
/// (as an older client does).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Offer {
    Ours,
    ClassicalOnly,
}

/// One TLS handshake offering only `version` (and the groups of `offer`); then the protocol
/// hello.
fn probe(
    addr: SocketAddr,
    host: &str,
    version: &'static rustls::SupportedProtocolVersion,
    offer: Offer,
) -> anyhow::Result<Probe> {
    let capture = Arc::new(Capture::default());
    let mut provider = (*tls::provider()).clone();
    if offer == Offer::ClassicalOnly {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .context("TLS configuration")?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("localhost".to_string()))
        .context("server name")?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).context("TLS client")?;
    let tcp = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_read_timeout(Some(PROBE_TIMEOUT))?;
    tcp.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .context("TLS handshake")?;
    }
    let version = tls
        .conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .replace("TLSv1_3", "TLS 1.3")
        .replace("TLSv1_2", "TLS 1.2");
    let cipher = tls
        .conn
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or("?")
        .to_string();
    let kx = tls::kx_group_name(tls.conn.negotiated_key_exchange_group().map(|g| g.name()));
    let hello = exchange_hellos(&mut tls);
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    let cert = capture.0.lock().ok().and_then(|c| c.clone());
    Ok(Probe {
        version,
        cipher,
        kx,
        cert,
        hello,
    })
}

/// Sends our protocol hello and reads the server's.
fn exchange_hellos(tls: &mut (impl Read + Write)) -> Result<(), String> {
    use conclave_proto::hello::{self, HELLO_BYTES, HelloStatus};
    tls.write_all(&hello::encode(
        conclave_proto::PROTOCOL_VERSION,
        HelloStatus::Ok,
    ))
    .map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut theirs = [0u8; HELLO_BYTES];
    tls.read_exact(&mut theirs).map_err(|e| e.to_string())?;
    match hello::decode(&theirs) {
        Ok(h) if h.status == HelloStatus::Ok => Ok(()),
        Ok(h) => Err(format!("the server answered the hello with {:?}", h.status)),
        Err(e) => Err(format!("not a conclave hello: {e}")),
    }
}

fn tls_probe(server: &str, dir: &Path) -> Check {
    let mut c = Check::new("tls_probe");
    let addr = match server.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            c.fail(format!(
                "{server:?} is not HOST:PORT that resolves (for example 127.0.0.1:7667)"
            ));
            return c.summary("bad address");
        }
    };
    let host = server
        .rsplit_once(':')
        .map_or(server, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut fingerprint = None;
    let mut reached = false;
    let mut kx = None;
    match probe(addr, host, &rustls::version::TLS13, Offer::Ours) {
        Ok(p) => {
            reached = true;
            c.ok(format!("{} with {}", p.version, p.cipher));
            if tls::is_post_quantum(p.kx) {
                c.ok(format!(
                    "key exchange {} (post-quantum hybrid: X25519 and ML-KEM-768)",
                    p.kx
                ));
            } else {
                c.warn(format!(
                    "key exchange {} is classical although X25519MLKEM768 was offered: traffic recorded now could be decrypted by a future quantum computer. Upgrade the server (or whatever terminates TLS in front of it) to one that offers X25519MLKEM768",
                    p.kx
                ));
            }
            kx = Some(p.kx);
            if let Some(cert) = &p.cert {
                let fp = tls::fingerprint(cert);
                c.ok(format!(
                    "certificate SHA-256 {}",
                    tls::display_fingerprint(&fp)
                ));
                let local = dir.join(tls::TLS_DIR).join(tls::CERT_FILE);
                if let Ok(ours) = tls::cert_file_fingerprint(&local) {
                    if ours == fp {
                        c.ok("the same certificate as in the data directory");
                    } else {
                        c.fail(format!(
                            "the server at {server} shows another certificate than {} ({}): it is not the server of this data directory, or something is in between",
                            local.display(),
                            tls::display_fingerprint(&ours)
                        ));
                    }
                }
                fingerprint = Some(fp);
            }
            match p.hello {
                Ok(()) => c.ok(format!(
                    "protocol hello answered (version {})",
                    conclave_proto::PROTOCOL_VERSION
                )),
                Err(e) => c.fail(format!("the protocol hello failed: {e}")),
            }
        }
        Err(e) => c.fail(format!("TLS 1.3 handshake with {addr} failed: {e:#}")),
    }
    // Only meaningful once the server was reached at all.
    if reached {
        match probe(addr, host, &rustls::version::TLS13, Offer::ClassicalOnly) {
            Ok(p) if p.hello.is_ok() => c.ok(format!(
                "a client offering only X25519 is still served (with {})",
                p.kx
            )),
            Ok(p) => c.warn(format!(
                "a client offering only X25519 got through TLS ({}) but not the hello: {}",
                p.kx,
                p.hello.err().unwrap_or_default()
            )),
            Err(e) => c.warn(format!(
                "a client offering only X25519 cannot connect (older clients will fail): {e:#}"
            )),
        }
        match probe(addr, host, &rustls::version::TLS12, Offer::Ours) {
            Ok(p) => c.fail(format!(
                "the server accepted {} ({}): it must offer TLS 1.3 only",
                p.version, p.cipher
            )),
            Err(_) => c.ok("TLS 1.2 refused"),
        }
    }
    let kx = kx.unwrap_or("?");
    let summary = match (&c.status, fingerprint) {
        (Status::Ok, Some(fp)) => format!("TLS 1.3 only, {kx}, {}", &fp[..16]),
        (Status::Ok, None) => format!("TLS 1.3 only, {kx}"),
        (Status::Warn, _) if !tls::is_post_quantum(kx) => {
            format!("classical key exchange {kx}: not protected against later decryption")
        }
        _ => format!("problems talking to {server}"),
    };
    c.summary(summary)
}

/// Most bytes of `/about.json` read.
const MAX_ABOUT_BYTES: u64 = 64 * 1024;

/// `GET /about.json` as a browser would (ALPN `http/1.1`); the status line and the body.
fn fetch_about(addr: SocketAddr, host: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS configuration")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Capture::default()))
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("localhost".to_string()))
        .context("server name")?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).context("TLS client")?;
    let tcp = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_read_timeout(Some(PROBE_TIMEOUT))?;
    tcp.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!(
        "GET /about.json HTTP/1.1\r\nHost: {host}:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    tls.write_all(request.as_bytes()).context("TLS handshake")?;
    let mut raw = Vec::new();
    let _ = (&mut tls).take(MAX_ABOUT_BYTES).read_to_end(&mut raw);
    if tls.conn.alpn_protocol() != Some(b"http/1.1") {
        anyhow::bail!("the server does not serve the web client (no HTTP by ALPN)");
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP response")?;
    let status = String::from_utf8_lossy(&raw[..split])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    Ok((status, raw[split + 4..].to_vec()))
}

/// The web client the server at `server` serves, against the one this binary embeds.
fn web_probe(server: &str) -> Check {
    use conclave_server::web::assets;
    let mut c = Check::new("web client served");
    let Ok(Some(addr)) = server.to_socket_addrs().map(|mut a| a.next()) else {
        c.fail(format!("{server:?} is not HOST:PORT that resolves"));
        return c.summary("bad address");
    };
    let host = server
        .rsplit_once(':')
        .map_or(server, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let about = match fetch_about(addr, host) {
        Ok((status, body)) if status.contains(" 200 ") => {
            serde_json::from_slice::<Value>(&body).ok()
        }
        Ok((status, _)) => {
            c.warn(format!("/about.json answered {status:?}"));
            None
        }
        Err(e) => {
            c.warn(format!("{e:#}"));
            return c.summary("not served");
        }
    };
    let Some(about) = about else {
        return c.summary("no /about.json");
    };
    let theirs = about["bundle_sha256"].as_str().unwrap_or("");
    if theirs == assets::bundle_sha256() {
        c.ok(format!(
            "bundle SHA-256 {theirs}, the one this binary embeds"
        ));
        c.summary(format!(
            "the same bundle as this binary ({})",
            &theirs[..16.min(theirs.len())]
        ))
    } else {
        c.warn(format!(
            "the server serves bundle SHA-256 {theirs}, this binary embeds {}: another build (or version) of conclave, or altered code",
            assets::bundle_sha256()
        ));
        c.summary("another bundle than this binary's")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_validity_key_type_and_public_key_of_the_servers_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = tls::load_or_create(dir.path()).expect("identity");
        let info = cert_info(&id.cert).expect("parsed");
        assert_eq!(info.key_type, "ECDSA P-256");
        assert!(info.key_ok);
        assert_eq!(info.not_before.to_string(), "2024-01-01T00:00:00Z");
        assert_eq!(info.not_after.to_string(), "2124-01-01T00:00:00Z");
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&id.key).expect("key");
        assert_eq!(
            signer.public_key().expect("spki").as_ref(),
            info.spki.as_slice()
        );
        assert_eq!(cert_info(&id.cert[..id.cert.len() - 1]), None, "truncated");
        assert_eq!(cert_info(b"garbage"), None);
    }

    #[test]
    fn utc_and_generalized_times() {
        assert_eq!(
            der_time(0x17, b"491231235959Z").map(|t| t.to_string()),
            Some("2049-12-31T23:59:59Z".into())
        );
        assert_eq!(
            der_time(0x17, b"500101000000Z").map(|t| t.to_string()),
            Some("1950-01-01T00:00:00Z".into())
        );
        assert_eq!(der_time(0x18, b"2124010100000Z"), None);
    }

    #[test]
    fn finds_text_across_chunk_boundaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let needle = b"conclave-canary:abc";
        let mut data = vec![0u8; SCAN_CHUNK_BYTES - 5];
        data.extend_from_slice(needle);
        data.extend_from_slice(&[1u8; 100]);
        std::fs::write(&p, &data).expect("write");
        assert_eq!(
            find_in_file(&p, needle).expect("scan"),
            vec![(SCAN_CHUNK_BYTES - 5) as u64]
        );
        std::fs::write(&p, b"nothing here").expect("write");
        assert!(find_in_file(&p, needle).expect("scan").is_empty());
    }
}
