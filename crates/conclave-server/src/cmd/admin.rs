//! Operator actions shared by the admin socket and admins' clients: bans, unbans, kicks from
//! the server.

use std::sync::Arc;

use conclave_proto::{DisconnectReason, ErrorBody, ErrorCode};

use super::store_error;
use crate::audit::{Fields, Kind};
use crate::bus::{ClusterEvent, MAX_NODE_BYTES, MAX_REASON_BYTES};
use crate::guard::{AutoBan, Ban, BanTarget, ban_text};
use crate::state::{Shared, ban_event, clip};
use crate::store::now_ms;

/// [`ban_text`] at this moment.
pub fn ban_text_now(ban: &Ban) -> String {
    ban_text(ban, now_ms())
}

/// Persists an automatic ban and closes the connections it covers.
pub async fn persist_auto_ban(shared: &Arc<Shared>, auto: AutoBan) {
    tracing::warn!(target = %auto.ban.target.value(), reason = %auto.ban.reason, "automatic ban");
    audit_ban(shared, &auto.ban);
    shared.publish(ban_event(&auto.ban));
    let ban = auto.ban.clone();
    if let Err(e) = shared.store.call(move |db| db.add_ban(&ban)).await {
        tracing::warn!(error = %e, "could not store an automatic ban");
    }
    if let BanTarget::Net(net) = &auto.ban.target {
        shared
            .registry
            .close_net(net, DisconnectReason::Banned, &ban_text_now(&auto.ban));
    }
}

/// Bans a user or a network. Refuses to ban oneself or the last admin.
pub async fn ban(
    shared: &Arc<Shared>,
    by: &str,
    target: BanTarget,
    duration_ms: Option<i64>,
    reason: String,
) -> Result<Ban, ErrorBody> {
    if let BanTarget::User(u) = &target {
        if u == by {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "you cannot ban yourself",
            ));
        }
        let (exists, admin) = {
            let name = u.clone();
            shared
                .store
                .call(move |db| Ok(db.user(&name)?.map(|r| r.admin)))
                .await
                .map_err(store_error)?
                .map_or((false, false), |a| (true, a))
        };
        if !exists {
            return Err(ErrorBody::new(
                ErrorCode::NoSuchUser,
                format!("there is no user {u:?}"),
            ));
        }
        if admin {
            let admins = shared
                .store
                .call(|db| Ok(db.users()?.iter().filter(|u| u.admin).count()))
                .await
                .map_err(store_error)?;
            if admins <= 1 {
                return Err(ErrorBody::new(
                    ErrorCode::Forbidden,
                    format!("{u:?} is the last admin; make another admin first"),
                ));
            }
        }
    }
    let now = now_ms();
    let ban = Ban {
        target,
        until_ms: duration_ms.map(|d| now.saturating_add(d)),
        reason: if reason.trim().is_empty() {
            "no reason given".into()
        } else {
            reason
        },
        by: by.to_string(),
        created_ms: now,
    };
    let stored = ban.clone();
    shared
        .store
        .call(move |db| db.add_ban(&stored))
        .await
        .map_err(store_error)?;
    shared.guard().add_ban(ban.clone());
    // Every node closes the connections it covers and refuses it from now on.
    shared.publish(ban_event(&ban));
    let message = ban_text_now(&ban);
    match &ban.target {
        BanTarget::User(u) => shared
            .registry
            .close_user(u, DisconnectReason::Banned, &message),
        BanTarget::Net(n) => shared
            .registry
            .close_net(n, DisconnectReason::Banned, &message),
    };
    tracing::info!(by, target = %ban.target.value(), "ban");
    audit_ban(shared, &ban);
    if let BanTarget::User(u) = &ban.target {
        // A banned account's devices leave every end-to-end group it is in.
        let rooms = shared.hub.lock().rooms_of(u);
        for room in rooms {
            super::e2ee::remove_user(shared, &conclave_proto::Conv::Room(room), u).await;
        }
    }
    Ok(ban)
}

/// Lifts a ban.
pub async fn unban(shared: &Arc<Shared>, by: &str, target: BanTarget) -> Result<(), ErrorBody> {
    let t = target.clone();
    let stored = shared
        .store
        .call(move |db| db.remove_ban(&t))
        .await
        .map_err(store_error)?;
    let live = shared.guard().remove_ban(&target);
    // The other nodes read the bans from the store again.
    shared.publish(ClusterEvent::BansChanged);
    if !stored && !live {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("there is no ban on {}", target.value()),
        ));
    }
    shared.audit(
        Kind::Unban,
        Fields::new()
            .with("target_kind", target.kind())
            .with("target", target.value())
            .with("by", by),
    );
    Ok(())
}

fn audit_ban(shared: &Shared, ban: &Ban) {
    let mut f = Fields::new()
        .with("target_kind", ban.target.kind())
        .with("target", ban.target.value())
        .with("by", &ban.by)
        .with("until_ms", ban.until_ms)
        .reason(&ban.reason);
    if let BanTarget::User(u) = &ban.target {
        f = f.user(u);
    }
    shared.audit(Kind::Ban, f);
}

/// Closes every connection of `user` (a kick from the server; they may reconnect), on every
/// node. Returns how many were closed on this one.
pub fn kick_from_server(shared: &Shared, user: &str, by: &str, reason: &str) -> usize {
    shared.audit(
        Kind::Kick,
        Fields::new().user(user).with("by", by).reason(reason),
    );
    shared.publish(ClusterEvent::KickedOff {
        user: user.to_string(),
        by: clip(by, MAX_NODE_BYTES),
        reason: clip(reason, MAX_REASON_BYTES),
    });
    shared.registry.close_user(
        user,
        DisconnectReason::Kicked,
        &format!("kicked by {by}: {reason}"),
    )
}
