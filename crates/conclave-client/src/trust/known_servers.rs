//! The known-servers file: which certificate each server presented when it was first trusted,
//! like SSH's `known_hosts`.
//!
//! Format: one `host:port fingerprint` per line (canonical lower-case hex; colons accepted when
//! read), blank lines and `#` comments ignored. A line that is neither is an error rather than
//! skipped: silently ignoring a damaged pin would make the next connection look like a first
//! one, and trust-on-first-use would then accept any certificate.
//!
//! The file is created with mode 0600 in a directory created with mode 0700 (on Unix): it is
//! not secret, but another user who could edit it could redirect our trust.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::TrustError;
use super::fingerprint::normalize_fingerprint;

/// Name of the file inside the state directory.
pub const KNOWN_SERVERS_FILE: &str = "known_servers";

const HEADER: &str = "# Conclave known servers: `host:port sha256-fingerprint` per line.\n\
                      # `conclave fingerprint` on a server prints its fingerprint.\n";

/// One pinned server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownServer {
    /// `host:port`, host in lower case (IPv6 hosts in brackets).
    pub server: String,
    /// Canonical fingerprint.
    pub fingerprint: String,
    /// 1-based line number in the file, for messages that tell people what to edit.
    pub line: usize,
}

/// The parsed contents of a known-servers file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownServers {
    pub path: PathBuf,
    pub entries: Vec<KnownServer>,
}

/// What [`pin`] did to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinWrite {
    /// The server was not in the file; a line was appended.
    Added,
    /// The server was already pinned to this fingerprint.
    Unchanged,
    /// The server was pinned to another fingerprint, which was replaced.
    Replaced { old_fingerprint: String },
    /// The server was pinned to another fingerprint, which was kept ([`pin_if_new`]).
    Conflict { existing: KnownServer },
}

