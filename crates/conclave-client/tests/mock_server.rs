//! The client against a small in-process server that speaks the real wire (TLS 1.3, hello,
//! length-prefixed postcard frames). It checks the client's side of the contract, including
//! replies and behaviours the real server does not produce on demand; reconnecting is not used
//! here (see `reconnect.rs`, against the real server).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conclave_client::json::{self, JsonOptions};
use conclave_client::trust::{KnownServers, fingerprint_of_der};
use conclave_client::{
    Auth, Client, ClientError, ClientEvent, ConnectOptions, PinOutcome, Reconnect, Trust,
    TrustError,
};
use conclave_proto::hello::{self, HELLO_BYTES, HelloStatus};
use conclave_proto::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
enum HelloAnswer {
    Ok,
    Unsupported(u16),
}

struct Mock {
    addr: String,
    fingerprint: String,
}

/// Starts a mock server with a fresh self-signed certificate (or the given cert and key).
async fn mock(answer: HelloAnswer) -> Mock {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    mock_with(cert, key.into(), answer).await
}

fn acceptor(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> tokio_rustls::TlsAcceptor {
    // A server that offers only the classical X25519 (as one built before post-quantum key
    // exchange does): the client still connects and reports the group as classical.
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn mock_with(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    answer: HelloAnswer,
) -> Mock {
    let fingerprint = fingerprint_of_der(cert.as_ref());
    let acceptor = acceptor(cert, key);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = serve(acceptor, tcp, answer).await;
            });
        }
    });
    Mock { addr, fingerprint }
}

async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    answer: HelloAnswer,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let mut hello_bytes = [0u8; HELLO_BYTES];
    tls.read_exact(&mut hello_bytes).await?;
    assert!(hello::decode(&hello_bytes).is_ok());
    match answer {
        HelloAnswer::Ok => {
            tls.write_all(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok))
                .await?
        }
        HelloAnswer::Unsupported(v) => {
            tls.write_all(&hello::encode(v, HelloStatus::UnsupportedVersion))
                .await?;
            tls.shutdown().await?;
            return Ok(());
        }
    }
    tls.flush().await?;
    let mut framed = Framed::new(tls, LengthDelimitedCodec::new());
    let mut user = String::new();
    while let Some(frame) = framed.next().await {
        let ClientFrame { id, req } = decode_client(&frame?).expect("client frames decode");
        let mut events = Vec::new();
        let mut close = false;
        let result = match req {
            Request::Login { password, .. } | Request::Register { password, .. }
                if password == "wrong" =>
            {
                Err(ErrorBody::new(
                    ErrorCode::AuthFailed,
                    "wrong user name or password",
                ))
            }
            Request::Login { user: u, .. } | Request::Register { user: u, .. } => {
                user = u.to_lowercase();
                Ok(Reply::LoggedIn {
                    user: user.clone(),
                    admin: false,
                    rooms: vec!["general".into()],
                })
            }
            Request::Join { room, .. } => {
                events.push(Event::Join {
                    room: room.clone(),
                    user: user.clone(),
                });
                Ok(Reply::Joined {
                    room,
                    members: vec!["bob".into(), user.clone()],
                })
            }
            Request::Send { target, body, .. } => {
                let conv = match target {
                    Target::Room { room, .. } => Conv::Room(room),
                    Target::Users { mut to } => {
                        to.push(user.clone());
                        to.sort();
                        Conv::Direct(to)
                    }
                };
                // Bob repeats it (as seq 2), then the sender's own message comes back as if
                // in a catch-up, then bob's again: the client delivers only the first.
                let echo = |msg_id: &str, from: &str, seq| {
                    Event::Message(Message {
                        msg_id: msg_id.into(),
                        conv: conv.clone(),
                        from: from.into(),
                        seq,
                        ts_ms: 1000 + seq as i64,
                        body: body.clone(),
                        extra: None,
                    })
                };
                events.push(echo("m-2", "bob", 2));
                events.push(echo("m-1", &user, 1));
                events.push(echo("m-2", "bob", 2));
                Ok(Reply::Sent {
                    msg_id: "m-1".into(),
                    seq: 1,
                    ts_ms: 1000,
                    duplicate: false,
                })
            }
            Request::Announce { text } if text == "shutdown" => {
                // No reply: the waiting request must fail with Disconnected.
                for e in [
                    Event::Presence {
                        user: "bob".into(),
                        online: false,
                    },
                    Event::Disconnect {
                        reason: DisconnectReason::Shutdown,
                        message: "the server is shutting down".into(),
                    },
                ] {
                    framed
                        .send(Bytes::from(encode_server(&ServerFrame::Event(e))))
                        .await?;
                }
                framed.get_mut().shutdown().await?;
                return Ok(());
            }
            Request::Announce { text } if text == "big" => {
                // Over the client's limit for frames from its server.
                let over = conclave_proto::CLIENT_MAX_FRAME_BYTES + 1024;
                framed.send(Bytes::from(vec![0u8; over])).await?;
                continue;
            }
            Request::Announce { text } if text == "silent" => continue,
            Request::Ping { nonce } => Ok(Reply::Pong { nonce }),
            Request::Quit => {
                events.push(Event::Disconnect {
                    reason: DisconnectReason::Quit,
                    message: "bye".into(),
                });
                close = true;
                Ok(Reply::Ok)
            }
            _ => Err(ErrorBody::new(
                ErrorCode::Unsupported,
                "the mock does not do that",
            )),
        };
        framed
            .send(Bytes::from(encode_server(&ServerFrame::Reply {
                id,
                result,
            })))
            .await?;
        for e in events {
            framed
                .send(Bytes::from(encode_server(&ServerFrame::Event(e))))
                .await?;
        }
        if close {
            framed.get_mut().shutdown().await?;
            return Ok(());
        }
    }
    Ok(())
}

