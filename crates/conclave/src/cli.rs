//! The command line (the contract in DESIGN.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./conclave-data";

#[derive(Parser)]
#[command(
    name = "conclave",
    version,
    about = "Conclave: a self-hosted secure chat-room server and its clients",
    after_help = "Start a server:   conclave serve\nConnect a client: conclave client --json --server 127.0.0.1:7667 --user alice --register --trust-on-first-use"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server.
    #[command(
        after_help = "Examples:\n  conclave serve --data-dir ./conclave-data --listen 0.0.0.0:7667\n  CONCLAVE_PG_PASSWORD=... conclave serve --store postgres://conclave@127.0.0.1:5432/conclave --bus nats://127.0.0.1:4222 --node n1   (cluster mode, docs/scaling.md)"
    )]
    Serve(ServeArgs),
    /// Print the server certificate's SHA-256 fingerprint (hex) and nothing else.
    #[command(after_help = "Example:\n  conclave fingerprint --data-dir ./conclave-data")]
    Fingerprint(DataDirArg),
    /// Manage accounts on a data directory.
    #[command(
        after_help = "Example:\n  CONCLAVE_PW=... conclave user add alice --admin --password-env CONCLAVE_PW"
    )]
    User(UserArgs),
    /// Connect to a server as a client (JSON lines on stdin and stdout).
    #[command(
        after_help = "Examples:\n  conclave client --json --server 127.0.0.1:7667 --user alice --password-env PW --fingerprint 3f2a...\n  then type: {\"cmd\":\"send\",\"room\":\"general\",\"text\":\"hi\"}\n  conclave client --json --server node1.example.org:7667,node2.example.org:7667 --user alice   (a cluster: the next node when one fails)"
    )]
    Client(ClientArgs),
    /// The terminal chat client: conversations, members, commands, scrollback.
    #[command(after_help = CHAT_HELP)]
    Chat(ChatArgs),
    /// The operator's console for a running server (over its admin socket).
    #[command(
        after_help = "Examples:\n  conclave admin who\n  conclave admin ban mallory --for 2h --reason spam\n  conclave admin deny add 203.0.113.0/24\n  conclave admin reload"
    )]
    Admin(crate::admin::AdminArgs),
    /// Show, filter, follow or verify the tamper-evident audit log.
    #[command(after_help = LOGS_HELP)]
    Logs(LogsArgs),
    /// Live traffic and alerts of a running server (a terminal view, or JSON lines).
    #[command(after_help = crate::monitor::MONITOR_HELP)]
    Monitor(crate::monitor::MonitorArgs),
    /// Check a data directory (and the running server) for security problems.
    #[command(after_help = crate::doctor::DOCTOR_HELP)]
    Doctor(crate::doctor::DoctorArgs),
    /// Load generator: connections, fan-out, latency, server CPU and memory (also against IRC).
    #[command(after_help = conclave_bench::BENCH_HELP)]
    Bench(conclave_bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (conclave.1, conclave-serve.1, ...) into a directory.
    #[command(
        after_help = "Examples:\n  conclave man /usr/local/share/man/man1\n  conclave man ./man && man -l ./man/conclave-user.1"
    )]
    Man {
        /// Where to write them (created if needed).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

const COMPLETIONS_HELP: &str = "\
Examples:
  conclave completions bash > ~/.local/share/bash-completion/completions/conclave
  conclave completions zsh > ~/.zfunc/_conclave      # with fpath+=~/.zfunc before compinit
  conclave completions fish > ~/.config/fish/completions/conclave.fish";

const LOGS_HELP: &str = "\
Times (T): RFC 3339 (2026-11-21T10:00:00Z), a date (2026-11-21: midnight UTC), or a time ago
(30s, 15m, 2h, 7d). --since and --until both include T.

Examples:
  conclave logs --since 2h --kind login_failed,ban
  conclave logs --ip 203.0.113.0/24 --since 2026-11-21 --until 2026-11-22
  conclave logs --user alice --json | jq .
  conclave logs --follow
  conclave logs --verify";

#[derive(Args, Clone)]
pub struct DataDirArg {
    /// The server's data directory (config, keys, database, logs).
    #[arg(long, env = "CONCLAVE_DATA_DIR", default_value = DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
}

/// What to do about a missing data directory.
fn data_dir_hint(dir: &std::path::Path) -> String {
    format!(
        "pass --data-dir (or set CONCLAVE_DATA_DIR) to name the server's data directory, or start `conclave serve --data-dir {}` once to create one",
        dir.display()
    )
}

/// Refuses a data directory that does not exist (for the commands that only read one).
pub fn require_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "there is no data directory {}; {}",
            dir.display(),
            data_dir_hint(dir)
        );
    }
    Ok(())
}

