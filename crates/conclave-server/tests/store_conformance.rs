//! The same behaviour from every storage backend: each test below is written once against the
//! store's traits (`Accounts`, `Rooms`, `Moderation`, `FileMeta`, `Messages`, `Chat`,
//! `Devices`, `Groups`) and run twice, on SQLite's `Db` in a temporary directory (`sqlite::…`) and on `PgDb` against a throwaway PostgreSQL 15
//! (`postgres::…`). A backend that differs from SQLite in a return value, an error or what a
//! failed operation leaves behind fails here.
//!
//! After them, what only PostgreSQL has: a schema version checked at connect (and an older one
//! brought up to date), the data key checked at connect, two nodes spending one invite code at
//! once, two nodes appending to the same conversations at once (gap-free numbers, each message
//! once) and racing one idempotency key, errors when the server is gone (and a batch it cut
//! short left nothing behind); two nodes claiming key packages, saving one group and filling
//! one device's transfer limit at once; and a seeded random run of device and group
//! operations on both backends side by side.

#[path = "common/postgres.rs"]
mod postgres_kit;

use conclave_proto::chat::{ActKind, ActsOn, ReadMarker, Refs};
use conclave_proto::{BackupChunk, Body, Bytes, Conv, WaitingDevice};
use conclave_server::at_rest::DataKey;
use conclave_server::guard::{Ban, BanTarget};
use conclave_server::store::{
    Accounts, Chat, ChatRows, Db, Devices, FileMeta, FileRow, GroupRow, Groups, MAX_KEY_PACKAGES,
    Messages, Moderation, NewMessage, PutOutcome, ReadMoved, RecipientState, RoomRow, Rooms,
    StoreError, WelcomeRow,
};
use conclave_server::store_pg::{PgDb, SCHEMA_VERSION};
use ipnet::IpNet;

#[path = "store_conformance/messages.rs"]
mod messages;
#[path = "store_conformance/pg_messages.rs"]
mod pg_messages;

/// What the conformance tests need of a backend.
trait Tested: Accounts + Rooms + Moderation + FileMeta + Messages + Chat + Devices + Groups {}
impl<T: Accounts + Rooms + Moderation + FileMeta + Messages + Chat + Devices + Groups> Tested
    for T
{
}

/// What the tests of reads over stored messages need (every backend has them now).
trait TestedWithMessages: Tested {}
impl<T: Tested> TestedWithMessages for T {}

fn net(s: &str) -> IpNet {
    s.parse().expect("a CIDR")
}

fn names(users: &[conclave_server::store::UserRow]) -> Vec<&str> {
    users.iter().map(|u| u.name.as_str()).collect()
}

fn room<'a>(rooms: &'a [RoomRow], name: &str) -> Option<&'a RoomRow> {
    rooms.iter().find(|r| r.name == name)
}

fn accounts(s: &mut dyn Tested) {
    s.create_user("bob", "hash-b", false).expect("create bob");
    s.create_user("alice", "hash-a", true)
        .expect("create alice");
    s.create_user("Zed", "hash-z", false).expect("create Zed");
    assert!(matches!(
        s.create_user("alice", "other", false),
        Err(StoreError::Exists)
    ));
    // The refused duplicate changed nothing.
    let alice = s.user("alice").expect("read").expect("alice exists");
    assert_eq!(
        (alice.pw_hash.as_str(), alice.admin),
        ("hash-a", true),
        "a refused duplicate must leave the account as it was"
    );
    assert!(alice.created_ms > 0);
    assert_eq!(s.user("nobody").expect("read"), None);
    // Sorted bytewise, as SQLite compares text: upper case first.
    assert_eq!(names(&s.users().expect("users")), ["Zed", "alice", "bob"]);

    assert!(s.set_password("bob", "hash-b2").expect("set"));
    assert_eq!(
        s.user("bob").expect("read").expect("bob").pw_hash,
        "hash-b2"
    );
    assert!(!s.set_password("nobody", "x").expect("set"));
    assert!(s.set_admin("bob", true).expect("admin"));
    assert!(s.user("bob").expect("read").expect("bob").admin);
    assert!(s.set_admin("bob", false).expect("admin"));
    assert!(!s.user("bob").expect("read").expect("bob").admin);
    assert!(!s.set_admin("nobody", true).expect("admin"));

    assert!(s.delete_user("Zed").expect("delete"));
    assert!(!s.delete_user("Zed").expect("delete again"));
    assert!(!s.delete_user("nobody").expect("delete missing"));
    assert_eq!(s.user("Zed").expect("read"), None);
    assert_eq!(names(&s.users().expect("users")), ["alice", "bob"]);
    // A deleted name can be taken again.
    s.create_user("Zed", "hash-z2", false)
        .expect("recreate Zed");
}

fn invite_codes(s: &mut dyn Tested) {
    s.add_invite_code("code-1").expect("add code");
    assert!(
        s.add_invite_code("code-1").is_err(),
        "the same code hash twice is an error"
    );
    assert!(
        s.register_with_code("code-1", "carol", "h")
            .expect("register")
    );
    let carol = s.user("carol").expect("read").expect("carol registered");
    assert!(!carol.admin, "an invite never makes an admin");
    // Spent once.
    assert!(
        !s.register_with_code("code-1", "dave", "h")
            .expect("register")
    );
    assert_eq!(s.user("dave").expect("read"), None);
    assert!(
        !s.register_with_code("no-such-code", "dave", "h")
            .expect("register")
    );
    assert_eq!(s.user("dave").expect("read"), None);

    // A taken name leaves the code unspent.
    s.create_user("erin", "h", false).expect("create erin");
    s.add_invite_code("code-2").expect("add code");
    assert!(matches!(
        s.register_with_code("code-2", "erin", "other"),
        Err(StoreError::Exists)
    ));
    assert_eq!(s.user("erin").expect("read").expect("erin").pw_hash, "h");
    assert!(
        s.register_with_code("code-2", "frank", "h")
            .expect("register")
    );
    assert!(
        !s.register_with_code("code-2", "gina", "h")
            .expect("register")
    );
}

