//! Window validation and its application to quinn's transport configuration.

use std::net::Ipv4Addr;
use std::time::Duration;

use conclave_p2p::{
    DEFAULT_WINDOW_BYTES, FetchRequest, MAX_WINDOW_BYTES, MIN_WINDOW_BYTES, P2pError, P2pSender,
    SenderLimits, Window, fetch,
};

#[test]
fn the_default_is_eight_mib_and_valid() {
    let w = Window::default();
    assert_eq!(DEFAULT_WINDOW_BYTES, 8 * 1024 * 1024);
    assert_eq!(w, Window::uniform(DEFAULT_WINDOW_BYTES));
    w.validate().unwrap();
    Window::uniform(MIN_WINDOW_BYTES).validate().unwrap();
    Window::uniform(MAX_WINDOW_BYTES).validate().unwrap();
}

#[test]
fn out_of_range_windows_name_the_field() {
    let err = Window::uniform(MIN_WINDOW_BYTES - 1)
        .validate()
        .unwrap_err();
    match &err {
        P2pError::InvalidWindow { field, bytes, .. } => {
            assert_eq!(*field, "stream_receive_window");
            assert_eq!(*bytes, MIN_WINDOW_BYTES - 1);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("choose between"));

    let w = Window {
        send_window: MAX_WINDOW_BYTES + 1,
        ..Window::default()
    };
    assert!(matches!(
        w.validate(),
        Err(P2pError::InvalidWindow {
            field: "send_window",
            ..
        })
    ));
    let w = Window {
        receive_window: 0,
        ..Window::default()
    };
    assert!(matches!(
        w.validate(),
        Err(P2pError::InvalidWindow {
            field: "receive_window",
            ..
        })
    ));
}

#[test]
fn a_valid_window_makes_a_transport_config() {
    let mut config = quinn::TransportConfig::default();
    Window::uniform(1 << 20).apply(&mut config).unwrap();
    assert!(Window::uniform(1).apply(&mut config).is_err());
    Window::default()
        .transport_config(Duration::from_secs(30), 1)
        .unwrap();
}

#[tokio::test]
async fn invalid_windows_are_refused_by_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, b"hello").unwrap();
    let bad = Window::uniform(1024);
    let started = P2pSender::start(
        &path,
        5,
        [0; 32],
        (Ipv4Addr::LOCALHOST, 0).into(),
        bad,
        SenderLimits::default(),
    )
    .await;
    assert!(matches!(started, Err(P2pError::InvalidWindow { .. })));
    let req = FetchRequest {
        addrs: vec![(Ipv4Addr::LOCALHOST, 9).into()],
        fingerprint: [0; 32],
        token: [0; 32],
        size: 5,
        sha256: [0; 32],
        dest_part: dir.path().join("f.part"),
        window: bad,
        connect_timeout: Duration::from_secs(1),
    };
    let fetched = tokio::time::timeout(Duration::from_secs(10), fetch(req, |_, _| {}))
        .await
        .unwrap();
    assert!(matches!(fetched, Err(P2pError::InvalidWindow { .. })));
}

#[test]
fn congestion_controllers_parse_and_apply() {
    use conclave_p2p::Congestion;
    assert_eq!(Congestion::parse("BBR"), Some(Congestion::Bbr));
    assert_eq!(Congestion::parse("cubic"), Some(Congestion::Cubic));
    assert_eq!(Congestion::parse("newreno"), Some(Congestion::NewReno));
    assert_eq!(Congestion::parse("vegas"), None);
    assert_eq!(Window::default().congestion, Congestion::Cubic);
    for cc in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
        let mut config = quinn::TransportConfig::default();
        Window::default()
            .with_congestion(cc)
            .apply(&mut config)
            .unwrap();
    }
}
