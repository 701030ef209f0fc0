//! The main screens, drawn with ratatui's `TestBackend` from an `App` driven by inputs: no
//! terminal, no socket.

use std::path::PathBuf;
use std::time::Duration;

use conclave_client::proto::{Body, Conv, DisconnectReason, Event, Message, Reply, Request};
use conclave_client::{ClientEvent, PinOutcome, Session, Trust};
use conclave_tui::app::{Action, App, AppOptions, ConnectFailure, Failure, Input, Overlay};
use conclave_tui::buffer::ConvKey;
use conclave_tui::files::FileEvent;
use conclave_tui::view;
use jiff::tz::TimeZone;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEvent, MouseEventKind};

const FP: &str = "7ddc9d8b6a773c3a63307dead2c3fdb47617e76ba9c05727e98899f6253f3f5e";
/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000;
const MINUTE: i64 = 60_000;

fn options(password: Option<&str>) -> AppOptions {
    AppOptions {
        server: "chat.example.org:7667".into(),
        user: "alice".into(),
        register: false,
        trust: Trust::PinnedOnly,
        password: password.map(str::to_string),
        server_password: None,
        invite_code: None,
        direct: Vec::new(),
    }
}

fn new_app(size: (u16, u16)) -> App {
    App::new(options(Some("pw")), size, TimeZone::UTC, T0 + 30 * MINUTE)
}

/// The screen as text, a line per row (trailing spaces kept).
fn screen(app: &App) -> String {
    let (w, h) = app.size;
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| view::render(f, app)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..h {
        for x in 0..w {
            out.push_str(buffer[(x, y)].symbol());
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
        fingerprint: FP.into(),
        trust: PinOutcome::Known {
            known_servers: PathBuf::from("/home/alice/.config/conclave/known_servers"),
            line: 3,
        },
        tls_version: "TLS 1.3".into(),
        cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
        key_exchange: "X25519MLKEM768".into(),
    }
}

fn message(seq: u64, conv: Conv, from: &str, text: &str, ts_ms: i64) -> Message {
    Message {
        msg_id: format!("m-{seq}-{from}"),
        conv,
        from: from.into(),
        seq,
        ts_ms,
        body: Body::text(text),
        extra: None,
    }
}

fn room_message(seq: u64, from: &str, text: &str, ts_ms: i64) -> Input {
    Input::Client(ClientEvent::Server(Event::Message(message(
        seq,
        Conv::Room("general".into()),
        from,
        text,
        ts_ms,
    ))))
}

fn server(event: Event) -> Input {
    Input::Client(ClientEvent::Server(event))
}

/// The tags of the requests of this kind among `actions`.
fn tags(actions: &[Action], pred: impl Fn(&Request) -> bool) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request { tag, req, .. } if pred(req) => Some(*tag),
            _ => None,
        })
        .collect()
}

fn presence(user: &str, online: bool) -> conclave_client::proto::UserPresence {
    conclave_client::proto::UserPresence {
        user: user.into(),
        online,
        connections: u32::from(online),
        admin: false,
        display_name: None,
        away: None,
    }
}

/// Connected to a server, in #general (whose history page is `history`), with bob and
/// carol (offline) as members.
fn connected(size: (u16, u16), history: Vec<Message>) -> App {
    let mut app = new_app(size);
    let actions = app.start();
    assert!(
        matches!(actions[..], [Action::Connect { .. }]),
        "{actions:?}"
    );
    app.now_ms = T0 - 2 * 24 * 60 * MINUTE;
    let actions = app.update(Input::Connected(Box::new(session())));
    let who = tags(&actions, |r| matches!(r, Request::Who { room: Some(_) }));
    let hist = tags(&actions, |r| {
        matches!(r, Request::History { before: None, .. })
    });
    assert_eq!((who.len(), hist.len()), (1, 1), "{actions:?}");
    app.update(Input::Reply {
        tag: who[0],
        result: Ok(Reply::Users(vec![
            presence("alice", true),
            presence("bob", true),
            presence("carol", false),
        ])),
    });
    app.update(Input::Reply {
        tag: hist[0],
        result: Ok(Reply::Messages(history)),
    });
    app.now_ms = T0 + 30 * MINUTE;
    app
}

/// Connected, in #general, with a few messages.
fn chatting(size: (u16, u16)) -> App {
    let history = vec![
        message(
            1,
            Conv::Room("general".into()),
            "bob",
            "morning all",
            T0 - 24 * 60 * MINUTE,
        ),
        message(
            2,
            Conv::Room("general".into()),
            "bob",
            "hey alice, the deploy is done",
            T0,
        ),
    ];
    let mut app = connected(size, history);
    app.update(room_message(3, "carol", "nice", T0 + MINUTE));
    app.update(server(Event::Join {
        room: "general".into(),
        user: "dave".into(),
    }));
    app.update(Input::Latency(Some(Duration::from_millis(12))));
    app
}

#[test]
fn chat_view() {
    let app = chatting((110, 24));
    assert_eq!(app.current_buffer().key, ConvKey::Room("general".into()));
    assert_shows(
        &app,
        &[
            // Sidebar, title, members.
            "1.conclave",
            "2.#general",
            "#general · 4 members, 3 online",
            "● bob",
            "○ carol",
            // Conversation: day separators, timestamps, senders, notices.
            "Friday 20 November 2026",
            "Saturday 21 November 2026",
            "10:00        bob │ hey alice, the deploy is done",
            "10:01      carol │ nice",
            "--> │ dave joined #general",
            // Status bar.
            "chat.example.org:7667 │ ● connected │ TLS 1.3 PQ 7D:DC:9D:8B │ 12 ms │ #general server-enc │ alice",
            // Input line.
            "[#general]",
        ],
    );
    // An end-to-end conversation says so.
    let mut app = app;
    app.e2ee.insert(ConvKey::Room("general".into()));
    assert_shows(&app, &["#general E2EE │ alice"]);
}

