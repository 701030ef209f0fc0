//! The JSON shapes of replies, edits, deletes and reactions, and the commands that make them.
//!
//! Events: `edited` (`msg_id` is the message edited, `text` its new text), `deleted`,
//! `reaction` (`on` true when added); each also carries the conversation (`room` or `to`),
//! `from` (who acted), and the act's own `act_id`, `seq` and `ts`. An edit that a later edit
//! or a delete made obsolete (seen in a catch-up after being away) has no text and
//! `"superseded": true`. A message that answers another carries `reply_to`; in `history`
//! (and threads, and search) a message carries `edited` (time of the last edit), `edits`,
//! `reactions` (emoji → users) and, when deleted, `"deleted": true` and no text.

use conclave_proto::chat::{ActKind, ActsOn, Extra, MessageInfo};
use conclave_proto::{Conv, Message};
use serde_json::{Map, Value, json};

use super::render::{conv_fields_into, direct_recipients};

/// An act as its event.
pub fn act(m: &Message, act: &ActsOn) -> Value {
    let mut out = Map::new();
    let name = match act.kind {
        ActKind::Edit => "edited",
        ActKind::Delete => "deleted",
        ActKind::React | ActKind::Unreact => "reaction",
    };
    out.insert("event".into(), json!(name));
    out.insert("msg_id".into(), json!(act.msg_id));
    conv_fields_into(&mut out, m);
    let text = m.body.as_text();
    match act.kind {
        ActKind::Edit => match text {
            Some(t) if !t.is_empty() => {
                out.insert("text".into(), json!(t));
            }
            _ => {
                out.insert("superseded".into(), json!(true));
            }
        },
        ActKind::Delete => {}
        ActKind::React | ActKind::Unreact => {
            out.insert("emoji".into(), json!(text.unwrap_or("")));
            out.insert("on".into(), json!(act.kind == ActKind::React));
        }
    }
    out.insert("act_id".into(), json!(m.msg_id));
    out.insert("seq".into(), json!(m.seq));
    out.insert("ts".into(), json!(m.ts_ms));
    Value::Object(out)
}

/// A message's reply reference and (in history) state.
pub fn extra_into(out: &mut Map<String, Value>, x: &Extra) {
    if let Some(r) = &x.reply_to {
        out.insert("reply_to".into(), json!(r));
    }
    if let Some(s) = &x.state {
        if let Some(t) = s.edited_ms {
            out.insert("edited".into(), json!(t));
            out.insert("edits".into(), json!(s.edits));
        }
        if !s.reactions.is_empty() {
            let mut r = Map::new();
            for reaction in &s.reactions {
                r.insert(reaction.emoji.clone(), json!(reaction.users));
            }
            out.insert("reactions".into(), Value::Object(r));
        }
    }
}

/// The `message_info` reply's fields.
pub fn message_info(info: &MessageInfo) -> Value {
    let mut out = Map::new();
    out.insert("msg_id".into(), json!(info.msg_id));
    match &info.conv {
        Conv::Room(room) => {
            out.insert("room".into(), json!(room));
        }
        Conv::Direct(participants) => {
            out.insert(
                "to".into(),
                json!(direct_recipients(participants, &info.from)),
            );
        }
    }
    out.insert("from".into(), json!(info.from));
    out.insert("seq".into(), json!(info.seq));
    out.insert("ts".into(), json!(info.ts_ms));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::chat::{MsgState, Reaction};
    use conclave_proto::{Body, Extra};

    fn msg(body: Body, extra: Option<Extra>) -> Message {
        Message {
            msg_id: "m2".into(),
            conv: Conv::Room("general".into()),
            from: "bob".into(),
            seq: 9,
            ts_ms: 5,
            body,
            extra: extra.map(Box::new),
        }
    }

    fn acting(kind: ActKind) -> Extra {
        Extra {
            reply_to: None,
            acts_on: Some(ActsOn {
                msg_id: "m1".into(),
                kind,
            }),
            state: None,
        }
    }

    #[test]
    fn acts_are_their_own_events() {
        let v =
            super::super::render::message(&msg(Body::text("fixed"), Some(acting(ActKind::Edit))));
        assert_eq!(
            v,
            json!({"event":"edited","msg_id":"m1","room":"general","from":"bob","text":"fixed",
                   "act_id":"m2","seq":9,"ts":5})
        );
        let v = super::super::render::message(&msg(Body::text(""), Some(acting(ActKind::Edit))));
        assert_eq!(v["superseded"], json!(true));
        assert!(v.get("text").is_none());
        let v = super::super::render::message(&msg(Body::text(""), Some(acting(ActKind::Delete))));
        assert_eq!(v["event"], "deleted");
        assert_eq!(v["msg_id"], "m1");
        let v =
            super::super::render::message(&msg(Body::text("👍"), Some(acting(ActKind::Unreact))));
        assert_eq!(v["event"], "reaction");
        assert_eq!(v["emoji"], "👍");
        assert_eq!(v["on"], false);
    }

    #[test]
    fn history_items_carry_their_state() {
        let state = MsgState {
            edited_ms: Some(77),
            edits: 2,
            deleted: false,
            reactions: vec![Reaction {
                emoji: "👍".into(),
                users: vec!["bob".into(), "carol".into()],
            }],
        };
        let v = super::super::render::message(&msg(
            Body::text("now"),
            Some(Extra {
                reply_to: Some("m0".into()),
                acts_on: None,
                state: Some(state),
            }),
        ));
        assert_eq!(v["text"], "now");
        assert_eq!(v["reply_to"], "m0");
        assert_eq!(v["edited"], 77);
        assert_eq!(v["edits"], 2);
        assert_eq!(v["reactions"], json!({"👍": ["bob", "carol"]}));
        let gone = MsgState {
            deleted: true,
            ..MsgState::default()
        };
        let v = super::super::render::message(&msg(
            Body::text(""),
            Some(Extra {
                state: Some(gone),
                ..Extra::default()
            }),
        ));
        assert_eq!(v["deleted"], true);
        assert!(v.get("text").is_none());
    }
}
