//! The key that seals a device's local history: random, kept in the state database wrapped
//! under a key derived from the account's password (Argon2id), so a copy of the state
//! directory alone does not reveal what was said.

use argon2::Argon2;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::E2eeError;

const NONCE: usize = 24;

/// Seals and opens local records.
pub struct HistoryKey {
    cipher: XChaCha20Poly1305,
}

impl HistoryKey {
    /// A new random key, and its wrapped form (salt ‖ sealed key) to store.
    pub fn create(password: &str) -> Result<(HistoryKey, Vec<u8>), E2eeError> {
        let mut key = Zeroizing::new([0u8; 32]);
        let mut salt = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut key[..]);
        rand::Rng::fill(&mut rand::rng(), &mut salt[..]);
        let wrap = Self::from_bytes(&*derive(password, &salt)?);
        let mut wrapped = salt.to_vec();
        wrapped.extend(wrap.seal(b"conclave-history-key-v1", &key[..]));
        Ok((Self::from_bytes(&key), wrapped))
    }

    /// Opens a wrapped key with the password.
    pub fn unwrap(password: &str, wrapped: &[u8]) -> Result<HistoryKey, E2eeError> {
        if wrapped.len() < 16 {
            return Err(E2eeError::WrongKey);
        }
        let (salt, sealed) = wrapped.split_at(16);
        let wrap = Self::from_bytes(&*derive(password, salt)?);
        let key = Zeroizing::new(wrap.open(b"conclave-history-key-v1", sealed)?);
        let key: [u8; 32] = key.as_slice().try_into().map_err(|_| E2eeError::WrongKey)?;
        Ok(Self::from_bytes(&key))
    }

    pub(crate) fn from_bytes(key: &[u8; 32]) -> HistoryKey {
        HistoryKey {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }

    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
        let mut out = nonce.to_vec();
        // Encrypting to a Vec cannot fail for these sizes.
        if let Ok(ct) = self.cipher.encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plain,
                aad: ad,
            },
        ) {
            out.extend(ct);
        }
        out
    }

    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, E2eeError> {
        if sealed.len() < NONCE + 16 {
            return Err(E2eeError::WrongKey);
        }
        let (nonce, ct) = sealed.split_at(NONCE);
        self.cipher
            .decrypt(
                &XNonce::from(<[u8; NONCE]>::try_from(nonce).map_err(|_| E2eeError::WrongKey)?),
                Payload { msg: ct, aad: ad },
            )
            .map_err(|_| E2eeError::WrongKey)
    }
}

fn derive(password: &str, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>, E2eeError> {
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::default()
        .hash_password_into(password.as_bytes(), salt, &mut out[..])
        .map_err(|e| E2eeError::Mls(format!("key derivation: {e}")))?;
    Ok(out)
}
