//! The async client: one logged-in connection, shared by cheap [`Client`] handles.
//!
//! Two tasks own the socket. The reader decodes frames, hands each reply to the request that
//! waits for it (by id) and pushes events into a bounded channel ([`Events`]). The writer
//! drains a bounded queue of encoded frames into the TLS stream, flushing when the queue runs
//! empty (so a burst of sends becomes few TLS records), and sends a ping when the connection
//! has been idle. When either side ends, every waiting request fails with
//! [`ClientError::Disconnected`] and [`Events`] yields one [`Event::Disconnect`], then `None`.
//!
//! [`Client`] is a handle around shared state rather than the connection itself so that
//! reconnecting (with back-off and resume) can later swap the connection underneath without
//! changing the API.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conclave_proto::{
    Body, ClientFrame, ConvRef, DisconnectReason, Event, Message, Reply, Request, RequestId,
    RoomInfo, ServerFrame, Target, UserPresence, decode_server, encode_client,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::address::ServerAddr;
use crate::error::ClientError;
use crate::handshake::establish;
use crate::options::ConnectOptions;
use crate::trust::PinOutcome;

type Stream = TlsStream<TcpStream>;

/// What the server told us at login, and how the connection was secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Canonical account name.
    pub user: String,
    pub admin: bool,
    /// Rooms the account is a member of.
    pub rooms: Vec<String>,
    /// `host:port` as connected to.
    pub server: String,
    /// SHA-256 of the server's certificate (canonical hex).
    pub fingerprint: String,
    /// How the certificate came to be trusted.
    pub trust: PinOutcome,
    /// e.g. `TLS 1.3`.
    pub tls_version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
}

/// The result of a successful send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub msg_id: String,
    pub seq: u64,
    pub ts_ms: i64,
    /// True when the server had already stored a send with this idempotency key.
    pub duplicate: bool,
}

/// A handle to one connection. Clone it freely; all clones share the connection. The
/// connection closes when [`Client::close`] or [`Client::quit`] is called, when the server
/// ends it, or when the last handle is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Encoded frames for the writer task.
    outbound: mpsc::Sender<Bytes>,
    /// Bounds the requests awaiting a reply.
    slots: Arc<Semaphore>,
    max_frame_bytes: usize,
    request_timeout: Duration,
    /// Cancelled to close the connection now.
    cancel: CancellationToken,
}

/// State shared by the handles and the two tasks.
struct Shared {
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Requests awaiting a reply.
    pending: HashMap<RequestId, oneshot::Sender<Result<Reply, ClientError>>>,
    /// Set once when the connection ends: why.
    closed: Option<(DisconnectReason, String)>,
    /// Set by the writer when a write failed, for the reader's report.
    write_error: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections only move values in and out of the map; a panic in one cannot
        // leave it half-updated, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn closed_error(&self) -> ClientError {
        match &self.lock().closed {
            Some((reason, message)) => ClientError::disconnected(*reason, message.clone()),
            None => ClientError::disconnected(DisconnectReason::Other, "the connection is closed"),
        }
    }
}

