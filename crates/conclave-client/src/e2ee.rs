//! End-to-end encryption in the client: this device's MLS state (`conclave_e2ee::device`),
//! kept in `<state dir>/e2ee/<server>/<user>/`, driven from the session.
//!
//! [`Client::enable_e2ee`] publishes the device and its key packages, joins (by external
//! commit) the end-to-end rooms the account is in whose group this device is not in yet, and
//! returns the session's events with MLS handled: one task takes the server's events in
//! order, processes every MLS message of the conversations' logs (commits, the server's
//! removal proposals, application messages), decrypts application messages into ordinary
//! [`Event::Message`]s, joins groups from Welcomes, commits pending removals, and reports group
//! changes as [`ClientEvent::E2ee`]. Sends, invitations, joins and history of end-to-end
//! conversations go through here too (see [`Client::send`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conclave_e2ee::device::{Device, Outgoing, Processed};
use conclave_e2ee::payload::Payload;
use conclave_e2ee::{CT_APP, CT_COMMIT, CT_PROPOSAL};
use conclave_proto::{
    Body, Bytes, Conv, ConvRef, ErrorCode, Event, GroupInfoData, Message, Reply, Request, Target,
};
use tokio::sync::mpsc;

use crate::connection::{ClientEvent, Events};
use crate::{Client, ClientError};

/// Key packages published when the server holds fewer than [`KEY_PACKAGES_LOW`].
const KEY_PACKAGES_BATCH: usize = 20;
const KEY_PACKAGES_LOW: u32 = 10;
/// Messages kept for a conversation whose Welcome has not arrived yet.
const EARLY_MESSAGES: usize = 1000;
/// Attempts at a send refused for a stale epoch (each after the log was processed).
const SEND_ATTEMPTS: u32 = 40;
const SEND_RETRY_WAIT: Duration = Duration::from_millis(100);
/// Entries of a conversation's log asked for at a time when this device catches up.
const FILL_PAGE: u64 = 100;
/// Most entries of one conversation's log read to catch up at once; older ones are reported
/// as not fetched.
const MAX_FILL: u64 = 10_000;
/// Requests of the library to the events task waiting at once (joins, catch-ups).
const CONTROL_QUEUE: usize = 4096;
/// How long a join waits for this device to process a conversation's log before it joins
/// the group again instead.
const CATCH_UP_WAIT: Duration = Duration::from_secs(20);
/// How long turning end-to-end encryption on waits for the groups to be up to date.
const LOGIN_CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// Conversations remembered as already told "unreadable" (one notice each, not one per
/// message).
const MAX_NOTICED: usize = 10_000;

/// Why a message sent before this device joined cannot be read here.
pub const BEFORE_JOIN: &str = "sent before this device joined; read it on a device that was there";
/// Why a message sent while this device was out of the conversation cannot be read here.
pub const NOT_MEMBER: &str =
    "sent while this device was not in the conversation's encryption group";

pub use conclave_e2ee::key_fingerprint;

/// What end-to-end encryption reports besides decrypted messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum E2eeNotice {
    /// This device joined the conversation's group (messages from before are not readable).
    Joined { conv: Conv },
    /// The group changed: devices added or removed (user/device).
    Members {
        conv: Conv,
        epoch: u64,
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// A device this device has not seen before (or with a new key) is in the conversation:
    /// compare its safety number with its owner.
    NewDevice {
        conv: Conv,
        user: String,
        device: String,
        fingerprint: String,
        changed: bool,
    },
    /// This device was removed from the conversation's group.
    Removed { conv: Conv },
    /// A message this device cannot read (sent before it joined, or not meant for it).
    Unreadable {
        conv: Conv,
        seq: u64,
        reason: String,
    },
    /// About the account's devices and their history (approval, transfer, backup).
    Device(crate::devices::DeviceNotice),
}

/// The device and what the session knows around it.
pub(crate) struct Secure {
    device: Mutex<Device>,
    server_key: Mutex<Vec<u8>>,
    /// Held while a conversation's log is processed or a commit is in flight, so a commit is
    /// built and merged against the state the server validates it against.
    ops: tokio::sync::Mutex<()>,
    /// Blockcast messages whose key has not arrived yet, by id (bounded).
    sealed_waiting: Mutex<HashMap<[u8; 16], Message>>,
    /// Offers of end-to-end files whose description (MLS message) has not arrived yet.
    offers_waiting: Mutex<HashMap<String, Box<conclave_proto::FileOffer>>>,
    /// Users found without a device, and when: direct messages to them go server-encrypted
    /// without asking the server again for [`NO_DEVICE_RECHECK`] (bounded).
    no_device: Mutex<HashMap<String, std::time::Instant>>,
    /// Rooms the server said are not end-to-end encrypted, and when: sends there go as they
    /// are without asking again for [`PLAIN_RECHECK`] (bounded).
    plain_rooms: Mutex<HashMap<String, std::time::Instant>>,
    /// Requests to the events task, which alone processes conversations' logs (in order).
    control: mpsc::Sender<Control>,
    /// Conversations already told that messages cannot be read here, by reason.
    noticed: Mutex<HashSet<(String, &'static str)>>,
    /// Approving new devices, moving history, the backup (`crate::devices`).
    pub(crate) devices: crate::devices::Devices,
}

/// What the library asks of the events task.
enum Control {
    /// This device is in the conversation's group now: say so, and process what arrived for
    /// the conversation while it was joining.
    Joined { conv: Conv },
    /// Process the conversation's log up to its newest entry (a device that was offline
    /// while its other devices read the messages; a join that found this device behind).
    CatchUp {
        conv: Conv,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

/// How long a room found server-encrypted is taken to still be so.
const PLAIN_RECHECK: Duration = Duration::from_secs(30);
/// Most rooms remembered as server-encrypted.
const MAX_PLAIN_ROOMS: usize = 1000;

/// How long a user found without a device is taken to still have none.
const NO_DEVICE_RECHECK: Duration = Duration::from_secs(30);
/// Most users remembered as having no device.
const MAX_NO_DEVICE: usize = 1000;

pub(crate) fn e2ee_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::E2ee {
        message: e.to_string(),
    }
}

/// Where a device's state lives: one directory per server and account.
pub fn device_dir(state_dir: &Path, server: &str, user: &str) -> PathBuf {
    let server: String = server
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir.join("e2ee").join(server).join(user)
}

/// The conversation key (`r:ROOM`, `d:A,B`) of a conversation.
pub fn conv_key(conv: &Conv) -> String {
    match conv {
        Conv::Room(r) => format!("r:{r}"),
        Conv::Direct(users) => format!("d:{}", users.join(",")),
    }
}

fn room_key(room: &str) -> String {
    let name = conclave_proto::names::canonical_room(room).unwrap_or_else(|_| room.to_string());
    format!("r:{name}")
}

impl Secure {
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Device) -> R) -> R {
        let d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        f(&d)
    }

    fn has_group(&self, conv: &str) -> bool {
        self.with(|d| d.has_group(conv).unwrap_or(false))
    }

    fn confirmed(&self, conv: &str) -> bool {
        self.with(|d| d.confirmed(conv).unwrap_or(false))
    }

    fn tell(&self, c: Control) {
        if self.control.try_send(c).is_err() {
            tracing::warn!("the end-to-end events task is not keeping up");
        }
    }

    /// Whether the conversation should be told `why` now (once per conversation).
    fn first_notice(&self, conv: &str, why: &'static str) -> bool {
        let mut n = self.noticed.lock().unwrap_or_else(|e| e.into_inner());
        if n.len() >= MAX_NOTICED {
            n.clear();
        }
        n.insert((conv.to_string(), why))
    }

    fn forget_notice(&self, conv: &str, why: &'static str) {
        self.noticed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(conv.to_string(), why));
    }

    /// Creates the conversation's group with the server as external sender; its GroupInfo.
    fn create_group(&self, conv: &str) -> Result<Vec<u8>, ClientError> {
        let server_key = self
            .server_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.with(|d| d.create_group(conv, &server_key))
            .map_err(e2ee_err)
    }
}

