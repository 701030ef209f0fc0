//! A TCP forwarder for tests: listens on an ephemeral loopback port and forwards every
//! connection to a target address, adding a one-way delay with jitter in both directions.
//! It can hold every byte (`stall`), close every current connection abruptly (`cut_all`), and
//! counts connections.
//!
//! Each direction of a connection is a reader thread and a writer thread joined by a bounded
//! channel of chunks. The reader stamps each chunk with its release time,
//! `max(arrival + delay + jitter, previous release)`, so bytes keep their order; the writer
//! sleeps until then. Jitter comes from a seeded generator (one stream per direction, derived
//! from the relay's seed and the connection's number), so a run replays. Everything is
//! bounded: [`CHUNK`] bytes per read, [`QUEUE_CHUNKS`] chunks per direction (a full queue
//! stops the reader, which is TCP back-pressure on the sender), [`MAX_CONNECTIONS`] at once.
//! Dropping the relay cuts every connection and joins every thread.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Bytes read at once.
pub const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction (so at most `CHUNK * QUEUE_CHUNKS` bytes held per direction).
pub const QUEUE_CHUNKS: usize = 64;
/// Connections forwarded at once; more are refused (closed at once).
pub const MAX_CONNECTIONS: usize = 256;
/// Connecting to the target gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a stalled writer looks again, and a waiting writer checks for the end.
const TICK: Duration = Duration::from_millis(1);
/// Threads still running this long after the drop began are left to end by themselves.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A small deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        assert!(!items.is_empty(), "Rng::pick of an empty slice");
        &items[self.below(items.len() as u64) as usize]
    }
}

/// How the relay delays bytes.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// One-way delay added to every chunk, in each direction.
    pub delay: Duration,
    /// Up to this much more, uniformly at random, per chunk.
    pub jitter: Duration,
    /// Seed of the jitter.
    pub seed: u64,
}

impl RelayConfig {
    /// `ms` milliseconds one way (fractions allowed), with up to half of it again as jitter.
    pub fn delay_ms(ms: f64, seed: u64) -> RelayConfig {
        let delay = Duration::from_secs_f64(ms.max(0.0) / 1000.0);
        RelayConfig {
            delay,
            jitter: delay / 2,
            seed,
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    stalled: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Live connections: number → (client side, target side).
    live: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    /// Threads of the connections, joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, Vec<(u64, TcpStream, TcpStream)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running relay; see the module documentation.
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    config: RelayConfig,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards to `target`.
    pub fn start(target: SocketAddr, config: RelayConfig) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("relay: local address");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(listener, target, config, s))
            .expect("relay: spawn the acceptor");
        Relay {
            addr,
            target,
            config,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `ms` milliseconds one way (see [`RelayConfig::delay_ms`]) to `target` (`host:port`).
    pub fn to(target: &str, ms: f64, seed: u64) -> Relay {
        let target = target
            .parse()
            .unwrap_or_else(|e| panic!("relay target {target:?}: {e}"));
        Relay::start(target, RelayConfig::delay_ms(ms, seed))
    }

    /// Where clients connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn config(&self) -> RelayConfig {
        self.config
    }

    /// Holds every byte (in both directions, of every connection) while `true`; what arrives
    /// meanwhile is queued (bounded; then TCP back-pressure) and released, in order, after.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Closes every current connection abruptly (a reset where the kernel allows it), on both
    /// sides. New connections are forwarded as before.
    pub fn cut_all(&self) -> usize {
        let conns: Vec<_> = self.shared.live().drain(..).collect();
        let n = conns.len();
        for (_, a, b) in conns {
            cut(&a);
            cut(&b);
        }
        n
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused (the target was down, or too many at once).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.live().len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT);
        // One deadline for every thread (left running past it, they end by themselves).
        let deadline = Instant::now() + JOIN_TIMEOUT;
        if let Some(t) = self.acceptor.take() {
            join_bounded(t, deadline);
        }
        self.cut_all();
        let threads: Vec<_> = self
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            join_bounded(t, deadline);
        }
    }
}

fn join_bounded(t: JoinHandle<()>, deadline: Instant) {
    while !t.is_finished() && Instant::now() < deadline {
        thread::sleep(TICK);
    }
    if t.is_finished() {
        let _ = t.join();
    }
}

/// Ends a socket at once: no lingering (so the last close sends a reset), both directions
/// shut (which wakes the threads blocked on it).
fn cut(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a properly sized `linger`.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}

