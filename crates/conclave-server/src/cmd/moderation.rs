//! Kicks, vote-kicks, bans and room settings from clients.

use conclave_proto::{Conv, ErrorBody, ErrorCode, Event, Reply, names};

use super::{admin, store_error};
use crate::audit::{Fields, Kind};
use crate::bus::{ClusterEvent, MAX_NODE_BYTES, MAX_REASON_BYTES};
use crate::cluster_events;
use crate::conn::{Conn, broadcast};
use crate::guard::BanTarget;
use crate::hub::{SessionId, VoteRules};
use crate::state::{Shared, clip};
use crate::store::now_ms;

fn require_admin(conn: &Conn, user: &str, what: &str) -> Result<(), ErrorBody> {
    if conn.shared.hub.lock().is_admin(user) {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("only admins can {what}"),
        ))
    }
}

/// Removes `target` from `room`: membership gone (stored), everyone concerned told, on every
/// node (`banned_until_ms`: a vote-kick's room ban, already stored, that the other nodes
/// enforce too). `origin` is the connection that asked (it gets a reply, not the event).
pub async fn remove_from_room(
    shared: &Shared,
    origin: Option<SessionId>,
    room: &str,
    target: &str,
    by: &str,
    reason: &str,
    banned_until_ms: Option<i64>,
) -> Result<(), ErrorBody> {
    let (r, t) = (room.to_string(), target.to_string());
    let ticket = shared
        .store
        .call(move |db| {
            db.remove_member(&r, &t)?;
            Ok(crate::hub::next_ticket())
        })
        .await
        .map_err(store_error)?;
    let c = Conv::Room(room.to_string());
    {
        let mut hub = shared.hub.lock();
        // Members (the target included) hear it before the target is removed.
        broadcast(
            hub.recipients(&c, &[], origin),
            Event::Kicked {
                room: Some(room.to_string()),
                user: target.to_string(),
                by: by.to_string(),
                reason: reason.to_string(),
            },
        );
        hub.remove_member(room, target);
        hub.touch_room(room, ticket);
    }
    shared.publish(ClusterEvent::Kicked {
        room: room.to_string(),
        user: target.to_string(),
        by: clip(by, MAX_NODE_BYTES),
        reason: clip(reason, MAX_REASON_BYTES),
        banned_until_ms,
    });
    // In an end-to-end encrypted room, the server proposes the removal of the target's
    // devices; nothing more is accepted there until a member commits it.
    super::e2ee::remove_user(shared, &c, target).await;
    tracing::info!(room, target, by, "kicked from room");
    shared.audit(
        Kind::Kick,
        Fields::new()
            .user(target)
            .room(room)
            .with("by", by)
            .reason(reason),
    );
    Ok(())
}

pub async fn kick(
    conn: &Conn,
    by: &str,
    room: Option<String>,
    user: String,
    reason: Option<String>,
) -> Result<Reply, ErrorBody> {
    let reason = reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "no reason given".into());
    match room {
        Some(room) => {
            let (room, target) = conn.shared.hub.lock().check_kick(by, &room, &user)?;
            remove_from_room(
                &conn.shared,
                Some(conn.sid),
                &room,
                &target,
                by,
                &reason,
                None,
            )
            .await?;
        }
        None => {
            require_admin(conn, by, "kick users off the server")?;
            let target = names::canonical(&user).unwrap_or(user);
            if target == by {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "you cannot kick yourself",
                ));
            }
            if admin::kick_from_server(&conn.shared, &target, by, &reason) == 0
                && !conn.shared.hub.lock().online(&target)
            {
                return Err(ErrorBody::new(
                    ErrorCode::NoSuchUser,
                    format!("{target:?} is not connected"),
                ));
            }
        }
    }
    Ok(Reply::Ok)
}

