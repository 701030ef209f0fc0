//! Helpers shared by the fuzz targets: name checks the server applies to every name in a
//! request, so the fuzzers reach them the way a peer does.

use conclave_proto::{ConvRef, Request, Target};

/// Every user or room name a request carries, as the server would see them.
pub fn names_in(req: &Request) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    match req {
        Request::Login { user, .. } | Request::Register { user, .. } => out.push(user),
        Request::CreateRoom { room, .. } | Request::Join { room, .. } | Request::Part { room } => {
            out.push(room)
        }
        Request::Invite { room, user } | Request::VoteKick { room, user } => {
            out.push(room);
            out.push(user);
        }
        Request::Who { room } => out.extend(room.as_deref()),
        Request::Send { target, .. } => match target {
            Target::Room { room, except } => {
                out.push(room);
                out.extend(except.iter().map(String::as_str));
            }
            Target::Users { to } => out.extend(to.iter().map(String::as_str)),
        },
        Request::History { conv, .. } => match conv {
            ConvRef::Room(r) => out.push(r),
            ConvRef::With(users) => out.extend(users.iter().map(String::as_str)),
        },
        Request::Kick { room, user, .. } => {
            out.extend(room.as_deref());
            out.push(user);
        }
        _ => {}
    }
    out
}
