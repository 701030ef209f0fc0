//! End-to-end encryption requests: devices and key packages, creating a conversation's
//! group, GroupInfo for external joins, commits (validated, then ordered in the log), and
//! the removals the server proposes when someone is kicked, banned or leaves.

use conclave_e2ee::ds::{GroupState, check_key_package};
use conclave_e2ee::{CT_APP, CT_COMMIT, CT_PROPOSAL, E2eeError};
use conclave_proto::{
    Body, Bytes, ClaimedKeyPackage, Conv, ConvRef, DeviceInfo, ErrorBody, ErrorCode, Event,
    GroupInfoData, Message, Reply, ServerFrame,
};
use tokio::sync::oneshot;

use super::store_error;
use crate::bus::ClusterEvent;
use crate::conn::{Conn, broadcast};
use crate::dispatch::SendCtx;
use crate::e2ee::{ConvGroup, GroupHandle, Newer};
use crate::state::Shared;
use crate::store::{AppendJob, NewMessage, conv_key, now_ms};

/// Most key packages accepted in one request.
pub const MAX_KEY_PACKAGES_PER_REQUEST: usize = 100;
/// Most users in one claim.
pub const MAX_CLAIM_USERS: usize = 100;
/// Most end-to-end devices one account may register.
pub const MAX_DEVICES_PER_ACCOUNT: usize = 20;

/// How long a cluster node waits for another node to finish ordering a group's commit or
/// message before the request is refused (to be sent again).
const CLUSTER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Between two tries of the cluster-wide lock of a group.
const CLUSTER_LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(5);

/// A conversation's group, locked on this node and, in cluster mode, across the cluster (see
/// [`lock_group`]); the cluster-wide lock is given back after everything this node queued
/// on its store while holding it.
pub struct GroupGuard {
    g: tokio::sync::OwnedMutexGuard<ConvGroup>,
    _cluster: Option<ClusterHold>,
}

impl std::ops::Deref for GroupGuard {
    type Target = ConvGroup;
    fn deref(&self) -> &ConvGroup {
        &self.g
    }
}

impl std::ops::DerefMut for GroupGuard {
    fn deref_mut(&mut self) -> &mut ConvGroup {
        &mut self.g
    }
}

/// A group's cluster-wide lock (`Groups::e2ee_try_lock`), held by this node. Dropped, it
/// queues the unlock on the store thread, behind this node's operations queued before it
/// (a message checked under the lock is stored before another node may order a commit).
struct ClusterHold {
    store: crate::store::Store<SendCtx>,
    conv: String,
}

impl Drop for ClusterHold {
    fn drop(&mut self) {
        let conv = std::mem::take(&mut self.conv);
        self.store.call_detached(move |db| {
            if let Err(e) = db.e2ee_unlock(&conv) {
                tracing::warn!(error = %e, conv = %conv, "giving back a group's cluster lock");
            }
        });
    }
}

/// Whether other nodes may order this node's groups' commits too (cluster mode with a bus).
fn clustered(shared: &Shared) -> bool {
    shared.bus.is_some()
}

