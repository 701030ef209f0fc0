//! The MLS halves together, without the network: devices and the server's validator.

use conclave_e2ee::E2eeError;
use conclave_e2ee::device::{Device, Processed};
use conclave_e2ee::ds::{GroupState, ServerSigner};
use conclave_e2ee::payload::Payload;

const CONV: &str = "r:lab";

/// The server's log of the conversation, as a test sees it: (seq, from, bytes).
struct Log {
    state: GroupState,
    entries: Vec<(u64, String, Vec<u8>)>,
}

impl Log {
    fn commit(&mut self, from: &str, bytes: &[u8]) -> Result<u64, E2eeError> {
        let v = self.state.validate_commit(bytes, from)?;
        self.state = v.into_state();
        Ok(self.push(from, bytes))
    }
    fn push(&mut self, from: &str, bytes: &[u8]) -> u64 {
        let seq = self.entries.len() as u64 + 1;
        self.entries.push((seq, from.to_string(), bytes.to_vec()));
        seq
    }
    fn catch_up(&self, d: &Device) -> Vec<Processed> {
        self.entries
            .iter()
            .map(|(seq, from, b)| d.process(CONV, *seq, from, 0, b).expect("process"))
            .collect()
    }
}

/// Alice's and Bob's devices (in `dirs[0]` and `dirs[1]`), the conversation's group created by
/// Alice, and the server's log of it, with no member added yet.
fn alice_creates(dirs: &[tempfile::TempDir]) -> (Device, Device, Log) {
    let server = ServerSigner::generate().expect("server key");
    let alice = Device::open(dirs[0].path(), "alice", "pw-a").expect("alice");
    let bob = Device::open(dirs[1].path(), "bob", "pw-b").expect("bob");
    let gi = alice.create_group(CONV, server.public()).expect("create");
    let log = Log {
        state: GroupState::create(&gi, "alice", server.public()).expect("server follows"),
        entries: Vec::new(),
    };
    (alice, bob, log)
}

