//! Sockets and TLS for the raw clients (idle Conclave connections, IRC), and the process limits
//! a run with many connections needs.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpSocket;

use crate::stamped::StampedTcp;

/// Connections per loopback source address: well under the ~28,000 ephemeral ports each
/// (source address, destination) pair has, so tens of thousands of connections to one port do
/// not run out of ports.
pub const CONNECTIONS_PER_SOURCE_IP: usize = 10_000;

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum CertCheck {
    /// Its SHA-256 must be this (lower-case hex).
    Fingerprint(String),
    /// Anything is accepted. Only for benchmarking a server on loopback, where there is nobody
    /// in the middle to defend against (`--insecure`, refused for other addresses).
    AnyOnLoopback,
}

/// Lower-case hex without colons or spaces; `None` unless it is 64 hex digits.
pub fn normalize_fingerprint(text: &str) -> Option<String> {
    let hex: String = text
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect::<String>()
        .to_ascii_lowercase();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

#[derive(Debug)]
struct Verifier {
    check: CertCheck,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            CertCheck::AnyOnLoopback => Ok(ServerCertVerified::assertion()),
            CertCheck::Fingerprint(want) => {
                let seen = hex::encode(Sha256::digest(end_entity));
                if &seen == want {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "certificate fingerprint {seen} is not the expected {want}"
                    )))
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
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
        // The handshake is still proven to come from the certificate's key.
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

/// A TLS 1.3-only client configuration (the server's provider: aws-lc-rs, X25519MLKEM768 first) checking the certificate as `check` says.
pub fn tls_config(check: CertCheck) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    config_with(check, conclave_server::tls::provider())
}

/// [`tls_config`] offering only the classical X25519, as a client from before post-quantum
/// key exchange does (`--classical-kx`).
pub fn classical_tls_config(check: CertCheck) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..(*conclave_server::tls::provider()).clone()
    };
    config_with(check, Arc::new(provider))
}

fn config_with(
    check: CertCheck,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { check, provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The loopback source address for connection `i` to `server`: 127.0.0.1, .2, ... one per
/// [`CONNECTIONS_PER_SOURCE_IP`] connections. `None` (let the kernel choose) for a server not on
/// IPv4 loopback.
pub fn source_ip(server: SocketAddr, i: usize) -> Option<IpAddr> {
    match server.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => {
            let host = 1 + (i / CONNECTIONS_PER_SOURCE_IP) % 250;
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host as u8)))
        }
        _ => None,
    }
}

/// Opens a TCP connection, from `source` when given, with receive stamps on (every
/// benchmark connection measures latency to its socket: see [`crate::stamped`]).
pub async fn tcp_connect(server: SocketAddr, source: Option<IpAddr>) -> io::Result<StampedTcp> {
    let socket = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    Ok(StampedTcp::new(tcp))
}

/// Raises this process's open-file limit to at least `want` if it can (root may raise the hard
/// limit too). Returns the soft limit in force afterwards. Children inherit it, so a server
/// that bench starts gets it as well.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        // Not allowed to raise the hard limit: go as far as it allows.
        let capped = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &capped) == 0 {
            return lim.rlim_max;
        }
        lim.rlim_cur
    }
}

/// Online CPUs.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Pins the calling thread (and the threads it starts later) to `cpus`. False when not
/// possible.
pub fn pin_current_thread(cpus: &[usize]) -> bool {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only touch
    // the set passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalized() {
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(normalize_fingerprint(&fp), Some("ab".repeat(32)));
        assert_eq!(normalize_fingerprint("abc"), None);
        assert_eq!(normalize_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn sources_spread_over_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(source_ip(lo, 0), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            source_ip(lo, CONNECTIONS_PER_SOURCE_IP),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(source_ip("192.0.2.1:1".parse().unwrap(), 5), None);
    }
}
