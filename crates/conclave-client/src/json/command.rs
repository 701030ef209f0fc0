//! Parsing one line of `conclave client --json` input into a request.
//!
//! Pure: no I/O, so every command's mapping is unit-tested. Fields beyond the ones a command
//! uses are ignored, so scripts written for later versions keep working where they can.

use conclave_proto::{Body, ConvRef, Request, Target};
use serde_json::{Map, Value};

/// Default `limit` of `history` when the command has none.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;

/// Every command name, for the "unknown command" message.
pub const COMMANDS: &[&str] = &[
    "join",
    "part",
    "create_room",
    "invite",
    "rooms",
    "who",
    "send",
    "announce",
    "history",
    "search",
    "kick",
    "votekick",
    "ban",
    "unban",
    "set_room",
    "send_file",
    "accept_file",
    "decline_file",
    "cancel_file",
    "files",
    "devices",
    "approve_device",
    "reject_device",
    "remove_device",
    "backup_enable",
    "backup_disable",
    "quit",
    // Everyday chat, part B.
    "typing",
    "read",
    "read_markers",
    "share_reads",
    "away",
    "back",
    "display_name",
    "unread",
    "mute",
    // everyday chat: replies, edits, deletes, reactions
    "edit",
    "delete",
    "react",
    "unreact",
    "message_info",
];

/// A parsed input line.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command's `id`, any JSON value, echoed in its reply.
    pub id: Option<Value>,
    pub action: Action,
}

/// What a command does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this request and reply with its result.
    Request(Request),
    /// Leave: send [`Request::Quit`], reply, exit.
    Quit,
    /// Send a file (the reply comes when the server holds it, or for peer to peer when it
    /// is offered).
    SendFile {
        path: std::path::PathBuf,
        target: Target,
        p2p: bool,
        window: Option<u64>,
        congestion: Option<String>,
    },
    /// Create a room: end-to-end encrypted unless `e2ee` is false (then the server can read
    /// it, search it and give newcomers its history).
    CreateRoom {
        room: String,
        private: bool,
        password: Option<String>,
        e2ee: bool,
    },
    /// Devices and their safety numbers: this device's with no user, else the user's.
    Devices {
        user: Option<String>,
    },
    /// Devices (issue 21): approve a device of this account that asks for history (and send
    /// it this device's end-to-end history), or reject it; `remove_device` is the same as
    /// `reject_device` for a device approved earlier (or the account's first): either takes the
    /// device out of the account and its groups for good.
    ApproveDevice {
        device: String,
    },
    RejectDevice {
        device: String,
    },
    /// Turn the recovery-key backup on (or change its key) / off.
    BackupEnable,
    BackupDisable,
    /// Withdraw a file this client sent (stops a send under way; the server deletes it).
    CancelFile {
        file_id: String,
    },
    /// Edit, delete or react to a message by its id (`content`: the new text, the emoji).
    Act {
        msg_id: String,
        kind: conclave_proto::ActKind,
        content: String,
    },
    /// Receive an offered file into a directory (the reply comes when it is verified).
    AcceptFile {
        file_id: String,
        dir: std::path::PathBuf,
        window: Option<u64>,
        congestion: Option<String>,
    },
    // ---- Everyday chat, part B.
    /// `set_room` with a `topic` (and perhaps `votekick` too).
    SetRoom {
        room: String,
        votekick: Option<bool>,
        topic: String,
    },
    /// Unread messages and mentions per conversation, counted by this client.
    Unread,
    /// Mute or unmute a conversation's mention alerts (counts go on).
    Mute {
        conv: ConvRef,
        muted: bool,
    },
}

/// A line that is not a valid command: reply with `bad_request`.
#[derive(Debug, Clone, PartialEq)]
pub struct BadCommand {
    /// The line's `id`, when the line was a JSON object that had one.
    pub id: Option<Value>,
    pub message: String,
}

