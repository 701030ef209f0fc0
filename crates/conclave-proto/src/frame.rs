//! Encoding and decoding of frame bodies (the bytes after the 4-byte length prefix).
//!
//! The length prefix itself is handled by the I/O layer's codec, which must refuse a length over
//! its configured maximum before allocating (see [`crate::DEFAULT_MAX_FRAME_BYTES`]).

use crate::msg::{ClientFrame, ServerFrame};

/// A frame body that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct DecodeError(pub String);

/// Serializes a client frame body.
pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail: postcard only errors on unsupported
    // serde features (none are used here) or a full fixed buffer.
    postcard::to_stdvec(frame).unwrap_or_default()
}

/// Serializes a server frame body.
pub fn encode_server(frame: &ServerFrame) -> Vec<u8> {
    postcard::to_stdvec(frame).unwrap_or_default()
}

/// Decodes a client frame body. Trailing bytes are an error: a frame is exactly one message.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    decode_exact(bytes)
}

/// Decodes a server frame body.
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    decode_exact(bytes)
}

fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError(format!(
            "{} unexpected bytes after the message",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::*;

    #[test]
    fn client_round_trip() {
        let f = ClientFrame {
            id: 42,
            req: Request::Send {
                target: Target::Room {
                    room: "general".into(),
                    except: vec!["carol".into()],
                },
                body: Body::text("hello"),
                idempotency_key: Some("k1".into()),
                refs: None,
            },
        };
        assert_eq!(decode_client(&encode_client(&f)), Ok(f));
    }

    #[test]
    fn server_round_trip() {
        let f = ServerFrame::Event(Event::Presence {
            user: "bob".into(),
            online: true,
        });
        assert_eq!(decode_server(&encode_server(&f)), Ok(f));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors() {
        assert!(decode_client(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_client(&[]).is_err());
        let mut b = encode_client(&ClientFrame {
            id: 1,
            req: Request::Rooms,
        });
        b.push(0);
        assert!(decode_client(&b).is_err());
    }
}
