//! What every run shares, whatever it drives: the resolved scenario, the deadline, the
//! counters, the phase marks (when each phase began or ended, with a sample of the server and
//! of the generator at that moment), pacing, and waiting for the deliveries.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::measure::{self, Counters, ProcSample, Recorder};
use crate::preset::Scenario;

/// Pause after the rooms are joined, so join and presence events are drained before traffic.
pub const SETTLE: Duration = Duration::from_millis(500);
/// Bound on opening one connection (TCP, TLS, hello or registration, login).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one join (or room creation).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The room of the warm-up both drivers run before anything is measured: two connections
/// log in, join it, exchange one message, part and close, so that what a server does once
/// (the pages of its program first executed, its threads' allocator arenas, caches filled at
/// the first login) is behind it when memory is first sampled. Memory per connection is then
/// what connections add, for every server alike (docs/benchmarks.md, "Method").
pub const WARM_UP_ROOM: &str = "bench-warm-up";
/// Pause after the warm-up, so its connections are gone before the first sample.
pub const WARM_UP_SETTLE: Duration = Duration::from_millis(500);
/// How often waiting loops look at the counters.
const POLL: Duration = Duration::from_millis(10);

/// The moments a run measures between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the first connection.
    ConnectStart,
    /// Every connection open and logged in (or given up).
    Connected,
    /// Every room joined.
    Joined,
    /// Idle runs: the connections were held idle for the hold time.
    Held,
    /// Just before the first send.
    TrafficStart,
    /// The last delivery (or the stall/deadline).
    TrafficEnd,
}

/// A phase boundary: when, and the server's and generator's accounting then.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub at: Instant,
    pub server: Option<ProcSample>,
    pub generator_cpu: Option<Duration>,
}

/// The state of one run, shared by its tasks.
pub struct Ctx {
    pub scn: Scenario,
    /// Tells this run's messages from older ones.
    pub run_id: u32,
    pub counters: Counters,
    pub deadline: Instant,
    pub server_pid: Option<u32>,
    /// Cancelled when the run is over: receivers and idle connections stop.
    pub stop: CancellationToken,
    /// Per room: members connected and joined.
    pub joined: Vec<AtomicU64>,
    /// Per room: sends accepted (acknowledged by Conclave, written for IRC).
    pub accepted: Vec<AtomicU64>,
    /// Connections open and logged in.
    pub connected: AtomicU64,
    /// Server addresses the connections are spread over (a cluster's nodes; 1 otherwise).
    pub servers: std::sync::atomic::AtomicUsize,
    marks: Mutex<Vec<(Phase, Mark)>>,
    latency: Mutex<Recorder>,
    /// When the delivery count last grew (seen by [`Ctx::await_deliveries`]): the end of the
    /// traffic for the rates when deliveries went missing and the wait ran into the stall.
    last_delivery: Mutex<Option<Instant>>,
}

impl Ctx {
    pub fn new(scn: Scenario, server_pid: Option<u32>) -> Ctx {
        let rooms = scn.rooms;
        Ctx {
            deadline: Instant::now() + scn.timeout,
            run_id: rand::random(),
            counters: Counters::default(),
            server_pid,
            stop: CancellationToken::new(),
            joined: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            accepted: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            connected: AtomicU64::new(0),
            servers: std::sync::atomic::AtomicUsize::new(1),
            marks: Mutex::new(Vec::new()),
            latency: Mutex::new(Recorder::default()),
            last_delivery: Mutex::new(None),
            scn,
        }
    }

    /// Records a phase boundary now.
    pub fn mark(&self, phase: Phase) {
        let mark = Mark {
            at: Instant::now(),
            server: self.server_pid.and_then(measure::sample),
            generator_cpu: measure::self_cpu(),
        };
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((phase, mark));
    }

