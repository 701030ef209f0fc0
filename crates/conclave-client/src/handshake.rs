//! Opening a connection up to the first frame: TCP, TLS 1.3 with the trust decision, and the
//! version exchange. Every step is bounded by a timeout and fails with a sentence that says
//! what to check.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use conclave_proto::hello::{self, HELLO_BYTES, HelloError, HelloStatus};
use conclave_proto::{DisconnectReason, PROTOCOL_VERSION};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::address::ServerAddr;
use crate::error::{ClientError, plain};
use crate::options::ConnectOptions;
use crate::trust::{PinOutcome, TrustPlan, default_state_dir};

/// A connection that is ready for frames.
pub(crate) struct Established {
    pub stream: TlsStream<TcpStream>,
    pub fingerprint: String,
    pub trust: PinOutcome,
    pub tls_version: String,
    pub cipher_suite: String,
    pub key_exchange: String,
}

/// Connects to `addr`, one of the addresses of a `--server` list whose pin is kept under
/// `key` (its first address; `addr` itself for a single address): the nodes of a cluster
/// share one TLS identity, so every address must present the certificate pinned for `key`.
pub(crate) async fn establish(
    addr: &ServerAddr,
    key: &ServerAddr,
    opts: &ConnectOptions,
) -> Result<Established, ClientError> {
    let server = addr.to_string();
    let state_dir = opts.state_dir.clone().or_else(default_state_dir);
    let mut plan = TrustPlan::new(&opts.trust, &key.to_string(), state_dir.as_deref())?;
    if addr != key {
        plan = plan.shown_as(format!(
            "{server} (listed with {key}, whose pinned certificate it shares)"
        ));
    }

    let tcp = tcp_connect(addr, opts.connect_timeout).await?;
    tcp.set_nodelay(true).map_err(|source| ClientError::Io {
        what: format!("could not set TCP_NODELAY on the connection to {server}"),
        source,
    })?;

    let name = server_name(addr, plan.ca_file().is_some())?;
    let connector = TlsConnector::from(plan.config());
    let mut stream = match timeout(opts.handshake_timeout, connector.connect(name, tcp)).await {
        Err(_) => {
            return Err(ClientError::HandshakeTimeout {
                server,
                stage: "TLS handshake",
                seconds: opts.handshake_timeout.as_secs(),
            });
        }
        Ok(Err(e)) => {
            return Err(match plan.refusal() {
                Some(refusal) => ClientError::Trust(refusal),
                None => tls_error(&server, &e, plan.ca_file()),
            });
        }
        Ok(Ok(stream)) => stream,
    };
    let (tls_version, cipher_suite, key_exchange) = describe_tls(stream.get_ref().1);

    match timeout(opts.handshake_timeout, exchange_hello(&mut stream, &server)).await {
        Err(_) => {
            return Err(ClientError::HandshakeTimeout {
                server,
                stage: "version exchange",
                seconds: opts.handshake_timeout.as_secs(),
            });
        }
        Ok(result) => result?,
    }

    // Only now, with a server that holds the certificate's key and speaks our protocol, is
    // the certificate worth remembering.
    let trust = plan.confirm()?;
    Ok(Established {
        stream,
        fingerprint: plan.seen_fingerprint().unwrap_or_default(),
        trust,
        tls_version,
        cipher_suite,
        key_exchange,
    })
}

async fn tcp_connect(addr: &ServerAddr, limit: Duration) -> Result<TcpStream, ClientError> {
    let server = addr.to_string();
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((addr.host.as_str(), addr.port))
            .await
            .map_err(|source| ClientError::Resolve {
                host: addr.host.clone(),
                source,
            })?
            .collect();
        let mut last_error = None;
        // Try every address (IPv6 and IPv4 of a dual-stack name) before giving up.
        for socket_addr in addrs {
            match TcpStream::connect(socket_addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(match last_error {
            Some(source) => ClientError::Connect {
                server: server.clone(),
                source,
            },
            None => ClientError::Resolve {
                host: addr.host.clone(),
                source: io::Error::other("the name has no addresses"),
            },
        })
    };
    match timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::ConnectTimeout {
            seconds: limit.as_secs(),
            server,
        }),
    }
}

/// The name to send in SNI and, with a CA, to check the certificate against. Pinning does
/// not look at names, so a host that is not a valid DNS name still works there.
fn server_name(addr: &ServerAddr, for_ca: bool) -> Result<ServerName<'static>, ClientError> {
    match ServerName::try_from(addr.host.as_str()) {
        Ok(name) => Ok(name.to_owned()),
        Err(_) if !for_ca => Ok(ServerName::try_from("conclave.invalid")
            .map_err(|e| ClientError::Tls {
                server: addr.to_string(),
                message: e.to_string(),
            })?
            .to_owned()),
        Err(e) => Err(ClientError::Tls {
            server: addr.to_string(),
            message: format!(
                "{:?} cannot be checked against a CA certificate: {e}",
                addr.host
            ),
        }),
    }
}

fn describe_tls(conn: &rustls::ClientConnection) -> (String, String, String) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".to_string());
    let group = conn
        .negotiated_key_exchange_group()
        .map(|g| key_exchange_name(g.name()))
        .unwrap_or_else(|| "unknown".to_string());
    (version, suite, group)
}

