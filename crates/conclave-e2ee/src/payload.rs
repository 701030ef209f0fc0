//! What an MLS application message carries: the plaintext the members read.

use serde::{Deserialize, Serialize};

use crate::E2eeError;

/// The plaintext inside an application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A message body, exactly as a server-encrypted conversation would carry it.
    Body {
        content_type: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A file, encrypted by the sender under `key` (XChaCha20-Poly1305 STREAM, see
    /// [`crate::file_crypt`]) and stored or sent as ciphertext under `file_id`.
    File {
        file_id: String,
        name: String,
        /// Size of the plaintext.
        size: u64,
        /// SHA-256 of the plaintext.
        sha256: [u8; 32],
        key: [u8; 32],
    },
}

impl Payload {
    pub fn encode(&self) -> Result<Vec<u8>, E2eeError> {
        postcard::to_allocvec(self).map_err(|e| E2eeError::Malformed(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Payload, E2eeError> {
        postcard::from_bytes(bytes).map_err(|e| E2eeError::Malformed(e.to_string()))
    }
}
