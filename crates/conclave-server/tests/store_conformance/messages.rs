//! The conformance tests of `Messages`: the same behaviour from SQLite's `Db` and `PgDb`.

use conclave_proto::{ActKind, ActsOn, Body, Conv, Message, Reaction, Refs};
use conclave_server::search;
use conclave_server::store::{Appended, NewMessage, Retention, RoomRow};

use super::Tested;

pub(crate) fn lobby() -> Conv {
    Conv::Room("lobby".into())
}

pub(crate) fn direct(a: &str, b: &str) -> Conv {
    Conv::Direct(vec![a.to_string(), b.to_string()])
}

/// A text message, no exceptions, no key, no refs.
pub(crate) fn text(conv: &Conv, from: &str, text: &str) -> NewMessage {
    NewMessage {
        conv: conv.clone(),
        from: from.into(),
        body: Body::text(text),
        except: Vec::new(),
        idempotency_key: None,
        refs: None,
    }
}

fn keyed(conv: &Conv, from: &str, body: &str, key: &str) -> NewMessage {
    NewMessage {
        idempotency_key: Some(key.into()),
        ..text(conv, from, body)
    }
}

fn act(conv: &Conv, from: &str, body: &str, target: &str, kind: ActKind) -> NewMessage {
    NewMessage {
        refs: Some(Box::new(Refs {
            reply_to: None,
            acts_on: Some(ActsOn {
                msg_id: target.into(),
                kind,
            }),
        })),
        ..text(conv, from, body)
    }
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

fn texts(msgs: &[Message]) -> Vec<&str> {
    msgs.iter()
        .map(|m| m.body.as_text().unwrap_or("?"))
        .collect()
}

fn append(s: &mut dyn Tested, batch: &[NewMessage]) -> Vec<Appended> {
    s.append_batch(batch).expect("append a batch")
}

/// Users and a room `lobby` with `members` (the room row needs its members as accounts).
fn setup(s: &mut dyn Tested, users: &[&str], members: &[&str]) {
    for u in users {
        s.create_user(u, "h", false).expect("create user");
    }
    s.create_room(&RoomRow {
        name: "lobby".into(),
        private: false,
        pw_hash: None,
        owner: None,
        members: Vec::new(),
        invited: Vec::new(),
        votekick: true,
    })
    .expect("create lobby");
    for m in members {
        s.add_member("lobby", m).expect("join lobby");
    }
}

/// Appends get gap-free numbers per conversation from 1, in batch order, one id each; history
/// returns them as stored, oldest first, pages before a number, and leaves out a blockcast
/// message for whom it excluded.
pub(crate) fn messages_append_and_history(s: &mut dyn Tested) {
    let dm = direct("alice", "bob");
    let out = append(
        s,
        &[
            text(&lobby(), "alice", "one"),
            text(&dm, "alice", "psst"),
            text(&lobby(), "bob", "two"),
            NewMessage {
                except: vec!["carol".into()],
                ..text(&lobby(), "alice", "not for carol")
            },
        ],
    );
    assert_eq!(
        out.iter().map(|a| a.msg.seq).collect::<Vec<_>>(),
        [1, 1, 2, 3]
    );
    assert!(out.iter().all(|a| !a.duplicate));
    assert!(out.iter().all(|a| a.msg.ts_ms > 0 && a.msg.extra.is_none()));
    let mut ids: Vec<&str> = out.iter().map(|a| a.msg.msg_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "one id per message");
    assert_eq!(out[3].except, ["carol"]);
    // A second batch continues the numbers.
    let more = append(s, &[text(&lobby(), "bob", "four")]);
    assert_eq!(more[0].msg.seq, 4);

    let page = s.history(&lobby(), "bob", None, 10).expect("history");
    assert_eq!(seqs(&page), [1, 2, 3, 4]);
    assert_eq!(texts(&page), ["one", "two", "not for carol", "four"]);
    assert_eq!(page[0], out[0].msg, "history returns the message as stored");
    assert_eq!(
        seqs(&s.history(&lobby(), "carol", None, 10).expect("history")),
        [1, 2, 4],
        "blockcast: not for carol"
    );
    assert_eq!(
        seqs(&s.history(&lobby(), "bob", Some(4), 2).expect("history")),
        [2, 3],
        "the newest two before 4"
    );
    assert!(
        s.history(&lobby(), "bob", Some(1), 10)
            .expect("history")
            .is_empty()
    );
    assert!(
        s.history(&lobby(), "bob", None, 0)
            .expect("history")
            .is_empty()
    );
    assert_eq!(
        texts(&s.history(&dm, "bob", None, 10).expect("history")),
        ["psst"]
    );
    assert!(
        s.history(&Conv::Room("nowhere".into()), "bob", None, 10)
            .expect("history of an unknown conversation")
            .is_empty()
    );
    // Non-text bodies come back byte for byte.
    let blob = NewMessage {
        body: Body {
            content_type: "application/octet-stream".into(),
            data: vec![0, 255, 7, 0],
        },
        ..text(&lobby(), "alice", "")
    };
    let stored = append(s, std::slice::from_ref(&blob));
    let page = s.history(&lobby(), "bob", None, 1).expect("history");
    assert_eq!(page[0].body, blob.body);
    assert_eq!(page[0], stored[0].msg);
    assert_eq!(s.integrity_check().expect("check"), "ok");
}

/// A retry (same sender, same idempotency key) is answered with the first message's id and
/// number and writes nothing; within one batch too; another sender's same key is its own.
pub(crate) fn messages_idempotency(s: &mut dyn Tested) {
    let first = append(s, &[keyed(&lobby(), "alice", "hello", "k1")]);
    assert!(!first[0].duplicate);
    let again = append(s, &[keyed(&lobby(), "alice", "hello", "k1")]);
    assert!(again[0].duplicate);
    assert_eq!(
        (
            again[0].msg.msg_id.as_str(),
            again[0].msg.seq,
            again[0].msg.ts_ms
        ),
        (first[0].msg.msg_id.as_str(), 1, first[0].msg.ts_ms)
    );
    let batch = append(
        s,
        &[
            keyed(&lobby(), "alice", "a", "k2"),
            keyed(&lobby(), "alice", "a", "k2"),
            keyed(&lobby(), "bob", "b", "k2"),
            keyed(&lobby(), "alice", "hello", "k1"),
            text(&lobby(), "alice", "no key"),
        ],
    );
    assert_eq!(
        batch
            .iter()
            .map(|a| (a.msg.seq, a.duplicate))
            .collect::<Vec<_>>(),
        [(2, false), (2, true), (3, false), (1, true), (4, false)]
    );
    assert_eq!(batch[0].msg.msg_id, batch[1].msg.msg_id);
    let page = s.history(&lobby(), "carol", None, 10).expect("history");
    assert_eq!(seqs(&page), [1, 2, 3, 4], "nothing written twice, no gap");
    assert_eq!(texts(&page), ["hello", "a", "b", "no key"]);
    let next = append(s, &[text(&lobby(), "alice", "after")]);
    assert_eq!(next[0].msg.seq, 5);
}

/// Acks move forward only; catch-up gives what came after the client's cursor, else after
/// the acknowledged position, for rooms joined and direct conversations, without blockcast
/// messages for whom they excluded; joining does not count what came before as missed.
pub(crate) fn messages_ack_and_catch_up(s: &mut dyn Tested) {
    setup(s, &["alice", "bob", "carol"], &["alice"]);
    append(s, &[text(&lobby(), "alice", "before bob")]);
    s.add_member("lobby", "bob").expect("bob joins");
    let dm = direct("alice", "bob");
    append(
        s,
        &[
            text(&lobby(), "alice", "l2"),
            text(&lobby(), "alice", "l3"),
            text(&dm, "alice", "d1"),
            NewMessage {
                except: vec!["bob".into()],
                ..text(&lobby(), "alice", "l4 not for bob")
            },
            text(&lobby(), "alice", "l5"),
        ],
    );
    let by_conv = |msgs: &[Message]| {
        let mut v: Vec<(String, u64)> = msgs
            .iter()
            .map(|m| (conclave_server::store::conv_key(&m.conv), m.seq))
            .collect();
        // Each conversation in order; conversations in no promised order.
        let conv_sorted = {
            let mut w = v.clone();
            w.sort();
            w
        };
        let mut in_conv_order = v.clone();
        in_conv_order.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(in_conv_order, conv_sorted, "each conversation in order");
        v.sort();
        v
    };
    let (got, truncated) = s.catch_up("bob", &[], 100, 100).expect("catch up");
    assert!(!truncated);
    assert_eq!(
        by_conv(&got),
        [
            ("d:alice,bob".to_string(), 1),
            ("r:lobby".to_string(), 2),
            ("r:lobby".to_string(), 3),
            ("r:lobby".to_string(), 5)
        ]
    );
    let l2 = got.iter().find(|m| m.seq == 2).expect("l2");
    assert_eq!(l2.body.as_text(), Some("l2"));
    assert_eq!(l2.from, "alice");

    s.ack("bob", &[(lobby(), 3), (dm.clone(), 1)]).expect("ack");
    s.ack("bob", &[(lobby(), 1)]).expect("ack backwards");
    s.ack("bob", &[(Conv::Room("nowhere".into()), 9)])
        .expect("ack of an unknown conversation");
    s.ack("bob", &[]).expect("ack of nothing");
    let (got, _) = s.catch_up("bob", &[], 100, 100).expect("catch up");
    assert_eq!(by_conv(&got), [("r:lobby".to_string(), 5)]);
    // The client's cursor wins over the acknowledged position, both ways.
    let (got, _) = s
        .catch_up("bob", &[(lobby(), 1), (dm.clone(), 0)], 100, 100)
        .expect("catch up");
    assert_eq!(
        by_conv(&got),
        [
            ("d:alice,bob".to_string(), 1),
            ("r:lobby".to_string(), 2),
            ("r:lobby".to_string(), 3),
            ("r:lobby".to_string(), 5)
        ]
    );
    let (got, _) = s
        .catch_up("bob", &[(lobby(), 5)], 100, 100)
        .expect("catch up");
    assert!(got.is_empty());
    // Carol is in no conversation.
    let (got, truncated) = s.catch_up("carol", &[], 100, 100).expect("catch up");
    assert!(got.is_empty() && !truncated);
}

/// Catch-up keeps the newest `per_conv` of a conversation and `total` in all, and says that
/// something was left out.
pub(crate) fn messages_catch_up_limits(s: &mut dyn Tested) {
    setup(s, &["alice", "bob"], &["alice", "bob"]);
    let batch: Vec<NewMessage> = (1..=6)
        .map(|i| text(&lobby(), "alice", &format!("m{i}")))
        .collect();
    append(s, &batch);
    let (got, truncated) = s.catch_up("bob", &[], 4, 100).expect("catch up");
    assert_eq!((seqs(&got), truncated), (vec![3, 4, 5, 6], true));
    let (got, truncated) = s.catch_up("bob", &[], 100, 2).expect("catch up");
    assert_eq!((seqs(&got), truncated), (vec![5, 6], true));
    let (got, truncated) = s
        .catch_up("bob", &[(lobby(), 4)], 2, 100)
        .expect("catch up");
    assert_eq!((seqs(&got), truncated), (vec![5, 6], false));
    let (got, truncated) = s.catch_up("bob", &[], 0, 100).expect("catch up");
    assert_eq!((seqs(&got), truncated), (vec![], true));
}

/// Search finds the messages with every word (normalised), newest first, in the rooms given
/// and, if asked, the viewer's direct conversations; pages on with `before`; leaves out
/// blockcast messages for whom they excluded; follows edits and deletes.
pub(crate) fn messages_search(s: &mut dyn Tested) {
    let dm = direct("alice", "bob");
    let other = Conv::Room("other".into());
    let out = append(
        s,
        &[
            text(&lobby(), "alice", "We deploy at five"),
            text(&lobby(), "bob", "DEPLOY six?"),
            text(&lobby(), "alice", "lunch"),
            text(&dm, "alice", "déploy and deploy"),
            text(&other, "alice", "deploy elsewhere"),
            NewMessage {
                except: vec!["bob".into()],
                ..text(&lobby(), "alice", "deploy secretly")
            },
        ],
    );
    let q = |w: &str| search::words(w);
    let lobby_only = ["lobby".to_string()];
    let found = s
        .search("bob", &lobby_only, false, &q("deploy"), None, 10)
        .expect("search");
    assert_eq!(texts(&found), ["DEPLOY six?", "We deploy at five"]);
    assert_eq!(found[1], out[0].msg);
    assert_eq!(
        texts(
            &s.search("bob", &lobby_only, false, &q("Five DEPLOY"), None, 10)
                .expect("search")
        ),
        ["We deploy at five"]
    );
    assert_eq!(
        texts(
            &s.search("carol", &lobby_only, false, &q("deploy"), None, 10)
                .expect("search")
        ),
        ["deploy secretly", "DEPLOY six?", "We deploy at five"]
    );
    assert_eq!(
        texts(
            &s.search("bob", &lobby_only, true, &q("deploy"), None, 10)
                .expect("search")
        ),
        ["déploy and deploy", "DEPLOY six?", "We deploy at five"]
    );
    assert_eq!(
        texts(
            &s.search(
                "bob",
                &lobby_only,
                false,
                &q("deploy"),
                Some(&out[1].msg.msg_id),
                10
            )
            .expect("search")
        ),
        ["We deploy at five"]
    );
    assert_eq!(
        texts(
            &s.search("bob", &lobby_only, false, &q("deploy"), None, 1)
                .expect("search")
        ),
        ["DEPLOY six?"]
    );
    for (words, why) in [
        ("nothing", "no message has it"),
        ("deploy nothing", "every word must be there"),
        ("", "an empty query"),
    ] {
        assert!(
            s.search("bob", &lobby_only, true, &q(words), None, 10)
                .expect("search")
                .is_empty(),
            "{why}"
        );
    }
    assert!(
        s.search("bob", &[], false, &q("deploy"), None, 10)
            .expect("search")
            .is_empty()
    );
    assert!(
        s.search("bob", &["nowhere".into()], false, &q("deploy"), None, 10)
            .expect("search")
            .is_empty()
    );
    // An edit replaces the words, a delete drops them.
    let lunch = out[2].msg.msg_id.clone();
    append(
        s,
        &[act(&lobby(), "alice", "dinner", &lunch, ActKind::Edit)],
    );
    assert!(
        s.search("bob", &lobby_only, false, &q("lunch"), None, 10)
            .expect("search")
            .is_empty()
    );
    let found = s
        .search("bob", &lobby_only, false, &q("dinner"), None, 10)
        .expect("search");
    assert_eq!(texts(&found), ["dinner"]);
    assert_eq!(found[0].msg_id, lunch);
    assert_eq!(
        found[0]
            .extra
            .as_ref()
            .and_then(|e| e.state.as_ref())
            .map(|st| st.edits),
        Some(1)
    );
    append(
        s,
        &[act(
            &lobby(),
            "alice",
            "",
            &out[0].msg.msg_id,
            ActKind::Delete,
        )],
    );
    assert_eq!(
        texts(
            &s.search("bob", &lobby_only, false, &q("deploy"), None, 10)
                .expect("search")
        ),
        ["DEPLOY six?"]
    );
    s.flush_index().expect("flush");
    s.optimize_index().expect("optimize");
    assert_eq!(
        texts(
            &s.search("bob", &lobby_only, false, &q("deploy"), None, 10)
                .expect("search")
        ),
        ["DEPLOY six?"]
    );
}

/// Edits, deletes and reactions in a server-encrypted conversation are stored as messages and
/// applied to their target: history shows the target's state and not the acts; catch-up and
/// ranges deliver the acts in order. In an end-to-end conversation nothing is applied.
pub(crate) fn messages_acts(s: &mut dyn Tested) {
    setup(s, &["alice", "bob"], &["alice", "bob"]);
    let out = append(
        s,
        &[
            text(&lobby(), "alice", "first"),
            text(&lobby(), "alice", "second"),
        ],
    );
    let (first, second) = (out[0].msg.msg_id.clone(), out[1].msg.msg_id.clone());
    // An edit in the same batch as its target, another later, reactions, a reply.
    let acts = append(
        s,
        &[
            text(&lobby(), "bob", "third"),
            act(&lobby(), "alice", "first, edited", &first, ActKind::Edit),
            act(&lobby(), "bob", "👍", &first, ActKind::React),
            act(&lobby(), "alice", "👍", &first, ActKind::React),
            act(&lobby(), "bob", "👍", &first, ActKind::React),
            act(&lobby(), "bob", "🎉", &second, ActKind::React),
            act(&lobby(), "bob", "🎉", &second, ActKind::Unreact),
            NewMessage {
                refs: Some(Box::new(Refs {
                    reply_to: Some(second.clone()),
                    acts_on: None,
                })),
                ..text(&lobby(), "bob", "a reply")
            },
        ],
    );
    assert_eq!(
        acts.iter().map(|a| a.msg.seq).collect::<Vec<_>>(),
        (3..=10).collect::<Vec<u64>>()
    );
    let edit = acts[1].msg.extra.as_ref().expect("an act has extra");
    assert_eq!(
        edit.acts_on,
        Some(ActsOn {
            msg_id: first.clone(),
            kind: ActKind::Edit
        })
    );
    append(
        s,
        &[act(
            &lobby(),
            "alice",
            "first, edited twice",
            &first,
            ActKind::Edit,
        )],
    );
    let page = s.history(&lobby(), "bob", None, 20).expect("history");
    assert_eq!(
        seqs(&page),
        [1, 2, 3, 10],
        "applied acts are not in history"
    );
    assert_eq!(
        texts(&page),
        ["first, edited twice", "second", "third", "a reply"]
    );
    let st = page[0]
        .extra
        .as_ref()
        .and_then(|e| e.state.clone())
        .expect("state");
    assert_eq!(st.edits, 2);
    assert!(st.edited_ms.is_some() && !st.deleted);
    assert_eq!(
        st.reactions,
        [Reaction {
            emoji: "👍".into(),
            users: vec!["bob".into(), "alice".into()]
        }]
    );
    assert!(
        page[1].extra.is_none(),
        "a reaction withdrawn leaves no state"
    );
    assert_eq!(
        page[3].extra.as_ref().and_then(|e| e.reply_to.clone()),
        Some(second.clone())
    );
    // Catch-up delivers every act in order, without state.
    let (got, _) = s
        .catch_up("bob", &[(lobby(), 0)], 100, 100)
        .expect("catch up");
    assert_eq!(seqs(&got), (1..=11).collect::<Vec<u64>>());
    assert!(
        got.iter()
            .all(|m| m.extra.as_ref().is_none_or(|e| e.state.is_none()))
    );
    // The earlier edit's text is obsolete: emptied; the latest stays.
    assert_eq!(got[3].body.as_text(), Some(""));
    assert_eq!(got[10].body.as_text(), Some("first, edited twice"));
    assert_eq!(got[0].body.as_text(), Some("first, edited twice"));

    // A delete empties the target and every act on it, itself included.
    append(s, &[act(&lobby(), "alice", "", &first, ActKind::Delete)]);
    // An act on a deleted message is stored but changes nothing.
    append(s, &[act(&lobby(), "bob", "back", &first, ActKind::Edit)]);
    let page = s.history(&lobby(), "bob", None, 20).expect("history");
    assert_eq!(texts(&page), ["", "second", "third", "a reply"]);
    let st = page[0]
        .extra
        .as_ref()
        .and_then(|e| e.state.clone())
        .expect("state");
    assert!(st.deleted && st.reactions.is_empty());
    let (got, _) = s
        .catch_up("bob", &[(lobby(), 0)], 100, 100)
        .expect("catch up");
    assert_eq!(seqs(&got), (1..=13).collect::<Vec<u64>>());
    for i in [3, 4, 5, 6, 10, 11] {
        assert_eq!(got[i].body.as_text(), Some(""), "act #{} emptied", i + 1);
    }
    assert_eq!(got[12].body.as_text(), Some("back"));

    // End-to-end: the act is stored, nothing is applied, and it is in history.
    let mls = |data: &[u8]| Body {
        content_type: "application/mls-message".into(),
        data: data.to_vec(),
    };
    let dm = direct("alice", "bob");
    let e2e = append(
        s,
        &[NewMessage {
            body: mls(b"ciphertext"),
            ..text(&dm, "alice", "")
        }],
    );
    append(
        s,
        &[NewMessage {
            body: mls(b"edit"),
            ..act(&dm, "alice", "", &e2e[0].msg.msg_id, ActKind::Edit)
        }],
    );
    let page = s.history(&dm, "bob", None, 10).expect("history");
    assert_eq!(seqs(&page), [1, 2]);
    assert_eq!(page[0].body, mls(b"ciphertext"));
    assert!(page[0].extra.is_none());
    assert_eq!(s.integrity_check().expect("check"), "ok");
}

/// Retention deletes a conversation's oldest messages by count or age (and their search
/// entries), returns how many, and numbering goes on after them.
pub(crate) fn messages_retention(s: &mut dyn Tested) {
    let other = Conv::Room("other".into());
    let batch: Vec<NewMessage> = (1..=10)
        .map(|i| text(&lobby(), "alice", &format!("word{i} common")))
        .chain((1..=3).map(|i| text(&other, "alice", &format!("other{i} common"))))
        .collect();
    append(s, &batch);
    let now = conclave_server::store::now_ms();
    let keep_four = |key: &str| match key {
        "r:lobby" => Retention {
            max_age_days: None,
            max_messages: Some(4),
        },
        _ => Retention::default(),
    };
    assert_eq!(s.apply_retention(now, &keep_four).expect("retention"), 6);
    assert_eq!(s.apply_retention(now, &keep_four).expect("again"), 0);
    assert_eq!(
        seqs(&s.history(&lobby(), "bob", None, 20).expect("history")),
        [7, 8, 9, 10]
    );
    assert_eq!(
        seqs(&s.history(&other, "bob", None, 20).expect("history")),
        [1, 2, 3]
    );
    let rooms = ["lobby".to_string(), "other".to_string()];
    assert!(
        s.search("bob", &rooms, false, &search::words("word3"), None, 10)
            .expect("search")
            .is_empty()
    );
    assert_eq!(
        s.search("bob", &rooms, false, &search::words("common"), None, 20)
            .expect("search")
            .len(),
        7
    );
    assert_eq!(s.integrity_check().expect("check"), "ok");
    // Nothing is old yet; two days on, everything older than a day goes.
    let a_day = |_: &str| Retention {
        max_age_days: Some(1),
        max_messages: None,
    };
    assert_eq!(s.apply_retention(now, &a_day).expect("retention"), 0);
    assert_eq!(
        s.apply_retention(now + 2 * 86_400_000, &a_day)
            .expect("retention"),
        7
    );
    assert!(
        s.history(&lobby(), "bob", None, 20)
            .expect("history")
            .is_empty()
    );
    let next = append(s, &[text(&lobby(), "alice", "after")]);
    assert_eq!(next[0].msg.seq, 11, "numbers go on after deleted messages");
    assert_eq!(s.integrity_check().expect("check"), "ok");
}

/// A range of a conversation: above `after`, up to `through`, at most `limit`, oldest first,
/// every message (acts and blockcast ones too) with its exceptions, and whether more remain.
pub(crate) fn messages_conv_range(s: &mut dyn Tested) {
    let out = append(
        s,
        &[
            text(&lobby(), "alice", "one"),
            NewMessage {
                except: vec!["carol".into(), "dave".into()],
                ..text(&lobby(), "alice", "two")
            },
            text(&lobby(), "bob", "three"),
            text(&direct("alice", "bob"), "bob", "dm"),
            text(&lobby(), "bob", "four"),
        ],
    );
    let edit = append(
        s,
        &[act(
            &lobby(),
            "alice",
            "one!",
            &out[0].msg.msg_id,
            ActKind::Edit,
        )],
    );
    let range = |s: &mut dyn Tested, after, through, limit| {
        let (msgs, more) = s
            .conv_range(&lobby(), after, through, limit)
            .expect("range");
        (msgs.iter().map(|a| a.msg.seq).collect::<Vec<_>>(), more)
    };
    assert_eq!(range(s, 0, None, 10), (vec![1, 2, 3, 4, 5], false));
    assert_eq!(range(s, 1, Some(4), 10), (vec![2, 3, 4], false));
    assert_eq!(range(s, 1, Some(4), 2), (vec![2, 3], true));
    assert_eq!(range(s, 1, Some(3), 2), (vec![2, 3], false));
    assert_eq!(range(s, 0, None, 5), (vec![1, 2, 3, 4, 5], false));
    assert_eq!(range(s, 0, None, 4), (vec![1, 2, 3, 4], true));
    assert_eq!(range(s, 5, None, 10), (vec![], false));
    assert_eq!(range(s, 0, None, 0), (vec![], true));
    assert_eq!(range(s, 3, Some(2), 10), (vec![], false));
    let (msgs, _) = s.conv_range(&lobby(), 1, Some(2), 10).expect("range");
    assert_eq!(msgs[0].except, ["carol", "dave"]);
    assert_eq!(msgs[0].msg, out[1].msg);
    assert!(!msgs[0].duplicate);
    // The act as it was appended; its target as edited, without state.
    let (msgs, _) = s.conv_range(&lobby(), 3, None, 10).expect("range");
    assert_eq!(msgs[0].msg, out[4].msg);
    assert_eq!(msgs[1].msg, edit[0].msg);
    let (msgs, _) = s.conv_range(&lobby(), 0, Some(1), 10).expect("range");
    assert_eq!(msgs[0].msg.body.as_text(), Some("one!"));
    assert!(msgs[0].msg.extra.is_none());
    let (msgs, more) = s
        .conv_range(&Conv::Room("nowhere".into()), 0, None, 10)
        .expect("range of an unknown conversation");
    assert!(msgs.is_empty() && !more);
}
