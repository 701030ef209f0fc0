//! File transfer: offers, uploads, downloads, and the recipients' answers (see
//! `conclave_proto::files` for the exchange, and `crate::files` for how bytes are stored).

use std::sync::Arc;

use conclave_proto::files::{MAX_P2P_ADDRS, check_file_name};
use conclave_proto::{
    Chunk, Conv, ErrorBody, ErrorCode, Event, FileOffer, P2pGrant, P2pInvite, P2pOffer, Reply,
    Target,
};

use super::store_error;
use crate::bus::ClusterEvent;
use crate::cluster_events;
use crate::conn::{Conn, broadcast};
use crate::files::{FileError, FileStore, Progress, chunk_size_for, parse_id};
use crate::store::{FileRow, RecipientState, now_ms};

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

fn no_such_file() -> ErrorBody {
    err(
        ErrorCode::NotFound,
        "no such file for you: check the file id in the offer (or it expired and was deleted; ask the sender to send it again)",
    )
}

fn internal() -> ErrorBody {
    err(
        ErrorCode::Internal,
        "the server could not complete this because of a storage error; try again",
    )
}

/// "1.5 GiB": a size for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Runs blocking file-store work off the async threads.
async fn blocking<R: Send + 'static>(
    files: &Arc<FileStore>,
    f: impl FnOnce(&FileStore) -> R + Send + 'static,
) -> Result<R, ErrorBody> {
    let files = files.clone();
    tokio::task::spawn_blocking(move || f(&files))
        .await
        .map_err(|_| internal())
}

fn file_error(e: FileError) -> ErrorBody {
    match e {
        FileError::WrongOffset { expected } => err(
            ErrorCode::BadRequest,
            format!("the server expects the chunk at offset {expected}; continue from there"),
        ),
        FileError::WrongLength { expected } => err(
            ErrorCode::BadRequest,
            format!("this chunk must be {expected} bytes long"),
        ),
        FileError::HashMismatch => err(
            ErrorCode::BadRequest,
            "the uploaded bytes do not match the SHA-256 given in the offer (the file changed while it was sent?); offer it again",
        ),
        FileError::Io(e) if crate::fsutil::is_disk_full(&e) => super::storage_full(),
        FileError::Io(e) => {
            tracing::error!(error = %e, "file store I/O error");
            internal()
        }
        FileError::Corrupt => {
            tracing::error!("a stored file chunk does not decrypt");
            err(
                ErrorCode::Internal,
                "a stored chunk of this file is damaged; ask the sender to send it again",
            )
        }
    }
}

async fn row(conn: &Conn, file_id: &str) -> Result<(String, FileRow), ErrorBody> {
    let id = parse_id(file_id).ok_or_else(no_such_file)?;
    let lookup = id.clone();
    let row = conn
        .shared
        .store
        .call(move |db| db.file(&lookup))
        .await
        .map_err(store_error)?
        .ok_or_else(no_such_file)?;
    Ok((id, row))
}

fn expired(row: &FileRow) -> Result<(), ErrorBody> {
    if row.expires_ms <= now_ms() {
        return Err(err(
            ErrorCode::Expired,
            "this file has expired and was deleted from the server; ask the sender to send it again",
        ));
    }
    Ok(())
}