impl Client {
    fn secure(&self) -> Option<Arc<Secure>> {
        self.core().secure.get().cloned()
    }

    /// Turns on end-to-end encryption for this session, with the device state under
    /// `state_dir` (the local history is sealed under a key wrapped by `password`). Returns the
    /// events to read from now on, with MLS handled (see the module documentation).
    pub async fn enable_e2ee(
        &self,
        events: Events,
        state_dir: &Path,
        password: &str,
    ) -> Result<Events, ClientError> {
        let dir = device_dir(state_dir, &self.server(), self.user());
        let (user, pw) = (self.user().to_string(), password.to_string());
        let device = tokio::task::spawn_blocking(move || Device::open(&dir, &user, &pw))
            .await
            .map_err(e2ee_err)?
            .map_err(e2ee_err)?;
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let secure = Arc::new(Secure {
            device: Mutex::new(device),
            server_key: Mutex::new(Vec::new()),
            ops: tokio::sync::Mutex::new(()),
            sealed_waiting: Mutex::new(HashMap::new()),
            offers_waiting: Mutex::new(HashMap::new()),
            no_device: Mutex::new(HashMap::new()),
            plain_rooms: Mutex::new(HashMap::new()),
            control,
            noticed: Mutex::new(HashSet::new()),
            devices: crate::devices::Devices::default(),
        });
        if self.core().secure.set(secure.clone()).is_err() {
            return Err(e2ee_err("end-to-end encryption is on already"));
        }
        // Events: the raw ones go to the task; the application reads the processed ones.
        let (tx, rx) = mpsc::channel(self.core().event_queue_len());
        let out = Events::from_parts(rx, self.core().clone());
        // Publishing first: Welcomes that waited for this device follow its reply.
        self.publish_device(&secure).await?;
        let device_news = tx.clone();
        tokio::spawn(run(
            self.clone_weak(),
            secure.clone(),
            events,
            control_rx,
            tx,
        ));
        self.join_missing_groups(&secure).await;
        crate::devices::start(self, &secure, device_news).await;
        Ok(out)
    }

    /// This device's id and safety number.
    pub fn device_fingerprint(&self) -> Option<(String, String)> {
        self.secure()
            .map(|s| s.with(|d| (d.device_id().to_string(), d.fingerprint())))
    }

    /// The safety numbers of `user`'s devices as this device knows them (from the groups it
    /// shares with them).
    pub fn safety_numbers(&self, user: &str) -> Result<Vec<(String, String)>, ClientError> {
        let s = self
            .secure()
            .ok_or_else(|| e2ee_err("end-to-end encryption is off"))?;
        s.with(|d| d.known_devices(user))
            .map(|v| v.into_iter().map(|m| (m.device, m.fingerprint)).collect())
            .map_err(e2ee_err)
    }

    /// The conversations this device reads end to end.
    pub fn e2ee_convs(&self) -> Vec<Conv> {
        self.secure()
            .map(|s| s.with(|d| d.convs().unwrap_or_default()))
            .unwrap_or_default()
            .iter()
            .map(|k| conv_from_key(k))
            .collect()
    }

    /// Sends a request the way the library's own methods do: for end-to-end conversations,
    /// sends are encrypted, joins and invitations include the group, history and search are
    /// local, and new rooms are end-to-end (when it is on). Other requests go as they are.
    pub async fn call(&self, req: Request) -> Result<Reply, ClientError> {
        Ok(match req {
            Request::Send {
                target,
                body,
                idempotency_key,
                refs,
            } => {
                let r = self
                    .send_with_refs(target, body, idempotency_key, refs)
                    .await?;
                Reply::Sent {
                    msg_id: r.msg_id,
                    seq: r.seq,
                    ts_ms: r.ts_ms,
                    duplicate: r.duplicate,
                }
            }
            Request::Join { room, password } => {
                let members = self.join(&room, password.as_deref()).await?;
                Reply::Joined { room, members }
            }
            Request::Invite { room, user } => {
                self.invite(&room, &user).await?;
                Reply::Ok
            }
            Request::Part { room } => {
                self.part(&room).await?;
                Reply::Ok
            }
            Request::Files => Reply::Files(self.pending_files().await?),
            Request::CreateRoom {
                room,
                private,
                password,
            } if self.secure().is_some() => {
                self.create_room_e2ee(&room, private, password.as_deref())
                    .await?;
                Reply::Joined {
                    room,
                    members: vec![self.user().to_string()],
                }
            }
            Request::History {
                conv,
                limit,
                before,
            } => Reply::Messages(self.history(conv, limit, before).await?),
            Request::Thread {
                msg_id,
                limit,
                after,
            } => Reply::Messages(self.thread(&msg_id, limit, after).await?),
            Request::Search {
                query,
                room,
                limit,
                before,
            } => Reply::Results(
                self.search(&query, room.as_deref(), limit, before.as_deref())
                    .await?,
            ),
            other => self.request(other).await?,
        })
    }

    /// Whether [`Client::call`] handles `req` itself rather than passing it to the server as
    /// it is: sends to and history of end-to-end conversations (and direct messages, which
    /// may become one), joins, invitations, searches and new rooms while end-to-end
    /// encryption is on.
    pub fn handles_e2ee(&self, req: &Request) -> bool {
        let Some(s) = self.secure() else {
            return false;
        };
        match req {
            Request::Send {
                target: target @ Target::Room { .. },
                ..
            } => s.has_group(&self.target_key(target)),
            Request::History {
                conv: ConvRef::Room(room),
                ..
            } => s.has_group(&room_key(room)),
            other => crate::order::is_conversation_request(other),
        }
    }

    /// Whether a conversation is end-to-end encrypted for this device.
    pub fn is_e2ee(&self, conv: &Conv) -> bool {
        self.secure().is_some_and(|s| s.has_group(&conv_key(conv)))
    }

    async fn publish_device(&self, s: &Secure) -> Result<(), ClientError> {
        let (device, kps) = s.with(|d| {
            (
                d.device_id().to_string(),
                d.key_packages(1).unwrap_or_default(),
            )
        });
        let reply = self
            .request(Request::E2eePublish {
                device: device.clone(),
                key_packages: kps.into_iter().map(Bytes::from).collect(),
            })
            .await?;
        let Reply::E2eeReady {
            server_key,
            key_packages,
        } = reply
        else {
            return Err(crate::connection::unexpected("e2ee_publish", &reply));
        };
        *s.server_key.lock().unwrap_or_else(|e| e.into_inner()) = server_key.into_vec();
        if key_packages < KEY_PACKAGES_LOW {
            let kps = s.with(|d| d.key_packages(KEY_PACKAGES_BATCH).unwrap_or_default());
            let _ = self
                .request(Request::E2eePublish {
                    device,
                    key_packages: kps.into_iter().map(Bytes::from).collect(),
                })
                .await?;
        }
        Ok(())
    }

    /// Joins, by external commit, the end-to-end conversations this account is in but this
    /// device is not (a new device, one that missed its Welcome, or one that was out of a
    /// group), then brings every group up to the newest entry of its log (the other devices
    /// of the account may have read, and acknowledged, what came while this one was away).
    async fn join_missing_groups(&self, s: &Arc<Secure>) {
        let convs: Vec<Conv> = match self.request(Request::E2eeConvs).await {
            Ok(Reply::E2eeConvs(c)) => c,
            _ => match self.rooms().await {
                // An older server: its rooms.
                Ok(rooms) => rooms
                    .into_iter()
                    .filter(|r| r.member && r.e2ee)
                    .map(|r| Conv::Room(r.room))
                    .collect(),
                Err(_) => return,
            },
        };
        let mut caught_up = Vec::new();
        for conv in convs {
            let key = conv_key(&conv);
            if s.confirmed(&key) {
                let (done, wait) = tokio::sync::oneshot::channel();
                s.tell(Control::CatchUp {
                    conv,
                    done: Some(done),
                });
                caught_up.push(wait);
            } else if let Err(e) = self.join_group(s, self.conv_ref(&conv)).await {
                tracing::warn!(conv = %key, error = %e, "could not join the end-to-end group");
            }
        }
        // Ready once every group is up to date (processing a log can take this device out of
        // a group and back in): what is sent after this returns is readable here. Bounded: the
        // events the catch-up produces wait for the application, which reads them only after.
        let all = futures_util::future::join_all(caught_up);
        let _ = tokio::time::timeout(LOGIN_CATCH_UP_WAIT, all).await;
    }

