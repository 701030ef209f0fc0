//! The store's interface: what the server asks of its storage, in narrow traits by area, and
//! [`Backend`], all of them together with what the store thread needs (how commits become
//! durable, housekeeping between operations, closing). The store thread ([`super::Store`])
//! runs every operation on a `dyn Backend`, so a second implementation (PostgreSQL, for the
//! cluster mode of issue 24) plugs in without touching the callers. SQLite's [`Db`] implements
//! each trait by calling its own methods of the same names (`conclave user …` and the tests use
//! those directly).

use std::path::PathBuf;

use conclave_proto::{BackupChunk, Conv, Message, TransferChunk, WaitingDevice};

use super::{
    Appended, ChatRows, CommitObserver, Db, FileRow, GroupRow, NewMessage, Prepared, Preparer,
    PutOutcome, ReadMoved, RecipientState, Retention, RoomRow, StoreError, TargetRow, UserRow,
    WelcomeRow,
};

/// How a backend's commits become durable.
pub enum Durability {
    /// Each commit is durable when it returns (PostgreSQL with `synchronous_commit = on`,
    /// SQLite with `synchronous = FULL`).
    AtCommit,
    /// Commits are durable once this file is synced (`fdatasync`): SQLite's WAL with
    /// `synchronous = NORMAL`. The store's syncer thread does it before answering them.
    SyncFile(PathBuf),
}

/// Everything the store thread runs operations on.
pub trait Backend:
    Accounts + Rooms + Moderation + Messages + Chat + Devices + Groups + FileMeta + Send
{
    /// Called once on the store thread before its first operation.
    fn durability(&mut self) -> Durability;
    /// A count that grows with every row written (after an operation that did not change it,
    /// nothing needs syncing).
    fn changes(&self) -> u64;
    /// Between two operations: housekeeping (SQLite: checkpoints). `waiting`: operations are
    /// queued behind this one.
    fn maintain(&mut self, waiting: bool);
    /// The store thread stops: the last writes it keeps for later (the search index), and the
    /// storage left clean.
    fn close(&mut self);
    /// Who is told how long each batch of messages took to become durable.
    fn take_commit_observer(&mut self) -> Option<CommitObserver>;
    /// What senders compute for each message before it reaches the store thread (work that
    /// needs no database: [`Prepared`]); `None`, the default: nothing.
    fn preparer(&self) -> Option<Preparer> {
        None
    }
    /// Keeps a copy of an audit record's line written by `node` (cluster mode: the cluster's
    /// audit in the shared store). A store on one node keeps none: the data directory's audit
    /// log is the record.
    fn audit_copy(&mut self, node: &str, line: &str) -> Result<(), StoreError> {
        let _ = (node, line);
        Ok(())
    }
    /// [`Messages::append_batch`] of messages the store thread gives up, with what the
    /// [`Backend::preparer`] computed for each (in order; `None` where nothing was). By
    /// default the preparation is not used.
    fn append_prepared(
        &mut self,
        batch: Vec<NewMessage>,
        prepared: Vec<Option<Prepared>>,
    ) -> Result<Vec<Appended>, StoreError> {
        drop(prepared);
        self.append_batch(&batch)
    }
}

/// Accounts, password hashes, invite codes.
pub trait Accounts {
    fn create_user(&mut self, name: &str, pw_hash: &str, admin: bool) -> Result<(), StoreError>;
    fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError>;
    fn users(&self) -> Result<Vec<UserRow>, StoreError>;
    /// Sets a password hash; false when the user does not exist.
    fn set_password(&mut self, name: &str, pw_hash: &str) -> Result<bool, StoreError>;
    /// Gives or takes the admin role; false when the user does not exist.
    fn set_admin(&mut self, name: &str, admin: bool) -> Result<bool, StoreError>;
    /// Deletes an account and its memberships; false when it does not exist.
    fn delete_user(&mut self, name: &str) -> Result<bool, StoreError>;
    /// Stores the hash of a one-time invite code.
    fn add_invite_code(&mut self, code_hash: &str) -> Result<(), StoreError>;
    /// Creates an account with an invite code, atomically: the code is spent only if the account
    /// is created, and a code is never spent twice.
    fn register_with_code(
        &mut self,
        code_hash: &str,
        name: &str,
        pw_hash: &str,
    ) -> Result<bool, StoreError>;
}