fn rooms_and_memberships(s: &mut dyn Tested) {
    for u in ["alice", "bob", "carol"] {
        s.create_user(u, "h", false).expect("create user");
    }
    let ops = RoomRow {
        name: "ops".into(),
        private: true,
        pw_hash: Some("room-hash".into()),
        owner: Some("alice".into()),
        members: vec!["alice".into()],
        invited: Vec::new(),
        votekick: false,
    };
    s.create_room(&ops).expect("create ops");
    assert!(matches!(s.create_room(&ops), Err(StoreError::Exists)));
    // A room whose member does not exist is refused as a whole.
    let bad = RoomRow {
        name: "bad".into(),
        members: vec!["alice".into(), "ghost".into()],
        ..ops.clone()
    };
    assert!(s.create_room(&bad).is_err(), "a member must be an account");
    assert!(room(&s.rooms().expect("rooms"), "bad").is_none());

    s.ensure_public_room("general").expect("default room");
    s.ensure_public_room("general").expect("default room again");
    s.ensure_public_room("ops")
        .expect("an existing room is left alone");
    let rooms = s.rooms().expect("rooms");
    assert_eq!(
        rooms.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["general", "ops"]
    );
    assert_eq!(
        room(&rooms, "general"),
        Some(&RoomRow {
            name: "general".into(),
            private: false,
            pw_hash: None,
            owner: None,
            members: Vec::new(),
            invited: Vec::new(),
            votekick: true,
        })
    );
    assert_eq!(room(&rooms, "ops"), Some(&ops));

    s.add_room_invite("ops", "carol").expect("invite");
    s.add_room_invite("ops", "bob").expect("invite");
    s.add_room_invite("ops", "bob").expect("invite twice");
    assert!(s.add_room_invite("nowhere", "bob").is_err(), "no such room");
    assert!(s.add_room_invite("ops", "ghost").is_err(), "no such user");
    let rooms = s.rooms().expect("rooms");
    assert_eq!(room(&rooms, "ops").expect("ops").invited, ["bob", "carol"]);

    // Joining clears the invite.
    s.add_member("ops", "bob").expect("join");
    s.add_member("ops", "bob").expect("join twice");
    let rooms = s.rooms().expect("rooms");
    let ops_now = room(&rooms, "ops").expect("ops");
    assert_eq!(ops_now.members, ["alice", "bob"]);
    assert_eq!(ops_now.invited, ["carol"]);
    assert!(s.add_member("ops", "ghost").is_err(), "no such user");
    assert!(s.add_member("nowhere", "bob").is_err(), "no such room");

    s.add_member("general", "bob").expect("join general");
    assert_eq!(
        s.rooms_of_user("bob").expect("rooms of"),
        ["general", "ops"]
    );
    assert_eq!(
        s.rooms_of_user("nobody").expect("rooms of"),
        Vec::<String>::new()
    );
    s.remove_member("ops", "bob").expect("part");
    s.remove_member("ops", "bob").expect("part twice");
    s.remove_member("nowhere", "nobody")
        .expect("part from nothing");
    assert_eq!(s.rooms_of_user("bob").expect("rooms of"), ["general"]);

    s.set_room_votekick("ops", true).expect("votekick on");
    s.set_room_votekick("nowhere", true)
        .expect("a missing room is no error");
    assert!(
        room(&s.rooms().expect("rooms"), "ops")
            .expect("ops")
            .votekick
    );
    s.set_room_votekick("ops", false).expect("votekick off");
    assert!(
        !room(&s.rooms().expect("rooms"), "ops")
            .expect("ops")
            .votekick
    );

    // Deleting an account takes its memberships and invites with it.
    s.add_member("ops", "bob").expect("join again");
    assert!(s.delete_user("bob").expect("delete bob"));
    assert!(s.delete_user("carol").expect("delete carol"));
    assert_eq!(
        s.rooms_of_user("bob").expect("rooms of"),
        Vec::<String>::new()
    );
    let rooms = s.rooms().expect("rooms");
    assert_eq!(room(&rooms, "ops").expect("ops").members, ["alice"]);
    assert!(room(&rooms, "ops").expect("ops").invited.is_empty());
    assert!(room(&rooms, "general").expect("general").members.is_empty());
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn room_bans_expire(s: &mut dyn Tested) {
    s.add_room_ban("ops", "mallory", 1000).expect("ban");
    s.add_room_ban("general", "mallory", 2000).expect("ban");
    s.add_room_ban("ops", "eve", 500).expect("ban");
    let own = |r: &str, u: &str, t: i64| (r.to_string(), u.to_string(), t);
    assert_eq!(
        sorted(s.room_bans(400).expect("bans")),
        [
            own("general", "mallory", 2000),
            own("ops", "eve", 500),
            own("ops", "mallory", 1000)
        ]
    );
    // A ban ends at its `until_ms`.
    assert_eq!(
        sorted(s.room_bans(500).expect("bans")),
        [own("general", "mallory", 2000), own("ops", "mallory", 1000)]
    );
    // A second vote-kick replaces the end.
    s.add_room_ban("ops", "mallory", 3000).expect("ban again");
    assert_eq!(
        sorted(s.room_bans(2500).expect("bans")),
        [own("ops", "mallory", 3000)]
    );
    assert!(s.room_bans(3000).expect("bans").is_empty());
    // Expired bans were removed, not only hidden.
    assert!(s.room_bans(0).expect("bans").is_empty());
}

fn server_bans(s: &mut dyn Tested) {
    let user = Ban {
        target: BanTarget::User("mallory".into()),
        until_ms: Some(1000),
        reason: "spam".into(),
        by: "alice".into(),
        created_ms: 10,
    };
    let forever = Ban {
        target: BanTarget::Net(net("10.0.0.0/8")),
        until_ms: None,
        reason: "scanner".into(),
        by: "conclave".into(),
        created_ms: 20,
    };
    s.add_ban(&user).expect("ban user");
    s.add_ban(&forever).expect("ban net");
    let by_target = |mut v: Vec<Ban>| {
        v.sort_by_key(|b| (b.target.kind(), b.target.value()));
        v
    };
    assert_eq!(
        by_target(s.bans(0).expect("bans")),
        [forever.clone(), user.clone()]
    );
    // The same target again replaces the ban.
    let longer = Ban {
        until_ms: Some(5000),
        reason: "more spam".into(),
        created_ms: 30,
        ..user.clone()
    };
    s.add_ban(&longer).expect("ban again");
    assert_eq!(
        by_target(s.bans(0).expect("bans")),
        [forever.clone(), longer.clone()]
    );
    // Expired bans are removed; bans for ever stay.
    assert_eq!(s.bans(5000).expect("bans"), std::slice::from_ref(&forever));
    assert!(!s.remove_ban(&user.target).expect("unban expired"));
    assert!(s.remove_ban(&forever.target).expect("unban"));
    assert!(!s.remove_ban(&forever.target).expect("unban twice"));
    assert!(s.bans(0).expect("bans").is_empty());
}

fn ip_rules(s: &mut dyn Tested) {
    assert_eq!(s.ip_rules().expect("rules"), (vec![], vec![]));
    assert!(
        s.set_ip_rule("allow", &net("192.168.0.0/16"), true)
            .expect("add")
    );
    assert!(
        !s.set_ip_rule("allow", &net("192.168.0.0/16"), true)
            .expect("add twice")
    );
    assert!(
        s.set_ip_rule("deny", &net("10.0.0.0/8"), true)
            .expect("add")
    );
    assert!(
        s.set_ip_rule("allow", &net("10.1.0.0/16"), true)
            .expect("add")
    );
    assert!(
        s.set_ip_rule("allow", &net("2001:db8::/32"), true)
            .expect("add v6")
    );
    // One network may be in both lists.
    assert!(
        s.set_ip_rule("deny", &net("10.1.0.0/16"), true)
            .expect("add")
    );
    let (allow, deny) = s.ip_rules().expect("rules");
    assert_eq!(
        sorted(allow),
        sorted(vec![
            net("192.168.0.0/16"),
            net("10.1.0.0/16"),
            net("2001:db8::/32")
        ])
    );
    assert_eq!(
        sorted(deny),
        sorted(vec![net("10.0.0.0/8"), net("10.1.0.0/16")])
    );

    assert!(
        s.set_ip_rule("deny", &net("10.0.0.0/8"), false)
            .expect("remove")
    );
    assert!(
        !s.set_ip_rule("deny", &net("10.0.0.0/8"), false)
            .expect("remove twice")
    );
    assert!(
        !s.set_ip_rule("allow", &net("172.16.0.0/12"), false)
            .expect("remove missing")
    );
    assert!(
        s.set_ip_rule("allow", &net("10.1.0.0/16"), false)
            .expect("remove")
    );
    let (allow, deny) = s.ip_rules().expect("rules");
    assert_eq!(
        sorted(allow),
        sorted(vec![net("192.168.0.0/16"), net("2001:db8::/32")])
    );
    assert_eq!(deny, [net("10.1.0.0/16")]);
}

/// A file record as the server makes one.
fn file_row(
    id: &str,
    sender: &str,
    conv: Conv,
    size: u64,
    created_ms: i64,
    expires_ms: i64,
) -> FileRow {
    FileRow {
        file_id: id.to_string(),
        sender: sender.to_string(),
        conv,
        except: Vec::new(),
        name: format!("{id}.bin"),
        sha256: [id.len() as u8; 32],
        size,
        chunk_size: 65_536,
        created_ms,
        expires_ms,
        complete: false,
        p2p: false,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn ids(files: &[FileRow]) -> Vec<&str> {
    files.iter().map(|f| f.file_id.as_str()).collect()
}

/// File records round-trip (name and hash sealed, the direct conversation, the exceptions,
/// the flags); a duplicate id is an error and changes nothing; duplicate recipients count
/// once; a missing file or recipient is `None` or `false`.
fn files_records(s: &mut dyn Tested) {
    let mut row = file_row("f1", "alice", Conv::Room("lobby".into()), 1000, 10, 1_000);
    row.except = strings(&["carol", "dave"]);
    row.p2p = true;
    s.create_file(&row, &strings(&["bob", "erin", "bob"]))
        .expect("create f1");
    assert_eq!(s.file("f1").expect("read"), Some(row.clone()));
    let dm = file_row(
        "f2",
        "bob",
        Conv::Direct(strings(&["alice", "bob"])),
        5,
        20,
        1_000,
    );
    s.create_file(&dm, &strings(&["alice"])).expect("create f2");
    assert_eq!(s.file("f2").expect("read"), Some(dm));
    assert_eq!(s.file("nope").expect("read"), None);

    let other = file_row("f1", "mallory", Conv::Room("x".into()), 1, 1, 2);
    assert!(
        s.create_file(&other, &strings(&["zed"])).is_err(),
        "a duplicate file id is an error"
    );
    assert_eq!(
        s.file("f1").expect("read"),
        Some(row),
        "a refused duplicate must leave the file as it was"
    );
    assert_eq!(s.file_recipient("f1", "zed").expect("read"), None);

    assert_eq!(
        s.file_recipient("f1", "bob").expect("read"),
        Some(RecipientState::Offered)
    );
    assert_eq!(
        s.file_recipient("f1", "alice").expect("read"),
        None,
        "the sender is no recipient"
    );
    assert_eq!(s.file_recipient("nope", "bob").expect("read"), None);
    assert_eq!(sorted(s.file_ids().expect("ids")), ["f1", "f2"]);
}

/// Recipient states, the relay wait and completion; a missing file or recipient is `false`
/// or nothing.
fn files_recipient_states(s: &mut dyn Tested) {
    let row = file_row("f1", "alice", Conv::Room("lobby".into()), 100, 10, 1_000);
    s.create_file(&row, &strings(&["dave", "bob", "carol", "erin"]))
        .expect("create");
    assert!(
        s.set_file_recipient("f1", "bob", RecipientState::Declined)
            .expect("set")
    );
    assert!(
        s.set_file_recipient("f1", "carol", RecipientState::Received)
            .expect("set")
    );
    // Setting the state a recipient already has still finds them.
    assert!(
        s.set_file_recipient("f1", "carol", RecipientState::Received)
            .expect("set again")
    );
    assert!(
        !s.set_file_recipient("f1", "alice", RecipientState::Received)
            .expect("set non-recipient")
    );
    assert!(
        !s.set_file_recipient("nope", "bob", RecipientState::Received)
            .expect("set missing file")
    );
    assert_eq!(
        s.file_recipient("f1", "bob").expect("read"),
        Some(RecipientState::Declined)
    );
    assert_eq!(
        s.file_recipient("f1", "carol").expect("read"),
        Some(RecipientState::Received)
    );

    assert!(s.want_relay("f1", "dave").expect("want"));
    assert!(s.want_relay("f1", "dave").expect("want again"));
    assert!(!s.want_relay("f1", "alice").expect("want non-recipient"));
    assert!(!s.want_relay("nope", "dave").expect("want missing file"));

    // What `Db` returns: every recipient still offered the file (whether or not they asked
    // for the relay copy). Lists of ids and names come in no promised order (SQLite's depends
    // on the index it picks), so they are compared sorted.
    assert_eq!(
        sorted(s.complete_file("f1").expect("complete")),
        ["dave", "erin"]
    );
    assert!(s.file("f1").expect("read").expect("f1").complete);
    assert!(s.file("f1").expect("read").expect("f1").offer().relay_ready);
    assert!(
        s.complete_file("nope")
            .expect("complete missing")
            .is_empty()
    );
    assert_eq!(s.file("nope").expect("read"), None);
}

/// Pending files: offered and unexpired only, oldest first, at most `limit`.
fn files_pending(s: &mut dyn Tested) {
    for (id, created, expires) in [
        ("c", 30, 1_000),
        ("a", 10, 1_000),
        ("b", 20, 1_000),
        ("old", 5, 100),
    ] {
        let row = file_row(
            id,
            "alice",
            Conv::Room("lobby".into()),
            10,
            created,
            expires,
        );
        s.create_file(&row, &strings(&["bob", "carol"]))
            .expect("create");
    }
    assert_eq!(
        ids(&s.pending_files("bob", 50, 10).expect("pending")),
        ["old", "a", "b", "c"]
    );
    assert_eq!(
        ids(&s.pending_files("bob", 100, 10).expect("pending")),
        ["a", "b", "c"],
        "expired at now is not pending"
    );
    assert_eq!(
        ids(&s.pending_files("bob", 100, 2).expect("pending")),
        ["a", "b"]
    );
    assert!(s.pending_files("bob", 100, 0).expect("pending").is_empty());
    s.set_file_recipient("a", "bob", RecipientState::Received)
        .expect("set");
    s.set_file_recipient("b", "bob", RecipientState::Declined)
        .expect("set");
    let pending = s.pending_files("bob", 100, 10).expect("pending");
    assert_eq!(ids(&pending), ["c"]);
    assert_eq!(pending[0].name, "c.bin", "pending rows are whole rows");
    assert_eq!(
        ids(&s.pending_files("carol", 100, 10).expect("pending")),
        ["a", "b", "c"]
    );
    assert!(
        s.pending_files("alice", 0, 10).expect("pending").is_empty(),
        "not the sender's"
    );
    assert!(
        s.pending_files("nobody", 0, 10)
            .expect("pending")
            .is_empty()
    );
}

/// Quota bytes count the sender's unexpired files; expiry removes the records (and their
/// recipients) and returns their ids; deleting returns who still waited.
fn files_quota_expiry_delete(s: &mut dyn Tested) {
    assert_eq!(s.file_bytes_of("alice", 0).expect("bytes"), 0);
    for (id, sender, size, expires) in [
        ("f3", "alice", 300, 300),
        ("f1", "alice", 100, 100),
        ("f2", "alice", 200, 200),
        ("g1", "bob", 7, 1_000),
        ("big", "carol", 5_000_000_000, 1_000),
    ] {
        let row = file_row(id, sender, Conv::Room("lobby".into()), size, 1, expires);
        s.create_file(&row, &strings(&["dave", "erin", "frank"]))
            .expect("create");
    }
    assert_eq!(s.file_bytes_of("alice", 0).expect("bytes"), 600);
    assert_eq!(
        s.file_bytes_of("alice", 100).expect("bytes"),
        500,
        "expired at now does not count"
    );
    assert_eq!(s.file_bytes_of("alice", 300).expect("bytes"), 0);
    assert_eq!(
        s.file_bytes_of("carol", 0).expect("bytes"),
        5_000_000_000,
        "past 32 bits"
    );
    assert_eq!(s.file_bytes_of("nobody", 0).expect("bytes"), 0);

    assert!(s.expire_files(99).expect("expire").is_empty());
    assert_eq!(sorted(s.expire_files(200).expect("expire")), ["f1", "f2"]);
    assert_eq!(s.file("f1").expect("read"), None);
    assert_eq!(
        s.file_recipient("f1", "dave").expect("read"),
        None,
        "recipients go with the file"
    );
    assert!(s.expire_files(200).expect("expire again").is_empty());
    assert_eq!(sorted(s.file_ids().expect("ids")), ["big", "f3", "g1"]);

    s.set_file_recipient("g1", "dave", RecipientState::Received)
        .expect("set");
    s.set_file_recipient("g1", "erin", RecipientState::Declined)
        .expect("set");
    assert_eq!(sorted(s.delete_file("g1").expect("delete")), ["frank"]);
    assert_eq!(s.file("g1").expect("read"), None);
    assert_eq!(s.file_recipient("g1", "frank").expect("read"), None);
    assert!(s.delete_file("g1").expect("delete again").is_empty());
    assert!(s.delete_file("nope").expect("delete missing").is_empty());
    assert_eq!(
        sorted(s.delete_file("f3").expect("delete")),
        ["dave", "erin", "frank"]
    );
    assert_eq!(sorted(s.file_ids().expect("ids")), ["big"]);
    // A deleted id can be used again.
    let again = file_row("g1", "bob", Conv::Room("lobby".into()), 1, 2, 1_000);
    s.create_file(&again, &[]).expect("recreate g1");
    assert_eq!(s.file("g1").expect("read"), Some(again));
    assert_eq!(s.file_recipient("g1", "frank").expect("read"), None);
}

// ---- Chat, Devices, Groups --------------------------------------------------------------

/// Topics (sealed), display names and read privacy come back from `chat_load` in key order;
/// a topic needs its room and a profile its account, and both go with them.
fn chat_topics_and_profiles(s: &mut dyn Tested) {
    for u in ["alice", "bob", "Carol"] {
        s.create_user(u, "h", false).expect("create user");
    }
    s.ensure_public_room("ops").expect("room");
    s.ensure_public_room("lobby").expect("room");
    assert_eq!(s.chat_load().expect("load"), ChatRows::default());
    s.set_topic("ops", "deploys here", "alice", 10)
        .expect("topic");
    s.set_topic("lobby", "welcome 👋", "bob", 11)
        .expect("topic");
    s.set_topic("ops", "deploys: never on Fridays", "bob", 12)
        .expect("replace topic");
    assert!(
        s.set_topic("nowhere", "x", "alice", 13).is_err(),
        "a topic needs its room"
    );
    s.set_topic("nowhere", "", "alice", 13)
        .expect("removing a topic that is not there");
    s.set_display_name("bob", Some("Bobby")).expect("name");
    s.set_display_name("alice", Some("Alice A.")).expect("name");
    s.set_display_name("alice", None).expect("clear name");
    s.set_share_reads("Carol", false).expect("private");
    s.set_share_reads("bob", false).expect("private");
    s.set_share_reads("bob", true).expect("shared again");
    assert!(
        s.set_display_name("ghost", Some("G")).is_err(),
        "no such user"
    );
    assert!(s.set_share_reads("ghost", false).is_err(), "no such user");
    let load = s.chat_load().expect("load");
    assert_eq!(
        load,
        ChatRows {
            topics: vec![
                ("lobby".into(), "welcome 👋".into()),
                ("ops".into(), "deploys: never on Fridays".into()),
            ],
            display_names: vec![("bob".into(), "Bobby".into())],
            private_reads: strings(&["Carol"]),
        }
    );
    s.set_topic("lobby", "", "bob", 14).expect("remove topic");
    s.set_display_name("Carol", Some("C")).expect("name");
    assert!(s.delete_user("bob").expect("delete"));
    assert_eq!(
        s.chat_load().expect("load"),
        ChatRows {
            topics: vec![("ops".into(), "deploys: never on Fridays".into())],
            // Bytewise: upper case first.
            display_names: vec![("Carol".into(), "C".into())],
            private_reads: strings(&["Carol"]),
        },
        "a name keeps the privacy choice; a deleted account's profile goes with it"
    );
}

/// Read markers move forward only, never past the conversation's newest message, and are
/// listed by account.
fn chat_read_markers(s: &mut dyn Tested) {
    for u in ["alice", "bob", "Zed"] {
        s.create_user(u, "h", false).expect("create user");
    }
    s.ensure_public_room("lobby").expect("room");
    s.add_member("lobby", "alice").expect("join");
    // No message yet: the conversation's newest is 0.
    assert_eq!(
        s.set_read("alice", "r:lobby", 1, 10).expect("read"),
        ReadMoved::Beyond { last_seq: 0 }
    );
    assert_eq!(
        s.set_read("alice", "r:nowhere", 1, 10).expect("read"),
        ReadMoved::Beyond { last_seq: 0 }
    );
    assert_eq!(
        s.set_read("alice", "r:lobby", 0, 10).expect("read"),
        ReadMoved::Moved
    );
    assert_eq!(
        s.set_read("alice", "r:lobby", 0, 11).expect("read"),
        ReadMoved::Unchanged
    );
    assert_eq!(
        s.set_read("Zed", "r:lobby", 0, 12).expect("read"),
        ReadMoved::Moved
    );
    assert_eq!(
        s.set_read("bob", "r:lobby", 0, 13).expect("read"),
        ReadMoved::Moved
    );
    assert!(
        s.set_read("ghost", "r:lobby", 0, 1).is_err(),
        "a marker needs its account"
    );
    let marker = |user: &str, ts_ms| ReadMarker {
        user: user.into(),
        seq: 0,
        ts_ms,
    };
    assert_eq!(
        s.read_markers("r:lobby").expect("markers"),
        [marker("Zed", 12), marker("alice", 10), marker("bob", 13)]
    );
    assert!(s.read_markers("r:other").expect("markers").is_empty());
    assert!(s.delete_user("Zed").expect("delete"));
    assert_eq!(
        s.read_markers("r:lobby").expect("markers"),
        [marker("alice", 10), marker("bob", 13)]
    );
}

/// A device of an account that had one before waits for a decision; the first device, or one
/// not registered, never does; a decided device keeps its decision.
fn devices_requests_and_decisions(s: &mut dyn Tested) {
    assert_eq!(
        s.e2ee_publish("alice", "laptop", b"sig-laptop", &[], 100)
            .expect("publish"),
        0
    );
    assert_eq!(
        s.device_announce("alice", "laptop", b"tk-1", b"s-1", 101, "10.0.0.1")
            .expect("announce"),
        None,
        "the first device does not wait"
    );
    assert_eq!(
        s.device_announce("alice", "ghost", b"tk", b"s", 101, "10.0.0.9")
            .expect("announce"),
        None,
        "an unregistered device does not wait"
    );
    assert!(s.device_requests("alice").expect("requests").is_empty());
    s.e2ee_publish("alice", "phone", b"sig-phone", &[], 200)
        .expect("publish");
    let waiting = WaitingDevice {
        device: "phone".into(),
        signature_key: Bytes::from(b"sig-phone".to_vec()),
        transfer_key: Bytes::from(b"tk-2".to_vec()),
        signature: Bytes::from(b"s-2".to_vec()),
        since_ms: 201,
        addr: "10.0.0.2".into(),
        state: "waiting".into(),
    };
    assert_eq!(
        s.device_announce("alice", "phone", b"tk-2", b"s-2", 201, "10.0.0.2")
            .expect("announce"),
        Some(waiting.clone())
    );
    // Asking again while waiting: the new key and address, the first time.
    let waiting = WaitingDevice {
        transfer_key: Bytes::from(b"tk-3".to_vec()),
        signature: Bytes::from(b"s-3".to_vec()),
        addr: "10.0.0.3".into(),
        ..waiting
    };
    assert_eq!(
        s.device_announce("alice", "phone", b"tk-3", b"s-3", 300, "10.0.0.3")
            .expect("announce"),
        Some(waiting.clone())
    );
    s.e2ee_publish("alice", "tablet", b"sig-tablet", &[], 400)
        .expect("publish");
    assert!(
        s.device_announce("alice", "tablet", b"tk-t", b"s-t", 401, "10.0.0.4")
            .expect("announce")
            .is_some()
    );
    let requests = s.device_requests("alice").expect("requests");
    assert_eq!(
        requests
            .iter()
            .map(|w| w.device.as_str())
            .collect::<Vec<_>>(),
        ["phone", "tablet"],
        "oldest first"
    );
    assert_eq!(requests[0], waiting);

    assert_eq!(
        s.device_decide("alice", "nobody", true).expect("decide"),
        None
    );
    assert_eq!(s.device_decide("bob", "phone", true).expect("decide"), None);
    let approved = WaitingDevice {
        state: "approved".into(),
        ..waiting.clone()
    };
    assert_eq!(
        s.device_decide("alice", "phone", true).expect("decide"),
        Some(approved.clone())
    );
    assert_eq!(
        s.device_announce("alice", "phone", b"tk-4", b"s-4", 500, "10.0.0.5")
            .expect("announce"),
        None,
        "a decided device keeps its decision"
    );
    assert_eq!(
        s.device_decide("alice", "tablet", false)
            .expect("decide")
            .map(|w| w.state),
        Some("rejected".to_string())
    );
    let requests = s.device_requests("alice").expect("requests");
    assert_eq!(requests[0], approved, "asking again changed nothing");
    assert_eq!(requests[1].state, "rejected");
    assert!(s.device_requests("bob").expect("requests").is_empty());
}

/// An approved device's chunks: stored within the limit, fetched in order and bounded, taken
/// away by an ack, deleted when the device is rejected.
fn devices_transfers(s: &mut dyn Tested) {
    s.e2ee_publish("alice", "laptop", b"sig-l", &[], 100)
        .expect("publish");
    s.e2ee_publish("alice", "phone", b"sig-p", &[], 200)
        .expect("publish");
    s.e2ee_publish("alice", "tablet", b"sig-t", &[], 300)
        .expect("publish");
    for d in ["phone", "tablet"] {
        s.device_announce("alice", d, b"tk", b"s", 400, "10.0.0.1")
            .expect("announce");
    }
    assert_eq!(
        s.transfer_put("alice", "phone", "laptop", "t1", 0, b"aaaa", 10)
            .expect("put"),
        PutOutcome::NotApproved,
        "waiting"
    );
    assert_eq!(
        s.transfer_put("alice", "nobody", "laptop", "t1", 0, b"aaaa", 10)
            .expect("put"),
        PutOutcome::NotApproved,
        "unknown"
    );
    s.device_decide("alice", "phone", true).expect("approve");
    s.device_decide("alice", "tablet", true).expect("approve");
    let put = |s: &mut dyn Tested, device: &str, idx: u32, data: &[u8], limit: u64| {
        s.transfer_put("alice", device, "laptop", "t1", idx, data, limit)
            .expect("put")
    };
    assert_eq!(put(s, "phone", 0, b"aaaa", 10), PutOutcome::Stored);
    assert_eq!(put(s, "phone", 1, b"bbbb", 10), PutOutcome::Stored);
    assert_eq!(put(s, "phone", 2, b"ccc", 10), PutOutcome::Full);
    assert_eq!(
        put(s, "phone", 2, b"cc", 10),
        PutOutcome::Stored,
        "up to the limit"
    );
    assert_eq!(
        put(s, "phone", 0, b"zz", 100),
        PutOutcome::Stored,
        "a chunk sent twice is kept once, as first stored"
    );
    assert_eq!(
        put(s, "tablet", 0, b"tttttttt", 10),
        PutOutcome::Stored,
        "a limit per device"
    );
    let all = s
        .transfer_fetch("alice", "phone", 0, 10, 1_000)
        .expect("fetch");
    assert_eq!(
        all.iter()
            .map(|c| (
                c.from_device.as_str(),
                c.transfer.as_str(),
                c.index,
                c.data.to_vec()
            ))
            .collect::<Vec<_>>(),
        [
            ("laptop", "t1", 0, b"aaaa".to_vec()),
            ("laptop", "t1", 1, b"bbbb".to_vec()),
            ("laptop", "t1", 2, b"cc".to_vec()),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids ascend");
    assert_eq!(
        s.transfer_fetch("alice", "phone", 0, 2, 1_000)
            .expect("fetch"),
        all[..2]
    );
    assert_eq!(
        s.transfer_fetch("alice", "phone", 0, 10, 5).expect("fetch"),
        all[..1]
    );
    assert_eq!(
        s.transfer_fetch("alice", "phone", 0, 10, 1).expect("fetch"),
        all[..1],
        "always one when any waits"
    );
    assert_eq!(
        s.transfer_fetch("alice", "phone", all[0].id, 10, 1_000)
            .expect("fetch"),
        all[1..]
    );
    assert_eq!(
        s.transfer_fetch("alice", "phone", 0, usize::MAX, usize::MAX)
            .expect("fetch"),
        all,
        "no limit"
    );
    s.transfer_ack("alice", "phone", all[1].id).expect("ack");
    assert_eq!(
        s.transfer_fetch("alice", "phone", 0, 10, 1_000)
            .expect("fetch"),
        all[2..]
    );
    assert_eq!(
        put(s, "phone", 3, b"dddddddd", 10),
        PutOutcome::Stored,
        "what was taken no longer counts"
    );
    assert_eq!(
        s.transfer_fetch("alice", "tablet", 0, 10, 1_000)
            .expect("fetch")
            .len(),
        1
    );
    s.device_decide("alice", "tablet", false).expect("reject");
    assert!(
        s.transfer_fetch("alice", "tablet", 0, 10, 1_000)
            .expect("fetch")
            .is_empty(),
        "a rejected device's chunks are deleted"
    );
    assert_eq!(put(s, "tablet", 1, b"t", 10), PutOutcome::NotApproved);
    assert!(
        s.transfer_fetch("bob", "phone", 0, 10, 1_000)
            .expect("fetch")
            .is_empty()
    );
}

/// An account's backup segments: within the account's limit, fetched in order and bounded,
/// dropped all or all but one key's.
fn devices_backups(s: &mut dyn Tested) {
    let put = |s: &mut dyn Tested, user: &str, key: &str, idx: u64, data: &[u8], limit: u64| {
        s.backup_put(user, key, idx, data, limit).expect("put")
    };
    assert_eq!(put(s, "alice", "k1", 0, b"aaaa", 10), PutOutcome::Stored);
    assert_eq!(put(s, "alice", "k1", 1, b"bbbb", 10), PutOutcome::Stored);
    assert_eq!(put(s, "alice", "k1", 2, b"ccc", 10), PutOutcome::Full);
    assert_eq!(put(s, "alice", "k1", 2, b"cc", 10), PutOutcome::Stored);
    assert_eq!(
        put(s, "alice", "k2", 0, b"x", 10),
        PutOutcome::Full,
        "the limit is the account's, over every key"
    );
    assert_eq!(
        put(s, "bob", "k1", 0, b"bbbbbbbbbb", 10),
        PutOutcome::Stored
    );
    assert_eq!(
        put(s, "alice", "k1", 0, b"zz", 100),
        PutOutcome::Stored,
        "a segment sent twice is kept once, as first stored"
    );
    let seg = |index: u64, data: &[u8]| BackupChunk {
        index,
        data: Bytes::from(data.to_vec()),
    };
    let all = vec![seg(0, b"aaaa"), seg(1, b"bbbb"), seg(2, b"cc")];
    assert_eq!(
        s.backup_fetch("alice", "k1", None, 10, 1_000)
            .expect("fetch"),
        all
    );
    assert_eq!(
        s.backup_fetch("alice", "k1", Some(0), 10, 1_000)
            .expect("fetch"),
        all[1..]
    );
    assert_eq!(
        s.backup_fetch("alice", "k1", None, 1, 1_000)
            .expect("fetch"),
        all[..1]
    );
    assert_eq!(
        s.backup_fetch("alice", "k1", None, 10, 5).expect("fetch"),
        all[..1]
    );
    assert_eq!(
        s.backup_fetch("alice", "k1", None, 10, 0).expect("fetch"),
        all[..1]
    );
    assert_eq!(
        s.backup_fetch("alice", "k1", None, usize::MAX, usize::MAX)
            .expect("fetch"),
        all
    );
    assert!(
        s.backup_fetch("alice", "k1", Some(2), 10, 1_000)
            .expect("fetch")
            .is_empty()
    );
    assert!(
        s.backup_fetch("alice", "k2", None, 10, 1_000)
            .expect("fetch")
            .is_empty()
    );
    assert_eq!(put(s, "alice", "k2", 0, b"x", 100), PutOutcome::Stored);
    s.backup_drop("alice", Some("k2")).expect("drop");
    assert!(
        s.backup_fetch("alice", "k1", None, 10, 1_000)
            .expect("fetch")
            .is_empty()
    );
    assert_eq!(
        s.backup_fetch("alice", "k2", None, 10, 1_000)
            .expect("fetch"),
        [seg(0, b"x")]
    );
    s.backup_drop("alice", None).expect("drop");
    assert!(
        s.backup_fetch("alice", "k2", None, 10, 1_000)
            .expect("fetch")
            .is_empty()
    );
    assert_eq!(
        s.backup_fetch("bob", "k1", None, 10, 1_000).expect("fetch"),
        [seg(0, b"bbbbbbbbbb")],
        "another account's backup stays"
    );
}

/// Revoking a device records it and deletes its registration, key packages, Welcomes,
/// request and chunks.
fn devices_revoke(s: &mut dyn Tested) {
    s.e2ee_publish("alice", "laptop", b"sig-l", &[b"kp-l".to_vec()], 100)
        .expect("publish");
    s.e2ee_publish("alice", "phone", b"sig-p", &[b"kp-p".to_vec()], 200)
        .expect("publish");
    let asked = s
        .device_announce("alice", "phone", b"tk", b"s", 201, "10.0.0.2")
        .expect("announce")
        .expect("waiting");
    s.device_decide("alice", "phone", true).expect("approve");
    assert_eq!(
        s.transfer_put("alice", "phone", "laptop", "t", 0, b"chunk", 100)
            .expect("put"),
        PutOutcome::Stored
    );
    s.e2ee_add_welcomes(&[("alice".into(), "phone".into())], "r:ops", 5, b"welcome")
        .expect("welcome");

    assert_eq!(
        s.device_revoke("alice", "nobody", 300).expect("revoke"),
        None
    );
    assert_eq!(s.device_revoke("bob", "phone", 300).expect("revoke"), None);
    assert_eq!(
        s.device_revoke("alice", "phone", 300).expect("revoke"),
        Some(WaitingDevice {
            state: "removed".into(),
            ..asked
        }),
        "its request as it was"
    );
    let pair = |u: &str, d: &str| (u.to_string(), d.to_string());
    assert_eq!(
        s.devices_revoked(&[
            pair("alice", "phone"),
            pair("alice", "laptop"),
            pair("bob", "phone"),
            pair("alice", "phone"),
        ])
        .expect("revoked"),
        [pair("alice", "phone"), pair("alice", "phone")]
    );
    assert!(s.devices_revoked(&[]).expect("revoked").is_empty());
    assert_eq!(
        s.e2ee_devices("alice").expect("devices"),
        [("laptop".to_string(), b"sig-l".to_vec())]
    );
    assert!(s.device_requests("alice").expect("requests").is_empty());
    assert!(
        s.e2ee_welcomes("alice", "phone")
            .expect("welcomes")
            .is_empty()
    );
    assert!(
        s.transfer_fetch("alice", "phone", 0, 10, 1_000)
            .expect("fetch")
            .is_empty()
    );
    assert_eq!(
        s.e2ee_claim(&strings(&["alice"])).expect("claim"),
        [("alice".to_string(), "laptop".to_string(), b"kp-l".to_vec())],
        "its key packages are gone"
    );
    // A device that never asked: its row is made up of what is known.
    assert_eq!(
        s.device_revoke("alice", "laptop", 301).expect("revoke"),
        Some(WaitingDevice {
            device: "laptop".into(),
            signature_key: Bytes::from(b"sig-l".to_vec()),
            transfer_key: Bytes::new(),
            signature: Bytes::new(),
            since_ms: 301,
            addr: String::new(),
            state: "removed".into(),
        })
    );
    assert_eq!(
        s.device_revoke("alice", "laptop", 302).expect("revoke"),
        None
    );
    assert_eq!(
        s.devices_revoked(&[pair("alice", "laptop")])
            .expect("revoked"),
        [pair("alice", "laptop")]
    );
}

/// Devices and key packages: a device keeps its signature key, holds at most
/// `MAX_KEY_PACKAGES`, and each package is claimed once.
fn groups_publish_and_claim(s: &mut dyn Tested) {
    let kps = |names: &[&str]| {
        names
            .iter()
            .map(|n| n.as_bytes().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        s.e2ee_publish("alice", "phone", b"sig-p", &kps(&["p1"]), 200)
            .expect("publish"),
        1
    );
    assert_eq!(
        s.e2ee_publish("alice", "laptop", b"sig-l", &kps(&["l1", "l2"]), 100)
            .expect("publish"),
        2
    );
    assert_eq!(
        s.e2ee_publish("alice", "laptop", b"sig-l", &kps(&["l3"]), 300)
            .expect("publish more"),
        3
    );
    assert!(matches!(
        s.e2ee_publish("alice", "laptop", b"sig-other", &kps(&["x"]), 301),
        Err(StoreError::Exists)
    ));
    assert_eq!(
        s.e2ee_publish("bob", "desk", b"sig-d", &kps(&["d1"]), 50)
            .expect("publish"),
        1
    );
    assert_eq!(
        s.e2ee_devices("alice").expect("devices"),
        [
            ("laptop".to_string(), b"sig-l".to_vec()),
            ("phone".to_string(), b"sig-p".to_vec()),
        ],
        "oldest first; the refused key changed nothing"
    );
    assert!(s.e2ee_devices("nobody").expect("devices").is_empty());
    let many: Vec<Vec<u8>> = (0..MAX_KEY_PACKAGES + 20)
        .map(|i| format!("c{i}").into_bytes())
        .collect();
    assert_eq!(
        s.e2ee_publish("carol", "d", b"sig-c", &many, 1)
            .expect("publish"),
        MAX_KEY_PACKAGES as u32
    );
    assert_eq!(
        s.e2ee_publish("carol", "d", b"sig-c", &kps(&["more"]), 2)
            .expect("publish"),
        MAX_KEY_PACKAGES as u32
    );
    let claim = |s: &mut dyn Tested, users: &[&str]| s.e2ee_claim(&strings(users)).expect("claim");
    let kp = |u: &str, d: &str, k: &str| (u.to_string(), d.to_string(), k.as_bytes().to_vec());
    assert_eq!(
        claim(s, &["bob", "alice", "nobody"]),
        [
            kp("bob", "desk", "d1"),
            kp("alice", "laptop", "l1"),
            kp("alice", "phone", "p1")
        ],
        "users as asked, their devices by name, the oldest package"
    );
    assert_eq!(
        claim(s, &["alice", "alice", "bob"]),
        [kp("alice", "laptop", "l2"), kp("alice", "laptop", "l3")],
        "devices with none left are skipped"
    );
    assert!(claim(s, &["alice"]).is_empty());
    assert!(claim(s, &[]).is_empty());
    assert_eq!(claim(s, &["carol"]), [kp("carol", "d", "c0")]);
}

/// A conversation's group: stored sealed and read back whole, replaced by a state that is not
/// older, never by an older one, deleted with its room.
fn groups_state(s: &mut dyn Tested) {
    assert!(s.e2ee_groups().expect("groups").is_empty());
    let ops = GroupRow {
        conv: "r:ops".into(),
        group_id: b"gid-ops".to_vec(),
        state: b"state-0".to_vec(),
        applied_seq: 0,
        group_info: b"gi-0".to_vec(),
        removal_epoch: 0,
        pending: Vec::new(),
    };
    let direct = GroupRow {
        conv: "d:alice,bob".into(),
        group_id: b"gid-d".to_vec(),
        state: vec![0u8; 70_000],
        applied_seq: 3,
        group_info: Vec::new(),
        removal_epoch: 1,
        pending: strings(&["bob", "carol"]),
    };
    s.e2ee_put_group(&ops).expect("put");
    s.e2ee_put_group(&direct).expect("put");
    assert_eq!(
        s.e2ee_groups().expect("groups"),
        [direct.clone(), ops.clone()]
    );
    let newer = GroupRow {
        state: b"state-5".to_vec(),
        applied_seq: 5,
        group_info: b"gi-5".to_vec(),
        removal_epoch: 2,
        pending: strings(&["alice"]),
        ..ops.clone()
    };
    s.e2ee_put_group(&newer).expect("put newer");
    assert_eq!(
        s.e2ee_groups().expect("groups"),
        [direct.clone(), newer.clone()]
    );
    let same_seq = GroupRow {
        pending: Vec::new(),
        ..newer.clone()
    };
    s.e2ee_put_group(&same_seq)
        .expect("put at the same position");
    assert_eq!(
        s.e2ee_groups().expect("groups"),
        [direct.clone(), same_seq.clone()]
    );
    let older = GroupRow {
        state: b"state-4".to_vec(),
        applied_seq: 4,
        ..ops.clone()
    };
    s.e2ee_put_group(&older)
        .expect("an older state is no error");
    assert_eq!(
        s.e2ee_groups().expect("groups"),
        [direct.clone(), same_seq.clone()],
        "a group never moves back"
    );
    s.e2ee_delete_group("r:ops").expect("delete");
    s.e2ee_delete_group("r:nowhere").expect("delete missing");
    assert_eq!(
        s.e2ee_groups().expect("groups"),
        std::slice::from_ref(&direct)
    );
    s.e2ee_put_group(&ops)
        .expect("a new group after the delete");
    assert_eq!(s.e2ee_groups().expect("groups"), [direct, ops]);
}

/// The server's signature key: made the first time, the same one after.
fn groups_signer(s: &mut dyn Tested) {
    let mut made = 0;
    let first = s
        .e2ee_signer(&mut || {
            made += 1;
            b"signer-1".to_vec()
        })
        .expect("signer");
    assert_eq!(first, b"signer-1");
    let again = s
        .e2ee_signer(&mut || {
            made += 1;
            b"signer-2".to_vec()
        })
        .expect("signer");
    assert_eq!(again, b"signer-1", "the stored key, not a new one");
    assert_eq!(made, 1);
}

/// Each device's Welcome mailbox: oldest first, one removed at a time, by its own device only.
fn groups_welcomes(s: &mut dyn Tested) {
    let pair = |u: &str, d: &str| (u.to_string(), d.to_string());
    let first = s
        .e2ee_add_welcomes(
            &[pair("alice", "laptop"), pair("bob", "desk")],
            "r:ops",
            7,
            b"w1",
        )
        .expect("add");
    assert_eq!(
        first
            .iter()
            .map(|(u, d, _)| (u.as_str(), d.as_str()))
            .collect::<Vec<_>>(),
        [("alice", "laptop"), ("bob", "desk")]
    );
    assert_ne!(first[0].2, first[1].2, "ids are unique");
    let second = s
        .e2ee_add_welcomes(&[pair("alice", "laptop")], "d:alice,bob", 9, b"w2")
        .expect("add");
    assert!(
        s.e2ee_add_welcomes(&[], "r:ops", 10, b"w3")
            .expect("add")
            .is_empty()
    );
    let w = |id: u64, conv: &str, seq: u64, welcome: &[u8]| WelcomeRow {
        id,
        conv: conv.into(),
        seq,
        welcome: welcome.to_vec(),
    };
    assert_eq!(
        s.e2ee_welcomes("alice", "laptop").expect("welcomes"),
        [
            w(first[0].2, "r:ops", 7, b"w1"),
            w(second[0].2, "d:alice,bob", 9, b"w2")
        ]
    );
    assert!(
        s.e2ee_welcomes("alice", "phone")
            .expect("welcomes")
            .is_empty()
    );
    s.e2ee_welcome_done("bob", "desk", first[0].2)
        .expect("not bob's welcome");
    s.e2ee_welcome_done("alice", "laptop", first[0].2)
        .expect("done");
    s.e2ee_welcome_done("alice", "laptop", first[0].2)
        .expect("done twice");
    assert_eq!(
        s.e2ee_welcomes("alice", "laptop").expect("welcomes"),
        [w(second[0].2, "d:alice,bob", 9, b"w2")]
    );
    assert_eq!(
        s.e2ee_welcomes("bob", "desk").expect("welcomes"),
        [w(first[1].2, "r:ops", 7, b"w1")]
    );
}

// ---- What reads the messages tables (needs `Messages` on both) ---------------------------

fn new_message(
    conv: &Conv,
    from: &str,
    body: Body,
    except: &[&str],
    refs: Option<Refs>,
) -> NewMessage {
    NewMessage {
        conv: conv.clone(),
        from: from.into(),
        body,
        except: strings(except),
        idempotency_key: None,
        refs: refs.map(Box::new),
    }
}

fn append_one(s: &mut dyn TestedWithMessages, m: NewMessage) -> conclave_proto::Message {
    let mut out = s.append_batch(&[m]).expect("append");
    assert_eq!(out.len(), 1);
    out.remove(0).msg
}

/// The target of an act or reply as the rules see it (blockcast respected), and a thread:
/// its root in its current state, then its replies, paged.
fn chat_targets_and_threads(s: &mut dyn TestedWithMessages) {
    for u in ["alice", "bob", "carol"] {
        s.create_user(u, "h", false).expect("create user");
    }
    s.ensure_public_room("lobby").expect("room");
    for u in ["alice", "bob", "carol"] {
        s.add_member("lobby", u).expect("join");
    }
    let lobby = Conv::Room("lobby".into());
    let root = append_one(
        s,
        new_message(&lobby, "alice", Body::text("hello"), &[], None),
    );
    let reply_to = |id: &str| {
        Some(Refs {
            reply_to: Some(id.to_string()),
            acts_on: None,
        })
    };
    let act = |id: &str, kind| {
        Some(Refs {
            reply_to: None,
            acts_on: Some(ActsOn {
                msg_id: id.to_string(),
                kind,
            }),
        })
    };
    let r1 = append_one(
        s,
        new_message(
            &lobby,
            "bob",
            Body::text("hi!"),
            &[],
            reply_to(&root.msg_id),
        ),
    );
    let r2 = append_one(
        s,
        new_message(
            &lobby,
            "alice",
            Body::text("not for carol"),
            &["carol"],
            reply_to(&root.msg_id),
        ),
    );
    let edit = append_one(
        s,
        new_message(
            &lobby,
            "alice",
            Body::text("hello, all"),
            &[],
            act(&root.msg_id, ActKind::Edit),
        ),
    );
    append_one(
        s,
        new_message(
            &lobby,
            "bob",
            Body::text("👍"),
            &[],
            act(&root.msg_id, ActKind::React),
        ),
    );
    append_one(
        s,
        new_message(&lobby, "carol", Body::text("unrelated"), &[], None),
    );

    let t = s
        .target(&root.msg_id, "bob")
        .expect("target")
        .expect("found");
    assert_eq!(
        (
            t.conv.clone(),
            t.from.as_str(),
            t.seq,
            t.is_act,
            t.deleted,
            t.edits,
            t.reactions
        ),
        (lobby.clone(), "alice", root.seq, false, false, 1, 1)
    );
    assert!(t.except.is_empty());
    assert!(
        s.target(&r2.msg_id, "carol").expect("target").is_none(),
        "not for carol"
    );
    let t2 = s.target(&r2.msg_id, "bob").expect("target").expect("found");
    assert_eq!(t2.except, ["carol"]);
    assert!(
        s.target(&edit.msg_id, "bob")
            .expect("target")
            .expect("found")
            .is_act
    );
    assert!(s.target("no-such-id", "bob").expect("target").is_none());

    let thread = s
        .thread(&root.msg_id, "bob", None, 10)
        .expect("thread")
        .expect("found");
    assert_eq!(
        thread.iter().map(|m| m.msg_id.as_str()).collect::<Vec<_>>(),
        [root.msg_id.as_str(), r1.msg_id.as_str(), r2.msg_id.as_str()]
    );
    assert_eq!(
        thread[0].body.as_text(),
        Some("hello, all"),
        "the root as edited"
    );
    let state = thread[0]
        .extra
        .as_ref()
        .and_then(|e| e.state.as_ref())
        .expect("the root's state");
    assert_eq!((state.edits, state.deleted), (1, false));
    assert_eq!(
        state
            .reactions
            .iter()
            .map(|r| (r.emoji.as_str(), r.users.clone()))
            .collect::<Vec<_>>(),
        [("👍", strings(&["bob"]))]
    );
    assert_eq!(
        thread[1].extra.as_ref().and_then(|e| e.reply_to.as_deref()),
        Some(root.msg_id.as_str())
    );
    let for_carol = s
        .thread(&root.msg_id, "carol", None, 10)
        .expect("thread")
        .expect("found");
    assert_eq!(
        for_carol
            .iter()
            .map(|m| m.msg_id.as_str())
            .collect::<Vec<_>>(),
        [root.msg_id.as_str(), r1.msg_id.as_str()]
    );
    let page = s
        .thread(&root.msg_id, "bob", Some(r1.seq), 10)
        .expect("thread")
        .expect("found");
    assert_eq!(
        page.iter().map(|m| m.msg_id.as_str()).collect::<Vec<_>>(),
        [root.msg_id.as_str(), r2.msg_id.as_str()]
    );
    let first = s
        .thread(&root.msg_id, "bob", None, 1)
        .expect("thread")
        .expect("found");
    assert_eq!(
        first.iter().map(|m| m.msg_id.as_str()).collect::<Vec<_>>(),
        [root.msg_id.as_str(), r1.msg_id.as_str()]
    );
    assert!(
        s.thread("no-such-id", "bob", None, 10)
            .expect("thread")
            .is_none()
    );
    assert!(
        s.thread(&r2.msg_id, "carol", None, 10)
            .expect("thread")
            .is_none()
    );

    // Read markers up to the newest message (6), never past it.
    assert_eq!(
        s.set_read("alice", "r:lobby", 5, 10).expect("read"),
        ReadMoved::Moved
    );
    assert_eq!(
        s.set_read("alice", "r:lobby", 3, 11).expect("read"),
        ReadMoved::Unchanged
    );
    assert_eq!(
        s.set_read("alice", "r:lobby", 6, 12).expect("read"),
        ReadMoved::Moved
    );
    assert_eq!(
        s.set_read("alice", "r:lobby", 7, 13).expect("read"),
        ReadMoved::Beyond { last_seq: 6 }
    );
}

/// The commits of a conversation after a position, in order, other messages left out.
fn groups_commit_log(s: &mut dyn TestedWithMessages) {
    const COMMIT: &str = "application/mls-commit";
    let dm = Conv::Direct(strings(&["alice", "bob"]));
    let body = |ct: &str, data: &[u8]| Body {
        content_type: ct.into(),
        data: data.to_vec(),
    };
    append_one(s, new_message(&dm, "alice", body(COMMIT, b"c1"), &[], None));
    append_one(
        s,
        new_message(
            &dm,
            "bob",
            body("application/mls-message", b"m2"),
            &[],
            None,
        ),
    );
    append_one(s, new_message(&dm, "bob", body(COMMIT, b"c3"), &[], None));
    let key = "d:alice,bob";
    let c = |seq: u64, from: &str, data: &[u8]| (seq, from.to_string(), data.to_vec());
    assert_eq!(
        s.e2ee_commits_after(key, 0, COMMIT).expect("log"),
        [c(1, "alice", b"c1"), c(3, "bob", b"c3")]
    );
    assert_eq!(
        s.e2ee_commits_after(key, 1, COMMIT).expect("log"),
        [c(3, "bob", b"c3")]
    );
    assert!(
        s.e2ee_commits_after(key, 3, COMMIT)
            .expect("log")
            .is_empty()
    );
    assert!(
        s.e2ee_commits_after("d:x,y", 0, COMMIT)
            .expect("log")
            .is_empty()
    );
}

/// The data key every test opens its store with.
fn key() -> DataKey {
    DataKey::from_bytes(&[7u8; 32]).expect("a 32-byte key")
}

/// SQLite's `Db` in a temporary data directory.
fn sqlite() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = Db::open(dir.path(), key()).expect("open SQLite");
    (dir, db)
}

/// `PgDb` on a new throwaway PostgreSQL, over loopback TCP.
fn postgres() -> (postgres_kit::PgServer, PgDb) {
    let pg = postgres_kit::PgServer::start();
    let db = PgDb::connect(&pg.tcp_config(), key()).expect("connect to the throwaway PostgreSQL");
    (pg, db)
}

/// Each behaviour above becomes `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                let (_dir, mut db) = super::sqlite();
                super::$name(&mut db);
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                let (_pg, mut db) = super::postgres();
                super::$name(&mut db);
            })*
        }
    };
}

