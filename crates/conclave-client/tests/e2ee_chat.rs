//! Edits, deletes, reactions and replies in an end-to-end room, with the real server and real
//! clients: they are MLS application messages, members apply them to their own history, the
//! server checks the rules from the reference alone, and a removed member gets none of them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, add_users, connect_e2ee as connect, grep_dir};
use conclave_client::e2ee::E2eeNotice;
use conclave_client::proto::{ActKind, Conv, ConvRef, ErrorCode, Event, Message, Request};
use conclave_client::{Client, ClientError, ClientEvent, Events};

const WAIT: Duration = Duration::from_secs(30);

/// The next message event in room `room` (bounded).
async fn next_in(events: &mut Events, room: &str) -> Message {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await.expect("events go on") {
                ClientEvent::Server(Event::Message(m))
                    if matches!(&m.conv, Conv::Room(r) if r == room) =>
                {
                    return m;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("a message in time")
}

fn act_of(m: &Message) -> Option<(String, ActKind)> {
    m.extra
        .as_ref()
        .and_then(|x| x.acts_on.as_ref())
        .map(|a| (a.msg_id.clone(), a.kind))
}

async fn local(c: &Client, room: &str) -> Vec<Message> {
    c.history(ConvRef::Room(room.into()), 50, None)
        .await
        .expect("history")
}

/// A server with Alice, Bob and Carol, each with an end-to-end device (their state
/// directories kept here), all three in the end-to-end room `lab`.
struct Lab {
    srv: TestServer,
    _states: Vec<tempfile::TempDir>,
}

async fn three_in_lab() -> (Lab, [(Client, Events); 3]) {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob", "carol"]);
    let srv = TestServer::start(dir, "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let states: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let alice = connect(&srv, "alice", states[0].path()).await;
    let bob = connect(&srv, "bob", states[1].path()).await;
    let carol = connect(&srv, "carol", states[2].path()).await;
    alice
        .0
        .create_room_e2ee("lab", false, None)
        .await
        .expect("create");
    bob.0.join("lab", None).await.expect("bob joins");
    carol.0.join("lab", None).await.expect("carol joins");
    let lab = Lab {
        srv,
        _states: states,
    };
    (lab, [alice, bob, carol])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acts_in_an_end_to_end_room_are_mls_messages_applied_by_each_member() {
    let (lab, [(alice, mut a_ev), (bob, mut b_ev), (carol, mut c_ev)]) = three_in_lab().await;
    let dir = lab.srv.dir.clone();

    let old = "typo-in-the-plan-zq1";
    let sent = alice.send_to_room("lab", old, &[]).await.expect("send");
    assert_eq!(next_in(&mut b_ev, "lab").await.msg_id, sent.msg_id);
    assert_eq!(next_in(&mut c_ev, "lab").await.msg_id, sent.msg_id);

    // Only the author edits: the server refuses from the reference alone.
    match bob.edit(&sent.msg_id, "bob's version").await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    let new = "the-plan-fixed-zq2";
    alice.edit(&sent.msg_id, new).await.expect("edit");
    for ev in [&mut b_ev, &mut c_ev] {
        let m = next_in(ev, "lab").await;
        assert_eq!(act_of(&m), Some((sent.msg_id.clone(), ActKind::Edit)));
        assert_eq!(m.body.as_text(), Some(new));
    }
    // The server saw only ciphertext: neither text is in its files.
    for needle in [old, new] {
        assert!(
            grep_dir(dir.path(), needle.as_bytes()).is_empty(),
            "{needle} on the server"
        );
    }
    // A reply and a reaction.
    let answer = bob.reply(&sent.msg_id, "agreed").await.expect("reply");
    let m = next_in(&mut a_ev, "lab").await;
    assert_eq!(
        m.extra.as_ref().and_then(|x| x.reply_to.clone()),
        Some(sent.msg_id.clone())
    );
    bob.react(&sent.msg_id, "👍", true).await.expect("react");
    assert_eq!(
        act_of(&next_in(&mut a_ev, "lab").await),
        Some((sent.msg_id.clone(), ActKind::React))
    );
    // Carol got both too, before her removal below.
    assert_eq!(next_in(&mut c_ev, "lab").await.msg_id, answer.msg_id);
    assert_eq!(
        act_of(&next_in(&mut c_ev, "lab").await),
        Some((sent.msg_id.clone(), ActKind::React))
    );
    // Each member's local history holds the current state, the edit applied.
    for c in [&alice, &carol] {
        let h = local(c, "lab").await;
        let m = h
            .iter()
            .find(|m| m.msg_id == sent.msg_id)
            .expect("in history");
        assert_eq!(m.body.as_text(), Some(new));
        let st = m
            .extra
            .as_ref()
            .and_then(|x| x.state.clone())
            .expect("state");
        assert_eq!(st.edits, 1);
        assert_eq!(st.reactions[0].users, vec!["bob".to_string()]);
        assert!(
            h.iter().all(|m| act_of(m).is_none()),
            "acts are not history items"
        );
        let r = h
            .iter()
            .find(|m| m.msg_id == answer.msg_id)
            .expect("reply kept");
        assert_eq!(
            r.extra.as_ref().and_then(|x| x.reply_to.clone()),
            Some(sent.msg_id.clone())
        );
    }

    // Carol is removed; what follows reaches the others, never her.
    alice
        .request(Request::Kick {
            room: Some("lab".into()),
            user: "carol".into(),
            reason: None,
        })
        .await
        .expect("kick");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(ClientEvent::E2ee(E2eeNotice::Members { removed, .. })) = b_ev.recv().await
                && removed.iter().any(|r| r.starts_with("carol/"))
            {
                return;
            }
        }
    })
    .await
    .expect("carol removed in time");
    alice.delete(&sent.msg_id).await.expect("delete");
    let m = next_in(&mut b_ev, "lab").await;
    assert_eq!(act_of(&m), Some((sent.msg_id.clone(), ActKind::Delete)));
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(e) = c_ev.recv().await {
            if let ClientEvent::Server(Event::Message(m)) = &e {
                assert!(act_of(m).is_none(), "a removed member got {m:?}");
            }
        }
    })
    .await;
    // Deleted on the members' devices: no text left in their local history.
    for c in [&alice, &bob] {
        let h = local(c, "lab").await;
        let m = h
            .iter()
            .find(|m| m.msg_id == sent.msg_id)
            .expect("still listed");
        assert!(m.body.data.is_empty());
        assert!(
            m.extra
                .as_ref()
                .and_then(|x| x.state.as_ref())
                .is_some_and(|s| s.deleted)
        );
    }
    drop((alice, bob, carol));
    lab.srv.stop(WAIT).await;
}

