//! Slash commands: the table behind `/help` and tab completion, and the parser.

use std::net::IpAddr;

/// Messages `/history` loads when no count is given.
pub const DEFAULT_HISTORY_PAGE: u32 = 50;
/// Most messages one `/history` asks for (the server may cap lower).
pub const MAX_HISTORY_PAGE: u32 = 500;

/// One command, as `/help` lists it.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
}

/// Every command, in the order `/help` shows them.
#[rustfmt::skip]
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec { name: "help", args: "[command]", help: "this list, or one command's help" },
    CommandSpec { name: "join", args: "room [password]", help: "join a room and show it" },
    CommandSpec { name: "part", args: "[room]", help: "leave a room (default: this one)" },
    CommandSpec { name: "create", args: "room [private] [server] [password]", help: "create an end-to-end encrypted room (private: members and invitees only; server: server-encrypted instead, so the server can search it and newcomers see its history)" },
    CommandSpec { name: "invite", args: "user [room]", help: "let a user into a private room (default: this one)" },
    CommandSpec { name: "msg", args: "user[,user...] text", help: "a direct message to one or several people (opens the conversation)" },
    CommandSpec { name: "query", args: "user[,user...]", help: "open a direct conversation without sending" },
    CommandSpec { name: "except", args: "user[,user...] text", help: "say something to this room, except to these people" },
    CommandSpec { name: "who", args: "[room]", help: "who is online (everywhere, or the room's members)" },
    CommandSpec { name: "rooms", args: "", help: "the rooms you can see" },
    CommandSpec { name: "devices", args: "[user] | remove device", help: "a user's devices and safety numbers (default: yours); remove takes a device of yours out of your account and its conversations for good" },
    CommandSpec { name: "history", args: "[count]", help: "load older messages of this conversation" },
    CommandSpec { name: "search", args: "words", help: "search your conversations; Enter on a result jumps to it" },
    CommandSpec { name: "kick", args: "user [reason]", help: "remove a user from this room (owner, admins); in the status buffer, from the server (admins)" },
    CommandSpec { name: "votekick", args: "user", help: "vote to remove a user from this room" },
    CommandSpec { name: "ban", args: "user|ip[/bits] [duration] [reason]", help: "admins: ban an account or a network (duration like 30m, 2h, 7d; default for ever)" },
    CommandSpec { name: "unban", args: "user|ip[/bits]", help: "admins: lift a ban" },
    CommandSpec { name: "announce", args: "text", help: "admins: a notice to everyone online" },
    CommandSpec { name: "file", args: "path", help: "offer a file to this conversation" },
    CommandSpec { name: "accept", args: "file-id [dir]", help: "accept a file offered to you (saved in dir, default the current directory; Tab completes the id)" },
    CommandSpec { name: "decline", args: "file-id", help: "decline a file offered to you (the sender is told)" },
    CommandSpec { name: "files", args: "", help: "the files offered to you that you have not accepted or declined" },
    CommandSpec { name: "cancel", args: "file-id", help: "withdraw a file you are sending or sent (its recipients are told; Tab completes the id)" },
    CommandSpec { name: "me", args: "text", help: "an action: shows as \"* you text\" (/me waves)" },
    CommandSpec { name: "md", args: "text", help: "formatted text: **bold** *italic* `code` [link](url) > quote" },
    CommandSpec { name: "topic", args: "[text|-]", help: "show this room's topic, or set it (owner, admins; - clears it)" },
    CommandSpec { name: "away", args: "[message]", help: "say you are away (shown in /who and the members pane) until /back" },
    CommandSpec { name: "back", args: "", help: "you are back" },
    CommandSpec { name: "name", args: "[display name]", help: "set the name shown next to your account name (empty: remove it)" },
    CommandSpec { name: "mute", args: "", help: "no bell or title for mentions in this conversation (they are still counted)" },
    CommandSpec { name: "unmute", args: "", help: "mentions in this conversation ring again" },
    CommandSpec { name: "receipts", args: "on|off", help: "show others how far you have read (on, the default), or keep it private" },
    CommandSpec { name: "reply", args: "text", help: "answer the selected message (Alt-Up/Alt-Down select), else the last one from someone else (it is quoted)" },
    CommandSpec { name: "edit", args: "text", help: "replace the text of the selected message of yours, else of your last one" },
    CommandSpec { name: "delete", args: "", help: "delete the selected message (yours; any, as the room's owner or an admin), else your last one" },
    CommandSpec { name: "react", args: "emoji", help: "react to the selected message, else the last one (👍); /unreact takes it back" },
    CommandSpec { name: "thread", args: "", help: "open the selected message's thread in a pane: what you type answers in it; Esc or /thread closes it" },
    CommandSpec { name: "unreact", args: "emoji", help: "take your reaction to the last message back" },
    CommandSpec { name: "approve", args: "device", help: "approve a new device of yours that asks for your history (check its safety number first): it gets your end-to-end history" },
    CommandSpec { name: "reject", args: "device", help: "reject a device of yours that asks for your history: it gets nothing, and is taken out of your account and its conversations" },
    CommandSpec { name: "backup", args: "[off]", help: "turn the recovery-key backup of your end-to-end history on (or change its key; the key is shown once), or off" },
    CommandSpec { name: "restore", args: "[recovery-key]", help: "restore your end-to-end history from the backup of this recovery key; without it, asks for the key in a field that does not show it (never kept in the input history)" },
    CommandSpec { name: "members", args: "", help: "show or hide the members pane (also F2)" },
    CommandSpec { name: "close", args: "", help: "close this direct conversation's buffer" },
    CommandSpec { name: "quit", args: "", help: "leave (also Ctrl-C)" },
];