/// What the flaky mock saw, across its connections.
#[derive(Default)]
struct Flaky {
    connections: AtomicUsize,
    /// The `resume` of each login.
    resumes: Mutex<Vec<Vec<Cursor>>>,
    /// The idempotency key of each send.
    keys: Mutex<Vec<Option<String>>>,
}

/// A server that goes down mid-request once. First connection: catch-up with bob's seq 1 in
/// general; a `join` is never answered; a `send` is stored (as seq 2) but the server shuts
/// down before replying. Second connection: the catch-up has that stored send and bob's
/// seq 3, and the repeated send is answered as a duplicate.
async fn mock_flaky() -> (Mock, Arc<Flaky>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.der().clone();
    let fingerprint = fingerprint_of_der(cert.as_ref());
    let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    let acceptor = acceptor(cert, key.into());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = Arc::new(Flaky::default());
    let seen = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, state) = (acceptor.clone(), state.clone());
            tokio::spawn(async move {
                let _ = serve_flaky(acceptor, tcp, state).await;
            });
        }
    });
    (Mock { addr, fingerprint }, seen)
}

async fn serve_flaky(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<Flaky>,
) -> std::io::Result<()> {
    let first = state.connections.fetch_add(1, Ordering::SeqCst) == 0;
    let mut tls = acceptor.accept(tcp).await?;
    let mut hello_bytes = [0u8; HELLO_BYTES];
    tls.read_exact(&mut hello_bytes).await?;
    tls.write_all(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok))
        .await?;
    tls.flush().await?;
    let mut framed = Framed::new(tls, LengthDelimitedCodec::new());
    let general = Conv::Room("general".into());
    let msg = |msg_id: &str, from: &str, seq: u64, text: &str| {
        ServerFrame::Event(Event::Message(Message {
            msg_id: msg_id.into(),
            conv: general.clone(),
            from: from.into(),
            seq,
            ts_ms: 1000 + seq as i64,
            body: Body::text(text),
            extra: None,
        }))
    };
    while let Some(frame) = framed.next().await {
        let ClientFrame { id, req } = decode_client(&frame?).expect("client frames decode");
        let reply = |result| ServerFrame::Reply { id, result };
        let frames = match req {
            Request::Login { resume, .. } => {
                state.resumes.lock().unwrap().push(resume);
                let logged_in = reply(Ok(Reply::LoggedIn {
                    user: "alice".into(),
                    admin: false,
                    rooms: vec!["general".into()],
                }));
                if first {
                    vec![
                        logged_in,
                        msg("m-1", "bob", 1, "before"),
                        ServerFrame::Event(Event::CaughtUp {
                            count: 1,
                            truncated: false,
                        }),
                    ]
                } else {
                    vec![
                        logged_in,
                        msg("m-2", "alice", 2, "mine"),
                        msg("m-3", "bob", 3, "meanwhile"),
                        ServerFrame::Event(Event::CaughtUp {
                            count: 2,
                            truncated: false,
                        }),
                    ]
                }
            }
            Request::Join { .. } if first => vec![],
            Request::Send {
                idempotency_key, ..
            } => {
                state.keys.lock().unwrap().push(idempotency_key);
                if first {
                    let bye = ServerFrame::Event(Event::Disconnect {
                        reason: DisconnectReason::Shutdown,
                        message: "restarting".into(),
                    });
                    framed.send(Bytes::from(encode_server(&bye))).await?;
                    framed.get_mut().shutdown().await?;
                    return Ok(());
                }
                vec![reply(Ok(Reply::Sent {
                    msg_id: "m-2".into(),
                    seq: 2,
                    ts_ms: 1002,
                    duplicate: true,
                }))]
            }
            Request::Ping { nonce } => vec![reply(Ok(Reply::Pong { nonce }))],
            Request::Ack { .. } => vec![reply(Ok(Reply::Ok))],
            Request::Quit => {
                framed
                    .send(Bytes::from(encode_server(&reply(Ok(Reply::Ok)))))
                    .await?;
                framed.get_mut().shutdown().await?;
                return Ok(());
            }
            _ => vec![reply(Err(ErrorBody::new(
                ErrorCode::Unsupported,
                "the mock does not do that",
            )))],
        };
        for f in frames {
            framed.send(Bytes::from(encode_server(&f))).await?;
        }
    }
    Ok(())
}

