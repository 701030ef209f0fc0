//! Anomaly detection: rules over sliding windows, fed with events, returning alerts.
//!
//! Sans-IO, like the guard: no clock, no sockets, no locks. The caller passes each event with
//! the time (`now_ms`) and gets back the alerts it raised; what an alert then does (the audit
//! record, the metric, the ban, the monitor's list) is [`crate::monitor`]'s job. Tests drive
//! every rule with made-up times.
//!
//! How the guard and these rules differ: the guard *enforces* fixed per-address limits at the
//! door (connection rate, lock-out). These rules *watch* patterns, per address, per subnet and
//! per account, including ones the guard has no limit for (handshakes that never finish,
//! malformed frames, message volume), and say so in an alert. Both may ban.
//!
//! Windows are counted in [`BUCKETS`] slices: an event counts for between 9/10 of the window
//! and the whole window after it happened. Memory is bounded: at most [`MAX_TRACKED`] keys are
//! counted at once; stale keys are swept, and while the table is full of live keys new keys are
//! not counted (and [`Detector::untracked`] says how many events that skipped).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use serde::Deserialize;

use crate::guard::{BanTarget, canonical_ip, parse_net};

/// Anomaly detection (`[anomaly]`): rules over sliding windows that raise alerts (in the
/// monitor, the audit log and the metrics) and may ban for a while. Each rule is a table of
/// its own (`[anomaly.failed_logins]`); a key left out takes that rule's default, listed in
/// docs/monitoring.md and in [`Rule::defaults`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// All rules on or off.
    pub enabled: bool,
    /// Addresses and networks an anomaly never bans (alerts are still raised). Loopback by
    /// default: a reverse proxy or the operator's own tools must not lock everyone out.
    pub never_ban: Vec<String>,
    /// The "subnet" of an IPv4 address, for the per-subnet thresholds.
    pub subnet_v4_prefix: u8,
    /// The "subnet" of an IPv6 address.
    pub subnet_v6_prefix: u8,
    /// New TCP connections.
    pub connection_flood: AnomalyRule,
    /// Failed logins (wrong password, unknown account, banned account).
    pub failed_logins: AnomalyRule,
    /// Connections that never finish the TLS handshake and the protocol hello (scans).
    pub handshake_scan: AnomalyRule,
    /// Malformed or oversize frames (each ends its connection).
    pub bad_frames: AnomalyRule,
    /// Messages sent.
    pub message_flood: AnomalyRule,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            enabled: true,
            never_ban: vec!["127.0.0.0/8".into(), "::1".into()],
            subnet_v4_prefix: 24,
            subnet_v6_prefix: 64,
            connection_flood: AnomalyRule::default(),
            failed_logins: AnomalyRule::default(),
            handshake_scan: AnomalyRule::default(),
            bad_frames: AnomalyRule::default(),
            message_flood: AnomalyRule::default(),
        }
    }
}

/// One anomaly rule as written in the file; what is left out takes the rule's default. A
/// threshold of 0 turns that count off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyRule {
    pub enabled: Option<bool>,
    /// The sliding window, in seconds.
    pub window_s: Option<u64>,
    /// Events from one address within the window that raise an alert.
    pub per_address: Option<u32>,
    /// Events from one subnet (see `subnet_v4_prefix`) within the window.
    pub per_subnet: Option<u32>,
    /// Events of one account within the window (failed logins, message floods only).
    pub per_user: Option<u32>,
    /// How long an alert bans the address, subnet or user; 0 only alerts.
    pub ban_minutes: Option<u64>,
}

/// Slices per window.
pub const BUCKETS: usize = 10;
/// Most keys (rule and address, subnet or account) counted at once.
pub const MAX_TRACKED: usize = 100_000;
/// Longest window accepted, in seconds.
pub const MAX_WINDOW_S: u64 = 86_400;

/// A rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    ConnectionFlood,
    FailedLogins,
    HandshakeScan,
    BadFrames,
    MessageFlood,
}

