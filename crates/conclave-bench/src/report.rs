//! The report: computed from a run's phase marks and counters (whatever phases were reached),
//! printed as a table for people or as one JSON object for scripts.

use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::{Counters, Latency};
use crate::preset::Scenario;
use crate::run::{Ctx, Phase};

/// Generator CPU use (of the CPUs it runs on) above which its figures may be its own limit.
pub const GENERATOR_BOUND_FRACTION: f64 = 0.9;

/// The target and how it was run.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    /// `conclave` or `irc`.
    pub kind: String,
    pub label: String,
    pub address: String,
    pub pid: Option<u32>,
    /// Started by bench (else an external server).
    pub started_by_bench: bool,
    pub pinned_to_cpu0: bool,
    /// Settings changed from the defaults for the benchmark.
    pub relaxed: Vec<String>,
    pub accounts: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub server: Option<ServerInfo>,
    pub scenario: Option<Scenario>,
    pub clients_connected: u64,
    pub connect_s: Option<f64>,
    /// Connections opened and logged in per second.
    pub connects_per_sec: Option<f64>,
    pub sent: u64,
    /// Acknowledged by the server (Conclave); equal to `sent` for IRC.
    pub accepted: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub traffic_s: Option<f64>,
    pub deliveries_per_sec: Option<f64>,
    pub latency_ms: Latency,
    /// From send to the receiving socket (kernel receive stamps): without the time messages
    /// wait for the generator's CPU after arriving.
    pub socket_latency_ms: Latency,
    /// With several server addresses: the latencies of messages that came through the
    /// receiver's own node and of those that crossed from another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_by_node: Option<crate::measure::NodeSplit>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server CPU use during the traffic, as a fraction of one CPU.
    pub server_cpu_util: Option<f64>,
    pub server_rss_kib_start: Option<u64>,
    pub server_rss_kib_connected: Option<u64>,
    pub server_rss_kib_end: Option<u64>,
    pub server_peak_rss_kib: Option<u64>,
    /// (RSS with every connection open and idle − RSS before the first) / connections.
    pub server_rss_kib_per_conn: Option<f64>,
    pub generator_cpus: usize,
    pub generator_cpu_s: Option<f64>,
    /// Generator CPU use during the traffic (or the connect phase of an idle run), as a
    /// fraction of the CPUs it runs on.
    pub generator_cpu_util: Option<f64>,
    pub errors: u64,
    pub disconnects: u64,
    /// Messages of an earlier run delivered to this one (catch-up), not counted.
    pub stale_messages: u64,
    pub error_samples: Vec<String>,
    /// Every phase of the scenario finished (else the figures are partial).
    pub complete: bool,
    pub notes: Vec<String>,
}