    pub fn mark_of(&self, phase: Phase) -> Option<Mark> {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|(p, _)| *p == phase)
            .map(|(_, m)| *m)
    }

    /// Adds a receiver's latencies to the run's.
    pub fn merge_latency(&self, r: &Recorder) {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(r);
    }

    pub fn latency(&self) -> crate::measure::Latency {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .summary()
    }

    /// Latencies split by whether a message crossed nodes (several server addresses only).
    pub fn latency_by_node(&self) -> Option<crate::measure::NodeSplit> {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .split()
    }

    /// The server address connection `i` starts at, when there are several.
    pub fn node_of(&self, i: usize) -> Option<usize> {
        let n = self.servers.load(std::sync::atomic::Ordering::Relaxed);
        (n > 1).then(|| i % n)
    }

    pub fn socket_latency(&self) -> crate::measure::Latency {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .socket_summary()
    }

    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The earlier of `now + d` and the run's deadline.
    pub fn bounded(&self, d: Duration) -> Instant {
        (Instant::now() + d).min(self.deadline)
    }

    pub fn room_name(&self, r: usize, irc: bool) -> String {
        if irc {
            format!("#bench-{r}")
        } else {
            format!("bench-{r}")
        }
    }

    /// Deliveries the accepted sends should produce: each reaches every other joined member
    /// of its room (nobody receives their own message).
    pub fn expected_deliveries(&self) -> u64 {
        self.accepted
            .iter()
            .zip(&self.joined)
            .map(|(a, j)| {
                let members = j.load(Ordering::Relaxed);
                a.load(Ordering::Relaxed) * members.saturating_sub(1)
            })
            .sum()
    }

    /// Waits until every expected delivery arrived, none came for the scenario's stall time, or the deadline.
    pub async fn await_deliveries(&self) {
        let expected = self.expected_deliveries();
        let mut last = Counters::get(&self.counters.delivered);
        let mut last_progress = Instant::now();
        loop {
            let now = Counters::get(&self.counters.delivered);
            if now != last {
                last = now;
                last_progress = Instant::now();
                *self.last_delivery.lock().unwrap_or_else(|e| e.into_inner()) = Some(last_progress);
            }
            if now >= expected || self.past_deadline() || last_progress.elapsed() >= self.scn.stall
            {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn last_delivery(&self) -> Option<Instant> {
        *self.last_delivery.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the connections idle for the scenario's hold time (bounded by the deadline).
    pub async fn hold(&self) {
        tokio::time::sleep_until(self.bounded(self.scn.hold)).await;
    }
}

/// Spaces a sender's messages `1 / rate` apart from its start (no pacing without a rate),
/// the first `phase` of an interval (0 to 1) after now. Late messages go at once, so the
/// average rate holds.
pub struct Pacer {
    start: Instant,
    interval: Option<Duration>,
}

impl Pacer {
    pub fn new(rate: Option<f64>, phase: f64) -> Pacer {
        let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
        let offset = interval.map_or(Duration::ZERO, |iv| iv.mul_f64(phase.clamp(0.0, 1.0)));
        Pacer {
            start: Instant::now() + offset,
            interval,
        }
    }

    /// When message `i` (from 0) is due.
    pub fn due(&self, i: u64) -> Instant {
        match self.interval {
            Some(iv) => self.start + iv.mul_f64(i as f64),
            None => self.start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_deliveries_skip_the_sender() {
        let scn = Scenario {
            rooms: 2,
            ..Scenario::default()
        };
        let ctx = Ctx::new(scn, None);
        ctx.joined[0].store(10, Ordering::Relaxed);
        ctx.joined[1].store(1, Ordering::Relaxed);
        ctx.accepted[0].store(5, Ordering::Relaxed);
        ctx.accepted[1].store(7, Ordering::Relaxed);
        assert_eq!(ctx.expected_deliveries(), 45);
    }

    #[test]
    fn pacing_spreads_messages_evenly() {
        let p = Pacer::new(Some(50.0), 0.0);
        assert_eq!(p.due(50) - p.due(0), Duration::from_secs(1));
        let fast = Pacer::new(None, 0.5);
        assert_eq!(fast.due(1000), fast.due(0));
        // A quarter of the way into the interval: 5 ms later than a sender in phase 0.
        let late = Pacer::new(Some(50.0), 0.25);
        let lag = late.due(0) - p.due(0);
        assert!(
            lag >= Duration::from_millis(5) && lag < Duration::from_millis(6),
            "{lag:?}"
        );
    }
}
