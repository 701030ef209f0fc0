//! The server's TLS identity: created on first start, loaded afterwards.
//!
//! The key is ECDSA P-256 in `tls/key.pem` (mode 0600); the self-signed certificate is
//! `tls/cert.pem`. Clients pin the certificate's SHA-256 fingerprint (trust on first use) or
//! verify it with `--fingerprint`. Only TLS 1.3 is offered.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::fsutil;

pub const TLS_DIR: &str = "tls";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// The loaded identity.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub fingerprint: String,
    /// True when this start created it.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: String },
    #[error("cannot create the TLS certificate: {0}")]
    Generate(String),
    #[error(
        "{}: {error}; the TLS key or certificate is damaged. Restore it from a backup, or move the tls/ folder away to create a new one (clients will then see a changed fingerprint)",
        path.display()
    )]
    Bad { path: PathBuf, error: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// SHA-256 fingerprint of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The fingerprint of a PEM certificate file (the private key is not needed).
pub fn cert_file_fingerprint(path: &Path) -> Result<String, TlsError> {
    let cert = CertificateDer::from_pem_file(path).map_err(|e| TlsError::Bad {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    Ok(fingerprint(&cert))
}

/// Loads the identity from `data_dir/tls`, creating it on first start.
pub fn load_or_create(data_dir: &Path) -> Result<Identity, TlsError> {
    let dir = data_dir.join(TLS_DIR);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| TlsError::Io {
            path,
            error: e.to_string(),
        }
    };
    let mut created = false;
    if !cert_path.exists() && !key_path.exists() {
        fsutil::create_private_dir(&dir).map_err(io(&dir))?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "conclave".to_string()])
                .map_err(|e| TlsError::Generate(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "conclave server");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        fsutil::write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        fsutil::write_file_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
            .map_err(io(&cert_path))?;
        created = true;
    }
    let bad = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| TlsError::Bad {
            path,
            error: e.to_string(),
        }
    };
    let cert = CertificateDer::from_pem_file(&cert_path).map_err(bad(&cert_path))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(bad(&key_path))?;
    Ok(Identity {
        fingerprint: fingerprint(&cert),
        cert,
        key,
        created,
    })
}

/// The key exchange groups every Conclave TLS link offers, best first: the hybrid
/// post-quantum X25519MLKEM768 (X25519 and ML-KEM-768 together, so a break of either alone
/// reveals nothing), then the classical groups for peers that do not offer it.
pub fn kx_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group;
    vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ]
}

/// The rustls provider used everywhere: aws-lc-rs (ring has no ML-KEM), with [`kx_groups`].
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: kx_groups(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// The names the server reports key exchange groups by (the monitor, `/metrics`, the audit
/// log), a fixed list so peers cannot add metric series; the last one counts anything else.
pub const KX_GROUP_NAMES: [&str; 5] = [
    "X25519MLKEM768",
    "X25519",
    "secp256r1",
    "secp384r1",
    "other",
];

/// The report name of a negotiated group (one of [`KX_GROUP_NAMES`]).
pub fn kx_group_name(group: Option<rustls::NamedGroup>) -> &'static str {
    match group {
        Some(rustls::NamedGroup::X25519MLKEM768) => KX_GROUP_NAMES[0],
        Some(rustls::NamedGroup::X25519) => KX_GROUP_NAMES[1],
        Some(rustls::NamedGroup::secp256r1) => KX_GROUP_NAMES[2],
        Some(rustls::NamedGroup::secp384r1) => KX_GROUP_NAMES[3],
        _ => KX_GROUP_NAMES[4],
    }
}

/// Whether a group (by report name) resists a quantum computer recording traffic today.
pub fn is_post_quantum(name: &str) -> bool {
    name.contains("MLKEM")
}

/// A TLS 1.3-only server configuration for `identity`.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Formats a hex fingerprint as colon-separated upper-case pairs, for people.
pub fn display_fingerprint(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn first_start_creates_a_private_key_and_later_starts_reuse_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("create");
        assert!(a.created);
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create(dir.path()).expect("load");
        assert!(!b.created);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 64);
        server_config(&b).expect("config");
    }

    #[test]
    fn a_damaged_key_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create(dir.path()).expect("create");
        std::fs::write(dir.path().join("tls/key.pem"), "garbage").expect("write");
        let err = load_or_create(dir.path())
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("damaged"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("tls/key.pem")).expect("read"),
            b"garbage"
        );
    }
}
