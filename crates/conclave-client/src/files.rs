//! File transfer: sending a file through the server (the relay) or directly to the
//! recipients (peer to peer over QUIC), and receiving one.
//!
//! # Relay
//! [`Client::send_file`] hashes the file (SHA-256), offers it, and uploads it in the chunks the
//! server asks for, keeping up to a window of chunks in flight ([`FileOptions::window`]). The
//! chunk requests travel on the same connection as everything else and each is small (at most
//! 128 KiB), so chat keeps flowing between them. If the connection drops, the requests in
//! flight are sent again after the reconnect (the server ignores a chunk it already holds);
//! after a server restart the upload resumes from what the server kept.
//!
//! [`Client::accept_file`] downloads into a directory: first into a hidden part file named
//! after the file id (`.NAME.FILEID.part`), which a later attempt continues from where it
//! stopped (the part already there is hashed again, not trusted), then checks the size and
//! the SHA-256 and only then renames it to its name (`NAME`, or `NAME (1)` … when taken), and
//! tells the server (and so the sender) that it arrived.
//!
//! # Peer to peer
//! The sender serves the file
//! from a QUIC endpoint; each online recipient fetches it directly with its one-time token and
//! falls back to the relay when it cannot reach the sender in time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_proto::{Event, FileOffer, Reply, Request, Target};
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::connection::unexpected;
use crate::{Client, ClientError};

/// Bytes of relay chunks kept in flight by default (the relay's window).
pub const DEFAULT_RELAY_WINDOW_BYTES: u64 = 2 * 1024 * 1024;
/// Smallest and largest window accepted.
pub const MIN_WINDOW_BYTES: u64 = 16 * 1024;
pub const MAX_WINDOW_BYTES: u64 = 1024 * 1024 * 1024;
/// Most relay requests in flight, whatever the window (each holds a request slot).
pub const MAX_CHUNKS_IN_FLIGHT: usize = 64;
/// How often progress is reported at most.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How many times an upload or download resynchronises (after a server restart) before it
/// gives up.
pub const MAX_RESUMES: u32 = 50;
/// How long a recipient waits for the relay copy of a peer-to-peer file by default.
pub const DEFAULT_RELAY_WAIT: Duration = Duration::from_secs(600);
/// While waiting for a relay copy: how often its upload is looked at...
pub const RELAY_POLL: Duration = Duration::from_secs(5);
/// ...and how long it may stand still before the recipient gives up with `not_ready`.
pub const RELAY_STALL: Duration = Duration::from_secs(60);
/// Read size when hashing a file.
const HASH_BUFFER: usize = 256 * 1024;

/// Which way a transfer goes, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Uploading to the server.
    Upload,
    /// Downloading from the server.
    Download,
    /// Serving a recipient directly.
    P2pSend,
    /// Fetching directly from the sender.
    P2pReceive,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
            Direction::P2pSend => "p2p_send",
            Direction::P2pReceive => "p2p_receive",
        }
    }
}

/// How far a transfer has come.
#[derive(Debug, Clone, PartialEq)]
pub struct FileProgress {
    pub file_id: String,
    pub direction: Direction,
    /// For peer-to-peer sends: the recipient.
    pub peer: Option<String>,
    pub bytes: u64,
    pub total: u64,
    /// Bytes per second since the transfer (re)started.
    pub rate: f64,
    /// Seconds left at that rate.
    pub eta_s: Option<f64>,
}

/// Told about progress (at most every [`PROGRESS_EVERY`], and at the end).
pub type ProgressFn = Arc<dyn Fn(&FileProgress) + Send + Sync>;

/// Told a send's file id as soon as its offer exists (before the transfer).
pub type OfferFn = Arc<dyn Fn(&str) + Send + Sync>;

