//! History for a new device and the recovery-key backup (issue 21): a new device asks for
//! history, the account's other devices are told and one of them approves or rejects it, the
//! approving device stores sealed chunks for it, and the new device takes them; a backup is
//! segments appended under an id derived from a recovery key the server never sees. The server
//! only stores and routes ciphertext, within the limits of `[devices]`.

use conclave_proto::{Bytes, DisconnectReason, ErrorBody, ErrorCode, Event, Reply};

use super::store_error;
use crate::conn::{Conn, broadcast};
use crate::store::{PutOutcome, now_ms};

/// Most chunks or segments in one fetch reply.
pub const MAX_FETCH_ITEMS: usize = 16;
/// Most bytes of chunks or segments in one fetch reply (past the first): well inside the
/// client's frame limit.
pub const MAX_FETCH_BYTES: usize = 2 * 1024 * 1024;
/// Largest chunk or segment accepted.
pub const MAX_PIECE_BYTES: usize = 1024 * 1024;
/// Longest transfer or backup id.
const MAX_ID_LEN: usize = 64;

fn device_of(conn: &Conn) -> Result<String, ErrorBody> {
    conn.device.clone().ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::NotReady,
            "publish this connection's device first (E2eePublish), then try again",
        )
    })
}

fn check_id(what: &str, id: &str) -> Result<(), ErrorBody> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("a {what} is 1 to {MAX_ID_LEN} letters, digits or dashes"),
        ));
    }
    Ok(())
}

fn check_piece(data: &Bytes) -> Result<(), ErrorBody> {
    if data.len() > MAX_PIECE_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!("a chunk or segment is at most {MAX_PIECE_BYTES} bytes; send smaller ones"),
        ));
    }
    Ok(())
}

/// Tells the account's other connections about a device's request.
fn tell_others(conn: &Conn, user: &str, w: conclave_proto::WaitingDevice) {
    let event = Event::DeviceWaiting(w);
    let hub = conn.shared.hub.lock();
    broadcast(
        hub.sessions_of(std::iter::once(user), Some(conn.sid)),
        event.clone(),
    );
    drop(hub);
    // And its connections on the other nodes of a cluster.
    crate::cluster_events::notify_users(&conn.shared, &[user.to_string()], &event);
}

pub async fn announce(
    conn: &Conn,
    user: &str,
    transfer_key: Bytes,
    signature: Bytes,
) -> Result<Reply, ErrorBody> {
    let device = device_of(conn)?;
    if transfer_key.len() > 256 || signature.len() > 256 {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            "a transfer key and its signature are at most 256 bytes each",
        ));
    }
    let (u, d, addr) = (user.to_string(), device.clone(), conn.peer.ip().to_string());
    let (waiting, all) = conn
        .shared
        .store
        .call(move |db| {
            let w = if transfer_key.is_empty() {
                None
            } else {
                db.device_announce(&u, &d, &transfer_key, &signature, now_ms(), &addr)?
            };
            Ok((w, db.device_requests(&u)?))
        })
        .await
        .map_err(store_error)?;
    if let Some(w) = waiting {
        tell_others(conn, user, w);
    }
    Ok(Reply::DevicesWaiting(
        all.into_iter()
            .filter(|w| w.device != device && w.state == "waiting")
            .collect(),
    ))
}

pub async fn decide(
    conn: &Conn,
    user: &str,
    device: String,
    approve: bool,
) -> Result<Reply, ErrorBody> {
    if conn.device.as_deref() == Some(device.as_str()) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "a device cannot approve or reject itself; do it from another device of yours",
        ));
    }
    if !approve {
        return remove(conn, user, device).await;
    }
    let u = user.to_string();
    let d = device.clone();
    let got = conn
        .shared
        .store
        .call(move |db| db.device_decide(&u, &d, approve))
        .await
        .map_err(store_error)?;
    let Some(w) = got else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!(
                "no device {device} of yours asked for history; the devices that did are in the device_waiting events"
            ),
        ));
    };
    tell_others(conn, user, w.clone());
    Ok(Reply::DevicesWaiting(vec![w]))
}