#[test]
fn the_status_bar_names_the_key_exchange_group() {
    // Wide enough: the group's name (on a narrow terminal, `PQ`: see chat_view).
    let app = chatting((150, 24));
    assert_shows(&app, &["│ TLS 1.3 X25519MLKEM768 7D:DC:9D:8B │"]);
    // A classical group (an older server) keeps its name, and the status buffer says what it
    // means.
    let mut app = new_app((200, 24));
    app.start();
    app.update(Input::Connected(Box::new(Session {
        key_exchange: "X25519".into(),
        ..session()
    })));
    app.current = 0;
    assert_shows(
        &app,
        &[
            "│ TLS 1.3 X25519 7D:DC:9D:8B │",
            "TLS 1.3 with X25519, certificate",
            "the server agreed only to the classical key exchange X25519",
        ],
    );
}

#[test]
fn mentions_and_unread_counts_in_the_sidebar() {
    let mut app = chatting((110, 24));
    app.update(Input::Client(ClientEvent::Server(Event::Message(message(
        1,
        Conv::Direct(vec!["alice".into(), "bob".into()]),
        "bob",
        "psst",
        T0 + 2 * MINUTE,
    )))));
    app.update(Input::Client(ClientEvent::Server(Event::Message(message(
        2,
        Conv::Direct(vec!["alice".into(), "bob".into()]),
        "bob",
        "still there?",
        T0 + 3 * MINUTE,
    )))));
    let dm = app
        .buffers
        .iter()
        .find(|b| b.key == ConvKey::Direct(vec!["bob".into()]))
        .unwrap();
    assert_eq!(dm.unread, 2);
    assert!(dm.mention);
    assert_shows(&app, &["3.@bob            2", "act: 3"]);
    // Switching there clears it.
    app.update(Input::Key(KeyEvent::new(
        KeyCode::Char('n'),
        KeyModifiers::CONTROL,
    )));
    assert_eq!(app.current_buffer().unread, 0);
    assert_shows(
        &app,
        &["bob │ still there?", "@bob · direct conversation with bob"],
    );
}

