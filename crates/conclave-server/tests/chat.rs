//! Edits, deletes, replies, threads and reactions against a real server over real TLS: live
//! events, history, catch-up after being away, search, encryption at rest and every rule.

mod common;

use std::time::Duration;

use common::*;
use conclave_proto::chat::{ActKind, ActsOn, CONTENT_TYPE_DELETE, Refs};
use conclave_proto::*;

const PW: &str = "password123";

fn room(r: &str) -> Target {
    Target::Room {
        room: r.into(),
        except: vec![],
    }
}

fn act_req(target: Target, msg_id: &str, kind: ActKind, content: &str) -> Request {
    let body = match kind {
        ActKind::Delete => Body {
            content_type: CONTENT_TYPE_DELETE.into(),
            data: vec![],
        },
        _ => Body::text(content),
    };
    Request::Send {
        target,
        body,
        idempotency_key: None,
        refs: Some(Box::new(Refs {
            reply_to: None,
            acts_on: Some(ActsOn {
                msg_id: msg_id.into(),
                kind,
            }),
        })),
    }
}

fn reply_req(target: Target, reply_to: &str, text: &str) -> Request {
    Request::Send {
        target,
        body: Body::text(text),
        idempotency_key: None,
        refs: Some(Box::new(Refs {
            reply_to: Some(reply_to.into()),
            acts_on: None,
        })),
    }
}

fn sent_id(r: Result<Reply, ErrorBody>) -> (String, u64) {
    match r {
        Ok(Reply::Sent { msg_id, seq, .. }) => (msg_id, seq),
        other => panic!("not sent: {other:?}"),
    }
}

async fn history(c: &mut Raw, conv: ConvRef) -> Vec<Message> {
    match c
        .request(Request::History {
            conv,
            limit: 100,
            before: None,
        })
        .await
    {
        Ok(Reply::Messages(m)) => m,
        other => panic!("history: {other:?}"),
    }
}

async fn search(c: &mut Raw, q: &str) -> Vec<Message> {
    match c
        .request(Request::Search {
            query: q.into(),
            room: None,
            limit: 50,
            before: None,
        })
        .await
    {
        Ok(Reply::Results(m)) => m,
        other => panic!("search: {other:?}"),
    }
}

fn acts_on(m: &Message) -> Option<(&str, ActKind)> {
    m.extra
        .as_ref()
        .and_then(|x| x.acts_on.as_ref())
        .map(|a| (a.msg_id.as_str(), a.kind))
}

fn state(m: &Message) -> MsgState {
    m.extra
        .as_ref()
        .and_then(|x| x.state.clone())
        .unwrap_or_default()
}

fn find<'a>(ms: &'a [Message], id: &str) -> &'a Message {
    ms.iter()
        .find(|m| m.msg_id == id)
        .unwrap_or_else(|| panic!("{id} not in {ms:?}"))
}

