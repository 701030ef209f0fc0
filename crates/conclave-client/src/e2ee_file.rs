//! The files of end-to-end conversations on disk: sealing a file into a temporary ciphertext
//! and opening a received ciphertext into its real name, both streamed (blocking I/O, called
//! from `spawn_blocking`; never the whole file in memory). The cipher is
//! [`conclave_e2ee::file_crypt`]; this module only moves bytes, hashes them and names files.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ClientError;

/// Buffer size for reading and writing.
const BUFFER: usize = 256 * 1024;

fn file_err(code: &'static str, message: impl Into<String>) -> ClientError {
    ClientError::File {
        code,
        message: message.into(),
    }
}

/// Passes bytes through, counting them (and hashing them when asked), refusing to write more
/// than `limit`, and remembering the first I/O error (the cipher reports errors as its own, so
/// this tells a disk's failure from a ciphertext's).
struct Tap<T> {
    inner: T,
    hasher: Option<Sha256>,
    bytes: u64,
    limit: u64,
    overflow: bool,
    error: Option<std::io::Error>,
}

impl<T> Tap<T> {
    fn new(inner: T, hash: bool, limit: u64) -> Tap<T> {
        Tap {
            inner,
            hasher: hash.then(Sha256::new),
            bytes: 0,
            limit,
            overflow: false,
            error: None,
        }
    }

    fn note<R>(&mut self, r: std::io::Result<R>) -> std::io::Result<R> {
        if let Err(e) = &r
            && self.error.is_none()
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            self.error = Some(std::io::Error::new(e.kind(), e.to_string()));
        }
        r
    }

    fn count(&mut self, data: &[u8]) {
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        self.bytes += data.len() as u64;
    }

    fn digest(&mut self) -> [u8; 32] {
        self.hasher.take().unwrap_or_default().finalize().into()
    }
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf);
        let n = self.note(r)?;
        self.count(&buf[..n]);
        Ok(n)
    }
}

impl<W: Write> Write for Tap<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.saturating_add(buf.len() as u64) > self.limit {
            self.overflow = true;
            return Err(std::io::Error::other("longer than described"));
        }
        let r = self.inner.write(buf);
        let n = self.note(r)?;
        self.count(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.note(r)
    }
}

/// A file sealed for an end-to-end conversation.
pub(crate) struct Sealed {
    /// The file's key (it travels only inside an MLS message).
    pub(crate) key: [u8; 32],
    /// SHA-256 and size of the plaintext, as read while sealing.
    pub(crate) plain_sha256: [u8; 32],
    pub(crate) plain_size: u64,
    /// SHA-256 and size of the ciphertext (what the offer and the transfer carry).
    pub(crate) sealed_sha256: [u8; 32],
    pub(crate) sealed_size: u64,
}

/// Encrypts `source` (the file at `path`) into `out` under a fresh key, hashing the plaintext
/// on the way in and the ciphertext on the way out.
pub(crate) fn seal(source: File, path: &Path, out: &File) -> Result<Sealed, ClientError> {
    let mut reader = Tap::new(BufReader::with_capacity(BUFFER, source), true, u64::MAX);
    let mut writer = Tap::new(BufWriter::with_capacity(BUFFER, out), true, u64::MAX);
    let sealed = conclave_e2ee::file_crypt::encrypt(&mut reader, &mut writer);
    let key = match sealed {
        Ok(key) => key,
        Err(e) => {
            let message = match (reader.error.take(), writer.error.take()) {
                (Some(e), _) => format!("cannot read {}: {e}", path.display()),
                (None, Some(e)) => format!(
                    "cannot write its encrypted copy in the temporary directory: {e} \
                     (make room there, or set TMPDIR to a directory with room)"
                ),
                (None, None) => format!("cannot encrypt {}: {e}", path.display()),
            };
            return Err(file_err("unreadable", message));
        }
    };
    Ok(Sealed {
        key,
        plain_sha256: reader.digest(),
        plain_size: reader.bytes,
        sealed_sha256: writer.digest(),
        sealed_size: writer.bytes,
    })
}