pub async fn votekick(
    conn: &Conn,
    voter: &str,
    room: String,
    user: String,
) -> Result<Reply, ErrorBody> {
    let config = conn.shared.config();
    let rules = VoteRules {
        votes: config.votekick.votes,
        fraction: config.votekick.fraction,
        window_ms: (config.votekick.window_s.min(i64::MAX as u64 / 1000) * 1000) as i64,
    };
    let now = now_ms();
    let tally = conn
        .shared
        .hub
        .lock()
        .vote(voter, &room, &user, now, &rules)?;
    {
        let hub = conn.shared.hub.lock();
        let c = Conv::Room(tally.room.clone());
        let notice = Event::VoteKick {
            room: tally.room.clone(),
            target: tally.target.clone(),
            voter: voter.to_string(),
            votes: tally.votes,
            needed: tally.needed,
        };
        broadcast(hub.recipients(&c, &[], Some(conn.sid)), notice.clone());
        // Every node counts the vote (the tally is the cluster's) and shows it.
        conn.shared.publish(ClusterEvent::Vote {
            room: tally.room.clone(),
            target: tally.target.clone(),
            voter: voter.to_string(),
            at_ms: now,
        });
        cluster_events::notify_room(&conn.shared, &tally.room, &[], &notice);
    }
    tracing::info!(room = %tally.room, target = %tally.target, voter, votes = tally.votes, needed = tally.needed, "vote-kick vote");
    conn.shared.audit(
        Kind::Vote,
        Fields::new()
            .user(voter)
            .room(&tally.room)
            .with("target", &tally.target)
            .with("votes", tally.votes)
            .with("needed", tally.needed),
    );
    if tally.kicked {
        conn.shared.audit(
            Kind::VoteResult,
            Fields::new()
                .user(&tally.target)
                .room(&tally.room)
                .with("votes", tally.votes)
                .with("kicked", true),
        );
    }
    if tally.kicked {
        let until = now.saturating_add((config.votekick.ban_minutes.min(1 << 40) * 60_000) as i64);
        let (r, t) = (tally.room.clone(), tally.target.clone());
        conn.shared
            .store
            .call(move |db| db.add_room_ban(&r, &t, until))
            .await
            .map_err(store_error)?;
        conn.shared
            .hub
            .lock()
            .ban_from_room(&tally.room, &tally.target, until);
        let reason = format!(
            "voted out ({} votes); may rejoin in {} minutes",
            tally.votes, config.votekick.ban_minutes
        );
        remove_from_room(
            &conn.shared,
            None,
            &tally.room,
            &tally.target,
            "vote",
            &reason,
            Some(until),
        )
        .await?;
    }
    Ok(Reply::VoteCounted {
        votes: tally.votes,
        needed: tally.needed,
        kicked: tally.kicked,
    })
}

pub fn ban_target(user: Option<String>, ip: Option<String>) -> Result<BanTarget, ErrorBody> {
    match (user, ip) {
        (Some(u), None) => names::canonical(&u)
            .map(BanTarget::User)
            .map_err(|e| ErrorBody::new(ErrorCode::NoSuchUser, format!("user {u:?}: {e}"))),
        (None, Some(ip)) => crate::config::parse_net(&ip)
            .map(BanTarget::Net)
            .map_err(|e| ErrorBody::new(ErrorCode::BadRequest, e)),
        _ => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "give either \"user\" or \"ip\" (an address or CIDR)",
        )),
    }
}

pub async fn ban(
    conn: &Conn,
    by: &str,
    user: Option<String>,
    ip: Option<String>,
    duration_s: Option<u64>,
    reason: Option<String>,
) -> Result<Reply, ErrorBody> {
    require_admin(conn, by, "ban")?;
    let target = ban_target(user, ip)?;
    let duration_ms = duration_s.map(|s| (s.min(i64::MAX as u64 / 1000) * 1000) as i64);
    admin::ban(
        &conn.shared,
        by,
        target,
        duration_ms,
        reason.unwrap_or_default(),
    )
    .await?;
    Ok(Reply::Ok)
}

pub async fn unban(
    conn: &Conn,
    by: &str,
    user: Option<String>,
    ip: Option<String>,
) -> Result<Reply, ErrorBody> {
    require_admin(conn, by, "lift bans")?;
    admin::unban(&conn.shared, by, ban_target(user, ip)?).await?;
    Ok(Reply::Ok)
}

pub async fn set_room(
    conn: &Conn,
    by: &str,
    room: String,
    votekick: Option<bool>,
) -> Result<Reply, ErrorBody> {
    let name = conn.shared.hub.lock().check_set_room(by, &room)?;
    if let Some(on) = votekick {
        let n = name.clone();
        let ticket = conn
            .shared
            .store
            .call(move |db| {
                db.set_room_votekick(&n, on)?;
                Ok(crate::hub::next_ticket())
            })
            .await
            .map_err(store_error)?;
        {
            let mut hub = conn.shared.hub.lock();
            hub.set_votekick(&name, on);
            hub.touch_room(&name, ticket);
        }
        cluster_events::room_changed(&conn.shared, &name, None, Vec::new());
    }
    Ok(Reply::Ok)
}
