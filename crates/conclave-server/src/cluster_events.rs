//! Cluster-wide events (issue 24): what a node tells the others when presence, a kick, a ban,
//! an announcement, a room or an account changes, and what it does with theirs.
//!
//! Every node has its own hub (who is online where, room members, live connections), guard
//! (bans, IP rules) and presence (topics, display names, away). The store is the truth for
//! what must survive; the bus carries notices ([`ClusterEvent`]):
//!
//! - [`publish`] queues an event (nothing when the node is alone: `Shared::bus` is `None`).
//!   The command handlers call it after the store write and the local change, so an event
//!   never announces what the store does not hold yet.
//! - [`apply`] acts on an event another node published, on this node's own connections, hub,
//!   guard and presence. It is idempotent and safe for any input: what takes away (kicks, bans,
//!   closed connections) and what is only shown (announcements, notices, topics, names) is
//!   applied as it comes; what could grant (a room's members and invitations, an account or
//!   its admin role, a lifted ban, the IP lists, shared read markers) only makes this node read
//!   the store again. Events from this node itself are ignored.
//! - [`presence_task`] runs on every node of a cluster: it sends the node's online users at
//!   start (asking the others for theirs), every heartbeat interval, and says goodbye
//!   ([`ClusterEvent::Leaving`]) at shutdown; it forgets other nodes' users whose entries were
//!   not repeated within their time to live, so the users of a node that died go offline
//!   everywhere after at most that long ([`Timing`]).
//! - [`reset`]: the bus lost notices (a broker reconnect, a slow consumer). This node reads
//!   rooms, accounts, bans and IP rules from the store again and asks the others for their
//!   online users.
//!
//! Store reads run on the store thread and are applied to the hub only if nothing newer was
//! ([`crate::hub::next_ticket`]), so answers resuming in any order never put back an older
//! room.
//!
//! Votes to kick are counted cluster-wide: each vote is published ([`ClusterEvent::Vote`]),
//! every node counts it in its hub (when the voter and the target are members there and
//! vote-kick is on), and the node where a vote reaches the threshold removes the target (the
//! removal is idempotent, so two nodes reaching it at once do no harm).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use conclave_proto::{Conv, DisconnectReason, Event};

use crate::bus::{Audience, ClusterEvent, MAX_NAMES, MAX_PRESENCE_TTL_MS};
use crate::conn::broadcast;
use crate::guard::{Ban, BanTarget, ban_text};
use crate::state::Shared;
use crate::store::now_ms;

/// How often a node sends its online users, and how long the others believe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat: Duration,
    /// At least two heartbeats, so one lost notice does not make anyone go offline.
    pub ttl: Duration,
}

/// Every 10 s; a node not heard for 35 s has no users online any more.
pub const DEFAULT_TIMING: Timing = Timing {
    heartbeat: Duration::from_secs(10),
    ttl: Duration::from_secs(35),
};

/// The shortest time between two answers to [`ClusterEvent::Online`]'s `ask`.
pub const ASK_ANSWER_INTERVAL_MS: i64 = 1000;
/// The shortest time to live accepted from another node, in ms.
pub const MIN_PRESENCE_TTL_MS: u64 = 100;

/// Tells the other nodes, if any. Never waits; an event the bus cannot queue is logged and
/// counted by the bus (what must survive is in the store).
pub fn publish(shared: &Shared, event: ClusterEvent) {
    shared.publish(event);
}

/// Tells the other nodes to show `event` to `users`' connections there (in events of at most
/// [`MAX_NAMES`] names).
pub fn notify_users(shared: &Shared, users: &[String], event: &Event) {
    if shared.bus.is_none() || users.is_empty() {
        return;
    }
    for part in users.chunks(MAX_NAMES) {
        shared.publish(ClusterEvent::Notify {
            to: Audience::Users(part.to_vec()),
            event: event.clone(),
        });
    }
}

/// Tells the other nodes to show `event` to `room`'s members there, minus `except`.
pub fn notify_room(shared: &Shared, room: &str, except: &[String], event: &Event) {
    if shared.bus.is_none() || except.len() > MAX_NAMES {
        return;
    }
    shared.publish(ClusterEvent::Notify {
        to: Audience::Room {
            room: room.to_string(),
            except: except.to_vec(),
        },
        event: event.clone(),
    });
}

/// Tells the other nodes that `room` changed in the store; they show `notice` once they read
/// it (see [`ClusterEvent::RoomChanged`]).
pub fn room_changed(shared: &Shared, room: &str, notice: Option<Event>, to: Vec<String>) {
    if shared.bus.is_none() {
        return;
    }
    shared.publish(ClusterEvent::RoomChanged {
        room: room.to_string(),
        notice,
        to,
    });
}

