//! The receiving side: connect to the sender directly, check its certificate, fetch the file
//! into a part file (resuming if one exists), verify it.

use std::io::{Read, SeekFrom};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, ReadError, ReadExactError, TransportErrorCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use crate::sender::CHUNK_BYTES;
use crate::tls;
use crate::wire::{self, Ack, Request, Response, Status, close};
use crate::{P2pError, Window, net};

/// QUIC idle timeout on the receiving side (keep-alives every third of it).
pub const RECEIVER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the sender to answer the request once connected.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// A transfer that delivers no byte for this long is abandoned (and may be resumed).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// After confirming the file, how long to wait for the sender to close the connection.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Sender addresses tried at most (all at once, the first to answer wins).
pub const MAX_ADDRS: usize = 16;

/// What to fetch, from where, and how to recognise it. All of it comes from the server's offer,
/// except `dest_part`, `window` and `connect_timeout`.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The sender's addresses; all are tried at once (at most [`MAX_ADDRS`]).
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the sender's certificate (DER), as given by the server.
    pub fingerprint: [u8; 32],
    /// This recipient's one-time token.
    pub token: [u8; 32],
    /// The file's size in bytes.
    pub size: u64,
    /// The file's SHA-256.
    pub sha256: [u8; 32],
    /// Where the bytes go. If it exists, the transfer resumes after its current length. The
    /// caller renames it once [`fetch`] succeeds.
    pub dest_part: PathBuf,
    /// Flow-control windows of this side (its receive windows bound the transfer).
    pub window: Window,
    /// How long to try to connect before giving up with [`P2pError::Unreachable`].
    pub connect_timeout: Duration,
}

/// What a successful fetch achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchStats {
    /// Bytes received over the network this time (the file size less `resumed_from`).
    pub bytes: u64,
    /// From sending the request to receiving the last byte (the handshake and the final sync
    /// and check are not included).
    pub elapsed: Duration,
    /// `bytes / elapsed`.
    pub throughput_bytes_per_sec: f64,
    /// Bytes already in the part file when the fetch started.
    pub resumed_from: u64,
    /// Time taken to connect (QUIC and TLS handshake).
    pub connect_elapsed: Duration,
}

/// Fetches the offered file into `req.dest_part`, calling `progress(bytes_so_far, total)` as
/// data arrives. On success the part file holds the whole file, synced to disk and verified.
///
/// The part file is created if it does not exist (so it exists, possibly empty, even after
/// [`P2pError::Unreachable`]). On [`P2pError::HashMismatch`] the part file is **removed** (it cannot be known which bytes
/// are wrong), so a retry starts from zero. On any other error the part file keeps what arrived,
/// so a retry with the same token resumes.
pub async fn fetch<F>(req: FetchRequest, mut progress: F) -> Result<FetchStats, P2pError>
where
    F: FnMut(u64, u64) + Send,
{
    req.window.validate()?;
    let addrs: Vec<SocketAddr> = req.addrs.iter().copied().take(MAX_ADDRS).collect();
    if addrs.is_empty() {
        return Err(P2pError::Unreachable {
            addrs,
            timeout: Duration::ZERO,
        });
    }
    let (mut file, hasher, offset) = open_part(&req.dest_part, req.size).await?;

    let connect_started = Instant::now();
    let (_endpoints, conn) = connect(&addrs, &req).await?;
    let connect_elapsed = connect_started.elapsed();

    let outcome = exchange(&conn, &req, &mut file, hasher, offset, &mut progress).await;
    // Whatever happened, what was written stays written: a retry resumes from it.
    let flushed = file.flush().await;
    drop(file);
    match outcome {
        Ok((elapsed, mut send)) => {
            flushed.map_err(P2pError::io(&req.dest_part))?;
            // The sender spends the token on this verdict and then closes the connection.
            let verdict = async {
                send.write_all(&Ack::Verified.encode()).await.ok()?;
                send.finish().ok()?;
                conn.closed().await;
                Some(())
            };
            if timeout(CLOSE_WAIT, verdict).await.is_err() {
                conn.close(quinn::VarInt::from_u32(0), b"done");
            }
            let bytes = req.size - offset;
            let secs = elapsed.as_secs_f64();
            Ok(FetchStats {
                bytes,
                elapsed,
                throughput_bytes_per_sec: if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
                resumed_from: offset,
                connect_elapsed,
            })
        }
        Err(Failure::Mismatch(mut send, actual)) => {
            let _ = tokio::fs::remove_file(&req.dest_part).await;
            let _ = timeout(CLOSE_WAIT, async {
                send.write_all(&Ack::HashMismatch.encode()).await.ok()?;
                send.finish().ok()?;
                conn.closed().await;
                Some(())
            })
            .await;
            conn.close(quinn::VarInt::from_u32(0), b"hash mismatch");
            Err(P2pError::HashMismatch {
                expected: hex(&req.sha256),
                actual: hex(&actual),
                path: req.dest_part.clone(),
            })
        }
        Err(Failure::Other(e)) => {
            conn.close(quinn::VarInt::from_u32(0), b"giving up");
            Err(e)
        }
    }
}

