//! Metrics: counters and histograms the server updates as things happen. The Prometheus
//! endpoint that renders them with the gauges read at scrape time is [`crate::prometheus`]
//! (`--metrics-listen`, off by default).
//!
//! Why plain atomics rendered here, not the `metrics` facade with
//! `metrics-exporter-prometheus`: the facade routes every update through one process-wide
//! recorder, and the project has no global mutable state (tests run several servers in one
//! process; each must count only its own traffic). Every label set is a fixed list below, so no
//! peer can make the set of series grow; updates are single relaxed atomic adds; rendering the
//! text format is a page of code that the tests parse with an independent parser.
//!
//! Names follow the Prometheus conventions: `conclave_` prefix, base units (seconds, bytes),
//! `_total` on counters. docs/monitoring.md lists every series.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::anomaly::Rule;

/// HTTP connections served at once by the metrics endpoint; more wait to be accepted.
pub const MAX_HTTP_CONNECTIONS: usize = 16;
/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Kinds of stored messages.
pub const MESSAGE_KINDS: [&str; 2] = ["room", "direct"];
/// Kinds of deliveries (a message event queued for one connection).
pub const DELIVERY_KINDS: [&str; 4] = ["room", "direct", "catchup", "announce"];
/// Limits, as the audit log names them.
pub const LIMITS: [&str; 7] = [
    "rate_limited",
    "login_locked",
    "slow_consumer",
    "too_large",
    "malformed",
    "flooding",
    "other",
];
/// Why a new connection was refused before any TLS work.
pub const REFUSALS: [&str; 7] = [
    "deny_list",
    "not_in_allow_list",
    "banned",
    "connection_rate",
    "too_many_connections_from_ip",
    "fd_limit",
    "max_connections",
];
/// How a connection ended (the disconnect reasons of the protocol).
pub const DISCONNECTS: [&str; 10] = [
    "quit",
    "shutdown",
    "malformed",
    "too_large",
    "slow_consumer",
    "timeout",
    "kicked",
    "banned",
    "flooding",
    "other",
];
/// Who made a ban.
pub const BAN_SOURCES: [&str; 2] = ["automatic", "operator"];
/// Directions of file bytes.
pub const FILE_DIRECTIONS: [&str; 2] = ["received", "sent"];

/// Upper bounds of the latency histograms' buckets, in nanoseconds (0.5 ms to 5 s).
pub const LATENCY_BOUNDS_NS: [u64; 13] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

fn index_of(list: &[&str], name: &str) -> usize {
    list.iter()
        .position(|n| *n == name)
        .unwrap_or(list.len() - 1)
}

/// A set of counters, one per label value.
#[derive(Debug)]
pub struct CounterVec<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for CounterVec<N> {
    fn default() -> Self {
        CounterVec(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> CounterVec<N> {
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, i: usize) -> u64 {
        self.0.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn sum(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A latency histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    /// Not cumulative: `buckets[i]` counts observations in (bound[i-1], bound[i]]; the last
    /// one counts those above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A histogram's counts at one moment: per bucket (not cumulative), and the sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The counts added since `earlier`.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    /// The mean, in milliseconds.
    pub fn mean_ms(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns as f64 / n as f64 / 1e6)
    }

    /// An upper bound of the `q` quantile (0..1), in milliseconds: the bound of the bucket it
    /// falls in (`None` without observations; the largest bound when it is above them all).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let bound = LATENCY_BOUNDS_NS
                    .get(i)
                    .or(LATENCY_BOUNDS_NS.last())
                    .copied()
                    .unwrap_or(0);
                return Some(bound as f64 / 1e6);
            }
        }
        None
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|b| *b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }

    /// Times what happens until the guard is dropped.
    pub fn timer(&self) -> Timer<'_> {
        Timer {
            histogram: self,
            started: Instant::now(),
        }
    }
}

/// Records the time from its creation to its drop.
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed());
    }
}

/// Everything counted as it happens. Gauges (connections, queues, bans) are read from the
/// server's state when rendered.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub connections_refused: CounterVec<{ REFUSALS.len() }>,
    pub connections_established: AtomicU64,
    pub handshakes_incomplete: AtomicU64,
    pub disconnects: CounterVec<{ DISCONNECTS.len() }>,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub registrations: AtomicU64,
    pub messages: CounterVec<{ MESSAGE_KINDS.len() }>,
    pub deliveries: CounterVec<{ DELIVERY_KINDS.len() }>,
    pub store_commit: Histogram,
    pub search: Histogram,
    pub file_bytes: CounterVec<{ FILE_DIRECTIONS.len() }>,
    pub limits: CounterVec<{ LIMITS.len() }>,
    pub bans: CounterVec<{ BAN_SOURCES.len() }>,
    pub alerts: CounterVec<{ Rule::ALL.len() }>,
    /// 1 while the last write to the data directory failed for lack of space.
    pub storage_full: std::sync::atomic::AtomicBool,
    /// Writes refused because the disk was full.
    pub storage_full_refusals: AtomicU64,
}