/// Offers a file: checks the target, limits and quota, records it, and (peer to peer) tells
/// the online recipients at once.
pub async fn offer(
    conn: &Conn,
    user: &str,
    target: Target,
    name: String,
    size: u64,
    sha256: [u8; 32],
    p2p: Option<P2pOffer>,
) -> Result<Reply, ErrorBody> {
    check_file_name(&name).map_err(|why| {
        err(
            ErrorCode::BadRequest,
            format!("{why}; send the file under another name"),
        )
    })?;
    let config = conn.shared.config();
    let limits = &config.files;
    if size > limits.max_file_bytes {
        return Err(err(
            ErrorCode::TooLarge,
            format!(
                "the file is {}; this server accepts files up to {}",
                human_bytes(size),
                human_bytes(limits.max_file_bytes)
            ),
        ));
    }
    if let Some(p) = &p2p
        && (p.addrs.is_empty() || p.addrs.len() > MAX_P2P_ADDRS)
    {
        return Err(err(
            ErrorCode::BadRequest,
            format!("a peer-to-peer offer lists 1 to {MAX_P2P_ADDRS} addresses"),
        ));
    }
    // One look at the hub: the recipients are the members the check saw.
    let (checked, recipients) = {
        let hub = conn.shared.hub.lock();
        let checked = hub.check_send(user, &target, 0)?;
        let recipients: Vec<String> = hub
            .audience(&checked.conv, &checked.except)
            .filter(|u| *u != user)
            .map(str::to_string)
            .collect();
        (checked, recipients)
    };
    if recipients.is_empty() {
        return Err(err(
            ErrorCode::BadRequest,
            "nobody else would receive this file: the room has no other members (or all are excepted)",
        ));
    }
    let now = now_ms();
    let quota = limits.quota_bytes_per_user;
    let sender = user.to_string();
    let used = conn
        .shared
        .store
        .call(move |db| db.file_bytes_of(&sender, now))
        .await
        .map_err(store_error)?;
    if used.saturating_add(size) > quota {
        return Err(err(
            ErrorCode::QuotaExceeded,
            format!(
                "this file ({}) would take your stored files to {} of your {} quota; wait until earlier files expire, or ask an operator to raise files.quota_bytes_per_user",
                human_bytes(size),
                human_bytes(used.saturating_add(size)),
                human_bytes(quota)
            ),
        ));
    }
    let file_id = uuid::Uuid::now_v7().hyphenated().to_string();
    let chunk_size = chunk_size_for(config.limits.max_frame_bytes);
    let mut row = FileRow {
        file_id: file_id.clone(),
        sender: user.to_string(),
        conv: checked.conv,
        except: checked.except,
        name,
        sha256,
        size,
        chunk_size,
        created_ms: now,
        expires_ms: now.saturating_add(limits.expiry_ms()),
        complete: false,
        p2p: p2p.is_some(),
    };
    let id = file_id.clone();
    blocking(&conn.shared.files, move |f| f.create(&id))
        .await?
        .map_err(|e| file_error(e.into()))?;
    if size == 0 {
        if !FileStore::empty_ok(&row) {
            conn.shared.files.delete(&file_id);
            return Err(file_error(FileError::HashMismatch));
        }
        row.complete = true;
    }
    let stored = row.clone();
    let to = recipients.clone();
    if let Err(e) = conn
        .shared
        .store
        .call(move |db| db.create_file(&stored, &to))
        .await
    {
        conn.shared.files.delete(&file_id);
        return Err(store_error(e));
    }
    tracing::info!(user, file_id, size, p2p = row.p2p, "file offered");
    let mut tokens = Vec::new();
    let mut relay_needed = !row.complete;
    if row.complete {
        offer_to(conn, &row, &recipients);
    } else if let Some(p) = p2p {
        let hub = conn.shared.hub.lock();
        relay_needed = false;
        for r in &recipients {
            if !hub.online(r) {
                relay_needed = true;
                continue;
            }
            let mut token = [0u8; conclave_proto::files::P2P_TOKEN_BYTES];
            rand::Rng::fill(&mut rand::rng(), &mut token[..]);
            tokens.push(P2pGrant {
                user: r.clone(),
                token,
            });
            let mut offer = row.offer();
            offer.p2p = Some(P2pInvite {
                addrs: p.addrs.clone(),
                fingerprint: p.fingerprint,
                token,
            });
            let event = Event::FileOffer(Box::new(offer));
            if hub.online_elsewhere(r) {
                // The recipient's connections on the other nodes get the same offer.
                cluster_events::notify_users(&conn.shared, std::slice::from_ref(r), &event);
            }
            broadcast(hub.sessions_of(std::iter::once(r.as_str()), None), event);
        }
    }
    Ok(Reply::FileCreated {
        file_id,
        chunk_size,
        uploaded: if row.complete { size } else { 0 },
        expires_ms: row.expires_ms,
        relay_needed,
        tokens,
    })
}

/// Sends the (relay) offer of a complete file to those of `users` who are online.
fn offer_to(conn: &Conn, row: &FileRow, users: &[String]) {
    let event = Event::FileOffer(Box::new(row.offer()));
    let hub = conn.shared.hub.lock();
    broadcast(
        hub.sessions_of(users.iter().map(String::as_str), None),
        event.clone(),
    );
    drop(hub);
    // And on every other node (those offline everywhere get it at their next login).
    cluster_events::notify_users(&conn.shared, users, &event);
}

