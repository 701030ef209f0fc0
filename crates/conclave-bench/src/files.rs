//! `conclave bench --files SIZES`: file transfer throughput on loopback through the real
//! server process: the relay (upload, then download), peer to peer (QUIC), and a plain TLS 1.3
//! stream copy of the same file as the ceiling. Each transfer reads the source file and
//! writes (and syncs) the received one, as a real transfer does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conclave_client::proto::Target;
use conclave_client::{Auth, Client, ConnectOptions, FileOptions, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BenchError;
use crate::conclave_driver::{BENCH_PASSWORD, account};
use crate::net::{self, CertCheck};
use crate::server_proc::ServerProc;

/// Upper bound of one transfer.
const TRANSFER_LIMIT: Duration = Duration::from_secs(900);
/// Copy buffer of the TLS baseline.
const COPY_BUFFER: usize = 256 * 1024;

/// One size's figures, bytes per second.
#[derive(Debug, Clone)]
pub struct FileRow {
    pub size: u64,
    pub tls_copy: f64,
    pub relay_upload: f64,
    pub relay_download: f64,
    /// Size over upload plus download time: what a recipient sees end to end.
    pub relay_end_to_end: f64,
    pub p2p: f64,
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// "1M,100M,1G": sizes in bytes or with K, M or G (binary units), each above 0.
pub fn parse_sizes(text: &str) -> Result<Vec<u64>, BenchError> {
    text.split(',')
        .map(|s| match conclave_client::files::parse_size(s) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(BenchError::Usage(format!(
                "--files: {s:?} is not a size (write 1M, 100M, 1G or bytes)"
            ))),
        })
        .collect()
}

fn write_source(path: &Path, size: u64) -> Result<(), BenchError> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(setup)?);
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).map_err(setup)?;
        left -= n as u64;
    }
    f.flush().map_err(setup)
}

async fn connect(server: &ServerProc, i: usize, state: &Path) -> Result<Client, BenchError> {
    let auth = Auth::Login {
        user: account(i),
        password: BENCH_PASSWORD.to_string(),
        server_password: None,
    };
    let mut opts = ConnectOptions::new(server.addr.clone(), auth);
    opts.trust = Trust::fingerprint(&server.fingerprint).map_err(setup)?;
    opts.state_dir = Some(state.to_path_buf());
    opts.request_timeout = Duration::from_secs(120);
    let (client, mut events, _) = Client::connect(opts).await.map_err(setup)?;
    // Offers are remembered by the client; the events themselves are not needed here.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Ok(client)
}

/// The TLS baseline: a TLS 1.3 server (the server's own certificate kind and configuration)
/// sends the file; the client writes it to `dest` and syncs. Bytes per second.
async fn tls_copy(src: &Path, dest: &Path, work: &Path) -> Result<f64, BenchError> {
    let identity = conclave_server::tls::load_or_create(work).map_err(setup)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(
        conclave_server::tls::server_config(&identity).map_err(setup)?,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup)?;
    let addr = listener.local_addr().map_err(setup)?;
    let src = src.to_path_buf();
    let serve = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut file = tokio::fs::File::open(&src).await?;
        let mut buf = vec![0u8; COPY_BUFFER];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await?;
        }
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let config =
        net::tls_config(CertCheck::Fingerprint(identity.fingerprint.clone())).map_err(setup)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(setup)?;
    tcp.set_nodelay(true).map_err(setup)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(setup)?;
    let mut tls = connector.connect(name, tcp).await.map_err(setup)?;
    let mut out = tokio::fs::File::create(dest).await.map_err(setup)?;
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // The server's close_notify may race its TCP close.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(setup(e)),
        };
        out.write_all(&buf[..n]).await.map_err(setup)?;
        total += n as u64;
    }
    out.sync_all().await.map_err(setup)?;
    let secs = started.elapsed().as_secs_f64();
    serve.await.map_err(setup)?.map_err(setup)?;
    Ok(total as f64 / secs.max(1e-9))
}

/// Runs the file benchmark for each size and returns the figures.
pub async fn run(
    bin: PathBuf,
    sizes: &[u64],
    window: Option<u64>,
    pin: bool,
) -> Result<Vec<FileRow>, BenchError> {
    let work = tempfile::Builder::new()
        .prefix("conclave-bench-files-")
        .tempdir()
        .map_err(setup)?;
    let server = ServerProc::start(bin, 2, pin).await?;
    let result = run_on(&server, work.path(), sizes, window).await;
    server.stop().await;
    result
}

