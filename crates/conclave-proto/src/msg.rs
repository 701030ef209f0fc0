//! Requests, replies and events.

use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::files::{Chunk, FileOffer, P2pGrant, P2pOffer, SHA256_BYTES};

/// Client-chosen id of a request; the reply names it.
pub type RequestId = u64;

/// Everything a client sends after the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: RequestId,
    pub req: Request,
}

/// Everything a server sends after the hello: a reply to a request, or an event pushed at any
/// time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    Reply {
        id: RequestId,
        result: Result<Reply, ErrorBody>,
    },
    Event(Event),
}

/// A message body: opaque to routing and storage, so end-to-end encrypted payloads travel the
/// same paths as plain text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    pub content_type: String,
    pub data: Vec<u8>,
}

impl Body {
    /// A plain text body.
    pub fn text(text: impl Into<String>) -> Self {
        Body {
            content_type: crate::CONTENT_TYPE_TEXT.to_string(),
            data: text.into().into_bytes(),
        }
    }

    /// The text, if this is a UTF-8 text body (plain, Markdown or an action: see
    /// [`Body::text_kind`]).
    pub fn as_text(&self) -> Option<&str> {
        if self.content_type == crate::CONTENT_TYPE_TEXT || self.text_kind().is_some() {
            std::str::from_utf8(&self.data).ok()
        } else {
            None
        }
    }

    /// A text body of a kind: Markdown, an action, or both ([`crate::chat::TextKind`]).
    pub fn text_of_kind(text: impl Into<String>, kind: crate::chat::TextKind) -> Self {
        Body {
            content_type: kind.content_type().to_string(),
            data: text.into().into_bytes(),
        }
    }

    /// How a text body is meant to be shown; `None` for a body that is not text.
    pub fn text_kind(&self) -> Option<crate::chat::TextKind> {
        crate::chat::TextKind::of_content_type(&self.content_type)
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// The room's members (broadcast), minus `except` (blockcast) when it is not empty.
    Room { room: String, except: Vec<String> },
    /// The named users only (unicast for one, multicast for several). The conversation is keyed
    /// by the set of participants, the sender included.
    Users { to: Vec<String> },
}

/// A conversation: a room, or a direct conversation keyed by its participants (sorted, unique,
/// canonical names, sender included).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Conv {
    Room(String),
    Direct(Vec<String>),
}

/// Which conversation a history request is about, as the caller names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConvRef {
    Room(String),
    /// The direct conversation of the caller with these users.
    With(Vec<String>),
}

/// The last sequence number a client has seen in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub conv: Conv,
    pub seq: u64,
}

