//! A UDP path impairer for benchmarks and tests: a forwarder on `127.0.0.1` that delays every
//! datagram and drops some, in both directions, because the kernel here has no `netem`.
//!
//! Clients send to [`ImpairedPath::local_addr`]; each new client address (up to
//! [`MAX_CLIENTS`]) gets its own upstream socket towards the target, so several recipients can
//! share one impaired path and the target sees each as a distinct peer. Per direction and per
//! client, a datagram is dropped with probability `loss` (a seeded [`StdRng`], so a run is
//! repeatable for a given arrival order) and otherwise delivered `delay` after it arrived.
//! `delay` is one-way: the round-trip time through the path is twice it.
//!
//! Every delivery queue is FIFO with one fixed delay, so datagrams are never reordered; each
//! holds at most [`MAX_QUEUED_DATAGRAMS`], and a datagram arriving at a full queue is dropped
//! (as a router's full buffer would) and counted in [`ImpairStats::dropped_queue`]. There is no
//! bandwidth limit: the path is as fast as loopback and the forwarder's CPU allow. Its sockets
//! ask for [`SOCKET_BUFFER_BYTES`](crate::SOCKET_BUFFER_BYTES) of kernel buffer so bursts are
//! not dropped by the kernel on top of the configured loss.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::net;

/// Datagrams waiting in one direction for one client: at 20 ms and 1,200-byte datagrams this
/// holds about 1 GB/s worth of delay, far more than loopback QUIC reaches here.
pub const MAX_QUEUED_DATAGRAMS: usize = 16 * 1024;
/// Distinct client addresses served; datagrams from more are dropped.
pub const MAX_CLIENTS: usize = 64;
/// The largest UDP payload.
const MAX_DATAGRAM_BYTES: usize = 65_535;
/// Pause after a socket error before reading again, so a persistent error cannot spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(5);

/// Counters of what the path did, over both directions and all clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairStats {
    /// Datagrams delivered (after the delay).
    pub forwarded: u64,
    /// Datagrams dropped at random (the `loss` probability).
    pub dropped_loss: u64,
    /// Datagrams dropped because a queue was full or there were too many clients.
    pub dropped_queue: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
}

/// A running impaired path; dropping it stops every task and closes every socket.
pub struct ImpairedPath {
    local: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy)]
struct Impairment {
    delay: Duration,
    loss: f64,
}

