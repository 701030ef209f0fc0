//! Fan-out between the nodes of a cluster (issue 24): what one node tells the others after a
//! commit, and the cluster-wide events (presence, kicks, bans, announcements, rooms, accounts).
//!
//! The store (PostgreSQL in cluster mode) is the truth; the bus only carries *notices* so that
//! a node can fan a message out to its own connections without a store read in the common case.
//! Delivery over the bus is at most once: a notice may be lost (a broker restart, a slow
//! consumer, a full publish queue), duplicated or reordered with respect to another
//! conversation. [`Follower`] turns that into exactly once and in order per conversation: it
//! notices a gap in the sequence numbers and asks for the missing range from the store, and
//! after an [`Incoming::Reset`] it asks for everything after what it delivered.
//!
//! # The interface, and why it is object-safe and synchronous
//!
//! The listener picks the implementation at start (`--bus nats://…`, or none: [`LocalBus`] for
//! one node), so the rest of the server holds an `Arc<dyn Bus>`: generic code would make
//! `Shared` and every command generic over the bus for no gain (a publish is one virtual call
//! beside a database commit). Publishing never waits: the dispatcher that calls it is one task
//! fanning out every commit in order, and a broker that is slow or down must not hold up local
//! delivery. So [`Bus::publish_commit`] and [`Bus::publish_event`] queue the notice (bounded)
//! and return at once; a full queue drops it, counts it, and says so, and the other nodes read
//! the message from the store when they notice the gap. No trait method is `async`, so the
//! trait needs no boxed futures; the receiving side is one stream per node
//! ([`Bus::take_incoming`]), taken by the node's one fan-out task, so every notice of a
//! conversation reaches one [`Follower`] in the order the bus delivered it.
//!
//! A node never receives its own notices (it fanned them out itself).
//!
//! # Implementations
//! - [`LocalBus`] (`bus::local`): nodes in one process over a tokio broadcast channel; one
//!   node alone, and tests. A receiver that falls behind the channel gets [`Incoming::Reset`].
//! - `crate::bus_nats::NatsBus`: NATS core subjects `conclave.<cluster>.commit` and
//!   `conclave.<cluster>.event`, reconnects handled by async-nats, a reset after each reconnect
//!   and each slow-consumer report.
//!
//! The wire encoding (`bus::wire`) is versioned: one version byte, then postcard; a commit's
//! frame follows its header as the exact bytes an outbox queues, so a receiving node pushes a
//! slice of the broker's buffer to its connections without copying or re-encoding it (after
//! checking, once, that it is the message the header names).

pub mod follower;
pub mod local;
pub mod wire;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use conclave_proto::Conv;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

pub use follower::{Fetch, FetchId, Follower, FollowerLimits, Sequenced, Step};
pub use local::{LocalBus, LocalCluster};

/// A commit's frame travels inline up to this size; a larger one is left out and the receiving
/// nodes read the message from the store. A message of the default `max_message_bytes`
/// (64 KiB) fits, and a notice stays well below NATS's default `max_payload` of 1 MiB.
pub const DEFAULT_MAX_INLINE_FRAME_BYTES: usize = 128 * 1024;
/// The largest encoded notice a node accepts (NATS's default `max_payload`); anything larger is
/// refused before it is decoded.
pub const MAX_NOTICE_BYTES: usize = 1024 * 1024;
/// Most names in a notice's `except` list or a direct conversation's participants (the
/// server's `max_recipients` is 100 by default; this only bounds what a decoder accepts).
pub const MAX_NAMES: usize = 1024;
/// Longest node name, in bytes.
pub const MAX_NODE_BYTES: usize = 64;
/// Longest message id, in bytes (a UUID's text is 36).
pub const MAX_MSG_ID_BYTES: usize = 64;
/// Longest kick or ban reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest announcement, in bytes.
pub const MAX_ANNOUNCE_BYTES: usize = conclave_proto::DEFAULT_MAX_MESSAGE_BYTES;

/// A message committed on one node, as the other nodes need it for fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub conv: Conv,
    /// The message's per-conversation sequence number (gap-free, from 1).
    pub seq: u64,
    pub msg_id: String,
    /// Room members who must not receive it (blockcast).
    pub except: Vec<String>,
    /// The `ServerFrame::Event(Event::Message)` exactly as an outbox queues it (4-byte length,
    /// then the body), or `None` when it was larger than the inline limit: the receiver then
    /// reads the message from the store.
    pub frame: Option<Bytes>,
}

