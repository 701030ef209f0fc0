//! End-to-end transfers with real quinn on 127.0.0.1. Every test is bounded by TEST_LIMIT.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conclave_p2p::impair::ImpairedPath;
use conclave_p2p::{
    Congestion, FetchRequest, FetchStats, P2pError, P2pSender, SenderLimits, Window, fetch,
};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const TEST_LIMIT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MIB: usize = 1024 * 1024;

struct Offer {
    dir: tempfile::TempDir,
    path: PathBuf,
    data: Vec<u8>,
    sha256: [u8; 32],
}

fn make_offer(size: usize, seed: u64) -> Offer {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let path = dir.path().join("offered.bin");
    std::fs::write(&path, &data).unwrap();
    let sha256 = Sha256::digest(&data).into();
    Offer {
        dir,
        path,
        data,
        sha256,
    }
}

fn localhost() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

async fn start(offer: &Offer, window: Window) -> P2pSender {
    P2pSender::start(
        &offer.path,
        offer.data.len() as u64,
        offer.sha256,
        localhost(),
        window,
        SenderLimits::default(),
    )
    .await
    .unwrap()
}

fn token(n: u8) -> [u8; 32] {
    [n; 32]
}

fn request(offer: &Offer, sender: &P2pSender, token: [u8; 32], part: &Path) -> FetchRequest {
    FetchRequest {
        addrs: sender.local_addrs().unwrap(),
        fingerprint: sender.fingerprint(),
        token,
        size: offer.data.len() as u64,
        sha256: offer.sha256,
        dest_part: part.to_path_buf(),
        window: Window::default(),
        connect_timeout: CONNECT_TIMEOUT,
    }
}

async fn get(req: FetchRequest) -> Result<FetchStats, P2pError> {
    tokio::time::timeout(TEST_LIMIT, fetch(req, |_, _| {}))
        .await
        .expect("the fetch did not end within the test limit")
}

