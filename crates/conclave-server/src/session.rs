//! One connection: the TLS handshake, the hello, the login, then the request loop.
//!
//! Requests are read and answered one at a time, except sends, which are handed to the store
//! and answered by the dispatcher once durable, so a client can pipeline many sends.

use std::net::SocketAddr;
use std::sync::Arc;

use conclave_proto::hello::{self, HELLO_BYTES, HelloStatus};
use conclave_proto::{
    ClientFrame, DisconnectReason, ErrorBody, ErrorCode, PROTOCOL_VERSION, Reply, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;

use crate::audit::{Fields, Kind};
use crate::cmd;
use crate::conn::Conn;
use crate::outbox::{self, GOODBYE_TIMEOUT, Outbox, OutboxQueue};
use crate::registry::{ConnInfo, Counters};
use crate::state::Shared;
use crate::tls_stream::{self, TlsReader, TlsWriter};

/// A TLS connection whose handshake succeeded, before anything else was read: both halves of
/// the TLS stream (each a pointer to the shared connection), its byte counters, and the end
/// of the time allowed for the handshake and the protocol's hello.
pub struct TlsLink {
    pub reader: TlsReader,
    pub writer: TlsWriter,
    pub counters: Arc<Counters>,
    pub deadline: Instant,
}

/// What the registry and the audit log say about a connection's TLS.
pub struct LinkParams {
    pub tls_version: &'static str,
    pub cipher: &'static str,
    pub kx_group: &'static str,
}

/// How reports name a TLS version (static: a connection keeps no string of its own for it).
fn tls_version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
        Some(v) => v.as_str().unwrap_or("?"),
        None => "?",
    }
}

impl TlsLink {
    /// The application protocol chosen by ALPN, when the peer offered one we serve.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.reader
            .with_common(|state| state.alpn_protocol().map(|p| p.to_vec()))
    }

    /// The TLS version, cipher suite and key exchange group negotiated.
    pub fn params(&self) -> LinkParams {
        self.reader.with_common(|state| LinkParams {
            tls_version: tls_version_name(state.protocol_version()),
            cipher: state
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("?"),
            kx_group: crate::tls::kx_group_name(
                state.negotiated_key_exchange_group().map(|g| g.name()),
            ),
        })
    }
}

/// What the session loop gets from a connection's reading side.
pub enum Incoming {
    Frame(ClientFrame),
    /// The peer closed the connection (or it broke).
    End,
    /// A frame over the limit in force.
    TooLarge,
    /// Something that is not a request; the text says what was wrong.
    Malformed(String),
}

/// Where a session's requests come from: the native connection's length-prefixed postcard
/// frames, or the web client's JSON text messages (`web::ws`). Everything after the frame
/// (limits, rate, login, handlers, audit) is the same session code.
pub trait FrameSource: Send {
    /// The next request, refusing one over `max_frame` bytes (as the native encoding counts
    /// them). Not cancel-safe: the session drops the connection whenever it stops waiting.
    fn next_frame(&mut self, max_frame: usize) -> impl Future<Output = Incoming> + Send;
}

/// A native connection's frames: a 4-byte length, then a postcard body.
struct NativeFrames(TlsReader);

impl FrameSource for NativeFrames {
    async fn next_frame(&mut self, max_frame: usize) -> Incoming {
        match read_frame(&mut self.0, max_frame).await {
            None => Incoming::End,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Incoming::TooLarge,
            Some(Err(_)) => Incoming::End,
            Some(Ok(bytes)) => match conclave_proto::decode_client(&bytes) {
                Ok(f) => Incoming::Frame(f),
                Err(e) => Incoming::Malformed(e.to_string()),
            },
        }
    }
}

/// A native client's connection after TLS: the hello, then the session.
///
/// A task's future is as large as its largest await point, and idle connections are counted
/// in thousands: the handshake (a TLS connection being set up) and the end of the session are
/// boxed, so only the request loop's small state stays in the task while it waits.
pub async fn run_native(shared: Arc<Shared>, link: TlsLink, peer: SocketAddr) {
    let Some(link) = Box::pin(hello(link, peer)).await else {
        return;
    };
    let params = link.params();
    let TlsLink {
        reader,
        writer: write_half,
        counters,
        ..
    } = link;
    serve(
        shared,
        peer,
        params,
        counters,
        NativeFrames(reader),
        move |queue, outbox| {
            tokio::spawn(async move {
                // A writer that could not deliver its goodbye has a peer that stopped reading.
                let (w, delivered) = outbox::writer(write_half, queue, outbox).await;
                if !delivered {
                    w.reset();
                }
            })
        },
    )
    .await
}

