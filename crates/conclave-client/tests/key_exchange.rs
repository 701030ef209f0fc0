//! The TLS key exchange between the real server and the real client: the hybrid post-quantum
//! group X25519MLKEM768, reported in the session and the JSON client's `connected` event. (A
//! server that offers only X25519 is `mock_server.rs`'s; a client that offers only X25519 is
//! the server's `monitoring.rs`.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users};
use conclave_client::json::{self, JsonOptions};
use conclave_client::{Client, is_post_quantum};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_real_server_and_client_agree_on_x25519mlkem768() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let state = tempfile::tempdir().expect("state");

    let (client, _events, session) = tokio::time::timeout(
        WAIT,
        Client::connect(common::options(&srv, "alice", state.path(), WAIT)),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    assert_eq!(session.tls_version, "TLS 1.3");
    assert_eq!(session.key_exchange, "X25519MLKEM768");
    assert!(is_post_quantum(&session.key_exchange));
    client.quit().await.expect("quit");

    // The JSON client says so in its first line, next to "tls".
    let mut opts = JsonOptions::new(common::options(&srv, "alice", state.path(), WAIT));
    opts.e2ee = false;
    let mut out = Vec::new();
    tokio::time::timeout(
        WAIT,
        json::run(opts, &b"{\"cmd\":\"quit\"}\n"[..], &mut out),
    )
    .await
    .expect("the JSON client finishes")
    .expect("the JSON client runs");
    let first = String::from_utf8(out).expect("utf-8");
    let connected: Value =
        serde_json::from_str(first.lines().next().expect("a line")).expect("JSON");
    assert_eq!(connected["event"], "connected", "{connected}");
    assert_eq!(connected["tls"], "TLS 1.3", "{connected}");
    assert_eq!(connected["key_exchange"], "X25519MLKEM768", "{connected}");
    assert_eq!(connected["post_quantum"], true, "{connected}");
    srv.stop(WAIT).await;
}