#[test]
fn sending_shows_the_line_then_its_receipt() {
    let mut app = chatting((100, 20));
    let actions = type_line(&mut app, "hello everyone");
    let [
        Action::Request {
            tag,
            req: Request::Send { .. },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_shows(&app, &["alice │ hello everyone …"]);
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Sent {
            msg_id: "x".into(),
            seq: 4,
            ts_ms: T0 + 5 * MINUTE,
            duplicate: false,
        }),
    });
    assert_shows(&app, &["10:05      alice │ hello everyone"]);
    // A refused send says so.
    let actions = type_line(&mut app, "/except carol,dave not for them");
    let [
        Action::Request {
            tag,
            req: Request::Send { ref target, .. },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(
        *target,
        conclave_client::proto::Target::Room {
            room: "general".into(),
            except: vec!["carol".into(), "dave".into()]
        }
    );
    app.update(Input::Reply {
        tag,
        result: Err(Failure {
            code: "no_such_user".into(),
            message: "no user dave".into(),
        }),
    });
    assert_shows(&app, &["not for them ✗ not sent", "not sent: no user dave"]);
}

#[test]
fn long_messages_wrap_and_pastes_keep_their_lines() {
    let mut app = chatting((60, 20));
    let long = "word ".repeat(60);
    app.update(room_message(4, "bob", &long, T0 + 2 * MINUTE));
    let text = screen(&app);
    assert!(text.matches("word word").count() >= 5, "{text}");
    // No row is wider than the terminal (TestBackend would panic, but check the wrap too).
    app.update(Input::Paste("line one\r\nline two\x1b[2J".into()));
    assert_eq!(app.input.text(), "line one\nline two[2J");
    assert_shows(&app, &["line one↵line two[2J"]);
    let actions = app.update(key(KeyCode::Enter));
    let [
        Action::Request {
            req: Request::Send { ref body, .. },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(body.as_text(), Some("line one\nline two[2J"));
    assert_shows(&app, &["alice │ line one", "│ line two[2J"]);
}

#[test]
fn help() {
    // Tall enough for the whole list (it scrolls otherwise).
    let mut app = chatting((110, 80));
    type_line(&mut app, "/help");
    assert!(matches!(app.overlay, Overlay::Help { .. }));
    assert_shows(
        &app,
        &[
            "Help",
            "PgUp / PgDn",
            "/msg user[,user...] text",
            "/votekick user",
            "/reply text",
            "/edit text",
            "/react emoji",
            "/quit",
        ],
    );
    app.update(key(KeyCode::Esc));
    assert_eq!(app.overlay, Overlay::None);
    type_line(&mut app, "/help kick");
    assert_shows(&app, &["/kick user [reason]: remove a user"]);
}

#[test]
fn search_results_and_jumping_to_one() {
    let mut app = chatting((100, 24));
    let actions = type_line(&mut app, "/search deploy");
    let [
        Action::Request {
            tag,
            req: Request::Search { ref query, .. },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(query, "deploy");
    let results = vec![
        message(
            9,
            Conv::Room("ops".into()),
            "dave",
            "deploy at 5",
            T0 + 3 * MINUTE,
        ),
        message(
            2,
            Conv::Room("general".into()),
            "bob",
            "hey alice, the deploy is done",
            T0,
        ),
    ];
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Results(results)),
    });
    assert_shows(
        &app,
        &[
            "search \"deploy\": 2 result(s)",
            "2026-11-21 10:03 #ops dave: deploy at 5",
            "2026-11-21 10:00 #general bob: hey alice, the deploy is done",
        ],
    );
    // The first result is in a room not loaded: jumping asks for its history.
    let actions = app.update(key(KeyCode::Enter));
    assert_eq!(app.current_buffer().key, ConvKey::Room("ops".into()));
    // The history, and who has read how far (asked with a conversation's first page).
    let [
        Action::Request {
            tag,
            req: Request::History { .. },
            ..
        },
        Action::Request {
            req: Request::ReadMarkers { .. },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    let page: Vec<Message> = (1..=9)
        .map(|s| {
            let text = if s == 9 {
                "deploy at 5".to_string()
            } else {
                format!("ops line {s}")
            };
            message(
                s,
                Conv::Room("ops".into()),
                "dave",
                &text,
                T0 + s as i64 * 1000,
            )
        })
        .collect();
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Messages(page)),
    });
    assert_eq!(app.current_buffer().highlight.as_deref(), Some("m-9-dave"));
    assert_shows(&app, &["dave │ deploy at 5"]);
}

#[test]
fn fingerprint_confirmation() {
    let mut app = new_app((100, 30));
    app.start();
    app.update(Input::ConnectFailed(ConnectFailure::UnknownServer {
        fingerprint: FP.into(),
    }));
    assert_shows(
        &app,
        &[
            "Is this the right server?",
            "First connection to chat.example.org:7667",
            "7D:DC:9D:8B:6A:77:3C:3A:63:30:7D:EA:D2:C3:FD:B4",
            "76:17:E7:6B:A9:C0:57:27:E9:88:99:F6:25:3F:3F:5E",
            "conclave fingerprint",
            "y: it matches",
        ],
    );
    let actions = app.update(key(KeyCode::Char('y')));
    let [Action::Connect { ref trust, .. }] = actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(*trust, Trust::Fingerprint(FP.into()));
    // Refusing quits.
    let mut app = new_app((100, 30));
    app.start();
    app.update(Input::ConnectFailed(ConnectFailure::UnknownServer {
        fingerprint: FP.into(),
    }));
    assert_eq!(app.update(key(KeyCode::Char('n'))), vec![Action::Quit]);
}

#[test]
fn changed_fingerprint_warning() {
    let mut app = new_app((100, 30));
    app.start();
    let text = conclave_client::TrustError::Mismatch {
        server: "chat.example.org:7667".into(),
        expected: FP.into(),
        seen: "ab".repeat(32),
        pinned_in: conclave_client::trust::PinSource::KnownServers {
            path: PathBuf::from("/home/alice/.config/conclave/known_servers"),
            line: 3,
        },
    }
    .to_string();
    app.update(Input::ConnectFailed(ConnectFailure::Mismatch { text }));
    assert_shows(
        &app,
        &[
            "THE SERVER'S CERTIFICATE HAS CHANGED",
            "WARNING: THE CERTIFICATE OF chat.example.org:7667 IS NOT THE EXPECTED ONE",
            "AB:AB:AB",
            "remove line 3",
            "Press q to quit",
        ],
    );
    assert_eq!(app.update(key(KeyCode::Char('q'))), vec![Action::Quit]);
}

#[test]
fn login_form_masks_the_password() {
    let mut opts = options(None);
    opts.register = true;
    let mut app = App::new(opts, (80, 24), TimeZone::UTC, T0);
    assert!(app.start().is_empty());
    for c in "s3cret!".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    let text = screen(&app);
    assert!(
        text.contains("Register alice on chat.example.org:7667"),
        "{text}"
    );
    assert!(text.contains("•••••••"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    app.update(key(KeyCode::Enter));
    for c in "s3cret?".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    assert!(app.update(key(KeyCode::Enter)).is_empty());
    assert_shows(&app, &["the two passwords differ"]);
    for _ in 0..2 {
        for c in "s3cret!".chars() {
            app.update(key(KeyCode::Char(c)));
        }
        app.update(key(KeyCode::Enter));
    }
    // The second Enter (on the confirmation) connects.
    assert!(matches!(app.phase, conclave_tui::app::Phase::Connecting));
    // A wrong password brings the form back with the server's sentence.
    app.update(Input::ConnectFailed(ConnectFailure::Refused {
        code: "auth_failed".into(),
        message: "wrong user name or password".into(),
    }));
    assert_shows(&app, &["wrong user name or password"]);
}

#[test]
fn too_small_and_every_size_in_between() {
    let mut app = chatting((30, 8));
    assert_shows(&app, &["terminal too small", "30x8, need 40x10"]);
    // Every size from tiny to large draws without panicking, help and search included.
    for overlay in [false, true] {
        if overlay {
            type_line(&mut app, "/help");
        }
        for w in (1..=130).step_by(3) {
            for h in (1..=45).step_by(2) {
                app.update(Input::Resize(w, h));
                screen(&app);
            }
        }
    }
    app.update(Input::Resize(40, 10));
    app.update(key(KeyCode::Esc));
    assert_shows(&app, &["[#general]"]);
}

#[test]
fn scrolling_past_the_top_loads_older_history() {
    // A full first page: there may be more before it.
    let page: Vec<Message> = (51..=100)
        .map(|s| {
            let text = format!("line {s}");
            message(
                s,
                Conv::Room("general".into()),
                "bob",
                &text,
                T0 + s as i64 * 1000,
            )
        })
        .collect();
    let mut app = connected((80, 14), page);
    assert_shows(&app, &["line 100"]);
    let mut asked = None;
    for _ in 0..40 {
        let actions = app.update(key(KeyCode::PageUp));
        if let Some(Action::Request {
            tag,
            req: Request::History { before, .. },
            ..
        }) = actions.first()
        {
            asked = Some((*tag, *before));
            break;
        }
    }
    let (tag, before) = asked.expect("a history request at the top");
    assert_eq!(before, Some(51), "older than the oldest loaded");
    assert_shows(&app, &["line 51"]);
    assert!(!screen(&app).contains("line 100"));
    let older: Vec<Message> = (1..=50)
        .map(|s| {
            message(
                s,
                Conv::Room("general".into()),
                "bob",
                &format!("old {s}"),
                T0 + s as i64 * 1000,
            )
        })
        .collect();
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Messages(older)),
    });
    // The view stays where it was; further up are the older ones.
    assert_shows(&app, &["line 51"]);
    app.update(key(KeyCode::PageUp));
    assert_shows(&app, &["old 50"]);
    // The wheel scrolls back down.
    for _ in 0..100 {
        app.update(Input::Mouse(MouseEvent {
            kind: MouseEventKind::ScrollDown,
            column: 10,
            row: 5,
            modifiers: KeyModifiers::NONE,
        }));
    }
    assert_shows(&app, &["line 100"]);
}