/// How to send or receive a file.
#[derive(Clone)]
pub struct FileOptions {
    /// Serve the file directly too (QUIC), the relay being the fallback.
    pub p2p: bool,
    /// Bytes in flight: relay chunks, and the QUIC flow-control windows for peer to peer.
    /// `None`: the defaults.
    pub window: Option<u64>,
    /// Peer to peer: the QUIC congestion controller, `cubic` (default), `newreno` or `bbr`
    /// (much faster on lossy paths; quinn calls its BBR experimental).
    pub congestion: Option<String>,
    /// How long a recipient tries to reach the sender directly before it falls back.
    pub p2p_timeout: Duration,
    /// How long a recipient waits for the relay copy after falling back.
    pub relay_wait: Duration,
    /// How long a peer-to-peer sender serves at most (recipients that have not fetched by
    /// then use the relay).
    pub p2p_linger: Duration,
    /// Where a peer-to-peer sender listens (default: the address this host uses to reach the
    /// server, any port).
    pub p2p_bind: Option<std::net::SocketAddr>,
    /// The addresses a peer-to-peer sender announces instead of the one it listens on (for
    /// a forwarded port; tests use it to announce an unreachable one).
    pub p2p_advertise: Option<Vec<std::net::SocketAddr>>,
    pub progress: Option<ProgressFn>,
    /// A send: called with the file id once the offer exists (a peer-to-peer send may serve
    /// for minutes after that; [`Client::cancel_file`] stops it).
    pub on_offer: Option<OfferFn>,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            p2p: false,
            window: None,
            congestion: None,
            p2p_timeout: Duration::from_secs(5),
            relay_wait: DEFAULT_RELAY_WAIT,
            p2p_linger: crate::p2p_glue::DEFAULT_P2P_LINGER,
            p2p_bind: None,
            p2p_advertise: None,
            progress: None,
            on_offer: None,
        }
    }
}

impl std::fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileOptions")
            .field("p2p", &self.p2p)
            .field("window", &self.window)
            .field("congestion", &self.congestion)
            .field("p2p_timeout", &self.p2p_timeout)
            .finish_non_exhaustive()
    }
}

impl FileOptions {
    /// Checks the window.
    pub fn check(&self) -> Result<(), ClientError> {
        if let Some(w) = self.window
            && !(MIN_WINDOW_BYTES..=MAX_WINDOW_BYTES).contains(&w)
        {
            return Err(ClientError::File {
                code: "bad_request",
                message: format!(
                    "the window must be between {MIN_WINDOW_BYTES} bytes and 1 GiB (got {w})"
                ),
            });
        }
        if let Some(c) = &self.congestion
            && conclave_p2p::Congestion::parse(c).is_none()
        {
            return Err(ClientError::File {
                code: "bad_request",
                message: format!("unknown congestion controller {c:?}: use cubic, newreno or bbr"),
            });
        }
        Ok(())
    }
}

/// A file sent.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSent {
    pub file_id: String,
    pub name: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    /// Whether the server holds the whole file (always for the relay; for peer to peer,
    /// when some recipient was offline or asked for it).
    pub relayed: bool,
    /// Time from the offer to the end of the upload (zero when nothing was uploaded).
    pub elapsed: Duration,
    /// Upload bytes per second (0 when nothing was uploaded).
    pub throughput: f64,
}

/// How a file arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Relay,
    P2p,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Relay => "relay",
            Via::P2p => "p2p",
        }
    }
}

/// A file received and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReceived {
    pub file_id: String,
    /// Who offered it.
    pub from: String,
    pub path: PathBuf,
    pub size: u64,
    pub via: Via,
    /// Why peer to peer was given up for the relay, when it was.
    pub fallback: Option<String>,
    /// Bytes already there from an earlier attempt.
    pub resumed_from: u64,
    pub elapsed: Duration,
    pub throughput: f64,
}

fn file_err(code: &'static str, message: impl Into<String>) -> ClientError {
    ClientError::File {
        code,
        message: message.into(),
    }
}

/// What a send cancelled by [`Client::cancel_file`] ends with.
pub(crate) fn cancelled(file_id: &str) -> ClientError {
    file_err(
        "cancelled",
        format!("you cancelled the file {file_id}; its recipients were told"),
    )
}

/// Most sends under way that [`Client::cancel_file`] can find (more are not cancellable
/// locally; the server still withdraws them).
const MAX_CANCELLABLE_SENDS: usize = 1024;

/// Reports progress, at most every [`PROGRESS_EVERY`] (and always when `force`).
pub(crate) struct Reporter {
    f: Option<ProgressFn>,
    template: FileProgress,
    started: Instant,
    base: u64,
    last: Option<Instant>,
}

