//! Your history on every device (issue 21), in the client: a new device asks for history, the
//! account's other devices show it and one approves it, the approving device streams its local
//! history sealed to the new device through the server, and the new device takes it; and the
//! recovery-key backup, written continuously and restored on a fresh device.
//!
//! The cryptography is `conclave_e2ee::transfer` (HPKE to the new device's signed transfer key,
//! chunks signed by the approver) and `conclave_e2ee::backup` (HKDF from the recovery key,
//! XChaCha20-Poly1305). Memory stays bounded: the approver reads one page of history at a
//! time, the server keeps the chunks (bounded per device), and the new device takes a few at a
//! time, each imported in one transaction before it is acknowledged, so a disconnect (or a
//! restart of either side) loses nothing and the next fetch resumes where it stopped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conclave_e2ee::backup::RecoveryKey;
use conclave_e2ee::transfer::{Chunk, ChunkId, verify_transfer_key};
use conclave_proto::{Bytes, ErrorCode, Event, Reply, Request, WaitingDevice};
use tokio::sync::{Notify, mpsc};

use crate::connection::{ClientEvent, WeakClient};
use crate::e2ee::{E2eeNotice, Secure, e2ee_err};
use crate::{Client, ClientError};

/// How often the backup looks for new history to append.
const BACKUP_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts at storing one chunk on the server (a disconnect, or the device's space full
/// until it takes what waits), one every [`PUT_RETRY_WAIT`].
const PUT_ATTEMPTS: u32 = 120;
const PUT_RETRY_WAIT: Duration = Duration::from_millis(500);
/// Most fetches of waiting chunks in one round (each up to the server's bound).
const MAX_FETCH_ROUNDS: usize = 100_000;
/// Most devices remembered as waiting.
const MAX_WAITING: usize = 64;

/// News about the account's devices and history, as `e2ee` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceNotice {
    /// Another device of the account asks for history: compare its safety number on it,
    /// then approve or reject it.
    Waiting {
        device: String,
        safety_number: String,
        since_ms: i64,
        addr: String,
    },
    /// A device of the account was approved or rejected (on some device of the account).
    Decided { device: String, state: String },
    /// History this device took: from another device of the account (its id and safety
    /// number), or from the backup (`from` is `backup`).
    Received {
        conversations: u32,
        messages: u64,
        from: String,
        safety_number: Option<String>,
        /// The approver signed with the key its leaf has in an end-to-end group this device
        /// is in (the key the conversations' other members see), not only with a key from the
        /// server's device list. False for the backup.
        approver_in_group: bool,
    },
    /// Progress of history moving: `sent` of `total` messages (to `device`, or from the
    /// backup when restoring).
    Progress {
        direction: &'static str,
        device: String,
        done: u64,
        total: u64,
    },
}

/// The devices part of a session's end-to-end state.
#[derive(Default)]
pub(crate) struct Devices {
    /// Wakes the task (chunks wait for this device; a reconnect).
    wake: Notify,
    /// Devices of the account waiting for a decision, as last heard.
    waiting: Mutex<HashMap<String, WaitingDevice>>,
}

impl Devices {
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }
}

/// What an approval moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    pub device: String,
    pub conversations: u32,
    pub messages: u64,
    pub chunks: u32,
}

/// Turns the server's device events into notices; `None` for what only this module uses.
pub(crate) fn on_event(s: &Secure, e: ClientEvent) -> Option<ClientEvent> {
    match e {
        ClientEvent::Server(Event::DeviceWaiting(w)) => {
            let own = s.with(|d| d.device_id() == w.device);
            let mut waiting = s.devices.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if w.state == "waiting" {
                if waiting.len() >= MAX_WAITING {
                    waiting.clear();
                }
                waiting.insert(w.device.clone(), w.clone());
            } else {
                waiting.remove(&w.device);
            }
            drop(waiting);
            if own {
                return None;
            }
            Some(ClientEvent::E2ee(notice_of(&w)))
        }
        ClientEvent::Server(Event::TransferReady { device }) => {
            if s.with(|d| d.device_id() == device) {
                s.devices.wake();
            }
            None
        }
        ClientEvent::Reconnected { .. } => {
            s.devices.wake();
            Some(e)
        }
        other => Some(other),
    }
}

fn notice_of(w: &WaitingDevice) -> E2eeNotice {
    if w.state == "waiting" {
        E2eeNotice::Device(DeviceNotice::Waiting {
            device: w.device.clone(),
            safety_number: conclave_e2ee::key_fingerprint(&w.signature_key),
            since_ms: w.since_ms,
            addr: w.addr.clone(),
        })
    } else {
        E2eeNotice::Device(DeviceNotice::Decided {
            device: w.device.clone(),
            state: w.state.clone(),
        })
    }
}

