//! Rooms: create, join, part, invite.

use conclave_proto::{Conv, ErrorBody, ErrorCode, Event, Reply};

use super::{hashing, store_error};
use crate::accounts;
use crate::audit::{Fields, Kind};
use crate::cluster_events;
use crate::conn::{Conn, broadcast};
use crate::hub::{JoinCheck, Room};
use crate::store::{RoomRow, StoreError};

pub async fn create(
    conn: &Conn,
    user: &str,
    room: String,
    private: bool,
    password: Option<String>,
) -> Result<Reply, ErrorBody> {
    let name = conn.shared.hub.lock().check_create(&room)?;
    let pw_hash = match password.filter(|p| !p.is_empty()) {
        Some(p) => {
            if p.len() > accounts::MAX_PASSWORD_BYTES {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    "the room password is too long",
                ));
            }
            Some(
                hashing(&conn.shared, move || accounts::hash_password(&p))
                    .await?
                    .map_err(|m| ErrorBody::new(ErrorCode::Internal, m))?,
            )
        }
        None => None,
    };
    let row = RoomRow {
        name: name.clone(),
        private,
        pw_hash: pw_hash.clone(),
        owner: Some(user.to_string()),
        members: vec![user.to_string()],
        invited: vec![],
        votekick: conn.shared.config().votekick.enabled,
    };
    let written = conn
        .shared
        .store
        .call(move |db| {
            db.create_room(&row)?;
            Ok(crate::hub::next_ticket())
        })
        .await;
    let ticket = match written {
        Ok(t) => t,
        Err(StoreError::Exists) => {
            return Err(ErrorBody::new(
                ErrorCode::RoomExists,
                format!("a room named {name:?} exists already; choose another name"),
            ));
        }
        Err(e) => return Err(store_error(e)),
    };
    let mut hub = conn.shared.hub.lock();
    hub.insert_room(
        &name,
        Room {
            private,
            pw_hash,
            owner: Some(user.to_string()),
            members: [user.to_string()].into_iter().collect(),
            votekick: conn.shared.config().votekick.enabled,
            ticket,
            ..Default::default()
        },
    );
    // The creator's other connections learn of it too, on every node.
    let c = Conv::Room(name.clone());
    let join = Event::Join {
        room: name.clone(),
        user: user.to_string(),
    };
    broadcast(hub.recipients(&c, &[], Some(conn.sid)), join.clone());
    drop(hub);
    cluster_events::room_changed(&conn.shared, &name, Some(join), Vec::new());
    conn.shared.audit(
        Kind::Join,
        Fields::new()
            .user(user)
            .room(&name)
            .with("created", true)
            .with("private", private),
    );
    Ok(Reply::Joined {
        room: name,
        members: vec![user.to_string()],
    })
}

pub async fn join(
    conn: &Conn,
    user: &str,
    room: String,
    password: Option<String>,
) -> Result<Reply, ErrorBody> {
    let (name, check) = conn
        .shared
        .hub
        .lock()
        .check_join(user, &room, crate::store::now_ms())?;
    if let JoinCheck::Allowed {
        pw_hash: Some(hash),
    } = check.clone()
    {
        let Some(given) = password else {
            return Err(ErrorBody::new(
                ErrorCode::RoomPassword,
                format!("room {name:?} needs a password; pass \"password\""),
            ));
        };
        if !hashing(&conn.shared, move || {
            accounts::verify_password(&given, &hash)
        })
        .await?
        {
            return Err(ErrorBody::new(
                ErrorCode::RoomPassword,
                format!("wrong password for room {name:?}"),
            ));
        }
    }
    let mut ticket = 0;
    if check != JoinCheck::AlreadyMember {
        let (n, u) = (name.clone(), user.to_string());
        ticket = conn
            .shared
            .store
            .call(move |db| {
                db.add_member(&n, &u)?;
                Ok(crate::hub::next_ticket())
            })
            .await
            .map_err(store_error)?;
    }
    if check != JoinCheck::AlreadyMember {
        conn.shared
            .audit(Kind::Join, Fields::new().user(user).room(&name));
    }
    let members: Vec<String> = {
        let mut hub = conn.shared.hub.lock();
        if check != JoinCheck::AlreadyMember {
            hub.add_member(&name, user);
            hub.touch_room(&name, ticket);
            let c = Conv::Room(name.clone());
            let join = Event::Join {
                room: name.clone(),
                user: user.to_string(),
            };
            broadcast(hub.recipients(&c, &[], Some(conn.sid)), join.clone());
            cluster_events::room_changed(&conn.shared, &name, Some(join), Vec::new());
        }
        hub.room(&name)
            .map(|r| r.members.iter().cloned().collect())
            .unwrap_or_default()
    };
    if check != JoinCheck::AlreadyMember {
        super::e2ee::rejoined(&conn.shared, &Conv::Room(name.clone()), user).await;
    }
    Ok(Reply::Joined {
        room: name,
        members,
    })
}

pub async fn part(conn: &Conn, user: &str, room: String) -> Result<Reply, ErrorBody> {
    let name = conn.shared.hub.lock().check_part(user, &room)?;
    let (n, u) = (name.clone(), user.to_string());
    let ticket = conn
        .shared
        .store
        .call(move |db| {
            db.remove_member(&n, &u)?;
            Ok(crate::hub::next_ticket())
        })
        .await
        .map_err(store_error)?;
    conn.shared
        .audit(Kind::Part, Fields::new().user(user).room(&name));
    let c = Conv::Room(name.clone());
    {
        let mut hub = conn.shared.hub.lock();
        let event = Event::Part {
            room: name.clone(),
            user: user.to_string(),
        };
        // Tell the members (before removal, so the parting user's other connections hear it too).
        broadcast(hub.recipients(&c, &[], Some(conn.sid)), event.clone());
        hub.remove_member(&name, user);
        hub.touch_room(&name, ticket);
        cluster_events::room_changed(&conn.shared, &name, Some(event), Vec::new());
    }
    super::e2ee::remove_user(&conn.shared, &c, user).await;
    Ok(Reply::Ok)
}

pub async fn invite(conn: &Conn, by: &str, room: String, user: String) -> Result<Reply, ErrorBody> {
    let (name, invitee) = conn.shared.hub.lock().check_invite(by, &room, &user)?;
    let (n, u) = (name.clone(), invitee.clone());
    let ticket = conn
        .shared
        .store
        .call(move |db| {
            db.add_room_invite(&n, &u)?;
            Ok(crate::hub::next_ticket())
        })
        .await
        .map_err(store_error)?;
    let mut hub = conn.shared.hub.lock();
    hub.add_invite(&name, &invitee);
    hub.touch_room(&name, ticket);
    let invited = Event::Invited {
        room: name.clone(),
        by: by.to_string(),
    };
    broadcast(
        hub.sessions_of(std::iter::once(invitee.as_str()), None),
        invited.clone(),
    );
    drop(hub);
    // Shown on the other nodes once they read the invitation, so the invitee can join there.
    cluster_events::room_changed(&conn.shared, &name, Some(invited), vec![invitee]);
    Ok(Reply::Ok)
}