impl Reporter {
    pub(crate) fn new(
        f: Option<ProgressFn>,
        file_id: &str,
        direction: Direction,
        peer: Option<String>,
        total: u64,
        base: u64,
    ) -> Reporter {
        Reporter {
            f,
            template: FileProgress {
                file_id: file_id.to_string(),
                direction,
                peer,
                bytes: base,
                total,
                rate: 0.0,
                eta_s: None,
            },
            started: Instant::now(),
            base,
            last: None,
        }
    }

    pub(crate) fn report(&mut self, bytes: u64, force: bool) {
        let Some(f) = &self.f else { return };
        if !force && self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            bytes.saturating_sub(self.base) as f64 / secs
        } else {
            0.0
        };
        let mut p = self.template.clone();
        p.bytes = bytes;
        p.rate = rate;
        p.eta_s = (rate > 0.0).then(|| p.total.saturating_sub(bytes) as f64 / rate);
        f(&p);
    }
}

/// "65536", "256K", "4M", "1G" (binary units) as bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size; write bytes, or a number with K, M or G"))
}

/// SHA-256 and size of a file, read in blocks (never whole into memory).
pub fn hash_file(path: &Path) -> Result<([u8; 32], u64), ClientError> {
    let mut file = open_source(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| file_err("unreadable", format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finalize().into(), size))
}

pub(crate) fn open_source(path: &Path) -> Result<File, ClientError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => file_err(
            "path_not_found",
            format!("{} does not exist; check the path", path.display()),
        ),
        _ => file_err("unreadable", format!("cannot read {}: {e}", path.display())),
    })?;
    if !meta.is_file() {
        return Err(file_err(
            "unreadable",
            format!("{} is not a regular file; send a file", path.display()),
        ));
    }
    File::open(path).map_err(|e| {
        file_err(
            "unreadable",
            format!(
                "cannot open {}: {e} (check its permissions)",
                path.display()
            ),
        )
    })
}

pub(crate) fn file_name(path: &Path) -> Result<String, ClientError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            file_err(
                "path_not_found",
                format!("{} has no usable file name", path.display()),
            )
        })?
        .to_string();
    conclave_proto::files::check_file_name(&name)
        .map_err(|why| file_err("bad_request", format!("{why}: {}", path.display())))?;
    Ok(name)
}

/// Whether a transfer request failed in a way a resynchronisation can fix.
fn resumable(e: &ClientError) -> bool {
    match e {
        ClientError::Server(body) => match body.code {
            conclave_proto::ErrorCode::ShuttingDown => true,
            conclave_proto::ErrorCode::BadRequest => body.message.contains("offset"),
            _ => false,
        },
        ClientError::Timeout { .. } | ClientError::NotConnected { .. } => true,
        _ => false,
    }
}

fn window_chunks(window: Option<u64>, chunk_size: u32) -> usize {
    let w = window.unwrap_or(DEFAULT_RELAY_WINDOW_BYTES);
    ((w / u64::from(chunk_size.max(1))) as usize).clamp(1, MAX_CHUNKS_IN_FLIGHT)
}

/// What an offer says of the file: its name, SHA-256 and size.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) name: String,
    pub(crate) sha256: [u8; 32],
    pub(crate) size: u64,
}

/// Called with the file id once the server has created the offer, before any byte of the file
/// moves (an end-to-end file's description goes to the conversation there). An error ends the
/// send.
pub(crate) type AfterOffer =
    Box<dyn FnOnce(String) -> BoxFuture<'static, Result<(), ClientError>> + Send>;

/// What an offer needs from the file: its name, SHA-256 and size (hashed off the async
/// threads).
pub(crate) async fn prepare(path: &Path) -> Result<Prepared, ClientError> {
    let name = file_name(path)?;
    let owned = path.to_path_buf();
    let (sha256, size) = tokio::task::spawn_blocking(move || hash_file(&owned))
        .await
        .map_err(|_| file_err("unreadable", "hashing the file failed"))??;
    Ok(Prepared { name, sha256, size })
}

impl Client {
    /// Sends a file through the relay, or peer to peer when [`FileOptions::p2p`] is set.
    pub async fn send_file_any(
        &self,
        path: &Path,
        target: Target,
        opts: FileOptions,
    ) -> Result<FileSent, ClientError> {
        if let Some(sent) = self.send_file_e2ee(path, &target, &opts).await {
            return sent;
        }
        opts.check()?;
        let file = prepare(path).await?;
        self.send_prepared(path, target, opts, file, None).await
    }

