//! Login, registration and logout.

use conclave_proto::{ErrorBody, ErrorCode, Event, Reply, names};

use super::{hashing, store_error};
use crate::accounts;
use crate::audit::{Fields, Kind};
use crate::bus::ClusterEvent;
use crate::cluster_events;
use crate::config::RegistrationPolicy;
use crate::conn::{Conn, broadcast};
use crate::dispatch::SendCtx;
use crate::store::{CatchUpJob, StoreError};

fn auth_failed() -> ErrorBody {
    ErrorBody::new(ErrorCode::AuthFailed, "wrong user name or password")
}

fn check_server_password(conn: &Conn, given: Option<&str>) -> Result<(), ErrorBody> {
    let config = conn.shared.config();
    let Some(expected) = config.server_password.as_deref() else {
        return Ok(());
    };
    match given {
        Some(g) if accounts::secrets_equal(g, expected) => Ok(()),
        Some(_) => Err(ErrorBody::new(
            ErrorCode::ServerPassword,
            "wrong server password; ask the operator for it",
        )),
        None => Err(ErrorBody::new(
            ErrorCode::ServerPassword,
            "this server needs a server password (--server-password-env in the client); ask the operator for it",
        )),
    }
}

/// Logs in; on success the reply is sent here (before the catch-up it starts).
pub async fn login(
    conn: &mut Conn,
    id: u64,
    user: String,
    password: String,
    server_password: Option<String>,
    resume: Vec<conclave_proto::Cursor>,
) -> Result<(), ErrorBody> {
    check_server_password(conn, server_password.as_deref())?;
    if resume.len() > conn.shared.config().limits.max_cursors {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "at most {} cursors in a resume",
                conn.shared.config().limits.max_cursors
            ),
        ));
    }
    let name = names::canonical(&user).ok();
    let now = crate::store::now_ms();
    let lock_key = name.clone().unwrap_or_else(|| user.to_lowercase());
    let locked = conn.shared.guard().login_locked(&lock_key, now);
    if let Some(left) = locked {
        conn.shared.audit(
            Kind::Limit,
            Fields::new()
                .ip(conn.peer)
                .user(&lock_key)
                .reason("login_locked"),
        );
        return Err(ErrorBody::new(
            ErrorCode::RateLimited,
            format!(
                "too many failed logins for this account; wait {} s and try again",
                (left + 999) / 1000
            ),
        ));
    }
    // The account and its rooms as stored: `conclave user add` may have written them while the
    // server runs.
    let found = match name.clone() {
        Some(n) => conn
            .shared
            .store
            .call(move |db| {
                Ok(match db.user(&n)? {
                    Some(u) => Some((u, db.rooms_of_user(&n)?)),
                    None => None,
                })
            })
            .await
            .map_err(store_error)?,
        None => None,
    };
    let (row, rooms) = match found {
        Some((u, r)) => (Some(u), r),
        None => (None, Vec::new()),
    };
    // The same work whether or not the account exists, so timing does not tell.
    let invalid_name = name.is_none();
    let checked = hashing(&conn.shared, move || match row {
        Some(r) if accounts::verify_password(&password, &r.pw_hash) => Ok(r),
        Some(_) => Err("wrong_password"),
        None => {
            accounts::verify_dummy(&password);
            Err(if invalid_name {
                "invalid_name"
            } else {
                "unknown_account"
            })
        }
    })
    .await?;
    let row = match checked {
        Ok(row) => row,
        Err(why) => {
            tracing::info!(peer = %conn.peer, reason = why, "login failed");
            let now = crate::store::now_ms();
            let (auto, failures, locked) = {
                let mut guard = conn.shared.guard();
                let auto = guard.login_failed(&lock_key, conn.peer.ip(), now);
                (
                    auto,
                    guard.login_failures(&lock_key),
                    guard.login_locked(&lock_key, now),
                )
            };
            // The client hears one answer for both (so it cannot probe for accounts); the
            // operator's record says which it was, and what the lock-out now is.
            let mut fields = Fields::new()
                .ip(conn.peer)
                .user(&lock_key)
                .reason(why)
                .with("failures", failures);
            if let Some(left) = locked {
                fields = fields.with("locked_for_s", (left + 999) / 1000);
            }
            if auto.is_some() {
                fields = fields.with("ip_banned", true);
            }
            conn.shared.audit(Kind::LoginFailed, fields);
            if let Some(auto) = auto {
                super::admin::persist_auto_ban(&conn.shared, auto).await;
            }
            return Err(auth_failed());
        }
    };
    conn.shared.guard().login_ok(&row.name);
    if let Some(ban) = conn
        .shared
        .guard()
        .user_ban(&row.name, crate::store::now_ms())
        .cloned()
    {
        conn.shared.audit(
            Kind::LoginFailed,
            Fields::new().ip(conn.peer).user(&row.name).reason("banned"),
        );
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("this account is {}", super::admin::ban_text_now(&ban)),
        ));
    }
    {
        let mut hub = conn.shared.hub.lock();
        for room in &rooms {
            if hub
                .room(room)
                .is_some_and(|r| !r.members.contains(&row.name))
            {
                hub.add_member(room, &row.name);
            }
        }
    }
    finish_login(conn, id, row.name, row.admin, resume).await;
    Ok(())
}

