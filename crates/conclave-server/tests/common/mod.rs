//! Test harness: a real server on an ephemeral loopback port with real TLS and a real SQLite file
//! in a temporary directory, and a raw protocol client that pins the server's fingerprint.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use conclave_proto::hello::{self, HELLO_BYTES, HelloStatus};
use conclave_proto::*;
use conclave_server::{Config, Server};
use futures_util::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub dir: Arc<tempfile::TempDir>,
    pub token: tokio_util::sync::CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start_in(dir, tweak).await
    }

    /// Starts a server on an existing data directory (for restarts).
    pub async fn start_in(
        dir: Arc<tempfile::TempDir>,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config::new(dir.path());
        config.listen = "127.0.0.1:0".parse().expect("addr");
        tweak(&mut config);
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.local_addr();
        let fingerprint = server.fingerprint().to_string();
        let token = server.shutdown_token();
        let handle = tokio::spawn(async move {
            server.run().await.expect("server runs");
        });
        TestServer {
            addr,
            fingerprint,
            dir,
            token,
            handle,
        }
    }

    /// Graceful stop; waits for it.
    pub async fn stop(self) -> Arc<tempfile::TempDir> {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("server stops in time")
            .expect("server task");
        self.dir
    }

    /// Creates an account directly on the data directory (like `conclave user add`).
    pub fn add_user(&self, name: &str, password: &str, admin: bool) {
        let config = Config::new(self.dir.path());
        let mut db = conclave_server::server::open_db(&config).expect("db");
        let hash = conclave_server::accounts::hash_password(password).expect("hash");
        db.create_user(name, &hash, admin).expect("create");
        db.add_member(&config.default_room, name).expect("member");
    }
}

/// Verifies the server by its SHA-256 fingerprint only.
#[derive(Debug)]
pub struct Pin(pub String);

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if hex::encode(Sha256::digest(end_entity)) == self.0 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("fingerprint mismatch".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn client_config(
    fingerprint: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    client_config_with(
        fingerprint,
        versions,
        rustls::crypto::aws_lc_rs::default_provider(),
    )
}

/// A client that offers only X25519, as a client built before post-quantum key exchange does.
pub fn classical_client_config(fingerprint: &str) -> Arc<rustls::ClientConfig> {
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    client_config_with(fingerprint, &[&rustls::version::TLS13], provider)
}

pub fn client_config_with(
    fingerprint: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    provider: rustls::crypto::CryptoProvider,
) -> Arc<rustls::ClientConfig> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pin(fingerprint.to_string())))
        .with_no_client_auth();
    Arc::new(config)
}

/// TLS 1.3 to `addr`, pinned.
pub async fn tls_connect(
    addr: SocketAddr,
    fingerprint: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_with(addr, client_config(fingerprint, &[&rustls::version::TLS13])).await
}

/// TLS to `addr` with `config`.
pub async fn tls_connect_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await
}

/// A client that speaks the protocol frame by frame.
pub struct Raw {
    pub r: FramedRead<ReadHalf<TlsStream<TcpStream>>, LengthDelimitedCodec>,
    pub w: WriteHalf<TlsStream<TcpStream>>,
    next_id: u64,
    /// Events seen while waiting for replies.
    pub events: Vec<Event>,
}

pub fn frame_bytes(body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    b.to_vec()
}

impl Raw {
    /// Connects and exchanges hellos.
    pub async fn connect(srv: &TestServer) -> Raw {
        Self::connect_to(srv.addr, &srv.fingerprint).await
    }

    pub async fn connect_to(addr: SocketAddr, fingerprint: &str) -> Raw {
        Self::connect_with(addr, client_config(fingerprint, &[&rustls::version::TLS13])).await
    }

