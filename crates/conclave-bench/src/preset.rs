//! Named workloads matching the targets of issue 8, and the resolved [`Scenario`] a run uses.

use std::time::Duration;

use serde::Serialize;

use crate::BenchError;
use crate::args::BenchArgs;

/// Default seconds before a run gives up and reports what it has.
pub const DEFAULT_TIMEOUT_S: u64 = 120;
/// Default seconds without a new delivery after which the missing ones count as lost.
pub const DEFAULT_STALL_S: u64 = 5;
/// Default message text size, bytes (the timestamp header included).
pub const DEFAULT_SIZE_BYTES: usize = 64;
/// Longest message text: an IRC line is at most 512 bytes with its prefix and command.
pub const MAX_SIZE_BYTES: usize = 400;
/// Default sends per sender awaiting their acknowledgement (Conclave).
pub const DEFAULT_WINDOW: usize = 32;
/// Default connections being opened at once.
pub const DEFAULT_CONNECT_PARALLEL: usize = 64;
/// Connections being opened at once in the idle presets (short handshakes, many of them).
pub const IDLE_CONNECT_PARALLEL: usize = 256;
/// Most clients a run may open.
pub const MAX_CLIENTS: usize = 200_000;
/// Most messages in a run (all senders together).
pub const MAX_TOTAL_MESSAGES: u64 = 100_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Preset {
    /// 100 clients in one room, 10 senders at full speed.
    #[value(name = "fanout-100")]
    #[serde(rename = "fanout-100")]
    Fanout100,
    /// 500 clients in one room, 5 senders at full speed.
    #[value(name = "fanout-500")]
    #[serde(rename = "fanout-500")]
    Fanout500,
    /// 100 clients in one room, 10 senders at 50 msg/s each.
    #[value(name = "paced-100")]
    #[serde(rename = "paced-100")]
    Paced100,
    /// 10,000 idle logged-in connections.
    #[value(name = "idle-10k")]
    #[serde(rename = "idle-10k")]
    Idle10k,
    /// 50,000 idle logged-in connections.
    #[value(name = "idle-50k")]
    #[serde(rename = "idle-50k")]
    Idle50k,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Fanout100 => "fanout-100",
            Preset::Fanout500 => "fanout-500",
            Preset::Paced100 => "paced-100",
            Preset::Idle10k => "idle-10k",
            Preset::Idle50k => "idle-50k",
        }
    }

    fn base(self) -> Scenario {
        let fanout = |clients, senders, messages| Scenario {
            clients,
            rooms: 1,
            senders,
            messages,
            ..Scenario::default()
        };
        let idle = |clients| Scenario {
            clients,
            rooms: 0,
            senders: 0,
            messages: 0,
            hold: Duration::from_secs(5),
            connect_parallel: IDLE_CONNECT_PARALLEL,
            ..Scenario::default()
        };
        match self {
            Preset::Fanout100 => fanout(100, 10, 1000),
            Preset::Fanout500 => fanout(500, 5, 1000),
            Preset::Paced100 => Scenario {
                rate: Some(50.0),
                ..fanout(100, 10, 500)
            },
            Preset::Idle10k => idle(10_000),
            Preset::Idle50k => Scenario {
                timeout: Duration::from_secs(300),
                ..idle(50_000)
            },
        }
    }
}

/// What one run does, every value resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub preset: Option<Preset>,
    pub clients: usize,
    pub rooms: usize,
    pub senders: usize,
    /// Per sender.
    pub messages: u64,
    /// Per sender, messages per second; `None`: full speed.
    pub rate: Option<f64>,
    /// Paced senders send at the same moments; otherwise sender k of S starts k/S of an
    /// interval after the first, so the server sees a steady stream.
    pub in_step: bool,
    pub size_bytes: usize,
    pub window: usize,
    #[serde(serialize_with = "secs")]
    pub hold: Duration,
    /// Deliveries are over when none came for this long.
    #[serde(serialize_with = "secs")]
    pub stall: Duration,
    pub connect_parallel: usize,
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for Scenario {
    /// A small full-speed fan-out.
    fn default() -> Self {
        Scenario {
            preset: None,
            clients: 20,
            rooms: 1,
            senders: 2,
            messages: 100,
            rate: None,
            in_step: false,
            size_bytes: DEFAULT_SIZE_BYTES,
            window: DEFAULT_WINDOW,
            hold: Duration::ZERO,
            stall: Duration::from_secs(DEFAULT_STALL_S),
            connect_parallel: DEFAULT_CONNECT_PARALLEL,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_S),
        }
    }
}