/// A stored, sequenced message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Server-assigned unique id (UUID v7 text).
    pub msg_id: String,
    pub conv: Conv,
    pub from: String,
    /// Per-conversation sequence number, gap-free, starting at 1.
    pub seq: u64,
    /// Server time of acceptance, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub body: Body,
    // -- everyday chat: replies, edits, deletes, reactions (see `crate::chat`) --
    /// `None` for a plain message.
    pub extra: Option<Box<crate::chat::Extra>>,
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Log in to an existing account. Must be the first request (with `Register`).
    ///
    /// After the reply the server sends every message the account missed (after `resume`'s
    /// cursors, or else after what the account last acknowledged with [`Request::Ack`]), then
    /// [`Event::CaughtUp`], then live traffic: nothing lost, nothing twice, in order.
    Login {
        user: String,
        password: String,
        server_password: Option<String>,
        resume: Vec<Cursor>,
    },
    /// Create an account and log in to it.
    Register {
        user: String,
        password: String,
        server_password: Option<String>,
        invite_code: Option<String>,
    },
    CreateRoom {
        room: String,
        private: bool,
        password: Option<String>,
    },
    Join {
        room: String,
        password: Option<String>,
    },
    Part {
        room: String,
    },
    Invite {
        room: String,
        user: String,
    },
    /// Rooms visible to the caller.
    Rooms,
    /// Online users, globally or in one room.
    Who {
        room: Option<String>,
    },
    Send {
        target: Target,
        body: Body,
        /// Client-generated key: a retried send with the same key is stored and delivered once.
        idempotency_key: Option<String>,
        // -- everyday chat: replies, edits, deletes, reactions (see `crate::chat`) --
        /// A reply, or an act on an earlier message of the same conversation.
        refs: Option<Box<crate::chat::Refs>>,
    },
    /// Admins only: a notice to everyone online.
    Announce {
        text: String,
    },
    History {
        conv: ConvRef,
        limit: u32,
        /// Page backwards from before this sequence number; from the newest when absent.
        before: Option<u64>,
    },
    /// Messages containing all the query's words (case- and accent-insensitive) that the caller
    /// may see, newest first; in one room, or everywhere the caller is.
    Search {
        query: String,
        room: Option<String>,
        limit: u32,
        /// Page: only results older than this message id.
        before: Option<String>,
    },
    /// The account has received messages up to these cursors; used to deliver what it missed
    /// when it next connects.
    Ack {
        cursors: Vec<Cursor>,
    },
    /// Remove a user from a room (admins, and the room's owner), or with no room from the
    /// server (admins: their connections are closed; they may come back).
    Kick {
        room: Option<String>,
        user: String,
        reason: Option<String>,
    },
    /// A vote to remove `user` from `room`; enough distinct votes within the window kick them
    /// out for a while.
    VoteKick {
        room: String,
        user: String,
    },
    /// Admins: ban an account or an address/network (CIDR), for `duration_s` or for ever.
    Ban {
        user: Option<String>,
        ip: Option<String>,
        duration_s: Option<u64>,
        reason: Option<String>,
    },
    /// Admins: lift a ban.
    Unban {
        user: Option<String>,
        ip: Option<String>,
    },
    /// The room's owner or an admin: change a room's settings.
    SetRoom {
        room: String,
        votekick: Option<bool>,
    },
    /// Keep-alive; answered with [`Reply::Pong`].
    Ping {
        nonce: u64,
    },
    /// Leave cleanly: the server answers and closes the connection.
    Quit,
    /// Offer a file to a room or users (see [`crate::files`]). Answered with
    /// [`Reply::FileCreated`].
    FileOffer {
        target: Target,
        name: String,
        size: u64,
        sha256: [u8; SHA256_BYTES],
        /// The sender also serves it directly over QUIC.
        p2p: Option<P2pOffer>,
    },
    /// The sender: how much of an upload the server holds. Answered with
    /// [`Reply::FileUploaded`].
    FileStatus {
        file_id: String,
    },
    /// The sender: the next piece of the file, at `offset` (which must equal what the server
    /// holds). Every chunk but the last is exactly the chunk size. Answered with
    /// [`Reply::FileUploaded`].
    FileChunk {
        file_id: String,
        offset: u64,
        data: Chunk,
    },
    /// A recipient: one chunk of a stored file from `offset`. Answered with
    /// [`Reply::FileData`].
    FileFetch {
        file_id: String,
        offset: u64,
    },
    /// A recipient: no thanks. The offer is not made again.
    FileDecline {
        file_id: String,
    },
    /// A recipient: received and verified (its SHA-256 matched). The sender is told.
    FileReceived {
        file_id: String,
        via_p2p: bool,
    },
    /// A recipient of a peer-to-peer offer that cannot reach the sender: please relay it.
    /// Answered with [`Reply::FileUploaded`]; when the copy is not complete yet,
    /// [`Event::FileReady`] follows when it is.
    FileWantRelay {
        file_id: String,
    },
    /// Files offered to the caller that it has neither taken nor declined, oldest first.
    Files,
    /// End-to-end encryption: binds this connection to one of the account's devices and adds
    /// key packages for it (each handed out once). Answered with [`Reply::E2eeReady`]; after
    /// it, Welcomes for this device arrive as [`Event::E2eeWelcome`].
    E2eePublish {
        device: String,
        key_packages: Vec<Bytes>,
    },
    /// Claims one key package of every device of each user, to add them to a group. Each
    /// package is given out once. Answered with [`Reply::E2eeKeyPackages`].
    E2eeClaim {
        users: Vec<String>,
    },
    /// Makes a conversation end-to-end encrypted: the group's first GroupInfo (with its
    /// ratchet tree). For a room: its owner (or an admin), before any message. For a direct
    /// conversation: one of its participants.
    E2eeCreate {
        conv: ConvRef,
        group_info: Bytes,
    },
    /// The conversation's latest GroupInfo, to join by external commit; `None` when the
    /// conversation is not end-to-end encrypted. Members only.
    E2eeGroupInfo {
        conv: ConvRef,
    },
    /// A commit for the group's current epoch, the GroupInfo of the epoch it makes, and the
    /// Welcome for the devices it adds. The server validates it and orders it in the
    /// conversation's log: answered with [`Reply::Sent`] (merge it then), or refused (another
    /// commit took the epoch: process the log and try again).
    E2eeCommit {
        conv: ConvRef,
        commit: Bytes,
        group_info: Bytes,
        welcome: Option<Bytes>,
    },
    /// A Welcome was processed; the server forgets it.
    E2eeWelcomeDone {
        id: u64,
    },
    /// The devices of a user the server knows (for safety numbers).
    E2eeDevices {
        user: String,
    },
    /// The end-to-end encrypted conversations the caller belongs to (rooms it is a member
    /// of, direct conversations it takes part in), for a device to join the groups it is not
    /// in yet. Answered with [`Reply::E2eeConvs`].
    E2eeConvs,
    /// The sender withdraws a file: the server deletes it (and its stored bytes), it is
    /// offered no more, and the recipients who have not taken it get [`Event::FileCancelled`].
    FileCancel {
        file_id: String,
    },
    // ---- Everyday chat, part B (issue #20): typing, read markers, topics, display names,
    // ---- away. Ephemeral ones (typing, away) are never stored.
    /// The caller is typing in a conversation it belongs to. Not stored; sent on to the
    /// other members' connections as [`Event::Typing`]. At most one per conversation per
    /// typing interval and connection (`rate_limited` otherwise).
    Typing {
        conv: ConvRef,
    },
    /// The caller has read a conversation up to `seq`. Stored (a marker only moves
    /// forward) and sent on as [`Event::Read`], unless the account keeps its markers
    /// private ([`Request::ShareReads`]); then only its own other connections hear of it.
    Read {
        conv: ConvRef,
        seq: u64,
    },
    /// The read markers of a conversation's members who share them ("read by"). Answered
    /// with [`Reply::ReadMarkers`].
    ReadMarkers {
        conv: ConvRef,
    },
    /// Whether the account's read markers are shown to others (default: shown).
    ShareReads {
        share: bool,
    },
    /// The room's owner or an admin: set the room's topic (empty clears it). Everyone who
    /// can see the room gets [`Event::Topic`].
    SetTopic {
        room: String,
        topic: String,
    },
    /// Away with a message, or back (`None`). Kept while the account is online; shown in
    /// `who`.
    Away {
        text: Option<String>,
    },
    /// The account's display name (`None` clears it). Stored; shown in `who`.
    SetDisplayName {
        name: Option<String>,
    },
    // -- everyday chat: replies, edits, deletes, reactions (see `crate::chat`) --
    /// Where a message the caller may see is (its conversation, author, sequence), so a
    /// client can edit, delete or react to it by id alone. Answered with
    /// [`Reply::MessageInfo`].
    MessageInfo {
        msg_id: String,
    },
    /// A thread: the message `msg_id` then its replies, oldest first, at most `limit`
    /// replies after sequence `after`. Answered with [`Reply::Messages`].
    Thread {
        msg_id: String,
        limit: u32,
        after: Option<u64>,
    },
    // Devices (issue 21): history for a new device of the account, and the recovery-key
    // backup. The server stores and routes only ciphertext (see `crate::devices`).
    /// A device asks its account's other devices for history: its transfer key (an HPKE
    /// public key) signed with its MLS signature key; empty for a device that only wants the
    /// list. Answered with [`Reply::DevicesWaiting`]: the account's devices waiting for a
    /// decision (other than the caller's). Needs [`Request::E2eePublish`] first.
    DeviceAnnounce {
        transfer_key: Bytes,
        signature: Bytes,
    },
    /// Approves (history may be sent to it) or rejects (nothing will be) a device of the
    /// caller's account. Answered with [`Reply::DevicesWaiting`] holding that device.
    DeviceDecide {
        device: String,
        approve: bool,
    },
    /// One sealed chunk of history for an approved device of the caller's account, stored
    /// until that device has taken it. Idempotent per (`transfer`, `index`).
    TransferPut {
        device: String,
        transfer: String,
        index: u32,
        data: Bytes,
    },
    /// Chunks waiting for this connection's device with an id after `after`, oldest first
    /// (bounded). Answered with [`Reply::TransferChunks`].
    TransferFetch {
        after: u64,
    },
    /// This connection's device holds every chunk up to id `through`: the server deletes them.
    TransferAck {
        through: u64,
    },
    /// Appends one sealed segment to the account's backup under `key_id` (a value derived
    /// from the recovery key, which never leaves the client). Idempotent per index.
    BackupPut {
        key_id: String,
        index: u64,
        data: Bytes,
    },
    /// Segments of the account's backup under `key_id` with an index after `after`, oldest
    /// first (bounded). Answered with [`Reply::BackupChunks`].
    BackupFetch {
        key_id: String,
        after: Option<u64>,
    },
    /// Deletes the account's backup: every segment, or those under every key but `keep`.
    BackupDrop {
        keep: Option<String>,
    },
}