fn ttl_ms(shared: &Shared) -> u64 {
    match shared.presence().cluster_ttl_ms {
        0 => DEFAULT_TIMING.ttl.as_millis() as u64,
        t => t,
    }
}

/// Sends this node's online users (in events of at most [`MAX_NAMES`]; one empty event when
/// there are none, so the others hear from it).
fn send_online(shared: &Shared, ask: bool) {
    if shared.bus.is_none() {
        return;
    }
    let ttl_ms = ttl_ms(shared);
    // Under the hub's lock, as logins and logouts publish theirs: a heartbeat never overtakes
    // a later "offline" of one of its users.
    let hub = shared.hub.lock();
    let users = hub.users_online_here();
    if users.is_empty() {
        shared.publish(ClusterEvent::Online { users, ttl_ms, ask });
        return;
    }
    for part in users.chunks(MAX_NAMES) {
        shared.publish(ClusterEvent::Online {
            users: part.to_vec(),
            ttl_ms,
            ask,
        });
    }
}

/// Tells this node's peers of `user` that it came online or went offline everywhere, and
/// forgets its away message when it went offline.
fn tell_presence(
    shared: &Shared,
    hub: &crate::hub::Hub<crate::outbox::Outbox>,
    user: &str,
    online: bool,
) {
    if !online {
        shared.presence().went_offline(user);
    }
    broadcast(
        hub.presence_audience(user),
        Event::Presence {
            user: user.to_string(),
            online,
        },
    );
}

/// Forgets other nodes' users whose time ran out; tells their peers here.
pub fn expire_presence(shared: &Shared, now_ms: i64) {
    let mut hub = shared.hub.lock();
    let gone = hub.expire_remote(now_ms);
    for user in gone {
        tell_presence(shared, &hub, &user, false);
    }
}

/// The cluster's presence upkeep on this node until shutdown (see the module documentation).
/// Returns at once when the node is alone.
pub async fn presence_task(shared: Arc<Shared>, timing: Timing) {
    if shared.bus.is_none() {
        return;
    }
    let heartbeat = timing.heartbeat.max(Duration::from_millis(10));
    let ttl = timing.ttl.max(heartbeat.saturating_mul(2));
    shared.presence().cluster_ttl_ms =
        (ttl.as_millis() as u64).clamp(MIN_PRESENCE_TTL_MS, MAX_PRESENCE_TTL_MS);
    send_online(&shared, true);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(heartbeat) => {}
        }
        send_online(&shared, false);
        expire_presence(&shared, now_ms());
    }
    shared.publish(ClusterEvent::Leaving);
}

/// The bus lost notices: read what could have changed from the store again, and ask the other
/// nodes for their online users. Call it on every `Incoming::Reset`.
pub fn reset(shared: &Arc<Shared>) {
    if shared.bus.is_none() {
        return;
    }
    send_online(shared, true);
    spawn_reload(shared.clone());
    spawn_e2ee_resync(shared.clone());
}

/// After a bus reset, what end-to-end notices may have been lost: groups made on other nodes
/// are read from the store, and every Welcome waiting for a device connected here is sent
/// to it again (a client skips one it has used: it joined at or after that position).
/// Reads the end-to-end groups other nodes made that this node has not met yet.
pub async fn read_groups_made_elsewhere(shared: &Shared) {
    match shared.store.call(|db| db.e2ee_groups()).await {
        Ok(rows) => {
            for row in rows {
                if shared.e2ee.is_e2ee(&row.conv) {
                    continue;
                }
                match crate::e2ee::ConvGroup::from_row(row) {
                    Ok(g) => {
                        shared.e2ee.get_or_insert(g);
                    }
                    Err(e) => tracing::error!(error = %e, "another node's end-to-end group"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the end-to-end groups other nodes made"),
    }
}

/// Sends `user`'s connections here the Welcomes stored for `device` (only the one with id
/// `only`, when given).
async fn send_welcomes(shared: &Shared, user: &str, device: &str, only: Option<u64>) {
    let (u, d) = (user.to_string(), device.to_string());
    let rows = match shared.store.call(move |db| db.e2ee_welcomes(&u, &d)).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "reading Welcomes stored by another node");
            return;
        }
    };
    let hub = shared.hub.lock();
    for w in rows
        .into_iter()
        .filter(|w| only.is_none_or(|id| w.id == id))
    {
        broadcast(
            hub.sessions_of(std::iter::once(user), None),
            Event::E2eeWelcome {
                id: w.id,
                device: device.to_string(),
                conv: crate::store::conv_from_key(&w.conv),
                seq: w.seq,
                welcome: conclave_proto::Bytes::from(w.welcome),
            },
        );
    }
}

fn spawn_e2ee_resync(shared: Arc<Shared>) {
    spawn(async move {
        read_groups_made_elsewhere(&shared).await;
        let mut devices: Vec<(String, String)> = shared
            .registry
            .snapshot()
            .into_iter()
            .filter_map(|c| Some((c.user?, c.device?)))
            .collect();
        devices.sort();
        devices.dedup();
        for (user, device) in devices {
            send_welcomes(&shared, &user, &device, None).await;
        }
    });
}

fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}