/// What the sender described of a file, in its MLS message.
#[derive(Clone, Copy)]
pub(crate) struct Description<'a> {
    pub(crate) name: &'a str,
    pub(crate) size: u64,
    pub(crate) sha256: &'a [u8; 32],
    pub(crate) key: &'a [u8; 32],
}

/// Decrypts the ciphertext at `sealed` into `dir` under the described name (or `NAME (1)` …
/// when taken). The plaintext goes to a hidden temporary file in `dir` first; only when it
/// authenticated to the end and matches the described size and SHA-256 does it get its name.
/// On any failure the temporary file is removed: nothing is left under the real name.
pub(crate) fn open(sealed: &Path, dir: &Path, file: &Description) -> Result<PathBuf, ClientError> {
    let input = File::open(sealed).map_err(|e| {
        file_err(
            "unreadable",
            format!("cannot read the downloaded {}: {e}", sealed.display()),
        )
    })?;
    let not_writable = |e: std::io::Error| {
        file_err(
            "not_writable",
            format!(
                "cannot write the decrypted file in {}: {e}; make room or choose another \
                 directory, and accept it again",
                dir.display()
            ),
        )
    };
    // Removed when dropped, unless named below.
    let tmp = tempfile::Builder::new()
        .prefix(".conclave-")
        .suffix(".decrypting")
        .tempfile_in(dir)
        .map_err(not_writable)?;
    let mut reader = Tap::new(BufReader::with_capacity(BUFFER, input), false, u64::MAX);
    let mut writer = Tap::new(
        BufWriter::with_capacity(BUFFER, tmp.as_file()),
        true,
        file.size,
    );
    let opened = conclave_e2ee::file_crypt::decrypt(file.key, &mut reader, &mut writer);
    let mismatch = |what: &str| {
        file_err(
            "hash_mismatch",
            format!(
                "the encrypted file {what}; it was discarded. It was altered on the way or is \
                 not what its sender described: ask the sender to send it again"
            ),
        )
    };
    if let Err(e) = opened {
        return Err(if writer.overflow {
            mismatch("is longer than its sender described")
        } else if let Some(io) = writer.error.take() {
            not_writable(io)
        } else if let Some(io) = reader.error.take() {
            file_err(
                "unreadable",
                format!("cannot read the downloaded {}: {io}", sealed.display()),
            )
        } else {
            tracing::debug!(error = %e, "an end-to-end file does not open");
            mismatch("does not authenticate under the key its sender gave")
        });
    }
    if writer.bytes != file.size || writer.digest() != *file.sha256 {
        return Err(mismatch(
            "decrypts to something else than the size and SHA-256 its sender described",
        ));
    }
    let buffered = writer.inner;
    let out = buffered
        .into_inner()
        .map_err(|e| not_writable(e.into_error()))?;
    out.sync_all().map_err(not_writable)?;
    // Linked under its name; the temporary name goes when `tmp` is dropped.
    crate::files::finish_as(dir, file.name, tmp.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Seals `plain` into a file in `dir`; returns its path and what the sealing reported.
    fn sealed_copy(dir: &Path, plain: &[u8]) -> (PathBuf, Sealed) {
        let src = dir.join("source");
        std::fs::write(&src, plain).expect("write");
        let out_path = dir.join("sealed.bin");
        let out = File::create(&out_path).expect("create");
        let sealed = seal(File::open(&src).expect("open"), &src, &out).expect("seal");
        drop(out);
        std::fs::remove_file(&src).expect("remove");
        (out_path, sealed)
    }

    #[test]
    fn seal_then_open_streams_and_names_without_clobbering() {
        let work = tempfile::tempdir().expect("work");
        let dest = tempfile::tempdir().expect("dest");
        let plain: Vec<u8> = (0..300_001u32).map(|i| (i % 253) as u8).collect();
        let (sealed_path, sealed) = sealed_copy(work.path(), &plain);
        assert_eq!(sealed.plain_size, plain.len() as u64);
        let want: [u8; 32] = Sha256::digest(&plain).into();
        assert_eq!(sealed.plain_sha256, want);
        let ct = std::fs::read(&sealed_path).expect("read");
        assert_eq!(sealed.sealed_size, ct.len() as u64);
        let ct_sha: [u8; 32] = Sha256::digest(&ct).into();
        assert_eq!(sealed.sealed_sha256, ct_sha);
        assert!(!ct.windows(64).any(|w| w == &plain[1000..1064]));

        std::fs::write(dest.path().join("a.txt"), b"already here").expect("write");
        let file = Description {
            name: "a.txt",
            size: sealed.plain_size,
            sha256: &sealed.plain_sha256,
            key: &sealed.key,
        };
        let got = open(&sealed_path, dest.path(), &file).expect("open");
        assert_eq!(got, dest.path().join("a (1).txt"));
        assert_eq!(std::fs::read(&got).expect("read"), plain);
        assert_eq!(
            std::fs::read(dest.path().join("a.txt")).expect("read"),
            b"already here"
        );
        assert_eq!(names(dest.path()), vec!["a (1).txt", "a.txt"]);
    }

    #[test]
    fn tampered_or_misdescribed_files_leave_nothing_behind() {
        let work = tempfile::tempdir().expect("work");
        let dest = tempfile::tempdir().expect("dest");
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let (sealed_path, sealed) = sealed_copy(work.path(), &plain);
        let good = Description {
            name: "secret.txt",
            size: sealed.plain_size,
            sha256: &sealed.plain_sha256,
            key: &sealed.key,
        };

        // One bit flipped in the first chunk: refused before anything gets the name.
        let mut ct = std::fs::read(&sealed_path).expect("read");
        ct[100] ^= 1;
        let bad_path = work.path().join("bad.bin");
        std::fs::write(&bad_path, &ct).expect("write");
        let e = open(&bad_path, dest.path(), &good).expect_err("tampered");
        assert_eq!(e.code(), "hash_mismatch", "{e}");
        assert!(e.to_string().contains("does not authenticate"), "{e}");
        assert!(names(dest.path()).is_empty(), "{:?}", names(dest.path()));

        // Truncated: the last chunk is missing.
        let cut = &std::fs::read(&sealed_path).expect("read")[..70_000];
        std::fs::write(&bad_path, cut).expect("write");
        let e = open(&bad_path, dest.path(), &good).expect_err("truncated");
        assert_eq!(e.code(), "hash_mismatch", "{e}");
        assert!(names(dest.path()).is_empty());

        // A wrong key.
        let other_key = [9u8; 32];
        let e = open(
            &sealed_path,
            dest.path(),
            &Description {
                key: &other_key,
                ..good
            },
        )
        .expect_err("wrong key");
        assert_eq!(e.code(), "hash_mismatch");
        assert!(names(dest.path()).is_empty());

        // Intact, but not what was described: a wrong hash, a smaller size.
        let wrong = [0u8; 32];
        let e = open(
            &sealed_path,
            dest.path(),
            &Description {
                sha256: &wrong,
                ..good
            },
        )
        .expect_err("wrong hash");
        assert_eq!(e.code(), "hash_mismatch");
        assert!(e.to_string().contains("SHA-256"), "{e}");
        assert!(names(dest.path()).is_empty());
        let e = open(
            &sealed_path,
            dest.path(),
            &Description { size: 1000, ..good },
        )
        .expect_err("longer than described");
        assert_eq!(e.code(), "hash_mismatch", "{e}");
        assert!(names(dest.path()).is_empty());

        // And the intact one opens.
        let got = open(&sealed_path, dest.path(), &good).expect("open");
        assert_eq!(std::fs::read(&got).expect("read"), plain);
        assert_eq!(names(dest.path()), vec!["secret.txt"]);
    }
}