enum Failure {
    /// The file arrived whole but hashes to this instead.
    Mismatch(quinn::SendStream, [u8; 32]),
    Other(P2pError),
}

impl From<P2pError> for Failure {
    fn from(e: P2pError) -> Self {
        Failure::Other(e)
    }
}

/// Opens (or creates) the part file, hashes what it already holds and positions it at the end.
/// A part file longer than the offered size cannot be a prefix of it, so it is emptied.
async fn open_part(path: &Path, size: u64) -> Result<(tokio::fs::File, Sha256, u64), P2pError> {
    let owned = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || -> Result<_, std::io::Error> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&owned)?;
        let mut len = file.metadata()?.len();
        if len > size {
            tracing::warn!(path = %owned.display(), len, size, "p2p: part file longer than the offer; starting over");
            file.set_len(0)?;
            len = 0;
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut hashed = 0u64;
        while hashed < len {
            let want = usize::try_from(len - hashed)
                .unwrap_or(CHUNK_BYTES)
                .min(CHUNK_BYTES);
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            hashed += n as u64;
        }
        Ok((file, hasher, hashed))
    })
    .await
    .map_err(|e| P2pError::Setup(format!("the part file task failed: {e}")))?;
    let (file, hasher, offset) = opened.map_err(P2pError::io(path))?;
    let mut file = tokio::fs::File::from_std(file);
    file.seek(SeekFrom::Start(offset))
        .await
        .map_err(P2pError::io(path))?;
    // Anything past what was hashed (a file that shrank meanwhile) is cut off.
    file.set_len(offset).await.map_err(P2pError::io(path))?;
    Ok((file, hasher, offset))
}

