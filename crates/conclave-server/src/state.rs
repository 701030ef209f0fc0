//! The state every connection shares ([`Shared`]): the hub, the store, the guard, the
//! registry of connections, the audit log, metrics and the monitor's state, files, end-to-end
//! groups, certificates and presence; with what acts on several of them at once (the audit
//! record that feeds the anomaly rules and the alerts they raise, a reload).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use conclave_proto::DisconnectReason;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::alerts::{AlertRecord, RECENT_ALERTS, lock, observe_audit};
use crate::anomaly::{Alert, Scope};
use crate::audit::{AuditLog, Fields, Kind};
use crate::config::{Config, RegistrationPolicy};
use crate::dispatch::SendCtx;
use crate::guard::{Ban, BanTarget, Guard, ban_text};
use crate::hub::{HubLimits, SessionId};
use crate::shared_hub::SharedHub;
use crate::store::{Store, now_ms};

/// Time given to connections to say goodbye at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every connection.
pub struct Shared {
    /// The configuration in force; replaced whole by a reload.
    pub(crate) config: RwLock<Arc<Config>>,
    /// The address actually bound (for the `auto` registration policy).
    pub local_addr: SocketAddr,
    pub hub: Arc<SharedHub>,
    /// IP rules, bans, per-IP limits, login lock-out.
    pub guard: Mutex<Guard>,
    /// Every live connection.
    pub registry: crate::registry::Registry,
    /// When the server started.
    pub started: std::time::Instant,
    /// The tamper-evident audit log (never message text).
    pub audit: AuditLog,
    /// Password hashes computed at once (one per core).
    pub hashing: Semaphore,
    pub store: Store<SendCtx>,
    pub shutdown: CancellationToken,
    /// Counters and histograms for the Prometheus endpoint and the monitor.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Anomaly rules, recent alerts, per-connection rates (`conclave monitor`).
    pub monitor: crate::alerts::Monitor,
    /// Stored files (sealed chunks in `files/`).
    pub files: Arc<crate::files::FileStore>,
    pub files_cache: crate::files::FilesCache,
    /// End-to-end encrypted conversations (public group state) and the server's MLS key.
    pub e2ee: crate::e2ee::E2ee,
    /// The certificate the listener presents (swapped by a reload).
    pub certs: Arc<crate::certs::Certs>,
    /// Topics, display names, away messages, read-marker privacy (lock after the hub's).
    pub presence: Mutex<crate::presence::Presence>,
    /// Fan-out to the other nodes of a cluster (`--bus`); `None` for one node alone, which
    /// then pays nothing for it.
    pub bus: Option<Arc<dyn crate::bus::Bus>>,
    pub(crate) next_session: AtomicU64,
}

impl Shared {
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// A snapshot of the configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The registration policy in force (auto resolved for the bound address).
    pub fn registration(&self) -> RegistrationPolicy {
        self.config().registration.effective(self.local_addr)
    }

    /// Records an audit event.
    pub fn audit(&self, kind: Kind, fields: Fields) {
        let alerts = observe_audit(&self.monitor, &self.metrics, kind, &fields);
        self.audit.record(kind, fields);
        self.raise(alerts);
    }

    /// Presence state (topics, names, away); lock after the hub when both are needed.
    pub fn presence(&self) -> MutexGuard<'_, crate::presence::Presence> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the other nodes of a cluster, if any (`cluster_events` says what each event
    /// does there). Never waits; an event the bus cannot queue is logged and counted by the
    /// bus (what must survive is in the store).
    pub fn publish(&self, event: crate::bus::ClusterEvent) {
        let Some(bus) = &self.bus else { return };
        if let Err(e) = bus.publish_event(event) {
            tracing::warn!(error = %e, "a cluster event was not published");
        }
    }

    pub fn guard(&self) -> MutexGuard<'_, Guard> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the config file again and applies it: IP lists, limits, policies. On any error
    /// the configuration in force stays as it is, and the error says why.
    pub async fn reload(&self) -> Result<(), String> {
        let result = self.reload_inner().await;
        let fields = match &result {
            Ok(()) => Fields::new().with("ok", true),
            Err(e) => Fields::new().with("ok", false).reason(e.clone()),
        };
        self.audit(Kind::Reload, fields);
        result
    }