#[test]
fn reconnecting_and_back() {
    let mut app = chatting((100, 20));
    app.update(Input::Client(ClientEvent::Disconnected {
        reason: DisconnectReason::Shutdown,
        message: "the server is shutting down".into(),
        reconnecting: true,
    }));
    app.now_ms += 7_000;
    assert_shows(
        &app,
        &[
            "◌ reconnecting… (7s offline)",
            "connection lost (the server is shutting",
        ],
    );
    // Waiting for the next attempt: the countdown.
    app.next_attempt_ms = Some(app.now_ms + 2_500);
    assert_shows(&app, &["◌ reconnecting in 3s"]);
    app.next_attempt_ms = None;
    // Missed messages come, then the library says it is back.
    app.update(room_message(
        4,
        "bob",
        "while you were away",
        T0 + 10 * MINUTE,
    ));
    let actions = app.update(Input::Client(ClientEvent::Reconnected {
        missed: 1,
        truncated: false,
        server: "node2.example:7667".into(),
    }));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Request {
            req: Request::Who { .. },
            ..
        }
    )));
    assert_shows(&app, &["● connected", "while you were away", "reconnected"]);
    // Another address of the --server list took over: the status bar says which.
    assert_shows(&app, &["node2.example:7667"]);
    // A message delivered twice (history overlapping live) shows once.
    app.update(room_message(
        4,
        "bob",
        "while you were away",
        T0 + 10 * MINUTE,
    ));
    assert_eq!(screen(&app).matches("while you were away").count(), 1);
    // For good.
    app.update(Input::Client(ClientEvent::Disconnected {
        reason: DisconnectReason::Kicked,
        message: "removed by an operator".into(),
        reconnecting: false,
    }));
    assert_shows(&app, &["✗ disconnected", "disconnected for good (kicked)"]);
}

#[test]
fn tab_completes_commands_names_and_rooms() {
    let mut app = chatting((100, 20));
    for c in "/vo".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "/votekick ");
    for c in "ca".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "/votekick carol ");
    app.input.clear();
    for c in "b".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "bob: ");
    app.input.clear();
    for c in "see #ge".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "see #general ");
    // Up brings back what was sent.
    app.input.clear();
    type_line(&mut app, "first line");
    app.update(key(KeyCode::Up));
    assert_eq!(app.input.text(), "first line");
}

#[test]
fn commands_become_requests() {
    let mut app = chatting((100, 20));
    let cases: Vec<(&str, Request)> = vec![
        (
            "/join #ops",
            Request::Join {
                room: "ops".into(),
                password: None,
            },
        ),
        (
            "/create lab private",
            Request::CreateRoom {
                room: "lab".into(),
                private: true,
                password: None,
            },
        ),
        (
            "/invite bob",
            Request::Invite {
                room: "general".into(),
                user: "bob".into(),
            },
        ),
        ("/who", Request::Who { room: None }),
        ("/rooms", Request::Rooms),
        (
            "/kick mallory spam",
            Request::Kick {
                room: Some("general".into()),
                user: "mallory".into(),
                reason: Some("spam".into()),
            },
        ),
        (
            "/votekick mallory",
            Request::VoteKick {
                room: "general".into(),
                user: "mallory".into(),
            },
        ),
        (
            "/ban mallory 2h spam",
            Request::Ban {
                user: Some("mallory".into()),
                ip: None,
                duration_s: Some(7200),
                reason: Some("spam".into()),
            },
        ),
        (
            "/unban 203.0.113.0/24",
            Request::Unban {
                user: None,
                ip: Some("203.0.113.0/24".into()),
            },
        ),
        (
            "/announce maintenance at 5",
            Request::Announce {
                text: "maintenance at 5".into(),
            },
        ),
    ];
    for (line, expected) in cases {
        let actions = type_line(&mut app, line);
        match &actions[..] {
            [Action::Request { req, .. }] => assert_eq!(*req, expected, "{line}"),
            other => panic!("{line}: {other:?}"),
        }
    }
    // /msg opens the direct conversation and sends to exactly those people.
    let actions = type_line(&mut app, "/msg Bob,carol hi both");
    let send = actions
        .iter()
        .find_map(|a| match a {
            Action::Request {
                req: Request::Send { target, .. },
                ..
            } => Some(target.clone()),
            _ => None,
        })
        .expect("a send");
    assert_eq!(
        send,
        conclave_client::proto::Target::Users {
            to: vec!["bob".into(), "carol".into()]
        }
    );
    assert_eq!(
        app.current_buffer().key,
        ConvKey::Direct(vec!["bob".into(), "carol".into()])
    );
    // /quit.
    assert_eq!(type_line(&mut app, "/quit"), vec![Action::Quit]);
}

