//! UDP sockets with room for bursts.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel receive and send buffer asked for on every socket of this crate: 4 MiB. The
/// default (about 208 KiB on Linux) holds fewer than a hundred full-size datagrams, so a
/// burst of a few MiB of window overflows it and the kernel drops datagrams that QUIC then
/// takes for congestion. The kernel caps the request at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A bound UDP socket with [`SOCKET_BUFFER_BYTES`] buffers (or the most the kernel allows).
pub fn udp_socket(bind: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // A refusal only leaves the default size: worth a log line, not a failure.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "p2p: cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "p2p: cannot enlarge the UDP send buffer");
    }
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

/// The same, ready for tokio.
pub fn tokio_udp_socket(bind: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = udp_socket(bind)?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket)
}

/// A quinn endpoint on such a socket (a server when `server` is given).
pub fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime found (run inside tokio)"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        udp_socket(bind)?,
        runtime,
    )
}