on_both!(
    accounts,
    invite_codes,
    rooms_and_memberships,
    room_bans_expire,
    server_bans,
    ip_rules,
    files_records,
    files_recipient_states,
    files_pending,
    files_quota_expiry_delete,
    messages_append_and_history,
    messages_idempotency,
    messages_ack_and_catch_up,
    messages_catch_up_limits,
    messages_search,
    messages_acts,
    messages_retention,
    messages_conv_range,
    chat_topics_and_profiles,
    chat_read_markers,
    devices_requests_and_decisions,
    devices_transfers,
    devices_backups,
    devices_revoke,
    groups_publish_and_claim,
    groups_state,
    groups_welcomes,
    groups_signer,
    chat_targets_and_threads,
    groups_commit_log,
);
use messages::{
    messages_ack_and_catch_up, messages_acts, messages_append_and_history,
    messages_catch_up_limits, messages_conv_range, messages_idempotency, messages_retention,
    messages_search,
};

/// Connecting creates the schema once (over the Unix socket this time); a second connection,
/// as a second node would open it, finds it and the rows in it; a database from a newer build
/// is refused.
#[test]
fn postgres_schema_is_versioned() {
    let pg = postgres_kit::PgServer::start();
    let mut first = PgDb::connect(&pg.socket_config(), key()).expect("connect over the socket");
    assert_eq!(first.schema_version().expect("version"), SCHEMA_VERSION);
    first.create_user("alice", "h", true).expect("create");
    drop(first);

    let second = PgDb::connect(&pg.tcp_config(), key()).expect("connect again");
    assert_eq!(second.schema_version().expect("version"), SCHEMA_VERSION);
    assert!(second.user("alice").expect("read").is_some());
    drop(second);

    let mut admin =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    // The kit runs PostgreSQL as the cluster store needs it: a commit that returned is on disk.
    for setting in ["fsync", "synchronous_commit"] {
        let row = admin
            .query_one(&format!("SHOW {setting}"), &[])
            .expect("show");
        assert_eq!(row.get::<_, String>(0), "on", "{setting}");
    }
    admin
        .execute(
            "UPDATE conclave_meta SET value = $1 WHERE key = 'schema_version'",
            &[&(SCHEMA_VERSION + 1).to_string()],
        )
        .expect("pretend a newer build wrote it");
    match PgDb::connect(&pg.tcp_config(), key()) {
        Err(StoreError::TooNew { found }) => assert_eq!(found, SCHEMA_VERSION + 1),
        other => panic!("a newer schema must be refused, got {other:?}"),
    }
}