/// `user`'s device joins by external commit from `gi`; the server accepts it. Returns its seq.
fn join_external(log: &mut Log, d: &Device, user: &str, gi: &[u8]) -> u64 {
    let out = d.join_external(CONV, gi).expect("external");
    let seq = log.commit(user, &out.commit).expect("join accepted");
    d.confirm_join(CONV, seq).expect("merge");
    seq
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

#[test]
fn create_invite_talk_kick_join_restart() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let server = ServerSigner::generate().expect("server key");
    let alice = Device::open(dirs[0].path(), "alice", "pw-a").expect("alice");
    let bob = Device::open(dirs[1].path(), "bob", "pw-b").expect("bob");
    let carol = Device::open(dirs[2].path(), "carol", "pw-c").expect("carol");

    let gi = alice.create_group(CONV, server.public()).expect("create");
    let state = GroupState::create(&gi, "alice", server.public()).expect("server follows");
    // A group naming another external sender, or created for someone else, is refused.
    assert!(GroupState::create(&gi, "bob", server.public()).is_err());
    let other = ServerSigner::generate().expect("key");
    assert!(GroupState::create(&gi, "alice", other.public()).is_err());
    let mut log = Log {
        state,
        entries: Vec::new(),
    };

    // Alice invites Bob and Carol with their key packages.
    let kps = vec![
        bob.key_packages(1).expect("kp").remove(0),
        carol.key_packages(1).expect("kp").remove(0),
    ];
    let out = alice.add_members(CONV, &kps).expect("add");
    let seq = log.commit("alice", &out.commit).expect("accepted");
    // The same commit again (a replay) is refused: its epoch is gone.
    assert!(matches!(
        log.state.validate_commit(&out.commit, "alice"),
        Err(E2eeError::WrongEpoch)
    ));
    alice.confirm(CONV, seq).expect("merge");
    let welcome = out.welcome.expect("welcome");
    bob.join_welcome(CONV, &welcome, seq).expect("bob joins");
    carol
        .join_welcome(CONV, &welcome, seq)
        .expect("carol joins");
    assert_eq!(alice.members(CONV).expect("members").len(), 3);

    // Messages.
    let m = alice.encrypt(CONV, &body("hello lab")).expect("encrypt");
    let e = log.state.epoch().expect("epoch");
    log.state.check_app(&m, 0, e).expect("server accepts");
    let seq = log.push("alice", &m);
    alice
        .record_own(CONV, seq, 0, &body("hello lab"))
        .expect("own");
    let got = log.catch_up(&bob);
    assert_eq!(text(got.last().expect("one")), Some("hello lab".into()));
    log.catch_up(&carol);

    // Two members commit at once: the server takes one; the other is refused and follows.
    let b_upd = bob.self_update(CONV).expect("bob update");
    let c_upd = carol.self_update(CONV).expect("carol update");
    let seq = log.commit("bob", &b_upd.commit).expect("first wins");
    bob.confirm(CONV, seq).expect("bob merges");
    assert!(log.commit("carol", &c_upd.commit).is_err());
    carol.discard(CONV).expect("carol discards");
    log.catch_up(&carol);
    log.catch_up(&alice);
    assert_eq!(alice.epoch(CONV).expect("e"), carol.epoch(CONV).expect("e"));
    assert_eq!(bob.epoch(CONV).expect("e"), carol.epoch(CONV).expect("e"));

    // A member cannot remove another on its own.
    let rm = {
        // Bob's forged attempt: a commit by Carol's account name is refused too.
        assert!(log.state.validate_commit(&b_upd.commit, "carol").is_err());
        alice.self_update(CONV).expect("upd")
    };
    alice.discard(CONV).expect("discard");
    drop(rm);

    // The operator kicks Carol: the server proposes, Alice commits.
    let props = log
        .state
        .remove_proposals(&server, "carol")
        .expect("proposals");
    assert_eq!(props.len(), 1);
    for p in &props {
        log.push("", p);
    }
    log.catch_up(&alice);
    log.catch_up(&bob);
    // With the removal pending, nobody sends.
    assert!(alice.encrypt(CONV, &body("too early")).is_err());
    let out = alice
        .commit_pending(CONV)
        .expect("commit")
        .expect("something pending");
    let kick_epoch_commit = log.commit("alice", &out.commit).expect("accepted");
    alice.confirm(CONV, kick_epoch_commit).expect("merge");
    log.catch_up(&bob);
    let carol_saw = log.catch_up(&carol);
    assert!(carol_saw.iter().any(|p| matches!(
        p,
        Processed::Commit {
            removed_self: true,
            ..
        }
    )));
    let secret = alice
        .encrypt(CONV, &body("after the kick"))
        .expect("encrypt");
    let min_epoch = log.state.epoch().expect("epoch");
    log.state
        .check_app(&secret, min_epoch, min_epoch)
        .expect("current epoch");
    // An older epoch (before the removal) is refused.
    let stale = bob.encrypt(CONV, &body("x")).expect("enc");
    assert!(
        log.state
            .check_app(&stale, min_epoch + 1, min_epoch + 1)
            .is_err()
    );
    let seq = log.push("alice", &secret);
    assert_eq!(
        text(&bob.process(CONV, seq, "alice", 0, &secret).expect("bob")),
        Some("after the kick".into())
    );
    assert!(matches!(
        carol
            .process(CONV, seq, "alice", 0, &secret)
            .expect("carol"),
        Processed::NotMember
    ));

    // Dave joins by external commit; he cannot read what came before.
    let dave = Device::open(dirs[3].path(), "dave", "pw-d").expect("dave");
    let gi = alice.group_info(CONV).expect("gi");
    let out = dave.join_external(CONV, &gi).expect("external");
    // Someone else's account cannot push Dave's join.
    assert!(log.state.validate_commit(&out.commit, "bob").is_err());
    let seq = log.commit("dave", &out.commit).expect("join accepted");
    dave.confirm_join(CONV, seq).expect("merge");
    log.catch_up(&alice);
    log.catch_up(&bob);
    assert!(matches!(
        dave.process(CONV, 1, "alice", 0, &log.entries[1].2)
            .expect("old"),
        Processed::BeforeJoin
    ));
    let m = bob.encrypt(CONV, &body("welcome dave")).expect("enc");
    let seq = log.push("bob", &m);
    assert_eq!(
        text(&dave.process(CONV, seq, "bob", 0, &m).expect("dave reads")),
        Some("welcome dave".into())
    );

    // Restart: Bob's device reopens from its directory and keeps working.
    drop(bob);
    let bob = Device::open(dirs[1].path(), "bob", "pw-b").expect("reopen");
    let m = alice.encrypt(CONV, &body("still there?")).expect("enc");
    let seq = log.push("alice", &m);
    assert_eq!(
        text(&bob.process(CONV, seq, "alice", 0, &m).expect("bob")),
        Some("still there?".into())
    );
    let hits = bob.search("STILL", Some(CONV), 10).expect("search");
    assert_eq!(hits.len(), 1);
    // Another password does not open the local history kept so far (the device goes on
    // with a new history key; the group keys are not affected).
    drop(bob);
    let bob = Device::open(dirs[1].path(), "bob", "changed").expect("reopen");
    assert!(bob.history_reset());
    assert!(
        bob.search("STILL", Some(CONV), 10)
            .expect("search")
            .is_empty()
    );
    let m = alice.encrypt(CONV, &body("new era")).expect("enc");
    let seq = log.push("alice", &m);
    assert_eq!(
        text(&bob.process(CONV, seq, "alice", 0, &m).expect("bob")),
        Some("new era".into())
    );
    // The state database holds no plaintext.
    for entry in std::fs::read_dir(dirs[1].path()).expect("dir") {
        let raw = std::fs::read(entry.expect("entry").path()).expect("read");
        assert!(!raw.windows(5).any(|w| w == b"still"));
        assert!(!raw.windows(5).any(|w| w == b"hello"));
    }
}

