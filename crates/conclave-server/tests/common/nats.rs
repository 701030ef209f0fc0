//! Test kit: a throwaway `nats-server` on an ephemeral loopback port, its log in a temporary
//! directory, killed on drop. Include it with `#[path = "common/nats.rs"] mod nats;`.
//!
//! A missing `nats-server` fails the test with how to install it (CI installs it): the bus
//! tests never skip silently.
#![allow(dead_code)]

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at finding a free port (another process may take the one we found).
const START_ATTEMPTS: usize = 3;

pub struct NatsServer {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Where `nats-server` is: `$CONCLAVE_NATS_SERVER`, `PATH`, or Debian's `/usr/sbin` (not on a
/// normal user's `PATH`).
fn find_binary() -> PathBuf {
    const INSTALL: &str = "Install it with `sudo apt-get install -y nats-server` (Debian/Ubuntu; \
                           .ci/run does), or point CONCLAVE_NATS_SERVER at the binary";
    if let Some(p) = std::env::var_os("CONCLAVE_NATS_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CONCLAVE_NATS_SERVER names {}, which is not a file. {INSTALL}",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into()]);
    for d in dirs {
        let candidate = d.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server is not installed, and the bus tests need a real one. {INSTALL}");
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

impl NatsServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> NatsServer {
        let bin = find_binary();
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut server = NatsServer {
            port: 0,
            bin,
            dir,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) if attempt == START_ATTEMPTS => panic!("{e}"),
                Err(_) => continue,
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (after [`NatsServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("nats.log");
        let mut child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("could not run {}: {e}", self.bin.display()))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "nats-server exited ({status}) on port {}: {tail}",
                    self.port
                ));
            }
            // Ready once it greets a client with its INFO line.
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut hello = [0u8; 4];
                if s.read_exact(&mut hello).is_ok() && &hello == b"INFO" {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "nats-server did not accept connections on port {} within {:?}",
                    self.port, READY_TIMEOUT
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
