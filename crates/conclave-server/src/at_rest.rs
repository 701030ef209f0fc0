//! Encryption at rest: message bodies are sealed with XChaCha20-Poly1305 before they reach
//! SQLite, under a data key kept in the data directory (`data.key`, mode 0600).
//!
//! Each record gets a fresh random 24-byte nonce (random nonces are safe at this size), and
//! associated data that binds the ciphertext to its record (message id and conversation), so
//! that someone editing the database file cannot move a body to another message unnoticed.
//!
//! Two ways to hold the key, and what each protects against:
//! - **Key file** (default): `data.key`, 32 random bytes, mode 0600. A copy of the database file
//!   (or its WAL, or a backup of just the database) reveals no message text. Someone who copies
//!   the whole data directory, key included, can read everything.
//! - **Passphrase** (`conclave serve --data-key-env VAR`): the key is derived with Argon2id from a
//!   passphrase given at each start and a random salt in `data.salt`; nothing on disk suffices,
//!   so a stolen disk or whole-directory backup reveals no message text. The price: the server
//!   cannot start unattended without the passphrase.
//!
//! Sub-keys for each purpose (message bodies, the search index, ...) are derived from the data
//! key with HKDF-SHA256, so one purpose's key never serves another.

use std::path::Path;

use argon2::Argon2;
use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::fsutil;

/// File name of the data key inside the data directory.
pub const DATA_KEY_FILE: &str = "data.key";
/// File name of the passphrase salt inside the data directory.
pub const SALT_FILE: &str = "data.salt";
const KEY_BYTES: usize = 32;
const SALT_BYTES: usize = 16;
/// Argon2id cost for the passphrase: 64 MiB, 3 passes (one derivation per start).
const PASSPHRASE_MEMORY_KIB: u32 = 64 * 1024;
const PASSPHRASE_PASSES: u32 = 3;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

/// The key that seals records at rest.
pub struct DataKey {
    raw: Zeroizing<[u8; KEY_BYTES]>,
    cipher: XChaCha20Poly1305,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the data key {path}: {error}")]
    Io { path: String, error: String },
    #[error("cannot derive the data key from the passphrase: {0}")]
    Derive(String),
    #[error(
        "this data directory keeps its data key in {0}, but a passphrase was given; start without --data-key-env, or restore the directory that was created with the passphrase"
    )]
    FileKeyPresent(String),
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

    /// Derives the key from a passphrase and the directory's salt (created on first use).
    pub fn from_passphrase(data_dir: &Path, passphrase: &str) -> Result<DataKey, KeyError> {
        let key_file = data_dir.join(DATA_KEY_FILE);
        if key_file.exists() {
            return Err(KeyError::FileKeyPresent(key_file.display().to_string()));
        }
        let path = data_dir.join(SALT_FILE);
        let io = |e: std::io::Error| KeyError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        if !path.exists() {
            let mut salt = [0u8; SALT_BYTES];
            rand::Rng::fill(&mut rand::rng(), &mut salt[..]);
            fsutil::write_private(&path, &salt).map_err(io)?;
        }
        let salt = std::fs::read(&path).map_err(io)?;
        if salt.len() != SALT_BYTES {
            return Err(KeyError::Damaged {
                path: path.display().to_string(),
                len: salt.len(),
            });
        }
        let params =
            argon2::Params::new(PASSPHRASE_MEMORY_KIB, PASSPHRASE_PASSES, 1, Some(KEY_BYTES))
                .map_err(|e| KeyError::Derive(e.to_string()))?;
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut raw = Zeroizing::new([0u8; KEY_BYTES]);
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, &mut raw[..])
            .map_err(|e| KeyError::Derive(e.to_string()))?;
        Self::from_bytes(&raw[..]).ok_or(KeyError::Derive("bad key length".into()))
    }

    /// A key from its raw 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<DataKey> {
        if bytes.len() != KEY_BYTES {
            return None;
        }
        let mut raw = Zeroizing::new([0u8; KEY_BYTES]);
        raw.copy_from_slice(bytes);
        let body_key = Zeroizing::new(derive(&raw, "conclave message bodies v1"));
        let cipher = XChaCha20Poly1305::new_from_slice(&body_key[..]).ok()?;
        Some(DataKey { raw, cipher })
    }

    /// A 32-byte sub-key for `purpose`.
    pub fn subkey(&self, purpose: &str) -> Zeroizing<[u8; KEY_BYTES]> {
        Zeroizing::new(derive(&self.raw, purpose))
    }

    /// Seals `plain`, bound to `ad`. Output: nonce, then ciphertext and tag.
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Vec<u8> {
        // The thread's CSPRNG (ChaCha, seeded from the OS): no system call per record.
        let mut nonce_bytes = [0u8; NONCE_BYTES];
        rand::Rng::fill(&mut rand::rng(), &mut nonce_bytes[..]);
        self.seal_with_nonce(nonce_bytes, ad, plain)
    }

    fn seal_with_nonce(&self, nonce_bytes: [u8; NONCE_BYTES], ad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = XNonce::from(nonce_bytes);
        // One buffer for the whole record, encrypted in place (the same construction and
        // output as `Aead::encrypt`, which allocates the ciphertext apart and is copied).
        let mut out = Vec::with_capacity(NONCE_BYTES + plain.len() + TAG_BYTES);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(plain);
        // Encryption with a valid key and nonce only fails for inputs over 2^38 bytes, which
        // the frame limit excludes.
        match self
            .cipher
            .encrypt_inout_detached(&nonce, ad, (&mut out[NONCE_BYTES..]).into())
        {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => out.clear(),
        }
        out
    }

    /// Opens a record sealed with [`DataKey::seal`] under the same `ad`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(OpenError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_BYTES);
        let nonce = XNonce::try_from(nonce).map_err(|_| OpenError)?;
        self.cipher
            .decrypt(&nonce, Payload { msg: ct, aad: ad })
            .map_err(|_| OpenError)
    }
}