/// Parses one input line.
pub fn parse(line: &str) -> Result<Command, BadCommand> {
    let value: Value = serde_json::from_str(line).map_err(|e| BadCommand {
        id: None,
        message: format!("the line is not JSON ({e}); send one JSON object per line"),
    })?;
    let Value::Object(obj) = value else {
        return Err(BadCommand {
            id: None,
            message: "the line is JSON but not an object; send {\"cmd\": ...}".to_string(),
        });
    };
    let id = obj.get("id").cloned();
    match parse_action(&obj) {
        Ok(action) => Ok(Command { id, action }),
        Err(message) => Err(BadCommand { id, message }),
    }
}

fn parse_action(obj: &Map<String, Value>) -> Result<Action, String> {
    let f = Fields(obj);
    let cmd = f.req_str("cmd")?;
    let request = match cmd.as_str() {
        "join" => Request::Join {
            room: f.req_str("room")?,
            password: f.opt_str("password")?,
        },
        "part" => Request::Part {
            room: f.req_str("room")?,
        },
        "create_room" => {
            return Ok(Action::CreateRoom {
                room: f.req_str("room")?,
                private: f.opt_bool("private")?.unwrap_or(false),
                password: f.opt_str("password")?,
                e2ee: f.opt_bool("e2ee")?.unwrap_or(true),
            });
        }
        "devices" => {
            return Ok(Action::Devices {
                user: f.opt_str("user")?,
            });
        }
        "invite" => Request::Invite {
            room: f.req_str("room")?,
            user: f.req_str("user")?,
        },
        "rooms" => Request::Rooms,
        "who" => Request::Who {
            room: f.opt_str("room")?,
        },
        "send" => parse_send(&f)?,
        "announce" => Request::Announce {
            text: f.req_str("text")?,
        },
        "history" => parse_history(&f)?,
        "quit" => return Ok(Action::Quit),
        "search" => Request::Search {
            query: f.req_str("query")?,
            room: f.opt_str("room")?,
            limit: limit_field(&f)?,
            before: f.opt_str("before")?,
        },
        "kick" => Request::Kick {
            room: f.opt_str("room")?,
            user: f.req_str("user")?,
            reason: f.opt_str("reason")?,
        },
        "votekick" => Request::VoteKick {
            room: f.req_str("room")?,
            user: f.req_str("user")?,
        },
        "ban" => Request::Ban {
            user: f.opt_str("user")?,
            ip: f.opt_str("ip")?,
            duration_s: f.opt_u64("duration_s")?,
            reason: f.opt_str("reason")?,
        },
        "unban" => Request::Unban {
            user: f.opt_str("user")?,
            ip: f.opt_str("ip")?,
        },
        "set_room" => match f.opt_str("topic")? {
            Some(topic) => {
                return Ok(Action::SetRoom {
                    room: f.req_str("room")?,
                    votekick: f.opt_bool("votekick")?,
                    topic,
                });
            }
            None => Request::SetRoom {
                room: f.req_str("room")?,
                votekick: f.opt_bool("votekick")?,
            },
        },
        "typing" => Request::Typing {
            conv: parse_conv(&f, "typing")?,
        },
        "read" => Request::Read {
            conv: parse_conv(&f, "read")?,
            seq: f
                .opt_u64("seq")?
                .ok_or_else(|| "read needs \"seq\" (the newest message read)".to_string())?,
        },
        "read_markers" => Request::ReadMarkers {
            conv: parse_conv(&f, "read_markers")?,
        },
        "share_reads" => Request::ShareReads {
            share: f
                .opt_bool("share")?
                .ok_or_else(|| "share_reads needs \"share\": true or false".to_string())?,
        },
        "away" => Request::Away {
            text: Some(f.opt_str("text")?.unwrap_or_default()),
        },
        "back" => Request::Away { text: None },
        "display_name" => Request::SetDisplayName {
            name: f.opt_str("name")?.filter(|n| !n.trim().is_empty()),
        },
        "unread" => return Ok(Action::Unread),
        "mute" => {
            return Ok(Action::Mute {
                conv: parse_conv(&f, "mute")?,
                muted: f.opt_bool("muted")?.unwrap_or(true),
            });
        }
        "send_file" => {
            return Ok(Action::SendFile {
                path: f.req_str("path")?.into(),
                target: parse_target(&f, "send_file")?,
                p2p: f.opt_bool("p2p")?.unwrap_or(false),
                window: f.opt_u64("window")?,
                congestion: f.opt_str("congestion")?,
            });
        }
        "accept_file" => {
            return Ok(Action::AcceptFile {
                file_id: f.req_str("file_id")?,
                dir: f.req_str("dir")?.into(),
                window: f.opt_u64("window")?,
                congestion: f.opt_str("congestion")?,
            });
        }
        "decline_file" => Request::FileDecline {
            file_id: f.req_str("file_id")?,
        },
        "approve_device" => {
            return Ok(Action::ApproveDevice {
                device: f.req_str("device")?,
            });
        }
        "reject_device" | "remove_device" => {
            return Ok(Action::RejectDevice {
                device: f.req_str("device")?,
            });
        }
        "backup_enable" => return Ok(Action::BackupEnable),
        "backup_disable" => return Ok(Action::BackupDisable),
        "cancel_file" => {
            return Ok(Action::CancelFile {
                file_id: f.req_str("file_id")?,
            });
        }
        "files" => Request::Files,
        "message_info" => Request::MessageInfo {
            msg_id: f.req_str("msg_id")?,
        },
        "edit" | "delete" | "react" | "unreact" => return parse_act(&cmd, &f),
        other => {
            return Err(format!(
                "unknown command {other:?}; the commands are: {}",
                COMMANDS.join(", ")
            ));
        }
    };
    Ok(Action::Request(request))
}

