//! The disk's floor for a durable write: how long one small write plus a sync takes on the
//! machine, with nothing of Conclave's in the way. It bounds what any design that stores a
//! message durably before delivering it can reach (docs/benchmarks.md, "The median target and
//! the sync").
//!
//! `cargo bench -p conclave-server --bench disk`. Writes a 16 MiB scratch file under
//! `target/bench-data/disk/` (removed at the end) and prints percentiles in microseconds.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const FILE_BYTES: u64 = 16 << 20;
const SAMPLES: usize = 1_000;

fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/bench-data/disk")
        .components()
        .collect::<PathBuf>();
    std::fs::create_dir_all(&dir).expect("create target/bench-data/disk");
    dir.join("scratch.bin")
}

/// A file of `FILE_BYTES` written and synced once, so later writes overwrite allocated blocks
/// (as SQLite's WAL does once it starts over) instead of growing the file.
fn preallocated(path: &PathBuf) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open scratch file");
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < FILE_BYTES {
        file.write_all_at(&chunk, off).expect("fill scratch file");
        off += chunk.len() as u64;
    }
    file.sync_all().expect("sync scratch file");
    file
}

/// Writes `record` bytes at successive offsets and syncs each, `gap` apart, `SAMPLES` times.
fn measure(file: &File, record: usize, data_only: bool, gap: Duration) -> Vec<Duration> {
    let buf = vec![0x5au8; record];
    let mut off = 0u64;
    let mut took = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        file.write_all_at(&buf, off).expect("write");
        if data_only {
            file.sync_data().expect("fdatasync");
        } else {
            file.sync_all().expect("fsync");
        }
        took.push(started.elapsed());
        off = (off + record as u64) % (FILE_BYTES - record as u64);
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    took
}

fn report(name: &str, mut took: Vec<Duration>) {
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)].as_micros();
    let mean = took.iter().map(|d| d.as_micros()).sum::<u128>() / took.len() as u128;
    println!(
        "{name:<44} p50 {:>5} µs  p90 {:>5} µs  p99 {:>6} µs  mean {:>5} µs",
        at(0.5),
        at(0.9),
        at(0.99),
        mean
    );
}

fn main() {
    let path = scratch();
    let file = preallocated(&path);
    let paced = Duration::from_millis(2);
    println!("{SAMPLES} samples each; a write at successive offsets of a preallocated file");
    report(
        "300 B + fdatasync, one every 2 ms",
        measure(&file, 300, true, paced),
    );
    report(
        "4 KiB + fdatasync, one every 2 ms",
        measure(&file, 4096, true, paced),
    );
    report(
        "4 KiB + fsync, one every 2 ms",
        measure(&file, 4096, false, paced),
    );
    report(
        "300 B + fdatasync, back to back",
        measure(&file, 300, true, Duration::ZERO),
    );
    drop(file);
    let _ = std::fs::remove_file(&path);
}
