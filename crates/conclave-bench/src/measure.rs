//! What is measured and how: send timestamps inside the message text, a latency histogram per
//! receiver, shared counters, and process accounting from `/proc` (the server's CPU time and
//! memory, and the generator's own CPU time).

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Shortest message text that holds the timestamp header.
pub const STAMP_MIN_BYTES: usize = 40;
/// Highest latency the histogram records exactly; slower deliveries are clamped to it (and
/// show as `max`).
const HIST_MAX_US: u64 = 120_000_000;
/// Error texts kept for the report (the count goes on).
const MAX_ERROR_SAMPLES: usize = 8;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since this process's benchmark epoch: senders and receivers are in one process,
/// so one monotonic clock serves both ends.
pub fn now_ns() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The text of a message: `cb RUN T_NS ` then padding to `size` bytes. `RUN` tells this run's
/// messages from those of an earlier run that a server may still deliver (catch-up).
pub fn stamp_text(run: u32, t_ns: u64, size: usize) -> String {
    stamp_text_from(run, t_ns, size, None)
}

/// Most server addresses a stamp can name (`a` to `p`).
pub const MAX_STAMP_NODES: usize = 16;

/// [`stamp_text`] that also names the server address the sender uses (its index in a
/// `--server` list, below [`MAX_STAMP_NODES`]) in the first byte of the padding, when there
/// is room: a receiver then knows whether the message crossed from another node.
pub fn stamp_text_from(run: u32, t_ns: u64, size: usize, node: Option<usize>) -> String {
    let mut s = format!("cb {run:08x} {t_ns} ");
    if let Some(n) = node.filter(|n| *n < MAX_STAMP_NODES)
        && s.len() < size
    {
        s.push(char::from(b'a' + n as u8));
    }
    while s.len() < size {
        s.push('x');
    }
    s
}

/// The send time in a message of run `run`; `None` for anything else.
pub fn parse_stamp(run: u32, text: &str) -> Option<u64> {
    parse_stamp_bytes(run, text.as_bytes())
}

/// [`parse_stamp`] on the raw bytes of a text (a receiver need not check the whole text is
/// UTF-8 to read its header).
pub fn parse_stamp_bytes(run: u32, text: &[u8]) -> Option<u64> {
    parse_stamp_from(run, text).map(|(t, _)| t)
}