#[test]
fn file_offers_progress_and_errors() {
    let mut app = chatting((150, 24));
    let actions = type_line(&mut app, "/file /tmp/report.pdf");
    let [
        Action::SendFile {
            tag,
            ref path,
            ref target,
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(path, &PathBuf::from("/tmp/report.pdf"));
    assert_eq!(target, &ConvKey::Room("general".into()));
    app.update(Input::FileStarted {
        tag,
        result: Err("file /tmp/report.pdf: no such file".into()),
    });
    assert_shows(&app, &["!! │ file /tmp/report.pdf: no such file"]);
    // An offer shows in its conversation, with what to type.
    let offer = conclave_client::proto::FileOffer {
        file_id: "0193-f1".into(),
        from: "bob".into(),
        conv: Conv::Room("general".into()),
        except: Vec::new(),
        name: "report.pdf".into(),
        size: 1024 * 1024,
        sha256: [0xab; 32],
        chunk_size: 128 * 1024,
        ts_ms: T0,
        expires_ms: T0 + 7 * 24 * 60 * MINUTE,
        relay_ready: true,
        p2p: None,
    };
    app.update(server(Event::FileOffer(Box::new(offer))));
    assert_shows(
        &app,
        &["bob offers the file report.pdf (1.0 MiB, sha256 abababababababab…): /accept 0193-f1"],
    );
    let actions = type_line(&mut app, "/accept 0193-f1 /tmp/in");
    let [
        Action::AcceptFile {
            ref file_id,
            ref dir,
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(
        (file_id.as_str(), dir),
        ("0193-f1", &PathBuf::from("/tmp/in"))
    );
    // Progress bars, named after the offer.
    app.update(Input::File(FileEvent::Progress {
        file_id: "0193-f1".into(),
        name: "0193-f1".into(),
        sending: false,
        done: 512 * 1024,
        total: 1024 * 1024,
    }));
    assert_shows(&app, &["↓ report.pdf [", "50% 512.0 KiB / 1.0 MiB"]);
    app.update(Input::File(FileEvent::Done {
        file_id: "0193-f1".into(),
        name: "report.pdf".into(),
        path: Some(PathBuf::from("/tmp/in/report.pdf")),
    }));
    assert!(app.transfers.is_empty());
}

#[test]
fn peer_text_cannot_reach_the_terminal_raw() {
    let mut app = chatting((100, 20));
    app.update(room_message(
        9,
        "bob",
        "evil\x1b]0;title\x07\x1b[2J",
        T0 + 9 * MINUTE,
    ));
    app.update(server(Event::Announce {
        from: "admin".into(),
        text: "\x1b[31mred".into(),
        ts_ms: T0,
    }));
    let text = screen(&app);
    assert!(!text.contains('\x1b'), "{text:?}");
    assert!(text.contains("evil�]0;title��[2J"), "{text}");
}

/// Prints the chat screen (for docs/chat.md): `cargo test -p conclave-tui --test screens
/// print_chat_screen -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_chat_screen() {
    let mut app = chatting((100, 20));
    app.update(Input::Client(ClientEvent::Server(Event::Message(message(
        1,
        Conv::Direct(vec!["alice".into(), "bob".into()]),
        "bob",
        "psst",
        T0 + 2 * MINUTE,
    )))));
    type_line(&mut app, "thanks bob, checking now");
    println!("{}", screen(&app));
}

#[test]
fn an_unreadable_message_is_one_line_with_its_reason() {
    let mut app = chatting((110, 24));
    app.update(Input::Client(ClientEvent::E2ee(
        conclave_client::e2ee::E2eeNotice::Unreadable {
            conv: Conv::Room("general".into()),
            seq: 7,
            reason: conclave_client::e2ee::BEFORE_JOIN.into(),
        },
    )));
    assert_shows(
        &app,
        &[
            "message 7 cannot be read on this device: sent before",
            "this device joined; read it on a device that was",
        ],
    );
    assert!(!screen(&app).contains("application/mls"));
}

// ---- first-run papercuts (issue #19) ----

#[test]
fn a_refused_command_leaves_the_input_line_for_the_next_one() {
    let mut app = chatting((110, 30));
    type_line(&mut app, "/fly");
    assert_shows(&app, &["unknown command /fly"]);
    assert_eq!(app.input.text(), "", "the line went (Up brings it back)");
    type_line(&mut app, "/help");
    assert!(matches!(app.overlay, Overlay::Help { .. }), "not /fly/help");
    app.update(key(KeyCode::Esc));
    app.update(key(KeyCode::Up));
    assert_eq!(app.input.text(), "/help");
    app.update(key(KeyCode::Up));
    assert_eq!(
        app.input.text(),
        "/fly",
        "the refused line is in the history"
    );
}

#[test]
fn the_password_prompt_says_what_it_shows() {
    let mut app = App::new(options(None), (80, 24), TimeZone::UTC, T0);
    for c in "pw".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    assert_shows(&app, &["••", "each character shows as •"]);
    assert!(!screen(&app).contains("nothing you type is shown"));
}

#[test]
fn no_such_room_names_the_chat_command() {
    let mut app = chatting((120, 30));
    let actions = type_line(&mut app, "/join nowhere");
    let join = tags(&actions, |r| matches!(r, Request::Join { .. }));
    app.update(Input::Reply {
        tag: join[0],
        result: Err(Failure {
            code: "no_such_room".into(),
            message:
                "there is no room \"nowhere\" that you can see; `rooms` lists the ones you can"
                    .into(),
        }),
    });
    assert_shows(&app, &["/rooms lists"]);
    assert!(!screen(&app).contains("`rooms`"));
}

fn offer(file_id: &str, name: &str) -> Input {
    Input::File(FileEvent::Offer {
        file_id: file_id.into(),
        from: "bob".into(),
        conv: ConvKey::Room("general".into()),
        name: name.into(),
        size: 2048,
        sha256: "ab".repeat(32),
    })
}

#[test]
fn accept_and_decline_complete_the_offered_file_ids() {
    let mut app = chatting((120, 30));
    app.update(offer("0193-aa", "report.pdf"));
    app.update(offer("0194-bb", "notes.txt"));
    for c in "/accept ".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(
        app.input.text(),
        "/accept 0193-aa ",
        "a file id, not a user"
    );
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "/accept 0194-bb ");
    app.input.take(false);
    for c in "/decline 0194".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "/decline 0194-bb ");
}

#[test]
fn files_lists_the_offers_and_decline_declines_one() {
    let mut app = chatting((140, 30));
    app.update(offer("0193-aa", "report.pdf"));
    let actions = type_line(&mut app, "/files");
    let files = tags(&actions, |r| matches!(r, Request::Files));
    assert_eq!(files.len(), 1, "{actions:?}");
    let pending = |id: &str, name: &str| conclave_client::proto::FileOffer {
        file_id: id.into(),
        from: "bob".into(),
        conv: Conv::Room("general".into()),
        except: vec![],
        name: name.into(),
        size: 2048,
        sha256: [0xab; 32],
        chunk_size: 65536,
        ts_ms: T0,
        expires_ms: T0 + 7 * 24 * 60 * MINUTE,
        relay_ready: true,
        p2p: None,
    };
    app.update(Input::Reply {
        tag: files[0],
        result: Ok(Reply::Files(vec![
            // End to end: the server knows only the ciphertext's name; the offer said more.
            pending("0193-aa", "e2ee-x1.bin"),
            pending("0195-cc", "old.log"),
        ])),
    });
    assert_shows(
        &app,
        &[
            "report.pdf (2.0 KiB) from bob in #general: /accept 0193-aa or /decline 0193-aa",
            "old.log (2.0 KiB) from bob in #general",
        ],
    );
    let actions = type_line(&mut app, "/decline 0193-aa");
    let [Action::Request { tag, ref req, .. }] = actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        req,
        &Request::FileDecline {
            file_id: "0193-aa".into()
        }
    );
    app.update(Input::Reply {
        tag,
        result: Ok(Reply::Ok),
    });
    assert_shows(&app, &["declined report.pdf (0193-aa)"]);
    // Empty.
    let actions = type_line(&mut app, "/files");
    let files = tags(&actions, |r| matches!(r, Request::Files));
    app.update(Input::Reply {
        tag: files[0],
        result: Ok(Reply::Files(vec![])),
    });
    assert_shows(&app, &["no files are waiting for you"]);
}