fn accept_loop(listener: TcpListener, target: SocketAddr, config: RelayConfig, s: Arc<Shared>) {
    let mut number = 0u64;
    for conn in listener.incoming() {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        number += 1;
        // Finished threads are joined as we go, so the list stays bounded.
        s.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| !t.is_finished());
        if s.live().len() >= MAX_CONNECTIONS {
            s.refused.fetch_add(1, Ordering::SeqCst);
            cut(&client);
            continue;
        }
        let server = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
            Ok(server) => server,
            Err(_) => {
                s.refused.fetch_add(1, Ordering::SeqCst);
                cut(&client);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if let Err(e) = forward(number, client, server, config, &s) {
            eprintln!("relay: connection {number} not forwarded: {e}");
            continue;
        }
        s.accepted.fetch_add(1, Ordering::SeqCst);
    }
}

/// Starts the four threads of one connection.
fn forward(
    number: u64,
    client: TcpStream,
    server: TcpStream,
    config: RelayConfig,
    s: &Arc<Shared>,
) -> std::io::Result<()> {
    let up = (client.try_clone()?, server.try_clone()?);
    let down = (server.try_clone()?, client.try_clone()?);
    s.live().push((number, client, server));
    // Writers that have ended; the second one takes the connection off the list.
    let ended = Arc::new(AtomicU64::new(0));
    let mut threads = s.threads.lock().unwrap_or_else(|e| e.into_inner());
    for (i, (from, to)) in [up, down].into_iter().enumerate() {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CHUNKS);
        let seed = config.seed ^ number.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i as u64 + 1);
        let (sr, sw, ended) = (s.clone(), s.clone(), ended.clone());
        threads.push(
            thread::Builder::new()
                .name(format!("relay-{number}-{i}-r"))
                .spawn(move || read_side(from, tx, config, Rng::new(seed), number, &sr))?,
        );
        threads.push(
            thread::Builder::new()
                .name(format!("relay-{number}-{i}-w"))
                .spawn(move || {
                    let graceful = write_side(to, rx, &sw);
                    let both = ended.fetch_add(1, Ordering::SeqCst) == 1;
                    if !graceful || both {
                        drop_conn(&sw, number, !graceful);
                    }
                })?,
        );
    }
    Ok(())
}

/// Takes a connection off the list; `abrupt`: cuts both of its sockets.
fn drop_conn(s: &Shared, number: u64, abrupt: bool) {
    let mut live = s.live();
    if let Some(i) = live.iter().position(|(n, _, _)| *n == number) {
        let (_, a, b) = live.remove(i);
        drop(live);
        if abrupt {
            cut(&a);
            cut(&b);
        }
    }
}

/// What travels from a reader to its writer, with the moment to release it.
enum Data {
    Bytes(Vec<u8>),
    /// The sender finished (a clean end of stream).
    End,
}

type Item = (Instant, Data);

fn jittered(config: &RelayConfig, rng: &mut Rng) -> Duration {
    let extra = if config.jitter.is_zero() {
        Duration::ZERO
    } else {
        config.jitter.mul_f64(rng.unit())
    };
    config.delay + extra
}

fn read_side(
    mut from: TcpStream,
    tx: SyncSender<Item>,
    config: RelayConfig,
    mut rng: Rng,
    number: u64,
    s: &Shared,
) {
    let mut last = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let data = match from.read(&mut buf) {
            Ok(0) => Data::End,
            Ok(n) => Data::Bytes(buf[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                // A reset or a cut: the whole connection goes at once.
                drop_conn(s, number, true);
                return;
            }
        };
        let at = (Instant::now() + jittered(&config, &mut rng)).max(last);
        last = at;
        let end = matches!(data, Data::End);
        if tx.send((at, data)).is_err() || end || s.stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Writes what its reader passes on, each chunk at its time; `true` when it ended cleanly
/// (the end of stream passed on), `false` on a failure, a cut or the relay's end.
fn write_side(mut to: TcpStream, rx: Receiver<Item>, s: &Shared) -> bool {
    loop {
        let (at, data) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) if !s.stop.load(Ordering::SeqCst) => continue,
            Err(_) => return false,
        };
        loop {
            if s.stop.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if s.stalled.load(Ordering::SeqCst) {
                thread::sleep(TICK);
            } else if now < at {
                thread::sleep((at - now).min(Duration::from_millis(50)));
            } else {
                break;
            }
        }
        match data {
            Data::Bytes(bytes) => {
                if to.write_all(&bytes).is_err() {
                    return false;
                }
            }
            Data::End => {
                // Pass the end on; the other direction goes on by itself.
                let _ = to.shutdown(Shutdown::Write);
                return true;
            }
        }
    }
}
