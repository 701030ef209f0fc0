//! Measures direct-transfer throughput against the window size and the number of recipients,
//! on plain loopback and through an impaired path (delay and loss, see `conclave_p2p::impair`).
//!
//! ```text
//! cargo run --release -p conclave-p2p --example window -- \
//!     [--size MiB] [--delay-ms 20] [--loss 0.01] [--windows 64K,256K,1M,4M,16M] \
//!     [--recipients 1,3,10] [--congestion cubic,bbr] [--seed N] [--timeout-s 300]
//! ```
//!
//! Sender, receivers and the impairer share one process (and here two cores), so the figures
//! include their CPU contention. Every transfer is bounded by `--timeout-s`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conclave_p2p::impair::{ImpairStats, ImpairedPath};
use conclave_p2p::{Congestion, FetchRequest, FetchStats, P2pSender, SenderLimits, Window, fetch};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
/// Recipients in one run at most (each gets a token and a part file).
const MAX_RECIPIENTS: usize = 64;
/// Window sizes in one run at most.
const MAX_WINDOWS: usize = 16;

struct Args {
    size_mib: u64,
    delay: Duration,
    loss: f64,
    windows: Vec<u64>,
    recipients: Vec<usize>,
    congestion: Vec<Congestion>,
    seed: u64,
    timeout: Duration,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], MIB),
        Some('G' | 'g') => (&s[..s.len() - 1], 1024 * MIB),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("{s:?} is not a size like 64K or 4M: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size_mib: 32,
        delay: Duration::from_millis(20),
        loss: 0.01,
        windows: ["64K", "256K", "1M", "4M", "16M"]
            .iter()
            .map(|w| parse_bytes(w))
            .collect::<Result<_, _>>()?,
        recipients: vec![1, 3, 10],
        congestion: vec![Congestion::Cubic, Congestion::Bbr],
        seed: 1,
        timeout: Duration::from_secs(300),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--size" => args.size_mib = value.parse().map_err(|e| bad(&e))?,
            "--delay-ms" => args.delay = Duration::from_millis(value.parse().map_err(|e| bad(&e))?),
            "--loss" => args.loss = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--timeout-s" => {
                args.timeout = Duration::from_secs(value.parse().map_err(|e| bad(&e))?)
            }
            "--windows" => {
                args.windows = value
                    .split(',')
                    .map(parse_bytes)
                    .collect::<Result<_, _>>()?
            }
            "--recipients" => {
                args.recipients = value
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--congestion" => {
                args.congestion = value
                    .split(',')
                    .map(|c| {
                        Congestion::parse(c)
                            .ok_or_else(|| format!("{c:?} is not cubic, newreno or bbr"))
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other}; see the example's header")),
        }
    }
    if args.windows.len() > MAX_WINDOWS {
        return Err(format!("at most {MAX_WINDOWS} windows"));
    }
    if args
        .recipients
        .iter()
        .any(|&n| n == 0 || n > MAX_RECIPIENTS)
    {
        return Err(format!("recipients must be 1 to {MAX_RECIPIENTS}"));
    }
    if args.size_mib == 0 {
        return Err("--size must be at least 1 MiB".to_string());
    }
    Ok(args)
}

/// Writes `size` random bytes, returning their SHA-256.
fn make_file(path: &Path, size: u64, seed: u64) -> std::io::Result<[u8; 32]> {
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(hasher.finalize().into())
}

struct Offer {
    dir: PathBuf,
    path: PathBuf,
    size: u64,
    sha256: [u8; 32],
}

/// How the recipients reach the sender.
#[derive(Clone, Copy)]
enum Route {
    Loopback,
    Impaired {
        delay: Duration,
        loss: f64,
        seed: u64,
    },
}

impl Route {
    fn name(&self) -> String {
        match self {
            Route::Loopback => "loopback".to_string(),
            Route::Impaired { delay, loss, .. } => {
                format!("{} ms, {:.1}% loss", delay.as_millis(), loss * 100.0)
            }
        }
    }
}

/// One measurement: the per-fetch statistics, the wall time, and what the path did.
struct Run {
    fetches: Vec<FetchStats>,
    wall: Duration,
    impaired: Option<ImpairStats>,
    /// UDP datagrams the kernel dropped for want of socket buffer during the run, machine-wide
    /// (Linux `/proc/net/snmp` RcvbufErrors), if readable.
    kernel_drops: Option<u64>,
}

/// The machine's count of UDP datagrams dropped on full receive buffers.
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