/// A rule's settings, resolved against its defaults; times in ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSettings {
    pub enabled: bool,
    pub window_ms: i64,
    /// 0: not counted per address.
    pub per_address: u32,
    pub per_subnet: u32,
    pub per_user: u32,
    /// 0: alert only.
    pub ban_ms: i64,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::ConnectionFlood,
        Rule::FailedLogins,
        Rule::HandshakeScan,
        Rule::BadFrames,
        Rule::MessageFlood,
    ];

    /// Its name in the config file, the audit log and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ConnectionFlood => "connection_flood",
            Rule::FailedLogins => "failed_logins",
            Rule::HandshakeScan => "handshake_scan",
            Rule::BadFrames => "bad_frames",
            Rule::MessageFlood => "message_flood",
        }
    }

    /// What it counts, for people.
    pub fn counts(self) -> &'static str {
        match self {
            Rule::ConnectionFlood => "new connections",
            Rule::FailedLogins => "failed logins",
            Rule::HandshakeScan => "connections that never finished the TLS handshake and hello",
            Rule::BadFrames => "malformed or oversize frames",
            Rule::MessageFlood => "messages",
        }
    }

    /// Whether the rule counts per account.
    pub fn has_users(self) -> bool {
        matches!(self, Rule::FailedLogins | Rule::MessageFlood)
    }

    /// The defaults (also in docs/monitoring.md). Chosen so that normal use, a busy NAT and
    /// the project's benchmarks stay well below them.
    pub fn defaults(self) -> RuleSettings {
        let (window_s, per_address, per_subnet, per_user, ban_minutes) = match self {
            Rule::ConnectionFlood => (10, 100, 400, 0, 15),
            Rule::FailedLogins => (60, 20, 100, 20, 15),
            Rule::HandshakeScan => (60, 20, 100, 0, 15),
            Rule::BadFrames => (60, 5, 20, 0, 15),
            Rule::MessageFlood => (10, 5000, 0, 1000, 0),
        };
        RuleSettings {
            enabled: true,
            window_ms: window_s * 1000,
            per_address,
            per_subnet,
            per_user,
            ban_ms: ban_minutes * 60_000,
        }
    }

    fn file(self, c: &AnomalyConfig) -> &AnomalyRule {
        match self {
            Rule::ConnectionFlood => &c.connection_flood,
            Rule::FailedLogins => &c.failed_logins,
            Rule::HandshakeScan => &c.handshake_scan,
            Rule::BadFrames => &c.bad_frames,
            Rule::MessageFlood => &c.message_flood,
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every rule's settings, and what they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub never_ban: Vec<IpNet>,
    pub subnet_v4_prefix: u8,
    pub subnet_v6_prefix: u8,
    pub rules: [RuleSettings; 5],
}

impl Settings {
    /// Resolves `[anomaly]` against the defaults; an error names the key and what to write.
    pub fn from_config(c: &AnomalyConfig) -> Result<Settings, String> {
        if !(8..=32).contains(&c.subnet_v4_prefix) {
            return Err("anomaly.subnet_v4_prefix must be between 8 and 32".into());
        }
        if !(16..=128).contains(&c.subnet_v6_prefix) {
            return Err("anomaly.subnet_v6_prefix must be between 16 and 128".into());
        }
        let never_ban = c
            .never_ban
            .iter()
            .map(|t| parse_net(t).map_err(|e| format!("anomaly.never_ban: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rules = Rule::ALL.map(Rule::defaults);
        for (rule, out) in Rule::ALL.into_iter().zip(rules.iter_mut()) {
            let f = rule.file(c);
            let name = rule.as_str();
            if let Some(w) = f.window_s {
                if w == 0 || w > MAX_WINDOW_S {
                    return Err(format!(
                        "anomaly.{name}.window_s must be between 1 and {MAX_WINDOW_S}"
                    ));
                }
                out.window_ms = w as i64 * 1000;
            }
            if f.per_user.is_some_and(|n| n > 0) && !rule.has_users() {
                return Err(format!(
                    "anomaly.{name}.per_user: this rule counts per address and subnet only (per_user is for failed_logins and message_flood)"
                ));
            }
            out.enabled = f.enabled.unwrap_or(out.enabled);
            out.per_address = f.per_address.unwrap_or(out.per_address);
            out.per_subnet = f.per_subnet.unwrap_or(out.per_subnet);
            out.per_user = f.per_user.unwrap_or(out.per_user);
            if let Some(m) = f.ban_minutes {
                out.ban_ms = (m.min(i64::MAX as u64 / 60_000) * 60_000) as i64;
            }
        }
        Ok(Settings {
            enabled: c.enabled,
            never_ban,
            subnet_v4_prefix: c.subnet_v4_prefix,
            subnet_v6_prefix: c.subnet_v6_prefix,
            rules,
        })
    }

    pub fn rule(&self, rule: Rule) -> &RuleSettings {
        &self.rules[rule as usize]
    }

    /// The subnet `ip` belongs to, for the per-subnet counts.
    pub fn subnet(&self, ip: IpAddr) -> IpNet {
        let prefix = match ip {
            IpAddr::V4(_) => self.subnet_v4_prefix,
            IpAddr::V6(_) => self.subnet_v6_prefix,
        };
        IpNet::new(ip, prefix)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(ip))
    }

    fn exempt(&self, net: &IpNet) -> bool {
        self.never_ban
            .iter()
            .any(|n| n.contains(net) || net.contains(n))
    }
}

impl Default for Settings {
    fn default() -> Self {
        // The defaults always resolve.
        Settings::from_config(&AnomalyConfig::default()).unwrap_or(Settings {
            enabled: false,
            never_ban: Vec::new(),
            subnet_v4_prefix: 24,
            subnet_v6_prefix: 64,
            rules: Rule::ALL.map(Rule::defaults),
        })
    }
}

/// What happened, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A new TCP connection (before any TLS), not from a banned address.
    Connection { ip: IpAddr },
    /// A connection that ended before finishing the TLS handshake and the hello.
    HandshakeIncomplete { ip: IpAddr },
    /// A failed login, with the account name tried (if it was a valid name).
    LoginFailed {
        ip: IpAddr,
        account: Option<&'a str>,
    },
    /// A malformed or oversize frame.
    BadFrame { ip: IpAddr },
    /// `count` messages sent on one connection since the last report.
    Messages {
        ip: IpAddr,
        user: Option<&'a str>,
        count: u32,
    },
}

impl Event<'_> {
    fn rule(&self) -> Rule {
        match self {
            Event::Connection { .. } => Rule::ConnectionFlood,
            Event::HandshakeIncomplete { .. } => Rule::HandshakeScan,
            Event::LoginFailed { .. } => Rule::FailedLogins,
            Event::BadFrame { .. } => Rule::BadFrames,
            Event::Messages { .. } => Rule::MessageFlood,
        }
    }

    fn parts(&self) -> (IpAddr, Option<&str>, u32) {
        match *self {
            Event::Connection { ip }
            | Event::HandshakeIncomplete { ip }
            | Event::BadFrame { ip } => (ip, None, 1),
            Event::LoginFailed { ip, account } => (ip, account, 1),
            Event::Messages { ip, user, count } => (ip, user, count),
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Address(IpAddr),
    Subnet(IpNet),
    User(String),
}

impl Scope {
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Address(_) => "address",
            Scope::Subnet(_) => "subnet",
            Scope::User(_) => "user",
        }
    }

    pub fn value(&self) -> String {
        match self {
            Scope::Address(ip) => ip.to_string(),
            Scope::Subnet(net) => net.to_string(),
            Scope::User(u) => u.clone(),
        }
    }
}

/// A ban an alert asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanPlan {
    pub target: BanTarget,
    pub until_ms: i64,
}