    /// Sends `path`, whose offer is `file`, through the relay or peer to peer as `opts` say;
    /// `after_offer` runs once the offer exists, before the transfer starts.
    pub(crate) async fn send_prepared(
        &self,
        path: &Path,
        target: Target,
        opts: FileOptions,
        file: Prepared,
        after_offer: Option<AfterOffer>,
    ) -> Result<FileSent, ClientError> {
        if opts.p2p {
            crate::p2p_glue::send(self, path, target, opts, file, after_offer).await
        } else {
            self.relay_send(path, target, &opts, file, after_offer)
                .await
        }
    }

    /// Sends a file to a room (all members, or all but `except`) or to users, through the
    /// server. Returns when the server holds all of it (verified). For peer to peer
    /// ([`FileOptions::p2p`]) and end-to-end conversations, use [`Client::send_file_any`].
    pub async fn send_file(
        &self,
        path: &Path,
        target: Target,
        opts: FileOptions,
    ) -> Result<FileSent, ClientError> {
        opts.check()?;
        let file = prepare(path).await?;
        self.relay_send(path, target, &opts, file, None).await
    }

    /// Offers `file` (already checked and hashed), runs `after_offer`, then uploads.
    async fn relay_send(
        &self,
        path: &Path,
        target: Target,
        opts: &FileOptions,
        file: Prepared,
        after_offer: Option<AfterOffer>,
    ) -> Result<FileSent, ClientError> {
        let Prepared { name, sha256, size } = file;
        let reply = self
            .request(Request::FileOffer {
                target,
                name: name.clone(),
                size,
                sha256,
                p2p: None,
            })
            .await?;
        let Reply::FileCreated {
            file_id,
            chunk_size,
            uploaded,
            ..
        } = reply
        else {
            return Err(unexpected("file offer", &reply));
        };
        if let Some(hook) = after_offer {
            hook(file_id.clone()).await?;
        }
        let cancel = self.register_send(&file_id, opts);
        let started = Instant::now();
        let result = tokio::select! {
            r = self.upload(path, &file_id, size, chunk_size, uploaded, opts) => r,
            _ = cancel.cancelled() => Err(cancelled(&file_id)),
        };
        self.sending().remove(&file_id);
        result?;
        let elapsed = started.elapsed();
        Ok(FileSent {
            file_id,
            name,
            size,
            sha256: hex::encode(sha256),
            relayed: true,
            elapsed,
            throughput: size as f64 / elapsed.as_secs_f64().max(1e-9),
        })
    }

