//! Metrics: counters and histograms the server updates as things happen, gauges read at
//! scrape time, and the Prometheus endpoint that renders them (`--metrics-listen`, off by
//! default).
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

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::anomaly::Rule;
use crate::server::Shared;

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
const LATENCY_BOUNDS_NS: [u64; 13] = [
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

/// Writes the text format.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                // Label values here are fixed names or numbers: nothing to escape.
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn labelled<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str; N],
        counters: &CounterVec<N>,
    ) {
        self.family(name, "counter", help);
        for (i, v) in values.iter().enumerate() {
            self.sample(name, &[(label, v)], counters.get(i));
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, "histogram", help);
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BOUNDS_NS.iter().enumerate() {
            cumulative += h.buckets.get(i).copied().unwrap_or(0);
            let le = (*bound as f64 / 1e9).to_string();
            self.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative);
        }
        let count = h.count();
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count);
        self.sample(&format!("{name}_sum"), &[], h.sum_ns as f64 / 1e9);
        self.sample(&format!("{name}_count"), &[], count);
    }
}

/// The server's metrics in the Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let mut e = Exposition(String::with_capacity(8 * 1024));
    let traffic = shared.registry.totals();
    let queues = shared.registry.queue_depths();
    let now = crate::store::now_ms();
    let users_online = shared.hub.lock().who("", None).map_or(0, |v| v.len());
    let bans_active = shared.guard().bans(now).len();
    let (tracked, untracked) = shared.monitor.detector_load();

    e.single(
        "conclave_up",
        "gauge",
        "Always 1 while the server answers.",
        1,
    );
    e.single(
        "conclave_start_time_seconds",
        "gauge",
        "When the server started, in seconds since the Unix epoch.",
        shared.monitor.started_ms() as f64 / 1000.0,
    );
    e.single(
        "conclave_connections",
        "gauge",
        "Connections open now that finished the TLS handshake and hello.",
        traffic.connections,
    );
    e.family(
        "conclave_connections_by_key_exchange",
        "gauge",
        "Connections open now, by TLS key exchange group (X25519MLKEM768 is post-quantum hybrid; the others are classical).",
    );
    for (group, n) in crate::tls::KX_GROUP_NAMES
        .iter()
        .zip(shared.registry.by_kx_group())
    {
        e.sample(
            "conclave_connections_by_key_exchange",
            &[("group", group)],
            n,
        );
    }
    e.single(
        "conclave_users_online",
        "gauge",
        "Accounts with at least one logged-in connection.",
        users_online,
    );
    e.single(
        "conclave_connections_accepted_total",
        "counter",
        "TCP connections admitted (before the TLS handshake).",
        m.connections_accepted.load(Ordering::Relaxed),
    );
    e.labelled(
        "conclave_connections_refused_total",
        "TCP connections refused before any TLS work, by reason.",
        "reason",
        &REFUSALS,
        &m.connections_refused,
    );
    e.single(
        "conclave_storage_full",
        "gauge",
        "1 while writes to the data directory fail for lack of space (new writes are refused).",
        u64::from(m.storage_full.load(Ordering::Relaxed)),
    );
    e.single(
        "conclave_storage_full_refusals_total",
        "counter",
        "Writes (messages, uploads, account and room changes) refused because the disk was full.",
        m.storage_full_refusals.load(Ordering::Relaxed),
    );
    e.single(
        "conclave_connections_established_total",
        "counter",
        "Connections that finished the TLS handshake and the protocol hello.",
        m.connections_established.load(Ordering::Relaxed),
    );
    e.single(
        "conclave_handshakes_incomplete_total",
        "counter",
        "Admitted connections that ended before finishing the TLS handshake and hello.",
        m.handshakes_incomplete.load(Ordering::Relaxed),
    );
    e.labelled(
        "conclave_disconnects_total",
        "Established connections that ended, by reason.",
        "reason",
        &DISCONNECTS,
        &m.disconnects,
    );
    e.family(
        "conclave_logins_total",
        "counter",
        "Login attempts, by result.",
    );
    e.sample(
        "conclave_logins_total",
        &[("result", "ok")],
        m.logins_ok.load(Ordering::Relaxed),
    );
    e.sample(
        "conclave_logins_total",
        &[("result", "failed")],
        m.logins_failed.load(Ordering::Relaxed),
    );
    e.single(
        "conclave_registrations_total",
        "counter",
        "Accounts registered by clients.",
        m.registrations.load(Ordering::Relaxed),
    );
    e.labelled(
        "conclave_messages_total",
        "Messages stored durably, by kind of conversation (retries of a stored message not counted).",
        "kind",
        &MESSAGE_KINDS,
        &m.messages,
    );
    e.labelled(
        "conclave_deliveries_total",
        "Message events queued for a connection, by kind (catchup: missed messages at login).",
        "kind",
        &DELIVERY_KINDS,
        &m.deliveries,
    );
    e.single(
        "conclave_network_receive_bytes_total",
        "counter",
        "Bytes received on established connections (TLS included).",
        traffic.bytes_in,
    );
    e.single(
        "conclave_network_transmit_bytes_total",
        "counter",
        "Bytes sent on established connections (TLS included).",
        traffic.bytes_out,
    );
    e.single(
        "conclave_frames_received_total",
        "counter",
        "Protocol frames received.",
        traffic.frames_in,
    );
    e.single(
        "conclave_frames_sent_total",
        "counter",
        "Protocol frames queued to be sent.",
        traffic.frames_out,
    );
    e.single(
        "conclave_outbound_queue_frames",
        "gauge",
        "Frames waiting in every connection's outbound queue, together.",
        queues.total,
    );
    e.single(
        "conclave_outbound_queue_frames_max",
        "gauge",
        "Frames waiting in the fullest outbound queue.",
        queues.max,
    );
    e.single(
        "conclave_store_queue_operations",
        "gauge",
        "Operations waiting for the store thread.",
        shared.store.queued(),
    );
    e.histogram(
        "conclave_store_commit_seconds",
        "Time to write and sync one group-commit transaction of messages.",
        &m.store_commit.snapshot(),
    );
    e.histogram(
        "conclave_search_seconds",
        "Time to answer a search request (store queue included).",
        &m.search.snapshot(),
    );
    e.labelled(
        "conclave_file_bytes_total",
        "File bytes stored and served (file transfer is not part of the server yet: stays 0).",
        "direction",
        &FILE_DIRECTIONS,
        &m.file_bytes,
    );
    e.labelled(
        "conclave_limits_hit_total",
        "Limits hit, as recorded in the audit log (a rate limit counts once per 10 s of refusals).",
        "limit",
        &LIMITS,
        &m.limits,
    );
    e.labelled(
        "conclave_bans_total",
        "Bans made, by source (automatic: the guard or an anomaly rule).",
        "source",
        &BAN_SOURCES,
        &m.bans,
    );
    e.single(
        "conclave_bans_active",
        "gauge",
        "Bans in force now.",
        bans_active,
    );
    e.labelled(
        "conclave_alerts_total",
        "Anomaly alerts raised, by rule.",
        "rule",
        &Rule::ALL.map(Rule::as_str),
        &m.alerts,
    );
    e.single(
        "conclave_anomaly_tracked_keys",
        "gauge",
        "Addresses, subnets and accounts the anomaly rules are counting now.",
        tracked,
    );
    e.single(
        "conclave_anomaly_untracked_events_total",
        "counter",
        "Events the anomaly rules could not count because their table was full.",
        untracked,
    );
    e.single(
        "conclave_audit_records_dropped_total",
        "counter",
        "Audit records dropped because the audit writer fell behind.",
        shared.audit.dropped(),
    );
    e.0
}

