//! The async client: one logged-in session, shared by cheap [`Client`] handles, that survives
//! the connection underneath dropping.
//!
//! # Tasks
//!
//! Each connection has two tasks (`link`). The reader decodes frames, hands each reply to the
//! request that waits for it (by id), passes message events through the cursors (dropping
//! duplicates, see [`crate::cursor`]) and pushes events into one bounded channel ([`Events`]).
//! The writer drains a bounded queue of encoded frames into the TLS stream, flushing when the
//! queue runs empty (so a burst of sends becomes few TLS records), and sends a ping when the
//! connection has been idle. A reader that hears nothing for twice the keep-alive interval plus the
//! handshake timeout declares the connection dead.
//!
//! One supervisor task per client (`supervisor`) owns the connection's life: it sends the
//! periodic acknowledgements, and when a connection ends it decides whether that is final and,
//! if not, reconnects with back-off ([`crate::Reconnect`]) and logs in again with `resume` set
//! to the cursors, so the server sends exactly what was missed.
//!
//! # Which drops are final
//!
//! Final: [`Client::close`], [`Client::quit`], dropping every handle; the server's `Quit`,
//! `Kicked`, `Banned`, `Flooding`, `Malformed` or `TooLarge`; a frame from the server this client cannot read or
//! that is over its limit (a catch-up would send it again); and, when reconnecting, a login
//! the server refuses (wrong password, ...) or a certificate that is no longer trusted. Not
//! final: I/O errors, end of stream, a dead connection, and the server's `Shutdown`,
//! `SlowConsumer`, `Timeout` or `Other`. The first [`Client::connect`] does not retry: its
//! errors go to the caller.
//!
//! # Requests across a reconnect
//!
//! While the client is reconnecting, new requests wait for the connection (bounded by the
//! request timeout, then [`ClientError::NotConnected`]). Requests already sent whose reply had
//! not come when the connection dropped:
//! - sends (always with an idempotency key; one is added when missing) and requests that only
//!   read or are idempotent (`History`, `Search`, `Rooms`, `Who`, `Ping`, `Ack`) are sent
//!   again on the new connection, first and in their original order, and their callers get
//!   the eventual reply (a repeated send answers `duplicate: true` with the original message
//!   id and seq);
//! - the others (`Join`, `Part`, `CreateRoom`, `Invite`, `Announce`, `Kick`, ...) fail with
//!   [`ClientError::Disconnected`]: they may or may not have been carried out, and repeating
//!   them blindly could do it twice or fail confusingly.
//!
//! A send whose reply was lost but which the server had stored comes back in the catch-up as a
//! message from this account, before its `duplicate: true` receipt. The reader holds the
//! events back until the sends sent again are answered, and drops those copies, so the
//! application learns of its own send once, by the receipt, as always.
//!
//! Rule of thumb for every wait: bounded by the request timeout, the handshake timeout, or the
//! reconnect policy; never by the server's good will.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conclave_proto::{
    Body, ClientFrame, Conv, ConvRef, Cursor, DisconnectReason, Event, Message, Reply, Request,
    RequestId, RoomInfo, Target, UserPresence, encode_client, names,
};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::address::{ServerAddr, ServerList};
use crate::cursor::{Cursors, MAX_CURSORS_PER_REQUEST};
use crate::error::ClientError;
use crate::options::ConnectOptions;
use crate::trust::PinOutcome;

mod link;
mod supervisor;

use link::{Ended, Live, Opened, open, start};
use supervisor::supervise;

type Stream = TlsStream<TcpStream>;
type FramesIn = FramedRead<ReadHalf<Stream>, LengthDelimitedCodec>;
type FramesOut = FramedWrite<WriteHalf<Stream>, LengthDelimitedCodec>;

/// How long the last event ([`ClientEvent::Disconnected`] with `reconnecting: false`) may
/// wait for room in a full event queue before it is given up.
const FINAL_EVENT_WAIT: Duration = Duration::from_secs(5);
/// Most events the server may send before answering the login (it sends none today).
const MAX_EARLY_EVENTS: usize = 1024;
/// Most events held back after a reconnect while sends sent again await their receipts
/// (see `Reader::hold_or_push`).
const MAX_HELD_EVENTS: usize = 4096;
/// File events buffered for transfers in progress.
const FILE_EVENT_QUEUE: usize = 256;
/// Most file offers remembered for [`Client::accept_file`].
pub(crate) const MAX_REMEMBERED_OFFERS: usize = 1024;

/// Most acknowledgement requests [`Client::flush_acks`] sends in one call.
const MAX_FLUSH_ROUNDS: usize = 64;

/// What the server told us at login, and how the connection was secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Canonical account name.
    pub user: String,
    pub admin: bool,
    /// Rooms the account is a member of.
    pub rooms: Vec<String>,
    /// `host:port` as connected to: one of the `--server` list (see [`Client::server`] for
    /// the name the list is remembered by).
    pub server: String,
    /// SHA-256 of the server's certificate (canonical hex).
    pub fingerprint: String,
    /// How the certificate came to be trusted.
    pub trust: PinOutcome,
    /// e.g. `TLS 1.3`.
    pub tls_version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// The TLS key exchange group, e.g. `X25519MLKEM768` (post-quantum hybrid) or `X25519`
    /// (classical; see [`crate::is_post_quantum`]).
    pub key_exchange: String,
}

/// The result of a successful send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub msg_id: String,
    pub seq: u64,
    pub ts_ms: i64,
    /// True when the server had already stored a send with this idempotency key (for example
    /// when the send was repeated after a reconnect).
    pub duplicate: bool,
}