    /// How this account names a conversation in requests.
    fn conv_ref(&self, conv: &Conv) -> ConvRef {
        match conv {
            Conv::Room(r) => ConvRef::Room(r.clone()),
            Conv::Direct(users) => {
                let others: Vec<String> = users
                    .iter()
                    .filter(|u| *u != self.user())
                    .cloned()
                    .collect();
                // A note to myself: the conversation of me alone.
                ConvRef::With(if others.is_empty() {
                    vec![self.user().to_string()]
                } else {
                    others
                })
            }
        }
    }

    /// Joins a conversation's group by external commit (replacing any leaf this device still
    /// has there); `Ok(false)` when it is not end-to-end encrypted. Nothing is done when this
    /// device is in the group at the server's epoch already.
    async fn join_group(&self, s: &Arc<Secure>, conv: ConvRef) -> Result<bool, ClientError> {
        let plain = self.conv_of(&conv);
        let key = conv_key(&plain);
        let (conv, key) = (&conv, &key);
        let joined = retry_group_op(
            s,
            "the group kept changing while joining; try again later",
            || {
                Box::pin(async move {
                    let (info, epoch) = match self
                        .request(Request::E2eeGroupInfo { conv: conv.clone() })
                        .await?
                    {
                        Reply::E2eeGroupInfo(Some(GroupInfoData {
                            group_info, epoch, ..
                        })) => (group_info, epoch),
                        Reply::E2eeGroupInfo(None) => return Ok(Attempt::Done(None)),
                        other => {
                            return Err(crate::connection::unexpected("e2ee_group_info", &other));
                        }
                    };
                    let current = s.with(|d| {
                        d.confirmed(key).unwrap_or(false) && d.epoch(key).is_ok_and(|e| e == epoch)
                    });
                    if current {
                        return Ok(Attempt::Done(Some(false)));
                    }
                    let out = s.with(|d| d.join_external(key, &info)).map_err(e2ee_err)?;
                    again_if_stale(
                        self.commit(s, conv, key, out, true)
                            .await
                            .map(|_| Some(true)),
                    )
                })
            },
        )
        .await?;
        if joined == Some(true) {
            s.tell(Control::Joined { conv: plain });
        }
        Ok(joined.is_some())
    }

    /// Sends a commit; merges it once the server accepted it, drops it when refused.
    async fn commit(
        &self,
        s: &Secure,
        conv: &ConvRef,
        key: &str,
        out: Outgoing,
        join: bool,
    ) -> Result<u64, ClientError> {
        let req = Request::E2eeCommit {
            conv: conv.clone(),
            commit: Bytes::from(out.commit),
            group_info: Bytes::from(out.group_info),
            welcome: out.welcome.map(Bytes::from),
        };
        match self.request(req).await {
            Ok(Reply::Sent { seq, .. }) => {
                s.with(|d| {
                    if join {
                        d.confirm_join(key, seq)
                    } else {
                        d.confirm(key, seq)
                    }
                })
                .map_err(e2ee_err)?;
                Ok(seq)
            }
            Ok(other) => {
                let _ = s.with(|d| d.discard(key));
                Err(crate::connection::unexpected("e2ee_commit", &other))
            }
            Err(e) => {
                let _ = s.with(|d| d.discard(key));
                Err(e)
            }
        }
    }

    /// Creates a room whose messages only its members can read.
    pub async fn create_room_e2ee(
        &self,
        room: &str,
        private: bool,
        password: Option<&str>,
    ) -> Result<(), ClientError> {
        let s = self
            .secure()
            .ok_or_else(|| e2ee_err("end-to-end encryption is off for this session"))?;
        self.create_room(room, private, password).await?;
        let key = room_key(room);
        {
            let _ops = s.ops.lock().await;
            let gi = s.create_group(&key)?;
            self.request(Request::E2eeCreate {
                conv: ConvRef::Room(room.to_string()),
                group_info: Bytes::from(gi),
            })
            .await?;
        }
        // The account's other devices are in the room too: they get a Welcome. Best effort:
        // one that heard of the room first joins by itself (and then is not added here).
        if let Err(e) = self.after_invite(room, self.user()).await {
            tracing::debug!(room, error = %e, "adding this account's other devices");
        }
        Ok(())
    }

    /// After joining a room on the server: its group too, when it is end-to-end encrypted.
    /// Returns only once this device can read what is sent next: it is in the group at the
    /// server's epoch (a Welcome brought it there, or it caught up with the log), or it joined
    /// again by external commit.
    pub(crate) async fn after_join(&self, room: &str) -> Result<(), ClientError> {
        let Some(s) = self.secure() else {
            return Ok(());
        };
        let conv = ConvRef::Room(room.to_string());
        let key = room_key(room);
        if s.confirmed(&key) {
            let info = match self
                .request(Request::E2eeGroupInfo { conv: conv.clone() })
                .await?
            {
                Reply::E2eeGroupInfo(Some(info)) => info,
                Reply::E2eeGroupInfo(None) => return Ok(()),
                other => return Err(crate::connection::unexpected("e2ee_group_info", &other)),
            };
            let behind = s.with(|d| d.epoch(&key).map_or(true, |e| e < info.epoch));
            if !behind {
                // In the group at the server's epoch (an invitation's Welcome): nothing to do.
                return Ok(());
            }
            // Behind: let the events task read the log up to now (it may take this device out
            // of the group, and back in, on the way).
            let (done, wait) = tokio::sync::oneshot::channel();
            s.tell(Control::CatchUp {
                conv: self.conv_of(&conv),
                done: Some(done),
            });
            let _ = tokio::time::timeout(CATCH_UP_WAIT, wait).await;
        }
        self.join_group(&s, conv).await.map(drop)
    }

    /// After leaving a room: this device leaves its group too (the server proposed the
    /// removal of the account's devices; a later join starts over).
    pub(crate) fn after_part(&self, room: &str) {
        if let Some(s) = self.secure() {
            let _ = s.with(|d| d.leave_group(&room_key(room)));
        }
    }

    /// After inviting a user to an end-to-end room: add their devices to the group (those
    /// without key packages join by external commit when they join the room).
    pub(crate) async fn after_invite(&self, room: &str, user: &str) -> Result<(), ClientError> {
        let Some(s) = self.secure() else {
            return Ok(());
        };
        let key = room_key(room);
        if !s.has_group(&key) {
            return Ok(());
        }
        let (s, key, conv) = (&s, &key, &ConvRef::Room(room.to_string()));
        retry_group_op(s, "the group kept changing; invite again", || {
            Box::pin(async move {
                let kps = match self
                    .request(Request::E2eeClaim {
                        users: vec![user.to_string()],
                    })
                    .await?
                {
                    Reply::E2eeKeyPackages(k) => k,
                    other => return Err(crate::connection::unexpected("e2ee_claim", &other)),
                };
                let kps = new_devices(s, key, kps);
                if kps.is_empty() {
                    return Ok(Attempt::Done(()));
                }
                let out = s.with(|d| d.add_members(key, &kps)).map_err(e2ee_err)?;
                again_if_stale(self.commit(s, conv, key, out, false).await.map(|_| ()))
            })
        })
        .await
    }

