//! The hub: who is online, which rooms exist and who is in them, and every decision about who
//! may do what and who receives what.
//!
//! It is plain state with no I/O, generic over the handle `O` used to reach a connection, so
//! tests drive it directly with any handle type. The server keeps one `Hub` behind a mutex and
//! writes every change through to the store before applying it here.
//!
//! In a cluster it also keeps what the other nodes said about presence (a user is online while
//! any node's word holds: [`Hub::set_remote`], [`Hub::expire_remote`]), counts their votes
//! ([`Hub::record_remote_vote`]), and takes rooms read again from the store only when nothing
//! newer was applied ([`next_ticket`], [`Hub::refresh_room`]); `cluster_events` drives it.

use std::collections::{BTreeSet, HashMap, HashSet};

use conclave_proto::{Conv, ErrorBody, ErrorCode, RoomInfo, Target, UserPresence, names};

use crate::store::RoomRow;

/// Identifies one connection.
pub type SessionId = u64;

/// Hashes session ids (counted by the server, never chosen by a peer) with one multiply
/// instead of SipHash: the fan-out looks one up per recipient of every message.
#[derive(Default, Clone, Copy)]
pub struct SessionIdHasher(u64);

impl std::hash::Hasher for SessionIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads consecutive ids over the high bits too.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type SessionMap<V> = HashMap<SessionId, V, std::hash::BuildHasherDefault<SessionIdHasher>>;

/// Limits the hub enforces.
#[derive(Debug, Clone)]
pub struct HubLimits {
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_rooms: usize,
}

/// A room as the hub knows it.
#[derive(Debug, Clone, Default)]
pub struct Room {
    pub private: bool,
    pub pw_hash: Option<String>,
    pub owner: Option<String>,
    pub members: BTreeSet<String>,
    pub invited: HashSet<String>,
    pub votekick: bool,
    /// Users kept out until a time (ms): vote-kicked.
    pub banned_until: HashMap<String, i64>,
    /// Vote-kicks under way: target → (voter, when).
    pub votes: HashMap<String, Vec<(String, i64)>>,
    /// The store ticket ([`next_ticket`]) of the newest store state applied to this room (a
    /// write here, or a read after another node's change); an older read is not applied.
    pub ticket: u64,
}

/// Store tickets: taken *on the store thread*, inside the closure of a room's write or read,
/// so they count in the order the store ran them (one store thread, one connection). A
/// cluster node reads a room again when another node changed it; the answer is applied only
/// if nothing newer was (a local write, or a later read), whatever order the tasks resume in.
static TICKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The next store ticket. Call it inside a store closure.
pub fn next_ticket() -> u64 {
    TICKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The most nodes a user can be online on at once, as this hub keeps it (a bound on what other
/// nodes' presence can make it hold: accounts × this).
pub const MAX_REMOTE_NODES: usize = 64;

/// How vote-kicks are counted.
#[derive(Debug, Clone)]
pub struct VoteRules {
    pub votes: u32,
    pub fraction: f64,
    pub window_ms: i64,
}

/// A counted vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteTally {
    pub room: String,
    pub target: String,
    pub votes: u32,
    pub needed: u32,
    /// The threshold was reached: the caller removes the target.
    pub kicked: bool,
}

#[derive(Debug, Default)]
struct User {
    admin: bool,
    sessions: Vec<SessionId>,
}

/// What a join needs before it can be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinCheck {
    /// Already a member: nothing to do.
    AlreadyMember,
    /// May join; if `pw_hash` is set the given password must verify against it first.
    Allowed { pw_hash: Option<String> },
}

/// A send that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSend {
    pub conv: Conv,
    pub except: Vec<String>,
}

/// The hub's state.
pub struct Hub<O> {
    limits: HubLimits,
    users: HashMap<String, User>,
    rooms: HashMap<String, Room>,
    /// Connection → (user, handle, live). A connection is live once it has caught up: only
    /// then does it receive new messages, so catch-up and live traffic never overlap.
    sessions: SessionMap<(String, O, bool)>,
    /// How many of `sessions` are not live yet.
    waiting: usize,
    /// Users online on other nodes of a cluster: user → node → until when (ms) that node's
    /// word holds. Only known accounts, at most [`MAX_REMOTE_NODES`] nodes each.
    remote: HashMap<String, HashMap<String, i64>>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

fn no_such_room(room: &str) -> ErrorBody {
    err(
        ErrorCode::NoSuchRoom,
        format!("there is no room {room:?} that you can see; `rooms` lists the ones you can"),
    )
}

impl<O> Hub<O> {
    /// A hub over the stored accounts `(name, admin)` and rooms.
    pub fn new(
        limits: HubLimits,
        users: impl IntoIterator<Item = (String, bool)>,
        rooms: impl IntoIterator<Item = RoomRow>,
    ) -> Self {
        let users = users
            .into_iter()
            .map(|(name, admin)| {
                (
                    name,
                    User {
                        admin,
                        sessions: Vec::new(),
                    },
                )
            })
            .collect();
        let rooms = rooms
            .into_iter()
            .map(|r| {
                (
                    r.name,
                    Room {
                        private: r.private,
                        pw_hash: r.pw_hash,
                        owner: r.owner,
                        members: r.members.into_iter().collect(),
                        invited: r.invited.into_iter().collect(),
                        votekick: r.votekick,
                        banned_until: HashMap::new(),
                        votes: HashMap::new(),
                        ticket: 0,
                    },
                )
            })
            .collect();
        Hub {
            limits,
            users,
            rooms,
            sessions: SessionMap::default(),
            waiting: 0,
            remote: HashMap::new(),
        }
    }

    /// New limits (config reload).
    pub fn set_limits(&mut self, limits: HubLimits) {
        self.limits = limits;
    }

    /// Forgets an account (deleted): its memberships and invitations.
    pub fn remove_user(&mut self, name: &str) {
        self.users.remove(name);
        self.remote.remove(name);
        for r in self.rooms.values_mut() {
            r.members.remove(name);
            r.invited.remove(name);
        }
    }

