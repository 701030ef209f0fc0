//! Everyday chat's presence side on the screen (issue #20, part B), drawn with ratatui's
//! `TestBackend` from an `App` driven by inputs: formatted messages rendered (and control
//! characters neutralised), `/me`, typing, topics, "read by", away, and mentions that ring
//! the bell and set the title unless muted.

use std::path::PathBuf;

use conclave_client::proto::chat::TextKind;
use conclave_client::proto::{Body, Conv, Event, Message, Reply, Request, UserPresence};
use conclave_client::{ClientEvent, PinOutcome, Session, Trust};
use conclave_tui::app::{Action, App, AppOptions, Input};
use conclave_tui::buffer::ConvKey;
use conclave_tui::view;
use jiff::tz::TimeZone;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer as Cells;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Modifier;

/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000;
const MINUTE: i64 = 60_000;

fn cells(app: &App) -> Cells {
    let (w, h) = app.size;
    let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    terminal.draw(|f| view::render(f, app)).expect("draw");
    terminal.backend().buffer().clone()
}

fn screen(app: &App) -> String {
    let b = cells(app);
    let mut out = String::new();
    for y in 0..b.area.height {
        for x in 0..b.area.width {
            out.push_str(b[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

#[track_caller]
fn assert_shows(app: &App, needles: &[&str]) {
    let text = screen(app);
    for needle in needles {
        assert!(
            text.contains(needle),
            "the screen lacks {needle:?}:\n{text}"
        );
    }
}

/// The modifiers of the first cell where `needle` starts on screen.
fn modifiers_at(app: &App, needle: &str) -> Modifier {
    let b = cells(app);
    let first = needle.chars().next().expect("needle");
    for y in 0..b.area.height {
        let row: String = (0..b.area.width).map(|x| b[(x, y)].symbol()).collect();
        if let Some(byte) = row.find(needle) {
            let x = row[..byte].chars().count() as u16;
            assert_eq!(b[(x, y)].symbol(), first.to_string());
            return b[(x, y)].modifier;
        }
    }
    panic!("{needle:?} is not on screen:\n{}", screen(app));
}

fn key(code: KeyCode) -> Input {
    Input::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn type_line(app: &mut App, line: &str) -> Vec<Action> {
    for c in line.chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Enter))
}

fn session() -> Session {
    Session {
        user: "alice".into(),
        admin: false,
        rooms: vec!["general".into()],
        server: "chat.example.org:7667".into(),
        fingerprint: "7ddc9d8b6a773c3a63307dead2c3fdb47617e76ba9c05727e98899f6253f3f5e".into(),
        trust: PinOutcome::Known {
            known_servers: PathBuf::from("/home/alice/.config/conclave/known_servers"),
            line: 3,
        },
        tls_version: "TLS 1.3".into(),
        cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
        key_exchange: "X25519MLKEM768".into(),
    }
}

fn user(name: &str) -> UserPresence {
    UserPresence {
        user: name.into(),
        online: true,
        connections: 1,
        admin: false,
        display_name: None,
        away: None,
    }
}

fn message(seq: u64, conv: Conv, from: &str, body: Body) -> Input {
    Input::Client(ClientEvent::Server(Event::Message(Message {
        msg_id: format!("m-{seq}-{from}"),
        conv,
        from: from.into(),
        seq,
        ts_ms: T0 + seq as i64 * MINUTE,
        body,
        extra: None,
    })))
}

fn general() -> Conv {
    Conv::Room("general".into())
}

fn server(event: Event) -> Input {
    Input::Client(ClientEvent::Server(event))
}

/// Connected, in #general (members alice and bob), no history.
fn chatting(size: (u16, u16)) -> App {
    let opts = AppOptions {
        server: "chat.example.org:7667".into(),
        user: "alice".into(),
        register: false,
        trust: Trust::PinnedOnly,
        password: Some("pw".into()),
        server_password: None,
        invite_code: None,
        direct: Vec::new(),
    };
    let mut app = App::new(opts, size, TimeZone::UTC, T0);
    app.start();
    let actions = app.update(Input::Connected(Box::new(session())));
    for a in actions {
        if let Action::Request { tag, req, .. } = a {
            let result = match req {
                Request::Who { .. } => Ok(Reply::Users(vec![user("alice"), user("bob")])),
                Request::History { .. } => Ok(Reply::Messages(Vec::new())),
                _ => continue,
            };
            app.update(Input::Reply { tag, result });
        }
    }
    assert_eq!(app.current_buffer().key, ConvKey::Room("general".into()));
    app
}

#[test]
fn formatted_messages_are_rendered_with_their_styles() {
    let mut app = chatting((150, 20));
    let md = TextKind {
        markdown: true,
        action: false,
    };
    app.update(message(
        1,
        general(),
        "bob",
        Body::text_of_kind(
            "a **loud** word, `cargo test` and [docs](https://example.org/d)",
            md,
        ),
    ));
    app.update(message(
        2,
        general(),
        "bob",
        Body::text_of_kind("> quoted line\n\nplain after", md),
    ));
    assert_shows(
        &app,
        &[
            "bob │ a loud word, cargo test and docs <https://example.org/d>",
            "bob │ │ quoted line",
            "│ plain after",
        ],
    );
    assert!(modifiers_at(&app, "loud").contains(Modifier::BOLD));
    assert!(!modifiers_at(&app, "word,").contains(Modifier::BOLD));
    assert!(modifiers_at(&app, "docs <").contains(Modifier::UNDERLINED));
    // Plain text stays plain: the asterisks are shown.
    app.update(message(
        3,
        general(),
        "bob",
        Body::text("not **bold** here"),
    ));
    assert_shows(&app, &["bob │ not **bold** here"]);
    assert!(!modifiers_at(&app, "not **").contains(Modifier::BOLD));
}

#[test]
fn control_characters_never_reach_a_cell() {
    let mut app = chatting((110, 20));
    let md = TextKind {
        markdown: true,
        action: false,
    };
    let hostile = [
        Body::text_of_kind("**\u{1b}]0;owned\u{7}** `\u{1b}[2J` [x](\u{1b}[31m)", md),
        Body::text_of_kind("```\n\u{1b}[1;1H\u{9b}2J\n```", md),
        Body::text("\u{1b}[2Jplain \u{7}bell \u{202e}rtl"),
        Body::text_of_kind(
            "\u{1b}]2;title\u{7}",
            TextKind {
                markdown: false,
                action: true,
            },
        ),
    ];
    for (i, body) in hostile.into_iter().enumerate() {
        app.update(message(i as u64 + 1, general(), "bob", body));
    }
    let b = cells(&app);
    for y in 0..b.area.height {
        for x in 0..b.area.width {
            let s = b[(x, y)].symbol();
            assert!(
                !s.chars()
                    .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
                "a control character at ({x},{y}): {s:?}\n{}",
                screen(&app)
            );
        }
    }
    assert_shows(&app, &["plain", "bell"]);
}

#[test]
fn me_sends_an_action_shown_with_a_star() {
    let mut app = chatting((110, 20));
    let actions = type_line(&mut app, "/me waves");
    let [
        Action::Request {
            req: Request::Send { body, .. },
            ..
        },
    ] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(body.as_text(), Some("waves"));
    assert_eq!(body.text_kind().map(|k| k.action), Some(true));
    let actions = type_line(&mut app, "/md **hi**");
    let [
        Action::Request {
            req: Request::Send { body, .. },
            ..
        },
    ] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(body.text_kind().map(|k| k.markdown), Some(true));
    app.update(message(
        5,
        general(),
        "bob",
        Body::text_of_kind(
            "shrugs",
            TextKind {
                markdown: false,
                action: true,
            },
        ),
    ));
    assert_shows(&app, &["* │ alice waves", "* │ bob shrugs", "alice │ hi"]);
}

#[test]
fn typing_topic_read_by_and_away_are_shown() {
    let mut app = chatting((120, 20));
    app.update(server(Event::Typing {
        conv: general(),
        user: "bob".into(),
    }));
    assert_shows(&app, &["│ bob is typing…"]);
    // Bob's message ends it.
    app.update(message(1, general(), "bob", Body::text("done")));
    assert!(!screen(&app).contains("is typing"));

    app.update(server(Event::Topic {
        room: "general".into(),
        topic: "release week".into(),
        by: "bob".into(),
    }));
    assert_shows(
        &app,
        &[
            "#general · release week · 2 members",
            "bob set the topic of #general: release week",
        ],
    );
    let actions = type_line(&mut app, "/topic");
    assert!(actions.is_empty());
    assert_shows(&app, &["topic of #general: release week"]);
    let actions = type_line(&mut app, "/topic new one");
    assert!(
        matches!(&actions[..], [Action::Request { req: Request::SetTopic { topic, .. }, .. }] if topic == "new one"),
        "{actions:?}"
    );

    // Read by.
    type_line(&mut app, "mine");
    app.update(server(Event::Read {
        conv: general(),
        user: "bob".into(),
        seq: 1,
    }));
    assert_shows(&app, &["read by bob"]);

    // Away in the members pane.
    app.update(server(Event::Away {
        user: "bob".into(),
        text: Some("lunch".into()),
    }));
    assert_shows(&app, &["◐ bob"]);
    app.update(server(Event::Away {
        user: "bob".into(),
        text: None,
    }));
    assert_shows(&app, &["● bob"]);
}

#[test]
fn typing_is_sent_once_per_interval_and_read_markers_on_the_tick() {
    let mut app = chatting((110, 20));
    let actions = app.update(key(KeyCode::Char('h')));
    assert!(
        matches!(
            &actions[..],
            [Action::Request {
                req: Request::Typing { .. },
                ..
            }]
        ),
        "{actions:?}"
    );
    assert!(app.update(key(KeyCode::Char('i'))).is_empty());
    // A command line is not typing.
    app.update(key(KeyCode::Enter));
    app.now_ms += 10 * MINUTE;
    assert!(type_line(&mut app, "/who").iter().all(|a| !matches!(
        a,
        Action::Request {
            req: Request::Typing { .. },
            ..
        }
    )));
    app.update(message(4, general(), "bob", Body::text("hello")));
    let actions = app.update(Input::Tick);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Request {
                req: Request::Read { seq: 4, .. },
                ..
            }
        )),
        "{actions:?}"
    );
    // Not again for the same message.
    let actions = app.update(Input::Tick);
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Request {
                req: Request::Read { .. },
                ..
            }
        )),
        "{actions:?}"
    );
}

