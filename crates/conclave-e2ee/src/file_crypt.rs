//! Files of end-to-end encrypted conversations: a random key per file, the file encrypted in
//! chunks with XChaCha20-Poly1305 in the STREAM construction (each chunk authenticated, the
//! last one marked, so truncation, reordering and splicing are all detected).

use std::io::{Read, Write};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

use crate::E2eeError;

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
/// The STREAM nonce prefix (XChaCha's 24 bytes less STREAM's 5).
const PREFIX: usize = 19;

/// Size of the ciphertext of a plaintext of `len` bytes.
pub fn sealed_len(len: u64) -> u64 {
    let chunks = len.div_ceil(CHUNK as u64).max(1);
    PREFIX as u64 + len + chunks * TAG as u64
}

/// Encrypts `input` to `output` under a fresh random key, which it returns.
pub fn encrypt(mut input: impl Read, mut output: impl Write) -> Result<[u8; 32], E2eeError> {
    let mut key = [0u8; 32];
    let mut prefix = [0u8; PREFIX];
    rand::Rng::fill(&mut rand::rng(), &mut key[..]);
    rand::Rng::fill(&mut rand::rng(), &mut prefix[..]);
    let cipher = XChaCha20Poly1305::new((&key).into());
    let mut enc = EncryptorBE32::from_aead(cipher, (&prefix).into());
    output.write_all(&prefix).map_err(io)?;
    let mut buf = vec![0u8; CHUNK];
    let mut filled = read_full(&mut input, &mut buf)?;
    loop {
        let mut next = vec![0u8; CHUNK];
        let next_filled = if filled == CHUNK {
            read_full(&mut input, &mut next)?
        } else {
            0
        };
        if next_filled == 0 {
            let ct = enc
                .encrypt_last(&buf[..filled])
                .map_err(|_| E2eeError::Mls("file encryption failed".into()))?;
            output.write_all(&ct).map_err(io)?;
            break;
        }
        let ct = enc
            .encrypt_next(&buf[..filled])
            .map_err(|_| E2eeError::Mls("file encryption failed".into()))?;
        output.write_all(&ct).map_err(io)?;
        buf = next;
        filled = next_filled;
    }
    output.flush().map_err(io)?;
    Ok(key)
}

/// Decrypts what [`encrypt`] wrote. Fails, writing nothing more, at the first chunk that does
/// not authenticate (wrong key, altered or truncated ciphertext).
pub fn decrypt(
    key: &[u8; 32],
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, E2eeError> {
    let mut prefix = [0u8; PREFIX];
    input
        .read_exact(&mut prefix)
        .map_err(|_| E2eeError::Malformed("the encrypted file is truncated".into()))?;
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut dec = DecryptorBE32::from_aead(cipher, (&prefix).into());
    let mut buf = vec![0u8; CHUNK + TAG];
    let mut filled = read_full(&mut input, &mut buf)?;
    let mut written = 0u64;
    let bad = || E2eeError::Malformed("the encrypted file does not authenticate".into());
    loop {
        let mut next = vec![0u8; CHUNK + TAG];
        let next_filled = if filled == CHUNK + TAG {
            read_full(&mut input, &mut next)?
        } else {
            0
        };
        if next_filled == 0 {
            let pt = dec.decrypt_last(&buf[..filled]).map_err(|_| bad())?;
            output.write_all(&pt).map_err(io)?;
            written += pt.len() as u64;
            break;
        }
        let pt = dec.decrypt_next(&buf[..filled]).map_err(|_| bad())?;
        output.write_all(&pt).map_err(io)?;
        written += pt.len() as u64;
        buf = next;
        filled = next_filled;
    }
    output.flush().map_err(io)?;
    Ok(written)
}

fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, E2eeError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(filled)
}

fn io(e: std::io::Error) -> E2eeError {
    E2eeError::Malformed(format!("file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        for len in [0usize, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut sealed = Vec::new();
            let key = encrypt(&plain[..], &mut sealed).expect("encrypt");
            assert_eq!(sealed.len() as u64, sealed_len(len as u64), "len {len}");
            let mut out = Vec::new();
            decrypt(&key, &sealed[..], &mut out).expect("decrypt");
            assert_eq!(out, plain);
            // Truncation (dropping the last chunk) and alteration are detected.
            if len > CHUNK {
                let cut = PREFIX + CHUNK + TAG;
                assert!(decrypt(&key, &sealed[..cut], &mut Vec::new()).is_err());
            }
            let mut bad = sealed.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decrypt(&key, &bad[..], &mut Vec::new()).is_err());
            assert!(decrypt(&[7u8; 32], &sealed[..], &mut Vec::new()).is_err());
        }
    }
}
