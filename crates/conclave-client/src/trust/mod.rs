//! Server identity: deciding whether the certificate a server presents is the one we mean to
//! talk to.
//!
//! Conclave servers usually run with a self-signed certificate, so trust works like SSH host
//! keys: a server is identified by the SHA-256 fingerprint of its certificate, pinned in
//! `<state_dir>/known_servers` the first time (after showing it), or given up front with
//! `--fingerprint`. A server whose certificate changes is refused loudly. A server with a
//! CA-issued certificate can instead be checked the WebPKI way with `--ca FILE`.
//!
//! The order of the checks is:
//! 1. [`Trust::Fingerprint`]: the presented certificate must match it. On success it is
//!    recorded in `known_servers` (replacing an older pin for that server), so later
//!    connections need no flag.
//! 2. [`Trust::Ca`]: the certificate must chain to the CA file and name the host; the
//!    known-servers file is not involved.
//! 3. Otherwise, if `known_servers` has the server, the certificate must match that pin.
//! 4. Otherwise the server is new: [`Trust::TrustOnFirstUse`] pins whatever it presents;
//!    [`Trust::PinnedOnly`] refuses with [`TrustError::Unknown`], which carries the
//!    fingerprint so an interface can ask "trust this?" and retry with
//!    [`Trust::Fingerprint`].

mod fingerprint;
mod known_servers;
mod verifier;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub use fingerprint::{
    FINGERPRINT_HEX_CHARS, FingerprintError, fingerprint_of_der, format_fingerprint,
    normalize_fingerprint,
};
pub use known_servers::{
    KNOWN_SERVERS_FILE, KnownServer, KnownServers, PinWrite, pin, pin_if_new, replace_in_text,
};

use verifier::{CaVerifier, PinVerifier, Seen, Verdict};

/// How to decide that the server is the right one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Require this certificate fingerprint (hex; colons and any case accepted).
    Fingerprint(String),
    /// Require a certificate issued by a CA in this PEM file, valid for the host name.
    Ca(PathBuf),
    /// Use the pin in `known_servers`; if the server is not there, accept and pin what it
    /// presents.
    TrustOnFirstUse,
    /// Use the pin in `known_servers`; refuse servers that are not there. The safe default.
    PinnedOnly,
}

impl Trust {
    /// [`Trust::Fingerprint`] from user input, checked and normalized.
    pub fn fingerprint(input: &str) -> Result<Trust, FingerprintError> {
        normalize_fingerprint(input).map(Trust::Fingerprint)
    }
}

/// Where an expected fingerprint came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `--fingerprint` ([`Trust::Fingerprint`]).
    Given,
    /// A line of the known-servers file.
    KnownServers { path: PathBuf, line: usize },
}

/// How the server's identity was established, for the session report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinOutcome {
    /// Matched the given fingerprint. `known_servers` is the file it was recorded in (if
    /// there is a state directory and the write worked); `replaced` is an older, different
    /// pin it replaced there.
    Given {
        known_servers: Option<PathBuf>,
        replaced: Option<String>,
    },
    /// Matched the pin on `line` of `known_servers`.
    Known { known_servers: PathBuf, line: usize },
    /// A new server, trusted on first use and now pinned in `known_servers`.
    NewlyPinned { known_servers: PathBuf },
    /// Verified against a CA.
    Ca { ca_file: PathBuf },
}

impl PinOutcome {
    /// A short stable word: `fingerprint`, `known`, `new` or `ca`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PinOutcome::Given { .. } => "fingerprint",
            PinOutcome::Known { .. } => "known",
            PinOutcome::NewlyPinned { .. } => "new",
            PinOutcome::Ca { .. } => "ca",
        }
    }
}