/// A rule's threshold was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub rule: Rule,
    pub scope: Scope,
    /// Events counted in the window (at least the threshold).
    pub count: u64,
    pub threshold: u32,
    pub window_ms: i64,
    pub ts_ms: i64,
    /// The ban to apply, if the rule bans and the scope is not exempt.
    pub ban: Option<BanPlan>,
    /// Why there is no ban, when there is none.
    pub no_ban_reason: Option<&'static str>,
}

impl Alert {
    /// One sentence for people: "failed logins: 20 from address 192.0.2.7 within 60 s".
    pub fn describe(&self) -> String {
        format!(
            "{}: {} from {} {} within {} s (threshold {})",
            self.rule.as_str(),
            self.count,
            self.scope.kind(),
            self.scope.value(),
            self.window_ms / 1000,
            self.threshold
        )
    }

    /// What was done: "banned for 15 min" or why not.
    pub fn action(&self) -> String {
        match (&self.ban, self.no_ban_reason) {
            (Some(b), _) => format!("banned for {} min", (b.until_ms - self.ts_ms) / 60_000),
            (None, Some(why)) => format!("alert only: {why}"),
            (None, None) => "alert only".to_string(),
        }
    }
}

/// A sliding-window count: [`BUCKETS`] slices of the window.
#[derive(Debug, Clone)]
struct Window {
    slice: [i64; BUCKETS],
    count: [u32; BUCKETS],
    last_ms: i64,
}

