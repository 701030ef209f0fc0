//! The impaired path: delay, seeded loss, order, several clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use conclave_p2p::impair::ImpairedPath;
use tokio::net::UdpSocket;

const DATAGRAMS: u32 = 300;
const WAIT: Duration = Duration::from_secs(10);

/// An echo server; returns its address (it runs until the test's runtime ends).
async fn echo() -> SocketAddr {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Sends DATAGRAMS numbered datagrams through `path` and returns the numbers echoed back, in
/// arrival order, and the time the first one took.
async fn run(path: &ImpairedPath) -> (Vec<u32>, Duration) {
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    client.connect(path.local_addr()).await.unwrap();
    let started = Instant::now();
    for i in 0..DATAGRAMS {
        client.send(&i.to_be_bytes()).await.unwrap();
        // Paced so the kernel never drops: the loss must be the path's alone.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut got = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 16];
    // Bounded: at most DATAGRAMS replies, and stop when none comes for a while.
    while got.len() < DATAGRAMS as usize {
        match tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await {
            Ok(Ok(4)) => {
                first.get_or_insert_with(|| started.elapsed());
                got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
            Ok(other) => panic!("unexpected reply {other:?}"),
            Err(_) => break,
        }
    }
    (got, first.unwrap_or(WAIT))
}

#[tokio::test]
async fn delay_and_seeded_loss_without_reordering() {
    let target = echo().await;
    let delay = Duration::from_millis(20);
    let a = ImpairedPath::start(target, delay, 0.1, 7).await.unwrap();
    let (got_a, first) = run(&a).await;
    assert!(first >= 2 * delay, "a round trip took {first:?}");
    // Both directions lose 10%: about 81% come back.
    assert!(
        (200..=280).contains(&got_a.len()),
        "{} of {DATAGRAMS} came back",
        got_a.len()
    );
    assert!(
        got_a.windows(2).all(|w| w[0] < w[1]),
        "reordered: {got_a:?}"
    );
    let stats = a.stats();
    assert_eq!(stats.dropped_queue, 0);
    // Every datagram sent was either lost on the way there or back, or came back.
    assert_eq!(
        stats.dropped_loss + got_a.len() as u64,
        u64::from(DATAGRAMS),
        "{stats:?}"
    );

    // The same seed drops the same datagrams.
    let b = ImpairedPath::start(target, delay, 0.1, 7).await.unwrap();
    let (got_b, _) = run(&b).await;
    assert_eq!(got_a, got_b);
    let c = ImpairedPath::start(target, delay, 0.1, 8).await.unwrap();
    let (got_c, _) = run(&c).await;
    assert_ne!(got_a, got_c);
}

#[tokio::test]
async fn several_clients_share_one_path() {
    let target = echo().await;
    let path = ImpairedPath::start(target, Duration::from_millis(5), 0.0, 1)
        .await
        .unwrap();
    let (one, two) = tokio::join!(run(&path), run(&path));
    assert_eq!(one.0.len(), DATAGRAMS as usize);
    assert_eq!(two.0.len(), DATAGRAMS as usize);
}

#[tokio::test]
async fn loss_out_of_range_is_refused() {
    let target = echo().await;
    let err = ImpairedPath::start(target, Duration::ZERO, 1.5, 1)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}