/// Through the test kit's relay (5 ms one way with jitter), a member sees each message before
/// its edit and reaction, in a server-encrypted and in an end-to-end room, and ends with the
/// same history as the author.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_relay_every_act_comes_after_its_message() {
    use common::relay::{Relay, RelayConfig};
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    add_users(dir.path(), &["alice", "bob"]);
    let srv = TestServer::start(dir.clone(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
    let relay = Relay::start(srv.addr, RelayConfig::delay_ms(5.0, 0x20a));
    let states: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("state"))
        .collect();
    let (alice, _a_ev) = connect(&srv, "alice", states[0].path()).await;
    let (bob, b_ev) = common::connect_via(&srv, &relay.addr(), "bob", states[1].path(), WAIT).await;
    let mut b_ev = bob
        .enable_e2ee(b_ev, states[1].path(), common::PASSWORD)
        .await
        .expect("e2ee on");
    alice
        .create_room("plain", false, None)
        .await
        .expect("plain room");
    alice
        .create_room_e2ee("sealed", false, None)
        .await
        .expect("e2ee room");
    for room in ["plain", "sealed"] {
        bob.join(room, None).await.expect("join");
        let mut ids = Vec::new();
        for i in 0..5 {
            let sent = alice
                .send_to_room(room, &format!("draft {i}"), &[])
                .await
                .expect("send");
            alice
                .edit(&sent.msg_id, &format!("final {i}"))
                .await
                .expect("edit");
            alice.react(&sent.msg_id, "✅", true).await.expect("react");
            ids.push(sent.msg_id);
        }
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..15 {
            let m = next_in(&mut b_ev, room).await;
            match act_of(&m) {
                None => seen.push(format!("msg {}", m.msg_id)),
                Some((target, ActKind::Edit)) => {
                    assert!(
                        seen.contains(&format!("msg {target}")),
                        "{room}: edit before its message"
                    );
                    seen.push(format!("edit {target}"));
                }
                Some((target, _)) => {
                    assert!(
                        seen.contains(&format!("edit {target}")),
                        "{room}: reaction before the edit"
                    );
                    seen.push(format!("react {target}"));
                }
            }
        }
        let expected: Vec<String> = ids
            .iter()
            .flat_map(|id| {
                [
                    format!("msg {id}"),
                    format!("edit {id}"),
                    format!("react {id}"),
                ]
            })
            .collect();
        assert_eq!(seen, expected, "{room}");
        let theirs = local(&bob, room).await;
        let mine = local(&alice, room).await;
        let view = |h: &[Message]| -> Vec<(String, Option<String>, usize)> {
            h.iter()
                .filter(|m| ids.contains(&m.msg_id))
                .map(|m| {
                    (
                        m.msg_id.clone(),
                        m.body.as_text().map(str::to_string),
                        m.extra
                            .as_ref()
                            .and_then(|x| x.state.as_ref())
                            .map_or(0, |s| s.reactions.len()),
                    )
                })
                .collect()
        };
        assert_eq!(view(&theirs), view(&mine), "{room}");
        assert_eq!(view(&mine).len(), 5, "{room}");
        assert!(
            view(&mine)
                .iter()
                .all(|(_, t, r)| t.as_deref().is_some_and(|t| t.starts_with("final")) && *r == 1)
        );
    }
    drop((alice, bob));
    srv.stop(WAIT).await;
}

