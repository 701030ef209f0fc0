//! The listener: binds, accepts, limits the number of connections, and shuts down gracefully.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::at_rest::DataKey;
use crate::audit::{AuditLog, Fields, Kind};
use crate::config::{ClusterPlan, Config, RegistrationPolicy};
use crate::dispatch::{self};
use crate::guard::{Guard, Refusal};
use crate::hub::Hub;
use crate::shared_hub::SharedHub;
use crate::state::{SHUTDOWN_GRACE, Shared, hub_limits};
use crate::store::{Backend, Db, Store, StoreThread};

use crate::{connection, fsutil};

/// Commits waiting for fan-out.
const COMMIT_QUEUE: usize = 16 * 1024;

/// Why the server could not start, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Message(String),
}

fn start_err(m: impl Into<String>) -> StartError {
    StartError::Message(m.into())
}

/// Reloads a running server's configuration.
#[derive(Clone)]
pub struct Reloader(Arc<Shared>);

impl Reloader {
    pub async fn reload(&self) -> Result<(), String> {
        self.0.reload().await
    }
}

/// A bound server, ready to run.
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: tokio::net::UnixListener,
    metrics_listener: Option<TcpListener>,
    acceptor: TlsAcceptor,
    store_thread: StoreThread,
    dispatcher: tokio::task::JoinHandle<()>,
    local_addr: SocketAddr,
    fingerprint: String,
    identity_created: bool,
    cluster: Option<ClusterInfo>,
}

/// What a node in cluster mode runs with.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// This node's name on the bus.
    pub node: String,
    /// Whether it has a bus (without one it is the only node on its store).
    pub bus: bool,
}

/// Opens cluster mode's shared PostgreSQL store (the password from the environment or its
/// file, never from the URL), for the store thread to run on. It is opened with this data
/// directory's data key: every node must have the same one (a copy of the first node's data
/// directory), and a node with another key is refused before it writes anything.
pub fn open_shared_store(
    config: &Config,
    plan: &ClusterPlan,
) -> Result<crate::store_pg::PgDb, StartError> {
    let mut pg = plan.store.clone();
    if let Some(pw) = config
        .cluster
        .pg_password()
        .map_err(|e| start_err(e.to_string()))?
    {
        pg.password(pw);
    }
    let key = load_data_key(config)?;
    let mut db = crate::store_pg::PgDb::connect_config(&pg, key).map_err(|e| {
        start_err(format!(
            "cannot open the cluster's store (--store): {e}. Check that PostgreSQL runs, that \
             the URL names its host, port, user and database, and that this node has the data \
             key of the first node (copy its data directory)"
        ))
    })?;
    crate::store::Rooms::ensure_public_room(&mut db, &config.default_room)
        .map_err(|e| start_err(e.to_string()))?;
    Ok(db)
}

/// Joins the bus of a cluster.
pub async fn join_bus(plan: &ClusterPlan) -> Result<Option<Arc<dyn crate::bus::Bus>>, StartError> {
    let Some(url) = &plan.bus else {
        return Ok(None);
    };
    let cfg = crate::bus_nats::NatsConfig::new(url, &plan.cluster_name, &plan.node);
    let bus = crate::bus_nats::NatsBus::connect(cfg)
        .await
        .map_err(|e| start_err(e.to_string()))?;
    Ok(Some(Arc::new(bus)))
}

/// Runs `f` on a thread of its own and waits for it: the PostgreSQL store blocks on a runtime
/// of its own, which cannot start on a thread that drives async tasks (start-up only).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The data directory's data key (from its file, created if new, or from the passphrase).
fn load_data_key(config: &Config) -> Result<DataKey, StartError> {
    match &config.data_key_passphrase {
        Some(p) => DataKey::from_passphrase(&config.data_dir, p),
        None => DataKey::load_or_create(&config.data_dir),
    }
    .map_err(|e| start_err(e.to_string()))
}

/// Opens (creating if needed) the data directory's database with its data key.
pub fn open_db(config: &Config) -> Result<Db, StartError> {
    fsutil::create_private_dir(&config.data_dir).map_err(|e| {
        start_err(format!(
            "cannot create the data directory {}: {e}; pass --data-dir to choose another",
            config.data_dir.display()
        ))
    })?;
    let key = load_data_key(config)?;
    let mut db = Db::open(&config.data_dir, key).map_err(|e| start_err(e.to_string()))?;
    db.ensure_public_room(&config.default_room)
        .map_err(|e| start_err(e.to_string()))?;
    Ok(db)
}

