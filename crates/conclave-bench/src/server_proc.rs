//! The Conclave server that bench starts itself: the real `conclave serve` as a child process
//! (so it is measured alone, with its own CPU time and memory), on 127.0.0.1 with an ephemeral
//! port, in a temporary data directory, with benchmark accounts created on the data directory
//! beforehand and a config that relaxes the limits meant for hostile clients.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use argon2::password_hash::PasswordHasher;
use conclave_server::store::StoreError;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::BenchError;
use crate::conclave_driver::{BENCH_PASSWORD, account};

/// Bound on the server's start (up to its "serving on" line).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a graceful stop before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the generated `conclave.toml` changes from the defaults, and why. Printed with every
/// report of a started server.
pub const RELAXED: &[(&str, &str, &str)] = &[
    (
        "limits.max_connections",
        "200000",
        "default 50000; idle-50k needs a few more",
    ),
    (
        "limits.requests_per_second",
        "1000000",
        "default 50 per connection; senders at full speed exceed it by design",
    ),
    ("limits.request_burst", "1000000", "default 200"),
    (
        "security.max_connections_per_ip",
        "200000",
        "default 64; every client comes from 127.0.0.0/8",
    ),
    (
        "security.connections_per_ip_per_minute",
        "10000000",
        "default 120",
    ),
    (
        "security.flood_refusals_per_ip",
        "1000000",
        "default 60 (never reached once the above are relaxed)",
    ),
    (
        "security.auto_ban",
        "false",
        "default true; a benchmark must not ban loopback",
    ),
];

fn config_toml() -> String {
    let mut limits = String::from("[limits]\n");
    let mut security = String::from("[security]\n");
    for (key, value, why) in RELAXED {
        let (section, name) = key.split_once('.').unwrap_or(("", key));
        let line = format!("{name} = {value}  # {why}\n");
        match section {
            "limits" => limits.push_str(&line),
            _ => security.push_str(&line),
        }
    }
    format!(
        "# Written by `conclave bench` for a benchmark on loopback: limits meant for hostile\n\
         # clients are relaxed so the load generator meets the server, not its protections.\n\
         # Never use these values on a real server.\n\
         registration = \"open\"\n\n{limits}\n{security}"
    )
}

/// An Argon2id hash of [`BENCH_PASSWORD`] with the smallest parameters (8 KiB, 1 pass), so a
/// login measures the server's connection handling, not password hashing. The server reads
/// the parameters from each hash, so it verifies these at that cost.
fn cheap_hash() -> Result<String, BenchError> {
    let params = argon2::Params::new(argon2::Params::MIN_M_COST, 1, 1, None)
        .map_err(|e| BenchError::Setup(format!("argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    argon
        .hash_password(BENCH_PASSWORD.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| BenchError::Setup(format!("hashing the benchmark password: {e}")))
}

/// Creates accounts `bench0` .. `bench{n-1}` on a data directory (existing ones are kept), with
/// no room memberships. Blocking: SQLite.
pub fn create_accounts(data_dir: &Path, n: usize) -> Result<(), BenchError> {
    let config = conclave_server::Config::new(data_dir);
    let mut db = conclave_server::server::open_db(&config).map_err(|e| {
        BenchError::Setup(format!(
            "cannot open the data directory {}: {e}",
            data_dir.display()
        ))
    })?;
    let hash = cheap_hash()?;
    for i in 0..n {
        match db.create_user(&account(i), &hash, false) {
            Ok(()) | Err(StoreError::Exists) => {}
            Err(e) => {
                return Err(BenchError::Setup(format!(
                    "cannot create account {}: {e}",
                    account(i)
                )));
            }
        }
    }
    Ok(())
}

/// A running `conclave serve` child.
pub struct ServerProc {
    child: Child,
    pub pid: u32,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub fingerprint: String,
    pub pinned: bool,
    dir: tempfile::TempDir,
}

fn taskset_exists() -> bool {
    std::process::Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl ServerProc {
    /// Prepares a data directory with `clients` accounts and starts `bin serve` on it, pinned
    /// to CPU 0 when `pin` (and taskset exists).
    pub async fn start(bin: PathBuf, clients: usize, pin: bool) -> Result<ServerProc, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("conclave-bench-")
            .tempdir()
            .map_err(|e| BenchError::Setup(format!("cannot make a temporary directory: {e}")))?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)
            .and_then(|()| {
                std::fs::write(
                    data.join(conclave_server::config::CONFIG_FILE),
                    config_toml(),
                )
            })
            .map_err(|e| BenchError::Setup(format!("cannot write the server config: {e}")))?;
        let d = data.clone();
        tokio::task::spawn_blocking(move || create_accounts(&d, clients))
            .await
            .map_err(|e| BenchError::Setup(format!("account creation failed: {e}")))??;

        let pinned = pin && taskset_exists();
        let mut cmd = if pinned {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("0").arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let log = std::fs::File::create(dir.path().join("server.log"))
            .map_err(|e| BenchError::Setup(format!("cannot create the server log: {e}")))?;
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            // Logging every connection would be measured too; warnings still reach the log.
            .env("CONCLAVE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and only changes this child's own settings. If
        // bench dies without dropping the child (Ctrl-C, a kill), the kernel stops the server
        // too instead of leaving it running.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            BenchError::Setup(format!("cannot start the server {}: {e}", bin.display()))
        })?;
        let pid = child.id().unwrap_or(0);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Setup("the server's output is not readable".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("serving on ").nth(1) {
                    return rest.split_whitespace().next().map(str::to_string);
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            return Err(BenchError::Setup(format!(
                "the server did not start within {} s; its log says:\n{}",
                START_TIMEOUT.as_secs(),
                log.lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        };
        // Keep its stdout drained so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let cert = data
            .join(conclave_server::tls::TLS_DIR)
            .join(conclave_server::tls::CERT_FILE);
        let fingerprint = conclave_server::tls::cert_file_fingerprint(&cert)
            .map_err(|e| BenchError::Setup(format!("server certificate: {e}")))?;
        Ok(ServerProc {
            child,
            pid,
            addr,
            fingerprint,
            pinned,
            dir,
        })
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// SIGTERM, a bounded wait for the graceful stop, then SIGKILL.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid)
            && pid > 0
        {
            // SAFETY: kill only sends a signal, to the child we started.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_is_accepted_by_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, config_toml()).unwrap();
        let config = conclave_server::Config::load(dir.path(), Some(&path)).expect("valid config");
        assert_eq!(config.limits.requests_per_second, 1_000_000);
        assert_eq!(config.security.max_connections_per_ip, 200_000);
        assert!(!config.security.auto_ban);
    }

    #[test]
    fn cheap_hashes_verify_with_the_server_code() {
        let hash = cheap_hash().unwrap();
        assert!(conclave_server::accounts::verify_password(
            BENCH_PASSWORD,
            &hash
        ));
        assert!(!conclave_server::accounts::verify_password("wrong", &hash));
    }
}
