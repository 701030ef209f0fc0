//! Conclave's wire protocol: the version exchange, frames, requests, replies, events and error
//! codes.
//!
//! This crate does no I/O and does not depend on tokio: it turns bytes into typed messages and
//! back, and states the limits that the I/O layers must enforce. The server, the client library
//! and the fuzzers all share it, so a decoding rule lives in exactly one place.
//!
//! A connection is: TLS 1.3, then an 8-byte [`hello`] from each side, then length-prefixed
//! frames (a 4-byte big-endian length and a postcard-encoded [`ClientFrame`] or [`ServerFrame`]).

pub mod chat;
pub mod devices;
pub mod error;
pub mod files;
pub mod frame;
pub mod hello;
pub mod msg;
pub mod names;

pub use chat::{ActKind, ActsOn, Extra, MessageInfo, MsgState, Reaction, Refs};
pub use devices::{BackupChunk, TransferChunk, WaitingDevice};
pub use error::{ErrorBody, ErrorCode};
pub use files::{Chunk, FileOffer, P2pGrant, P2pInvite, P2pOffer};
pub use frame::{DecodeError, decode_client, decode_server, encode_client, encode_server};
pub use msg::*;

/// The protocol version this build speaks. Bumped on any incompatible change to [`msg`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The default TCP port (not a well-known port; chosen to avoid the usual IRC/XMPP ones).
pub const DEFAULT_PORT: u16 = 7667;

/// Size of the length prefix in front of every frame.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Default upper bound of one frame's body. The I/O layer refuses a larger length prefix before
/// it allocates anything.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;
/// Default largest frame from a logged-in client: end-to-end commits of groups of thousands of
/// devices carry their ratchet tree twice (GroupInfo and Welcome).
pub const MEMBER_MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;
/// Default largest frame a client accepts from its server (a GroupInfo, a Welcome or a commit
/// of a large end-to-end group).
pub const CLIENT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Default upper bound of one message body (text or opaque payload).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Most bytes of message bodies the server puts in one history or search reply (but always at
/// least one message), so a page of large messages stays well under
/// [`CLIENT_MAX_FRAME_BYTES`]: such a page holds fewer messages than asked for; page on.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// Content type of a plain text body.
pub const CONTENT_TYPE_TEXT: &str = "text/plain";