impl Report {
    pub fn build(ctx: &Ctx, server: Option<ServerInfo>, generator_cpus: usize) -> Report {
        let scn = &ctx.scn;
        let c = &ctx.counters;
        let mut r = Report {
            server,
            scenario: Some(scn.clone()),
            clients_connected: Counters::get(&ctx.connected),
            sent: Counters::get(&c.sent),
            accepted: ctx
                .accepted
                .iter()
                .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
                .sum(),
            expected_deliveries: ctx.expected_deliveries(),
            deliveries: Counters::get(&c.delivered),
            latency_ms: ctx.latency(),
            socket_latency_ms: ctx.socket_latency(),
            latency_by_node: ctx.latency_by_node(),
            generator_cpus,
            errors: Counters::get(&c.errors),
            disconnects: Counters::get(&c.disconnects),
            stale_messages: Counters::get(&c.stale),
            error_samples: c.error_samples(),
            ..Report::default()
        };
        let start = ctx.mark_of(Phase::ConnectStart);
        let connected = ctx.mark_of(Phase::Connected);
        if let (Some(a), Some(b)) = (start, connected) {
            let secs = (b.at - a.at).as_secs_f64();
            r.connect_s = Some(secs);
            r.connects_per_sec = (secs > 0.0).then(|| r.clients_connected as f64 / secs);
        }
        r.server_rss_kib_start = start.and_then(|m| m.server).map(|s| s.rss_kib);
        // Memory per connection: with every connection open and idle (after the hold in an
        // idle run, after the joins otherwise).
        let loaded = ctx
            .mark_of(Phase::Held)
            .or_else(|| ctx.mark_of(Phase::Joined))
            .or(connected);
        r.server_rss_kib_connected = loaded.and_then(|m| m.server).map(|s| s.rss_kib);
        if let (Some(a), Some(b)) = (r.server_rss_kib_start, r.server_rss_kib_connected)
            && r.clients_connected > 0
        {
            r.server_rss_kib_per_conn = Some((b as f64 - a as f64) / r.clients_connected as f64);
        }
        let t0 = ctx.mark_of(Phase::TrafficStart);
        let t1 = ctx.mark_of(Phase::TrafficEnd);
        if let (Some(a), Some(b)) = (t0, t1) {
            let secs = (b.at - a.at).as_secs_f64();
            r.traffic_s = Some(secs);
            // Up to the last delivery: a wait for missing ones is not traffic.
            let until_last = ctx
                .last_delivery()
                .filter(|l| *l > a.at && *l < b.at)
                .map_or(secs, |l| (l - a.at).as_secs_f64());
            r.deliveries_per_sec = (until_last > 0.0).then(|| r.deliveries as f64 / until_last);
            if let (Some(sa), Some(sb)) = (a.server, b.server) {
                let cpu = (sb.cpu - sa.cpu).as_secs_f64();
                r.server_cpu_s = Some(cpu);
                r.server_cpu_util = (secs > 0.0).then(|| cpu / secs);
                r.server_cpu_us_per_delivery =
                    (r.deliveries > 0).then(|| cpu * 1e6 / r.deliveries as f64);
            }
            if let (Some(ga), Some(gb)) = (a.generator_cpu, b.generator_cpu) {
                let cpu = (gb - ga).as_secs_f64();
                r.generator_cpu_s = Some(cpu);
                r.generator_cpu_util =
                    (secs > 0.0).then(|| cpu / (secs * generator_cpus.max(1) as f64));
            }
        } else if let (Some(a), Some(b)) = (start, connected) {
            // No traffic: the generator's load while connecting.
            let secs = (b.at - a.at).as_secs_f64();
            if let (Some(ga), Some(gb)) = (a.generator_cpu, b.generator_cpu) {
                let cpu = (gb - ga).as_secs_f64();
                r.generator_cpu_s = Some(cpu);
                r.generator_cpu_util =
                    (secs > 0.0).then(|| cpu / (secs * generator_cpus.max(1) as f64));
            }
            if let (Some(sa), Some(sb)) = (a.server, b.server) {
                r.server_cpu_s = Some((sb.cpu - sa.cpu).as_secs_f64());
            }
        }
        let last = [t1, ctx.mark_of(Phase::Held), loaded]
            .into_iter()
            .flatten()
            .next();
        r.server_rss_kib_end = last.and_then(|m| m.server).map(|s| s.rss_kib);
        r.server_peak_rss_kib = last.and_then(|m| m.server).map(|s| s.hwm_kib);
        r.complete = if scn.is_idle() {
            ctx.mark_of(Phase::Held).is_some()
        } else {
            t1.is_some() && r.deliveries >= r.expected_deliveries
        };
        r.add_notes(ctx);
        r
    }