/// The group of conversation `key`: this node's, or (cluster mode) the one another node
/// created, read from the store.
async fn group_handle(shared: &Shared, key: &str) -> Result<Option<GroupHandle>, ErrorBody> {
    if let Some(h) = shared.e2ee.get(key) {
        return Ok(Some(h));
    }
    if !clustered(shared) {
        return Ok(None);
    }
    let k = key.to_string();
    let row = shared
        .store
        .call(move |db| db.e2ee_group(&k))
        .await
        .map_err(store_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let g = ConvGroup::from_row(row).map_err(internal)?;
    Ok(Some(shared.e2ee.get_or_insert(g)))
}

/// Takes the cluster-wide lock of `conv` (waiting a bounded time for another node) and reads
/// what the store has past `applied`. Runs as a task of its own, so a request given up while
/// it waits still gives the lock back (the hold is dropped with the task's result).
async fn cluster_lock(
    shared: &Shared,
    conv: String,
    applied: u64,
) -> Result<(ClusterHold, Newer), ErrorBody> {
    let store = shared.store.clone();
    let task = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + CLUSTER_LOCK_WAIT;
        loop {
            let c = conv.clone();
            let got = store
                .call(move |db| {
                    if !db.e2ee_try_lock(&c)? {
                        return Ok(None);
                    }
                    match Newer::read(db, &c, applied) {
                        Ok(n) => Ok(Some(n)),
                        Err(e) => {
                            let _ = db.e2ee_unlock(&c);
                            Err(e)
                        }
                    }
                })
                .await;
            match got {
                Ok(Some(newer)) => {
                    let hold = ClusterHold {
                        store: store.clone(),
                        conv,
                    };
                    return Ok((hold, newer));
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(CLUSTER_LOCK_RETRY).await;
                }
                Ok(None) => {
                    return Err(ErrorBody::new(
                        ErrorCode::StaleEpoch,
                        "another node is ordering this conversation's end-to-end changes; \
                         process the log and try again",
                    ));
                }
                Err(e) => return Err(store_error(e)),
            }
        }
    });
    task.await
        .map_err(|e| internal(format!("the cluster lock's task: {e}")))?
}

/// Locks a group on this node and, in cluster mode, across the cluster, bringing it up to
/// what other nodes ordered (their commits are in the store's log).
async fn lock_group(shared: &Shared, handle: GroupHandle) -> Result<GroupGuard, ErrorBody> {
    let mut g = handle.lock_owned().await;
    if !clustered(shared) {
        return Ok(GroupGuard { g, _cluster: None });
    }
    let (hold, newer) = cluster_lock(shared, g.conv.clone(), g.applied_seq).await?;
    if g.catch_up(newer).map_err(internal)? {
        tracing::debug!(conv = %g.conv, seq = g.applied_seq, "end-to-end group brought up to another node's commits");
    }
    Ok(GroupGuard {
        g,
        _cluster: Some(hold),
    })
}

fn refused(e: E2eeError) -> ErrorBody {
    match e {
        E2eeError::WrongEpoch => ErrorBody::new(
            ErrorCode::StaleEpoch,
            "another commit came first (the group moved to a newer epoch): process the conversation and try again",
        ),
        E2eeError::Malformed(m) => ErrorBody::new(
            ErrorCode::BadRequest,
            format!("not a valid MLS message: {m}"),
        ),
        E2eeError::Refused(m) => ErrorBody::new(ErrorCode::Forbidden, m),
        other => ErrorBody::new(ErrorCode::BadRequest, other.to_string()),
    }
}

fn internal(e: impl std::fmt::Display) -> ErrorBody {
    tracing::error!(error = %e, "end-to-end state");
    ErrorBody::new(ErrorCode::Internal, "internal error; try again")
}

