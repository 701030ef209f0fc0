//! The sending side: one QUIC endpoint per offer, serving every recipient in its own task.

use std::io::SeekFrom;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout};

use crate::tokens::{AllowError, Refusal, Tokens};
use crate::wire::{self, Ack, Request, Response, Status, close};
use crate::{P2pError, Window, net, tls};

/// Bytes read from the file and written to the stream at a time. The file is never loaded
/// whole; at most this much per recipient sits in our buffer, plus quinn's send window.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// How long a refused peer's connection is kept open so the status header can arrive before
/// the connection is closed (the close code says the same, so losing the header is harmless).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The sender's bounds. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct SenderLimits {
    /// Recipients served at once; more connections are refused at the QUIC level (the receiver
    /// gets [`P2pError::Refused`]). Default 16.
    pub max_peers: usize,
    /// Tokens that may be registered with [`P2pSender::allow`]. Default 1,024.
    pub max_tokens: usize,
    /// Time for a peer to finish the handshake, open its stream and send its request.
    /// Default 10 s.
    pub request_timeout: Duration,
    /// QUIC idle timeout; keep-alives are sent every third of it. Default 30 s.
    pub idle_timeout: Duration,
    /// Total lifetime of the offer: the endpoint closes (cutting transfers in progress) this
    /// long after start. Default 1 hour.
    pub lifetime: Duration,
    /// Time the receiver has, after the last byte, to confirm it verified the file (it syncs
    /// and hashes first). Default 60 s.
    pub completion_timeout: Duration,
}

impl Default for SenderLimits {
    fn default() -> Self {
        SenderLimits {
            max_peers: 16,
            max_tokens: 1024,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            lifetime: Duration::from_secs(3600),
            completion_timeout: Duration::from_secs(60),
        }
    }
}

/// Where one token's transfer stands. Index `i` of [`P2pSender::progress`] is the `i`-th token
/// registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenProgress {
    /// The label given to [`P2pSender::allow`] (for example the recipient's name).
    pub label: String,
    /// The end of what was last sent: the resume offset plus the bytes written since.
    pub sent: u64,
    /// A connection is transferring with this token now.
    pub active: bool,
    /// The recipient verified the whole file; the token is spent.
    pub done: bool,
    /// Why the last attempt with this token failed, if it did (it may be retried).
    pub error: Option<String>,
}

struct Shared {
    path: PathBuf,
    size: u64,
    sha256: [u8; 32],
    limits: SenderLimits,
    tokens: Mutex<Tokens>,
    progress: watch::Sender<Vec<TokenProgress>>,
}

impl Shared {
    fn tokens(&self) -> MutexGuard<'_, Tokens> {
        // A panic while holding the lock cannot leave the table half-updated (each method
        // makes one assignment), so a poisoned lock is still usable.
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut TokenProgress)) {
        self.progress.send_modify(|all| {
            if let Some(p) = all.get_mut(index) {
                f(p)
            }
        });
    }
}

/// One offer being served directly. Dropping it (or [`P2pSender::close`]) stops the endpoint
/// and cuts any transfer in progress.
pub struct P2pSender {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    fingerprint: [u8; 32],
    expires: Instant,
    accept_task: JoinHandle<()>,
}