impl Commit {
    /// A notice for `msg` with its outbox-ready `frame`, left out when longer than
    /// `max_inline_frame_bytes`.
    pub fn new(
        msg: &conclave_proto::Message,
        except: &[String],
        frame: Bytes,
        max_inline_frame_bytes: usize,
    ) -> Commit {
        Commit {
            conv: msg.conv.clone(),
            seq: msg.seq,
            msg_id: msg.msg_id.clone(),
            except: except.to_vec(),
            frame: (frame.len() <= max_inline_frame_bytes).then_some(frame),
        }
    }
}

impl Sequenced for Commit {
    fn conv(&self) -> &Conv {
        &self.conv
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn complete(&self) -> bool {
        self.frame.is_some()
    }
}

/// What acts across the cluster besides messages. Every node applies these to its own
/// connections, hub, guard and presence (`cluster_events::apply`); none of them is stored by the
/// bus (the store keeps what must survive).
///
/// Safe for any input: an event never *grants* anything by its content. What takes away
/// (kicks, bans, closed connections) and what is only shown (announcements, notices, topics,
/// names) is applied as it comes; what could grant (a room's members, invitations and
/// password, an account and its admin role, a lifted ban, the IP lists) is only a hint to read
/// the store again (`RoomChanged`, `AccountChanged`, `BansChanged`, `IpRulesChanged`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterEvent {
    /// `user`'s first connection on the publishing node opened (`online`) or its last one
    /// closed (`!online`): the user is online while any node says so.
    Presence { user: String, online: bool },
    /// The publishing node's online users (at most [`MAX_NAMES`] per event: a node with more
    /// sends several), every heartbeat interval. Each entry holds for `ttl_ms` (bounded by the
    /// receiver to [`MAX_PRESENCE_TTL_MS`]); one not repeated in time expires, so the users of
    /// a node that died go offline everywhere after at most that long. `ask`: the publisher
    /// lost track (it just started, or its bus was reset) and asks every node to send its own
    /// list now.
    Online {
        users: Vec<String>,
        ttl_ms: u64,
        ask: bool,
    },
    /// The publishing node is stopping: its users are not online there any more.
    Leaving,
    /// `user` was removed from `room` (by an operator, the owner, an admin, or a vote, `by`):
    /// its connections on every node leave the room; a vote-kick keeps it out until
    /// `banned_until_ms`.
    Kicked {
        room: String,
        user: String,
        by: String,
        reason: String,
        banned_until_ms: Option<i64>,
    },
    /// Every connection of `user` closes (kicked off the server by `by`; it may reconnect).
    KickedOff {
        user: String,
        by: String,
        reason: String,
    },
    /// The account was banned until `until_ms` (`None`: until lifted): every node's guard
    /// refuses it and every node closes its connections.
    Banned {
        user: String,
        until_ms: Option<i64>,
        by: String,
        reason: String,
    },
    /// An address range was banned until `until_ms` (`None`: until lifted): every node's guard
    /// refuses it and closes its connections from there.
    AddressBanned {
        net: ipnet::IpNet,
        until_ms: Option<i64>,
        by: String,
        reason: String,
    },
    /// A ban was lifted: nodes read the bans from the store again.
    BansChanged,
    /// The stored allow/deny lists changed: nodes read them again (and close connections the
    /// new lists refuse).
    IpRulesChanged,
    /// An operator's or admin's announcement to everyone online.
    Announce { from: String, text: String },
    /// A room was created or its members, invitations, owner, password or settings changed in
    /// the store: every node reads it again, then shows `notice` (a join, a part, an
    /// invitation) to the connections there of `to`, or when `to` is empty of the room's
    /// members before and after the change. Shown after the read, so whoever sees it can act
    /// on it on that node at once (join a room they were invited to).
    RoomChanged {
        room: String,
        notice: Option<conclave_proto::Event>,
        to: Vec<String>,
    },
    /// An account was created, deleted, or its admin role changed: every node reads it again
    /// (a deleted one's connections close).
    AccountChanged { user: String },
    /// A vote to kick `target` out of `room`, cast on the publishing node at `at_ms`: every
    /// node counts it (if `voter` and `target` are members there and vote-kick is on), so the
    /// tally is the cluster's; the node where the threshold is reached removes the target.
    Vote {
        room: String,
        target: String,
        voter: String,
        at_ms: i64,
    },
    /// A room's topic (`""`: cleared), shown to its members.
    Topic {
        room: String,
        topic: String,
        by: String,
    },
    /// A display name (`None`: cleared), shown to the user's peers.
    DisplayName { user: String, name: Option<String> },
    /// An away message (`None`: back), shown to the user's peers.
    Away { user: String, text: Option<String> },
    /// An event for some connections on every node: file offers and their answers,
    /// invitations, typing, read markers, vote counts, a user's devices waiting for approval
    /// and their transfers. Only the kinds [`notice_allowed`]
    /// names travel (never a message, a disconnect or anything that changes a session).
    Notify {
        to: Audience,
        event: conclave_proto::Event,
    },
    /// Whether `user`'s read markers are shown to others changed: `false` is applied as it
    /// comes (it only hides); `true` makes nodes read the setting from the store.
    ReadsShared { user: String, share: bool },
    /// A file's record or recipients' states changed (answered, cancelled, completed): nodes
    /// forget what they cached of the file and of these recipients.
    FileChanged { file_id: String, users: Vec<String> },
    /// An end-to-end group was made for conversation `conv` (its storage key, `r:ROOM` or
    /// `d:A,B,…`): a node that has none reads it from the store (its commits are read under
    /// the group's cluster lock when it is next used).
    E2eeGroup { conv: String },
    /// Welcomes were stored for these devices (user, device, the Welcome's id): each node
    /// reads them from the store for its connections of these users.
    Welcomes {
        welcomes: Vec<(String, String, u64)>,
    },
}