/// Answered inside (the reply goes ahead of the Welcomes that waited for the device).
pub async fn publish(
    conn: &mut Conn,
    user: &str,
    id: u64,
    device: String,
    key_packages: Vec<Bytes>,
) -> Result<(), ErrorBody> {
    if key_packages.len() > MAX_KEY_PACKAGES_PER_REQUEST {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_KEY_PACKAGES_PER_REQUEST} key packages at a time"),
        ));
    }
    if device.is_empty() || device.len() > 64 || !device.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "a device id is 1 to 64 hex digits",
        ));
    }
    let mut sig_key: Option<Vec<u8>> = None;
    let mut kps = Vec::with_capacity(key_packages.len());
    for kp in key_packages {
        let (d, key) = check_key_package(&kp, user).map_err(refused)?;
        if d != device || sig_key.as_ref().is_some_and(|k| *k != key) {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "every key package must be this device's",
            ));
        }
        sig_key = Some(key);
        kps.push(kp.into_vec());
    }
    let (u, d, d2) = (user.to_string(), device.clone(), device.clone());
    let (known, revoked) = conn
        .shared
        .store
        .call(move |db| Ok((db.e2ee_devices(&u)?, db.devices_revoked(&[(u, d2)])?)))
        .await
        .map_err(store_error)?;
    if !revoked.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            "this device was removed from the account by another of its devices; it cannot sign in again. To use this computer, start with a new state directory: it becomes a new device that your other devices approve",
        ));
    }
    if known.len() >= MAX_DEVICES_PER_ACCOUNT && !known.iter().any(|(id, _)| *id == d) {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "this account has {MAX_DEVICES_PER_ACCOUNT} end-to-end devices already (the most it may have); use one of their state directories"
            ),
        ));
    }
    let sig_key = match (sig_key, known.iter().find(|(id, _)| *id == d)) {
        (Some(k), _) => k,
        (None, Some((_, k))) => k.clone(),
        (None, None) => {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "a new device must publish at least one key package",
            ));
        }
    };
    let (u, d) = (user.to_string(), device.clone());
    let count = match conn
        .shared
        .store
        .call(move |db| db.e2ee_publish(&u, &d, &sig_key, &kps, now_ms()))
        .await
    {
        Ok(n) => n,
        Err(crate::store::StoreError::Exists) => {
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                "this device id is registered with another key; a new device needs a new state directory",
            ));
        }
        Err(e) => return Err(store_error(e)),
    };
    conn.device = Some(device.clone());
    conn.shared.registry.set_device(conn.sid, &device);
    let (u, d) = (user.to_string(), device.clone());
    let welcomes = conn
        .shared
        .store
        .call(move |db| db.e2ee_welcomes(&u, &d))
        .await
        .map_err(store_error)?;
    let reply = Reply::E2eeReady {
        server_key: Bytes::from(conn.shared.e2ee.signer.public().to_vec()),
        key_packages: count,
    };
    // The reply first, then what waited for this device.
    conn.reply(id, Ok(reply));
    for w in welcomes {
        conn.outbox.send(&ServerFrame::Event(Event::E2eeWelcome {
            id: w.id,
            device: device.clone(),
            conv: crate::store::conv_from_key(&w.conv),
            seq: w.seq,
            welcome: Bytes::from(w.welcome),
        }));
    }
    Ok(())
}

pub async fn claim(conn: &Conn, users: Vec<String>) -> Result<Reply, ErrorBody> {
    if users.len() > MAX_CLAIM_USERS {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_CLAIM_USERS} users at a time"),
        ));
    }
    let got = conn
        .shared
        .store
        .call(move |db| db.e2ee_claim(&users))
        .await
        .map_err(store_error)?;
    Ok(Reply::E2eeKeyPackages(
        got.into_iter()
            .map(|(user, device, kp)| ClaimedKeyPackage {
                user,
                device,
                key_package: Bytes::from(kp),
            })
            .collect(),
    ))
}

pub async fn devices(conn: &Conn, user: String) -> Result<Reply, ErrorBody> {
    let u = user.clone();
    let devs = conn
        .shared
        .store
        .call(move |db| db.e2ee_devices(&u))
        .await
        .map_err(store_error)?;
    Ok(Reply::E2eeDevices(
        devs.into_iter()
            .map(|(device, key)| DeviceInfo {
                user: user.clone(),
                device,
                signature_key: Bytes::from(key),
            })
            .collect(),
    ))
}

