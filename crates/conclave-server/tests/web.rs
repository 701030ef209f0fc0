//! The web client's side of the server, against a real server (ephemeral port, real TLS,
//! real SQLite): a browser's TLS (ALPN `http/1.1`, Chromium's key exchange groups) gets the
//! page with its security headers and the post-quantum group; the WebSocket speaks the
//! protocol's JSON through the same session code as native clients (login, rooms, sends both
//! ways with a native client, history, bad frames, limits); an operator's certificate is
//! served and swapped by a reload without dropping connections.

mod common;
#[path = "../../conclave/tests/common/relay.rs"]
#[allow(dead_code)]
mod relay;

use std::sync::Arc;

use common::*;
use conclave_proto::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What Chromium offers: the hybrid post-quantum group first, then the classical ones; and
/// ALPN h2 before http/1.1.
fn browser_config(fingerprint: &str) -> Arc<rustls::ClientConfig> {
    use rustls::crypto::aws_lc_rs::kx_group;
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut config = (*client_config_with(
        fingerprint,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        provider,
    ))
    .clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn browser_tls(addr: std::net::SocketAddr, fingerprint: &str) -> TlsStream<TcpStream> {
    tls_connect_with(addr, browser_config(fingerprint))
        .await
        .expect("a browser's TLS handshake succeeds")
}

/// One HTTP/1.1 response: status, headers (lower-case names), body.
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`Connection: close`) on a new browser connection and reads the answer.
async fn http(srv: &TestServer, method: &str, path: &str, extra: &str) -> HttpResponse {
    let mut tls = browser_tls(srv.addr, &srv.fingerprint).await;
    let host = format!("localhost:{}", srv.addr.port());
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .ok();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn assert_page_security(r: &HttpResponse) {
    let csp = r.header("content-security-policy").expect("a CSP");
    assert!(csp.starts_with("default-src 'self';"), "{csp}");
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self' wss://localhost:"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(
        !csp.contains("http:") && !csp.contains("https:"),
        "no other origin: {csp}"
    );
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    assert!(r.header("set-cookie").is_none(), "no cookie, ever");
}

#[tokio::test]
async fn a_browser_gets_the_page_with_its_security_headers_over_post_quantum_tls() {
    let srv = TestServer::start(|_| {}).await;
    let tls = browser_tls(srv.addr, &srv.fingerprint).await;
    let (_, state) = tls.get_ref();
    assert_eq!(state.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        state.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768),
        "a browser offering X25519MLKEM768 gets it"
    );
    assert_eq!(
        state.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(tls);

    let index = http(&srv, "GET", "/", "").await;
    assert_eq!(index.status, 200);
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_page_security(&index);
    assert!(String::from_utf8_lossy(&index.body).contains("<html"));
    let etag = index.header("etag").expect("an ETag").to_string();
    assert_eq!(
        etag,
        format!(
            "\"{}\"",
            conclave_server::web::assets::find("/").unwrap().sha256
        )
    );

    let again = http(&srv, "GET", "/", &format!("If-None-Match: {etag}\r\n")).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    let about = http(&srv, "GET", "/about.json", "").await;
    assert_eq!(about.status, 200);
    assert_eq!(about.header("content-type"), Some("application/json"));
    assert_page_security(&about);
    let v: Value = serde_json::from_slice(&about.body).expect("about is JSON");
    assert_eq!(
        v["bundle_sha256"],
        json!(conclave_server::web::assets::bundle_sha256())
    );
    assert_eq!(v["certificate_sha256"], json!(srv.fingerprint));
    assert_eq!(v["protocol"], json!(PROTOCOL_VERSION));

    let missing = http(&srv, "GET", "/no-such-file.js", "").await;
    assert_eq!(missing.status, 404);
    assert_page_security(&missing);
    let post = http(&srv, "POST", "/", "").await;
    assert_eq!(post.status, 405);
    assert_page_security(&post);

    // A native client on the same port is not disturbed.
    let mut native = Raw::register(&srv, "native").await;
    assert!(matches!(
        native.request(Request::Ping { nonce: 1 }).await,
        Ok(Reply::Pong { nonce: 1 })
    ));
    srv.stop().await;
}

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// The web client's protocol connection, as the browser opens it.
struct WebClient {
    ws: Ws,
    next_id: u64,
    events: Vec<Value>,
}