fn parse_target(f: &Fields<'_>, cmd: &str) -> Result<Target, String> {
    let room = f.opt_str("room")?;
    let to = f.opt_names("to")?;
    let except = f.opt_names("except")?.unwrap_or_default();
    Ok(match (room, to) {
        (Some(_), Some(_)) => return Err(format!("{cmd} takes \"room\" or \"to\", not both")),
        (None, None) => {
            return Err(format!(
                "{cmd} needs \"room\" (a room) or \"to\" (a list of users)"
            ));
        }
        (Some(room), None) => Target::Room { room, except },
        (None, Some(to)) => {
            if !except.is_empty() {
                return Err(
                    "\"except\" only goes with \"room\"; leave those users out of \
                            \"to\" instead"
                        .into(),
                );
            }
            if to.is_empty() {
                return Err("\"to\" needs at least one user".into());
            }
            Target::Users { to }
        }
    })
}

/// The conversation a presence command is about: `"room"`, or `"with"` (also `"to"`, as
/// message events name a direct conversation) for a direct one.
fn parse_conv(f: &Fields<'_>, cmd: &str) -> Result<ConvRef, String> {
    let with = match (f.opt_names("with")?, f.opt_names("to")?) {
        (Some(_), Some(_)) => return Err(format!("{cmd} takes \"with\" or \"to\", not both")),
        (a, b) => a.or(b),
    };
    match (f.opt_str("room")?, with) {
        (Some(_), Some(_)) => Err(format!("{cmd} takes \"room\" or \"with\", not both")),
        (None, None) => Err(format!(
            "{cmd} needs \"room\" or \"with\" (a user or a list of users)"
        )),
        (Some(room), None) => Ok(ConvRef::Room(room)),
        (None, Some(with)) if with.is_empty() => Err("\"with\" needs at least one user".into()),
        (None, Some(with)) => Ok(ConvRef::With(with)),
    }
}

/// `"action": true` (`/me`) and `"format": "markdown"` of a text send.
fn text_kind(f: &Fields<'_>) -> Result<conclave_proto::chat::TextKind, String> {
    let markdown = match f.opt_str("format")?.as_deref() {
        None | Some("plain") => false,
        Some("markdown") => true,
        Some(other) => {
            return Err(format!(
                "\"format\" is \"plain\" (the default) or \"markdown\", not {other:?}"
            ));
        }
    };
    Ok(conclave_proto::chat::TextKind {
        markdown,
        action: f.opt_bool("action")?.unwrap_or(false),
    })
}