/// [`parse_stamp_bytes`], and the sender's address index when the stamp names it
/// ([`stamp_text_from`]).
pub fn parse_stamp_from(run: u32, text: &[u8]) -> Option<(u64, Option<usize>)> {
    let rest = text.strip_prefix(b"cb ")?;
    let (r, rest) = (rest.get(..8)?, rest.get(8..)?);
    let mut got = 0u32;
    for &c in r {
        got = got << 4 | char::from(c).to_digit(16)?;
    }
    if got != run {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let mut t: u64 = 0;
    let mut digits = 0;
    for &c in rest {
        if c == b' ' {
            break;
        }
        let d = char::from(c).to_digit(10)?;
        t = t.checked_mul(10)?.checked_add(u64::from(d))?;
        digits += 1;
    }
    if digits == 0 || rest.get(digits) != Some(&b' ') {
        return None;
    }
    let node = rest
        .get(digits + 1)
        .filter(|b| (b'a'..b'a' + MAX_STAMP_NODES as u8).contains(b))
        .map(|b| usize::from(b - b'a'));
    Some((t, node))
}

/// Counters shared by every task of a run.
#[derive(Default)]
pub struct Counters {
    /// Messages received by receivers (this run's only).
    pub delivered: AtomicU64,
    /// Sends written.
    pub sent: AtomicU64,
    /// Sends the server acknowledged (Conclave); equal to `sent` for IRC.
    pub accepted: AtomicU64,
    /// Messages of an earlier run (catch-up), not counted.
    pub stale: AtomicU64,
    pub errors: AtomicU64,
    /// Connections that ended before the run was over.
    pub disconnects: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Counters {
    /// Counts an error and keeps the first few texts.
    pub fn error(&self, what: impl Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < MAX_ERROR_SAMPLES {
            s.push(what.to_string());
        }
    }

    /// Counts a connection lost during the run (also an error).
    pub fn disconnect(&self, what: impl Display) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
        self.error(what);
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// One receiver's latencies, in microseconds: to the receiving task (`app`), and to the
/// receiving socket (`socket`, from the kernel's receive stamp; see [`crate::stamped`]).
/// Histograms are made on the first sample, so idle connections hold none.
#[derive(Default)]
pub struct Recorder {
    app: Option<Box<Histogram<u64>>>,
    socket: Option<Box<Histogram<u64>>>,
    /// With several server addresses: the same, for messages sent through the receiver's own
    /// address (`same_*`) and through another (`cross_*`).
    same_app: Option<Box<Histogram<u64>>>,
    same_socket: Option<Box<Histogram<u64>>>,
    cross_app: Option<Box<Histogram<u64>>>,
    cross_socket: Option<Box<Histogram<u64>>>,
}

/// Latencies split by whether a message crossed nodes (see [`Recorder::record_split`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeSplit {
    pub same_node_ms: Latency,
    pub cross_node_ms: Latency,
    pub same_node_socket_ms: Latency,
    pub cross_node_socket_ms: Latency,
}

fn histogram() -> Box<Histogram<u64>> {
    // Three significant digits: 0.1% resolution at any latency.
    Box::new(
        Histogram::new_with_bounds(1, HIST_MAX_US, 3)
            .unwrap_or_else(|_| Histogram::new(3).expect("3 significant digits is valid")),
    )
}

fn add(into: &mut Option<Box<Histogram<u64>>>, us: u64) {
    into.get_or_insert_with(histogram)
        .saturating_record(us.clamp(1, HIST_MAX_US));
}

fn summary(h: Option<&Histogram<u64>>) -> Latency {
    let Some(h) = h.filter(|h| !h.is_empty()) else {
        return Latency::default();
    };
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        samples: h.len(),
        p50: Some(ms(h.value_at_quantile(0.50))),
        p90: Some(ms(h.value_at_quantile(0.90))),
        p99: Some(ms(h.value_at_quantile(0.99))),
        max: Some(ms(h.max())),
        mean: Some(h.mean() / 1000.0),
    }
}

impl Recorder {
    /// Records a message sent at `sent_ns` and received now. `arrived_ago_ns`: how long ago
    /// its bytes reached the receiving socket, when the kernel said.
    pub fn record(&mut self, sent_ns: u64, arrived_ago_ns: Option<u64>) {
        self.record_split(sent_ns, arrived_ago_ns, None);
    }

    /// [`Recorder::record`], counted also as a message that came through the receiver's own
    /// node (`crossed` false) or from another one (true), when that is known.
    pub fn record_split(
        &mut self,
        sent_ns: u64,
        arrived_ago_ns: Option<u64>,
        crossed: Option<bool>,
    ) {
        let total = now_ns().saturating_sub(sent_ns);
        add(&mut self.app, total / 1000);
        let (app, socket) = match crossed {
            Some(true) => (Some(&mut self.cross_app), Some(&mut self.cross_socket)),
            Some(false) => (Some(&mut self.same_app), Some(&mut self.same_socket)),
            None => (None, None),
        };
        if let Some(h) = app {
            add(h, total / 1000);
        }
        if let Some(ago) = arrived_ago_ns {
            let at_socket = total.saturating_sub(ago) / 1000;
            add(&mut self.socket, at_socket);
            if let Some(h) = socket {
                add(h, at_socket);
            }
        }
    }

    /// The latencies split by node, when any message was counted so.
    pub fn split(&self) -> Option<NodeSplit> {
        if self.same_app.is_none() && self.cross_app.is_none() {
            return None;
        }
        Some(NodeSplit {
            same_node_ms: summary(self.same_app.as_deref()),
            cross_node_ms: summary(self.cross_app.as_deref()),
            same_node_socket_ms: summary(self.same_socket.as_deref()),
            cross_node_socket_ms: summary(self.cross_socket.as_deref()),
        })
    }

    pub fn merge(&mut self, other: &Recorder) {
        for (into, from) in [
            (&mut self.app, &other.app),
            (&mut self.socket, &other.socket),
            (&mut self.same_app, &other.same_app),
            (&mut self.same_socket, &other.same_socket),
            (&mut self.cross_app, &other.cross_app),
            (&mut self.cross_socket, &other.cross_socket),
        ] {
            if let Some(from) = from {
                // Same bounds on both sides: adding cannot fail.
                let _ = into.get_or_insert_with(histogram).add(from.as_ref());
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.app.as_ref().map_or(0, |h| h.len())
    }

    /// From send to the receiving task.
    pub fn summary(&self) -> Latency {
        summary(self.app.as_deref())
    }

    /// From send to the receiving socket.
    pub fn socket_summary(&self) -> Latency {
        summary(self.socket.as_deref())
    }
}

/// Latency percentiles from send to receipt, in milliseconds (`None` without samples).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

/// A process's CPU time and memory at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// User + system CPU time of all its threads.
    pub cpu: Duration,
    /// Resident set (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set so far (VmHWM).
    pub hwm_kib: u64,
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime of `/proc/<pid>/stat` (`self` for this process).
fn stat_cpu(pid: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    let hz = clock_ticks_per_s();
    Some(Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz))
}

fn status_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Samples process `pid`; `None` when it is gone or `/proc` is not readable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu: stat_cpu(&pid.to_string())?,
        rss_kib: status_kib(&status, "VmRSS:")?,
        hwm_kib: status_kib(&status, "VmHWM:")?,
    })
}