/// Rejects or removes a device of the account, for good: the server forgets its registration
/// and key packages and refuses it from then on (`E2eePublish`, commits that have it commit or
/// come back), closes its connections, and proposes removing its leaves from every group it is
/// in (a member commits that, as for a kick; until then those groups take no messages). What
/// the device had read stays on it; nothing sent after the removal commit is readable there.
async fn remove(conn: &Conn, user: &str, device: String) -> Result<Reply, ErrorBody> {
    let (u, d) = (user.to_string(), device.clone());
    let got = conn
        .shared
        .store
        .call(move |db| db.device_revoke(&u, &d, now_ms()))
        .await
        .map_err(store_error)?;
    let Some(w) = got else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!(
                "your account has no device {device}; {{\"cmd\":\"devices\"}} lists the devices in your conversations"
            ),
        ));
    };
    let closed = conn.shared.registry.close_device(
        user,
        &device,
        DisconnectReason::Kicked,
        "this device was removed from your account by another of your devices; it cannot sign in again (start with a new state directory to use this computer as a new device)",
    );
    let groups = super::e2ee::remove_device(&conn.shared, user, &device).await;
    tracing::info!(user, device = %device, connections = closed, groups, "device removed from its account");
    tell_others(conn, user, w.clone());
    Ok(Reply::DevicesWaiting(vec![w]))
}

pub async fn put(
    conn: &Conn,
    user: &str,
    device: String,
    transfer: String,
    index: u32,
    data: Bytes,
) -> Result<Reply, ErrorBody> {
    let from = device_of(conn)?;
    check_id("transfer id", &transfer)?;
    check_piece(&data)?;
    let limit = conn.shared.config().devices.transfer_bytes_per_device;
    let (u, d) = (user.to_string(), device.clone());
    let outcome = conn
        .shared
        .store
        .call(move |db| db.transfer_put(&u, &d, &from, &transfer, index, &data, limit))
        .await
        .map_err(store_error)?;
    match outcome {
        PutOutcome::Stored => {
            let event = Event::TransferReady { device };
            let hub = conn.shared.hub.lock();
            broadcast(
                hub.sessions_of(std::iter::once(user), Some(conn.sid)),
                event.clone(),
            );
            drop(hub);
            crate::cluster_events::notify_users(&conn.shared, &[user.to_string()], &event);
            Ok(Reply::Ok)
        }
        PutOutcome::NotApproved => Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("device {device} is not approved (or was rejected); approve it first"),
        )),
        PutOutcome::Full => Err(ErrorBody::new(
            ErrorCode::QuotaExceeded,
            format!(
                "{limit} bytes of history already wait for device {device}; try again once it has taken them (devices.transfer_bytes_per_device)"
            ),
        )),
    }
}

pub async fn fetch(conn: &Conn, user: &str, after: u64) -> Result<Reply, ErrorBody> {
    let device = device_of(conn)?;
    let u = user.to_string();
    let chunks = conn
        .shared
        .store
        .call(move |db| db.transfer_fetch(&u, &device, after, MAX_FETCH_ITEMS, MAX_FETCH_BYTES))
        .await
        .map_err(store_error)?;
    Ok(Reply::TransferChunks(chunks))
}

pub async fn ack(conn: &Conn, user: &str, through: u64) -> Result<Reply, ErrorBody> {
    let device = device_of(conn)?;
    let u = user.to_string();
    conn.shared
        .store
        .call(move |db| db.transfer_ack(&u, &device, through))
        .await
        .map_err(store_error)?;
    Ok(Reply::Ok)
}

pub async fn backup_put(
    conn: &Conn,
    user: &str,
    key_id: String,
    index: u64,
    data: Bytes,
) -> Result<Reply, ErrorBody> {
    check_id("backup id", &key_id)?;
    check_piece(&data)?;
    let limit = conn.shared.config().devices.backup_bytes_per_account;
    let u = user.to_string();
    let outcome = conn
        .shared
        .store
        .call(move |db| db.backup_put(&u, &key_id, index, &data, limit))
        .await
        .map_err(store_error)?;
    match outcome {
        PutOutcome::Stored => Ok(Reply::Ok),
        _ => Err(ErrorBody::new(
            ErrorCode::QuotaExceeded,
            format!(
                "this account's backup has reached its limit of {limit} bytes (devices.backup_bytes_per_account); turn it off and on again to start a new one"
            ),
        )),
    }
}

pub async fn backup_fetch(
    conn: &Conn,
    user: &str,
    key_id: String,
    after: Option<u64>,
) -> Result<Reply, ErrorBody> {
    check_id("backup id", &key_id)?;
    let u = user.to_string();
    let got = conn
        .shared
        .store
        .call(move |db| db.backup_fetch(&u, &key_id, after, MAX_FETCH_ITEMS, MAX_FETCH_BYTES))
        .await
        .map_err(store_error)?;
    Ok(Reply::BackupChunks(got))
}

pub async fn backup_drop(
    conn: &Conn,
    user: &str,
    keep: Option<String>,
) -> Result<Reply, ErrorBody> {
    if let Some(k) = &keep {
        check_id("backup id", k)?;
    }
    let u = user.to_string();
    conn.shared
        .store
        .call(move |db| db.backup_drop(&u, keep.as_deref()))
        .await
        .map_err(store_error)?;
    Ok(Reply::Ok)
}