    /// Makes the direct conversation with `to` end-to-end encrypted: a group of every
    /// participant's devices. `Ok(false)` when some participant has no device (has never used
    /// an end-to-end client): the conversation then stays server-encrypted.
    async fn ensure_direct_group(
        &self,
        s: &Arc<Secure>,
        to: &[String],
        key: &str,
    ) -> Result<bool, ClientError> {
        let others: Vec<String> = to
            .iter()
            .filter(|u| u.as_str() != self.user())
            .cloned()
            .collect();
        for u in &others {
            let recently = s
                .no_device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(u)
                .is_some_and(|at| at.elapsed() < NO_DEVICE_RECHECK);
            if recently {
                return Ok(false);
            }
            match self
                .request(Request::E2eeDevices { user: u.clone() })
                .await?
            {
                Reply::E2eeDevices(d) if !d.is_empty() => {}
                Reply::E2eeDevices(_) => {
                    let mut none = s.no_device.lock().unwrap_or_else(|e| e.into_inner());
                    if none.len() >= MAX_NO_DEVICE {
                        none.clear();
                    }
                    none.insert(u.clone(), std::time::Instant::now());
                    return Ok(false);
                }
                other => return Err(crate::connection::unexpected("e2ee_devices", &other)),
            }
        }
        // A note to myself: the conversation of me alone (the server adds me to `with`).
        let conv = ConvRef::With(if others.is_empty() {
            vec![self.user().to_string()]
        } else {
            others.clone()
        });
        let _ops = s.ops.lock().await;
        if s.has_group(key) {
            return Ok(true);
        }
        let gi = s.create_group(key)?;
        match self
            .request(Request::E2eeCreate {
                conv: conv.clone(),
                group_info: Bytes::from(gi),
            })
            .await
        {
            Ok(_) => {}
            Err(ClientError::Server(b)) if b.code == ErrorCode::RoomExists => {
                // The other side made it first: its Welcome is on the way.
                let _ = s.with(|d| d.forget_group(key));
                drop(_ops);
                for _ in 0..SEND_ATTEMPTS {
                    if s.has_group(key) {
                        return Ok(true);
                    }
                    tokio::time::sleep(SEND_RETRY_WAIT).await;
                }
                return Err(e2ee_err(
                    "the conversation is end-to-end encrypted but this device has not been added to it",
                ));
            }
            Err(e) => {
                let _ = s.with(|d| d.forget_group(key));
                return Err(e);
            }
        }
        if others.is_empty() {
            return Ok(true);
        }
        // The others' devices, and this account's other devices.
        let mut users = others.clone();
        users.push(self.user().to_string());
        let kps = match self.request(Request::E2eeClaim { users }).await? {
            Reply::E2eeKeyPackages(k) => k,
            other => return Err(crate::connection::unexpected("e2ee_claim", &other)),
        };
        let kps = new_devices(s, key, kps);
        if !kps.is_empty() {
            let out = s.with(|d| d.add_members(key, &kps)).map_err(e2ee_err)?;
            self.commit(s, &conv, key, out, false).await?;
        }
        Ok(true)
    }

    /// Sends a file to an end-to-end conversation: encrypted here under a fresh key
    /// (XChaCha20-Poly1305 STREAM), the ciphertext sent as any file (relay, or peer to peer
    /// with [`crate::FileOptions::p2p`]), its key, name and hash in an MLS message to the
    /// members. `None` when `target` is not end-to-end.
    pub(crate) async fn send_file_e2ee(
        &self,
        path: &Path,
        target: &Target,
        opts: &crate::files::FileOptions,
    ) -> Option<Result<crate::files::FileSent, ClientError>> {
        let s = self.secure()?;
        let key = self.target_key(target);
        if !s.has_group(&key) {
            return None;
        }
        Some(self.send_file_sealed(&s, path, target, opts).await)
    }

    /// Seals the file into a temporary ciphertext (streamed: the plaintext is hashed as it is
    /// read, never held whole), offers the ciphertext under that file's random name, sends the
    /// description (`Payload::File`) as soon as the server has created the offer, and only
    /// then transfers: a recipient holds the offer until the description arrives, and a
    /// peer-to-peer send only ends once recipients have fetched it.
    async fn send_file_sealed(
        &self,
        s: &Arc<Secure>,
        path: &Path,
        target: &Target,
        opts: &crate::files::FileOptions,
    ) -> Result<crate::files::FileSent, ClientError> {
        opts.check()?;
        let name = crate::files::file_name(path)?;
        let source = crate::files::open_source(path)?;
        // The ciphertext under a random name: the server sees neither the name nor the bytes.
        let tmp = tempfile::Builder::new()
            .prefix("e2ee-")
            .suffix(".bin")
            .tempfile()
            .map_err(|e| ClientError::File {
                code: "unreadable",
                message: format!(
                    "cannot make a temporary file for the encrypted copy: {e} (check TMPDIR)"
                ),
            })?;
        let owned = path.to_path_buf();
        let (tmp, sealed) = tokio::task::spawn_blocking(move || {
            let sealed = crate::e2ee_file::seal(source, &owned, tmp.as_file());
            (tmp, sealed)
        })
        .await
        .map_err(|_| e2ee_err("encrypting the file failed"))?;
        let sealed = sealed?;
        let wire = crate::files::Prepared {
            name: crate::files::file_name(tmp.path())?,
            sha256: sealed.sealed_sha256,
            size: sealed.sealed_size,
        };
        let (plain_size, plain_sha256) = (sealed.plain_size, sealed.plain_sha256);
        let describe: crate::files::AfterOffer = {
            let (client, s, target, name) = (self.clone(), s.clone(), target.clone(), name.clone());
            let file_key = sealed.key;
            Box::new(move |file_id| {
                Box::pin(async move {
                    let payload = Payload::File {
                        file_id,
                        name,
                        size: plain_size,
                        sha256: plain_sha256,
                        key: file_key,
                    };
                    client
                        .send_payload(&s, &target, &payload, None)
                        .await
                        .map(drop)
                })
            })
        };
        let mut sent = self
            .send_prepared(
                tmp.path(),
                target.clone(),
                opts.clone(),
                wire,
                Some(describe),
            )
            .await?;
        drop(tmp);
        sent.name = name;
        sent.size = plain_size;
        sent.sha256 = hex::encode(plain_sha256);
        Ok(sent)
    }

    /// After a download: opens an end-to-end encrypted file (when this device has its key)
    /// into its real name next to it (streamed, through a temporary file that gets the name
    /// only once its size and hash match the description), and removes the ciphertext, also
    /// when opening fails (accepting the file again downloads it again).
    pub(crate) async fn open_received(
        &self,
        mut got: crate::files::FileReceived,
    ) -> Result<crate::files::FileReceived, ClientError> {
        let Some(s) = self.secure() else {
            return Ok(got);
        };
        let Some(Payload::File {
            name,
            size,
            sha256,
            key,
            ..
        }) = s
            .with(|d| d.file(&got.file_id, &got.from))
            .map_err(e2ee_err)?
        else {
            return Ok(got);
        };
        let sealed = got.path.clone();
        if let Err(why) = conclave_proto::files::check_file_name(&name) {
            let _ = std::fs::remove_file(&sealed);
            return Err(ClientError::File {
                code: "bad_request",
                message: format!("the file's name is unsafe ({why}); refused"),
            });
        }
        let dir = sealed.parent().map(Path::to_path_buf).unwrap_or_default();
        let opened = tokio::task::spawn_blocking(move || {
            let file = crate::e2ee_file::Description {
                name: &name,
                size,
                sha256: &sha256,
                key: &key,
            };
            let opened = crate::e2ee_file::open(&sealed, &dir, &file);
            let _ = std::fs::remove_file(&sealed);
            opened
        })
        .await
        .map_err(|_| e2ee_err("decrypting the file failed; accept it again"))?;
        got.path = opened?;
        got.size = size;
        Ok(got)
    }

