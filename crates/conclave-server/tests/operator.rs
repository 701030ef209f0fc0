//! End-to-end tests of the operator's controls and the server's defences: IP lists before TLS,
//! runtime lists and bans through the admin socket, per-IP limits, request rates, login
//! lock-out, kicks, vote-kicks, timeouts, the bounded outbound queue and config reload, against
//! a real server over real TLS on loopback.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use conclave_proto::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PW: &str = "password123";

// ---------------------------------------------------------------------------------------------
// Helpers

/// Waits for the catch-up that follows a login: from then on the connection receives events.
async fn caught_up(c: &mut Raw) {
    c.event(|e| matches!(e, Event::CaughtUp { .. })).await;
}

/// Registers `name` and waits until the connection is live.
async fn user(srv: &TestServer, name: &str) -> Raw {
    let mut c = Raw::register(srv, name).await;
    caught_up(&mut c).await;
    c
}

/// Logs in to an existing account and waits until the connection is live.
async fn login(srv: &TestServer, name: &str) -> Raw {
    let mut c = Raw::login(srv, name, PW).await;
    caught_up(&mut c).await;
    c
}

fn login_req(name: &str, password: &str) -> Request {
    Request::Login {
        user: name.into(),
        password: password.into(),
        server_password: None,
        resume: vec![],
    }
}

/// A login attempt on a new connection; its result.
async fn try_login(srv: &TestServer, name: &str) -> Result<Reply, ErrorBody> {
    let mut c = Raw::connect(srv).await;
    c.request(login_req(name, PW)).await
}

async fn create_room(c: &mut Raw, room: &str, private: bool) {
    c.request(Request::CreateRoom {
        room: room.into(),
        private,
        password: None,
    })
    .await
    .expect("room created");
}

async fn join(c: &mut Raw, room: &str) -> Result<Reply, ErrorBody> {
    c.request(Request::Join {
        room: room.into(),
        password: None,
    })
    .await
}

async fn room_members(c: &mut Raw, room: &str) -> Vec<String> {
    let Reply::Users(users) = c
        .request(Request::Who {
            room: Some(room.into()),
        })
        .await
        .expect("who")
    else {
        panic!("who answers users")
    };
    users.into_iter().map(|u| u.user).collect()
}

async fn ping_ok(c: &mut Raw) {
    assert!(matches!(
        c.request(Request::Ping { nonce: 9 }).await,
        Ok(Reply::Pong { nonce: 9 })
    ));
}

/// The server still serves honest clients.
async fn still_serving(srv: &TestServer) {
    let mut c = Raw::try_connect(srv)
        .await
        .expect("an honest client is served");
    ping_ok(&mut c).await;
}

/// The admin socket's error code, panicking on success.
fn admin_error(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {v}"))
}

fn admin_ok(v: &Value) {
    assert_eq!(v["ok"], json!(true), "{v}");
}

/// The connections the admin socket's `who` lists.
async fn admin_who(srv: &TestServer) -> Vec<Value> {
    let v = admin(srv, json!({"cmd": "who"})).await;
    admin_ok(&v);
    v["connections"].as_array().expect("connections").clone()
}

/// Asserts the server refuses connections to `addr` before any TLS: the TLS handshake fails,
/// and a plain TCP connection that sends nothing is hung up on at once (a server doing TLS would
/// wait for the ClientHello until its handshake timeout). Costs two connection attempts.
async fn assert_refused_before_tls(addr: SocketAddr, fingerprint: &str) {
    let tls = tokio::time::timeout(WAIT, tls_connect(addr, fingerprint))
        .await
        .expect("TLS answered in time");
    assert!(
        tls.is_err(),
        "the TLS handshake completed for a refused address"
    );
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a refused address"),
        Err(_) => panic!("the server kept a refused connection open"),
    }
}

/// Writes `reqs` as frames with ids from `first_id`, in one write (so it is all sent before the
/// server can react to any of it).
async fn write_all_frames(c: &mut Raw, first_id: u64, reqs: &[Request]) {
    let mut buf = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        let body = encode_client(&ClientFrame {
            id: first_id + i as u64,
            req: req.clone(),
        });
        buf.extend_from_slice(&frame_bytes(&body));
    }
    c.w.write_all(&buf).await.expect("write");
    c.w.flush().await.expect("flush");
}

// ---------------------------------------------------------------------------------------------
// 1. IP lists before TLS