/// Two nodes spending the same invite code at the same moment: exactly one account is made.
#[test]
fn postgres_invite_code_spent_once_across_nodes() {
    let pg = postgres_kit::PgServer::start();
    let mut setup = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    const ROUNDS: usize = 20;
    for i in 0..ROUNDS {
        setup
            .add_invite_code(&format!("code-{i}"))
            .expect("add code");
    }
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let nodes: Vec<_> = ["node-a", "node-b"]
        .into_iter()
        .map(|node| {
            let config = pg.tcp_config();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut db = PgDb::connect(&config, key()).expect("connect");
                let mut won = Vec::new();
                for i in 0..ROUNDS {
                    barrier.wait();
                    let name = format!("{node}-{i}");
                    if db
                        .register_with_code(&format!("code-{i}"), &name, "h")
                        .expect("register")
                    {
                        won.push(i);
                    }
                }
                won
            })
        })
        .collect();
    let mut won: Vec<usize> = nodes
        .into_iter()
        .flat_map(|t| t.join().expect("node thread"))
        .collect();
    won.sort();
    assert_eq!(
        won,
        (0..ROUNDS).collect::<Vec<_>>(),
        "each code exactly once"
    );
    assert_eq!(setup.users().expect("users").len(), ROUNDS);
}

/// With PostgreSQL gone, operations fail with a `StoreError` that says so (no panic), and work
/// again on a new connection once it is back; what was committed before is still there.
#[test]
fn postgres_down_is_an_error_not_a_panic() {
    let mut pg = postgres_kit::PgServer::start();
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    db.create_user("alice", "h", false).expect("create");
    pg.stop();
    match db.create_user("bob", "h", false) {
        Err(StoreError::Postgres { message, .. }) => {
            assert!(!message.is_empty());
        }
        other => panic!("expected a PostgreSQL error, got {other:?}"),
    }
    match PgDb::connect(&pg.tcp_config(), key()) {
        Err(StoreError::Postgres { message, .. }) => {
            assert!(message.contains("could not connect"), "{message}");
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
    pg.restart();
    let db = PgDb::connect(&pg.tcp_config(), key()).expect("connect after restart");
    assert!(
        db.user("alice").expect("read").is_some(),
        "the commit survived"
    );
    assert_eq!(db.user("bob").expect("read"), None);
}

/// The tables of schema version 4 (chat, devices, end-to-end groups), newest first.
const V4_TABLES: &str = "e2ee_welcomes, e2ee_groups, e2ee_key_packages, e2ee_devices, \
                         device_revoked, backup_segments, device_transfers, device_requests, \
                         read_markers, profiles, room_topics";

/// Makes the database behind `config` one at schema `version` (1, 2 or 3): the tables of the
/// later versions dropped, the version put back.
fn downgrade(config: &str, version: i64) {
    let mut admin = ::postgres::Client::connect(config, ::postgres::NoTls).expect("plain client");
    // Version 6's column, version 5's table, then version 4's.
    let mut sql = format!(
        "ALTER TABLE messages DROP COLUMN mls_commit; DROP TABLE audit_copy; \
         DROP TABLE {V4_TABLES};"
    );
    if version < 3 {
        sql.push_str("DROP TABLE search_index, messages, conv_members;");
    }
    if version < 2 {
        sql.push_str("DROP TABLE file_recipients, files;");
    }
    sql.push_str(&format!(
        "UPDATE conclave_meta SET value = '{version}' WHERE key = 'schema_version';"
    ));
    admin
        .batch_execute(&sql)
        .expect("make it an older database");
}

/// A database at schema version 1 (before files) or 2 (before chat, devices and groups) is
/// A cluster node reads a group's commits without opening every message after its state:
/// commits are marked at insert, and a database from before the mark (version 5) gets its
/// stored commits marked at the upgrade.
#[test]
fn postgres_commits_are_marked_and_marked_at_the_upgrade() {
    let pg = postgres_kit::PgServer::start();
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    db.create_user("alice", "h", true).expect("create");
    let conv = messages::lobby();
    let commit = |n: u8| NewMessage {
        conv: conv.clone(),
        from: "alice".into(),
        body: Body {
            content_type: "application/mls-commit".into(),
            data: vec![n; 8],
        },
        except: Vec::new(),
        idempotency_key: None,
        refs: None,
    };
    let app = NewMessage {
        body: Body {
            content_type: "application/mls-message".into(),
            data: vec![9; 8],
        },
        ..commit(0)
    };
    db.append_batch(&[commit(1), app.clone(), app.clone(), commit(2), app.clone()])
        .expect("append");
    db.e2ee_put_group(&GroupRow {
        conv: "r:lobby".into(),
        group_id: b"g".to_vec(),
        state: b"s".to_vec(),
        applied_seq: 0,
        group_info: b"gi".to_vec(),
        removal_epoch: 0,
        pending: Vec::new(),
    })
    .expect("a group");
    let want = vec![
        (1, "alice".to_string(), vec![1u8; 8]),
        (4, "alice".to_string(), vec![2u8; 8]),
    ];
    assert_eq!(
        db.e2ee_commits_after("r:lobby", 0, "application/mls-commit")
            .expect("commits"),
        want
    );
    assert_eq!(
        db.e2ee_commits_after("r:lobby", 1, "application/mls-commit")
            .expect("commits"),
        want[1..]
    );
    drop(db);
    let mut admin =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    admin
        .batch_execute(
            "ALTER TABLE messages DROP COLUMN mls_commit;
             UPDATE conclave_meta SET value = '5' WHERE key = 'schema_version';",
        )
        .expect("make it a version 5 database");
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect to version 5");
    assert_eq!(db.schema_version().expect("version"), SCHEMA_VERSION);
    assert_eq!(
        db.e2ee_commits_after("r:lobby", 0, "application/mls-commit")
            .expect("commits after the upgrade"),
        want
    );
}

/// brought up to the current version at connect, keeping its rows, and the new tables then
/// work.
#[test]
fn postgres_schema_upgrades_from_versions_1_and_2() {
    for version in [1, 2] {
        let pg = postgres_kit::PgServer::start();
        let mut first = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
        first.create_user("alice", "h", true).expect("create");
        let row = file_row("f1", "alice", Conv::Room("lobby".into()), 10, 1, 1_000);
        if version >= 2 {
            first.create_file(&row, &[]).expect("create a file");
        }
        drop(first);
        downgrade(&pg.tcp_config(), version);

        let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect to the older one");
        assert_eq!(db.schema_version().expect("version"), SCHEMA_VERSION);
        assert!(
            db.user("alice").expect("read").is_some(),
            "rows survive the upgrade"
        );
        if version == 1 {
            db.create_file(&row, &strings(&["bob"]))
                .expect("create a file");
        }
        assert_eq!(db.file("f1").expect("read"), Some(row));
        db.set_display_name("alice", Some("Alice"))
            .expect("a profile");
        assert_eq!(
            db.e2ee_publish("alice", "laptop", b"sig", &[b"kp".to_vec()], 1)
                .expect("a device"),
            1
        );
        assert_eq!(
            db.chat_load().expect("load").display_names,
            [("alice".to_string(), "Alice".to_string())]
        );
    }
}

/// The first connect records a check of the data key; another key is refused before anything
/// is written, and the right one still opens the database.
#[test]
fn postgres_wrong_data_key_is_refused() {
    let pg = postgres_kit::PgServer::start();
    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    let row = file_row("f1", "alice", Conv::Room("lobby".into()), 10, 1, 1_000);
    db.create_file(&row, &[]).expect("create a file");
    drop(db);
    let other = DataKey::from_bytes(&[8u8; 32]).expect("a 32-byte key");
    match PgDb::connect(&pg.tcp_config(), other) {
        Err(StoreError::Postgres { message, .. }) => {
            assert!(message.contains("data key does not match"), "{message}");
        }
        other => panic!("another data key must be refused, got {other:?}"),
    }
    let db = PgDb::connect(&pg.tcp_config(), key()).expect("the right key");
    assert_eq!(db.file("f1").expect("read"), Some(row));
}

/// A small seeded generator (SplitMix64) for the randomized tests: the same seed, the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number below `n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// Two nodes claiming key packages of the same devices at once, round after round: no package
/// is given out twice, and every one is given out.
#[test]
fn postgres_key_packages_claimed_once_across_nodes() {
    let pg = postgres_kit::PgServer::start();
    let mut setup = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    let mut published = Vec::new();
    for device in ["laptop", "phone"] {
        let kps: Vec<Vec<u8>> = (0..MAX_KEY_PACKAGES)
            .map(|i| format!("{device}-{i}").into_bytes())
            .collect();
        setup
            .e2ee_publish("alice", device, device.as_bytes(), &kps, 1)
            .expect("publish");
        published.extend(kps);
    }
    // Each round claims one per device on each node: more rounds than packages per device.
    const ROUNDS: usize = MAX_KEY_PACKAGES * 3 / 4;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    // Connected before the threads start, and nothing in them panics between two waits: a
    // failing node never leaves the other waiting for it.
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for _ in 0..ROUNDS {
                    barrier.wait();
                    got.push(db.e2ee_claim(&strings(&["alice"])));
                }
                got
            })
        })
        .collect();
    let mut got: Vec<Vec<u8>> = Vec::new();
    for t in nodes {
        for claimed in t.join().expect("node thread") {
            got.extend(claimed.expect("claim").into_iter().map(|(_, _, kp)| kp));
        }
    }
    let claimed = got.len();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), claimed, "a key package was given out twice");
    published.sort();
    assert_eq!(got, published, "every package given out once");
    assert!(
        setup
            .e2ee_claim(&strings(&["alice"]))
            .expect("claim")
            .is_empty()
    );
}

