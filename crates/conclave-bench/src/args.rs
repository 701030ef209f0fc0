//! The flags of `conclave bench`. The binary crate only embeds this struct in its command line
//! and calls [`crate::run`].

use std::path::PathBuf;

use clap::Args;

use crate::preset::Preset;

pub const BENCH_HELP: &str = "\
Without --server, bench starts its own `conclave serve` (pinned to CPU 0 when taskset exists)
on 127.0.0.1 in a temporary data directory with relaxed rate limits, creates the accounts
there, measures it and stops it. With --server it drives a running server; pass --server-pid
(same machine) for its CPU and memory figures, and --data-dir to create the accounts on that
server's data directory instead of registering them over the wire. On 2+ CPUs the generator
runs on CPUs 1.. and leaves CPU 0 to the server (pin an external server there yourself, for
example with taskset -c 0); --no-pin turns both off.

Presets (flags given as well override them):
  fanout-100   100 clients, 1 room, 10 senders x 1,000 messages at full speed
  fanout-500   500 clients, 1 room, 5 senders x 1,000 messages at full speed
  paced-100    100 clients, 1 room, 10 senders x 500 messages at 50 msg/s each (latency)
  idle-10k     10,000 logged-in idle connections held 5 s (memory per connection)
  idle-50k     50,000 logged-in idle connections held 5 s (memory per connection)

Examples:
  conclave bench --preset fanout-100
  conclave bench --preset paced-100 --json
  conclave bench --clients 200 --rooms 4 --senders 8 --messages 500 --rate 100
  conclave bench --server 127.0.0.1:7667 --fingerprint 3f2a... --server-pid 4242 --preset fanout-100
  conclave bench --irc --server 127.0.0.1:6697 --fingerprint 9c1e... --server-pid 4343 --preset fanout-100
  conclave bench --files 1M,100M,1G";

/// `conclave bench`: a load generator and its report.
#[derive(Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// A named workload (see below); other flags override its values.
    #[arg(long, value_enum, value_name = "NAME")]
    pub preset: Option<Preset>,
    /// A running server, HOST:PORT. Without it, bench starts its own Conclave server. Several
    /// addresses separated by commas (a cluster's nodes, one certificate): connection i starts
    /// at address i mod n, so the load is spread, and fails over to the others.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT…]")]
    pub server: Option<String>,
    /// The server certificate's SHA-256 fingerprint (hex, colons and case ignored).
    #[arg(long, value_name = "HEX")]
    pub fingerprint: Option<String>,
    /// IRC only, loopback only: accept any certificate instead of checking --fingerprint.
    #[arg(long, requires = "irc")]
    pub insecure: bool,
    /// Drive an IRC server over TLS (NICK/USER, JOIN, PRIVMSG) instead of Conclave.
    #[arg(long, requires = "server")]
    pub irc: bool,
    /// The server's process id (same machine): measure its CPU time and memory.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Create the accounts directly on this (local) server's data directory.
    #[arg(long, value_name = "DIR", conflicts_with = "irc")]
    pub data_dir: Option<PathBuf>,
    /// Connections (each its own account or nick).
    #[arg(long, value_name = "N")]
    pub clients: Option<usize>,
    /// Rooms (channels); client i is in room i mod R. 0: nobody joins anything.
    #[arg(long, value_name = "R")]
    pub rooms: Option<usize>,
    /// How many of the clients send, spread over the rooms.
    #[arg(long, value_name = "S")]
    pub senders: Option<usize>,
    /// Messages each sender sends.
    #[arg(long, value_name = "M")]
    pub messages: Option<u64>,
    /// Messages per second per sender (default: as fast as the window allows).
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<f64>,
    /// Paced senders all send at the same moments (bursts of S messages at once) instead of
    /// being spread evenly over each interval.
    #[arg(long)]
    pub in_step: bool,
    /// Conclave: the raw (non-sender) connections offer only the classical X25519 key exchange,
    /// as clients from before post-quantum key exchange do (to compare handshake costs).
    #[arg(long, conflicts_with = "irc")]
    pub classical_kx: bool,
    /// Bytes of message text (at least the timestamp header, at most 400).
    #[arg(long, value_name = "BYTES")]
    pub size: Option<usize>,
    /// Conclave: sends per sender awaiting their acknowledgement at once.
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,
    /// Seconds without a new delivery after which the missing ones count as lost (default 5).
    #[arg(long, value_name = "SECS")]
    pub stall: Option<u64>,
    /// Seconds to hold the connections idle before measuring memory.
    #[arg(long, value_name = "SECS")]
    pub hold: Option<u64>,
    /// Conclave: every member uses the client library (acknowledgements, cursors), not only
    /// the senders. Heavier for the generator.
    #[arg(long, conflicts_with = "irc")]
    pub full_clients: bool,
    /// Connections being opened at once.
    #[arg(long, value_name = "N")]
    pub connect_parallel: Option<usize>,
    /// Give up and report what was measured after this many seconds (default 120; 300 for
    /// idle-50k).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Do not pin the started server to CPU 0 and the generator to the other CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// The conclave binary to start as the server (default: this executable).
    #[arg(long, value_name = "PATH", hide = true)]
    pub server_bin: Option<PathBuf>,
    /// A name for the server in the report (for example "ngircd 26.1").
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// File transfer mode: measure the relay, peer to peer and a plain TLS copy for each of
    /// these sizes (e.g. 1M,100M,1G) against a server it starts.
    #[arg(long, value_name = "SIZES", conflicts_with_all = ["preset", "irc", "server"])]
    pub files: Option<String>,
    /// File transfer mode: bytes in flight (relay chunks, QUIC windows), e.g. 4194304.
    #[arg(long, value_name = "BYTES", requires = "files")]
    pub file_window: Option<u64>,
    /// Measure the disk's floor for a durable write instead: 1,000 writes of 300 bytes, each
    /// followed by fdatasync, one every 2 ms, in the temporary directory (where the bench's
    /// servers keep their data).
    #[arg(long, conflicts_with_all = ["preset", "irc", "server", "files"])]
    pub sync_floor: bool,
}
