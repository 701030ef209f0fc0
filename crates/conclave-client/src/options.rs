//! What a connection needs to know: where, whom to trust, who we are, and every limit.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use conclave_proto::{DEFAULT_MAX_FRAME_BYTES, Request};

use crate::trust::Trust;

/// Default bound on the TCP connect (name resolution included).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on each handshake stage: TLS, the version exchange, the login.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on waiting for a request's reply (queueing included).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle time after which the client sends a keep-alive ping. It must stay well under
/// the server's idle timeout.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default number of requests awaiting a reply at once; more wait for a slot.
pub const DEFAULT_MAX_PENDING_REQUESTS: usize = 256;
/// Default number of encoded frames queued for the writer task.
pub const DEFAULT_OUTBOUND_QUEUE_FRAMES: usize = 256;
/// Default number of events buffered for the application. When it is full the connection's
/// reader waits, and so do replies: the application must keep draining [`crate::Events`] (or
/// drop it, which discards events).
pub const DEFAULT_EVENT_QUEUE_LEN: usize = 1024;

/// Who we are: log in to an account, or create one.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Login {
        user: String,
        password: String,
        server_password: Option<String>,
    },
    Register {
        user: String,
        password: String,
        server_password: Option<String>,
        invite_code: Option<String>,
    },
}

impl Auth {
    pub fn user(&self) -> &str {
        match self {
            Auth::Login { user, .. } | Auth::Register { user, .. } => user,
        }
    }

    pub(crate) fn to_request(&self) -> Request {
        match self.clone() {
            Auth::Login {
                user,
                password,
                server_password,
            } => Request::Login {
                user,
                password,
                server_password,
                resume: Vec::new(),
            },
            Auth::Register {
                user,
                password,
                server_password,
                invite_code,
            } => Request::Register {
                user,
                password,
                server_password,
                invite_code,
            },
        }
    }
}

/// Secrets stay out of logs and panics.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Login {
                user,
                server_password,
                ..
            } => f
                .debug_struct("Login")
                .field("user", user)
                .field("password", &"<redacted>")
                .field(
                    "server_password",
                    &server_password.as_ref().map(|_| "<redacted>"),
                )
                .finish(),
            Auth::Register {
                user,
                server_password,
                invite_code,
                ..
            } => f
                .debug_struct("Register")
                .field("user", user)
                .field("password", &"<redacted>")
                .field(
                    "server_password",
                    &server_password.as_ref().map(|_| "<redacted>"),
                )
                .field("invite_code", &invite_code.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// Everything [`crate::Client::connect`] needs. Build with [`ConnectOptions::new`] and
/// change the fields you care about.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port`, `host` (port 7667) or `[ipv6]:port`.
    pub server: String,
    pub trust: Trust,
    /// Where `known_servers` lives; [`crate::trust::default_state_dir`] when `None`.
    pub state_dir: Option<PathBuf>,
    pub auth: Auth,
    /// Largest frame body accepted from the server (and sent to it); a larger length prefix
    /// ends the connection before anything is allocated.
    pub max_frame_bytes: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub keepalive_interval: Duration,
    pub max_pending_requests: usize,
    pub outbound_queue_frames: usize,
    pub event_queue_len: usize,
}

impl ConnectOptions {
    /// Options with the safe defaults: [`Trust::PinnedOnly`], the default state directory and
    /// the `DEFAULT_*` limits of this module.
    pub fn new(server: impl Into<String>, auth: Auth) -> Self {
        ConnectOptions {
            server: server.into(),
            trust: Trust::PinnedOnly,
            state_dir: None,
            auth,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            outbound_queue_frames: DEFAULT_OUTBOUND_QUEUE_FRAMES,
            event_queue_len: DEFAULT_EVENT_QUEUE_LEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let auth = Auth::Register {
            user: "alice".into(),
            password: "hunter2".into(),
            server_password: Some("letmein".into()),
            invite_code: Some("inv-123".into()),
        };
        let text = format!("{:?}", ConnectOptions::new("h:1", auth));
        assert!(text.contains("alice"));
        for secret in ["hunter2", "letmein", "inv-123"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}
