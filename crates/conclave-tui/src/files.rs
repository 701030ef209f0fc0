//! ADAPTER: file transfer (`/file`, `/accept`, offers and progress bars).
//!
//! This is the one place that knows the client library's file-transfer API. The rest of the
//! TUI speaks only the small types below ([`FileEvent`], [`Transfer`]) and calls
//! [`send_file`] / [`accept_file`] from the I/O shell.
//!
//! The planned library API (not in this build's `conclave-client` yet):
//! `Client::send_file(path, FileTarget, FileOptions) -> Result<FileReceipt { file_id, .. }>`,
//! `Client::accept_file(file_id, dir, opts)`, and the events `Event::FileOffer { file_id,
//! from, name, size, sha256, .. }` plus progress and completion events. To wire it: fill in
//! the two functions and [`file_event`], and set [`AVAILABLE`]; the screen (offers in the
//! conversation, progress bars above the status bar) already handles [`FileEvent`].

use std::path::{Path, PathBuf};

use conclave_client::Client;
use conclave_client::proto::Event;

use crate::buffer::ConvKey;

/// Whether this build can transfer files.
pub const AVAILABLE: bool = false;
/// What `/file` and `/accept` answer while [`AVAILABLE`] is false.
pub const UNAVAILABLE: &str = "file transfer: not available in this build";

/// What the screen learns about files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    /// Someone offers a file (shown in the conversation, with the `/accept` to type).
    Offer {
        file_id: String,
        from: String,
        conv: ConvKey,
        name: String,
        size: u64,
        sha256: String,
    },
    /// Bytes moved so far.
    Progress {
        file_id: String,
        name: String,
        sending: bool,
        done: u64,
        total: u64,
    },
    /// Finished: where it is (received) or that it was delivered (sent).
    Done {
        file_id: String,
        name: String,
        path: Option<PathBuf>,
    },
    Failed {
        file_id: String,
        name: String,
        message: String,
    },
}

/// A transfer in progress, as the progress bars show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub file_id: String,
    pub name: String,
    pub sending: bool,
    pub done: u64,
    pub total: u64,
}

/// The library event as a [`FileEvent`], if it is about a file. `me` names the local user.
pub fn file_event(_event: &Event, _me: &str) -> Option<FileEvent> {
    // Wire: Event::FileOffer { .. } => Some(FileEvent::Offer { .. }), and the progress and
    // completion events.
    None
}

/// Offers the file at `path` to the conversation `target`; returns the file id.
pub async fn send_file(
    _client: &Client,
    _path: &Path,
    _target: &ConvKey,
) -> Result<String, String> {
    // Wire: client.send_file(path, FileTarget::from(target), FileOptions::default()).await
    Err(UNAVAILABLE.to_string())
}

/// Accepts the offered file `file_id`, saving it in `dir`; returns where it was saved.
pub async fn accept_file(_client: &Client, _file_id: &str, _dir: &Path) -> Result<PathBuf, String> {
    // Wire: client.accept_file(file_id, dir, AcceptOptions::default()).await
    Err(UNAVAILABLE.to_string())
}