impl Metrics {
    /// A message was stored and queued for `recipients` connections.
    pub fn message(&self, conv: &conclave_proto::Conv, recipients: usize) {
        let kind = match conv {
            conclave_proto::Conv::Room(_) => 0,
            conclave_proto::Conv::Direct(_) => 1,
        };
        self.messages.add(kind, 1);
        self.deliveries.add(kind, recipients as u64);
    }

    /// Messages queued for a connection by its catch-up at login.
    pub fn catch_up(&self, messages: usize) {
        self.deliveries
            .add(index_of(&DELIVERY_KINDS, "catchup"), messages as u64);
    }

    /// An announcement queued for `recipients` connections.
    pub fn announce(&self, recipients: usize) {
        self.deliveries
            .add(index_of(&DELIVERY_KINDS, "announce"), recipients as u64);
    }

    /// Times a search until the returned guard is dropped.
    pub fn search_timer(&self) -> Timer<'_> {
        self.search.timer()
    }

    /// File bytes stored (`received`) or served (`sent`).
    pub fn file_bytes(&self, direction: &str, n: u64) {
        self.file_bytes
            .add(index_of(&FILE_DIRECTIONS, direction), n);
    }

    pub fn refused(&self, reason: &str) {
        self.connections_refused.add(index_of(&REFUSALS, reason), 1);
    }

    pub fn limit(&self, reason: &str) {
        self.limits.add(index_of(&LIMITS, reason), 1);
    }

    pub fn disconnect(&self, reason: &str) {
        self.disconnects.add(index_of(&DISCONNECTS, reason), 1);
    }

    pub fn ban(&self, automatic: bool) {
        self.bans.add(if automatic { 0 } else { 1 }, 1);
    }

    pub fn alert(&self, rule: Rule) {
        self.alerts.add(rule as usize, 1);
    }

    pub fn messages_total(&self) -> u64 {
        self.messages.sum()
    }

    pub fn deliveries_total(&self) -> u64 {
        self.deliveries.sum()
    }

    /// A write to the data directory failed because the disk is full (`what`: what was being
    /// stored). Logged once when the disk becomes full, not at every refusal.
    pub fn storage_full(&self, what: &str) {
        self.storage_full_refusals.fetch_add(1, Ordering::Relaxed);
        if !self.storage_full.swap(true, Ordering::Relaxed) {
            tracing::error!(
                what,
                "disk full: new messages, uploads and other writes are refused with storage_full \
                 until space is freed in the data directory; reads and connections keep working"
            );
        }
    }

    /// A write to the data directory succeeded: if the disk was full, it is no longer.
    pub fn storage_ok(&self) {
        if self.storage_full.load(Ordering::Relaxed)
            && self.storage_full.swap(false, Ordering::Relaxed)
        {
            tracing::warn!("disk space is back: writes are accepted again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_quantiles_and_means() {
        let h = Histogram::default();
        for ms in [1, 1, 2, 3, 40] {
            h.observe(Duration::from_millis(ms));
        }
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count(), 6);
        assert_eq!(s.buckets[1], 2, "1 ms falls in (0.5, 1] ms");
        assert_eq!(s.buckets[LATENCY_BOUNDS_NS.len()], 1, "above every bound");
        assert_eq!(s.quantile_ms(0.5), Some(2.5));
        assert_eq!(s.quantile_ms(1.0), Some(5000.0));
        let later = {
            h.observe(Duration::from_millis(4));
            h.snapshot()
        };
        let d = later.since(&s);
        assert_eq!(d.count(), 1);
        assert_eq!(d.mean_ms(), Some(4.0));
        assert_eq!(HistogramSnapshot::default().quantile_ms(0.99), None);
    }

    #[test]
    fn unknown_label_values_count_as_the_last_one() {
        let m = Metrics::default();
        m.limit("something_new");
        m.limit("malformed");
        assert_eq!(m.limits.get(index_of(&LIMITS, "other")), 1);
        assert_eq!(m.limits.get(index_of(&LIMITS, "malformed")), 1);
        m.refused("max_connections");
        assert_eq!(m.connections_refused.sum(), 1);
    }
}