fn derive(raw: &[u8; KEY_BYTES], purpose: &str) -> [u8; KEY_BYTES] {
    let hk = Hkdf::<Sha256>::new(Some(b"conclave-data-key"), raw);
    let mut out = [0u8; KEY_BYTES];
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(purpose.as_bytes(), &mut out);
    out
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
    fn sealing_in_place_gives_the_records_sealed_before() {
        // Records written by earlier versions (nonce, then `Aead::encrypt`'s output) and the
        // in-place sealing must be the same bytes, or old databases would stop opening.
        let k = DataKey::from_bytes(&[7; KEY_BYTES]).expect("key");
        let nonce = [3u8; NONCE_BYTES];
        for plain in [&b""[..], b"x", &[9u8; 1000][..]] {
            let before = k
                .cipher
                .encrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: plain,
                        aad: b"ad",
                    },
                )
                .expect("encrypt");
            let sealed = k.seal_with_nonce(nonce, b"ad", plain);
            assert_eq!(&sealed[..NONCE_BYTES], &nonce[..]);
            assert_eq!(&sealed[NONCE_BYTES..], &before[..]);
            assert_eq!(k.open(b"ad", &sealed).expect("opens"), plain);
        }
    }

    #[test]
    fn passphrase_keys_are_stable_and_distinct() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = DataKey::from_passphrase(dir.path(), "correct horse").expect("derive");
        let sealed = a.seal(b"x", b"text");
        let again = DataKey::from_passphrase(dir.path(), "correct horse").expect("derive");
        assert_eq!(again.open(b"x", &sealed).expect("same key"), b"text");
        let wrong = DataKey::from_passphrase(dir.path(), "wrong horse").expect("derive");
        assert!(wrong.open(b"x", &sealed).is_err());
        assert_ne!(*a.subkey("one"), *a.subkey("two"));
        assert!(!dir.path().join(DATA_KEY_FILE).exists(), "no key on disk");
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
