//! Every live connection, for the operator: who, from where, over what TLS, since when, how
//! many bytes. Also how to reach a connection to close it (kicks and bans).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use conclave_proto::DisconnectReason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::guard::canonical_ip;
use crate::hub::SessionId;
use crate::outbox::Outbox;

/// Byte and frame counters of one connection (wire bytes, TLS included).
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frames_in: AtomicU64,
}

/// One live connection.
#[derive(Clone)]
pub struct ConnInfo {
    pub sid: SessionId,
    pub peer: SocketAddr,
    pub user: Option<String>,
    pub since_ms: i64,
    pub tls_version: String,
    pub cipher: String,
    pub counters: Arc<Counters>,
    pub outbox: Outbox,
}

/// The live connections.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<SessionId, ConnInfo>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, ConnInfo>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, info: ConnInfo) {
        self.lock().insert(info.sid, info);
    }

    pub fn set_user(&self, sid: SessionId, user: &str) {
        if let Some(c) = self.lock().get_mut(&sid) {
            c.user = Some(user.to_string());
        }
    }

    pub fn remove(&self, sid: SessionId) {
        self.lock().remove(&sid);
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

/// A stream that counts the bytes that pass through it.
pub struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counters: Arc<Counters>) -> Self {
        Counted { inner, counters }
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
        self.counters.bytes_in.fetch_add(n, Ordering::Relaxed);
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
