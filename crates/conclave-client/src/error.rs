//! Errors of the client library, written for the person who has to act on them.

use std::io;

use conclave_proto::{DisconnectReason, ErrorBody};

use crate::address::{AddrError, ServerAddr};
use crate::trust::TrustError;

/// Everything that can go wrong when connecting or making a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    BadAddress(#[from] AddrError),

    #[error("could not resolve {host}: {source} (check the host name in --server)")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },

    #[error("could not connect to {server}: {}", connect_hint(source))]
    Connect {
        server: String,
        #[source]
        source: io::Error,
    },

    /// Every address of a `--server` list failed; each failure names its address.
    #[error(
        "could not connect to any of the {} addresses in --server: {}",
        failures.len(),
        failures.join("; ")
    )]
    NoServer { failures: Vec<String> },

    #[error(
        "could not connect to {server} within {seconds} s (is the host up? is a firewall \
         dropping the connection? check --server)"
    )]
    ConnectTimeout { server: String, seconds: u64 },

    /// The TLS handshake failed for a reason other than trust (see [`ClientError::Trust`]).
    #[error("TLS with {server} failed: {message}")]
    Tls { server: String, message: String },

    /// The server's certificate was refused.
    #[error(transparent)]
    Trust(#[from] TrustError),

    #[error(
        "{server} accepted the connection but did not finish the {stage} within {seconds} s \
         (is it a Conclave server? is it overloaded?)"
    )]
    HandshakeTimeout {
        server: String,
        stage: &'static str,
        seconds: u64,
    },

    #[error(
        "server speaks protocol version {server_version}, this client speaks \
         {client_version}; upgrade the older one"
    )]
    Version {
        server_version: u16,
        client_version: u16,
    },

    #[error(
        "{server} does not speak the Conclave protocol: {detail} (check --server and the port)"
    )]
    NotConclave { server: String, detail: String },

    /// The server answered the request with an error.
    #[error("{}", .0.message)]
    Server(ErrorBody),

    /// The connection is gone; `reason` and `message` are the server's when it said why.
    #[error("disconnected ({}): {message}", reason.as_str())]
    Disconnected {
        reason: DisconnectReason,
        message: String,
    },

    #[error("no reply from the server within {seconds} s")]
    Timeout { seconds: u64 },

    /// The connection dropped and the client is reconnecting, but no connection came back
    /// within the request timeout.
    #[error(
        "not connected to the server (reconnecting after the connection dropped) and no \
         connection came back within {seconds} s; try again later"
    )]
    NotConnected { seconds: u64 },

    #[error(
        "the request is {bytes} bytes when encoded, over the frame limit of {max} bytes; \
         send less at once"
    )]
    TooLarge { bytes: usize, max: usize },

    #[error("the server answered {request} with an unexpected reply: {reply}")]
    UnexpectedReply {
        request: &'static str,
        reply: String,
    },

    /// A local file problem in a transfer (`code`: `path_not_found`, `unreadable`,
    /// `not_writable`, `hash_mismatch`, `p2p_unreachable`, `p2p_failed`).
    #[error("{message}")]
    File { code: &'static str, message: String },

    /// End-to-end encryption could not do what was asked (the message says why and what to do).
    #[error("end-to-end encryption: {message}")]
    E2ee { message: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    /// A stable snake_case code for machines (the JSON client's `error.code`). Server errors
    /// keep the server's code.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::Server(body) => body.code.as_str(),
            ClientError::Disconnected { .. } | ClientError::NotConnected { .. } => "disconnected",
            ClientError::Timeout { .. } => "timeout",
            ClientError::TooLarge { .. } => "too_large",
            ClientError::UnexpectedReply { .. } => "protocol",
            ClientError::Version { .. } => "version",
            ClientError::Trust(_) => "trust",
            ClientError::Tls { .. } => "tls",
            ClientError::NotConclave { .. } => "protocol",
            ClientError::BadAddress(_) => "bad_request",
            ClientError::Resolve { .. }
            | ClientError::Connect { .. }
            | ClientError::ConnectTimeout { .. }
            | ClientError::NoServer { .. }
            | ClientError::HandshakeTimeout { .. } => "connect",
            ClientError::Io { .. } => "io",
            ClientError::File { code, .. } => code,
            ClientError::E2ee { .. } => "e2ee",
        }
    }

    pub(crate) fn disconnected(reason: DisconnectReason, message: impl Into<String>) -> Self {
        ClientError::Disconnected {
            reason,
            message: message.into(),
        }
    }
}

/// `e` as a sentence that names `addr`: as it is when it does, else after `addr: `.
pub(crate) fn naming(addr: &ServerAddr, e: &ClientError) -> String {
    let text = e.to_string();
    let name = addr.to_string();
    if text.contains(&name) {
        text
    } else {
        format!("{name}: {text}")
    }
}

/// "connection refused" alone does not say what to do; add the likely causes.
fn connect_hint(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused (is the server running? check --server)".to_string()
        }
        io::ErrorKind::TimedOut => {
            "timed out (is the host up? is a firewall dropping the connection?)".to_string()
        }
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            format!("{} (check the address and your network)", plain(e))
        }
        io::ErrorKind::PermissionDenied => {
            format!("{} (a local firewall may block it)", plain(e))
        }
        _ => plain(e),
    }
}

/// An io::Error's text without the trailing "(os error N)".
pub(crate) fn plain(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_lowercase(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_refused_says_what_to_do() {
        let e = ClientError::Connect {
            server: "localhost:7667".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(
            e.to_string(),
            "could not connect to localhost:7667: connection refused (is the server running? \
             check --server)"
        );
    }

    #[test]
    fn every_failed_address_is_named() {
        let refused = |port: u16| ClientError::Connect {
            server: format!("h:{port}"),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let a = ServerAddr::parse("h:1").unwrap();
        let b = ServerAddr::parse("h:2").unwrap();
        let lost = ClientError::disconnected(DisconnectReason::Other, "closed during login");
        let e = ClientError::NoServer {
            failures: vec![naming(&a, &refused(1)), naming(&b, &lost)],
        };
        assert_eq!(e.code(), "connect");
        assert_eq!(
            e.to_string(),
            "could not connect to any of the 2 addresses in --server: could not connect to \
             h:1: connection refused (is the server running? check --server); h:2: \
             disconnected (other): closed during login"
        );
    }

    #[test]
    fn codes() {
        let e = ClientError::Server(ErrorBody::new(
            conclave_proto::ErrorCode::NoSuchRoom,
            "no room x",
        ));
        assert_eq!(e.code(), "no_such_room");
        assert_eq!(e.to_string(), "no room x");
        assert_eq!(
            ClientError::disconnected(DisconnectReason::Shutdown, "bye").to_string(),
            "disconnected (shutdown): bye"
        );
    }
}
