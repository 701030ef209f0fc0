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
    /// Blockcast in an end-to-end room, part 1: the key of one message, sent only to the
    /// intended members (in the direct conversation of the sender and them).
    SealedKey { id: [u8; 16], key: [u8; 32] },
    /// Blockcast, part 2: the message itself in the room, sealed under that key
    /// (XChaCha20-Poly1305, the id as associated data). Members left out get this (if at all)
    /// but never the key.
    Sealed {
        id: [u8; 16],
        nonce: [u8; 24],
        #[serde(with = "serde_bytes")]
        ciphertext: Vec<u8>,
    },
    /// An edit, delete or reaction of the message `msg_id` (the server's id) of the same
    /// conversation. The send's cleartext reference (which the server checks: only the author
    /// edits, and so on) must name the same message and kind, or members drop it: the server
    /// cannot point an edit at another message. `kind`: 1 edit, 2 delete, 3 react, 4 unreact.
    /// The body: the new text of an edit, the emoji of a reaction, empty for a delete.
    Act {
        msg_id: String,
        kind: u8,
        content_type: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// [`Payload::Act`]'s kinds.
pub const ACT_EDIT: u8 = 1;
pub const ACT_DELETE: u8 = 2;
pub const ACT_REACT: u8 = 3;
pub const ACT_UNREACT: u8 = 4;

/// Seals a body for blockcast under a fresh key: (id, key, the room's payload).
pub fn seal_for_some(
    content_type: &str,
    data: &[u8],
) -> Result<([u8; 16], [u8; 32], Payload), E2eeError> {
    use chacha20poly1305::aead::{Aead, Payload as AeadPayload};
    use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
    let mut id = [0u8; 16];
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 24];
    rand::Rng::fill(&mut rand::rng(), &mut id[..]);
    rand::Rng::fill(&mut rand::rng(), &mut key[..]);
    rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
    let inner = Payload::Body {
        content_type: content_type.to_string(),
        data: data.to_vec(),
    }
    .encode()?;
    let ciphertext = XChaCha20Poly1305::new((&key).into())
        .encrypt(
            &XNonce::from(nonce),
            AeadPayload {
                msg: &inner,
                aad: &id,
            },
        )
        .map_err(|_| E2eeError::Mls("sealing failed".into()))?;
    Ok((
        id,
        key,
        Payload::Sealed {
            id,
            nonce,
            ciphertext,
        },
    ))
}

/// Opens a [`Payload::Sealed`] with its key: the inner payload.
pub fn open_sealed(
    key: &[u8; 32],
    id: &[u8; 16],
    nonce: &[u8; 24],
    ciphertext: &[u8],
) -> Result<Payload, E2eeError> {
    use chacha20poly1305::aead::{Aead, Payload as AeadPayload};
    use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
    let inner = XChaCha20Poly1305::new(key.into())
        .decrypt(
            &XNonce::from(*nonce),
            AeadPayload {
                msg: ciphertext,
                aad: id,
            },
        )
        .map_err(|_| E2eeError::Malformed("a sealed message does not open with its key".into()))?;
    Payload::decode(&inner)
}

impl Payload {
    pub fn encode(&self) -> Result<Vec<u8>, E2eeError> {
        postcard::to_allocvec(self).map_err(|e| E2eeError::Malformed(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Payload, E2eeError> {
        postcard::from_bytes(bytes).map_err(|e| E2eeError::Malformed(e.to_string()))
    }
}
