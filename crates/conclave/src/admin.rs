//! `conclave admin ...`: the operator's console, over the running server's admin socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use conclave_server::admin_socket::socket_path;
use serde_json::{Value, json};

use crate::cli::DataDirArg;

/// How long to wait for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct AdminArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Print the server's raw JSON answer.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Subcommand)]
pub enum AdminAction {
    /// Live connections: user, address, TLS, since, bytes.
    Who,
    /// Remove a user from a room, or (without --room) close all their connections.
    Kick {
        user: String,
        /// Only from this room (they may join it again unless it is private); without it,
        /// every connection of theirs is closed.
        #[arg(long)]
        room: Option<String>,
        /// Why, shown to them and kept in the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Ban a user or an address/network, for a while (--for 2h) or for ever.
    Ban {
        /// The account to ban (or use --ip).
        user: Option<String>,
        /// An address or CIDR network to ban.
        #[arg(long, conflicts_with = "user")]
        ip: Option<String>,
        /// How long: 90s, 15m, 2h, 7d. Without it, for ever.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// Why, shown to them and kept in the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a ban.
    Unban {
        /// The banned account (or use --ip).
        user: Option<String>,
        /// The banned address or CIDR network, as `conclave admin bans` shows it.
        #[arg(long, conflicts_with = "user")]
        ip: Option<String>,
    },
    /// Active bans, with when each ends and the time left.
    Bans,
    /// A notice to everyone online.
    Announce { text: String },
    /// Every room: kind, end-to-end or encrypted at rest, members, owner.
    Rooms,
    /// Server totals.
    Stats,
    /// Read the config file again (IP lists, limits, policies); on error the old one stays.
    Reload,
    /// The allow list (only these networks may connect when it is not empty).
    Allow {
        #[command(subcommand)]
        op: RuleOp,
    },
    /// The deny list.
    Deny {
        #[command(subcommand)]
        op: RuleOp,
    },
}

#[derive(Subcommand)]
pub enum RuleOp {
    /// Add an address or network (203.0.113.7, 203.0.113.0/24, 2001:db8::/32); stored, so it
    /// lasts across restarts.
    Add {
        /// The address or CIDR network.
        cidr: String,
    },
    /// Remove a stored address or network (those in conclave.toml stay until it is edited).
    Del {
        /// The address or CIDR network, as `list` shows it.
        cidr: String,
    },
    /// Show the list: from conclave.toml and stored.
    List,
}

/// Sends one request to the running server's admin socket and returns its answer.
pub fn request(data_dir: &Path, req: &Value) -> anyhow::Result<Value> {
    crate::cli::require_dir(data_dir)?;
    let path = socket_path(data_dir);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach a running server through {} (is `conclave serve --data-dir {}` running, as this OS user?)",
            path.display(),
            data_dir.display()
        )
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut line = req.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("the server did not answer")?;
    serde_json::from_str(&answer).context("the server's answer is not JSON")
}

/// Whether a server is running on `data_dir` (its admin socket answers).
pub fn server_running(data_dir: &Path) -> bool {
    UnixStream::connect(socket_path(data_dir)).is_ok()
}

/// The answer, or its error as an error.
pub fn ok(answer: Value) -> anyhow::Result<Value> {
    if let Some(e) = answer.get("error") {
        bail!(
            "{} [{}]",
            e.get("message").and_then(Value::as_str).unwrap_or("error"),
            e.get("code").and_then(Value::as_str).unwrap_or("error")
        );
    }
    Ok(answer)
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A span of seconds as people read it: 42s, 17m, 3h05m, 2d4h.
fn span_text(s: i64) -> String {
    match s {
        ..=59 => format!("{}s", s.max(0)),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn ago(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "-".into();
    };
    span_text((now_ms() - ms).max(0) / 1000)
}

/// A ban's end as a UTC date and time, and the time left: ("for ever", "-") without one.
fn until_text(until_ms: &Value, now_ms: i64) -> (String, String) {
    let Some(ms) = until_ms.as_i64() else {
        return ("for ever".into(), "-".into());
    };
    let when = match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => format!("{ms} ms"),
    };
    // Rounded up, so a ban with 20 s left does not read "0s".
    let left_s = (ms - now_ms).max(0).saturating_add(999) / 1000;
    (when, span_text(left_s))
}

pub fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.data.data_dir;
    let req = match &args.action {
        AdminAction::Who => json!({"cmd": "who"}),
        AdminAction::Kick { user, room, reason } => {
            json!({"cmd": "kick", "user": user, "room": room, "reason": reason})
        }
        AdminAction::Ban {
            user,
            ip,
            duration,
            reason,
        } => {
            if user.is_none() && ip.is_none() {
                bail!("name a user, or an address with --ip");
            }
            json!({"cmd": "ban", "user": user, "ip": ip, "duration": duration, "reason": reason})
        }
        AdminAction::Unban { user, ip } => {
            if user.is_none() && ip.is_none() {
                bail!("name a user, or an address with --ip");
            }
            json!({"cmd": "unban", "user": user, "ip": ip})
        }
        AdminAction::Bans => json!({"cmd": "bans"}),
        AdminAction::Announce { text } => json!({"cmd": "announce", "text": text}),
        AdminAction::Rooms => json!({"cmd": "rooms"}),
        AdminAction::Stats => json!({"cmd": "stats"}),
        AdminAction::Reload => json!({"cmd": "reload"}),
        AdminAction::Allow { op } | AdminAction::Deny { op } => {
            let action = if matches!(args.action, AdminAction::Allow { .. }) {
                "allow"
            } else {
                "deny"
            };
            match op {
                RuleOp::Add { cidr } => json!({"cmd": action, "op": "add", "cidr": cidr}),
                RuleOp::Del { cidr } => json!({"cmd": action, "op": "del", "cidr": cidr}),
                RuleOp::List => json!({"cmd": action, "op": "list"}),
            }
        }
    };
    let answer = ok(request(dir, &req)?)?;
    if args.json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    let list = |k: &str| {
        answer
            .get(k)
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .clone()
    };
    match &args.action {
        AdminAction::Who => {
            println!(
                "{:<16} {:<40} {:<8} {:>8} {:>10} {:>10}",
                "USER", "ADDRESS", "TLS", "SINCE", "BYTES IN", "BYTES OUT"
            );
            for c in list("connections") {
                println!(
                    "{:<16} {:<40} {:<8} {:>8} {:>10} {:>10}",
                    s(&c, "user"),
                    format!("{}:{}", s(&c, "ip"), s(&c, "port")),
                    s(&c, "tls"),
                    ago(&c["since_ms"]),
                    s(&c, "bytes_in"),
                    s(&c, "bytes_out")
                );
            }
        }
        AdminAction::Rooms => {
            println!(
                "{:<24} {:<8} {:<10} {:>8} {:>8} OWNER",
                "ROOM", "KIND", "ENCRYPTED", "MEMBERS", "ONLINE"
            );
            for r in list("rooms") {
                let kind = if r["private"].as_bool() == Some(true) {
                    "private"
                } else {
                    "public"
                };
                // End to end: the server relays what it cannot read (no server-side history
                // for newcomers, no server-side search); otherwise encrypted at rest.
                let encrypted = if r["e2ee"].as_bool() == Some(true) {
                    "end-to-end"
                } else {
                    "at rest"
                };
                println!(
                    "{:<24} {:<8} {:<10} {:>8} {:>8} {}",
                    s(&r, "room"),
                    kind,
                    encrypted,
                    s(&r, "members"),
                    s(&r, "online"),
                    s(&r, "owner")
                );
            }
        }
        AdminAction::Bans => {
            println!(
                "{:<6} {:<40} {:<22} {:<10} {:<10} REASON",
                "KIND", "TARGET", "UNTIL (UTC)", "LEFT", "BY"
            );
            for b in list("bans") {
                let (until, left) = until_text(&b["until_ms"], now_ms());
                println!(
                    "{:<6} {:<40} {:<22} {:<10} {:<10} {}",
                    s(&b, "kind"),
                    s(&b, "target"),
                    until,
                    left,
                    s(&b, "by"),
                    s(&b, "reason")
                );
            }
        }
        AdminAction::Stats => {
            for k in [
                "connections",
                "users_online",
                "rooms",
                "bans",
                "uptime_s",
                "bytes_in",
                "bytes_out",
            ] {
                println!("{k:<14} {}", s(&answer, k));
            }
        }
        AdminAction::Allow { op: RuleOp::List } | AdminAction::Deny { op: RuleOp::List } => {
            for n in list("from_config") {
                println!("{}\t(conclave.toml)", n.as_str().unwrap_or("?"));
            }
            for n in list("stored") {
                println!("{}\t(stored)", n.as_str().unwrap_or("?"));
            }
        }
        AdminAction::Kick { .. } => match answer.get("connections_closed") {
            Some(n) => println!("kicked: {n} connection(s) closed"),
            None => println!("kicked"),
        },
        _ => println!("done"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ban_ends_read_as_a_utc_time_and_the_time_left() {
        let now = 1_796_592_425_442 - 7_200_000;
        let (when, left) = until_text(&json!(1_796_592_425_442i64), now);
        assert_eq!(when, "2026-12-06 21:27:05");
        assert_eq!(left, "2h00m");
        assert_eq!(
            until_text(&Value::Null, now),
            ("for ever".into(), "-".into())
        );
        // Past its end (not yet swept): nothing left, not a negative span.
        assert_eq!(until_text(&json!(now - 5_000), now).1, "0s");
        assert_eq!(until_text(&json!(now + 20_001), now).1, "21s");
        assert_eq!(span_text(3 * 86_400 + 5 * 3600 + 7), "3d5h");
        assert_eq!(span_text(600), "10m");
    }
}