/// Tries every address at once; the first verified connection wins.
async fn connect(
    addrs: &[SocketAddr],
    req: &FetchRequest,
) -> Result<(Vec<Endpoint>, Connection), P2pError> {
    let (crypto, verifier) = tls::client_crypto(req.fingerprint)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // The sender never opens streams towards us.
    config.transport_config(Arc::new(
        req.window.transport_config(RECEIVER_IDLE_TIMEOUT, 0)?,
    ));
    let mut endpoints = Vec::new();
    let mut attempts = JoinSet::new();
    for family_v6 in [false, true] {
        let family: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == family_v6)
            .collect();
        if family.is_empty() {
            continue;
        }
        let bind: SocketAddr = if family_v6 {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = net::endpoint(bind, None)
            .map_err(|e| P2pError::Setup(format!("cannot open a UDP socket on {bind}: {e}")))?;
        for addr in family {
            match endpoint.connect_with(config.clone(), addr, tls::SERVER_NAME) {
                Ok(connecting) => {
                    attempts.spawn(connecting);
                }
                Err(e) => tracing::debug!(%addr, error = %e, "p2p: cannot try address"),
            }
        }
        endpoints.push(endpoint);
    }

    let unreachable = || P2pError::Unreachable {
        addrs: addrs.to_vec(),
        timeout: req.connect_timeout,
    };
    let deadline = Instant::now() + req.connect_timeout;
    let mut best: Option<P2pError> = None;
    loop {
        let next = tokio::time::timeout_at(deadline, attempts.join_next()).await;
        let result = match next {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(join))) => {
                tracing::debug!(error = %join, "p2p: connect task failed");
                continue;
            }
            Ok(Some(Ok(result))) => result,
        };
        match result {
            Ok(conn) => return Ok((endpoints, conn)),
            Err(e) => {
                tracing::debug!(error = %e, "p2p: connect attempt failed");
                let mapped = match connection_error(&e, req) {
                    // Timeouts and resets of one address mean no more than "unreachable".
                    P2pError::Connection(_) => None,
                    other => Some(other),
                };
                if let Some(err) = mapped
                    && best.as_ref().is_none_or(|b| rank(&err) > rank(b))
                {
                    best = Some(err);
                }
            }
        }
    }
    attempts.abort_all();
    if let Some(actual) = verifier.refused() {
        return Err(P2pError::FingerprintMismatch {
            expected: hex(&req.fingerprint),
            actual: hex(&actual),
        });
    }
    Err(best.unwrap_or_else(unreachable))
}

/// Which connect failure to report when all fail: the most telling one.
fn rank(e: &P2pError) -> u8 {
    match e {
        P2pError::FingerprintMismatch { .. } => 3,
        P2pError::Refused => 2,
        P2pError::Closed { .. } => 1,
        _ => 0,
    }
}

/// Sends the request, reads the answer, receives and checks the file.
async fn exchange<F: FnMut(u64, u64)>(
    conn: &Connection,
    req: &FetchRequest,
    file: &mut tokio::fs::File,
    mut hasher: Sha256,
    offset: u64,
    progress: &mut F,
) -> Result<(Duration, quinn::SendStream), Failure> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| connection_error(&e, req))?;
    let started = Instant::now();
    let request = Request {
        token: req.token,
        offset,
    };
    send.write_all(&request.encode())
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => connection_error(&e, req),
            other => P2pError::Connection(other.to_string()),
        })?;

    let mut header = [0u8; wire::RESPONSE_LEN];
    match timeout(RESPONSE_TIMEOUT, recv.read_exact(&mut header)).await {
        Err(_) => {
            return Err(P2pError::Connection(format!(
                "the sender did not answer within {RESPONSE_TIMEOUT:?}"
            ))
            .into());
        }
        Ok(Err(ReadExactError::FinishedEarly(n))) => {
            return Err(P2pError::Protocol(format!(
                "the answer ended after {n} of {} bytes",
                wire::RESPONSE_LEN
            ))
            .into());
        }
        Ok(Err(ReadExactError::ReadError(e))) => return Err(read_error(&e, req).into()),
        Ok(Ok(())) => {}
    }
    let response = Response::decode(&header).map_err(|e| P2pError::Protocol(e.to_string()))?;
    if response.status != Status::Ok {
        return Err(status_error(response.status, offset, response.size).into());
    }
    if response.size != req.size || response.sha256 != req.sha256 {
        return Err(P2pError::OfferMismatch {
            our_size: req.size,
            their_size: response.size,
        }
        .into());
    }
    if response.offset != offset {
        return Err(P2pError::Protocol(format!(
            "asked to resume at {offset}, the sender answered {}",
            response.offset
        ))
        .into());
    }

    // Stream reads return a datagram's worth at a time; gather them into one chunk per file
    // write (each write is a trip to a blocking thread).
    let mut pos = offset; // bytes in the file
    let mut filled = 0usize; // bytes in `buf` not yet written
    let mut cut: Option<P2pError> = None;
    progress(pos, req.size);
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match timeout(STALL_TIMEOUT, recv.read(&mut buf[filled..])).await {
            Err(_) => {
                cut = Some(P2pError::Connection(format!(
                    "no data for {STALL_TIMEOUT:?} at byte {}",
                    pos + filled as u64
                )));
                break;
            }
            Ok(Err(e)) => {
                cut = Some(read_error(&e, req));
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(n))) => n,
        };
        filled += n;
        if pos + filled as u64 > req.size {
            return Err(P2pError::Protocol(format!(
                "the sender sent more than the {} bytes offered",
                req.size
            ))
            .into());
        }
        if filled == buf.len() {
            write_chunk(file, &mut hasher, &buf[..filled], &req.dest_part).await?;
            pos += filled as u64;
            filled = 0;
            progress(pos, req.size);
        }
    }
    // Keep what arrived before a cut, so a retry resumes after it.
    if filled > 0 {
        write_chunk(file, &mut hasher, &buf[..filled], &req.dest_part).await?;
        pos += filled as u64;
        progress(pos, req.size);
    }
    if let Some(e) = cut {
        return Err(e.into());
    }
    let elapsed = started.elapsed();
    if pos != req.size {
        return Err(P2pError::Protocol(format!(
            "the sender ended the file at byte {pos} of {}",
            req.size
        ))
        .into());
    }
    file.flush().await.map_err(P2pError::io(&req.dest_part))?;
    file.sync_all()
        .await
        .map_err(P2pError::io(&req.dest_part))?;
    let actual: [u8; 32] = hasher.finalize().into();
    if actual != req.sha256 {
        return Err(Failure::Mismatch(send, actual));
    }
    Ok((elapsed, send))
}