impl Server {
    /// Prepares the data directory and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(|e| start_err(e.to_string()))?;
        // First: refuse if another server runs on this data directory, before touching it.
        fsutil::create_private_dir(&config.data_dir).map_err(|e| {
            start_err(format!(
                "cannot create the data directory {}: {e}; pass --data-dir to choose another",
                config.data_dir.display()
            ))
        })?;
        let admin = crate::admin_socket::bind(&config.data_dir)
            .await
            .map_err(start_err)?;
        let plan = config
            .cluster
            .check()
            .map_err(|e| start_err(e.to_string()))?;
        // In cluster mode the data directory still holds the TLS identity, the data key and
        // the audit log; the rest is read from the shared store.
        let mut db = open_db(&config)?;
        let mut shared_store = match &plan {
            Some(plan) => Some(off_runtime(|| open_shared_store(&config, plan))?),
            None => None,
        };
        let bus = match &plan {
            Some(plan) => join_bus(plan).await?,
            None => None,
        };
        let loaded = crate::certs::Certs::load(&config).map_err(|e| start_err(e.to_string()))?;
        let acceptor = TlsAcceptor::from(
            crate::certs::server_config(loaded.certs.clone(), config.web.enabled)
                .map_err(|e| start_err(e.to_string()))?,
        );
        let source: &mut dyn Backend = match shared_store.as_mut() {
            Some(b) => b,
            None => &mut db,
        };
        let (users, rooms, bans, (allow, deny), room_bans, chat_rows) =
            off_runtime(|| -> Result<_, StartError> {
                source
                    .ensure_public_room(&config.default_room)
                    .map_err(|e| start_err(e.to_string()))?;
                let now = crate::store::now_ms();
                let err = |e: crate::store::StoreError| start_err(e.to_string());
                Ok((
                    source.users().map_err(err)?,
                    source.rooms().map_err(err)?,
                    source.bans(now).map_err(err)?,
                    source.ip_rules().map_err(err)?,
                    source.room_bans(now).map_err(err)?,
                    source.chat_load().map_err(|e| {
                        start_err(format!("cannot load topics and display names: {e}"))
                    })?,
                ))
            })?;
        let rules = config
            .security
            .rules(&allow, &deny)
            .map_err(|e| start_err(e.to_string()))?;
        let audit = AuditLog::open(&config.data_dir, config.audit.clone())
            .map_err(|e| start_err(format!("cannot open the audit log: {e}")))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| bind_error(config.listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| start_err(e.to_string()))?;
        let hub = Arc::new(SharedHub::new(Hub::new(
            hub_limits(&config),
            users.into_iter().map(|u| (u.name, u.admin)),
            rooms,
        )));
        {
            let mut h = hub.lock();
            for (room, user, until) in room_bans {
                h.ban_from_room(&room, &user, until);
            }
        }
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let observed = metrics.clone();
        match shared_store.as_mut() {
            Some(pg) => pg.on_commit(Box::new(move |d| observed.store_commit.observe(d))),
            None => db.on_commit(Box::new(move |d| observed.store_commit.observe(d))),
        }
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(crate::prometheus::bind(addr).await.map_err(start_err)?),
            None => None,
        };
        let anomaly = crate::anomaly::Settings::from_config(&config.anomaly).map_err(start_err)?;
        let files = {
            let dir = config
                .files
                .dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join(crate::files::FILES_DIR));
            crate::files::FileStore::open_in(&dir, db.file_key()).map_err(|e| {
                start_err(format!(
                    "cannot create the file store in {}: {e}; check [files] dir",
                    dir.display()
                ))
            })?
        };
        let presence = crate::presence::Presence::from_rows(chat_rows);
        let groups: &mut (dyn crate::store::Groups + Send) = match shared_store.as_mut() {
            Some(pg) => pg,
            None => &mut db,
        };
        let e2ee = off_runtime(|| crate::e2ee::E2ee::load(groups))
            .map_err(|e| start_err(format!("cannot load the end-to-end groups: {e}")))?;
        let (sink, commits) = mpsc::channel(COMMIT_QUEUE);
        let cluster_mode = shared_store.is_some();
        let (store, store_thread) = match shared_store {
            Some(backend) => Store::start_marking(Box::new(backend), sink),
            None => Store::start(db, sink),
        };
        if let (true, Some(plan)) = (cluster_mode, &plan) {
            // The cluster's audit in one place: each record is copied into the shared store.
            let (copy_to, node) = (store.clone(), plan.node.clone());
            audit.mirror(Box::new(move |line| {
                let (node, line) = (node.clone(), line.to_string());
                copy_to.call_detached(move |db| {
                    if let Err(e) = db.audit_copy(&node, &line) {
                        tracing::warn!(error = %e, "copying an audit record into the cluster's store");
                    }
                });
            }));
        }
        let shared = Arc::new(Shared {
            config: RwLock::new(Arc::new(config)),
            local_addr,
            hub,
            guard: Mutex::new(Guard::new(rules, bans)),
            registry: Default::default(),
            started: std::time::Instant::now(),
            audit,
            hashing: Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            store,
            shutdown: CancellationToken::new(),
            metrics,
            monitor: crate::alerts::Monitor::new(anomaly),
            files: Arc::new(files),
            files_cache: Default::default(),
            e2ee,
            certs: loaded.certs.clone(),
            presence: Mutex::new(presence),
            bus,
            next_session: AtomicU64::new(1),
        });
        // One node: the store thread's order is the delivery order. A cluster node orders its
        // own commits with the other nodes' notices (`cluster`).
        let dispatcher = if cluster_mode {
            tokio::spawn(crate::cluster::run(shared.clone(), commits))
        } else {
            tokio::spawn(dispatch::run(
                shared.hub.clone(),
                commits,
                shared.metrics.clone(),
            ))
        };
        Ok(Server {
            shared,
            listener,
            admin,
            metrics_listener,
            acceptor,
            store_thread,
            dispatcher,
            local_addr,
            fingerprint: loaded.certs.fingerprint(),
            identity_created: loaded.identity_created,
            cluster: plan.map(|p| ClusterInfo {
                node: p.node,
                bus: p.bus.is_some(),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Cluster mode's node, when `--store` was given.
    pub fn cluster(&self) -> Option<&ClusterInfo> {
        self.cluster.as_ref()
    }

    /// Where the Prometheus endpoint listens, when it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The certificate's SHA-256 fingerprint, lower-case hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// True when this start created the TLS identity (first start).
    pub fn identity_created(&self) -> bool {
        self.identity_created
    }

    pub fn registration(&self) -> RegistrationPolicy {
        self.shared.registration()
    }

    /// A handle to reload the configuration while the server runs (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.clone())
    }

    /// Cancel this token to shut the server down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Makes this server a node of a cluster over `bus` (before [`Server::run`]): what it
    /// changes is published there (`cluster_events`). Whoever calls it also runs the node's
    /// reader of the bus and its `cluster_events::presence_task` (in-process tests do).
    pub fn set_bus(&mut self, bus: Arc<dyn crate::bus::Bus>) -> Result<(), StartError> {
        let shared = Arc::get_mut(&mut self.shared).ok_or_else(|| {
            start_err("the bus can only be set before the server is shared (before run)")
        })?;
        shared.bus = Some(bus);
        Ok(())
    }

    /// The state every connection shares (for a cluster node's reader of the bus).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until the shutdown token is cancelled, then closes every connection with a
    /// reason, commits what is queued, and closes the database.
    pub async fn run(self) -> Result<(), StartError> {
        let Server {
            shared,
            listener,
            admin,
            metrics_listener,
            acceptor,
            store_thread,
            dispatcher,
            cluster,
            ..
        } = self;
        let connections = Arc::new(Semaphore::new(shared.config().limits.max_connections));
        let tracker = TaskTracker::new();
        tracker.spawn(housekeeping_task(shared.clone()));
        tracker.spawn(index_task(shared.clone()));
        tracker.spawn(crate::admin_socket::serve(shared.clone(), admin));
        tracker.spawn(crate::monitor::run(shared.clone()));
        if cluster.as_ref().is_some_and(|c| c.bus) {
            tracker.spawn(crate::cluster_events::presence_task(
                shared.clone(),
                crate::cluster_events::DEFAULT_TIMING,
            ));
        }
        if let Some(l) = metrics_listener {
            tracker.spawn(crate::prometheus::serve(shared.clone(), l));
        }
        let bound = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // One descriptor held back for refusing connections cleanly when the process runs out
        // (see `is_fd_exhaustion` below).
        let mut reserve = std::fs::File::open("/dev/null").ok();
        let mut fd_exhausted = false;
        tracing::info!(listen = %bound, "serving");
        shared.audit(
            Kind::Start,
            Fields::new()
                .with("listen", &bound)
                .with("version", env!("CARGO_PKG_VERSION"))
                .with("registration", shared.registration().as_str()),
        );
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        if std::mem::take(&mut fd_exhausted) {
                            tracing::warn!("file descriptors are available again: accepting connections");
                        }
                        let Ok(permit) = connections.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "connection refused: max_connections reached");
                            shared.metrics.refused("max_connections");
                            drop(tcp);
                            continue;
                        };
                        // Before any TLS work: allow/deny lists, bans, per-IP limits.
                        let admitted = shared.guard().admit(peer.ip(), crate::store::now_ms());
                        crate::monitor::note_accept(&shared, peer, &admitted);
                        if let Err(refused) = admitted {
                            // Banned addresses were recorded when banned; the rest are bounded
                            // by the automatic flood ban.
                            if !matches!(refused.refusal, Refusal::Banned(_)) {
                                shared.audit(
                                    Kind::IpRejected,
                                    Fields::new().ip(peer).reason(refused.refusal.as_str()),
                                );
                            }
                            tracing::info!(%peer, refused = refused.refusal.as_str(), "connection refused");
                            drop(tcp);
                            if let Some(auto) = refused.auto_ban {
                                crate::cmd::admin::persist_auto_ban(&shared, auto).await;
                            }
                            continue;
                        }
                        let _ = tcp.set_nodelay(true);
                        let ip_slot = IpSlot { shared: shared.clone(), ip: peer.ip(), peer };
                        let acceptor = acceptor.clone();
                        tracker.spawn(async move {
                            connection::run(ip_slot.shared.clone(), acceptor.clone(), tcp, peer, permit).await;
                            drop(ip_slot);
                        });
                    }
                    Err(e) if is_fd_exhaustion(&e) => {
                        if !fd_exhausted {
                            fd_exhausted = true;
                            tracing::error!(
                                error = %e,
                                "out of file descriptors: new connections are refused until some close \
                                 (raise the limit with ulimit -n, or lower limits.max_connections)"
                            );
                        }
                        // The connection waits in the kernel's backlog, and accept fails until a
                        // descriptor is free: give back the one held in reserve, take the
                        // connection and close it at once, so the peer learns now instead of
                        // hanging, then take the reserve again.
                        drop(reserve.take());
                        if let Ok(Ok((tcp, peer))) =
                            tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
                        {
                            drop(tcp);
                            shared.metrics.refused("fd_limit");
                            shared.audit(Kind::IpRejected, Fields::new().ip(peer).reason("fd_limit"));
                        }
                        reserve = std::fs::File::open("/dev/null").ok();
                        if reserve.is_none() {
                            // Nothing to give back next time: wait instead of spinning.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    Err(e) => {
                        // Other transient failures (a peer that reset before accept): wait a
                        // little instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        drop(listener);
        tracing::info!("shutting down: closing connections");
        tracker.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await;
        shared.store.stop().await;
        let _ = dispatcher.await;
        let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
        shared.audit(Kind::Stop, Fields::new());
        let audit = shared.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// `accept` failed because this process (`EMFILE`) or the whole system (`ENFILE`) has no file
/// descriptor left, or the kernel is short of socket memory.
fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Gives a connection's per-IP slot back when the connection ends, however it ends.
struct IpSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
    peer: SocketAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        crate::monitor::connection_closed(&self.shared, self.peer);
        self.shared.guard().release(self.ip);
    }
}

/// How often waiting search tokens are written to the index.
const INDEX_FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Writes waiting search tokens regularly, until shutdown (the store flushes the rest when it
/// stops). Between flushes, a search flushes first, so results never miss a stored message.
async fn index_task(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(INDEX_FLUSH_EVERY) => {}
        }
        if let Err(e) = shared.store.call(|db| db.flush_index()).await {
            tracing::warn!(error = %e, "search index flush failed; it is retried");
        }
    }
}