pub async fn create(
    conn: &Conn,
    user: &str,
    conv: ConvRef,
    group_info: Bytes,
) -> Result<Reply, ErrorBody> {
    let conv = conn.shared.hub.lock().check_history(user, &conv)?;
    if let Conv::Room(room) = &conv {
        let hub = conn.shared.hub.lock();
        let owner = hub
            .room(room)
            .is_some_and(|r| r.owner.as_deref() == Some(user));
        if !owner && !hub.is_admin(user) {
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                "only the room's owner (or an admin) makes it end-to-end encrypted",
            ));
        }
    }
    let key = conv_key(&conv);
    let exists = || {
        ErrorBody::new(
            ErrorCode::RoomExists,
            "this conversation is end-to-end encrypted already; join its group instead",
        )
    };
    if conn.shared.e2ee.is_e2ee(&key) {
        return Err(exists());
    }
    // In cluster mode another node may have made it: under the group's cluster lock, the
    // store says.
    let hold = if clustered(&conn.shared) {
        let (hold, newer) = cluster_lock(&conn.shared, key.clone(), 0).await?;
        if !newer.is_empty() || group_handle(&conn.shared, &key).await?.is_some() {
            return Err(exists());
        }
        Some(hold)
    } else {
        None
    };
    let state =
        GroupState::create(&group_info, user, conn.shared.e2ee.signer.public()).map_err(refused)?;
    let g = ConvGroup {
        conv: key.clone(),
        state,
        applied_seq: 0,
        epoch: 0,
        group_info: group_info.into_vec(),
        membership_epoch: 0,
        pending: Default::default(),
    };
    let row = g.row().map_err(internal)?;
    if !conn.shared.e2ee.insert(g) {
        return Err(ErrorBody::new(
            ErrorCode::RoomExists,
            "this conversation is end-to-end encrypted already; join its group instead",
        ));
    }
    conn.shared
        .store
        .call(move |db| db.e2ee_put_group(&row))
        .await
        .map_err(store_error)?;
    drop(hold);
    conn.shared
        .publish(ClusterEvent::E2eeGroup { conv: key.clone() });
    tracing::info!(conv = %key, "end-to-end group created");
    Ok(Reply::Ok)
}

pub async fn group_info(conn: &Conn, user: &str, conv: ConvRef) -> Result<Reply, ErrorBody> {
    let conv = conn.shared.hub.lock().check_history(user, &conv)?;
    let Some(g) = group_handle(&conn.shared, &conv_key(&conv)).await? else {
        return Ok(Reply::E2eeGroupInfo(None));
    };
    let g = lock_group(&conn.shared, g).await?;
    Ok(Reply::E2eeGroupInfo(Some(GroupInfoData {
        group_info: Bytes::from(g.group_info.clone()),
        epoch: g.epoch,
        seq: g.applied_seq,
    })))
}

/// Whether `user` may be in `conv`'s group: a member of the room (or let in by an invitation
/// or an open room), a participant of the direct conversation.
fn may_be_added(shared: &Shared, conv: &Conv, user: &str) -> bool {
    match conv {
        Conv::Direct(users) => users.iter().any(|u| u == user),
        Conv::Room(room) => {
            let hub = shared.hub.lock();
            let Some(r) = hub.room(room) else {
                return false;
            };
            if hub.room_banned(room, user, now_ms()).is_some() {
                return false;
            }
            r.members.contains(user)
                || r.invited.contains(user)
                || (!r.private && r.pw_hash.is_none())
        }
    }
}

