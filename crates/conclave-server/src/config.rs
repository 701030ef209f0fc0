//! Server configuration: every tunable and limit, with its documented default.
//!
//! Values come from `conclave.toml` in the data directory (or `--config`), then command-line
//! flags override them. Unknown keys are refused so a typo never silently does nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::anomaly::{AnomalyConfig, AnomalyRule};
pub use crate::guard::parse_net;

/// Default listen address: loopback only, so a first start exposes nothing to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7667";

/// Name of the config file inside the data directory.
pub const CONFIG_FILE: &str = "conclave.toml";

/// Who may create an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationPolicy {
    /// Open when the server listens on loopback only, closed otherwise. The safe default: a
    /// quick start on one machine just works, and a server exposed to a network never lets
    /// strangers sign up unless the operator says so.
    Auto,
    /// Anyone who can connect (and knows the server password, if one is set) may register.
    Open,
    /// Registration needs a one-time invite code made by an admin (`conclave user invite`).
    Invite,
    /// Only admins create accounts (`conclave user add`).
    Closed,
}

impl RegistrationPolicy {
    /// The policy in force for a server bound to `listen`.
    pub fn effective(self, listen: SocketAddr) -> RegistrationPolicy {
        match self {
            RegistrationPolicy::Auto if listen.ip().is_loopback() => RegistrationPolicy::Open,
            RegistrationPolicy::Auto => RegistrationPolicy::Closed,
            other => other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationPolicy::Auto => "auto",
            RegistrationPolicy::Open => "open",
            RegistrationPolicy::Invite => "invite",
            RegistrationPolicy::Closed => "closed",
        }
    }
}

/// The limits, each named with its unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame body accepted from a client; a larger length prefix ends the connection
    /// before anything is allocated.
    pub max_frame_bytes: usize,
    /// Largest frame body accepted once the client has logged in (at least
    /// `max_frame_bytes`): an end-to-end commit carries its group's GroupInfo and Welcome,
    /// each with the whole ratchet tree (about 200 to 280 bytes per member).
    pub max_member_frame_bytes: usize,
    /// Largest message body.
    pub max_message_bytes: usize,
    /// Most recipients named in one direct message (`to`) or `except` list.
    pub max_recipients: usize,
    /// Connections served at once; further ones are refused.
    pub max_connections: usize,
    /// Frames queued for one client; a client that lets it fill is disconnected as too slow.
    pub outbound_queue_frames: usize,
    /// Sends of one connection awaiting their durable commit at once (pipelining depth).
    pub max_inflight_sends: usize,
    /// Time allowed for the TLS handshake and the hello.
    pub handshake_timeout_ms: u64,
    /// Time allowed from the hello to a successful login.
    pub login_timeout_ms: u64,
    /// A connection that sends nothing for this long is closed (clients ping to stay alive).
    pub idle_timeout_ms: u64,
    /// Most messages returned by one history request.
    pub max_history_page: u32,
    /// Most rooms in the server.
    pub max_rooms: usize,
    /// Most missed messages sent per conversation at login (the newest; older ones are in
    /// history).
    pub max_catchup_per_conv: u32,
    /// Most missed messages sent in all at login (also capped at half the outbound queue).
    pub max_catchup_total: u32,
    /// Most cursors in one ack or resume.
    pub max_cursors: usize,
    /// Requests per second per connection (token bucket); excess gets `rate_limited`.
    pub requests_per_second: u32,
    /// The bucket's size: how many requests may come at once.
    pub request_burst: u32,
    /// Refused requests within 10 s after which the connection is closed as flooding.
    pub rate_strikes_before_disconnect: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: conclave_proto::DEFAULT_MAX_FRAME_BYTES,
            max_member_frame_bytes: conclave_proto::MEMBER_MAX_FRAME_BYTES,
            max_message_bytes: conclave_proto::DEFAULT_MAX_MESSAGE_BYTES,
            max_recipients: 100,
            max_connections: 50_000,
            outbound_queue_frames: 4096,
            max_inflight_sends: 256,
            handshake_timeout_ms: 10_000,
            login_timeout_ms: 30_000,
            idle_timeout_ms: 300_000,
            max_history_page: 500,
            max_rooms: 100_000,
            max_catchup_per_conv: 1000,
            max_catchup_total: 2000,
            max_cursors: 10_000,
            requests_per_second: 50,
            request_burst: 200,
            rate_strikes_before_disconnect: 100,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// The server's defences (`[security]`): IP lists, per-IP limits, login lock-out, automatic