/// Who on a node receives a [`ClusterEvent::Notify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audience {
    /// Every connection of these users.
    Users(Vec<String>),
    /// The caught-up connections of the room's members, minus `except`.
    Room { room: String, except: Vec<String> },
}

/// The protocol events a [`ClusterEvent::Notify`] may carry: notices that are only shown.
pub fn notice_allowed(event: &conclave_proto::Event) -> bool {
    use conclave_proto::Event as E;
    matches!(
        event,
        E::Join { .. }
            | E::Part { .. }
            | E::Invited { .. }
            | E::VoteKick { .. }
            | E::FileOffer(_)
            | E::FileReady { .. }
            | E::FileRelayWanted { .. }
            | E::FileDeclined { .. }
            | E::FileReceived { .. }
            | E::FileCancelled { .. }
            | E::Typing { .. }
            | E::Read { .. }
            | E::DeviceWaiting(_)
            | E::TransferReady { .. }
    )
}

/// The longest a node's word on its online users holds ([`ClusterEvent::Online`]'s `ttl_ms`
/// is bounded to it on receipt).
pub const MAX_PRESENCE_TTL_MS: u64 = 10 * 60 * 1000;

/// What a node receives from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Commit {
        node: String,
        commit: Commit,
    },
    Event {
        node: String,
        event: ClusterEvent,
    },
    /// Notices may have been lost: resynchronise every followed conversation from the store
    /// ([`Follower::reset`]).
    Reset(ResetReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The connection to the broker was lost and is back.
    Reconnected,
    /// The broker client dropped notices because this node read them too slowly.
    SlowConsumer,
    /// The in-process channel overwrote this many notices before this node read them.
    Lagged(u64),
}

/// A node's stream of what the other nodes published.
pub type BusStream = Pin<Box<dyn Stream<Item = Incoming> + Send>>;

/// Why a notice was not queued. It is lost for the bus only: the other nodes find the message in
/// the store when they notice the gap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error(
        "the bus's publish queue is full (the broker is slow or unreachable); the notice was \
         dropped and other nodes will read the message from the store"
    )]
    Backlog,
    #[error("the bus is closed; nothing more can be published")]
    Closed,
    #[error("the notice cannot be published: {0}")]
    Invalid(String),
}

/// Cross-node fan-out: see the module documentation.
pub trait Bus: Send + Sync {
    /// This node's name, as other nodes see it on its notices.
    fn node(&self) -> &str;
    /// Queues a commit notice for the other nodes; never waits.
    fn publish_commit(&self, commit: Commit) -> Result<(), PublishError>;
    /// Queues a cluster-wide event for the other nodes; never waits.
    fn publish_event(&self, event: ClusterEvent) -> Result<(), PublishError>;
    /// The stream of the other nodes' notices, from when the bus was made. `None` after the
    /// first call: a node has one consumer.
    fn take_incoming(&self) -> Option<BusStream>;
    /// What the bus counted so far.
    fn counts(&self) -> BusCounts;
}

/// What a bus counted since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusCounts {
    /// Notices queued for the broker.
    pub published: u64,
    /// Notices dropped because the publish queue was full, or refused by the broker.
    pub publish_dropped: u64,
    /// Notices received from other nodes and decoded.
    pub received: u64,
    /// Received payloads that were not a valid notice (dropped; logged).
    pub malformed: u64,
    /// Resets reported to the consumer.
    pub resets: u64,
}

/// The counters behind [`BusCounts`], shared by a bus and its stream.
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub publish_dropped: AtomicU64,
    pub received: AtomicU64,
    pub malformed: AtomicU64,
    pub resets: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> BusCounts {
        BusCounts {
            published: self.published.load(Ordering::Relaxed),
            publish_dropped: self.publish_dropped.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
        }
    }
}
