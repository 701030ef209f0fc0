//! The certificate the listener presents: the self-signed one of the data directory
//! (`tls::load_or_create`), or the operator's PEM files (`[tls]` `cert_file`/`key_file`, or
//! `--tls-cert`/`--tls-key`), for example one issued by a CA that browsers trust.
//!
//! It sits behind rustls' certificate resolver, so `conclave admin reload` swaps it without
//! touching a connection: each handshake takes the certificate in force when it starts, and
//! open connections (native and web) keep the one they were made with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::Config;
use crate::tls::{self, TlsError};

/// ALPN name a browser's HTTP/1.1 gets (the web client and its WebSocket).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN name native clients may offer (offering none means the same).
pub const ALPN_CONCLAVE: &[u8] = b"conclave/1";

/// The certificate in force, swapped whole.
#[derive(Debug)]
pub struct Certs {
    current: RwLock<Current>,
}

#[derive(Debug, Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    fingerprint: String,
    /// Where it came from, for logs and `doctor`.
    source: String,
}

/// What loading found: the resolver, and whether this start created the self-signed identity.
pub struct Loaded {
    pub certs: Arc<Certs>,
    pub identity_created: bool,
}

impl Certs {
    /// Loads the certificate `config` names (creating the self-signed identity on first start
    /// in any case, so `conclave fingerprint` always has one to show).
    pub fn load(config: &Config) -> Result<Loaded, TlsError> {
        let identity = tls::load_or_create(&config.data_dir)?;
        let created = identity.created;
        let current = match operator_files(config) {
            Some((cert, key)) => load_files(cert, key)?,
            None => Current {
                key: certified(vec![identity.cert.clone()], identity.key.clone_key(), None)?,
                fingerprint: identity.fingerprint.clone(),
                source: "self-signed (tls/ in the data directory)".to_string(),
            },
        };
        Ok(Loaded {
            certs: Arc::new(Certs {
                current: RwLock::new(current),
            }),
            identity_created: created,
        })
    }

    /// Reads the certificate `config` names again and puts it in force for new handshakes.
    /// On an error the one in force stays, and the error says why.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        let next = match operator_files(config) {
            Some((cert, key)) => load_files(cert, key).map_err(|e| e.to_string())?,
            None => {
                let identity = tls::load_or_create(&config.data_dir).map_err(|e| e.to_string())?;
                Current {
                    key: certified(vec![identity.cert.clone()], identity.key.clone_key(), None)
                        .map_err(|e| e.to_string())?,
                    fingerprint: identity.fingerprint,
                    source: "self-signed (tls/ in the data directory)".to_string(),
                }
            }
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.fingerprint != next.fingerprint {
            tracing::info!(
                fingerprint = %next.fingerprint,
                source = %next.source,
                "TLS certificate replaced; open connections keep theirs"
            );
        }
        *current = next;
        Ok(())
    }

    /// The SHA-256 fingerprint of the certificate in force, lower-case hex.
    pub fn fingerprint(&self) -> String {
        self.read().fingerprint
    }

    /// Where the certificate in force came from.
    pub fn source(&self) -> String {
        self.read().source
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key)
    }
}

fn operator_files(config: &Config) -> Option<(&Path, &Path)> {
    match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    }
}

fn load_files(cert_path: &Path, key_path: &Path) -> Result<Current, TlsError> {
    let bad = |path: &Path, error: String| TlsError::Bad {
        path: path.to_path_buf(),
        error,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| bad(cert_path, format!("cannot read the certificate file: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_path, format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad(
            cert_path,
            "no certificate in it: give a PEM file that starts with the server's certificate"
                .to_string(),
        ));
    };
    let fingerprint = tls::fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| bad(key_path, format!("not a PEM private key: {e}")))?;
    Ok(Current {
        key: certified(chain, key, Some((cert_path, key_path)))?,
        fingerprint,
        source: format!("{} (operator)", cert_path.display()),
    })
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    files: Option<(&Path, &Path)>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing = tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Config(format!("the private key cannot be used: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    if let Err(e) = ck.keys_match() {
        let what = match files {
            Some((c, k)) => format!(
                "the key in {} does not belong to the certificate in {} ({e}); give the key the certificate was issued for",
                k.display(),
                c.display()
            ),
            None => format!("the key does not belong to the certificate ({e})"),
        };
        return Err(TlsError::Config(what));
    }
    Ok(Arc::new(ck))
}

/// The listener's TLS 1.3-only configuration, presenting whatever `certs` holds. With `web`,
/// a browser's ALPN `http/1.1` is accepted (and the connection becomes the web client's).
pub fn server_config(certs: Arc<Certs>, web: bool) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = if web {
        vec![ALPN_HTTP1.to_vec(), ALPN_CONCLAVE.to_vec()]
    } else {
        vec![ALPN_CONCLAVE.to_vec()]
    };
    Ok(Arc::new(config))
}