/// Tells every user's connections on this node and the others.
fn tell(conn: &Conn, users: &[String], event: Event) {
    let hub = conn.shared.hub.lock();
    broadcast(
        hub.sessions_of(users.iter().map(String::as_str), None),
        event.clone(),
    );
    drop(hub);
    cluster_events::notify_users(&conn.shared, users, &event);
}

/// The other nodes forget what they cached of the file and of `users`' states.
fn file_changed(conn: &Conn, file_id: &str, users: &[String]) {
    for part in users.chunks(crate::bus::MAX_NAMES) {
        conn.shared.publish(ClusterEvent::FileChanged {
            file_id: file_id.to_string(),
            users: part.to_vec(),
        });
    }
    if users.is_empty() {
        conn.shared.publish(ClusterEvent::FileChanged {
            file_id: file_id.to_string(),
            users: Vec::new(),
        });
    }
}

/// The sender: how much the server holds.
pub async fn status(conn: &Conn, user: &str, file_id: String) -> Result<Reply, ErrorBody> {
    let (id, row) = row(conn, &file_id).await?;
    // The sender resumes its upload from it; a recipient waiting for the relay copy watches
    // it grow (and gives up when it stops).
    if row.sender != user {
        let who = user.to_string();
        let recipient = conn
            .shared
            .store
            .call(move |db| db.file_recipient(&id, &who))
            .await
            .map_err(store_error)?;
        if recipient.is_none() {
            return Err(no_such_file());
        }
    }
    expired(&row)?;
    let chunk_size = row.chunk_size;
    let complete = row.complete;
    let uploaded = blocking(&conn.shared.files, move |f| f.uploaded(&row))
        .await?
        .map_err(file_error)?;
    Ok(Reply::FileUploaded {
        uploaded,
        complete,
        chunk_size,
    })
}

/// The sender: one more chunk. On the last one the file is checked, synced, marked complete
/// and offered (or, peer to peer, announced ready to those who asked for the relay).
pub async fn chunk(
    conn: &Conn,
    user: &str,
    file_id: String,
    offset: u64,
    data: Chunk,
) -> Result<Reply, ErrorBody> {
    let (id, row) = cached_row(conn, &file_id).await?;
    if row.sender != user {
        return Err(no_such_file());
    }
    expired(&row)?;
    let chunk_size = row.chunk_size;
    let r = row.clone();
    let progress = blocking(&conn.shared.files, move |f| f.append(&r, offset, &data.0))
        .await?
        .map_err(|e| {
            if matches!(&e, FileError::Io(io) if crate::fsutil::is_disk_full(io)) {
                conn.shared.metrics.storage_full("file chunk");
            }
            file_error(e)
        })?;
    conn.shared.metrics.storage_ok();
    if let Progress {
        complete: true,
        uploaded,
    } = progress
        && !row.complete
    {
        conn.shared.files_cache.forget(&id);
        let waiting = conn
            .shared
            .store
            .call(move |db| db.complete_file(&id))
            .await
            .map_err(store_error)?;
        tracing::info!(user, file_id, size = uploaded, "file upload complete");
        let mut done = row.clone();
        done.complete = true;
        file_changed(conn, &done.file_id, &[]);
        if done.p2p {
            tell(
                conn,
                &waiting,
                Event::FileReady {
                    file_id: done.file_id.clone(),
                },
            );
        } else {
            offer_to(conn, &done, &waiting);
        }
    }
    Ok(Reply::FileUploaded {
        uploaded: progress.uploaded,
        complete: progress.complete,
        chunk_size,
    })
}

/// Checks that `user` may fetch `row`: a recipient who has not declined, still in the room.
fn may_fetch(
    conn: &Conn,
    user: &str,
    row: &FileRow,
    state: Option<RecipientState>,
) -> Result<(), ErrorBody> {
    match state {
        None => return Err(no_such_file()),
        Some(RecipientState::Declined) => {
            return Err(err(
                ErrorCode::Declined,
                "you declined this file; ask the sender to send it again",
            ));
        }
        Some(_) => {}
    }
    if let Conv::Room(room) = &row.conv {
        let hub = conn.shared.hub.lock();
        if !hub.room(room).is_some_and(|r| r.members.contains(user)) {
            return Err(no_such_file());
        }
    }
    expired(row)
}

