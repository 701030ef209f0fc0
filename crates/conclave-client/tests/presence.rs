//! Everyday chat's presence side in end-to-end conversations (issue #20, part B), with the
//! real server and real clients: the Markdown marker and the action flag travel inside the
//! ciphertext (the server's log holds only MLS content types), mentions are found by the
//! client after decryption and counted apart from unread, typing notices and read markers
//! work in an end-to-end room and an end-to-end direct conversation, and a member who left
//! gets none of them.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users, connect_e2ee as connect, none_for};
use conclave_client::chat::{Attention, Counts, Mention};
use conclave_client::proto::chat::TextKind;
use conclave_client::proto::{Conv, ConvRef, Event, Message, Target};
use conclave_client::{Client, ClientEvent, Events};

const WAIT: Duration = Duration::from_secs(30);

/// Waits (bounded) for the first event that `f` picks.
async fn wait_for<T>(events: &mut Events, mut f: impl FnMut(&ClientEvent) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.expect("events go on");
            if let Some(t) = f(&e) {
                return t;
            }
        }
    })
    .await
    .expect("the event comes in time")
}

fn message_in(e: &ClientEvent, conv: &Conv) -> Option<Message> {
    match e {
        ClientEvent::Server(Event::Message(m)) if &m.conv == conv => Some(m.clone()),
        _ => None,
    }
}

fn typing_in(e: &ClientEvent, conv: &Conv) -> Option<String> {
    match e {
        ClientEvent::Server(Event::Typing { conv: c, user }) if c == conv => Some(user.clone()),
        _ => None,
    }
}

