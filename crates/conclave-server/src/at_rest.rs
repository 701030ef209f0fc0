//! Encryption at rest: message bodies are sealed with XChaCha20-Poly1305 before they reach
//! SQLite, under a data key kept in the data directory (`data.key`, mode 0600).
//!
//! Each record gets a fresh random 24-byte nonce (random nonces are safe at this size), and
//! associated data that binds the ciphertext to its record (message id and conversation), so
//! that someone editing the database file cannot move a body to another message unnoticed.
//!
//! What it protects against: a copy of the database file (or its WAL, or a backup of it)
//! without the data key reveals no message text. It does not protect against someone who
//! holds the whole data directory, key included.

use std::path::Path;

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::fsutil;

/// File name of the data key inside the data directory.
pub const DATA_KEY_FILE: &str = "data.key";
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

/// The key that seals records at rest.
pub struct DataKey {
    cipher: XChaCha20Poly1305,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the data key {path}: {error}")]
    Io { path: String, error: String },
    #[error(
        "the data key {path} is damaged ({len} bytes, expected {KEY_BYTES}); restore it from a backup. Without it the stored messages cannot be read, so it is never replaced automatically"
    )]
    Damaged { path: String, len: usize },
}

/// A sealed record that does not open: wrong key, or a changed record.
#[derive(Debug, thiserror::Error)]
#[error("a stored record does not decrypt: the data key is wrong or the record was altered")]
pub struct OpenError;

impl DataKey {
    /// Loads `data.key`, creating a random one if the data directory has none.
    pub fn load_or_create(data_dir: &Path) -> Result<DataKey, KeyError> {
        let path = data_dir.join(DATA_KEY_FILE);
        let io = |e: std::io::Error| KeyError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        if !path.exists() {
            let mut key = Zeroizing::new([0u8; KEY_BYTES]);
            rand::Rng::fill(&mut rand::rng(), &mut key[..]);
            fsutil::write_private(&path, &key[..]).map_err(io)?;
        }
        let bytes = Zeroizing::new(std::fs::read(&path).map_err(io)?);
        Self::from_bytes(&bytes).ok_or(KeyError::Damaged {
            path: path.display().to_string(),
            len: bytes.len(),
        })
    }

    /// A key from its raw 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<DataKey> {
        if bytes.len() != KEY_BYTES {
            return None;
        }
        let cipher = XChaCha20Poly1305::new_from_slice(bytes).ok()?;
        Some(DataKey { cipher })
    }

    /// Seals `plain`, bound to `ad`. Output: nonce, then ciphertext and tag.
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = XNonce::generate();
        let mut out = Vec::with_capacity(NONCE_BYTES + plain.len() + 16);
        out.extend_from_slice(nonce.as_slice());
        // Encryption with a valid key and nonce only fails for inputs over 2^38 bytes, which
        // the frame limit excludes.
        match self.cipher.encrypt(
            &nonce,
            Payload {
                msg: plain,
                aad: ad,
            },
        ) {
            Ok(ct) => out.extend_from_slice(&ct),
            Err(_) => out.clear(),
        }
        out
    }

    /// Opens a record sealed with [`DataKey::seal`] under the same `ad`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < NONCE_BYTES + 16 {
            return Err(OpenError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_BYTES);
        let nonce = XNonce::try_from(nonce).map_err(|_| OpenError)?;
        self.cipher
            .decrypt(&nonce, Payload { msg: ct, aad: ad })
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = DataKey::load_or_create(dir.path()).expect("key");
        let sealed = k.seal(b"id1", b"secret words");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(k.open(b"id1", &sealed).expect("opens"), b"secret words");
        assert!(
            k.open(b"id2", &sealed).is_err(),
            "moved record must not open"
        );
        let again = DataKey::load_or_create(dir.path()).expect("reload");
        assert_eq!(
            again.open(b"id1", &sealed).expect("same key"),
            b"secret words"
        );
    }

    #[test]
    fn damaged_key_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DATA_KEY_FILE), b"short").expect("write");
        assert!(DataKey::load_or_create(dir.path()).is_err());
        assert_eq!(
            std::fs::read(dir.path().join(DATA_KEY_FILE)).expect("read"),
            b"short"
        );
    }
}