/// Rooms, memberships, room bans, invitations.
pub trait Rooms {
    fn create_room(&mut self, room: &RoomRow) -> Result<(), StoreError>;
    /// Every room with its members and invites (loaded once at start into the hub).
    fn rooms(&self) -> Result<Vec<RoomRow>, StoreError>;
    /// Adds a member (and clears their invite). What the room said before they joined does not
    /// count as missed: their acknowledged position starts at the room's newest message.
    fn add_member(&mut self, room: &str, user: &str) -> Result<(), StoreError>;
    /// Rooms `user` belongs to, as stored.
    fn rooms_of_user(&self, user: &str) -> Result<Vec<String>, StoreError>;
    fn remove_member(&mut self, room: &str, user: &str) -> Result<(), StoreError>;
    /// Keeps `user` out of `room` until `until_ms` (a vote-kick).
    fn add_room_ban(&mut self, room: &str, user: &str, until_ms: i64) -> Result<(), StoreError>;
    /// Active room bans: (room, user, until_ms).
    fn room_bans(&mut self, now_ms: i64) -> Result<Vec<(String, String, i64)>, StoreError>;
    /// Turns vote-kick on or off for a room.
    fn set_room_votekick(&mut self, room: &str, on: bool) -> Result<(), StoreError>;
    /// Creates a public room with no owner if no room has that name (the default room).
    fn ensure_public_room(&mut self, name: &str) -> Result<(), StoreError>;
    fn add_room_invite(&mut self, room: &str, user: &str) -> Result<(), StoreError>;
}

/// Server-wide bans and the IP allow/deny lists.
pub trait Moderation {
    /// Every stored ban (expired ones are removed first).
    fn bans(&mut self, now_ms: i64) -> Result<Vec<crate::guard::Ban>, StoreError>;
    fn add_ban(&mut self, ban: &crate::guard::Ban) -> Result<(), StoreError>;
    /// Removes a ban; false when there was none.
    fn remove_ban(&mut self, target: &crate::guard::BanTarget) -> Result<bool, StoreError>;
    /// The persisted IP rules: (allow, deny).
    fn ip_rules(&self) -> Result<(Vec<ipnet::IpNet>, Vec<ipnet::IpNet>), StoreError>;
    /// Adds (`add`) or removes an IP rule; returns whether anything changed.
    fn set_ip_rule(
        &mut self,
        action: &str,
        net: &ipnet::IpNet,
        add: bool,
    ) -> Result<bool, StoreError>;
}