/// What [`Events`] yields: the server's events, and what happened to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// An event pushed by the server. Message events come once each, in sequence order per
    /// conversation (see [`crate::cursor`]), and never for this client's own sends (their
    /// receipt says it all). The server's [`Event::Disconnect`] is reported as
    /// [`ClientEvent::Disconnected`] instead.
    Server(Event),
    /// The connection ended. With `reconnecting`, the client is trying to get it back
    /// ([`ClientEvent::Reconnected`] follows when it does, or another `Disconnected` without
    /// `reconnecting` when it gives up). Without, this is the last event.
    Disconnected {
        reason: DisconnectReason,
        message: String,
        reconnecting: bool,
    },
    /// Logged in again after a drop and caught up: the `missed` messages that came while
    /// disconnected were delivered just before this event. `truncated` when more were missed
    /// than the server sends at login (page back with history for the rest). `server` is the
    /// address now connected to (with several `--server` addresses, often not the one that
    /// dropped).
    Reconnected {
        missed: u32,
        truncated: bool,
        server: String,
    },
    /// End-to-end encryption news (after [`Client::enable_e2ee`]).
    E2ee(crate::e2ee::E2eeNotice),
}

/// A handle to one session. Clone it freely; all clones share it. The session ends when
/// [`Client::close`] or [`Client::quit`] is called, when the connection ends for a final
/// reason (see the module documentation), or when the last handle is dropped.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Closes the session when the last [`Client`] goes.
struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.close.cancel();
    }
}

/// State shared by the handles, the supervisor and the connection tasks.
pub(crate) struct Core {
    opts: ConnectOptions,
    /// Every address of `--server`, in order; connections go to one at a time.
    servers: ServerList,
    /// The position in `servers` of the current connection (of the last one while
    /// reconnecting).
    current: std::sync::atomic::AtomicUsize,
    /// Canonical account name (for the conversation of direct sends).
    user: String,
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Bumped whenever the connection comes or goes, for requests waiting for one.
    link_changed: watch::Sender<()>,
    /// Bounds the requests awaiting a reply.
    slots: Arc<Semaphore>,
    /// Cancelled to end the session.
    close: CancellationToken,
    ack_in_flight: AtomicBool,
    /// File offers seen (by id), for [`Client::accept_file`]; bounded.
    offers: Mutex<HashMap<String, conclave_proto::FileOffer>>,
    /// While reconnecting: when the next attempt starts (milliseconds since the Unix epoch).
    next_attempt_ms: Mutex<Option<i64>>,
    /// File events that transfers in progress wait for (`FileReady`, `FileRelayWanted`).
    file_events: tokio::sync::broadcast::Sender<Event>,
    /// This client's sends still under way, by file id: cancelled by [`Client::cancel_file`].
    pub(crate) sending: Mutex<HashMap<String, CancellationToken>>,
    /// End-to-end encryption, once [`Client::enable_e2ee`] turned it on.
    pub(crate) secure: std::sync::OnceLock<Arc<crate::e2ee::Secure>>,
    /// The away message this session set ([`Client::away`]): the server forgets it when the
    /// account's last connection ends, so it is set again after a reconnect.
    pub(crate) away: Mutex<Option<String>>,
}

impl Core {
    pub(crate) fn event_queue_len(&self) -> usize {
        self.opts.event_queue_len.max(1)
    }

    /// The position in the `--server` list of the current (or last) connection.
    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    fn connected_addr(&self) -> &ServerAddr {
        self.servers.get(self.current_index())
    }
}

/// The first connection: each address in order, once, until one logs in (see
/// [`Client::connect`]).
async fn open_first(
    servers: &ServerList,
    opts: &ConnectOptions,
    id: RequestId,
    frame: Bytes,
) -> Result<Opened, ClientError> {
    let mut failures = Vec::new();
    let mut last = None;
    for index in 0..servers.len() {
        let addr = servers.get(index);
        match open(servers, index, opts, id, frame.clone()).await {
            Ok(opened) => {
                if index > 0 {
                    tracing::info!(server = %addr, tried = index, "connected to a later address");
                }
                return Ok(opened);
            }
            // Another node would say the same (the same accounts, the same certificate).
            Err(e) if supervisor::attempt_is_final(&e) => return Err(e),
            Err(e) => {
                tracing::info!(server = %addr, error = %e, "could not connect; trying the next address");
                failures.push(crate::error::naming(addr, &e));
                last = Some(e);
            }
        }
    }
    match last {
        Some(e) if servers.len() == 1 => Err(e),
        _ => Err(ClientError::NoServer { failures }),
    }
}

/// A handle that does not keep the session open (for tasks that serve it).
pub(crate) struct WeakClient(std::sync::Weak<Handle>);

impl WeakClient {
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|handle| Client { handle })
    }
}

struct State {
    /// The connection requests go to, while there is one.
    link: Option<Link>,
    /// Numbers the connections.
    generation: u64,
    /// Set once when the session ends: why.
    closed: Option<(DisconnectReason, String)>,
    /// Requests awaiting a reply.
    pending: HashMap<RequestId, Pending>,
    cursors: Cursors,
    /// [`Client::quit`] was called: the end of this connection is final.
    quitting: bool,
}

struct Link {
    generation: u64,
    /// Encoded frames for the writer task.
    outbound: mpsc::Sender<Bytes>,
}

struct Pending {
    tx: oneshot::Sender<Result<Reply, ClientError>>,
    /// The connection it was sent on.
    generation: u64,
    /// The encoded frame, kept for requests that are sent again after a reconnect.
    resend: Option<Bytes>,
    /// For sends: the conversation, so the receipt's seq reaches the cursors.
    conv: Option<Conv>,
}