    /// Every account this hub knows.
    pub fn users_known(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn knows_user(&self, name: &str) -> bool {
        self.users.contains_key(name)
    }

    /// Learns an account (created or changed while serving).
    pub fn upsert_user(&mut self, name: &str, admin: bool) {
        self.users.entry(name.to_string()).or_default().admin = admin;
    }

    pub fn is_admin(&self, name: &str) -> bool {
        self.users.get(name).is_some_and(|u| u.admin)
    }

    /// Registers a live connection. Returns true when this made the user come online.
    pub fn connect(&mut self, user: &str, sid: SessionId, outbox: O) -> bool {
        let u = self.users.entry(user.to_string()).or_default();
        u.sessions.push(sid);
        let old = self.sessions.insert(sid, (user.to_string(), outbox, false));
        if !matches!(old, Some((_, _, false))) {
            self.waiting += 1;
        }
        u.sessions.len() == 1
    }

    /// Marks a connection as caught up: new messages go to it from now on.
    pub fn set_live(&mut self, sid: SessionId) {
        if let Some(s) = self.sessions.get_mut(&sid)
            && !s.2
        {
            s.2 = true;
            self.waiting -= 1;
        }
    }

    /// Forgets a connection. Returns its user and whether the user went offline.
    pub fn disconnect(&mut self, sid: SessionId) -> Option<(String, bool)> {
        let (user, _, live) = self.sessions.remove(&sid)?;
        if !live {
            self.waiting -= 1;
        }
        let offline = match self.users.get_mut(&user) {
            Some(u) => {
                u.sessions.retain(|s| *s != sid);
                u.sessions.is_empty()
            }
            None => true,
        };
        Some((user, offline))
    }

    /// Online here or on another node of the cluster.
    pub fn online(&self, user: &str) -> bool {
        self.online_here(user) || self.remote.contains_key(user)
    }

    /// Has a connection on this node.
    pub fn online_here(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| !u.sessions.is_empty())
    }

    /// Online on another node of the cluster.
    pub fn online_elsewhere(&self, user: &str) -> bool {
        self.remote.contains_key(user)
    }

    /// Users with a connection on this node, sorted.
    pub fn users_online_here(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .users
            .iter()
            .filter(|(_, u)| !u.sessions.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Node `node` says `user` is online there until `until_ms` (`Some`), or not any more
    /// (`None`). Returns `Some(online)` when this changed whether the user is online anywhere
    /// (so its peers here are told), `None` otherwise. Unknown accounts are ignored, and a user
    /// already online on [`MAX_REMOTE_NODES`] other nodes is not added to another.
    pub fn set_remote(&mut self, node: &str, user: &str, until_ms: Option<i64>) -> Option<bool> {
        if !self.users.contains_key(user) {
            return None;
        }
        let before = self.online(user);
        match until_ms {
            Some(until) => {
                let nodes = self.remote.entry(user.to_string()).or_default();
                if nodes.len() < MAX_REMOTE_NODES || nodes.contains_key(node) {
                    let t = nodes.entry(node.to_string()).or_insert(until);
                    *t = (*t).max(until);
                }
            }
            None => {
                if let Some(nodes) = self.remote.get_mut(user) {
                    nodes.remove(node);
                    if nodes.is_empty() {
                        self.remote.remove(user);
                    }
                }
            }
        }
        let after = self.online(user);
        (before != after).then_some(after)
    }

    /// Forgets what `node` said (it is stopping): the users that went offline everywhere.
    pub fn forget_node(&mut self, node: &str) -> Vec<String> {
        self.expire_where(|n, _| n == node)
    }

    /// Forgets what other nodes said that was not repeated by `now_ms`: the users that went
    /// offline everywhere.
    pub fn expire_remote(&mut self, now_ms: i64) -> Vec<String> {
        self.expire_where(|_, until| until <= now_ms)
    }

    fn expire_where(&mut self, gone: impl Fn(&str, i64) -> bool) -> Vec<String> {
        let mut offline = Vec::new();
        self.remote.retain(|user, nodes| {
            nodes.retain(|n, until| !gone(n, *until));
            if nodes.is_empty() {
                offline.push(user.clone());
            }
            !nodes.is_empty()
        });
        offline.retain(|u| !self.online_here(u));
        offline.sort();
        offline
    }

    /// Replaces `name`'s stored state (what a store read at `ticket` found: `None`, no such
    /// room) unless something newer was applied. Keeps the vote-kick bans and votes (not in
    /// the row). Returns whether it was applied.
    pub fn refresh_room(&mut self, name: &str, row: Option<RoomRow>, ticket: u64) -> bool {
        match (self.rooms.get_mut(name), row) {
            (Some(r), _) if r.ticket >= ticket => false,
            (Some(r), Some(row)) => {
                r.private = row.private;
                r.pw_hash = row.pw_hash;
                r.owner = row.owner;
                r.members = row.members.into_iter().collect();
                r.invited = row.invited.into_iter().collect();
                if r.votekick && !row.votekick {
                    r.votes.clear();
                }
                r.votekick = row.votekick;
                r.ticket = ticket;
                true
            }
            (None, Some(row)) => {
                if self.rooms.len() >= self.limits.max_rooms.saturating_mul(2).max(1) {
                    // The store holds more rooms than this node would ever make: refuse to
                    // grow without bound on another node's word.
                    return false;
                }
                self.rooms.insert(
                    name.to_string(),
                    Room {
                        private: row.private,
                        pw_hash: row.pw_hash,
                        owner: row.owner,
                        members: row.members.into_iter().collect(),
                        invited: row.invited.into_iter().collect(),
                        votekick: row.votekick,
                        ticket,
                        ..Default::default()
                    },
                );
                true
            }
            (_, None) => false,
        }
    }

    /// Records that a local write to `room` ran at store ticket `ticket`.
    pub fn touch_room(&mut self, room: &str, ticket: u64) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.ticket = r.ticket.max(ticket);
        }
    }

    /// Counts a vote cast on another node (`ClusterEvent::Vote`): only when vote-kick is on in
    /// `room` and both are members, once per voter within `window_ms` of `now_ms`. Returns
    /// whether it was counted. Never kicks: the node where the threshold is reached does.
    pub fn record_remote_vote(
        &mut self,
        room: &str,
        target: &str,
        voter: &str,
        at_ms: i64,
        now_ms: i64,
        window_ms: i64,
    ) -> bool {
        let Some(r) = self.rooms.get_mut(room) else {
            return false;
        };
        if !r.votekick
            || voter == target
            || !r.members.contains(voter)
            || !r.members.contains(target)
        {
            return false;
        }
        // A vote from the future counts from now; one outside the window not at all.
        let at = at_ms.min(now_ms);
        if now_ms - at > window_ms {
            return false;
        }
        let votes = r.votes.entry(target.to_string()).or_default();
        votes.retain(|(_, t)| now_ms - t <= window_ms);
        if votes.iter().any(|(v, _)| v == voter) {
            return false;
        }
        votes.push((voter.to_string(), at));
        true
    }