#[tokio::test]
async fn edits_deletes_and_reactions_reach_members_live_and_history_shows_the_current_state() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut carol = Raw::register(&srv, "carol").await;

    let (id, _) = sent_id(alice.send_room("general", "deploy at fiev").await);
    assert_eq!(bob.message().await.msg_id, id);
    assert_eq!(carol.message().await.msg_id, id);

    // Edit: everyone else sees the act live, naming the message and carrying the new text.
    let (edit_id, _) = sent_id(
        alice
            .request(act_req(
                room("general"),
                &id,
                ActKind::Edit,
                "deploy at five",
            ))
            .await,
    );
    for c in [&mut bob, &mut carol] {
        let m = c.message().await;
        assert_eq!(m.msg_id, edit_id);
        assert_eq!(acts_on(&m), Some((id.as_str(), ActKind::Edit)));
        assert_eq!(m.body.as_text(), Some("deploy at five"));
    }
    let h = history(&mut bob, ConvRef::Room("general".into())).await;
    let m = find(&h, &id);
    assert_eq!(m.body.as_text(), Some("deploy at five"));
    assert!(state(m).edited_ms.is_some());
    assert_eq!(state(m).edits, 1);
    // Acts the server applied are in the state, not in history.
    assert!(h.iter().all(|m| acts_on(m).is_none()), "{h:?}");
    // Search finds the new text, not the old.
    assert_eq!(search(&mut bob, "five").await.len(), 1);
    assert!(search(&mut bob, "fiev").await.is_empty());

    // Reactions: counts and who, live and in history.
    for (who, emoji, kind) in [
        ("bob", "👍", ActKind::React),
        ("carol", "👍", ActKind::React),
        ("bob", "🎉", ActKind::React),
        ("bob", "🎉", ActKind::Unreact),
    ] {
        let c = if who == "bob" { &mut bob } else { &mut carol };
        sent_id(c.request(act_req(room("general"), &id, kind, emoji)).await);
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        let m = alice.message().await;
        seen.push((
            m.from.clone(),
            m.body.as_text().map(str::to_string),
            acts_on(&m).map(|a| a.1),
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("bob".into(), Some("👍".into()), Some(ActKind::React)),
            ("carol".into(), Some("👍".into()), Some(ActKind::React)),
            ("bob".into(), Some("🎉".into()), Some(ActKind::React)),
            ("bob".into(), Some("🎉".into()), Some(ActKind::Unreact)),
        ]
    );
    let h = history(&mut alice, ConvRef::Room("general".into())).await;
    assert_eq!(
        state(find(&h, &id)).reactions,
        vec![Reaction {
            emoji: "👍".into(),
            users: vec!["bob".into(), "carol".into()],
        }]
    );

    // Delete: gone from history (shown as deleted, no text), from search, live for all.
    sent_id(
        alice
            .request(act_req(room("general"), &id, ActKind::Delete, ""))
            .await,
    );
    for c in [&mut bob, &mut carol] {
        let m = c
            .event(|e| matches!(e, Event::Message(m) if acts_on(m).map(|a| a.1) == Some(ActKind::Delete)))
            .await;
        let Event::Message(m) = m else { unreachable!() };
        assert_eq!(acts_on(&m), Some((id.as_str(), ActKind::Delete)));
        assert!(m.body.data.is_empty());
    }
    let h = history(&mut carol, ConvRef::Room("general".into())).await;
    let m = find(&h, &id);
    assert!(state(m).deleted);
    assert!(m.body.data.is_empty());
    assert!(state(m).reactions.is_empty());
    assert!(search(&mut carol, "five").await.is_empty());
    // Nothing more can be done to it.
    let r = bob
        .request(act_req(room("general"), &id, ActKind::React, "👍"))
        .await;
    assert_eq!(code(r), ErrorCode::NotFound);
    srv.stop().await;
}