/// The TLS handshake, within the handshake timeout; `None` when the connection ends there.
pub async fn accept_tls(
    shared: &Shared,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsLink> {
    let deadline = Instant::now() + shared.config().limits.handshake_timeout();
    let counters = Arc::new(Counters::default());
    let accept = tls_stream::accept(tcp, acceptor.config().clone(), counters.clone());
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok((reader, writer))) => Some(TlsLink {
            reader,
            writer,
            counters,
            deadline,
        }),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// The protocol hello, within what is left of the handshake timeout; `None` when the
/// connection ends there.
async fn hello(link: TlsLink, peer: SocketAddr) -> Option<TlsLink> {
    let TlsLink {
        mut reader,
        mut writer,
        counters,
        deadline: handshake_deadline,
    } = link;
    let mut theirs = [0u8; HELLO_BYTES];
    match tokio::time::timeout_at(handshake_deadline, reader.read_exact(&mut theirs)).await {
        Ok(Ok(_)) => {}
        _ => {
            tracing::debug!(%peer, "no hello");
            return None;
        }
    }
    let hello_ok = match hello::decode(&theirs) {
        Ok(h) => h.version == PROTOCOL_VERSION,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "bad hello");
            return None;
        }
    };
    let status = if hello_ok {
        HelloStatus::Ok
    } else {
        HelloStatus::UnsupportedVersion
    };
    let ours = hello::encode(PROTOCOL_VERSION, status);
    if tokio::time::timeout_at(handshake_deadline, async {
        writer.write_all(&ours).await?;
        writer.flush().await
    })
    .await
    .map_or(true, |r| r.is_err())
        || !hello_ok
    {
        let _ = timeout(GOODBYE_TIMEOUT, writer.shutdown()).await;
        return None;
    }
    Some(TlsLink {
        reader,
        writer,
        counters,
        deadline: handshake_deadline,
    })
}

