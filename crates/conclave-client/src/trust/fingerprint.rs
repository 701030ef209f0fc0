//! Certificate fingerprints: the SHA-256 of the end-entity certificate's DER bytes.
//!
//! The canonical form (stored in `known_servers`, compared, printed by `conclave fingerprint`)
//! is 64 lower-case hex digits without separators. People may type or paste it with colons and
//! in any case, so input goes through [`normalize_fingerprint`] first.

use sha2::{Digest, Sha256};

/// Hex digits in a SHA-256 fingerprint.
pub const FINGERPRINT_HEX_CHARS: usize = 64;

/// A fingerprint as typed was not a SHA-256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a SHA-256 fingerprint: {reason}")]
pub struct FingerprintError {
    pub input: String,
    pub reason: String,
}

/// The canonical fingerprint (lower-case hex, no colons) of a DER-encoded certificate.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Accepts a fingerprint with or without colons (or spaces between the pairs), in any case,
/// optionally prefixed with `SHA256:`, and returns the canonical form.
pub fn normalize_fingerprint(input: &str) -> Result<String, FingerprintError> {
    let fail = |reason: String| FingerprintError {
        input: input.to_string(),
        reason,
    };
    let trimmed = input.trim();
    let body = match trimmed.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &trimmed[7..],
        _ => trimmed,
    };
    let mut out = String::with_capacity(FINGERPRINT_HEX_CHARS);
    for c in body.chars() {
        match c {
            ':' | ' ' => {}
            c if c.is_ascii_hexdigit() => out.push(c.to_ascii_lowercase()),
            c => return Err(fail(format!("{c:?} is not a hex digit"))),
        }
    }
    if out.len() != FINGERPRINT_HEX_CHARS {
        return Err(fail(format!(
            "it has {} hex digits, a SHA-256 fingerprint has {FINGERPRINT_HEX_CHARS} \
             (`conclave fingerprint` on the server prints it)",
            out.len()
        )));
    }
    Ok(out)
}

/// Formats a fingerprint for people: upper-case pairs separated by colons
/// (`AB:CD:...`). Input that is not canonical hex is returned as it came.
pub fn format_fingerprint(hex: &str) -> String {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex.to_string();
    }
    let upper = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..upper.len())
        .step_by(2)
        .map(|i| &upper[i..i + 2])
        .collect();
    pairs.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn accepts_colons_case_and_prefix() {
        assert_eq!(normalize_fingerprint(HEX).as_deref(), Ok(HEX));
        let upper_colons = format_fingerprint(HEX);
        assert!(upper_colons.starts_with("01:23:45:67:89:AB:CD:EF:"));
        assert_eq!(upper_colons.len(), 64 + 31);
        assert_eq!(normalize_fingerprint(&upper_colons).as_deref(), Ok(HEX));
        assert_eq!(
            normalize_fingerprint(&format!("  SHA256:{upper_colons}\n")).as_deref(),
            Ok(HEX)
        );
        assert_eq!(
            normalize_fingerprint(&upper_colons.replace(':', " ")).as_deref(),
            Ok(HEX)
        );
    }

    #[test]
    fn refuses_wrong_length_and_characters() {
        let short = normalize_fingerprint(&HEX[..62]).unwrap_err();
        assert!(short.reason.contains("62 hex digits"), "{short}");
        assert!(normalize_fingerprint(&format!("{HEX}00")).is_err());
        let bad = normalize_fingerprint(&HEX.replace('a', "g")).unwrap_err();
        assert!(bad.reason.contains("'g'"), "{bad}");
        assert!(normalize_fingerprint("").is_err());
    }

    #[test]
    fn fingerprint_of_der_is_sha256_hex() {
        // SHA-256 of the empty input.
        assert_eq!(
            fingerprint_of_der(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
