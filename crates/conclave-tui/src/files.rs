//! ADAPTER: file transfer (`/file`, `/accept`, `/cancel`, offers and progress bars).
//!
//! This is the one place that knows the client library's file-transfer API
//! (`Client::send_file`, `Client::accept_file`, `FileOptions::progress`, and the file events).
//! The rest of the TUI speaks only the small types below ([`FileEvent`], [`Transfer`]); the I/O
//! shell calls [`send_file`] / [`accept_file`] and feeds what they report back to the screen
//! (offers in the conversation, progress bars above the status bar, a notice at the end).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use conclave_client::proto::Event;
use conclave_client::{Client, FileOptions, FileProgress};

use crate::buffer::ConvKey;

/// Where the adapter reports progress and completion (called from the library's tasks; must
/// not block).
pub type Report = Arc<dyn Fn(FileEvent) + Send + Sync>;

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
    /// Someone received a file I sent (the screen knows its name).
    Received {
        file_id: String,
        by: String,
        via_p2p: bool,
    },
    /// Someone declined a file I sent.
    Declined { file_id: String, by: String },
    /// The sender withdrew a file offered to me.
    Cancelled { file_id: String, by: String },
    /// Something to tell.
    Notice { text: String },
    /// A file event with nothing to show.
    Quiet,
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
pub fn file_event(event: &Event, me: &str) -> Option<FileEvent> {
    match event {
        Event::FileOffer(o) => Some(FileEvent::Offer {
            file_id: o.file_id.clone(),
            from: o.from.clone(),
            conv: ConvKey::from_conv(&o.conv, me),
            name: o.name.clone(),
            size: o.size,
            sha256: o.sha256.iter().map(|b| format!("{b:02x}")).collect(),
        }),
        Event::FileDeclined { file_id, by } => Some(FileEvent::Declined {
            file_id: file_id.clone(),
            by: by.clone(),
        }),
        Event::FileCancelled { file_id, by } => Some(FileEvent::Cancelled {
            file_id: file_id.clone(),
            by: by.clone(),
        }),
        Event::FileReceived {
            file_id,
            by,
            via_p2p,
        } => Some(FileEvent::Received {
            file_id: file_id.clone(),
            by: by.clone(),
            via_p2p: *via_p2p,
        }),
        // The library acts on these itself (relay copies for peer-to-peer transfers).
        Event::FileReady { .. } | Event::FileRelayWanted { .. } => Some(FileEvent::Quiet),
        _ => None,
    }
}

fn progress(
    report: Report,
    name: String,
    sending: bool,
) -> Arc<dyn Fn(&FileProgress) + Send + Sync> {
    Arc::new(move |p: &FileProgress| {
        report(FileEvent::Progress {
            file_id: p.file_id.clone(),
            name: name.clone(),
            sending,
            done: p.bytes,
            total: p.total,
        })
    })
}

/// Sends the file at `path` to the conversation `target` (through the server); returns what
/// to tell the user once the server holds all of it.
pub async fn send_file(
    client: &Client,
    path: &Path,
    target: &ConvKey,
    report: Report,
) -> Result<String, String> {
    let Some(to) = target.target(Vec::new()) else {
        return Err("/file offers to a conversation: switch to one first".into());
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let opts = FileOptions {
        progress: Some(progress(report.clone(), name.clone(), true)),
        ..FileOptions::default()
    };
    match client.send_file_any(path, to, opts).await {
        Ok(sent) => {
            report(FileEvent::Done {
                file_id: sent.file_id.clone(),
                name: sent.name.clone(),
                path: None,
            });
            Ok(format!(
                "offered {} ({} bytes) to {}: file id {}",
                sent.name,
                sent.size,
                target.label(),
                sent.file_id
            ))
        }
        Err(e) => Err(format!("file {}: {e}", path.display())),
    }
}

/// Cancels a file I sent (a send under way stops; the server withdraws it).
pub async fn cancel_file(client: &Client, file_id: &str) -> Result<String, String> {
    match client.cancel_file(file_id).await {
        Ok(()) => Ok(format!(
            "cancelled the file {file_id}; its recipients were told"
        )),
        Err(e) => Err(format!("cancel {file_id}: {e}")),
    }
}

/// Accepts the offered file `file_id`, saving it in `dir`; returns what to tell the user once
/// it is there (checked against its SHA-256).
pub async fn accept_file(
    client: &Client,
    file_id: &str,
    dir: &Path,
    report: Report,
) -> Result<String, String> {
    let opts = FileOptions {
        progress: Some(progress(report.clone(), file_id.to_string(), false)),
        ..FileOptions::default()
    };
    match client.accept_file(file_id, dir, opts).await {
        Ok(got) => {
            let name = got
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            report(FileEvent::Done {
                file_id: got.file_id.clone(),
                name,
                path: Some(got.path.clone()),
            });
            Ok(format!(
                "received {} bytes into {}",
                got.size,
                got.path.display()
            ))
        }
        Err(e) => Err(format!("file {file_id}: {e}")),
    }
}