/// A recipient: one chunk from `offset`.
pub async fn fetch(
    conn: &Conn,
    user: &str,
    file_id: String,
    offset: u64,
) -> Result<Reply, ErrorBody> {
    let (id, row) = cached_row(conn, &file_id).await?;
    let state = cached_recipient(conn, &id, user).await?;
    may_fetch(conn, user, &row, state)?;
    if !row.complete {
        return Err(err(
            ErrorCode::NotReady,
            "the server does not hold this file yet; wait for file_ready (the sender uploads it)",
        ));
    }
    if offset > row.size {
        return Err(err(
            ErrorCode::BadRequest,
            format!(
                "offset {offset} is past the end of the file ({} bytes)",
                row.size
            ),
        ));
    }
    let data = blocking(&conn.shared.files, move |f| f.read(&row, offset))
        .await?
        .map_err(file_error)?;
    Ok(Reply::FileData {
        offset,
        data: Chunk(data),
    })
}

/// A recipient declines (`received` false) or confirms receipt; the sender is told.
pub async fn answer(
    conn: &Conn,
    user: &str,
    file_id: String,
    received: Option<bool>,
) -> Result<Reply, ErrorBody> {
    let (id, row) = row(conn, &file_id).await?;
    let who = user.to_string();
    let lookup = id.clone();
    let state = conn
        .shared
        .store
        .call(move |db| db.file_recipient(&lookup, &who))
        .await
        .map_err(store_error)?;
    if state.is_none() {
        return Err(no_such_file());
    }
    let new = match received {
        Some(_) => RecipientState::Received,
        None => RecipientState::Declined,
    };
    let who = user.to_string();
    let key = id.clone();
    conn.shared
        .store
        .call(move |db| db.set_file_recipient(&key, &who, new))
        .await
        .map_err(store_error)?;
    conn.shared.files_cache.forget_recipient(&id, user);
    file_changed(conn, &id, &[user.to_string()]);
    let event = match received {
        Some(via_p2p) => Event::FileReceived {
            file_id: id,
            by: user.to_string(),
            via_p2p,
        },
        None => Event::FileDeclined {
            file_id: id,
            by: user.to_string(),
        },
    };
    tell(conn, std::slice::from_ref(&row.sender), event);
    Ok(Reply::Ok)
}

/// The sender withdraws a file (`cancel_file`): deleted at once, offered no more; the
/// recipients who have not taken it are told.
pub async fn cancel(conn: &Conn, user: &str, file_id: String) -> Result<Reply, ErrorBody> {
    let (id, row) = row(conn, &file_id).await?;
    if row.sender != user {
        // The same answer as for no file at all: ids of others' files are not confirmed.
        return Err(err(
            ErrorCode::NotFound,
            "you sent no file with this id (only its sender can cancel a file)",
        ));
    }
    let key = id.clone();
    let waiting = conn
        .shared
        .store
        .call(move |db| db.delete_file(&key))
        .await
        .map_err(store_error)?;
    conn.shared.files.delete(&id);
    conn.shared.files_cache.forget(&id);
    for u in &waiting {
        conn.shared.files_cache.forget_recipient(&id, u);
    }
    file_changed(conn, &id, &waiting);
    tell(
        conn,
        &waiting,
        Event::FileCancelled {
            file_id: id,
            by: user.to_string(),
        },
    );
    Ok(Reply::Ok)
}

/// A recipient of a peer-to-peer offer needs the relay copy.
pub async fn want_relay(conn: &Conn, user: &str, file_id: String) -> Result<Reply, ErrorBody> {
    let (id, row) = row(conn, &file_id).await?;
    let who = user.to_string();
    let key = id.clone();
    let state = conn
        .shared
        .store
        .call(move |db| {
            let state = db.file_recipient(&key, &who)?;
            if state.is_some() {
                db.want_relay(&key, &who)?;
            }
            Ok(state)
        })
        .await
        .map_err(store_error)?;
    may_fetch(conn, user, &row, state)?;
    if row.complete {
        return Ok(Reply::FileUploaded {
            uploaded: row.size,
            complete: true,
            chunk_size: row.chunk_size,
        });
    }
    let hub = conn.shared.hub.lock();
    if !hub.online(&row.sender) {
        return Err(err(
            ErrorCode::NotReady,
            format!(
                "{} is offline and the server does not hold this file yet; it comes when they are back online (file_ready)",
                row.sender
            ),
        ));
    }
    drop(hub);
    tell(
        conn,
        std::slice::from_ref(&row.sender),
        Event::FileRelayWanted {
            file_id: id,
            by: user.to_string(),
        },
    );
    Ok(Reply::FileUploaded {
        uploaded: 0,
        complete: false,
        chunk_size: row.chunk_size,
    })
}