/// Two nodes saving states of the same group at once, each its own in a seeded random order:
/// the stored group only moves forward, ends at the newest state, and its state and position
/// always belong together.
#[test]
fn postgres_group_never_moves_back_across_nodes() {
    const STATES: u64 = 60;
    let pg = postgres_kit::PgServer::start();
    let group = |seq: u64| GroupRow {
        conv: "r:ops".into(),
        group_id: b"gid".to_vec(),
        state: format!("state-{seq}").into_bytes(),
        applied_seq: seq,
        group_info: format!("gi-{seq}").into_bytes(),
        removal_epoch: seq / 10,
        pending: Vec::new(),
    };
    for seed in [1u64, 2, 3] {
        let mut setup = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
        setup.e2ee_delete_group("r:ops").expect("start afresh");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let nodes: Vec<_> = (0..2u64)
            .map(|node| {
                let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
                let barrier = barrier.clone();
                // Node 0 saves the even states, node 1 the odd ones, each shuffled.
                let mut mine: Vec<u64> = (1..=STATES).filter(|s| s % 2 == node).collect();
                Rng(seed * 2 + node).shuffle(&mut mine);
                // Nothing panics between two waits (see the key package test).
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    for seq in mine {
                        barrier.wait();
                        let put = db.e2ee_put_group(&group(seq));
                        seen.push((seq, put, db.e2ee_groups()));
                    }
                    seen
                })
            })
            .collect();
        for t in nodes {
            let mut newest = 0;
            for (seq, put, stored) in t.join().expect("node thread") {
                put.expect("put");
                let stored = stored.expect("groups");
                assert_eq!(stored.len(), 1);
                let g = &stored[0];
                assert_eq!(*g, group(g.applied_seq), "state and position together");
                assert!(
                    g.applied_seq >= seq.max(newest),
                    "seed {seed}: the group moved back to {} after {seq} (seen {newest})",
                    g.applied_seq
                );
                newest = g.applied_seq;
            }
        }
        assert_eq!(
            setup.e2ee_groups().expect("groups"),
            [group(STATES)],
            "seed {seed}"
        );
    }
}

