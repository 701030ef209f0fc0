//! The wire under attack: garbage, old TLS, unknown versions, oversize and malformed frames,
//! timeouts, and a tap that proves no plaintext crosses the network.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use conclave_proto::hello::{self, HELLO_BYTES, HelloStatus};
use conclave_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The server still serves honest clients.
async fn still_serving(srv: &TestServer) {
    let mut c = Raw::connect(srv).await;
    assert!(matches!(
        c.request(Request::Ping { nonce: 7 }).await,
        Ok(Reply::Pong { nonce: 7 })
    ));
}

/// Reads until the peer closes; returns what was read (bounded).
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                assert!(out.len() < 1 << 20, "server keeps talking to garbage");
            }
            Err(_) => panic!("server did not close the connection"),
        }
    }
}

#[tokio::test]
async fn garbage_instead_of_a_tls_handshake_is_dropped() {
    let srv = TestServer::start(|_| {}).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage")
        .await
        .expect("write");
    let reply = read_to_close(&mut s).await;
    // At most a TLS alert; never anything that looks like our protocol or plaintext.
    assert!(reply.len() < 64, "{reply:?}");
    still_serving(&srv).await;
    srv.stop().await;
}

#[tokio::test]
async fn a_tls_1_2_only_client_is_refused() {
    let srv = TestServer::start(|_| {}).await;
    let tcp = TcpStream::connect(srv.addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client_config(
        &srv.fingerprint,
        &[&rustls::version::TLS12],
    ));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let r = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("answer in time");
    let e = r.expect_err("TLS 1.2 must be refused");
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("version") || text.contains("protocol"),
        "refused for the version: {text}"
    );
    still_serving(&srv).await;
    srv.stop().await;
}

#[tokio::test]
async fn an_unknown_protocol_version_gets_a_clear_answer() {
    let srv = TestServer::start(|_| {}).await;
    let mut tls = tls_connect(srv.addr, &srv.fingerprint).await.expect("tls");
    tls.write_all(&hello::encode(PROTOCOL_VERSION + 41, HelloStatus::Ok))
        .await
        .expect("hello");
    let mut theirs = [0u8; HELLO_BYTES];
    tokio::time::timeout(WAIT, tls.read_exact(&mut theirs))
        .await
        .expect("in time")
        .expect("read");
    let h = hello::decode(&theirs).expect("decodes");
    assert_eq!(h.status, HelloStatus::UnsupportedVersion);
    assert_eq!(h.version, PROTOCOL_VERSION);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(n.is_ok() && rest.is_empty(), "closed after the answer");
    still_serving(&srv).await;
    srv.stop().await;
}

/// Frame limits small enough to cross in a test: 8 KiB before login, 64 KiB after.
fn small_frame_limits(c: &mut conclave_server::Config) {
    c.limits.max_frame_bytes = 8 * 1024;
    c.limits.max_message_bytes = 4 * 1024;
    c.limits.max_member_frame_bytes = 64 * 1024;
}

#[tokio::test]
async fn a_frame_over_the_limit_ends_the_connection_with_a_reason() {
    let srv = TestServer::start(small_frame_limits).await;
    let mut c = Raw::register(&srv, "alice").await;
    // Announce a 1 GiB frame: refused from the length prefix, before any allocation.
    c.w.write_all(&(1u32 << 30).to_be_bytes())
        .await
        .expect("write");
    c.w.flush().await.expect("flush");
    let (reason, message) = c.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::TooLarge);
    assert!(message.contains("65536"), "{message}");
    still_serving(&srv).await;
    srv.stop().await;
}