impl ImpairedPath {
    /// Starts forwarding between `127.0.0.1:0` and `target`: `delay` one-way in each
    /// direction, each datagram lost with probability `loss` (0.0 to 1.0), randomness seeded
    /// with `seed`.
    pub async fn start(
        target: SocketAddr,
        delay: Duration,
        loss: f64,
        seed: u64,
    ) -> io::Result<ImpairedPath> {
        if !(0.0..=1.0).contains(&loss) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("loss must be between 0.0 and 1.0, not {loss}"),
            ));
        }
        let front = Arc::new(net::tokio_udp_socket((Ipv4Addr::LOCALHOST, 0).into())?);
        let local = front.local_addr()?;
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(front_loop(
            front,
            target,
            Impairment { delay, loss },
            seed,
            counters.clone(),
        ));
        Ok(ImpairedPath {
            local,
            counters,
            task,
        })
    }

    /// The address clients send to instead of the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// What the path has done so far.
    pub fn stats(&self) -> ImpairStats {
        ImpairStats {
            forwarded: self.counters.forwarded.load(Ordering::Relaxed),
            dropped_loss: self.counters.dropped_loss.load(Ordering::Relaxed),
            dropped_queue: self.counters.dropped_queue.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ImpairedPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One datagram waiting for its time.
struct Queued {
    due: Instant,
    data: Vec<u8>,
}

/// A seed for one client and direction, mixed so neighbouring clients get unrelated streams.
fn sub_seed(seed: u64, client: usize, direction: u64) -> u64 {
    let mixed = (client as u64)
        .wrapping_mul(2)
        .wrapping_add(direction)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    seed ^ mixed
}

/// Decides one datagram's fate and queues it.
fn admit(
    rng: &mut StdRng,
    imp: Impairment,
    data: &[u8],
    queue: &mpsc::Sender<Queued>,
    counters: &Counters,
) {
    if rng.random_bool(imp.loss) {
        counters.dropped_loss.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let queued = Queued {
        due: Instant::now() + imp.delay,
        data: data.to_vec(),
    };
    if queue.try_send(queued).is_err() {
        counters.dropped_queue.fetch_add(1, Ordering::Relaxed);
    }
}

struct Client {
    to_target: mpsc::Sender<Queued>,
    rng: StdRng,
}

/// Reads from clients, sets up each new client, queues its datagrams towards the target.
async fn front_loop(
    front: Arc<UdpSocket>,
    target: SocketAddr,
    imp: Impairment,
    seed: u64,
    counters: Arc<Counters>,
) {
    // Owning every client's tasks here means aborting this loop aborts them all.
    let mut tasks = JoinSet::new();
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        let (n, from) = match front.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "impair: front socket error");
                tokio::time::sleep(ERROR_BACKOFF).await;
                continue;
            }
        };
        if !clients.contains_key(&from) {
            if clients.len() >= MAX_CLIENTS {
                counters.dropped_queue.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match new_client(
                &mut tasks,
                &front,
                from,
                target,
                imp,
                sub_seed(seed, clients.len(), 1),
                &counters,
            )
            .await
            {
                Ok(to_target) => {
                    let rng = StdRng::seed_from_u64(sub_seed(seed, clients.len(), 0));
                    clients.insert(from, Client { to_target, rng });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "impair: cannot open an upstream socket");
                    continue;
                }
            }
        }
        if let Some(client) = clients.get_mut(&from) {
            admit(
                &mut client.rng,
                imp,
                &buf[..n],
                &client.to_target,
                &counters,
            );
        }
    }
}

/// Opens a client's upstream socket and starts its three tasks; returns its queue towards the
/// target.
async fn new_client(
    tasks: &mut JoinSet<()>,
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
    imp: Impairment,
    back_seed: u64,
    counters: &Arc<Counters>,
) -> io::Result<mpsc::Sender<Queued>> {
    let bind: SocketAddr = if target.is_ipv6() {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let upstream = Arc::new(net::tokio_udp_socket(bind)?);
    upstream.connect(target).await?;

    let (to_target, to_target_rx) = mpsc::channel(MAX_QUEUED_DATAGRAMS);
    let (to_client, to_client_rx) = mpsc::channel(MAX_QUEUED_DATAGRAMS);
    tasks.spawn(deliver(
        to_target_rx,
        counters.clone(),
        Sink::Target(upstream.clone()),
    ));
    tasks.spawn(deliver(
        to_client_rx,
        counters.clone(),
        Sink::Client(front.clone(), client),
    ));
    let c = counters.clone();
    tasks.spawn(async move {
        let mut rng = StdRng::seed_from_u64(back_seed);
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            match upstream.recv(&mut buf).await {
                Ok(n) => admit(&mut rng, imp, &buf[..n], &to_client, &c),
                Err(e) => {
                    // An ICMP error from the target surfaces here on a connected socket.
                    tracing::debug!(error = %e, "impair: upstream socket error");
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
        }
    });
    Ok(to_target)
}

/// Where a delivery queue sends to.
enum Sink {
    /// The target, through the client's connected upstream socket.
    Target(Arc<UdpSocket>),
    /// The client, from the front socket.
    Client(Arc<UdpSocket>, SocketAddr),
}

/// Sends each queued datagram when its time comes, in order.
async fn deliver(mut queue: mpsc::Receiver<Queued>, counters: Arc<Counters>, sink: Sink) {
    while let Some(item) = queue.recv().await {
        tokio::time::sleep_until(item.due).await;
        let sent = match &sink {
            Sink::Target(socket) => socket.send(&item.data).await,
            Sink::Client(socket, to) => socket.send_to(&item.data, *to).await,
        };
        match sent {
            Ok(_) => {
                counters.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "impair: send failed"),
        }
    }
}