fn options(m: &Mock, state_dir: &Path, trust: Trust) -> ConnectOptions {
    let mut opts = ConnectOptions::new(
        m.addr.clone(),
        Auth::Login {
            user: "Alice".into(),
            password: "pw".into(),
            server_password: None,
        },
    );
    opts.trust = trust;
    opts.state_dir = Some(state_dir.to_path_buf());
    opts.connect_timeout = WAIT;
    opts.handshake_timeout = WAIT;
    opts.request_timeout = WAIT;
    opts.reconnect = Reconnect::never();
    opts
}

#[tokio::test]
async fn trust_on_first_use_pins_then_the_pin_is_used() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (client, _events, session) =
        Client::connect(options(&m, dir.path(), Trust::TrustOnFirstUse))
            .await
            .unwrap();
    assert_eq!(session.user, "alice");
    assert_eq!(session.fingerprint, m.fingerprint);
    assert_eq!(session.tls_version, "TLS 1.3");
    assert_eq!(session.key_exchange, "X25519");
    assert!(!conclave_client::is_post_quantum(&session.key_exchange));
    assert!(matches!(session.trust, PinOutcome::NewlyPinned { .. }));
    let known = KnownServers::load(&KnownServers::path_in(dir.path())).unwrap();
    assert_eq!(known.find(&m.addr).unwrap().fingerprint, m.fingerprint);
    client.quit().await.unwrap();

    // Second time: PinnedOnly is enough, and the pin is what was checked.
    let (client, _events, session) = Client::connect(options(&m, dir.path(), Trust::PinnedOnly))
        .await
        .unwrap();
    assert!(matches!(session.trust, PinOutcome::Known { line: 3, .. }));
    client.close();
}