impl KnownServers {
    /// The known-servers file inside a state directory.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join(KNOWN_SERVERS_FILE)
    }

    /// Reads the file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KnownServers {
                path: path.to_path_buf(),
                entries: Vec::new(),
            }),
            Err(source) => Err(TrustError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses the text of a known-servers file (`path` is only used in error messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, TrustError> {
        let mut entries = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if let Some(entry) =
                parse_line(raw).map_err(|message| TrustError::KnownServersSyntax {
                    path: path.to_path_buf(),
                    line,
                    message,
                })?
            {
                entries.push(KnownServer {
                    server: entry.0,
                    fingerprint: entry.1,
                    line,
                });
            }
        }
        Ok(KnownServers {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The first entry for `server` (`host:port`, as [`crate::ServerAddr`] displays it).
    pub fn find(&self, server: &str) -> Option<&KnownServer> {
        let server = server.to_ascii_lowercase();
        self.entries.iter().find(|e| e.server == server)
    }
}

/// Parses one line: `None` for blank lines and comments.
fn parse_line(raw: &str) -> Result<Option<(String, String)>, String> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_whitespace();
    let (Some(server), Some(fingerprint), None) = (fields.next(), fields.next(), fields.next())
    else {
        return Err("expected `host:port fingerprint`".to_string());
    };
    if !server.contains(':') {
        return Err(format!("{server:?} is not `host:port`"));
    }
    let fingerprint = normalize_fingerprint(fingerprint).map_err(|e| e.to_string())?;
    Ok(Some((server.to_ascii_lowercase(), fingerprint)))
}

/// Records `server` → `fingerprint` in the file at `path`, creating it (and its directory) if
/// needed. An existing different pin for the server is replaced; comments and other lines are
/// kept.
pub fn pin(path: &Path, server: &str, fingerprint: &str) -> Result<PinWrite, TrustError> {
    write_pin(path, server, fingerprint, true)
}

/// Like [`pin`], but an existing different pin is kept and reported as
/// [`PinWrite::Conflict`]: trust on first use must never overwrite a pin, even one that
/// another client process wrote a moment ago.
pub fn pin_if_new(path: &Path, server: &str, fingerprint: &str) -> Result<PinWrite, TrustError> {
    write_pin(path, server, fingerprint, false)
}

fn write_pin(
    path: &Path,
    server: &str,
    fingerprint: &str,
    replace_existing: bool,
) -> Result<PinWrite, TrustError> {
    let server = server.to_ascii_lowercase();
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(TrustError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let Some(text) = existing else {
        create_dir(path)?;
        append(path, &format!("{HEADER}{server} {fingerprint}\n"))?;
        return Ok(PinWrite::Added);
    };
    let known = KnownServers::parse(path, &text)?;
    match known.find(&server) {
        Some(entry) if entry.fingerprint == fingerprint => Ok(PinWrite::Unchanged),
        Some(entry) if !replace_existing => Ok(PinWrite::Conflict {
            existing: entry.clone(),
        }),
        Some(entry) => {
            let old_fingerprint = entry.fingerprint.clone();
            replace(path, &replace_in_text(&text, &server, fingerprint))?;
            Ok(PinWrite::Replaced { old_fingerprint })
        }
        None => {
            // A hand-edited file may lack its final newline; don't glue our line onto it.
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            append(path, &format!("{sep}{server} {fingerprint}\n"))?;
            Ok(PinWrite::Added)
        }
    }
}

/// The file's text with the first line for `server` replaced by the new pin and any later
/// lines for it dropped. Comments and malformed lines are kept as they were.
pub fn replace_in_text(text: &str, server: &str, fingerprint: &str) -> String {
    let mut out = String::with_capacity(text.len() + 80);
    let mut done = false;
    for raw in text.lines() {
        let is_server = matches!(parse_line(raw), Ok(Some((s, _))) if s == server);
        if !is_server {
            out.push_str(raw);
            out.push('\n');
        } else if !done {
            out.push_str(&format!("{server} {fingerprint}\n"));
            done = true;
        }
    }
    if !done {
        out.push_str(&format!("{server} {fingerprint}\n"));
    }
    out
}

fn create_dir(path: &Path) -> Result<(), TrustError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TrustError::Io {
        action: "create the directory for",
        path: path.to_path_buf(),
        source,
    })
}

fn open_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Appends with one `write` on an `O_APPEND` file, so two clients pinning at the same time
/// produce two whole lines rather than interleaved bytes.
fn append(path: &Path, text: &str) -> Result<(), TrustError> {
    let io = |source| TrustError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut file = open_options()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Replaces the whole file atomically (write a sibling, then rename over).
fn replace(path: &Path, text: &str) -> Result<(), TrustError> {
    let io = |source| TrustError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut file = open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn parses_entries_comments_and_colons() {
        let upper = super::super::format_fingerprint(&fp('b'));
        let text = format!(
            "# comment\n\nchat.example.org:7667 {}\n  Other.Example:1 {upper}  \n",
            fp('a')
        );
        let known = KnownServers::parse(Path::new("ks"), &text).unwrap();
        assert_eq!(
            known.entries,
            vec![
                KnownServer {
                    server: "chat.example.org:7667".into(),
                    fingerprint: fp('a'),
                    line: 3
                },
                KnownServer {
                    server: "other.example:1".into(),
                    fingerprint: fp('b'),
                    line: 4
                },
            ]
        );
        assert_eq!(known.find("OTHER.example:1").map(|e| e.line), Some(4));
        assert!(known.find("other.example:2").is_none());
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        for bad in ["host:1", "host:1 abc", "host:1 {a} extra", "nohostport {a}"] {
            let text = format!("# ok\n{}\n", bad.replace("{a}", &fp('a')));
            match KnownServers::parse(Path::new("ks"), &text) {
                Err(TrustError::KnownServersSyntax { line: 2, .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn pin_creates_appends_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(KNOWN_SERVERS_FILE);

        assert_eq!(pin(&path, "a:1", &fp('a')).unwrap(), PinWrite::Added);
        assert_eq!(pin(&path, "a:1", &fp('a')).unwrap(), PinWrite::Unchanged);
        assert_eq!(pin(&path, "b:2", &fp('b')).unwrap(), PinWrite::Added);
        assert_eq!(
            pin(&path, "a:1", &fp('c')).unwrap(),
            PinWrite::Replaced {
                old_fingerprint: fp('a')
            }
        );
        assert!(matches!(
            pin_if_new(&path, "a:1", &fp('d')).unwrap(),
            PinWrite::Conflict { existing } if existing.fingerprint == fp('c')
        ));
        assert_eq!(pin_if_new(&path, "c:3", &fp('d')).unwrap(), PinWrite::Added);
        let known = KnownServers::load(&path).unwrap();
        assert_eq!(known.find("a:1").unwrap().fingerprint, fp('c'));
        assert_eq!(known.find("b:2").unwrap().fingerprint, fp('b'));
        assert_eq!(known.entries.len(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Conclave known servers"), "{text}");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
        }
    }

    #[test]
    fn append_after_a_missing_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KNOWN_SERVERS_FILE);
        std::fs::write(&path, format!("a:1 {}", fp('a'))).unwrap();
        pin(&path, "b:2", &fp('b')).unwrap();
        let known = KnownServers::load(&path).unwrap();
        assert_eq!(known.entries.len(), 2);
    }

    #[test]
    fn replace_keeps_comments_and_drops_duplicates() {
        let text = format!("# c\na:1 {}\nb:2 {}\na:1 {}\n", fp('a'), fp('b'), fp('d'));
        assert_eq!(
            replace_in_text(&text, "a:1", &fp('e')),
            format!("# c\na:1 {}\nb:2 {}\n", fp('e'), fp('b'))
        );
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownServers::load(&dir.path().join("nope")).unwrap();
        assert!(known.entries.is_empty());
    }
}