fn parse_send(f: &Fields<'_>) -> Result<Request, String> {
    let target = parse_target(f, "send")?;
    let text = f.opt_str("text")?;
    let content_type = f.opt_str("content_type")?;
    let data_hex = f.opt_str("data_hex")?;
    let kind = text_kind(f)?;
    let body = match (text, content_type, data_hex) {
        (Some(text), None, None) => Body::text_of_kind(text, kind),
        (None, Some(content_type), Some(data_hex)) => Body {
            content_type,
            data: hex::decode(&data_hex).map_err(|e| format!("\"data_hex\" is not hex: {e}"))?,
        },
        (None, None, None) => return Err("send needs \"text\"".into()),
        _ => {
            return Err("send takes either \"text\", or \"content_type\" with \"data_hex\"".into());
        }
    };
    let refs = f.opt_str("reply_to")?.map(|r| {
        Box::new(conclave_proto::Refs {
            reply_to: Some(r),
            acts_on: None,
        })
    });
    Ok(Request::Send {
        target,
        body,
        idempotency_key: f.opt_str("idempotency_key")?,
        refs,
    })
}

fn parse_act(cmd: &str, f: &Fields<'_>) -> Result<Action, String> {
    use conclave_proto::ActKind;
    let msg_id = f.req_str("msg_id")?;
    let (kind, content) = match cmd {
        "edit" => (ActKind::Edit, f.req_str("text")?),
        "delete" => (ActKind::Delete, String::new()),
        "react" => (ActKind::React, f.req_str("emoji")?),
        _ => (ActKind::Unreact, f.req_str("emoji")?),
    };
    Ok(Action::Act {
        msg_id,
        kind,
        content,
    })
}

fn parse_history(f: &Fields<'_>) -> Result<Request, String> {
    if let Some(root) = f.opt_str("thread")? {
        return Ok(Request::Thread {
            msg_id: root,
            limit: limit_field(f)?,
            after: f.opt_u64("after")?,
        });
    }
    let conv = match (f.opt_str("room")?, f.opt_names("with")?) {
        (Some(_), Some(_)) => return Err("history takes \"room\" or \"with\", not both".into()),
        (None, None) => {
            return Err("history needs \"room\" or \"with\" (a user or a list of users)".into());
        }
        (Some(room), None) => ConvRef::Room(room),
        (None, Some(with)) if with.is_empty() => {
            return Err("\"with\" needs at least one user".into());
        }
        (None, Some(with)) => ConvRef::With(with),
    };
    Ok(Request::History {
        conv,
        limit: limit_field(f)?,
        before: f.opt_u64("before")?,
    })
}

/// `"limit"`, defaulting to [`DEFAULT_HISTORY_LIMIT`].
fn limit_field(f: &Fields<'_>) -> Result<u32, String> {
    match f.opt_u64("limit")? {
        None => Ok(DEFAULT_HISTORY_LIMIT),
        Some(n) => u32::try_from(n).map_err(|_| "\"limit\" is too large".to_string()),
    }
}