impl Core {
    fn set_next_attempt(&self, at: Option<Duration>) {
        let ms = at.map(|d| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_millis() as i64)
                .unwrap_or(0);
            now + d.as_millis() as i64
        });
        *self
            .next_attempt_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = ms;
    }

    /// Remembers an offer, and tells transfers waiting for file events.
    fn on_file_event(&self, event: &Event) {
        match event {
            Event::FileOffer(offer) => {
                let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
                if offers.len() >= MAX_REMEMBERED_OFFERS {
                    offers.clear();
                }
                offers.insert(offer.file_id.clone(), (**offer).clone());
            }
            Event::FileReady { .. }
            | Event::FileRelayWanted { .. }
            | Event::FileDeclined { .. }
            | Event::FileCancelled { .. } => {
                let _ = self.file_events.send(event.clone());
            }
            _ => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections only move values in and out; a panic in one cannot leave the
        // state half-updated, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn wake(&self) {
        self.link_changed.send_replace(());
    }

    fn closed_error(&self) -> ClientError {
        match &self.lock().closed {
            Some((reason, message)) => ClientError::disconnected(*reason, message.clone()),
            None => ClientError::disconnected(DisconnectReason::Other, "the connection is closed"),
        }
    }

    async fn submit(self: &Arc<Self>, req: Request) -> Result<PendingReply, ClientError> {
        let timeout = self.opts.request_timeout;
        let seconds = timeout.as_secs();
        let deadline = tokio::time::Instant::now() + timeout;
        let slot = tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| ClientError::Timeout { seconds })?
            .map_err(|_| self.closed_error())?;

        let req = with_idempotency_key(req);
        if let Request::Away { text } = &req {
            // Set again after each reconnect of this session: the server forgets it when the
            // account goes offline.
            *self.away.lock().unwrap_or_else(|e| e.into_inner()) = text.clone();
        }
        let conv = match &req {
            Request::Send { target, .. } => send_conv(target, &self.user),
            _ => None,
        };
        let resendable = is_resendable(&req);
        let id = self.next_id();
        let bytes = Bytes::from(encode_client(&ClientFrame { id, req }));
        if bytes.len() > self.opts.max_frame_bytes {
            return Err(ClientError::TooLarge {
                bytes: bytes.len(),
                max: self.opts.max_frame_bytes,
            });
        }
        let mut changed = self.link_changed.subscribe();
        let (outbound, rx) = loop {
            {
                let mut state = self.lock();
                if let Some((reason, message)) = &state.closed {
                    return Err(ClientError::disconnected(*reason, message.clone()));
                }
                if let Some(link) = &state.link {
                    let outbound = link.outbound.clone();
                    let (tx, rx) = oneshot::channel();
                    let pending = Pending {
                        tx,
                        generation: link.generation,
                        resend: resendable.then(|| bytes.clone()),
                        conv: conv.clone(),
                    };
                    state.pending.insert(id, pending);
                    break (outbound, rx);
                }
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Err(_) => return Err(ClientError::NotConnected { seconds }),
                Ok(Err(_)) => return Err(self.closed_error()),
                Ok(Ok(())) => {}
            }
        };
        let guard = PendingGuard {
            core: self.clone(),
            id,
            _slot: slot,
        };
        // If the connection ends before the frame is written, the supervisor sends it again
        // or fails it (the entry is registered), so a closed queue is not an error here.
        if tokio::time::timeout_at(deadline, outbound.send(bytes))
            .await
            .is_err()
        {
            return Err(ClientError::Timeout { seconds });
        }
        Ok(PendingReply {
            rx,
            request_timeout: timeout,
            core: self.clone(),
            _guard: guard,
        })
    }

    async fn request(self: &Arc<Self>, req: Request) -> Result<Reply, ClientError> {
        self.submit(req).await?.reply().await
    }

    /// Sends the acknowledgements that are due, unless one is on its way.
    fn spawn_ack(self: &Arc<Self>) {
        if self.ack_in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let due = {
            let mut state = self.lock();
            if state.link.is_none() || state.closed.is_some() || state.quitting {
                Vec::new()
            } else {
                state.cursors.ack_due(MAX_CURSORS_PER_REQUEST)
            }
        };
        if due.is_empty() {
            self.ack_in_flight.store(false, Ordering::Release);
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            match core
                .request(Request::Ack {
                    cursors: due.clone(),
                })
                .await
            {
                Ok(_) => core.lock().cursors.ack_confirmed(&due),
                Err(e) => tracing::debug!(error = %e, "acknowledgement not recorded; will retry"),
            }
            core.ack_in_flight.store(false, Ordering::Release);
        });
    }

    /// Queues the acknowledgements that are due on a connection about to close, without
    /// waiting for the answer.
    fn final_ack(&self, outbound: &mpsc::Sender<Bytes>) {
        let due = self.lock().cursors.ack_due(MAX_CURSORS_PER_REQUEST);
        if due.is_empty() {
            return;
        }
        let frame = encode_client(&ClientFrame {
            id: self.next_id(),
            req: Request::Ack { cursors: due },
        });
        if frame.len() <= self.opts.max_frame_bytes {
            let _ = outbound.try_send(Bytes::from(frame));
        }
    }

    /// Starts the tasks of a logged-in connection, sends again the requests that wait for a
    /// reply, then lets new requests through.
    async fn go_live(
        self: &Arc<Self>,
        opened: Opened,
        events: mpsc::Sender<ClientEvent>,
        after_reconnect: bool,
    ) -> Live {
        // The requests that wait for a reply go again, first and in their original order.
        let (generation, resend, resent_sends) = {
            let mut state = self.lock();
            state.generation += 1;
            let generation = state.generation;
            let mut frames: Vec<(RequestId, Bytes)> = Vec::new();
            let mut resent_sends = HashMap::new();
            for (id, p) in state.pending.iter_mut() {
                let Some(frame) = p.resend.clone() else {
                    continue;
                };
                p.generation = generation;
                frames.push((*id, frame));
                if let Some(conv) = &p.conv {
                    resent_sends.insert(*id, conv.clone());
                }
            }
            frames.sort_by_key(|(id, _)| *id);
            let frames: Vec<Bytes> = frames.into_iter().map(|(_, frame)| frame).collect();
            (generation, frames, resent_sends)
        };
        self.current.store(opened.index, Ordering::Relaxed);
        let live = start(
            self,
            opened,
            generation,
            events,
            after_reconnect,
            resent_sends,
        );
        if !resend.is_empty() {
            tracing::debug!(requests = resend.len(), "sending again after the reconnect");
        }
        for frame in resend {
            let sent = tokio::select! {
                _ = self.close.cancelled() => break,
                sent = live.outbound.send(frame) => sent,
            };
            // A closed queue: this connection already ended; the supervisor will see it.
            if sent.is_err() {
                break;
            }
        }
        self.lock().link = Some(Link {
            generation,
            outbound: live.outbound.clone(),
        });
        self.wake();
        live
    }

    /// A connection ended: stop routing requests to it, and fail the requests that will not be
    /// sent again.
    fn connection_lost(&self, generation: u64, ended: &Ended, reconnecting: bool) {
        let failed: Vec<Pending> = {
            let mut state = self.lock();
            if state
                .link
                .as_ref()
                .is_some_and(|l| l.generation <= generation)
            {
                state.link = None;
            }
            let ids: Vec<RequestId> = state
                .pending
                .iter()
                .filter(|(_, p)| {
                    p.generation <= generation && !(reconnecting && p.resend.is_some())
                })
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| state.pending.remove(id))
                .collect()
        };
        self.wake();
        let message = if reconnecting {
            format!(
                "{}; the request may or may not have been carried out, and is not repeated \
                 automatically",
                ended.message
            )
        } else {
            ended.message.clone()
        };
        for p in failed {
            let _ = p.tx.send(Err(ClientError::disconnected(
                ended.reason,
                message.clone(),
            )));
        }
    }

    /// Ends the session: fails what waits, tells the application, closes the events.
    async fn finish(
        &self,
        reason: DisconnectReason,
        message: String,
        events: mpsc::Sender<ClientEvent>,
    ) {
        let pending = {
            let mut state = self.lock();
            state.link = None;
            if state.closed.is_none() {
                state.closed = Some((reason, message.clone()));
            }
            std::mem::take(&mut state.pending)
        };
        self.wake();
        for (_, p) in pending {
            let _ =
                p.tx.send(Err(ClientError::disconnected(reason, message.clone())));
        }
        self.close.cancel();
        // Bounded: if the application neither reads nor drops `Events`, give up on telling it.
        let last = ClientEvent::Disconnected {
            reason,
            message,
            reconnecting: false,
        };
        let _ = tokio::time::timeout(FINAL_EVENT_WAIT, events.send(last)).await;
    }
}

