//! Harness shared by the client library's end-to-end tests: the real server in-process (real
//! TLS, real SQLite in a temporary directory) on a loopback port, accounts made on its data
//! directory, and connection options pinned to its certificate.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use conclave_client::{Auth, ConnectOptions, Trust};
use conclave_server::{Config, Server};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "correct horse battery";

pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub dir: Arc<TempDir>,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server on `dir`, listening on `listen` (port 0: any), with `tweak` applied to
    /// its configuration. Binding the port of a server that just stopped is retried for a
    /// while.
    pub async fn start(
        dir: Arc<TempDir>,
        listen: SocketAddr,
        tweak: impl Fn(&mut Config),
    ) -> TestServer {
        let mut last_error = String::new();
        for _ in 0..100 {
            let mut config = Config::new(dir.path());
            config.listen = listen;
            tweak(&mut config);
            match Server::bind(config).await {
                Ok(server) => {
                    let addr = server.local_addr();
                    let fingerprint = server.fingerprint().to_string();
                    let token = server.shutdown_token();
                    let handle = tokio::spawn(async move {
                        server.run().await.expect("server runs");
                    });
                    return TestServer {
                        addr,
                        fingerprint,
                        dir,
                        token,
                        handle,
                    };
                }
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        panic!("the server does not start on {listen}: {last_error}");
    }

    /// Graceful stop, waited for (at most `wait`); gives the data directory back.
    pub async fn stop(self, wait: Duration) -> Arc<TempDir> {
        self.token.cancel();
        tokio::time::timeout(wait, self.handle)
            .await
            .expect("server stops in time")
            .expect("server task");
        self.dir
    }
}

/// Creates accounts (members of the default room) on a data directory, like `conclave user
/// add`, before the server starts.
pub fn add_users(dir: &Path, names: &[&str]) {
    let config = Config::new(dir);
    let mut db = conclave_server::server::open_db(&config).expect("db");
    db.ensure_public_room(&config.default_room).expect("room");
    for name in names {
        let hash = conclave_server::accounts::hash_password(PASSWORD).expect("hash");
        db.create_user(name, &hash, false).expect("create");
        db.add_member(&config.default_room, name).expect("member");
    }
}

/// Options to log in as `user` (password [`PASSWORD`]) with the server's certificate pinned,
/// every timeout `wait`; the caller sets its reconnect policy.
pub fn options(srv: &TestServer, user: &str, state: &Path, wait: Duration) -> ConnectOptions {
    let auth = Auth::Login {
        user: user.into(),
        password: PASSWORD.into(),
        server_password: None,
    };
    let mut opts = ConnectOptions::new(srv.addr.to_string(), auth);
    opts.trust = Trust::fingerprint(&srv.fingerprint).expect("fingerprint");
    opts.state_dir = Some(state.to_path_buf());
    opts.connect_timeout = wait;
    opts.handshake_timeout = wait;
    opts.request_timeout = wait;
    opts
}

/// Connects `user` through `via` (a relay's address) instead of the server's own address,
/// without end-to-end encryption; `wait` bounds the connection and every request.
pub async fn connect_via(
    srv: &TestServer,
    via: &str,
    user: &str,
    state: &Path,
    wait: Duration,
) -> (conclave_client::Client, conclave_client::Events) {
    let mut opts = options(srv, user, state, wait);
    opts.server = via.to_string();
    let (client, events, _) = tokio::time::timeout(wait, conclave_client::Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("connect");
    (client, events)
}

/// The binary's test kit's relay (one forwarder for every test crate).
#[path = "../../../conclave/tests/common/relay.rs"]
pub mod relay;

/// Creates admin accounts (members of the default room) on a data directory, before the
/// server starts.
pub fn add_admins(dir: &Path, names: &[&str]) {
    let config = Config::new(dir);
    let mut db = conclave_server::server::open_db(&config).expect("db");
    db.ensure_public_room(&config.default_room).expect("room");
    for name in names {
        let hash = conclave_server::accounts::hash_password(PASSWORD).expect("hash");
        db.create_user(name, &hash, true).expect("create");
        db.add_member(&config.default_room, name).expect("member");
    }
}

/// How long one connection of the end-to-end tests may take.
pub const E2EE_CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Connects `user` (state in `state`) with end-to-end encryption on.
pub async fn connect_e2ee(
    srv: &TestServer,
    user: &str,
    state: &Path,
) -> (conclave_client::Client, conclave_client::Events) {
    let opts = options(srv, user, state, E2EE_CONNECT_WAIT);
    let (client, events, _) =
        tokio::time::timeout(E2EE_CONNECT_WAIT, conclave_client::Client::connect(opts))
            .await
            .expect("connect in time")
            .expect("connect");
    let events = client
        .enable_e2ee(events, state, PASSWORD)
        .await
        .expect("e2ee on");
    (client, events)
}

/// The files under `dir` (recursively) whose bytes contain `needle`.
pub fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// Nothing that `f` picks arrives for a while (bounded).
pub async fn none_for(
    events: &mut conclave_client::Events,
    d: Duration,
    mut f: impl FnMut(&conclave_client::ClientEvent) -> bool,
) {
    let _ = tokio::time::timeout(d, async {
        while let Some(e) = events.recv().await {
            assert!(!f(&e), "unexpected event: {e:?}");
        }
    })
    .await;
}

/// Every message of a conversation, oldest first (paged, bounded).
pub async fn full_history(
    client: &conclave_client::Client,
    conv: conclave_client::proto::ConvRef,
) -> Vec<conclave_client::proto::Message> {
    let mut all = Vec::new();
    let mut before = None;
    for _ in 0..1000 {
        let page = client
            .history(conv.clone(), 100, before)
            .await
            .expect("history");
        if page.is_empty() {
            return all;
        }
        before = page.first().map(|m| m.seq);
        all.splice(0..0, page);
    }
    panic!("history does not end");
}