    /// An offer as the user should see it: an end-to-end file's real name, size and hash
    /// once its description is here (as it is unchanged otherwise).
    pub(crate) fn described_offer(
        &self,
        o: Box<conclave_proto::FileOffer>,
    ) -> Box<conclave_proto::FileOffer> {
        let Some(s) = self.secure() else {
            return o;
        };
        if !is_sealed_file(&o.name) {
            return o;
        }
        match s.with(|d| d.file(&o.file_id, &o.from).ok().flatten()) {
            Some(p) => describe(o, &p),
            None => o,
        }
    }

    /// Encrypts and sends a payload to an end-to-end conversation.
    async fn send_payload(
        &self,
        s: &Arc<Secure>,
        target: &Target,
        payload: &Payload,
        refs: Option<&conclave_proto::Refs>,
    ) -> Result<(u64, String, i64), ClientError> {
        let key = self.target_key(target);
        let idem = uuid::Uuid::now_v7().to_string();
        let (key, idem) = (&key, &idem);
        retry_group_op(
            s,
            "the conversation's group kept changing; the message was not sent. Try again",
            || {
                Box::pin(async move {
                    let data = match s.with(|d| d.encrypt(key, payload)) {
                        Ok(d) => d,
                        // A removal is pending: the events task commits it; wait for that.
                        Err(conclave_e2ee::E2eeError::Refused(_)) => return Ok(Attempt::Again),
                        Err(e) => return Err(e2ee_err(e)),
                    };
                    let req = Request::Send {
                        target: target.clone(),
                        body: Body {
                            content_type: CT_APP.into(),
                            data,
                        },
                        idempotency_key: Some(idem.clone()),
                        refs: refs.map(|r| Box::new(r.clone())),
                    };
                    match again_if_stale(self.request(req).await)? {
                        Attempt::Done(Reply::Sent {
                            msg_id, seq, ts_ms, ..
                        }) => {
                            let _ = s.with(|d| d.record_own(key, seq, ts_ms, payload));
                            let reply_to = refs.and_then(|r| r.reply_to.as_deref());
                            let _ = s.with(|d| match payload {
                                Payload::Body { .. } => d.note_message(key, seq, &msg_id, reply_to),
                                Payload::Act { .. } => {
                                    d.apply_act(key, seq, self.user(), ts_ms, payload).map(drop)
                                }
                                _ => Ok(()),
                            });
                            Ok(Attempt::Done((seq, msg_id, ts_ms)))
                        }
                        Attempt::Done(other) => Err(crate::connection::unexpected("send", &other)),
                        Attempt::Again => Ok(Attempt::Again),
                    }
                })
            },
        )
        .await
    }

    /// The conversation key a send to `target` goes to (a direct conversation includes me).
    fn target_key(&self, target: &Target) -> String {
        match target {
            Target::Room { room, .. } => room_key(room),
            Target::Users { to } => {
                let mut all: Vec<String> = to.clone();
                all.push(self.user().to_string());
                all.sort();
                all.dedup();
                format!("d:{}", all.join(","))
            }
        }
    }

    /// Encrypts and sends to an end-to-end conversation; `None` when `target` is not one.
    pub(crate) async fn send_e2ee(
        &self,
        target: &Target,
        body: &Body,
        idempotency_key: Option<String>,
        refs: Option<&conclave_proto::Refs>,
    ) -> Option<Result<(u64, String, i64), ClientError>> {
        let s = self.secure()?;
        let key = self.target_key(target);
        if !s.has_group(&key) {
            match target {
                Target::Users { to } => match self.ensure_direct_group(&s, to, &key).await {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                },
                Target::Room { room, .. } => {
                    // Never a readable body to an end-to-end room this device is not in (yet):
                    // ask the server, and join the group first when it is one.
                    let recently_plain = s
                        .plain_rooms
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&key)
                        .is_some_and(|at| at.elapsed() < PLAIN_RECHECK);
                    if recently_plain {
                        return None;
                    }
                    match self.join_group(&s, ConvRef::Room(room.clone())).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let mut plain = s.plain_rooms.lock().unwrap_or_else(|e| e.into_inner());
                            if plain.len() >= MAX_PLAIN_ROOMS {
                                plain.clear();
                            }
                            plain.insert(key.clone(), std::time::Instant::now());
                            return None;
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
            }
        }
        if let Target::Room { room, except } = target
            && !except.is_empty()
        {
            if refs.is_some_and(|r| r.acts_on.is_some()) {
                return Some(Err(e2ee_err(
                    "an edit, delete or reaction goes to the whole conversation: send it without `except`",
                )));
            }
            return Some(self.blockcast(&s, room, except, &key, body, refs).await);
        }
        let payload = match refs.and_then(|r| r.acts_on.as_ref()) {
            // The reference inside the ciphertext too, so the server cannot redirect it.
            Some(act) => Payload::Act {
                msg_id: act.msg_id.clone(),
                kind: crate::chat::act_code(act.kind),
                content_type: body.content_type.clone(),
                data: body.data.clone(),
            },
            None => Payload::Body {
                content_type: body.content_type.clone(),
                data: body.data.clone(),
            },
        };
        let _ = idempotency_key;
        Some(self.send_payload(&s, target, &payload, refs).await)
    }

    /// Blockcast in an end-to-end room: the body is sealed under a fresh key; the key goes
    /// only to the intended members (in the end-to-end direct conversation of the sender and
    /// them), the sealed body to the room with the left-out members excepted. A left-out
    /// member's device never gets the key, so even a copy of the room's message is unreadable.
    async fn blockcast(
        &self,
        s: &Arc<Secure>,
        room: &str,
        except: &[String],
        key: &str,
        body: &Body,
        refs: Option<&conclave_proto::Refs>,
    ) -> Result<(u64, String, i64), ClientError> {
        let me = self.user().to_string();
        let mut intended: Vec<String> = s
            .with(|d| d.members(key))
            .map_err(e2ee_err)?
            .into_iter()
            .map(|m| m.user)
            .filter(|u| *u != me && !except.contains(u))
            .collect();
        intended.sort();
        intended.dedup();
        let (id, msg_key, sealed) =
            conclave_e2ee::payload::seal_for_some(&body.content_type, &body.data)
                .map_err(e2ee_err)?;
        if !intended.is_empty() {
            let mut all = intended.clone();
            all.push(me.clone());
            all.sort();
            all.dedup();
            let dm_key = format!("d:{}", all.join(","));
            if !s.has_group(&dm_key) && !self.ensure_direct_group(s, &intended, &dm_key).await? {
                return Err(e2ee_err(
                    "a member has no end-to-end device; cannot leave others out here",
                ));
            }
            let key_payload = Payload::SealedKey { id, key: msg_key };
            self.send_payload(s, &Target::Users { to: intended }, &key_payload, None)
                .await?;
        }
        let target = Target::Room {
            room: room.to_string(),
            except: except.to_vec(),
        };
        // A reply keeps its reference (in clear, as for every message, for threads).
        let refs = refs.filter(|r| r.acts_on.is_none());
        let sent = self.send_payload(s, &target, &sealed, refs).await?;
        let own = Payload::Body {
            content_type: body.content_type.clone(),
            data: body.data.clone(),
        };
        let reply_to = refs.and_then(|r| r.reply_to.as_deref());
        let _ = s.with(|d| {
            d.record(key, sent.0, &me, sent.2, &own)?;
            d.note_message(key, sent.0, &sent.1, reply_to)
        });
        Ok(sent)
    }

    /// Local history of an end-to-end conversation; `None` when it is not one.
    pub(crate) fn local_history(
        &self,
        conv: &Conv,
        limit: u32,
        before: Option<u64>,
    ) -> Option<Result<Vec<Message>, ClientError>> {
        let s = self.secure()?;
        let key = conv_key(conv);
        if !s.with(|d| d.knows(&key).unwrap_or(false)) {
            return None;
        }
        Some(
            s.with(|d| {
                d.history(&key, limit, before).map(|v| {
                    v.into_iter()
                        .filter_map(|e| {
                            let state = d.local_state(&key, e.seq).ok().flatten();
                            entry_message_with(conv.clone(), e, state)
                        })
                        .collect()
                })
            })
            .map_err(e2ee_err),
        )
    }