/// A message whose processing fails after it has advanced the group's ratchet (the server
/// names the wrong sender) leaves the group as stored before it: the same bytes, later named
/// right, still decrypt. Holds for the group kept in memory between operations, and after a
/// restart from the state directory.
#[test]
fn a_failed_operation_leaves_the_group_as_it_was() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let server = ServerSigner::generate().expect("server key");
    let alice = Device::open(dirs[0].path(), "alice", "pw-a").expect("alice");
    let bob = Device::open(dirs[1].path(), "bob", "pw-b").expect("bob");
    alice.create_group(CONV, server.public()).expect("create");
    let kp = bob.key_packages(1).expect("kp");
    let out = alice.add_members(CONV, &kp).expect("add");
    alice.confirm(CONV, 1).expect("merge");
    bob.join_welcome(CONV, &out.welcome.expect("welcome"), 1)
        .expect("bob joins");

    let first = alice.encrypt(CONV, &body("first")).expect("encrypt");
    // Named as mallory's by the server: refused after decryption, so not stored.
    let got = bob.process(CONV, 2, "mallory", 0, &first).expect("process");
    assert!(matches!(got, Processed::Unreadable(_)), "{got:?}");
    // The same bytes under the right name decrypt: the failed attempt consumed nothing.
    let got = bob.process(CONV, 3, "alice", 0, &first).expect("process");
    assert_eq!(text(&got), Some("first".into()));

    // Again across a restart of Bob's device.
    let second = alice.encrypt(CONV, &body("second")).expect("encrypt");
    let got = bob
        .process(CONV, 4, "mallory", 0, &second)
        .expect("process");
    assert!(matches!(got, Processed::Unreadable(_)), "{got:?}");
    drop(bob);
    let bob = Device::open(dirs[1].path(), "bob", "pw-b").expect("bob again");
    let got = bob.process(CONV, 5, "alice", 0, &second).expect("process");
    assert_eq!(text(&got), Some("second".into()));
    // And many messages in a row, through the kept group.
    for i in 0..20u64 {
        let m = alice
            .encrypt(CONV, &body(&format!("m{i}")))
            .expect("encrypt");
        let got = bob.process(CONV, 6 + i, "alice", 0, &m).expect("process");
        assert_eq!(text(&got), Some(format!("m{i}")));
    }
}