/// Opaque bytes (MLS messages), compact on the wire.
pub type Bytes = serde_bytes::ByteBuf;

/// A key package handed out by [`Request::E2eeClaim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    pub user: String,
    pub device: String,
    pub key_package: Bytes,
}

/// The public state a joiner needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfoData {
    pub group_info: Bytes,
    pub epoch: u64,
    /// Sequence number of the commit that made this epoch (0 for a new group).
    pub seq: u64,
}

/// A device of an account, as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub user: String,
    pub device: String,
    pub signature_key: Bytes,
}

/// Presence of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPresence {
    pub user: String,
    pub online: bool,
    /// Live connections of this user.
    pub connections: u32,
    pub admin: bool,
    /// The account's display name, if it set one.
    pub display_name: Option<String>,
    /// Away, with this message (only while online).
    pub away: Option<String>,
}

/// A room as listed to a caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    pub room: String,
    pub private: bool,
    pub has_password: bool,
    pub members: u32,
    pub online: u32,
    pub member: bool,
    pub owner: Option<String>,
    /// End-to-end encrypted (the server cannot read it).
    pub e2ee: bool,
    /// The room's topic (server-visible, also in end-to-end rooms), if set.
    pub topic: Option<String>,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    LoggedIn {
        user: String,
        admin: bool,
        /// Rooms the account is a member of.
        rooms: Vec<String>,
    },
    Sent {
        msg_id: String,
        seq: u64,
        ts_ms: i64,
        /// True when this send was a retry of an already stored message.
        duplicate: bool,
    },
    Joined {
        room: String,
        members: Vec<String>,
    },
    Rooms(Vec<RoomInfo>),
    Users(Vec<UserPresence>),
    /// History, oldest first.
    Messages(Vec<Message>),
    /// Search results, newest first.
    Results(Vec<Message>),
    Pong {
        nonce: u64,
    },
    /// A vote was counted; `kicked` when it reached the threshold.
    VoteCounted {
        votes: u32,
        needed: u32,
        kicked: bool,
    },
    /// A file offer was accepted. Upload from `uploaded` in chunks of `chunk_size`. With a
    /// peer-to-peer offer, `tokens` lists each recipient's one-time token, and `relay_needed`
    /// says whether to upload now (some recipients are offline) or only when asked.
    FileCreated {
        file_id: String,
        chunk_size: u32,
        uploaded: u64,
        expires_ms: i64,
        relay_needed: bool,
        tokens: Vec<P2pGrant>,
    },
    /// How much of the file the server holds, and whether it is complete and verified.
    FileUploaded {
        uploaded: u64,
        complete: bool,
        chunk_size: u32,
    },
    /// A piece of a stored file; empty at the end.
    FileData {
        offset: u64,
        data: Chunk,
    },
    /// Pending file offers.
    Files(Vec<FileOffer>),
    /// The device is registered. `server_key` is the server's signature key, to name as
    /// external sender in new groups; `key_packages` how many the device has in store.
    E2eeReady {
        server_key: Bytes,
        key_packages: u32,
    },
    E2eeKeyPackages(Vec<ClaimedKeyPackage>),
    E2eeGroupInfo(Option<GroupInfoData>),
    E2eeDevices(Vec<DeviceInfo>),
    E2eeConvs(Vec<Conv>),
    // ---- Everyday chat, part B (issue #20).
    /// Read markers of a conversation's members who share them, by user name.
    ReadMarkers(Vec<crate::chat::ReadMarker>),
    // -- everyday chat: replies, edits, deletes, reactions (see `crate::chat`) --
    MessageInfo(crate::chat::MessageInfo),
    // Devices (issue 21).
    DevicesWaiting(Vec<crate::devices::WaitingDevice>),
    TransferChunks(Vec<crate::devices::TransferChunk>),
    BackupChunks(Vec<crate::devices::BackupChunk>),
}

