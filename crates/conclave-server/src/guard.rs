//! The server's defences, as plain state: IP allow and deny rules, bans, connections per IP,
//! connection rate per IP, login lock-out with growing delay, and the automatic temporary IP
//! bans for login-failure bursts and connection floods.
//!
//! No I/O and no clock of its own: callers pass the time (`now_ms`, and a `governor` clock for
//! the token buckets), so tests drive every rule deterministically. The server keeps one
//! `Guard` behind a mutex and consults it right after accept (before any TLS work) and at
//! login.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

/// What a ban is on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BanTarget {
    User(String),
    Net(IpNet),
}

impl BanTarget {
    pub fn kind(&self) -> &'static str {
        match self {
            BanTarget::User(_) => "user",
            BanTarget::Net(_) => "ip",
        }
    }
    pub fn value(&self) -> String {
        match self {
            BanTarget::User(u) => u.clone(),
            BanTarget::Net(n) => n.to_string(),
        }
    }
}

/// A ban, for a while or for ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub target: BanTarget,
    /// End of the ban (ms since the epoch); `None` is for ever.
    pub until_ms: Option<i64>,
    pub reason: String,
    pub by: String,
    pub created_ms: i64,
}

impl Ban {
    pub fn active(&self, now_ms: i64) -> bool {
        self.until_ms.is_none_or(|u| u > now_ms)
    }
}

/// The rules the guard applies; every number has a default in `config::Guarding`.
#[derive(Debug, Clone)]
pub struct GuardRules {
    /// Only these networks may connect, when not empty.
    pub allow: Vec<IpNet>,
    /// These networks may never connect.
    pub deny: Vec<IpNet>,
    pub max_connections_per_ip: u32,
    /// New connections per IP per minute (token bucket, burst of the same size).
    pub connections_per_ip_per_minute: u32,
    /// Failed logins to one account before it is locked.
    pub login_failures_per_account: u32,
    /// First lock-out of an account; it doubles with each further failure.
    pub lockout_base_ms: i64,
    pub lockout_max_ms: i64,
    /// Failed logins from one IP within `failure_window_ms` before it is banned for a while.
    pub login_failures_per_ip: u32,
    pub failure_window_ms: i64,
    /// Connection-rate refusals from one IP within `failure_window_ms` before it is banned.
    pub flood_refusals_per_ip: u32,
    /// Automatic temporary bans on (login-failure bursts, connection floods).
    pub auto_ban: bool,
    pub auto_ban_ms: i64,
}

/// Why a connection or login is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotAllowed,
    Denied,
    Banned(Ban),
    TooManyFromIp(u32),
    RateLimited,
}

impl Refusal {
    /// The audit log's short name for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_in_allow_list",
            Refusal::Denied => "deny_list",
            Refusal::Banned(_) => "banned",
            Refusal::TooManyFromIp(_) => "too_many_connections_from_ip",
            Refusal::RateLimited => "connection_rate",
        }
    }
}

/// A refused connection, and the automatic ban it triggered, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub auto_ban: Option<AutoBan>,
}

/// An automatic ban the guard decided on; the caller persists, audits and enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoBan {
    pub ban: Ban,
}

#[derive(Debug, Default, Clone)]
struct Failures {
    count: u32,
    since_ms: i64,
    locked_until_ms: i64,
}

/// The most entries kept in each tracking map before stale ones are swept.
pub const MAX_TRACKED: usize = 100_000;

type ConnLimiter<C> = RateLimiter<
    IpAddr,
    HashMapStateStore<IpAddr>,
    C,
    governor::middleware::NoOpMiddleware<<C as Clock>::Instant>,
>;

/// The guard's state.
pub struct Guard<C: Clock = DefaultClock> {
    rules: GuardRules,
    bans: Vec<Ban>,
    per_ip: HashMap<IpAddr, u32>,
    conn_rate: ConnLimiter<C>,
    clock: C,
    account_failures: HashMap<String, Failures>,
    ip_failures: HashMap<IpAddr, Failures>,
    ip_floods: HashMap<IpAddr, Failures>,
}

fn conn_quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(n)
}

