//! What the monitor keeps (the anomaly rules' state, recent alerts, the last sample of every
//! connection's counters) and how an audit record feeds it ([`observe_audit`]). Acting on
//! alerts is `Shared::raise` ([`crate::state`]); the sampler and the operator's view are
//! [`crate::monitor`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde_json::{Value, json};

use crate::anomaly::{Alert, Detector, Event, Settings};
use crate::audit::{Fields, Kind};
use crate::hub::SessionId;
use crate::metrics::{HistogramSnapshot, Metrics};
use crate::registry::ConnInfo;
use crate::store::now_ms;

/// Alerts kept for the monitor.
pub const RECENT_ALERTS: usize = 200;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One alert as the monitor lists it.
#[derive(Debug, Clone)]
pub struct AlertRecord {
    pub id: u64,
    pub alert: Alert,
    /// What was done about it ("banned for 15 min", "alert only: ...").
    pub action: String,
}

impl AlertRecord {
    pub fn to_json(&self) -> Value {
        let a = &self.alert;
        json!({
            "id": self.id, "ts_ms": a.ts_ms, "rule": a.rule.as_str(),
            "scope": a.scope.kind(), "target": a.scope.value(), "count": a.count,
            "threshold": a.threshold, "window_s": a.window_ms / 1000,
            "action": self.action, "text": a.describe(),
        })
    }
}

/// One connection's counters at a sample.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) frames_in: u64,
    pub(crate) frames_out: u64,
    pub(crate) messages_in: u64,
}

impl Counts {
    pub(crate) fn read(c: &ConnInfo) -> Counts {
        Counts {
            bytes_in: c.counters.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.counters.bytes_out.load(Ordering::Relaxed),
            frames_in: c.counters.frames_in.load(Ordering::Relaxed),
            frames_out: c.outbox.frames_queued(),
            messages_in: c.counters.messages_in.load(Ordering::Relaxed),
        }
    }

    fn to_array(self) -> [u64; 5] {
        [
            self.bytes_in,
            self.bytes_out,
            self.frames_in,
            self.frames_out,
            self.messages_in,
        ]
    }

    fn from_array(a: [u64; 5]) -> Counts {
        let [bytes_in, bytes_out, frames_in, frames_out, messages_in] = a;
        Counts {
            bytes_in,
            bytes_out,
            frames_in,
            frames_out,
            messages_in,
        }
    }

    /// Reads a connection's counters and returns them with those of the previous sample,
    /// which they replace.
    pub(crate) fn sample(c: &ConnInfo) -> (Counts, Counts) {
        let now = Counts::read(c);
        let before = Counts::from_array(c.counters.swap_sample(now.to_array()));
        (now, before)
    }
}

/// Per-second rates over the last sample interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub bytes_in: f64,
    pub bytes_out: f64,
    pub frames_in: f64,
    pub frames_out: f64,
    pub messages: f64,
}

impl Rates {
    pub(crate) fn between(now: &Counts, before: &Counts, secs: f64) -> Rates {
        let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        Rates {
            bytes_in: r(now.bytes_in, before.bytes_in),
            bytes_out: r(now.bytes_out, before.bytes_out),
            frames_in: r(now.frames_in, before.frames_in),
            frames_out: r(now.frames_out, before.frames_out),
            messages: r(now.messages_in, before.messages_in),
        }
    }
}

/// The server's rates over the last sample interval.
#[derive(Debug, Clone, Default)]
pub(crate) struct TotalRates {
    pub(crate) traffic: Rates,
    pub(crate) messages_stored: f64,
    pub(crate) deliveries: f64,
    pub(crate) commits: f64,
    pub(crate) commit: HistogramSnapshot,
}

