//! What a TLS 1.3 handshake costs with each key exchange group: bytes on the wire each way and
//! CPU time of each side, measured in memory (no sockets, one thread), with the configuration
//! of Conclave's links: an ECDSA P-256 self-signed certificate, TLS 1.3 only, the provider's
//! cipher suites, the server's default two session tickets; full handshakes (no resumption,
//! as Conclave's clients never resume); the client verifies the handshake signature (as the
//! pinning verifiers do) but pins nothing.
//!
//! ```text
//! cargo run --release -p conclave-p2p --example tls_handshakes -- [HANDSHAKES]
//! ```
//! Prints one line per case. docs/benchmarks.md ("TLS key exchange") has the figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConnection, DigitallySignedStruct, ServerConnection, SignatureScheme};

/// The provider under test (the one the workspace's rustls is built with).
fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

#[derive(Debug)]
struct SignatureOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
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
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Moves every byte `from` wants to send into `to`; returns how many, and the time spent in
/// each side's calls.
fn pump(
    from: &mut rustls::Connection,
    to: &mut rustls::Connection,
    buf: &mut Vec<u8>,
) -> (usize, Duration, Duration) {
    let mut moved = 0;
    let mut t_from = Duration::ZERO;
    let mut t_to = Duration::ZERO;
    while from.wants_write() {
        buf.clear();
        let t = Instant::now();
        let n = from.write_tls(buf).expect("write_tls");
        t_from += t.elapsed();
        moved += n;
        let mut slice = &buf[..];
        let t = Instant::now();
        while !slice.is_empty() {
            to.read_tls(&mut slice).expect("read_tls");
            to.process_new_packets().expect("handshake");
        }
        t_to += t.elapsed();
    }
    (moved, t_from, t_to)
}

struct Totals {
    client_to_server: usize,
    server_to_client: usize,
    /// Bytes of each flight of the first handshake, alternating client and server.
    flights: Vec<usize>,
    client_cpu: Duration,
    server_cpu: Duration,
    group: String,
}

fn run(
    server_config: &Arc<rustls::ServerConfig>,
    client_config: &Arc<rustls::ClientConfig>,
    n: usize,
) -> Totals {
    let mut t = Totals {
        client_to_server: 0,
        server_to_client: 0,
        client_cpu: Duration::ZERO,
        server_cpu: Duration::ZERO,
        group: String::new(),
        flights: Vec::new(),
    };
    let mut buf = Vec::with_capacity(16 * 1024);
    let name = ServerName::try_from("conclave.invalid").expect("name");
    for i in 0..n {
        let start = Instant::now();
        let mut client = rustls::Connection::Client(
            ClientConnection::new(client_config.clone(), name.clone()).expect("client"),
        );
        t.client_cpu += start.elapsed();
        let start = Instant::now();
        let mut server =
            rustls::Connection::Server(ServerConnection::new(server_config.clone()).expect("s"));
        t.server_cpu += start.elapsed();
        loop {
            let (c2s, c, s) = pump(&mut client, &mut server, &mut buf);
            t.client_to_server += c2s;
            t.client_cpu += c;
            t.server_cpu += s;
            let (s2c, s, c) = pump(&mut server, &mut client, &mut buf);
            t.server_to_client += s2c;
            t.client_cpu += c;
            t.server_cpu += s;
            if i == 0 && (c2s > 0 || s2c > 0) {
                t.flights.extend([c2s, s2c]);
            }
            if c2s == 0 && s2c == 0 && !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        if t.group.is_empty() {
            t.group = server
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
                .unwrap_or_default();
        }
    }
    t
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec!["conclave".into()]).expect("params");
    let cert = params.self_signed(&key).expect("cert").der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    use rustls::crypto::aws_lc_rs::kx_group;
    let ours = conclave_p2p::kx_groups();
    let server_provider = Arc::new(CryptoProvider {
        kx_groups: ours.clone(),
        ..provider()
    });
    let server_config = Arc::new(
        rustls::ServerConfig::builder_with_provider(server_provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server config"),
    );
    let cases: [(&str, Vec<&'static dyn rustls::crypto::SupportedKxGroup>); 2] = [
        ("client offers X25519MLKEM768 first", ours),
        ("client offers only X25519", vec![kx_group::X25519]),
    ];
    for (label, groups) in cases {
        let p = Arc::new(CryptoProvider {
            kx_groups: groups,
            ..provider()
        });
        let mut client_config = rustls::ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignatureOnly(p)))
            .with_no_client_auth();
        // Full handshakes, as Conclave's clients make (each connection attempt builds its own
        // configuration, so nothing is resumed).
        client_config.resumption = rustls::client::Resumption::disabled();
        let client_config = Arc::new(client_config);
        // Warm up, then measure.
        run(&server_config, &client_config, n / 10 + 1);
        let t = run(&server_config, &client_config, n);
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "{label}: group {}, {} handshakes; bytes client->server {}, server->client {}; \
             server CPU {:.0} us ({:.0} handshakes/s per core), client CPU {:.0} us; \
             flights (client, server, ...) {:?}",
            t.group,
            n,
            t.client_to_server / n,
            t.server_to_client / n,
            per(t.server_cpu),
            1e6 / per(t.server_cpu),
            per(t.client_cpu),
            t.flights,
        );
    }
}
