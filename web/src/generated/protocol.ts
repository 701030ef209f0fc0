// Generated from the Rust protocol types (crates/conclave-proto) by
// `CONCLAVE_WRITE_TS=1 cargo test -p conclave-proto --test typescript`. Do not edit:
// `cargo test` fails when this file differs from what the Rust types give.
//
// These are the JSON forms (serde_json) of the native protocol's frames: the web client
// sends one ClientFrame per WebSocket text message and receives one ServerFrame per
// message (docs/web.md). Bytes are arrays of numbers; absent optional values are null.

export const PROTOCOL_VERSION = 1;

export type ActKind =
  | "Edit"
  | "Delete"
  | "React"
  | "Unreact";

export type ActsOn = { msg_id: string; kind: ActKind };

export type BackupChunk = { index: number; data: number[] };

export type Body = { content_type: string; data: number[] };

export type ClaimedKeyPackage = { user: string; device: string; key_package: number[] };

export type ClientFrame = { id: number; req: Request };

export type Conv =
  | { Room: string }
  | { Direct: string[] };

export type ConvRef =
  | { Room: string }
  | { With: string[] };

export type Cursor = { conv: Conv; seq: number };

export type DeviceInfo = { user: string; device: string; signature_key: number[] };

export type DisconnectReason =
  | "Quit"
  | "Shutdown"
  | "Malformed"
  | "TooLarge"
  | "SlowConsumer"
  | "Timeout"
  | "Kicked"
  | "Banned"
  | "Flooding"
  | "Other";

export type ErrorBody = { code: ErrorCode; message: string };

export type ErrorCode =
  | "BadRequest"
  | "NotLoggedIn"
  | "AlreadyLoggedIn"
  | "AuthFailed"
  | "ServerPassword"
  | "RegistrationClosed"
  | "InviteRequired"
  | "NameTaken"
  | "InvalidName"
  | "NoSuchRoom"
  | "NoSuchUser"
  | "NotMember"
  | "Forbidden"
  | "RoomExists"
  | "RoomPassword"
  | "TooLarge"
  | "RateLimited"
  | "Unsupported"
  | "ShuttingDown"
  | "Internal"
  | "NotFound"
  | "QuotaExceeded"
  | "Expired"
  | "NotReady"
  | "Declined"
  | "StaleEpoch"
  | "E2eeRequired"
  | "StorageFull";

export type Event =
  | { Message: Message }
  | { Join: { room: string; user: string } }
  | { Part: { room: string; user: string } }
  | { Presence: { user: string; online: boolean } }
  | { Invited: { room: string; by: string } }
  | { CaughtUp: { count: number; truncated: boolean } }
  | { Kicked: { room: string | null; user: string; by: string; reason: string } }
  | { VoteKick: { room: string; target: string; voter: string; votes: number; needed: number } }
  | { Announce: { from: string; text: string; ts_ms: number } }
  | { Disconnect: { reason: DisconnectReason; message: string } }
  | { FileOffer: FileOffer }
  | { FileReady: { file_id: string } }
  | { FileRelayWanted: { file_id: string; by: string } }
  | { FileDeclined: { file_id: string; by: string } }
  | { FileReceived: { file_id: string; by: string; via_p2p: boolean } }
  | { E2eeWelcome: { id: number; device: string; conv: Conv; seq: number; welcome: number[] } }
  | { FileCancelled: { file_id: string; by: string } }
  | { Typing: { conv: Conv; user: string } }
  | { Read: { conv: Conv; user: string; seq: number } }
  | { Topic: { room: string; topic: string; by: string } }
  | { Away: { user: string; text: string | null } }
  | { DisplayName: { user: string; name: string | null } }
  | { DeviceWaiting: WaitingDevice }
  | { TransferReady: { device: string } };

export type Extra = { reply_to: string | null; acts_on: ActsOn | null; state: MsgState | null };

export type FileOffer = { file_id: string; from: string; conv: Conv; except: string[]; name: string; size: number; sha256: number[]; chunk_size: number; ts_ms: number; expires_ms: number; relay_ready: boolean; p2p: P2pInvite | null };

export type GroupInfoData = { group_info: number[]; epoch: number; seq: number };

export type Message = { msg_id: string; conv: Conv; from: string; seq: number; ts_ms: number; body: Body; extra: Extra | null };

export type MessageInfo = { msg_id: string; conv: Conv; from: string; seq: number; ts_ms: number };

export type MsgState = { edited_ms: number | null; edits: number; deleted: boolean; reactions: Reaction[] };

export type P2pGrant = { user: string; token: number[] };

export type P2pInvite = { addrs: string[]; fingerprint: number[]; token: number[] };

export type P2pOffer = { addrs: string[]; fingerprint: number[] };

export type Reaction = { emoji: string; users: string[] };

export type ReadMarker = { user: string; seq: number; ts_ms: number };

export type Refs = { reply_to: string | null; acts_on: ActsOn | null };