#[derive(Debug, Default)]
pub(crate) struct Sampled {
    pub(crate) at_ms: i64,
    pub(crate) interval_ms: i64,
    /// Connections whose rates were not all zero over the last interval (an idle connection
    /// has no entry: the monitor shows it at zero).
    pub(crate) rates: HashMap<SessionId, Rates>,
    pub(crate) traffic: Counts,
    pub(crate) messages_stored: u64,
    pub(crate) deliveries: u64,
    pub(crate) commit: HistogramSnapshot,
    pub(crate) totals: TotalRates,
}

/// The monitor's state, one per server.
pub struct Monitor {
    pub(crate) detector: Mutex<Detector>,
    pub(crate) alerts: Mutex<VecDeque<AlertRecord>>,
    pub(crate) next_alert: AtomicU64,
    /// Peers that finished their TLS handshake and hello (to tell, when a connection ends,
    /// whether it ever did). At most one entry per open connection.
    pub(crate) established: Mutex<HashSet<SocketAddr>>,
    pub(crate) sampled: Mutex<Sampled>,
    pub(crate) started_ms: i64,
}

impl Monitor {
    pub fn new(settings: Settings) -> Monitor {
        Monitor {
            detector: Mutex::new(Detector::new(settings)),
            alerts: Mutex::new(VecDeque::with_capacity(RECENT_ALERTS)),
            next_alert: AtomicU64::new(1),
            established: Mutex::new(HashSet::new()),
            sampled: Mutex::new(Sampled::default()),
            started_ms: now_ms(),
        }
    }

    pub fn started_ms(&self) -> i64 {
        self.started_ms
    }

    /// Keys the rules count now, and events they could not count.
    pub fn detector_load(&self) -> (usize, u64) {
        let d = lock(&self.detector);
        (d.tracked(), d.untracked())
    }

    pub(crate) fn observe(&self, event: Event<'_>) -> Vec<Alert> {
        lock(&self.detector).observe(event, now_ms())
    }

    /// The most recent alerts, oldest first.
    pub fn recent_alerts(&self, n: usize) -> Vec<AlertRecord> {
        let a = lock(&self.alerts);
        a.iter().skip(a.len().saturating_sub(n)).cloned().collect()
    }
}

/// Reads an audit record as it is written: counts it, and feeds the rules it concerns.
/// Returns the alerts raised; the caller passes them to `Shared::raise` once the record is written,
/// so the log reads cause first.
pub fn observe_audit(monitor: &Monitor, m: &Metrics, kind: Kind, f: &Fields) -> Vec<Alert> {
    let extra = |k: &str| f.extra.get(k).and_then(Value::as_str);
    match kind {
        Kind::Connect => {
            m.connections_established.fetch_add(1, Ordering::Relaxed);
            if let (Some(ip), Some(port)) = (f.ip, f.port) {
                lock(&monitor.established).insert(SocketAddr::new(ip, port));
            }
            Vec::new()
        }
        Kind::Disconnect => {
            m.disconnect(f.reason.as_deref().unwrap_or("other"));
            Vec::new()
        }
        Kind::LoginOk => {
            m.logins_ok.fetch_add(1, Ordering::Relaxed);
            Vec::new()
        }
        Kind::Register => {
            m.registrations.fetch_add(1, Ordering::Relaxed);
            Vec::new()
        }
        Kind::LoginFailed => {
            m.logins_failed.fetch_add(1, Ordering::Relaxed);
            match f.ip {
                Some(ip) => monitor.observe(Event::LoginFailed {
                    ip,
                    account: f.user.as_deref(),
                }),
                None => Vec::new(),
            }
        }
        Kind::Limit => {
            let reason = f.reason.as_deref().unwrap_or("other");
            m.limit(reason);
            match (reason, f.ip) {
                ("malformed" | "too_large", Some(ip)) => monitor.observe(Event::BadFrame { ip }),
                _ => Vec::new(),
            }
        }
        Kind::Ban => {
            m.ban(extra("by") == Some("server"));
            Vec::new()
        }
        _ => Vec::new(),
    }
}
