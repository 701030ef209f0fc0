//! End-to-end rooms across everyday membership changes, with the real server (in-process,
//! real TLS, real SQLite) and real clients: a member reads every message sent after their
//! `join` reply, up to their removal (ARCHITECTURE.md, "Who reads what in an end-to-end
//! conversation"). Each case runs straight on loopback and through the test kit's relay,
//! which delays every byte (with jitter), so that the order in which a joiner's commit and
//! the others' messages cross the network varies as it does on a real network.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::relay::{Relay, RelayConfig};
use common::{TestServer, add_users};
use conclave_client::e2ee::{BEFORE_JOIN, E2eeNotice, NOT_MEMBER};
use conclave_client::proto::{Conv, ConvRef, Event, Request};
use conclave_client::{Client, ClientEvent, Events};

const WAIT: Duration = Duration::from_secs(30);

/// How clients reach the server in one run of a case.
#[derive(Clone, Copy, Debug)]
enum Net {
    Direct,
    /// Through the relay, this many microseconds one way (plus up to half of it in jitter).
    Delay(u64),
}

struct World {
    srv: TestServer,
    relay: Option<Relay>,
}

impl World {
    async fn start(names: &[&str], admins: &[&str], net: Net) -> World {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let users: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !admins.contains(n))
            .collect();
        add_users(dir.path(), &users);
        common::add_admins(dir.path(), admins);
        let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
        let relay = match net {
            Net::Direct => None,
            Net::Delay(us) => Some(Relay::start(
                srv.addr,
                RelayConfig::delay_ms(us as f64 / 1000.0, 0x5eed ^ us),
            )),
        };
        World { srv, relay }
    }

    async fn connect(&self, user: &str, state: &Path) -> (Client, Events) {
        self.connect_via(user, state, true).await
    }

    /// With `relayed` false, straight to the server even when the others go through the
    /// relay: one client ahead of another, as on a real network.
    async fn connect_via(&self, user: &str, state: &Path, relayed: bool) -> (Client, Events) {
        let mut opts = common::options(&self.srv, user, state, WAIT);
        if let Some(r) = self.relay.as_ref().filter(|_| relayed) {
            opts.server = r.addr().to_string();
        }
        let (client, events, _) = tokio::time::timeout(WAIT, Client::connect(opts))
            .await
            .expect("connect in time")
            .expect("connect");
        let events = client
            .enable_e2ee(events, state, common::PASSWORD)
            .await
            .expect("e2ee on");
        (client, events)
    }
}

fn text_in(e: &ClientEvent, conv: &Conv) -> Option<String> {
    match e {
        ClientEvent::Server(Event::Message(m)) if m.conv == *conv => {
            m.body.as_text().map(str::to_string)
        }
        _ => None,
    }
}

fn room(r: &str) -> Conv {
    Conv::Room(r.to_string())
}