impl P2pSender {
    /// Starts serving `path` (which must be `size` bytes long; `sha256` is the caller's hash of
    /// it, sent to receivers so they can refuse a wrong file early) on `bind` with a fresh
    /// certificate. Register the recipients' tokens with [`P2pSender::allow`].
    pub async fn start(
        path: impl Into<PathBuf>,
        size: u64,
        sha256: [u8; 32],
        bind: SocketAddr,
        window: Window,
        limits: SenderLimits,
    ) -> Result<P2pSender, P2pError> {
        let path = path.into();
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(P2pError::io(&path))?;
        if !meta.is_file() || meta.len() != size {
            return Err(P2pError::Setup(format!(
                "{} is {} bytes, not the {size} bytes offered; offer the file again",
                path.display(),
                meta.len()
            )));
        }
        if limits.max_peers == 0 || limits.max_tokens == 0 {
            return Err(P2pError::Setup(
                "max_peers and max_tokens must be at least 1".to_string(),
            ));
        }
        let identity = tls::generate_identity()?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(&identity)?));
        // Each peer opens one stream, the file stream; nothing else.
        config.transport_config(Arc::new(window.transport_config(limits.idle_timeout, 1)?));
        config.max_incoming(limits.max_peers);
        let endpoint = net::endpoint(bind, Some(config)).map_err(|e| {
            P2pError::Setup(format!(
                "cannot listen on UDP {bind}: {e}; choose another address or port"
            ))
        })?;
        let expires = Instant::now() + limits.lifetime;
        let (progress, _) = watch::channel(Vec::new());
        let shared = Arc::new(Shared {
            path,
            size,
            sha256,
            tokens: Mutex::new(Tokens::new(limits.max_tokens)),
            limits,
            progress,
        });
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), shared.clone(), expires));
        Ok(P2pSender {
            endpoint,
            shared,
            fingerprint: identity.fingerprint,
            expires,
            accept_task,
        })
    }

    /// SHA-256 of this offer's certificate (DER): what the server passes to the recipients.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, P2pError> {
        self.endpoint
            .local_addr()
            .map_err(|e| P2pError::Setup(format!("cannot read the bound address: {e}")))
    }

    /// Addresses a recipient may try. For a specific bind address, that address. For an
    /// unspecified one (`0.0.0.0`, `[::]`), the address the machine would use towards the
    /// internet (found by asking the routing table, no packet is sent), or loopback when there
    /// is no route. Addresses seen from outside a NAT are the server's business, not ours.
    pub fn local_addrs(&self) -> Result<Vec<SocketAddr>, P2pError> {
        let bound = self.local_addr()?;
        if !bound.ip().is_unspecified() {
            return Ok(vec![bound]);
        }
        let ip = routable_ip(bound.is_ipv6()).unwrap_or(if bound.is_ipv6() {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        });
        Ok(vec![SocketAddr::new(ip, bound.port())])
    }

    /// When the offer expires and the endpoint closes.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Registers a recipient's one-time token, with a label for progress reports. May be called
    /// at any time while the offer runs.
    pub fn allow(&self, token: [u8; 32], label: impl Into<String>) -> Result<(), P2pError> {
        let mut tokens = self.shared.tokens();
        match tokens.allow(token) {
            Ok(_) => {
                // Pushed under the token lock, so progress indices match token indices.
                self.shared.progress.send_modify(|all| {
                    all.push(TokenProgress {
                        label: label.into(),
                        sent: 0,
                        active: false,
                        done: false,
                        error: None,
                    })
                });
                Ok(())
            }
            Err(AllowError::Duplicate) => Err(P2pError::Setup(
                "this token is already registered for the offer; give each recipient its own"
                    .to_string(),
            )),
            Err(AllowError::Full) => Err(P2pError::Setup(format!(
                "the offer already has {} tokens, its limit; raise max_tokens or send through the relay",
                self.shared.limits.max_tokens
            ))),
        }
    }

    /// A snapshot of every token's progress.
    pub fn progress(&self) -> Vec<TokenProgress> {
        self.shared.progress.borrow().clone()
    }

    /// A receiver that wakes at every change of progress.
    pub fn subscribe(&self) -> watch::Receiver<Vec<TokenProgress>> {
        self.shared.progress.subscribe()
    }

    /// Waits until every registered token is done, for at most `limit`. Returns whether they
    /// all are.
    pub async fn wait_all_done(&self, limit: Duration) -> bool {
        let mut rx = self.subscribe();
        let all_done = |p: &Vec<TokenProgress>| p.iter().all(|t| t.done);
        timeout(limit, rx.wait_for(all_done))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops the endpoint: transfers in progress are cut (their tokens stay unspent).
    pub fn close(&self) {
        self.accept_task.abort();
        self.endpoint
            .close(VarInt::from_u32(close::SHUTDOWN), b"sender closed");
    }
}

impl Drop for P2pSender {
    fn drop(&mut self) {
        self.close();
    }
}

/// The local address the routing table picks for reaching the internet, if any. Connecting a
/// UDP socket only looks up the route; nothing is sent. The targets are documentation
/// addresses (RFC 5737, RFC 3849) so nothing real is named.
fn routable_ip(v6: bool) -> Option<IpAddr> {
    let (bind, probe): (SocketAddr, SocketAddr) = if v6 {
        (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9).into(),
        )
    } else {
        (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            (Ipv4Addr::new(192, 0, 2, 1), 9).into(),
        )
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>, expires: Instant) {
    // Owning the peers' tasks here means aborting this loop aborts them all.
    let mut peers = JoinSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(expires) => {
                endpoint.close(VarInt::from_u32(close::EXPIRED), b"offer expired");
                break;
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if peers.len() >= shared.limits.max_peers {
                    tracing::debug!(peer = %incoming.remote_address(), "p2p: refused, at max_peers");
                    incoming.refuse();
                    continue;
                }
                peers.spawn(serve_peer(incoming, shared.clone()));
            }
            Some(_) = peers.join_next(), if !peers.is_empty() => {}
        }
    }
    // Let the transfers in flight end with the endpoint's close.
    while tokio::time::timeout(REFUSAL_LINGER, peers.join_next())
        .await
        .is_ok_and(|r| r.is_some())
    {}
}

/// A claimed token; dropping it without [`Claim::complete`] makes the token usable again.
struct Claim<'a> {
    shared: &'a Shared,
    index: usize,
    completed: bool,
}

impl Claim<'_> {
    fn complete(mut self) {
        self.shared.tokens().complete(self.index);
        self.shared.update(self.index, |p| {
            p.active = false;
            p.done = true;
            p.sent = self.shared.size;
            p.error = None;
        });
        self.completed = true;
    }

    fn fail(&self, why: String) {
        self.shared.update(self.index, |p| p.error = Some(why));
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.completed {
            self.shared.tokens().release(self.index);
            self.shared.update(self.index, |p| p.active = false);
        }
    }
}