#[tokio::test]
async fn unknown_server_is_refused_with_its_fingerprint_then_accepted_when_given() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let err = Client::connect(options(&m, dir.path(), Trust::PinnedOnly))
        .await
        .err()
        .expect("refused");
    let ClientError::Trust(trust) = &err else {
        panic!("{err}")
    };
    assert!(matches!(trust, TrustError::Unknown { .. }), "{err}");
    let seen = trust.seen_fingerprint().unwrap().to_string();
    assert_eq!(seen, m.fingerprint);
    // Nothing was pinned.
    assert!(!KnownServers::path_in(dir.path()).exists());

    // The "trust this?" retry, with the colon form a person would paste.
    let given = Trust::fingerprint(&conclave_client::trust::format_fingerprint(&seen)).unwrap();
    let (client, _events, session) = Client::connect(options(&m, dir.path(), given))
        .await
        .unwrap();
    assert!(matches!(
        session.trust,
        PinOutcome::Given {
            known_servers: Some(_),
            replaced: None
        }
    ));
    client.close();
}

#[tokio::test]
async fn a_changed_certificate_is_refused_loudly() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "ab".repeat(32);
    std::fs::write(
        KnownServers::path_in(dir.path()),
        format!("{} {wrong}\n", m.addr),
    )
    .unwrap();
    for trust in [Trust::TrustOnFirstUse, Trust::PinnedOnly] {
        let err = Client::connect(options(&m, dir.path(), trust))
            .await
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(
            matches!(&err, ClientError::Trust(TrustError::Mismatch { .. })),
            "{text}"
        );
        assert!(text.contains("WARNING"), "{text}");
        assert!(text.contains("remove line 1"), "{text}");
    }
    // A wrong --fingerprint is refused too.
    let err = Client::connect(options(&m, dir.path(), Trust::Fingerprint("cd".repeat(32))))
        .await
        .err()
        .expect("refused");
    assert!(matches!(
        err,
        ClientError::Trust(TrustError::Mismatch { .. })
    ));
}

#[tokio::test]
async fn a_ca_issued_certificate_is_checked_against_the_ca_file() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let m = mock_with(
        leaf.der().clone(),
        PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        HelloAnswer::Ok,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let port = m.addr.rsplit(':').next().unwrap();
    let mut opts = options(&m, dir.path(), Trust::Ca(ca_file.clone()));
    opts.server = format!("localhost:{port}");
    let (client, _events, session) = Client::connect(opts).await.unwrap();
    assert!(matches!(session.trust, PinOutcome::Ca { .. }));
    client.close();

    // The certificate does not name 127.0.0.1.
    let err = Client::connect(options(&m, dir.path(), Trust::Ca(ca_file)))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem"), "{err}");
}

#[tokio::test]
async fn an_unsupported_version_is_explained() {
    let m = mock(HelloAnswer::Unsupported(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let err = Client::connect(options(&m, dir.path(), Trust::TrustOnFirstUse))
        .await
        .err()
        .expect("refused");
    assert_eq!(
        err.to_string(),
        format!(
            "server speaks protocol version 2, this client speaks {PROTOCOL_VERSION}; upgrade \
             the older one"
        )
    );
    // A server that does not speak our protocol is not pinned.
    assert!(!KnownServers::path_in(dir.path()).exists());
}

#[tokio::test]
async fn a_login_refusal_is_a_server_error() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&m, dir.path(), Trust::TrustOnFirstUse);
    opts.auth = Auth::Login {
        user: "alice".into(),
        password: "wrong".into(),
        server_password: None,
    };
    match Client::connect(opts).await {
        Err(ClientError::Server(body)) => assert_eq!(body.code, ErrorCode::AuthFailed),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("logged in"),
    }
}