    /// Connects with a TLS configuration of the test's own, and exchanges hellos.
    pub async fn connect_with(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Raw {
        let mut tls = tls_connect_with(addr, config).await.expect("tls");
        tls.write_all(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok))
            .await
            .expect("hello");
        let mut theirs = [0u8; HELLO_BYTES];
        tokio::time::timeout(
            WAIT,
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut theirs),
        )
        .await
        .expect("hello in time")
        .expect("hello read");
        assert_eq!(
            hello::decode(&theirs).expect("hello").status,
            HelloStatus::Ok
        );
        let (r, w) = tokio::io::split(tls);
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(16 * 1024 * 1024)
            .new_codec();
        Raw {
            r: FramedRead::new(r, codec),
            w,
            next_id: 1,
            events: Vec::new(),
        }
    }

    /// Connects and logs in (registering when `register`).
    pub async fn login(srv: &TestServer, user: &str, password: &str) -> Raw {
        let mut c = Raw::connect(srv).await;
        let r = c
            .request(Request::Login {
                user: user.into(),
                password: password.into(),
                server_password: None,
                resume: vec![],
            })
            .await;
        assert!(
            matches!(r, Ok(Reply::LoggedIn { .. })),
            "login {user}: {r:?}"
        );
        c
    }

    pub async fn register(srv: &TestServer, user: &str) -> Raw {
        let mut c = Raw::connect(srv).await;
        let r = c
            .request(Request::Register {
                user: user.into(),
                password: "password123".into(),
                server_password: None,
                invite_code: None,
            })
            .await;
        assert!(
            matches!(r, Ok(Reply::LoggedIn { .. })),
            "register {user}: {r:?}"
        );
        c
    }

    pub async fn send_frame(&mut self, req: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let body = encode_client(&ClientFrame { id, req });
        self.w.write_all(&frame_bytes(&body)).await.expect("write");
        self.w.flush().await.expect("flush");
        id
    }

    /// The next frame, or None when the connection ends.
    pub async fn next_frame(&mut self) -> Option<ServerFrame> {
        match tokio::time::timeout(WAIT, self.r.next())
            .await
            .expect("frame in time")
        {
            Some(Ok(b)) => Some(decode_server(&b).expect("server frame decodes")),
            _ => None,
        }
    }

    /// Sends a request and waits for its reply, keeping events aside.
    pub async fn request(&mut self, req: Request) -> Result<Reply, ErrorBody> {
        let id = self.send_frame(req).await;
        self.reply_to(id).await
    }

    pub async fn reply_to(&mut self, id: u64) -> Result<Reply, ErrorBody> {
        loop {
            match self.next_frame().await {
                Some(ServerFrame::Reply { id: rid, result }) if rid == id => return result,
                Some(ServerFrame::Reply { id: rid, .. }) => panic!("reply to {rid}, expected {id}"),
                Some(ServerFrame::Event(e)) => self.events.push(e),
                None => panic!("connection ended while waiting for reply {id}"),
            }
        }
    }

    /// Waits for an event matching `pred` (earlier kept events first).
    pub async fn event(&mut self, pred: impl Fn(&Event) -> bool) -> Event {
        if let Some(i) = self.events.iter().position(&pred) {
            return self.events.remove(i);
        }
        loop {
            match self.next_frame().await {
                Some(ServerFrame::Event(e)) if pred(&e) => return e,
                Some(ServerFrame::Event(e)) => self.events.push(e),
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("connection ended while waiting for an event"),
            }
        }
    }

    /// Waits for the next message event.
    pub async fn message(&mut self) -> Message {
        match self.event(|e| matches!(e, Event::Message(_))).await {
            Event::Message(m) => m,
            _ => unreachable!(),
        }
    }

    /// Asserts that no message event arrives within `d` (after a round trip that proves the
    /// server has handled everything sent before).
    pub async fn no_message_within(&mut self, d: Duration) {
        let _ = self.request(Request::Ping { nonce: 0 }).await;
        assert!(
            !self.events.iter().any(|e| matches!(e, Event::Message(_))),
            "unexpected message: {:?}",
            self.events
        );
        if let Ok(Some(Ok(b))) = tokio::time::timeout(d, self.r.next()).await {
            let f = decode_server(&b).expect("decodes");
            assert!(
                !matches!(f, ServerFrame::Event(Event::Message(_))),
                "unexpected {f:?}"
            );
        }
    }

    pub async fn send_room(&mut self, room: &str, text: &str) -> Result<Reply, ErrorBody> {
        self.request(room_text(room, text)).await
    }

    /// Writes a text message to `room` without waiting for its reply (pipelining); returns
    /// the request id to wait on with [`Raw::reply_to`].
    pub async fn send_room_frame(&mut self, room: &str, text: &str) -> u64 {
        self.send_frame(room_text(room, text)).await
    }

    /// Reads until the server's disconnect event (or the end); returns it.
    pub async fn disconnect_event(&mut self) -> Option<(DisconnectReason, String)> {
        loop {
            match self.next_frame().await {
                Some(ServerFrame::Event(Event::Disconnect { reason, message })) => {
                    return Some((reason, message));
                }
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

/// A plain text message to everyone in `room`.
pub fn room_text(room: &str, text: &str) -> Request {
    Request::Send {
        target: Target::Room {
            room: room.into(),
            except: vec![],
        },
        body: Body::text(text),
        idempotency_key: None,
        refs: None,
    }
}

pub fn code(r: Result<Reply, ErrorBody>) -> ErrorCode {
    r.expect_err("expected an error").code
}

impl Raw {
    /// Like [`Raw::connect_to`], but `None` instead of a panic when the server refuses the
    /// connection (hangs up before the TLS handshake or the hello completes).
    pub async fn try_connect_to(addr: SocketAddr, fingerprint: &str) -> Option<Raw> {
        let attempt = async {
            let mut tls = tls_connect(addr, fingerprint).await.ok()?;
            tls.write_all(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok))
                .await
                .ok()?;
            let mut theirs = [0u8; HELLO_BYTES];
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut theirs)
                .await
                .ok()?;
            if hello::decode(&theirs).ok()?.status != HelloStatus::Ok {
                return None;
            }
            let (r, w) = tokio::io::split(tls);
            let codec = LengthDelimitedCodec::builder()
                .max_frame_length(16 * 1024 * 1024)
                .new_codec();
            Some(Raw {
                r: FramedRead::new(r, codec),
                w,
                next_id: 1,
                events: Vec::new(),
            })
        };
        tokio::time::timeout(WAIT, attempt)
            .await
            .expect("connection accepted or refused in time")
    }

    pub async fn try_connect(srv: &TestServer) -> Option<Raw> {
        Self::try_connect_to(srv.addr, &srv.fingerprint).await
    }
}

/// One operator command through the admin socket of the server on `data_dir`: one JSON line
/// out, one JSON line back.
pub async fn admin_at(data_dir: &std::path::Path, req: serde_json::Value) -> serde_json::Value {
    use tokio::io::AsyncBufReadExt;
    let path = conclave_server::admin_socket::socket_path(data_dir);
    let exchange = async {
        let mut s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("admin socket connects");
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).await.expect("admin write");
        let mut answer = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut answer)
            .await
            .expect("admin read");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("admin answer {answer:?}: {e}"))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("admin socket answers in time")
}

/// One operator command through `srv`'s admin socket.
pub async fn admin(srv: &TestServer, req: serde_json::Value) -> serde_json::Value {
    admin_at(srv.dir.path(), req).await
}