/// bans. Lists here are fixed in the file; `conclave admin allow|deny` adds persisted ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Only these networks (CIDR or single addresses) may connect, when not empty.
    pub allow: Vec<String>,
    /// These networks may never connect.
    pub deny: Vec<String>,
    pub max_connections_per_ip: u32,
    /// New connections per IP per minute.
    pub connections_per_ip_per_minute: u32,
    /// Failed logins to one account before it is locked for a while.
    pub login_failures_per_account: u32,
    /// The first lock-out, in seconds; it doubles with each further failure.
    pub lockout_base_s: u64,
    pub lockout_max_s: u64,
    /// Failed logins from one IP (any accounts) within the window before an automatic ban.
    pub login_failures_per_ip: u32,
    /// Refused connection attempts (over the rate) from one IP within the window before an
    /// automatic ban.
    pub flood_refusals_per_ip: u32,
    pub failure_window_s: u64,
    /// Automatic temporary IP bans for login-failure bursts and connection floods.
    pub auto_ban: bool,
    pub auto_ban_minutes: u64,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections_per_ip: 64,
            connections_per_ip_per_minute: 120,
            login_failures_per_account: 5,
            lockout_base_s: 30,
            lockout_max_s: 3600,
            login_failures_per_ip: 30,
            flood_refusals_per_ip: 60,
            failure_window_s: 600,
            auto_ban: true,
            auto_ban_minutes: 15,
        }
    }
}

impl Security {
    /// The guard's rules from this section plus persisted lists.
    pub fn rules(
        &self,
        extra_allow: &[ipnet::IpNet],
        extra_deny: &[ipnet::IpNet],
    ) -> Result<crate::guard::GuardRules, ConfigError> {
        let nets = |v: &[String], what: &str| {
            v.iter()
                .map(|t| {
                    parse_net(t).map_err(|e| ConfigError::Invalid(format!("security.{what}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mut allow = nets(&self.allow, "allow")?;
        allow.extend_from_slice(extra_allow);
        let mut deny = nets(&self.deny, "deny")?;
        deny.extend_from_slice(extra_deny);
        let s = |secs: u64| (secs.min(i64::MAX as u64 / 1000) * 1000) as i64;
        Ok(crate::guard::GuardRules {
            allow,
            deny,
            max_connections_per_ip: self.max_connections_per_ip,
            connections_per_ip_per_minute: self.connections_per_ip_per_minute,
            login_failures_per_account: self.login_failures_per_account,
            lockout_base_ms: s(self.lockout_base_s),
            lockout_max_ms: s(self.lockout_max_s),
            login_failures_per_ip: self.login_failures_per_ip,
            failure_window_ms: s(self.failure_window_s),
            flood_refusals_per_ip: self.flood_refusals_per_ip,
            auto_ban: self.auto_ban,
            auto_ban_ms: s(self.auto_ban_minutes.saturating_mul(60)),
        })
    }
}

/// Vote-kick (`[votekick]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VoteKick {
    /// Whether rooms allow vote-kicks unless their owner turns them off.
    pub enabled: bool,
    /// Distinct votes needed.
    pub votes: u32,
    /// When above 0, the votes needed are at least this fraction of the room's members online
    /// (the target excluded), if that is more than `votes`.
    pub fraction: f64,
    /// Votes older than this no longer count.
    pub window_s: u64,
    /// How long a vote-kicked user cannot rejoin the room.
    pub ban_minutes: u64,
}

impl Default for VoteKick {
    fn default() -> Self {
        VoteKick {
            enabled: true,
            votes: 2,
            fraction: 0.0,
            window_s: 300,
            ban_minutes: 10,
        }
    }
}

/// How long messages are kept: everything by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete messages older than this many days; 0 keeps them for ever.
    pub max_age_days: u32,
    /// Keep at most this many messages per conversation; 0 keeps all.
    pub max_messages: u64,
    /// How often the background clean-up runs, in seconds.
    pub interval_s: u64,
    /// Per-room rules that replace the server-wide one: `[retention.rooms.NAME]`.
    pub rooms: std::collections::BTreeMap<String, RoomRetention>,
}

/// One room's retention rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomRetention {
    pub max_age_days: u32,
    pub max_messages: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age_days: 0,
            max_messages: 0,
            interval_s: 600,
            rooms: Default::default(),
        }
    }
}

fn rule(max_age_days: u32, max_messages: u64) -> crate::store::Retention {
    crate::store::Retention {
        max_age_days: (max_age_days > 0).then_some(max_age_days),
        max_messages: (max_messages > 0).then_some(max_messages),
    }
}

impl RetentionConfig {
    /// The rule for a conversation (by its storage key): the room's own, or the server's.
    pub fn rule_for(&self, conv_key: &str) -> crate::store::Retention {
        match conv_key.strip_prefix("r:").and_then(|r| self.rooms.get(r)) {
            Some(r) => rule(r.max_age_days, r.max_messages),
            None => rule(self.max_age_days, self.max_messages),
        }
    }