/// Removes a request's entry if its future is dropped before the reply, and holds its slot.
struct PendingGuard {
    shared: Arc<Shared>,
    id: RequestId,
    _slot: OwnedSemaphorePermit,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// A request that has been queued for sending; [`PendingReply::reply`] waits for the answer.
pub struct PendingReply {
    rx: oneshot::Receiver<Result<Reply, ClientError>>,
    request_timeout: Duration,
    shared: Arc<Shared>,
    _guard: PendingGuard,
}

impl PendingReply {
    /// Waits for the reply (bounded by the request timeout).
    pub async fn reply(self) -> Result<Reply, ClientError> {
        match tokio::time::timeout(self.request_timeout, self.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(ClientError::Timeout {
                seconds: self.request_timeout.as_secs(),
            }),
        }
    }
}

/// Events pushed by the server, in order. Ends with one [`Event::Disconnect`] (synthesized
/// with [`DisconnectReason::Other`] if the connection just broke, or
/// [`DisconnectReason::Quit`] after [`Client::close`]), then `None`.
///
/// Keep reading it, or drop it: the queue is bounded
/// ([`ConnectOptions::event_queue_len`]), and while it is full the connection's reader waits,
/// so replies wait too. Dropping it discards events.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl futures_util::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
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
    /// Connects, verifies the server, exchanges versions and logs in (or registers).
    pub async fn connect(opts: ConnectOptions) -> Result<(Client, Events, Session), ClientError> {
        let addr = ServerAddr::parse(&opts.server)?;
        let server = addr.to_string();
        let established = establish(&addr, &opts).await?;
        let (client, events) = Client::start(established.stream, &opts);

        let login = match tokio::time::timeout(
            opts.handshake_timeout,
            client.request(opts.auth.to_request()),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ClientError::HandshakeTimeout {
                server: server.clone(),
                stage: "login",
                seconds: opts.handshake_timeout.as_secs(),
            }),
        };
        let reply = match login {
            Ok(reply) => reply,
            Err(e) => {
                client.close();
                return Err(e);
            }
        };
        let Reply::LoggedIn { user, admin, rooms } = reply else {
            client.close();
            return Err(unexpected("login", &reply));
        };
        Ok((
            client,
            events,
            Session {
                user,
                admin,
                rooms,
                server,
                fingerprint: established.fingerprint,
                trust: established.trust,
                tls_version: established.tls_version,
                cipher_suite: established.cipher_suite,
            },
        ))
    }

    /// Starts the reader and writer tasks on an established stream.
    fn start(stream: Stream, opts: &ConnectOptions) -> (Client, Events) {
        let (read_half, write_half) = tokio::io::split(stream);
        let frames_in = FramedRead::new(read_half, codec(opts.max_frame_bytes));
        let frames_out = FramedWrite::new(write_half, codec(opts.max_frame_bytes));
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
        });
        let cancel = CancellationToken::new();
        let (outbound, outbound_rx) = mpsc::channel(opts.outbound_queue_frames.max(1));
        let (events_tx, events_rx) = mpsc::channel(opts.event_queue_len.max(1));

        tokio::spawn(read_loop(
            frames_in,
            shared.clone(),
            events_tx,
            cancel.clone(),
            opts.max_frame_bytes,
        ));
        tokio::spawn(write_loop(
            frames_out,
            outbound_rx,
            shared.clone(),
            cancel.clone(),
            opts.keepalive_interval,
            opts.handshake_timeout,
        ));
        let client = Client {
            inner: Arc::new(Inner {
                shared,
                outbound,
                slots: Arc::new(Semaphore::new(opts.max_pending_requests.max(1))),
                max_frame_bytes: opts.max_frame_bytes,
                request_timeout: opts.request_timeout,
                cancel,
            }),
        };
        (client, Events { rx: events_rx })
    }

    /// Queues a request and returns once it is in the outbound queue: requests submitted one
    /// after another reach the server in that order. Await [`PendingReply::reply`] for the
    /// answer. Waits while [`ConnectOptions::max_pending_requests`] are outstanding.
    pub async fn submit(&self, req: Request) -> Result<PendingReply, ClientError> {
        let inner = &self.inner;
        let seconds = inner.request_timeout.as_secs();
        let slot = tokio::time::timeout(inner.request_timeout, inner.slots.clone().acquire_owned())
            .await
            .map_err(|_| ClientError::Timeout { seconds })?
            .map_err(|_| inner.shared.closed_error())?;

        let id = inner.shared.next_id();
        let bytes = encode_client(&ClientFrame { id, req });
        if bytes.len() > inner.max_frame_bytes {
            return Err(ClientError::TooLarge {
                bytes: bytes.len(),
                max: inner.max_frame_bytes,
            });
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut state = inner.shared.lock();
            if let Some((reason, message)) = &state.closed {
                return Err(ClientError::disconnected(*reason, message.clone()));
            }
            state.pending.insert(id, tx);
        }
        let guard = PendingGuard {
            shared: inner.shared.clone(),
            id,
            _slot: slot,
        };
        match tokio::time::timeout(
            inner.request_timeout,
            inner.outbound.send(Bytes::from(bytes)),
        )
        .await
        {
            Ok(Ok(())) => Ok(PendingReply {
                rx,
                request_timeout: inner.request_timeout,
                shared: inner.shared.clone(),
                _guard: guard,
            }),
            Ok(Err(_)) => Err(inner.shared.closed_error()),
            Err(_) => Err(ClientError::Timeout { seconds }),
        }
    }

    /// Sends a request and waits for its reply. An error reply is [`ClientError::Server`].
    pub async fn request(&self, req: Request) -> Result<Reply, ClientError> {
        self.submit(req).await?.reply().await
    }

    /// Sends a message. A missing idempotency key is generated (UUID v7), so the server can
    /// recognise a retry of this very send.
    pub async fn send(
        &self,
        target: Target,
        body: Body,
        idempotency_key: Option<String>,
    ) -> Result<SendReceipt, ClientError> {
        let idempotency_key =
            Some(idempotency_key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()));
        match self
            .request(Request::Send {
                target,
                body,
                idempotency_key,
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
        match self.request(req).await? {
            Reply::Joined { members, .. } => Ok(members),
            Reply::Ok => Ok(Vec::new()),
            other => Err(unexpected("join", &other)),
        }
    }

    pub async fn part(&self, room: &str) -> Result<(), ClientError> {
        self.request(Request::Part {
            room: room.to_string(),
        })
        .await
        .map(drop)
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
        .await
        .map(drop)
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

    /// Up to `limit` messages of a conversation before `before` (newest when `None`), oldest
    /// first.
    pub async fn history(
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

    /// Round-trip time of a ping.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        let nonce = self.inner.shared.next_id();
        match self.request(Request::Ping { nonce }).await? {
            Reply::Pong { nonce: n } if n == nonce => Ok(started.elapsed()),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Leaves cleanly: the server acknowledges, sends [`Event::Disconnect`] with
    /// [`DisconnectReason::Quit`] and closes the connection.
    pub async fn quit(&self) -> Result<(), ClientError> {
        match self.request(Request::Quit).await {
            Ok(_)
            | Err(ClientError::Disconnected {
                reason: DisconnectReason::Quit,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the connection now, without telling the server why. Waiting requests fail with
    /// [`ClientError::Disconnected`].
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed.is_some()
    }
}

fn unexpected(request: &'static str, reply: &Reply) -> ClientError {
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

/// Reads frames until the connection ends, then fails what is still waiting.
async fn read_loop(
    mut frames: FramedRead<ReadHalf<Stream>, LengthDelimitedCodec>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    max_frame_bytes: usize,
) {
    let closed_by_us = || {
        let write_error = shared.lock().write_error.clone();
        match write_error {
            Some(e) => (DisconnectReason::Other, e),
            None => (
                DisconnectReason::Quit,
                "the connection was closed by this client".to_string(),
            ),
        }
    };
    let (reason, message) = loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break closed_by_us(),
            next = frames.next() => next,
        };
        let bytes = match next {
            None => {
                break (
                    DisconnectReason::Other,
                    "the server closed the connection without saying why".to_string(),
                );
            }
            Some(Err(e)) => {
                break (
                    DisconnectReason::Other,
                    read_error_text(&e, max_frame_bytes),
                );
            }
            Some(Ok(bytes)) => bytes,
        };
        match decode_server(&bytes) {
            Err(e) => {
                break (
                    DisconnectReason::Other,
                    format!("the server sent a frame this client cannot read ({e})"),
                );
            }
            Ok(ServerFrame::Reply { id, result }) => {
                let waiter = shared.lock().pending.remove(&id);
                match waiter {
                    Some(tx) => {
                        // The requester may have given up; that is fine.
                        let _ = tx.send(result.map_err(ClientError::Server));
                    }
                    // Keep-alive pings and abandoned requests have nobody waiting.
                    None => tracing::trace!(id, "reply with nobody waiting"),
                }
            }
            Ok(ServerFrame::Event(Event::Disconnect { reason, message })) => {
                break (reason, message);
            }
            Ok(ServerFrame::Event(event)) => {
                tokio::select! {
                    _ = cancel.cancelled() => break closed_by_us(),
                    // An error means the application dropped `Events`: discard.
                    _ = events.send(event) => {}
                }
            }
        }
    };

    let pending = {
        let mut state = shared.lock();
        state.closed = Some((reason, message.clone()));
        std::mem::take(&mut state.pending)
    };
    for (_, tx) in pending {
        let _ = tx.send(Err(ClientError::disconnected(reason, message.clone())));
    }
    // Stop the writer too (it may be waiting for frames that will never come).
    cancel.cancel();
    // Bounded: if the application neither reads nor drops `Events`, give up on telling it.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        events.send(Event::Disconnect { reason, message }),
    )
    .await;
}

fn read_error_text(e: &std::io::Error, max_frame_bytes: usize) -> String {
    let text = e.to_string();
    if text.contains("frame size too big") {
        format!(
            "the server sent a frame over this client's limit of {max_frame_bytes} bytes \
             (max_frame_bytes)"
        )
    } else {
        format!("the connection broke: {}", crate::error::plain(e))
    }
}

/// Writes queued frames until every handle is gone or the connection is cancelled.
async fn write_loop(
    mut sink: FramedWrite<WriteHalf<Stream>, LengthDelimitedCodec>,
    mut outbound: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    keepalive_interval: Duration,
    close_timeout: Duration,
) {
    let work = async {
        loop {
            match tokio::time::timeout(keepalive_interval, outbound.recv()).await {
                // Idle: a ping keeps the server's idle timeout from ending the connection.
                // Its reply finds nobody waiting and is dropped.
                Err(_) => {
                    let id = shared.next_id();
                    let ping = encode_client(&ClientFrame {
                        id,
                        req: Request::Ping { nonce: id },
                    });
                    sink.send(Bytes::from(ping)).await?;
                }
                Ok(None) => return Ok(()),
                Ok(Some(frame)) => {
                    sink.feed(frame).await?;
                    if outbound.is_empty() {
                        SinkExt::<Bytes>::flush(&mut sink).await?;
                    }
                }
            }
        }
    };
    let result: std::io::Result<()> = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        result = work => result,
    };
    match result {
        Ok(()) => {
            // Flush what is queued and send TLS close_notify, but don't hang on a peer
            // that stopped reading.
            let _ = tokio::time::timeout(close_timeout, SinkExt::<Bytes>::close(&mut sink)).await;
        }
        Err(e) => {
            shared.lock().write_error = Some(format!(
                "could not send to the server: {}",
                crate::error::plain(&e)
            ));
        }
    }
    cancel.cancel();
}