impl WebClient {
    /// Registers `user` (password `password123`) over this WebSocket; the server's answer.
    async fn register(&mut self, user: &str) -> Value {
        self.request(json!({"Register": {"user": user, "password": "password123",
            "server_password": null, "invite_code": null}}))
            .await
    }

    async fn connect(srv: &TestServer) -> WebClient {
        Self::connect_at(srv.addr, &srv.fingerprint).await
    }

    /// Through `addr` (the server, or a relay in front of it).
    async fn connect_at(addr: std::net::SocketAddr, fingerprint: &str) -> WebClient {
        let tls = browser_tls(addr, fingerprint).await;
        let url = format!("wss://localhost:{}/ws", addr.port());
        let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("upgrade in time")
            .expect("the WebSocket upgrade succeeds");
        assert_eq!(resp.status(), 101);
        WebClient {
            ws,
            next_id: 1,
            events: Vec::new(),
        }
    }

    async fn send_json(&mut self, req: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let text = json!({"id": id, "req": req}).to_string();
        self.ws
            .send(WsMessage::Text(text.into()))
            .await
            .expect("send");
        id
    }

    /// The next server frame as JSON; `None` when the connection closed.
    async fn next(&mut self) -> Option<Value> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
            {
                Some(Ok(WsMessage::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("server JSON"));
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends a request and returns its `result` (`{"Ok": ...}` or `{"Err": ...}`).
    async fn request(&mut self, req: Value) -> Value {
        let id = self.send_json(req).await;
        loop {
            let f = self.next().await.expect("connection open");
            if let Some(r) = f.get("Reply") {
                assert_eq!(r["id"], json!(id), "replies in order");
                // The same serde types as the native protocol.
                let typed: ServerFrame = serde_json::from_value(f.clone()).expect("a ServerFrame");
                assert!(matches!(typed, ServerFrame::Reply { .. }));
                return r["result"].clone();
            }
            self.events.push(f["Event"].clone());
        }
    }

    async fn event(&mut self, kind: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e.get(kind).is_some()) {
            return self.events.remove(i)[kind].clone();
        }
        loop {
            let f = self.next().await.expect("connection open");
            let e = f["Event"].clone();
            if let Some(v) = e.get(kind) {
                return v.clone();
            }
            self.events.push(e);
        }
    }

    /// Reads to the end: the disconnect event's reason and the close code.
    async fn goodbye(&mut self) -> (Option<String>, Option<u16>) {
        let mut reason = None;
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the end in time")
            {
                Some(Ok(WsMessage::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                    if let Some(d) = v["Event"].get("Disconnect") {
                        reason = d["reason"].as_str().map(str::to_string);
                    }
                }
                Some(Ok(WsMessage::Close(c))) => return (reason, c.map(|c| c.code.into())),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return (reason, None),
            }
        }
    }
}

fn text_of(message: &Value) -> String {
    let data: Vec<u8> = serde_json::from_value(message["body"]["data"].clone()).expect("bytes");
    String::from_utf8(data).expect("utf-8")
}

#[tokio::test]
async fn the_web_client_talks_with_a_native_client_through_the_same_protocol() {
    let srv = TestServer::start(|_| {}).await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut web = WebClient::connect(&srv).await;

    // Before logging in, nothing else is served: the same refusal as natively.
    let r = web.request(json!("Rooms")).await;
    assert_eq!(r["Err"]["code"], json!("NotLoggedIn"), "{r}");

    let r = web.register("alice").await;
    assert_eq!(r["Ok"]["LoggedIn"]["user"], json!("alice"), "{r}");

    let r = web
        .request(json!({"CreateRoom": {"room": "lab", "private": false, "password": null}}))
        .await;
    assert!(r.get("Ok").is_some(), "{r}");
    assert!(matches!(
        bob.request(Request::Join {
            room: "lab".into(),
            password: None
        })
        .await,
        Ok(Reply::Joined { .. })
    ));
    let joined = web.event("Join").await;
    assert_eq!(joined["user"], json!("bob"));

    // Web to native.
    let hello: Vec<u8> = b"hello from the browser".to_vec();
    let r = web
        .request(json!({"Send": {
            "target": {"Room": {"room": "lab", "except": []}},
            "body": {"content_type": "text/plain", "data": hello},
            "idempotency_key": "web-1"}}))
        .await;
    let sent = &r["Ok"]["Sent"];
    assert_eq!(sent["seq"], json!(1), "{r}");
    let m = bob.message().await;
    assert_eq!(m.from, "alice");
    assert_eq!(m.body.as_text(), Some("hello from the browser"));
    assert_eq!(json!(m.msg_id), sent["msg_id"]);

    // Native to web.
    assert!(
        bob.send_room("lab", "hello from the terminal")
            .await
            .is_ok()
    );
    let m = web.event("Message").await;
    assert_eq!(m["from"], json!("bob"));
    assert_eq!(m["conv"], json!({"Room": "lab"}));
    assert_eq!(text_of(&m), "hello from the terminal");

    // A direct message, native to web.
    assert!(
        bob.request(Request::Send {
            target: Target::Users {
                to: vec!["alice".into()]
            },
            body: Body::text("just you"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .is_ok()
    );
    let dm = web.event("Message").await;
    assert_eq!(dm["conv"], json!({"Direct": ["alice", "bob"]}));
    assert_eq!(text_of(&dm), "just you");

    // History, oldest first, the same messages.
    let r = web
        .request(json!({"History": {"conv": {"Room": "lab"}, "limit": 10, "before": null}}))
        .await;
    let messages = r["Ok"]["Messages"].as_array().expect("messages").clone();
    let texts: Vec<String> = messages.iter().map(text_of).collect();
    assert_eq!(texts, ["hello from the browser", "hello from the terminal"]);

    // Who and presence through the same hub.
    let r = web.request(json!({"Who": {"room": "lab"}})).await;
    let users: Vec<&str> = r["Ok"]["Users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["user"].as_str())
        .collect();
    assert!(users.contains(&"alice") && users.contains(&"bob"), "{r}");

    // Quit: answered, then the goodbye and a normal close.
    let r = web.request(json!("Quit")).await;
    assert_eq!(r, json!({"Ok": "Ok"}));
    let (reason, code) = web.goodbye().await;
    assert_eq!(reason.as_deref(), Some("Quit"));
    assert_eq!(code, Some(1000));
    srv.stop().await;
}

#[tokio::test]
async fn bad_frames_get_a_reason_and_the_native_limits_apply() {
    let srv = TestServer::start(|c| {
        c.limits.requests_per_second = 5;
        c.limits.request_burst = 5;
        c.limits.rate_strikes_before_disconnect = 1000;
    })
    .await;

    // Not JSON: the connection ends with the reason, as a native malformed frame does.
    let mut web = WebClient::connect(&srv).await;
    web.ws
        .send(WsMessage::Text("this is not json".into()))
        .await
        .expect("send");
    let (reason, code) = web.goodbye().await;
    assert_eq!(reason.as_deref(), Some("Malformed"));
    assert_eq!(code, Some(1007));

    // Binary messages are refused with a sentence that says what to send.
    let mut web = WebClient::connect(&srv).await;
    web.ws
        .send(WsMessage::Binary(vec![0, 1, 2].into()))
        .await
        .expect("send");
    let f = web.next().await.expect("a goodbye");
    let d = &f["Event"]["Disconnect"];
    assert_eq!(d["reason"], json!("Malformed"));
    assert!(
        d["message"]
            .as_str()
            .unwrap_or("")
            .contains("JSON text message"),
        "{d}"
    );

    // Over the frame limit before login (the native `max_frame_bytes`).
    let mut web = WebClient::connect(&srv).await;
    let big = "x".repeat(DEFAULT_MAX_FRAME_BYTES + 10);
    web.send_json(json!({"Login": {"user": "a", "password": big,
        "server_password": null, "resume": []}}))
        .await;
    let (reason, code) = web.goodbye().await;
    assert_eq!(reason.as_deref(), Some("TooLarge"));
    assert_eq!(code, Some(1009));

    // The request rate: past the burst, requests are refused with rate_limited.
    let mut web = WebClient::connect(&srv).await;
    let mut ids = Vec::new();
    for n in 0..12u64 {
        ids.push(web.send_json(json!({"Ping": {"nonce": n}})).await);
    }
    let mut limited = 0;
    for id in ids {
        let f = web.next().await.expect("a reply");
        assert_eq!(f["Reply"]["id"], json!(id));
        if f["Reply"]["result"]["Err"]["code"] == json!("RateLimited") {
            limited += 1;
        }
    }
    assert!(limited >= 5, "only {limited} of 12 refused");
    srv.stop().await;
}

#[tokio::test]
async fn a_websocket_from_another_sites_page_is_refused() {
    let srv = TestServer::start(|_| {}).await;
    let tls = browser_tls(srv.addr, &srv.fingerprint).await;
    let mut req = format!("wss://localhost:{}/ws", srv.addr.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().expect("header"));
    match tokio_tungstenite::client_async(req, tls).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403)
        }
        other => panic!("expected a 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    // The server's own origin is fine.
    let tls = browser_tls(srv.addr, &srv.fingerprint).await;
    let mut req = format!("wss://localhost:{}/ws", srv.addr.port())
        .into_client_request()
        .expect("request");
    let own = format!("https://localhost:{}", srv.addr.port());
    req.headers_mut()
        .insert("Origin", own.parse().expect("header"));
    let (_, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("same origin upgrades");
    assert_eq!(resp.status(), 101);
    srv.stop().await;
}

/// A certificate and key (PEM) signed by `ca`, for `localhost`.
fn issued(ca: &rcgen::Issuer<'_, rcgen::KeyPair>) -> (String, String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.signed_by(&key, ca).expect("signed");
    let fp = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(cert.der()));
    (cert.pem(), key.serialize_pem(), fp)
}

#[tokio::test]
async fn an_operator_certificate_is_served_and_replaced_by_a_reload_without_dropping_connections() {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let (cert_a, key_a, fp_a) = issued(&ca);
    let (cert_b, key_b, fp_b) = issued(&ca);

    let mut files = None;
    let srv = TestServer::start(|c| {
        let cert = c.data_dir.join("operator-cert.pem");
        let key = c.data_dir.join("operator-key.pem");
        std::fs::create_dir_all(&c.data_dir).expect("dir");
        std::fs::write(&cert, &cert_a).expect("cert");
        std::fs::write(&key, &key_a).expect("key");
        let toml = format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        );
        let config_file = c.data_dir.join(conclave_server::config::CONFIG_FILE);
        std::fs::write(&config_file, toml).expect("config");
        c.config_file = Some(config_file);
        c.tls.cert_file = Some(cert.clone());
        c.tls.key_file = Some(key.clone());
        files = Some((cert, key));
    })
    .await;
    let (cert_path, key_path) = files.expect("paths");
    assert_eq!(
        srv.fingerprint, fp_a,
        "the operator's certificate is served"
    );

    // One native and one web connection on certificate A.
    let mut native = Raw::connect_to(srv.addr, &fp_a).await;
    let r = native
        .request(Request::Register {
            user: "carol".into(),
            password: "password123".into(),
            server_password: None,
            invite_code: None,
        })
        .await;
    assert!(matches!(r, Ok(Reply::LoggedIn { .. })), "{r:?}");
    let tls = tls_connect_with(srv.addr, browser_config(&fp_a))
        .await
        .expect("tls");
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", srv.addr.port()), tls)
            .await
            .expect("upgrade");
    let mut web = WebClient {
        ws,
        next_id: 1,
        events: Vec::new(),
    };
    let r = web
        .request(json!({"Login": {"user": "carol", "password": "password123",
            "server_password": null, "resume": []}}))
        .await;
    assert!(r["Ok"].get("LoggedIn").is_some(), "{r}");

    // A broken pair is refused and certificate A stays in force.
    std::fs::write(&key_path, &key_b).expect("key b alone");
    let r = admin(&srv, json!({"cmd": "reload"})).await;
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("does not belong to the certificate"),
        "{r}"
    );
    assert!(Raw::try_connect_to(srv.addr, &fp_a).await.is_some());

    // Certificate B, then a reload.
    std::fs::write(&cert_path, &cert_b).expect("cert b");
    let r = admin(&srv, json!({"cmd": "reload"})).await;
    assert_eq!(r["ok"], json!(true), "{r}");
    assert!(
        Raw::try_connect_to(srv.addr, &fp_a).await.is_none(),
        "new handshakes get certificate B"
    );
    let mut fresh = Raw::connect_to(srv.addr, &fp_b).await;
    assert!(matches!(
        fresh.request(Request::Ping { nonce: 2 }).await,
        Ok(Reply::Pong { nonce: 2 })
    ));

    // The connections made with certificate A are still served.
    assert!(matches!(
        native.request(Request::Ping { nonce: 3 }).await,
        Ok(Reply::Pong { nonce: 3 })
    ));
    let r = web.request(json!({"Ping": {"nonce": 4}})).await;
    assert_eq!(r, json!({"Ok": {"Pong": {"nonce": 4}}}));
    srv.stop().await;
}

#[tokio::test]
async fn page_loads_are_not_taken_for_a_handshake_scan() {
    let srv = TestServer::start(|c| {
        c.anomaly.never_ban = vec![];
        c.anomaly.handshake_scan = conclave_server::config::AnomalyRule {
            enabled: Some(true),
            window_s: Some(60),
            per_address: Some(3),
            per_subnet: Some(0),
            per_user: Some(0),
            ban_minutes: Some(15),
        };
    })
    .await;
    // A browser opening the page again and again: connections that never say the native
    // hello, but did finish TLS.
    for _ in 0..6 {
        assert_eq!(http(&srv, "GET", "/", "").await.status, 200);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = admin(&srv, json!({"cmd": "monitor"})).await;
        if m["totals"]["connections"] == json!(0) {
            assert_eq!(m["alerts"], json!([]), "{m}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections did not close"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        Raw::try_connect_to(srv.addr, &srv.fingerprint)
            .await
            .is_some(),
        "the address is not banned"
    );
    srv.stop().await;
}

/// The chromium binary on the PATH, if any (Debian's package; `.ci/run` installs it).
fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

/// Chromium itself, headless: it loads the page over TLS 1.3 with X25519MLKEM768 and ALPN
/// http/1.1, as its own network log (`--log-net-log`) records. Skipped (and says so) on a
/// machine without Chromium.
#[tokio::test]
async fn chromium_loads_the_page_over_x25519mlkem768() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIPPED: no chromium on the PATH (apt-get install chromium)");
        return;
    };
    let srv = TestServer::start(|_| {}).await;
    let work = tempfile::tempdir().expect("tempdir");
    let netlog = work.path().join("netlog.json");
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        // The test server's certificate is self-signed; the handshake is what is checked.
        "--ignore-certificate-errors",
    ])
    .arg(format!(
        "--user-data-dir={}",
        work.path().join("profile").display()
    ))
    .arg(format!("--log-net-log={}", netlog.display()))
    .arg("--dump-dom")
    .arg(format!("https://localhost:{}/", srv.addr.port()))
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium finishes within a minute")
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("<html"), "chromium got no page: {dom}");
    let log = std::fs::read_to_string(&netlog).expect("chromium wrote its network log");
    // 4588 = 0x11EC, X25519MLKEM768's code point.
    assert!(
        log.contains("\"key_exchange_group\":4588"),
        "chromium did not negotiate X25519MLKEM768"
    );
    assert!(
        log.contains("\"next_proto\":\"http/1.1\""),
        "ALPN was not http/1.1"
    );
    srv.stop().await;
}

