//! A server TLS stream that holds no buffer while its connection is idle.
//!
//! Why not `tokio-rustls`: a buffered `rustls::ServerConnection` keeps a 4 KiB receive buffer
//! for the connection's whole life (its deframer never shrinks below one read), which was the
//! largest single item of an idle connection's memory. This stream drives rustls' unbuffered
//! API instead: the bytes read from the socket, the decrypted bytes not yet taken and the
//! encrypted bytes not yet written live in vectors that are freed as soon as they are empty.
//! rustls still does all of TLS (handshake, record protection, alerts, key updates, session
//! tickets); this module only moves bytes.
//!
//! The connection state sits behind one mutex shared by a [`TlsReader`] and a [`TlsWriter`],
//! which may be used from different tasks. Either side may find work for the other (a record
//! read can produce a reply to send, such as a key update or a session ticket); the state then
//! wakes that side. Only the writer writes to the socket, so encrypted bytes leave in the order
//! they were produced.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::registry::Counters;

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 4096;
/// Most TLS bytes kept while waiting for a record to complete: a full record (16 KiB of
/// plaintext plus overhead) or a handshake flight. More than this is a misbehaving peer.
const MAX_INCOMING_BYTES: usize = 64 * 1024 + 512;
/// A writer stops accepting plaintext until this much encrypted output has been sent.
const MAX_OUTGOING_BYTES: usize = 64 * 1024;
/// A record's worst-case expansion: header (5), content type (1) and AEAD tag (16).
const RECORD_OVERHEAD_BYTES: usize = 5 + 1 + 16;
/// Largest plaintext per record (TLS 1.3).
const MAX_FRAGMENT_BYTES: usize = 16 * 1024;

/// Everything about one connection that both directions touch.
struct State {
    conn: UnbufferedServerConnection,
    /// TLS bytes read from the socket, not yet processed.
    incoming: Vec<u8>,
    /// Decrypted application data not yet taken by the reader, from `plain_pos` on.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes waiting to be written, in order.
    outgoing: Vec<u8>,
    /// The peer sent close_notify: no more application data will come.
    peer_closed: bool,
    /// Bytes that reading put on `outgoing` (key update answers, alerts) since it was last
    /// empty: a peer that makes us answer without reading is cut off at
    /// [`MAX_OUTGOING_BYTES`] instead of growing this connection's memory.
    answers: usize,
    /// Our close_notify is queued.
    sent_close: bool,
    /// A TLS error ended the connection (the text, for the error returned from then on).
    failed: Option<String>,
    /// The reader waits for data that the writer's processing may produce.
    reader: Option<Waker>,
    /// The writer has output to send that the reader's processing produced.
    writer: Option<Waker>,
}