/// The request loop of a connection whose hello succeeded, and its end.
///
/// `spawn_writer` starts the task that writes the outbox's frames to the connection (and says
/// goodbye when it closes).
pub async fn serve<S: FrameSource>(
    shared: Arc<Shared>,
    peer: SocketAddr,
    params: LinkParams,
    counters: Arc<Counters>,
    mut frames: S,
    spawn_writer: impl FnOnce(OutboxQueue, Outbox) -> tokio::task::JoinHandle<()>,
) {
    let LinkParams {
        tls_version,
        cipher,
        kx_group,
    } = params;
    // A snapshot for the connection's lifetime (as a copy of the limits would be), shared.
    let config = shared.config();
    let limits = &config.limits;
    let (outbox, queue) = Outbox::new(limits.outbound_queue_frames, &shared.shutdown);
    let writer = spawn_writer(queue, outbox.clone());
    let mut conn = Conn {
        sid: shared.next_session_id(),
        shared: shared.clone(),
        peer,
        outbox: outbox.clone(),
        user: None,
        inflight: Arc::new(Semaphore::new(limits.max_inflight_sends)),
        device: None,
        presence_budget: None,
    };
    shared.audit(
        Kind::Connect,
        Fields::new()
            .ip(peer)
            .with("tls", tls_version)
            .with("cipher", cipher)
            .with("key_exchange", kx_group),
    );
    let connected_at = Instant::now();
    shared.registry.insert(ConnInfo {
        sid: conn.sid,
        peer,
        user: None,
        since_ms: crate::store::now_ms(),
        tls_version,
        cipher,
        kx_group,
        counters: counters.clone(),
        outbox: outbox.clone(),
        device: None,
    });
    let rate = RequestRate::new(limits, &config.files);
    let login_deadline = Instant::now() + limits.login_timeout();
    loop {
        let (deadline, max_frame) = match conn.user {
            None => (login_deadline, limits.max_frame_bytes),
            Some(_) => (
                Instant::now() + limits.idle_timeout(),
                limits.max_member_frame_bytes,
            ),
        };
        let next = tokio::select! {
            biased;
            _ = outbox.closed() => break,
            n = tokio::time::timeout_at(deadline, frames.next_frame(max_frame)) => n,
        };
        let frame = match next {
            Err(_) => {
                let message = match conn.user {
                    None => format!(
                        "no login within {}; log in right after connecting",
                        human_ms(limits.login_timeout_ms)
                    ),
                    Some(_) => format!(
                        "nothing received for {}; clients send a ping to stay connected",
                        human_ms(limits.idle_timeout_ms)
                    ),
                };
                outbox.close(DisconnectReason::Timeout, message);
                break;
            }
            Ok(Incoming::End) => break,
            Ok(Incoming::TooLarge) => {
                outbox.close(
                    DisconnectReason::TooLarge,
                    format!("a frame was larger than the server's limit of {max_frame} bytes"),
                );
                tracing::info!(%peer, user = ?conn.user, "connection closed: oversize frame");
                break;
            }
            Ok(Incoming::Malformed(e)) => {
                counters
                    .frames_in
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                outbox.close(DisconnectReason::Malformed, e);
                tracing::info!(%peer, user = ?conn.user, "connection closed: malformed frame");
                break;
            }
            Ok(Incoming::Frame(frame)) => frame,
        };
        counters
            .frames_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        counters.note_request(&frame.req);
        // File chunks have their own budget (they come by the thousand in a transfer): over
        // it they wait rather than fail.
        if matches!(
            frame.req,
            Request::FileChunk { .. } | Request::FileFetch { .. }
        ) {
            Box::pin(rate.chunks.until_ready()).await;
        } else if !matches!(frame.req, Request::Quit) && !rate.allow() {
            if rate.first_strike() {
                let mut f = Fields::new().ip(peer).reason("rate_limited");
                if let Some(u) = &conn.user {
                    f = f.user(u);
                }
                shared.audit(Kind::Limit, f);
            }
            if rate.strike() {
                outbox.close(
                    DisconnectReason::Flooding,
                    format!(
                        "more than {} requests per second for too long; slow down",
                        limits.requests_per_second
                    ),
                );
                tracing::info!(%peer, user = ?conn.user, "connection closed: flooding");
                break;
            }
            conn.reply(
                frame.id,
                Err(ErrorBody::new(
                    ErrorCode::RateLimited,
                    format!(
                        "too many requests: at most {} per second; this one was not done, retry it later",
                        limits.requests_per_second
                    ),
                )),
            );
            continue;
        }
        // Boxed: the request handlers' state would otherwise sit inline in every idle
        // session's future (kilobytes per connection).
        if Box::pin(handle(&mut conn, frame)).await == Flow::Stop {
            break;
        }
    }
    // Boxed: only an ending connection needs this state.
    Box::pin(finish(conn, counters, connected_at, writer)).await;
}