impl DataDirArg {
    /// Refuses a data directory without a database: reading one must never create one (only
    /// `serve`, and `user add` for the first account, do), or a mistyped path or a command run
    /// in the wrong folder would silently make an empty server there.
    pub fn existing(&self) -> anyhow::Result<&std::path::Path> {
        let dir = self.data_dir.as_path();
        require_dir(dir)?;
        let how = data_dir_hint(dir);
        if !dir.join(conclave_server::store::DB_FILE).is_file() {
            anyhow::bail!(
                "{} has no database ({}): it is not a Conclave data directory yet; {how}",
                dir.display(),
                conclave_server::store::DB_FILE
            );
        }
        Ok(dir)
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Address and port to listen on (default 127.0.0.1:7667, loopback only).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Config file (default: conclave.toml in the data directory, if present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Who may create accounts: auto (open on loopback, closed otherwise), open, invite, closed.
    #[arg(long, value_name = "POLICY")]
    pub registration: Option<String>,
    /// Require this server password (read from the named environment variable) to log in or
    /// register.
    #[arg(long, value_name = "VAR")]
    pub server_password_env: Option<String>,
    /// Derive the data key (encryption at rest) from the passphrase in this environment
    /// variable instead of keeping it in data.key. Needed at every start.
    #[arg(long, value_name = "VAR")]
    pub data_key_env: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default; a bare PORT
    /// means 127.0.0.1:PORT). Keep it on loopback: the endpoint has no authentication.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Present this certificate chain (PEM, the server's certificate first), for example one
    /// issued by a CA that browsers trust, instead of the self-signed one; with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert; keep it mode 0600.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Cluster mode: keep everything in this PostgreSQL database, shared by every node
    /// (postgres://USER@HOST:PORT/DATABASE; a Unix socket or loopback host, and no password
    /// in it: put that in CONCLAVE_PG_PASSWORD or in store_password_file in conclave.toml).
    #[arg(long, value_name = "postgres://…")]
    pub store: Option<String>,
    /// Cluster mode: tell the other nodes about commits and events over this NATS server
    /// (nats://HOST:PORT, loopback; several separated by commas). Needs --store.
    #[arg(long, value_name = "nats://…", requires = "store")]
    pub bus: Option<String>,
    /// Cluster mode: this node's name as the others see it (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

#[derive(Args)]
pub struct UserArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// The data key passphrase's environment variable, for a server started with
    /// --data-key-env.
    #[arg(long, value_name = "VAR", global = true)]
    pub data_key_env: Option<String>,
    #[command(subcommand)]
    pub action: UserAction,
}

#[derive(Subcommand)]
pub enum UserAction {
    /// Create an account (the password is prompted for, or read from --password-env).
    Add {
        name: String,
        /// Give the account the admin role.
        #[arg(long)]
        admin: bool,
        /// Read the password from this environment variable instead of prompting.
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Delete an account.
    Del { name: String },
    /// Set an account's password (its live sessions stay connected).
    Passwd {
        name: String,
        /// Read the new password from this environment variable instead of prompting.
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Give an existing account the admin role, or take it away with --revoke.
    #[command(
        after_help = "Takes effect at once, also for the account's live sessions, when the server runs.\n\nExamples:\n  conclave user admin alice\n  conclave user admin alice --revoke"
    )]
    Admin {
        name: String,
        /// Take the admin role away instead of giving it.
        #[arg(long)]
        revoke: bool,
    },
    /// List accounts.
    List,
    /// Make a one-time invite code (for registration policy "invite").
    Invite,
}

#[derive(Args)]
pub struct ClientArgs {
    /// JSON lines mode: commands on stdin, replies and events on stdout.
    #[arg(long)]
    pub json: bool,
    /// The server, HOST:PORT; or a cluster's nodes, HOST:PORT,HOST:PORT,… (one certificate,
    /// pinned under the first address): tried in order, and the next is used when a
    /// connection fails or drops, resuming without loss or repeats.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT…]")]
    pub server: String,
    /// Your account name.
    #[arg(long)]
    pub user: String,
    /// Read your password from this environment variable (otherwise it is prompted for).
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// The server certificate's SHA-256 fingerprint (hex, colons and case ignored).
    #[arg(long, value_name = "HEX", conflicts_with_all = ["trust_on_first_use", "ca"])]
    pub fingerprint: Option<String>,
    /// Accept and pin an unknown server's certificate on this first connection.
    #[arg(long)]
    pub trust_on_first_use: bool,
    /// Verify the server with this CA certificate (PEM) instead of a pinned fingerprint.
    #[arg(long, value_name = "FILE", conflicts_with = "trust_on_first_use")]
    pub ca: Option<PathBuf>,
    /// Create the account (if the server's registration policy allows it).
    #[arg(long)]
    pub register: bool,
    /// Read an invite code for registration from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub invite_code_env: Option<String>,
    /// Read the server password from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub server_password_env: Option<String>,
    /// Where pinned server fingerprints and this device's end-to-end keys and history are kept
    /// (default: ~/.config/conclave). Keep it and back it up like an SSH key: without it this
    /// device cannot read its end-to-end conversations' history, and joins as a new device.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Keep trying to reconnect after a lost connection for this many seconds (default 3600);
    /// 0 exits at once when the connection is lost.
    #[arg(long, value_name = "SECS")]
    pub reconnect_for: Option<u64>,
    /// File transfers: bytes in flight (relay chunks, and the QUIC flow-control windows peer
    /// to peer), e.g. 65536, 256K, 4M; 16K to 1G. A command's "window" field overrides it.
    #[arg(long, value_name = "BYTES", value_parser = conclave_client::files::parse_size)]
    pub window: Option<u64>,
    /// Direct (peer-to-peer) transfers: the QUIC congestion controller, cubic (default),
    /// newreno or bbr (far faster on lossy paths; see docs/benchmarks.md).
    #[arg(long, value_name = "NAME", value_parser = ["cubic", "newreno", "bbr"])]
    pub congestion: Option<String>,
    /// Restore your end-to-end history from the recovery-key backup: the key (as shown by
    /// backup_enable) is read from this environment variable, never from the command line.
    #[arg(long, value_name = "VAR")]
    pub recovery_key_env: Option<String>,
}

const CHAT_HELP: &str = "\
The first connection to a server shows its certificate fingerprint and asks before trusting it
(compare it with `conclave fingerprint` on the server). The password is asked for on the screen
(each character shows as •), or read from the variable named by --password-env. Inside, /help lists the
commands and keys. Logs go to chat.log in the state directory.

Examples:
  conclave chat --server chat.example.org:7667 --user alice
  conclave chat --server 127.0.0.1:7667 --user bob --register
  conclave chat --server node1.example.org:7667,node2.example.org:7667 --user alice
  PW=... conclave chat --server 127.0.0.1:7667 --user bob --password-env PW --fingerprint 3f2a...";

#[derive(Args)]
pub struct ChatArgs {
    /// The server, HOST:PORT; or a cluster's nodes, HOST:PORT,HOST:PORT,… (one certificate,
    /// pinned under the first address): tried in order, and the next is used when a
    /// connection fails or drops, resuming without loss or repeats.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT…]")]
    pub server: String,
    /// Your account name.
    #[arg(long)]
    pub user: String,
    /// Read your password from this environment variable (otherwise the screen asks for it).
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// The server certificate's SHA-256 fingerprint (hex, colons and case ignored); without
    /// it, an unknown server's fingerprint is shown for you to confirm.
    #[arg(long, value_name = "HEX", conflicts_with = "ca")]
    pub fingerprint: Option<String>,
    /// Verify the server with this CA certificate (PEM) instead of a pinned fingerprint.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Create the account (if the server's registration policy allows it).
    #[arg(long)]
    pub register: bool,
    /// Read an invite code for registration from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub invite_code_env: Option<String>,
    /// Read the server password from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub server_password_env: Option<String>,
    /// Where pinned server fingerprints, chat.log and this device's end-to-end keys and
    /// history are kept (default: ~/.config/conclave). Back it up like an SSH key: without it
    /// this device cannot read its end-to-end conversations' history.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Do not ring the terminal bell when someone mentions you (@you, or @room from the
    /// room's owner). `/mute` silences one conversation.
    #[arg(long)]
    pub no_bell: bool,
    /// Do not put waiting mentions in the terminal window's title.
    #[arg(long)]
    pub no_title: bool,
    /// Restore your end-to-end history from the recovery-key backup once signed in: the key
    /// (as /backup showed it) is read from this environment variable, never from the command
    /// line. Inside, /restore asks for it in a field that does not show it.
    #[arg(long, value_name = "VAR")]
    pub recovery_key_env: Option<String>,
}

#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Only records at or after T.
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only records at or before T.
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Only records from this network or address, IPv4 or IPv6 (203.0.113.0/24,
    /// 2001:db8::/32, 203.0.113.7).
    #[arg(long, value_name = "CIDR")]
    pub ip: Option<String>,
    /// Only records about this account.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Only records of these kinds, comma-separated (login_failed,ban,kick ...).
    #[arg(long, value_name = "K[,K..]", value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Keep printing records as they are written, until interrupted.
    #[arg(long, conflicts_with = "verify")]
    pub follow: bool,
    /// Print the records' stored JSON lines exactly (with --verify: the report as JSON).
    #[arg(long)]
    pub json: bool,
    /// Check every hash and link of the chain; exit non-zero if anything is wrong.
    #[arg(long)]
    pub verify: bool,
}