/// Removes a request's entry if its future is dropped before the reply, and holds its slot.
struct PendingGuard {
    core: Arc<Core>,
    id: RequestId,
    _slot: OwnedSemaphorePermit,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.core.lock().pending.remove(&self.id);
    }
}

/// A request that has been queued for sending; [`PendingReply::reply`] waits for the answer.
pub struct PendingReply {
    rx: oneshot::Receiver<Result<Reply, ClientError>>,
    request_timeout: Duration,
    core: Arc<Core>,
    _guard: PendingGuard,
}

impl PendingReply {
    /// Waits for the reply (bounded by the request timeout, reconnects included).
    pub async fn reply(self) -> Result<Reply, ClientError> {
        match tokio::time::timeout(self.request_timeout, self.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.core.closed_error()),
            Err(_) => Err(ClientError::Timeout {
                seconds: self.request_timeout.as_secs(),
            }),
        }
    }
}

/// The session's events, in order: the server's events (message events deduplicated),
/// [`ClientEvent::Disconnected`] / [`ClientEvent::Reconnected`] around reconnects, and at the
/// end one [`ClientEvent::Disconnected`] without `reconnecting` (reason
/// [`DisconnectReason::Quit`] after [`Client::close`] or [`Client::quit`]), then `None`.
///
/// Keep reading it, or drop it: the queue is bounded ([`ConnectOptions::event_queue_len`]),
/// and while it is full the connection's reader waits, so replies wait too. Dropping it
/// discards events. A message counts as received (for the acknowledgements sent to the
/// server) once it has been taken from here.
pub struct Events {
    rx: mpsc::Receiver<ClientEvent>,
    core: Arc<Core>,
}

impl Events {
    pub(crate) fn from_parts(rx: mpsc::Receiver<ClientEvent>, core: Arc<Core>) -> Events {
        Events { rx, core }
    }

    pub async fn recv(&mut self) -> Option<ClientEvent> {
        let event = self.rx.recv().await;
        self.taken(event.as_ref());
        event
    }

    /// An event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<ClientEvent> {
        let event = self.rx.try_recv().ok();
        self.taken(event.as_ref());
        event
    }

    fn taken(&self, event: Option<&ClientEvent>) {
        if let Some(ClientEvent::Server(Event::Message(m))) = event {
            self.core.lock().cursors.on_taken(&m.conv, m.seq);
        }
    }
}

impl futures_util::Stream for Events {
    type Item = ClientEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        let poll = self.rx.poll_recv(cx);
        if let Poll::Ready(event) = &poll {
            self.taken(event.as_ref());
        }
        poll
    }
}