    /// The caught-up connections of `users`' union with `room`'s members (a notice about a
    /// change of members reaches those before and after it).
    pub fn room_sessions_with<'a>(&'a self, room: &str, also: &'a BTreeSet<String>) -> Vec<&'a O> {
        let mut users: BTreeSet<&str> = also.iter().map(String::as_str).collect();
        if let Some(r) = self.rooms.get(room) {
            users.extend(r.members.iter().map(String::as_str));
        }
        users
            .into_iter()
            .filter_map(|u| self.users.get(u))
            .flat_map(|u| u.sessions.iter())
            .filter_map(|s| match self.sessions.get(s) {
                Some((_, o, true)) => Some(o),
                _ => None,
            })
            .collect()
    }

    pub fn room(&self, name: &str) -> Option<&Room> {
        self.rooms.get(name)
    }

    /// Rooms `user` belongs to, sorted.
    pub fn rooms_of(&self, user: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.members.contains(user))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether `user` may see `room` exists: public rooms, or private ones they belong to or
    /// were invited to.
    pub fn can_see(&self, user: &str, room: &Room) -> bool {
        !room.private || room.members.contains(user) || room.invited.contains(user)
    }

    /// Checks a new room's name and that it is free; returns the canonical name.
    pub fn check_create(&self, room: &str) -> Result<String, ErrorBody> {
        let name = names::canonical_room(room)
            .map_err(|e| err(ErrorCode::InvalidName, format!("room name {room:?}: {e}")))?;
        if self.rooms.contains_key(&name) {
            return Err(err(
                ErrorCode::RoomExists,
                format!("a room named {name:?} exists already; choose another name"),
            ));
        }
        if self.rooms.len() >= self.limits.max_rooms {
            return Err(err(
                ErrorCode::TooLarge,
                format!(
                    "the server has reached its limit of {} rooms",
                    self.limits.max_rooms
                ),
            ));
        }
        Ok(name)
    }

    pub fn insert_room(&mut self, name: &str, room: Room) {
        self.rooms.insert(name.to_string(), room);
    }

    /// Whether `user` may join `room`, and what must be checked first.
    pub fn check_join(
        &self,
        user: &str,
        room: &str,
        now_ms: i64,
    ) -> Result<(String, JoinCheck), ErrorBody> {
        let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
        let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
        if r.members.contains(user) {
            return Ok((name, JoinCheck::AlreadyMember));
        }
        if let Some(until) = self.room_banned(&name, user, now_ms) {
            let minutes = ((until - now_ms) + 59_999) / 60_000;
            return Err(err(
                ErrorCode::Forbidden,
                format!("you were voted out of {name:?}; you can rejoin in {minutes} minute(s)"),
            ));
        }
        if r.private && !r.invited.contains(user) && !self.is_admin(user) {
            // The same answer as for a room that does not exist: private rooms stay hidden.
            return Err(no_such_room(room));
        }
        // An invitation lets the invitee in without the room's password.
        let pw_hash = if r.invited.contains(user) {
            None
        } else {
            r.pw_hash.clone()
        };
        Ok((name, JoinCheck::Allowed { pw_hash }))
    }

    pub fn add_member(&mut self, room: &str, user: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.invited.remove(user);
            r.members.insert(user.to_string());
        }
    }

    /// Until when `user` is kept out of `room` (a vote-kick), if they are.
    pub fn room_banned(&self, room: &str, user: &str, now_ms: i64) -> Option<i64> {
        self.rooms
            .get(room)
            .and_then(|r| r.banned_until.get(user))
            .copied()
            .filter(|u| *u > now_ms)
    }

