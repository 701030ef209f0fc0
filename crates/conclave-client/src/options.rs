//! What a connection needs to know: where, whom to trust, who we are, and every limit.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use conclave_proto::{CLIENT_MAX_FRAME_BYTES, Cursor, Request};

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
/// Default time between acknowledgements of received messages ([`Request::Ack`]); one is sent
/// only when something new was received.
pub const DEFAULT_ACK_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest accepted [`ConnectOptions::ack_interval`]; shorter values are raised to it.
pub const MIN_ACK_INTERVAL: Duration = Duration::from_millis(10);
/// Default delay before the first reconnect attempt (before jitter).
pub const DEFAULT_RECONNECT_INITIAL_DELAY: Duration = Duration::from_millis(200);
/// Default longest delay between reconnect attempts.
pub const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(10);
/// Default time after a drop when the client stops trying to reconnect.
pub const DEFAULT_RECONNECT_GIVE_UP_AFTER: Duration = Duration::from_secs(60 * 60);

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

    pub fn password(&self) -> &str {
        match self {
            Auth::Login { password, .. } | Auth::Register { password, .. } => password,
        }
    }

    /// The first request of a connection: log in (resuming after `resume`) or register.
    pub(crate) fn to_request(&self, resume: Vec<Cursor>) -> Request {
        match self.clone() {
            Auth::Login {
                user,
                password,
                server_password,
            } => Request::Login {
                user,
                password,
                server_password,
                resume,
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

    /// The first request of a reconnection: always a login (an account made with
    /// [`Auth::Register`] exists by then).
    pub(crate) fn to_login(&self, resume: Vec<Cursor>) -> Request {
        match self.clone() {
            Auth::Login {
                user,
                password,
                server_password,
            }
            | Auth::Register {
                user,
                password,
                server_password,
                ..
            } => Request::Login {
                user,
                password,
                server_password,
                resume,
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
    /// `host:port`, `host` (port 7667) or `[ipv6]:port`; or several of them separated by
    /// commas (see [`crate::ServerList`]): the nodes of one cluster, which share one
    /// certificate. They are tried in order; a drop moves to the next (see [`Reconnect`]).
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
    /// How often received messages are acknowledged to the server ([`Request::Ack`]), so that
    /// a later connection without cursors (a new process) gets only what this one did not.
    /// Nothing is sent when nothing new arrived; at least [`MIN_ACK_INTERVAL`].
    pub ack_interval: Duration,
    /// What to do when the connection drops.
    pub reconnect: Reconnect,
    /// Cursors for the first login (for example [`crate::Client::cursors`] saved by an
    /// earlier run): the server sends what came after them. Conversations not listed resume
    /// after what the account last acknowledged.
    pub resume: Vec<Cursor>,
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
            max_frame_bytes: CLIENT_MAX_FRAME_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            outbound_queue_frames: DEFAULT_OUTBOUND_QUEUE_FRAMES,
            event_queue_len: DEFAULT_EVENT_QUEUE_LEN,
            ack_interval: DEFAULT_ACK_INTERVAL,
            reconnect: Reconnect::default(),
            resume: Vec::new(),
        }
    }
}

/// Reconnecting after a connection dropped for a reason that is not final: exponential
/// back-off with jitter, bounded by a number of attempts and by time.
///
/// Attempt `n` (from 0) waits a random time between half of and the whole of
/// `min(max_delay, initial_delay × 2ʳ)` before connecting, where `r` is the round: `n` with
/// one server address, `n / len` with several ([`ConnectOptions::server`]), whose attempts go
/// to the address after the one that dropped, then on through the list, wrapping around. The
/// client gives up when `max_attempts` attempts (to any address) failed in a row, or once
/// `give_up_after` has passed since the drop. [`Reconnect::never`] turns reconnecting off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// `None`: no limit on the count (`give_up_after` still applies); `Some(0)`: never
    /// reconnect.
    pub max_attempts: Option<u32>,
    pub give_up_after: Duration,
}

impl Default for Reconnect {
    /// 200 ms doubling up to 10 s, for up to an hour.
    fn default() -> Self {
        Reconnect {
            initial_delay: DEFAULT_RECONNECT_INITIAL_DELAY,
            max_delay: DEFAULT_RECONNECT_MAX_DELAY,
            max_attempts: None,
            give_up_after: DEFAULT_RECONNECT_GIVE_UP_AFTER,
        }
    }
}

impl Reconnect {
    /// Never reconnect: a drop ends the client.
    pub fn never() -> Self {
        Reconnect {
            max_attempts: Some(0),
            ..Reconnect::default()
        }
    }

    /// Whether attempt number `attempt` (from 0) may be made `elapsed` after the drop.
    pub fn allows(&self, attempt: u32, elapsed: Duration) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max) && elapsed < self.give_up_after
    }

    /// The wait before attempt number `attempt` (from 0); `random` is any random number (the
    /// jitter).
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let base = self
            .initial_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let half = base / 2;
        let spread = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(random % spread.saturating_add(1))
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

    #[test]
    fn back_off_doubles_with_jitter_up_to_the_cap() {
        let r = Reconnect::default();
        let ms = Duration::from_millis;
        // Without jitter (random 0) the wait is half the base; with the most, the whole base.
        let lowest: Vec<_> = (0..10).map(|n| r.delay(n, 0)).collect();
        let highest: Vec<_> = (0..10).map(|n| r.delay(n, u64::MAX - 1)).collect();
        assert_eq!(lowest[0], ms(100));
        assert_eq!(lowest[1], ms(200));
        assert_eq!(lowest[2], ms(400));
        assert_eq!(lowest[6], ms(5000));
        assert_eq!(lowest[9], ms(5000));
        for n in 0..10 {
            assert!(highest[n] <= ms(200u64 << n).min(ms(10_000)), "{n}");
            assert!(highest[n] >= lowest[n]);
        }
        // Any random number stays in [base / 2, base], and huge attempt numbers do not
        // overflow.
        for (n, random) in [(0, 7), (3, 123_456_789), (40, u64::MAX), (u32::MAX, 5)] {
            let d = r.delay(n, random);
            let base = ms(200u64.saturating_mul(1 << n.min(20))).min(ms(10_000));
            assert!(d >= base / 2 && d <= base, "{n}: {d:?}");
        }
    }

    #[test]
    fn give_up_by_count_or_time() {
        let r = Reconnect {
            max_attempts: Some(3),
            give_up_after: Duration::from_secs(5),
            ..Reconnect::default()
        };
        assert!(r.allows(0, Duration::ZERO));
        assert!(r.allows(2, Duration::from_secs(4)));
        assert!(!r.allows(3, Duration::ZERO));
        assert!(!r.allows(0, Duration::from_secs(5)));
        assert!(!Reconnect::never().allows(0, Duration::ZERO));
        assert!(Reconnect::default().allows(1_000_000, Duration::from_secs(3599)));
        assert!(!Reconnect::default().allows(0, Duration::from_secs(3600)));
    }

    #[test]
    fn reconnecting_logs_in_even_after_registering() {
        let auth = Auth::Register {
            user: "alice".into(),
            password: "pw".into(),
            server_password: Some("sp".into()),
            invite_code: Some("code".into()),
        };
        assert!(matches!(auth.to_request(vec![]), Request::Register { .. }));
        let cursor = Cursor {
            conv: conclave_proto::Conv::Room("general".into()),
            seq: 4,
        };
        assert_eq!(
            auth.to_login(vec![cursor.clone()]),
            Request::Login {
                user: "alice".into(),
                password: "pw".into(),
                server_password: Some("sp".into()),
                resume: vec![cursor],
            }
        );
    }
}