export type Reply =
  | "Ok"
  | { LoggedIn: { user: string; admin: boolean; rooms: string[] } }
  | { Sent: { msg_id: string; seq: number; ts_ms: number; duplicate: boolean } }
  | { Joined: { room: string; members: string[] } }
  | { Rooms: RoomInfo[] }
  | { Users: UserPresence[] }
  | { Messages: Message[] }
  | { Results: Message[] }
  | { Pong: { nonce: number } }
  | { VoteCounted: { votes: number; needed: number; kicked: boolean } }
  | { FileCreated: { file_id: string; chunk_size: number; uploaded: number; expires_ms: number; relay_needed: boolean; tokens: P2pGrant[] } }
  | { FileUploaded: { uploaded: number; complete: boolean; chunk_size: number } }
  | { FileData: { offset: number; data: number[] } }
  | { Files: FileOffer[] }
  | { E2eeReady: { server_key: number[]; key_packages: number } }
  | { E2eeKeyPackages: ClaimedKeyPackage[] }
  | { E2eeGroupInfo: GroupInfoData | null }
  | { E2eeDevices: DeviceInfo[] }
  | { E2eeConvs: Conv[] }
  | { ReadMarkers: ReadMarker[] }
  | { MessageInfo: MessageInfo }
  | { DevicesWaiting: WaitingDevice[] }
  | { TransferChunks: TransferChunk[] }
  | { BackupChunks: BackupChunk[] };

export type Request =
  | { Login: { user: string; password: string; server_password: string | null; resume: Cursor[] } }
  | { Register: { user: string; password: string; server_password: string | null; invite_code: string | null } }
  | { CreateRoom: { room: string; private: boolean; password: string | null } }
  | { Join: { room: string; password: string | null } }
  | { Part: { room: string } }
  | { Invite: { room: string; user: string } }
  | "Rooms"
  | { Who: { room: string | null } }
  | { Send: { target: Target; body: Body; idempotency_key: string | null; refs: Refs | null } }
  | { Announce: { text: string } }
  | { History: { conv: ConvRef; limit: number; before: number | null } }
  | { Search: { query: string; room: string | null; limit: number; before: string | null } }
  | { Ack: { cursors: Cursor[] } }
  | { Kick: { room: string | null; user: string; reason: string | null } }
  | { VoteKick: { room: string; user: string } }
  | { Ban: { user: string | null; ip: string | null; duration_s: number | null; reason: string | null } }
  | { Unban: { user: string | null; ip: string | null } }
  | { SetRoom: { room: string; votekick: boolean | null } }
  | { Ping: { nonce: number } }
  | "Quit"
  | { FileOffer: { target: Target; name: string; size: number; sha256: number[]; p2p: P2pOffer | null } }
  | { FileStatus: { file_id: string } }
  | { FileChunk: { file_id: string; offset: number; data: number[] } }
  | { FileFetch: { file_id: string; offset: number } }
  | { FileDecline: { file_id: string } }
  | { FileReceived: { file_id: string; via_p2p: boolean } }
  | { FileWantRelay: { file_id: string } }
  | "Files"
  | { E2eePublish: { device: string; key_packages: number[][] } }
  | { E2eeClaim: { users: string[] } }
  | { E2eeCreate: { conv: ConvRef; group_info: number[] } }
  | { E2eeGroupInfo: { conv: ConvRef } }
  | { E2eeCommit: { conv: ConvRef; commit: number[]; group_info: number[]; welcome: number[] | null } }
  | { E2eeWelcomeDone: { id: number } }
  | { E2eeDevices: { user: string } }
  | "E2eeConvs"
  | { FileCancel: { file_id: string } }
  | { Typing: { conv: ConvRef } }
  | { Read: { conv: ConvRef; seq: number } }
  | { ReadMarkers: { conv: ConvRef } }
  | { ShareReads: { share: boolean } }
  | { SetTopic: { room: string; topic: string } }
  | { Away: { text: string | null } }
  | { SetDisplayName: { name: string | null } }
  | { MessageInfo: { msg_id: string } }
  | { Thread: { msg_id: string; limit: number; after: number | null } }
  | { DeviceAnnounce: { transfer_key: number[]; signature: number[] } }
  | { DeviceDecide: { device: string; approve: boolean } }
  | { TransferPut: { device: string; transfer: string; index: number; data: number[] } }
  | { TransferFetch: { after: number } }
  | { TransferAck: { through: number } }
  | { BackupPut: { key_id: string; index: number; data: number[] } }
  | { BackupFetch: { key_id: string; after: number | null } }
  | { BackupDrop: { keep: string | null } };

export type Result =
  | { Ok: Reply }
  | { Err: ErrorBody };

export type RoomInfo = { room: string; private: boolean; has_password: boolean; members: number; online: number; member: boolean; owner: string | null; e2ee: boolean; topic: string | null };

export type ServerFrame =
  | { Reply: { id: number; result: Result } }
  | { Event: Event };

export type Target =
  | { Room: { room: string; except: string[] } }
  | { Users: { to: string[] } };

export type TransferChunk = { id: number; from_device: string; transfer: string; index: number; data: number[] };

export type UserPresence = { user: string; online: boolean; connections: number; admin: boolean; display_name: string | null; away: string | null };

export type WaitingDevice = { device: string; signature_key: number[]; transfer_key: number[]; signature: number[]; since_ms: number; addr: string; state: string };