pub async fn commit(
    conn: &Conn,
    user: &str,
    id: u64,
    conv: ConvRef,
    commit: Bytes,
    group_info: Bytes,
    welcome: Option<Bytes>,
) -> Result<(), ErrorBody> {
    let conv = conn.shared.hub.lock().check_history(user, &conv)?;
    let key = conv_key(&conv);
    let Some(handle) = group_handle(&conn.shared, &key).await? else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            "this conversation is not end-to-end encrypted",
        ));
    };
    let max = conn.shared.config().limits.max_message_bytes.max(1 << 20) * 4;
    if commit.len() + group_info.len() + welcome.as_ref().map_or(0, |w| w.len()) > max {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            "the commit is too large",
        ));
    }
    let mut g = lock_group(&conn.shared, handle).await?;
    let validated = g.state.validate_commit(&commit, user).map_err(refused)?;
    let change = validated.change.clone();
    for (u, _) in &change.added {
        if !may_be_added(&conn.shared, &conv, u) {
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                format!(
                    "{u} may not be in this conversation (not invited, banned, or the room needs its password)"
                ),
            ));
        }
    }
    let next = validated.into_state();
    next.check_group_info(&group_info, change.epoch)
        .map_err(refused)?;
    // A device removed from its account neither commits nor comes back in.
    let concerned: Vec<(String, String)> = std::iter::once(change.committer.clone())
        .chain(change.added.iter().cloned())
        .collect();
    let revoked = conn
        .shared
        .store
        .call(move |db| db.devices_revoked(&concerned))
        .await
        .map_err(store_error)?;
    if let Some((u, d)) = revoked.first() {
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("device {d} of {u} was removed from its account and cannot be in a group"),
        ));
    }
    if !change.external && !change.added.is_empty() && welcome.is_none() {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "a commit that adds devices needs their Welcome",
        ));
    }
    let stored = append(
        &conn.shared,
        conv.clone(),
        user,
        Body {
            content_type: CT_COMMIT.into(),
            data: commit.into_vec(),
        },
        Some((conn, id)),
    )
    .await
    .ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::Internal,
            "the commit could not be stored; try again",
        )
    })?;
    // The commit is durable and ordered: the group moves on.
    g.state = next;
    g.applied_seq = stored.seq;
    g.epoch = change.epoch;
    g.group_info = group_info.into_vec();
    if !change.removed.is_empty() || !change.added.is_empty() {
        // From here on only this epoch's keys (and later ones) are taken: a device added here
        // can read every message stored after this commit, a device removed here none.
        g.membership_epoch = change.epoch;
    }
    let leaves = g.state.members().unwrap_or_default();
    let members: Vec<String> = leaves.iter().map(|l| l.user.clone()).collect();
    // A removal the server wants is done once a commit removed the user's devices, and off
    // once one added the user back (an invitation accepted, a rejoin by external commit:
    // both checked above); otherwise it is proposed again at the new epoch.
    let touched: std::collections::BTreeSet<&str> = change
        .added
        .iter()
        .chain(change.removed.iter())
        .map(|(u, _)| u.as_str())
        .collect();
    // A device's removal (`user/device`) is done once its leaves are gone.
    g.pending.retain(|u| match u.split_once('/') {
        Some((user, device)) => leaves.iter().any(|l| l.user == user && l.device == device),
        None => members.contains(u) && !touched.contains(u.as_str()),
    });
    let still_pending: Vec<String> = g.pending.iter().cloned().collect();
    for u in still_pending {
        propose_removal(&conn.shared, &mut g, &conv, &u).await;
    }
    save(&conn.shared, &g).await;
    drop(g);
    // Added accounts become members of the room; their devices get the Welcome. Everyone
    // hears of the new member only after the Welcomes went out, so the added user's own
    // connections have the Welcome before the `join` (a device that heard of its account's
    // join first would join by itself instead, after the messages that follow the Welcome).
    let mut joined: Vec<String> = Vec::new();
    if let Conv::Room(room) = &conv {
        let mut added: Vec<String> = change.added.iter().map(|(u, _)| u.clone()).collect();
        added.sort();
        added.dedup();
        for u in added {
            let new = conn
                .shared
                .hub
                .lock()
                .room(room)
                .is_some_and(|r| !r.members.contains(&u));
            if new {
                let (r, uu) = (room.clone(), u.clone());
                if let Err(e) = conn
                    .shared
                    .store
                    .call(move |db| db.add_member(&r, &uu))
                    .await
                {
                    tracing::error!(error = %e, "adding a member after their commit");
                    continue;
                }
                conn.shared.hub.lock().add_member(room, &u);
                // The other nodes read the room's members again.
                crate::cluster_events::room_changed(&conn.shared, room, None, Vec::new());
                joined.push(u);
            }
        }
    }
    if let Some(w) = welcome
        && !change.external
    {
        let (k, devices, seq, bytes) =
            (key.clone(), change.added.clone(), stored.seq, w.into_vec());
        let stored_welcomes = conn
            .shared
            .store
            .call(move |db| {
                db.e2ee_add_welcomes(&devices, &k, seq, &bytes)
                    .map(|ids| (ids, bytes))
            })
            .await;
        match stored_welcomes {
            Ok((ids, bytes)) => {
                // The added users' connections on other nodes read theirs from the store.
                conn.shared.publish(ClusterEvent::Welcomes {
                    welcomes: ids.clone(),
                });
                let hub = conn.shared.hub.lock();
                for (u, device, wid) in ids {
                    broadcast(
                        hub.sessions_of(std::iter::once(u.as_str()), None),
                        Event::E2eeWelcome {
                            id: wid,
                            device,
                            conv: conv.clone(),
                            seq: stored.seq,
                            welcome: Bytes::from(bytes.clone()),
                        },
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "storing Welcomes"),
        }
    }
    if let Conv::Room(room) = &conv {
        let hub = conn.shared.hub.lock();
        for u in joined {
            broadcast(
                hub.recipients(&conv, &[], None),
                Event::Join {
                    room: room.clone(),
                    user: u,
                },
            );
        }
    }
    tracing::info!(conv = %key, epoch = change.epoch, added = change.added.len(), removed = change.removed.len(), "commit accepted");
    Ok(())
}

/// Stores a message in a conversation's log through the usual path (so it is fanned out in
/// order with everything else) and waits until it is durable. With `reply`, that request is
/// answered with [`Reply::Sent`].
async fn append(
    shared: &Shared,
    conv: Conv,
    from: &str,
    body: Body,
    reply: Option<(&Conn, u64)>,
) -> Option<Message> {
    let (tx, rx) = oneshot::channel();
    let (origin, outbox, req_id) = match reply {
        Some((c, id)) => (c.sid, c.outbox.clone(), id),
        None => {
            let (o, _) = crate::outbox::Outbox::new(1, &shared.shutdown);
            (0, o, 0)
        }
    };
    let job = AppendJob {
        msg: NewMessage {
            conv,
            from: from.to_string(),
            body,
            except: Vec::new(),
            idempotency_key: None,
            refs: None,
        },
        ctx: SendCtx {
            origin,
            outbox,
            req_id,
            permit: None,
            notify: Some(tx),
            silent: reply.is_none(),
        },
    };
    shared.store.append(job).await.ok()?;
    rx.await.ok().flatten()
}

/// Appends the server's Remove proposals at the group's epoch for `user`'s devices, or (for a
/// pending entry `user/device`) for that one device's leaves.
async fn propose_removal(shared: &Shared, g: &mut ConvGroup, conv: &Conv, user: &str) {
    let made = match user.split_once('/') {
        Some((u, d)) => g.state.remove_device_proposals(&shared.e2ee.signer, u, d),
        None => g.state.remove_proposals(&shared.e2ee.signer, user),
    };
    let proposals = match made {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "removal proposal");
            return;
        }
    };
    if proposals.is_empty() {
        g.pending.remove(user);
        return;
    }
    g.pending.insert(user.to_string());
    for p in proposals {
        let body = Body {
            content_type: CT_PROPOSAL.into(),
            data: p,
        };
        if append(shared, conv.clone(), "", body, None).await.is_none() {
            tracing::error!("a removal proposal could not be stored");
        }
    }
}

