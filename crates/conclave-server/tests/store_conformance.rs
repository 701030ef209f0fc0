//! The same behaviour from every storage backend: each test below is written once against the
//! store's traits (`Accounts`, `Rooms`, `Moderation`, `FileMeta`, `Messages`) and run twice, on SQLite's `Db` in a
//! temporary directory (`sqlite::…`) and on `PgDb` against a throwaway PostgreSQL 15
//! (`postgres::…`). A backend that differs from SQLite in a return value, an error or what a
//! failed operation leaves behind fails here.
//!
//! After them, what only PostgreSQL has: a schema version checked at connect (and an older one
//! brought up to date), the data key checked at connect, two nodes spending one invite code at
//! once, two nodes appending to the same conversations at once (gap-free numbers, each message
//! once) and racing one idempotency key, errors when the server is gone (and a batch it cut
//! short left nothing behind).

#[path = "common/postgres.rs"]
mod postgres_kit;

use conclave_proto::Conv;
use conclave_server::at_rest::DataKey;
use conclave_server::guard::{Ban, BanTarget};
use conclave_server::store::{
    Accounts, Db, FileMeta, FileRow, Messages, Moderation, RecipientState, RoomRow, Rooms,
    StoreError,
};
use conclave_server::store_pg::{PgDb, SCHEMA_VERSION};
use ipnet::IpNet;

#[path = "store_conformance/messages.rs"]
mod messages;
#[path = "store_conformance/pg_messages.rs"]
mod pg_messages;

/// What the conformance tests need of a backend.
trait Tested: Accounts + Rooms + Moderation + FileMeta + Messages {}
impl<T: Accounts + Rooms + Moderation + FileMeta + Messages> Tested for T {}

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

/// A database at schema version 1 (before files) is brought up to the current version at
/// connect, keeping its rows, and its files tables then work.
#[test]
fn postgres_schema_upgrades_from_version_1() {
    let pg = postgres_kit::PgServer::start();
    let mut first = PgDb::connect(&pg.tcp_config(), key()).expect("connect");
    first.create_user("alice", "h", true).expect("create");
    drop(first);
    let mut admin =
        ::postgres::Client::connect(&pg.tcp_config(), ::postgres::NoTls).expect("plain client");
    admin
        .batch_execute(
            "DROP TABLE search_index; DROP TABLE messages; DROP TABLE conv_members;
             DROP TABLE file_recipients; DROP TABLE files;
             UPDATE conclave_meta SET value = '1' WHERE key = 'schema_version';",
        )
        .expect("make it a version 1 database");

    let mut db = PgDb::connect(&pg.tcp_config(), key()).expect("connect to version 1");
    assert_eq!(db.schema_version().expect("version"), SCHEMA_VERSION);
    assert!(
        db.user("alice").expect("read").is_some(),
        "rows survive the upgrade"
    );
    let row = file_row("f1", "alice", Conv::Room("lobby".into()), 10, 1, 1_000);
    db.create_file(&row, &strings(&["bob"]))
        .expect("create a file");
    assert_eq!(db.file("f1").expect("read"), Some(row));
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