/// Ends a session: records why, logs the user out, and lets the writer say goodbye.
async fn finish(
    conn: Conn,
    counters: Arc<Counters>,
    connected_at: Instant,
    writer: tokio::task::JoinHandle<()>,
) {
    let shared = &conn.shared;
    let outbox = &conn.outbox;
    let peer = conn.peer;
    shared.registry.remove(conn.sid);
    let (reason, message) = if outbox.is_closed() {
        outbox.reason()
    } else {
        (
            DisconnectReason::Quit,
            "the client closed the connection".to_string(),
        )
    };
    if matches!(
        reason,
        DisconnectReason::SlowConsumer
            | DisconnectReason::TooLarge
            | DisconnectReason::Malformed
            | DisconnectReason::Flooding
    ) {
        let mut f = Fields::new().ip(peer).reason(reason.as_str());
        if let Some(u) = &conn.user {
            f = f.user(u);
        }
        shared.audit(Kind::Limit, f);
    }
    let mut f = Fields::new()
        .ip(peer)
        .reason(reason.as_str())
        .with("detail", &message)
        .with("duration_ms", connected_at.elapsed().as_millis() as u64)
        .with(
            "bytes_in",
            counters.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
        )
        .with(
            "bytes_out",
            counters
                .bytes_out
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    if let Some(u) = &conn.user {
        f = f.user(u);
    }
    shared.audit(Kind::Disconnect, f);

    if conn.user.is_some() {
        cmd::auth::logout(&conn);
    }
    if shared.shutdown.is_cancelled() {
        outbox.close(
            DisconnectReason::Shutdown,
            "the server is shutting down; reconnect later",
        );
    } else {
        outbox.close(DisconnectReason::Quit, "goodbye");
    }
    let _ = timeout(GOODBYE_TIMEOUT * 2, writer).await;
}

/// A connection's request budget: a token bucket, and the count of recent refusals.
struct RequestRate {
    bucket: governor::DefaultDirectRateLimiter,
    /// File chunks (uploads and downloads).
    chunks: governor::DefaultDirectRateLimiter,
    strikes: std::cell::Cell<u32>,
    since: std::cell::Cell<Instant>,
    max_strikes: u32,
}

/// Refusals are counted over this window.
const STRIKE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl RequestRate {
    fn new(limits: &crate::config::Limits, files: &crate::config::FilesConfig) -> Self {
        let chunks =
            std::num::NonZeroU32::new(files.chunks_per_second).unwrap_or(std::num::NonZeroU32::MIN);
        let per_s = std::num::NonZeroU32::new(limits.requests_per_second)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst =
            std::num::NonZeroU32::new(limits.request_burst).unwrap_or(std::num::NonZeroU32::MIN);
        RequestRate {
            bucket: governor::RateLimiter::direct(
                governor::Quota::per_second(per_s).allow_burst(burst),
            ),
            chunks: governor::RateLimiter::direct(governor::Quota::per_second(chunks)),
            strikes: std::cell::Cell::new(0),
            since: std::cell::Cell::new(Instant::now()),
            max_strikes: limits.rate_strikes_before_disconnect,
        }
    }

    fn allow(&self) -> bool {
        self.bucket.check().is_ok()
    }

    /// Whether no refusal was counted in the current window yet.
    fn first_strike(&self) -> bool {
        self.strikes.get() == 0 || self.since.get().elapsed() > STRIKE_WINDOW
    }

    /// Counts a refusal; true when there were too many recently.
    fn strike(&self) -> bool {
        if self.since.get().elapsed() > STRIKE_WINDOW {
            self.since.set(Instant::now());
            self.strikes.set(0);
        }
        self.strikes.set(self.strikes.get() + 1);
        self.strikes.get() > self.max_strikes
    }
}

/// "300 ms", "30 s": a duration for people.
fn human_ms(ms: u64) -> String {
    if ms < 1000 || !ms.is_multiple_of(1000) {
        format!("{ms} ms")
    } else {
        format!("{} s", ms / 1000)
    }
}

/// Reads one frame: the 4-byte length, refused before any allocation when over `max`, then
/// exactly that many bytes. No buffer is kept between frames, so an idle connection holds
/// none. `None` at a clean end of stream. Not cancel-safe: the caller drops the connection
/// whenever it stops waiting.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Option<std::io::Result<Vec<u8>>> {
    let mut len = [0u8; conclave_proto::FRAME_HEADER_BYTES];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) => return Some(Err(e)),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Some(Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        )));
    }
    // Grown as the bytes arrive: a length prefix alone reserves nothing.
    let mut body = Vec::with_capacity(n.min(READ_RESERVE_BYTES));
    match (&mut *r).take(n as u64).read_to_end(&mut body).await {
        Ok(got) if got == n => Some(Ok(body)),
        Ok(_) => Some(Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection ended inside a frame",
        ))),
        Err(e) => Some(Err(e)),
    }
}

/// What a frame's buffer starts with; larger frames grow it as their bytes arrive.
const READ_RESERVE_BYTES: usize = 64 * 1024;

/// Whether the session goes on after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

fn not_logged_in() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotLoggedIn,
        "log in (or register) first: that must be the first request",
    )
}