    /// Whether any rule deletes anything.
    pub fn enabled(&self) -> bool {
        self.max_age_days > 0
            || self.max_messages > 0
            || self
                .rooms
                .values()
                .any(|r| r.max_age_days > 0 || r.max_messages > 0)
    }
}

/// The Prometheus endpoint (`[metrics]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `http://ADDR:PORT/metrics` (the Prometheus text format). Absent: off. Loopback
    /// is the expected choice; another address is allowed, with a warning in the log.
    pub listen: Option<SocketAddr>,
}

/// File transfer (`[files]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Largest file accepted.
    pub max_file_bytes: u64,
    /// Most bytes of stored (unexpired) files per sending account.
    pub quota_bytes_per_user: u64,
    /// Seconds a file is kept for its recipients (offline ones included); then it is deleted.
    pub expiry_secs: u64,
    /// Upload and download chunks per second per connection (token bucket; excess waits).
    /// These do not count against `limits.requests_per_second`.
    pub chunks_per_second: u32,
    /// Most files offered to one user that are pending at once (sent at login).
    pub max_pending_offers: u32,
    /// Where the contents of relayed files are kept (default: `files/` in the data directory).
    /// In cluster mode every node must name the same directory on a shared filesystem, so a
    /// file uploaded through one node can be fetched through another.
    pub dir: Option<std::path::PathBuf>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            max_file_bytes: 2 * 1024 * 1024 * 1024,
            quota_bytes_per_user: 4 * 1024 * 1024 * 1024,
            expiry_secs: 7 * 24 * 3600,
            chunks_per_second: 20_000,
            max_pending_offers: 200,
            dir: None,
        }
    }
}

impl FilesConfig {
    pub fn expiry_ms(&self) -> i64 {
        i64::try_from(self.expiry_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// The web client (`[web]`): served over HTTPS on the listen port to TLS clients that ask
/// for HTTP by ALPN (browsers), with its protocol on the WebSocket `/ws`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the web client. Off: TLS clients asking for HTTP are refused during the handshake.
    pub enabled: bool,
    /// Most time one HTTP connection is kept before its WebSocket upgrade (a browser loading
    /// the page opens another when it needs one).
    pub http_connection_ms: u64,
    /// Largest request head (request line and headers) accepted.
    pub max_request_header_bytes: usize,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            http_connection_ms: 30_000,
            max_request_header_bytes: 16 * 1024,
        }
    }
}

/// History for a new device and the recovery-key backup (`[devices]`). The server stores
/// only ciphertext for these; the limits bound how much of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// Most bytes of history chunks waiting for one device (sealed to it by an approving
    /// device, kept until it takes them). Past it, the approving device waits and retries.
    pub transfer_bytes_per_device: u64,
    /// Most bytes of one account's recovery-key backup (all its segments).
    pub backup_bytes_per_account: u64,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            transfer_bytes_per_device: 256 * 1024 * 1024,
            backup_bytes_per_account: 1024 * 1024 * 1024,
        }
    }
}

/// Edits, deletes, replies and reactions (`[messages]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesConfig {
    /// Seconds after sending during which the author may edit a message; 0: no limit.
    pub edit_window_s: u64,
    /// Most edits of one message.
    pub max_edits: u32,
    /// Most reactions (one emoji of one user each) on one message.
    pub max_reactions: u32,
    /// Longest reaction, in bytes of UTF-8.
    pub max_emoji_bytes: usize,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        MessagesConfig {
            edit_window_s: 0,
            max_edits: 100,
            max_reactions: 500,
            max_emoji_bytes: conclave_proto::chat::DEFAULT_MAX_EMOJI_BYTES,
        }
    }
}

/// Everyday chat's presence side (`[presence]`): how often typing notices and read markers
/// may come, and how long topics, away messages and display names may be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Shortest time between two typing notices of one connection in one conversation;
    /// one sooner is refused (`rate_limited`) and not passed on.
    pub typing_interval_ms: u64,
    /// Shortest time between two read markers of one connection in one conversation (the
    /// marker only moves forward; clients send the newest at most this often).
    pub read_interval_ms: u64,
    /// Topic, away and display-name changes per connection per minute.
    pub changes_per_minute: u32,
    /// Longest room topic, in characters.
    pub max_topic_chars: usize,
    /// Longest away message, in characters.
    pub max_away_chars: usize,
    /// Longest display name, in characters.
    pub max_display_name_chars: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            typing_interval_ms: conclave_proto::chat::DEFAULT_TYPING_INTERVAL_MS,
            read_interval_ms: 500,
            changes_per_minute: 20,
            max_topic_chars: conclave_proto::chat::DEFAULT_MAX_TOPIC_CHARS,
            max_away_chars: conclave_proto::chat::DEFAULT_MAX_AWAY_CHARS,
            max_display_name_chars: conclave_proto::chat::DEFAULT_MAX_DISPLAY_NAME_CHARS,
        }
    }
}