/// Two nodes storing a chunk for the same device at once, round after round, with room for
/// one: exactly one of the two is stored each round (the limit holds across nodes).
#[test]
fn postgres_transfer_limit_across_nodes() {
    const CHUNK: usize = 10;
    // Room for one chunk, not two.
    const LIMIT: u64 = 15;
    const ROUNDS: u32 = 50;
    let pg = postgres_kit::PgServer::start();
    let mut setup = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    setup
        .e2ee_publish("alice", "laptop", b"sig-l", &[], 1)
        .expect("publish");
    setup
        .e2ee_publish("alice", "phone", b"sig-p", &[], 2)
        .expect("publish");
    setup
        .device_announce("alice", "phone", b"tk", b"s", 3, "10.0.0.1")
        .expect("announce");
    setup
        .device_decide("alice", "phone", true)
        .expect("approve");
    // This thread and the two nodes: the chunks are taken away between rounds.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let nodes: Vec<_> = ["node-a", "node-b"]
        .into_iter()
        .map(|node| {
            let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
            let barrier = barrier.clone();
            // Nothing panics between two waits (see the key package test).
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for round in 0..ROUNDS {
                    barrier.wait();
                    outcomes.push(db.transfer_put(
                        "alice",
                        "phone",
                        "laptop",
                        node,
                        round,
                        &[7u8; CHUNK],
                        LIMIT,
                    ));
                    barrier.wait();
                }
                outcomes
            })
        })
        .collect();
    let mut cleared = Vec::new();
    for _ in 0..ROUNDS {
        barrier.wait();
        barrier.wait();
        cleared.push(setup.transfer_ack("alice", "phone", i64::MAX as u64));
    }
    for c in cleared {
        c.expect("ack");
    }
    let outcomes: Vec<Vec<_>> = nodes
        .into_iter()
        .map(|t| t.join().expect("node thread"))
        .collect();
    for round in 0..ROUNDS as usize {
        let stored = outcomes
            .iter()
            .map(|o| o[round].as_ref().expect("put"))
            .filter(|&&o| o == PutOutcome::Stored)
            .count();
        assert_eq!(stored, 1, "round {round}: one chunk fits, not two");
    }
}

