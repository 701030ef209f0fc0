//! Peer-to-peer transfer glue (QUIC). Placeholder until the QUIC endpoint lands: every
//! attempt reports why, and the caller falls back to the relay.

use std::path::Path;

use conclave_proto::{FileOffer, P2pInvite, Target};

use crate::files::{FileOptions, FileSent};
use crate::{Client, ClientError};

/// Sends a file peer to peer (falls back to the relay here: no QUIC yet).
pub(crate) async fn send(
    client: &Client,
    path: &Path,
    target: Target,
    mut opts: FileOptions,
) -> Result<FileSent, ClientError> {
    opts.p2p = false;
    client.send_file(path, target, opts).await
}

/// Fetches `offer` directly from its sender into `part`. Returns the bytes that were already
/// there, or why it could not (the caller then uses the relay).
pub(crate) async fn fetch(
    _offer: &FileOffer,
    _invite: &P2pInvite,
    _part: &Path,
    _opts: &FileOptions,
) -> Result<u64, String> {
    Err("this build has no peer-to-peer support".to_string())
}