impl Drop for Events {
    /// What was queued is discarded, and counts as received.
    fn drop(&mut self) {
        self.rx.close();
        // Bounded by the queue's capacity: nothing more can be queued once closed.
        while let Ok(event) = self.rx.try_recv() {
            self.taken(Some(&event));
        }
    }
}

fn codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

impl Client {
    /// Connects, verifies the server, exchanges versions and logs in (or registers). This
    /// first connection is not retried: its errors are returned. Later drops are handled by
    /// reconnecting (see [`ConnectOptions::reconnect`]).
    ///
    /// With several addresses (`HOST:PORT,HOST:PORT…`, the nodes of a cluster) they are tried
    /// in order, each once, until one logs in; a refusal that another node would repeat (a
    /// wrong password, a certificate that does not match the pin) stops at once. When every
    /// address fails the error lists each one with its reason
    /// ([`ClientError::NoServer`]). Later drops move on to the next address.
    pub async fn connect(opts: ConnectOptions) -> Result<(Client, Events, Session), ClientError> {
        let servers = ServerList::parse(&opts.server)?;
        let next_id = AtomicU64::new(1);
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let frame = login_frame(
            id,
            &opts,
            |resume| opts.auth.to_request(resume),
            &opts.resume,
        )?;
        let opened = open_first(&servers, &opts, id, frame).await?;
        let session = Session {
            user: opened.user.clone(),
            admin: opened.admin,
            rooms: opened.rooms.clone(),
            server: servers.get(opened.index).to_string(),
            fingerprint: opened.fingerprint.clone(),
            trust: opened.trust.clone(),
            tls_version: opened.tls_version.clone(),
            cipher_suite: opened.cipher_suite.clone(),
            key_exchange: opened.key_exchange.clone(),
        };
        let mut cursors = Cursors::default();
        cursors.seed(&opts.resume);
        let (events_tx, events_rx) = mpsc::channel(opts.event_queue_len.max(1));
        let (link_changed, _) = watch::channel(());
        let core = Arc::new(Core {
            slots: Arc::new(Semaphore::new(opts.max_pending_requests.max(1))),
            opts,
            servers,
            current: std::sync::atomic::AtomicUsize::new(0),
            user: session.user.clone(),
            next_id,
            state: Mutex::new(State {
                link: None,
                generation: 0,
                closed: None,
                pending: HashMap::new(),
                cursors,
                quitting: false,
            }),
            link_changed,
            close: CancellationToken::new(),
            ack_in_flight: AtomicBool::new(false),
            offers: Mutex::new(HashMap::new()),
            next_attempt_ms: Mutex::new(None),
            file_events: tokio::sync::broadcast::channel(FILE_EVENT_QUEUE).0,
            sending: Mutex::new(HashMap::new()),
            secure: std::sync::OnceLock::new(),
            away: Mutex::new(None),
        });
        let live = core.go_live(opened, events_tx.clone(), false).await;
        tokio::spawn(supervise(core.clone(), live, events_tx));
        let events = Events {
            rx: events_rx,
            core: core.clone(),
        };
        Ok((
            Client {
                handle: Arc::new(Handle { core }),
            },
            events,
            session,
        ))
    }

    /// A file offer this session has seen, by id.
    pub fn offer(&self, file_id: &str) -> Option<conclave_proto::FileOffer> {
        self.core()
            .offers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(file_id)
            .cloned()
    }