/// Reads events until every text of `want` arrived in `conv` (each exactly once), failing on
/// an unreadable message or a message shown as ciphertext. Returns the notices seen.
async fn read_all(events: &mut Events, conv: &Conv, want: &[String]) -> Vec<E2eeNotice> {
    let mut got: Vec<String> = Vec::new();
    let mut notices = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while got.len() < want.len() {
            let e = events.recv().await.expect("events go on");
            if let ClientEvent::Server(Event::Message(m)) = &e {
                assert!(
                    !m.body.content_type.starts_with("application/mls-"),
                    "ciphertext shown as a message: {m:?}"
                );
            }
            if let ClientEvent::E2ee(n) = &e {
                // What came before this device was (back) in the group may be unreadable,
                // said once; nothing else may be.
                if let E2eeNotice::Unreadable { reason, .. } = n {
                    assert!(
                        reason == BEFORE_JOIN || reason == NOT_MEMBER,
                        "unreadable for another reason: {n:?}"
                    );
                    assert!(!notices.contains(n), "the same notice twice: {n:?}");
                }
                notices.push(n.clone());
            }
            if let Some(t) = text_in(&e, conv)
                && want.contains(&t)
            {
                assert!(!got.contains(&t), "{t:?} arrived twice");
                got.push(t);
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "only {got:?} of {want:?} arrived in {conv:?} (notices {notices:?})"
    );
    notices
}

fn texts(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

async fn send_all(c: &Client, r: &str, texts: &[String]) {
    for t in texts {
        c.send_to_room(r, t, &[]).await.expect("send");
    }
}

/// The first report: messages sent right after someone joins were unreadable to the joiner
/// through a relay of well under a millisecond.
async fn joiner_reads_what_follows_the_join(net: Net) {
    let w = World::start(&["alice", "bob"], &[], net).await;
    let st: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    // Alice behind the relay, Bob straight: Bob's join is answered before Alice's client has
    // his commit, so her first messages are encrypted for the epoch before it.
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (bob, mut b_ev) = w.connect_via("bob", st[1].path(), false).await;
    for round in 0..3 {
        let r = format!("lab{round}");
        alice
            .create_room_e2ee(&r, false, None)
            .await
            .expect("create");
        bob.join(&r, None).await.expect("bob joins");
        let want = texts(&format!("right-after-join-{round}"), 10);
        send_all(&alice, &r, &want).await;
        let notices = read_all(&mut b_ev, &room(&r), &want).await;
        // A room joined by this device says so, as an invitation's Welcome does.
        assert!(
            notices.contains(&E2eeNotice::Joined { conv: room(&r) }),
            "{notices:?}"
        );
    }
}

/// Leaving and joining again must not lock the device out.
async fn part_then_rejoin(net: Net) {
    let w = World::start(&["alice", "bob"], &[], net).await;
    let st: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.join("lab", None).await.expect("bob joins");
    let first = texts("before-part", 2);
    send_all(&alice, "lab", &first).await;
    read_all(&mut b_ev, &room("lab"), &first).await;
    for round in 0..3 {
        bob.part("lab").await.expect("bob leaves");
        bob.join("lab", None).await.expect("bob is back");
        let want = texts(&format!("after-rejoin-{round}"), 3);
        send_all(&alice, "lab", &want).await;
        read_all(&mut b_ev, &room("lab"), &want).await;
        // And the other way round.
        let back = texts(&format!("from-bob-{round}"), 1);
        send_all(&bob, "lab", &back).await;
    }
}

/// Ban and unban (online, then while offline) removed the device for good, and history
/// showed raw MLS rows afterwards.
async fn ban_then_unban(net: Net) {
    let w = World::start(&["alice", "bob", "carol"], &["alice"], net).await;
    let st: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (carol, _c_ev) = w.connect("carol", st[2].path()).await;
    let (bob, b_ev) = w.connect("bob", st[1].path()).await;
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.join("lab", None).await.expect("bob joins");
    carol.join("lab", None).await.expect("carol joins");
    drop(b_ev);
    let ban = |user: &str| Request::Ban {
        user: Some(user.to_string()),
        ip: None,
        duration_s: None,
        reason: Some("test".into()),
    };
    let unban = |user: &str| Request::Unban {
        user: Some(user.to_string()),
        ip: None,
    };
    // Banned while online (the connection is closed), let back in.
    alice.request(ban("bob")).await.expect("ban");
    bob.close();
    drop(bob);
    let during = texts("while-banned", 2);
    send_all(&carol, "lab", &during).await;
    alice.request(unban("bob")).await.expect("unban");
    let (bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    let want = texts("after-unban", 3);
    send_all(&alice, "lab", &want).await;
    read_all(&mut b_ev, &room("lab"), &want).await;
    let h = bob
        .history(ConvRef::Room("lab".into()), 50, None)
        .await
        .expect("history");
    assert!(
        h.iter()
            .all(|m| !m.body.content_type.starts_with("application/mls-")),
        "history shows MLS rows: {h:?}"
    );
    assert!(
        h.iter()
            .filter_map(|m| m.body.as_text())
            .any(|t| t == want[0])
    );
    // Banned and let back in while offline.
    bob.close();
    drop((bob, b_ev));
    alice.request(ban("bob")).await.expect("ban offline");
    send_all(&carol, "lab", &texts("offline-ban", 1)).await;
    alice.request(unban("bob")).await.expect("unban offline");
    let (_bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    let want = texts("after-offline-unban", 3);
    send_all(&carol, "lab", &want).await;
    read_all(&mut b_ev, &room("lab"), &want).await;
}

/// Kicked, banned and let back in, then joining again.
async fn kick_unban_rejoin(net: Net) {
    let w = World::start(&["alice", "bob"], &["alice"], net).await;
    let st: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.join("lab", None).await.expect("bob joins");
    alice
        .request(Request::Kick {
            room: Some("lab".into()),
            user: "bob".into(),
            reason: None,
        })
        .await
        .expect("kick");
    send_all(&alice, "lab", &texts("after-kick", 2)).await;
    bob.join("lab", None).await.expect("bob joins again");
    let want = texts("after-kick-rejoin", 3);
    send_all(&alice, "lab", &want).await;
    let notices = read_all(&mut b_ev, &room("lab"), &want).await;
    assert!(
        !notices
            .iter()
            .any(|n| matches!(n, E2eeNotice::Unreadable { conv, .. } if *conv == room("lab"))),
        "{notices:?}"
    );
}

/// Invited, left, invited again (a private room).
async fn invite_leave_reinvite(net: Net) {
    let w = World::start(&["alice", "bob"], &[], net).await;
    let st: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    alice
        .create_room_e2ee("ops", true, None)
        .await
        .expect("create");
    for round in 0..2 {
        alice.invite("ops", "bob").await.expect("invite");
        bob.join("ops", None).await.expect("bob accepts");
        let want = texts(&format!("invited-{round}"), 3);
        send_all(&alice, "ops", &want).await;
        read_all(&mut b_ev, &room("ops"), &want).await;
        bob.part("ops").await.expect("bob leaves");
    }
}

/// A second device of the same account: it reads what is sent after it logged in, in rooms
/// and direct conversations, and is told once per conversation that what came before is not
/// readable there.
async fn second_device(net: Net) {
    let w = World::start(&["alice", "bob"], &[], net).await;
    let st: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.join("lab", None).await.expect("bob joins");
    let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
    let before = texts("dm-before-second-device", 3);
    for t in &before {
        alice.send_to_users(&["bob".into()], t).await.expect("dm");
    }
    read_all(&mut b_ev, &dm, &before).await;
    send_all(&alice, "lab", &texts("room-before-second-device", 3)).await;
    // The second device, while the first is offline: nothing of the above was acknowledged
    // by the first yet, so the catch-up brings it there too.
    bob.close();
    drop((bob, b_ev));
    let (bob2, mut b2_ev) = w.connect("bob", st[2].path()).await;
    let want = texts("room-after-second-device", 3);
    send_all(&alice, "lab", &want).await;
    let notices = read_all(&mut b2_ev, &room("lab"), &want).await;
    let dm_want = texts("dm-after-second-device", 3);
    for t in &dm_want {
        alice.send_to_users(&["bob".into()], t).await.expect("dm");
    }
    let more = read_all(&mut b2_ev, &dm, &dm_want).await;
    let unreadable: Vec<&E2eeNotice> = notices
        .iter()
        .chain(more.iter())
        .filter(|n| matches!(n, E2eeNotice::Unreadable { .. }))
        .collect();
    let per_conv = |c: &Conv| {
        unreadable
            .iter()
            .filter(|n| matches!(n, E2eeNotice::Unreadable { conv, .. } if conv == c))
            .count()
    };
    assert!(
        per_conv(&room("lab")) <= 1 && per_conv(&dm) <= 1,
        "{unreadable:?}"
    );
    // The new device's history of the direct conversation: its own, never MLS rows.
    let h = bob2
        .history(ConvRef::With(vec!["alice".into()]), 50, None)
        .await
        .expect("history");
    assert!(
        h.iter()
            .all(|m| !m.body.content_type.starts_with("application/mls-"))
    );
    assert!(
        h.iter()
            .filter_map(|m| m.body.as_text())
            .any(|t| t == dm_want[0])
    );
    // Both devices online: both read.
    let (_bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    let both = texts("both-devices", 2);
    send_all(&alice, "lab", &both).await;
    read_all(&mut b_ev, &room("lab"), &both).await;
    read_all(&mut b2_ev, &room("lab"), &both).await;
}

/// A file sent right after someone joins (and after they left and came back) is offered to
/// them with its real name and opens intact: its description is an MLS message like any.
async fn file_after_join(net: Net) {
    let w = World::start(&["alice", "bob"], &[], net).await;
    let st: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = w.connect("alice", st[0].path()).await;
    let (bob, mut b_ev) = w.connect("bob", st[1].path()).await;
    alice
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    let src_dir = tempfile::tempdir().expect("src");
    let inbox = tempfile::tempdir().expect("inbox");
    for round in 0..2 {
        if round == 1 {
            bob.part("lab").await.expect("bob leaves");
        }
        bob.join("lab", None).await.expect("bob joins");
        let name = format!("notes-{round}.txt");
        let src = src_dir.path().join(&name);
        let content: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8 ^ round).collect();
        std::fs::write(&src, &content).expect("write");
        let sent = alice
            .send_file_any(
                &src,
                conclave_client::proto::Target::Room {
                    room: "lab".into(),
                    except: vec![],
                },
                Default::default(),
            )
            .await
            .expect("send file");
        let offer = tokio::time::timeout(WAIT, async {
            loop {
                match b_ev.recv().await.expect("events go on") {
                    ClientEvent::Server(Event::FileOffer(o)) if o.file_id == sent.file_id => {
                        return o;
                    }
                    ClientEvent::E2ee(E2eeNotice::Unreadable { reason, .. })
                        if reason != BEFORE_JOIN && reason != NOT_MEMBER =>
                    {
                        panic!("unreadable: {reason}")
                    }
                    _ => {}
                }
            }
        })
        .await
        .expect("the offer comes, described");
        assert_eq!(offer.name, name);
        // The list of pending files names it too (the server lists the ciphertext's name).
        let pending = bob.pending_files().await.expect("files");
        assert!(
            pending
                .iter()
                .any(|o| o.file_id == sent.file_id && o.name == name),
            "{pending:?}"
        );
        let got = bob
            .accept_file(&sent.file_id, inbox.path(), Default::default())
            .await
            .expect("accept");
        assert_eq!(std::fs::read(&got.path).expect("read"), content);
    }
}

/// A room made on one device of an account is the account's on its other devices too: they
/// read it and send to it end to end (never a readable body to the server).
async fn room_of_another_device(net: Net) {
    let w = World::start(&["alice", "bob"], &[], net).await;
    let st: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, mut a_ev) = w.connect("alice", st[0].path()).await;
    let (bob1, _b1_ev) = w.connect("bob", st[1].path()).await;
    let (bob2, mut b2_ev) = w.connect("bob", st[2].path()).await;
    bob1.create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    alice.join("lab", None).await.expect("alice joins");
    let from_bob2 = texts("from-the-other-device", 2);
    send_all(&bob2, "lab", &from_bob2).await;
    read_all(&mut a_ev, &room("lab"), &from_bob2).await;
    let want = texts("to-both-devices", 2);
    send_all(&alice, "lab", &want).await;
    read_all(&mut b2_ev, &room("lab"), &want).await;
}

macro_rules! at_every_setting {
    ($case:ident) => {
        mod $case {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn direct() {
                super::$case(Net::Direct).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn relay_half_ms() {
                super::$case(Net::Delay(500)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn relay_5_ms() {
                super::$case(Net::Delay(5_000)).await;
            }
            /// 50 ms one way: slow; `cargo test -- --ignored` or `scripts/lifecycle.sh`.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore]
            async fn relay_50_ms() {
                super::$case(Net::Delay(50_000)).await;
            }
        }
    };
}

at_every_setting!(joiner_reads_what_follows_the_join);
at_every_setting!(part_then_rejoin);
at_every_setting!(ban_then_unban);
at_every_setting!(kick_unban_rejoin);
at_every_setting!(invite_leave_reinvite);
at_every_setting!(second_device);
at_every_setting!(file_after_join);
at_every_setting!(room_of_another_device);