/// An operator-given TLS certificate (`[tls]`), for example one issued by a CA that browsers
/// trust. Absent: the self-signed certificate in `tls/` of the data directory. Read again by
/// `conclave admin reload`; open connections keep theirs.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM, the server's certificate first.
    pub cert_file: Option<PathBuf>,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1); keep it mode 0600.
    pub key_file: Option<PathBuf>,
}

/// The config file's shape.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Address and port to listen on.
    pub listen: Option<String>,
    /// Registration policy: auto, open, invite or closed.
    pub registration: Option<RegistrationPolicy>,
    /// Name of the default room every new account joins.
    pub default_room: Option<String>,
    pub limits: Limits,
    pub retention: RetentionConfig,
    pub security: Security,
    pub votekick: VoteKick,
    pub audit: crate::audit::AuditConfig,
    pub anomaly: AnomalyConfig,
    pub metrics: MetricsConfig,
    pub files: FilesConfig,
    pub web: WebConfig,
    pub tls: TlsConfig,
    pub presence: PresenceConfig,
    pub messages: MessagesConfig,
    pub devices: DevicesConfig,
    /// Cluster mode: the shared store (`postgres://…`), see [`ClusterConfig`].
    pub store: Option<String>,
    /// Cluster mode: the bus between nodes (`nats://HOST:PORT`).
    pub bus: Option<String>,
    /// Cluster mode: this node's name (default: the host name).
    pub node: Option<String>,
    /// Cluster mode: a file (mode 0600) holding the PostgreSQL password.
    pub store_password_file: Option<PathBuf>,
    /// Cluster mode: the cluster's name on the bus (its subjects' second token).
    pub cluster_name: Option<String>,
}

/// The environment variable that may hold the PostgreSQL password (never on the command line
/// or in the store URL, where `ps` and shell histories would show it).
pub const PG_PASSWORD_ENV: &str = "CONCLAVE_PG_PASSWORD";

/// The cluster's name on the bus when none is given.
pub const DEFAULT_CLUSTER_NAME: &str = "conclave";

/// Cluster mode (issue 24): `store`, `bus`, `node`, `store_password_file` and `cluster_name`
/// at the top of `conclave.toml`, or `--store`, `--bus`, `--node` (which override the file).
/// Without a store, nothing of it is used: SQLite in the data directory, no bus.
///
/// What [`ClusterConfig::check`] accepts: a store URL without a password (the password comes
/// from [`PG_PASSWORD_ENV`] or `store_password_file`), and PostgreSQL and NATS reached over a
/// Unix socket or a loopback address only: this build speaks no TLS to either, and a
/// plaintext connection across a network is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    pub store: Option<String>,
    pub bus: Option<String>,
    pub node: Option<String>,
    pub store_password_file: Option<PathBuf>,
    pub cluster_name: Option<String>,
}

/// A checked cluster configuration: what the server connects to.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    /// The PostgreSQL connection (without its password, which [`ClusterConfig::pg_password`]
    /// reads at start).
    pub store: postgres::Config,
    /// `nats://HOST:PORT[,…]`, when there is a bus.
    pub bus: Option<String>,
    pub node: String,
    pub cluster_name: String,
}

fn loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// This machine's host name, if it has a usable one.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_string();
    (!name.is_empty()).then_some(name)
}