fn spawn_reload(shared: Arc<Shared>) {
    spawn(async move {
        let read = shared
            .store
            .call(|db| {
                let ticket = crate::hub::next_ticket();
                Ok((ticket, db.rooms()?, db.users()?))
            })
            .await;
        match read {
            Ok((ticket, rooms, users)) => {
                let known: std::collections::HashSet<String> =
                    users.iter().map(|u| u.name.clone()).collect();
                let gone: Vec<String> = {
                    let mut hub = shared.hub.lock();
                    for u in &users {
                        hub.upsert_user(&u.name, u.admin);
                    }
                    for r in rooms {
                        let name = r.name.clone();
                        hub.refresh_room(&name, Some(r), ticket);
                    }
                    hub.users_known()
                        .into_iter()
                        .filter(|u| !known.contains(u))
                        .collect()
                };
                for user in gone {
                    account_gone(&shared, &user);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read rooms and accounts after a bus reset")
            }
        }
        reload_bans(&shared).await;
        if let Err(e) = shared.apply_rules(&shared.config()).await {
            tracing::warn!(error = %e, "could not read the IP lists after a bus reset");
        }
    });
}

/// Acts on an event that node `node` published (see the module documentation). Never panics,
/// whatever the event says.
pub fn apply(shared: &Arc<Shared>, node: &str, event: ClusterEvent) {
    let Some(bus) = &shared.bus else { return };
    if bus.node() == node {
        return;
    }
    let now = now_ms();
    match event {
        ClusterEvent::Presence { user, online } => {
            let until = online.then(|| now.saturating_add(ttl_ms(shared) as i64));
            let mut hub = shared.hub.lock();
            if let Some(online) = hub.set_remote(node, &user, until) {
                tell_presence(shared, &hub, &user, online);
            }
        }
        ClusterEvent::Online { users, ttl_ms, ask } => {
            let ttl = ttl_ms.clamp(MIN_PRESENCE_TTL_MS, MAX_PRESENCE_TTL_MS) as i64;
            let until = now.saturating_add(ttl);
            {
                let mut hub = shared.hub.lock();
                for user in users.iter().take(MAX_NAMES) {
                    if let Some(online) = hub.set_remote(node, user, Some(until)) {
                        tell_presence(shared, &hub, user, online);
                    }
                }
            }
            if ask {
                let answer = {
                    let mut p = shared.presence();
                    let due = now.saturating_sub(p.cluster_answered_ms) >= ASK_ANSWER_INTERVAL_MS;
                    if due {
                        p.cluster_answered_ms = now;
                    }
                    due
                };
                if answer {
                    send_online(shared, false);
                }
            }
        }
        ClusterEvent::Leaving => {
            let mut hub = shared.hub.lock();
            for user in hub.forget_node(node) {
                tell_presence(shared, &hub, &user, false);
            }
        }
        ClusterEvent::Kicked {
            room,
            user,
            by,
            reason,
            banned_until_ms,
        } => {
            {
                let mut hub = shared.hub.lock();
                if let Some(until) = banned_until_ms {
                    hub.ban_from_room(&room, &user, until);
                }
                if hub.room(&room).is_some_and(|r| r.members.contains(&user)) {
                    let c = Conv::Room(room.clone());
                    // Members (the target included) hear it before the target is removed.
                    broadcast(
                        hub.recipients(&c, &[], None),
                        Event::Kicked {
                            room: Some(room.clone()),
                            user: user.clone(),
                            by,
                            reason,
                        },
                    );
                    hub.remove_member(&room, &user);
                }
            }
            // A read of the room that ran before the kick's write must not put the target
            // back: read it again now.
            spawn_refresh(shared.clone(), room, None, Vec::new());
        }
        ClusterEvent::KickedOff { user, by, reason } => {
            shared.registry.close_user(
                &user,
                DisconnectReason::Kicked,
                &format!("kicked by {by}: {reason}"),
            );
        }
        ClusterEvent::Banned {
            user,
            until_ms,
            by,
            reason,
        } => enforce_ban(
            shared,
            Ban {
                target: BanTarget::User(user),
                until_ms,
                reason,
                by,
                created_ms: now,
            },
        ),
        ClusterEvent::AddressBanned {
            net,
            until_ms,
            by,
            reason,
        } => enforce_ban(
            shared,
            Ban {
                target: BanTarget::Net(net),
                until_ms,
                reason,
                by,
                created_ms: now,
            },
        ),
        ClusterEvent::BansChanged => {
            let shared = shared.clone();
            spawn(async move { reload_bans(&shared).await });
        }
        ClusterEvent::IpRulesChanged => {
            let shared = shared.clone();
            spawn(async move {
                if let Err(e) = shared.apply_rules(&shared.config()).await {
                    tracing::warn!(error = %e, "could not read the IP lists another node changed");
                }
            });
        }
        ClusterEvent::Announce { from, text } => {
            let hub = shared.hub.lock();
            shared.metrics.announce(hub.all_sessions().count());
            broadcast(
                hub.all_sessions(),
                Event::Announce {
                    from,
                    text,
                    ts_ms: now,
                },
            );
        }
        ClusterEvent::RoomChanged { room, notice, to } => {
            spawn_refresh(shared.clone(), room, notice, to);
        }
        ClusterEvent::AccountChanged { user } => {
            let shared = shared.clone();
            spawn(async move {
                let name = user.clone();
                match shared.store.call(move |db| db.user(&name)).await {
                    Ok(Some(row)) => shared.hub.lock().upsert_user(&row.name, row.admin),
                    Ok(None) => account_gone(&shared, &user),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read an account another node changed")
                    }
                }
            });
        }
        ClusterEvent::Vote {
            room,
            target,
            voter,
            at_ms,
        } => {
            let window_ms = vote_window_ms(shared);
            shared
                .hub
                .lock()
                .record_remote_vote(&room, &target, &voter, at_ms, now, window_ms);
        }
        ClusterEvent::Topic { room, topic, by } => {
            let hub = shared.hub.lock();
            if hub.room(&room).is_none() {
                return;
            }
            shared.presence().set_topic(&room, &topic);
            let conv = Conv::Room(room.clone());
            broadcast(
                hub.sessions_of(hub.audience(&conv, &[]), None),
                Event::Topic { room, topic, by },
            );
        }
        ClusterEvent::DisplayName { user, name } => {
            let hub = shared.hub.lock();
            if !hub.knows_user(&user) {
                return;
            }
            shared.presence().set_display_name(&user, name.as_deref());
            tell_peers(
                &hub,
                &user,
                Event::DisplayName {
                    user: user.clone(),
                    name,
                },
            );
        }
        ClusterEvent::Away { user, text } => {
            let hub = shared.hub.lock();
            if !hub.online(&user) {
                return;
            }
            if shared.presence().set_away(&user, text.as_deref()) {
                tell_peers(
                    &hub,
                    &user,
                    Event::Away {
                        user: user.clone(),
                        text,
                    },
                );
            }
        }
        ClusterEvent::ReadsShared { user, share } => {
            if !share {
                shared.presence().set_share_reads(&user, false);
                return;
            }
            let shared = shared.clone();
            spawn(async move {
                match shared.store.call(|db| db.chat_load()).await {
                    Ok(rows) => {
                        let private = rows.private_reads.contains(&user);
                        shared.presence().set_share_reads(&user, !private);
                    }
                    Err(e) => tracing::warn!(error = %e, "could not read a read-marker setting"),
                }
            });
        }
        ClusterEvent::Notify { to, event } => {
            // Checked by the bus's decoder too; checked again, as nothing else may travel.
            if !crate::bus::notice_allowed(&event) {
                return;
            }
            let hub = shared.hub.lock();
            match to {
                Audience::Users(users) => broadcast(
                    hub.sessions_of(users.iter().take(MAX_NAMES).map(String::as_str), None),
                    event,
                ),
                Audience::Room { room, except } => {
                    let c = Conv::Room(room);
                    broadcast(hub.recipients(&c, &except, None), event);
                }
            }
        }
        ClusterEvent::FileChanged { file_id, users } => {
            shared.files_cache.forget(&file_id);
            for u in users.iter().take(MAX_NAMES) {
                shared.files_cache.forget_recipient(&file_id, u);
            }
        }
        ClusterEvent::E2eeGroup { conv } => {
            if shared.e2ee.is_e2ee(&conv) {
                return;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                let k = conv.clone();
                match shared.store.call(move |db| db.e2ee_group(&k)).await {
                    Ok(Some(row)) => match crate::e2ee::ConvGroup::from_row(row) {
                        Ok(g) => {
                            shared.e2ee.get_or_insert(g);
                        }
                        Err(e) => tracing::error!(error = %e, "another node's end-to-end group"),
                    },
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "reading another node's end-to-end group"),
                }
            });
        }
        ClusterEvent::Welcomes { welcomes } => {
            // Only the devices of users with connections here are read.
            let here: Vec<(String, String, u64)> = {
                let hub = shared.hub.lock();
                welcomes
                    .into_iter()
                    .take(MAX_NAMES)
                    .filter(|(u, _, _)| {
                        hub.sessions_of(std::iter::once(u.as_str()), None)
                            .next()
                            .is_some()
                    })
                    .collect()
            };
            if here.is_empty() {
                return;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                for (user, device, id) in here {
                    send_welcomes(&shared, &user, &device, Some(id)).await;
                }
            });
        }
    }
}