/// Messages from the event queue and the socket until `n` of them, or a `CaughtUp`.
async fn messages(web: &mut WebClient, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        got.push(web.event("Message").await);
    }
    got
}

#[tokio::test]
async fn through_a_delaying_relay_order_holds_and_a_reconnect_catches_up_once() {
    let srv = TestServer::start(|_| {}).await;
    let relay = relay::Relay::to(&srv.addr.to_string(), 5.0, 22);
    let via: std::net::SocketAddr = relay.addr().parse().expect("relay address");
    let mut bob = Raw::register(&srv, "bob").await;
    let mut web = WebClient::connect_at(via, &srv.fingerprint).await;
    let r = web.register("alice").await;
    assert!(r["Ok"].get("LoggedIn").is_some(), "{r}");

    // Native to web, 40 messages: in order, each once.
    for i in 0..40 {
        assert!(bob.send_room("general", &format!("n{i}")).await.is_ok());
    }
    let got = messages(&mut web, 40).await;
    let texts: Vec<String> = got.iter().map(text_of).collect();
    let want: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
    assert_eq!(texts, want);
    let last_seq = got.last().and_then(|m| m["seq"].as_u64()).expect("seq");

    // Web to native, 20 sends pipelined without waiting: stored and delivered in order.
    let mut ids = Vec::new();
    for i in 0..20 {
        let data: Vec<u8> = format!("w{i}").into_bytes();
        ids.push(
            web.send_json(json!({"Send": {
                "target": {"Room": {"room": "general", "except": []}},
                "body": {"content_type": "text/plain", "data": data},
                "idempotency_key": format!("w{i}")}}))
                .await,
        );
    }
    for i in 0..20 {
        let m = bob.message().await;
        assert_eq!(m.body.as_text(), Some(format!("w{i}").as_str()));
    }
    let mut replies = 0;
    while replies < ids.len() {
        let f = web.next().await.expect("replies");
        if let Some(r) = f.get("Reply") {
            assert_eq!(r["id"], json!(ids[replies]), "replies in request order");
            replies += 1;
        }
    }
    let last_seq = last_seq + 20;

    // The link breaks; bob goes on; the web client reconnects with its cursor and gets what
    // it missed, once, then `CaughtUp`.
    relay.cut_all();
    assert!(web.next().await.is_none(), "the cut ends the WebSocket");
    for i in 0..5 {
        assert!(bob.send_room("general", &format!("late{i}")).await.is_ok());
    }
    let mut web = WebClient::connect_at(via, &srv.fingerprint).await;
    let r = web
        .request(json!({"Login": {"user": "alice", "password": "password123",
            "server_password": null,
            "resume": [{"conv": {"Room": "general"}, "seq": last_seq}]}}))
        .await;
    assert!(r["Ok"].get("LoggedIn").is_some(), "{r}");
    let caught = web.event("CaughtUp").await;
    assert_eq!(caught["count"], json!(5), "{caught}");
    let missed = messages(&mut web, 5).await;
    let texts: Vec<String> = missed.iter().map(text_of).collect();
    assert_eq!(texts, ["late0", "late1", "late2", "late3", "late4"]);
    assert!(
        !web.events.iter().any(|e| e.get("Message").is_some()),
        "nothing twice: {:?}",
        web.events
    );
    let seqs: Vec<u64> = missed.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, (last_seq + 1..=last_seq + 5).collect::<Vec<_>>());
    srv.stop().await;
}