impl Window {
    fn new() -> Self {
        Window {
            slice: [i64::MIN; BUCKETS],
            count: [0; BUCKETS],
            last_ms: i64::MIN,
        }
    }

    /// Adds `n` at `now_ms`; returns the count within the window.
    fn add(&mut self, now_ms: i64, window_ms: i64, n: u32) -> u64 {
        let slice_ms = (window_ms / BUCKETS as i64).max(1);
        let i = now_ms.div_euclid(slice_ms);
        let at = i.rem_euclid(BUCKETS as i64) as usize;
        if self.slice[at] != i {
            self.slice[at] = i;
            self.count[at] = 0;
        }
        self.count[at] = self.count[at].saturating_add(n);
        self.last_ms = self.last_ms.max(now_ms);
        self.slice
            .iter()
            .zip(self.count.iter())
            .filter(|(s, _)| **s > i - BUCKETS as i64 && **s <= i)
            .map(|(_, c)| u64::from(*c))
            .sum()
    }
}

/// The rules' state.
#[derive(Debug, Default)]
pub struct Detector {
    settings: Settings,
    windows: HashMap<(Rule, Scope), Window>,
    /// After an alert, the same rule and scope stay quiet until this time.
    quiet_until: HashMap<(Rule, Scope), i64>,
    untracked: u64,
}

