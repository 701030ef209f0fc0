//! Harness for end-to-end tests of the real `conclave` binary: child processes that are killed
//! when dropped, stdout read line by line with deadlines, a server started on an ephemeral
//! loopback port of a temporary data directory, and JSON-lines clients.
#![allow(dead_code)]

pub mod relay;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Upper bound for any single wait.
pub const WAIT: Duration = Duration::from_secs(10);
/// Upper bound on the lines a test skips while looking for one.
const MAX_SKIPPED_LINES: usize = 10_000;
/// How often exit is polled.
const POLL: Duration = Duration::from_millis(10);

/// Environment variable that carries a client's password.
pub const PW_VAR: &str = "CONCLAVE_TEST_PW";
/// A password that satisfies the server's rules.
pub const PW: &str = "correct horse battery";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_conclave")
}

/// `conclave ARGS` with an environment that cannot redirect it (no inherited CONCLAVE_*).
pub fn conclave<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for var in [
        "CONCLAVE_LOG",
        "CONCLAVE_DATA_DIR",
        "CONCLAVE_STATE_DIR",
        "XDG_CONFIG_HOME",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A running child process. Dropping it kills it (and reaps it), even during a panic.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every stdout line taken from `lines` so far, in order.
    pub stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {}: {e}", bin()));
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr_pipe = child.stderr.take().expect("stderr piped");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        // Ends at EOF (the child exited) or when the receiver is gone.
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = text.strip_suffix('\n').unwrap_or(&text).to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let stderr_thread = thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf)),
                }
            }
        });
        Proc {
            name: name.to_string(),
            child,
            stdin,
            lines,
            stdout: Vec::new(),
            stderr,
            stderr_thread: Some(stderr_thread),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stderr once `pred` holds for it, or as it is after `timeout` (its reader thread may
    /// not have caught up with what the child wrote before a stdout line).
    pub fn stderr_when(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stderr();
            if pred(&text) || Instant::now() >= deadline {
                return text;
            }
            thread::sleep(POLL);
        }
    }

    fn context(&self) -> String {
        format!(
            "{}: stdout so far:\n{}\nstderr so far:\n{}",
            self.name,
            self.stdout.join("\n"),
            self.stderr()
        )
    }

    /// The next stdout line, or `None` at EOF; panics after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.stdout.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no stdout line within {timeout:?}; {}", self.context())
            }
        }
    }

    /// Reads stdout lines until one satisfies `pred`, within [`WAIT`].
    pub fn expect_line(&mut self, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        for _ in 0..MAX_SKIPPED_LINES {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(WAIT);
                    panic!(
                        "exited ({status}) before printing {what}; {}",
                        self.context()
                    )
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {WAIT:?}; {}", self.context())
                }
            }
        }
        panic!("no {what} in {MAX_SKIPPED_LINES} lines; {}", self.context())
    }

    /// The next stdout line within `timeout`: `Some(Ok(line))`, `None` when none came in
    /// time, `Some(Err(()))` at EOF (the child closed stdout). Never panics.
    pub fn try_line(&mut self, timeout: Duration) -> Option<Result<String, ()>> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.stdout.push(line.clone());
                Some(Ok(line))
            }
            Err(RecvTimeoutError::Disconnected) => Some(Err(())),
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// SIGKILL, and reaps the child.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn write_line(&mut self, line: &str) {
        let name = self.name.clone();
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{name}: cannot write to stdin: {e}"));
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the child to exit; panics (and the drop kills it) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => panic!(
                    "{} did not exit within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    self.name,
                    self.stdout.join("\n"),
                    self.stderr()
                ),
                Err(e) => panic!("{}: wait failed: {e}", self.name),
            }
        }
    }

    /// Closes stdin, waits for exit, and collects the rest of stdout and all of stderr.
    pub fn finish(&mut self) -> Finished {
        self.close_stdin();
        let status = self.wait_exit(WAIT);
        let deadline = Instant::now() + WAIT;
        for _ in 0..MAX_SKIPPED_LINES {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: stdout not closed within {WAIT:?} after exit",
                    self.name
                ),
            }
        }
        if let Some(t) = self.stderr_thread.take() {
            for _ in 0..(WAIT.as_millis() / POLL.as_millis()) {
                if t.is_finished() {
                    break;
                }
                thread::sleep(POLL);
            }
            assert!(
                t.is_finished(),
                "{}: stderr not closed after exit",
                self.name
            );
            let _ = t.join();
        }
        Finished {
            status,
            stdout: self.stdout.clone(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if thread::panicking() && std::env::var_os("CONCLAVE_TEST_STDERR").is_some() {
            // Asked for (CONCLAVE_TEST_STDERR=1): the end of what the child wrote to stderr.
            let err = self.stderr();
            let tail = &err[err.len().saturating_sub(20_000)..];
            eprintln!(
                "---- stderr of {} (pid {}) ----\n{tail}",
                self.name,
                self.pid()
            );
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a finished child ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Finished {
    pub fn stdout_text(&self) -> String {
        let mut s = self.stdout.join("\n");
        if !self.stdout.is_empty() {
            s.push('\n');
        }
        s
    }

    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "expected success: {self:#?}");
        self
    }

    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.status.success() && self.status.code().is_some(),
            "expected a non-zero exit (not a crash by signal): {self:#?}"
        );
        self
    }

    #[track_caller]
    pub fn assert_stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        self
    }
}

