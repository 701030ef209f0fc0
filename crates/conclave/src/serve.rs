//! `conclave serve`, `conclave fingerprint` and `conclave client`.

use std::process::ExitCode;

use anyhow::{Context, bail};
use conclave_server::config::parse_listen;
use conclave_server::{Config, RegistrationPolicy, Server, tls};

use crate::cli::{ClientArgs, DataDirArg, ServeArgs};

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONCLAVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Large allocations go straight back to the OS when freed. Without this, glibc raises its
/// mmap threshold after the first Argon2id buffer (19 MiB) is freed, and from then on keeps
/// those buffers in per-thread arenas: measured, 100+ KiB of resident memory per connection
/// instead of 20.
fn return_large_allocations_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called once before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    return_large_allocations_to_the_os();
    init_logging("info");
    let mut config = Config::load(&args.data.data_dir, args.config.as_deref())?;
    if let Some(listen) = &args.listen {
        config.listen = parse_listen(listen)?;
    }
    if args.config.is_some() {
        config.config_file = args.config.clone();
    }
    if let Some(policy) = &args.registration {
        config.registration_from_cli = true;
        config.registration = match policy.as_str() {
            "auto" => RegistrationPolicy::Auto,
            "open" => RegistrationPolicy::Open,
            "invite" => RegistrationPolicy::Invite,
            "closed" => RegistrationPolicy::Closed,
            other => bail!("--registration {other:?}: choose auto, open, invite or closed"),
        };
    }
    if let Some(var) = &args.server_password_env {
        let pw = std::env::var(var).with_context(|| {
            format!("environment variable {var} (from --server-password-env) is not set")
        })?;
        if pw.is_empty() {
            bail!("the server password in {var} is empty");
        }
        config.server_password = Some(pw);
    }
    if let Some(var) = &args.data_key_env {
        config.data_key_passphrase = Some(read_passphrase(var)?);
    }
    if let Some(m) = &args.metrics_listen {
        config.metrics.listen = Some(match m.parse::<u16>() {
            Ok(port) => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => parse_listen(m).context("--metrics-listen")?,
        });
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls.cert_file = Some(cert.clone());
        config.tls.key_file = Some(key.clone());
        config.tls_from_cli = true;
    }
    if let Some(store) = &args.store {
        config.cluster.store = Some(store.clone());
    }
    if let Some(bus) = &args.bus {
        config.cluster.bus = Some(bus.clone());
    }
    if let Some(node) = &args.node {
        config.cluster.node = Some(node.clone());
    }
    let rt = runtime()?;
    rt.block_on(async move {
        // Listen for signals before anything is announced: a SIGTERM right after the banner
        // must already mean a graceful stop.
        let signals = Signals::new()?;
        let server = Server::bind(config.clone()).await?;
        let addr = server.local_addr();
        let fp = server.fingerprint().to_string();
        if server.identity_created() {
            println!("Created a new TLS key and certificate in {}", config.data_dir.display());
        }
        println!("Conclave {} serving on {addr} (data: {})", env!("CARGO_PKG_VERSION"), config.data_dir.display());
        if conclave_server::store::SYNCHRONOUS != "FULL" {
            println!("WARNING: a benchmark build (bench-no-sync): messages are NOT synced to disk before delivery; never serve from it");
        }
        println!("TLS certificate SHA-256: {}", tls::display_fingerprint(&fp));
        if let Some(c) = server.cluster() {
            println!("Cluster node {} (store: PostgreSQL{})", c.node, if c.bus { ", bus: NATS" } else { ", no bus: one node" });
        }
        if let Some(m) = server.metrics_addr() {
            println!("Metrics: http://{m}/metrics");
        }
        let reg = server.registration();
        println!(
            "Registration: {}{}",
            reg.as_str(),
            match (config.registration, reg) {
                (RegistrationPolicy::Auto, RegistrationPolicy::Open) => " (auto: open because the server listens on loopback only)",
                (RegistrationPolicy::Auto, _) => " (auto: closed because the server listens beyond loopback; create accounts with `conclave user add`)",
                _ => "",
            }
        );
        let host = if addr.ip().is_unspecified() { "HOST".to_string() } else { addr.ip().to_string() };
        let server_arg = if addr.is_ipv6() { format!("[{host}]:{}", addr.port()) } else { format!("{host}:{}", addr.port()) };
        let register = if reg == RegistrationPolicy::Open { " --register" } else { "" };
        if config.web.enabled {
            let web_host = if addr.ip().is_unspecified() { "HOST".to_string() } else if addr.ip().is_loopback() { "localhost".to_string() } else { addr.ip().to_string() };
            let web_host = if addr.is_ipv6() && web_host != "HOST" && web_host != "localhost" { format!("[{web_host}]") } else { web_host };
            println!("Web client: https://{web_host}:{}/ (bundle SHA-256 {})", addr.port(), conclave_server::web::assets::bundle_sha256());
            if !conclave_server::web::assets::built() {
                println!("  (not built into this binary: install Node.js and build again to serve it)");
            }
        }
        println!("Connect a client:");
        println!("  conclave client --json --server {server_arg} --user YOUR_NAME{register} --fingerprint {fp}");
        println!("Stop with Ctrl-C.");
        let token = server.shutdown_token();
        let reloader = server.reloader();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match reloader.reload().await {
                            Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
                            Err(e) => tracing::error!(
                                error = %e,
                                "SIGHUP: reload failed; the previous configuration stays in force"
                            ),
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; use `conclave admin reload`"),
        }
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("signal received; shutting down");
            token.cancel();
        });
        server.run().await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Reads a data-key passphrase from the environment variable `var`.
pub fn read_passphrase(var: &str) -> anyhow::Result<String> {
    let p = std::env::var(var)
        .with_context(|| format!("environment variable {var} (from --data-key-env) is not set"))?;
    if p.chars().count() < 12 {
        bail!("the data key passphrase in {var} is too short: use at least 12 characters");
    }
    Ok(p)
}

/// SIGINT and SIGTERM, registered up front.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

pub fn fingerprint(args: DataDirArg) -> anyhow::Result<ExitCode> {
    let cert = args.data_dir.join(tls::TLS_DIR).join(tls::CERT_FILE);
    if !cert.exists() {
        bail!(
            "no certificate in {} yet; start the server once (conclave serve --data-dir {}) to create it",
            args.data_dir.display(),
            args.data_dir.display()
        );
    }
    println!("{}", tls::cert_file_fingerprint(&cert)?);
    Ok(ExitCode::SUCCESS)
}

pub fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    init_logging("warn");
    if !args.json {
        bail!(
            "only the JSON client exists so far: pass --json (the terminal UI, conclave chat, is coming)"
        );
    }
    crate::client::run_json(args)
}