/// Who a ban is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanTarget {
    User(String),
    Ip(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help(Option<String>),
    Join {
        room: String,
        password: Option<String>,
    },
    Part {
        room: Option<String>,
    },
    Create {
        room: String,
        private: bool,
        password: Option<String>,
        /// End-to-end encrypted (the default), or server-encrypted (`server`).
        e2ee: bool,
    },
    Invite {
        user: String,
        room: Option<String>,
    },
    Msg {
        to: Vec<String>,
        text: String,
    },
    Query {
        to: Vec<String>,
    },
    Except {
        except: Vec<String>,
        text: String,
    },
    Who {
        room: Option<String>,
    },
    Rooms,
    Devices {
        user: Option<String>,
    },
    History {
        count: u32,
    },
    Search {
        query: String,
    },
    Kick {
        user: String,
        reason: Option<String>,
    },
    VoteKick {
        user: String,
    },
    Ban {
        target: BanTarget,
        duration_s: Option<u64>,
        reason: Option<String>,
    },
    Unban {
        target: BanTarget,
    },
    Announce {
        text: String,
    },
    File {
        path: String,
    },
    Accept {
        file_id: String,
        dir: Option<String>,
    },
    Decline {
        file_id: String,
    },
    Cancel {
        file_id: String,
    },
    Files,
    /// Devices (issue 21).
    Approve {
        device: String,
    },
    Reject {
        device: String,
    },
    Backup {
        on: bool,
    },
    Restore {
        key: String,
    },
    Members,
    Close,
    Quit,
    // Everyday chat, part B.
    Me {
        text: String,
    },
    Md {
        text: String,
    },
    Away {
        text: Option<String>,
    },
    Back,
    /// No text: show it; `Some("")`: clear it.
    Topic {
        text: Option<String>,
    },
    Name {
        name: Option<String>,
    },
    /// True: mute.
    Mute(bool),
    /// True: share read markers.
    ReadReceipts(bool),
    // everyday chat: replies, edits, deletes, reactions
    Reply {
        text: String,
    },
    Edit {
        text: String,
    },
    Delete,
    React {
        emoji: String,
        on: bool,
    },
    /// Open (or close) the thread pane.
    Thread,
}

impl Command {
    /// Whether the line may be kept in the input history (not when it holds a password).
    pub fn may_remember(&self) -> bool {
        !matches!(
            self,
            Command::Join {
                password: Some(_),
                ..
            } | Command::Create {
                password: Some(_),
                ..
            } | Command::Restore { .. }
        )
    }
}

pub fn spec(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// `#room` or `room` → `room`.
fn room_arg(s: &str) -> String {
    s.trim_start_matches('#').to_string()
}

fn user_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|u| u.trim().trim_start_matches('@'))
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

fn usage(name: &str) -> String {
    match spec(name) {
        Some(s) => format!("usage: /{} {}", s.name, s.args),
        None => format!("unknown command /{name}"),
    }
}

/// Splits off the first word: (word, rest with leading spaces removed).
fn first_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim_start()),
        None => (s, ""),
    }
}

fn nonempty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// `30s`, `15m`, `2h`, `7d`, `1w`, or plain seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return None,
    };
    n.checked_mul(factor).filter(|&d| d > 0)
}