#[tokio::test]
async fn deny_list_refuses_before_tls_and_allocates_nothing() {
    let srv = TestServer::start(|c| {
        c.security.deny = vec!["127.0.0.0/8".into()];
        // A server that did TLS work would keep the socket this long.
        c.limits.handshake_timeout_ms = 60_000;
    })
    .await;
    for _ in 0..3 {
        assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    }
    let stats = admin(&srv, json!({"cmd": "stats"})).await;
    admin_ok(&stats);
    assert_eq!(stats["connections"], json!(0), "{stats}");
    assert!(admin_who(&srv).await.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn allow_list_lets_in_only_its_networks() {
    let srv = TestServer::start(|c| c.security.allow = vec!["10.0.0.0/8".into()]).await;
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    srv.stop().await;

    let srv = TestServer::start(|c| c.security.allow = vec!["127.0.0.0/8".into()]).await;
    let mut c = user(&srv, "alice").await;
    ping_ok(&mut c).await;
    // Deny wins over allow.
    srv.stop().await;
    let srv = TestServer::start(|c| {
        c.security.allow = vec!["127.0.0.0/8".into()];
        c.security.deny = vec!["127.0.0.1".into()];
    })
    .await;
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    srv.stop().await;
}

#[tokio::test]
async fn ip_lists_apply_to_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine cannot bind [::1]");
        return;
    }
    let v6 = |c: &mut conclave_server::Config| c.listen = "[::1]:0".parse().expect("addr");
    let srv = TestServer::start(|c| {
        v6(c);
        c.security.deny = vec!["::1".into()];
    })
    .await;
    assert!(srv.addr.is_ipv6());
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    srv.stop().await;

    // An IPv4 allow list keeps IPv6 out.
    let srv = TestServer::start(|c| {
        v6(c);
        c.security.allow = vec!["127.0.0.0/8".into()];
    })
    .await;
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    srv.stop().await;

    let srv = TestServer::start(|c| {
        v6(c);
        c.security.allow = vec!["::1/128".into()];
    })
    .await;
    let mut c = user(&srv, "alice").await;
    ping_ok(&mut c).await;
    let who = admin_who(&srv).await;
    assert_eq!(who.len(), 1);
    assert_eq!(who[0]["ip"], json!("::1"));
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Runtime lists through the admin socket

#[tokio::test]
async fn runtime_deny_list_closes_refuses_persists_and_lifts() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = user(&srv, "alice").await;
    let mut anon = Raw::connect(&srv).await;
    ping_ok(&mut anon).await;

    // A malformed network: refused, nothing changes.
    for bad in ["127.0.0.300", "10.0.0.0/33", "localhost"] {
        let r = admin(&srv, json!({"cmd": "deny", "op": "add", "cidr": bad})).await;
        assert_eq!(admin_error(&r), "bad_request", "{bad}: {r}");
    }
    let list = admin(&srv, json!({"cmd": "deny", "op": "list"})).await;
    assert_eq!(list["stored"], json!([]), "{list}");
    ping_ok(&mut alice).await;
    still_serving(&srv).await;

    // Added: live connections from it are closed, new ones refused.
    let r = admin(
        &srv,
        json!({"cmd": "deny", "op": "add", "cidr": "127.0.0.1"}),
    )
    .await;
    admin_ok(&r);
    let (reason, message) = alice.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Banned);
    assert!(message.contains("deny"), "{message}");
    assert_eq!(
        anon.disconnect_event().await.map(|d| d.0),
        Some(DisconnectReason::Banned),
        "connections not logged in are closed too"
    );
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    let list = admin(&srv, json!({"cmd": "deny", "op": "list"})).await;
    admin_ok(&list);
    assert_eq!(list["stored"], json!(["127.0.0.1/32"]), "{list}");
    assert_eq!(list["from_config"], json!([]), "{list}");

    // The stored rule survives a restart.
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |_| {}).await;
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    let list = admin(&srv, json!({"cmd": "deny", "op": "list"})).await;
    assert_eq!(list["stored"], json!(["127.0.0.1/32"]), "{list}");

    // Deleted: connections come in again.
    let r = admin(
        &srv,
        json!({"cmd": "deny", "op": "del", "cidr": "127.0.0.1"}),
    )
    .await;
    admin_ok(&r);
    let mut alice = login(&srv, "alice").await;
    ping_ok(&mut alice).await;
    let r = admin(
        &srv,
        json!({"cmd": "deny", "op": "del", "cidr": "127.0.0.1"}),
    )
    .await;
    assert_eq!(admin_error(&r), "not_found", "{r}");

    // The stored allow list works the same way.
    let r = admin(
        &srv,
        json!({"cmd": "allow", "op": "add", "cidr": "10.0.0.0/8"}),
    )
    .await;
    admin_ok(&r);
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    let r = admin(
        &srv,
        json!({"cmd": "allow", "op": "del", "cidr": "10.0.0.0/8"}),
    )
    .await;
    admin_ok(&r);
    still_serving(&srv).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Per-IP limits