/// Runs a short command to completion (bounded by [`WAIT`]).
pub fn run(name: &str, cmd: Command) -> Finished {
    Proc::spawn(name, cmd).finish()
}

/// `D` → mode bits of the file or directory.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `ab12…` → `AB:12:…`, the form people see.
pub fn colon_upper(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

pub fn is_fingerprint(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `text` shows the fingerprint in either of its usual forms.
pub fn shows_fingerprint(text: &str, hex: &str) -> bool {
    text.contains(hex) || text.contains(&colon_upper(hex))
}

/// Whether process `pid` catches SIGTERM (Linux: `SigCgt` in /proc/PID/status).
pub fn catches_sigterm(pid: u32) -> bool {
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & SIGTERM_BIT != 0)
}

/// A `conclave serve` child.
pub struct Server {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Lower-case hex, from the printed `conclave client … --fingerprint HEX` line.
    pub fingerprint: String,
    /// The stdout lines up to and including the printed client command.
    pub banner: Vec<String>,
}

impl Server {
    /// `conclave serve --data-dir D --listen 127.0.0.1:0 ARGS` with `envs` set.
    pub fn start(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Self::start_on(data_dir, "127.0.0.1:0", args, envs)
    }

    pub fn start_on(data_dir: &Path, listen: &str, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Self::try_start_on(data_dir, listen, args, envs)
            .unwrap_or_else(|f| panic!("serve exited before it was ready: {f:#?}"))
    }

    /// Like [`Server::start_on`]; a server that exits before its banner is complete is an
    /// `Err` with its output.
    pub fn try_start_on(
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Server, Finished> {
        let mut cmd = conclave(["serve", "--data-dir"]);
        cmd.arg(data_dir).args(["--listen", listen]).args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("serve", cmd);
        let deadline = Instant::now() + WAIT;
        for _ in 0..MAX_SKIPPED_LINES {
            let left = deadline.saturating_duration_since(Instant::now());
            match proc.next_line(left) {
                None => return Err(proc.finish()),
                Some(l) if l.trim() == "Connect a client:" => break,
                Some(_) => {}
            }
        }
        let command = proc.next_line(WAIT).unwrap_or_else(|| {
            panic!(
                "serve printed nothing after \"Connect a client:\"; stderr:\n{}",
                proc.stderr()
            )
        });
        let banner = proc.stdout.clone();
        let serving = banner
            .iter()
            .find_map(|l| l.split_once(" serving on "))
            .unwrap_or_else(|| panic!("no \"serving on\" line: {banner:#?}"))
            .1;
        let addr = serving.split_whitespace().next().expect("an address");
        let port = addr
            .strip_prefix("127.0.0.1:")
            .unwrap_or_else(|| panic!("not a loopback address: {addr}"))
            .parse()
            .unwrap_or_else(|e| panic!("port in {addr:?}: {e}"));
        let words: Vec<&str> = command.split_whitespace().collect();
        let fingerprint = words
            .iter()
            .position(|w| *w == "--fingerprint")
            .and_then(|i| words.get(i + 1))
            .unwrap_or_else(|| panic!("no --fingerprint in {command:?}"))
            .to_string();
        assert!(is_fingerprint(&fingerprint), "{fingerprint:?}");
        Ok(Server {
            proc,
            data_dir: data_dir.to_path_buf(),
            port,
            fingerprint,
            banner,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The printed `conclave client …` command line (trimmed).
    pub fn client_command(&self) -> &str {
        self.banner.last().expect("banner").trim()
    }

    /// Whether the server process catches SIGTERM yet.
    pub fn catches_sigterm(&self) -> bool {
        catches_sigterm(self.proc.pid())
    }

    /// Sends SIGTERM once the server catches it. `serve` prints its banner before it installs
    /// its signal handler, so a SIGTERM right after the banner can kill it outright (see
    /// `sigterm_right_after_the_banner_is_graceful`); waiting here keeps the other tests about
    /// what they test.
    pub fn sigterm(&self) {
        let deadline = Instant::now() + WAIT;
        while !self.catches_sigterm() {
            assert!(
                Instant::now() < deadline,
                "serve does not catch SIGTERM after {WAIT:?}"
            );
            thread::sleep(POLL);
        }
        self.sigterm_now();
    }

    /// Sends SIGTERM at once.
    pub fn sigterm_now(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.proc.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(self) -> Finished {
        self.sigterm();
        self.wait()
    }

    /// Waits for the exit (after a signal).
    pub fn wait(mut self) -> Finished {
        self.proc.finish()
    }
}

/// `conclave client --json --server ADDR --user USER --state-dir STATE --password-env PW_VAR`,
/// with the password set in the child's environment; add trust and other flags to it.
pub fn client_cmd(addr: &str, user: &str, state_dir: &Path, password: &str) -> Command {
    let mut cmd = conclave(["client", "--json", "--server", addr, "--user", user]);
    cmd.arg("--state-dir")
        .arg(state_dir)
        .args(["--password-env", PW_VAR])
        .env(PW_VAR, password)
        // Nothing may land in the real home directory.
        .env("HOME", state_dir);
    cmd
}

/// A connected `conclave client --json`. Every stdout line must be a JSON object.
pub struct JsonClient {
    pub proc: Proc,
    pub user: String,
    /// Every line so far, parsed.
    pub seen: Vec<Value>,
    /// Lines read but not yet returned by [`JsonClient::expect`].
    unclaimed: std::collections::VecDeque<Value>,
    /// The `connected` event.
    pub connected: Value,
}

fn parse_json_line(who: &str, line: &str) -> Value {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{who}: stdout line is not JSON ({e}): {line:?}"));
    assert!(
        v.is_object(),
        "{who}: stdout line is not an object: {line:?}"
    );
    v
}

impl JsonClient {
    /// Starts the client and waits for its `connected` line, which must be the first.
    pub fn connect(user: &str, cmd: Command) -> JsonClient {
        let mut proc = Proc::spawn(&format!("client {user}"), cmd);
        let Some(first) = proc.next_line(WAIT) else {
            let f = proc.finish();
            panic!("client {user} did not connect: {f:#?}");
        };
        let connected = parse_json_line(user, &first);
        assert_eq!(connected["event"], "connected", "first line: {first}");
        JsonClient {
            proc,
            user: user.to_string(),
            seen: vec![connected.clone()],
            unclaimed: Default::default(),
            connected,
        }
    }

    pub fn send(&mut self, cmd: Value) {
        self.proc.write_line(&cmd.to_string());
    }

    pub fn send_raw(&mut self, line: &str) {
        self.proc.write_line(line);
    }

    /// The first line not yet claimed by an earlier `expect` that satisfies `pred`: among the
    /// lines already read, else the next ones (within [`WAIT`]).
    pub fn expect(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        if let Some(i) = self.unclaimed.iter().position(&mut pred) {
            return self.unclaimed.remove(i).expect("index in range");
        }
        let user = self.user.clone();
        let mut found = None;
        let mut parsed = Vec::new();
        self.proc.expect_line(what, |line| {
            let v = parse_json_line(&user, line);
            let hit = pred(&v);
            parsed.push(v.clone());
            if hit {
                found = Some(v);
            }
            hit
        });
        let found = found.expect("matched");
        self.seen.extend(parsed.iter().cloned());
        parsed.pop();
        self.unclaimed.extend(parsed);
        found
    }

    /// The next line (first those read but not yet claimed), within `timeout`: `Polled::Line`,
    /// `Polled::Quiet` when nothing came, `Polled::Closed` at the end of stdout. Never panics
    /// on time; a line that is not a JSON object still panics (the contract).
    pub fn poll(&mut self, timeout: Duration) -> Polled {
        if let Some(v) = self.unclaimed.pop_front() {
            return Polled::Line(v);
        }
        match self.proc.try_line(timeout) {
            None => Polled::Quiet,
            Some(Err(())) => Polled::Closed,
            Some(Ok(line)) => {
                let v = parse_json_line(&self.user, &line);
                self.seen.push(v.clone());
                Polled::Line(v)
            }
        }
    }

    /// The reply to the command with this id.
    pub fn reply(&mut self, id: Value) -> Value {
        let what = format!("the reply to id {id}");
        self.expect(&what, |v| {
            v.get("id") == Some(&id) && v.get("event").is_none()
        })
    }

    /// A successful reply to the command with this id.
    #[track_caller]
    pub fn ok(&mut self, id: Value) -> Value {
        let r = self.reply(id);
        assert_eq!(r["ok"], true, "{}: expected ok: {r}", self.user);
        r
    }

    /// The next `message` event whose text is `text`.
    pub fn message(&mut self, text: &str) -> Value {
        let what = format!("a message event {text:?}");
        self.expect(&what, |v| v["event"] == "message" && v["text"] == text)
    }

    /// Whether any line so far had this text in a `message` event.
    pub fn saw_message(&self, text: &str) -> bool {
        self.seen
            .iter()
            .any(|v| v["event"] == "message" && v["text"] == text)
    }

    /// `{"cmd":"quit"}`: its reply, exit status 0, and only JSON on stdout.
    pub fn quit(mut self) -> Finished {
        self.send(json!({"cmd": "quit", "id": "bye"}));
        self.ok(json!("bye"));
        // It exits without needing the end of its input.
        self.proc.wait_exit(WAIT);
        let f = self.proc.finish();
        self.check_all_json(&f);
        f.assert_success();
        assert!(
            !self.seen.iter().any(|v| v["event"] == "disconnected"),
            "{}: no disconnected event after quit: {:#?}",
            self.user,
            self.seen
        );
        f
    }

    /// Every stdout line so far (and any remaining in `f`) parses as a JSON object.
    /// The lines read after the last `expect` become available to later `expect` calls.
    pub fn check_all_json(&mut self, f: &Finished) {
        let start = self.seen.len();
        for line in &f.stdout[start.min(f.stdout.len())..] {
            let v = parse_json_line(&self.user, line);
            self.seen.push(v.clone());
            self.unclaimed.push_back(v);
        }
        for line in &f.stdout {
            parse_json_line(&self.user, line);
        }
    }
}

/// What [`JsonClient::poll`] got.
#[derive(Debug)]
pub enum Polled {
    Line(Value),
    Quiet,
    Closed,
}

/// Runs a client that is expected to fail before connecting: non-zero exit, nothing on stdout.
pub fn client_fails(name: &str, cmd: Command) -> Finished {
    let f = run(name, cmd);
    f.assert_failure();
    assert!(
        f.stdout.is_empty(),
        "{name}: stdout must stay empty: {f:#?}"
    );
    assert!(!f.stderr.trim().is_empty(), "{name}: stderr must say why");
    f
}