/// What to do when the connection can send application data.
#[derive(Clone, Copy)]
enum Send<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where [`State::advance`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// Handshake done: application data can be encrypted (and more can be read).
    Traffic,
    /// The handshake needs more bytes from the peer.
    NeedInput,
    /// Both sides closed.
    Closed,
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl State {
    fn new(config: Arc<ServerConfig>) -> io::Result<State> {
        Ok(State {
            conn: UnbufferedServerConnection::new(config).map_err(tls_error)?,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            peer_closed: false,
            answers: 0,
            sent_close: false,
            failed: None,
            reader: None,
            writer: None,
        })
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(tls_error(e)),
            None => Ok(()),
        }
    }

    /// Lets rustls process everything it can: decrypted data goes to `plain`, handshake
    /// messages and alerts to `outgoing`, and once application data can be sent, `send` is
    /// encrypted onto `outgoing` (one pass through rustls for a write). Wakes the side that
    /// has new work.
    fn advance(&mut self, send: Send<'_>) -> io::Result<Stop> {
        self.check()?;
        let (plain_before, out_before) = (self.plain.len(), self.outgoing.len());
        let result = self.advance_inner(send);
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
            self.encode_alert();
        }
        if (self.plain.len() != plain_before || self.peer_closed || result.is_err())
            && let Some(w) = self.reader.take()
        {
            w.wake();
        }
        if (self.outgoing.len() != out_before || result.is_err())
            && let Some(w) = self.writer.take()
        {
            w.wake();
        }
        result
    }

    fn advance_inner(&mut self, send: Send<'_>) -> io::Result<Stop> {
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming[..]);
            let mut discard = status.discard;
            let state = status.state.map_err(tls_error)?;
            let stop = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    let start = self.outgoing.len();
                    let mut room = 1024;
                    loop {
                        self.outgoing.resize(start + room, 0);
                        match data.encode(&mut self.outgoing[start..]) {
                            Ok(n) => {
                                self.outgoing.truncate(start + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                            Err(e) => {
                                self.outgoing.truncate(start);
                                return Err(tls_error(e));
                            }
                        }
                    }
                    None
                }
                // What was encoded is in `outgoing`, ahead of anything encrypted later, and
                // the writer sends it in that order.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Stop::Closed),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match send {
                        Send::Nothing => {}
                        Send::Data(data) => {
                            let records = data.len() / MAX_FRAGMENT_BYTES + 1;
                            let room = data.len() + records * RECORD_OVERHEAD_BYTES;
                            put(&mut self.outgoing, room, |out| traffic.encrypt(data, out))?;
                        }
                        Send::CloseNotify => {
                            put(&mut self.outgoing, 64, |out| {
                                traffic.queue_close_notify(out)
                            })?;
                        }
                    }
                    Some(Stop::Traffic)
                }
                ConnectionState::BlockedHandshake => Some(Stop::NeedInput),
                // Early data is not enabled; anything else is a state this code does not know.
                _ => return Err(tls_error("unexpected TLS state")),
            };
            self.incoming.drain(..discard);
            if let Some(stop) = stop {
                if self.incoming.is_empty() {
                    // Nothing kept while idle.
                    self.incoming = Vec::new();
                }
                return Ok(stop);
            }
        }
    }

    /// After an error rustls has queued an alert that tells the peer why (a protocol version
    /// it does not offer, a bad record): put it on `outgoing`.
    fn encode_alert(&mut self) {
        // An alert is one message: two rounds (encode, then transmit) are all it takes.
        for _ in 0..4 {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    let start = self.outgoing.len();
                    self.outgoing.resize(start + 64, 0);
                    match data.encode(&mut self.outgoing[start..]) {
                        Ok(n) => self.outgoing.truncate(start + n),
                        Err(_) => {
                            self.outgoing.truncate(start);
                            return;
                        }
                    }
                }
                Ok(ConnectionState::TransmitTlsData(data)) => data.done(),
                _ => return,
            }
        }
    }
}

/// Appends what `encrypt` writes to `out`, given `room` bytes (more if it asks for more).
fn put(
    out: &mut Vec<u8>,
    mut room: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match encrypt(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) if s.required_size > room => {
                room = s.required_size
            }
            Err(e) => {
                out.truncate(start);
                return Err(tls_error(e));
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
    tcp: TcpStream,
    counters: Arc<Counters>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state is complete before anything that could panic: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what the socket has into `incoming`: `Ready(Ok(0))` at the end of the stream.
    fn poll_fill(&self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let mut st = self.lock();
            if st.incoming.len() >= MAX_INCOMING_BYTES {
                return Poll::Ready(Err(tls_error("a TLS record larger than allowed")));
            }
            st.incoming.reserve(READ_CHUNK_BYTES);
            match self.tcp.try_read_buf(&mut st.incoming) {
                Ok(n) => {
                    if n > 0 {
                        self.counters
                            .bytes_in
                            .fetch_add(n as u64, Ordering::Relaxed);
                        self.counters
                            .sample_rtt(Some(std::os::fd::AsRawFd::as_raw_fd(&self.tcp)));
                    }
                    if st.incoming.is_empty() {
                        st.incoming = Vec::new();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if st.incoming.is_empty() {
                        st.incoming = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `outgoing` until it is empty.
    fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut st = self.lock();
            if st.outgoing.is_empty() {
                st.outgoing = Vec::new();
                st.answers = 0;
                return Poll::Ready(Ok(()));
            }
            match self.tcp.try_write(&st.outgoing) {
                Ok(n) => {
                    self.counters
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                    st.outgoing.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Woken by the socket, or by the reader when it adds output.
                    st.writer = Some(cx.waker().clone());
                    drop(st);
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Runs the TLS handshake on an accepted connection. The caller bounds it in time.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    counters: Arc<Counters>,
) -> io::Result<(TlsReader, TlsWriter)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(config)?),
        tcp,
        counters,
    });
    loop {
        let advanced = shared.lock().advance(Send::Nothing);
        let drained = poll_fn(|cx| shared.poll_drain(cx)).await;
        // The alert that explains a failure goes out (above) before the error is returned.
        let stop = advanced?;
        drained?;
        match stop {
            Stop::Traffic => break,
            Stop::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed during the TLS handshake",
                ));
            }
            Stop::NeedInput => {
                if poll_fn(|cx| shared.poll_fill(cx)).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ));
                }
            }
        }
    }
    Ok((
        TlsReader {
            shared: shared.clone(),
        },
        TlsWriter { shared },
    ))
}

