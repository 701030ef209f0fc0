//! The operator's console: a Unix socket in the data directory (`admin.sock`, mode 0600, in a
//! 0700 directory), so only the server's own OS user can use it. One JSON object per line in,
//! one per line out: `{"cmd":"who"}` → `{"ok":true,"connections":[...]}` or
//! `{"error":{"code":..,"message":..}}`. `conclave admin` is its client.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use conclave_proto::{ErrorBody, ErrorCode, Event, names};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::bus::ClusterEvent;
use crate::cluster_events;
use crate::cmd::{admin, moderation, store_error};
use crate::conn::broadcast;
use crate::state::{Shared, clip};
use crate::store::{StoreError, now_ms};
use crate::{accounts, config};

/// File name of the socket inside the data directory.
pub const SOCKET_FILE: &str = "admin.sock";
/// Longest request line.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The socket's path for a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Binds the socket. Refuses when another server answers on it (two servers on one data
/// directory would corrupt each other's view); removes a stale file otherwise.
pub async fn bind(data_dir: &Path) -> Result<UnixListener, String> {
    let path = socket_path(data_dir);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(format!(
                "another conclave server is running on {} (its admin socket answers); stop it first or use another --data-dir",
                data_dir.display()
            ));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot create the admin socket {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the socket until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(handle(shared.clone(), stream));
                }
            }
        }
    }
    let _ = std::fs::remove_file(socket_path(&shared.config().data_dir));
}

async fn handle(shared: Arc<Shared>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        // Bounded read: a line longer than the limit is refused without buffering it all.
        let n = match AsyncReadExt::take(&mut lines, MAX_LINE_BYTES as u64 + 1)
            .read_line(&mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let reply = if n > MAX_LINE_BYTES {
            error(ErrorCode::TooLarge, "request line too long")
        } else if line.trim().is_empty() {
            continue;
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(req) => run(&shared, &req).await.unwrap_or_else(
                    |e| json!({"error": {"code": e.code.as_str(), "message": e.message}}),
                ),
                Err(e) => error(ErrorCode::BadRequest, &format!("not JSON: {e}")),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        if n > MAX_LINE_BYTES {
            return;
        }
    }
}

fn error(code: ErrorCode, message: &str) -> Value {
    json!({"error": {"code": code.as_str(), "message": message}})
}

fn bad(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, message)
}

fn str_field(req: &Value, key: &str) -> Option<String> {
    req.get(key).and_then(Value::as_str).map(str::to_string)
}

fn need(req: &Value, key: &str) -> Result<String, ErrorBody> {
    str_field(req, key).ok_or_else(|| bad(format!("\"{key}\" is required")))
}

/// Parses a duration like `90s`, `15m`, `2h`, `7d` (or a plain number of seconds).
pub fn parse_duration_s(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write 90s, 15m, 2h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: write 90s, 15m, 2h or 7d"
            ));
        }
    };
    Ok(n.saturating_mul(mult))
}

fn ban_json(b: &crate::guard::Ban) -> Value {
    json!({
        "kind": b.target.kind(), "target": b.target.value(), "until_ms": b.until_ms,
        "reason": b.reason, "by": b.by, "created_ms": b.created_ms,
    })
}

/// Runs one operator command.
async fn run(shared: &Arc<Shared>, req: &Value) -> Result<Value, ErrorBody> {
    let result = run_inner(shared, req).await;
    let mut args = req.clone();
    if let Some(obj) = args.as_object_mut() {
        obj.remove("password");
        obj.remove("text");
    }
    let mut fields = crate::audit::Fields::new()
        .with("cmd", req.get("cmd").cloned().unwrap_or(Value::Null))
        .with("args", args)
        .with("ok", result.is_ok());
    if let Err(e) = &result {
        fields = fields.reason(e.message.clone());
    }
    // Read-only queries are not worth a record each.
    let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
    let read_only = matches!(
        cmd,
        "who" | "bans" | "rooms" | "stats" | "user_list" | "monitor"
    ) || req.get("op").and_then(Value::as_str) == Some("list");
    if !read_only {
        // Announcements have their own kind, so `conclave logs --kind announce` finds them
        // whether an operator or an admin's client sent them.
        let kind = if cmd == "announce" {
            crate::audit::Kind::Announce
        } else {
            crate::audit::Kind::Admin
        };
        shared.audit(kind, fields);
    }
    result
}