    /// Uploads `path` (already offered as `file_id`) from `start`, resynchronising with the
    /// server after errors a reconnect or restart explains.
    pub(crate) async fn upload(
        &self,
        path: &Path,
        file_id: &str,
        size: u64,
        chunk_size: u32,
        mut start: u64,
        opts: &FileOptions,
    ) -> Result<(), ClientError> {
        let file = Arc::new(open_source(path)?);
        let window = window_chunks(opts.window, chunk_size);
        let chunk = u64::from(chunk_size.max(1));
        let mut report = Reporter::new(
            opts.progress.clone(),
            file_id,
            Direction::Upload,
            None,
            size,
            start,
        );
        let mut resumes = 0u32;
        loop {
            if start >= size {
                // Everything is there; ask whether the server agrees (an empty file is
                // complete at the offer).
                let (_, complete) = self.file_status(file_id).await?;
                if complete {
                    report.report(size, true);
                    return Ok(());
                }
                if size > 0 {
                    // Every chunk is stored but the file was never checked and completed (the
                    // server stopped in between): sending the last chunk again completes it.
                    start = (size - 1) / chunk * chunk;
                }
            }
            match self
                .upload_from(&file, file_id, size, chunk, start, window, &mut report)
                .await
            {
                Ok(true) => {
                    report.report(size, true);
                    return Ok(());
                }
                Ok(false) if resumes < MAX_RESUMES => {
                    resumes += 1;
                    start = size;
                }
                Ok(false) => {
                    return Err(file_err(
                        "incomplete",
                        "the server holds every chunk but did not complete the file",
                    ));
                }
                Err(e) if resumable(&e) && resumes < MAX_RESUMES => {
                    resumes += 1;
                    tracing::debug!(file_id, error = %e, "upload resynchronising");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let (uploaded, complete) = self.file_status(file_id).await?;
                    if complete {
                        report.report(size, true);
                        return Ok(());
                    }
                    start = uploaded;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn file_status(&self, file_id: &str) -> Result<(u64, bool), ClientError> {
        match self
            .request(Request::FileStatus {
                file_id: file_id.to_string(),
            })
            .await?
        {
            Reply::FileUploaded {
                uploaded, complete, ..
            } => Ok((uploaded, complete)),
            other => Err(unexpected("file status", &other)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_from(
        &self,
        file: &Arc<File>,
        file_id: &str,
        size: u64,
        chunk: u64,
        start: u64,
        window: usize,
        report: &mut Reporter,
    ) -> Result<bool, ClientError> {
        let mut inflight = std::collections::VecDeque::new();
        let mut offset = start;
        loop {
            while inflight.len() < window && offset < size {
                let len = (size - offset).min(chunk - offset % chunk);
                let f = file.clone();
                let at = offset;
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, at).map(|_| buf)
                })
                .await
                .map_err(|_| file_err("unreadable", "reading the file failed"))?
                .map_err(|e| {
                    file_err(
                        "unreadable",
                        format!("cannot read the file (did it change or shrink?): {e}"),
                    )
                })?;
                let pending = self
                    .submit(Request::FileChunk {
                        file_id: file_id.to_string(),
                        offset,
                        data: conclave_proto::Chunk(data),
                    })
                    .await?;
                inflight.push_back(pending);
                offset += len;
            }
            // Nothing more to send and no reply said "complete": the caller asks the server.
            let Some(next) = inflight.pop_front() else {
                return Ok(false);
            };
            match next.reply().await? {
                Reply::FileUploaded {
                    uploaded, complete, ..
                } => {
                    report.report(uploaded, false);
                    if complete {
                        return Ok(true);
                    }
                }
                other => return Err(unexpected("file chunk", &other)),
            }
        }
    }

    /// Files offered to this account and not yet taken or declined.
    pub async fn pending_files(&self) -> Result<Vec<FileOffer>, ClientError> {
        match self.request(Request::Files).await? {
            // End-to-end files under their real names (the server lists the ciphertext's).
            Reply::Files(offers) => Ok(offers
                .into_iter()
                .map(|o| *self.described_offer(Box::new(o)))
                .collect()),
            other => Err(unexpected("files", &other)),
        }
    }

    /// Registers a send under way (so [`Client::cancel_file`] can stop it) and tells
    /// [`FileOptions::on_offer`] its id. The caller removes it from [`Client::sending`] when
    /// it ends.
    pub(crate) fn register_send(
        &self,
        file_id: &str,
        opts: &FileOptions,
    ) -> tokio_util::sync::CancellationToken {
        let token = tokio_util::sync::CancellationToken::new();
        {
            let mut sending = self.sending();
            if sending.len() < MAX_CANCELLABLE_SENDS {
                sending.insert(file_id.to_string(), token.clone());
            }
        }
        if let Some(f) = &opts.on_offer {
            f(file_id);
        }
        token
    }

    /// Cancels a file this client sent: a send under way stops (serving peer to peer and
    /// uploading), and the server withdraws the offer, deletes what it holds and tells the
    /// recipients who had not taken it (`file_cancelled`).
    pub async fn cancel_file(&self, file_id: &str) -> Result<(), ClientError> {
        let local = self.sending().remove(file_id);
        if let Some(token) = &local {
            token.cancel();
        }
        match self
            .request(Request::FileCancel {
                file_id: file_id.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            // Stopped here, and the server had it no more (expired): that is done too.
            Err(ClientError::Server(b))
                if local.is_some() && b.code == conclave_proto::ErrorCode::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Declines a file: the server stops offering it, and the sender is told.
    pub async fn decline_file(&self, file_id: &str) -> Result<(), ClientError> {
        self.request(Request::FileDecline {
            file_id: file_id.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// The offer of `file_id`: seen in this session, or still pending on the server.
    pub async fn find_offer(&self, file_id: &str) -> Result<FileOffer, ClientError> {
        if let Some(o) = self.offer(file_id) {
            return Ok(o);
        }
        self.pending_files()
            .await?
            .into_iter()
            .find(|o| o.file_id == file_id)
            .ok_or_else(|| {
                ClientError::Server(conclave_proto::ErrorBody::new(
                    conclave_proto::ErrorCode::NotFound,
                    format!(
                        "no file offer {file_id:?} for you (already taken or declined, expired, or a wrong id)"
                    ),
                ))
            })
    }

    /// Receives a file into `dir` (see the module documentation): peer to peer when the offer
    /// allows it and this build supports it, falling back to the relay; resumes a part file
    /// left by an earlier attempt; verifies size and SHA-256 before the file gets its name.
    /// A file of an end-to-end encrypted conversation is then decrypted in `dir` under its real
    /// name (its size and hash checked first), and the downloaded ciphertext removed.
    pub async fn accept_file(
        &self,
        file_id: &str,
        dir: &Path,
        opts: FileOptions,
    ) -> Result<FileReceived, ClientError> {
        let got = self.accept_file_raw(file_id, dir, opts).await?;
        self.open_received(got).await
    }

    async fn accept_file_raw(
        &self,
        file_id: &str,
        dir: &Path,
        opts: FileOptions,
    ) -> Result<FileReceived, ClientError> {
        opts.check()?;
        let offer = self.find_offer(file_id).await?;
        conclave_proto::files::check_file_name(&offer.name).map_err(|why| {
            file_err(
                "bad_request",
                format!("the offered file name is unsafe ({why}); refused"),
            )
        })?;
        let part = part_path(dir, &offer)?;
        let started = Instant::now();
        let mut fallback = None;
        let mut via = Via::Relay;
        let mut resumed_from = part_len(&part);
        let mut done = false;
        if let Some(invite) = offer.p2p.clone() {
            match crate::p2p_glue::fetch(&offer, &invite, &part, &opts).await {
                Ok(got) => {
                    via = Via::P2p;
                    resumed_from = got;
                    done = true;
                }
                Err(why) => {
                    tracing::info!(file_id, reason = %why, "peer to peer failed; using the relay");
                    fallback = Some(why);
                }
            }
        }
        if !done {
            self.wait_for_relay(&offer, &opts).await?;
            resumed_from = self.download(&offer, &part, &opts).await?;
        }
        let path = finish(dir, &offer, &part)?;
        let _ = self
            .request(Request::FileReceived {
                file_id: offer.file_id.clone(),
                via_p2p: via == Via::P2p,
            })
            .await;
        let elapsed = started.elapsed();
        Ok(FileReceived {
            file_id: offer.file_id.clone(),
            from: offer.from.clone(),
            path,
            size: offer.size,
            via,
            fallback,
            resumed_from,
            elapsed,
            throughput: offer.size.saturating_sub(resumed_from) as f64
                / elapsed.as_secs_f64().max(1e-9),
        })
    }

    /// Makes sure the server holds the file, asking for the relay copy of a peer-to-peer
    /// file and waiting (bounded) until it is ready.
    async fn wait_for_relay(
        &self,
        offer: &FileOffer,
        opts: &FileOptions,
    ) -> Result<(), ClientError> {
        if offer.relay_ready {
            return Ok(());
        }
        let mut events = self.file_events();
        match self
            .request(Request::FileWantRelay {
                file_id: offer.file_id.clone(),
            })
            .await
        {
            Ok(Reply::FileUploaded { complete: true, .. }) => return Ok(()),
            Ok(_) => {}
            // The sender is offline (say, its client died while serving): nothing can come
            // now. The server says so, and a `file_ready` event comes when the copy does.
            Err(ClientError::Server(b)) if b.code == conclave_proto::ErrorCode::NotReady => {
                return Err(file_err(
                    "not_ready",
                    format!("{}; then accept_file again", b.message),
                ));
            }
            Err(e) => return Err(e),
        }
        let deadline = tokio::time::Instant::now() + opts.relay_wait;
        // The sender's upload must keep moving: polled, and given up when it stalls.
        let mut poll = tokio::time::interval(RELAY_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut uploaded = 0u64;
        let mut stalled_at = tokio::time::Instant::now() + RELAY_STALL;
        loop {
            let event = tokio::select! {
                e = tokio::time::timeout_at(deadline, events.recv()) => e,
                _ = poll.tick() => {
                    match self
                        .request(Request::FileStatus {
                            file_id: offer.file_id.clone(),
                        })
                        .await
                    {
                        Ok(Reply::FileUploaded { complete: true, .. }) => return Ok(()),
                        Ok(Reply::FileUploaded { uploaded: now, .. }) if now > uploaded => {
                            uploaded = now;
                            stalled_at = tokio::time::Instant::now() + RELAY_STALL;
                        }
                        Err(ClientError::Server(b))
                            if b.code == conclave_proto::ErrorCode::NotFound =>
                        {
                            return Err(file_err(
                                "not_found",
                                "the file is gone from the server (cancelled by its sender, or expired)",
                            ));
                        }
                        _ => {}
                    }
                    if tokio::time::Instant::now() >= stalled_at {
                        return Err(file_err(
                            "not_ready",
                            format!(
                                "the sender's relay copy stopped coming ({} of {} bytes, nothing new for {} s; its client may have gone); accept_file again later (a file_ready event comes when it is there)",
                                uploaded,
                                offer.size,
                                RELAY_STALL.as_secs()
                            ),
                        ));
                    }
                    continue;
                }
            };
            match event {
                Err(_) => {
                    return Err(file_err(
                        "not_ready",
                        format!(
                            "the relay copy did not arrive within {} s; try accept_file again later",
                            opts.relay_wait.as_secs()
                        ),
                    ));
                }
                Ok(Ok(Event::FileReady { file_id })) if file_id == offer.file_id => return Ok(()),
                Ok(Ok(Event::FileCancelled { file_id, by })) if file_id == offer.file_id => {
                    return Err(file_err(
                        "cancelled",
                        format!("{by} cancelled the file {file_id}"),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    // Missed events: ask the server directly.
                    if let Ok(Reply::FileUploaded { complete: true, .. }) = self
                        .request(Request::FileWantRelay {
                            file_id: offer.file_id.clone(),
                        })
                        .await
                    {
                        return Ok(());
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return Err(ClientError::disconnected(
                        conclave_proto::DisconnectReason::Other,
                        "the session ended while waiting for the file",
                    ));
                }
            }
        }
    }

    /// Downloads the relay copy into `part` from its current length. Returns the length it
    /// started from.
    async fn download(
        &self,
        offer: &FileOffer,
        part: &Path,
        opts: &FileOptions,
    ) -> Result<u64, ClientError> {
        let (mut file, mut hasher, start) = open_part(part, offer.size)?;
        let resumed_from = start;
        let chunk = u64::from(offer.chunk_size.max(1));
        let window = window_chunks(opts.window, offer.chunk_size);
        let mut report = Reporter::new(
            opts.progress.clone(),
            &offer.file_id,
            Direction::Download,
            None,
            offer.size,
            start,
        );
        let mut have = start;
        let mut resumes = 0u32;
        while have < offer.size {
            match self
                .download_from(
                    offer,
                    &mut file,
                    &mut hasher,
                    have,
                    chunk,
                    window,
                    &mut report,
                )
                .await
            {
                Ok(n) => have = n,
                Err(e) if resumable(&e) && resumes < MAX_RESUMES => {
                    resumes += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // What is written is written: continue after it (hashed again).
                    (file, hasher, have) = open_part(part, offer.size)?;
                }
                Err(e) => return Err(e),
            }
        }
        file.sync_all()
            .map_err(|e| file_err("not_writable", format!("cannot sync the download: {e}")))?;
        let digest: [u8; 32] = hasher.finalize().into();
        if digest != offer.sha256 {
            let _ = std::fs::remove_file(part);
            return Err(file_err(
                "hash_mismatch",
                "the received file does not match its SHA-256; it was discarded. Accept it again",
            ));
        }
        report.report(offer.size, true);
        Ok(resumed_from)
    }

    #[allow(clippy::too_many_arguments)]
    async fn download_from(
        &self,
        offer: &FileOffer,
        file: &mut File,
        hasher: &mut Sha256,
        start: u64,
        chunk: u64,
        window: usize,
        report: &mut Reporter,
    ) -> Result<u64, ClientError> {
        let mut inflight = std::collections::VecDeque::new();
        let mut next = start;
        let mut have = start;
        loop {
            while inflight.len() < window && next < offer.size {
                let pending = self
                    .submit(Request::FileFetch {
                        file_id: offer.file_id.clone(),
                        offset: next,
                    })
                    .await?;
                inflight.push_back((next, pending));
                next = (next / chunk + 1) * chunk;
            }
            let Some((at, pending)) = inflight.pop_front() else {
                return Ok(have);
            };
            match pending.reply().await? {
                Reply::FileData { offset, data } if offset == at && at == have => {
                    if data.0.is_empty() {
                        return Err(file_err(
                            "hash_mismatch",
                            "the server's copy ended early; accept the file again",
                        ));
                    }
                    let room = offer.size - have;
                    if data.0.len() as u64 > room {
                        return Err(file_err(
                            "hash_mismatch",
                            "the server sent more than the file's size; refused",
                        ));
                    }
                    file.write_all(&data.0).map_err(|e| {
                        file_err("not_writable", format!("cannot write the download: {e}"))
                    })?;
                    hasher.update(&data.0);
                    have += data.0.len() as u64;
                    report.report(have, false);
                }
                other => return Err(unexpected("file fetch", &other)),
            }
        }
    }
}

/// The part file for `offer` in `dir`, after checking that `dir` is a writable directory.
pub(crate) fn part_path(dir: &Path, offer: &FileOffer) -> Result<PathBuf, ClientError> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        file_err(
            "not_writable",
            format!("cannot use {} as the target directory: {e}", dir.display()),
        )
    })?;
    if !meta.is_dir() {
        return Err(file_err(
            "not_writable",
            format!("{} is not a directory; give a directory", dir.display()),
        ));
    }
    let short: String = offer.file_id.chars().filter(|c| *c != '-').collect();
    let part = dir.join(format!(".{}.{short}.part", offer.name));
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .map_err(|e| {
            file_err(
                "not_writable",
                format!(
                    "cannot write in {}: {e}; choose a directory you can write to",
                    dir.display()
                ),
            )
        })?;
    Ok(part)
}

fn part_len(part: &Path) -> u64 {
    std::fs::metadata(part).map(|m| m.len()).unwrap_or(0)
}

/// Opens the part file for appending, hashing what it holds already (cut to `size` if
/// longer).
pub(crate) fn open_part(part: &Path, size: u64) -> Result<(File, Sha256, u64), ClientError> {
    let werr = |e: std::io::Error| {
        file_err(
            "not_writable",
            format!("cannot write {}: {e}", part.display()),
        )
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(part)
        .map_err(werr)?;
    let mut len = file.metadata().map_err(werr)?.len();
    if len > size {
        file.set_len(0).map_err(werr)?;
        len = 0;
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut read = 0u64;
    let reader = &mut file;
    while read < len {
        let n = reader.read(&mut buf).map_err(werr)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    Ok((file, hasher, read))
}

/// Gives the verified part file its name: `NAME`, or `NAME (1)`, `NAME (2)` … if taken.
pub(crate) fn finish(dir: &Path, offer: &FileOffer, part: &Path) -> Result<PathBuf, ClientError> {
    finish_as(dir, &offer.name, part)
}

/// Gives the verified file `part` (in `dir`) the name `name`, or `NAME (1)`, `NAME (2)` … if
/// taken; never replaces an existing file.
pub(crate) fn finish_as(dir: &Path, name: &str, part: &Path) -> Result<PathBuf, ClientError> {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.to_string(), String::new()),
    };
    for n in 0..1000u32 {
        let candidate = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{stem} ({n}){ext}"))
        };
        // Hard-link then unlink: never replaces an existing file, even in a race.
        match std::fs::hard_link(part, &candidate) {
            Ok(()) => {
                let _ = std::fs::remove_file(part);
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(file_err(
                    "not_writable",
                    format!("cannot name the received file in {}: {e}", dir.display()),
                ));
            }
        }
    }
    Err(file_err(
        "not_writable",
        format!(
            "{name} and 999 numbered variants exist in {}; clear some",
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("256K"), Ok(256 * 1024));
        assert_eq!(parse_size("4m"), Ok(4 << 20));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
        for bad in ["", "lots", "1T", "K", "-1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