#[test]
fn the_sender_is_told_which_file_was_received() {
    let mut app = chatting((140, 30));
    app.update(Input::File(FileEvent::Progress {
        file_id: "0193-ff".into(),
        name: "report.pdf".into(),
        sending: true,
        done: 1024,
        total: 2048,
    }));
    app.update(Input::File(FileEvent::Done {
        file_id: "0193-ff".into(),
        name: "report.pdf".into(),
        path: None,
    }));
    app.update(Input::File(FileEvent::Received {
        file_id: "0193-ff".into(),
        by: "bob".into(),
        via_p2p: false,
    }));
    app.update(Input::File(FileEvent::Declined {
        file_id: "0193-ff".into(),
        by: "carol".into(),
    }));
    assert_shows(
        &app,
        &[
            "bob received your file report.pdf (0193-ff)",
            "carol declined your file report.pdf (0193-ff)",
        ],
    );
}

#[test]
fn direct_conversations_are_remembered_across_restarts() {
    // Last time, alice talked with bob, and with bob and carol.
    let mut opts = options(Some("pw"));
    opts.direct = vec![vec!["bob".into()], vec!["bob".into(), "carol".into()]];
    let mut app = App::new(opts, (100, 30), TimeZone::UTC, T0);
    app.start();
    let actions = app.update(Input::Connected(Box::new(session())));
    let direct_history = tags(&actions, |r| {
        matches!(
            r,
            Request::History {
                conv: conclave_client::proto::ConvRef::With(_),
                ..
            }
        )
    });
    assert_eq!(direct_history.len(), 2, "{actions:?}");
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RememberDirect(_))),
        "nothing changed yet: {actions:?}"
    );
    let keys: Vec<ConvKey> = app.buffers.iter().map(|b| b.key.clone()).collect();
    assert!(
        keys.contains(&ConvKey::Direct(vec!["bob".into()])),
        "{keys:?}"
    );
    assert!(
        keys.contains(&ConvKey::Direct(vec!["bob".into(), "carol".into()])),
        "{keys:?}"
    );
    assert_shows(&app, &["@bob,carol"]);

    // A new one is remembered; a closed one is forgotten.
    let actions = type_line(&mut app, "/query dave");
    let remembered: Vec<&Vec<Vec<String>>> = actions
        .iter()
        .filter_map(|a| match a {
            Action::RememberDirect(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(
        remembered,
        vec![&vec![
            vec!["bob".to_string()],
            vec!["bob".into(), "carol".into()],
            vec!["dave".into()]
        ]]
    );
    let actions = type_line(&mut app, "/close");
    assert!(
        actions.iter().any(|a| matches!(a,
            Action::RememberDirect(l) if l == &vec![vec!["bob".to_string()], vec!["bob".into(), "carol".into()]])),
        "{actions:?}"
    );
}

#[test]
fn who_in_a_room_says_offline_not_away() {
    let mut app = chatting((120, 30));
    let actions = type_line(&mut app, "/who general");
    let who = tags(&actions, |r| matches!(r, Request::Who { room: Some(_) }));
    app.update(Input::Reply {
        tag: who[0],
        result: Ok(Reply::Users(vec![
            presence("bob", true),
            presence("carol", false),
        ])),
    });
    assert_shows(&app, &["members of #general: bob, carol (offline)"]);
    assert!(!screen(&app).contains("(away)"));
}

#[test]
fn cancel_withdraws_a_sent_file_and_cancelled_offers_are_said() {
    let mut app = chatting((140, 30));
    app.update(Input::File(FileEvent::Progress {
        file_id: "0193-up".into(),
        name: "big.iso".into(),
        sending: true,
        done: 1024,
        total: 1 << 30,
    }));
    for c in "/cancel ".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "/cancel 0193-up ", "a file I sent");
    let actions = app.update(key(KeyCode::Enter));
    let [Action::CancelFile { tag, ref file_id }] = actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(file_id, "0193-up");
    app.update(Input::FileStarted {
        tag,
        result: Ok("cancelled the file 0193-up; its recipients were told".into()),
    });
    assert!(app.transfers.is_empty(), "its progress bar went");
    assert_shows(&app, &["cancelled the file 0193-up"]);

    // An offer to me, withdrawn by its sender.
    app.update(offer("0194-of", "slides.pdf"));
    app.update(Input::File(FileEvent::Cancelled {
        file_id: "0194-of".into(),
        by: "bob".into(),
    }));
    assert_shows(&app, &["bob cancelled the file slides.pdf (0194-of)"]);
    for c in "/accept ".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input.text(), "/accept ", "no longer offered");
}