async fn measure(
    offer: &Offer,
    window: Window,
    route: Route,
    recipients: usize,
    parallel: bool,
    limit: Duration,
) -> Result<Run, String> {
    let sender = P2pSender::start(
        &offer.path,
        offer.size,
        offer.sha256,
        (Ipv4Addr::LOCALHOST, 0).into(),
        window,
        SenderLimits {
            max_peers: MAX_RECIPIENTS,
            ..SenderLimits::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let target = sender.local_addr().map_err(|e| e.to_string())?;
    let path = match route {
        Route::Loopback => None,
        Route::Impaired { delay, loss, seed } => Some(
            ImpairedPath::start(target, delay, loss, seed)
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    let addr: SocketAddr = path.as_ref().map_or(target, |p| p.local_addr());
    let mut requests = Vec::new();
    for i in 0..recipients {
        let mut token = [0u8; 32];
        rand::rng().fill_bytes(&mut token);
        sender
            .allow(token, format!("r{i}"))
            .map_err(|e| e.to_string())?;
        let dest_part = offer.dir.join(format!("r{i}.part"));
        let _ = std::fs::remove_file(&dest_part);
        requests.push(FetchRequest {
            addrs: vec![addr],
            fingerprint: sender.fingerprint(),
            token,
            size: offer.size,
            sha256: offer.sha256,
            dest_part,
            window,
            connect_timeout: Duration::from_secs(5),
        });
    }
    let parts: Vec<PathBuf> = requests.iter().map(|r| r.dest_part.clone()).collect();
    let drops_before = udp_rcvbuf_errors();
    let started = Instant::now();
    let mut fetches = Vec::new();
    if parallel {
        let mut tasks = tokio::task::JoinSet::new();
        for req in requests {
            tasks.spawn(tokio::time::timeout(limit, fetch(req, |_, _| {})));
        }
        while let Some(done) = tasks.join_next().await {
            let stats = done
                .map_err(|e| e.to_string())?
                .map_err(|_| format!("a transfer took over {limit:?}"))?
                .map_err(|e| e.to_string())?;
            fetches.push(stats);
        }
    } else {
        for req in requests {
            let stats = tokio::time::timeout(limit, fetch(req, |_, _| {}))
                .await
                .map_err(|_| format!("a transfer took over {limit:?}"))?
                .map_err(|e| e.to_string())?;
            fetches.push(stats);
        }
    }
    let wall = started.elapsed();
    for part in parts {
        let _ = std::fs::remove_file(part);
    }
    let kernel_drops = drops_before
        .zip(udp_rcvbuf_errors())
        .map(|(before, after)| after.saturating_sub(before));
    Ok(Run {
        fetches,
        wall,
        impaired: path.as_ref().map(|p| p.stats()),
        kernel_drops,
    })
}

fn mb_s(bytes: f64, secs: f64) -> f64 {
    if secs > 0.0 { bytes / secs / 1e6 } else { 0.0 }
}

fn human(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// Kernel drops summed over runs, or "-" when unknown.
fn drops(runs: &[&Run]) -> String {
    runs.iter()
        .map(|r| r.kernel_drops)
        .sum::<Option<u64>>()
        .map_or("-".to_string(), |d| d.to_string())
}

fn loss_seen(stats: Option<ImpairStats>) -> String {
    match stats {
        Some(s) if s.forwarded + s.dropped_loss > 0 => format!(
            "{:.2}%",
            100.0 * s.dropped_loss as f64 / (s.forwarded + s.dropped_loss + s.dropped_queue) as f64
        ),
        _ => "-".to_string(),
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("window: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("window: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("offered.bin");
    let size = args.size_mib * MIB;
    let sha256 = make_file(&path, size, args.seed).map_err(|e| e.to_string())?;
    let offer = Offer {
        dir: dir.path().to_path_buf(),
        path,
        size,
        sha256,
    };
    let impaired = Route::Impaired {
        delay: args.delay,
        loss: args.loss,
        seed: args.seed,
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "file {} MiB, impaired path {} one-way ({} ms round trip), seed {}, {cores} cores\n",
        args.size_mib,
        impaired.name(),
        2 * args.delay.as_millis(),
        args.seed
    );

    println!("## Throughput against the window (one recipient)\n");
    println!(
        "| window | congestion | loopback MB/s | delay only MB/s | impaired MB/s | loss seen | kernel drops | window / RTT bound MB/s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let delay_only = Route::Impaired {
        delay: args.delay,
        loss: 0.0,
        seed: args.seed,
    };
    for &cc in &args.congestion {
        for &w in &args.windows {
            let window = Window::uniform(w).with_congestion(cc);
            window.validate().map_err(|e| e.to_string())?;
            let base = measure(&offer, window, Route::Loopback, 1, true, args.timeout).await?;
            let slow = measure(&offer, window, delay_only, 1, true, args.timeout).await?;
            let imp = measure(&offer, window, impaired, 1, true, args.timeout).await?;
            let rtt = 2.0 * args.delay.as_secs_f64();
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} |",
                human(w),
                cc.name(),
                base.fetches[0].throughput_bytes_per_sec / 1e6,
                slow.fetches[0].throughput_bytes_per_sec / 1e6,
                imp.fetches[0].throughput_bytes_per_sec / 1e6,
                loss_seen(imp.impaired),
                drops(&[&base, &slow, &imp]),
                mb_s(w as f64, rtt)
            );
        }
    }

    println!(
        "\n## One sender, several recipients: parallel against sequential (window {})\n",
        human(Window::default().stream_receive_window)
    );
    println!(
        "| recipients | congestion | path | parallel wall s | parallel total MB/s | slowest recipient MB/s | sequential wall s | sequential total MB/s | kernel drops |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|");
    let mut cases = Vec::new();
    for &cc in &args.congestion {
        for &n in &args.recipients {
            cases.push((cc, n, Route::Loopback));
            cases.push((cc, n, impaired));
        }
    }
    for (cc, n, route) in cases {
        let window = Window::default().with_congestion(cc);
        {
            let par = measure(&offer, window, route, n, true, args.timeout).await?;
            let seq = measure(&offer, window, route, n, false, args.timeout).await?;
            let total = (n as u64 * size) as f64;
            let slowest = par
                .fetches
                .iter()
                .map(|f| f.throughput_bytes_per_sec)
                .fold(f64::INFINITY, f64::min);
            println!(
                "| {n} | {} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
                cc.name(),
                route.name(),
                par.wall.as_secs_f64(),
                mb_s(total, par.wall.as_secs_f64()),
                slowest / 1e6,
                seq.wall.as_secs_f64(),
                mb_s(total, seq.wall.as_secs_f64()),
                drops(&[&par, &seq]),
            );
        }
    }
    Ok(())
}
