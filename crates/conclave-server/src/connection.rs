//! One accepted TCP connection: the TLS handshake, then by ALPN either the native protocol
//! ([`crate::session`]: no ALPN, or `conclave/1`) or the web client ([`crate::web`]: a
//! browser's `http/1.1`). One port, one certificate, one set of limits: the connection
//! limit, the IP rules and the per-IP limits are applied before TLS to both alike.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;

use crate::state::Shared;
use crate::{certs, session, web};

/// Serves one accepted TCP connection to the end. The permit (one of `max_connections`) is
/// held until then.
pub async fn run(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let Some(link) = Box::pin(session::accept_tls(&shared, acceptor, tcp, peer)).await else {
        return;
    };
    if link.alpn().as_deref() == Some(certs::ALPN_HTTP1) {
        if shared.config().web.enabled {
            // Boxed: only web connections need its state.
            Box::pin(web::serve(shared, link, peer)).await;
        }
        return;
    }
    session::run_native(shared, link, peer).await
}