#[test]
fn joining_says_whether_the_room_is_end_to_end() {
    let mut app = chatting((160, 30));
    let actions = type_line(&mut app, "/join lab");
    let join = tags(&actions, |r| matches!(r, Request::Join { .. }));
    // The library joined the room's encryption group before the reply.
    app.e2ee.insert(ConvKey::Room("lab".into()));
    app.update(Input::Reply {
        tag: join[0],
        result: Ok(Reply::Joined {
            room: "lab".into(),
            members: vec!["alice".into(), "bob".into()],
        }),
    });
    assert_shows(&app, &["you are in #lab (end-to-end encrypted"]);
    let actions = type_line(&mut app, "/join plain");
    let join = tags(&actions, |r| matches!(r, Request::Join { .. }));
    app.update(Input::Reply {
        tag: join[0],
        result: Ok(Reply::Joined {
            room: "plain".into(),
            members: vec!["alice".into()],
        }),
    });
    assert_shows(&app, &["you are in #plain (server-encrypted"]);
}

/// A live act on the message `target` in #general.
fn act(
    seq: u64,
    from: &str,
    target: &str,
    kind: conclave_client::proto::ActKind,
    text: &str,
) -> Input {
    let mut m = message(
        seq,
        Conv::Room("general".into()),
        from,
        text,
        T0 + 2 * MINUTE,
    );
    m.extra = Some(Box::new(conclave_client::proto::Extra {
        acts_on: Some(conclave_client::proto::ActsOn {
            msg_id: target.into(),
            kind,
        }),
        ..Default::default()
    }));
    server(Event::Message(m))
}