impl Guard<DefaultClock> {
    pub fn new(rules: GuardRules, bans: Vec<Ban>) -> Self {
        Self::with_clock(rules, bans, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Guard<C>
where
    C::Instant: governor::clock::Reference,
{
    pub fn with_clock(rules: GuardRules, bans: Vec<Ban>, clock: C) -> Self {
        let conn_rate = RateLimiter::hashmap_with_clock(
            conn_quota(rules.connections_per_ip_per_minute),
            clock.clone(),
        );
        Guard {
            rules,
            bans,
            per_ip: HashMap::new(),
            conn_rate,
            clock,
            account_failures: HashMap::new(),
            ip_failures: HashMap::new(),
            ip_floods: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &GuardRules {
        &self.rules
    }

    /// Replaces the rules (config reload). Counters are kept.
    pub fn set_rules(&mut self, rules: GuardRules) {
        if rules.connections_per_ip_per_minute != self.rules.connections_per_ip_per_minute {
            self.conn_rate = RateLimiter::hashmap_with_clock(
                conn_quota(rules.connections_per_ip_per_minute),
                self.clock.clone(),
            );
        }
        self.rules = rules;
    }

    /// Whether the allow and deny lists let `ip` in.
    pub fn ip_permitted(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical_ip(ip);
        if self.rules.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::Denied);
        }
        if !self.rules.allow.is_empty() && !self.rules.allow.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    /// The active ban on `ip`, if any.
    pub fn ip_ban(&self, ip: IpAddr, now_ms: i64) -> Option<&Ban> {
        let ip = canonical_ip(ip);
        self.bans
            .iter()
            .find(|b| b.active(now_ms) && matches!(&b.target, BanTarget::Net(n) if n.contains(&ip)))
    }

    /// The active ban on `user`, if any.
    pub fn user_ban(&self, user: &str, now_ms: i64) -> Option<&Ban> {
        self.bans
            .iter()
            .find(|b| b.active(now_ms) && matches!(&b.target, BanTarget::User(u) if u == user))
    }

    /// Decides on a new connection from `ip`, right after accept. On success the caller must
    /// call [`Guard::release`] when the connection ends. A refusal may come with an automatic
    /// ban (a connection flood).
    pub fn admit(&mut self, ip: IpAddr, now_ms: i64) -> Result<(), Box<Refused>> {
        let refused = |refusal, auto_ban| Box::new(Refused { refusal, auto_ban });
        let ip = canonical_ip(ip);
        self.ip_permitted(ip).map_err(|r| refused(r, None))?;
        if let Some(b) = self.ip_ban(ip, now_ms) {
            return Err(refused(Refusal::Banned(b.clone()), None));
        }
        if self.conn_rate.check_key(&ip).is_err() {
            let auto = self.note_flood(ip, now_ms);
            return Err(refused(Refusal::RateLimited, auto));
        }
        let n = self.per_ip.entry(ip).or_insert(0);
        if *n >= self.rules.max_connections_per_ip {
            return Err(refused(
                Refusal::TooManyFromIp(self.rules.max_connections_per_ip),
                None,
            ));
        }
        *n += 1;
        Ok(())
    }

    /// A connection from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        let ip = canonical_ip(ip);
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Live connections from `ip`.
    pub fn connections_from(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&canonical_ip(ip)).copied().unwrap_or(0)
    }

    fn note_flood(&mut self, ip: IpAddr, now_ms: i64) -> Option<AutoBan> {
        let window = self.rules.failure_window_ms;
        let limit = self.rules.flood_refusals_per_ip;
        let f = bump(&mut self.ip_floods, ip, now_ms, window);
        if self.rules.auto_ban && f.count >= limit {
            self.ip_floods.remove(&ip);
            return Some(self.auto_ban(ip, now_ms, "connection flood"));
        }
        None
    }

    fn auto_ban(&mut self, ip: IpAddr, now_ms: i64, what: &str) -> AutoBan {
        let ban = Ban {
            target: BanTarget::Net(IpNet::from(ip)),
            until_ms: Some(now_ms + self.rules.auto_ban_ms),
            reason: format!("automatic: {what}"),
            by: "server".into(),
            created_ms: now_ms,
        };
        self.bans.push(ban.clone());
        AutoBan { ban }
    }

    /// How long `user` must still wait before trying to log in (ms), if locked.
    pub fn login_locked(&self, user: &str, now_ms: i64) -> Option<i64> {
        self.account_failures
            .get(user)
            .map(|f| f.locked_until_ms - now_ms)
            .filter(|left| *left > 0)
    }

    /// Failed logins of `user` counted towards its lock-out now.
    pub fn login_failures(&self, user: &str) -> u32 {
        self.account_failures.get(user).map_or(0, |f| f.count)
    }

    /// A failed login of `user` from `ip`: locks the account after repeated failures (each
    /// further failure doubling the wait), and may ban the IP for a burst of failures.
    pub fn login_failed(&mut self, user: &str, ip: IpAddr, now_ms: i64) -> Option<AutoBan> {
        let ip = canonical_ip(ip);
        let r = self.rules.clone();
        sweep(
            &mut self.account_failures,
            now_ms,
            r.failure_window_ms.max(r.lockout_max_ms),
        );
        let f = self.account_failures.entry(user.to_string()).or_default();
        if now_ms - f.since_ms > r.failure_window_ms && f.locked_until_ms < now_ms {
            *f = Failures {
                count: 0,
                since_ms: now_ms,
                locked_until_ms: 0,
            };
        }
        f.count += 1;
        if f.count >= r.login_failures_per_account {
            let extra = (f.count - r.login_failures_per_account).min(20);
            let wait = (r.lockout_base_ms.saturating_mul(1i64 << extra)).min(r.lockout_max_ms);
            f.locked_until_ms = now_ms + wait;
        }
        let f = bump(&mut self.ip_failures, ip, now_ms, r.failure_window_ms);
        if r.auto_ban && f.count >= r.login_failures_per_ip {
            self.ip_failures.remove(&ip);
            return Some(self.auto_ban(ip, now_ms, "burst of failed logins"));
        }
        None
    }

    /// A successful login clears the account's failures.
    pub fn login_ok(&mut self, user: &str) {
        self.account_failures.remove(user);
    }

    pub fn add_ban(&mut self, ban: Ban) {
        self.bans.retain(|b| b.target != ban.target);
        self.bans.push(ban);
    }

    /// Removes the ban on `target`; false when there was none.
    pub fn remove_ban(&mut self, target: &BanTarget) -> bool {
        let before = self.bans.len();
        self.bans.retain(|b| &b.target != target);
        self.bans.len() != before
    }

    /// Active bans.
    pub fn bans(&self, now_ms: i64) -> Vec<Ban> {
        self.bans
            .iter()
            .filter(|b| b.active(now_ms))
            .cloned()
            .collect()
    }

    /// Forgets expired bans and stale counters (call now and then).
    pub fn sweep(&mut self, now_ms: i64) {
        self.bans.retain(|b| b.active(now_ms));
        let w = self.rules.failure_window_ms;
        sweep(&mut self.ip_failures, now_ms, w);
        sweep(&mut self.ip_floods, now_ms, w);
        sweep(
            &mut self.account_failures,
            now_ms,
            w.max(self.rules.lockout_max_ms),
        );
        self.conn_rate.retain_recent();
        self.conn_rate.shrink_to_fit();
    }
}

/// "banned for N more minutes: reason" (seconds under two minutes), at `now_ms`.
pub fn ban_text(ban: &Ban, now_ms: i64) -> String {
    let until = match ban.until_ms {
        None => "for ever".to_string(),
        Some(u) => {
            let left_s = ((u - now_ms).max(0) + 999) / 1000;
            if left_s < 120 {
                format!("for {left_s} more seconds")
            } else {
                format!("for {} more minutes", (left_s + 59) / 60)
            }
        }
    };
    format!("banned {until}: {}", ban.reason)
}

/// Parses a CIDR or a single address.
pub fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let t = text.trim();
    t.parse::<ipnet::IpNet>()
        .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| {
            format!(
                "{text:?} is not an IP network: write an address (192.0.2.7, 2001:db8::1) or a CIDR (192.0.2.0/24, 2001:db8::/32)"
            )
        })
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn bump<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Failures>,
    key: K,
    now_ms: i64,
    window_ms: i64,
) -> Failures {
    if map.len() >= MAX_TRACKED {
        sweep(map, now_ms, window_ms);
    }
    let f = map.entry(key).or_default();
    if now_ms - f.since_ms > window_ms {
        f.count = 0;
        f.since_ms = now_ms;
    }
    f.count += 1;
    f.clone()
}

fn sweep<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Failures>, now_ms: i64, keep_ms: i64) {
    map.retain(|_, f| now_ms - f.since_ms <= keep_ms || f.locked_until_ms > now_ms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    fn rules() -> GuardRules {
        GuardRules {
            allow: vec![],
            deny: vec![],
            max_connections_per_ip: 3,
            connections_per_ip_per_minute: 5,
            login_failures_per_account: 3,
            lockout_base_ms: 1000,
            lockout_max_ms: 60_000,
            login_failures_per_ip: 10,
            failure_window_ms: 600_000,
            flood_refusals_per_ip: 3,
            auto_ban: true,
            auto_ban_ms: 900_000,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn allow_and_deny_lists() {
        let mut r = rules();
        r.deny = vec!["10.0.0.0/8".parse().expect("net")];
        let g = Guard::with_clock(r.clone(), vec![], FakeRelativeClock::default());
        assert_eq!(g.ip_permitted(ip("10.1.2.3")), Err(Refusal::Denied));
        assert_eq!(g.ip_permitted(ip("192.0.2.1")), Ok(()));
        // v4-mapped v6 is the same address.
        assert_eq!(g.ip_permitted(ip("::ffff:10.1.2.3")), Err(Refusal::Denied));
        r.allow = vec![
            "192.0.2.0/24".parse().expect("net"),
            "2001:db8::/32".parse().expect("net"),
        ];
        let g = Guard::with_clock(r, vec![], FakeRelativeClock::default());
        assert_eq!(g.ip_permitted(ip("192.0.2.9")), Ok(()));
        assert_eq!(g.ip_permitted(ip("2001:db8::1")), Ok(()));
        assert_eq!(g.ip_permitted(ip("198.51.100.1")), Err(Refusal::NotAllowed));
        assert_eq!(
            g.ip_permitted(ip("10.0.0.1")),
            Err(Refusal::Denied),
            "deny wins"
        );
    }

    #[test]
    fn connections_per_ip_and_rate_and_flood_ban() {
        let clock = FakeRelativeClock::default();
        let mut g = Guard::with_clock(rules(), vec![], clock.clone());
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert!(g.admit(a, 0).is_ok());
        }
        assert_eq!(
            g.admit(a, 0).map_err(|r| (r.refusal, r.auto_ban.is_some())),
            Err((Refusal::TooManyFromIp(3), false))
        );
        g.release(a);
        assert!(g.admit(a, 0).is_ok(), "a released slot is usable");
        // 5 per minute (the refused one counted too): the 6th within the minute is refused,
        // and the third refusal bans the address.
        g.release(a);
        g.release(a);
        g.release(a);
        let mut last = None;
        for _ in 0..2 {
            last = Some(g.admit(a, 0));
        }
        assert_eq!(
            last.map(|r| r.map_err(|r| (r.refusal, r.auto_ban.is_some()))),
            Some(Err((Refusal::RateLimited, false)))
        );
        let r = g.admit(a, 0).expect_err("refused");
        assert_eq!(r.refusal, Refusal::RateLimited);
        let auto = r.auto_ban.expect("a flood bans");
        assert_eq!(auto.ban.until_ms, Some(900_000));
        clock.advance(Duration::from_secs(120));
        assert!(matches!(
            g.admit(a, 1000).map_err(|r| r.refusal),
            Err(Refusal::Banned(_))
        ));
        assert!(g.admit(ip("192.0.2.2"), 1000).is_ok(), "others unaffected");
        assert!(g.admit(a, 900_001).is_ok(), "the ban expires");
    }

    #[test]
    fn account_lockout_grows_and_success_clears_it() {
        let mut g = Guard::with_clock(rules(), vec![], FakeRelativeClock::default());
        let a = ip("192.0.2.1");
        g.login_failed("alice", a, 0);
        g.login_failed("alice", a, 0);
        assert_eq!(g.login_locked("alice", 0), None);
        g.login_failed("alice", a, 0);
        assert_eq!(g.login_locked("alice", 0), Some(1000));
        g.login_failed("alice", a, 10);
        assert_eq!(g.login_locked("alice", 10), Some(2000), "doubles");
        assert_eq!(g.login_locked("bob", 0), None);
        g.login_ok("alice");
        assert_eq!(g.login_locked("alice", 10), None);
    }

    #[test]
    fn a_burst_of_failed_logins_from_one_ip_bans_it() {
        let mut g = Guard::with_clock(rules(), vec![], FakeRelativeClock::default());
        let a = ip("192.0.2.7");
        let mut auto = None;
        for i in 0..10 {
            auto = g.login_failed(&format!("user{i}"), a, 5);
        }
        let auto = auto.expect("banned");
        assert_eq!(
            auto.ban.target,
            BanTarget::Net("192.0.2.7/32".parse().expect("net"))
        );
        assert!(g.ip_ban(a, 6).is_some());
        let mut r = rules();
        r.auto_ban = false;
        let mut g = Guard::with_clock(r, vec![], FakeRelativeClock::default());
        for i in 0..20 {
            assert!(g.login_failed(&format!("user{i}"), a, 5).is_none());
        }
    }

    #[test]
    fn bans_by_user_and_network_expire_and_lift() {
        let mut g = Guard::with_clock(rules(), vec![], FakeRelativeClock::default());
        g.add_ban(Ban {
            target: BanTarget::User("mallory".into()),
            until_ms: Some(100),
            reason: "spam".into(),
            by: "admin".into(),
            created_ms: 0,
        });
        g.add_ban(Ban {
            target: BanTarget::Net("2001:db8::/32".parse().expect("net")),
            until_ms: None,
            reason: "abuse".into(),
            by: "admin".into(),
            created_ms: 0,
        });
        assert!(g.user_ban("mallory", 50).is_some());
        assert!(g.user_ban("mallory", 150).is_none(), "expired");
        assert!(
            g.ip_ban(ip("2001:db8::5"), 10_000_000).is_some(),
            "for ever"
        );
        assert!(g.remove_ban(&BanTarget::Net("2001:db8::/32".parse().expect("net"))));
        assert!(g.ip_ban(ip("2001:db8::5"), 0).is_none());
        g.sweep(200);
        assert!(g.bans(200).is_empty());
    }
}
