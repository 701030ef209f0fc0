//! Every live connection, for the operator: who, from where, over what TLS, since when, how
//! many bytes. Also how to reach a connection to close it (kicks and bans).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use conclave_proto::DisconnectReason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::guard::canonical_ip;
use crate::hub::SessionId;
use crate::outbox::Outbox;

/// Byte and frame counters of one connection (wire bytes, TLS included), and its round-trip
/// time.
#[derive(Debug)]
pub struct Counters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frames_in: AtomicU64,
    /// `Send` requests received.
    pub messages_in: AtomicU64,
    /// The kernel's smoothed TCP round-trip time, in microseconds (0: not measured yet).
    pub rtt_us: AtomicU32,
    /// When `rtt_us` was last sampled: ms since `created`, plus 1 (0: never).
    rtt_sampled: AtomicU64,
    created: Instant,
    /// The counters as the monitor's last sample read them (bytes in, bytes out, frames in,
    /// frames out, messages in): kept here rather than in a map beside the registry, so a
    /// connection costs the monitor no entry of its own.
    at_sample: [AtomicU64; 5],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            rtt_us: AtomicU32::new(0),
            rtt_sampled: AtomicU64::new(0),
            created: Instant::now(),
            at_sample: Default::default(),
        }
    }
}

/// The round-trip time is read from the kernel at most this often per connection.
pub const RTT_SAMPLE_INTERVAL_MS: u64 = 1000;

impl Counters {
    /// Counts a request (messages are what the message-flood rule and the monitor count).
    pub fn note_request(&self, req: &conclave_proto::Request) {
        if matches!(req, conclave_proto::Request::Send { .. }) {
            self.messages_in.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stores `now` as the last sample's values and returns the ones it replaces (zeros at a
    /// connection's first sample). Only the monitor's one sampling task calls it.
    pub(crate) fn swap_sample(&self, now: [u64; 5]) -> [u64; 5] {
        std::array::from_fn(|i| self.at_sample[i].swap(now[i], Ordering::Relaxed))
    }

    /// The round-trip time, if measured.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(std::time::Duration::from_micros(u64::from(us))),
        }
    }

    /// Reads the round-trip time of socket `fd` from the kernel unless it was read less than
    /// [`RTT_SAMPLE_INTERVAL_MS`] ago. Called while the stream (and so `fd`) is alive.
    pub(crate) fn sample_rtt(&self, fd: Option<RawFd>) {
        let Some(fd) = fd else { return };
        let now = self.created.elapsed().as_millis() as u64 + 1;
        let last = self.rtt_sampled.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < RTT_SAMPLE_INTERVAL_MS {
            return;
        }
        self.rtt_sampled.store(now, Ordering::Relaxed);
        if let Some(us) = tcp_rtt_us(fd) {
            self.rtt_us.store(us.max(1), Ordering::Relaxed);
        }
    }
}

/// The kernel's smoothed round-trip time of a TCP socket, in microseconds. The kernel measures
/// it from the acknowledgements of everything sent, the clients' keep-alive pings included, so
/// it needs no protocol message of its own.
#[cfg(target_os = "linux")]
fn tcp_rtt_us(fd: RawFd) -> Option<u32> {
    // SAFETY: `tcp_info` is plain old data, so all zeroes is a valid value; getsockopt writes
    // at most `len` bytes into it and validates `fd` itself (a bad one is an error, not UB).
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (r == 0).then_some(info.tcpi_rtt)
    }
}

#[cfg(not(target_os = "linux"))]
fn tcp_rtt_us(_fd: RawFd) -> Option<u32> {
    None
}

/// Traffic of every connection since the start: closed ones (as they were when removed) plus
/// live ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Live connections.
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub messages_in: u64,
}

impl Traffic {
    fn add(&mut self, c: &ConnInfo) {
        self.bytes_in += c.counters.bytes_in.load(Ordering::Relaxed);
        self.bytes_out += c.counters.bytes_out.load(Ordering::Relaxed);
        self.frames_in += c.counters.frames_in.load(Ordering::Relaxed);
        self.frames_out += c.outbox.frames_queued();
        self.messages_in += c.counters.messages_in.load(Ordering::Relaxed);
    }
}

/// Outbound queues now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepths {
    pub total: u64,
    pub max: u64,
}

/// One live connection.
#[derive(Clone)]
pub struct ConnInfo {
    pub sid: SessionId,
    pub peer: SocketAddr,
    pub user: Option<String>,
    pub since_ms: i64,
    pub tls_version: &'static str,
    pub cipher: &'static str,
    /// The key exchange group, one of [`crate::tls::KX_GROUP_NAMES`].
    pub kx_group: &'static str,
    pub counters: Arc<Counters>,
    pub outbox: Outbox,
    /// The end-to-end device the connection speaks for, once it published it.
    pub device: Option<String>,
}

