//! File transfer: the types of offers, chunks and peer-to-peer invitations.
//!
//! A file goes to the same targets as a message ([`crate::Target`]). The sender announces it
//! with [`crate::Request::FileOffer`] (name, size, SHA-256), then, for the relay, uploads it in
//! chunks of the size the server names ([`crate::Reply::FileCreated`]) with
//! [`crate::Request::FileChunk`], strictly in order; an upload cut short resumes from what
//! [`crate::Request::FileStatus`] reports. When the upload is complete and its SHA-256 checked,
//! every recipient gets an [`crate::Event::FileOffer`] (now, or when it next logs in, until the
//! file expires) and fetches chunks with [`crate::Request::FileFetch`] from any offset, so a
//! download resumes where it stopped.
//!
//! With a peer-to-peer offer the sender also serves the file itself over QUIC: the offer
//! carries its addresses and the certificate fingerprint of that endpoint, and the server adds a
//! one-time token per recipient (it gives the sender the same tokens). A recipient that cannot
//! reach the sender asks for the relay copy ([`crate::Request::FileWantRelay`]); the sender is
//! told to upload it ([`crate::Event::FileRelayWanted`]), and the recipient is told when it is
//! ready ([`crate::Event::FileReady`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::msg::Conv;

/// Bytes of a SHA-256 digest.
pub const SHA256_BYTES: usize = 32;
/// Bytes of a peer-to-peer token.
pub const P2P_TOKEN_BYTES: usize = 32;
/// Most addresses a peer-to-peer offer may list.
pub const MAX_P2P_ADDRS: usize = 8;
/// Longest file name, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// What a sender says about the endpoint it serves a file from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2pOffer {
    /// Where the sender's QUIC endpoint listens.
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the endpoint's certificate (DER).
    pub fingerprint: [u8; SHA256_BYTES],
}

/// What a recipient needs to fetch a file from its sender directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2pInvite {
    pub addrs: Vec<SocketAddr>,
    pub fingerprint: [u8; SHA256_BYTES],
    /// One-time token for this recipient.
    pub token: [u8; P2P_TOKEN_BYTES],
}

/// A file as offered to one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// Server-assigned id (UUID v7 text).
    pub file_id: String,
    pub from: String,
    /// The conversation it was sent to (a room, or the direct conversation of the participants).
    pub conv: Conv,
    /// Users of the room left out by the sender (blockcast); empty otherwise.
    pub except: Vec<String>,
    /// The file's name as the sender gave it (no directories).
    pub name: String,
    pub size: u64,
    pub sha256: [u8; SHA256_BYTES],
    /// The size of the chunks [`crate::Request::FileFetch`] returns (the last may be shorter).
    pub chunk_size: u32,
    /// When it was offered, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// After this the server deletes it.
    pub expires_ms: i64,
    /// The server holds the complete file: [`crate::Request::FileFetch`] works now.
    pub relay_ready: bool,
    /// Present when the sender serves it directly.
    pub p2p: Option<P2pInvite>,
}

/// A recipient's token, as given to the sender of a peer-to-peer offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2pGrant {
    pub user: String,
    pub token: [u8; P2P_TOKEN_BYTES],
}

/// Bytes carried in a frame without per-byte encoding overhead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Chunk(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// Checks a file name from a peer: one path component, no control characters, not `.`/`..`,
/// at most [`MAX_FILE_NAME_BYTES`]. Returns the reason it is refused.
pub fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the file name is empty");
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return Err("the file name is longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return Err("the file name may not be . or ..");
    }
    if name.contains(['/', '\\']) {
        return Err("the file name may not contain / or \\");
    }
    if name.chars().any(char::is_control) {
        return Err("the file name may not contain control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert!(check_file_name("report.pdf").is_ok());
        assert!(check_file_name("ünïcode name (1).txt").is_ok());
        for bad in ["", ".", "..", "a/b", "..\\x", "a\nb", "a\0b"] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name(&"x".repeat(256)).is_err());
    }
}