/// This process's own CPU time (the generator).
pub fn self_cpu() -> Option<Duration> {
    stat_cpu("self")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_name_the_senders_node_when_there_is_room() {
        let t = stamp_text_from(7, 42, 64, Some(3));
        assert_eq!(t.len(), 64);
        assert_eq!(parse_stamp_from(7, t.as_bytes()), Some((42, Some(3))));
        assert_eq!(parse_stamp_bytes(7, t.as_bytes()), Some(42));
        // No node, or no room for it: the plain stamp.
        let plain = stamp_text(7, 42, 64);
        assert_eq!(parse_stamp_from(7, plain.as_bytes()), Some((42, None)));
        let tight = stamp_text_from(7, 42, 0, Some(3));
        assert_eq!(parse_stamp_from(7, tight.as_bytes()), Some((42, None)));
        assert_eq!(
            parse_stamp_from(
                7,
                stamp_text_from(7, 1, 64, Some(MAX_STAMP_NODES)).as_bytes()
            ),
            Some((1, None))
        );
        // Split latencies: counted in the whole and in their side.
        let mut r = Recorder::default();
        r.record_split(now_ns(), None, Some(true));
        r.record_split(now_ns(), None, Some(false));
        r.record_split(now_ns(), None, Some(false));
        let split = r.split().expect("split");
        assert_eq!(r.count(), 3);
        assert_eq!(split.cross_node_ms.samples, 1);
        assert_eq!(split.same_node_ms.samples, 2);
        assert!(Recorder::default().split().is_none());
    }

    #[test]
    fn stamps_round_trip_and_other_runs_are_ignored() {
        let t = stamp_text(0xabc, 123_456_789, 64);
        assert_eq!(t.len(), 64);
        assert_eq!(parse_stamp(0xabc, &t), Some(123_456_789));
        assert_eq!(parse_stamp(0xabd, &t), None);
        assert_eq!(parse_stamp(0xabc, "hello"), None);
        // Longer than the size asked for: the header is never cut.
        let long = stamp_text(1, u64::MAX, STAMP_MIN_BYTES);
        assert_eq!(parse_stamp(1, &long), Some(u64::MAX));
        assert!(long.len() <= STAMP_MIN_BYTES);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).expect("/proc is readable");
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
        assert!(self_cpu().is_some());
    }

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut r = Recorder::default();
        assert!(r.summary().p50.is_none());
        let now = now_ns();
        r.record(now, None);
        let mut other = Recorder::default();
        other.record(now, Some(0));
        r.merge(&other);
        let s = r.summary();
        assert_eq!(s.samples, 2);
        assert!(s.p50.is_some() && s.p99 <= s.max);
        assert_eq!(
            r.socket_summary().samples,
            1,
            "only stamped receipts count there"
        );
    }

    #[test]
    fn socket_latency_leaves_out_the_wait_after_arrival() {
        let mut r = Recorder::default();
        // Sent, then 12 ms or more pass; the bytes arrived 8 ms before the receipt.
        let sent = now_ns();
        std::thread::sleep(Duration::from_millis(12));
        r.record(sent, Some(8_000_000));
        let app = r.summary().p50.unwrap();
        let socket = r.socket_summary().p50.unwrap();
        assert!(app >= 12.0, "{app}");
        // 0.1% histogram precision on each side.
        assert!((socket - (app - 8.0)).abs() < 0.05, "{socket} vs {app}");
    }
}