/// A file's description counts only from the account that offered the file: another member
/// describing the same file id (to make it fail, or open as something else) is kept apart.
#[test]
fn a_file_description_is_bound_to_its_sender() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let server = ServerSigner::generate().expect("server key");
    let alice = Device::open(dirs[0].path(), "alice", "pw-a").expect("alice");
    let bob = Device::open(dirs[1].path(), "bob", "pw-b").expect("bob");
    let mallory = Device::open(dirs[2].path(), "mallory", "pw-m").expect("mallory");
    alice.create_group(CONV, server.public()).expect("create");
    let kps = vec![
        bob.key_packages(1).expect("kp").remove(0),
        mallory.key_packages(1).expect("kp").remove(0),
    ];
    let out = alice.add_members(CONV, &kps).expect("add");
    alice.confirm(CONV, 1).expect("merge");
    let welcome = out.welcome.expect("welcome");
    bob.join_welcome(CONV, &welcome, 1).expect("bob joins");
    mallory
        .join_welcome(CONV, &welcome, 1)
        .expect("mallory joins");

    let described = |name: &str, key: u8| Payload::File {
        file_id: "f-1".into(),
        name: name.into(),
        size: 5,
        sha256: [key; 32],
        key: [key; 32],
    };
    let real = alice
        .encrypt(CONV, &described("report.pdf", 1))
        .expect("encrypt");
    let fake = mallory
        .encrypt(CONV, &described("evil.exe", 2))
        .expect("encrypt");
    // Mallory's comes both before and after Alice's.
    bob.process(CONV, 2, "mallory", 0, &fake).expect("process");
    bob.process(CONV, 3, "alice", 0, &real).expect("process");
    let fake_again = mallory
        .encrypt(CONV, &described("evil.exe", 3))
        .expect("encrypt");
    bob.process(CONV, 4, "mallory", 0, &fake_again)
        .expect("process");
    assert_eq!(
        bob.file("f-1", "alice").expect("read"),
        Some(described("report.pdf", 1))
    );
    assert_eq!(
        bob.file("f-1", "mallory").expect("read"),
        Some(described("evil.exe", 3))
    );
    assert_eq!(bob.file("f-1", "carol").expect("read"), None);
}

/// A client killed between the server's acceptance of its commit and its own merge finds the
/// commit in the log when it comes back, and merges it instead of failing on it; an external
/// join that was never confirmed is dropped at open, and joining again replaces the leaf the
/// server may have taken (same device, same signature key).
#[test]
fn a_crash_around_a_commit_is_repaired() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let (alice, bob, mut log) = alice_creates(&dirs);
    let kp = bob.key_packages(1).expect("kp");
    let out = alice.add_members(CONV, &kp).expect("add");
    let seq = log.commit("alice", &out.commit).expect("accepted");
    // Alice's process dies here: no confirm.
    drop(alice);
    let alice = Device::open(dirs[0].path(), "alice", "pw-a").expect("alice again");
    let got = alice
        .process(CONV, seq, "alice", 0, &log.entries[0].2)
        .expect("process");
    assert!(
        matches!(&got, Processed::Commit { added, .. } if added.iter().any(|m| m.user == "bob")),
        "{got:?}"
    );
    bob.join_welcome(CONV, &out.welcome.expect("welcome"), seq)
        .expect("bob joins");
    let m = alice.encrypt(CONV, &body("after the crash")).expect("enc");
    let seq = log.push("alice", &m);
    assert_eq!(
        text(&bob.process(CONV, seq, "alice", 0, &m).expect("bob")),
        Some("after the crash".into())
    );

    // Carol's external join is taken by the server, but she dies before confirming it.
    let carol = Device::open(dirs[2].path(), "carol", "pw-c").expect("carol");
    let gi = alice.group_info(CONV).expect("gi");
    let out = carol.join_external(CONV, &gi).expect("external");
    let seq = log.commit("carol", &out.commit).expect("join accepted");
    log.catch_up(&alice);
    log.catch_up(&bob);
    drop(carol);
    let carol = Device::open(dirs[2].path(), "carol", "pw-c").expect("carol again");
    assert!(
        !carol.has_group(CONV).expect("row"),
        "the unconfirmed join is dropped"
    );
    // She joins again: her old leaf goes in the same commit, so the group has her once.
    let gi = alice.group_info(CONV).expect("gi");
    let out = carol.join_external(CONV, &gi).expect("external again");
    let seq2 = log.commit("carol", &out.commit).expect("rejoin accepted");
    assert!(seq2 > seq);
    carol.confirm_join(CONV, seq2).expect("merge");
    log.catch_up(&alice);
    log.catch_up(&bob);
    let carols = alice
        .members(CONV)
        .expect("members")
        .into_iter()
        .filter(|m| m.user == "carol")
        .count();
    assert_eq!(carols, 1);
    let m = bob.encrypt(CONV, &body("carol is back")).expect("enc");
    let seq = log.push("bob", &m);
    assert_eq!(
        text(&carol.process(CONV, seq, "bob", 0, &m).expect("carol")),
        Some("carol is back".into())
    );
}

