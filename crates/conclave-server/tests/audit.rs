//! The audit log records what happened on a real server, verifies, and never holds message
//! text or passwords.

mod common;

use common::*;
use conclave_proto::*;
use conclave_server::audit;

#[tokio::test]
async fn a_session_is_audited_without_message_text() {
    let srv = TestServer::start(|_| {}).await;
    let marker = format!("audit-marker-{}", std::process::id());
    let mut alice = Raw::register(&srv, "alice").await;
    alice
        .request(Request::CreateRoom {
            room: "ops".into(),
            private: true,
            password: None,
        })
        .await
        .expect("room");
    alice.send_room("general", &marker).await.expect("sent");
    let mut c = Raw::connect(&srv).await;
    let _ = c
        .request(Request::Login {
            user: "alice".into(),
            password: format!("wrong-{marker}"),
            server_password: None,
            resume: vec![],
        })
        .await;
    drop(c);
    drop(alice);
    let dir = srv.stop().await;

    let report = audit::verify(dir.path()).expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.anchored);
    let mut kinds = Vec::new();
    for f in audit::files(dir.path()).expect("files") {
        let text = std::fs::read_to_string(&f).expect("read");
        assert!(
            !text.contains(&marker),
            "message text or password in the audit log"
        );
        for line in text.lines() {
            let r = audit::parse_line(line).expect("record");
            kinds.push((r.kind.clone(), r.user.clone()));
        }
    }
    let has = |k: &str, u: Option<&str>| {
        kinds
            .iter()
            .any(|(kind, user)| kind == k && (u.is_none() || user.as_deref() == u))
    };
    for k in [
        "start",
        "connect",
        "register",
        "login_ok",
        "join",
        "disconnect",
        "stop",
    ] {
        assert!(has(k, None), "no {k} record in {kinds:?}");
    }
    assert!(has("login_failed", Some("alice")));
    assert!(has("join", Some("alice")), "room creation");
}