    /// A thread of an end-to-end conversation from this device's history (the server's rows
    /// are ciphertext): the message `root` then its replies after `after`, oldest first. `None`
    /// when this device does not hold `root`.
    pub(crate) fn local_thread(
        &self,
        root: &str,
        limit: u32,
        after: Option<u64>,
    ) -> Option<Result<Vec<Message>, ClientError>> {
        let s = self.secure()?;
        let found = match s.with(|d| d.thread(root, limit, after)) {
            Ok(found) => found?,
            Err(e) => return Some(Err(e2ee_err(e))),
        };
        let (key, root_seq, replies) = found;
        let conv = conv_from_key(&key);
        Some(
            s.with(|d| {
                let mut out = Vec::with_capacity(replies.len() + 1);
                for seq in std::iter::once(root_seq).chain(replies) {
                    let entry = d
                        .history(&key, 1, Some(seq.saturating_add(1)))?
                        .into_iter()
                        .find(|e| e.seq == seq);
                    if let Some(e) = entry {
                        let state = d.local_state(&key, seq).ok().flatten();
                        out.extend(entry_message_with(conv.clone(), e, state));
                    }
                }
                Ok::<_, conclave_e2ee::E2eeError>(out)
            })
            .map_err(e2ee_err),
        )
    }

    /// Local search in end-to-end conversations (the server cannot search them).
    pub(crate) fn local_search(&self, query: &str, room: Option<&str>, limit: u32) -> Vec<Message> {
        let Some(s) = self.secure() else {
            return Vec::new();
        };
        let conv = room.map(room_key);
        s.with(|d| d.search(query, conv.as_deref(), limit))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let c = conv_from_key(&e.conv);
                entry_message(c, e)
            })
            .collect()
    }
}

fn conv_from_key(key: &str) -> Conv {
    match key.split_once(':') {
        Some(("r", room)) => Conv::Room(room.to_string()),
        Some((_, users)) => Conv::Direct(users.split(',').map(str::to_string).collect()),
        None => Conv::Room(key.to_string()),
    }
}

/// A local history entry as a message, with its server id, reply reference and state (edits,
/// deletion, reactions) when this device knows them. Acts are not messages of their own.
fn entry_message_with(
    conv: Conv,
    e: conclave_e2ee::device::HistoryEntry,
    state: Option<(String, conclave_e2ee::device::LocalState)>,
) -> Option<Message> {
    let mut m = entry_message(conv, e)?;
    if let Some((msg_id, st)) = state {
        m.msg_id = msg_id;
        let changed = st.edits > 0 || st.deleted || !st.reactions.is_empty();
        if st.deleted {
            m.body.data.clear();
        }
        if changed || st.reply_to.is_some() {
            m.extra = Some(Box::new(conclave_proto::Extra {
                reply_to: st.reply_to,
                acts_on: None,
                state: changed.then(|| conclave_proto::MsgState {
                    edited_ms: st.edited_ms,
                    edits: st.edits,
                    deleted: st.deleted,
                    reactions: st
                        .reactions
                        .into_iter()
                        .map(|(emoji, users)| conclave_proto::Reaction { emoji, users })
                        .collect(),
                }),
            }));
        }
    }
    Some(m)
}

fn entry_message(conv: Conv, e: conclave_e2ee::device::HistoryEntry) -> Option<Message> {
    match e.payload {
        Payload::Body { content_type, data } => Some(Message {
            msg_id: format!("e2ee-{}-{}", e.conv, e.seq),
            conv,
            from: e.from,
            seq: e.seq,
            ts_ms: e.ts_ms,
            body: Body { content_type, data },
            extra: None,
        }),
        _ => None,
    }
}

