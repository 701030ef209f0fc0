//! The disk's floor for a durable write (`conclave bench --sync-floor`): a small write plus
//! `fdatasync`, one every 2 ms (the pace of paced-100: 500 messages a second), on the disk the
//! bench's servers keep their data on (the system's temporary directory), with nothing of
//! Conclave's in the way. A server that delivers a message only once it is durable cannot
//! deliver faster than its pipeline without the sync plus this; `bench/compare.sh` prints the
//! paced median against that sum (docs/benchmarks.md, "The median target and the sync").

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::BenchError;

/// Scratch file size: later writes overwrite allocated blocks, as SQLite's WAL does once it
/// starts over, instead of growing the file.
const FILE_BYTES: u64 = 16 << 20;
/// Bytes per write: about one small message's record.
const RECORD_BYTES: usize = 300;
/// Syncs measured.
pub const SAMPLES: usize = 1_000;
/// Pause between syncs (the virtual disks seen here sync faster back to back than paced).
const GAP: Duration = Duration::from_millis(2);

/// Percentiles of one write plus sync, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncFloor {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// Measures `samples` write-and-sync rounds in a scratch file under `dir` (removed after).
pub fn sync_floor(dir: &Path, samples: usize) -> Result<SyncFloor, BenchError> {
    let io = |what: &str, e: std::io::Error| {
        BenchError::Setup(format!("sync floor: {what} in {}: {e}", dir.display()))
    };
    let scratch = tempfile::Builder::new()
        .prefix("conclave-sync-floor-")
        .tempdir_in(dir)
        .map_err(|e| io("cannot make a scratch directory", e))?;
    let path = scratch.path().join("scratch.bin");
    let file = preallocated(&path).map_err(|e| io("cannot prepare the scratch file", e))?;
    let buf = vec![0x5au8; RECORD_BYTES];
    let mut off = 0u64;
    let mut took = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        let started = Instant::now();
        file.write_all_at(&buf, off)
            .and_then(|()| file.sync_data())
            .map_err(|e| io("a write or sync failed", e))?;
        took.push(started.elapsed());
        off = (off + RECORD_BYTES as u64) % (FILE_BYTES - RECORD_BYTES as u64);
        std::thread::sleep(GAP);
    }
    Ok(summarise(took))
}

fn preallocated(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < FILE_BYTES {
        file.write_all_at(&chunk, off)?;
        off += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok(file)
}

fn summarise(mut took: Vec<Duration>) -> SyncFloor {
    took.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(took[((took.len() as f64 * q) as usize).min(took.len() - 1)]);
    SyncFloor {
        samples: took.len(),
        p50_us: at(0.5),
        p90_us: at(0.9),
        p99_us: at(0.99),
        mean_us: took.iter().map(|d| us(*d)).sum::<f64>() / took.len() as f64,
    }
}

impl SyncFloor {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "sync_floor_us": {
                "what": "300 B write + fdatasync, one every 2 ms, in the temporary directory",
                "samples": self.samples,
                "p50": self.p50_us,
                "p90": self.p90_us,
                "p99": self.p99_us,
                "mean": self.mean_us,
            }
        })
        .to_string()
    }

    pub fn to_table(&self) -> String {
        format!(
            "sync floor ({} samples of a 300 B write + fdatasync, one every 2 ms): p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, mean {:.0} µs\n",
            self.samples, self.p50_us, self.p90_us, self.p99_us, self.mean_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_samples() {
        let took: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let f = summarise(took);
        assert_eq!(f.samples, 100);
        assert_eq!(f.p50_us.round(), 51.0);
        assert_eq!(f.p90_us.round(), 91.0);
        assert_eq!(f.p99_us.round(), 100.0);
        assert_eq!(f.mean_us.round(), 51.0);
    }

    #[test]
    fn a_short_measurement_on_the_temporary_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = sync_floor(dir.path(), 5).expect("measure");
        assert_eq!(f.samples, 5);
        assert!(f.p50_us > 0.0 && f.p50_us <= f.p99_us);
        // The scratch file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }
}