/// Starts the devices side of a session once the device is published: asks for history (the
/// account's other devices are told), tells the application which devices wait, and runs the
/// task that takes history sent here and keeps the backup up to date.
pub(crate) async fn start(client: &Client, s: &Arc<Secure>, tx: mpsc::Sender<ClientEvent>) {
    // A device asks when it is new (nothing in its history yet) or asked before (it may still
    // be waiting); a device that has a history of its own never did and does not.
    let asks = s.with(|d| {
        d.has_transfer_key().unwrap_or(false) || d.history_end().is_ok_and(|end| end == 0)
    });
    let key = if asks {
        s.with(|d| d.transfer_key())
    } else {
        Ok((Vec::new(), Vec::new()))
    };
    let (transfer_key, signature) = match key {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "no transfer key: this device cannot be sent history");
            (Vec::new(), Vec::new())
        }
    };
    match client
        .request(Request::DeviceAnnounce {
            transfer_key: Bytes::from(transfer_key),
            signature: Bytes::from(signature),
        })
        .await
    {
        Ok(Reply::DevicesWaiting(list)) => {
            for w in list {
                s.devices
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(w.device.clone(), w.clone());
                let _ = tx.send(ClientEvent::E2ee(notice_of(&w))).await;
            }
        }
        Ok(_) => {}
        // An older server: no device approval there.
        Err(e) => tracing::debug!(error = %e, "device announce"),
    }
    tokio::spawn(task(client.clone_weak(), s.clone(), tx));
}

async fn task(client: WeakClient, s: Arc<Secure>, tx: mpsc::Sender<ClientEvent>) {
    // The server is asked for chunks at start and when woken (chunks wait for this device, a
    // reconnect), never on a timer: idle connections cost it nothing. The backup is looked
    // at locally every tick, and written to only when it has something new.
    let mut fetch = true;
    loop {
        {
            let Some(client) = client.upgrade() else {
                return;
            };
            if fetch {
                take_history(&client, &s, &tx).await;
            }
            if let Err(e) = client.backup_flush(&s).await {
                tracing::warn!(error = %e, "the backup could not be updated; trying again");
            }
        }
        fetch = tokio::select! {
            _ = s.devices.wake.notified() => true,
            _ = tokio::time::sleep(BACKUP_INTERVAL) => false,
        };
        if tx.is_closed() {
            return;
        }
    }
}

/// Takes every chunk waiting for this device: opens, checks, imports, acknowledges.
async fn take_history(client: &Client, s: &Arc<Secure>, tx: &mpsc::Sender<ClientEvent>) {
    let (user, me) = (
        client.user().to_string(),
        s.with(|d| d.device_id().to_string()),
    );
    let mut account_keys: Option<HashSet<Vec<u8>>> = None;
    let mut after = 0u64;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for _ in 0..MAX_FETCH_ROUNDS {
        let chunks = match client.request(Request::TransferFetch { after }).await {
            Ok(Reply::TransferChunks(c)) => c,
            _ => return,
        };
        if chunks.is_empty() {
            return;
        }
        if account_keys.is_none() {
            account_keys = match client
                .request(Request::E2eeDevices { user: user.clone() })
                .await
            {
                Ok(Reply::E2eeDevices(d)) => {
                    Some(d.into_iter().map(|d| d.signature_key.into_vec()).collect())
                }
                _ => return,
            };
        }
        let keys = account_keys.as_ref();
        for c in chunks {
            after = after.max(c.id);
            let id = ChunkId {
                user: &user,
                from_device: &c.from_device,
                to_device: &me,
                transfer: &c.transfer,
                index: c.index,
            };
            let opened = s.with(|d| d.open_chunk(&id, &c.data));
            let (chunk, signer): (Chunk, Vec<u8>) = match opened {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, from = %c.from_device, "a history chunk was dropped");
                    continue;
                }
            };
            if !keys.is_some_and(|k| k.contains(&signer)) {
                tracing::warn!(from = %c.from_device, "a history chunk not signed by a device of this account was dropped");
                continue;
            }
            let imported = if chunk.replaces {
                s.with(|d| d.import_replacements(&chunk.rows))
            } else {
                s.with(|d| d.import_rows(&chunk.rows))
            };
            if let Err(e) = imported {
                tracing::warn!(error = %e, "history could not be stored; it will be fetched again");
                return;
            }
            let done = counts.entry(c.transfer.clone()).or_default();
            *done += chunk.rows.len() as u64;
            let _ = tx
                .send(ClientEvent::E2ee(E2eeNotice::Device(
                    DeviceNotice::Progress {
                        direction: "receive",
                        device: c.from_device.clone(),
                        done: *done,
                        total: chunk.messages,
                    },
                )))
                .await;
            if chunk.last {
                let _ = tx
                    .send(ClientEvent::E2ee(E2eeNotice::Device(
                        DeviceNotice::Received {
                            conversations: chunk.conversations,
                            messages: chunk.messages,
                            from: c.from_device.clone(),
                            safety_number: Some(conclave_e2ee::key_fingerprint(&signer)),
                            approver_in_group: in_group(s, &user, &c.from_device, &signer),
                        },
                    )))
                    .await;
            }
        }
        if client
            .request(Request::TransferAck { through: after })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Whether `device` of `user` is a member, with this signature key, of an end-to-end group
