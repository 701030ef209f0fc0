//! The NATS bus: [`Bus`] on NATS core subjects with async-nats.
//!
//! Subjects: `conclave.<cluster>.commit` (commit notices) and `conclave.<cluster>.event`
//! (cluster events), both subscribed by every node with `no_echo`, so a node never hears itself.
//! NATS core delivers at most once; that is the point: PostgreSQL holds every message, and a
//! node that misses notices reads them from it ([`crate::bus::Follower`]). What tells a node it
//! may have missed some:
//! - **a reconnect**: async-nats reconnects on its own (forever, back-off up to
//!   `max_reconnect_delay_ms`) and subscribes again; once the server has the subscriptions back
//!   (a round trip after the `Connected` event, see [`confirm`]; or its timeout, with a
//!   warning), the stream yields
//!   [`Incoming::Reset`], so the follower reads everything after what it delivered. A notice
//!   published after that round trip is received; one published before it was committed before
//!   the read, so the read has it.
//! - **a slow consumer**: async-nats drops messages when a subscription's buffer
//!   (`subscription_capacity`) is full, and reports it; that is a reset too. (The server's own
//!   slow-consumer cut ends the connection: a reconnect.)
//! - **a gap**: the next notice of the conversation.
//!
//! Publishing never waits (see [`crate::bus`]): notices go through a bounded queue to one task
//! that publishes them in order. When the queue is full (NATS is down or slow), a notice is
//! dropped and its conversation remembered (the newest sequence number dropped, bounded by
//! `max_owed` conversations); once the queue has drained, the task publishes each remembered
//! one without its frame, so the other nodes read the missing range from the store even in a
//! conversation that goes quiet afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use conclave_proto::Conv;
use futures_util::{StreamExt, stream};
use tokio::sync::{Notify, mpsc};

use crate::bus::wire::{self, WireError};
use crate::bus::{
    Bus, BusCounts, BusStream, ClusterEvent, Commit, Counters, Incoming, PublishError, ResetReason,
};

/// Messages async-nats buffers per subscription before it drops them as a slow consumer.
pub const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 65_536;
/// Notices waiting to be published before new ones are dropped (and owed).
pub const DEFAULT_PUBLISH_QUEUE: usize = 16_384;
/// Conversations whose dropped notices are remembered and published again (without frames).
pub const DEFAULT_MAX_OWED: usize = 4096;
/// Resets waiting for the consumer; more are the same reset.
const RESET_QUEUE: usize = 16;
/// Longest cluster name (it is a subject token).
pub const MAX_CLUSTER_CHARS: usize = 32;

/// Where and how a node joins the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// `nats://HOST:PORT` (several separated by commas: async-nats tries them in turn).
    pub url: String,
    /// The cluster's name, the subjects' second token: `[a-z0-9_-]`, 1 to 32 characters.
    pub cluster: String,
    /// This node's name, on its notices.
    pub node: String,
    /// See [`DEFAULT_SUBSCRIPTION_CAPACITY`].
    pub subscription_capacity: usize,
    /// See [`DEFAULT_PUBLISH_QUEUE`].
    pub publish_queue: usize,
    /// See [`DEFAULT_MAX_OWED`].
    pub max_owed: usize,
    /// Commands async-nats buffers while it is disconnected (its `client_capacity`).
    pub client_capacity: usize,
    /// Time allowed for each connection attempt.
    pub connect_timeout_ms: u64,
    /// Longest pause between reconnection attempts (the first goes at once, the second after
    /// 50 ms, each next one 50 ms later).
    pub max_reconnect_delay_ms: u64,
    /// How often the client pings the server (a dead server is noticed after two).
    pub ping_interval_ms: u64,
    /// Longest wait for NATS to confirm the subscriptions (see [`confirm`]).
    pub confirm_timeout_ms: u64,
}

impl NatsConfig {
    /// The defaults for `url`, `cluster` and `node`.
    pub fn new(url: &str, cluster: &str, node: &str) -> Self {
        NatsConfig {
            url: url.to_string(),
            cluster: cluster.to_string(),
            node: node.to_string(),
            subscription_capacity: DEFAULT_SUBSCRIPTION_CAPACITY,
            publish_queue: DEFAULT_PUBLISH_QUEUE,
            max_owed: DEFAULT_MAX_OWED,
            client_capacity: 2048,
            connect_timeout_ms: 5_000,
            max_reconnect_delay_ms: 2_000,
            ping_interval_ms: 10_000,
            confirm_timeout_ms: 5_000,
        }
    }

    fn subject(&self, kind: &str) -> String {
        format!("conclave.{}.{kind}", self.cluster)
    }
}