/// Registers and logs in; on success the reply is sent here.
pub async fn register(
    conn: &mut Conn,
    id: u64,
    user: String,
    password: String,
    server_password: Option<String>,
    invite_code: Option<String>,
) -> Result<(), ErrorBody> {
    check_server_password(conn, server_password.as_deref())?;
    let policy = conn.shared.registration();
    let code_hash = match (policy, invite_code) {
        (RegistrationPolicy::Closed, _) => {
            return Err(ErrorBody::new(
                ErrorCode::RegistrationClosed,
                "registration is closed on this server; ask an operator to create your account (conclave user add)",
            ));
        }
        (RegistrationPolicy::Invite, None) => {
            return Err(ErrorBody::new(
                ErrorCode::InviteRequired,
                "this server registers by invitation: ask an operator for an invite code (conclave user invite) and pass it",
            ));
        }
        (RegistrationPolicy::Invite, Some(code)) => Some(accounts::invite_code_hash(&code)),
        _ => None,
    };
    let name = names::canonical_new_account(&user)
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidName, format!("user name {user:?}: {e}")))?;
    accounts::check_new_password(&password)
        .map_err(|m| ErrorBody::new(ErrorCode::BadRequest, m))?;
    let hash = hashing(&conn.shared, move || accounts::hash_password(&password))
        .await?
        .map_err(|m| ErrorBody::new(ErrorCode::Internal, m))?;
    let default_room = conn.shared.config().default_room.clone();
    let n = name.clone();
    let created = conn
        .shared
        .store
        .call(move |db| {
            let ok = match code_hash {
                Some(code) => db.register_with_code(&code, &n, &hash)?,
                None => db.create_user(&n, &hash, false).map(|_| true)?,
            };
            if ok {
                db.ensure_public_room(&default_room)?;
                db.add_member(&default_room, &n)?;
            }
            Ok(ok)
        })
        .await;
    match created {
        Ok(true) => {}
        Ok(false) => {
            return Err(ErrorBody::new(
                ErrorCode::InviteRequired,
                "that invite code is not valid (unknown or already used); ask an operator for a new one",
            ));
        }
        Err(StoreError::Exists) => {
            return Err(ErrorBody::new(
                ErrorCode::NameTaken,
                format!("the name {name:?} is taken; choose another"),
            ));
        }
        Err(e) => return Err(store_error(e)),
    }
    tracing::info!(peer = %conn.peer, user = %name, "account registered");
    conn.shared.audit(
        Kind::Register,
        Fields::new()
            .ip(conn.peer)
            .user(&name)
            .with("policy", policy.as_str()),
    );
    {
        let mut hub = conn.shared.hub.lock();
        hub.upsert_user(&name, false);
        hub.add_member(&conn.shared.config().default_room, &name);
        let room = conn.shared.config().default_room.clone();
        let c = conclave_proto::Conv::Room(room.clone());
        let join = Event::Join {
            room: room.clone(),
            user: name.clone(),
        };
        broadcast(hub.recipients(&c, &[], None), join.clone());
        conn.shared
            .publish(ClusterEvent::AccountChanged { user: name.clone() });
        cluster_events::room_changed(&conn.shared, &room, Some(join), Vec::new());
    }
    finish_login(conn, id, name, false, Vec::new()).await;
    Ok(())
}

async fn finish_login(
    conn: &mut Conn,
    id: u64,
    name: String,
    admin: bool,
    resume: Vec<conclave_proto::Cursor>,
) {
    let reply = connect(conn, name.clone(), admin);
    conn.reply(id, Ok(reply));
    // The reply goes out first; the catch-up follows it, then live traffic.
    let config = conn.shared.config();
    let limits = &config.limits;
    let job = CatchUpJob {
        user: name,
        resume: resume.into_iter().map(|c| (c.conv, c.seq)).collect(),
        per_conv: limits.max_catchup_per_conv,
        total: limits
            .max_catchup_total
            .min((limits.outbound_queue_frames / 2) as u32),
        ctx: SendCtx {
            origin: conn.sid,
            outbox: conn.outbox.clone(),
            req_id: 0,
            permit: None,
            notify: None,
            silent: false,
        },
    };
    if conn.shared.store.catch_up(job).await.is_err() {
        conn.outbox.close(
            conclave_proto::DisconnectReason::Shutdown,
            "the server is shutting down; reconnect later",
        );
        return;
    }
    if let Some(user) = conn.user.clone() {
        super::files::offer_pending(conn, &user).await;
    }
}

fn connect(conn: &mut Conn, name: String, admin: bool) -> Reply {
    let mut hub = conn.shared.hub.lock();
    hub.upsert_user(&name, admin);
    let was_online = hub.online(&name);
    let came_online_here = hub.connect(&name, conn.sid, conn.outbox.clone());
    if came_online_here {
        // Under the hub's lock, so this node's heartbeats and presence notices stay in order.
        conn.shared.publish(ClusterEvent::Presence {
            user: name.clone(),
            online: true,
        });
    }
    if !was_online {
        broadcast(
            hub.presence_audience(&name),
            Event::Presence {
                user: name.clone(),
                online: true,
            },
        );
    }
    let rooms = hub.rooms_of(&name);
    drop(hub);
    tracing::info!(peer = %conn.peer, user = %name, "login");
    conn.shared.audit(
        Kind::LoginOk,
        Fields::new().ip(conn.peer).user(&name).with("admin", admin),
    );
    conn.shared.registry.set_user(conn.sid, &name);
    conn.user = Some(name.clone());
    Reply::LoggedIn {
        user: name,
        admin,
        rooms,
    }
}

/// Forgets the connection; tells room peers when its user went offline.
pub fn logout(conn: &Conn) {
    let mut hub = conn.shared.hub.lock();
    if let Some((user, true)) = hub.disconnect(conn.sid) {
        conn.shared.publish(ClusterEvent::Presence {
            user: user.clone(),
            online: false,
        });
        if hub.online_elsewhere(&user) {
            // Still online on another node of the cluster: nothing changes for its peers.
            return;
        }
        conn.shared.presence().went_offline(&user);
        broadcast(
            hub.presence_audience(&user),
            Event::Presence {
                user,
                online: false,
            },
        );
    }
}
