//! The Prometheus endpoint (`--metrics-listen`, off by default): renders the counters and
//! histograms of [`crate::metrics`] with the gauges read at scrape time, in the text format.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::anomaly::Rule;
use crate::metrics::*;
use crate::state::Shared;

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

/// Serves `GET /metrics` until shutdown (then at most [`crate::state::SHUTDOWN_GRACE`]
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
            tokio::time::sleep(crate::state::SHUTDOWN_GRACE).await;
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