/// The events task: takes the server's events in order and hands the application what it
/// should see. It alone processes conversations' logs, so each is processed in order.
async fn run(
    client: crate::connection::WeakClient,
    s: Arc<Secure>,
    mut raw: Events,
    mut control: mpsc::Receiver<Control>,
    tx: mpsc::Sender<ClientEvent>,
) {
    // Messages of conversations this device is joining, until it is in.
    let mut early: HashMap<String, Vec<Message>> = HashMap::new();
    loop {
        let event = tokio::select! {
            biased;
            Some(c) = control.recv() => {
                let Some(client) = client.upgrade() else {
                    break;
                };
                match c {
                    Control::Joined { conv } => {
                        joined(&client, &s, &conv, &mut early, &tx).await;
                    }
                    Control::CatchUp { conv, done } => {
                        catch_up(&client, &s, &conv, None, &tx).await;
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                    }
                }
                continue;
            }
            e = raw.recv() => match e {
                Some(e) => e,
                None => break,
            },
        };
        let Some(client) = client.upgrade() else {
            break;
        };
        match event {
            ClientEvent::Server(Event::Message(m)) if is_mls(&m.body.content_type) => {
                let key = conv_key(&m.conv);
                if !s.confirmed(&key) {
                    // Not in the group (yet): kept until this device joins it (by its own
                    // external commit or a Welcome), then processed in order.
                    let q = early.entry(key).or_default();
                    if q.len() < EARLY_MESSAGES {
                        q.push(m);
                    }
                    continue;
                }
                process(&client, &s, m, &tx).await;
            }
            ClientEvent::Server(Event::E2eeWelcome {
                id,
                device,
                conv,
                seq,
                welcome,
            }) => {
                if s.with(|d| d.device_id() != device) {
                    continue;
                }
                let key = conv_key(&conv);
                let joined_welcome = {
                    let _ops = s.ops.lock().await;
                    // Already in by a later external commit: the Welcome is older news.
                    let later = s.confirmed(&key)
                        && s.with(|d| d.last_seq(&key).ok().flatten())
                            .is_some_and(|last| last >= seq);
                    if later {
                        Ok(false)
                    } else {
                        s.with(|d| d.join_welcome(&key, &welcome, seq))
                            .map(|()| true)
                    }
                };
                match joined_welcome {
                    Ok(true) => {
                        joined(&client, &s, &conv, &mut early, &tx).await;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "a Welcome could not be used"),
                }
                let _ = client.request(Request::E2eeWelcomeDone { id }).await;
            }
            ClientEvent::Server(
                Event::Part { ref room, ref user }
                | Event::Kicked {
                    room: Some(ref room),
                    ref user,
                    ..
                },
            ) if user == client.user() => {
                // Another connection of this account left the room, or the account was
                // kicked from it: this device leaves its group too.
                let _ = s.with(|d| d.leave_group(&room_key(room)));
                if tx.send(event).await.is_err() {
                    break;
                }
            }
            ClientEvent::Server(Event::Join { ref room, ref user }) if user == client.user() => {
                // Another connection of this account joined a room (a member's commit that
                // adds the account sends this device its Welcome first): this device joins the
                // room's group too, when it is end-to-end encrypted.
                let key = room_key(room);
                let rejoin = !s.confirmed(&key);
                let room = room.clone();
                if tx.send(event).await.is_err() {
                    break;
                }
                if rejoin {
                    rejoin_if_member(&client, &s, &Conv::Room(room)).await;
                }
            }
            ClientEvent::Server(Event::FileOffer(o)) if is_sealed_file(&o.name) => {
                // An end-to-end file: shown with its real name and size once its description
                // (an MLS message) is here.
                let known = s.with(|d| d.file(&o.file_id, &o.from).ok().flatten());
                match known {
                    Some(p) => {
                        let _ = tx
                            .send(ClientEvent::Server(Event::FileOffer(describe(o, &p))))
                            .await;
                    }
                    None => {
                        let mut waiting =
                            s.offers_waiting.lock().unwrap_or_else(|e| e.into_inner());
                        if waiting.len() < EARLY_MESSAGES {
                            waiting.insert(o.file_id.clone(), o);
                        }
                    }
                }
            }
            ClientEvent::Reconnected { .. } => {
                // The new connection speaks for this device again.
                let _ = client.publish_device(&s).await;
                // History may wait for this device (sent while it was away).
                s.devices.wake();
                if tx.send(event).await.is_err() {
                    break;
                }
            }
            other => {
                let Some(other) = crate::devices::on_event(&s, other) else {
                    continue;
                };
                if tx.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// This device is in the conversation's group now: say so, then process what arrived for it
/// meanwhile (what is from before the join is reported once, as unreadable here).
async fn joined(
    client: &Client,
    s: &Arc<Secure>,
    conv: &Conv,
    early: &mut HashMap<String, Vec<Message>>,
    tx: &mpsc::Sender<ClientEvent>,
) {
    let key = conv_key(conv);
    // In again: a later time out of the group is said again.
    s.forget_notice(&key, NOT_MEMBER);
    let _ = tx
        .send(ClientEvent::E2ee(E2eeNotice::Joined { conv: conv.clone() }))
        .await;
    for m in early.remove(&key).unwrap_or_default() {
        process(client, s, m, tx).await;
    }
}

/// The account is in the conversation but this device is not in its group (it was removed
/// for an earlier membership, banned and let back in, or its state fell behind the log): it
/// joins again by external commit. Rooms are asked about first: a device of an account that
/// is not a member stays out.
async fn rejoin_if_member(client: &Client, s: &Arc<Secure>, conv: &Conv) {
    if let Conv::Room(room) = conv {
        let member = client
            .rooms()
            .await
            .is_ok_and(|rooms| rooms.iter().any(|r| r.room == *room && r.member && r.e2ee));
        if !member {
            return;
        }
    }
    if let Err(e) = client.join_group(s, client.conv_ref(conv)).await {
        tracing::warn!(conv = %conv_key(conv), error = %e, "could not join the end-to-end group again");
    }
}

/// Processes the conversation's log after what this device has processed, up to `upto`
/// (else up to its newest entry), a page at a time.
async fn catch_up(
    client: &Client,
    s: &Arc<Secure>,
    conv: &Conv,
    upto: Option<u64>,
    tx: &mpsc::Sender<ClientEvent>,
) {
    let key = conv_key(conv);
    let Some(last) = s.with(|d| d.last_seq(&key).ok().flatten()) else {
        return;
    };
    let conv_ref = client.conv_ref(conv);
    let end = match upto {
        Some(u) => u,
        None => match client.history_raw(conv_ref.clone(), 1, None).await {
            Ok(newest) => match newest.last() {
                Some(m) => m.seq,
                None => return,
            },
            Err(_) => return,
        },
    };
    if end <= last {
        return;
    }
    let mut next = last + 1;
    if end - last > MAX_FILL {
        next = end - MAX_FILL + 1;
        let _ = tx
            .send(ClientEvent::E2ee(E2eeNotice::Unreadable {
                conv: conv.clone(),
                seq: next - 1,
                reason: format!(
                    "{} earlier messages were not fetched (more than {MAX_FILL} at once)",
                    next - 1 - last
                ),
            }))
            .await;
    }
    // Each round asks for the entries in [next, next + window): the server's page holds the
    // newest ones that fit its byte budget, so a cut page makes the window smaller.
    let mut window = FILL_PAGE;
    let mut rounds = 0u64;
    while next <= end && rounds < 4 * (MAX_FILL / FILL_PAGE + 1) {
        rounds += 1;
        let w = window.min(end - next + 1);
        let page = match client
            .history_raw(conv_ref.clone(), w as u32, Some(next + w))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(conv = %key, error = %e, "catching up with the conversation");
                return;
            }
        };
        let page: Vec<Message> = page
            .into_iter()
            .filter(|m| m.seq >= next && m.seq < next + w)
            .collect();
        match page.first() {
            None => {
                next += w;
                window = FILL_PAGE;
            }
            Some(first) if first.seq > next && page.len() < (next + w - first.seq) as usize => {
                // Not a gap: the page was cut to its byte budget. Ask for less.
                window = (first.seq - next).max(1);
            }
            Some(_) => {
                for m in page {
                    if is_mls(&m.body.content_type) {
                        Box::pin(process_one(client, s, m, tx)).await;
                    }
                }
                next += w;
                window = FILL_PAGE;
            }
        }
    }
}

/// One attempt at a group operation (boxed: the futures of the callers' closures are `Send`).
type AttemptFuture<'a, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Attempt<T>, ClientError>> + Send + 'a>,
>;

/// What one attempt at a group operation came to.
enum Attempt<T> {
    Done(T),
    /// The group changed under it (a commit won the epoch first, a removal is pending):
    /// try again once this device has caught up.
    Again,
}

/// A stale epoch means "try again"; anything else is the result.
fn again_if_stale<T>(r: Result<T, ClientError>) -> Result<Attempt<T>, ClientError> {
    match r {
        Ok(t) => Ok(Attempt::Done(t)),
        Err(ClientError::Server(b)) if b.code == ErrorCode::StaleEpoch => Ok(Attempt::Again),
        Err(e) => Err(e),
    }
}

/// Runs a group operation under the device's operation lock until it is done, at most
/// [`SEND_ATTEMPTS`] times, waiting [`SEND_RETRY_WAIT`] without the lock between attempts (so
/// the events task can bring the group up to date); then fails with `give_up`.
async fn retry_group_op<'a, T>(
    s: &Secure,
    give_up: &str,
    mut attempt: impl FnMut() -> AttemptFuture<'a, T>,
) -> Result<T, ClientError> {
    for _ in 0..SEND_ATTEMPTS {
        let ops = s.ops.lock().await;
        let result = attempt().await;
        drop(ops);
        match result? {
            Attempt::Done(t) => return Ok(t),
            Attempt::Again => tokio::time::sleep(SEND_RETRY_WAIT).await,
        }
    }
    Err(e2ee_err(give_up))
}

/// The key packages of devices that are not in the conversation's group yet (never this
/// device itself: claiming this account's devices hands out one of its own too).
fn new_devices(s: &Secure, key: &str, kps: Vec<conclave_proto::ClaimedKeyPackage>) -> Vec<Vec<u8>> {
    let (me, present) = s.with(|d| {
        let present: Vec<(String, String)> = d
            .members(key)
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m.user, m.device))
            .collect();
        ((d.user().to_string(), d.device_id().to_string()), present)
    });
    kps.into_iter()
        .filter(|k| {
            let who = (k.user.clone(), k.device.clone());
            who != me && !present.contains(&who)
        })
        .map(|k| k.key_package.into_vec())
        .collect()
}

/// The name under which end-to-end files travel (the server never sees the real one).
fn is_sealed_file(name: &str) -> bool {
    name.starts_with("e2ee-") && name.ends_with(".bin")
}

/// An end-to-end file's offer as the user should see it: real name, size and hash.
fn describe(mut o: Box<conclave_proto::FileOffer>, p: &Payload) -> Box<conclave_proto::FileOffer> {
    if let Payload::File {
        name, size, sha256, ..
    } = p
    {
        o.name = name.clone();
        o.size = *size;
        o.sha256 = *sha256;
    }
    o
}

fn is_mls(ct: &str) -> bool {
    ct == CT_APP || ct == CT_COMMIT || ct == CT_PROPOSAL
}

/// Processes one MLS message of a conversation's log (filling a gap from history first).
async fn process(client: &Client, s: &Arc<Secure>, m: Message, tx: &mpsc::Sender<ClientEvent>) {
    let key = conv_key(&m.conv);
    let last = s.with(|d| d.last_seq(&key).ok().flatten()).unwrap_or(0);
    if m.seq > last + 1 {
        // Missed entries (another device of the account took them): read them first.
        catch_up(client, s, &m.conv, Some(m.seq - 1), tx).await;
    }
    process_one(client, s, m, tx).await;
}