/// Why a node could not join the bus.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(
        "the cluster name {0:?} is not usable: it must be 1 to {MAX_CLUSTER_CHARS} characters \
         of a-z, 0-9, '_' or '-'"
    )]
    BadCluster(String),
    #[error("the node name {0:?} is not usable: {1}")]
    BadNode(String, WireError),
    #[error("{0} must be above 0")]
    Zero(&'static str),
    #[error(
        "could not connect to NATS at {url}: {reason}. Is nats-server running there? \
         (Debian: apt-get install nats-server)"
    )]
    Connect { url: String, reason: String },
    #[error("NATS at {url} refused the subscription to {subject}: {reason}")]
    Subscribe {
        url: String,
        subject: String,
        reason: String,
    },
}

enum Outgoing {
    Commit(Bytes),
    Event(Bytes),
}

/// What the publisher task owes: conversations whose newest notices were dropped.
struct Owed {
    map: Mutex<HashMap<Conv, Commit>>,
    max: usize,
    wake: Notify,
}

/// A node on a NATS bus. Dropping it ends its publisher task (after what is queued) and its
/// subscriptions with the stream.
pub struct NatsBus {
    node: String,
    tx: mpsc::Sender<Outgoing>,
    owed: Arc<Owed>,
    counters: Arc<Counters>,
    incoming: Mutex<Option<BusStream>>,
}

fn check_cluster(cluster: &str) -> bool {
    !cluster.is_empty()
        && cluster.chars().count() <= MAX_CLUSTER_CHARS
        && cluster
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl NatsBus {
    /// Connects to NATS and subscribes; when it returns, the server has the subscriptions
    /// ([`confirm`]), so every notice published after it is received (or followed by a reset).
    pub async fn connect(cfg: NatsConfig) -> Result<NatsBus, NatsError> {
        if !check_cluster(&cfg.cluster) {
            return Err(NatsError::BadCluster(cfg.cluster));
        }
        wire::check_node(&cfg.node).map_err(|e| NatsError::BadNode(cfg.node.clone(), e))?;
        for (value, name) in [
            (cfg.subscription_capacity, "subscription_capacity"),
            (cfg.publish_queue, "publish_queue"),
            (cfg.client_capacity, "client_capacity"),
        ] {
            if value == 0 {
                return Err(NatsError::Zero(name));
            }
        }
        let counters = Arc::new(Counters::default());
        let (reset_tx, reset_rx) = mpsc::channel::<ResetReason>(RESET_QUEUE);
        let connected_before = Arc::new(AtomicBool::new(false));
        let max_delay = Duration::from_millis(cfg.max_reconnect_delay_ms);
        let node = cfg.node.clone();
        let client = ConnectOptions::new()
            .name(format!("conclave/{}/{}", cfg.cluster, cfg.node))
            .no_echo()
            .subscription_capacity(cfg.subscription_capacity)
            .client_capacity(cfg.client_capacity)
            .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .ping_interval(Duration::from_millis(cfg.ping_interval_ms.max(1)))
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| {
                // async-nats counts the first attempt of a series as 1: that one goes at once
                // (as its default does), the next ones back off.
                (Duration::from_millis(50) * attempts.saturating_sub(1).min(1000) as u32)
                    .min(max_delay)
            })
            .event_callback(move |event| {
                let reset_tx = reset_tx.clone();
                let connected_before = connected_before.clone();
                let node = node.clone();
                async move { on_event(&node, event, &reset_tx, &connected_before) }
            })
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| NatsError::Connect {
                url: cfg.url.clone(),
                reason: e.to_string(),
            })?;
        let subscribe = |subject: String| {
            let client = client.clone();
            let url = cfg.url.clone();
            async move {
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| NatsError::Subscribe {
                        url,
                        subject,
                        reason: e.to_string(),
                    })
            }
        };
        let commits = subscribe(cfg.subject("commit")).await?;
        let events = subscribe(cfg.subject("event")).await?;
        let confirm_subject = cfg.subject("confirm");
        let confirm_timeout = Duration::from_millis(cfg.confirm_timeout_ms.max(1));
        confirm(&client, &confirm_subject, confirm_timeout)
            .await
            .map_err(|reason| NatsError::Connect {
                url: cfg.url.clone(),
                reason: format!("the subscriptions were not confirmed: {reason}"),
            })?;

        let commits = {
            let counters = counters.clone();
            commits.filter_map(move |m| {
                let decoded = wire::decode_commit(&m.payload);
                std::future::ready(received(&counters, "commit", decoded, |(node, commit)| {
                    Incoming::Commit { node, commit }
                }))
            })
        };
        let events = {
            let counters = counters.clone();
            events.filter_map(move |m| {
                let decoded = wire::decode_event(&m.payload);
                std::future::ready(received(&counters, "event", decoded, |(node, event)| {
                    Incoming::Event { node, event }
                }))
            })
        };
        let resets = {
            let client = client.clone();
            let counters = counters.clone();
            stream::unfold(reset_rx, move |mut rx| {
                let client = client.clone();
                let counters = counters.clone();
                let confirm_subject = confirm_subject.clone();
                async move {
                    let reason = rx.recv().await?;
                    if reason == ResetReason::Reconnected {
                        // The SUBs are re-sent before anything queued after the reconnect.
                        if let Err(reason) =
                            confirm(&client, &confirm_subject, confirm_timeout).await
                        {
                            tracing::warn!(
                                %reason,
                                "NATS did not confirm the subscriptions after a reconnect"
                            )
                        }
                    }
                    Counters::add(&counters.resets);
                    Some((Incoming::Reset(reason), rx))
                }
            })
        };
        let incoming: BusStream = Box::pin(stream::select(resets, stream::select(commits, events)));

        let owed = Arc::new(Owed {
            map: Mutex::new(HashMap::new()),
            max: cfg.max_owed,
            wake: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(cfg.publish_queue);
        tokio::spawn(publisher(
            client,
            cfg.subject("commit"),
            cfg.subject("event"),
            cfg.node.clone(),
            rx,
            owed.clone(),
            counters.clone(),
        ));
        Ok(NatsBus {
            node: cfg.node,
            tx,
            owed,
            counters,
            incoming: Mutex::new(Some(incoming)),
        })
    }
}