/// How often the guard forgets stale counters and expired bans.
const GUARD_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Background upkeep until shutdown: expired messages (retention) and the guard's sweep.
async fn housekeeping_task(shared: Arc<Shared>) {
    let mut last_retention: Option<tokio::time::Instant> = None;
    let mut first = true;
    loop {
        let config = shared.config();
        let now = crate::store::now_ms();
        shared.guard().sweep(now);
        // Expired files; at start also bytes left without a record by a crash.
        crate::cmd::files::expire(&shared, first).await;
        first = false;
        let every = Duration::from_secs(config.retention.interval_s);
        if config.retention.enabled() && last_retention.is_none_or(|t| t.elapsed() >= every) {
            last_retention = Some(tokio::time::Instant::now());
            let rules = config.retention.clone();
            match shared
                .store
                .call(move |db| db.apply_retention(now, &|k| rules.rule_for(k)))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "retention: expired messages deleted"),
                Err(e) => tracing::warn!(error = %e, "retention run failed"),
            }
        }
        let nap = if config.retention.enabled() {
            every.min(GUARD_SWEEP_EVERY)
        } else {
            GUARD_SWEEP_EVERY
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(nap) => {}
        }
    }
}

fn bind_error(addr: SocketAddr, e: std::io::Error) -> StartError {
    use std::io::ErrorKind;
    let port = addr.port();
    start_err(match e.kind() {
        ErrorKind::AddrInUse => format!(
            "port {port} is already in use on {} (another conclave?); pass --listen ADDR:PORT to choose another",
            addr.ip()
        ),
        ErrorKind::PermissionDenied => format!(
            "not allowed to listen on {addr} (ports below 1024 need privileges); pass --listen with a port above 1024"
        ),
        ErrorKind::AddrNotAvailable => format!(
            "address {} is not an address of this machine; pass --listen with one that is (127.0.0.1, 0.0.0.0, ...)",
            addr.ip()
        ),
        _ => format!("cannot listen on {addr}: {e}"),
    })
}