/// this device is in (as its leaf credential there says; groups checked by every member).
fn in_group(s: &Secure, user: &str, device: &str, key: &[u8]) -> bool {
    let fingerprint = conclave_e2ee::key_fingerprint(key);
    s.with(|d| d.known_devices(user))
        .unwrap_or_default()
        .iter()
        .any(|m| m.device == device && m.fingerprint == fingerprint)
}

fn secure_of(client: &Client) -> Result<Arc<Secure>, ClientError> {
    client
        .core()
        .secure
        .get()
        .cloned()
        .ok_or_else(|| e2ee_err("end-to-end encryption is off (no state directory?)"))
}

impl Client {
    /// Devices of this account waiting for a decision.
    pub fn waiting_devices(&self) -> Vec<WaitingDevice> {
        self.core()
            .secure
            .get()
            .map(|s| {
                s.devices
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn waiting_device(&self, device: &str) -> Result<WaitingDevice, ClientError> {
        let list = match self
            .request(Request::DeviceAnnounce {
                transfer_key: Bytes::new(),
                signature: Bytes::new(),
            })
            .await?
        {
            Reply::DevicesWaiting(l) => l,
            other => return Err(crate::connection::unexpected("device_announce", &other)),
        };
        list.into_iter().find(|w| w.device == device).ok_or_else(|| {
            ClientError::Server(conclave_proto::ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "no device {device} of yours is waiting for approval (see the device_waiting events)"
                ),
            ))
        })
    }

    /// Rejects a device of this account, or removes one approved earlier: the server takes
    /// it out of the account for good (it is sent no history, what waited for it is deleted,
    /// its connections are closed and it cannot publish itself again) and out of every
    /// end-to-end group it is in (a member commits the server's Remove proposals), so it reads
    /// nothing sent after that. What it had read stays on it.
    pub async fn reject_device(&self, device: &str) -> Result<(), ClientError> {
        self.request(Request::DeviceDecide {
            device: device.to_string(),
            approve: false,
        })
        .await?;
        Ok(())
    }

    /// The same as [`Client::reject_device`], under the name that fits a device approved
    /// earlier (a lost laptop, a lab machine you will not use again).
    pub async fn remove_device(&self, device: &str) -> Result<(), ClientError> {
        self.reject_device(device).await
    }

    /// Approves a device of this account and sends it this device's end-to-end history,
    /// sealed to it, in bounded chunks. `progress` is told (messages sent, total) after each.
    pub async fn approve_device(
        &self,
        device: &str,
        progress: impl Fn(u64, u64),
    ) -> Result<TransferReport, ClientError> {
        let s = secure_of(self)?;
        let w = self.waiting_device(device).await?;
        if !verify_transfer_key(&w.signature_key, &w.transfer_key, &w.signature) {
            return Err(e2ee_err(format!(
                "device {device}'s transfer key is not signed by its own key: it was not approved; ask it to log in again"
            )));
        }
        self.request(Request::DeviceDecide {
            device: device.to_string(),
            approve: true,
        })
        .await?;
        let mut transfer = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut transfer[..]);
        let transfer = hex::encode(transfer);
        let (user, me) = (
            self.user().to_string(),
            s.with(|d| d.device_id().to_string()),
        );
        // The snapshot, then what is written while the transfer runs (an edit or a delete
        // replaces a row: it comes again in its current state), one page at a time.
        let mut cursor = s
            .with(conclave_e2ee::transfer::TransferCursor::start)
            .map_err(e2ee_err)?;
        let (_, total) = cursor.totals();
        let mut index = 0u32;
        let (conversations, messages) = loop {
            let Some(chunk) = s.with(|d| cursor.next_chunk(d)).map_err(e2ee_err)? else {
                return Err(e2ee_err("the transfer ended without its last chunk"));
            };
            let id = ChunkId {
                user: &user,
                from_device: &me,
                to_device: device,
                transfer: &transfer,
                index,
            };
            let data = s
                .with(|d| d.seal_chunk(&id, &w.transfer_key, &chunk))
                .map_err(e2ee_err)?;
            let (last, totals) = (chunk.last, (chunk.conversations, chunk.messages));
            drop(chunk);
            self.put_with_retries(Request::TransferPut {
                device: device.to_string(),
                transfer: transfer.clone(),
                index,
                data: Bytes::from(data),
            })
            .await?;
            index += 1;
            progress(cursor.sent(), total.max(cursor.sent()));
            if last {
                break totals;
            }
        };
        Ok(TransferReport {
            device: device.to_string(),
            conversations,
            messages,
            chunks: index,
        })
    }