fn vote_window_ms(shared: &Shared) -> i64 {
    (shared
        .config()
        .votekick
        .window_s
        .min(i64::MAX as u64 / 1000)
        * 1000) as i64
}

/// Those who see `user` come and go (room peers), and `user`'s own connections.
fn tell_peers(hub: &crate::hub::Hub<crate::outbox::Outbox>, user: &str, e: Event) {
    let frame = crate::outbox::encode(&conclave_proto::ServerFrame::Event(e));
    for o in hub
        .presence_audience(user)
        .into_iter()
        .chain(hub.sessions_of(std::iter::once(user), None))
    {
        o.push(frame.clone());
    }
}

/// Enforces a ban another node made: the guard refuses it, its connections here close.
fn enforce_ban(shared: &Shared, ban: Ban) {
    let message = ban_text(&ban, now_ms());
    let closed = match &ban.target {
        BanTarget::User(u) => shared
            .registry
            .close_user(u, DisconnectReason::Banned, &message),
        BanTarget::Net(n) => shared
            .registry
            .close_net(n, DisconnectReason::Banned, &message),
    };
    tracing::info!(target = %ban.target.value(), closed, "ban from another node enforced");
    shared.guard().add_ban(ban);
}

/// Makes the guard's bans the store's: lifted ones go, new ones come.
async fn reload_bans(shared: &Shared) {
    let now = now_ms();
    let stored = match shared.store.call(move |db| db.bans(now)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the bans another node changed");
            return;
        }
    };
    let mut guard = shared.guard();
    for ban in guard.bans(now) {
        if !stored.iter().any(|s| s.target == ban.target) {
            guard.remove_ban(&ban.target);
        }
    }
    for ban in stored {
        guard.add_ban(ban);
    }
}