/// Waits until the server has processed everything this connection sent before (the SUBs).
///
/// `Client::flush` only writes the socket: the server may still route another connection's
/// message before it reads our SUB, and core NATS drops what has no subscriber then. The server
/// reads one connection's commands in order, so the answer to a request sent after the SUBs
/// (nobody subscribes to the subject: the server's own "no responders" status) proves they are
/// in place.
///
/// No answer at all within `timeout` is not an error: something subscribes to the subject and
/// stays silent (an operator's `nats sub 'conclave.>'`), or the account may not publish it.
/// The node then goes on without the proof, with a warning that says so; a notice lost in that
/// moment is read from the store at the conversation's next one, as any lost notice is.
async fn confirm(
    client: &async_nats::Client,
    subject: &str,
    timeout: Duration,
) -> Result<(), String> {
    use async_nats::client::RequestErrorKind;
    let request = async_nats::Request::new().timeout(Some(timeout));
    match client.send_request(subject.to_string(), request).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::TimedOut => {
            tracing::warn!(
                subject,
                ?timeout,
                "NATS did not answer the subscription check (a subscriber on this subject that \
                 never replies, or an account that may not publish it); going on without it. \
                 Let nothing subscribe to it, and allow publishing it, for the check to work"
            );
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// async-nats's connection events: a reconnect or a slow consumer is a reset.
fn on_event(
    node: &str,
    event: Event,
    resets: &mpsc::Sender<ResetReason>,
    connected_before: &AtomicBool,
) {
    match event {
        Event::Connected => {
            if connected_before.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    node,
                    "NATS connection is back; resynchronising from the store"
                );
                // Full: a reset is already waiting, and it comes after this point.
                let _ = resets.try_send(ResetReason::Reconnected);
            }
        }
        Event::Disconnected => {
            tracing::warn!(
                node,
                "NATS connection lost; reconnecting (notices are read from the store meanwhile)"
            )
        }
        Event::SlowConsumer(sid) => {
            tracing::warn!(
                node,
                sid,
                "NATS dropped notices for this slow node; resynchronising"
            );
            let _ = resets.try_send(ResetReason::SlowConsumer);
        }
        Event::LameDuckMode => tracing::info!(node, "the NATS server is shutting down"),
        Event::ServerError(e) => tracing::warn!(node, error = %e, "NATS server error"),
        Event::ClientError(e) => tracing::warn!(node, error = %e, "NATS client error"),
        Event::Draining | Event::Closed => tracing::info!(node, %event, "NATS connection"),
    }
}

/// A decoded payload as the stream's item; an undecodable one is counted, logged and skipped.
fn received<T>(
    counters: &Counters,
    kind: &str,
    decoded: Result<T, WireError>,
    into: impl FnOnce(T) -> Incoming,
) -> Option<Incoming> {
    match decoded {
        Ok(t) => {
            Counters::add(&counters.received);
            Some(into(t))
        }
        Err(e) => {
            Counters::add(&counters.malformed);
            tracing::warn!(kind, error = %e, "dropped a malformed notice from the bus");
            None
        }
    }
}