/// The live connections, and the traffic of those that closed.
#[derive(Default)]
pub struct Registry {
    map: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    live: HashMap<SessionId, ConnInfo>,
    closed: Traffic,
}

impl std::ops::Deref for Connections {
    type Target = HashMap<SessionId, ConnInfo>;
    fn deref(&self) -> &Self::Target {
        &self.live
    }
}

impl std::ops::DerefMut for Connections {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.live
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, info: ConnInfo) {
        self.lock().insert(info.sid, info);
    }

    /// Every connection's traffic since the start (never decreases: a connection's counts
    /// move to the closed total when it is removed, in the same step).
    pub fn totals(&self) -> Traffic {
        let map = self.lock();
        let mut t = map.closed;
        for c in map.values() {
            t.add(c);
        }
        t.connections = map.len() as u64;
        t
    }

    /// Live connections by key exchange group, in the order of [`crate::tls::KX_GROUP_NAMES`].
    pub fn by_kx_group(&self) -> [u64; crate::tls::KX_GROUP_NAMES.len()] {
        let mut counts = [0; crate::tls::KX_GROUP_NAMES.len()];
        for c in self.lock().values() {
            let i = crate::tls::KX_GROUP_NAMES
                .iter()
                .position(|n| *n == c.kx_group)
                .unwrap_or(crate::tls::KX_GROUP_NAMES.len() - 1);
            counts[i] += 1;
        }
        counts
    }

    /// The outbound queues now.
    pub fn queue_depths(&self) -> QueueDepths {
        let map = self.lock();
        map.values().fold(QueueDepths::default(), |q, c| {
            let d = c.outbox.depth() as u64;
            QueueDepths {
                total: q.total + d,
                max: q.max.max(d),
            }
        })
    }

    /// Calls `f` on every live connection, under the registry's lock: keep `f` short.
    pub fn with_each(&self, mut f: impl FnMut(&ConnInfo)) {
        for c in self.lock().values() {
            f(c);
        }
    }

    pub fn set_user(&self, sid: SessionId, user: &str) {
        if let Some(c) = self.lock().get_mut(&sid) {
            c.user = Some(user.to_string());
        }
    }

    pub fn set_device(&self, sid: SessionId, device: &str) {
        if let Some(c) = self.lock().get_mut(&sid) {
            c.device = Some(device.to_string());
        }
    }

    /// Closes every connection that speaks for `user`'s `device`; returns how many.
    pub fn close_device(
        &self,
        user: &str,
        device: &str,
        reason: DisconnectReason,
        message: &str,
    ) -> usize {
        let map = self.lock();
        let mut n = 0;
        for c in map
            .values()
            .filter(|c| c.user.as_deref() == Some(user) && c.device.as_deref() == Some(device))
        {
            c.outbox.close(reason, message);
            n += 1;
        }
        n
    }

    pub fn remove(&self, sid: SessionId) {
        let mut map = self.lock();
        if let Some(c) = map.live.remove(&sid) {
            map.closed.add(&c);
        }
    }

    /// A copy of every entry, oldest first.
    pub fn snapshot(&self) -> Vec<ConnInfo> {
        let mut v: Vec<ConnInfo> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.sid);
        v
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection of `user`; returns how many.
    pub fn close_user(&self, user: &str, reason: DisconnectReason, message: &str) -> usize {
        let map = self.lock();
        let mut n = 0;
        for c in map.values().filter(|c| c.user.as_deref() == Some(user)) {
            c.outbox.close(reason, message);
            n += 1;
        }
        n
    }

    /// Closes every connection from an address in `net`; returns how many.
    pub fn close_net(&self, net: &ipnet::IpNet, reason: DisconnectReason, message: &str) -> usize {
        let map = self.lock();
        let mut n = 0;
        for c in map
            .values()
            .filter(|c| net.contains(&canonical_ip(c.peer.ip())))
        {
            c.outbox.close(reason, message);
            n += 1;
        }
        n
    }

    /// Connections from `ip`.
    pub fn from_ip(&self, ip: IpAddr) -> usize {
        let ip = canonical_ip(ip);
        self.lock()
            .values()
            .filter(|c| canonical_ip(c.peer.ip()) == ip)
            .count()
    }
}

/// A stream that counts the bytes that pass through it, and samples the socket's round-trip
/// time now and then as data arrives.
pub struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
    fd: Option<RawFd>,
}

impl<S: AsRawFd> Counted<S> {
    pub fn new(inner: S, counters: Arc<Counters>) -> Self {
        let fd = Some(inner.as_raw_fd());
        Counted {
            inner,
            counters,
            fd,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            self.counters.bytes_in.fetch_add(n, Ordering::Relaxed);
            self.counters.sample_rtt(self.fd);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