/// Messages: appends (sequence numbers per conversation), history, search, acks and catch-up, retention; the search index and a consistency check.
pub trait Messages {
    /// Writes the waiting search tokens in one transaction. It is not synced on its own: the
    /// index can always be rebuilt from the (synced) messages, which [`Db::open`] does.
    fn flush_index(&mut self) -> Result<(), StoreError>;
    /// Merges the search index now if entries were deleted since the last merge.
    fn optimize_index(&mut self) -> Result<(), StoreError>;
    /// Records what `user` has received (positions only move forward).
    fn ack(&mut self, user: &str, cursors: &[(Conv, u64)]) -> Result<(), StoreError>;
    /// What `user` missed: for each of their conversations, the messages after the client's
    /// cursor (`resume`) or else after their acknowledged position; at most `per_conv` (the
    /// newest) per conversation and `total` in all. Returns them (each conversation in order)
    /// and whether anything was left out.
    fn catch_up(
        &mut self,
        user: &str,
        resume: &[(Conv, u64)],
        per_conv: u32,
        total: u32,
    ) -> Result<(Vec<Message>, bool), StoreError>;
    /// Appends messages in one transaction (one sync). Either all are stored or none.
    fn append_batch(&mut self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError>;
    /// The messages of `conv` with a sequence number above `after` and at most `through`
    /// (`None`: up to the newest), oldest first, at most `limit`, each with its blockcast
    /// exceptions (`duplicate` is false); and whether more remain in that range. What a
    /// cluster node reads when the bus lost a notice (`bus::Fetch`).
    fn conv_range(
        &mut self,
        conv: &Conv,
        after: u64,
        through: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<Appended>, bool), StoreError>;
    /// A page of history for `viewer`, oldest first: up to `limit` messages before `before`
    /// (or the newest), fewer when their bodies pass [`MAX_PAGE_BYTES`]. Blockcast messages
    /// that excluded the viewer are left out.
    fn history(
        &mut self,
        conv: &Conv,
        viewer: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
    /// Messages containing every word of `query_words` (normalised with [`search::words`]) in
    /// the rooms `rooms` and, if `direct`, the viewer's direct conversations; newest first, at
    /// most `limit` (fewer when their bodies pass [`MAX_PAGE_BYTES`]), older than message id
    /// `before` when given.
    fn search(
        &mut self,
        viewer: &str,
        rooms: &[String],
        direct: bool,
        query_words: &[String],
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
    /// Deletes messages (and their index entries) past their retention. `rule_for` gives the
    /// rule for a conversation key. Returns how many messages were deleted.
    fn apply_retention(
        &mut self,
        now_ms: i64,
        rule_for: &dyn Fn(&str) -> Retention,
    ) -> Result<u64, StoreError>;
    /// Checks the stored messages; "ok" when sound, else what is wrong. SQLite runs its own
    /// consistency check; PostgreSQL checks what the store promises (see `store_pg::messages`).
    fn integrity_check(&self) -> Result<String, StoreError>;
}

/// Topics, display names, read markers and their privacy; the targets of edits, deletes and reactions; threads.
pub trait Chat {
    /// Topics, display names and privacy choices, for the server's memory.
    fn chat_load(&self) -> Result<ChatRows, StoreError>;
    /// Sets a room's topic; an empty one removes it.
    fn set_topic(
        &mut self,
        room: &str,
        topic: &str,
        by: &str,
        ts_ms: i64,
    ) -> Result<(), StoreError>;
    fn set_display_name(&mut self, user: &str, name: Option<&str>) -> Result<(), StoreError>;
    fn set_share_reads(&mut self, user: &str, share: bool) -> Result<(), StoreError>;
    /// Moves `user`'s read marker in conversation `conv` (its storage key) forward to `seq`.
    fn set_read(
        &mut self,
        user: &str,
        conv: &str,
        seq: u64,
        ts_ms: i64,
    ) -> Result<ReadMoved, StoreError>;
    /// Every read marker of a conversation (the caller leaves out the private ones).
    fn read_markers(&self, conv: &str)
    -> Result<Vec<conclave_proto::chat::ReadMarker>, StoreError>;
    /// The message `msg_id` as the rules need it, if it exists and `viewer` was not left out
    /// of it (blockcast). Whether `viewer` belongs to its conversation is the caller's check.
    fn target(&mut self, msg_id: &str, viewer: &str) -> Result<Option<TargetRow>, StoreError>;
    /// A thread: the message `root` and then its replies (oldest first, after `after`, at
    /// most `limit`), with their current state. `None` when `root` does not exist or was not
    /// for `viewer`.
    fn thread(
        &mut self,
        root: &str,
        viewer: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Option<Vec<Message>>, StoreError>;
}

/// History on every device: device requests and decisions, revoked devices, transfers to a new device, backups.
pub trait Devices {
    /// Records that `device` asks for history with this transfer key. Only a device of an
    /// account that had other devices before it waits; one that was decided on keeps its
    /// state.
    /// Returns the device's row when it is waiting.
    fn device_announce(
        &mut self,
        user: &str,
        device: &str,
        transfer_key: &[u8],
        signature: &[u8],
        now_ms: i64,
        addr: &str,
    ) -> Result<Option<WaitingDevice>, StoreError>;
    /// Every device of `user` that asked for history, with its state, oldest first.
    fn device_requests(&self, user: &str) -> Result<Vec<WaitingDevice>, StoreError>;
    /// Approves or rejects a device that asked. A rejected device's waiting chunks are
    /// deleted. `None` when no such device asked.
    fn device_decide(
        &mut self,
        user: &str,
        device: &str,
        approve: bool,
    ) -> Result<Option<WaitingDevice>, StoreError>;
    /// Removes a device from its account for good (rejected, or removed by another device of
    /// the account): it is recorded as revoked (so it cannot publish itself again), and its
    /// registration, key packages, Welcomes, request and waiting chunks are deleted (so no one
    /// can add it to a group, and a new device no longer accepts history signed by it).
    /// Returns its request row as it was, with the state `removed`; `None` when the account
    /// has no such device.
    fn device_revoke(
        &mut self,
        user: &str,
        device: &str,
        now_ms: i64,
    ) -> Result<Option<WaitingDevice>, StoreError>;
    /// Which of these devices were removed from their account ([`Db::device_revoke`]).
    fn devices_revoked(
        &self,
        devices: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError>;
    #[allow(clippy::too_many_arguments)] // the chunk and where it goes, as the request has them
    fn transfer_put(
        &mut self,
        user: &str,
        device: &str,
        from_device: &str,
        transfer: &str,
        index: u32,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError>;
    /// Chunks waiting for a device after id `after`: at most `max` of them, and no more
    /// than `max_bytes` (always at least one when any waits).
    fn transfer_fetch(
        &self,
        user: &str,
        device: &str,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<TransferChunk>, StoreError>;
    /// The device took every chunk up to id `through`.
    fn transfer_ack(&mut self, user: &str, device: &str, through: u64) -> Result<(), StoreError>;
    /// Appends a segment to an account's backup, within `limit_bytes` for the account.
    fn backup_put(
        &mut self,
        user: &str,
        key_id: &str,
        index: u64,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError>;
    /// Segments of an account's backup under `key_id` after `after`, bounded like
    /// [`Db::transfer_fetch`].
    fn backup_fetch(
        &self,
        user: &str,
        key_id: &str,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<BackupChunk>, StoreError>;
    /// Deletes an account's backup segments (all, or all but those under `keep`).
    fn backup_drop(&mut self, user: &str, keep: Option<&str>) -> Result<(), StoreError>;
}

/// End-to-end conversations: devices and key packages, public group state, Welcomes, the commit log.
pub trait Groups {
    /// The server's MLS signature key (sealed under the data key): made with `fresh` and
    /// stored the first time, read back after (every node of a cluster reads the one stored
    /// first).
    fn e2ee_signer(&mut self, fresh: &mut dyn FnMut() -> Vec<u8>) -> Result<Vec<u8>, StoreError>;
    /// Registers a device (or confirms it) and stores key packages, up to the limit. Returns
    /// how many the device has.
    fn e2ee_publish(
        &mut self,
        user: &str,
        device: &str,
        sig_key: &[u8],
        kps: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<u32, StoreError>;
    /// The devices of `user`: (device, signature key).
    fn e2ee_devices(&self, user: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Takes one key package of every device of each user, atomically: each is given out
    /// once. Devices with none left are skipped (they join by external commit).
    fn e2ee_claim(
        &mut self,
        users: &[String],
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError>;
    /// Every conversation's group.
    fn e2ee_groups(&self) -> Result<Vec<GroupRow>, StoreError>;
    /// One conversation's group (the default reads them all: a single node reads it only
    /// at start; a cluster's store reads the one row).
    fn e2ee_group(&self, conv: &str) -> Result<Option<GroupRow>, StoreError> {
        Ok(self.e2ee_groups()?.into_iter().find(|g| g.conv == conv))
    }
    /// The `applied_seq` of one conversation's stored group, without reading (and opening)
    /// its state: what a cluster node checks before each end-to-end message.
    fn e2ee_group_seq(&self, conv: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.e2ee_group(conv)?.map(|g| g.applied_seq))
    }
    /// Takes the cluster-wide lock of `conv`'s group if no other node holds it (true), so
    /// that one node at a time validates and orders the group's commits and messages; each
    /// success is undone by one [`Groups::e2ee_unlock`]. A node alone on its store needs none
    /// (its in-memory lock per group is enough): the default is always true.
    fn e2ee_try_lock(&mut self, conv: &str) -> Result<bool, StoreError> {
        let _ = conv;
        Ok(true)
    }
    /// Gives back a lock taken by [`Groups::e2ee_try_lock`].
    fn e2ee_unlock(&mut self, conv: &str) -> Result<(), StoreError> {
        let _ = conv;
        Ok(())
    }
    /// Saves a conversation's group: inserts it, or replaces a stored state that is not
    /// newer (`applied_seq` at most this one's); a newer stored state is kept (on several
    /// nodes, the one that ordered more commits wins).
    fn e2ee_put_group(&mut self, g: &GroupRow) -> Result<(), StoreError>;
    /// Drops a conversation's group (when its room is deleted).
    fn e2ee_delete_group(&mut self, conv: &str) -> Result<(), StoreError>;
    /// Puts a Welcome in each of these devices' mailboxes.
    fn e2ee_add_welcomes(
        &mut self,
        devices: &[(String, String)],
        conv: &str,
        seq: u64,
        welcome: &[u8],
    ) -> Result<Vec<(String, String, u64)>, StoreError>;
    /// The Welcomes waiting for a device, oldest first.
    fn e2ee_welcomes(&self, user: &str, device: &str) -> Result<Vec<WelcomeRow>, StoreError>;
    /// Forgets a processed Welcome of this device.
    fn e2ee_welcome_done(&mut self, user: &str, device: &str, id: u64) -> Result<(), StoreError>;
    /// The commits of a conversation after `after`, in order: (seq, sender, MLS bytes). Used
    /// to bring a group's stored state up to its log after a crash.
    fn e2ee_commits_after(
        &mut self,
        conv: &str,
        after: u64,
        commit_type: &str,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, StoreError>;
}

/// Stored files: rows and recipients (the chunks are in the file store).
pub trait FileMeta {
    /// Records a new file and its recipients (the sender is not one).
    fn create_file(&mut self, row: &FileRow, recipients: &[String]) -> Result<(), StoreError>;
    /// A file by id.
    fn file(&self, file_id: &str) -> Result<Option<FileRow>, StoreError>;
    /// A recipient's state for a file; `None` if `user` is not a recipient.
    fn file_recipient(
        &self,
        file_id: &str,
        user: &str,
    ) -> Result<Option<RecipientState>, StoreError>;
    /// Sets a recipient's state. Returns false if `user` is not a recipient.
    fn set_file_recipient(
        &mut self,
        file_id: &str,
        user: &str,
        state: RecipientState,
    ) -> Result<bool, StoreError>;
    /// Marks that `user` waits for the relay copy.
    fn want_relay(&mut self, file_id: &str, user: &str) -> Result<bool, StoreError>;
    /// Marks a file's upload complete (its hash checked); returns the recipients still waiting
    /// for it (offered, neither taken nor declined): a relayed file is offered to them now; for
    /// a peer-to-peer file they are told its relay copy is ready.
    fn complete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError>;
    /// Files offered to `user` and not yet taken or declined, unexpired, oldest first.
    fn pending_files(
        &self,
        user: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<FileRow>, StoreError>;
    /// Bytes of unexpired files sent by `user` (what counts against the quota).
    fn file_bytes_of(&self, user: &str, now_ms: i64) -> Result<u64, StoreError>;
    /// Removes the records of files expired at `now_ms`, and returns their ids (the caller
    /// deletes their bytes).
    fn expire_files(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError>;
    /// Deletes a file's records (the sender withdrew it); returns the recipients who had
    /// neither taken nor declined it (the caller tells them, and deletes the bytes).
    fn delete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError>;
    /// Every file id on record (to find stray bytes in the file store).
    fn file_ids(&self) -> Result<Vec<String>, StoreError>;
}

impl Accounts for Db {
    fn create_user(&mut self, name: &str, pw_hash: &str, admin: bool) -> Result<(), StoreError> {
        Db::create_user(self, name, pw_hash, admin)
    }
    fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        Db::user(self, name)
    }
    fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        Db::users(self)
    }
    fn set_password(&mut self, name: &str, pw_hash: &str) -> Result<bool, StoreError> {
        Db::set_password(self, name, pw_hash)
    }
    fn set_admin(&mut self, name: &str, admin: bool) -> Result<bool, StoreError> {
        Db::set_admin(self, name, admin)
    }
    fn delete_user(&mut self, name: &str) -> Result<bool, StoreError> {
        Db::delete_user(self, name)
    }
    fn add_invite_code(&mut self, code_hash: &str) -> Result<(), StoreError> {
        Db::add_invite_code(self, code_hash)
    }
    fn register_with_code(
        &mut self,
        code_hash: &str,
        name: &str,
        pw_hash: &str,
    ) -> Result<bool, StoreError> {
        Db::register_with_code(self, code_hash, name, pw_hash)
    }
}

impl Rooms for Db {
    fn create_room(&mut self, room: &RoomRow) -> Result<(), StoreError> {
        Db::create_room(self, room)
    }
    fn rooms(&self) -> Result<Vec<RoomRow>, StoreError> {
        Db::rooms(self)
    }
    fn add_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        Db::add_member(self, room, user)
    }
    fn rooms_of_user(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Db::rooms_of_user(self, user)
    }
    fn remove_member(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        Db::remove_member(self, room, user)
    }
    fn add_room_ban(&mut self, room: &str, user: &str, until_ms: i64) -> Result<(), StoreError> {
        Db::add_room_ban(self, room, user, until_ms)
    }
    fn room_bans(&mut self, now_ms: i64) -> Result<Vec<(String, String, i64)>, StoreError> {
        Db::room_bans(self, now_ms)
    }
    fn set_room_votekick(&mut self, room: &str, on: bool) -> Result<(), StoreError> {
        Db::set_room_votekick(self, room, on)
    }
    fn ensure_public_room(&mut self, name: &str) -> Result<(), StoreError> {
        Db::ensure_public_room(self, name)
    }
    fn add_room_invite(&mut self, room: &str, user: &str) -> Result<(), StoreError> {
        Db::add_room_invite(self, room, user)
    }
}

impl Moderation for Db {
    fn bans(&mut self, now_ms: i64) -> Result<Vec<crate::guard::Ban>, StoreError> {
        Db::bans(self, now_ms)
    }
    fn add_ban(&mut self, ban: &crate::guard::Ban) -> Result<(), StoreError> {
        Db::add_ban(self, ban)
    }
    fn remove_ban(&mut self, target: &crate::guard::BanTarget) -> Result<bool, StoreError> {
        Db::remove_ban(self, target)
    }
    fn ip_rules(&self) -> Result<(Vec<ipnet::IpNet>, Vec<ipnet::IpNet>), StoreError> {
        Db::ip_rules(self)
    }
    fn set_ip_rule(
        &mut self,
        action: &str,
        net: &ipnet::IpNet,
        add: bool,
    ) -> Result<bool, StoreError> {
        Db::set_ip_rule(self, action, net, add)
    }
}

impl Messages for Db {
    fn flush_index(&mut self) -> Result<(), StoreError> {
        Db::flush_index(self)
    }
    fn optimize_index(&mut self) -> Result<(), StoreError> {
        Db::optimize_index(self)
    }
    fn ack(&mut self, user: &str, cursors: &[(Conv, u64)]) -> Result<(), StoreError> {
        Db::ack(self, user, cursors)
    }
    fn catch_up(
        &mut self,
        user: &str,
        resume: &[(Conv, u64)],
        per_conv: u32,
        total: u32,
    ) -> Result<(Vec<Message>, bool), StoreError> {
        Db::catch_up(self, user, resume, per_conv, total)
    }
    fn append_batch(&mut self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        Db::append_batch(self, batch)
    }
    fn conv_range(
        &mut self,
        conv: &Conv,
        after: u64,
        through: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<Appended>, bool), StoreError> {
        Db::conv_range(self, conv, after, through, limit)
    }
    fn history(
        &mut self,
        conv: &Conv,
        viewer: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        Db::history(self, conv, viewer, before, limit)
    }
    fn search(
        &mut self,
        viewer: &str,
        rooms: &[String],
        direct: bool,
        query_words: &[String],
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        Db::search(self, viewer, rooms, direct, query_words, before, limit)
    }
    fn apply_retention(
        &mut self,
        now_ms: i64,
        rule_for: &dyn Fn(&str) -> Retention,
    ) -> Result<u64, StoreError> {
        Db::apply_retention(self, now_ms, rule_for)
    }
    fn integrity_check(&self) -> Result<String, StoreError> {
        Db::integrity_check(self)
    }
}

impl Chat for Db {
    fn chat_load(&self) -> Result<ChatRows, StoreError> {
        Db::chat_load(self)
    }
    fn set_topic(
        &mut self,
        room: &str,
        topic: &str,
        by: &str,
        ts_ms: i64,
    ) -> Result<(), StoreError> {
        Db::set_topic(self, room, topic, by, ts_ms)
    }
    fn set_display_name(&mut self, user: &str, name: Option<&str>) -> Result<(), StoreError> {
        Db::set_display_name(self, user, name)
    }
    fn set_share_reads(&mut self, user: &str, share: bool) -> Result<(), StoreError> {
        Db::set_share_reads(self, user, share)
    }
    fn set_read(
        &mut self,
        user: &str,
        conv: &str,
        seq: u64,
        ts_ms: i64,
    ) -> Result<ReadMoved, StoreError> {
        Db::set_read(self, user, conv, seq, ts_ms)
    }
    fn read_markers(
        &self,
        conv: &str,
    ) -> Result<Vec<conclave_proto::chat::ReadMarker>, StoreError> {
        Db::read_markers(self, conv)
    }
    fn target(&mut self, msg_id: &str, viewer: &str) -> Result<Option<TargetRow>, StoreError> {
        Db::target(self, msg_id, viewer)
    }
    fn thread(
        &mut self,
        root: &str,
        viewer: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        Db::thread(self, root, viewer, after, limit)
    }
}

impl Devices for Db {
    fn device_announce(
        &mut self,
        user: &str,
        device: &str,
        transfer_key: &[u8],
        signature: &[u8],
        now_ms: i64,
        addr: &str,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        Db::device_announce(self, user, device, transfer_key, signature, now_ms, addr)
    }
    fn device_requests(&self, user: &str) -> Result<Vec<WaitingDevice>, StoreError> {
        Db::device_requests(self, user)
    }
    fn device_decide(
        &mut self,
        user: &str,
        device: &str,
        approve: bool,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        Db::device_decide(self, user, device, approve)
    }
    fn device_revoke(
        &mut self,
        user: &str,
        device: &str,
        now_ms: i64,
    ) -> Result<Option<WaitingDevice>, StoreError> {
        Db::device_revoke(self, user, device, now_ms)
    }
    fn devices_revoked(
        &self,
        devices: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        Db::devices_revoked(self, devices)
    }
    #[allow(clippy::too_many_arguments)] // the chunk and where it goes, as the request has them
    fn transfer_put(
        &mut self,
        user: &str,
        device: &str,
        from_device: &str,
        transfer: &str,
        index: u32,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError> {
        Db::transfer_put(
            self,
            user,
            device,
            from_device,
            transfer,
            index,
            data,
            limit_bytes,
        )
    }
    fn transfer_fetch(
        &self,
        user: &str,
        device: &str,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<TransferChunk>, StoreError> {
        Db::transfer_fetch(self, user, device, after, max, max_bytes)
    }
    fn transfer_ack(&mut self, user: &str, device: &str, through: u64) -> Result<(), StoreError> {
        Db::transfer_ack(self, user, device, through)
    }
    fn backup_put(
        &mut self,
        user: &str,
        key_id: &str,
        index: u64,
        data: &[u8],
        limit_bytes: u64,
    ) -> Result<PutOutcome, StoreError> {
        Db::backup_put(self, user, key_id, index, data, limit_bytes)
    }
    fn backup_fetch(
        &self,
        user: &str,
        key_id: &str,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<BackupChunk>, StoreError> {
        Db::backup_fetch(self, user, key_id, after, max, max_bytes)
    }
    fn backup_drop(&mut self, user: &str, keep: Option<&str>) -> Result<(), StoreError> {
        Db::backup_drop(self, user, keep)
    }
}

impl Groups for Db {
    fn e2ee_signer(&mut self, fresh: &mut dyn FnMut() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        Db::e2ee_signer_bytes(self, fresh)
    }
    fn e2ee_publish(
        &mut self,
        user: &str,
        device: &str,
        sig_key: &[u8],
        kps: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        Db::e2ee_publish(self, user, device, sig_key, kps, now_ms)
    }
    fn e2ee_devices(&self, user: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Db::e2ee_devices(self, user)
    }
    fn e2ee_claim(
        &mut self,
        users: &[String],
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        Db::e2ee_claim(self, users)
    }
    fn e2ee_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        Db::e2ee_groups(self)
    }
    fn e2ee_put_group(&mut self, g: &GroupRow) -> Result<(), StoreError> {
        Db::e2ee_put_group(self, g)
    }
    fn e2ee_delete_group(&mut self, conv: &str) -> Result<(), StoreError> {
        Db::e2ee_delete_group(self, conv)
    }
    fn e2ee_add_welcomes(
        &mut self,
        devices: &[(String, String)],
        conv: &str,
        seq: u64,
        welcome: &[u8],
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        Db::e2ee_add_welcomes(self, devices, conv, seq, welcome)
    }
    fn e2ee_welcomes(&self, user: &str, device: &str) -> Result<Vec<WelcomeRow>, StoreError> {
        Db::e2ee_welcomes(self, user, device)
    }
    fn e2ee_welcome_done(&mut self, user: &str, device: &str, id: u64) -> Result<(), StoreError> {
        Db::e2ee_welcome_done(self, user, device, id)
    }
    fn e2ee_commits_after(
        &mut self,
        conv: &str,
        after: u64,
        commit_type: &str,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, StoreError> {
        Db::e2ee_commits_after(self, conv, after, commit_type)
    }
}

impl FileMeta for Db {
    fn create_file(&mut self, row: &FileRow, recipients: &[String]) -> Result<(), StoreError> {
        Db::create_file(self, row, recipients)
    }
    fn file(&self, file_id: &str) -> Result<Option<FileRow>, StoreError> {
        Db::file(self, file_id)
    }
    fn file_recipient(
        &self,
        file_id: &str,
        user: &str,
    ) -> Result<Option<RecipientState>, StoreError> {
        Db::file_recipient(self, file_id, user)
    }
    fn set_file_recipient(
        &mut self,
        file_id: &str,
        user: &str,
        state: RecipientState,
    ) -> Result<bool, StoreError> {
        Db::set_file_recipient(self, file_id, user, state)
    }
    fn want_relay(&mut self, file_id: &str, user: &str) -> Result<bool, StoreError> {
        Db::want_relay(self, file_id, user)
    }
    fn complete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError> {
        Db::complete_file(self, file_id)
    }
    fn pending_files(
        &self,
        user: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<FileRow>, StoreError> {
        Db::pending_files(self, user, now_ms, limit)
    }
    fn file_bytes_of(&self, user: &str, now_ms: i64) -> Result<u64, StoreError> {
        Db::file_bytes_of(self, user, now_ms)
    }
    fn expire_files(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        Db::expire_files(self, now_ms)
    }
    fn delete_file(&mut self, file_id: &str) -> Result<Vec<String>, StoreError> {
        Db::delete_file(self, file_id)
    }
    fn file_ids(&self) -> Result<Vec<String>, StoreError> {
        Db::file_ids(self)
    }
}