/// The receiving side of a connection.
pub struct TlsReader {
    shared: Arc<Shared>,
}

/// The sending side of a connection.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl TlsReader {
    /// Calls `f` with the connection's negotiated parameters (version, cipher suite).
    pub fn with_common<R>(&self, f: impl FnOnce(&CommonState) -> R) -> R {
        f(&self.shared.lock().conn)
    }

    /// Bytes of buffer this connection holds outside rustls (received, decrypted and
    /// encrypted bytes waiting): zero while it is idle.
    pub fn buffered_bytes(&self) -> usize {
        let st = self.shared.lock();
        st.incoming.capacity() + st.plain.capacity() + st.outgoing.capacity()
    }
}

impl AsyncRead for TlsReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        loop {
            {
                let mut st = shared.lock();
                if st.plain_pos < st.plain.len() {
                    let n = buf.remaining().min(st.plain.len() - st.plain_pos);
                    let from = st.plain_pos;
                    buf.put_slice(&st.plain[from..from + n]);
                    st.plain_pos += n;
                    if st.plain_pos == st.plain.len() {
                        st.plain = Vec::new();
                        st.plain_pos = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
                if st.peer_closed {
                    return Poll::Ready(Ok(()));
                }
                let before = st.outgoing.len();
                st.advance(Send::Nothing)?;
                st.answers += st.outgoing.len().saturating_sub(before);
                if st.answers > MAX_OUTGOING_BYTES {
                    st.failed = Some("the peer made us answer more than allowed".into());
                    return Poll::Ready(Err(tls_error(
                        "the peer made us answer more than allowed without reading",
                    )));
                }
                if st.plain_pos < st.plain.len() || st.peer_closed {
                    continue;
                }
                // Processing may have produced output (a key update's answer): the writer was
                // woken for it. Until then, a close from our side also ends reading.
                st.reader = Some(cx.waker().clone());
            }
            if ready!(shared.poll_fill(cx))? == 0 {
                // The socket ended without a close_notify: a truncated stream.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended without a TLS close_notify",
                )));
            }
        }
    }
}

impl TlsWriter {
    /// Makes the connection end with a TCP reset rather than an orderly close once both
    /// halves are dropped. For a peer that stopped reading: the bytes already in the kernel's
    /// buffers would otherwise stay there (the socket orphaned) until the kernel gives up
    /// probing the peer's closed window, and a peer stuck at a closed window for long may then
    /// never hear that the connection ended. The reset frees the buffers and tells it now.
    pub fn reset(&self) {
        let _ =
            socket2::SockRef::from(&self.shared.tcp).set_linger(Some(std::time::Duration::ZERO));
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &*self.shared;
        {
            let mut st = shared.lock();
            if st.outgoing.len() >= MAX_OUTGOING_BYTES {
                drop(st);
                ready!(shared.poll_drain(cx))?;
                st = shared.lock();
            }
            if st.advance(Send::Data(buf))? != Stop::Traffic {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the TLS connection cannot send",
                )));
            }
        }
        // Start sending now; whatever the socket does not take waits for the next write or
        // the flush.
        match shared.poll_drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Output the reader's processing produced (a key update's answer, session tickets)
        // is already on `outgoing`, ahead of later data.
        self.shared.poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        {
            let mut st = shared.lock();
            if st.failed.is_none() && !st.sent_close {
                st.sent_close = true;
                st.advance(Send::CloseNotify)?;
            }
        }
        ready!(shared.poll_drain(cx))?;
        Poll::Ready(socket2::SockRef::from(&shared.tcp).shutdown(std::net::Shutdown::Write))
    }
}