#[tokio::test]
async fn a_random_file_arrives_intact() {
    let offer = make_offer(3 * MIB, 1);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut calls = 0u32;
    let mut last = (0, 0);
    let stats = tokio::time::timeout(
        TEST_LIMIT,
        fetch(request(&offer, &sender, token(1), &part), |done, total| {
            calls += 1;
            last = (done, total);
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
    assert_eq!(stats.bytes, offer.data.len() as u64);
    assert_eq!(stats.resumed_from, 0);
    assert!(stats.throughput_bytes_per_sec > 0.0);
    assert!(calls >= 2);
    assert_eq!(last, (offer.data.len() as u64, offer.data.len() as u64));
    assert!(sender.wait_all_done(Duration::from_secs(5)).await);
    let progress = sender.progress();
    assert_eq!(progress.len(), 1);
    assert_eq!(progress[0].label, "bob");
    assert!(progress[0].done);
    assert_eq!(progress[0].sent, offer.data.len() as u64);
}

#[tokio::test]
async fn three_recipients_are_served_in_parallel() {
    let offer = make_offer(2 * MIB, 2);
    let sender = start(&offer, Window::default()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 1..=3u8 {
        sender.allow(token(n), format!("r{n}")).unwrap();
        let req = request(
            &offer,
            &sender,
            token(n),
            &offer.dir.path().join(format!("r{n}.part")),
        );
        tasks.spawn(get(req));
    }
    while let Some(result) = tasks.join_next().await {
        let stats = result.unwrap().unwrap();
        assert_eq!(stats.bytes, offer.data.len() as u64);
    }
    for n in 1..=3u8 {
        let got = std::fs::read(offer.dir.path().join(format!("r{n}.part"))).unwrap();
        assert_eq!(got, offer.data);
    }
    assert!(sender.wait_all_done(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_wrong_fingerprint_is_refused_promptly() {
    let offer = make_offer(64 * 1024, 3);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut req = request(&offer, &sender, token(1), &part);
    req.fingerprint[0] ^= 0xff;
    let started = Instant::now();
    let err = get(req).await.unwrap_err();
    assert!(matches!(err, P2pError::FingerprintMismatch { .. }), "{err}");
    assert!(
        started.elapsed() < CONNECT_TIMEOUT,
        "the refusal waited for the timeout"
    );
    assert!(err.to_string().contains("relay"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 0);
}

#[tokio::test]
async fn an_unknown_token_is_refused_clearly() {
    let offer = make_offer(64 * 1024, 4);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("eve.part");
    let err = get(request(&offer, &sender, token(9), &part))
        .await
        .unwrap_err();
    assert!(matches!(err, P2pError::BadToken), "{err}");
    assert!(
        err.to_string()
            .contains("does not know this transfer token")
    );
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 0);
    // The real recipient is unaffected.
    let ok = get(request(
        &offer,
        &sender,
        token(1),
        &offer.dir.path().join("bob.part"),
    ))
    .await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn a_token_cannot_be_used_after_completion() {
    let offer = make_offer(256 * 1024, 5);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    get(request(
        &offer,
        &sender,
        token(1),
        &offer.dir.path().join("a.part"),
    ))
    .await
    .unwrap();
    let err = get(request(
        &offer,
        &sender,
        token(1),
        &offer.dir.path().join("b.part"),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, P2pError::TokenUsed), "{err}");
    assert!(
        sender.allow(token(1), "again").is_err(),
        "a token may be registered once"
    );
}

#[tokio::test]
async fn a_partial_file_is_resumed() {
    let offer = make_offer(3 * MIB, 6);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    let have = 1_234_567;
    std::fs::write(&part, &offer.data[..have]).unwrap();
    let stats = get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap();
    assert_eq!(stats.resumed_from, have as u64);
    assert_eq!(stats.bytes, (offer.data.len() - have) as u64);
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
}

#[tokio::test]
async fn a_complete_part_file_needs_no_bytes() {
    let offer = make_offer(100_000, 7);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    std::fs::write(&part, &offer.data).unwrap();
    let stats = get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap();
    assert_eq!(stats.bytes, 0);
    assert_eq!(stats.resumed_from, offer.data.len() as u64);
    assert!(sender.wait_all_done(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_corrupted_prefix_gives_a_hash_mismatch_and_a_retry_starts_over() {
    let offer = make_offer(MIB, 8);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut prefix = offer.data[..300_000].to_vec();
    prefix[1000] ^= 1;
    std::fs::write(&part, &prefix).unwrap();
    let err = get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap_err();
    assert!(matches!(err, P2pError::HashMismatch { .. }), "{err}");
    assert!(!part.exists(), "the part file is removed on a mismatch");
    // The token is not spent by a failed verification: the retry starts from zero.
    let stats = get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap();
    assert_eq!(stats.resumed_from, 0);
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
}

#[tokio::test]
async fn a_part_file_longer_than_the_offer_starts_over() {
    let offer = make_offer(50_000, 9);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    std::fs::write(&part, vec![7u8; 60_000]).unwrap();
    let stats = get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap();
    assert_eq!(stats.resumed_from, 0);
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
}

#[tokio::test]
async fn a_silent_port_is_unreachable_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // A bound socket that never answers (a firewall dropping packets) ...
    let silent = std::net::UdpSocket::bind(localhost()).unwrap();
    // ... and a closed port (nothing bound: ICMP port unreachable).
    let closed = {
        let s = std::net::UdpSocket::bind(localhost()).unwrap();
        s.local_addr().unwrap()
    };
    let timeout = Duration::from_millis(700);
    let req = FetchRequest {
        addrs: vec![silent.local_addr().unwrap(), closed],
        fingerprint: [1; 32],
        token: [2; 32],
        size: 10,
        sha256: [3; 32],
        dest_part: dir.path().join("x.part"),
        window: Window::default(),
        connect_timeout: timeout,
    };
    let started = Instant::now();
    let err = get(req).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, P2pError::Unreachable { .. }), "{err}");
    assert!(took >= timeout, "gave up after {took:?}");
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    assert!(err.to_string().contains("fall back to the relay"));
}

#[tokio::test]
async fn no_addresses_is_unreachable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let req = FetchRequest {
        addrs: vec![],
        fingerprint: [1; 32],
        token: [2; 32],
        size: 10,
        sha256: [3; 32],
        dest_part: dir.path().join("x.part"),
        window: Window::default(),
        connect_timeout: CONNECT_TIMEOUT,
    };
    assert!(matches!(get(req).await, Err(P2pError::Unreachable { .. })));
}

#[tokio::test]
async fn a_transfer_through_an_impaired_path_arrives_intact() {
    let offer = make_offer(2 * MIB, 10);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let path = ImpairedPath::start(
        sender.local_addr().unwrap(),
        Duration::from_millis(20),
        0.01,
        42,
    )
    .await
    .unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut req = request(&offer, &sender, token(1), &part);
    req.addrs = vec![path.local_addr()];
    let stats = get(req).await.unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
    assert_eq!(stats.bytes, offer.data.len() as u64);
    let impaired = path.stats();
    assert!(impaired.forwarded > 100, "{impaired:?}");
    // The handshake alone takes a round trip of 40 ms.
    assert!(stats.connect_elapsed >= Duration::from_millis(40));
}

#[tokio::test]
async fn a_bbr_sender_through_an_impaired_path_arrives_intact() {
    let offer = make_offer(MIB, 15);
    let window = Window::default().with_congestion(Congestion::Bbr);
    let sender = start(&offer, window).await;
    sender.allow(token(1), "bob").unwrap();
    let path = ImpairedPath::start(
        sender.local_addr().unwrap(),
        Duration::from_millis(20),
        0.01,
        43,
    )
    .await
    .unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut req = request(&offer, &sender, token(1), &part);
    req.addrs = vec![path.local_addr()];
    req.window = window;
    get(req).await.unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
}

#[tokio::test]
async fn a_token_serves_one_connection_at_a_time() {
    let offer = make_offer(2 * MIB, 11);
    // A small window over a 40 ms round trip keeps the first transfer going for a while.
    let window = Window::uniform(64 * 1024);
    let sender = start(&offer, window).await;
    sender.allow(token(1), "bob").unwrap();
    let path = ImpairedPath::start(
        sender.local_addr().unwrap(),
        Duration::from_millis(20),
        0.0,
        1,
    )
    .await
    .unwrap();
    let mut first = request(&offer, &sender, token(1), &offer.dir.path().join("a.part"));
    first.addrs = vec![path.local_addr()];
    first.window = window;
    let mut progress = sender.subscribe();
    let running = tokio::spawn(get(first));
    tokio::time::timeout(
        TEST_LIMIT,
        progress.wait_for(|p| p[0].active && p[0].sent > 0),
    )
    .await
    .unwrap()
    .unwrap();
    let err = get(request(
        &offer,
        &sender,
        token(1),
        &offer.dir.path().join("b.part"),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, P2pError::TokenBusy), "{err}");
    running.await.unwrap().unwrap();
    assert!(sender.wait_all_done(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_closed_sender_cuts_the_transfer_and_the_part_file_keeps_what_arrived() {
    let offer = make_offer(2 * MIB, 12);
    let window = Window::uniform(64 * 1024);
    let sender = start(&offer, window).await;
    sender.allow(token(1), "bob").unwrap();
    let path = ImpairedPath::start(
        sender.local_addr().unwrap(),
        Duration::from_millis(20),
        0.0,
        1,
    )
    .await
    .unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut req = request(&offer, &sender, token(1), &part);
    req.addrs = vec![path.local_addr()];
    req.window = window;
    let mut progress = sender.subscribe();
    let running = tokio::spawn(get(req));
    tokio::time::timeout(TEST_LIMIT, progress.wait_for(|p| p[0].sent > 256 * 1024))
        .await
        .unwrap()
        .unwrap();
    sender.close();
    let err = running.await.unwrap().unwrap_err();
    assert!(matches!(err, P2pError::Closed { .. }), "{err}");
    let kept = std::fs::read(&part).unwrap();
    assert!(!kept.is_empty() && kept.len() < offer.data.len());
    assert_eq!(kept, offer.data[..kept.len()]);
}

#[tokio::test]
async fn the_sender_refuses_a_file_of_another_size() {
    let offer = make_offer(1000, 13);
    let err = P2pSender::start(
        &offer.path,
        999,
        offer.sha256,
        localhost(),
        Window::default(),
        SenderLimits::default(),
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, P2pError::Setup(_)), "{err}");
}

#[tokio::test]
async fn the_sender_refuses_peers_beyond_its_limit() {
    let offer = make_offer(2 * MIB, 14);
    let window = Window::uniform(64 * 1024);
    let limits = SenderLimits {
        max_peers: 1,
        ..SenderLimits::default()
    };
    let sender = P2pSender::start(
        &offer.path,
        offer.data.len() as u64,
        offer.sha256,
        localhost(),
        window,
        limits,
    )
    .await
    .unwrap();
    sender.allow(token(1), "a").unwrap();
    sender.allow(token(2), "b").unwrap();
    let path = ImpairedPath::start(
        sender.local_addr().unwrap(),
        Duration::from_millis(20),
        0.0,
        1,
    )
    .await
    .unwrap();
    let mut first = request(&offer, &sender, token(1), &offer.dir.path().join("a.part"));
    first.addrs = vec![path.local_addr()];
    first.window = window;
    let mut progress = sender.subscribe();
    let running = tokio::spawn(get(first));
    tokio::time::timeout(TEST_LIMIT, progress.wait_for(|p| p[0].active))
        .await
        .unwrap()
        .unwrap();
    let err = get(request(
        &offer,
        &sender,
        token(2),
        &offer.dir.path().join("b.part"),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, P2pError::Refused), "{err}");
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_different_file_is_refused_and_frees_the_token_at_once() {
    let offer = make_offer(2 * MIB, 16);
    let sender = start(&offer, Window::default()).await;
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    let mut wrong = request(&offer, &sender, token(1), &part);
    wrong.sha256[0] ^= 1;
    let err = get(wrong).await.unwrap_err();
    assert!(matches!(err, P2pError::OfferMismatch { .. }), "{err}");
    // The receiver's close reaches the sender, which releases the token: a retry is not busy.
    let started = Instant::now();
    get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
}

#[tokio::test]
async fn an_expired_offer_is_refused() {
    let offer = make_offer(100_000, 17);
    let limits = SenderLimits {
        lifetime: Duration::from_millis(300),
        ..SenderLimits::default()
    };
    let sender = P2pSender::start(
        &offer.path,
        offer.data.len() as u64,
        offer.sha256,
        localhost(),
        Window::default(),
        limits,
    )
    .await
    .unwrap();
    sender.allow(token(1), "bob").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let err = get(request(
        &offer,
        &sender,
        token(1),
        &offer.dir.path().join("bob.part"),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, P2pError::Refused), "{err}");
    assert!(
        started.elapsed() < CONNECT_TIMEOUT,
        "refused at once, not timed out"
    );
}

#[tokio::test]
async fn a_sender_on_all_interfaces_names_a_reachable_address() {
    let offer = make_offer(100_000, 18);
    let sender = P2pSender::start(
        &offer.path,
        offer.data.len() as u64,
        offer.sha256,
        (Ipv4Addr::UNSPECIFIED, 0).into(),
        Window::default(),
        SenderLimits::default(),
    )
    .await
    .unwrap();
    let addrs = sender.local_addrs().unwrap();
    assert_eq!(addrs.len(), 1);
    assert!(!addrs[0].ip().is_unspecified());
    assert_eq!(addrs[0].port(), sender.local_addr().unwrap().port());
    sender.allow(token(1), "bob").unwrap();
    let part = offer.dir.path().join("bob.part");
    get(request(&offer, &sender, token(1), &part))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), offer.data);
}
