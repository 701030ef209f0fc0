//! What the operator watches: the anomaly rules fed with the server's events, the alerts they
//! raise (audited, counted, kept for the monitor, and maybe a ban), and once a second a sample
//! of every connection's counters that gives the rates `conclave monitor` shows.
//!
//! Where the events come from, so the hot path stays untouched: logins, limits, disconnects
//! and bans are read off the audit records as [`crate::state::Shared::audit`] writes them
//! ([`observe_audit`]); new connections and connections that ended before their hello are
//! reported by the listener ([`note_accept`], [`connection_closed`]); messages are counted per
//! connection with a relaxed atomic and summed by the sampler ([`run`]), which feeds the
//! message-flood rule. The rules themselves are in [`crate::anomaly`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use conclave_proto::{ErrorBody, ErrorCode};
use serde_json::{Value, json};

use crate::alerts::{AlertRecord, Counts, RECENT_ALERTS, Rates, TotalRates, lock};
use crate::anomaly::{Alert, Event, Settings};
use crate::guard::Refused;
use crate::registry::ConnInfo;
use crate::state::Shared;
use crate::store::now_ms;

/// How often connections are sampled for rates and the message-flood rule.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the anomaly rules forget stale counts (in samples).
const SWEEP_EVERY_SAMPLES: u64 = 60;
/// Connections in one monitor answer, by default and at most.
pub const DEFAULT_CONNECTIONS_SHOWN: usize = 1000;
pub const MAX_CONNECTIONS_SHOWN: usize = 10_000;

/// A new TCP connection, admitted or refused by the guard (before any TLS work).
pub fn note_accept(shared: &Shared, peer: SocketAddr, admitted: &Result<(), Box<Refused>>) {
    let m = &shared.metrics;
    match admitted {
        Ok(()) => {
            m.connections_accepted.fetch_add(1, Ordering::Relaxed);
        }
        Err(r) => m.refused(r.refusal.as_str()),
    }
    // A banned address knocking again is already dealt with: no new alerts for it.
    if let Err(r) = admitted
        && matches!(r.refusal, crate::guard::Refusal::Banned(_))
    {
        return;
    }
    let alerts = shared.monitor.observe(Event::Connection { ip: peer.ip() });
    shared.raise(alerts);
}

/// An admitted connection ended: if it never finished its TLS handshake and hello, that
/// counts as incomplete (a scan, most often).
/// A connection finished its TLS handshake as a browser's (HTTP): it is no scan when it
/// closes, though it never says the native hello. (Its WebSocket session, if it opens one,
/// is counted and audited as a connection like a native one.)
pub fn note_web_established(shared: &Shared, peer: SocketAddr) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    lock(&shared.monitor.established).insert(peer);
}

pub fn connection_closed(shared: &Shared, peer: SocketAddr) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    if lock(&shared.monitor.established).remove(&peer) || shared.shutdown.is_cancelled() {
        return;
    }
    shared
        .metrics
        .handshakes_incomplete
        .fetch_add(1, Ordering::Relaxed);
    let alerts = shared
        .monitor
        .observe(Event::HandshakeIncomplete { ip: peer.ip() });
    shared.raise(alerts);
}

/// Samples every connection once a second until shutdown: rates for the monitor, message
/// counts for the message-flood rule; applies reloaded anomaly settings; sweeps the rules.
pub async fn run(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut config = shared.config();
    for n in 0u64.. {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = shared.config();
        if !Arc::ptr_eq(&now, &config) {
            config = now;
            match Settings::from_config(&config.anomaly) {
                Ok(s) => lock(&shared.monitor.detector).set_settings(s),
                Err(e) => tracing::warn!(error = %e, "anomaly settings not applied"),
            }
        }
        let alerts = sample(&shared, now_ms());
        shared.raise(alerts);
        if n % SWEEP_EVERY_SAMPLES == SWEEP_EVERY_SAMPLES - 1 {
            lock(&shared.monitor.detector).sweep(now_ms());
        }
    }
}