/// An answer as the two backends are compared: its value, or which error (`Exists`, or any
/// other: SQLite's and PostgreSQL's texts differ).
fn answer<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(StoreError::Exists) => "Err(Exists)".into(),
        Err(_) => "Err".into(),
    }
}

/// A transfer chunk without its id (ids are the backend's own: PostgreSQL's sequence may skip
/// numbers SQLite's does not).
fn chunks_without_ids(r: Result<Vec<conclave_proto::TransferChunk>, StoreError>) -> String {
    answer(r.map(|v| {
        v.into_iter()
            .map(|c| (c.from_device, c.transfer, c.index, c.data))
            .collect::<Vec<_>>()
    }))
}

/// Seeded random runs of chat, device and group operations on SQLite and PostgreSQL side by
/// side: every answer must be the same (ids compared by position, not value).
#[test]
fn random_operations_agree_on_both_backends() {
    const SEEDS: u64 = 6;
    const STEPS: usize = 500;
    // How often each operation below (by its number) is picked: the device workflow (publish,
    // ask, decide, then chunks) more than the rest, so that its later steps are reached.
    const OP_WEIGHTS: [u64; 26] = [
        3, 1, 2, 3, 1, 3, 1, 1, 5, 3, 1, 2, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1,
    ];
    const USERS: [&str; 4] = ["alice", "bob", "Carol", "ghost"];
    const DEVICES: [&str; 3] = ["d1", "d2", "d3"];
    // The reads whose answers must often have something in them.
    const CHECKED: [&str; 12] = [
        "announce",
        "backup_fetch",
        "claim",
        "decide",
        "devices",
        "groups",
        "requests",
        "transfer_fetch",
        "transfer_put",
        "welcomes",
        "read_markers",
        "chat_load",
    ];
    const CONVS: [&str; 3] = ["r:lobby", "r:ops", "d:alice,bob"];
    // Each kind of operation must have answered with something (a row, a count, a stored
    // chunk) at least this often over all runs.
    const MIN_INTERESTING: usize = 10;
    let mut seen: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    let pg = postgres_kit::PgServer::start();
    let mut admin =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    for seed in 0..SEEDS {
        admin
            .batch_execute(&format!("CREATE DATABASE run{seed}"))
            .expect("a database per run");
        let config = pg
            .tcp_config()
            .replace("dbname=postgres", &format!("dbname=run{seed}"));
        let mut p = PgDb::connect(&config, key()).expect("connect");
        let (_dir, mut l) = sqlite();
        let both: [&mut dyn Tested; 2] = [&mut l, &mut p];
        let [l, p] = both;
        // Three accounts ("ghost" has none), two rooms.
        for s in [&mut *l, &mut *p] {
            for u in &USERS[..3] {
                s.create_user(u, "h", false).expect("create user");
            }
            for r in ["lobby", "ops"] {
                s.ensure_public_room(r).expect("room");
                s.add_member(r, "alice").expect("join");
            }
        }
        let mut rng = Rng(seed);
        let mut now = 1_000i64;
        let mut last_put: Option<(&str, &str)> = None;
        let mut approved: Vec<(&str, &str)> = Vec::new();
        for step in 0..STEPS {
            now += rng.below(3) as i64;
            // Mostly a few accounts and devices, so that requests, decisions and chunks meet.
            let user =
                ["alice", "alice", "alice", "bob", "bob", "Carol", "ghost"][rng.below(7) as usize];
            let device = ["d1", "d1", "d2", "d2", "d3"][rng.below(5) as usize];
            let conv = CONVS[rng.below(3) as usize];
            let bytes = |rng: &mut Rng, n: u64| -> Vec<u8> {
                (0..rng.below(n)).map(|_| rng.below(256) as u8).collect()
            };
            let pairs = |rng: &mut Rng| -> Vec<(String, String)> {
                (0..rng.below(4))
                    .map(|_| {
                        (
                            USERS[rng.below(4) as usize].to_string(),
                            DEVICES[rng.below(3) as usize].to_string(),
                        )
                    })
                    .collect()
            };
            let op = {
                let mut pick = rng.below(OP_WEIGHTS.iter().sum());
                let mut op = 0;
                while pick >= OP_WEIGHTS[op] {
                    pick -= OP_WEIGHTS[op];
                    op += 1;
                }
                op as u64
            };
            let (what, a, b) = match op {
                0 => {
                    let sig = [b"s1".to_vec(), b"s2".to_vec()][rng.below(2) as usize].clone();
                    let kps: Vec<Vec<u8>> = (0..rng.below(4))
                        .map(|i| format!("kp-{step}-{i}").into_bytes())
                        .collect();
                    let f =
                        |s: &mut dyn Tested| answer(s.e2ee_publish(user, device, &sig, &kps, now));
                    ("publish", f(l), f(p))
                }
                1 => {
                    let f = |s: &mut dyn Tested| answer(s.e2ee_devices(user));
                    ("devices", f(l), f(p))
                }
                2 => {
                    let users: Vec<String> = (0..rng.below(4))
                        .map(|_| USERS[rng.below(4) as usize].to_string())
                        .collect();
                    let f = |s: &mut dyn Tested| answer(s.e2ee_claim(&users));
                    ("claim", f(l), f(p))
                }
                3 => {
                    let (tk, sig) = (bytes(&mut rng, 4), bytes(&mut rng, 4));
                    let addr = format!("10.0.0.{}", rng.below(3));
                    let f = |s: &mut dyn Tested| {
                        answer(s.device_announce(user, device, &tk, &sig, now, &addr))
                    };
                    ("announce", f(l), f(p))
                }
                4 => {
                    let f = |s: &mut dyn Tested| answer(s.device_requests(user));
                    ("requests", f(l), f(p))
                }
                5 => {
                    let approve = rng.below(3) > 0;
                    let f = |s: &mut dyn Tested| answer(s.device_decide(user, device, approve));
                    let (a, b) = (f(l), f(p));
                    if a.contains("\"approved\"") {
                        approved.push((user, device));
                    }
                    ("decide", a, b)
                }
                6 => {
                    // Rarely: a revoked device takes much of what the others need.
                    if rng.below(4) > 0 {
                        continue;
                    }
                    let f = |s: &mut dyn Tested| answer(s.device_revoke(user, device, now));
                    ("revoke", f(l), f(p))
                }
                7 => {
                    let asked = pairs(&mut rng);
                    let f = |s: &mut dyn Tested| answer(s.devices_revoked(&asked));
                    ("revoked", f(l), f(p))
                }
                8 => {
                    // Mostly for a device that was approved.
                    let (user, device) = match approved.len() as u64 {
                        n if n > 0 && rng.below(4) > 0 => approved[rng.below(n) as usize],
                        _ => (user, device),
                    };
                    let from = DEVICES[rng.below(3) as usize];
                    let transfer = ["t1", "t2"][rng.below(2) as usize];
                    let index = rng.below(4) as u32;
                    let data = bytes(&mut rng, 9);
                    let limit = [10, 20, 1_000][rng.below(3) as usize];
                    let f = |s: &mut dyn Tested| {
                        answer(s.transfer_put(user, device, from, transfer, index, &data, limit))
                    };
                    let (a, b) = (f(l), f(p));
                    if a == "Stored" {
                        last_put = Some((user, device));
                    }
                    ("transfer_put", a, b)
                }
                9 | 10 => {
                    // Mostly where a chunk was last stored.
                    let (user, device) = match last_put {
                        Some(at) if rng.below(4) > 0 => at,
                        _ => (user, device),
                    };
                    // A cursor by position in each backend's own list of waiting chunks.
                    let k = rng.below(4) as usize;
                    let max = [0, 1, 2, 3, 10][rng.below(5) as usize];
                    let max_bytes = rng.below(20) as usize;
                    let f = |s: &mut dyn Tested| {
                        let all = s.transfer_fetch(user, device, 0, usize::MAX, usize::MAX);
                        let id = match &all {
                            Ok(v) if k > 0 => v.get(k - 1).map_or(i64::MAX as u64, |c| c.id),
                            _ => 0,
                        };
                        if op == 9 {
                            chunks_without_ids(s.transfer_fetch(user, device, id, max, max_bytes))
                        } else {
                            answer(s.transfer_ack(user, device, id))
                        }
                    };
                    let what = if op == 9 {
                        "transfer_fetch"
                    } else {
                        "transfer_ack"
                    };
                    (what, f(l), f(p))
                }
                11 => {
                    let key_id = ["k1", "k2"][rng.below(2) as usize];
                    let index = rng.below(5);
                    let data = bytes(&mut rng, 9);
                    let limit = [10, 30, 1_000][rng.below(3) as usize];
                    let f = |s: &mut dyn Tested| {
                        answer(s.backup_put(user, key_id, index, &data, limit))
                    };
                    ("backup_put", f(l), f(p))
                }
                12 => {
                    let key_id = ["k1", "k2"][rng.below(2) as usize];
                    let after = [None, Some(0), Some(1), Some(3)][rng.below(4) as usize];
                    let (max, max_bytes) = (rng.below(4) as usize, rng.below(20) as usize);
                    let f = |s: &mut dyn Tested| {
                        answer(s.backup_fetch(user, key_id, after, max, max_bytes))
                    };
                    ("backup_fetch", f(l), f(p))
                }
                13 => {
                    let keep = [None, Some("k1"), Some("k2")][rng.below(3) as usize];
                    let f = |s: &mut dyn Tested| answer(s.backup_drop(user, keep));
                    ("backup_drop", f(l), f(p))
                }
                14 => {
                    let g = GroupRow {
                        conv: conv.into(),
                        group_id: bytes(&mut rng, 4),
                        state: bytes(&mut rng, 9),
                        applied_seq: rng.below(10),
                        group_info: bytes(&mut rng, 9),
                        removal_epoch: rng.below(3),
                        pending: (0..rng.below(3))
                            .map(|_| USERS[rng.below(4) as usize].to_string())
                            .collect(),
                    };
                    let f = |s: &mut dyn Tested| answer(s.e2ee_put_group(&g));
                    ("put_group", f(l), f(p))
                }
                15 => {
                    let f = |s: &mut dyn Tested| answer(s.e2ee_groups());
                    ("groups", f(l), f(p))
                }
                16 => {
                    if rng.below(3) > 0 {
                        continue;
                    }
                    let f = |s: &mut dyn Tested| answer(s.e2ee_delete_group(conv));
                    ("delete_group", f(l), f(p))
                }
                17 => {
                    let to = pairs(&mut rng);
                    let (seq, welcome) = (rng.below(10), bytes(&mut rng, 5));
                    let f = |s: &mut dyn Tested| {
                        answer(
                            s.e2ee_add_welcomes(&to, conv, seq, &welcome)
                                .map(|v| v.into_iter().map(|(u, d, _)| (u, d)).collect::<Vec<_>>()),
                        )
                    };
                    ("add_welcomes", f(l), f(p))
                }
                18 | 19 => {
                    let k = rng.below(3) as usize;
                    let f = |s: &mut dyn Tested| {
                        let mine = s.e2ee_welcomes(user, device);
                        if op == 18 {
                            return answer(mine.map(|v| {
                                v.into_iter()
                                    .map(|w| (w.conv, w.seq, w.welcome))
                                    .collect::<Vec<_>>()
                            }));
                        }
                        let id = match &mine {
                            Ok(v) => v.get(k).map_or(i64::MAX as u64, |w| w.id),
                            Err(_) => 0,
                        };
                        answer(s.e2ee_welcome_done(user, device, id))
                    };
                    let what = if op == 18 { "welcomes" } else { "welcome_done" };
                    (what, f(l), f(p))
                }
                20 => {
                    let room = ["lobby", "ops", "nowhere"][rng.below(3) as usize];
                    let topic = ["", "a", "b topic ✓"][rng.below(3) as usize];
                    let f = |s: &mut dyn Tested| answer(s.set_topic(room, topic, user, now));
                    ("set_topic", f(l), f(p))
                }
                21 => {
                    let name = [None, Some("N"), Some("Другой")][rng.below(3) as usize];
                    let f = |s: &mut dyn Tested| answer(s.set_display_name(user, name));
                    ("set_display_name", f(l), f(p))
                }
                22 => {
                    let share = rng.below(2) == 0;
                    let f = |s: &mut dyn Tested| answer(s.set_share_reads(user, share));
                    ("set_share_reads", f(l), f(p))
                }
                23 => {
                    let f = |s: &mut dyn Tested| answer(s.chat_load());
                    ("chat_load", f(l), f(p))
                }
                24 => {
                    let seq = rng.below(2);
                    let f = |s: &mut dyn Tested| answer(s.set_read(user, conv, seq, now));
                    ("set_read", f(l), f(p))
                }
                _ => {
                    let f = |s: &mut dyn Tested| answer(s.read_markers(conv));
                    ("read_markers", f(l), f(p))
                }
            };
            assert_eq!(
                a, b,
                "seed {seed}, step {step}: {what} (user {user}, device {device}, conv {conv}): \
                 SQLite then PostgreSQL"
            );
            let tally = seen.entry(what).or_insert((0, 0));
            tally.0 += 1;
            if !matches!(
                a.as_str(),
                "[]" | "()" | "None" | "NotApproved" | "Full" | "Err" | "0"
            ) {
                tally.1 += 1;
            }
        }
    }
    // The runs must reach the interesting cases, or agreeing proves little.
    for what in CHECKED {
        let with_something = seen.get(what).map_or(0, |t| t.1);
        assert!(
            with_something >= MIN_INTERESTING,
            "{what}: only {with_something} answers with something in them: {seen:?}"
        );
    }
}

/// Two nodes starting on a new database at once: both use the signature key stored first, and
/// a third connection reads it back (sealed under the data key: another key cannot).
#[test]
fn postgres_signer_is_shared_by_nodes() {
    let pg = postgres_kit::PgServer::start();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let nodes: Vec<_> = ["node-a", "node-b"]
        .into_iter()
        .map(|node| {
            let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                db.e2ee_signer(&mut || node.as_bytes().to_vec())
            })
        })
        .collect();
    let keys: Vec<Vec<u8>> = nodes
        .into_iter()
        .map(|t| t.join().expect("node thread").expect("signer"))
        .collect();
    assert_eq!(keys[0], keys[1], "one key for the cluster");
    assert!(keys[0] == b"node-a" || keys[0] == b"node-b");
    let mut third = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    assert_eq!(
        third
            .e2ee_signer(&mut || b"node-c".to_vec())
            .expect("signer"),
        keys[0]
    );
}