#[test]
fn edits_deletes_reactions_and_replies_change_the_lines() {
    use conclave_client::proto::ActKind;
    let mut app = chatting((110, 24));
    app.update(act(
        4,
        "bob",
        "m-2-bob",
        ActKind::Edit,
        "hey alice, the deploy is really done",
    ));
    app.update(act(5, "carol", "m-2-bob", ActKind::React, "👍"));
    assert_shows(&app, &["the deploy is really done (edited)"]);
    // (An emoji takes two cells on the screen; the line's text has it once.)
    assert!(
        app.current_buffer()
            .entries
            .iter()
            .any(|e| e.text == "hey alice, the deploy is really done (edited)  [👍 1]"),
    );
    app.update(act(6, "bob", "m-3-carol", ActKind::Delete, ""));
    assert_shows(&app, &["carol │ (deleted)"]);
    // A reply quotes the start of what it answers.
    let mut reply = message(
        7,
        Conv::Room("general".into()),
        "carol",
        "congrats",
        T0 + 3 * MINUTE,
    );
    reply.extra = Some(Box::new(conclave_client::proto::Extra {
        reply_to: Some("m-1-bob".into()),
        ..Default::default()
    }));
    app.update(server(Event::Message(reply)));
    assert_shows(&app, &["↪ bob: morning all │ congrats"]);
    // The commands send acts on the right messages.
    let actions = type_line(&mut app, "/react 🎉");
    let [
        Action::Request {
            req:
                Request::Send {
                    refs: Some(ref r),
                    ref body,
                    ..
                },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    let a = r.acts_on.as_ref().expect("an act");
    assert_eq!((a.msg_id.as_str(), a.kind), ("m-7-carol", ActKind::React));
    assert_eq!(body.as_text(), Some("🎉"));
    let actions = type_line(&mut app, "/reply thanks");
    let [
        Action::Request {
            req: Request::Send {
                refs: Some(ref r), ..
            },
            ..
        },
    ] = actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(r.reply_to.as_deref(), Some("m-7-carol"));
    let actions = type_line(&mut app, "/delete");
    assert!(actions.is_empty(), "alice has no message here: {actions:?}");
    assert_shows(&app, &["there is no message of yours here yet"]);
}

// ---- your history on every device (issue #21) ----

#[test]
fn a_waiting_device_is_a_notice_with_approve_and_reject_and_the_commands_act() {
    let mut app = chatting((160, 30));
    app.update(Input::Client(ClientEvent::E2ee(
        conclave_client::e2ee::E2eeNotice::Device(
            conclave_client::devices::DeviceNotice::Waiting {
                device: "5b0e2c9d11aa4f03".into(),
                safety_number: "0c1d2e3f 40516273".into(),
                since_ms: T0,
                addr: "192.0.2.7".into(),
            },
        ),
    )));
    assert_shows(
        &app,
        &[
            "5b0e2c9d11aa4f03 from 192.0.2.7",
            "/approve 5b0e2c9d11aa4f03",
        ],
    );
    let actions = type_line(&mut app, "/approve 5b0e2c9d11aa4f03");
    let tag = match actions.as_slice() {
        [
            Action::Device {
                tag,
                op: conclave_tui::devices::DeviceOp::Approve { device },
            },
        ] if device == "5b0e2c9d11aa4f03" => *tag,
        other => panic!("unexpected actions {other:?}"),
    };
    app.update(Input::FileStarted {
        tag,
        result: Ok("approved 5b0e2c9d11aa4f03: sent 12 messages".into()),
    });
    assert_shows(&app, &["approved 5b0e2c9d11aa4f03: sent 12 messages"]);
    assert!(matches!(
        type_line(&mut app, "/backup").as_slice(),
        [Action::Device {
            op: conclave_tui::devices::DeviceOp::Backup { on: true },
            ..
        }]
    ));
    assert!(matches!(
        type_line(&mut app, "/reject 5b0e").as_slice(),
        [Action::Device {
            op: conclave_tui::devices::DeviceOp::Reject { .. },
            ..
        }]
    ));
}

#[test]
fn restore_asks_for_the_recovery_key_in_a_field_that_hides_it_and_forgets_it() {
    let mut app = chatting((160, 30));
    let rk = "K7QM-4XJD-A2BC-DEFG-HJKL-MNPQ-RSTU-VWXY-Z234-5678-9ABC-DEFG-HJ";
    assert!(type_line(&mut app, "/restore").is_empty());
    assert_shows(&app, &["[recovery key]", "type or paste your recovery key"]);
    // Typed and pasted, it shows as dots only, and nothing goes to the server meanwhile (no
    // typing notice, no message).
    for c in rk[..10].chars() {
        assert!(app.update(key_of(c)).is_empty());
    }
    assert!(app.update(Input::Paste(rk[10..].to_string())).is_empty());
    let shown = screen(&app);
    assert!(
        !shown.contains("K7QM") && !shown.contains("HJ\n"),
        "{shown}"
    );
    assert!(shown.contains(&"•".repeat(20)), "{shown}");
    let actions = app.update(key(KeyCode::Enter));
    match actions.as_slice() {
        [
            Action::Device {
                op: conclave_tui::devices::DeviceOp::Restore { key: k },
                ..
            },
        ] => assert_eq!(k, rk),
        other => panic!("unexpected actions {other:?}"),
    }
    assert_shows(&app, &["restoring your history from the backup"]);
    // The input line is back, and its history never has the key.
    assert!(!screen(&app).contains("[recovery key]"));
    for _ in 0..3 {
        app.update(key(KeyCode::Up));
        assert!(!app.input.text().contains("K7QM"), "{}", app.input.text());
    }
    // Esc leaves the field without restoring.
    app.input.clear();
    type_line(&mut app, "/restore");
    app.update(key_of('x'));
    assert!(app.update(key(KeyCode::Esc)).is_empty());
    assert_shows(&app, &["no restore"]);
    assert!(!screen(&app).contains("[recovery key]"));
}

fn key_of(c: char) -> Input {
    key(KeyCode::Char(c))
}