#[tokio::test]
async fn requests_replies_events_and_quit() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (client, mut events, _session) =
        Client::connect(options(&m, dir.path(), Trust::TrustOnFirstUse))
            .await
            .unwrap();
    assert_eq!(
        client.join("general", None).await.unwrap(),
        vec!["bob".to_string(), "alice".to_string()]
    );
    assert_eq!(
        events.recv().await,
        Some(ClientEvent::Server(Event::Join {
            room: "general".into(),
            user: "alice".into()
        }))
    );
    let receipt = client
        .send_to_users(&["bob".to_string()], "hi")
        .await
        .unwrap();
    assert_eq!(receipt.seq, 1);
    match events.recv().await {
        Some(ClientEvent::Server(Event::Message(m))) => {
            assert_eq!(m.conv, Conv::Direct(vec!["alice".into(), "bob".into()]));
            assert_eq!(m.body.as_text(), Some("hi"));
            assert_eq!((m.from.as_str(), m.seq), ("bob", 2));
        }
        other => panic!("{other:?}"),
    }
    // Neither our own seq 1 nor bob's seq 2 again.
    assert!(client.ping().await.is_ok());
    assert_eq!(events.try_recv(), None);
    assert_eq!(
        client.cursors(),
        vec![Cursor {
            conv: Conv::Direct(vec!["alice".into(), "bob".into()]),
            seq: 2
        }]
    );
    assert!(client.ping().await.is_ok());
    match client.rooms().await {
        Err(ClientError::Server(body)) => assert_eq!(body.code, ErrorCode::Unsupported),
        other => panic!("{other:?}"),
    }

    // Many requests in flight at once each get their own reply.
    let mut handles = Vec::new();
    for _ in 0..50 {
        let c = client.clone();
        handles.push(tokio::spawn(async move { c.ping().await }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }

    client.quit().await.unwrap();
    assert!(matches!(
        events.recv().await,
        Some(ClientEvent::Disconnected {
            reason: DisconnectReason::Quit,
            reconnecting: false,
            ..
        })
    ));
    assert_eq!(events.recv().await, None);
    assert!(client.is_closed());
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Disconnected { .. })
    ));
}

#[tokio::test]
async fn a_server_disconnect_fails_waiting_requests_and_ends_events() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (client, mut events, _session) =
        Client::connect(options(&m, dir.path(), Trust::TrustOnFirstUse))
            .await
            .unwrap();
    match client.announce("shutdown").await {
        Err(ClientError::Disconnected { reason, message }) => {
            assert_eq!(reason, DisconnectReason::Shutdown);
            assert_eq!(message, "the server is shutting down");
        }
        other => panic!("{other:?}"),
    }
    let mut last = None;
    while let Some(e) = tokio::time::timeout(WAIT, events.recv()).await.unwrap() {
        last = Some(e);
    }
    assert!(matches!(
        last,
        Some(ClientEvent::Disconnected {
            reason: DisconnectReason::Shutdown,
            reconnecting: false,
            ..
        })
    ));
}

#[tokio::test]
async fn an_oversize_frame_ends_the_connection_with_a_reason() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (client, mut events, _session) =
        Client::connect(options(&m, dir.path(), Trust::TrustOnFirstUse))
            .await
            .unwrap();
    let pending = client
        .submit(Request::Announce { text: "big".into() })
        .await
        .unwrap();
    match pending.reply().await {
        Err(ClientError::Disconnected { message, .. }) => {
            assert!(message.contains("over this client's limit"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        events.recv().await,
        Some(ClientEvent::Disconnected {
            reason: DisconnectReason::Other,
            reconnecting: false,
            ..
        })
    ));
}

#[tokio::test]
async fn a_request_without_reply_times_out() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&m, dir.path(), Trust::TrustOnFirstUse);
    let (client, _events, _session) = Client::connect(opts.clone()).await.unwrap();
    drop(client);
    opts.trust = Trust::PinnedOnly;
    opts.request_timeout = Duration::from_millis(200);
    let (client, _events, _session) = Client::connect(opts).await.unwrap();
    assert!(matches!(
        client.announce("silent").await,
        Err(ClientError::Timeout { .. })
    ));
    // The connection is still usable.
    client.ping().await.unwrap();
}