#[tokio::test]
async fn a_member_who_was_away_gets_every_act_at_login_and_history_agrees() {
    let srv = TestServer::start(|_| {}).await;
    srv.add_user("bob", PW, false);
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::login(&srv, "bob", PW).await;
    let (id, seq) = sent_id(alice.send_room("general", "first draft").await);
    assert_eq!(bob.message().await.seq, seq);
    drop(bob);

    let (e1, _) = sent_id(
        alice
            .request(act_req(room("general"), &id, ActKind::Edit, "second draft"))
            .await,
    );
    let (e2, _) = sent_id(
        alice
            .request(act_req(room("general"), &id, ActKind::Edit, "final text"))
            .await,
    );
    sent_id(
        alice
            .request(act_req(room("general"), &id, ActKind::React, "✅"))
            .await,
    );
    let (r, _) = sent_id(
        alice
            .request(reply_req(room("general"), &id, "see above"))
            .await,
    );

    let mut bob = Raw::connect(&srv).await;
    bob.request(Request::Login {
        user: "bob".into(),
        password: PW.into(),
        server_password: None,
        resume: vec![Cursor {
            conv: Conv::Room("general".into()),
            seq,
        }],
    })
    .await
    .expect("login");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(bob.message().await);
    }
    // In order; the first edit was made obsolete by the second, so it holds no text any more.
    assert_eq!(got[0].msg_id, e1);
    assert!(got[0].body.data.is_empty());
    assert_eq!(got[1].msg_id, e2);
    assert_eq!(got[1].body.as_text(), Some("final text"));
    assert_eq!(acts_on(&got[2]), Some((id.as_str(), ActKind::React)));
    assert_eq!(got[3].msg_id, r);
    assert_eq!(
        got[3].extra.as_ref().and_then(|x| x.reply_to.as_deref()),
        Some(id.as_str())
    );
    let h = history(&mut bob, ConvRef::Room("general".into())).await;
    let m = find(&h, &id);
    assert_eq!(m.body.as_text(), Some("final text"));
    assert_eq!(state(m).edits, 2);
    assert_eq!(state(m).reactions.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn direct_conversations_have_edits_deletes_reactions_and_threads() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut carol = Raw::register(&srv, "carol").await;
    let to_bob = Target::Users {
        to: vec!["bob".into()],
    };
    let to_alice = Target::Users {
        to: vec!["alice".into()],
    };
    let (id, _) = sent_id(
        alice
            .request(Request::Send {
                target: to_bob.clone(),
                body: Body::text("lunch?"),
                idempotency_key: None,
                refs: None,
            })
            .await,
    );
    bob.message().await;
    let (r1, _) = sent_id(bob.request(reply_req(to_alice.clone(), &id, "yes")).await);
    let (r2, _) = sent_id(
        alice
            .request(reply_req(to_bob.clone(), &id, "noon then"))
            .await,
    );
    sent_id(
        bob.request(act_req(to_alice.clone(), &r2, ActKind::React, "👍"))
            .await,
    );
    sent_id(
        bob.request(act_req(to_alice.clone(), &r1, ActKind::Edit, "yes!"))
            .await,
    );

    // The thread: the message, then its replies in order, with their state.
    let t = match bob
        .request(Request::Thread {
            msg_id: id.clone(),
            limit: 10,
            after: None,
        })
        .await
    {
        Ok(Reply::Messages(m)) => m,
        other => panic!("{other:?}"),
    };
    let ids: Vec<&str> = t.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids, vec![id.as_str(), r1.as_str(), r2.as_str()]);
    assert_eq!(t[1].body.as_text(), Some("yes!"));
    assert_eq!(state(&t[2]).reactions[0].users, vec!["bob".to_string()]);

    // Someone outside the conversation can neither see, answer nor act on it.
    for r in [
        carol
            .request(Request::MessageInfo { msg_id: id.clone() })
            .await,
        carol
            .request(Request::Thread {
                msg_id: id.clone(),
                limit: 10,
                after: None,
            })
            .await,
        carol
            .request(act_req(
                Target::Users {
                    to: vec!["alice".into()],
                },
                &id,
                ActKind::React,
                "👍",
            ))
            .await,
    ] {
        assert_eq!(code(r), ErrorCode::NotFound);
    }
    // Where a message is, for those who may see it.
    match bob
        .request(Request::MessageInfo { msg_id: id.clone() })
        .await
    {
        Ok(Reply::MessageInfo(i)) => {
            assert_eq!(i.conv, Conv::Direct(vec!["alice".into(), "bob".into()]));
            assert_eq!(i.from, "alice");
        }
        other => panic!("{other:?}"),
    }
    // Only the author edits; in a direct conversation only the author deletes.
    assert_eq!(
        code(
            bob.request(act_req(to_alice.clone(), &id, ActKind::Edit, "no"))
                .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            bob.request(act_req(to_alice.clone(), &id, ActKind::Delete, ""))
                .await
        ),
        ErrorCode::Forbidden
    );
    sent_id(
        alice
            .request(act_req(to_bob.clone(), &id, ActKind::Delete, ""))
            .await,
    );
    let h = history(&mut bob, ConvRef::With(vec!["alice".into()])).await;
    assert!(state(find(&h, &id)).deleted);
    // The replies stay, still naming what they answered.
    assert_eq!(
        find(&h, &r1)
            .extra
            .as_ref()
            .and_then(|x| x.reply_to.as_deref()),
        Some(id.as_str())
    );
    drop(carol);
    srv.stop().await;
}