    /// Stores a chunk or segment, waiting through disconnects and a full mailbox.
    async fn put_with_retries(&self, req: Request) -> Result<(), ClientError> {
        let mut attempt = 0;
        loop {
            match self.request(req.clone()).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Server(e))
                    if e.code != ErrorCode::QuotaExceeded
                        && e.code != ErrorCode::NotReady
                        && e.code != ErrorCode::RateLimited
                        && e.code != ErrorCode::ShuttingDown =>
                {
                    return Err(ClientError::Server(e));
                }
                Err(e) => {
                    attempt += 1;
                    if attempt >= PUT_ATTEMPTS {
                        return Err(e);
                    }
                    tokio::time::sleep(PUT_RETRY_WAIT).await;
                }
            }
        }
    }

    /// Turns the recovery-key backup on (or changes its key): a new random key, the whole
    /// local history appended under it before this returns, and any backup under an earlier
    /// key deleted. Returns the key, to show once.
    pub async fn backup_enable(&self) -> Result<String, ClientError> {
        let s = secure_of(self)?;
        let (key, _old) = s.with(|d| d.backup_enable()).map_err(e2ee_err)?;
        self.backup_flush(&s).await?;
        self.request(Request::BackupDrop {
            keep: Some(key.key_id()),
        })
        .await?;
        Ok(key.display())
    }

    /// Turns the backup off and deletes it from the server.
    pub async fn backup_disable(&self) -> Result<(), ClientError> {
        let s = secure_of(self)?;
        s.with(|d| d.backup_disable()).map_err(e2ee_err)?;
        self.request(Request::BackupDrop { keep: None }).await?;
        Ok(())
    }

    /// Appends to the backup now what it does not have yet (it is also done about once a
    /// second); nothing when the backup is off.
    pub async fn backup_sync(&self) -> Result<(), ClientError> {
        let s = secure_of(self)?;
        self.backup_flush(&s).await
    }

    /// Appends every row not yet in the backup (nothing when the backup is off).
    pub(crate) async fn backup_flush(&self, s: &Arc<Secure>) -> Result<(), ClientError> {
        loop {
            let Some(segment) = s.with(|d| d.backup_next()).map_err(e2ee_err)? else {
                return Ok(());
            };
            self.put_with_retries(Request::BackupPut {
                key_id: segment.key_id.clone(),
                index: segment.index,
                data: Bytes::from(segment.data.clone()),
            })
            .await?;
            s.with(|d| d.backup_done(&segment)).map_err(e2ee_err)?;
        }
    }

    /// Restores the history in the backup of this recovery key into this device (which then
    /// keeps the same backup up to date). Returns (conversations, messages) restored.
    pub async fn restore_backup(
        &self,
        recovery_key: &str,
        progress: impl Fn(u64),
    ) -> Result<(u32, u64), ClientError> {
        let s = secure_of(self)?;
        let key = RecoveryKey::parse(recovery_key).map_err(e2ee_err)?;
        let key_id = key.key_id();
        let user = self.user().to_string();
        let mut after = None;
        let mut convs: HashSet<String> = HashSet::new();
        let mut messages = 0u64;
        let mut segments = 0u64;
        for _ in 0..MAX_FETCH_ROUNDS {
            let got = match self
                .request(Request::BackupFetch {
                    key_id: key_id.clone(),
                    after,
                })
                .await?
            {
                Reply::BackupChunks(c) => c,
                other => return Err(crate::connection::unexpected("backup_fetch", &other)),
            };
            if got.is_empty() {
                break;
            }
            for seg in got {
                let rows = key
                    .open_segment(&user, seg.index, &seg.data)
                    .map_err(e2ee_err)?;
                for r in &rows {
                    if !convs.contains(&r.conv) {
                        convs.insert(r.conv.clone());
                    }
                }
                messages += rows.len() as u64;
                s.with(|d| d.import_rows(&rows)).map_err(e2ee_err)?;
                after = Some(seg.index);
                segments += 1;
                progress(messages);
            }
        }
        if segments == 0 {
            return Err(e2ee_err(
                "there is no backup under this recovery key on this server (it was turned off, or its key changed since)",
            ));
        }
        let next = after.map(|a| a + 1).unwrap_or(0);
        s.with(|d| d.backup_adopt(&key, next)).map_err(e2ee_err)?;
        Ok((convs.len() as u32, messages))
    }
}