/// A thread of an end-to-end room is read from each device's own history (the server holds
/// only ciphertext): the root then its replies in order, readable, including a reply that
/// left someone out (a blockcast keeps its `reply_to`); the one left out has the root and the
/// other replies but never that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_of_an_end_to_end_room_come_from_local_history() {
    use conclave_client::proto::{Body, Refs, Target};
    let (lab, [(alice, mut a_ev), (bob, mut b_ev), (carol, mut c_ev)]) = three_in_lab().await;

    let root = alice
        .send_to_room("lab", "which cable for the rig", &[])
        .await
        .expect("root");
    for ev in [&mut b_ev, &mut c_ev] {
        assert_eq!(next_in(ev, "lab").await.msg_id, root.msg_id);
    }
    let first = bob
        .reply(&root.msg_id, "the blue one")
        .await
        .expect("reply");
    let unrelated = carol
        .send_to_room("lab", "lunch at noon", &[])
        .await
        .expect("unrelated");
    // Bob answers again, leaving carol out (a blockcast in an end-to-end room).
    let refs = Refs {
        reply_to: Some(root.msg_id.clone()),
        acts_on: None,
    };
    let hidden = bob
        .send_with_refs(
            Target::Room {
                room: "lab".into(),
                except: vec!["carol".into()],
            },
            Body::text("carol borrowed it"),
            None,
            Some(Box::new(refs)),
        )
        .await
        .expect("blockcast reply");
    // An act cannot leave anyone out.
    let act = Refs {
        reply_to: None,
        acts_on: Some(conclave_client::proto::ActsOn {
            msg_id: root.msg_id.clone(),
            kind: ActKind::React,
        }),
    };
    bob.send_with_refs(
        Target::Room {
            room: "lab".into(),
            except: vec!["carol".into()],
        },
        Body::text("👍"),
        None,
        Some(Box::new(act)),
    )
    .await
    .expect_err("an act with except is refused");

    // Alice sees the blockcast reply live, readable, with its reference.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(next_in(&mut a_ev, "lab").await);
    }
    let live = seen
        .iter()
        .find(|m| m.msg_id == hidden.msg_id)
        .expect("the blockcast reply came");
    assert_eq!(live.body.as_text(), Some("carol borrowed it"));
    assert_eq!(
        live.extra.as_ref().and_then(|x| x.reply_to.clone()),
        Some(root.msg_id.clone())
    );

    let ids = |t: &[Message]| t.iter().map(|m| m.msg_id.clone()).collect::<Vec<_>>();
    for c in [&alice, &bob] {
        let t = c.thread(&root.msg_id, 50, None).await.expect("thread");
        assert_eq!(
            ids(&t),
            vec![
                root.msg_id.clone(),
                first.msg_id.clone(),
                hidden.msg_id.clone()
            ]
        );
        assert_eq!(t[1].body.as_text(), Some("the blue one"));
        assert_eq!(t[2].body.as_text(), Some("carol borrowed it"));
        // Paged: after the first reply, at most one.
        let t = c
            .thread(&root.msg_id, 1, Some(first.seq))
            .await
            .expect("thread page");
        assert_eq!(ids(&t), vec![root.msg_id.clone(), hidden.msg_id.clone()]);
    }
    // Carol: the root and the reply she was meant to see, once it has come.
    tokio::time::timeout(WAIT, async {
        loop {
            let t = carol.thread(&root.msg_id, 50, None).await.expect("thread");
            if t.len() >= 2 {
                assert_eq!(ids(&t), vec![root.msg_id.clone(), first.msg_id.clone()]);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("carol's thread in time");
    assert!(
        ids(&carol.thread(&root.msg_id, 50, None).await.expect("thread"))
            .iter()
            .all(|id| *id != unrelated.msg_id && *id != hidden.msg_id)
    );
    drop((alice, bob, carol));
    lab.srv.stop(WAIT).await;
}
