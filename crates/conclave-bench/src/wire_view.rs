//! A zero-copy look at the one server frame a receiver sees by the million: a message event.
//!
//! `conclave_proto::decode_server` builds owned values (five allocations and a UTF-8 check of
//! the body per message); at several hundred thousand deliveries a second on one CPU that was
//! a third of the generator's time. This view borrows the same postcard bytes instead. Its
//! types mirror `ServerFrame::Event(Event::Message(..))` field for field; the test below encodes
//! with the protocol crate and reads with the view, so a protocol change that breaks the mirror
//! fails there. Anything that is not a message event goes through the real decoder.

use serde::Deserialize;

/// `ServerFrame::Event` is variant 1, `Event::Message` variant 0 (postcard: varint indices).
const MESSAGE_EVENT_TAG: [u8; 2] = [1, 0];

#[derive(Deserialize)]
#[allow(dead_code)] // Fields are read only to move past them.
enum ConvView<'a> {
    Room(&'a str),
    Direct(#[serde(borrow)] Vec<&'a str>),
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct BodyView<'a> {
    content_type: &'a str,
    data: &'a [u8],
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct MessageView<'a> {
    msg_id: &'a str,
    #[serde(borrow)]
    conv: ConvView<'a>,
    from: &'a str,
    seq: u64,
    ts_ms: i64,
    #[serde(borrow)]
    body: BodyView<'a>,
    /// `Message::extra`: read as `None` only (one zero byte); a reply, edit, delete or
    /// reaction leaves bytes behind and goes to the real decoder.
    extra: Option<()>,
}

/// The body bytes of a text message event; `None` for any other frame (or a malformed one).
pub fn message_text(frame: &[u8]) -> Option<&[u8]> {
    let rest = frame.strip_prefix(&MESSAGE_EVENT_TAG)?;
    let (m, tail) = postcard::take_from_bytes::<MessageView<'_>>(rest).ok()?;
    (tail.is_empty()
        && m.extra.is_none()
        && m.body.content_type == conclave_client::proto::CONTENT_TYPE_TEXT)
        .then_some(m.body.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_client::proto::{Body, Conv, Event, Message, Reply, ServerFrame, encode_server};

    fn message(conv: Conv, body: Body) -> Vec<u8> {
        encode_server(&ServerFrame::Event(Event::Message(Message {
            msg_id: "0192f6e2-aaaa-7bbb-8ccc-123456789abc".into(),
            conv,
            from: "bench3".into(),
            seq: 1_234_567,
            ts_ms: -5,
            body,
            extra: None,
        })))
    }

    #[test]
    fn the_view_reads_what_the_protocol_writes() {
        let text = "cb 0000002a 123 xxxx";
        let room = message(Conv::Room("bench-0".into()), Body::text(text));
        assert_eq!(message_text(&room), Some(text.as_bytes()));
        let direct = message(Conv::Direct(vec!["a".into(), "b".into()]), Body::text("é"));
        assert_eq!(message_text(&direct), Some("é".as_bytes()));
    }

    #[test]
    fn other_frames_are_left_to_the_real_decoder() {
        let binary = message(
            Conv::Room("r".into()),
            Body {
                content_type: "application/octet-stream".into(),
                data: vec![1, 2, 3],
            },
        );
        assert_eq!(message_text(&binary), None);
        let reply = encode_server(&ServerFrame::Reply {
            id: 1,
            result: Ok(Reply::Ok),
        });
        assert_eq!(message_text(&reply), None);
        let join = encode_server(&ServerFrame::Event(Event::Join {
            room: "r".into(),
            user: "u".into(),
        }));
        assert_eq!(message_text(&join), None);
        // A reply (or an act) carries `extra`: the real decoder reads it.
        let reply = encode_server(&ServerFrame::Event(Event::Message(Message {
            msg_id: "m".into(),
            conv: Conv::Room("r".into()),
            from: "u".into(),
            seq: 1,
            ts_ms: 0,
            body: Body::text("yes"),
            extra: Some(Box::new(conclave_client::proto::Extra {
                reply_to: Some("m0".into()),
                ..Default::default()
            })),
        })));
        assert_eq!(message_text(&reply), None);
        let mut truncated = message(Conv::Room("r".into()), Body::text("hello"));
        truncated.pop();
        assert_eq!(message_text(&truncated), None);
    }
}