    fn add_notes(&mut self, ctx: &Ctx) {
        if !self.complete {
            self.notes.push(format!(
                "partial: the run did not finish every phase (deadline {} s, or deliveries missing)",
                ctx.scn.timeout.as_secs()
            ));
        }
        if let Some(u) = self.generator_cpu_util
            && u >= GENERATOR_BOUND_FRACTION
        {
            self.notes.push(format!(
                "the generator used {:.0}% of its CPUs: rates and latencies may be its limit, not the server's",
                u * 100.0
            ));
        }
        if self.deliveries < self.expected_deliveries {
            self.notes.push(format!(
                "{} deliveries missing",
                self.expected_deliveries - self.deliveries
            ));
        }
        if ctx.server_pid.is_none() {
            self.notes.push(
                "no server process to measure: pass --server-pid for CPU and memory figures".into(),
            );
        }
        if ctx.scn.is_idle() && ctx.scn.rooms > 0 {
            self.notes
                .push("idle connections log in only; they join no room".into());
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table for people.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let f1 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let f2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let f3 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}%", v * 100.0));
        if let Some(s) = &self.server {
            let _ = writeln!(out, "server      {} at {}", s.label, s.address);
            let _ = writeln!(
                out,
                "            pid {}{}{}",
                n(s.pid.map(u64::from)),
                if s.started_by_bench {
                    ", started by bench"
                } else {
                    ""
                },
                if s.pinned_to_cpu0 {
                    ", pinned to CPU 0"
                } else {
                    ""
                }
            );
            let _ = writeln!(out, "accounts    {}", s.accounts);
            for r in &s.relaxed {
                let _ = writeln!(out, "relaxed     {r}");
            }
        }
        if let Some(s) = &self.scenario {
            let _ = writeln!(
                out,
                "scenario    {}{} clients, {} rooms, {} senders x {} messages of {} bytes, {}{}",
                s.preset
                    .map(|p| format!("{}: ", p.name()))
                    .unwrap_or_default(),
                s.clients,
                s.rooms,
                s.senders,
                s.messages,
                s.size_bytes,
                if s.is_idle() {
                    "idle".to_string()
                } else {
                    s.rate
                        .map(|r| {
                            format!(
                                "{r} msg/s per sender, {}",
                                if s.in_step { "in step" } else { "spread" }
                            )
                        })
                        .unwrap_or_else(|| format!("full speed (window {})", s.window))
                },
                if s.hold.is_zero() {
                    String::new()
                } else {
                    format!(", held {} s", s.hold.as_secs())
                }
            );
        }
        let _ = writeln!(out);
        let mut row = |k: &str, v: String| {
            let _ = writeln!(out, "{k:<34} {v}");
        };
        row(
            "connected",
            format!(
                "{} in {} s ({} per s)",
                self.clients_connected,
                f2(self.connect_s),
                f1(self.connects_per_sec)
            ),
        );
        if self.sent > 0 || self.expected_deliveries > 0 {
            row(
                "sent / accepted",
                format!("{} / {}", self.sent, self.accepted),
            );
            row(
                "delivered / expected",
                format!("{} / {}", self.deliveries, self.expected_deliveries),
            );
            row(
                "deliveries per second",
                format!(
                    "{} (over {} s)",
                    f1(self.deliveries_per_sec),
                    f2(self.traffic_s)
                ),
            );
            let mut latencies = vec![
                ("latency ms p50 / p90 / p99 / max", &self.latency_ms),
                ("  to the socket (kernel stamp)", &self.socket_latency_ms),
            ];
            if let Some(split) = &self.latency_by_node {
                latencies.extend([
                    ("  same node", &split.same_node_ms),
                    ("  across nodes", &split.cross_node_ms),
                    ("  same node, to the socket", &split.same_node_socket_ms),
                    ("  across nodes, to the socket", &split.cross_node_socket_ms),
                ]);
            }
            for (what, l) in latencies {
                row(
                    what,
                    format!(
                        "{} / {} / {} / {}",
                        f3(l.p50),
                        f3(l.p90),
                        f3(l.p99),
                        f3(l.max)
                    ),
                );
            }
            row(
                "server CPU per delivery",
                format!(
                    "{} us ({} s, {} of one CPU)",
                    f3(self.server_cpu_us_per_delivery),
                    f2(self.server_cpu_s),
                    pct(self.server_cpu_util)
                ),
            );
        }
        row(
            "server RSS start / loaded / end",
            format!(
                "{} / {} / {} KiB",
                n(self.server_rss_kib_start),
                n(self.server_rss_kib_connected),
                n(self.server_rss_kib_end)
            ),
        );
        row(
            "server peak RSS",
            format!("{} KiB", n(self.server_peak_rss_kib)),
        );
        row(
            "server RSS per connection",
            format!("{} KiB", f2(self.server_rss_kib_per_conn)),
        );
        row(
            "generator CPU",
            format!(
                "{} s ({} of {} CPU{})",
                f2(self.generator_cpu_s),
                pct(self.generator_cpu_util),
                self.generator_cpus,
                if self.generator_cpus == 1 { "" } else { "s" }
            ),
        );
        row(
            "errors / disconnects",
            format!("{} / {}", self.errors, self.disconnects),
        );
        for e in &self.error_samples {
            let _ = writeln!(out, "  error: {e}");
        }
        if self.stale_messages > 0 {
            let _ = writeln!(
                out,
                "  {} messages from an earlier run were ignored",
                self.stale_messages
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}