/// How a peer's connection ends: the close code and reason.
struct End(u32, &'static str);

async fn serve_peer(incoming: Incoming, shared: Arc<Shared>) {
    let peer = incoming.remote_address();
    let conn = match timeout(shared.limits.request_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "p2p: handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "p2p: handshake timed out");
            return;
        }
    };
    let End(code, reason) = serve_connection(&conn, &shared).await;
    tracing::debug!(%peer, code, reason, "p2p: peer done");
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn serve_connection(conn: &Connection, shared: &Shared) -> End {
    let limit = shared.limits.request_timeout;
    let request = async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let mut buf = [0u8; wire::REQUEST_LEN];
        recv.read_exact(&mut buf).await.ok()?;
        Some((send, recv, buf))
    };
    let Ok(Some((mut send, recv, buf))) = timeout(limit, request).await else {
        return End(close::BAD_REQUEST, "no request in time");
    };
    let request = match Request::decode(&buf) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "p2p: bad request");
            refuse(&mut send, shared, Status::BadRequest, 0).await;
            return End(close::BAD_REQUEST, "bad request");
        }
    };
    let claimed = shared.tokens().claim(&request.token);
    let index = match claimed {
        Ok(index) => index,
        Err(refusal) => {
            let status = match refusal {
                Refusal::Unknown => Status::BadToken,
                Refusal::Used => Status::TokenUsed,
                Refusal::Busy => Status::TokenBusy,
            };
            refuse(&mut send, shared, status, request.offset).await;
            return End(close::refused(status), "token refused");
        }
    };
    let claim = Claim {
        shared,
        index,
        completed: false,
    };
    if request.offset > shared.size {
        claim.fail(format!(
            "asked to resume past the end, at {}",
            request.offset
        ));
        refuse(&mut send, shared, Status::BadOffset, request.offset).await;
        return End(close::refused(Status::BadOffset), "bad offset");
    }
    shared.update(index, |p| {
        p.active = true;
        p.sent = request.offset;
        p.error = None;
    });
    match transfer(&mut send, recv, shared, index, request.offset).await {
        Ok(()) => {
            claim.complete();
            End(close::DONE, "done")
        }
        Err((end, why)) => {
            claim.fail(why);
            end
        }
    }
}

/// Writes a refusal header and gives it a moment to arrive before the connection closes.
async fn refuse(send: &mut SendStream, shared: &Shared, status: Status, offset: u64) {
    let header = Response {
        status,
        size: shared.size,
        offset,
        sha256: shared.sha256,
    };
    if send.write_all(&header.encode()).await.is_ok() && send.finish().is_ok() {
        let _ = timeout(REFUSAL_LINGER, send.stopped()).await;
    }
}

/// Streams the file from `offset` and waits for the receiver's verdict.
async fn transfer(
    send: &mut SendStream,
    mut recv: RecvStream,
    shared: &Shared,
    index: usize,
    offset: u64,
) -> Result<(), (End, String)> {
    let lost = |e: &dyn std::fmt::Display| {
        (
            End(close::SHUTDOWN, "connection lost"),
            format!("connection lost: {e}"),
        )
    };
    let failed = |e: std::io::Error| {
        tracing::warn!(path = %shared.path.display(), error = %e, "p2p: cannot read the offered file");
        (
            End(close::SENDER_FAILED, "the sender cannot read its file"),
            format!("cannot read {}: {e}", shared.path.display()),
        )
    };
    let header = Response {
        status: Status::Ok,
        size: shared.size,
        offset,
        sha256: shared.sha256,
    };
    send.write_all(&header.encode())
        .await
        .map_err(|e| lost(&e))?;

    let mut file = tokio::fs::File::open(&shared.path).await.map_err(failed)?;
    file.seek(SeekFrom::Start(offset)).await.map_err(failed)?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut pos = offset;
    while pos < shared.size {
        let want = usize::try_from(shared.size - pos)
            .unwrap_or(CHUNK_BYTES)
            .min(CHUNK_BYTES);
        let n = file.read(&mut buf[..want]).await.map_err(failed)?;
        if n == 0 {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file shrank to {pos} bytes while being offered"),
            )));
        }
        send.write_all(&buf[..n]).await.map_err(|e| lost(&e))?;
        pos += n as u64;
        shared.update(index, |p| p.sent = pos);
    }
    send.finish().map_err(|e| lost(&e))?;

    let mut ack = [0u8; wire::ACK_LEN];
    match timeout(shared.limits.completion_timeout, recv.read_exact(&mut ack)).await {
        Err(_) => Err((
            End(close::BAD_REQUEST, "no verdict in time"),
            "the receiver did not confirm the file in time".to_string(),
        )),
        Ok(Err(e)) => Err(lost(&e)),
        Ok(Ok(())) => match Ack::decode(&ack) {
            Ok(Ack::Verified) => Ok(()),
            Ok(Ack::HashMismatch) => Err((
                End(close::DONE, "hash mismatch noted"),
                "the receiver's copy did not match the SHA-256; it may retry".to_string(),
            )),
            Err(e) => Err((
                End(close::BAD_REQUEST, "bad verdict"),
                format!("the receiver's verdict was malformed: {e}"),
            )),
        },
    }
}