/// Binds the metrics endpoint. Warns when the address is not loopback: the metrics tell who
/// is connected how much, and there is no authentication.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the metrics endpoint listens beyond loopback: anyone who can reach it sees traffic figures; firewall it"
        );
    }
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot serve metrics on {addr}: {e}; pass another --metrics-listen ADDR:PORT")
    })
}

/// Serves `GET /metrics` until shutdown (then at most [`crate::server::SHUTDOWN_GRACE`]
/// more for requests in progress).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(shared.clone());
    let listener = Limited {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS)),
    };
    let stop = shared.shutdown.clone();
    let serving = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .into_future();
    let stop = shared.shutdown.clone();
    tokio::select! {
        r = serving => if let Err(e) = r {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        },
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(crate::server::SHUTDOWN_GRACE).await;
        } => {}
    }
}

async fn scrape(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&shared),
    )
}

/// A listener that serves at most [`MAX_HTTP_CONNECTIONS`] at once: each accepted stream
/// holds a permit until it is dropped.
struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Limited {
    type Io = Slot;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Slot, SocketAddr) {
        loop {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                // The semaphore is never closed; wait instead of spinning if it were.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    return (
                        Slot {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                // Out of file descriptors and similar: wait a little instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A metrics connection and its permit.
struct Slot {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Slot {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slot {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