#[tokio::test]
async fn a_send_in_flight_at_a_drop_is_sent_again_and_its_copy_not_delivered() {
    let (m, seen) = mock_flaky().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&m, dir.path(), Trust::TrustOnFirstUse);
    opts.reconnect = Reconnect {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_attempts: Some(20),
        give_up_after: WAIT,
    };
    let (client, mut events, _session) = Client::connect(opts).await.unwrap();
    let general = Conv::Room("general".into());
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::Server(Event::Message(Message { seq: 1, .. }))
    ));

    // A join that is never answered, then a send during which the server goes down.
    let join = client
        .submit(Request::Join {
            room: "slow".into(),
            password: None,
        })
        .await
        .unwrap();
    let send = client
        .submit(Request::Send {
            target: Target::Room {
                room: "general".into(),
                except: vec![],
            },
            body: Body::text("mine"),
            idempotency_key: None,
            refs: None,
        })
        .await
        .unwrap();
    match join.reply().await {
        Err(ClientError::Disconnected { reason, message }) => {
            assert_eq!(reason, DisconnectReason::Shutdown);
            assert!(message.contains("may or may not"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The send is answered on the new connection: stored once, by the first attempt.
    assert_eq!(
        send.reply().await.unwrap(),
        Reply::Sent {
            msg_id: "m-2".into(),
            seq: 2,
            ts_ms: 1002,
            duplicate: true
        }
    );

    let mut got = Vec::new();
    for _ in 0..10 {
        let e = next_event(&mut events).await;
        let done = matches!(e, ClientEvent::Reconnected { .. });
        got.push(e);
        if done {
            break;
        }
    }
    assert!(matches!(
        got[0],
        ClientEvent::Server(Event::CaughtUp { count: 1, .. })
    ));
    assert!(matches!(
        &got[1],
        ClientEvent::Disconnected { reason: DisconnectReason::Shutdown, message, reconnecting: true }
            if message == "restarting"
    ));
    // Our own stored send is not delivered back; bob's message is, then the reconnect.
    match &got[2] {
        ClientEvent::Server(Event::Message(m)) => assert_eq!((m.from.as_str(), m.seq), ("bob", 3)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        got[3..],
        [ClientEvent::Reconnected {
            missed: 1,
            truncated: false,
            server: m.addr.clone(),
        }]
    );
    client.ping().await.unwrap();
    assert_eq!(events.try_recv(), None);

    // The repeat carried the same key, and the login resumed after what was delivered.
    let keys = seen.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some());
    assert_eq!(keys[0], keys[1]);
    assert_eq!(
        *seen.resumes.lock().unwrap(),
        vec![
            vec![],
            vec![Cursor {
                conv: general.clone(),
                seq: 1
            }]
        ]
    );
    assert_eq!(
        client.cursors(),
        vec![Cursor {
            conv: general,
            seq: 3
        }]
    );
    client.quit().await.unwrap();
}

async fn next_event(events: &mut conclave_client::Events) -> ClientEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event in time")
        .expect("events go on")
}

/// Runs the JSON client on the given input and returns its output lines.
async fn run_json(m: &Mock, dir: &Path, input: &str) -> (Result<(), ClientError>, Vec<Value>) {
    let mut out = Vec::new();
    let mut opts = JsonOptions::new(options(m, dir, Trust::TrustOnFirstUse));
    // The mock speaks the core protocol only.
    opts.e2ee = false;
    let result = tokio::time::timeout(WAIT, json::run(opts, input.as_bytes(), &mut out))
        .await
        .expect("the JSON client finishes");
    let text = String::from_utf8(out).unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (result, lines)
}

fn find<'a>(lines: &'a [Value], key: &str, value: Value) -> &'a Value {
    lines
        .iter()
        .find(|l| l.get(key) == Some(&value))
        .unwrap_or_else(|| panic!("no line with {key}={value} in {lines:#?}"))
}

