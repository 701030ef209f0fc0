//! The browser's MLS layer (web/src/mls.ts on ts-mls 1.6.4, patched by
//! web/scripts/patch-ts-mls.mjs) against this crate's OpenMLS devices and the server's
//! validator, in Conclave's settings: key packages, Welcome, external joins both ways,
//! application messages both ways, commits both ways, and a commit of the server's Remove
//! proposal that the server's `PublicGroup` validates. A divergence between the two MLS
//! implementations fails here.
//!
//! Needs Node.js and `npm ci` run in web/ (CI runs it); without them this test fails with a
//! message saying so.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use conclave_e2ee::device::{Device, Processed};
use conclave_e2ee::ds::{GroupState, ServerSigner};
use conclave_e2ee::payload::Payload;
use serde_json::{Value, json};

const CONV: &str = "r:lab";

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../web")
}

/// The ts-mls peer: a Node process speaking JSON lines.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn start() -> Peer {
        let web = web_dir();
        assert!(
            web.join("node_modules/ts-mls/package.json").exists(),
            "web/node_modules is missing: run `npm ci` in {} (CI does) before `cargo test`",
            web.display()
        );
        let mut child = Command::new("node")
            .arg("scripts/run-ts.mjs")
            .arg("test/interop-peer.ts")
            .current_dir(&web)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` ({e}): install Node.js 20+ and run `npm ci` in web/")
            });
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, req: Value) -> Value {
        writeln!(self.stdin, "{req}").expect("write to the node peer");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read from the node peer");
        assert!(n > 0, "the node peer exited (see its stderr above)");
        let v: Value = serde_json::from_str(&line).expect("the node peer's reply is JSON");
        assert!(
            v["ok"] == json!(true),
            "ts-mls peer refused {}: {}",
            req["op"],
            v["error"]
        );
        v
    }

    fn bytes(v: &Value, k: &str) -> Vec<u8> {
        hex::decode(v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"))).expect("hex")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The conversation's log as the server keeps it.
struct Log {
    state: GroupState,
    entries: Vec<(u64, String, Vec<u8>)>,
}

impl Log {
    fn commit(&mut self, from: &str, bytes: &[u8]) -> u64 {
        let v = self
            .state
            .validate_commit(bytes, from)
            .unwrap_or_else(|e| panic!("the server refused {from}'s commit: {e}"));
        self.state = v.into_state();
        self.push(from, bytes)
    }
    fn push(&mut self, from: &str, bytes: &[u8]) -> u64 {
        let seq = self.entries.len() as u64 + 1;
        self.entries.push((seq, from.to_string(), bytes.to_vec()));
        seq
    }
}

fn text(p: &Processed) -> Option<String> {
    match p {
        Processed::App {
            payload: Payload::Body { data, .. },
            ..
        } => Some(String::from_utf8_lossy(data).into_owned()),
        _ => None,
    }
}

fn body(s: &str) -> Payload {
    Payload::Body {
        content_type: "text/plain".into(),
        data: s.as_bytes().to_vec(),
    }
}

/// Feeds log entries `from..` to the ts-mls device `name`; returns the replies.
fn peer_catch_up(peer: &mut Peer, name: &str, log: &Log, from: u64) -> Vec<Value> {
    log.entries
        .iter()
        .filter(|(seq, _, _)| *seq >= from)
        .map(|(seq, who, data)| {
            peer.call(
                json!({"op":"process","name":name,"conv":CONV,"seq":seq,"from":who,
                "data":hex::encode(data)}),
            )
        })
        .collect()
}

fn rust_catch_up(d: &Device, log: &Log, from: u64) -> Vec<Processed> {
    log.entries
        .iter()
        .filter(|(seq, _, _)| *seq >= from)
        .map(|(seq, who, data)| d.process(CONV, *seq, who, 0, data).expect("process"))
        .collect()
}

#[test]
fn ts_mls_and_openmls_interoperate() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let server = ServerSigner::generate().expect("server key");
    let alice = Device::open(dirs[0].path(), "alice", "pw-a").expect("alice");
    let mut peer = Peer::start();
    peer.call(json!({"op":"new","name":"bob","user":"bob"}));

    // OpenMLS creates the group; a ts-mls key package joins it by Welcome.
    let gi = alice.create_group(CONV, server.public()).expect("create");
    let mut log = Log {
        state: GroupState::create(&gi, "alice", server.public()).expect("server follows"),
        entries: Vec::new(),
    };
    let kp = Peer::bytes(
        &peer.call(json!({"op":"key_package","name":"bob"})),
        "key_package",
    );
    conclave_e2ee::ds::check_key_package(&kp, "bob")
        .expect("the server accepts ts-mls's key package");
    let out = alice.add_members(CONV, &[kp]).expect("add bob");
    let seq = log.commit("alice", &out.commit);
    alice.confirm(CONV, seq).expect("confirm");
    log.state
        .check_group_info(&out.group_info, 1)
        .expect("OpenMLS's GroupInfo");
    peer.call(json!({"op":"welcome","name":"bob","conv":CONV,
        "welcome":hex::encode(out.welcome.expect("welcome")),"seq":seq}));

    // Application messages both ways.
    let m = alice
        .encrypt(CONV, &body("hello from OpenMLS"))
        .expect("encrypt");
    let seq = log.push("alice", &m);
    let r = peer.call(
        json!({"op":"process","name":"bob","conv":CONV,"seq":seq,"from":"alice",
        "data":hex::encode(&m)}),
    );
    assert_eq!(r["kind"], "app", "{r}");
    assert_eq!(r["text"], "hello from OpenMLS");
    assert_eq!(r["user"], "alice");
    let m = Peer::bytes(
        &peer.call(json!({"op":"encrypt","name":"bob","conv":CONV,"text":"hello from ts-mls"})),
        "message",
    );
    log.state
        .check_app(&m, 0, 1)
        .expect("the server reads the epoch of ts-mls's message");
    let seq = log.push("bob", &m);
    let p = alice.process(CONV, seq, "bob", 0, &m).expect("process");
    assert_eq!(text(&p).as_deref(), Some("hello from ts-mls"), "{p:?}");
    // Both pad as OpenMLS does: the same text length gives the same message length.
    let same = "x".repeat(300);
    let ours = alice.encrypt(CONV, &body(&same)).expect("encrypt");
    let theirs = Peer::bytes(
        &peer.call(json!({"op":"encrypt","name":"bob","conv":CONV,"text":same})),
        "message",
    );
    assert_eq!(
        ours.len(),
        theirs.len(),
        "padding differs between OpenMLS and ts-mls"
    );
    for (from, m) in [("alice", &ours), ("bob", &theirs)] {
        let seq = log.push(from, m);
        if from == "alice" {
            let r = peer.call(json!({"op":"process","name":"bob","conv":CONV,"seq":seq,
                "from":"alice","data":hex::encode(m)}));
            assert_eq!(r["text"], same.as_str(), "{r}");
        } else {
            let p = alice.process(CONV, seq, "bob", 0, m).expect("process");
            assert_eq!(text(&p).as_deref(), Some(same.as_str()));
        }
    }
    // A message the server attributes to someone else is refused by the reader.
    let forged = log.push("mallory", &m);
    let r = peer.call(json!({"op":"process","name":"bob","conv":CONV,"seq":forged,
        "from":"mallory","data":hex::encode(&m)}));
    assert_eq!(r["kind"], "unreadable", "{r}");
    assert!(matches!(
        alice
            .process(CONV, forged, "mallory", 0, &m)
            .expect("process"),
        Processed::Unreadable(_)
    ));

    // A ts-mls commit (a public message) validated by the server, merged by OpenMLS.
    let o = peer.call(json!({"op":"self_update","name":"bob","conv":CONV}));
    let commit = Peer::bytes(&o, "commit");
    let seq = log.commit("bob", &commit);
    peer.call(json!({"op":"confirm","name":"bob","conv":CONV,"seq":seq}));
    log.state
        .check_group_info(&Peer::bytes(&o, "group_info"), 2)
        .expect("ts-mls's GroupInfo carries ratchet tree and external_pub");
    assert!(matches!(
        alice
            .process(CONV, seq, "bob", 0, &commit)
            .expect("process"),
        Processed::Commit { epoch: 2, .. }
    ));

    // ts-mls joins externally from OpenMLS's GroupInfo (external_pub with its length prefix).
    peer.call(json!({"op":"new","name":"carol","user":"carol"}));
    let gi = alice.group_info(CONV).expect("group info");
    let o = peer
        .call(json!({"op":"external","name":"carol","conv":CONV,"group_info":hex::encode(&gi)}));
    let commit = Peer::bytes(&o, "commit");
    let seq = log.commit("carol", &commit);
    peer.call(json!({"op":"confirm","name":"carol","conv":CONV,"seq":seq}));
    match alice
        .process(CONV, seq, "carol", 0, &commit)
        .expect("process")
    {
        Processed::Commit { added, .. } => assert_eq!(added[0].user, "carol"),
        other => panic!("alice: {other:?}"),
    }
    let r = peer_catch_up(&mut peer, "bob", &log, seq);
    assert_eq!(r[0]["kind"], "commit", "{r:?}");
    assert_eq!(
        r[0]["added"][0].as_str().map(|s| s.starts_with("carol/")),
        Some(true)
    );

    // OpenMLS joins externally from ts-mls's GroupInfo.
    let dave_dir = tempfile::tempdir().expect("tmp");
    let dave = Device::open(dave_dir.path(), "dave", "pw-d").expect("dave");
    let gi = Peer::bytes(
        &peer.call(json!({"op":"group_info","name":"carol","conv":CONV})),
        "group_info",
    );
    let out = dave
        .join_external(CONV, &gi)
        .expect("OpenMLS joins from ts-mls's GroupInfo");
    let seq = log.commit("dave", &out.commit);
    dave.confirm_join(CONV, seq).expect("confirm join");
    assert!(matches!(
        alice
            .process(CONV, seq, "dave", 0, &out.commit)
            .expect("process"),
        Processed::Commit { .. }
    ));
    for name in ["bob", "carol"] {
        let r = peer_catch_up(&mut peer, name, &log, seq);
        assert_eq!(r[0]["kind"], "commit", "{name}: {r:?}");
    }

    // ts-mls state survives its serialised form (what the browser keeps in IndexedDB).
    peer.call(json!({"op":"reload","name":"bob"}));
    let m = dave.encrypt(CONV, &body("after reload")).expect("encrypt");
    let seq = log.push("dave", &m);
    let r = peer_catch_up(&mut peer, "bob", &log, seq);
    assert_eq!(r[0]["text"], "after reload", "{r:?}");
    let r = peer_catch_up(&mut peer, "carol", &log, seq);
    assert_eq!(r[0]["text"], "after reload", "{r:?}");
    assert_eq!(
        text(&rust_catch_up(&alice, &log, seq)[0]).as_deref(),
        Some("after reload")
    );

    // The server removes carol (a kick): its Remove proposal (external sender 0) is committed
    // by ts-mls and validated by the server's PublicGroup; OpenMLS merges it; carol is out.
    let proposals = log
        .state
        .remove_proposals(&server, "carol")
        .expect("remove");
    assert_eq!(proposals.len(), 1);
    let pseq = log.push("", &proposals[0]);
    for name in ["bob", "carol"] {
        let r = peer_catch_up(&mut peer, name, &log, pseq);
        assert_eq!(r[0]["kind"], "proposal", "{name}: {r:?}");
    }
    assert!(matches!(
        rust_catch_up(&alice, &log, pseq)[0],
        Processed::Proposal
    ));
    assert!(matches!(
        rust_catch_up(&dave, &log, pseq)[0],
        Processed::Proposal
    ));
    let o = peer.call(json!({"op":"commit_pending","name":"bob","conv":CONV}));
    let commit = Peer::bytes(&o, "commit");
    let seq = log.commit("bob", &commit);
    peer.call(json!({"op":"confirm","name":"bob","conv":CONV,"seq":seq}));
    match &rust_catch_up(&alice, &log, seq)[0] {
        Processed::Commit { removed, .. } => assert_eq!(removed[0].user, "carol"),
        other => panic!("alice: {other:?}"),
    }
    rust_catch_up(&dave, &log, seq);
    let r = peer_catch_up(&mut peer, "carol", &log, seq);
    assert_eq!(r[0]["removed_self"], true, "{r:?}");

    // After the removal: OpenMLS and ts-mls still talk; carol reads nothing.
    let m = alice
        .encrypt(CONV, &body("carol is gone"))
        .expect("encrypt");
    let seq = log.push("alice", &m);
    let r = peer_catch_up(&mut peer, "bob", &log, seq);
    assert_eq!(r[0]["text"], "carol is gone", "{r:?}");
    let r = peer_catch_up(&mut peer, "carol", &log, seq);
    assert_ne!(r[0]["kind"], "app", "{r:?}");

    // An OpenMLS commit adding a second ts-mls device, merged by the ts-mls members.
    peer.call(json!({"op":"new","name":"bob2","user":"bob"}));
    let kp = Peer::bytes(
        &peer.call(json!({"op":"key_package","name":"bob2"})),
        "key_package",
    );
    let out = dave.add_members(CONV, &[kp]).expect("add bob2");
    let seq = log.commit("dave", &out.commit);
    dave.confirm(CONV, seq).expect("confirm");
    rust_catch_up(&alice, &log, seq);
    let r = peer_catch_up(&mut peer, "bob", &log, seq);
    assert_eq!(r[0]["kind"], "commit", "{r:?}");
    peer.call(json!({"op":"welcome","name":"bob2","conv":CONV,
        "welcome":hex::encode(out.welcome.expect("welcome")),"seq":seq}));
    let m = Peer::bytes(
        &peer.call(json!({"op":"encrypt","name":"bob2","conv":CONV,"text":"second device"})),
        "message",
    );
    let seq = log.push("bob", &m);
    assert_eq!(
        text(&rust_catch_up(&alice, &log, seq)[0]).as_deref(),
        Some("second device")
    );
    assert_eq!(
        text(&rust_catch_up(&dave, &log, seq)[0]).as_deref(),
        Some("second device")
    );
    let r = peer_catch_up(&mut peer, "bob", &log, seq);
    assert_eq!(r[0]["text"], "second device", "{r:?}");
}

/// The web client's own unit tests (web/test/unit.ts: slash commands, the Payload codec,
/// varints, sealed files), run with Node's test runner.
#[test]
fn web_unit_tests_pass() {
    let web = web_dir();
    assert!(
        web.join("node_modules/esbuild/package.json").exists(),
        "web/node_modules is missing: run `npm ci` in {} (CI does) before `cargo test`",
        web.display()
    );
    let out = Command::new("node")
        .args(["scripts/run-ts.mjs", "test/unit.ts"])
        .current_dir(&web)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `node` ({e}): install Node.js 20+ and run `npm ci` in web/")
        });
    assert!(
        out.status.success(),
        "web/test/unit.ts failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
