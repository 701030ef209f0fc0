//! The audit-log reader: arbitrary bytes as `audit.log` (and, split at the first NUL, a rotated
//! file before it) go through `verify` (what `conclave logs --verify` runs), line by line
//! through the bounded line reader and `parse_line` (what `conclave logs` runs), and through
//! the writer's recovery at open (what a restart after a crash runs) followed by a write.
#![no_main]

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::OnceLock;

use conclave_server::audit::{self, AuditConfig, AuditLog, Fields, Kind, LineReader};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new().tempdir_in("/dev/shm")
        } else {
            tempfile::tempdir()
        };
        base.expect("a temporary directory").keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let data_dir = dir();
    let audit_dir = data_dir.join("audit");
    let _ = std::fs::remove_dir_all(&audit_dir);
    std::fs::create_dir_all(&audit_dir).expect("audit dir");
    let (rotated, current) = match data.iter().position(|&b| b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    if let Some(r) = rotated {
        std::fs::write(audit_dir.join("audit-000000000001.log"), r).expect("write");
    }
    std::fs::write(audit_dir.join("audit.log"), current).expect("write");

    let _ = audit::verify(data_dir);
    let mut lines = LineReader::new(BufReader::new(current));
    while let Ok(Some(line)) = lines.next_line() {
        // Invalid UTF-8 is replaced (3 bytes per bad byte at most).
        assert!(line.text.len() <= 3 * audit::MAX_LINE_BYTES);
        let _ = audit::parse_line(&line.text);
    }

    // Small limits so rotation and pruning run too.
    let config = AuditConfig {
        max_file_bytes: 2048,
        keep_files: 2,
        ..AuditConfig::default()
    };
    if let Ok(log) = AuditLog::open(data_dir, config) {
        log.record(Kind::Connect, Fields::new().user("fuzz"));
        log.close();
    }
});