/// Pending offers for `user` (the `files` request): up to `files.max_pending_offers`.
pub async fn pending(conn: &Conn, user: &str) -> Result<Vec<FileOffer>, ErrorBody> {
    let limit = conn.shared.config().files.max_pending_offers;
    pending_up_to(conn, user, limit).await
}

/// How many pending offers a login sends: `files.max_pending_offers`, but at most a quarter of
/// the outbound queue. They are queued at once, after a catch-up of up to half the queue; more
/// would drop the client as too slow at every login, for good. The rest are in `files`.
fn offers_at_login(config: &crate::Config) -> u32 {
    let quarter = u32::try_from(config.limits.outbound_queue_frames / 4).unwrap_or(u32::MAX);
    config.files.max_pending_offers.min(quarter.max(1))
}

async fn pending_up_to(conn: &Conn, user: &str, limit: u32) -> Result<Vec<FileOffer>, ErrorBody> {
    let who = user.to_string();
    let now = now_ms();
    let rows = conn
        .shared
        .store
        .call(move |db| db.pending_files(&who, now, limit))
        .await
        .map_err(store_error)?;
    Ok(rows.iter().map(FileRow::offer).collect())
}

/// At login: the files waiting for this account, as events.
pub async fn offer_pending(conn: &Conn, user: &str) {
    let limit = offers_at_login(&conn.shared.config());
    match pending_up_to(conn, user, limit).await {
        Ok(offers) => {
            for o in offers {
                conn.outbox
                    .send(&conclave_proto::ServerFrame::Event(Event::FileOffer(
                        Box::new(o),
                    )));
            }
        }
        Err(e) => tracing::warn!(user, error = %e.message, "cannot list pending files"),
    }
}

/// Deletes expired files (records, then bytes), and bytes on disk with no record.
pub async fn expire(shared: &crate::state::Shared, sweep_strays: bool) {
    let now = now_ms();
    let ids = match shared.store.call(move |db| db.expire_files(now)).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "file expiry failed");
            return;
        }
    };
    for id in &ids {
        shared.files.delete(id);
        shared.files_cache.forget(id);
    }
    if !ids.is_empty() {
        tracing::info!(count = ids.len(), "expired files deleted");
    }
    if sweep_strays {
        let known = match shared.store.call(|db| db.file_ids()).await {
            Ok(k) => k.into_iter().collect::<std::collections::HashSet<_>>(),
            Err(_) => return,
        };
        let files = shared.files.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(on_disk) = files.on_disk() {
                for id in on_disk.iter().filter(|id| !known.contains(*id)) {
                    files.delete(id);
                }
            }
        })
        .await;
    }
}

/// The file's row, from the cache when it is fresh, else from the store (then cached).
async fn cached_row(conn: &Conn, file_id: &str) -> Result<(String, FileRow), ErrorBody> {
    let cache = &conn.shared.files_cache;
    if let Some(id) = parse_id(file_id)
        && let Some(row) = cache.row(&id)
    {
        return Ok((id, row));
    }
    let (id, row) = row(conn, file_id).await?;
    cache.put_row(&id, &row);
    Ok((id, row))
}

/// A recipient's state of a file, from the cache when it is fresh, else from the store.
async fn cached_recipient(
    conn: &Conn,
    file_id: &str,
    user: &str,
) -> Result<Option<RecipientState>, ErrorBody> {
    let cache = &conn.shared.files_cache;
    if let Some(state) = cache.recipient(file_id, user) {
        return Ok(state);
    }
    let (f, u) = (file_id.to_string(), user.to_string());
    let state = conn
        .shared
        .store
        .call(move |db| db.file_recipient(&f, &u))
        .await
        .map_err(store_error)?;
    cache.put_recipient(file_id, user, state);
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::offers_at_login;

    #[test]
    fn a_login_sends_at_most_a_quarter_of_the_outbound_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = crate::Config::load(dir.path(), None).expect("defaults");
        assert_eq!(
            offers_at_login(&c),
            200,
            "the default fits the default queue"
        );
        c.limits.outbound_queue_frames = 64;
        assert_eq!(offers_at_login(&c), 16);
        c.limits.outbound_queue_frames = 2;
        assert_eq!(offers_at_login(&c), 1, "never none");
        c.limits.outbound_queue_frames = 1_000_000;
        c.files.max_pending_offers = 5000;
        assert_eq!(offers_at_login(&c), 5000);
    }
}
