//! What travels for a new device's history and for the recovery-key backup (issue 21). The
//! server stores and routes these; everything it cannot read stays ciphertext: chunks are
//! sealed by the approving device to the new device's transfer key, backup segments under a
//! key derived from the recovery key.

use serde::{Deserialize, Serialize};

use crate::Bytes;

/// A device of the account that asked for history, and what the account decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingDevice {
    pub device: String,
    /// The device's MLS signature key (its safety number is this key's fingerprint).
    pub signature_key: Bytes,
    /// The HPKE public key history is sealed to.
    pub transfer_key: Bytes,
    /// The device's signature over the transfer key.
    pub signature: Bytes,
    /// When it asked (milliseconds since the epoch).
    pub since_ms: i64,
    /// The address it connected from.
    pub addr: String,
    /// `waiting`, `approved` or `rejected`.
    pub state: String,
}

/// One stored chunk of history for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferChunk {
    /// The server's id (ascending in the order chunks were stored).
    pub id: u64,
    pub from_device: String,
    pub transfer: String,
    pub index: u32,
    pub data: Bytes,
}

/// One stored segment of an account's backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupChunk {
    pub index: u64,
    pub data: Bytes,
}
