//! A TCP forwarder for tests that adds what a real network has and loopback lacks: a one-way
//! delay with jitter in each direction, and on demand a stall (nothing moves) or a cut (every
//! connection closed at once). Plain threads and std sockets, so both the async tests of the
//! client library and the synchronous tests of the binary use it.
//!
//! Bytes keep their order in each direction: a chunk read at `t` is released at
//! `max(t + delay + jitter, release of the chunk before it)`. The jitter comes from a seeded
//! generator (one stream per connection and direction), so a run replays. Every queue is
//! bounded ([`MAX_QUEUED_CHUNKS`] chunks of at most [`CHUNK_BYTES`] per direction): a reader
//! that is that far ahead waits, as TCP's window would make it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Largest chunk read at once.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks waiting for their release time, per direction of a connection.
pub const MAX_QUEUED_CHUNKS: usize = 1024;
/// Most connections through one relay at once (more are refused by closing them).
pub const MAX_CONNECTIONS: usize = 256;

/// What the relay does to the bytes it forwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Impairment {
    /// Added to every chunk, each way.
    pub delay: Duration,
    /// Up to this much more, uniformly at random, per chunk.
    pub jitter: Duration,
}

impl Impairment {
    pub fn none() -> Impairment {
        Impairment::default()
    }

    pub fn delay_us(delay_us: u64, jitter_us: u64) -> Impairment {
        Impairment {
            delay: Duration::from_micros(delay_us),
            jitter: Duration::from_micros(jitter_us),
        }
    }
}

/// xorshift64*: a small seeded generator (jitter needs no more).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        if n == 0 { 0 } else { x % n }
    }
}

/// The state the relay's threads share.
struct Shared {
    stop: AtomicBool,
    stalled: Mutex<bool>,
    unstalled: Condvar,
    /// Every open connection's two sockets, to cut them.
    open: Mutex<Vec<(usize, TcpStream, TcpStream)>>,
    accepted: AtomicUsize,
    impairment: Mutex<Impairment>,
}

impl Shared {
    fn wait_unstalled(&self) {
        let mut s = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        while *s && !self.stop.load(Ordering::Acquire) {
            s = self
                .unstalled
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A running relay; stops (and closes everything) when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens on an ephemeral loopback port and forwards each connection to `target`.
    pub fn start(target: SocketAddr, impairment: Impairment, seed: u64) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay binds a loopback port");
        let addr = listener.local_addr().expect("relay address");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            stalled: Mutex::new(false),
            unstalled: Condvar::new(),
            open: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            impairment: Mutex::new(impairment),
        });
        let sh = shared.clone();
        let accept = thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(listener, target, sh, seed))
            .expect("relay thread");
        Relay {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds every byte (both ways, every connection) while `on`; releases them in order
    /// when turned off.
    pub fn stall(&self, on: bool) {
        *self
            .shared
            .stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = on;
        self.shared.unstalled.notify_all();
    }

    /// Closes every connection now (both sides see a reset or an end of stream).
    pub fn cut_all(&self) {
        let open = std::mem::take(&mut *self.shared.open.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, a, b) in open {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Changes the delay and jitter for the chunks read from now on.
    pub fn set_impairment(&self, i: Impairment) {
        *self
            .shared
            .impairment
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = i;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Acquire)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.stall(false);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        self.cut_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>, seed: u64) {
    for (n, conn) in listener.incoming().enumerate() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(client) = conn else { continue };
        if shared.open.lock().unwrap_or_else(|e| e.into_inner()).len() >= MAX_CONNECTIONS {
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        shared
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((n, c2, s2));
        let seed = seed ^ ((n as u64) << 1);
        pump(&shared, n, &client, &server, seed);
        pump(&shared, n, &server, &client, seed ^ 1);
    }
}

/// A chunk and when it may be written.
type Timed = (Instant, Vec<u8>);

/// One direction of one connection: a reader thread stamps each chunk with its release time,
/// a writer thread writes it then.
fn pump(shared: &Arc<Shared>, conn: usize, from: &TcpStream, to: &TcpStream, seed: u64) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx): (SyncSender<Timed>, Receiver<Timed>) = sync_channel(MAX_QUEUED_CHUNKS);
    let sh = shared.clone();
    let _ = thread::Builder::new()
        .name("relay-read".into())
        .spawn(move || {
            let mut rng = Rng::new(seed);
            let mut last = Instant::now();
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let imp = *sh.impairment.lock().unwrap_or_else(|e| e.into_inner());
                let jitter = Duration::from_micros(rng.below(imp.jitter.as_micros() as u64 + 1));
                let at = (Instant::now() + imp.delay + jitter).max(last);
                last = at;
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            // End of stream: the writer finishes what is queued, then passes the end on.
        });
    let sh = shared.clone();
    let _ = thread::Builder::new()
        .name("relay-write".into())
        .spawn(move || {
            while let Ok((at, chunk)) = rx.recv() {
                let now = Instant::now();
                if at > now {
                    thread::sleep(at - now);
                }
                sh.wait_unstalled();
                if sh.stop.load(Ordering::Acquire) || to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let mut open = sh.open.lock().unwrap_or_else(|e| e.into_inner());
            // Both directions ended: forget the connection.
            if let Some(i) = open.iter().position(|(n, _, _)| *n == conn) {
                let (_, a, b) = &open[i];
                let ended = a.peek(&mut [0u8; 1]).is_ok_and(|n| n == 0)
                    || b.peek(&mut [0u8; 1]).is_ok_and(|n| n == 0);
                if ended {
                    open.swap_remove(i);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        thread::spawn(move || {
            for c in l.incoming().take(8) {
                let Ok(mut c) = c else { continue };
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn delays_each_way_keeps_order_and_cuts() {
        let target = echo_server();
        let relay = Relay::start(target, Impairment::delay_us(20_000, 5_000), 7);
        let mut c = TcpStream::connect(relay.addr()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let started = Instant::now();
        let mut sent = Vec::new();
        for i in 0..50u8 {
            c.write_all(&[i]).expect("write");
            sent.push(i);
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < sent.len() {
            let n = c.read(&mut buf).expect("read");
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        // Two ways of at least 20 ms each.
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(got, sent, "order kept");
        assert_eq!(relay.accepted(), 1);
        relay.cut_all();
        let mut one = [0u8; 1];
        let r = c.read(&mut one);
        assert!(matches!(r, Ok(0) | Err(_)), "cut: {r:?}");
    }

    #[test]
    fn a_stall_holds_everything_until_released() {
        let target = echo_server();
        let relay = Relay::start(target, Impairment::none(), 1);
        let mut c = TcpStream::connect(relay.addr()).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        relay.stall(true);
        c.write_all(b"held").expect("write");
        let mut buf = [0u8; 4];
        assert!(c.read(&mut buf).is_err(), "nothing moves while stalled");
        relay.stall(false);
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.read_exact(&mut buf).expect("released");
        assert_eq!(&buf, b"held");
    }
}