/// An account that the store no longer has: its connections here close, and this node
/// forgets it.
fn account_gone(shared: &Shared, user: &str) {
    shared
        .registry
        .close_user(user, DisconnectReason::Kicked, "your account was deleted");
    shared.hub.lock().remove_user(user);
    shared.presence().forget_user(user);
}

/// Reads `room` from the store and applies it unless something newer was; then shows
/// `notice` (see [`ClusterEvent::RoomChanged`]).
fn spawn_refresh(shared: Arc<Shared>, room: String, notice: Option<Event>, to: Vec<String>) {
    if notice
        .as_ref()
        .is_some_and(|e| !crate::bus::notice_allowed(e))
    {
        return;
    }
    spawn(async move {
        let name = room.clone();
        let read = shared
            .store
            .call(move |db| {
                let ticket = crate::hub::next_ticket();
                Ok((ticket, db.rooms()?.into_iter().find(|r| r.name == name)))
            })
            .await;
        let (ticket, row) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a room another node changed");
                return;
            }
        };
        let mut hub = shared.hub.lock();
        let before: BTreeSet<String> = hub
            .room(&room)
            .map(|r| r.members.iter().cloned().collect())
            .unwrap_or_default();
        hub.refresh_room(&room, row, ticket);
        let Some(notice) = notice else { return };
        if to.is_empty() {
            broadcast(hub.room_sessions_with(&room, &before), notice);
        } else {
            broadcast(
                hub.sessions_of(to.iter().take(MAX_NAMES).map(String::as_str), None),
                notice,
            );
        }
    });
}