fn read_in(e: &ClientEvent, conv: &Conv) -> Option<(String, u64)> {
    match e {
        ClientEvent::Server(Event::Read { conv: c, user, seq }) if c == conv => {
            Some((user.clone(), *seq))
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_rooms_carry_kinds_inside_the_ciphertext_and_count_mentions() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob", "carol"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, mut b_ev) = connect(&srv, "bob", states[1].path()).await;
    let (carol, mut c_ev) = connect(&srv, "carol", states[2].path()).await;
    alice
        .create_room_e2ee("ops", false, None)
        .await
        .expect("create");
    bob.join("ops", None).await.expect("bob joins");
    carol.join("ops", None).await.expect("carol joins");
    let ops = Conv::Room("ops".into());
    let to_ops = || Target::Room {
        room: "ops".into(),
        except: vec![],
    };

    // Markdown and an action, end to end: the kind arrives with the text.
    let kind = TextKind {
        markdown: true,
        action: true,
    };
    alice
        .send_text(to_ops(), "waves at **@bob**", kind)
        .await
        .expect("send");
    let m = wait_for(&mut b_ev, |e| message_in(e, &ops)).await;
    assert_eq!(m.body.text_kind(), Some(kind));
    assert_eq!(m.body.as_text(), Some("waves at **@bob**"));
    assert!(alice.is_e2ee(&ops));
    // The server's log of the room holds only MLS messages: it never saw the kind.
    let raw = bob
        .history_raw(ConvRef::Room("ops".into()), 50, None)
        .await
        .expect("raw history");
    assert!(!raw.is_empty());
    assert!(
        raw.iter()
            .all(|m| m.body.content_type.starts_with("application/mls-")),
        "{:?}",
        raw.iter().map(|m| &m.body.content_type).collect::<Vec<_>>()
    );

    // Mentions, found after decryption, counted apart from unread.
    let mut attention = Attention::default();
    attention.set_owner("ops", Some("alice"));
    let n = attention.on_message(&m, "bob", false);
    assert_eq!(n.mention, Some(Mention::Me));
    carol
        .send_to_room("ops", "nothing for bob here", &[])
        .await
        .expect("send");
    let m = wait_for(&mut b_ev, |e| message_in(e, &ops)).await;
    assert_eq!(attention.on_message(&m, "bob", false).mention, None);
    // `@room` counts from the owner only.
    carol
        .send_to_room("ops", "@room hello", &[])
        .await
        .expect("send");
    let m = wait_for(&mut b_ev, |e| message_in(e, &ops)).await;
    assert_eq!(attention.on_message(&m, "bob", false).mention, None);
    alice
        .send_to_room("ops", "@room standup", &[])
        .await
        .expect("send");
    let m = wait_for(&mut b_ev, |e| message_in(e, &ops)).await;
    let newest = m.seq;
    assert_eq!(
        attention.on_message(&m, "bob", false).mention,
        Some(Mention::Room)
    );
    assert_eq!(
        attention.counts(&ops),
        Counts {
            unread: 4,
            mentions: 2
        }
    );

    // Typing and read markers in the end-to-end room.
    bob.typing(ConvRef::Room("ops".into()))
        .await
        .expect("typing");
    assert_eq!(wait_for(&mut a_ev, |e| typing_in(e, &ops)).await, "bob");
    bob.mark_read(ConvRef::Room("ops".into()), newest)
        .await
        .expect("read");
    attention.read(&ops);
    assert_eq!(attention.counts(&ops), Counts::default());
    assert_eq!(
        wait_for(&mut a_ev, |e| read_in(e, &ops)).await,
        ("bob".to_string(), newest)
    );
    let markers = alice
        .read_markers(ConvRef::Room("ops".into()))
        .await
        .expect("markers");
    assert!(markers.iter().any(|m| m.user == "bob" && m.seq == newest));

    // Carol leaves: she hears no typing any more.
    carol.part("ops").await.expect("part");
    // Wait for the typing interval of bob's last notice to pass.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    while c_ev.try_recv().is_some() {}
    bob.typing(ConvRef::Room("ops".into()))
        .await
        .expect("typing");
    assert_eq!(wait_for(&mut a_ev, |e| typing_in(e, &ops)).await, "bob");
    none_for(&mut c_ev, Duration::from_millis(300), |e| {
        typing_in(e, &ops).is_some()
    })
    .await;

    // An end-to-end direct conversation: kinds, mentions, typing, read markers.
    alice
        .send_text(
            Target::Users {
                to: vec!["bob".into()],
            },
            "pokes @bob",
            TextKind {
                markdown: false,
                action: true,
            },
        )
        .await
        .expect("direct send");
    let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
    let m = wait_for(&mut b_ev, |e| message_in(e, &dm)).await;
    assert!(bob.is_e2ee(&dm));
    assert_eq!(m.body.text_kind().map(|k| k.action), Some(true));
    assert_eq!(
        attention.on_message(&m, "bob", false).mention,
        Some(Mention::Me)
    );
    assert_eq!(attention.counts(&dm).mentions, 1);
    bob.typing(ConvRef::With(vec!["alice".into()]))
        .await
        .expect("typing");
    assert_eq!(wait_for(&mut a_ev, |e| typing_in(e, &dm)).await, "bob");
    bob.mark_read(ConvRef::With(vec!["alice".into()]), m.seq)
        .await
        .expect("read");
    assert_eq!(
        wait_for(&mut a_ev, |e| read_in(e, &dm)).await,
        ("bob".to_string(), m.seq)
    );
    let raw = alice
        .history_raw(ConvRef::With(vec!["bob".into()]), 50, None)
        .await
        .expect("raw history");
    assert!(
        raw.iter()
            .all(|m| m.body.content_type.starts_with("application/mls-"))
    );
    drop((alice, bob, carol));
    srv.stop(WAIT).await;
}

/// Through the test kit's relay (5 ms one way, seeded jitter): read markers arrive in the
/// order they were moved, a reconnect keeps them, and typing still reaches the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_keep_their_order_through_a_jittery_relay() {
    use common::relay::{Relay, RelayConfig};
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |c| {
        c.presence.read_interval_ms = 0;
    })
    .await;
    let relay = Relay::start(srv.addr, RelayConfig::delay_ms(5.0, 0x20b));
    let via_relay = |user: &str, state: &Path| {
        let mut opts = common::options(&srv, user, state, WAIT);
        opts.server = relay.addr().to_string();
        opts
    };
    let states: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let connect_relayed = |user: &'static str, state: std::path::PathBuf| {
        let opts = via_relay(user, &state);
        async move {
            let (client, events, _) = tokio::time::timeout(WAIT, Client::connect(opts))
                .await
                .expect("connect in time")
                .expect("connect");
            let events = client
                .enable_e2ee(events, &state, common::PASSWORD)
                .await
                .expect("e2ee on");
            (client, events)
        }
    };
    let (alice, mut a_ev) = connect_relayed("alice", states[0].path().to_path_buf()).await;
    let (bob, mut b_ev) = connect_relayed("bob", states[1].path().to_path_buf()).await;
    alice
        .create_room_e2ee("ops", false, None)
        .await
        .expect("create");
    bob.join("ops", None).await.expect("join");
    let ops = Conv::Room("ops".into());
    let mut seqs = Vec::new();
    for i in 0..5 {
        let r = alice
            .send_to_room("ops", &format!("m{i}"), &[])
            .await
            .expect("send");
        seqs.push(r.seq);
    }
    for _ in 0..5 {
        wait_for(&mut b_ev, |e| message_in(e, &ops)).await;
    }
    // Bob marks each in turn.
    for &s in &seqs {
        bob.mark_read(ConvRef::Room("ops".into()), s)
            .await
            .expect("read");
    }
    let mut got = Vec::new();
    while got.last() != seqs.last() {
        let (user, seq) = wait_for(&mut a_ev, |e| read_in(e, &ops)).await;
        assert_eq!(user, "bob");
        got.push(seq);
        assert!(got.len() <= seqs.len(), "{got:?}");
    }
    assert_eq!(got, seqs, "markers in the order they were moved");
    // Bob reconnects (a new session through the relay): the marker is still his last one.
    bob.close();
    drop(b_ev);
    let (bob, _b_ev) = connect_relayed("bob", states[1].path().to_path_buf()).await;
    let markers = alice
        .read_markers(ConvRef::Room("ops".into()))
        .await
        .expect("markers");
    assert!(
        markers
            .iter()
            .any(|m| m.user == "bob" && Some(&m.seq) == seqs.last()),
        "{markers:?}"
    );
    bob.typing(ConvRef::Room("ops".into()))
        .await
        .expect("typing");
    assert_eq!(wait_for(&mut a_ev, |e| typing_in(e, &ops)).await, "bob");
    drop((alice, bob));
    srv.stop(WAIT).await;
}