/// Why a server's identity could not be established.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    BadFingerprint(#[from] FingerprintError),

    /// The certificate does not match the pin. This is the loud one.
    #[error("{}", mismatch_text(server, expected, seen, pinned_in))]
    Mismatch {
        server: String,
        expected: String,
        seen: String,
        pinned_in: PinSource,
    },

    /// The server is not pinned and the policy is [`Trust::PinnedOnly`].
    #[error(
        "{server} is not a known server; refusing to trust it without checking.\n\
         Its certificate fingerprint (SHA-256) is:\n\
         \x20   {}\n\
         Ask the server's operator to confirm it (`conclave fingerprint` on the server prints \
         it), then connect again with --fingerprint {seen} (or pass --trust-on-first-use to \
         accept it without checking). It will then be remembered in {}.",
        format_fingerprint(seen),
        known_servers.display()
    )]
    Unknown {
        server: String,
        seen: String,
        known_servers: PathBuf,
    },

    #[error(
        "{}, line {line}: {message}; fix or delete that line (it pins a server's certificate)",
        path.display()
    )]
    KnownServersSyntax {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "cannot tell where to keep known servers: none of CONCLAVE_STATE_DIR, XDG_CONFIG_HOME \
         and HOME is set; pass --state-dir DIR"
    )]
    NoStateDir,

    #[error("CA file {}: {message}", path.display())]
    CaFile { path: PathBuf, message: String },

    #[error("could not set up TLS: {0}")]
    Config(String),
}

impl TrustError {
    /// The fingerprint the server presented, when the refusal was about it. An interface can
    /// show it, ask the user, and retry with [`Trust::Fingerprint`].
    pub fn seen_fingerprint(&self) -> Option<&str> {
        match self {
            TrustError::Mismatch { seen, .. } | TrustError::Unknown { seen, .. } => Some(seen),
            _ => None,
        }
    }
}

fn mismatch_text(server: &str, expected: &str, seen: &str, pinned_in: &PinSource) -> String {
    let rule = "@".repeat(72);
    let mut out = format!(
        "{rule}\n\
         @  WARNING: THE CERTIFICATE OF {server} IS NOT THE EXPECTED ONE\n\
         {rule}\n\
         The server presented a certificate whose fingerprint differs from the one you \
         trusted.\n\
         Someone may be intercepting your connection (a man-in-the-middle attack), or the \
         server's operator may have regenerated its key.\n"
    );
    match pinned_in {
        PinSource::Given => out.push_str(&format!(
            "  expected (--fingerprint): {}\n  presented by the server:  {}\n",
            format_fingerprint(expected),
            format_fingerprint(seen)
        )),
        PinSource::KnownServers { path, line } => out.push_str(&format!(
            "  pinned ({}, line {line}): {}\n  presented by the server: {}\n",
            path.display(),
            format_fingerprint(expected),
            format_fingerprint(seen)
        )),
    }
    out.push_str(
        "Refusing to connect. Ask the operator to run `conclave fingerprint` on the server \
         and compare it with the fingerprint presented above, over a channel you trust.\n",
    );
    match pinned_in {
        PinSource::Given => out.push_str(
            "If the server's fingerprint is the presented one, check where your \
             --fingerprint value came from.",
        ),
        PinSource::KnownServers { path, line } => out.push_str(&format!(
            "If the change is legitimate, remove line {line} from {} (or connect once with \
             --fingerprint and the new value, which replaces the pin).",
            path.display()
        )),
    }
    out
}

/// The default state directory: `$CONCLAVE_STATE_DIR`, else `$XDG_CONFIG_HOME/conclave`, else
/// `$HOME/.config/conclave`.
pub fn default_state_dir() -> Option<PathBuf> {
    state_dir_from(
        std::env::var_os("CONCLAVE_STATE_DIR"),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`default_state_dir`] with the environment passed in (empty values count as unset).
pub fn state_dir_from(
    conclave_state_dir: Option<OsString>,
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(conclave_state_dir)
        .or_else(|| set(xdg_config_home).map(|d| d.join("conclave")))
        .or_else(|| set(home).map(|d| d.join(".config").join("conclave")))
}

/// The crypto provider every Conclave TLS config uses: aws-lc-rs, offering the hybrid
/// post-quantum group X25519MLKEM768 first and the classical groups after it (one definition
/// with the direct transfers', in `conclave-p2p`).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    conclave_p2p::provider()
}

/// One connection attempt's trust decision: the rustls config to use, and what to do with
/// the verifier's verdict afterwards.
pub(crate) struct TrustPlan {
    /// The name the pin is kept under in `known_servers`.
    server: String,
    /// The server as refusals name it (the address connected to, and the name it is pinned
    /// under when that is another address of the same list).
    shown: String,
    mode: Mode,
    seen: Seen,
    config: Arc<rustls::ClientConfig>,
}