/// A busy room: native senders pipeline their sends, so that group commits hold runs of their
/// messages, which the dispatcher queues for the web client as one buffer each (docs/
/// benchmarks.md, "Fan-out of a group commit's run as one buffer"). The web client must still
/// get every message once, in order, as its own JSON text.
#[tokio::test]
async fn a_web_client_gets_every_message_of_a_busy_room_once_in_order() {
    let srv = TestServer::start(|c| {
        c.limits.requests_per_second = 100_000;
        c.limits.request_burst = 100_000;
    })
    .await;
    let mut web = WebClient::connect(&srv).await;
    let r = web.register("alice").await;
    assert!(r["Ok"].get("LoggedIn").is_some(), "{r}");
    let mut senders = Vec::new();
    for name in ["bob", "carol", "dave"] {
        senders.push(Raw::register(&srv, name).await);
    }
    const EACH: usize = 40;
    // Every send written before any reply is read, all three senders at once.
    let sends = senders.iter_mut().enumerate().map(|(s, raw)| async move {
        let mut ids = Vec::new();
        for i in 0..EACH {
            ids.push(raw.send_room_frame("general", &format!("s{s}-{i}")).await);
        }
        for id in ids {
            assert!(raw.reply_to(id).await.is_ok(), "send {id} stored");
        }
    });
    futures_util::future::join_all(sends).await;
    let got = messages(&mut web, 3 * EACH).await;
    let seqs: Vec<u64> = got.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs.len(), 3 * EACH);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, without a gap: {seqs:?}"
    );
    let mut texts: Vec<String> = got.iter().map(text_of).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 3 * EACH, "each once");
    srv.stop().await;
}

#[tokio::test]
async fn with_the_web_client_off_a_browsers_handshake_is_refused_and_native_clients_are_served() {
    let srv = TestServer::start(|c| c.web.enabled = false).await;
    let refused = tls_connect_with(srv.addr, browser_config(&srv.fingerprint)).await;
    assert!(
        refused.is_err(),
        "a browser's ALPN finds nothing to agree on"
    );
    let mut native = Raw::register(&srv, "native").await;
    assert!(matches!(
        native.request(Request::Ping { nonce: 5 }).await,
        Ok(Reply::Pong { nonce: 5 })
    ));
    srv.stop().await;
}