#[tokio::test]
async fn the_rules_refuse_with_a_sentence_that_says_what_to_do() {
    let srv = TestServer::start(|c| {
        c.messages.max_edits = 2;
        c.messages.max_reactions = 2;
        c.messages.max_emoji_bytes = 8;
    })
    .await;
    srv.add_user("root", PW, true);
    let mut alice = Raw::register(&srv, "alice").await;
    let mut bob = Raw::register(&srv, "bob").await;
    let mut carol = Raw::register(&srv, "carol").await;
    let mut root = Raw::login(&srv, "root", PW).await;
    let (id, _) = sent_id(alice.send_room("general", "hello").await);

    let refused = |r: Result<Reply, ErrorBody>, code: ErrorCode, words: &str| match r {
        Err(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.message.contains(words), "{:?} lacks {words:?}", e.message);
        }
        other => panic!("not refused: {other:?}"),
    };
    refused(
        bob.request(act_req(room("general"), &id, ActKind::Edit, "mine now"))
            .await,
        ErrorCode::Forbidden,
        "only its author can edit",
    );
    refused(
        bob.request(act_req(room("general"), &id, ActKind::Delete, ""))
            .await,
        ErrorCode::Forbidden,
        "only its author, the room's owner or an admin",
    );
    refused(
        alice
            .request(act_req(room("general"), &id, ActKind::Edit, "  "))
            .await,
        ErrorCode::BadRequest,
        "delete it",
    );
    refused(
        bob.request(act_req(
            room("general"),
            &id,
            ActKind::React,
            "a very long reaction",
        ))
        .await,
        ErrorCode::BadRequest,
        "at most 8 bytes",
    );
    refused(
        bob.request(act_req(room("general"), "no-such-id", ActKind::React, "👍"))
            .await,
        ErrorCode::NotFound,
        "check the msg_id",
    );
    refused(
        bob.request(reply_req(room("general"), "no-such-id", "hm"))
            .await,
        ErrorCode::NotFound,
        "check the msg_id",
    );
    // Edits are bounded.
    for text in ["one", "two"] {
        sent_id(
            alice
                .request(act_req(room("general"), &id, ActKind::Edit, text))
                .await,
        );
    }
    refused(
        alice
            .request(act_req(room("general"), &id, ActKind::Edit, "three"))
            .await,
        ErrorCode::TooLarge,
        "at most 2 times",
    );
    // Reactions are bounded; taking one back makes room.
    sent_id(
        bob.request(act_req(room("general"), &id, ActKind::React, "👍"))
            .await,
    );
    let (react_id, _) = sent_id(
        carol
            .request(act_req(room("general"), &id, ActKind::React, "👍"))
            .await,
    );
    refused(
        root.request(act_req(room("general"), &id, ActKind::React, "👍"))
            .await,
        ErrorCode::TooLarge,
        "at most 2 reactions",
    );
    sent_id(
        carol
            .request(act_req(room("general"), &id, ActKind::Unreact, "👍"))
            .await,
    );
    sent_id(
        root.request(act_req(room("general"), &id, ActKind::React, "👍"))
            .await,
    );
    // An act is not a message one can act on.
    refused(
        alice
            .request(act_req(room("general"), &react_id, ActKind::Delete, ""))
            .await,
        ErrorCode::BadRequest,
        "act on the message itself",
    );
    // Reacting needs membership.
    let created = carol
        .request(Request::CreateRoom {
            room: "ops".into(),
            private: false,
            password: None,
        })
        .await;
    assert!(created.is_ok(), "{created:?}");
    alice
        .request(Request::Join {
            room: "ops".into(),
            password: None,
        })
        .await
        .expect("join");
    let (ops_id, _) = sent_id(alice.send_room("ops", "in ops").await);
    refused(
        bob.request(act_req(room("ops"), &ops_id, ActKind::React, "👍"))
            .await,
        ErrorCode::NotMember,
        "join it first",
    );
    // An act names a message of the conversation it is sent to.
    refused(
        alice
            .request(act_req(room("general"), &ops_id, ActKind::Edit, "moved"))
            .await,
        ErrorCode::NotFound,
        "in this conversation",
    );
    // The room's owner deletes anyone's message there; an admin anywhere; both audited.
    sent_id(
        carol
            .request(act_req(room("ops"), &ops_id, ActKind::Delete, ""))
            .await,
    );
    sent_id(
        root.request(act_req(room("general"), &id, ActKind::Delete, ""))
            .await,
    );
    let (own, _) = sent_id(alice.send_room("general", "secretword").await);
    sent_id(
        alice
            .request(act_req(room("general"), &own, ActKind::Delete, ""))
            .await,
    );
    drop((alice, bob, carol, root));
    let dir = srv.stop().await;
    let mut deleted = Vec::new();
    for f in conclave_server::audit::files(dir.path()).expect("audit files") {
        let text = std::fs::read_to_string(&f).expect("read");
        assert!(!text.contains("secretword") && !text.contains("in ops"));
        for line in text.lines() {
            let r = conclave_server::audit::parse_line(line).expect("record");
            if r.kind == "message_deleted" {
                deleted.push(r.user.clone().unwrap_or_default());
            }
        }
    }
    // The author's own delete is not an event for the operator.
    deleted.sort();
    assert_eq!(deleted, vec!["carol".to_string(), "root".to_string()]);
}