#[test]
fn mentions_ring_set_the_title_count_apart_and_mute_silences() {
    let mut app = chatting((110, 20));
    // A direct conversation, to be elsewhere when a mention comes.
    let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
    app.update(message(1, dm.clone(), "bob", Body::text("hi")));
    // In view: it rings, but nothing waits.
    let actions = app.update(message(2, general(), "bob", Body::text("ping @alice")));
    assert!(actions.contains(&Action::Bell), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::SetTitle(_))));
    let general_buffer = |app: &App| {
        app.buffers
            .iter()
            .find(|b| b.key == ConvKey::Room("general".into()))
            .map(|b| (b.unread, b.mentions))
            .expect("general")
    };
    assert_eq!(general_buffer(&app), (0, 0));
    // Elsewhere: a mention and a plain message wait, counted apart; the title says so.
    app.update(Input::Key(KeyEvent::new(
        KeyCode::Char('n'),
        KeyModifiers::CONTROL,
    )));
    assert_eq!(
        app.current_buffer().key,
        ConvKey::Direct(vec!["bob".into()])
    );
    let actions = app.update(message(4, general(), "bob", Body::text("@alice again")));
    assert!(actions.contains(&Action::Bell), "{actions:?}");
    assert!(
        actions.iter().any(|a| matches!(a, Action::SetTitle(t)
            if t.contains("1 mention") && t.contains("#general"))),
        "{actions:?}"
    );
    let actions = app.update(message(5, general(), "bob", Body::text("and more")));
    assert!(!actions.contains(&Action::Bell), "{actions:?}");
    assert_eq!(general_buffer(&app), (2, 1));
    // Back in general: seen; the next tick puts the title back.
    app.update(Input::Key(KeyEvent::new(
        KeyCode::Char('p'),
        KeyModifiers::CONTROL,
    )));
    let actions = app.update(Input::Tick);
    assert!(
        actions.contains(&Action::SetTitle("conclave".into())),
        "{actions:?}"
    );
    // Muted: counted, but no bell or title.
    let actions = type_line(&mut app, "/mute");
    // Remembered for the next start (the shell writes it into the state directory).
    assert!(
        actions.iter().any(|a| matches!(a, Action::RememberMuted(m) if m.contains(&ConvKey::Room("general".into())))),
        "{actions:?}"
    );
    app.update(Input::Key(KeyEvent::new(
        KeyCode::Char('n'),
        KeyModifiers::CONTROL,
    )));
    let actions = app.update(message(6, general(), "bob", Body::text("@alice muted?")));
    assert!(!actions.contains(&Action::Bell), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::SetTitle(_))));
    assert_eq!(general_buffer(&app).1, 1);
    // `@room` counts from the room's owner only (known from `rooms`).
    app.update(Input::Key(KeyEvent::new(
        KeyCode::Char('p'),
        KeyModifiers::CONTROL,
    )));
    let actions = type_line(&mut app, "/unmute");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::RememberMuted(m) if m.is_empty())),
        "{actions:?}"
    );
    let actions = app.update(message(7, general(), "bob", Body::text("@room hello")));
    assert!(!actions.contains(&Action::Bell), "{actions:?}");
    app.chat.owners.insert("general".into(), "bob".into());
    let actions = app.update(message(8, general(), "bob", Body::text("@room standup")));
    assert!(actions.contains(&Action::Bell), "{actions:?}");
}