enum Mode {
    Given {
        expected: String,
        known_servers: Option<PathBuf>,
    },
    Known {
        expected: String,
        known_servers: PathBuf,
        line: usize,
    },
    New {
        known_servers: PathBuf,
    },
    Ca {
        ca_file: PathBuf,
    },
}

impl TrustPlan {
    /// Decides how to verify `server` (`host:port`, as [`crate::ServerAddr`] displays it).
    pub(crate) fn new(
        trust: &Trust,
        server: &str,
        state_dir: Option<&Path>,
    ) -> Result<TrustPlan, TrustError> {
        let seen: Seen = Arc::new(Mutex::new(None));
        let provider = provider();
        let known_servers = state_dir.map(KnownServers::path_in);
        let (mode, verifier): (Mode, Arc<dyn ServerCertVerifier>) = match trust {
            Trust::Ca(ca_file) => {
                let inner = load_ca(ca_file, provider.clone())?;
                (
                    Mode::Ca {
                        ca_file: ca_file.clone(),
                    },
                    Arc::new(CaVerifier {
                        inner,
                        seen: seen.clone(),
                    }),
                )
            }
            Trust::Fingerprint(given) => {
                let expected = normalize_fingerprint(given)?;
                (
                    Mode::Given {
                        expected: expected.clone(),
                        known_servers,
                    },
                    Arc::new(PinVerifier {
                        expected: Some(expected),
                        accept_new: false,
                        seen: seen.clone(),
                        provider: provider.clone(),
                    }),
                )
            }
            Trust::TrustOnFirstUse | Trust::PinnedOnly => {
                let path = known_servers.ok_or(TrustError::NoStateDir)?;
                let known = KnownServers::load(&path)?;
                let (mode, expected) = match known.find(server) {
                    Some(entry) => (
                        Mode::Known {
                            expected: entry.fingerprint.clone(),
                            known_servers: path,
                            line: entry.line,
                        },
                        Some(entry.fingerprint.clone()),
                    ),
                    None => (
                        Mode::New {
                            known_servers: path,
                        },
                        None,
                    ),
                };
                (
                    mode,
                    Arc::new(PinVerifier {
                        expected,
                        accept_new: *trust == Trust::TrustOnFirstUse,
                        seen: seen.clone(),
                        provider: provider.clone(),
                    }),
                )
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TrustError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(TrustPlan {
            server: server.to_string(),
            shown: server.to_string(),
            mode,
            seen,
            config: Arc::new(config),
        })
    }

    /// Names the server as `shown` in refusals (the pin stays under the name given to
    /// [`TrustPlan::new`]).
    pub(crate) fn shown_as(mut self, shown: String) -> TrustPlan {
        self.shown = shown;
        self
    }

    pub(crate) fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// The CA file, when verifying against one (for error messages).
    pub(crate) fn ca_file(&self) -> Option<&Path> {
        match &self.mode {
            Mode::Ca { ca_file } => Some(ca_file),
            _ => None,
        }
    }

    fn verdict(&self) -> Option<(String, Verdict)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The fingerprint of the certificate the server presented, once the handshake got that
    /// far.
    pub(crate) fn seen_fingerprint(&self) -> Option<String> {
        self.verdict().map(|(fingerprint, _)| fingerprint)
    }

    /// After a failed handshake: the trust refusal that caused it, if that was the cause.
    pub(crate) fn refusal(&self) -> Option<TrustError> {
        let (seen, verdict) = self.verdict()?;
        match (verdict, &self.mode) {
            (Verdict::Mismatch, Mode::Given { expected, .. }) => Some(TrustError::Mismatch {
                server: self.shown.clone(),
                expected: expected.clone(),
                seen,
                pinned_in: PinSource::Given,
            }),
            (
                Verdict::Mismatch,
                Mode::Known {
                    expected,
                    known_servers,
                    line,
                },
            ) => Some(TrustError::Mismatch {
                server: self.shown.clone(),
                expected: expected.clone(),
                seen,
                pinned_in: PinSource::KnownServers {
                    path: known_servers.clone(),
                    line: *line,
                },
            }),
            (Verdict::NewRefused, Mode::New { known_servers }) => Some(TrustError::Unknown {
                server: self.shown.clone(),
                seen,
                known_servers: known_servers.clone(),
            }),
            _ => None,
        }
    }

    /// After the server proved to be a Conclave server with an accepted certificate: record
    /// the pin where the policy says so, and report how trust was established.
    pub(crate) fn confirm(&self) -> Result<PinOutcome, TrustError> {
        let seen = self.seen_fingerprint().unwrap_or_default();
        match &self.mode {
            Mode::Ca { ca_file } => Ok(PinOutcome::Ca {
                ca_file: ca_file.clone(),
            }),
            Mode::Known {
                known_servers,
                line,
                ..
            } => Ok(PinOutcome::Known {
                known_servers: known_servers.clone(),
                line: *line,
            }),
            Mode::New { known_servers } => {
                // Not being able to remember the pin would silently make every later
                // connection a "first use" again, so it is an error, not a warning.
                match pin_if_new(known_servers, &self.server, &seen)? {
                    // Another client pinned this server meanwhile, to another certificate.
                    PinWrite::Conflict { existing } => Err(TrustError::Mismatch {
                        server: self.shown.clone(),
                        expected: existing.fingerprint,
                        seen,
                        pinned_in: PinSource::KnownServers {
                            path: known_servers.clone(),
                            line: existing.line,
                        },
                    }),
                    PinWrite::Added | PinWrite::Unchanged | PinWrite::Replaced { .. } => {
                        Ok(PinOutcome::NewlyPinned {
                            known_servers: known_servers.clone(),
                        })
                    }
                }
            }
            Mode::Given { known_servers, .. } => {
                let Some(path) = known_servers else {
                    return Ok(PinOutcome::Given {
                        known_servers: None,
                        replaced: None,
                    });
                };
                // The fingerprint was verified; failing to remember it only costs the user a
                // flag next time, so it does not fail the connection.
                match pin(path, &self.server, &seen) {
                    Ok(write) => Ok(PinOutcome::Given {
                        known_servers: Some(path.clone()),
                        replaced: match write {
                            PinWrite::Replaced { old_fingerprint } => Some(old_fingerprint),
                            PinWrite::Added | PinWrite::Unchanged | PinWrite::Conflict { .. } => {
                                None
                            }
                        },
                    }),
                    Err(e) => {
                        tracing::warn!("could not remember the server's fingerprint: {e}");
                        Ok(PinOutcome::Given {
                            known_servers: None,
                            replaced: None,
                        })
                    }
                }
            }
        }
    }
}

fn load_ca(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TrustError> {
    let fail = |message: String| TrustError::CaFile {
        path: path.to_path_buf(),
        message,
    };
    let mut roots = RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| fail(format!("could not read it: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| fail(format!("could not parse it as PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("a certificate in it cannot be a trust anchor: {e}")))?;
    }
    if roots.is_empty() {
        return Err(fail(
            "it holds no certificate (expected PEM blocks starting with \
             `-----BEGIN CERTIFICATE-----`)"
                .into(),
        ));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn state_dir_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            state_dir_from(s("/c"), s("/x"), s("/h")),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            state_dir_from(s(""), s("/x"), s("/h")),
            Some(PathBuf::from("/x/conclave"))
        );
        assert_eq!(
            state_dir_from(None, None, s("/h")),
            Some(PathBuf::from("/h/.config/conclave"))
        );
        assert_eq!(state_dir_from(None, None, None), None);
    }

    #[test]
    fn mismatch_is_loud_and_shows_both_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let path = KnownServers::path_in(dir.path());
        std::fs::write(&path, format!("# hi\nhost:7667 {}\n", fp('a'))).unwrap();
        let plan = TrustPlan::new(&Trust::TrustOnFirstUse, "host:7667", Some(dir.path())).unwrap();
        // Simulate the verifier having seen another certificate.
        *plan.seen.lock().unwrap() = Some((fp('b'), Verdict::Mismatch));
        let err = plan.refusal().expect("a refusal");
        assert_eq!(err.seen_fingerprint(), Some(fp('b').as_str()));
        let text = err.to_string();
        assert!(text.contains("WARNING"), "{text}");
        assert!(text.contains(&format_fingerprint(&fp('a'))), "{text}");
        assert!(text.contains(&format_fingerprint(&fp('b'))), "{text}");
        assert!(text.contains("remove line 2 from"), "{text}");
        assert!(text.contains("conclave fingerprint"), "{text}");
    }