/// Publishes the queue in order, then what is owed, until the bus is dropped.
async fn publisher(
    client: async_nats::Client,
    commit_subject: String,
    event_subject: String,
    node: String,
    mut rx: mpsc::Receiver<Outgoing>,
    owed: Arc<Owed>,
    counters: Arc<Counters>,
) {
    let mut failing = false;
    let publish = async |out: Outgoing, failing: &mut bool| {
        let (subject, payload) = match out {
            Outgoing::Commit(p) => (commit_subject.clone(), p),
            Outgoing::Event(p) => (event_subject.clone(), p),
        };
        match client.publish(subject, payload).await {
            Ok(()) => {
                if *failing {
                    tracing::info!("publishing to NATS works again");
                    *failing = false;
                }
            }
            Err(e) => {
                Counters::add(&counters.publish_dropped);
                if !*failing {
                    tracing::warn!(error = %e, "publishing to NATS failed; notices are dropped and read from the store");
                    *failing = true;
                }
            }
        }
    };
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(out) => publish(out, &mut failing).await,
                None => break,
            },
            () = owed.wake.notified() => {}
        }
        if !rx.is_empty() {
            continue;
        }
        let due: Vec<Commit> = match owed.map.lock() {
            Ok(mut m) => m.drain().map(|(_, c)| c).collect(),
            Err(p) => p.into_inner().drain().map(|(_, c)| c).collect(),
        };
        for c in due {
            match wire::encode_commit(&node, &c) {
                Ok(p) => publish(Outgoing::Commit(p), &mut failing).await,
                Err(e) => tracing::warn!(error = %e, "an owed notice could not be encoded"),
            }
        }
    }
}

impl NatsBus {
    fn queue(&self, out: Outgoing) -> Result<(), PublishError> {
        match self.tx.try_send(out) {
            Ok(()) => {
                Counters::add(&self.counters.published);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                Counters::add(&self.counters.publish_dropped);
                Err(PublishError::Backlog)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PublishError::Closed),
        }
    }

    /// Remembers a dropped commit (its conversation's newest), to be published without its
    /// frame once the queue drains.
    fn owe(&self, commit: Commit) {
        let mut map = match self.owed.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let newer = map.get(&commit.conv).is_none_or(|c| c.seq < commit.seq);
        if newer && (map.len() < self.owed.max || map.contains_key(&commit.conv)) {
            map.insert(
                commit.conv.clone(),
                Commit {
                    frame: None,
                    ..commit
                },
            );
        }
        drop(map);
        self.owed.wake.notify_one();
    }
}

impl Bus for NatsBus {
    fn node(&self) -> &str {
        &self.node
    }

    fn publish_commit(&self, commit: Commit) -> Result<(), PublishError> {
        let payload = wire::encode_commit(&self.node, &commit)
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        let queued = self.queue(Outgoing::Commit(payload));
        if queued == Err(PublishError::Backlog) {
            self.owe(commit);
        }
        queued
    }

    fn publish_event(&self, event: ClusterEvent) -> Result<(), PublishError> {
        let payload = wire::encode_event(&self.node, &event)
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        self.queue(Outgoing::Event(payload))
    }

    fn take_incoming(&self) -> Option<BusStream> {
        match self.incoming.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    fn counts(&self) -> BusCounts {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_subject_tokens() {
        assert!(check_cluster("prod-1_a"));
        for bad in ["", "a.b", "a b", "A", "*", ">", &"x".repeat(33)] {
            assert!(!check_cluster(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn bad_settings_are_refused_before_connecting() {
        let cfg = NatsConfig::new("nats://127.0.0.1:1", "a.b", "n1");
        assert!(matches!(
            NatsBus::connect(cfg).await,
            Err(NatsError::BadCluster(_))
        ));
        let mut cfg = NatsConfig::new("nats://127.0.0.1:1", "c", "n1");
        cfg.publish_queue = 0;
        assert!(matches!(
            NatsBus::connect(cfg).await,
            Err(NatsError::Zero("publish_queue"))
        ));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error() {
        // Port 1 on loopback: nothing listens there.
        let mut cfg = NatsConfig::new("nats://127.0.0.1:1", "c", "n1");
        cfg.connect_timeout_ms = 2_000;
        let err = match NatsBus::connect(cfg).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("connected to nothing"),
        };
        assert!(
            err.contains("127.0.0.1:1") && err.contains("nats-server"),
            "{err}"
        );
    }
}
