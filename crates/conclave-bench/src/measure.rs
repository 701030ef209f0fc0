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
    let mut s = format!("cb {run:08x} {t_ns} ");
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
    (digits > 0 && rest.get(digits) == Some(&b' ')).then_some(t)
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
        let total = now_ns().saturating_sub(sent_ns);
        add(&mut self.app, total / 1000);
        if let Some(ago) = arrived_ago_ns {
            add(&mut self.socket, total.saturating_sub(ago) / 1000);
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        for (into, from) in [
            (&mut self.app, &other.app),
            (&mut self.socket, &other.socket),
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