/// The request `actions` hold (one), with its tag.
fn one_request(actions: &[Action]) -> (u64, Request) {
    match actions {
        [Action::Request { tag, req, .. }] => (*tag, req.clone()),
        other => panic!("one request expected: {other:?}"),
    }
}

fn alt(code: KeyCode) -> Input {
    Input::Key(KeyEvent::new(code, KeyModifiers::ALT))
}

fn reply_message(seq: u64, from: &str, text: &str, reply_to: &str) -> Message {
    Message {
        msg_id: format!("m-{seq}-{from}"),
        conv: general(),
        from: from.into(),
        seq,
        ts_ms: T0 + seq as i64 * MINUTE,
        body: Body::text(text),
        extra: Some(Box::new(conclave_client::proto::Extra {
            reply_to: Some(reply_to.into()),
            ..Default::default()
        })),
    }
}

#[test]
fn a_selected_message_is_answered_edited_and_opened_as_a_thread() {
    let mut app = chatting((120, 24));
    app.update(message(
        1,
        general(),
        "bob",
        Body::text("which cable for the rig"),
    ));
    app.update(message(2, general(), "bob", Body::text("lunch at noon")));
    // Alt-Up twice: the older of bob's two messages.
    app.update(alt(KeyCode::Up));
    app.update(alt(KeyCode::Up));
    assert_shows(
        &app,
        &[
            "bob ▶ which cable for the rig",
            "bob │ lunch at noon",
            "[selected:",
        ],
    );
    // Who reacted, with what, shows for the selected message.
    for (n, who) in [(10, "carol"), (11, "dave")] {
        app.update(Input::Client(ClientEvent::Server(Event::Message(
            Message {
                msg_id: format!("m-{n}-{who}"),
                conv: general(),
                from: who.into(),
                seq: n,
                ts_ms: T0 + n as i64 * MINUTE,
                body: Body::text("👍"),
                extra: Some(Box::new(conclave_client::proto::Extra {
                    acts_on: Some(conclave_client::proto::ActsOn {
                        msg_id: "m-1-bob".into(),
                        kind: conclave_client::proto::ActKind::React,
                    }),
                    ..Default::default()
                })),
            },
        ))));
    }
    // (A wide emoji takes two cells: the screen text has a space after it.)
    assert_shows(
        &app,
        &["which cable for the rig  [👍  2]", "[👍  carol, dave]"],
    );
    // It is not mine: /edit says so and sends nothing.
    assert!(type_line(&mut app, "/edit nope").is_empty());
    assert_shows(&app, &["the selected message is not a message of yours"]);
    // /reply answers it (not the newest), quoted, and lets go of the selection.
    let (tag, req) = one_request(&type_line(&mut app, "/reply the blue one"));
    let Request::Send { refs, body, .. } = req else {
        panic!("{req:?}")
    };
    assert_eq!(refs.and_then(|r| r.reply_to), Some("m-1-bob".to_string()));
    assert_eq!(body.as_text(), Some("the blue one"));
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Sent {
            msg_id: "m-3-alice".into(),
            seq: 3,
            ts_ms: T0 + 3 * MINUTE,
            duplicate: false,
        }),
    });
    assert_shows(
        &app,
        &["alice │ ↪ bob: which cable for the rig │ the blue one"],
    );
    assert!(!screen(&app).contains("[selected:"));

    // Select my reply and open the thread: the thread of the message it answers.
    app.update(alt(KeyCode::Up));
    assert_shows(&app, &["alice ▶ ↪ bob"]);
    let (tag, req) = one_request(&type_line(&mut app, "/thread"));
    assert_eq!(
        req,
        Request::Thread {
            msg_id: "m-1-bob".into(),
            limit: conclave_tui::thread::THREAD_PAGE,
            after: None,
        }
    );
    let Input::Client(ClientEvent::Server(Event::Message(root))) =
        message(1, general(), "bob", Body::text("which cable for the rig"))
    else {
        unreachable!()
    };
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Messages(vec![
            root,
            reply_message(3, "alice", "the blue one", "m-1-bob"),
        ])),
    });
    assert_shows(
        &app,
        &[
            "thread · bob: which cable for the rig · 1 replies",
            "alice │ the blue one",
        ],
    );
    // A live reply comes into the pane; a message that is no reply does not.
    app.update(Input::Client(ClientEvent::Server(Event::Message(
        reply_message(4, "carol", "carol borrowed it", "m-1-bob"),
    ))));
    app.update(message(5, general(), "dave", Body::text("unrelated")));
    assert_shows(&app, &["2 replies", "carol │ carol borrowed it"]);
    let text = screen(&app);
    let pane = &text[text.find("thread ·").expect("pane")..];
    assert!(!pane.contains("unrelated"), "{text}");
    // Typing (no command) answers in the thread.
    let (_, req) = one_request(&type_line(&mut app, "thanks both"));
    let Request::Send { refs, .. } = req else {
        panic!("{req:?}")
    };
    assert_eq!(refs.and_then(|r| r.reply_to), Some("m-1-bob".to_string()));
    // An edit of a reply changes it in the pane too.
    app.update(Input::Client(ClientEvent::Server(Event::Message(
        Message {
            msg_id: "m-6-carol".into(),
            conv: general(),
            from: "carol".into(),
            seq: 6,
            ts_ms: T0 + 6 * MINUTE,
            body: Body::text("carol has it"),
            extra: Some(Box::new(conclave_client::proto::Extra {
                acts_on: Some(conclave_client::proto::ActsOn {
                    msg_id: "m-4-carol".into(),
                    kind: conclave_client::proto::ActKind::Edit,
                }),
                ..Default::default()
            })),
        },
    ))));
    let text = screen(&app);
    let pane = &text[text.find("thread ·").expect("pane")..];
    assert!(pane.contains("carol │ carol has it (edited)"), "{text}");
    // Esc closes the pane; typing goes to the room again.
    app.update(key(KeyCode::Esc));
    assert!(!screen(&app).contains("thread ·"));
    let (_, req) = one_request(&type_line(&mut app, "back to the room"));
    let Request::Send { refs, .. } = req else {
        panic!("{req:?}")
    };
    assert!(refs.is_none());
    // /thread with nothing selected says how.
    assert!(type_line(&mut app, "/thread").is_empty());
    assert_shows(&app, &["select a message first (Alt-Up)"]);
}

#[test]
fn display_names_are_shown_beside_messages_unless_they_pass_for_someone_else() {
    let mut app = chatting((120, 20));
    app.update(server(Event::DisplayName {
        user: "bob".into(),
        name: Some("Bobby".into()),
    }));
    app.update(server(Event::DisplayName {
        user: "carol".into(),
        name: Some("bob".into()),
    }));
    app.update(message(1, general(), "bob", Body::text("hello")));
    app.update(message(2, general(), "carol", Body::text("i am not bob")));
    assert_shows(&app, &["Bobby │ hello", "carol │ i am not bob"]);
}