    /// Keeps `user` out of `room` until `until_ms`.
    pub fn ban_from_room(&mut self, room: &str, user: &str, until_ms: i64) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.banned_until.insert(user.to_string(), until_ms);
        }
    }

    /// Checks a kick of `target` from `room` by `by`: admins anywhere, owners in their room.
    /// Returns the canonical room and target names.
    pub fn check_kick(
        &self,
        by: &str,
        room: &str,
        target: &str,
    ) -> Result<(String, String), ErrorBody> {
        let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
        let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
        if !self.can_see(by, r) && !self.is_admin(by) {
            return Err(no_such_room(room));
        }
        if !(self.is_admin(by) || r.owner.as_deref() == Some(by)) {
            return Err(err(
                ErrorCode::Forbidden,
                format!("only admins and the owner of {name:?} can kick from it; try votekick"),
            ));
        }
        let target = names::canonical(target).unwrap_or_else(|_| target.to_string());
        if target == by {
            return Err(err(
                ErrorCode::BadRequest,
                "you cannot kick yourself; part instead",
            ));
        }
        if !r.members.contains(&target) {
            return Err(err(
                ErrorCode::NoSuchUser,
                format!("{target:?} is not a member of {name:?}"),
            ));
        }
        Ok((name, target))
    }

    /// Counts `voter`'s vote to kick `target` out of `room`.
    pub fn vote(
        &mut self,
        voter: &str,
        room: &str,
        target: &str,
        now_ms: i64,
        rules: &VoteRules,
    ) -> Result<VoteTally, ErrorBody> {
        let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
        let target = names::canonical(target).unwrap_or_else(|_| target.to_string());
        let online: u32 = {
            let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
            if !r.members.contains(voter) {
                if !self.can_see(voter, r) {
                    return Err(no_such_room(room));
                }
                return Err(err(
                    ErrorCode::NotMember,
                    format!("only members of {name:?} can vote there; join it first"),
                ));
            }
            if !r.votekick {
                return Err(err(
                    ErrorCode::Forbidden,
                    format!("vote-kick is turned off in {name:?}"),
                ));
            }
            if target == voter {
                return Err(err(
                    ErrorCode::BadRequest,
                    "you cannot vote to kick yourself",
                ));
            }
            if !r.members.contains(&target) {
                return Err(err(
                    ErrorCode::NoSuchUser,
                    format!("{target:?} is not a member of {name:?}"),
                ));
            }
            r.members
                .iter()
                .filter(|m| **m != target && self.online(m))
                .count() as u32
        };
        let needed = rules
            .votes
            .max((rules.fraction * f64::from(online)).ceil() as u32)
            .max(1);
        let Some(r) = self.rooms.get_mut(&name) else {
            return Err(no_such_room(room));
        };
        let votes = r.votes.entry(target.clone()).or_default();
        votes.retain(|(_, at)| now_ms - at <= rules.window_ms);
        if votes.iter().any(|(v, _)| v == voter) {
            return Err(err(
                ErrorCode::BadRequest,
                format!("you already voted to kick {target:?}"),
            ));
        }
        votes.push((voter.to_string(), now_ms));
        let count = votes.len() as u32;
        let kicked = count >= needed;
        if kicked {
            r.votes.remove(&target);
        }
        Ok(VoteTally {
            room: name,
            target,
            votes: count,
            needed,
            kicked,
        })
    }

    /// Turns vote-kick on or off; only the owner or an admin.
    pub fn check_set_room(&self, by: &str, room: &str) -> Result<String, ErrorBody> {
        let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
        let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
        if !(self.is_admin(by) || r.owner.as_deref() == Some(by)) {
            if !self.can_see(by, r) {
                return Err(no_such_room(room));
            }
            return Err(err(
                ErrorCode::Forbidden,
                format!("only admins and the owner of {name:?} can change it"),
            ));
        }
        Ok(name)
    }

    pub fn set_votekick(&mut self, room: &str, on: bool) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.votekick = on;
            if !on {
                r.votes.clear();
            }
        }
    }

    /// Checks a part; returns the canonical room name.
    pub fn check_part(&self, user: &str, room: &str) -> Result<String, ErrorBody> {
        let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
        let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
        if !r.members.contains(user) {
            if !self.can_see(user, r) {
                return Err(no_such_room(room));
            }
            return Err(err(
                ErrorCode::NotMember,
                format!("you are not a member of {name:?}"),
            ));
        }
        Ok(name)
    }

    pub fn remove_member(&mut self, room: &str, user: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.members.remove(user);
        }
    }

    /// Checks an invitation; returns the canonical room and user names.
    pub fn check_invite(
        &self,
        by: &str,
        room: &str,
        user: &str,
    ) -> Result<(String, String), ErrorBody> {
        let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
        let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
        if !r.members.contains(by) {
            if !self.can_see(by, r) {
                return Err(no_such_room(room));
            }
            return Err(err(
                ErrorCode::NotMember,
                format!("only members of {name:?} can invite to it; join it first"),
            ));
        }
        let invitee = names::canonical(user).ok().filter(|u| self.knows_user(u));
        let Some(invitee) = invitee else {
            return Err(err(
                ErrorCode::NoSuchUser,
                format!("there is no user {user:?}"),
            ));
        };
        if r.members.contains(&invitee) {
            return Err(err(
                ErrorCode::BadRequest,
                format!("{invitee:?} is already a member of {name:?}"),
            ));
        }
        Ok((name, invitee))
    }

    pub fn add_invite(&mut self, room: &str, user: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.invited.insert(user.to_string());
        }
    }

    /// Resolves user names to canonical known accounts, or names the unknown ones.
    fn resolve_users(&self, names_in: &[String], what: &str) -> Result<Vec<String>, ErrorBody> {
        let mut known = BTreeSet::new();
        let mut unknown = Vec::new();
        for n in names_in {
            match names::canonical(n) {
                Ok(c) if self.knows_user(&c) => {
                    known.insert(c);
                }
                _ => unknown.push(n.clone()),
            }
        }
        if !unknown.is_empty() {
            return Err(err(
                ErrorCode::NoSuchUser,
                format!("no such user in {what}: {}", unknown.join(", ")),
            ));
        }
        Ok(known.into_iter().collect())
    }

    /// Names in `names_in` that are not known accounts (so the caller can look them up in the
    /// store before refusing).
    pub fn unknown_users(&self, names_in: &[String]) -> Vec<String> {
        names_in
            .iter()
            .filter_map(|n| names::canonical(n).ok().or_else(|| Some(n.clone())))
            .filter(|c| !self.knows_user(c))
            .collect()
    }

    /// Checks a send from `from` and decides its conversation.
    pub fn check_send(
        &self,
        from: &str,
        target: &Target,
        body_bytes: usize,
    ) -> Result<CheckedSend, ErrorBody> {
        if body_bytes > self.limits.max_message_bytes {
            return Err(err(
                ErrorCode::TooLarge,
                format!(
                    "the message is {body_bytes} bytes; the limit is {} (send long text as a file)",
                    self.limits.max_message_bytes
                ),
            ));
        }
        match target {
            Target::Room { room, except } => {
                let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
                let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
                if !r.members.contains(from) {
                    if !self.can_see(from, r) {
                        return Err(no_such_room(room));
                    }
                    return Err(err(
                        ErrorCode::NotMember,
                        format!("you are not a member of {name:?}; join it first"),
                    ));
                }
                if except.len() > self.limits.max_recipients {
                    return Err(err(
                        ErrorCode::TooLarge,
                        format!(
                            "at most {} users in an except list",
                            self.limits.max_recipients
                        ),
                    ));
                }
                let except = self.resolve_users(except, "except")?;
                Ok(CheckedSend {
                    conv: Conv::Room(name),
                    except,
                })
            }
            Target::Users { to } => {
                if to.is_empty() {
                    return Err(err(
                        ErrorCode::BadRequest,
                        "a direct message needs at least one user in \"to\"",
                    ));
                }
                if to.len() > self.limits.max_recipients {
                    return Err(err(
                        ErrorCode::TooLarge,
                        format!(
                            "at most {} users in one direct message",
                            self.limits.max_recipients
                        ),
                    ));
                }
                let mut participants = self.resolve_users(to, "to")?;
                if !participants.iter().any(|p| p == from) {
                    participants.push(from.to_string());
                    participants.sort();
                }
                Ok(CheckedSend {
                    conv: Conv::Direct(participants),
                    except: Vec::new(),
                })
            }
        }
    }

    /// The conversation `viewer` asks history for, if they may read it.
    pub fn check_history(
        &self,
        viewer: &str,
        conv: &conclave_proto::ConvRef,
    ) -> Result<Conv, ErrorBody> {
        match conv {
            conclave_proto::ConvRef::Room(room) => {
                let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
                let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
                if r.private && !r.members.contains(viewer) {
                    return Err(no_such_room(room));
                }
                Ok(Conv::Room(name))
            }
            conclave_proto::ConvRef::With(users) => {
                let mut set: BTreeSet<String> = users
                    .iter()
                    .filter_map(|u| names::canonical(u).ok())
                    .collect();
                if set.is_empty() {
                    return Err(err(
                        ErrorCode::BadRequest,
                        "\"with\" needs at least one user name",
                    ));
                }
                set.insert(viewer.to_string());
                Ok(Conv::Direct(set.into_iter().collect()))
            }
        }
    }

    /// The users who receive a message in `conv`, minus `except`.
    pub fn audience<'a>(
        &'a self,
        conv: &'a Conv,
        except: &'a [String],
    ) -> Box<dyn Iterator<Item = &'a str> + 'a> {
        match conv {
            Conv::Room(room) => match self.rooms.get(room) {
                Some(r) => Box::new(
                    r.members
                        .iter()
                        .map(String::as_str)
                        .filter(move |m| !except.iter().any(|e| e == m)),
                ),
                None => Box::new(std::iter::empty()),
            },
            Conv::Direct(users) => Box::new(users.iter().map(String::as_str)),
        }
    }

    /// The connections of `users`, except `skip` (the connection that caused the event).
    pub fn sessions_of<'a>(
        &'a self,
        users: impl Iterator<Item = &'a str> + 'a,
        skip: Option<SessionId>,
    ) -> impl Iterator<Item = &'a O> + 'a {
        users
            .filter_map(|u| self.users.get(u))
            .flat_map(|u| u.sessions.iter())
            .filter(move |s| Some(**s) != skip)
            .filter_map(|s| self.sessions.get(s).map(|(_, o, _)| o))
    }

    /// Caught-up connections that receive a new message in `conv`.
    pub fn recipients<'a>(
        &'a self,
        conv: &'a Conv,
        except: &'a [String],
        skip: Option<SessionId>,
    ) -> impl Iterator<Item = &'a O> + 'a {
        self.audience(conv, except)
            .filter_map(|u| self.users.get(u))
            .flat_map(|u| u.sessions.iter())
            .filter(move |s| Some(**s) != skip)
            .filter_map(|s| match self.sessions.get(s) {
                Some((_, o, true)) => Some(o),
                _ => None,
            })
    }

    /// Every caught-up connection of a room's members, with its user: what
    /// [`Hub::recipients`] chooses from for the room's messages (before `except` and the
    /// sender's own connection are left out).
    pub fn room_audience(&self, room: &str) -> Vec<(SessionId, &str, &O)> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        r.members
            .iter()
            .filter_map(|m| self.users.get(m).map(|u| (m.as_str(), u)))
            .flat_map(|(m, u)| u.sessions.iter().map(move |s| (m, *s)))
            .filter_map(|(m, s)| match self.sessions.get(&s) {
                Some((_, o, true)) => Some((s, m, o)),
                _ => None,
            })
            .collect()
    }

    /// Every caught-up connection that receives a new message in `conv`, with its user (before
    /// `except` and the sender's own connection are left out): a room's members, or a direct
    /// conversation's participants.
    pub fn live_audience(&self, conv: &Conv) -> Vec<(SessionId, &str, &O)> {
        match conv {
            Conv::Room(room) => self.room_audience(room),
            Conv::Direct(users) => self.sessions_with(users.iter(), true),
        }
    }

    /// Connections that logged in and have not caught up yet, with their users, among those
    /// that receive a new message in `conv` (cluster mode keeps what reaches them meanwhile).
    pub fn waiting_audience(&self, conv: &Conv) -> Vec<(SessionId, &str)> {
        let sessions = match conv {
            Conv::Room(room) => match self.rooms.get(room) {
                Some(r) => self.sessions_with(r.members.iter(), false),
                None => return Vec::new(),
            },
            Conv::Direct(users) => self.sessions_with(users.iter(), false),
        };
        sessions.into_iter().map(|(s, u, _)| (s, u)).collect()
    }

    fn sessions_with<'a, 'b>(
        &'a self,
        users: impl Iterator<Item = &'b String>,
        live: bool,
    ) -> Vec<(SessionId, &'a str, &'a O)> {
        users
            .filter_map(|m| self.users.get_key_value(m.as_str()))
            .flat_map(|(m, u)| u.sessions.iter().map(move |s| (m.as_str(), *s)))
            .filter_map(|(m, s)| match self.sessions.get(&s) {
                Some((_, o, l)) if *l == live => Some((s, m, o)),
                _ => None,
            })
            .collect()
    }

    /// How many connections logged in and have not caught up yet.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether any connection of this node (caught up or not) receives new messages in `conv`.
    pub fn has_local_audience(&self, conv: &Conv) -> bool {
        let online = |u: &String| self.users.get(u).is_some_and(|u| !u.sessions.is_empty());
        match conv {
            Conv::Room(room) => self
                .rooms
                .get(room)
                .is_some_and(|r| r.members.iter().any(online)),
            Conv::Direct(users) => users.iter().any(online),
        }
    }

    /// Whether connection `sid` is registered and caught up.
    pub fn is_live(&self, sid: SessionId) -> bool {
        self.sessions.get(&sid).is_some_and(|s| s.2)
    }

    /// The user of connection `sid`, if registered.
    pub fn session_user(&self, sid: SessionId) -> Option<&str> {
        self.sessions.get(&sid).map(|(u, _, _)| u.as_str())
    }

    /// Whether connection `sid` is still registered.
    pub fn is_connected(&self, sid: SessionId) -> bool {
        self.sessions.contains_key(&sid)
    }

    /// Connections of the users who share a room with `user` (not `user` itself): they see
    /// `user` come and go.
    pub fn presence_audience(&self, user: &str) -> Vec<&O> {
        let mut peers: HashSet<&str> = HashSet::new();
        for r in self.rooms.values() {
            if r.members.contains(user) {
                peers.extend(r.members.iter().map(String::as_str));
            }
        }
        peers.remove(user);
        self.sessions_of(peers.into_iter(), None).collect()
    }

    /// Every live connection.
    pub fn all_sessions(&self) -> impl Iterator<Item = &O> {
        self.sessions.values().map(|(_, o, _)| o)
    }

    fn presence(&self, user: &str) -> UserPresence {
        let u = self.users.get(user);
        UserPresence {
            user: user.to_string(),
            online: self.online(user),
            // This node's connections (another node's are not counted here).
            connections: u.map(|u| u.sessions.len() as u32).unwrap_or(0),
            admin: u.is_some_and(|u| u.admin),
            // Filled in from `presence::Presence` by the caller.
            display_name: None,
            away: None,
        }
    }

    /// `who`: online users, or a room's members with their presence.
    pub fn who(&self, viewer: &str, room: Option<&str>) -> Result<Vec<UserPresence>, ErrorBody> {
        match room {
            None => {
                let mut v: Vec<UserPresence> = self
                    .users
                    .iter()
                    .filter(|(n, u)| !u.sessions.is_empty() || self.remote.contains_key(*n))
                    .map(|(n, _)| self.presence(n))
                    .collect();
                v.sort_by(|a, b| a.user.cmp(&b.user));
                Ok(v)
            }
            Some(room) => {
                let name = names::canonical_room(room).map_err(|_| no_such_room(room))?;
                let r = self.rooms.get(&name).ok_or_else(|| no_such_room(room))?;
                if r.private && !r.members.contains(viewer) {
                    return Err(no_such_room(room));
                }
                Ok(r.members.iter().map(|m| self.presence(m)).collect())
            }
        }
    }

    /// Rooms `viewer` can see (every room when `viewer` is `None`: the operator).
    pub fn rooms_visible_to(&self, viewer: Option<&str>) -> Vec<RoomInfo> {
        let viewer_name = viewer.unwrap_or("");
        let mut v: Vec<RoomInfo> = self
            .rooms
            .iter()
            .filter(|(_, r)| viewer.is_none_or(|u| self.can_see(u, r)))
            .map(|(name, r)| RoomInfo {
                room: name.clone(),
                private: r.private,
                has_password: r.pw_hash.is_some(),
                members: r.members.len() as u32,
                online: r.members.iter().filter(|m| self.online(m)).count() as u32,
                member: r.members.contains(viewer_name),
                owner: r.owner.clone(),
                e2ee: false,
                topic: None,
            })
            .collect();
        v.sort_by(|a, b| a.room.cmp(&b.room));
        v
    }

    /// Rooms `viewer` can see.
    pub fn rooms_visible(&self, viewer: &str) -> Vec<RoomInfo> {
        self.rooms_visible_to(Some(viewer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::ConvRef;

    fn hub() -> Hub<&'static str> {
        let users = ["alice", "bob", "carol", "dave", "mallory"]
            .iter()
            .map(|u| (u.to_string(), *u == "alice"));
        let rooms = vec![
            RoomRow {
                name: "general".into(),
                private: false,
                pw_hash: None,
                owner: None,
                members: vec!["alice".into(), "bob".into(), "carol".into(), "dave".into()],
                invited: vec![],
                votekick: true,
            },
            RoomRow {
                name: "ops".into(),
                private: true,
                pw_hash: None,
                owner: Some("bob".into()),
                members: vec!["bob".into(), "carol".into()],
                invited: vec!["dave".into()],
                votekick: false,
            },
        ];
        let mut h = Hub::new(
            HubLimits {
                max_message_bytes: 100,
                max_recipients: 3,
                max_rooms: 10,
            },
            users,
            rooms,
        );
        for (sid, (u, o)) in [
            ("alice", "alice#1"),
            ("alice", "alice#2"),
            ("bob", "bob#1"),
            ("carol", "carol#1"),
            ("dave", "dave#1"),
            ("mallory", "mallory#1"),
        ]
        .into_iter()
        .enumerate()
        {
            h.connect(u, sid as u64, o);
            h.set_live(sid as u64);
        }
        h
    }

    #[test]
    fn connections_catching_up_are_counted_and_found_apart_from_live_ones() {
        let mut h = hub();
        assert_eq!(h.waiting(), 0);
        let ops = Conv::Room("ops".into());
        let dm = Conv::Direct(vec!["carol".into(), "dave".into()]);
        h.connect("carol", 10, "carol#2");
        h.connect("dave", 11, "dave#2");
        assert_eq!(h.waiting(), 2);
        assert_eq!(h.waiting_audience(&ops), [(10, "carol")]);
        assert_eq!(h.waiting_audience(&dm).len(), 2);
        let live: Vec<SessionId> = h.live_audience(&ops).iter().map(|a| a.0).collect();
        assert_eq!(live, [2, 3], "bob#1 and carol#1, not carol#2");
        h.set_live(10);
        h.set_live(10);
        assert_eq!(h.waiting(), 1, "live once");
        assert!(h.is_live(10) && !h.is_live(11));
        h.disconnect(11);
        assert_eq!(h.waiting(), 0);
        assert!(!h.is_connected(11) && h.session_user(10) == Some("carol"));
        assert!(h.has_local_audience(&ops));
        h.disconnect(2);
        h.disconnect(3);
        h.disconnect(10);
        assert!(!h.has_local_audience(&ops), "nobody of ops is connected");
    }

    fn route(h: &Hub<&'static str>, from: &str, t: Target, skip: SessionId) -> Vec<&'static str> {
        let c = h.check_send(from, &t, 5).expect("allowed");
        let mut v: Vec<_> = h
            .recipients(&c.conv, &c.except, Some(skip))
            .copied()
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_rooms_audience_is_what_recipients_chooses_from() {
        let mut h = hub();
        // A connection not caught up yet is not in it.
        h.connect("carol", 42, "carol#new");
        let conv = Conv::Room("general".into());
        let mut all: Vec<_> = h.recipients(&conv, &[], None).copied().collect();
        let mut audience: Vec<_> = h
            .room_audience("general")
            .into_iter()
            .map(|(_, _, o)| *o)
            .collect();
        all.sort();
        audience.sort();
        assert_eq!(audience, all);
        assert!(!audience.contains(&"carol#new"));
        let users: Vec<_> = h
            .room_audience("ops")
            .into_iter()
            .map(|(sid, u, o)| (sid, u.to_string(), *o))
            .collect();
        assert_eq!(
            users,
            vec![
                (2, "bob".to_string(), "bob#1"),
                (3, "carol".to_string(), "carol#1")
            ]
        );
        assert!(h.room_audience("nowhere").is_empty());
    }

    #[test]
    fn broadcast_reaches_every_member_connection_but_the_origin() {
        let h = hub();
        let got = route(
            &h,
            "bob",
            Target::Room {
                room: "General".into(),
                except: vec![],
            },
            2,
        );
        assert_eq!(got, vec!["alice#1", "alice#2", "carol#1", "dave#1"]);
    }

    #[test]
    fn blockcast_leaves_out_the_excepted() {
        let h = hub();
        let got = route(
            &h,
            "bob",
            Target::Room {
                room: "general".into(),
                except: vec!["Carol".into(), "alice".into()],
            },
            2,
        );
        assert_eq!(got, vec!["dave#1"]);
    }

    #[test]
    fn unicast_and_multicast_reach_only_the_named_and_the_senders_other_connections() {
        let h = hub();
        let got = route(
            &h,
            "alice",
            Target::Users {
                to: vec!["bob".into()],
            },
            0,
        );
        assert_eq!(got, vec!["alice#2", "bob#1"]);
        let got = route(
            &h,
            "bob",
            Target::Users {
                to: vec!["carol".into(), "mallory".into()],
            },
            2,
        );
        assert_eq!(got, vec!["carol#1", "mallory#1"]);
        let c = h
            .check_send(
                "bob",
                &Target::Users {
                    to: vec!["mallory".into(), "carol".into()],
                },
                1,
            )
            .expect("ok");
        assert_eq!(
            c.conv,
            Conv::Direct(vec!["bob".into(), "carol".into(), "mallory".into()])
        );
    }

    #[test]
    fn refusals() {
        let h = hub();
        let code = |r: Result<CheckedSend, ErrorBody>| r.expect_err("refused").code;
        let room = |r: &str| Target::Room {
            room: r.into(),
            except: vec![],
        };
        // Not a member of a private room: looks like it does not exist.
        assert_eq!(
            code(h.check_send("alice", &room("ops"), 1)),
            ErrorCode::NoSuchRoom
        );
        assert_eq!(
            code(h.check_send("alice", &room("nope"), 1)),
            ErrorCode::NoSuchRoom
        );
        // Member of nothing but a public room exists: told to join.
        assert_eq!(
            code(h.check_send("mallory", &room("general"), 1)),
            ErrorCode::NotMember
        );
        let e = h
            .check_send(
                "alice",
                &Target::Users {
                    to: vec!["bob".into(), "zed".into(), "q q".into()],
                },
                1,
            )
            .expect_err("unknown");
        assert_eq!(e.code, ErrorCode::NoSuchUser);
        assert!(
            e.message.contains("zed") && e.message.contains("q q"),
            "{}",
            e.message
        );
        assert_eq!(
            code(h.check_send("alice", &room("general"), 101)),
            ErrorCode::TooLarge
        );
        assert_eq!(
            code(h.check_send("alice", &Target::Users { to: vec![] }, 1)),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(h.check_send(
                "alice",
                &Target::Users {
                    to: vec!["a".into(), "b".into(), "c".into(), "d".into()]
                },
                1
            )),
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn private_rooms_are_hidden_from_non_members() {
        let h = hub();
        assert!(h.rooms_visible("mallory").iter().all(|r| r.room != "ops"));
        assert!(
            h.rooms_visible("dave").iter().any(|r| r.room == "ops"),
            "invited sees it"
        );
        assert_eq!(
            h.check_history("mallory", &ConvRef::Room("ops".into()))
                .expect_err("hidden")
                .code,
            ErrorCode::NoSuchRoom
        );
        assert_eq!(
            h.who("mallory", Some("ops")).expect_err("hidden").code,
            ErrorCode::NoSuchRoom
        );
        assert_eq!(
            h.check_join("mallory", "ops", 0).expect_err("hidden").code,
            ErrorCode::NoSuchRoom
        );
        assert_eq!(
            h.check_join("dave", "ops", 0).expect("invited"),
            ("ops".into(), JoinCheck::Allowed { pw_hash: None })
        );
    }

    #[test]
    fn connections_that_have_not_caught_up_get_no_new_messages() {
        let mut h = hub();
        h.connect("bob", 99, "bob#new");
        let c = Conv::Room("general".into());
        assert!(!h.recipients(&c, &[], None).any(|o| *o == "bob#new"));
        h.set_live(99);
        assert!(h.recipients(&c, &[], None).any(|o| *o == "bob#new"));
    }

    #[test]
    fn vote_kick_counts_distinct_member_votes_in_a_window() {
        let mut h = hub();
        let rules = VoteRules {
            votes: 2,
            fraction: 0.0,
            window_ms: 1000,
        };
        let code = |r: Result<VoteTally, ErrorBody>| r.expect_err("refused").code;
        assert_eq!(
            code(h.vote("mallory", "general", "dave", 0, &rules)),
            ErrorCode::NotMember
        );
        assert_eq!(
            code(h.vote("dave", "general", "dave", 0, &rules)),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(h.vote("bob", "ops", "carol", 0, &rules)),
            ErrorCode::Forbidden,
            "off"
        );
        assert_eq!(
            code(h.vote("bob", "general", "mallory", 0, &rules)),
            ErrorCode::NoSuchUser
        );
        let t = h
            .vote("alice", "general", "Dave", 0, &rules)
            .expect("counted");
        assert_eq!((t.votes, t.needed, t.kicked), (1, 2, false));
        assert_eq!(
            code(h.vote("alice", "general", "dave", 10, &rules)),
            ErrorCode::BadRequest
        );
        // Outside the window the first vote no longer counts.
        let t = h
            .vote("bob", "general", "dave", 2000, &rules)
            .expect("counted");
        assert_eq!((t.votes, t.kicked), (1, false));
        let t = h
            .vote("carol", "general", "dave", 2100, &rules)
            .expect("counted");
        assert_eq!((t.votes, t.needed, t.kicked), (2, 2, true));
        // A fraction of the members online raises the bar: 3 online besides dave.
        let frac = VoteRules {
            votes: 1,
            fraction: 1.0,
            window_ms: 1000,
        };
        let t = h
            .vote("alice", "general", "dave", 0, &frac)
            .expect("counted");
        assert_eq!(t.needed, 3);
    }

    #[test]
    fn kicks_need_an_admin_or_the_owner() {
        let h = hub();
        assert_eq!(
            h.check_kick("bob", "ops", "carol").expect("owner"),
            ("ops".into(), "carol".into())
        );
        assert_eq!(
            h.check_kick("alice", "general", "bob").expect("admin").1,
            "bob"
        );
        assert_eq!(
            h.check_kick("carol", "ops", "bob").expect_err("no").code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            h.check_kick("bob", "ops", "bob").expect_err("self").code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            h.check_kick("mallory", "ops", "bob")
                .expect_err("hidden")
                .code,
            ErrorCode::NoSuchRoom
        );
    }

    #[test]
    fn presence_goes_to_room_peers_only() {
        let mut h = hub();
        let mut got: Vec<_> = h.presence_audience("carol").into_iter().copied().collect();
        got.sort();
        assert_eq!(got, vec!["alice#1", "alice#2", "bob#1", "dave#1"]);
        assert_eq!(h.disconnect(0), Some(("alice".into(), false)));
        assert_eq!(h.disconnect(1), Some(("alice".into(), true)));
        assert!(!h.online("alice"));
    }

    /// A hub whose users have no connection here (only other nodes' word counts).
    fn quiet_hub() -> Hub<&'static str> {
        let users = ["alice", "bob", "carol", "dave"]
            .iter()
            .map(|u| (u.to_string(), false));
        Hub::new(
            HubLimits {
                max_message_bytes: 100,
                max_recipients: 3,
                max_rooms: 10,
            },
            users,
            vec![],
        )
    }

    #[test]
    fn online_while_any_node_says_so_until_its_word_expires() {
        let mut h = quiet_hub();
        assert_eq!(h.set_remote("b", "bob", Some(100)), Some(true));
        assert_eq!(h.set_remote("c", "bob", Some(50)), None, "already online");
        assert!(h.online("bob") && h.online_elsewhere("bob") && !h.online_here("bob"));
        // A heartbeat repeats it: it holds longer; an older one never shortens it.
        assert_eq!(h.set_remote("b", "bob", Some(200)), None);
        assert_eq!(h.set_remote("b", "bob", Some(150)), None);
        assert_eq!(
            h.expire_remote(40),
            Vec::<String>::new(),
            "every word holds"
        );
        assert_eq!(h.set_remote("b", "bob", None), None, "c still says so");
        assert_eq!(h.expire_remote(50), vec!["bob".to_string()]);
        assert!(!h.online("bob"));
        // A local connection keeps him online whatever the others say.
        h.connect("carol", 1, "carol#1");
        h.set_remote("b", "carol", Some(10));
        assert_eq!(h.expire_remote(10), Vec::<String>::new());
        assert!(h.online("carol"));
        // Unknown accounts are not taken on another node's word.
        assert_eq!(h.set_remote("b", "ghost", Some(i64::MAX)), None);
        assert!(!h.online("ghost"));
        // A node that says goodbye takes only its own word back.
        h.set_remote("b", "dave", Some(1000));
        h.set_remote("c", "alice", Some(1000));
        assert_eq!(h.forget_node("b"), vec!["dave".to_string()]);
        assert!(h.online("alice"));
        let who: Vec<String> = h
            .who("alice", None)
            .expect("who")
            .into_iter()
            .map(|u| u.user)
            .collect();
        assert_eq!(who, vec!["alice".to_string(), "carol".to_string()]);
    }

    #[test]
    fn remote_presence_is_bounded_per_user() {
        let mut h = quiet_hub();
        for n in 0..MAX_REMOTE_NODES + 10 {
            h.set_remote(&format!("n{n}"), "bob", Some(100));
        }
        assert_eq!(
            h.remote.get("bob").map(HashMap::len),
            Some(MAX_REMOTE_NODES)
        );
        // A node it holds is still refreshed.
        h.set_remote("n0", "bob", Some(500));
        assert_eq!(h.remote["bob"]["n0"], 500);
    }

    /// Seeded random sequences of presence notices, heartbeats, goodbyes and expiries from
    /// three nodes, against a model: online exactly when some node's word still holds, and
    /// every change of that reported once.
    #[test]
    fn randomized_remote_presence_matches_a_model() {
        use rand::{Rng, SeedableRng};
        let users = ["alice", "bob", "carol", "dave"];
        let nodes = ["x", "y", "z"];
        for seed in 0..50u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut h = quiet_hub();
            let mut model: HashMap<(&str, &str), i64> = HashMap::new();
            let mut now = 0i64;
            let online = |m: &HashMap<(&str, &str), i64>, u: &str| m.keys().any(|(mu, _)| *mu == u);
            for _ in 0..400 {
                let before: Vec<bool> = users.iter().map(|u| online(&model, u)).collect();
                let mut reported: Vec<(String, bool)> = Vec::new();
                let node = nodes[rng.random_range(0..nodes.len())];
                let user = users[rng.random_range(0..users.len())];
                match rng.random_range(0..10) {
                    0..=4 => {
                        let until = now + rng.random_range(1..50);
                        let t = model.entry((user, node)).or_insert(until);
                        *t = (*t).max(until);
                        if let Some(o) = h.set_remote(node, user, Some(until)) {
                            reported.push((user.to_string(), o));
                        }
                    }
                    5..=6 => {
                        model.remove(&(user, node));
                        if let Some(o) = h.set_remote(node, user, None) {
                            reported.push((user.to_string(), o));
                        }
                    }
                    7 => {
                        model.retain(|(_, n), _| *n != node);
                        reported.extend(h.forget_node(node).into_iter().map(|u| (u, false)));
                    }
                    _ => {
                        now += rng.random_range(0..20);
                        model.retain(|_, until| *until > now);
                        reported.extend(h.expire_remote(now).into_iter().map(|u| (u, false)));
                    }
                }
                let mut expected: Vec<(String, bool)> = Vec::new();
                for (i, u) in users.iter().enumerate() {
                    let after = online(&model, u);
                    assert_eq!(h.online(u), after, "seed {seed}: {u}");
                    if after != before[i] {
                        expected.push((u.to_string(), after));
                    }
                }
                reported.sort();
                assert_eq!(reported, expected, "seed {seed}");
            }
        }
    }

    #[test]
    fn an_older_read_of_a_room_never_replaces_a_newer_state() {
        let mut h = hub();
        let row = |members: &[&str]| RoomRow {
            name: "ops".into(),
            private: true,
            pw_hash: None,
            owner: Some("bob".into()),
            members: members.iter().map(|m| m.to_string()).collect(),
            invited: vec![],
            votekick: false,
        };
        h.ban_from_room("ops", "mallory", 99);
        assert!(h.refresh_room("ops", Some(row(&["bob", "carol", "dave"])), 10));
        assert!(!h.refresh_room("ops", Some(row(&["bob"])), 9), "older");
        assert!(!h.refresh_room("ops", Some(row(&["bob"])), 10), "the same");
        let r = h.room("ops").expect("ops");
        assert_eq!(r.members.len(), 3);
        assert_eq!(r.banned_until.get("mallory"), Some(&99), "kept");
        // A local write at a later ticket wins over a read that ran before it.
        h.remove_member("ops", "dave");
        h.touch_room("ops", 12);
        assert!(!h.refresh_room("ops", Some(row(&["bob", "carol", "dave"])), 11));
        assert!(!h.room("ops").expect("ops").members.contains("dave"));
        // A room another node created; a read that finds none removes nothing.
        assert!(h.refresh_room(
            "new",
            Some(RoomRow {
                name: "new".into(),
                ..row(&["alice"])
            }),
            1
        ));
        assert!(h.room("new").is_some_and(|r| r.members.contains("alice")));
        assert!(!h.refresh_room("ops", None, 100));
        assert!(h.room("ops").is_some());
        // Tickets are taken in order.
        let (t1, t2) = (next_ticket(), next_ticket());
        assert!(t2 > t1);
    }

    #[test]
    fn remote_votes_count_only_for_members_in_a_room_that_votes() {
        let mut h = hub();
        let w = 1000;
        assert!(h.record_remote_vote("general", "dave", "bob", 10, 10, w));
        assert!(
            !h.record_remote_vote("general", "dave", "bob", 11, 11, w),
            "once"
        );
        assert!(
            !h.record_remote_vote("general", "dave", "mallory", 10, 10, w),
            "not a member"
        );
        assert!(
            !h.record_remote_vote("general", "dave", "dave", 10, 10, w),
            "self"
        );
        assert!(
            !h.record_remote_vote("ops", "carol", "bob", 10, 10, w),
            "vote-kick off"
        );
        assert!(
            !h.record_remote_vote("general", "carol", "bob", 0, 5000, w),
            "too old"
        );
        assert!(!h.record_remote_vote("nowhere", "carol", "bob", 10, 10, w));
        // A vote from the future counts from now, and a local vote adds to the remote one.
        assert!(h.record_remote_vote("general", "dave", "carol", i64::MAX, 20, w));
        let rules = VoteRules {
            votes: 3,
            fraction: 0.0,
            window_ms: w,
        };
        let t = h
            .vote("alice", "general", "dave", 30, &rules)
            .expect("vote");
        assert_eq!((t.votes, t.needed, t.kicked), (3, 3, true));
    }
}