/// An away message outlives a dropped connection: the server forgets it when the account's
/// last connection ends, and the client sets it again once it has reconnected (through the
/// relay, which cuts the connection). `back` ends it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn away_is_kept_across_a_reconnect() {
    use common::relay::{Relay, RelayConfig};
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let relay = Relay::start(srv.addr, RelayConfig::delay_ms(2.0, 0x20c));
    let states: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, mut b_ev) =
        common::connect_via(&srv, &relay.addr(), "bob", states[1].path(), WAIT).await;
    let bob_away = |users: &[conclave_client::proto::UserPresence]| {
        users
            .iter()
            .find(|u| u.user == "bob")
            .and_then(|u| u.away.clone())
    };
    bob.away(Some("at lunch")).await.expect("away");
    assert_eq!(
        bob_away(&alice.who(None).await.expect("who")).as_deref(),
        Some("at lunch")
    );
    assert!(relay.cut_all() > 0, "bob's connection was cut");
    wait_for(&mut b_ev, |e| {
        matches!(e, ClientEvent::Reconnected { .. }).then_some(())
    })
    .await;
    // Set again shortly after the reconnect (bounded wait).
    let mut away = None;
    for _ in 0..100 {
        let who = alice.who(None).await.expect("who");
        if who.iter().any(|u| u.user == "bob" && u.online) {
            away = bob_away(&who);
            if away.is_some() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(away.as_deref(), Some("at lunch"));
    // Back: not set again by the next reconnect.
    bob.away(None).await.expect("back");
    relay.cut_all();
    wait_for(&mut b_ev, |e| {
        matches!(e, ClientEvent::Reconnected { .. }).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bob_away(&alice.who(None).await.expect("who")), None);
    drop((alice, bob));
    srv.stop(WAIT).await;
}