fn ban_target(s: &str) -> BanTarget {
    let is_ip = match s.split_once('/') {
        Some((addr, bits)) => addr.parse::<IpAddr>().is_ok() && bits.parse::<u8>().is_ok(),
        None => s.parse::<IpAddr>().is_ok(),
    };
    if is_ip {
        BanTarget::Ip(s.to_string())
    } else {
        BanTarget::User(s.trim_start_matches('@').to_string())
    }
}

/// Parses a line that starts with `/`. The error is the sentence to show.
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.strip_prefix('/').unwrap_or(line);
    let (name, rest) = first_word(line);
    let name = name.to_lowercase();
    let need = |ok: bool| if ok { Ok(()) } else { Err(usage(&name)) };
    let command = match name.as_str() {
        "reply" => Command::Reply {
            text: nonempty(rest).ok_or_else(|| usage(&name))?,
        },
        "edit" => Command::Edit {
            text: nonempty(rest).ok_or_else(|| usage(&name))?,
        },
        "delete" => Command::Delete,
        "thread" => Command::Thread,
        "react" | "unreact" => Command::React {
            emoji: nonempty(rest).ok_or_else(|| usage(&name))?,
            on: name == "react",
        },
        "help" | "h" | "?" => {
            Command::Help(nonempty(rest).map(|s| s.trim_start_matches('/').to_string()))
        }
        "join" | "j" => {
            let (room, rest) = first_word(rest);
            need(!room.is_empty())?;
            Command::Join {
                room: room_arg(room),
                password: nonempty(rest),
            }
        }
        "part" | "leave" => Command::Part {
            room: nonempty(rest).map(|r| room_arg(&r)),
        },
        "create" => {
            let (room, mut rest) = first_word(rest);
            need(!room.is_empty())?;
            let (mut private, mut e2ee) = (false, true);
            // The options, in any order, come before the password.
            for _ in 0..2 {
                let (word, after) = first_word(rest);
                if word.eq_ignore_ascii_case("private") && !private {
                    private = true;
                } else if word.eq_ignore_ascii_case("server") && e2ee {
                    e2ee = false;
                } else {
                    break;
                }
                rest = after;
            }
            Command::Create {
                room: room_arg(room),
                private,
                password: nonempty(rest),
                e2ee,
            }
        }
        "invite" => {
            let (user, rest) = first_word(rest);
            need(!user.is_empty())?;
            Command::Invite {
                user: user.trim_start_matches('@').to_string(),
                room: nonempty(rest).map(|r| room_arg(&r)),
            }
        }
        "msg" | "m" => {
            let (to, text) = first_word(rest);
            let to = user_list(to);
            need(!to.is_empty() && !text.is_empty())?;
            Command::Msg {
                to,
                text: text.to_string(),
            }
        }
        "query" | "q" => {
            let to = user_list(rest.trim());
            need(!to.is_empty())?;
            Command::Query { to }
        }
        "except" => {
            let (except, text) = first_word(rest);
            let except = user_list(except);
            need(!except.is_empty() && !text.is_empty())?;
            Command::Except {
                except,
                text: text.to_string(),
            }
        }
        "who" | "w" => Command::Who {
            room: nonempty(rest).map(|r| room_arg(&r)),
        },
        "rooms" | "list" => Command::Rooms,
        "devices" | "safety" => match rest.trim().split_once(char::is_whitespace) {
            // Removing a device is rejecting it (for one approved earlier too).
            Some(("remove", device)) if !device.trim().is_empty() => Command::Reject {
                device: device.trim().to_string(),
            },
            _ if rest.trim() == "remove" => {
                return Err("usage: /devices remove device (its id, from /devices)".to_string());
            }
            _ => Command::Devices {
                user: nonempty(rest),
            },
        },
        "history" => {
            let count = match nonempty(rest) {
                None => DEFAULT_HISTORY_PAGE,
                Some(n) => n
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_HISTORY_PAGE).contains(n))
                    .ok_or_else(|| {
                        format!("/history takes a count from 1 to {MAX_HISTORY_PAGE}")
                    })?,
            };
            Command::History { count }
        }
        "search" | "s" => {
            let query = nonempty(rest).ok_or_else(|| usage("search"))?;
            Command::Search { query }
        }
        "kick" => {
            let (user, reason) = first_word(rest);
            need(!user.is_empty())?;
            Command::Kick {
                user: user.trim_start_matches('@').to_string(),
                reason: nonempty(reason),
            }
        }
        "votekick" => {
            let (user, _) = first_word(rest);
            need(!user.is_empty())?;
            Command::VoteKick {
                user: user.trim_start_matches('@').to_string(),
            }
        }
        "ban" => {
            let (who, rest) = first_word(rest);
            need(!who.is_empty())?;
            let (maybe_duration, after) = first_word(rest);
            let (duration_s, reason) = match parse_duration(maybe_duration) {
                Some(d) => (Some(d), nonempty(after)),
                None if maybe_duration.eq_ignore_ascii_case("forever") => (None, nonempty(after)),
                None => (None, nonempty(rest)),
            };
            Command::Ban {
                target: ban_target(who),
                duration_s,
                reason,
            }
        }
        "unban" => {
            let (who, _) = first_word(rest);
            need(!who.is_empty())?;
            Command::Unban {
                target: ban_target(who),
            }
        }
        "announce" => {
            let text = nonempty(rest).ok_or_else(|| usage("announce"))?;
            Command::Announce { text }
        }
        "file" => {
            let path = nonempty(rest).ok_or_else(|| usage("file"))?;
            Command::File { path }
        }
        "accept" => {
            let (file_id, dir) = first_word(rest);
            need(!file_id.is_empty())?;
            Command::Accept {
                file_id: file_id.to_string(),
                dir: nonempty(dir),
            }
        }
        "decline" => {
            let (file_id, _) = first_word(rest);
            need(!file_id.is_empty())?;
            Command::Decline {
                file_id: file_id.to_string(),
            }
        }
        "cancel" => {
            let (file_id, _) = first_word(rest);
            need(!file_id.is_empty())?;
            Command::Cancel {
                file_id: file_id.to_string(),
            }
        }
        "files" => Command::Files,
        "me" | "action" => Command::Me {
            text: nonempty(rest).ok_or_else(|| usage("me"))?,
        },
        "md" | "format" => Command::Md {
            text: nonempty(rest).ok_or_else(|| usage("md"))?,
        },
        "away" => Command::Away {
            text: nonempty(rest),
        },
        "back" => Command::Back,
        "topic" => Command::Topic {
            text: nonempty(rest).map(|t| if t == "-" { String::new() } else { t }),
        },
        "name" => Command::Name {
            name: nonempty(rest),
        },
        "mute" => Command::Mute(true),
        "unmute" => Command::Mute(false),
        "receipts" => match rest.trim().to_ascii_lowercase().as_str() {
            "on" => Command::ReadReceipts(true),
            "off" => Command::ReadReceipts(false),
            _ => return Err(usage("receipts")),
        },
        "approve" | "reject" => {
            let (device, _) = first_word(rest);
            need(!device.is_empty())?;
            let device = device.to_string();
            if name == "approve" {
                Command::Approve { device }
            } else {
                Command::Reject { device }
            }
        }
        "backup" => {
            match rest.trim() {
                "" | "on" => Command::Backup { on: true },
                "off" => Command::Backup { on: false },
                _ => return Err(
                    "/backup turns the backup on (or changes its key); /backup off turns it off"
                        .to_string(),
                ),
            }
        }
        // Without a key: the screen asks for it in a masked field.
        "restore" => Command::Restore {
            key: rest.trim().to_string(),
        },
        "members" | "nicklist" => Command::Members,
        "close" => Command::Close,
        "quit" | "exit" => Command::Quit,
        "" => return Err("type a command after /, or /help for the list".to_string()),
        other => {
            return Err(format!(
                "unknown command /{other}; /help lists them (to send a line starting with /, \
                 start it with //)"
            ));
        }
    };
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_target() {
        assert_eq!(
            parse("/msg bob,@carol hi there").unwrap(),
            Command::Msg {
                to: vec!["bob".into(), "carol".into()],
                text: "hi there".into()
            }
        );
        assert_eq!(
            parse("/except carol not for you").unwrap(),
            Command::Except {
                except: vec!["carol".into()],
                text: "not for you".into()
            }
        );
        assert_eq!(
            parse("/join #ops hunter2").unwrap(),
            Command::Join {
                room: "ops".into(),
                password: Some("hunter2".into())
            }
        );
        assert!(!parse("/join #ops hunter2").unwrap().may_remember());
        assert!(parse("/join ops").unwrap().may_remember());
        assert_eq!(
            parse("/create lab private").unwrap(),
            Command::Create {
                room: "lab".into(),
                private: true,
                password: None,
                e2ee: true
            }
        );
        assert_eq!(
            parse("/create lab server private").unwrap(),
            Command::Create {
                room: "lab".into(),
                private: true,
                password: None,
                e2ee: false
            }
        );
        assert_eq!(
            parse("/create lab server hunter2").unwrap(),
            Command::Create {
                room: "lab".into(),
                private: false,
                password: Some("hunter2".into()),
                e2ee: false
            }
        );
        assert_eq!(parse("/part").unwrap(), Command::Part { room: None });
        assert_eq!(
            parse("/history 20").unwrap(),
            Command::History { count: 20 }
        );
        assert!(parse("/history 0").is_err());
    }

    #[test]
    fn bans_tell_users_from_networks() {
        assert_eq!(
            parse("/ban mallory 2h spamming links").unwrap(),
            Command::Ban {
                target: BanTarget::User("mallory".into()),
                duration_s: Some(7200),
                reason: Some("spamming links".into())
            }
        );
        assert_eq!(
            parse("/ban 203.0.113.0/24 abuse").unwrap(),
            Command::Ban {
                target: BanTarget::Ip("203.0.113.0/24".into()),
                duration_s: None,
                reason: Some("abuse".into())
            }
        );
        assert_eq!(
            parse("/unban bob.smith").unwrap(),
            Command::Unban {
                target: BanTarget::User("bob.smith".into())
            }
        );
        assert_eq!(parse_duration("7d"), Some(604_800));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("2x"), None);
    }

    #[test]
    fn device_commands_and_the_recovery_key_is_not_remembered() {
        assert_eq!(
            parse("/approve 9f2c41d07a3b5e16").unwrap(),
            Command::Approve {
                device: "9f2c41d07a3b5e16".into()
            }
        );
        assert_eq!(
            parse("/reject 9f2c").unwrap(),
            Command::Reject {
                device: "9f2c".into()
            }
        );
        assert_eq!(
            parse("/devices remove 9f2c").unwrap(),
            Command::Reject {
                device: "9f2c".into()
            }
        );
        assert!(parse("/devices remove").is_err());
        assert_eq!(
            parse("/devices bob").unwrap(),
            Command::Devices {
                user: Some("bob".into())
            }
        );
        assert_eq!(parse("/backup").unwrap(), Command::Backup { on: true });
        assert_eq!(parse("/backup off").unwrap(), Command::Backup { on: false });
        assert!(parse("/backup maybe").is_err());
        assert!(parse("/approve").is_err());
        let restore = parse("/restore ABCD-EFGH").unwrap();
        assert_eq!(
            restore,
            Command::Restore {
                key: "ABCD-EFGH".into()
            }
        );
        assert!(!restore.may_remember());
    }

    #[test]
    fn mistakes_say_what_to_type() {
        assert_eq!(
            parse("/msg bob").unwrap_err(),
            "usage: /msg user[,user...] text"
        );
        assert!(parse("/fly").unwrap_err().contains("/help"));
        assert!(parse("/").is_err());
        assert_eq!(
            parse("/receipts maybe").unwrap_err(),
            "usage: /receipts on|off"
        );
        // Every command in the table parses (with plausible arguments).
        for spec in COMMANDS {
            let args = match spec.name {
                "history" => "5",
                "receipts" => "off",
                "backup" => "off",
                _ => "a b c",
            };
            let line = format!("/{} {args}", spec.name);
            assert!(parse(&line).is_ok(), "{line}");
        }
    }
}

