//! The server's own TLS stream (rustls' unbuffered API) against a real rustls client over
//! loopback: handshake, data both ways in records of every size, key updates, close_notify,
//! refusals with an alert, and no buffer kept while idle.

mod common;

use std::sync::Arc;

use common::*;
use conclave_server::registry::Counters;
use conclave_server::tls_stream::{self, TlsReader, TlsWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Pair {
    server: (TlsReader, TlsWriter),
    client: tokio_rustls::client::TlsStream<TcpStream>,
    counters: Arc<Counters>,
}

async fn pair(versions: &[&'static rustls::SupportedProtocolVersion]) -> std::io::Result<Pair> {
    let dir = tempfile::tempdir().expect("temp dir");
    let identity = conclave_server::tls::load_or_create(dir.path()).expect("identity");
    let config = conclave_server::tls::server_config(&identity).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tls_stream::accept(tcp, config, c).await
    });
    let connector =
        tokio_rustls::TlsConnector::from(client_config(&identity.fingerprint, versions));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let client = tokio::time::timeout(
        WAIT,
        connector.connect(name, TcpStream::connect(addr).await?),
    )
    .await
    .expect("client answer in time");
    let server = tokio::time::timeout(WAIT, server)
        .await
        .expect("server answer in time")
        .expect("server task");
    // The client's view first: a refusal must reach it as an alert it understands.
    let client = client?;
    Ok(Pair {
        server: server?,
        client,
        counters,
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn data_crosses_both_ways_in_any_size_and_nothing_is_kept_while_idle() {
    let Pair {
        server: (mut r, mut w),
        mut client,
        counters,
    } = pair(&[&rustls::version::TLS13]).await.expect("handshake");
    for len in [1, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 200 * 1024] {
        let up = pattern(len, 1);
        let down = pattern(len, 2);
        let writing = tokio::spawn(async move {
            client.write_all(&up).await.expect("client write");
            client.flush().await.expect("client flush");
            let mut got = vec![0u8; len];
            client.read_exact(&mut got).await.expect("client read");
            (client, got)
        });
        let mut got = vec![0u8; len];
        tokio::time::timeout(WAIT, r.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("server read");
        assert_eq!(got, pattern(len, 1), "{len} bytes up");
        w.write_all(&down).await.expect("server write");
        w.flush().await.expect("server flush");
        let (c, got) = tokio::time::timeout(WAIT, writing)
            .await
            .expect("in time")
            .expect("client task");
        client = c;
        assert_eq!(got, down, "{len} bytes down");
        assert_eq!(r.buffered_bytes(), 0, "nothing kept after {len} bytes");
    }
    let counted = counters.bytes_in.load(std::sync::atomic::Ordering::Relaxed);
    assert!(counted > 200 * 1024, "bytes in are counted: {counted}");

    // A key update from the client: both directions keep working.
    client
        .get_mut()
        .1
        .refresh_traffic_keys()
        .expect("key update");
    client.write_all(b"after the update").await.expect("write");
    client.flush().await.expect("flush");
    let mut got = [0u8; 16];
    tokio::time::timeout(WAIT, r.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read after key update");
    assert_eq!(&got, b"after the update");
    w.write_all(b"still here").await.expect("write");
    w.flush().await.expect("flush");
    let mut got = [0u8; 10];
    client.read_exact(&mut got).await.expect("client read");
    assert_eq!(&got, b"still here");

    // The server closes: the client sees a clean end (close_notify), and the server then
    // sees the client's close as the end of its stream.
    w.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .expect("in time")
        .expect("a clean end, not a truncation");
    assert!(rest.is_empty());
    client.shutdown().await.expect("client close");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, r.read_to_end(&mut rest))
        .await
        .expect("in time")
        .expect("a clean end");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_tls_1_2_client_is_refused_with_an_alert_it_understands() {
    let e = match pair(&[&rustls::version::TLS12]).await {
        Ok(_) => panic!("TLS 1.2 must be refused"),
        Err(e) => e,
    };
    // Whichever side reports first, the refusal names the version.
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("version") || text.contains("protocol"),
        "refused for the version: {text}"
    );
}

#[tokio::test]
async fn a_connection_cut_without_close_notify_is_an_error_not_an_end() {
    let Pair {
        server: (mut r, _w),
        client,
        ..
    } = pair(&[&rustls::version::TLS13]).await.expect("handshake");
    let (tcp, _) = client.into_inner();
    drop(tcp);
    let mut buf = [0u8; 8];
    let e = tokio::time::timeout(WAIT, r.read(&mut buf))
        .await
        .expect("in time")
        .expect_err("truncation is reported");
    // A reset when the client left unread data (its session tickets) behind.
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{e}"
    );
}
