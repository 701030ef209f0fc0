//! TLS for the direct transfer: a fresh self-signed certificate per offer on the sender, and a
//! verifier on the receiver that pins the certificate's SHA-256 instead of asking a CA.
//!
//! Both sides use rustls with the aws-lc-rs provider (X25519MLKEM768 preferred) and TLS 1.3
//! only, with the ALPN
//! [`crate::wire::ALPN`].

use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::P2pError;
use crate::wire::ALPN;

/// The name in the sender's certificate and the one the receiver asks for. It is not checked
/// (the fingerprint is), but TLS needs one.
pub const SERVER_NAME: &str = "conclave-p2p";

/// The key exchange groups a client link offers, best first: the hybrid post-quantum
/// X25519MLKEM768, then the classical groups (the server's `conclave_server::tls::kx_groups`
/// is the same list; the server does not depend on this crate).
pub fn kx_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group;
    vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ]
}

/// The provider of every client TLS link (the chat connection and the direct transfers):
/// aws-lc-rs with [`kx_groups`].
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: kx_groups(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// A fresh ECDSA P-256 key and self-signed certificate, for one offer.
pub struct OfferIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: [u8; 32],
}

pub fn generate_identity() -> Result<OfferIdentity, P2pError> {
    let setup = |e: rcgen::Error| P2pError::Setup(format!("cannot create the certificate: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(setup)?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(setup)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "conclave file offer");
    let cert = params.self_signed(&key).map_err(setup)?;
    let cert = cert.der().clone();
    Ok(OfferIdentity {
        fingerprint: fingerprint(&cert),
        cert,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// The sender's QUIC crypto configuration.
pub fn server_crypto(identity: &OfferIdentity) -> Result<QuicServerConfig, P2pError> {
    QuicServerConfig::try_from(server_tls(identity)?)
        .map_err(|e| P2pError::Setup(format!("cannot use the TLS server for QUIC: {e}")))
}

/// The sender's rustls configuration, before quinn wraps it.
fn server_tls(identity: &OfferIdentity) -> Result<rustls::ServerConfig, P2pError> {
    let setup = |e: rustls::Error| P2pError::Setup(format!("cannot build the TLS server: {e}"));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup)?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(setup)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The receiver's QUIC crypto configuration, pinned to `expected`. The returned verifier
/// remembers the fingerprint it was last shown, so a failed connection can say why.
pub fn client_crypto(
    expected: [u8; 32],
) -> Result<(QuicClientConfig, Arc<PinnedVerifier>), P2pError> {
    let (config, verifier) = client_tls(expected)?;
    let quic = QuicClientConfig::try_from(config)
        .map_err(|e| P2pError::Setup(format!("cannot use the TLS client for QUIC: {e}")))?;
    Ok((quic, verifier))
}

/// The receiver's rustls configuration, before quinn wraps it.
fn client_tls(expected: [u8; 32]) -> Result<(rustls::ClientConfig, Arc<PinnedVerifier>), P2pError> {
    let setup = |e: rustls::Error| P2pError::Setup(format!("cannot build the TLS client: {e}"));
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier {
        expected,
        provider: provider.clone(),
        mismatch: Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok((config, verifier))
}

/// Accepts exactly one certificate: the one whose SHA-256 the server announced with the offer.
/// The handshake signature is still verified (with aws-lc-rs), which proves the sender holds that
/// certificate's private key.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// The fingerprint of the last certificate refused, if any.
    mismatch: Mutex<Option<[u8; 32]>>,
}

impl PinnedVerifier {
    /// The fingerprint of a certificate this verifier refused, if it refused one.
    pub fn refused(&self) -> Option<[u8; 32]> {
        self.mismatch.lock().ok().and_then(|m| *m)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = fingerprint(end_entity);
        if bool::from(actual.ct_eq(&self.expected)) {
            Ok(ServerCertVerified::assertion())
        } else {
            if let Ok(mut m) = self.mismatch.lock() {
                *m = Some(actual);
            }
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so this is never reached; refuse rather than trust.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The QUIC handshake (rustls' QUIC API, as quinn drives it, without the packets) between
    /// the sender's and the receiver's configurations agrees on the hybrid post-quantum group.
    #[test]
    fn the_quic_handshake_agrees_on_x25519mlkem768() {
        let identity = generate_identity().expect("identity");
        let server = Arc::new(server_tls(&identity).expect("server"));
        let (client, _) = client_tls(identity.fingerprint).expect("client");
        let name = ServerName::try_from(SERVER_NAME).expect("name");
        let params = b"conclave-test-params".to_vec();
        let mut c = rustls::quic::ClientConnection::new(
            Arc::new(client),
            rustls::quic::Version::V1,
            name,
            params.clone(),
        )
        .expect("client connection");
        let mut s = rustls::quic::ServerConnection::new(server, rustls::quic::Version::V1, params)
            .expect("server connection");
        for _ in 0..16 {
            let mut buf = Vec::new();
            while c.write_hs(&mut buf).is_some() || !buf.is_empty() {
                s.read_hs(&buf).expect("server reads");
                buf.clear();
            }
            while s.write_hs(&mut buf).is_some() || !buf.is_empty() {
                c.read_hs(&buf).expect("client reads");
                buf.clear();
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        for group in [
            c.negotiated_key_exchange_group(),
            s.negotiated_key_exchange_group(),
        ] {
            assert_eq!(
                group.map(|g| g.name()),
                Some(rustls::NamedGroup::X25519MLKEM768)
            );
        }
    }
}