impl ClusterConfig {
    /// Whether cluster mode (a shared store) is asked for.
    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// Checks the settings; `None` when no store is given (one node on SQLite).
    pub fn check(&self) -> Result<Option<ClusterPlan>, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let Some(url) = &self.store else {
            if self.bus.is_some() {
                return bad(
                    "a bus (--bus, or bus in conclave.toml) needs a shared store: give --store postgres://… too (one node alone needs neither)"
                        .into(),
                );
            }
            return Ok(None);
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return bad(format!(
                "the store {url:?} is not a PostgreSQL URL: write postgres://USER@HOST:PORT/DATABASE or postgres://USER@%2Frun%2Fpostgresql/DATABASE (a Unix socket)"
            ));
        }
        let store: postgres::Config = url.parse().map_err(|e| {
            ConfigError::Invalid(format!(
                "the store URL is not valid ({e}); write postgres://USER@HOST:PORT/DATABASE"
            ))
        })?;
        if store.get_password().is_some() {
            return bad(format!(
                "the store URL holds a password, which would show in `ps` and shell histories: remove it, and put it in the environment variable {PG_PASSWORD_ENV} or in a file named by store_password_file in conclave.toml (mode 0600)"
            ));
        }
        if store.get_hosts().is_empty() {
            return bad(
                "the store URL names no host: write postgres://USER@127.0.0.1:5432/DATABASE, or a Unix socket's directory as the host (postgres://USER@%2Frun%2Fpostgresql/DATABASE)"
                    .into(),
            );
        }
        for host in store.get_hosts() {
            if let postgres::config::Host::Tcp(h) = host
                && !loopback_host(h)
            {
                return bad(format!(
                    "PostgreSQL at {h:?} is not on this machine, and this build has no TLS to PostgreSQL: no plaintext transport across a network. Connect over a Unix socket or a loopback address (run the node on the database's machine, or tunnel it)"
                ));
            }
        }
        for addr in store.get_hostaddrs() {
            if !addr.is_loopback() {
                return bad(format!(
                    "PostgreSQL at {addr} (hostaddr) is not a loopback address: no plaintext transport across a network; connect over a Unix socket or loopback"
                ));
            }
        }
        if store.get_ssl_mode() == postgres::config::SslMode::Require {
            return bad(
                "sslmode=require: this build has no TLS to PostgreSQL yet; connect over a Unix socket or loopback without sslmode"
                    .into(),
            );
        }
        let bus = match &self.bus {
            Some(b) => Some(check_bus(b)?),
            None => None,
        };
        let node = match &self.node {
            Some(n) => n.clone(),
            None => host_name().ok_or_else(|| {
                ConfigError::Invalid(
                    "this machine has no host name to name the node by: give --node NAME".into(),
                )
            })?,
        };
        crate::bus::wire::check_node(&node).map_err(|e| {
            ConfigError::Invalid(format!(
                "the node name {node:?} is not usable ({e}); give --node NAME (1 to {} bytes, no control characters)",
                crate::bus::MAX_NODE_BYTES
            ))
        })?;
        let cluster_name = self
            .cluster_name
            .clone()
            .unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_string());
        Ok(Some(ClusterPlan {
            store,
            bus,
            node,
            cluster_name,
        }))
    }

    /// The PostgreSQL password: from `store_password_file` (which must be mode 0600 or
    /// stricter), or from [`PG_PASSWORD_ENV`]; `None` when neither is given (peer or trust
    /// authentication over a Unix socket needs none). Both given is refused as ambiguous.
    pub fn pg_password(&self) -> Result<Option<String>, ConfigError> {
        let env = std::env::var(PG_PASSWORD_ENV)
            .ok()
            .filter(|p| !p.is_empty());
        let Some(path) = &self.store_password_file else {
            return Ok(env);
        };
        if env.is_some() {
            return Err(ConfigError::Invalid(format!(
                "both {PG_PASSWORD_ENV} and store_password_file give a PostgreSQL password: keep one"
            )));
        }
        let read_err = |e: std::io::Error| ConfigError::Read {
            path: path.clone(),
            error: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        if mode & 0o077 != 0 {
            return Err(ConfigError::Invalid(format!(
                "store_password_file {} can be read by other users (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let pw = text.trim_end_matches(['\n', '\r']).to_string();
        if pw.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "store_password_file {} is empty",
                path.display()
            )));
        }
        Ok(Some(pw))
    }
}

/// Checks `nats://HOST:PORT[,nats://HOST:PORT…]`: no credentials in it, loopback hosts only.
fn check_bus(text: &str) -> Result<String, ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    for url in text.split(',') {
        let url = url.trim();
        let Some(rest) = url.strip_prefix("nats://") else {
            return bad(format!(
                "the bus {url:?} is not nats://HOST:PORT (tls:// is not supported by this build yet)"
            ));
        };
        if rest.contains('@') {
            return bad(format!(
                "the bus URL {url:?} holds credentials, which would show in `ps`: remove them (NATS authentication is not supported by this build yet; run nats-server on loopback)"
            ));
        }
        let host = match rest.rsplit_once(':') {
            Some((h, port)) if port.parse::<u16>().is_ok() => h,
            _ => rest,
        };
        let host = host.trim_end_matches('/');
        if !loopback_host(host) {
            return bad(format!(
                "NATS at {host:?} is not on this machine, and this build has no TLS to NATS: no plaintext transport across a network. Use a loopback address (nats://127.0.0.1:4222)"
            ));
        }
    }
    Ok(text.to_string())
}

/// Room left in a client's frame limit for what the server adds around a relayed frame (the
/// event's fields: names, ids, the conversation).
pub const CLIENT_FRAME_MARGIN_BYTES: usize = 64 * 1024;

