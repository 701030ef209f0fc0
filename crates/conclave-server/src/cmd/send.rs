//! Sending: messages to rooms and users, and admin announcements.

use conclave_proto::{Body, ErrorBody, ErrorCode, Event, Reply, Target};

use super::store_error;
use crate::conn::{Conn, broadcast};
use crate::dispatch::SendCtx;
use crate::store::{AppendJob, NewMessage};

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// Checks a send and queues it for storage; the dispatcher answers once it is durable.
pub async fn send(
    conn: &Conn,
    user: &str,
    id: u64,
    target: Target,
    body: Body,
    idempotency_key: Option<String>,
    refs: Option<Box<conclave_proto::Refs>>,
) -> Result<(), ErrorBody> {
    if idempotency_key
        .as_ref()
        .is_some_and(|k| k.len() > MAX_IDEMPOTENCY_KEY_BYTES)
    {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!("an idempotency key is at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
        ));
    }
    let size = body.data.len() + body.content_type.len();
    let mut checked = conn.shared.hub.lock().check_send(user, &target, size);
    if matches!(&checked, Err(e) if e.code == ErrorCode::NoSuchUser) {
        // Accounts created on the data directory while serving: learn them, then re-check.
        learn_users(conn, &target).await;
        checked = conn.shared.hub.lock().check_send(user, &target, size);
    }
    let mut checked = checked?;
    let mut body = body;
    let mut audit = None;
    if let Some(r) = &refs {
        let c = super::chat::check(conn, user, &checked.conv, &body, r).await?;
        if let Some(except) = c.except {
            checked.except = except;
        }
        if let Some(b) = c.body {
            body = b;
        }
        audit = c.audit;
    }
    // An audited act is recorded once it is committed, never for one that failed.
    let notify = audit.map(|(kind, fields)| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = conn.shared.clone();
        tokio::spawn(async move {
            if let Ok(Some(_)) = rx.await {
                shared.audit(kind, fields);
            }
        });
        tx
    });
    // The permit first: the group's lock (end-to-end conversations) is held only from the
    // check until the message is queued, never while this connection waits for its own sends.
    let permit = conn
        .inflight
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ErrorBody::new(ErrorCode::Internal, "internal error; try again"))?;
    let group = super::e2ee::check_send(&conn.shared, &checked.conv, &body).await?;
    let job = AppendJob {
        msg: NewMessage {
            conv: checked.conv,
            from: user.to_string(),
            body,
            except: checked.except,
            idempotency_key,
            refs,
        },
        ctx: SendCtx {
            origin: conn.sid,
            outbox: conn.outbox.clone(),
            req_id: id,
            permit: Some(permit),
            notify,
            silent: false,
        },
    };
    let queued = conn.shared.store.append(job).await.map_err(store_error);
    drop(group);
    queued
}

async fn learn_users(conn: &Conn, target: &Target) {
    let names = match target {
        Target::Room { except, .. } => except,
        Target::Users { to } => to,
    };
    let unknown = conn.shared.hub.lock().unknown_users(names);
    for name in unknown {
        if let Ok(Some(row)) = conn.shared.store.call(move |db| db.user(&name)).await {
            conn.shared.hub.lock().upsert_user(&row.name, row.admin);
        }
    }
}

pub fn announce(conn: &Conn, user: &str, text: String) -> Result<Reply, ErrorBody> {
    let hub = conn.shared.hub.lock();
    if !hub.is_admin(user) {
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            "only admins can announce",
        ));
    }
    if text.len() > conn.shared.config().limits.max_message_bytes {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            "the announcement is too long",
        ));
    }
    tracing::info!(user, "announcement sent");
    let recipients = hub.all_sessions().count();
    conn.shared.metrics.announce(recipients);
    broadcast(
        hub.all_sessions(),
        Event::Announce {
            from: user.to_string(),
            text: text.clone(),
            ts_ms: crate::store::now_ms(),
        },
    );
    // After the hub is let go: recording may raise an alert, which may need the hub.
    drop(hub);
    // Everyone online on every node.
    conn.shared.publish(crate::bus::ClusterEvent::Announce {
        from: user.to_string(),
        text: crate::state::clip(&text, crate::bus::MAX_ANNOUNCE_BYTES),
    });
    conn.shared.audit(
        crate::audit::Kind::Announce,
        crate::audit::Fields::new()
            .ip(conn.peer)
            .user(user)
            .with("recipients", recipients),
    );
    Ok(Reply::Ok)
}