/// `user` is no longer in `conv` (kicked, banned, voted out or left): from now on the group
/// refuses application messages until a member commits the server's removal.
pub async fn remove_user(shared: &Shared, conv: &Conv, user: &str) {
    let key = conv_key(conv);
    let handle = match group_handle(shared, &key).await {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e.message, "a removal's group");
            return;
        }
    };
    let mut g = match lock_group(shared, handle).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e.message, "a removal's group lock");
            return;
        }
    };
    propose_removal(shared, &mut g, conv, user).await;
    save(shared, &g).await;
}

/// `user`'s `device` was removed from the account: in every group where it has a leaf, the
/// server proposes removing that leaf, and the group refuses application messages until a
/// member (any other device, of this account or another) commits it, as for a kick. Returns
/// in how many conversations.
pub async fn remove_device(shared: &Shared, user: &str, device: &str) -> usize {
    let entry = format!("{user}/{device}");
    let mut n = 0;
    if clustered(shared) {
        // Groups made on other nodes and not met here yet have leaves to remove too.
        crate::cluster_events::read_groups_made_elsewhere(shared).await;
    }
    for handle in shared.e2ee.handles() {
        let mut g = match lock_group(shared, handle).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e.message, "a device removal's group lock");
                continue;
            }
        };
        let there = g
            .state
            .members()
            .unwrap_or_default()
            .iter()
            .any(|l| l.user == user && l.device == device);
        if !there {
            continue;
        }
        let conv = crate::store::conv_from_key(&g.conv);
        propose_removal(shared, &mut g, &conv, &entry).await;
        save(shared, &g).await;
        n += 1;
    }
    n
}