impl Scenario {
    /// The preset's values (or the defaults), then every flag given.
    pub fn from_args(args: &BenchArgs) -> Result<Scenario, BenchError> {
        let mut s = match args.preset {
            Some(p) => Scenario {
                preset: Some(p),
                ..p.base()
            },
            None => Scenario::default(),
        };
        if let Some(n) = args.clients {
            s.clients = n;
        }
        if let Some(r) = args.rooms {
            s.rooms = r;
        }
        if let Some(v) = args.senders {
            s.senders = v;
        }
        if let Some(m) = args.messages {
            s.messages = m;
        }
        if args.rate.is_some() {
            s.rate = args.rate;
        }
        s.in_step = args.in_step;
        if let Some(b) = args.size {
            s.size_bytes = b;
        }
        if let Some(w) = args.window {
            s.window = w;
        }
        if let Some(h) = args.hold {
            s.hold = Duration::from_secs(h);
        }
        if let Some(p) = args.connect_parallel {
            s.connect_parallel = p;
        }
        if let Some(t) = args.timeout {
            s.timeout = Duration::from_secs(t);
        }
        match args.stall {
            Some(st) => s.stall = Duration::from_secs(st),
            // A short run waits for missing deliveries no longer than it runs.
            None => s.stall = s.stall.min(s.timeout),
        }
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Usage(m));
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return bad(format!("--clients must be between 1 and {MAX_CLIENTS}"));
        }
        if self.senders > self.clients {
            return bad("--senders cannot exceed --clients".into());
        }
        if self.senders > 0 && self.rooms == 0 {
            return bad("senders need a room: pass --rooms 1 or more".into());
        }
        if self.rooms > self.clients {
            return bad("--rooms cannot exceed --clients".into());
        }
        if self.senders as u64 * self.messages > MAX_TOTAL_MESSAGES {
            return bad(format!(
                "--senders x --messages is over the limit of {MAX_TOTAL_MESSAGES} messages"
            ));
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0 && r <= 1_000_000.0)
        {
            return bad("--rate must be above 0 and at most 1,000,000 per second".into());
        }
        if self.size_bytes < crate::measure::STAMP_MIN_BYTES || self.size_bytes > MAX_SIZE_BYTES {
            return bad(format!(
                "--size must be between {} and {MAX_SIZE_BYTES} bytes",
                crate::measure::STAMP_MIN_BYTES
            ));
        }
        if self.window == 0 || self.window > 256 {
            return bad("--window must be between 1 and 256 (the client's request slots)".into());
        }
        if self.connect_parallel == 0 || self.connect_parallel > 4096 {
            return bad("--connect-parallel must be between 1 and 4096".into());
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(24 * 3600) {
            return bad("--timeout must be between 1 s and a day".into());
        }
        if self.stall.is_zero() || self.stall > self.timeout {
            return bad("--stall must be between 1 s and --timeout".into());
        }
        if self.hold > self.timeout {
            return bad("--hold cannot be longer than --timeout".into());
        }
        Ok(())
    }

    /// Room of client `i`, if rooms are used.
    pub fn room_of(&self, i: usize) -> Option<usize> {
        (self.rooms > 0).then(|| i % self.rooms)
    }

    /// Members of room `r`.
    pub fn members_of(&self, r: usize) -> usize {
        if self.rooms == 0 || r >= self.rooms {
            return 0;
        }
        self.clients / self.rooms + usize::from(r < self.clients % self.rooms)
    }

    /// The client index of sender `k`: senders go round the rooms, each room's senders being
    /// its first members.
    /// Where sender `k`'s first message falls within its interval, from 0 (at the start) to
    /// below 1: spread evenly unless the senders go in step.
    pub fn sender_phase(&self, k: usize) -> f64 {
        if self.in_step || self.senders == 0 {
            0.0
        } else {
            k as f64 / self.senders as f64
        }
    }

    pub fn sender_client(&self, k: usize) -> usize {
        let r = k % self.rooms.max(1);
        r + self.rooms.max(1) * (k / self.rooms.max(1))
    }

    /// True when nobody sends: a connection/memory run.
    pub fn is_idle(&self) -> bool {
        self.senders == 0 || self.messages == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_preset() {
        let args = BenchArgs {
            preset: Some(Preset::Fanout100),
            messages: Some(7),
            ..BenchArgs::default()
        };
        let s = Scenario::from_args(&args).unwrap();
        assert_eq!((s.clients, s.rooms, s.senders, s.messages), (100, 1, 10, 7));
        let idle = Scenario::from_args(&BenchArgs {
            preset: Some(Preset::Idle50k),
            ..BenchArgs::default()
        })
        .unwrap();
        assert!(idle.is_idle());
        assert_eq!(idle.timeout, Duration::from_secs(300));
    }

    #[test]
    fn senders_spread_over_rooms_and_stay_members() {
        let s = Scenario {
            clients: 10,
            rooms: 3,
            senders: 5,
            ..Scenario::default()
        };
        assert_eq!((0..3).map(|r| s.members_of(r)).sum::<usize>(), 10);
        let senders: Vec<usize> = (0..5).map(|k| s.sender_client(k)).collect();
        assert_eq!(senders, vec![0, 1, 2, 3, 4]);
        for (k, c) in senders.iter().enumerate() {
            assert_eq!(s.room_of(*c), Some(k % 3));
            assert!(*c < s.clients);
        }
    }

    #[test]
    fn paced_senders_are_spread_unless_in_step() {
        let args = BenchArgs {
            preset: Some(Preset::Paced100),
            ..BenchArgs::default()
        };
        let spread = Scenario::from_args(&args).unwrap();
        assert!(!spread.in_step);
        let phases: Vec<f64> = (0..spread.senders)
            .map(|k| spread.sender_phase(k))
            .collect();
        assert_eq!(phases.len(), 10);
        assert_eq!(phases[0], 0.0);
        assert_eq!(phases[5], 0.5);
        assert!(phases.windows(2).all(|w| w[0] < w[1] && w[1] < 1.0));
        let in_step = Scenario::from_args(&BenchArgs {
            in_step: true,
            ..args
        })
        .unwrap();
        assert!((0..10).all(|k| in_step.sender_phase(k) == 0.0));
    }

    #[test]
    fn impossible_scenarios_are_refused() {
        for args in [
            BenchArgs {
                clients: Some(2),
                senders: Some(3),
                ..BenchArgs::default()
            },
            BenchArgs {
                rooms: Some(0),
                ..BenchArgs::default()
            },
            BenchArgs {
                size: Some(4),
                ..BenchArgs::default()
            },
            BenchArgs {
                rate: Some(-1.0),
                ..BenchArgs::default()
            },
        ] {
            assert!(Scenario::from_args(&args).is_err(), "{args:?}");
        }
    }
}
