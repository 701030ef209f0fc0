//! rustls certificate verifiers: one that pins a fingerprint, one that wraps the WebPKI (CA)
//! verifier. Both remember the fingerprint they saw, so that a refusal can show it and a
//! successful connection can report it.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

use super::fingerprint::fingerprint_of_der;

/// What the verifier decided about the certificate it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The fingerprint matched the expected pin.
    Matched,
    /// The fingerprint differs from the expected pin.
    Mismatch,
    /// No pin was expected and the policy accepts new servers (trust on first use).
    NewAccepted,
    /// No pin was expected and the policy refuses unknown servers.
    NewRefused,
    /// The certificate chains to the configured CA and names the server.
    CaValid,
    /// The WebPKI verifier refused the certificate.
    CaInvalid,
}

/// The fingerprint a verifier saw and what it decided; shared with the connecting code.
pub(crate) type Seen = Arc<Mutex<Option<(String, Verdict)>>>;

fn record(seen: &Seen, fingerprint: String, verdict: Verdict) {
    // A poisoned lock only means another thread panicked mid-write of this Option; the value
    // is still a whole Option, so use it.
    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((fingerprint, verdict));
}

/// Accepts exactly the certificate whose fingerprint is `expected` (or, with no expectation
/// and `accept_new`, whatever is presented). Expiry, names and chains are deliberately not
/// checked: the pin itself is the trust anchor, as with SSH host keys, and a self-signed
/// server certificate has nothing else to check. The handshake signature is still verified,
/// so the server must hold the private key of the pinned certificate.
#[derive(Debug)]
pub(crate) struct PinVerifier {
    pub(crate) expected: Option<String>,
    pub(crate) accept_new: bool,
    pub(crate) seen: Seen,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let fingerprint = fingerprint_of_der(end_entity.as_ref());
        let verdict = match &self.expected {
            Some(expected) if *expected == fingerprint => Verdict::Matched,
            Some(_) => Verdict::Mismatch,
            None if self.accept_new => Verdict::NewAccepted,
            None => Verdict::NewRefused,
        };
        let ok = matches!(verdict, Verdict::Matched | Verdict::NewAccepted);
        record(&self.seen, fingerprint, verdict);
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The config only enables TLS 1.3, so this is unreachable; refuse rather than trust.
        Err(Error::General("Conclave only speaks TLS 1.3".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
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

/// The standard WebPKI verifier (chain to the given roots, validity dates, server name), plus
/// a record of the fingerprint for the session's report.
#[derive(Debug)]
pub(crate) struct CaVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
    pub(crate) seen: Seen,
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let verdict = if result.is_ok() {
            Verdict::CaValid
        } else {
            Verdict::CaInvalid
        };
        record(&self.seen, fingerprint_of_der(end_entity.as_ref()), verdict);
        result
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("Conclave only speaks TLS 1.3".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
