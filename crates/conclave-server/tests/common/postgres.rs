//! Test kit: a throwaway PostgreSQL 15 (Debian's `postgresql` package) in a temporary directory,
//! listening on 127.0.0.1 on an ephemeral port with its Unix socket in that directory, stopped
//! (`pg_ctl stop -m immediate`, as a crash would) and removed on drop. Include it with
//! `#[path = "common/postgres.rs"] mod postgres_kit;`.
//!
//! It runs as configured for the cluster store: `fsync = on` and `synchronous_commit = on`, so
//! a commit that returned is on disk. (Only `initdb` skips its own syncs: the empty cluster it
//! writes is thrown away with the test.) Authentication is `trust`: nothing but the test's own
//! user can reach the socket directory, and the TCP listener is loopback only.
//!
//! PostgreSQL refuses to run as root: under root the kit runs `initdb`, `pg_ctl` and so the
//! server as Debian's unprivileged `postgres` system user (`runuser -u postgres --`), with the
//! temporary directory given to that user; otherwise as the current user.
//!
//! Missing binaries fail the test with how to install them (CI installs them): the PostgreSQL
//! tests never skip silently.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where Debian's PostgreSQL 15 puts its server binaries (not on anyone's `PATH`).
const DEBIAN_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The superuser `initdb` creates, and the role the tests connect as.
pub const SUPERUSER: &str = "conclave";
/// The system user the server runs as when the tests run as root.
const UNPRIVILEGED_USER: &str = "postgres";
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_WAIT_S: &str = "30";
/// Attempts at finding a free port (another process may take the one we found).
const START_ATTEMPTS: usize = 3;

pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_postgres: bool,
    running: bool,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `$CONCLAVE_PG_BIN`, or Debian's.
fn find_bin_dir() -> PathBuf {
    const INSTALL: &str = "Install PostgreSQL 15 with `sudo apt-get install -y postgresql` \
                           (Debian bookworm; .ci/run does), or point CONCLAVE_PG_BIN at the \
                           directory holding initdb, pg_ctl and postgres";
    let dir = std::env::var_os("CONCLAVE_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_BIN_DIR));
    for bin in ["initdb", "pg_ctl", "postgres"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing, and the PostgreSQL store tests need a real server. {INSTALL}",
            dir.join(bin).display()
        );
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl PgServer {
    /// Creates a cluster in a new temporary directory and starts it on a free loopback port.
    pub fn start() -> PgServer {
        let bin = find_bin_dir();
        let dir = tempfile::tempdir().expect("temporary directory");
        let as_postgres = running_as_root();
        if as_postgres {
            let out = Command::new("chown")
                .arg(format!("{UNPRIVILEGED_USER}:"))
                .arg(dir.path())
                .output()
                .expect("run chown");
            assert!(
                out.status.success(),
                "could not give {} to the `{UNPRIVILEGED_USER}` user (PostgreSQL refuses to run \
                 as root; Debian's postgresql package creates that user): {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut server = PgServer {
            port: 0,
            bin,
            dir,
            as_postgres,
            running: false,
        };
        server.initdb();
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            match server.pg_ctl_start() {
                Ok(()) => return server,
                Err(e) if attempt == START_ATTEMPTS => panic!("{e}"),
                Err(_) => continue,
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection string over loopback TCP.
    pub fn tcp_config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
            self.port
        )
    }

    /// A connection string over the Unix socket.
    pub fn socket_config(&self) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname=postgres",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Runs one of the PostgreSQL binaries, as the `postgres` user under root.
    fn run(&self, bin: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(bin);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", UNPRIVILEGED_USER, "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", exe.display()))
    }

    fn initdb(&self) {
        let data = self.data_dir();
        let data = data.to_str().expect("temporary path is UTF-8");
        let out = self.run(
            "initdb",
            &[
                "-D",
                data,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.dir.path().join("postgres.log");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=on -c synchronous_commit=on \
             -c max_connections=20 -c shared_buffers=16MB",
            self.port,
            self.socket_dir().display()
        );
        let out = self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                data.to_str().expect("temporary path is UTF-8"),
                "-l",
                log.to_str().expect("temporary path is UTF-8"),
                "-w",
                "-t",
                PG_CTL_WAIT_S,
                "-o",
                &options,
            ],
        );
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!(
            "PostgreSQL did not start on port {}: {}{}\n{tail}",
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Stops the server at once (`-m immediate`: no checkpoint, as a crash would).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let data = self.data_dir();
        let _ = self.run(
            "pg_ctl",
            &[
                "stop",
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "-t",
                PG_CTL_WAIT_S,
            ],
        );
    }

    /// Starts it again on the same port and data (after [`PgServer::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.pg_ctl_start() {
            panic!("{e}");
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