/// Before login the frame limit is `max_frame_bytes`; a logged-in client may send frames up
/// to `max_member_frame_bytes` (end-to-end commits of large groups), still bounded.
#[tokio::test]
async fn logged_in_clients_may_send_larger_frames_than_strangers() {
    let srv = TestServer::start(small_frame_limits).await;
    let mut stranger = Raw::connect(&srv).await;
    stranger
        .w
        .write_all(&frame_bytes(&vec![0u8; 20 * 1024]))
        .await
        .expect("write");
    stranger.w.flush().await.expect("flush");
    let (reason, message) = stranger.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::TooLarge);
    assert!(message.contains("8192"), "{message}");

    // The same size from a member is read and answered: the message in it is too long.
    let mut alice = Raw::register(&srv, "alice").await;
    let r = alice.send_room("general", &"x".repeat(20 * 1024)).await;
    assert!(
        matches!(&r, Err(e) if e.code == ErrorCode::TooLarge),
        "{r:?}"
    );
    assert!(matches!(
        alice.request(Request::Ping { nonce: 3 }).await,
        Ok(Reply::Pong { nonce: 3 })
    ));
    srv.stop().await;
}

#[tokio::test]
async fn a_malformed_frame_ends_only_that_connection() {
    let srv = TestServer::start(|_| {}).await;
    let mut bad = Raw::register(&srv, "mallory").await;
    let mut good = Raw::register(&srv, "alice").await;
    bad.w
        .write_all(&frame_bytes(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff]))
        .await
        .expect("write");
    let (reason, _) = bad.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Malformed);
    assert!(good.send_room("general", "unaffected").await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn login_timeout_closes_idle_unauthenticated_connections() {
    let srv = TestServer::start(|c| c.limits.login_timeout_ms = 300).await;
    let mut c = Raw::connect(&srv).await;
    let (reason, message) = c.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Timeout);
    assert!(message.contains("log in"), "{message}");
    srv.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut() {
    let srv = TestServer::start(|c| c.limits.handshake_timeout_ms = 300).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    // Half a TLS record header, then silence.
    s.write_all(&[0x16, 0x03]).await.expect("write");
    let _ = read_to_close(&mut s).await;
    still_serving(&srv).await;
    srv.stop().await;
}

#[tokio::test]
async fn the_port_in_use_error_says_what_to_do() {
    let srv = TestServer::start(|_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = conclave_server::Config::new(dir.path());
    config.listen = srv.addr;
    let err = conclave_server::Server::bind(config)
        .await
        .err()
        .expect("port taken")
        .to_string();
    assert!(
        err.contains("already in use") && err.contains("--listen"),
        "{err}"
    );
    srv.stop().await;
}

/// A TCP relay that records every byte in both directions.
async fn tapping_proxy(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tap = Arc::new(Mutex::new(Vec::new()));
    let t = tap.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, t.clone()));
            tokio::spawn(pump(sr, cw, t.clone()));
        }
    });
    (addr, tap)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    tap: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Ok(mut t) = tap.lock() {
                    t.extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn no_plaintext_crosses_the_wire() {
    let srv = TestServer::start(|_| {}).await;
    let (proxy, tap) = tapping_proxy(srv.addr).await;
    let marker = format!("wiretap-marker-{}", std::process::id());
    let mut alice = Raw::connect_to(proxy, &srv.fingerprint).await;
    alice
        .request(Request::Register {
            user: "alice".into(),
            password: "hunter2-secret-pw".into(),
            server_password: None,
            invite_code: None,
        })
        .await
        .expect("registered");
    let mut bob = Raw::connect_to(proxy, &srv.fingerprint).await;
    bob.request(Request::Register {
        user: "bob".into(),
        password: "password123".into(),
        server_password: None,
        invite_code: None,
    })
    .await
    .expect("registered");
    alice.send_room("general", &marker).await.expect("sent");
    assert_eq!(bob.message().await.body.as_text(), Some(marker.as_str()));
    let captured = tap.lock().expect("tap").clone();
    assert!(captured.len() > 1000, "the tap saw the traffic");
    let find = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    assert!(!find(marker.as_bytes()), "message text visible on the wire");
    assert!(!find(b"hunter2-secret-pw"), "password visible on the wire");
    assert!(!find(b"CNCL"), "even the protocol hello is inside TLS");
    srv.stop().await;
}