impl Detector {
    pub fn new(settings: Settings) -> Self {
        Detector {
            settings,
            ..Detector::default()
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// New settings (config reload). Counts are kept.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Keys counted now.
    pub fn tracked(&self) -> usize {
        self.windows.len()
    }

    /// Events not counted because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Counts `event`; returns the alerts it raised (at most one per scope).
    pub fn observe(&mut self, event: Event<'_>, now_ms: i64) -> Vec<Alert> {
        let rule = event.rule();
        let s = self.settings.rule(rule).clone();
        if !self.settings.enabled || !s.enabled {
            return Vec::new();
        }
        let (ip, user, n) = event.parts();
        let ip = canonical_ip(ip);
        let mut scopes: Vec<(Scope, u32)> = Vec::with_capacity(3);
        if s.per_address > 0 {
            scopes.push((Scope::Address(ip), s.per_address));
        }
        if s.per_subnet > 0 {
            scopes.push((Scope::Subnet(self.settings.subnet(ip)), s.per_subnet));
        }
        if let Some(u) = user
            && s.per_user > 0
            && rule.has_users()
        {
            scopes.push((Scope::User(u.to_string()), s.per_user));
        }
        let mut alerts = Vec::new();
        for (scope, threshold) in scopes {
            if let Some(a) = self.count(rule, &s, scope, threshold, n, now_ms) {
                alerts.push(a);
            }
        }
        alerts
    }

    fn count(
        &mut self,
        rule: Rule,
        s: &RuleSettings,
        scope: Scope,
        threshold: u32,
        n: u32,
        now_ms: i64,
    ) -> Option<Alert> {
        let key = (rule, scope);
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_TRACKED {
            self.sweep(now_ms);
            if self.windows.len() >= MAX_TRACKED {
                self.untracked += 1;
                return None;
            }
        }
        let total = self
            .windows
            .entry(key.clone())
            .or_insert_with(Window::new)
            .add(now_ms, s.window_ms, n);
        if total < u64::from(threshold) {
            return None;
        }
        if self.quiet_until.get(&key).is_some_and(|t| now_ms < *t) {
            return None;
        }
        // Start counting afresh: a pattern that goes on raises the next alert a window later.
        self.windows.remove(&key);
        self.quiet_until.insert(key.clone(), now_ms + s.window_ms);
        let (rule, scope) = key;
        let (ban, no_ban_reason) = self.ban_for(rule, s, &scope, now_ms);
        Some(Alert {
            rule,
            scope,
            count: total,
            threshold,
            window_ms: s.window_ms,
            ts_ms: now_ms,
            ban,
            no_ban_reason,
        })
    }

    fn ban_for(
        &self,
        rule: Rule,
        s: &RuleSettings,
        scope: &Scope,
        now_ms: i64,
    ) -> (Option<BanPlan>, Option<&'static str>) {
        if s.ban_ms <= 0 {
            return (None, Some("this rule does not ban (ban_minutes = 0)"));
        }
        let target = match scope {
            Scope::Address(ip) => IpNet::from(*ip),
            Scope::Subnet(net) => *net,
            // The account is the victim of failed logins, not the culprit.
            Scope::User(_) if rule == Rule::FailedLogins => {
                return (None, Some("the account is the target, not the source"));
            }
            Scope::User(u) => {
                return (
                    Some(BanPlan {
                        target: BanTarget::User(u.clone()),
                        until_ms: now_ms.saturating_add(s.ban_ms),
                    }),
                    None,
                );
            }
        };
        if self.settings.exempt(&target) {
            return (None, Some("the address is in anomaly.never_ban"));
        }
        (
            Some(BanPlan {
                target: BanTarget::Net(target),
                until_ms: now_ms.saturating_add(s.ban_ms),
            }),
            None,
        )
    }

    /// Forgets counts and quiet periods that ended (call now and then).
    pub fn sweep(&mut self, now_ms: i64) {
        let settings = &self.settings;
        self.windows
            .retain(|(rule, _), w| now_ms - w.last_ms <= settings.rule(*rule).window_ms);
        self.quiet_until.retain(|_, until| *until > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn settings(edit: impl FnOnce(&mut AnomalyConfig)) -> Settings {
        let mut c = AnomalyConfig {
            never_ban: vec![],
            ..AnomalyConfig::default()
        };
        edit(&mut c);
        Settings::from_config(&c).expect("valid")
    }

    fn rule(window_s: u64, per_address: u32, per_subnet: u32, per_user: u32) -> AnomalyRule {
        AnomalyRule {
            window_s: Some(window_s),
            per_address: Some(per_address),
            per_subnet: Some(per_subnet),
            per_user: Some(per_user),
            ..AnomalyRule::default()
        }
    }

    /// Feeds `n` events `every_ms` apart from `start_ms`; returns the alerts.
    fn feed(
        d: &mut Detector,
        n: usize,
        start_ms: i64,
        every_ms: i64,
        ev: impl Fn(usize) -> Event<'static>,
    ) -> Vec<Alert> {
        (0..n)
            .flat_map(|i| d.observe(ev(i), start_ms + i as i64 * every_ms))
            .collect()
    }

    #[test]
    fn a_connection_flood_from_one_address_alerts_once_and_bans() {
        let mut d = Detector::new(settings(|c| {
            c.connection_flood = rule(10, 50, 0, 0);
        }));
        let a = ip("192.0.2.7");
        let alerts = feed(&mut d, 49, 0, 100, |_| Event::Connection { ip: a });
        assert!(alerts.is_empty(), "below the threshold: {alerts:?}");
        let alerts = d.observe(Event::Connection { ip: a }, 4_950);
        assert_eq!(alerts.len(), 1);
        let al = &alerts[0];
        assert_eq!(al.rule, Rule::ConnectionFlood);
        assert_eq!(al.scope, Scope::Address(a));
        assert_eq!(al.count, 50);
        let ban = al.ban.clone().expect("bans");
        assert_eq!(
            ban.target,
            BanTarget::Net("192.0.2.7/32".parse().expect("net"))
        );
        assert_eq!(ban.until_ms, 4_950 + 15 * 60_000);
        // The same pattern right after stays quiet for a window...
        assert!(feed(&mut d, 60, 5_000, 10, |_| Event::Connection { ip: a }).is_empty());
        // ...and alerts again once it has passed.
        assert_eq!(
            feed(&mut d, 60, 20_000, 10, |_| Event::Connection { ip: a }).len(),
            1
        );
    }

    #[test]
    fn normal_traffic_spread_over_time_or_addresses_does_not_alert() {
        let mut d = Detector::new(Settings::default());
        // 5 connections a second from one address for a minute: 50 per 10 s window < 100.
        assert!(
            feed(&mut d, 300, 0, 200, |_| Event::Connection {
                ip: ip("192.0.2.1")
            })
            .is_empty()
        );
        // Many addresses of many subnets, each a little.
        assert!(
            feed(&mut d, 2000, 0, 5, |i| Event::Connection {
                ip: IpAddr::from([10, (i / 200) as u8, (i % 200) as u8, 1])
            })
            .is_empty()
        );
        // A user's ordinary failed logins, and ordinary messages.
        assert!(
            feed(&mut d, 5, 0, 1000, |_| Event::LoginFailed {
                ip: ip("192.0.2.1"),
                account: Some("alice")
            })
            .is_empty()
        );
        assert!(
            feed(&mut d, 600, 0, 1000, |_| Event::Messages {
                ip: ip("192.0.2.1"),
                user: Some("alice"),
                count: 10
            })
            .is_empty()
        );
        assert!(
            feed(&mut d, 3, 0, 1000, |_| Event::BadFrame {
                ip: ip("192.0.2.1")
            })
            .is_empty()
        );
        assert!(
            feed(&mut d, 10, 0, 1000, |_| Event::HandshakeIncomplete {
                ip: ip("192.0.2.1")
            })
            .is_empty()
        );
    }

    #[test]
    fn events_older_than_the_window_do_not_count() {
        let mut d = Detector::new(settings(|c| c.bad_frames = rule(60, 5, 0, 0)));
        let a = ip("198.51.100.9");
        // 4 now, 4 more two windows later: never 5 within one window.
        assert!(feed(&mut d, 4, 0, 10, |_| Event::BadFrame { ip: a }).is_empty());
        assert!(feed(&mut d, 4, 120_000, 10, |_| Event::BadFrame { ip: a }).is_empty());
        // The fifth within the window alerts.
        assert_eq!(d.observe(Event::BadFrame { ip: a }, 121_000).len(), 1);
    }

    #[test]
    fn a_subnet_is_counted_across_its_addresses() {
        let mut d = Detector::new(settings(|c| c.handshake_scan = rule(60, 20, 30, 0)));
        let alerts = feed(&mut d, 30, 0, 100, |i| Event::HandshakeIncomplete {
            ip: IpAddr::from([203, 0, 113, i as u8]),
        });
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(
            alerts[0].scope,
            Scope::Subnet("203.0.113.0/24".parse().expect("net"))
        );
        assert_eq!(
            alerts[0].ban.as_ref().map(|b| b.target.clone()),
            Some(BanTarget::Net("203.0.113.0/24".parse().expect("net")))
        );
        // IPv6: a /64.
        let mut d = Detector::new(settings(|c| c.handshake_scan = rule(60, 0, 3, 0)));
        let alerts = feed(&mut d, 3, 0, 1, |i| Event::HandshakeIncomplete {
            ip: format!("2001:db8::{}", i + 1).parse().expect("v6"),
        });
        assert_eq!(
            alerts.first().map(|a| a.scope.clone()),
            Some(Scope::Subnet("2001:db8::/64".parse().expect("net")))
        );
    }

    #[test]
    fn failed_logins_alert_per_address_and_per_account_but_never_ban_the_account() {
        let mut d = Detector::new(settings(|c| c.failed_logins = rule(60, 10, 0, 5)));
        // Five addresses try one account: the account alerts, nobody is banned for it.
        let alerts = feed(&mut d, 5, 0, 100, |i| Event::LoginFailed {
            ip: IpAddr::from([192, 0, 2, i as u8 + 1]),
            account: Some("alice"),
        });
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].scope, Scope::User("alice".into()));
        assert_eq!(alerts[0].ban, None);
        // One address tries many accounts: the address alerts and is banned.
        let alerts = feed(&mut d, 10, 1000, 100, |_| Event::LoginFailed {
            ip: ip("198.51.100.1"),
            account: None,
        });
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].scope, Scope::Address(ip("198.51.100.1")));
        assert!(alerts[0].ban.is_some());
    }

