//! The web client: HTTPS on the listen port for TLS clients that chose `http/1.1` by ALPN
//! (browsers), serving the embedded bundle ([`assets`]), `/about.json`, and the protocol's
//! WebSocket `/ws` ([`ws`]).
//!
//! hyper serves the connection over the server's own TLS stream (the same handshake, limits
//! and counters as a native connection). A WebSocket upgrade hands the connection back to
//! this task, which then runs the session on it: the connection's permit, per-IP slot and
//! shutdown tracking stay with it from accept to close.
//!
//! Every response carries the page's security headers ([`security_headers`]): a strict
//! Content-Security-Policy, `frame-ancestors 'none'`, HSTS, `nosniff`; no cookie is ever set
//! (the protocol logs in inside the WebSocket, so there is no ambient credential a
//! cross-site request could use).

pub mod assets;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::outbox::GOODBYE_TIMEOUT;
use crate::session::TlsLink;
use crate::state::Shared;

/// Time allowed between the upgrade's response and the WebSocket reaching this task.
const UPGRADE_HANDOVER: Duration = Duration::from_secs(5);
/// The smallest read buffer hyper accepts.
const MIN_HTTP_BUFFER_BYTES: usize = 8192;

/// What the routes need to know about their connection.
#[derive(Clone)]
struct Ctx {
    /// Where an upgraded WebSocket goes (taken once).
    upgrade: Arc<Mutex<Option<oneshot::Sender<WebSocket>>>>,
    /// Largest WebSocket message read.
    max_ws_message: usize,
    /// The certificate in force, for `/about.json`.
    fingerprint: String,
    /// The `Host` the browser asked for, when well-formed.
    host: Option<String>,
}

/// Serves a browser's connection: HTTP requests until it closes, its time is up, or it
/// becomes the protocol's WebSocket.
pub async fn serve(shared: Arc<Shared>, link: TlsLink, peer: SocketAddr) {
    crate::monitor::note_web_established(&shared, peer);
    let params = link.params();
    let counters = link.counters.clone();
    let config = shared.config();
    let (tx, rx) = oneshot::channel::<WebSocket>();
    let base = Ctx {
        upgrade: Arc::new(Mutex::new(Some(tx))),
        max_ws_message: ws::max_message_bytes(config.limits.max_member_frame_bytes),
        fingerprint: shared.certs.fingerprint(),
        host: None,
    };
    {
        let router = router();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let mut ctx = base.clone();
            ctx.host = request_host(req.headers());
            let csp = content_security_policy(ctx.host.as_deref());
            req.extensions_mut().insert(ctx);
            router.clone().oneshot(req.map(Body::new)).map(
                move |r: Result<Response, Infallible>| {
                    r.map(|mut resp| {
                        security_headers(resp.headers_mut(), &csp);
                        resp
                    })
                },
            )
        });
        let io = TokioIo::new(tokio::io::join(link.reader, link.writer));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.limits.handshake_timeout())
            .max_buf_size(
                config
                    .web
                    .max_request_header_bytes
                    .max(MIN_HTTP_BUFFER_BYTES),
            )
            .serve_connection(io, service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let lifetime = tokio::time::sleep(Duration::from_millis(config.web.http_connection_ms));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "web connection ended with an error");
                }
            }
            _ = lifetime => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, conn.as_mut()).await;
            }
            _ = shared.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, conn.as_mut()).await;
            }
        }
        // The connection (and with it the upgrade's sender, unless used) is dropped here.
    }
    if let Ok(Ok(socket)) = tokio::time::timeout(UPGRADE_HANDOVER, rx).await {
        ws::run(shared, socket, peer, params, counters).await;
    }
}

fn router() -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/about.json", get(about))
        .fallback(asset)
}

/// The protocol's WebSocket. A browser always sends its page's origin: one that is not
/// this server's own is refused (no other site's page may talk to it from a user's browser).
async fn websocket(
    upgrade: WebSocketUpgrade,
    Extension(ctx): Extension<Ctx>,
    headers: HeaderMap,
) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = ctx.host.as_ref().map(|h| format!("https://{h}"));
        if own.as_deref() != origin.to_str().ok() {
            return (
                StatusCode::FORBIDDEN,
                "this WebSocket serves only pages of this server's own origin\n",
            )
                .into_response();
        }
    }
    let slot = ctx.upgrade.clone();
    upgrade
        .max_message_size(ctx.max_ws_message)
        .max_frame_size(ctx.max_ws_message)
        .on_upgrade(move |socket| async move {
            let sender = slot.lock().ok().and_then(|mut s| s.take());
            if let Some(tx) = sender {
                let _ = tx.send(socket);
            }
        })
}

/// What the page shows in its About box, and what `conclave doctor --server` compares.
async fn about(Extension(ctx): Extension<Ctx>) -> Response {
    let body = serde_json::json!({
        "name": "conclave",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": conclave_proto::PROTOCOL_VERSION,
        "bundle_sha256": assets::bundle_sha256(),
        "web_client_built": assets::built(),
        "certificate_sha256": ctx.fingerprint,
    });
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// An embedded file, revalidated by its SHA-256 (`ETag`).
async fn asset(method: Method, headers: HeaderMap, req: Request) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "only GET and HEAD are served here\n",
        )
            .into_response();
    }
    let Some(a) = assets::find(req.uri().path()) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found\n",
        )
            .into_response();
    };
    let etag = format!("\"{}\"", a.sha256);
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let status = if cached {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let body = if cached || method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(a.bytes)
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

/// The request's `Host`, when it is a plain host name or address with an optional port (it
/// goes into the policy's `connect-src`, so nothing else is let through).
fn request_host(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    ok.then(|| host.to_ascii_lowercase())
}

/// The page's Content-Security-Policy: everything from this origin only, no inline script or
/// style, no plugins, no framing; the WebSocket of this host (`'self'` covers it in current
/// browsers; it is named too for those that read CSP level 2).
pub fn content_security_policy(host: Option<&str>) -> String {
    let ws = host.map(|h| format!(" wss://{h}")).unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
         font-src 'self'; connect-src 'self'{ws}; worker-src 'self'; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// The headers every response carries.
pub fn security_headers(h: &mut HeaderMap, csp: &str) {
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    let fixed: [(header::HeaderName, &'static str); 7] = [
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("permissions-policy"),
            "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
        ),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    // No cookie, ever: nothing a cross-site request could carry.
    h.remove(header::SET_COOKIE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_with_anything_but_name_and_port_are_left_out_of_the_policy() {
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("Chat.Example.org:7667"),
        );
        assert_eq!(request_host(&h).as_deref(), Some("chat.example.org:7667"));
        h.insert(
            header::HOST,
            HeaderValue::from_static("evil.org; script-src *"),
        );
        assert_eq!(request_host(&h), None);
        let csp = content_security_policy(Some("chat.example.org:7667"));
        assert!(csp.contains("connect-src 'self' wss://chat.example.org:7667;"));
        assert!(csp.starts_with("default-src 'self';"));
        assert!(!csp.contains("unsafe-inline"));
    }
}
