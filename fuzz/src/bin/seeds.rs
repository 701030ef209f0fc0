//! Writes the seed inputs of the fuzz targets into `fuzz/seeds/<target>/`: one valid frame of
//! every request variant (and some server frames), JSON commands, a config file, a real audit
//! log and peer-to-peer headers, so the fuzzers start from inputs that reach deep.
//!
//! It is built like the targets (with libFuzzer, so one `cargo fuzz build` makes everything)
//! and does its work at start: `cargo fuzz run -s none seeds -- -runs=0`; `run.sh` does it
//! before fuzzing.
#![no_main]

use std::path::{Path, PathBuf};

use conclave_proto::*;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("seed dir");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn requests() -> Vec<Request> {
    let target_room = Target::Room {
        room: "general".into(),
        except: vec!["carol".into()],
    };
    let target_users = Target::Users {
        to: vec!["bob".into(), "carol".into()],
    };
    let p2p = P2pOffer {
        addrs: vec!["127.0.0.1:4000".parse().expect("addr")],
        fingerprint: [3; 32],
    };
    let id = "01936d7e-8f00-7000-8000-000000000001".to_string();
    vec![
        Request::Login {
            user: "alice".into(),
            password: "pw".into(),
            server_password: Some("sp".into()),
            resume: vec![Cursor {
                conv: Conv::Direct(vec!["alice".into(), "bob".into()]),
                seq: 7,
            }],
        },
        Request::Register {
            user: "alice".into(),
            password: "pw".into(),
            server_password: None,
            invite_code: Some("code".into()),
        },
        Request::CreateRoom {
            room: "ops".into(),
            private: true,
            password: Some("x".into()),
        },
        Request::Join {
            room: "general".into(),
            password: None,
        },
        Request::Part {
            room: "general".into(),
        },
        Request::Invite {
            room: "ops".into(),
            user: "bob".into(),
        },
        Request::Rooms,
        Request::Who {
            room: Some("general".into()),
        },
        Request::Send {
            target: target_room.clone(),
            body: Body::text("hello"),
            idempotency_key: Some("k1".into()),
        },
        Request::Send {
            target: target_users.clone(),
            body: Body {
                content_type: "application/octet-stream".into(),
                data: vec![0, 1, 2, 255],
            },
            idempotency_key: None,
        },
        Request::Announce {
            text: "maintenance".into(),
        },
        Request::History {
            conv: ConvRef::Room("general".into()),
            limit: 50,
            before: Some(10),
        },
        Request::History {
            conv: ConvRef::With(vec!["bob".into()]),
            limit: 50,
            before: None,
        },
        Request::Search {
            query: "deploy friday".into(),
            room: Some("general".into()),
            limit: 20,
            before: Some(id.clone()),
        },
        Request::Ack {
            cursors: vec![Cursor {
                conv: Conv::Room("general".into()),
                seq: 3,
            }],
        },
        Request::Kick {
            room: Some("general".into()),
            user: "mallory".into(),
            reason: Some("spam".into()),
        },
        Request::VoteKick {
            room: "general".into(),
            user: "mallory".into(),
        },
        Request::Ban {
            user: None,
            ip: Some("192.0.2.0/24".into()),
            duration_s: Some(60),
            reason: None,
        },
        Request::Unban {
            user: Some("mallory".into()),
            ip: None,
        },
        Request::SetRoom {
            room: "general".into(),
            votekick: Some(false),
        },
        Request::Ping { nonce: 99 },
        Request::Quit,
        Request::FileOffer {
            target: target_room,
            name: "report.pdf".into(),
            size: 1 << 20,
            sha256: [9; 32],
            p2p: Some(p2p),
        },
        Request::FileStatus {
            file_id: id.clone(),
        },
        Request::FileChunk {
            file_id: id.clone(),
            offset: 131_072,
            data: Chunk(vec![7; 64]),
        },
        Request::FileFetch {
            file_id: id.clone(),
            offset: 0,
        },
        Request::FileDecline {
            file_id: id.clone(),
        },
        Request::FileReceived {
            file_id: id.clone(),
            via_p2p: true,
        },
        Request::FileWantRelay { file_id: id },
        Request::Files,
    ]
}

fn server_frames() -> Vec<ServerFrame> {
    vec![
        ServerFrame::Reply {
            id: 1,
            result: Ok(Reply::Sent {
                msg_id: "m".into(),
                seq: 1,
                ts_ms: 1,
                duplicate: false,
            }),
        },
        ServerFrame::Reply {
            id: 2,
            result: Err(ErrorBody::new(ErrorCode::TooLarge, "too large")),
        },
        ServerFrame::Event(Event::Message(Message {
            msg_id: "m".into(),
            conv: Conv::Room("general".into()),
            from: "bob".into(),
            seq: 5,
            ts_ms: 1_700_000_000_000,
            body: Body::text("hi"),
        })),
        ServerFrame::Event(Event::Disconnect {
            reason: DisconnectReason::SlowConsumer,
            message: "slow".into(),
        }),
    ]
}