    #[test]
    fn a_message_flood_counts_messages_per_user() {
        let mut d = Detector::new(settings(|c| {
            c.message_flood = AnomalyRule {
                ban_minutes: Some(5),
                ..rule(10, 0, 0, 100)
            }
        }));
        // Two connections of one user, 30 messages a second each: 60/s, 100 in under 2 s.
        let mut alerts = Vec::new();
        for t in 0..3 {
            for conn in 0..2 {
                alerts.extend(d.observe(
                    Event::Messages {
                        ip: IpAddr::from([192, 0, 2, conn + 1]),
                        user: Some("mallory"),
                        count: 30,
                    },
                    t * 1000,
                ));
            }
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].scope, Scope::User("mallory".into()));
        assert_eq!(alerts[0].count, 120);
        assert_eq!(
            alerts[0].ban.as_ref().map(|b| &b.target),
            Some(&BanTarget::User("mallory".into()))
        );
    }

    #[test]
    fn never_ban_and_alert_only_rules_raise_alerts_without_bans() {
        let mut d = Detector::new(settings(|c| {
            c.never_ban = vec!["127.0.0.0/8".into()];
            c.bad_frames = rule(60, 2, 0, 0);
            c.message_flood = rule(10, 3, 0, 0);
        }));
        let lo = ip("127.0.0.1");
        let alerts = feed(&mut d, 2, 0, 1, |_| Event::BadFrame { ip: lo });
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].ban, None);
        assert!(
            alerts[0].action().contains("never_ban"),
            "{}",
            alerts[0].action()
        );
        let alerts = feed(&mut d, 3, 0, 1, |_| Event::Messages {
            ip: ip("192.0.2.1"),
            user: None,
            count: 1,
        });
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].ban, None,
            "message_flood is alert-only by default"
        );
    }

    #[test]
    fn disabled_rules_and_zero_thresholds_do_nothing() {
        let mut d = Detector::new(settings(|c| {
            c.bad_frames = AnomalyRule {
                enabled: Some(false),
                ..rule(60, 1, 1, 0)
            };
            c.connection_flood = rule(10, 0, 0, 0);
        }));
        assert!(
            feed(&mut d, 100, 0, 1, |_| Event::BadFrame {
                ip: ip("192.0.2.1")
            })
            .is_empty()
        );
        assert!(
            feed(&mut d, 100, 0, 1, |_| Event::Connection {
                ip: ip("192.0.2.1")
            })
            .is_empty()
        );
        let mut d = Detector::new(settings(|c| {
            c.enabled = false;
            c.bad_frames = rule(60, 1, 0, 0);
        }));
        assert!(
            d.observe(
                Event::BadFrame {
                    ip: ip("192.0.2.1")
                },
                0
            )
            .is_empty()
        );
    }

    #[test]
    fn the_table_is_bounded_and_swept() {
        let mut d = Detector::new(settings(|c| c.bad_frames = rule(1, 1000, 0, 0)));
        for i in 0..MAX_TRACKED as u32 + 10 {
            d.observe(
                Event::BadFrame {
                    ip: IpAddr::from(i.to_be_bytes()),
                },
                0,
            );
        }
        assert_eq!(d.tracked(), MAX_TRACKED);
        assert_eq!(d.untracked(), 10);
        // Once the window has passed, a new key sweeps the stale ones.
        d.observe(
            Event::BadFrame {
                ip: ip("192.0.2.1"),
            },
            5_000,
        );
        assert_eq!(d.tracked(), 1);
    }

    #[test]
    fn settings_take_each_rules_defaults_and_refuse_bad_values() {
        let s = settings(|c| {
            c.failed_logins = AnomalyRule {
                per_address: Some(3),
                ..AnomalyRule::default()
            }
        });
        let fl = s.rule(Rule::FailedLogins);
        assert_eq!(fl.per_address, 3);
        assert_eq!(fl.window_ms, Rule::FailedLogins.defaults().window_ms);
        assert_eq!(fl.per_user, Rule::FailedLogins.defaults().per_user);
        let bad = |edit: fn(&mut AnomalyConfig)| {
            let mut c = AnomalyConfig::default();
            edit(&mut c);
            Settings::from_config(&c).expect_err("refused")
        };
        assert!(bad(|c| c.connection_flood.per_user = Some(3)).contains("per_user"));
        assert!(bad(|c| c.bad_frames.window_s = Some(0)).contains("window_s"));
        assert!(bad(|c| c.subnet_v4_prefix = 4).contains("subnet_v4_prefix"));
        assert!(bad(|c| c.never_ban = vec!["nonsense".into()]).contains("never_ban"));
    }
}