/// The configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub registration: RegistrationPolicy,
    /// Needed (when set) to log in or register. Never written to disk by the server.
    pub server_password: Option<String>,
    pub default_room: String,
    pub limits: Limits,
    pub retention: RetentionConfig,
    pub security: Security,
    pub votekick: VoteKick,
    pub audit: crate::audit::AuditConfig,
    /// Anomaly detection rules (`[anomaly]`).
    pub anomaly: AnomalyConfig,
    /// The Prometheus endpoint (`[metrics]`); off unless an address is given.
    pub metrics: MetricsConfig,
    /// File transfer limits (`[files]`).
    pub files: FilesConfig,
    /// The web client (`[web]`).
    pub web: WebConfig,
    /// An operator-given certificate (`[tls]`, or `--tls-cert`/`--tls-key`).
    pub tls: TlsConfig,
    /// The certificate came from the command line, which a reload does not override.
    pub tls_from_cli: bool,
    /// Typing, read markers, topics, away, display names (`[presence]`).
    pub presence: PresenceConfig,
    /// Edits, deletes and reactions (`[messages]`).
    pub messages: MessagesConfig,
    /// History for new devices and recovery-key backups (`[devices]`).
    pub devices: DevicesConfig,
    /// When set, the data key is derived from this passphrase instead of `data.key`. Never
    /// written to disk.
    pub data_key_passphrase: Option<String>,
    /// The config file read (`None`: defaults only); a reload reads it again.
    pub config_file: Option<PathBuf>,
    /// The registration policy came from the command line, which a reload does not override.
    pub registration_from_cli: bool,
    /// Cluster mode (`--store`, `--bus`, `--node`); fixed while serving.
    pub cluster: ClusterConfig,
}

impl Config {
    /// A configuration with every default, for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN.parse().unwrap_or_else(|_| {
                SocketAddr::from(([127, 0, 0, 1], conclave_proto::DEFAULT_PORT))
            }),
            registration: RegistrationPolicy::Auto,
            server_password: None,
            default_room: "general".to_string(),
            limits: Limits::default(),
            retention: RetentionConfig::default(),
            security: Security::default(),
            votekick: VoteKick::default(),
            audit: crate::audit::AuditConfig::default(),
            anomaly: AnomalyConfig::default(),
            metrics: MetricsConfig::default(),
            files: FilesConfig::default(),
            web: WebConfig::default(),
            tls: TlsConfig::default(),
            tls_from_cli: false,
            presence: PresenceConfig::default(),
            messages: MessagesConfig::default(),
            devices: DevicesConfig::default(),
            data_key_passphrase: None,
            config_file: None,
            registration_from_cli: false,
            cluster: ClusterConfig::default(),
        }
    }

    /// Reads the config file (`path`, or `conclave.toml` in the data directory if it exists)
    /// over the defaults.
    pub fn load(data_dir: &Path, path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = Config::new(data_dir);
        let default_path = data_dir.join(CONFIG_FILE);
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None if default_path.exists() => Some(default_path),
            None => None,
        };
        config.config_file = path.clone();
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
                path: path.clone(),
                error: e.to_string(),
            })?;
            config.apply_file(&path, &text)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses the text of a config file (read from `path`) over this configuration. The
    /// caller validates the result. Split from [`Config::load`] so the parser can be fuzzed
    /// without touching the disk.
    pub fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            error: e.to_string(),
        })?;
        if let Some(listen) = file.listen {
            self.listen = parse_listen(&listen)?;
        }
        if let Some(r) = file.registration {
            self.registration = r;
        }
        if let Some(room) = file.default_room {
            self.default_room = conclave_proto::names::canonical_room(&room)
                .map_err(|e| ConfigError::Invalid(format!("default_room {room:?}: {e}")))?;
        }
        self.limits = file.limits;
        self.retention = file.retention;
        self.security = file.security;
        self.votekick = file.votekick;
        self.audit = file.audit;
        self.anomaly = file.anomaly;
        self.metrics = file.metrics;
        self.files = file.files;
        self.web = file.web;
        self.tls = file.tls;
        self.presence = file.presence;
        self.messages = file.messages;
        self.devices = file.devices;
        self.cluster = ClusterConfig {
            store: file.store,
            bus: file.bus,
            node: file.node,
            store_password_file: file.store_password_file,
            cluster_name: file.cluster_name,
        };
        Ok(())
    }

    /// The configuration a reload brings: the file read again over the defaults, keeping what
    /// cannot change while serving (data directory, listen address, secrets) and what the
    /// command line fixed.
    pub fn reloaded(&self) -> Result<Config, ConfigError> {
        let mut new = Config::load(&self.data_dir, self.config_file.as_deref())?;
        new.listen = self.listen;
        new.metrics = self.metrics.clone();
        new.server_password = self.server_password.clone();
        new.data_key_passphrase = self.data_key_passphrase.clone();
        new.registration_from_cli = self.registration_from_cli;
        new.tls_from_cli = self.tls_from_cli;
        if self.tls_from_cli {
            new.tls = self.tls.clone();
        }
        if self.registration_from_cli {
            new.registration = self.registration;
        }
        new.config_file = self.config_file.clone();
        new.cluster = self.cluster.clone();
        Ok(new)
    }

    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |what: &str| Err(ConfigError::Invalid(what.to_string()));
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024");
        }
        if l.max_member_frame_bytes < l.max_frame_bytes {
            return bad("limits.max_member_frame_bytes must be at least limits.max_frame_bytes");
        }
        if l.max_message_bytes + 1024 > l.max_frame_bytes {
            return bad(
                "limits.max_message_bytes must be at least 1024 below limits.max_frame_bytes",
            );
        }
        // What a member sends, the server sends on to the others in one frame with a little
        // more around it: it must stay under what clients accept, or every member would be cut
        // off by it, again at every login.
        let client_max = conclave_proto::CLIENT_MAX_FRAME_BYTES;
        if l.max_member_frame_bytes + CLIENT_FRAME_MARGIN_BYTES > client_max {
            return Err(ConfigError::Invalid(format!(
                "limits.max_member_frame_bytes ({}) must be at most {} ({} KiB below the {} bytes a client accepts from the server, which relays what members send)",
                l.max_member_frame_bytes,
                client_max - CLIENT_FRAME_MARGIN_BYTES,
                CLIENT_FRAME_MARGIN_BYTES / 1024,
                client_max
            )));
        }
        if l.outbound_queue_frames == 0 || l.max_inflight_sends == 0 || l.max_connections == 0 {
            return bad(
                "limits.outbound_queue_frames, max_inflight_sends and max_connections must be above 0",
            );
        }
        if l.max_recipients == 0 || l.max_history_page == 0 {
            return bad("limits.max_recipients and max_history_page must be above 0");
        }
        self.security.rules(&[], &[])?;
        let f = &self.files;
        if f.max_file_bytes == 0
            || f.quota_bytes_per_user == 0
            || f.expiry_secs == 0
            || f.chunks_per_second == 0
            || f.max_pending_offers == 0
        {
            return bad("every value in [files] must be above 0");
        }
        if self.web.http_connection_ms == 0 || self.web.max_request_header_bytes < 8192 {
            return bad(
                "web.http_connection_ms must be above 0 and web.max_request_header_bytes at least 8192",
            );
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad(
                "tls.cert_file and tls.key_file go together: give both (a CA-issued certificate chain and its key, PEM), or neither (the self-signed default)",
            );
        }
        let m = &self.messages;
        if m.max_reactions == 0 || m.max_emoji_bytes == 0 {
            return bad(
                "messages.max_reactions and max_emoji_bytes must be above 0 (max_edits = 0 turns editing off)",
            );
        }
        let d = &self.devices;
        if d.transfer_bytes_per_device == 0 || d.backup_bytes_per_account == 0 {
            return bad("every value in [devices] must be above 0");
        }
        if l.requests_per_second == 0 || l.request_burst == 0 {
            return bad("limits.requests_per_second and request_burst must be above 0");
        }
        let sec = &self.security;
        if sec.max_connections_per_ip == 0 || sec.connections_per_ip_per_minute == 0 {
            return bad(
                "security.max_connections_per_ip and connections_per_ip_per_minute must be above 0",
            );
        }
        if sec.login_failures_per_account == 0
            || sec.login_failures_per_ip == 0
            || sec.flood_refusals_per_ip == 0
        {
            return bad(
                "security.login_failures_per_account, login_failures_per_ip and flood_refusals_per_ip must be above 0",
            );
        }
        if self.votekick.votes == 0 || !(0.0..=1.0).contains(&self.votekick.fraction) {
            return bad("votekick.votes must be above 0 and votekick.fraction between 0 and 1");
        }
        if self.retention.interval_s == 0 {
            return bad("retention.interval_s must be above 0");
        }
        crate::anomaly::Settings::from_config(&self.anomaly).map_err(ConfigError::Invalid)?;
        self.cluster.check()?;
        for room in self.retention.rooms.keys() {
            if conclave_proto::names::canonical_room(room).as_deref() != Ok(room.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "retention.rooms.{room}: not a valid lower-case room name"
                )));
            }
        }
        Ok(())
    }
}