    async fn reload_inner(&self) -> Result<(), String> {
        let old = self.config();
        let new = old.reloaded().map_err(|e| e.to_string())?;
        new.validate().map_err(|e| e.to_string())?;
        self.apply_rules(&new).await?;
        self.certs.reload(&new)?;
        self.hub.lock().set_limits(hub_limits(&new));
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(new);
        }
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Rebuilds the guard's rules from `config` and the persisted IP lists.
    pub async fn apply_rules(&self, config: &Config) -> Result<(), String> {
        let (allow, deny) = self
            .store
            .call(|db| db.ip_rules())
            .await
            .map_err(|e| e.to_string())?;
        let rules = config
            .security
            .rules(&allow, &deny)
            .map_err(|e| e.to_string())?;
        self.guard().set_rules(rules);
        // Connections from networks the new lists refuse are closed, as a new `deny` is.
        let guard = self.guard();
        for c in self.registry.snapshot() {
            if guard.ip_permitted(c.peer.ip()).is_err() {
                c.outbox.close(
                    conclave_proto::DisconnectReason::Banned,
                    "your address is now refused (deny list, or not on the allow list)",
                );
            }
        }
        Ok(())
    }

    /// Acts on alerts: counts, logs and audits each, keeps it for the monitor, and applies the ban
    /// it asks for (unless one is already in force).
    pub fn raise(&self, alerts: Vec<Alert>) {
        for alert in alerts {
            self.metrics.alert(alert.rule);
            let ban = alert.ban.as_ref().and_then(|plan| {
                let now = now_ms();
                let guard = self.guard();
                let already = match &plan.target {
                    BanTarget::Net(net) => guard.ip_ban(net.network(), now).is_some(),
                    BanTarget::User(u) => guard.user_ban(u, now).is_some(),
                };
                (!already).then(|| Ban {
                    target: plan.target.clone(),
                    until_ms: Some(plan.until_ms),
                    reason: format!("automatic: {}", alert.describe()),
                    by: "server".into(),
                    created_ms: now,
                })
            });
            let action = match (&alert.ban, &ban) {
                (Some(_), None) => "alert only: already banned".to_string(),
                _ => alert.action(),
            };
            tracing::warn!(rule = alert.rule.as_str(), alert = %alert.describe(), action = %action, "anomaly");
            let record = AlertRecord {
                id: self.monitor.next_alert.fetch_add(1, Ordering::Relaxed),
                alert: alert.clone(),
                action: action.clone(),
            };
            {
                let mut recent = lock(&self.monitor.alerts);
                if recent.len() >= RECENT_ALERTS {
                    recent.pop_front();
                }
                recent.push_back(record);
            }
            let mut f = Fields::new()
                .reason(alert.describe())
                .with("rule", alert.rule.as_str())
                .with("scope", alert.scope.kind())
                .with("target", alert.scope.value())
                .with("count", alert.count)
                .with("threshold", alert.threshold)
                .with("window_s", alert.window_ms / 1000)
                .with("action", &action);
            match &alert.scope {
                Scope::Address(ip) => f = f.ip_addr(*ip),
                Scope::User(u) => f = f.user(u),
                Scope::Subnet(_) => {}
            }
            self.audit(Kind::Alert, f);
            if let Some(ban) = ban {
                self.apply_ban(ban);
            }
        }
    }

    /// Enforces a ban at once, audits it, and stores it in the background.
    fn apply_ban(&self, ban: Ban) {
        self.guard().add_ban(ban.clone());
        self.publish(ban_event(&ban));
        let message = ban_text(&ban, now_ms());
        match &ban.target {
            BanTarget::Net(net) => self
                .registry
                .close_net(net, DisconnectReason::Banned, &message),
            BanTarget::User(u) => self
                .registry
                .close_user(u, DisconnectReason::Banned, &message),
        };
        let mut f = Fields::new()
            .with("target_kind", ban.target.kind())
            .with("target", ban.target.value())
            .with("by", &ban.by)
            .with("until_ms", ban.until_ms)
            .reason(&ban.reason);
        if let BanTarget::User(u) = &ban.target {
            f = f.user(u);
        }
        self.audit(Kind::Ban, f);
        let store = self.store.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.call(move |db| db.add_ban(&ban)).await {
                    tracing::warn!(error = %e, "could not store an anomaly ban");
                }
            });
        }
    }
}

/// The cluster event that enforces `ban` on the other nodes.
pub fn ban_event(ban: &Ban) -> crate::bus::ClusterEvent {
    use crate::bus::{ClusterEvent, MAX_NODE_BYTES, MAX_REASON_BYTES};
    let by = clip(&ban.by, MAX_NODE_BYTES);
    let reason = clip(&ban.reason, MAX_REASON_BYTES);
    match &ban.target {
        BanTarget::User(u) => ClusterEvent::Banned {
            user: u.clone(),
            until_ms: ban.until_ms,
            by,
            reason,
        },
        BanTarget::Net(net) => ClusterEvent::AddressBanned {
            net: *net,
            until_ms: ban.until_ms,
            by,
            reason,
        },
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn clip(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The hub's limits from the configuration.
pub fn hub_limits(config: &Config) -> HubLimits {
    HubLimits {
        max_message_bytes: config.limits.max_message_bytes,
        max_recipients: config.limits.max_recipients,
        max_rooms: config.limits.max_rooms,
    }
}
