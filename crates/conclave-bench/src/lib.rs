//! `conclave bench`: a load generator for Conclave (and, for comparison, IRC servers) and its
//! report.
//!
//! A run opens N TLS clients, puts them in R rooms, lets S of them send M messages each (at
//! full speed or at a rate), and measures: connections per second; deliveries per second;
//! latency from send to receipt (each message carries its send time, and one process both
//! sends and receives, so one monotonic clock serves both ends); errors and disconnects; and,
//! given the server's process, its CPU time per delivery and its memory per connection.
//! Without `--server` it starts the real `conclave serve` itself, pinned to CPU 0, and runs its
//! own runtime on the other CPUs.
//!
//! Map:
//! - [`args`]: the flags; [`preset`]: named workloads and the resolved [`Scenario`].
//! - [`run`]: the run's shared state (deadline, counters, phase marks), pacing, waiting.
//! - [`conclave_driver`]: Conclave through the client library (traffic) or a raw minimal
//!   client (idle connections); [`irc_driver`]: the same workloads over IRC.
//! - [`server_proc`]: the server bench starts itself, and benchmark accounts.
//! - [`wire_view`]: a zero-copy read of message events, for receivers.
//! - [`measure`]: timestamps, latency histograms, `/proc` accounting; [`net`]: sockets, TLS,
//!   process limits; [`report`]: table and JSON.
//!
//! Every wait is bounded: each phase by its own timeout and all of them by `--timeout`; when
//! time runs out the report says what was measured and that it is partial.

pub mod args;
pub mod conclave_driver;
pub mod disk;
pub mod files;
pub mod irc_driver;
pub mod measure;
pub mod net;
pub mod preset;
pub mod report;
pub mod run;
pub mod server_proc;
pub mod stamped;
pub mod wire_view;

use std::sync::Arc;
use std::time::Duration;

pub use args::{BENCH_HELP, BenchArgs};
pub use preset::{Preset, Scenario};
pub use report::Report;

use conclave_driver::ConclaveTarget;
use irc_driver::IrcTarget;
use net::CertCheck;
use report::ServerInfo;
use run::Ctx;
use server_proc::ServerProc;

/// Extra time past the run's deadline for the drivers to hand back what they measured.
const WIND_DOWN: Duration = Duration::from_secs(30);
/// Open files wanted beyond one per client (the runtime, the server's data files, ...).
const SPARE_FILES: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Setup(String),
}