    /// File events from now on (`FileReady`, `FileRelayWanted`), for transfers that wait.
    pub(crate) fn file_events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.core().file_events.subscribe()
    }

    /// This client's sends under way (to cancel them by file id).
    pub(crate) fn sending(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.core()
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// While the client is reconnecting and waiting to try again: when the next attempt
    /// starts, in milliseconds since the Unix epoch (`None` while connected or trying).
    pub fn next_attempt_ms(&self) -> Option<i64> {
        *self
            .core()
            .next_attempt_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The name this session's server is remembered by: `host:port` of the first
    /// `--server` address (the key of its pin in `known_servers`, of this device's end-to-end
    /// state, of the terminal client's state), whichever address it is connected to.
    pub fn server(&self) -> String {
        self.core().servers.key().to_string()
    }

    /// The address of the current connection (of the last one while reconnecting),
    /// `host:port`: one of the `--server` list.
    pub fn connected_to(&self) -> String {
        self.core().connected_addr().to_string()
    }

    /// Every `--server` address, in the order they are tried.
    pub fn servers(&self) -> &ServerList {
        &self.core().servers
    }

    /// The account this session is logged in as.
    pub fn user(&self) -> &str {
        &self.core().user
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    pub(crate) fn clone_weak(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.handle))
    }

    /// Queues a request and returns once it is in the outbound queue: requests submitted one
    /// after another reach the server in that order. Await [`PendingReply::reply`] for the
    /// answer. Waits while [`ConnectOptions::max_pending_requests`] are outstanding, and while
    /// the client is reconnecting (both bounded by the request timeout). A send without an
    /// idempotency key gets one (UUID v7).
    pub async fn submit(&self, req: Request) -> Result<PendingReply, ClientError> {
        self.core().submit(req).await
    }

    /// Sends a request and waits for its reply. An error reply is [`ClientError::Server`].
    pub async fn request(&self, req: Request) -> Result<Reply, ClientError> {
        self.core().request(req).await
    }

    /// Sends a message. A missing idempotency key is generated (UUID v7), so the server can
    /// recognise a retry of this very send; if the connection drops before the reply, the
    /// send is repeated after the reconnect with the same key and this resolves with the
    /// eventual receipt (`duplicate: true` when the first attempt had been stored).
    pub async fn send(
        &self,
        target: Target,
        body: Body,
        idempotency_key: Option<String>,
    ) -> Result<SendReceipt, ClientError> {
        self.send_with_refs(target, body, idempotency_key, None)
            .await
    }

    /// [`Client::send`] of a reply, or of an act on an earlier message (see
    /// [`conclave_proto::chat`]).
    pub async fn send_with_refs(
        &self,
        target: Target,
        body: Body,
        idempotency_key: Option<String>,
        refs: Option<Box<conclave_proto::Refs>>,
    ) -> Result<SendReceipt, ClientError> {
        if let Some(done) = self
            .send_e2ee(&target, &body, idempotency_key.clone(), refs.as_deref())
            .await
        {
            let (seq, msg_id, ts_ms) = done?;
            return Ok(SendReceipt {
                msg_id,
                seq,
                ts_ms,
                duplicate: false,
            });
        }
        match self
            .request(Request::Send {
                target,
                body,
                idempotency_key,
                refs,
            })
            .await?
        {
            Reply::Sent {
                msg_id,
                seq,
                ts_ms,
                duplicate,
            } => Ok(SendReceipt {
                msg_id,
                seq,
                ts_ms,
                duplicate,
            }),
            other => Err(unexpected("send", &other)),
        }
    }

    /// Sends a text message to a room (everyone but `except`).
    pub async fn send_to_room(
        &self,
        room: &str,
        text: &str,
        except: &[String],
    ) -> Result<SendReceipt, ClientError> {
        let target = Target::Room {
            room: room.to_string(),
            except: except.to_vec(),
        };
        self.send(target, Body::text(text), None).await
    }

    /// Sends a text message to the named users.
    pub async fn send_to_users(
        &self,
        to: &[String],
        text: &str,
    ) -> Result<SendReceipt, ClientError> {
        let target = Target::Users { to: to.to_vec() };
        self.send(target, Body::text(text), None).await
    }

    /// Joins a room; returns its members.
    pub async fn join(
        &self,
        room: &str,
        password: Option<&str>,
    ) -> Result<Vec<String>, ClientError> {
        let req = Request::Join {
            room: room.to_string(),
            password: password.map(str::to_string),
        };
        let members = match self.request(req).await? {
            Reply::Joined { members, .. } => members,
            Reply::Ok => Vec::new(),
            other => return Err(unexpected("join", &other)),
        };
        self.after_join(room).await?;
        Ok(members)
    }

    pub async fn part(&self, room: &str) -> Result<(), ClientError> {
        self.request(Request::Part {
            room: room.to_string(),
        })
        .await?;
        self.after_part(room);
        Ok(())
    }

    pub async fn create_room(
        &self,
        room: &str,
        private: bool,
        password: Option<&str>,
    ) -> Result<(), ClientError> {
        self.request(Request::CreateRoom {
            room: room.to_string(),
            private,
            password: password.map(str::to_string),
        })
        .await
        .map(drop)
    }

    pub async fn invite(&self, room: &str, user: &str) -> Result<(), ClientError> {
        self.request(Request::Invite {
            room: room.to_string(),
            user: user.to_string(),
        })
        .await?;
        self.after_invite(room, user).await
    }

    /// Admins only: a notice to everyone online.
    pub async fn announce(&self, text: &str) -> Result<(), ClientError> {
        self.request(Request::Announce {
            text: text.to_string(),
        })
        .await
        .map(drop)
    }

    /// Rooms visible to this account.
    pub async fn rooms(&self) -> Result<Vec<RoomInfo>, ClientError> {
        match self.request(Request::Rooms).await? {
            Reply::Rooms(rooms) => Ok(rooms),
            other => Err(unexpected("rooms", &other)),
        }
    }

    /// Online users, everywhere or in one room.
    pub async fn who(&self, room: Option<&str>) -> Result<Vec<UserPresence>, ClientError> {
        match self
            .request(Request::Who {
                room: room.map(str::to_string),
            })
            .await?
        {
            Reply::Users(users) => Ok(users),
            other => Err(unexpected("who", &other)),
        }
    }

    /// The conversation a reference names, for this account (a direct conversation includes
    /// me).
    pub(crate) fn conv_of(&self, conv: &ConvRef) -> Conv {
        match conv {
            ConvRef::Room(r) => {
                Conv::Room(conclave_proto::names::canonical_room(r).unwrap_or_else(|_| r.clone()))
            }
            ConvRef::With(users) => {
                let mut all = users.clone();
                all.push(self.user().to_string());
                all.sort();
                all.dedup();
                Conv::Direct(all)
            }
        }
    }

    /// Up to `limit` messages of a conversation before `before` (newest when `None`), oldest
    /// first. End-to-end encrypted conversations are read from this device's own history
    /// (what it received since it joined).
    pub async fn history(
        &self,
        conv: ConvRef,
        limit: u32,
        before: Option<u64>,
    ) -> Result<Vec<Message>, ClientError> {
        let local = self.conv_of(&conv);
        if let Some(found) = self.local_history(&local, limit, before) {
            return found;
        }
        // An end-to-end conversation this device has no history of: the server's log holds
        // only MLS messages, which are never shown as messages.
        Ok(self
            .history_raw(conv, limit, before)
            .await?
            .into_iter()
            .filter(|m| !m.body.content_type.starts_with("application/mls-"))
            .collect())
    }

    /// The server's history of a conversation (for end-to-end ones: the MLS log).
    pub async fn history_raw(
        &self,
        conv: ConvRef,
        limit: u32,
        before: Option<u64>,
    ) -> Result<Vec<Message>, ClientError> {
        match self
            .request(Request::History {
                conv,
                limit,
                before,
            })
            .await?
        {
            Reply::Messages(messages) => Ok(messages),
            other => Err(unexpected("history", &other)),
        }
    }

    /// Messages containing all the words of `query`, newest first; in one room or everywhere
    /// this account is; older than the message `before` when given.
    pub async fn search(
        &self,
        query: &str,
        room: Option<&str>,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<Message>, ClientError> {
        match self
            .request(Request::Search {
                query: query.to_string(),
                room: room.map(str::to_string),
                limit,
                before: before.map(str::to_string),
            })
            .await?
        {
            Reply::Results(mut messages) => {
                // End-to-end conversations are searched here, in this device's history.
                if before.is_none() {
                    messages.extend(self.local_search(query, room, limit));
                    messages.sort_by_key(|m| std::cmp::Reverse(m.ts_ms));
                    messages.truncate(limit as usize);
                }
                Ok(messages)
            }
            other => Err(unexpected("search", &other)),
        }
    }

    /// Round-trip time of a ping.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        let nonce = self.core().next_id();
        match self.request(Request::Ping { nonce }).await? {
            Reply::Pong { nonce: n } if n == nonce => Ok(started.elapsed()),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Per conversation, the sequence number up to which this client has delivered every
    /// message (what a reconnect resumes from); at most 1,000 conversations. An application
    /// that saves them can pass them as [`ConnectOptions::resume`] next time.
    pub fn cursors(&self) -> Vec<Cursor> {
        self.core().lock().cursors.resume()
    }

    /// Acknowledges now, and waits for the server to record it, everything the application
    /// has received that was not acknowledged yet (this also happens every
    /// [`ConnectOptions::ack_interval`], and in [`Client::quit`]).
    pub async fn flush_acks(&self) -> Result<(), ClientError> {
        let core = self.core();
        for _ in 0..MAX_FLUSH_ROUNDS {
            let due = core.lock().cursors.ack_due(MAX_CURSORS_PER_REQUEST);
            if due.is_empty() {
                break;
            }
            core.request(Request::Ack {
                cursors: due.clone(),
            })
            .await?;
            core.lock().cursors.ack_confirmed(&due);
        }
        Ok(())
    }

    /// Leaves cleanly: acknowledges what was received, then tells the server, which answers,
    /// sends [`Event::Disconnect`] with [`DisconnectReason::Quit`] and closes the connection.
    /// While reconnecting there is nobody to tell: this just closes.
    pub async fn quit(&self) -> Result<(), ClientError> {
        let connected = {
            let state = self.core().lock();
            match &state.closed {
                Some((DisconnectReason::Quit, _)) => return Ok(()),
                Some((reason, message)) => {
                    return Err(ClientError::disconnected(*reason, message.clone()));
                }
                None => state.link.is_some(),
            }
        };
        if !connected {
            self.close();
            return Ok(());
        }
        if let Err(e) = self.flush_acks().await {
            tracing::debug!(error = %e, "could not acknowledge before quitting");
        }
        self.core().lock().quitting = true;
        match self.request(Request::Quit).await {
            // The connection ending while quitting is what we asked for.
            Ok(_) | Err(ClientError::Disconnected { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the session now, without telling the server why (acknowledgements that are due
    /// are still sent). Waiting requests fail with [`ClientError::Disconnected`].
    pub fn close(&self) {
        self.core().close.cancel();
    }

    /// True once the session has ended (it will not reconnect).
    pub fn is_closed(&self) -> bool {
        self.core().lock().closed.is_some()
    }

    /// True while a connection is up (false while reconnecting, and once closed).
    pub fn is_connected(&self) -> bool {
        self.core().lock().link.is_some()
    }
}

pub(crate) fn unexpected(request: &'static str, reply: &Reply) -> ClientError {
    let mut text = format!("{reply:?}");
    if text.len() > 120 {
        let mut end = 120;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    ClientError::UnexpectedReply {
        request,
        reply: text,
    }
}

/// Sends carry an idempotency key, generated unless the caller gave one.
pub(crate) fn with_idempotency_key(req: Request) -> Request {
    match req {
        Request::Send {
            target,
            body,
            idempotency_key: None,
            refs,
        } => Request::Send {
            target,
            body,
            idempotency_key: Some(uuid::Uuid::now_v7().to_string()),
            refs,
        },
        other => other,
    }
}

/// Requests that are safe to send again after a reconnect: sends (they carry an idempotency
/// key) and requests that only read or are idempotent.
fn is_resendable(req: &Request) -> bool {
    match req {
        Request::Send {
            idempotency_key, ..
        } => idempotency_key.is_some(),
        Request::History { .. }
        | Request::FileStatus { .. }
        | Request::FileChunk { .. }
        | Request::FileFetch { .. }
        | Request::FileDecline { .. }
        | Request::FileReceived { .. }
        | Request::FileWantRelay { .. }
        // Withdrawing twice withdraws once (the second says not_found).
        | Request::FileCancel { .. }
        | Request::Files
        | Request::Search { .. }
        | Request::Rooms
        | Request::Who { .. }
        | Request::Ping { .. }
        | Request::E2eeClaim { .. }
        | Request::E2eeGroupInfo { .. }
        | Request::E2eeDevices { .. }
        | Request::E2eeConvs
        | Request::E2eeWelcomeDone { .. }
        | Request::Ack { .. }
        | Request::MessageInfo { .. }
        | Request::Thread { .. } => true,
        // Everyday chat, part B: setting the same state twice sets it once (a read marker
        // only moves forward); a typing notice after a reconnect is stale.
        Request::Read { .. }
        | Request::ReadMarkers { .. }
        | Request::ShareReads { .. }
        | Request::SetTopic { .. }
        | Request::Away { .. }
        | Request::SetDisplayName { .. } => true,
        Request::Typing { .. } => false,
        // Devices (issue 21): the backup's requests are idempotent; the others speak for the
        // connection's device, which a new connection publishes again first (the callers
        // retry them).
        Request::DeviceDecide { .. }
        | Request::BackupPut { .. }
        | Request::BackupFetch { .. }
        | Request::BackupDrop { .. } => true,
        Request::DeviceAnnounce { .. }
        | Request::TransferPut { .. }
        | Request::TransferFetch { .. }
        | Request::TransferAck { .. } => false,
        Request::E2eePublish { .. } | Request::E2eeCreate { .. } | Request::E2eeCommit { .. } => {
            false
        }
        Request::Login { .. }
        | Request::Register { .. }
        | Request::CreateRoom { .. }
        | Request::Join { .. }
        | Request::Part { .. }
        | Request::Invite { .. }
        | Request::Announce { .. }
        | Request::Kick { .. }
        | Request::VoteKick { .. }
        | Request::Ban { .. }
        | Request::Unban { .. }
        | Request::SetRoom { .. }
        | Request::FileOffer { .. }
        | Request::Quit => false,
    }
}

/// The conversation a send goes to, as the server names it (canonical names; a direct
/// conversation is its sorted, unique participants, the sender included). `None` for a name
/// the server will refuse anyway.
fn send_conv(target: &Target, me: &str) -> Option<Conv> {
    match target {
        Target::Room { room, .. } => names::canonical_room(room).ok().map(Conv::Room),
        Target::Users { to } => {
            let mut participants = std::collections::BTreeSet::new();
            for name in to {
                participants.insert(names::canonical(name).ok()?);
            }
            participants.insert(me.to_string());
            Some(Conv::Direct(participants.into_iter().collect()))
        }
    }
}

/// The login (or registration) frame, with as many of `resume` as fit in a frame.
fn login_frame(
    id: RequestId,
    opts: &ConnectOptions,
    make: impl Fn(Vec<Cursor>) -> Request,
    resume: &[Cursor],
) -> Result<Bytes, ClientError> {
    let mut n = resume.len().min(MAX_CURSORS_PER_REQUEST);
    loop {
        let frame = encode_client(&ClientFrame {
            id,
            req: make(resume[..n].to_vec()),
        });
        if frame.len() <= opts.max_frame_bytes {
            return Ok(Bytes::from(frame));
        }
        if n == 0 {
            return Err(ClientError::TooLarge {
                bytes: frame.len(),
                max: opts.max_frame_bytes,
            });
        }
        // Conversations left out resume after their acknowledged position: safe.
        n /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_get_an_idempotency_key_and_may_be_repeated() {
        let send = |key: Option<&str>| Request::Send {
            target: Target::Users {
                to: vec!["b".into()],
            },
            body: Body::text("x"),
            idempotency_key: key.map(str::to_string),
            refs: None,
        };
        let keyed = with_idempotency_key(send(None));
        match &keyed {
            Request::Send {
                idempotency_key: Some(k),
                refs: None,
                ..
            } => assert_eq!(k.len(), 36),
            other => panic!("{other:?}"),
        }
        assert!(is_resendable(&keyed));
        assert!(!is_resendable(&send(None)));
        assert_eq!(with_idempotency_key(send(Some("mine"))), send(Some("mine")));
        assert_eq!(with_idempotency_key(Request::Rooms), Request::Rooms);
        assert!(is_resendable(&Request::Rooms));
        let join = Request::Join {
            room: "r".into(),
            password: None,
        };
        assert!(!is_resendable(&join));
        assert!(!is_resendable(&Request::Quit));
    }

    #[test]
    fn a_send_names_its_conversation_as_the_server_does() {
        let room = Target::Room {
            room: "#General".into(),
            except: vec![],
        };
        assert_eq!(
            send_conv(&room, "alice"),
            Some(Conv::Room("general".into()))
        );
        let users = Target::Users {
            to: vec!["Carol".into(), "bob".into(), "carol".into()],
        };
        assert_eq!(
            send_conv(&users, "alice"),
            Some(Conv::Direct(vec![
                "alice".into(),
                "bob".into(),
                "carol".into()
            ]))
        );
        let me = Target::Users {
            to: vec!["alice".into()],
        };
        assert_eq!(
            send_conv(&me, "alice"),
            Some(Conv::Direct(vec!["alice".into()]))
        );
        let bad = Target::Users {
            to: vec!["no spaces".into()],
        };
        assert_eq!(send_conv(&bad, "alice"), None);
    }

    #[test]
    fn the_login_frame_drops_cursors_until_it_fits() {
        let auth = crate::Auth::Login {
            user: "alice".into(),
            password: "pw".into(),
            server_password: None,
        };
        let mut opts = ConnectOptions::new("h:1", auth);
        let resume: Vec<Cursor> = (0..500)
            .map(|i| Cursor {
                conv: Conv::Room(format!("room-{i:05}")),
                seq: i,
            })
            .collect();
        let all = login_frame(1, &opts, |r| opts.auth.to_login(r), &resume).unwrap();
        opts.max_frame_bytes = all.len() / 3;
        let fewer = login_frame(1, &opts, |r| opts.auth.to_login(r), &resume).unwrap();
        assert!(fewer.len() <= opts.max_frame_bytes);
        match conclave_proto::decode_client(&fewer).unwrap().req {
            Request::Login { resume: r, .. } => {
                assert!(!r.is_empty() && r.len() < 500, "{}", r.len());
                assert_eq!(r[..], resume[..r.len()]);
            }
            other => panic!("{other:?}"),
        }
        opts.max_frame_bytes = 10;
        assert!(matches!(
            login_frame(1, &opts, |r| opts.auth.to_login(r), &resume),
            Err(ClientError::TooLarge { .. })
        ));
    }
}