#[tokio::test]
async fn connections_per_ip_are_limited_and_a_closed_one_frees_its_slot() {
    let srv = TestServer::start(|c| c.security.max_connections_per_ip = 2).await;
    let mut a = Raw::try_connect(&srv).await.expect("first accepted");
    let _b = Raw::try_connect(&srv).await.expect("second accepted");
    assert!(
        Raw::try_connect(&srv).await.is_none(),
        "the third concurrent connection is refused"
    );
    a.request(Request::Quit).await.expect("quit");
    assert_eq!(
        a.disconnect_event().await.map(|d| d.0),
        Some(DisconnectReason::Quit)
    );
    drop(a);
    // The slot is given back when the session has ended; give it a moment.
    let mut kept = None;
    for _ in 0..40 {
        kept = Raw::try_connect(&srv).await;
        if kept.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut kept = kept.expect("a slot freed by a closed connection is usable again");
    ping_ok(&mut kept).await;
    srv.stop().await;
}

#[tokio::test]
async fn connection_rate_per_ip_and_a_flood_bans_automatically() {
    let srv = TestServer::start(|c| {
        c.security.connections_per_ip_per_minute = 3;
        c.security.flood_refusals_per_ip = 2;
    })
    .await;
    let mut first = Raw::try_connect(&srv).await.expect("1st accepted");
    ping_ok(&mut first).await;
    let _second = Raw::try_connect(&srv).await.expect("2nd accepted");
    let _third = Raw::try_connect(&srv).await.expect("3rd accepted");
    assert!(
        Raw::try_connect(&srv).await.is_none(),
        "the 4th in the minute is refused"
    );
    let bans = admin(&srv, json!({"cmd": "bans"})).await;
    assert_eq!(
        bans["bans"],
        json!([]),
        "one refusal is not a flood: {bans}"
    );
    assert!(Raw::try_connect(&srv).await.is_none(), "5th refused");

    // The second refusal reached the flood threshold: an automatic, timed IP ban.
    let bans = admin(&srv, json!({"cmd": "bans"})).await;
    let list = bans["bans"].as_array().expect("bans");
    assert_eq!(list.len(), 1, "{bans}");
    let ban = &list[0];
    assert_eq!(ban["by"], json!("server"), "{ban}");
    assert_eq!(ban["kind"], json!("ip"), "{ban}");
    assert_eq!(ban["target"], json!("127.0.0.1/32"), "{ban}");
    assert!(
        ban["until_ms"].as_i64().is_some(),
        "automatic bans end: {ban}"
    );
    // It closes the connections already open from the address.
    assert_eq!(
        first.disconnect_event().await.map(|d| d.0),
        Some(DisconnectReason::Banned)
    );
    // And it is stored.
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |_| {}).await;
    let bans = admin(&srv, json!({"cmd": "bans"})).await;
    assert_eq!(bans["bans"][0]["by"], json!("server"), "{bans}");
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Request rate per connection

#[tokio::test]
async fn request_rate_refuses_then_disconnects_a_flooder() {
    let srv = TestServer::start(|c| {
        c.limits.requests_per_second = 5;
        c.limits.request_burst = 5;
        c.limits.rate_strikes_before_disconnect = 3;
    })
    .await;
    let mut c = user(&srv, "alice").await;

    // The login took one token; six more requests at once overrun the burst by one or two.
    write_all_frames(&mut c, 100, &vec![Request::Rooms; 6]).await;
    let mut ok = 0;
    let mut limited = 0;
    for id in 100..106 {
        match c.reply_to(id).await {
            Ok(Reply::Rooms(_)) => ok += 1,
            Err(e) if e.code == ErrorCode::RateLimited => {
                assert!(e.message.contains("per second"), "{e:?}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        ok >= 4 && (1..=2).contains(&limited),
        "{ok} ok, {limited} limited"
    );

    // The connection goes on; after a second the budget is back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(
        c.request(Request::Rooms).await,
        Ok(Reply::Rooms(_))
    ));

    // Persistent excess: refused, then closed as flooding.
    write_all_frames(&mut c, 200, &vec![Request::Rooms; 30]).await;
    let (mut ok, mut limited, mut reason) = (0, 0, None);
    for _ in 0..64 {
        match c.next_frame().await {
            Some(ServerFrame::Reply { result: Ok(_), .. }) => ok += 1,
            Some(ServerFrame::Reply { result: Err(e), .. }) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                limited += 1;
            }
            Some(ServerFrame::Event(Event::Disconnect { reason: r, message })) => {
                assert!(message.contains("slow down"), "{message}");
                reason = Some(r);
                break;
            }
            Some(ServerFrame::Event(_)) => {}
            None => break,
        }
    }
    assert_eq!(reason, Some(DisconnectReason::Flooding));
    assert!(ok <= 6, "{ok} requests served past the budget");
    assert!(limited >= 1, "refusals come before the disconnect");
    assert!(
        c.next_frame().await.is_none(),
        "nothing after the disconnect"
    );
    still_serving(&srv).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Login lock-out and automatic bans for failed logins

#[tokio::test]
async fn repeated_failed_logins_lock_the_account_only() {
    let srv = TestServer::start(|c| c.security.login_failures_per_account = 2).await;
    drop(user(&srv, "alice").await);
    drop(user(&srv, "bob").await);

    let mut c = Raw::connect(&srv).await;
    for _ in 0..2 {
        let e = c.request(login_req("alice", "wrong password")).await;
        assert_eq!(code(e), ErrorCode::AuthFailed);
    }
    let e = c
        .request(login_req("ALICE", PW))
        .await
        .expect_err("locked, even with the right password");
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert!(e.message.contains("wait"), "{e:?}");
    // On another connection too.
    assert_eq!(code(try_login(&srv, "alice").await), ErrorCode::RateLimited);
    // Another account is unaffected, even from the same connection.
    assert!(matches!(
        c.request(login_req("bob", PW)).await,
        Ok(Reply::LoggedIn { .. })
    ));
    srv.stop().await;
}

#[tokio::test]
async fn a_burst_of_failed_logins_bans_the_address() {
    let srv = TestServer::start(|c| c.security.login_failures_per_ip = 3).await;
    let mut bystander = user(&srv, "alice").await;
    let mut c = Raw::connect(&srv).await;
    for name in ["ghost1", "ghost2"] {
        let e = c.request(login_req(name, "wrong password")).await;
        assert_eq!(code(e), ErrorCode::AuthFailed);
    }
    // The third failure bans 127.0.0.1: every connection from it is closed, this one included.
    c.send_frame(login_req("alice", "wrong password")).await;
    assert_eq!(
        c.disconnect_event().await.map(|d| d.0),
        Some(DisconnectReason::Banned)
    );
    assert_eq!(
        bystander.disconnect_event().await.map(|d| d.0),
        Some(DisconnectReason::Banned)
    );
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    let bans = admin(&srv, json!({"cmd": "bans"})).await;
    let ban = &bans["bans"][0];
    assert_eq!(ban["by"], json!("server"), "{bans}");
    assert_eq!(ban["target"], json!("127.0.0.1/32"), "{bans}");
    assert!(
        ban["reason"].as_str().is_some_and(|r| r.contains("login")),
        "{bans}"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Bans from an admin's client and the admin socket

fn ban_user(user: &str, duration_s: Option<u64>, reason: Option<&str>) -> Request {
    Request::Ban {
        user: Some(user.into()),
        ip: None,
        duration_s,
        reason: reason.map(str::to_string),
    }
}

#[tokio::test]
async fn bans_close_refuse_lift_and_expire() {
    let srv = TestServer::start(|_| {}).await;
    srv.add_user("root", PW, true);
    let mut root = login(&srv, "root").await;
    let mut m1 = user(&srv, "mallory").await;
    let mut m2 = login(&srv, "mallory").await;
    let mut bob = user(&srv, "bob").await;

    // Refusals.
    assert_eq!(
        code(bob.request(ban_user("mallory", None, None)).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            bob.request(Request::Unban {
                user: Some("mallory".into()),
                ip: None
            })
            .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(root.request(ban_user("Root", None, None)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(root.request(ban_user("nobody", None, None)).await),
        ErrorCode::NoSuchUser
    );
    for ip in ["300.1.2.3", "not-an-ip", "10.0.0.0/40"] {
        let r = root
            .request(Request::Ban {
                user: None,
                ip: Some(ip.into()),
                duration_s: None,
                reason: None,
            })
            .await;
        assert_eq!(code(r), ErrorCode::BadRequest, "{ip}");
    }
    let r = admin(&srv, json!({"cmd": "ban", "user": "root"})).await;
    assert_eq!(admin_error(&r), "forbidden", "the last admin: {r}");
    let bans = admin(&srv, json!({"cmd": "bans"})).await;
    assert_eq!(bans["bans"], json!([]), "no refusal left a ban: {bans}");

    // A ban closes every connection of the account, saying why.
    root.request(ban_user("mallory", None, Some("spamming links")))
        .await
        .expect("banned");
    for m in [&mut m1, &mut m2] {
        let (reason, message) = m.disconnect_event().await.expect("told why");
        assert_eq!(reason, DisconnectReason::Banned);
        assert!(message.contains("spamming links"), "{message}");
    }
    let e = try_login(&srv, "mallory").await.expect_err("refused");
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("spamming links"), "{e:?}");
    let bans = admin(&srv, json!({"cmd": "bans"})).await;
    assert_eq!(bans["bans"][0]["target"], json!("mallory"), "{bans}");
    assert_eq!(bans["bans"][0]["by"], json!("root"), "{bans}");
    assert_eq!(bans["bans"][0]["until_ms"], Value::Null, "{bans}");

    // Unban lets them in.
    let unban = Request::Unban {
        user: Some("mallory".into()),
        ip: None,
    };
    root.request(unban.clone()).await.expect("unbanned");
    drop(login(&srv, "mallory").await);
    assert_eq!(code(root.request(unban).await), ErrorCode::NotFound);

    // A timed ban ends by itself.
    root.request(ban_user("mallory", Some(1), None))
        .await
        .expect("banned for a second");
    assert_eq!(code(try_login(&srv, "mallory").await), ErrorCode::Forbidden);
    let start = Instant::now();
    let mut expired = false;
    for _ in 0..60 {
        if try_login(&srv, "mallory").await.is_ok() {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(expired, "the ban did not expire");
    assert!(start.elapsed() < Duration::from_secs(3));

    // An IP ban from the admin socket closes and refuses everything from the address.
    let r = admin(
        &srv,
        json!({"cmd": "ban", "ip": "127.0.0.1", "duration": "1h", "reason": "abuse"}),
    )
    .await;
    admin_ok(&r);
    assert_eq!(r["ban"]["by"], json!("operator"), "{r}");
    let until = r["ban"]["until_ms"].as_i64().expect("until");
    let created = r["ban"]["created_ms"].as_i64().expect("created");
    assert_eq!(until - created, 3_600_000, "{r}");
    for c in [&mut root, &mut bob] {
        assert_eq!(
            c.disconnect_event().await.map(|d| d.0),
            Some(DisconnectReason::Banned)
        );
    }
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    let r = admin(&srv, json!({"cmd": "unban", "ip": "127.0.0.1"})).await;
    admin_ok(&r);
    still_serving(&srv).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Kicks

fn kick(room: Option<&str>, user: &str, reason: &str) -> Request {
    Request::Kick {
        room: room.map(str::to_string),
        user: user.into(),
        reason: Some(reason.into()),
    }
}

fn is_kicked(e: &Event) -> bool {
    matches!(e, Event::Kicked { .. })
}

#[tokio::test]
async fn kicks_from_a_room_and_from_the_server() {
    let srv = TestServer::start(|_| {}).await;
    srv.add_user("root", PW, true);
    let mut root = login(&srv, "root").await;
    let mut alice = user(&srv, "alice").await;
    let mut bob = user(&srv, "bob").await;
    let mut carol = user(&srv, "carol").await;
    create_room(&mut alice, "den", false).await;
    join(&mut bob, "den").await.expect("joined");
    join(&mut carol, "den").await.expect("joined");

    // Neither owner nor admin.
    assert_eq!(
        code(carol.request(kick(Some("den"), "bob", "no")).await),
        ErrorCode::Forbidden
    );

    // The owner kicks: the member and the room hear it; the member is out.
    alice
        .request(kick(Some("den"), "bob", "off topic"))
        .await
        .expect("kicked");
    let expected = Event::Kicked {
        room: Some("den".into()),
        user: "bob".into(),
        by: "alice".into(),
        reason: "off topic".into(),
    };
    assert_eq!(bob.event(is_kicked).await, expected);
    assert_eq!(carol.event(is_kicked).await, expected);
    let members = room_members(&mut alice, "den").await;
    assert!(!members.contains(&"bob".to_string()), "{members:?}");
    assert_eq!(
        code(bob.send_room("den", "still here?").await),
        ErrorCode::NotMember
    );
    ping_ok(&mut bob).await;

    // An admin kicks from any room, member or not.
    root.request(kick(Some("den"), "carol", "admin says"))
        .await
        .expect("kicked");
    assert!(matches!(
        carol.event(is_kicked).await,
        Event::Kicked { by, room: Some(r), .. } if by == "root" && r == "den"
    ));

    // The admin socket kicks from a room.
    join(&mut bob, "den").await.expect("may come back");
    let r = admin(
        &srv,
        json!({"cmd": "kick", "user": "bob", "room": "den", "reason": "operator says"}),
    )
    .await;
    admin_ok(&r);
    assert_eq!(
        bob.event(is_kicked).await,
        Event::Kicked {
            room: Some("den".into()),
            user: "bob".into(),
            by: "operator".into(),
            reason: "operator says".into(),
        }
    );
    let r = admin(&srv, json!({"cmd": "kick", "user": "bob", "room": "den"})).await;
    assert_eq!(admin_error(&r), "no_such_user", "{r}");

    // Off the server: admins only; every connection of the target closes.
    assert_eq!(
        code(alice.request(kick(None, "bob", "go")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(root.request(kick(None, "root", "me")).await),
        ErrorCode::BadRequest
    );
    let mut bob2 = login(&srv, "bob").await;
    root.request(kick(None, "bob", "cool off"))
        .await
        .expect("kicked");
    for b in [&mut bob, &mut bob2] {
        let (reason, message) = b.disconnect_event().await.expect("told why");
        assert_eq!(reason, DisconnectReason::Kicked);
        assert!(message.contains("cool off"), "{message}");
    }
    assert_eq!(
        code(root.request(kick(None, "nobody", "x")).await),
        ErrorCode::NoSuchUser
    );

    // The admin socket kicks off the server; a kicked user may come back.
    let mut bob = login(&srv, "bob").await;
    let r = admin(&srv, json!({"cmd": "kick", "user": "bob"})).await;
    admin_ok(&r);
    // (Earlier connections of bob may still be on their way out.)
    assert!(
        r["connections_closed"].as_u64().is_some_and(|n| n >= 1),
        "{r}"
    );
    let (reason, message) = bob.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Kicked);
    assert!(message.contains("operator"), "{message}");
    let r = admin(&srv, json!({"cmd": "kick", "user": "nobody"})).await;
    assert_eq!(admin_error(&r), "no_such_user", "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn the_kicking_connection_gets_a_reply_not_an_event() {
    let srv = TestServer::start(|_| {}).await;
    let mut alice = user(&srv, "alice").await;
    let mut bob = user(&srv, "bob").await;
    create_room(&mut alice, "den", false).await;
    join(&mut bob, "den").await.expect("joined");
    alice
        .request(kick(Some("den"), "bob", "x"))
        .await
        .expect("kicked");
    bob.event(is_kicked).await;
    ping_ok(&mut alice).await;
    assert!(
        !alice.events.iter().any(is_kicked),
        "ARCHITECTURE.md: the connection that made a change gets a reply, not an event: {:?}",
        alice.events
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Vote-kick

fn vote(room: &str, user: &str) -> Request {
    Request::VoteKick {
        room: room.into(),
        user: user.into(),
    }
}

#[tokio::test]
async fn vote_kick_counts_distinct_members_and_keeps_the_target_out() {
    let srv = TestServer::start(|c| {
        c.votekick.votes = 2;
        c.votekick.ban_minutes = 1;
    })
    .await;
    let mut alice = user(&srv, "alice").await;
    let mut bob = user(&srv, "bob").await;
    let mut carol = user(&srv, "carol").await;
    let mut dave = user(&srv, "dave").await;
    let mut erin = user(&srv, "erin").await;
    create_room(&mut alice, "den", false).await;
    for c in [&mut bob, &mut carol, &mut dave] {
        join(c, "den").await.expect("joined");
    }

    assert_eq!(
        code(dave.request(vote("den", "dave")).await),
        ErrorCode::BadRequest,
        "nobody votes against themselves"
    );
    assert_eq!(
        code(erin.request(vote("den", "dave")).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        bob.request(vote("den", "dave")).await,
        Ok(Reply::VoteCounted {
            votes: 1,
            needed: 2,
            kicked: false
        })
    );
    assert_eq!(
        code(bob.request(vote("den", "Dave")).await),
        ErrorCode::BadRequest,
        "one vote per member"
    );
    let progress = Event::VoteKick {
        room: "den".into(),
        target: "dave".into(),
        voter: "bob".into(),
        votes: 1,
        needed: 2,
    };
    for c in [&mut alice, &mut carol, &mut dave] {
        assert_eq!(
            c.event(|e| matches!(e, Event::VoteKick { .. })).await,
            progress
        );
    }
    assert_eq!(
        carol.request(vote("den", "dave")).await,
        Ok(Reply::VoteCounted {
            votes: 2,
            needed: 2,
            kicked: true
        })
    );
    for c in [&mut alice, &mut bob, &mut dave] {
        match c.event(is_kicked).await {
            Event::Kicked {
                room,
                user,
                by,
                reason,
            } => {
                assert_eq!(
                    (room.as_deref(), user.as_str(), by.as_str()),
                    (Some("den"), "dave", "vote")
                );
                assert!(reason.contains("voted out"), "{reason}");
            }
            _ => unreachable!(),
        }
    }
    let members = room_members(&mut alice, "den").await;
    assert!(!members.contains(&"dave".to_string()), "{members:?}");

    // The target is kept out for the ban time and cannot vote there.
    assert_eq!(code(join(&mut dave, "den").await), ErrorCode::Forbidden);
    assert_eq!(
        code(dave.request(vote("den", "bob")).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(dave.send_room("den", "let me back").await),
        ErrorCode::NotMember
    );

    // Only the owner (or an admin) switches it; off means votes are refused.
    let off = Request::SetRoom {
        room: "den".into(),
        votekick: Some(false),
    };
    assert_eq!(code(bob.request(off.clone()).await), ErrorCode::Forbidden);
    assert_eq!(
        bob.request(vote("den", "carol")).await.map(|_| ()),
        Ok(()),
        "still on"
    );
    alice.request(off).await.expect("turned off");
    assert_eq!(
        code(erin.request(vote("den", "carol")).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(alice.request(vote("den", "carol")).await),
        ErrorCode::Forbidden
    );
    // The vote cast before it was turned off does not carry over when it is back on.
    alice
        .request(Request::SetRoom {
            room: "den".into(),
            votekick: Some(true),
        })
        .await
        .expect("on again");
    assert_eq!(
        alice.request(vote("den", "carol")).await,
        Ok(Reply::VoteCounted {
            votes: 1,
            needed: 2,
            kicked: false
        })
    );
    srv.stop().await;
}

#[tokio::test]
async fn votes_outside_the_window_do_not_count() {
    let srv = TestServer::start(|c| {
        c.votekick.votes = 2;
        c.votekick.window_s = 1;
    })
    .await;
    let mut alice = user(&srv, "alice").await;
    let mut bob = user(&srv, "bob").await;
    let mut carol = user(&srv, "carol").await;
    let _dave = user(&srv, "dave").await;
    // Everyone is in the default room.
    assert_eq!(
        alice.request(vote("general", "dave")).await,
        Ok(Reply::VoteCounted {
            votes: 1,
            needed: 2,
            kicked: false
        })
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        bob.request(vote("general", "dave")).await,
        Ok(Reply::VoteCounted {
            votes: 1,
            needed: 2,
            kicked: false
        }),
        "alice's vote expired"
    );
    assert_eq!(
        carol.request(vote("general", "dave")).await,
        Ok(Reply::VoteCounted {
            votes: 2,
            needed: 2,
            kicked: true
        })
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_vote_kick_room_ban_ends() {
    // ban_minutes = 0: the ban ends as it starts; with 1 minute the test would wait a minute.
    let srv = TestServer::start(|c| {
        c.votekick.votes = 1;
        c.votekick.ban_minutes = 0;
    })
    .await;
    let mut alice = user(&srv, "alice").await;
    let mut bob = user(&srv, "bob").await;
    let r = alice.request(vote("general", "bob")).await;
    assert!(
        matches!(r, Ok(Reply::VoteCounted { kicked: true, .. })),
        "{r:?}"
    );
    bob.event(is_kicked).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        matches!(join(&mut bob, "general").await, Ok(Reply::Joined { .. })),
        "the room ban has ended"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Timeouts

#[tokio::test]
async fn idle_connections_time_out_and_pings_keep_them_alive() {
    let srv = TestServer::start(|c| {
        c.limits.idle_timeout_ms = 300;
        c.limits.login_timeout_ms = 1000;
    })
    .await;
    let mut silent = user(&srv, "alice").await;
    let mut pinger = user(&srv, "bob").await;
    let mut no_login = Raw::connect(&srv).await;
    let start = Instant::now();

    for i in 0..10u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            pinger.request(Request::Ping { nonce: i }).await,
            Ok(Reply::Pong { nonce: i })
        );
    }
    assert!(start.elapsed() >= Duration::from_secs(1));
    ping_ok(&mut pinger).await;
    drop(pinger);

    let (reason, message) = silent.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Timeout);
    assert!(message.contains("ping"), "{message}");
    let (reason, _) = no_login.disconnect_event().await.expect("told why");
    assert_eq!(reason, DisconnectReason::Timeout);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Bounded outbound queue

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped_and_nobody_else_suffers() {
    // 32 KiB messages, 8 per batch (each batch one commit), until the client that does not
    // read is gone: that takes its kernel buffers (the server's send buffer grows to
    // net.ipv4.tcp_wmem's maximum, 4 MiB by default) plus the 16 queued frames. Bounded.
    const SIZE: usize = 32 * 1024;
    const BATCH: u64 = 8;
    const MAX_MESSAGES: u64 = 1024;
    let srv = TestServer::start(|c| {
        c.limits.outbound_queue_frames = 16;
        // This test is about the outbound queue, not the request rate.
        c.limits.requests_per_second = 1_000_000;
        c.limits.request_burst = 1_000_000;
    })
    .await;
    let mut alice = user(&srv, "alice").await;
    // Logs in, then reads nothing until the end of the test.
    let mut stuck = user(&srv, "stuck").await;
    let mut carol = user(&srv, "carol").await;

    // Carol reads everything, concurrently, up to the end marker.
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for _ in 0..=MAX_MESSAGES {
            let m = carol.message().await;
            if m.body.as_text() == Some("end") {
                return seqs;
            }
            assert_eq!(m.body.data.len(), SIZE);
            seqs.push(m.seq);
        }
        panic!("no end marker");
    });

    let send = |body: Body| Request::Send {
        target: Target::Room {
            room: "general".into(),
            except: vec![],
        },
        body,
        idempotency_key: None,
        refs: None,
    };
    // Binary: not indexed for search, so the store's work is just sealing and committing.
    let big = send(Body {
        content_type: "application/octet-stream".into(),
        data: vec![0x5a; SIZE],
    });
    let mut sent = 0;
    let mut gone = false;
    while sent < MAX_MESSAGES && !gone {
        let first = 1_000_000 + sent;
        write_all_frames(&mut alice, first, &vec![big.clone(); BATCH as usize]).await;
        for id in first..first + BATCH {
            match alice.reply_to(id).await {
                Ok(Reply::Sent { .. }) => sent += 1,
                other => panic!("send {id}: {other:?}"),
            }
        }
        gone = !admin_who(&srv)
            .await
            .iter()
            .any(|c| c["user"] == json!("stuck"));
    }
    assert!(
        gone,
        "the client that does not read is still served after {sent} messages"
    );
    alice
        .request(send(Body::text("end")))
        .await
        .expect("end sent");

    // Every acknowledged message reached the honest reader, in order.
    let seqs = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the reader got everything in time")
        .expect("reader");
    assert_eq!(seqs.len() as u64, sent);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "every message, in order"
    );

    // The server cut the non-reader off: its stream ends, well short of everything sent.
    let mut got = 0u64;
    for _ in 0..=MAX_MESSAGES + 16 {
        match stuck.next_frame().await {
            Some(ServerFrame::Event(Event::Message(_))) => got += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert!(
        got < sent,
        "{got} of {sent} messages reached the non-reader"
    );
    assert!(
        stuck.next_frame().await.is_none(),
        "the non-reader's connection ended"
    );

    ping_ok(&mut alice).await;
    still_serving(&srv).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Config reload

#[tokio::test]
async fn reload_applies_a_valid_file_and_keeps_the_old_config_on_error() {
    let mut path = None;
    let srv = TestServer::start(|c| {
        let p = c.data_dir.join(conclave_server::config::CONFIG_FILE);
        std::fs::write(&p, "").expect("write config");
        c.config_file = Some(p.clone());
        path = Some(p);
    })
    .await;
    let path = path.expect("config path");
    still_serving(&srv).await;

    std::fs::write(&path, "[security]\ndeny = [\"127.0.0.1\"]\n").expect("write");
    let r = admin(&srv, json!({"cmd": "reload"})).await;
    admin_ok(&r);
    assert_refused_before_tls(srv.addr, &srv.fingerprint).await;

    // Broken files: refused with the reason; the configuration in force stays.
    for (text, names) in [
        ("[security]\ndeny = []\nno_such_key = 1\n", "no_such_key"),
        ("[security]\ndeny = [\"127.0.0.1/99\"]\n", "security.deny"),
        ("[limits\n", "conclave.toml"),
    ] {
        std::fs::write(&path, text).expect("write");
        let r = admin(&srv, json!({"cmd": "reload"})).await;
        assert_eq!(admin_error(&r), "bad_request", "{r}");
        let message = r["error"]["message"].as_str().expect("message");
        assert!(message.contains(names), "{message}");
        assert!(
            message.contains("previous configuration stays"),
            "{message}"
        );
        assert_refused_before_tls(srv.addr, &srv.fingerprint).await;
    }

    std::fs::write(&path, "").expect("write");
    let r = admin(&srv, json!({"cmd": "reload"})).await;
    admin_ok(&r);
    still_serving(&srv).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 12. The admin socket itself

#[tokio::test]
async fn admin_socket_basics() {
    use std::os::unix::fs::PermissionsExt;
    let srv = TestServer::start(|_| {}).await;
    let sock = conclave_server::admin_socket::socket_path(srv.dir.path());
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let mut alice = user(&srv, "alice").await;
    let mut bob = user(&srv, "bob").await;
    let mut anon = Raw::connect(&srv).await;
    // Registered once it has answered a request.
    ping_ok(&mut anon).await;

    let who = admin_who(&srv).await;
    assert_eq!(who.len(), 3, "{who:?}");
    for c in &who {
        assert_eq!(c["tls"], json!("TLS 1.3"), "{c}");
        assert_eq!(c["ip"], json!("127.0.0.1"), "{c}");
        assert!(c["bytes_in"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert!(c["bytes_out"].as_u64().is_some_and(|n| n > 0), "{c}");
    }
    let mut users: Vec<Value> = who.iter().map(|c| c["user"].clone()).collect();
    users.sort_by_key(|u| u.to_string());
    assert_eq!(users, vec![json!("alice"), json!("bob"), Value::Null]);

    let stats = admin(&srv, json!({"cmd": "stats"})).await;
    admin_ok(&stats);
    assert_eq!(stats["connections"], json!(3), "{stats}");
    assert_eq!(stats["users_online"], json!(2), "{stats}");

    create_room(&mut alice, "secret", true).await;
    let rooms = admin(&srv, json!({"cmd": "rooms"})).await;
    admin_ok(&rooms);
    let rooms = rooms["rooms"].as_array().expect("rooms");
    let secret = rooms
        .iter()
        .find(|r| r["room"] == json!("secret"))
        .expect("private rooms are listed to the operator");
    assert_eq!(secret["private"], json!(true));
    assert_eq!(secret["owner"], json!("alice"));
    assert!(rooms.iter().any(|r| r["room"] == json!("general")));

    let r = admin(
        &srv,
        json!({"cmd": "announce", "text": "maintenance at noon"}),
    )
    .await;
    admin_ok(&r);
    for c in [&mut alice, &mut bob] {
        match c.event(|e| matches!(e, Event::Announce { .. })).await {
            Event::Announce { from, text, .. } => {
                assert_eq!(
                    (from.as_str(), text.as_str()),
                    ("operator", "maintenance at noon")
                );
            }
            _ => unreachable!(),
        }
    }

    // A second server on the same data directory is refused, and the first goes on.
    let mut config = conclave_server::Config::new(srv.dir.path());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    match conclave_server::Server::bind(config).await {
        Ok(_) => panic!("a second server started on the same data directory"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("another conclave server is running"),
                "{text}"
            );
        }
    }
    assert_eq!(
        admin(&srv, json!({"cmd": "stats"})).await["connections"],
        json!(3)
    );

    // Refusals.
    let r = admin(&srv, json!({"cmd": "frobnicate"})).await;
    assert_eq!(admin_error(&r), "bad_request", "{r}");
    let r = admin(&srv, json!({"user": "alice"})).await;
    assert_eq!(admin_error(&r), "bad_request", "{r}");
    let r = admin(
        &srv,
        json!({"cmd": "deny", "op": "replace", "cidr": "10.0.0.1"}),
    )
    .await;
    assert_eq!(admin_error(&r), "bad_request", "{r}");
    ping_ok(&mut alice).await;
    srv.stop().await;
}

#[tokio::test]
async fn the_servers_own_names_cannot_be_accounts() {
    // "operator", "server" and "vote" appear as `by` in kicks, bans and announcements.
    let srv = TestServer::start(|_| {}).await;
    for name in ["operator", "Server", "vote"] {
        let mut c = Raw::connect(&srv).await;
        let r = c
            .request(Request::Register {
                user: name.into(),
                password: "password123".into(),
                server_password: None,
                invite_code: None,
            })
            .await;
        assert_eq!(
            r.expect_err("reserved").code,
            ErrorCode::InvalidName,
            "{name}"
        );
    }
    let r = admin(
        &srv,
        json!({"cmd": "user_add", "user": "operator", "password": "password123"}),
    )
    .await;
    assert_eq!(admin_error(&r), "invalid_name", "{r}");
    srv.stop().await;
}
