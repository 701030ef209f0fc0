//! A small timed run of `PgDb::append_batch` (durable: `synchronous_commit = on`), run by
//! hand against a PostgreSQL you started (never in the tests):
//!
//! ```text
//! CONCLAVE_PG='host=127.0.0.1 port=5432 user=conclave dbname=postgres' \
//!     cargo run --release -p conclave-server --example pg_append
//! ```
//!
//! For batch sizes 1, 10 and 100 it appends batches of text messages to one room for about two
//! seconds each (at most 100,000 batches) from one connection, then prints batches and
//! messages per second and the median batch time. It writes into the database it is given:
//! use a throwaway one. docs/scaling.md has the figures and the machine they came from.

use std::time::{Duration, Instant};

use conclave_proto::{Body, Conv};
use conclave_server::at_rest::DataKey;
use conclave_server::store::{Messages, NewMessage};
use conclave_server::store_pg::PgDb;

/// How long each batch size runs.
const RUN_FOR: Duration = Duration::from_secs(2);
/// Most batches of one size, whatever the time.
const MAX_BATCHES: usize = 100_000;

fn main() {
    let Ok(config) = std::env::var("CONCLAVE_PG") else {
        eprintln!("set CONCLAVE_PG to a libpq connection string of a throwaway database");
        std::process::exit(2);
    };
    let Some(key) = DataKey::from_bytes(&[7u8; 32]) else {
        eprintln!("a 32-byte key is a key");
        std::process::exit(2);
    };
    let mut db = match PgDb::connect(&config, key) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let conv = Conv::Room("bench".into());
    for size in [1usize, 10, 100] {
        let batch: Vec<NewMessage> = (0..size)
            .map(|i| NewMessage {
                conv: conv.clone(),
                from: "bench".into(),
                body: Body::text(format!(
                    "a message of everyday length, number {i}, about the deploy at five"
                )),
                except: Vec::new(),
                idempotency_key: None,
                refs: None,
            })
            .collect();
        let mut times = Vec::new();
        let started = Instant::now();
        while started.elapsed() < RUN_FOR && times.len() < MAX_BATCHES {
            let t = Instant::now();
            if let Err(e) = db.append_batch(&batch) {
                eprintln!("append failed: {e}");
                std::process::exit(1);
            }
            times.push(t.elapsed());
        }
        let total = started.elapsed().as_secs_f64();
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "batch of {size:>3}: {:>7.0} batches/s, {:>8.0} messages/s, median batch {:.2} ms",
            times.len() as f64 / total,
            (times.len() * size) as f64 / total,
            median.as_secs_f64() * 1000.0
        );
    }
}
