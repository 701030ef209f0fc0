//! The one error type of the crate. Each variant is something a caller decides on: fall back to
//! the relay, retry, ask for a new offer, or fix a local problem.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong with a direct transfer, phrased for the person who has to act on it.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// No address of the sender answered within the connect timeout. The caller should fall
    /// back to the relay.
    #[error(
        "no direct connection to the sender at {} within {timeout:?}; the sender may be behind a firewall or NAT: fall back to the relay",
        fmt_addrs(addrs)
    )]
    Unreachable {
        addrs: Vec<SocketAddr>,
        timeout: Duration,
    },

    /// The sender presented a certificate whose SHA-256 is not the one in the offer.
    #[error(
        "the sender's certificate does not match the fingerprint in the offer (expected {expected}, got {actual}); someone may be intercepting the connection: do not retry directly, use the relay"
    )]
    FingerprintMismatch { expected: String, actual: String },

    /// The sender does not know the token.
    #[error(
        "the sender does not know this transfer token; the offer may have been withdrawn or the token belongs to another offer: ask the sender to offer the file again or use the relay"
    )]
    BadToken,

    /// The token already completed a transfer.
    #[error(
        "this transfer token has already been used for a completed transfer; tokens are single-use: ask for a new offer or use the relay"
    )]
    TokenUsed,

    /// Another connection is using the same token right now.
    #[error(
        "another connection is transferring with this token right now; wait for it to end (or time out) and retry"
    )]
    TokenBusy,

    /// The sender refused the resume offset (past the end of the file).
    #[error(
        "the sender refused to resume at byte {offset} of a {size}-byte file; delete the partial file and retry from the start"
    )]
    BadOffset { offset: u64, size: u64 },

    /// The sender refused the connection at the QUIC level: it is already serving its maximum
    /// number of peers, or its offer has expired or been closed (QUIC gives no reason, so the
    /// two cannot be told apart).
    #[error(
        "the sender refused the connection: it is serving as many recipients as it allows, or its offer has ended; retry in a moment or use the relay"
    )]
    Refused,

    /// The sender's offer or session has ended (expired or closed by the sender).
    #[error("the sender has closed this offer ({reason}); ask for a new offer or use the relay")]
    Closed { reason: String },

    /// The sender offers a different file than the one the server announced.
    #[error(
        "the sender offers a different file than announced (size {their_size} vs {our_size}, or a different SHA-256); ask for a new offer or use the relay"
    )]
    OfferMismatch { our_size: u64, their_size: u64 },

    /// The received file does not hash to the announced SHA-256. The part file has been removed.
    #[error(
        "the received file's SHA-256 is {actual}, not the announced {expected}; the partial file {} was removed: retry (from the start) or use the relay",
        path.display()
    )]
    HashMismatch {
        expected: String,
        actual: String,
        path: PathBuf,
    },

    /// The peer broke the protocol (bad magic, version, lengths, too many bytes).
    #[error("the peer broke the transfer protocol: {0}; this is a bug or an attack: use the relay")]
    Protocol(String),

    /// The connection was lost or stalled mid-way. What was received is kept in the part file,
    /// so a retry resumes.
    #[error(
        "the direct connection was lost during the transfer ({0}); what arrived is kept, retry to resume or use the relay"
    )]
    Connection(String),

    /// A local file could not be read or written.
    #[error("{}: {error}; check the path, its permissions and the free disk space", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A window value is out of range.
    #[error(
        "{field} of {bytes} bytes is out of range: choose between {min} and {max} bytes (16 KiB to 1 GiB)"
    )]
    InvalidWindow {
        field: &'static str,
        bytes: u64,
        min: u64,
        max: u64,
    },

    /// The sender could not be set up (certificate, TLS, socket, limits).
    #[error("cannot set up the direct transfer: {0}")]
    Setup(String),
}

impl P2pError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> P2pError {
        let path = path.into();
        move |error| P2pError::Io { path, error }
    }
}

fn fmt_addrs(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    list.join(", ")
}