/// Parses `ADDR:PORT` with an error that says what to write instead.
pub fn parse_listen(text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::Invalid(format!(
            "listen address {text:?} is not ADDR:PORT (for example 127.0.0.1:7667, 0.0.0.0:7667 or [::1]:7667)"
        ))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}", path.display())]
    Read { path: PathBuf, error: String },
    #[error("config file {}: {error}", path.display())]
    Parse { path: PathBuf, error: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:1\"\n[limits]\nmax_frame_bites = 5\n",
        )
        .expect("write");
        let err = Config::load(dir.path(), Some(&p))
            .expect_err("must refuse")
            .to_string();
        assert!(err.contains("max_frame_bites"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_networks_are_refused_with_the_accepted_forms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[security]\nallow = [\"10.0.0.0/33\"]\n").expect("write");
        let err = Config::load(dir.path(), Some(&p))
            .expect_err("must refuse")
            .to_string();
        assert!(
            err.contains("security.allow") && err.contains("CIDR"),
            "{err}"
        );
        assert_eq!(
            parse_net("192.0.2.7").expect("addr").to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_net("10.1.2.3/8").expect("net").to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn auto_registration_is_open_only_on_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:1".parse().expect("addr");
        assert_eq!(
            RegistrationPolicy::Auto.effective(lo),
            RegistrationPolicy::Open
        );
        assert_eq!(
            RegistrationPolicy::Auto.effective(any),
            RegistrationPolicy::Closed
        );
        assert_eq!(
            RegistrationPolicy::Invite.effective(lo),
            RegistrationPolicy::Invite
        );
    }

    #[test]
    fn what_members_send_must_fit_what_clients_accept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[limits]\nmax_frame_bytes = 8388608\nmax_member_frame_bytes = 8388608\nmax_message_bytes = 6000000\n",
        )
        .expect("write");
        let err = Config::load(dir.path(), Some(&p))
            .expect_err("must refuse")
            .to_string();
        assert!(
            err.contains("limits.max_member_frame_bytes (8388608) must be at most 4128768"),
            "{err}"
        );
        std::fs::write(&p, "[limits]\nmax_member_frame_bytes = 4128768\n").expect("write");
        Config::load(dir.path(), Some(&p)).expect("just under the client's limit");
    }

    #[test]
    fn bad_listen_says_what_to_write() {
        let err = parse_listen("localhost").expect_err("refused").to_string();
        assert!(err.contains("ADDR:PORT"), "{err}");
    }

    fn cluster(store: Option<&str>, bus: Option<&str>) -> ClusterConfig {
        ClusterConfig {
            store: store.map(str::to_string),
            bus: bus.map(str::to_string),
            node: Some("node-a".into()),
            ..ClusterConfig::default()
        }
    }

    fn refusal(c: &ClusterConfig) -> String {
        c.check().expect_err("must refuse").to_string()
    }

    #[test]
    fn cluster_settings_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "store = \"postgres://conclave@127.0.0.1:5432/chat\"\nbus = \"nats://127.0.0.1:4222\"\nnode = \"n1\"\n",
        )
        .expect("write");
        let config = Config::load(dir.path(), Some(&p)).expect("valid");
        let plan = config
            .cluster
            .check()
            .expect("valid")
            .expect("cluster mode");
        assert_eq!(plan.node, "n1");
        assert_eq!(plan.cluster_name, DEFAULT_CLUSTER_NAME);
        assert_eq!(plan.bus.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(plan.store.get_dbname(), Some("chat"));
        // Without a store nothing is asked for; a bus alone is refused.
        assert!(ClusterConfig::default().check().expect("valid").is_none());
        assert!(refusal(&cluster(None, Some("nats://127.0.0.1:4222"))).contains("--store"));
    }

    #[test]
    fn no_password_and_no_plaintext_across_a_network() {
        let err = refusal(&cluster(Some("postgres://u:secret@127.0.0.1/db"), None));
        assert!(
            err.contains(PG_PASSWORD_ENV) && err.contains("store_password_file"),
            "{err}"
        );
        assert!(
            !err.contains("secret"),
            "the password is not repeated: {err}"
        );
        let err = refusal(&cluster(Some("postgres://u@db.example.org:5432/db"), None));
        assert!(err.contains("no plaintext transport"), "{err}");
        let err = refusal(&cluster(
            Some("postgres://u@127.0.0.1/db?sslmode=require"),
            None,
        ));
        assert!(err.contains("TLS"), "{err}");
        let err = refusal(&cluster(Some("mysql://u@127.0.0.1/db"), None));
        assert!(err.contains("postgres://"), "{err}");
        let err = refusal(&cluster(
            Some("postgres://u@127.0.0.1/db"),
            Some("nats://10.0.0.5:4222"),
        ));
        assert!(err.contains("no plaintext transport"), "{err}");
        let err = refusal(&cluster(
            Some("postgres://u@127.0.0.1/db"),
            Some("nats://me:pw@127.0.0.1:4222"),
        ));
        assert!(err.contains("credentials"), "{err}");
        // A Unix socket, loopback names and addresses are accepted.
        for store in [
            "postgres://u@%2Frun%2Fpostgresql/db",
            "postgres://u@localhost/db",
            "postgresql://u@[::1]:5433/db",
        ] {
            cluster(Some(store), Some("nats://localhost:4222,nats://[::1]:4223"))
                .check()
                .unwrap_or_else(|e| panic!("{store}: {e}"));
        }
        let mut bad_node = cluster(Some("postgres://u@localhost/db"), None);
        bad_node.node = Some("a\u{7}b".into());
        assert!(refusal(&bad_node).contains("--node"));
    }

    #[test]
    fn the_password_file_must_be_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("pgpass");
        std::fs::write(&p, "hunter2\n").expect("write");
        let mut c = cluster(Some("postgres://u@localhost/db"), None);
        c.store_password_file = Some(p.clone());
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let err = c.pg_password().expect_err("world-readable").to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        assert_eq!(
            c.pg_password().expect("private").as_deref(),
            Some("hunter2")
        );
    }
}