#[tokio::test]
async fn the_edit_window_closes() {
    let srv = TestServer::start(|c| c.messages.edit_window_s = 1).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let (id, _) = sent_id(alice.send_room("general", "quick").await);
    sent_id(
        alice
            .request(act_req(room("general"), &id, ActKind::Edit, "quick fix"))
            .await,
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let r = alice
        .request(act_req(room("general"), &id, ActKind::Edit, "too late"))
        .await;
    match r {
        Err(e) => {
            assert_eq!(e.code, ErrorCode::Expired);
            assert!(e.message.contains("1 s after sending"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // Deleting is still allowed.
    sent_id(
        alice
            .request(act_req(room("general"), &id, ActKind::Delete, ""))
            .await,
    );
    srv.stop().await;
}

/// Every regular file under `dir`.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn after_an_edit_or_delete_the_old_ciphertext_and_search_tokens_are_gone_from_the_files() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = Raw::register(&srv, "alice").await;
    let word_edited = format!("oldword{}", std::process::id());
    let word_deleted = format!("goneword{}", std::process::id());
    let (edited, _) = sent_id(alice.send_room("general", &word_edited).await);
    let (deleted, _) = sent_id(alice.send_room("general", &word_deleted).await);
    // Indexed (search flushes the index).
    assert_eq!(search(&mut alice, &word_edited).await.len(), 1);
    assert_eq!(search(&mut alice, &word_deleted).await.len(), 1);
    // The sealed bodies as stored now.
    let sealed_of = |id: &str| -> Vec<u8> {
        let db = rusqlite::Connection::open(srv.dir.path().join("conclave.db")).expect("open");
        db.query_row("SELECT body FROM messages WHERE msg_id = ?1", [id], |r| {
            r.get(0)
        })
        .expect("row")
    };
    let old_edited = sealed_of(&edited);
    let old_deleted = sealed_of(&deleted);
    sent_id(
        alice
            .request(act_req(room("general"), &edited, ActKind::Edit, "newword"))
            .await,
    );
    sent_id(
        alice
            .request(act_req(room("general"), &deleted, ActKind::Delete, ""))
            .await,
    );
    assert!(search(&mut alice, &word_edited).await.is_empty());
    assert!(search(&mut alice, &word_deleted).await.is_empty());
    assert_eq!(search(&mut alice, "newword").await.len(), 1);
    drop(alice);
    let dir = srv.stop().await;

    let key = conclave_server::at_rest::DataKey::load_or_create(dir.path()).expect("key");
    let search_key =
        conclave_server::search::SearchKey::new(&key.subkey("conclave search index v1"));
    let tokens: Vec<String> = [&word_edited, &word_deleted]
        .iter()
        .map(|w| search_key.token_text(&conclave_server::search::words(w)[0]))
        .collect();
    let new_token = search_key.token_text("newword");
    let mut saw_new_token = false;
    for p in files(dir.path()) {
        let bytes = std::fs::read(&p).expect("read");
        for (what, needle) in [
            ("old ciphertext of the edited message", &old_edited[..]),
            ("old ciphertext of the deleted message", &old_deleted[..]),
            ("search token of the edited word", tokens[0].as_bytes()),
            ("search token of the deleted word", tokens[1].as_bytes()),
        ] {
            assert!(!contains(&bytes, needle), "{what} found in {}", p.display());
        }
        saw_new_token |= contains(&bytes, new_token.as_bytes());
    }
    // The check can fail: the new token is found the same way.
    assert!(saw_new_token, "the new word's token is not in the files");
}