#[cfg(test)]
mod presence_tests {
    use super::*;

    #[test]
    fn everyday_chat_commands_parse() {
        assert_eq!(
            parse("/me waves hello"),
            Ok(Command::Me {
                text: "waves hello".into()
            })
        );
        assert!(parse("/me").is_err());
        assert_eq!(
            parse("/md **bold**"),
            Ok(Command::Md {
                text: "**bold**".into()
            })
        );
        assert_eq!(parse("/away"), Ok(Command::Away { text: None }));
        assert_eq!(
            parse("/away lunch, back at 2"),
            Ok(Command::Away {
                text: Some("lunch, back at 2".into())
            })
        );
        assert_eq!(parse("/back"), Ok(Command::Back));
        assert_eq!(parse("/topic"), Ok(Command::Topic { text: None }));
        assert_eq!(
            parse("/topic -"),
            Ok(Command::Topic {
                text: Some(String::new())
            })
        );
        assert_eq!(
            parse("/topic release week"),
            Ok(Command::Topic {
                text: Some("release week".into())
            })
        );
        assert_eq!(parse("/name"), Ok(Command::Name { name: None }));
        assert_eq!(parse("/mute"), Ok(Command::Mute(true)));
        assert_eq!(parse("/unmute"), Ok(Command::Mute(false)));
        assert_eq!(parse("/receipts OFF"), Ok(Command::ReadReceipts(false)));
    }
}