async fn run_on(
    server: &ServerProc,
    work: &Path,
    sizes: &[u64],
    window: Option<u64>,
) -> Result<Vec<FileRow>, BenchError> {
    let sender = connect(server, 0, work).await?;
    let receiver = connect(server, 1, work).await?;
    let to = || Target::Users {
        to: vec![account(1)],
    };
    let opts = FileOptions {
        window,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let src = work.join(format!("source-{i}.bin"));
        write_source(&src, size)?;
        let dest = work.join(format!("tls-{i}.bin"));
        let tls = tls_copy(&src, &dest, &work.join(format!("tls-id-{i}"))).await?;
        let _ = std::fs::remove_file(&dest);

        let sent = tokio::time::timeout(TRANSFER_LIMIT, sender.send_file(&src, to(), opts.clone()))
            .await
            .map_err(|_| setup("the relay upload took too long"))?
            .map_err(setup)?;
        let down = work.join(format!("relay-{i}"));
        std::fs::create_dir_all(&down).map_err(setup)?;
        let got = tokio::time::timeout(
            TRANSFER_LIMIT,
            receiver.accept_file(&sent.file_id, &down, opts.clone()),
        )
        .await
        .map_err(|_| setup("the relay download took too long"))?
        .map_err(setup)?;
        let _ = std::fs::remove_dir_all(&down);
        let end_to_end =
            size as f64 / (sent.elapsed.as_secs_f64() + got.elapsed.as_secs_f64()).max(1e-9);

        let p2p_opts = FileOptions {
            p2p: true,
            ..opts.clone()
        };
        let sending = {
            let sender = sender.clone();
            let src = src.clone();
            tokio::spawn(async move { sender.send_file_any(&src, to(), p2p_opts).await })
        };
        let file_id = wait_for_p2p_offer(&receiver).await?;
        let down = work.join(format!("p2p-{i}"));
        std::fs::create_dir_all(&down).map_err(setup)?;
        let direct = tokio::time::timeout(
            TRANSFER_LIMIT,
            receiver.accept_file(&file_id, &down, opts.clone()),
        )
        .await
        .map_err(|_| setup("the direct transfer took too long"))?
        .map_err(setup)?;
        let _ = std::fs::remove_dir_all(&down);
        let _ = tokio::time::timeout(TRANSFER_LIMIT, sending).await;
        if let Some(why) = &direct.fallback {
            return Err(setup(format!(
                "the direct transfer fell back to the relay: {why}"
            )));
        }
        let _ = std::fs::remove_file(&src);
        rows.push(FileRow {
            size,
            tls_copy: tls,
            relay_upload: sent.throughput,
            relay_download: got.throughput,
            relay_end_to_end: end_to_end,
            p2p: direct.throughput,
        });
    }
    Ok(rows)
}

/// The newest peer-to-peer offer the receiver has seen (bounded wait).
async fn wait_for_p2p_offer(receiver: &Client) -> Result<String, BenchError> {
    for _ in 0..600 {
        if let Ok(pending) = receiver.pending_files().await {
            for o in pending.iter().rev() {
                if let Some(offer) = receiver.offer(&o.file_id)
                    && offer.p2p.is_some()
                {
                    return Ok(offer.file_id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(setup("no peer-to-peer offer arrived"))
}

fn mib_s(bps: f64) -> String {
    format!("{:.0}", bps / (1024.0 * 1024.0))
}

fn human(size: u64) -> String {
    if size >= 1 << 30 && size.is_multiple_of(1 << 30) {
        format!("{} GiB", size >> 30)
    } else if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else {
        format!("{size} B")
    }
}

/// The human table (MiB/s).
pub fn table(rows: &[FileRow]) -> String {
    let mut out = String::from(
        "file transfer throughput on loopback, MiB/s\n\
         size      | TLS copy | relay up | relay down | relay end-to-end | P2P (QUIC)\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{:<9} | {:>8} | {:>8} | {:>10} | {:>16} | {:>10}\n",
            human(r.size),
            mib_s(r.tls_copy),
            mib_s(r.relay_upload),
            mib_s(r.relay_download),
            mib_s(r.relay_end_to_end),
            mib_s(r.p2p)
        ));
    }
    out
}

/// One JSON object per size.
pub fn json(rows: &[FileRow]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"size\":{},\"tls_copy_bps\":{:.0},\"relay_upload_bps\":{:.0},\"relay_download_bps\":{:.0},\"relay_end_to_end_bps\":{:.0},\"p2p_bps\":{:.0}}}",
                r.size, r.tls_copy, r.relay_upload, r.relay_download, r.relay_end_to_end, r.p2p
            )
        })
        .collect();
    format!("{{\"files\":[{}]}}", items.join(","))
}