async fn handle(conn: &mut Conn, frame: ClientFrame) -> Flow {
    let ClientFrame { id, req } = frame;
    let result = match (conn.user.clone(), req) {
        (_, Request::Ping { nonce }) => Ok(Reply::Pong { nonce }),
        (_, Request::Quit) => {
            conn.reply(id, Ok(Reply::Ok));
            conn.outbox
                .close(DisconnectReason::Quit, "goodbye: you asked to quit");
            return Flow::Stop;
        }
        (
            None,
            Request::Login {
                user,
                password,
                server_password,
                resume,
            },
        ) => match cmd::auth::login(conn, id, user, password, server_password, resume).await {
            // Answered inside, ahead of the catch-up it starts.
            Ok(()) => return Flow::Continue,
            Err(e) => Err(e),
        },
        (
            None,
            Request::Register {
                user,
                password,
                server_password,
                invite_code,
            },
        ) => {
            match cmd::auth::register(conn, id, user, password, server_password, invite_code).await
            {
                Ok(()) => return Flow::Continue,
                Err(e) => Err(e),
            }
        }
        (None, _) => Err(not_logged_in()),
        (Some(_), Request::Login { .. } | Request::Register { .. }) => Err(ErrorBody::new(
            ErrorCode::AlreadyLoggedIn,
            "this connection is already logged in; open another connection for another account",
        )),
        (
            Some(user),
            Request::Send {
                target,
                body,
                idempotency_key,
                refs,
            },
        ) => match cmd::send::send(conn, &user, id, target, body, idempotency_key, refs).await {
            // Answered by the dispatcher once the message is durable.
            Ok(()) => return Flow::Continue,
            Err(e) => Err(e),
        },
        (Some(user), Request::Announce { text }) => cmd::send::announce(conn, &user, text),
        (
            Some(user),
            Request::Search {
                query,
                room,
                limit,
                before,
            },
        ) => cmd::history::search(conn, &user, query, room, limit, before).await,
        (Some(user), Request::Ack { cursors }) => cmd::history::ack(conn, &user, cursors).await,
        (
            Some(user),
            Request::Kick {
                room,
                user: target,
                reason,
            },
        ) => cmd::moderation::kick(conn, &user, room, target, reason).await,
        (Some(user), Request::VoteKick { room, user: target }) => {
            cmd::moderation::votekick(conn, &user, room, target).await
        }
        (
            Some(user),
            Request::Ban {
                user: target,
                ip,
                duration_s,
                reason,
            },
        ) => cmd::moderation::ban(conn, &user, target, ip, duration_s, reason).await,
        (Some(user), Request::Unban { user: target, ip }) => {
            cmd::moderation::unban(conn, &user, target, ip).await
        }
        (Some(user), Request::SetRoom { room, votekick }) => {
            cmd::moderation::set_room(conn, &user, room, votekick).await
        }
        (
            Some(user),
            Request::CreateRoom {
                room,
                private,
                password,
            },
        ) => cmd::rooms::create(conn, &user, room, private, password).await,
        (Some(user), Request::Join { room, password }) => {
            cmd::rooms::join(conn, &user, room, password).await
        }
        (Some(user), Request::Part { room }) => cmd::rooms::part(conn, &user, room).await,
        (
            Some(user),
            Request::Invite {
                room,
                user: invitee,
            },
        ) => cmd::rooms::invite(conn, &user, room, invitee).await,
        (Some(user), Request::Rooms) => {
            let mut rooms = conn.shared.hub.lock().rooms_visible(&user);
            for r in &mut rooms {
                r.e2ee = conn.shared.e2ee.is_e2ee(&format!("r:{}", r.room));
            }
            cmd::presence::fill_rooms(conn, &mut rooms);
            Ok(Reply::Rooms(rooms))
        }
        (Some(user), Request::Who { room }) => {
            let users = conn.shared.hub.lock().who(&user, room.as_deref());
            users.map(|mut users| {
                cmd::presence::fill_users(conn, &mut users);
                Reply::Users(users)
            })
        }
        (
            Some(user),
            Request::History {
                conv,
                limit,
                before,
            },
        ) => cmd::history::history(conn, &user, conv, limit, before).await,
        (
            Some(user),
            Request::FileOffer {
                target,
                name,
                size,
                sha256,
                p2p,
            },
        ) => cmd::files::offer(conn, &user, target, name, size, sha256, p2p).await,
        (Some(user), Request::FileStatus { file_id }) => {
            cmd::files::status(conn, &user, file_id).await
        }
        (
            Some(user),
            Request::FileChunk {
                file_id,
                offset,
                data,
            },
        ) => cmd::files::chunk(conn, &user, file_id, offset, data).await,
        (Some(user), Request::FileFetch { file_id, offset }) => {
            cmd::files::fetch(conn, &user, file_id, offset).await
        }
        (Some(user), Request::FileDecline { file_id }) => {
            cmd::files::answer(conn, &user, file_id, None).await
        }
        (Some(user), Request::FileReceived { file_id, via_p2p }) => {
            cmd::files::answer(conn, &user, file_id, Some(via_p2p)).await
        }
        (Some(user), Request::FileWantRelay { file_id }) => {
            cmd::files::want_relay(conn, &user, file_id).await
        }
        (Some(user), Request::FileCancel { file_id }) => {
            cmd::files::cancel(conn, &user, file_id).await
        }
        (Some(user), Request::Files) => cmd::files::pending(conn, &user).await.map(Reply::Files),
        (
            Some(user),
            Request::E2eePublish {
                device,
                key_packages,
            },
        ) => match cmd::e2ee::publish(conn, &user, id, device, key_packages).await {
            // Answered inside, ahead of the Welcomes that waited.
            Ok(()) => return Flow::Continue,
            Err(e) => Err(e),
        },
        (Some(_), Request::E2eeClaim { users }) => cmd::e2ee::claim(conn, users).await,
        (Some(user), Request::E2eeCreate { conv, group_info }) => {
            cmd::e2ee::create(conn, &user, conv, group_info).await
        }
        (Some(user), Request::E2eeGroupInfo { conv }) => {
            cmd::e2ee::group_info(conn, &user, conv).await
        }
        (
            Some(user),
            Request::E2eeCommit {
                conv,
                commit,
                group_info,
                welcome,
            },
        ) => match cmd::e2ee::commit(conn, &user, id, conv, commit, group_info, welcome).await {
            // Answered by the dispatcher once the commit is durable.
            Ok(()) => return Flow::Continue,
            Err(e) => Err(e),
        },
        (Some(user), Request::E2eeWelcomeDone { id: wid }) => match conn.device.clone() {
            Some(device) => conn
                .shared
                .store
                .call(move |db| db.e2ee_welcome_done(&user, &device, wid))
                .await
                .map(|()| Reply::Ok)
                .map_err(cmd::store_error),
            None => Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "publish this connection's device first (E2eePublish)",
            )),
        },
        (Some(_), Request::E2eeDevices { user }) => cmd::e2ee::devices(conn, user).await,
        (Some(user), Request::MessageInfo { msg_id }) => {
            cmd::chat::message_info(conn, &user, msg_id).await
        }
        (
            Some(user),
            Request::Thread {
                msg_id,
                limit,
                after,
            },
        ) => cmd::chat::thread(conn, &user, msg_id, limit, after).await,
        (Some(user), Request::E2eeConvs) => Ok(cmd::e2ee::convs(conn, &user)),
        // Everyday chat, part B: typing, read markers, topics, away, display names.
        (
            Some(user),
            req @ (Request::Typing { .. }
            | Request::Read { .. }
            | Request::ReadMarkers { .. }
            | Request::ShareReads { .. }
            | Request::SetTopic { .. }
            | Request::Away { .. }
            | Request::SetDisplayName { .. }),
        ) => cmd::presence::handle(conn, &user, req).await,
        // Devices (issue 21): history for new devices, recovery-key backups.
        (
            Some(user),
            Request::DeviceAnnounce {
                transfer_key,
                signature,
            },
        ) => cmd::devices::announce(conn, &user, transfer_key, signature).await,
        (Some(user), Request::DeviceDecide { device, approve }) => {
            cmd::devices::decide(conn, &user, device, approve).await
        }
        (
            Some(user),
            Request::TransferPut {
                device,
                transfer,
                index,
                data,
            },
        ) => cmd::devices::put(conn, &user, device, transfer, index, data).await,
        (Some(user), Request::TransferFetch { after }) => {
            cmd::devices::fetch(conn, &user, after).await
        }
        (Some(user), Request::TransferAck { through }) => {
            cmd::devices::ack(conn, &user, through).await
        }
        (
            Some(user),
            Request::BackupPut {
                key_id,
                index,
                data,
            },
        ) => cmd::devices::backup_put(conn, &user, key_id, index, data).await,
        (Some(user), Request::BackupFetch { key_id, after }) => {
            cmd::devices::backup_fetch(conn, &user, key_id, after).await
        }
        (Some(user), Request::BackupDrop { keep }) => {
            cmd::devices::backup_drop(conn, &user, keep).await
        }
    };
    if let Err(e) = &result
        && e.code == ErrorCode::Internal
    {
        let mut f = Fields::new().ip(conn.peer).reason(e.message.clone());
        if let Some(u) = &conn.user {
            f = f.user(u);
        }
        conn.shared.audit(Kind::Error, f);
    }
    conn.reply(id, result);
    Flow::Continue
}