const JSON: &[&str] = &[
    r#"{"cmd":"join","room":"general","id":1}"#,
    r#"{"cmd":"part","room":"general"}"#,
    r#"{"cmd":"create_room","room":"ops","private":true,"password":"x"}"#,
    r#"{"cmd":"invite","room":"ops","user":"bob"}"#,
    r#"{"cmd":"rooms"}"#,
    r#"{"cmd":"who","room":"general"}"#,
    r#"{"cmd":"send","room":"general","text":"hi","except":["carol"],"id":"a"}"#,
    r#"{"cmd":"send","to":["bob"],"text":"hi"}"#,
    r#"{"cmd":"announce","text":"maintenance at 5"}"#,
    r#"{"cmd":"history","room":"general","limit":50,"before":9}"#,
    r#"{"cmd":"history","with":"bob","limit":50}"#,
    r#"{"cmd":"search","query":"deploy","room":"general"}"#,
    r#"{"cmd":"kick","room":"general","user":"mallory","reason":"spam"}"#,
    r#"{"cmd":"votekick","room":"general","user":"mallory"}"#,
    r#"{"cmd":"send_file","path":"/tmp/f","room":"general","p2p":true,"window":1048576,"congestion":"bbr"}"#,
    r#"{"cmd":"accept_file","file_id":"01936d7e-8f00-7000-8000-000000000001","dir":"/tmp"}"#,
    r#"{"cmd":"quit"}"#,
];

const CONFIG: &str = r#"listen = "127.0.0.1:7667"
registration = "invite"
default_room = "lobby"

[limits]
max_frame_bytes = 262144
max_message_bytes = 65536
max_connections = 1000
idle_timeout_ms = 60000

[security]
allow = ["10.0.0.0/8", "2001:db8::/32"]
deny = ["10.1.0.0/16"]
max_connections_per_ip = 20
auto_ban = true

[retention]
max_age_days = 30
[retention.rooms.general]
max_messages = 1000

[votekick]
votes = 2

[audit]
max_file_bytes = 1048576
keep_files = 4

[files]
max_file_bytes = 1073741824
"#;

libfuzzer_sys::fuzz_target!(init: write_seeds(), |_data: &[u8]| {});

fn write_seeds() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let reqs = requests();
    let mut stream = Vec::new();
    for (i, req) in reqs.into_iter().enumerate() {
        let body = encode_client(&ClientFrame { id: i as u64, req });
        write(&root.join("request"), &format!("req-{i:02}"), &body);
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        write(&root.join("frame"), &format!("req-{i:02}"), &framed);
        stream.extend_from_slice(&framed);
    }
    let mut hello_stream = hello::encode(PROTOCOL_VERSION, hello::HelloStatus::Ok).to_vec();
    hello_stream.extend_from_slice(&stream);
    write(&root.join("frame"), "stream", &hello_stream);
    for (i, f) in server_frames().iter().enumerate() {
        let body = encode_server(f);
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        write(&root.join("frame"), &format!("srv-{i:02}"), &framed);
    }
    for (i, line) in JSON.iter().enumerate() {
        write(
            &root.join("json_command"),
            &format!("cmd-{i:02}"),
            line.as_bytes(),
        );
    }
    write(&root.join("config"), "full.toml", CONFIG.as_bytes());

    // A real audit log, written by the server's writer.
    let tmp = tempfile::tempdir().expect("tmp");
    let log = conclave_server::audit::AuditLog::open(
        tmp.path(),
        conclave_server::audit::AuditConfig::default(),
    )
    .expect("audit log");
    use conclave_server::audit::{Fields, Kind};
    let addr: std::net::SocketAddr = "192.0.2.7:5000".parse().expect("addr");
    log.record(Kind::Connect, Fields::new().ip(addr).with("tls", "TLS 1.3"));
    log.record(Kind::LoginOk, Fields::new().ip(addr).user("alice"));
    log.record(Kind::Limit, Fields::new().ip(addr).reason("flooding"));
    log.record(
        Kind::Disconnect,
        Fields::new().ip(addr).user("alice").reason("quit"),
    );
    log.close();
    let text = std::fs::read(tmp.path().join("audit").join("audit.log")).expect("audit.log");
    write(&root.join("audit_log"), "log", &text);
    let mut two = text.clone();
    two.push(0);
    two.extend_from_slice(&text);
    write(&root.join("audit_log"), "rotated", &two);

    use conclave_p2p::wire;
    let req = wire::Request {
        token: [5; 32],
        offset: 4096,
    }
    .encode();
    write(&root.join("p2p_wire"), "request", &req);
    write(&root.join("p2p_wire"), "ack", &wire::Ack::Verified.encode());
    write(&root.join("file_chunk"), "empty", &[0u8; 64]);
    write(
        &root.join("file_chunk"),
        "ops",
        &(0u8..=255).cycle().take(512).collect::<Vec<u8>>(),
    );
}