/// How a key exchange group is reported: its IANA name (`X25519MLKEM768`, `X25519`,
/// `secp256r1`, ...).
pub(crate) fn key_exchange_name(group: rustls::NamedGroup) -> String {
    match group.as_str() {
        Some(name) => name.to_string(),
        None => format!("{group:?}"),
    }
}

/// Whether a key exchange group (by the name [`key_exchange_name`] gives) is a post-quantum
/// one: traffic recorded today stays secret even against a future quantum computer.
pub fn is_post_quantum(key_exchange: &str) -> bool {
    key_exchange.contains("MLKEM")
}

/// How [`tls_error`] starts the message of a certificate that does not check out: a trust
/// failure, which retrying will not fix.
const CERTIFICATE_REFUSED: &str = "the server's certificate";

/// Whether `e` says the server's certificate was refused (by a pin or by the CA): retrying
/// the same server will not help.
pub(crate) fn is_trust_failure(e: &ClientError) -> bool {
    match e {
        ClientError::Trust(_) => true,
        ClientError::Tls { message, .. } => message.starts_with(CERTIFICATE_REFUSED),
        _ => false,
    }
}

/// Rephrases a failed TLS handshake. Trust refusals are handled before this.
fn tls_error(server: &str, e: &io::Error, ca_file: Option<&std::path::Path>) -> ClientError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let message = match tls {
        Some(rustls::Error::InvalidCertificate(_)) => match ca_file {
            Some(ca) => format!(
                "{CERTIFICATE_REFUSED} is not valid for {server} according to {} ({})",
                ca.display(),
                tls.map(|t| t.to_string()).unwrap_or_default()
            ),
            None => format!(
                "{CERTIFICATE_REFUSED} was refused ({})",
                tls.map(|t| t.to_string()).unwrap_or_default()
            ),
        },
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)) => {
            "the server does not speak TLS 1.3, which Conclave requires".to_string()
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server ended the handshake with the TLS alert {alert:?}")
        }
        Some(
            t @ (rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }),
        ) => format!("the other end does not speak TLS ({t}); is {server} a Conclave server?"),
        Some(other) => other.to_string(),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "the server closed the connection during the \
                 handshake (is it a Conclave server? it may also refuse your address, or be at \
                 its connection limit)"
                .to_string(),
            _ => plain(e),
        },
    };
    ClientError::Tls {
        server: server.to_string(),
        message,
    }
}

/// Sends our hello and reads the server's.
async fn exchange_hello(
    stream: &mut TlsStream<TcpStream>,
    server: &str,
) -> Result<(), ClientError> {
    let io_error = |source: io::Error| match source.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ClientError::disconnected(
            DisconnectReason::Other,
            "the server closed the connection during the version exchange (it may refuse \
             your address, or be at its connection limit)",
        ),
        _ => ClientError::Io {
            what: format!("the version exchange with {server} failed"),
            source,
        },
    };
    stream
        .write_all(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok))
        .await
        .map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;
    let mut answer = [0u8; HELLO_BYTES];
    stream.read_exact(&mut answer).await.map_err(io_error)?;
    check_hello(&answer, server)
}

fn check_hello(answer: &[u8; HELLO_BYTES], server: &str) -> Result<(), ClientError> {
    match hello::decode(answer) {
        Ok(h) if h.status == HelloStatus::UnsupportedVersion => Err(ClientError::Version {
            server_version: h.version,
            client_version: PROTOCOL_VERSION,
        }),
        Ok(h) => {
            if h.version != PROTOCOL_VERSION {
                tracing::debug!(
                    server_version = h.version,
                    "the server accepted our protocol version {PROTOCOL_VERSION}"
                );
            }
            Ok(())
        }
        Err(e @ (HelloError::BadMagic | HelloError::BadStatus(_))) => {
            Err(ClientError::NotConclave {
                server: server.to_string(),
                detail: e.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_answers() {
        assert!(check_hello(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok), "s").is_ok());
        let err = check_hello(&hello::encode(9, HelloStatus::UnsupportedVersion), "s")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "server speaks protocol version 9, this client speaks {PROTOCOL_VERSION}; \
                 upgrade the older one"
            )
        );
        assert!(matches!(
            check_hello(b"HTTP/1.1", "s"),
            Err(ClientError::NotConclave { .. })
        ));
    }

    #[test]
    fn certificate_refusals_are_trust_failures() {
        let bad_cert = io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        ));
        for ca in [None, Some(std::path::Path::new("/ca.pem"))] {
            let e = tls_error("h:1", &bad_cert, ca);
            assert!(is_trust_failure(&e), "{e}");
        }
        let closed = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(!is_trust_failure(&tls_error("h:1", &closed, None)));
    }

    #[tokio::test]
    async fn connection_refused_is_explained() {
        // Bind then drop a listener to find a port that refuses.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let addr = ServerAddr::parse(&format!("127.0.0.1:{port}")).unwrap();
        let err = tcp_connect(&addr, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("connection refused (is the server running?"),
            "{err}"
        );
    }
}