/// Saves a group's state (a crash before this is repaired at start from the log).
async fn save(shared: &Shared, g: &ConvGroup) {
    match g.row() {
        Ok(row) => {
            if let Err(e) = shared.store.call(move |db| db.e2ee_put_group(&row)).await {
                tracing::error!(error = %e, "saving an end-to-end group");
            }
        }
        Err(e) => tracing::error!(error = %e, "saving an end-to-end group"),
    }
}

/// Checks a message for an end-to-end encrypted conversation: an MLS application message of
/// its group, at an epoch no older than the last membership change and not ahead of the
/// group, with no removal pending. Conversations that are not end-to-end encrypted refuse MLS
/// content types.
///
/// For an end-to-end conversation the group's lock comes back with the answer: the caller
/// holds it until the message is queued for the store, so no commit can be ordered between
/// this check and the message (a message checked against epoch N and stored after a commit
/// that added a device at N+1 would be unreadable to that device).
pub async fn check_send(
    shared: &Shared,
    conv: &Conv,
    body: &Body,
) -> Result<Option<GroupGuard>, ErrorBody> {
    let key = conv_key(conv);
    let handle = if body.content_type.starts_with("application/mls-") {
        // Only an end-to-end message needs to know of a group another node made.
        group_handle(shared, &key).await?
    } else {
        shared.e2ee.get(&key)
    };
    let Some(handle) = handle else {
        if body.content_type.starts_with("application/mls-") {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "this conversation is not end-to-end encrypted; send plain bodies",
            ));
        }
        return Ok(None);
    };
    if body.content_type != CT_APP {
        return Err(ErrorBody::new(
            ErrorCode::E2eeRequired,
            "this conversation is end-to-end encrypted: the server does not take readable messages here",
        ));
    }
    let g = lock_group(shared, handle).await?;
    if !g.pending.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::StaleEpoch,
            "a removal is pending in this conversation: a member's client commits it, then send again",
        ));
    }
    g.state
        .check_app(&body.data, g.membership_epoch, g.epoch)
        .map_err(refused)?;
    Ok(Some(g))
}

/// The end-to-end encrypted conversations `user` belongs to.
pub fn convs(conn: &Conn, user: &str) -> Reply {
    let e2ee = &conn.shared.e2ee;
    let mut out: Vec<Conv> = conn
        .shared
        .hub
        .lock()
        .rooms_of(user)
        .into_iter()
        .filter(|r| e2ee.is_e2ee(&conv_key(&Conv::Room(r.clone()))))
        .map(Conv::Room)
        .collect();
    out.extend(
        e2ee.directs_of(user)
            .iter()
            .map(|k| crate::store::conv_from_key(k)),
    );
    Reply::E2eeConvs(out)
}

/// `user` is a member of `conv` again (joined after leaving, or let back in before anyone
/// committed their removal): the removal the server proposed is no longer wanted, so messages
/// are taken again. A member may still commit those proposals (their old devices leave, and
/// rejoin by external commit), or the rejoining device's own external commit replaces its old
/// leaf first and the proposals go stale with that epoch.
pub async fn rejoined(shared: &Shared, conv: &Conv, user: &str) {
    let Ok(Some(handle)) = group_handle(shared, &conv_key(conv)).await else {
        return;
    };
    let Ok(mut g) = lock_group(shared, handle).await else {
        return;
    };
    if g.pending.remove(user) {
        save(shared, &g).await;
    }
}