    #[test]
    fn unknown_server_with_pinned_only_is_refused_with_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let plan = TrustPlan::new(&Trust::PinnedOnly, "host:7667", Some(dir.path())).unwrap();
        *plan.seen.lock().unwrap() = Some((fp('c'), Verdict::NewRefused));
        let err = plan.refusal().expect("a refusal");
        assert!(matches!(err, TrustError::Unknown { .. }));
        let text = err.to_string();
        assert!(text.contains(&format_fingerprint(&fp('c'))), "{text}");
        assert!(text.contains("--fingerprint"), "{text}");
        assert!(text.contains("--trust-on-first-use"), "{text}");
    }

    #[test]
    fn trust_on_first_use_pins_and_given_fingerprint_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = KnownServers::path_in(dir.path());

        let plan = TrustPlan::new(&Trust::TrustOnFirstUse, "host:1", Some(dir.path())).unwrap();
        *plan.seen.lock().unwrap() = Some((fp('a'), Verdict::NewAccepted));
        assert!(plan.refusal().is_none());
        assert_eq!(
            plan.confirm().unwrap(),
            PinOutcome::NewlyPinned {
                known_servers: path.clone()
            }
        );
        let known = KnownServers::load(&path).unwrap();
        assert_eq!(known.find("host:1").unwrap().fingerprint, fp('a'));

        // Now known: the plan expects that pin.
        let plan = TrustPlan::new(&Trust::PinnedOnly, "host:1", Some(dir.path())).unwrap();
        assert!(matches!(&plan.mode, Mode::Known { expected, .. } if *expected == fp('a')));

        // An explicit fingerprint replaces the pin once verified.
        let given = format_fingerprint(&fp('d'));
        let plan = TrustPlan::new(&Trust::Fingerprint(given), "host:1", Some(dir.path())).unwrap();
        *plan.seen.lock().unwrap() = Some((fp('d'), Verdict::Matched));
        assert_eq!(
            plan.confirm().unwrap(),
            PinOutcome::Given {
                known_servers: Some(path.clone()),
                replaced: Some(fp('a')),
            }
        );
        let known = KnownServers::load(&path).unwrap();
        assert_eq!(known.find("host:1").unwrap().fingerprint, fp('d'));
    }

    #[test]
    fn trust_on_first_use_never_overwrites_a_pin_written_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let plan = TrustPlan::new(&Trust::TrustOnFirstUse, "host:1", Some(dir.path())).unwrap();
        // Another process pins the server while this handshake runs.
        pin(&KnownServers::path_in(dir.path()), "host:1", &fp('a')).unwrap();
        *plan.seen.lock().unwrap() = Some((fp('b'), Verdict::NewAccepted));
        assert!(matches!(
            plan.confirm(),
            Err(TrustError::Mismatch { expected, seen, .. }) if expected == fp('a') && seen == fp('b')
        ));
    }

    #[test]
    fn pinned_modes_need_a_state_dir_but_a_given_fingerprint_does_not() {
        assert!(matches!(
            TrustPlan::new(&Trust::PinnedOnly, "h:1", None),
            Err(TrustError::NoStateDir)
        ));
        assert!(TrustPlan::new(&Trust::Fingerprint(fp('a')), "h:1", None).is_ok());
        assert!(matches!(
            TrustPlan::new(&Trust::Fingerprint("nope".into()), "h:1", None),
            Err(TrustError::BadFingerprint(_))
        ));
    }

    #[test]
    fn ca_file_errors_are_readable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = TrustPlan::new(&Trust::Ca(missing), "h:1", None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("could not read it"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = TrustPlan::new(&Trust::Ca(empty), "h:1", None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }
}