async fn run_inner(shared: &Arc<Shared>, req: &Value) -> Result<Value, ErrorBody> {
    let cmd = need(req, "cmd")?;
    let operator = "operator";
    Ok(match cmd.as_str() {
        "who" => {
            let conns: Vec<Value> = shared
                .registry
                .snapshot()
                .into_iter()
                .map(|c| {
                    json!({
                        "id": c.sid, "user": c.user, "ip": c.peer.ip().to_string(), "port": c.peer.port(),
                        "tls": c.tls_version, "cipher": c.cipher, "key_exchange": c.kx_group, "since_ms": c.since_ms,
                        "bytes_in": c.counters.bytes_in.load(Ordering::Relaxed),
                        "bytes_out": c.counters.bytes_out.load(Ordering::Relaxed),
                        "frames_in": c.counters.frames_in.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json!({"ok": true, "connections": conns})
        }
        "kick" => {
            let user = names::canonical(&need(req, "user")?).map_err(|e| bad(e.to_string()))?;
            let reason = str_field(req, "reason").unwrap_or_else(|| "no reason given".into());
            match str_field(req, "room") {
                Some(room) => {
                    let room = names::canonical_room(&room).map_err(|e| bad(e.to_string()))?;
                    let member = shared
                        .hub
                        .lock()
                        .room(&room)
                        .map(|r| r.members.contains(&user));
                    match member {
                        None => {
                            return Err(ErrorBody::new(
                                ErrorCode::NoSuchRoom,
                                format!("there is no room {room:?}"),
                            ));
                        }
                        Some(false) => {
                            return Err(ErrorBody::new(
                                ErrorCode::NoSuchUser,
                                format!("{user:?} is not a member of {room:?}"),
                            ));
                        }
                        Some(true) => {}
                    }
                    moderation::remove_from_room(
                        shared, None, &room, &user, operator, &reason, None,
                    )
                    .await?;
                    json!({"ok": true})
                }
                None => {
                    let n = admin::kick_from_server(shared, &user, operator, &reason);
                    if n == 0 && !shared.hub.lock().online(&user) {
                        return Err(ErrorBody::new(
                            ErrorCode::NoSuchUser,
                            format!("{user:?} is not connected"),
                        ));
                    }
                    json!({"ok": true, "connections_closed": n})
                }
            }
        }
        "ban" => {
            let target = moderation::ban_target(str_field(req, "user"), str_field(req, "ip"))?;
            let duration_ms = match str_field(req, "duration") {
                None => None,
                Some(d) => Some(
                    (parse_duration_s(&d)
                        .map_err(bad)?
                        .min(i64::MAX as u64 / 1000)
                        * 1000) as i64,
                ),
            };
            let reason = str_field(req, "reason").unwrap_or_default();
            let ban = admin::ban(shared, operator, target, duration_ms, reason).await?;
            json!({"ok": true, "ban": ban_json(&ban)})
        }
        "unban" => {
            let target = moderation::ban_target(str_field(req, "user"), str_field(req, "ip"))?;
            admin::unban(shared, operator, target).await?;
            json!({"ok": true})
        }
        "bans" => {
            let bans: Vec<Value> = shared.guard().bans(now_ms()).iter().map(ban_json).collect();
            json!({"ok": true, "bans": bans})
        }
        "announce" => {
            let text = need(req, "text")?;
            if text.len() > shared.config().limits.max_message_bytes {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    "the announcement is too long",
                ));
            }
            let hub = shared.hub.lock();
            shared.metrics.announce(hub.all_sessions().count());
            broadcast(
                hub.all_sessions(),
                Event::Announce {
                    from: operator.to_string(),
                    text: text.clone(),
                    ts_ms: now_ms(),
                },
            );
            drop(hub);
            // Everyone online on every node.
            shared.publish(ClusterEvent::Announce {
                from: operator.to_string(),
                text: clip(&text, crate::bus::MAX_ANNOUNCE_BYTES),
            });
            json!({"ok": true})
        }
        "rooms" => {
            let rooms = shared.hub.lock().rooms_visible_to(None);
            let rooms: Vec<Value> = rooms
                .into_iter()
                .map(|r| {
                    let e2ee = shared.e2ee.is_e2ee(&format!("r:{}", r.room));
                    json!({"room": r.room, "private": r.private, "has_password": r.has_password,
                           "members": r.members, "online": r.online, "owner": r.owner,
                           "e2ee": e2ee})
                })
                .collect();
            json!({"ok": true, "rooms": rooms})
        }
        "stats" => {
            let conns = shared.registry.snapshot();
            let (bytes_in, bytes_out) = conns.iter().fold((0u64, 0u64), |(i, o), c| {
                (
                    i + c.counters.bytes_in.load(Ordering::Relaxed),
                    o + c.counters.bytes_out.load(Ordering::Relaxed),
                )
            });
            let online = shared
                .hub
                .lock()
                .who("", None)
                .map(|v| v.len())
                .unwrap_or(0);
            json!({
                "ok": true,
                "connections": conns.len(),
                "users_online": online,
                "rooms": shared.hub.lock().rooms_visible_to(None).len(),
                "bans": shared.guard().bans(now_ms()).len(),
                "uptime_s": shared.started.elapsed().as_secs(),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
            })
        }
        "reload" => {
            shared.reload().await.map_err(|e| {
                ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!("{e}; the previous configuration stays in force"),
                )
            })?;
            json!({"ok": true})
        }
        "allow" | "deny" => ip_rule(shared, &cmd, req).await?,
        "monitor" => crate::monitor::snapshot(shared, req)?,
        "canary" => json!({"ok": true, "canary": crate::canary::plant(shared).await?}),
        "user_list" => {
            let users = shared
                .store
                .call(|db| db.users())
                .await
                .map_err(store_error)?;
            let hub = shared.hub.lock();
            let users: Vec<Value> = users
                .iter()
                .map(|u| json!({"user": u.name, "admin": u.admin, "online": hub.online(&u.name)}))
                .collect();
            json!({"ok": true, "users": users})
        }
        "user_add" => {
            let name = names::canonical_new_account(&need(req, "user")?)
                .map_err(|e| ErrorBody::new(ErrorCode::InvalidName, e.to_string()))?;
            let password = need(req, "password")?;
            let is_admin = req.get("admin").and_then(Value::as_bool).unwrap_or(false);
            accounts::check_new_password(&password).map_err(bad)?;
            let hash = crate::cmd::hashing(shared, move || accounts::hash_password(&password))
                .await?
                .map_err(|m| ErrorBody::new(ErrorCode::Internal, m))?;
            let room = shared.config().default_room.clone();
            let (n, r) = (name.clone(), room.clone());
            match shared
                .store
                .call(move |db| {
                    db.create_user(&n, &hash, is_admin)?;
                    db.add_member(&r, &n)
                })
                .await
            {
                Ok(()) => {}
                Err(StoreError::Exists) => {
                    return Err(ErrorBody::new(
                        ErrorCode::NameTaken,
                        format!("the account {name:?} exists already"),
                    ));
                }
                Err(e) => return Err(store_error(e)),
            }
            {
                let mut hub = shared.hub.lock();
                hub.upsert_user(&name, is_admin);
                hub.add_member(&room, &name);
            }
            shared.publish(ClusterEvent::AccountChanged { user: name.clone() });
            cluster_events::room_changed(shared, &room, None, Vec::new());
            json!({"ok": true, "user": name, "admin": is_admin})
        }
        "user_del" => {
            let name = names::canonical(&need(req, "user")?).map_err(|e| bad(e.to_string()))?;
            let n = name.clone();
            let existed = shared
                .store
                .call(move |db| db.delete_user(&n))
                .await
                .map_err(store_error)?;
            if !existed {
                return Err(ErrorBody::new(
                    ErrorCode::NoSuchUser,
                    format!("there is no account {name:?}"),
                ));
            }
            shared.registry.close_user(
                &name,
                conclave_proto::DisconnectReason::Kicked,
                "your account was deleted",
            );
            shared.hub.lock().remove_user(&name);
            // Every node closes its connections and forgets it.
            shared.publish(ClusterEvent::AccountChanged { user: name.clone() });
            json!({"ok": true})
        }
        "user_passwd" => {
            let name = names::canonical(&need(req, "user")?).map_err(|e| bad(e.to_string()))?;
            let password = need(req, "password")?;
            accounts::check_new_password(&password).map_err(bad)?;
            let hash = crate::cmd::hashing(shared, move || accounts::hash_password(&password))
                .await?
                .map_err(|m| ErrorBody::new(ErrorCode::Internal, m))?;
            let n = name.clone();
            let found = shared
                .store
                .call(move |db| db.set_password(&n, &hash))
                .await
                .map_err(store_error)?;
            if !found {
                return Err(ErrorBody::new(
                    ErrorCode::NoSuchUser,
                    format!("there is no account {name:?}"),
                ));
            }
            json!({"ok": true})
        }
        "user_admin" => {
            let name = names::canonical(&need(req, "user")?).map_err(|e| bad(e.to_string()))?;
            let Some(is_admin) = req.get("admin").and_then(Value::as_bool) else {
                return Err(bad(
                    "\"admin\" must be true (give the role) or false (take it)",
                ));
            };
            let n = name.clone();
            let found = shared
                .store
                .call(move |db| db.set_admin(&n, is_admin))
                .await
                .map_err(store_error)?;
            if !found {
                return Err(ErrorBody::new(
                    ErrorCode::NoSuchUser,
                    format!("there is no account {name:?} (conclave user list shows them)"),
                ));
            }
            // The hub decides every permission, so the change holds at once, also for the
            // account's live sessions.
            shared.hub.lock().upsert_user(&name, is_admin);
            shared.publish(ClusterEvent::AccountChanged { user: name.clone() });
            json!({"ok": true, "user": name, "admin": is_admin})
        }
        "user_invite" => {
            let code = accounts::new_invite_code();
            let hash = accounts::invite_code_hash(&code);
            shared
                .store
                .call(move |db| db.add_invite_code(&hash))
                .await
                .map_err(store_error)?;
            json!({"ok": true, "code": code})
        }
        other => {
            return Err(bad(format!(
                "unknown command {other:?}; see `conclave admin --help`"
            )));
        }
    })
}

async fn ip_rule(shared: &Arc<Shared>, action: &str, req: &Value) -> Result<Value, ErrorBody> {
    let op = need(req, "op")?;
    match op.as_str() {
        "list" => {
            let (allow, deny) = shared
                .store
                .call(|db| db.ip_rules())
                .await
                .map_err(store_error)?;
            let config = shared.config();
            let (fixed, stored) = if action == "allow" {
                (&config.security.allow, allow)
            } else {
                (&config.security.deny, deny)
            };
            Ok(json!({
                "ok": true,
                "from_config": fixed,
                "stored": stored.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            }))
        }
        "add" | "del" => {
            let net = config::parse_net(&need(req, "cidr")?).map_err(bad)?;
            let add = op == "add";
            let a = action.to_string();
            let changed = shared
                .store
                .call(move |db| db.set_ip_rule(&a, &net, add))
                .await
                .map_err(store_error)?;
            if !changed && !add {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("{net} is not in the stored {action} list"),
                ));
            }
            // Closes live connections the new lists refuse, on every node.
            shared.apply_rules(&shared.config()).await.map_err(bad)?;
            shared.publish(ClusterEvent::IpRulesChanged);
            Ok(json!({"ok": true, "changed": changed}))
        }
        other => Err(bad(format!(
            "unknown operation {other:?}: use add, del or list"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("90s"), Ok(90));
        assert_eq!(parse_duration_s("15m"), Ok(900));
        assert_eq!(parse_duration_s("2h"), Ok(7200));
        assert_eq!(parse_duration_s("7d"), Ok(604_800));
        assert_eq!(parse_duration_s("30"), Ok(30));
        assert!(parse_duration_s("soon").is_err());
        assert!(parse_duration_s("5w").is_err());
    }
}