async fn process_one(client: &Client, s: &Arc<Secure>, m: Message, tx: &mpsc::Sender<ClientEvent>) {
    let key = conv_key(&m.conv);
    let result = {
        let _ops = s.ops.lock().await;
        s.with(|d| {
            let before = d.members(&key).unwrap_or_default();
            let r = d.process(&key, m.seq, &m.from, m.ts_ms, &m.body.data);
            (r, before)
        })
    };
    let (result, _before) = result;
    match result {
        Ok(Processed::App { payload, .. }) => match payload {
            Payload::Body { content_type, data } => {
                let reply_to = m.extra.as_ref().and_then(|x| x.reply_to.as_deref());
                let _ = s.with(|d| d.note_message(&key, m.seq, &m.msg_id, reply_to));
                let mut plain = m.clone();
                plain.body = Body { content_type, data };
                let _ = tx.send(ClientEvent::Server(Event::Message(plain))).await;
            }
            ref act @ Payload::Act {
                ref msg_id,
                kind,
                ref content_type,
                ref data,
            } => {
                // The server's cleartext reference must be the one the sender signed.
                let named = m.extra.as_ref().and_then(|x| x.acts_on.as_ref());
                if named
                    .is_none_or(|a| &a.msg_id != msg_id || crate::chat::act_code(a.kind) != kind)
                {
                    tracing::warn!(conv = %key, seq = m.seq, "an act whose reference does not match its ciphertext was dropped");
                    return;
                }
                let _ = s.with(|d| d.apply_act(&key, m.seq, &m.from, m.ts_ms, act));
                let mut plain = m.clone();
                plain.body = Body {
                    content_type: content_type.clone(),
                    data: data.clone(),
                };
                let _ = tx.send(ClientEvent::Server(Event::Message(plain))).await;
            }
            Payload::File { ref file_id, .. } => {
                // Only the description by the file's own sender opens it.
                let waiting = {
                    let mut w = s.offers_waiting.lock().unwrap_or_else(|e| e.into_inner());
                    match w.get(file_id) {
                        Some(o) if o.from == m.from => w.remove(file_id),
                        _ => None,
                    }
                };
                if let Some(o) = waiting {
                    let _ = tx
                        .send(ClientEvent::Server(Event::FileOffer(describe(o, &payload))))
                        .await;
                }
            }
            Payload::SealedKey { id, .. } => {
                // A blockcast's key: open its message if it came first.
                let waiting = s
                    .sealed_waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(m) = waiting {
                    open_sealed_message(s, m, tx).await;
                }
            }
            Payload::Sealed { .. } => {
                open_sealed_message(s, m.clone(), tx).await;
            }
        },
        Ok(Processed::Commit {
            epoch,
            added,
            removed,
            removed_self,
        }) => {
            if removed_self {
                let _ = tx
                    .send(ClientEvent::E2ee(E2eeNotice::Removed {
                        conv: m.conv.clone(),
                    }))
                    .await;
                // Removed for a membership that is over, while the account is back in (banned
                // and let back in, or a quick part and join): join again.
                rejoin_if_member(client, s, &m.conv).await;
                return;
            }
            let changes = s.with(|d| d.device_changes(&added).unwrap_or_default());
            let _ = tx
                .send(ClientEvent::E2ee(E2eeNotice::Members {
                    conv: m.conv.clone(),
                    epoch,
                    added: added
                        .iter()
                        .map(|a| format!("{}/{}", a.user, a.device))
                        .collect(),
                    removed: removed
                        .iter()
                        .map(|a| format!("{}/{}", a.user, a.device))
                        .collect(),
                }))
                .await;
            for c in changes {
                let _ = tx
                    .send(ClientEvent::E2ee(E2eeNotice::NewDevice {
                        conv: m.conv.clone(),
                        user: c.user,
                        device: c.device,
                        fingerprint: c.fingerprint,
                        changed: c.changed,
                    }))
                    .await;
            }
        }
        Ok(Processed::Proposal) => {
            commit_pending(client, s, &m.conv, &key, tx).await;
        }
        Ok(Processed::Duplicate) => {}
        Ok(p @ (Processed::BeforeJoin | Processed::NotMember)) => {
            // Outside this device's membership: said once per conversation and reason.
            let why = if p == Processed::BeforeJoin {
                BEFORE_JOIN
            } else {
                NOT_MEMBER
            };
            if m.body.content_type == CT_APP && s.first_notice(&key, why) {
                let _ = tx
                    .send(ClientEvent::E2ee(E2eeNotice::Unreadable {
                        conv: m.conv.clone(),
                        seq: m.seq,
                        reason: why.to_string(),
                    }))
                    .await;
            }
        }
        Ok(Processed::Unreadable(reason)) => {
            if m.body.content_type == CT_APP {
                let _ = tx
                    .send(ClientEvent::E2ee(E2eeNotice::Unreadable {
                        conv: m.conv.clone(),
                        seq: m.seq,
                        reason,
                    }))
                    .await;
            } else if m.body.content_type == CT_COMMIT {
                // A commit this device cannot apply leaves its group behind the log for good:
                // it leaves that state and joins again.
                tracing::warn!(conv = %key, seq = m.seq, reason = %reason, "a commit could not be applied; joining the group again");
                let _ = s.with(|d| d.leave_group(&key));
                rejoin_if_member(client, s, &m.conv).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "end-to-end state"),
    }
}

/// Opens a blockcast message with its key (which came in a direct conversation), or keeps it
/// until the key comes.
async fn open_sealed_message(s: &Arc<Secure>, m: Message, tx: &mpsc::Sender<ClientEvent>) {
    let key = conv_key(&m.conv);
    let found = s.with(|d| d.history(&key, 1, Some(m.seq + 1)));
    let Some(Payload::Sealed {
        id,
        nonce,
        ciphertext,
    }) = found
        .ok()
        .and_then(|v| v.into_iter().find(|e| e.seq == m.seq))
        .map(|e| e.payload)
    else {
        return;
    };
    let msg_key = s.with(|d| d.sealed_key(&id).ok().flatten());
    let Some(msg_key) = msg_key else {
        let mut waiting = s.sealed_waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() < EARLY_MESSAGES {
            waiting.insert(id, m);
        }
        return;
    };
    match conclave_e2ee::payload::open_sealed(&msg_key, &id, &nonce, &ciphertext) {
        Ok(inner @ Payload::Body { .. }) => {
            let reply_to = m.extra.as_ref().and_then(|x| x.reply_to.as_deref());
            let _ = s.with(|d| {
                d.record(&key, m.seq, &m.from, m.ts_ms, &inner)?;
                d.note_message(&key, m.seq, &m.msg_id, reply_to)
            });
            if let Payload::Body { content_type, data } = inner {
                let mut plain = m;
                plain.body = Body { content_type, data };
                let _ = tx.send(ClientEvent::Server(Event::Message(plain))).await;
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "a blockcast message does not open"),
    }
}

/// Commits the server's pending removal proposals (some member must; the server takes the
/// first commit and refuses the others, which then follow it).
async fn commit_pending(
    client: &Client,
    s: &Arc<Secure>,
    conv: &Conv,
    key: &str,
    tx: &mpsc::Sender<ClientEvent>,
) {
    // A short random pause so that not every member races for the same epoch.
    let pause = rand::random_range(0..150u64);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    let _ops = s.ops.lock().await;
    let out = match s.with(|d| d.commit_pending(key)) {
        Ok(Some(out)) => out,
        _ => return,
    };
    let conv_ref = client.conv_ref(conv);
    let before = s.with(|d| d.members(key).unwrap_or_default());
    match client.commit(s, &conv_ref, key, out, false).await {
        Ok(_) => {
            let after = s.with(|d| d.members(key).unwrap_or_default());
            let removed = before
                .iter()
                .filter(|m| !after.contains(m))
                .map(|m| format!("{}/{}", m.user, m.device))
                .collect();
            let epoch = s.with(|d| d.epoch(key).unwrap_or_default());
            let _ = tx
                .send(ClientEvent::E2ee(E2eeNotice::Members {
                    conv: conv.clone(),
                    epoch,
                    added: Vec::new(),
                    removed,
                }))
                .await;
        }
        Err(e) => tracing::debug!(error = %e, "another member committed the removal first"),
    }
}