/// Why a connection is being closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisconnectReason {
    /// The client asked to quit.
    Quit,
    /// The server is shutting down.
    Shutdown,
    /// The client sent something that is not a valid frame.
    Malformed,
    /// A frame or message was over a limit.
    TooLarge,
    /// The client did not read fast enough and its outbound queue filled up.
    SlowConsumer,
    /// No login within the login timeout, or no traffic within the idle timeout.
    Timeout,
    /// An operator removed the connection.
    Kicked,
    /// The account or address is banned (the message says until when and why).
    Banned,
    /// Too many requests too fast, for too long.
    Flooding,
    /// Another error; see the text.
    Other,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Quit => "quit",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::Malformed => "malformed",
            DisconnectReason::TooLarge => "too_large",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::Timeout => "timeout",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::Banned => "banned",
            DisconnectReason::Flooding => "flooding",
            DisconnectReason::Other => "other",
        }
    }
}

/// Something the server pushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Message(Message),
    /// A user became a member of a room.
    Join {
        room: String,
        user: String,
    },
    /// A user left a room.
    Part {
        room: String,
        user: String,
    },
    /// A user came online (first connection) or went offline (last connection closed).
    Presence {
        user: String,
        online: bool,
    },
    /// The caller was invited to a private room.
    Invited {
        room: String,
        by: String,
    },
    /// The messages missed while away have all been sent (`count` of them); live traffic
    /// follows. `truncated` when more were missed than are sent at login (page back with
    /// history for the rest).
    CaughtUp {
        count: u32,
        truncated: bool,
    },
    /// `user` was removed from `room` (or, with no room, from the server) by `by` (a user
    /// name, or "vote").
    Kicked {
        room: Option<String>,
        user: String,
        by: String,
        reason: String,
    },
    /// A vote-kick is under way in `room`.
    VoteKick {
        room: String,
        target: String,
        voter: String,
        votes: u32,
        needed: u32,
    },
    /// An operator's notice to everyone online.
    Announce {
        from: String,
        text: String,
        ts_ms: i64,
    },
    /// The server is closing this connection; nothing follows.
    Disconnect {
        reason: DisconnectReason,
        message: String,
    },
    /// A file for the caller (sent live, and again at each login until taken, declined or
    /// expired).
    FileOffer(Box<FileOffer>),
    /// The relay copy of a file the caller asked for is complete.
    FileReady {
        file_id: String,
    },
    /// To the sender of a peer-to-peer offer: a recipient needs the relay copy; upload it.
    FileRelayWanted {
        file_id: String,
        by: String,
    },
    /// To the sender: `by` declined the file.
    FileDeclined {
        file_id: String,
        by: String,
    },
    /// To the sender: `by` received the file and its hash matched.
    FileReceived {
        file_id: String,
        by: String,
        via_p2p: bool,
    },
    /// A Welcome into a conversation's group for this connection's device; the commit that
    /// added it is `seq` of the conversation's log. Sent live and at each
    /// [`Request::E2eePublish`] until [`Request::E2eeWelcomeDone`].
    E2eeWelcome {
        id: u64,
        /// The device it is for (other devices of the account ignore it).
        device: String,
        conv: Conv,
        seq: u64,
        welcome: Bytes,
    },
    /// To the recipients: the sender `by` withdrew the file; it cannot be taken any more.
    FileCancelled {
        file_id: String,
        by: String,
    },
    // ---- Everyday chat, part B (issue #20): typing, read markers, topics, away, names.
    /// `user` is typing in `conv` (show it for [`crate::chat::TYPING_SHOWN_MS`], or until
    /// their next message).
    Typing {
        conv: Conv,
        user: String,
    },
    /// `user` has read `conv` up to `seq`.
    Read {
        conv: Conv,
        user: String,
        seq: u64,
    },
    /// `room`'s topic changed (empty: cleared) by `by`.
    Topic {
        room: String,
        topic: String,
        by: String,
    },
    /// `user` is away with this message, or back (`None`).
    Away {
        user: String,
        text: Option<String>,
    },
    /// `user` set (or cleared) their display name.
    DisplayName {
        user: String,
        name: Option<String>,
    },
    // Devices (issue 21).
    /// To the account's other connections: one of its devices asks for history (or its state
    /// changed: approved, rejected).
    DeviceWaiting(crate::devices::WaitingDevice),
    /// To the account's connections: chunks of history wait for `device`.
    TransferReady {
        device: String,
    },
}