async fn write_chunk(
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    chunk: &[u8],
    path: &Path,
) -> Result<(), P2pError> {
    file.write_all(chunk).await.map_err(P2pError::io(path))?;
    hasher.update(chunk);
    Ok(())
}

fn status_error(status: Status, offset: u64, size: u64) -> P2pError {
    match status {
        Status::Ok => P2pError::Protocol("a refusal said ok".to_string()),
        Status::BadToken => P2pError::BadToken,
        Status::TokenUsed => P2pError::TokenUsed,
        Status::TokenBusy => P2pError::TokenBusy,
        Status::BadOffset => P2pError::BadOffset { offset, size },
        Status::BadRequest => {
            P2pError::Protocol("the sender did not understand our request".to_string())
        }
    }
}

fn read_error(e: &ReadError, req: &FetchRequest) -> P2pError {
    match e {
        ReadError::ConnectionLost(e) => connection_error(e, req),
        ReadError::Reset(code) => {
            P2pError::Connection(format!("the sender reset the stream ({code})"))
        }
        other => P2pError::Connection(other.to_string()),
    }
}

/// What a closed connection means for the caller.
fn connection_error(e: &ConnectionError, req: &FetchRequest) -> P2pError {
    match e {
        ConnectionError::ApplicationClosed(app) => {
            let code = app.error_code.into_inner();
            if let Some(status) = close::refusal(code) {
                // The offset is ours; the close does not carry the size, the offer does.
                return status_error(status, 0, req.size);
            }
            let reason = String::from_utf8_lossy(&app.reason).into_owned();
            match u32::try_from(code) {
                Ok(close::EXPIRED) | Ok(close::SHUTDOWN) | Ok(close::SENDER_FAILED) => {
                    P2pError::Closed { reason }
                }
                Ok(close::BAD_REQUEST) => P2pError::Protocol(reason),
                _ => P2pError::Connection(format!("closed by the sender: {reason}")),
            }
        }
        ConnectionError::ConnectionClosed(c)
            if c.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            P2pError::Refused
        }
        other => P2pError::Connection(other.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
