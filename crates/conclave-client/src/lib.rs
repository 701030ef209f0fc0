//! The one async Conclave client API, used by the JSON client (`conclave client --json`), the
//! terminal UI and the benchmark.
//!
//! ```no_run
//! # async fn demo() -> Result<(), conclave_client::ClientError> {
//! use conclave_client::{Auth, Client, ConnectOptions, Trust};
//!
//! let auth = Auth::Login {
//!     user: "alice".into(),
//!     password: "correct horse".into(),
//!     server_password: None,
//! };
//! let mut opts = ConnectOptions::new("chat.example.org:7667", auth);
//! opts.trust = Trust::TrustOnFirstUse;
//! let (client, mut events, session) = Client::connect(opts).await?;
//! println!("logged in as {} ({})", session.user, session.tls_version);
//! client.join("general", None).await?;
//! client.send_to_room("general", "hello", &[]).await?;
//! while let Some(event) = events.recv().await {
//!     // Server events, and `Disconnected` / `Reconnected` around a reconnect.
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! Map:
//! - [`trust`]: is this the right server? Fingerprint pins, `known_servers`, CA files.
//! - `handshake`: TCP, TLS 1.3 and the version exchange, each with a timeout.
//! - `connection`: [`Client`] (requests and replies), [`Events`] (pushed events), and the
//!   reconnect with resume that keeps both valid when the connection drops.
//! - [`cursor`]: what has been delivered, per conversation: no message twice, none lost.
//! - [`json`]: `conclave client --json`.
//! - [`order`]: requests the library handles itself, run in the order given.
//! - `options`, `address`, `error`: what a connection needs, `--server` parsing, errors.
//!
//! This crate prints nothing to stdout or stderr except in [`json`]; it logs with `tracing`.

mod address;
pub mod chat;
mod connection;
pub mod cursor;
pub mod devices;
pub mod e2ee;
mod e2ee_file;
mod error;
pub mod files;
mod handshake;
pub mod json;
mod options;
pub mod order;
mod p2p_glue;
pub mod trust;

pub use address::{AddrError, MAX_SERVERS, ServerAddr, ServerList, server_key};
pub use connection::{Client, ClientEvent, Events, PendingReply, SendReceipt, Session};
pub use error::ClientError;
pub use files::{Direction, FileOptions, FileProgress, FileReceived, FileSent, ProgressFn, Via};
pub use handshake::is_post_quantum;
pub use options::*;
pub use trust::{PinOutcome, Trust, TrustError};

/// The protocol types, re-exported so users of this crate need not depend on it directly.
pub use conclave_proto as proto;