/// Takes one sample; returns the alerts of the message-flood rule.
fn sample(shared: &Shared, now: i64) -> Vec<Alert> {
    let (first, interval_ms) = {
        let s = lock(&shared.monitor.sampled);
        let first = s.at_ms == 0;
        let interval_ms = if first {
            SAMPLE_INTERVAL.as_millis() as i64
        } else {
            (now - s.at_ms).max(1)
        };
        (first, interval_ms)
    };
    let secs = interval_ms as f64 / 1000.0;
    // Each connection keeps its previous sample itself; only the non-zero rates and the
    // senders are collected, so an idle connection costs a sample nothing but the reads.
    let mut rates = HashMap::new();
    let mut floods: Vec<(IpAddr, Option<String>, u32)> = Vec::new();
    shared.registry.with_each(|c| {
        let (counts, before) = Counts::sample(c);
        let r = Rates::between(&counts, &before, secs);
        if r != Rates::default() {
            rates.insert(c.sid, r);
        }
        let sent = counts.messages_in.saturating_sub(before.messages_in);
        if sent > 0 {
            floods.push((
                c.peer.ip(),
                c.user.clone(),
                u32::try_from(sent).unwrap_or(u32::MAX),
            ));
        }
    });
    let traffic = shared.registry.totals();
    let traffic = Counts {
        bytes_in: traffic.bytes_in,
        bytes_out: traffic.bytes_out,
        frames_in: traffic.frames_in,
        frames_out: traffic.frames_out,
        messages_in: traffic.messages_in,
    };
    let messages_stored = shared.metrics.messages_total();
    let deliveries = shared.metrics.deliveries_total();
    let commit = shared.metrics.store_commit.snapshot();
    {
        let mut s = lock(&shared.monitor.sampled);
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let commit_delta = commit.since(&s.commit);
        s.totals = if first {
            TotalRates::default()
        } else {
            TotalRates {
                traffic: Rates::between(&traffic, &s.traffic, secs),
                messages_stored: per_s(messages_stored, s.messages_stored),
                deliveries: per_s(deliveries, s.deliveries),
                commits: commit_delta.count() as f64 / secs,
                commit: commit_delta,
            }
        };
        s.at_ms = now;
        s.interval_ms = interval_ms;
        s.rates = rates;
        s.traffic = traffic;
        s.messages_stored = messages_stored;
        s.deliveries = deliveries;
        s.commit = commit;
    }
    let mut detector = lock(&shared.monitor.detector);
    let mut alerts = Vec::new();
    for (ip, user, count) in floods {
        alerts.extend(detector.observe(
            Event::Messages {
                ip,
                user: user.as_deref(),
                count,
            },
            now,
        ));
    }
    alerts
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The answer to the admin socket's `{"cmd":"monitor"}`: the server, its totals and rates,
/// every connection (sorted by `"sort"`, at most `"limit"`), and the recent alerts.
pub fn snapshot(shared: &Shared, req: &Value) -> Result<Value, ErrorBody> {
    let sort = req.get("sort").and_then(Value::as_str).unwrap_or("id");
    let limit = match req.get("limit") {
        None => DEFAULT_CONNECTIONS_SHOWN,
        Some(v) => v
            .as_u64()
            .map(|n| (n as usize).min(MAX_CONNECTIONS_SHOWN))
            .ok_or_else(|| bad("\"limit\" must be a number"))?,
    };
    let alerts_shown = req
        .get("alerts")
        .and_then(Value::as_u64)
        .map_or(50, |n| (n as usize).min(RECENT_ALERTS));
    let config = shared.config();
    let (at_ms, interval_ms, rates, totals) = {
        let s = lock(&shared.monitor.sampled);
        (s.at_ms, s.interval_ms, s.rates.clone(), s.totals.clone())
    };
    let mut conns: Vec<(ConnInfo, Rates)> = shared
        .registry
        .snapshot()
        .into_iter()
        .map(|c| {
            let r = rates.get(&c.sid).copied().unwrap_or_default();
            (c, r)
        })
        .collect();
    let total_conns = conns.len();
    let key_f64 = |r: &Rates| r.bytes_in + r.bytes_out;
    match sort {
        "id" | "since" => {}
        "user" => conns.sort_by(|a, b| a.0.user.cmp(&b.0.user)),
        "ip" => conns.sort_by_key(|(c, _)| c.peer),
        "bytes" => conns.sort_by_key(|(c, _)| {
            std::cmp::Reverse(
                c.counters.bytes_in.load(Ordering::Relaxed)
                    + c.counters.bytes_out.load(Ordering::Relaxed),
            )
        }),
        "rate" => conns.sort_by(|a, b| key_f64(&b.1).total_cmp(&key_f64(&a.1))),
        "rtt" => conns.sort_by_key(|(c, _)| std::cmp::Reverse(c.counters.rtt())),
        "queue" => conns.sort_by_key(|(c, _)| std::cmp::Reverse(c.outbox.depth())),
        other => {
            return Err(bad(format!(
                "unknown sort {other:?}: use id, user, ip, bytes, rate, rtt or queue"
            )));
        }
    }
    let shown: Vec<Value> = conns
        .iter()
        .take(limit)
        .map(|(c, r)| {
            let n = Counts::read(c);
            json!({
                "id": c.sid, "user": c.user, "ip": c.peer.ip().to_canonical().to_string(),
                "port": c.peer.port(), "tls": c.tls_version, "cipher": c.cipher,
                "key_exchange": c.kx_group, "since_ms": c.since_ms,
                "bytes_in": n.bytes_in, "bytes_out": n.bytes_out,
                "frames_in": n.frames_in, "frames_out": n.frames_out,
                "messages_in": n.messages_in,
                "bytes_in_per_s": round(r.bytes_in), "bytes_out_per_s": round(r.bytes_out),
                "frames_in_per_s": round(r.frames_in), "frames_out_per_s": round(r.frames_out),
                "messages_per_s": round(r.messages),
                "rtt_ms": c.counters.rtt().map(|d| d.as_secs_f64() * 1000.0),
                "queue": c.outbox.depth(),
            })
        })
        .collect();
    let m = &shared.metrics;
    let traffic = shared.registry.totals();
    let queues = shared.registry.queue_depths();
    let by_kx: serde_json::Map<String, Value> = crate::tls::KX_GROUP_NAMES
        .iter()
        .zip(shared.registry.by_kx_group())
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| (name.to_string(), json!(n)))
        .collect();
    let users_online = shared.hub.lock().who("", None).map_or(0, |v| v.len());
    let bans_active = shared.guard().bans(now_ms()).len();
    let alerts: Vec<Value> = shared
        .monitor
        .recent_alerts(alerts_shown)
        .iter()
        .map(AlertRecord::to_json)
        .collect();
    Ok(json!({
        "ok": true,
        "ts_ms": now_ms(),
        "sampled_ms": at_ms,
        "interval_ms": interval_ms,
        "server": {
            "version": env!("CARGO_PKG_VERSION"),
            "listen": shared.local_addr.to_string(),
            "registration": shared.registration().as_str(),
            "server_password": config.server_password.is_some(),
            "metrics_listen": config.metrics.listen.map(|a| a.to_string()),
            "anomaly_enabled": config.anomaly.enabled,
            "uptime_s": shared.started.elapsed().as_secs(),
        },
        "totals": {
            "connections": traffic.connections,
            "connections_by_key_exchange": by_kx,
            "users_online": users_online,
            "messages_total": m.messages_total(),
            "deliveries_total": m.deliveries_total(),
            "bytes_in_total": traffic.bytes_in,
            "bytes_out_total": traffic.bytes_out,
            "frames_in_total": traffic.frames_in,
            "frames_out_total": traffic.frames_out,
            "logins_ok": m.logins_ok.load(Ordering::Relaxed),
            "logins_failed": m.logins_failed.load(Ordering::Relaxed),
            "alerts_total": m.alerts.sum(),
            "bans_active": bans_active,
            "messages_per_s": round(totals.messages_stored),
            "deliveries_per_s": round(totals.deliveries),
            "bytes_in_per_s": round(totals.traffic.bytes_in),
            "bytes_out_per_s": round(totals.traffic.bytes_out),
            "frames_in_per_s": round(totals.traffic.frames_in),
            "frames_out_per_s": round(totals.traffic.frames_out),
            "store_commits_per_s": round(totals.commits),
            "store_commit_ms_mean": totals.commit.mean_ms(),
            "store_commit_ms_p99": totals.commit.quantile_ms(0.99),
            "store_queue": shared.store.queued(),
            "outbound_queue_total": queues.total,
            "outbound_queue_max": queues.max,
        },
        "connections_total": total_conns,
        "connections": shown,
        "alerts": alerts,
    }))
}

fn bad(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, message)
}