/// Runs a benchmark from the command line: pins this process away from CPU 0 (where the
/// server runs), builds the runtime, runs, prints the report. The exit code is failure when
/// the run had errors or did not finish.
pub fn run(args: BenchArgs) -> Result<std::process::ExitCode, BenchError> {
    let cpus = net::cpu_count();
    let pin = !args.no_pin && cpus >= 2;
    let generator_cpus: Vec<usize> = if pin {
        (1..cpus).collect()
    } else {
        (0..cpus).collect()
    };
    let pinned = pin && net::pin_current_thread(&generator_cpus);
    let workers = if pinned { generator_cpus.len() } else { cpus };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| BenchError::Setup(format!("cannot start the async runtime: {e}")))?;
    let json = args.json;
    if let Some(sizes) = &args.files {
        let sizes = files::parse_sizes(sizes)?;
        let bin = std::env::current_exe()
            .map_err(|e| BenchError::Setup(format!("cannot find the conclave binary: {e}")))?;
        let rows = rt.block_on(files::run(bin, &sizes, args.file_window, pin))?;
        if json {
            println!("{}", files::json(&rows));
        } else {
            print!("{}", files::table(&rows));
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if args.sync_floor {
        let floor = disk::sync_floor(&std::env::temp_dir(), disk::SAMPLES)?;
        if json {
            println!("{}", floor.to_json());
        } else {
            print!("{}", floor.to_table());
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let report = rt.block_on(bench(args, workers))?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(if report.complete && report.errors == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Runs one benchmark on the current runtime and returns its report. `generator_cpus` is the
/// number of CPUs this process runs on (for its CPU use figure).
pub async fn bench(args: BenchArgs, generator_cpus: usize) -> Result<Report, BenchError> {
    let scn = Scenario::from_args(&args)?;
    let mut notes = Vec::new();
    let files = net::raise_nofile(scn.clients as u64 + SPARE_FILES);
    if files < scn.clients as u64 + 64 {
        notes.push(format!(
            "the open-file limit is {files}: not enough for {} connections (raise it with ulimit -n)",
            scn.clients
        ));
    }
    let state = tempfile::Builder::new()
        .prefix("conclave-bench-client-")
        .tempdir()
        .map_err(|e| BenchError::Setup(format!("cannot make a temporary directory: {e}")))?;

    let mut started: Option<ServerProc> = None;
    let report = if args.irc {
        let server = args.server.clone().unwrap_or_default();
        let addr = tokio::net::lookup_host(&server)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| BenchError::Usage(format!("cannot resolve --server {server}")))?;
        let check = match (&args.fingerprint, args.insecure) {
            (Some(fp), _) => {
                CertCheck::Fingerprint(net::normalize_fingerprint(fp).ok_or_else(|| {
                    BenchError::Usage("--fingerprint must be 64 hex digits (SHA-256)".into())
                })?)
            }
            (None, true) if addr.ip().is_loopback() => CertCheck::AnyOnLoopback,
            (None, true) => {
                return Err(BenchError::Usage(
                    "--insecure is only for a server on loopback; pass --fingerprint".into(),
                ));
            }
            (None, false) => {
                return Err(BenchError::Usage(
                    "pass the IRC server certificate's --fingerprint (openssl x509 -noout -fingerprint -sha256 -in CERT), or --insecure for loopback".into(),
                ));
            }
        };
        let tls = net::tls_config(check.clone())
            .map_err(|e| BenchError::Setup(format!("TLS configuration: {e}")))?;
        let info = ServerInfo {
            kind: "irc".into(),
            label: args.label.clone().unwrap_or_else(|| "IRC server".into()),
            address: server,
            pid: args.server_pid,
            started_by_bench: false,
            pinned_to_cpu0: false,
            relaxed: Vec::new(),
            accounts: format!(
                "nicks b0..b{} (NICK/USER); certificate {}",
                scn.clients.saturating_sub(1),
                match check {
                    CertCheck::Fingerprint(_) => "pinned by fingerprint",
                    CertCheck::AnyOnLoopback => "not checked (--insecure, loopback)",
                }
            ),
        };
        let ctx = Arc::new(Ctx::new(scn, args.server_pid));
        let target = Arc::new(IrcTarget {
            addr,
            tls: tokio_rustls::TlsConnector::from(tls),
        });
        drive(ctx.clone(), irc_driver::run(ctx.clone(), target)).await;
        Report::build(&ctx, Some(info), generator_cpus)
    } else {
        let (target, info, pid) = match &args.server {
            Some(server) => {
                let fp = args.fingerprint.as_deref().ok_or_else(|| {
                    BenchError::Usage(
                        "pass the server's --fingerprint (`conclave fingerprint --data-dir D` prints it)"
                            .into(),
                    )
                })?;
                let fingerprint = net::normalize_fingerprint(fp).ok_or_else(|| {
                    BenchError::Usage("--fingerprint must be 64 hex digits (SHA-256)".into())
                })?;
                let accounts = match &args.data_dir {
                    Some(dir) => {
                        let (d, n) = (dir.clone(), scn.clients);
                        tokio::task::spawn_blocking(move || server_proc::create_accounts(&d, n))
                            .await
                            .map_err(|e| BenchError::Setup(format!("account creation: {e}")))??;
                        format!(
                            "bench0..bench{} created on {} (Argon2id at minimum cost)",
                            scn.clients.saturating_sub(1),
                            dir.display()
                        )
                    }
                    None => format!(
                        "bench0..bench{} registered over the wire (or logged in if they exist)",
                        scn.clients.saturating_sub(1)
                    ),
                };
                let info = ServerInfo {
                    kind: "conclave".into(),
                    label: args.label.clone().unwrap_or_else(|| "Conclave".into()),
                    address: server.clone(),
                    pid: args.server_pid,
                    started_by_bench: false,
                    pinned_to_cpu0: false,
                    relaxed: Vec::new(),
                    accounts,
                };
                let target = ConclaveTarget {
                    server: server.clone(),
                    fingerprint,
                    register: args.data_dir.is_none(),
                    state_dir: state.path().to_path_buf(),
                    full_clients: args.full_clients,
                    classical_kx: args.classical_kx,
                };
                (target, info, args.server_pid)
            }
            None => {
                let bin = match &args.server_bin {
                    Some(b) => b.clone(),
                    None => std::env::current_exe().map_err(|e| {
                        BenchError::Setup(format!("cannot find the conclave binary: {e}"))
                    })?,
                };
                let proc = ServerProc::start(bin, scn.clients, !args.no_pin).await?;
                let info = ServerInfo {
                    kind: "conclave".into(),
                    label: args
                        .label
                        .clone()
                        .unwrap_or_else(|| format!("Conclave {}", env!("CARGO_PKG_VERSION"))),
                    address: proc.addr.clone(),
                    pid: Some(proc.pid),
                    started_by_bench: true,
                    pinned_to_cpu0: proc.pinned,
                    relaxed: server_proc::RELAXED
                        .iter()
                        .map(|(k, v, why)| format!("{k} = {v} ({why})"))
                        .collect(),
                    accounts: format!(
                        "bench0..bench{} created on the data directory (Argon2id at minimum cost: logins measure connection handling, not password hashing)",
                        scn.clients.saturating_sub(1)
                    ),
                };
                let target = ConclaveTarget {
                    server: proc.addr.clone(),
                    fingerprint: proc.fingerprint.clone(),
                    register: false,
                    state_dir: state.path().to_path_buf(),
                    full_clients: args.full_clients,
                    classical_kx: args.classical_kx,
                };
                let pid = Some(proc.pid);
                started = Some(proc);
                (target, info, pid)
            }
        };
        let ctx = Arc::new(Ctx::new(scn, pid));
        drive(
            ctx.clone(),
            conclave_driver::run(ctx.clone(), Arc::new(target)),
        )
        .await;
        Report::build(&ctx, Some(info), generator_cpus)
    };
    let mut report = report;
    report.notes.extend(notes);
    if let Some(p) = started {
        if report.errors > 0 {
            // Keep the log readable after the temporary directory goes.
            if let Ok(text) = std::fs::read_to_string(p.log_path()) {
                for line in text.lines().rev().take(5) {
                    report.notes.push(format!("server log: {line}"));
                }
            }
        }
        p.stop().await;
    }
    Ok(report)
}

/// Runs a driver, bounded by the run's deadline plus a wind-down, or until Ctrl-C; either way
/// the run stops, the server bench started is stopped, and the report shows what was measured.
async fn drive(ctx: Arc<Ctx>, driver: impl std::future::Future<Output = ()>) {
    let bound = ctx.deadline + WIND_DOWN;
    tokio::select! {
        done = tokio::time::timeout_at(bound, driver) => {
            if done.is_err() {
                ctx.counters
                    .error("the run did not wind down in time; figures are partial");
            }
        }
        _ = tokio::signal::ctrl_c() => ctx.counters.error("interrupted (Ctrl-C); figures are partial"),
    }
    // Cut short during the traffic: close its window so rates and CPU cover what happened
    // (latencies stay with the receivers that were stopped).
    if ctx.mark_of(run::Phase::TrafficStart).is_some()
        && ctx.mark_of(run::Phase::TrafficEnd).is_none()
    {
        ctx.mark(run::Phase::TrafficEnd);
    }
    ctx.stop.cancel();
}