#[tokio::test]
async fn json_client_session() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let input = [
        r#"{"cmd":"join","room":"general","id":1}"#,
        r#"{"cmd":"send","room":"general","text":"hi","id":"two"}"#,
        r#"{"cmd":"send","to":["bob"],"text":"psst","id":3}"#,
        r#"not json"#,
        r#"{"cmd":"fly","id":5}"#,
        r#"{"cmd":"search","query":"x","id":6}"#,
        r#"{"cmd":"rooms","id":7}"#,
        "",
        r#"{"cmd":"quit","id":8}"#,
        r#"{"cmd":"rooms","id":"after quit: never read"}"#,
    ]
    .join("\n");
    let (result, lines) = run_json(&m, dir.path(), &input).await;
    result.unwrap();

    assert_eq!(
        lines[0],
        json!({"event":"connected","user":"alice","server":m.addr,"servers":[m.addr],"fingerprint":m.fingerprint,
               "trust":"new","admin":false,"rooms":["general"],"tls":"TLS 1.3",
               "key_exchange":"X25519","post_quantum":false})
    );
    assert_eq!(
        find(&lines, "id", json!(1)),
        &json!({"id":1,"ok":true,"room":"general","members":["bob","alice"]})
    );
    let sent = find(&lines, "id", json!("two"));
    assert_eq!(sent["ok"], json!(true));
    assert_eq!(sent["msg_id"], json!("m-1"));
    assert_eq!(sent["seq"], json!(1));
    assert_eq!(sent["ts"], json!(1000));
    find(&lines, "id", json!(3));
    assert_eq!(
        find(&lines, "event", json!("join")),
        &json!({"event":"join","room":"general","user":"alice"})
    );
    let direct = lines
        .iter()
        .find(|l| l["event"] == "message" && l.get("to").is_some())
        .unwrap();
    assert_eq!(
        direct,
        &json!({"event":"message","to":["alice"],"from":"bob","text":"psst","msg_id":"m-2",
                "seq":2,"ts":1002,"e2ee":false})
    );
    // Each conversation's message once: the echo of our own and the repeat are dropped.
    assert_eq!(lines.iter().filter(|l| l["event"] == "message").count(), 2);
    let bad = lines
        .iter()
        .find(|l| l.get("id").is_none() && l.get("error").is_some())
        .unwrap();
    assert_eq!(bad["error"]["code"], json!("bad_request"));
    assert_eq!(
        find(&lines, "id", json!(5))["error"]["code"],
        json!("bad_request")
    );
    assert_eq!(
        find(&lines, "id", json!(6))["error"]["code"],
        json!("unsupported")
    );
    assert_eq!(
        find(&lines, "id", json!(7))["error"]["code"],
        json!("unsupported")
    );
    assert_eq!(lines.last().unwrap(), &json!({"id":8,"ok":true}));
    // Our own quit's disconnect is not printed, and nothing after quit was run.
    assert!(lines.iter().all(|l| l["event"] != "disconnected"));
    assert!(lines.iter().all(|l| l["id"] != "after quit: never read"));
}

#[tokio::test]
async fn json_client_quits_at_end_of_input_after_the_last_reply() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (result, lines) = run_json(
        &m,
        dir.path(),
        "{\"cmd\":\"send\",\"room\":\"r\",\"text\":\"x\",\"id\":1}\n",
    )
    .await;
    result.unwrap();
    assert_eq!(find(&lines, "id", json!(1))["ok"], json!(true));
}

#[tokio::test]
async fn json_client_reports_a_server_disconnect_and_fails() {
    let m = mock(HelloAnswer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    // Keep stdin open (no EOF) so only the server can end the session.
    let (mut stdin_w, stdin_r) = tokio::io::duplex(1024);
    stdin_w
        .write_all(b"{\"cmd\":\"announce\",\"text\":\"shutdown\",\"id\":1}\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut opts = JsonOptions::new(options(&m, dir.path(), Trust::TrustOnFirstUse));
    opts.e2ee = false;
    let result = tokio::time::timeout(
        WAIT,
        json::run(opts, tokio::io::BufReader::new(stdin_r), &mut out),
    )
    .await
    .expect("finishes");
    assert!(matches!(
        result,
        Err(ClientError::Disconnected {
            reason: DisconnectReason::Shutdown,
            ..
        })
    ));
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        find(&lines, "event", json!("disconnected")),
        &json!({"event":"disconnected","reason":"shutdown","message":"the server is shutting down",
                "reconnecting":false})
    );
    assert_eq!(
        find(&lines, "id", json!(1))["error"]["code"],
        json!("disconnected")
    );
    drop(stdin_w);
}