/// Typed access to a command's fields, with messages that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn req_str(&self, key: &str) -> Result<String, String> {
        self.opt_str(key)?
            .ok_or_else(|| format!("missing \"{key}\" (a string)"))
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"{key}\" must be a string")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("\"{key}\" must be true or false")),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("\"{key}\" must be a whole number of 0 or more")),
        }
    }

    /// A list of user names; a single string is taken as a list of one.
    fn opt_names(&self, key: &str) -> Result<Option<Vec<String>>, String> {
        let bad = || format!("\"{key}\" must be a list of user names");
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(line: &str) -> Request {
        match parse(line) {
            Ok(Command {
                action: Action::Request(r),
                ..
            }) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn bad(line: &str) -> BadCommand {
        parse(line).expect_err(line)
    }

    #[test]
    fn contract_commands_map_to_requests() {
        assert_eq!(
            req(r#"{"cmd":"join","room":"general"}"#),
            Request::Join {
                room: "general".into(),
                password: None
            }
        );
        assert_eq!(
            req(r#"{"cmd":"join","room":"general","password":"pw"}"#),
            Request::Join {
                room: "general".into(),
                password: Some("pw".into())
            }
        );
        assert_eq!(
            req(r#"{"cmd":"part","room":"general"}"#),
            Request::Part {
                room: "general".into()
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"create_room","room":"ops","private":true}"#).map(|c| c.action),
            Ok(Action::CreateRoom {
                room: "ops".into(),
                private: true,
                password: None,
                e2ee: true,
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"create_room","room":"ops","password":"x","e2ee":false}"#)
                .map(|c| c.action),
            Ok(Action::CreateRoom {
                room: "ops".into(),
                private: false,
                password: Some("x".into()),
                e2ee: false,
            })
        );
        assert_eq!(
            req(r#"{"cmd":"invite","room":"ops","user":"bob"}"#),
            Request::Invite {
                room: "ops".into(),
                user: "bob".into()
            }
        );
        assert_eq!(req(r#"{"cmd":"rooms"}"#), Request::Rooms);
        assert_eq!(req(r#"{"cmd":"who"}"#), Request::Who { room: None });
        assert_eq!(
            req(r#"{"cmd":"who","room":"general"}"#),
            Request::Who {
                room: Some("general".into())
            }
        );
        assert_eq!(
            req(r#"{"cmd":"announce","text":"maintenance at 5"}"#),
            Request::Announce {
                text: "maintenance at 5".into()
            }
        );
    }

    #[test]
    fn send_targets_and_bodies() {
        assert_eq!(
            req(r#"{"cmd":"send","room":"general","text":"hi"}"#),
            Request::Send {
                target: Target::Room {
                    room: "general".into(),
                    except: vec![]
                },
                body: Body::text("hi"),
                idempotency_key: None,
                refs: None,
            }
        );
        assert_eq!(
            req(r#"{"cmd":"send","room":"general","text":"hi","except":["carol"]}"#),
            Request::Send {
                target: Target::Room {
                    room: "general".into(),
                    except: vec!["carol".into()]
                },
                body: Body::text("hi"),
                idempotency_key: None,
                refs: None,
            }
        );
        assert_eq!(
            req(r#"{"cmd":"send","to":["bob","carol"],"text":"hi","idempotency_key":"k"}"#),
            Request::Send {
                target: Target::Users {
                    to: vec!["bob".into(), "carol".into()]
                },
                body: Body::text("hi"),
                idempotency_key: Some("k".into()),
                refs: None,
            }
        );
        assert_eq!(
            req(
                r#"{"cmd":"send","to":"bob","content_type":"application/x-e2e","data_hex":"00ff"}"#
            ),
            Request::Send {
                target: Target::Users {
                    to: vec!["bob".into()]
                },
                body: Body {
                    content_type: "application/x-e2e".into(),
                    data: vec![0, 255]
                },
                idempotency_key: None,
                refs: None,
            }
        );
        for line in [
            r#"{"cmd":"send","text":"hi"}"#,
            r#"{"cmd":"send","room":"a","to":["b"],"text":"hi"}"#,
            r#"{"cmd":"send","to":[],"text":"hi"}"#,
            r#"{"cmd":"send","to":["b"],"except":["c"],"text":"hi"}"#,
            r#"{"cmd":"send","room":"a"}"#,
            r#"{"cmd":"send","room":"a","text":"x","data_hex":"00"}"#,
            r#"{"cmd":"send","room":"a","content_type":"x","data_hex":"zz"}"#,
            r#"{"cmd":"send","room":"a","text":5}"#,
            r#"{"cmd":"send","to":[1],"text":"x"}"#,
        ] {
            bad(line);
        }
    }

    #[test]
    fn history_forms() {
        assert_eq!(
            req(r#"{"cmd":"history","room":"general","limit":50}"#),
            Request::History {
                conv: ConvRef::Room("general".into()),
                limit: 50,
                before: None
            }
        );
        assert_eq!(
            req(r#"{"cmd":"history","with":"bob","limit":10,"before":7}"#),
            Request::History {
                conv: ConvRef::With(vec!["bob".into()]),
                limit: 10,
                before: Some(7)
            }
        );
        assert_eq!(
            req(r#"{"cmd":"history","with":["bob","carol"]}"#),
            Request::History {
                conv: ConvRef::With(vec!["bob".into(), "carol".into()]),
                limit: DEFAULT_HISTORY_LIMIT,
                before: None
            }
        );
        bad(r#"{"cmd":"history"}"#);
        bad(r#"{"cmd":"history","room":"a","with":"b"}"#);
        bad(r#"{"cmd":"history","room":"a","limit":-1}"#);
        bad(r#"{"cmd":"history","room":"a","limit":1.5}"#);
        bad(r#"{"cmd":"history","room":"a","limit":5000000000}"#);
    }

    #[test]
    fn ids_are_kept_whatever_their_type() {
        for id in [json!(1), json!("a"), json!({"n": [1, 2]}), json!(null)] {
            let line = json!({"cmd": "rooms", "id": id}).to_string();
            assert_eq!(parse(&line).unwrap().id, Some(id));
        }
        assert_eq!(parse(r#"{"cmd":"rooms"}"#).unwrap().id, None);
        // A bad command still reports its id.
        assert_eq!(bad(r#"{"cmd":"nope","id":9}"#).id, Some(json!(9)));
        assert_eq!(bad(r#"{"id":9}"#).id, Some(json!(9)));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let b = bad("not json");
        assert_eq!(b.id, None);
        assert!(b.message.contains("not JSON"), "{}", b.message);
        assert!(bad("[1,2]").message.contains("not an object"));
        assert!(bad(r#"{"cmd":"join"}"#).message.contains("\"room\""));
        assert!(
            bad(r#"{"cmd":"join","room":1}"#)
                .message
                .contains("must be a string")
        );
        assert!(
            bad(r#"{"cmd":"fly"}"#)
                .message
                .contains("unknown command \"fly\"")
        );
        assert!(bad(r#"{"cmd":7}"#).message.contains("\"cmd\""));
        assert!(
            bad(r#"{"cmd":"create_room","room":"a","private":"yes"}"#)
                .message
                .contains("true or false")
        );
    }

    #[test]
    fn quit_and_files() {
        assert_eq!(parse(r#"{"cmd":"quit"}"#).unwrap().action, Action::Quit);
        assert_eq!(
            parse(r#"{"cmd":"send_file","path":"/tmp/a","room":"general","except":["carol"],"p2p":true,"window":65536}"#)
                .unwrap()
                .action,
            Action::SendFile {
                path: "/tmp/a".into(),
                target: Target::Room {
                    room: "general".into(),
                    except: vec!["carol".into()]
                },
                p2p: true,
                window: Some(65536),
                congestion: None,
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"send_file","path":"/tmp/a","to":["bob"]}"#)
                .unwrap()
                .action,
            Action::SendFile {
                path: "/tmp/a".into(),
                target: Target::Users {
                    to: vec!["bob".into()]
                },
                p2p: false,
                window: None,
                congestion: None,
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"cancel_file","file_id":"x"}"#).map(|c| c.action),
            Ok(Action::CancelFile {
                file_id: "x".into()
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"accept_file","file_id":"x","dir":"/tmp"}"#)
                .unwrap()
                .action,
            Action::AcceptFile {
                file_id: "x".into(),
                dir: "/tmp".into(),
                window: None,
                congestion: None,
            }
        );
        assert!(
            bad(r#"{"cmd":"send_file","room":"g"}"#)
                .message
                .contains("\"path\"")
        );
        assert!(
            bad(r#"{"cmd":"send_file","path":"/a"}"#)
                .message
                .contains("send_file needs")
        );
        assert!(
            bad(r#"{"cmd":"accept_file","file_id":"x"}"#)
                .message
                .contains("\"dir\"")
        );
        assert!(
            bad(r#"{"cmd":"send_file","path":"/a","to":["b"],"except":["c"]}"#)
                .message
                .contains("except")
        );
        let _ = json!({});
    }

    #[test]
    fn extra_fields_are_ignored() {
        assert_eq!(
            req(r#"{"cmd":"part","room":"a","future":{"x":1}}"#),
            Request::Part { room: "a".into() }
        );
    }
}