/// A device that read a message, then left the group and joined it again, is given that
/// message once more (a catch-up from an account position that lags the device): it is a
/// duplicate, not "sent before this device joined". A message it never had still is.
#[test]
fn a_message_read_before_a_rejoin_is_a_duplicate() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let (alice, bob, mut log) = alice_creates(&dirs);
    let kp = bob.key_packages(1).expect("kp");
    let out = alice.add_members(CONV, &kp).expect("add");
    let seq = log.commit("alice", &out.commit).expect("add accepted");
    alice.confirm(CONV, seq).expect("merge");
    bob.join_welcome(CONV, &out.welcome.expect("welcome"), seq)
        .expect("bob joins");
    let m = alice.encrypt(CONV, &body("read once")).expect("enc");
    let read = log.push("alice", &m);
    assert_eq!(
        text(&bob.process(CONV, read, "alice", 0, &m).expect("bob")),
        Some("read once".into())
    );
    // Bob's device joins again (as after a removal and a return).
    let gi = alice.group_info(CONV).expect("gi");
    join_external(&mut log, &bob, "bob", &gi);
    assert!(matches!(
        bob.process(CONV, read, "alice", 0, &m).expect("again"),
        Processed::Duplicate
    ));
    // Carol, new, never had it.
    let carol = Device::open(dirs[2].path(), "carol", "pw-c").expect("carol");
    let gi = {
        log.catch_up(&alice);
        alice.group_info(CONV).expect("gi")
    };
    join_external(&mut log, &carol, "carol", &gi);
    assert!(matches!(
        carol.process(CONV, read, "alice", 0, &m).expect("old"),
        Processed::BeforeJoin
    ));
}

/// A send of this device ordered after a message it has not processed yet (the message's event
/// waits while the send holds the group): the message is still read when it comes, not taken
/// for a duplicate, and the position then moves past the send (seen through a relay's delay,
/// where it lost messages).
#[test]
fn a_message_ordered_before_an_own_send_is_still_read() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let (alice, bob, mut log) = alice_creates(&dirs);
    let kp = bob.key_packages(1).expect("kp");
    let out = alice.add_members(CONV, &kp).expect("add");
    let seq = log.commit("alice", &out.commit).expect("add accepted");
    alice.confirm(CONV, seq).expect("merge");
    bob.join_welcome(CONV, &out.welcome.expect("welcome"), seq)
        .expect("bob joins");
    let m = alice.encrypt(CONV, &body("from alice")).expect("enc");
    let first = log.push("alice", &m);
    // Bob sends before processing Alice's message; the server orders his after hers.
    let own = bob.encrypt(CONV, &body("from bob")).expect("enc");
    let second = log.push("bob", &own);
    bob.record_own(CONV, second, 0, &body("from bob"))
        .expect("recorded");
    assert_eq!(bob.last_seq(CONV).expect("last"), Some(first - 1));
    assert_eq!(
        text(&bob.process(CONV, first, "alice", 0, &m).expect("bob")),
        Some("from alice".into())
    );
    assert_eq!(bob.last_seq(CONV).expect("last"), Some(second));
    assert!(matches!(
        bob.process(CONV, second, "bob", 0, &own).expect("own"),
        Processed::Duplicate
    ));
    // A send that follows what was processed moves the position at once.
    let own2 = bob.encrypt(CONV, &body("again")).expect("enc");
    let third = log.push("bob", &own2);
    bob.record_own(CONV, third, 0, &body("again"))
        .expect("recorded");
    assert_eq!(bob.last_seq(CONV).expect("last"), Some(third));
    let texts: Vec<String> = bob
        .history(CONV, 10, None)
        .expect("history")
        .into_iter()
        .filter_map(|e| match e.payload {
            Payload::Body { data, .. } => String::from_utf8(data).ok(),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["from alice", "from bob", "again"]);
}
