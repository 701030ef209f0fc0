//! The web client's protocol connection: a WebSocket carrying the very requests, replies and
//! events of the native protocol, one JSON text message per frame (`serde_json` of
//! [`ClientFrame`] and [`ServerFrame`]), through the same session code
//! ([`crate::session::serve`]): the same limits, request rate, login, handlers and audit.
//!
//! No hello: the WebSocket upgrade itself is the version exchange (the path `/ws` is version
//! 1 of the protocol).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use conclave_proto::{ClientFrame, DisconnectReason, Event, FRAME_HEADER_BYTES, ServerFrame};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};

use crate::outbox::{GOODBYE_TIMEOUT, Outbox, OutboxQueue};
use crate::registry::Counters;
use crate::session::{FrameSource, Incoming, LinkParams};
use crate::state::Shared;

/// A JSON text message may be this many times the native frame limit: bytes travel as
/// arrays of numbers (up to four characters each, `255,`). The frame is then held to the
/// native limit itself, measured on its native encoding.
pub const JSON_BYTES_PER_FRAME_BYTE: usize = 4;

/// The largest WebSocket message read at all, for a server whose largest native frame is
/// `max_member_frame_bytes`.
pub fn max_message_bytes(max_member_frame_bytes: usize) -> usize {
    max_member_frame_bytes.saturating_mul(JSON_BYTES_PER_FRAME_BYTE)
}

/// Runs a session over an upgraded WebSocket to its end.
pub async fn run(
    shared: Arc<Shared>,
    socket: WebSocket,
    peer: SocketAddr,
    params: LinkParams,
    counters: Arc<Counters>,
) {
    let (sink, stream) = socket.split();
    crate::session::serve(
        shared,
        peer,
        params,
        counters,
        WsFrames(stream),
        move |queue, outbox| tokio::spawn(writer(sink, queue, outbox)),
    )
    .await
}

/// The reading half: text messages parsed as [`ClientFrame`].
struct WsFrames(SplitStream<WebSocket>);

impl FrameSource for WsFrames {
    async fn next_frame(&mut self, max_frame: usize) -> Incoming {
        loop {
            let message = match self.0.next().await {
                None => return Incoming::End,
                Some(Err(e)) => return read_error(e),
                Some(Ok(m)) => m,
            };
            match message {
                Message::Text(text) => return parse(text.as_str(), max_frame),
                Message::Binary(_) => {
                    return Incoming::Malformed(
                        "binary WebSocket messages are not accepted: send each request as one JSON text message (see docs/web.md)"
                            .to_string(),
                    );
                }
                // Pings are answered by the WebSocket layer itself.
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(_) => return Incoming::End,
            }
        }
    }
}

/// A text message as a request, held to the native frame limit.
pub fn parse(text: &str, max_frame: usize) -> Incoming {
    if text.len() > max_frame.saturating_mul(JSON_BYTES_PER_FRAME_BYTE) {
        return Incoming::TooLarge;
    }
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => {
            if conclave_proto::encode_client(&frame).len() > max_frame {
                Incoming::TooLarge
            } else {
                Incoming::Frame(frame)
            }
        }
        Err(e) => Incoming::Malformed(format!(
            "not a request: {e}; send one JSON object {{\"id\": N, \"req\": ...}} per text message (see docs/web.md)"
        )),
    }
}

fn read_error(e: axum::Error) -> Incoming {
    use tokio_tungstenite::tungstenite::Error;
    match e.into_inner().downcast::<Error>() {
        Ok(e) if matches!(*e, Error::Capacity(_)) => Incoming::TooLarge,
        _ => Incoming::End,
    }
}

/// The JSON text of a queued frame (queued frames are native: a length prefix and postcard).
fn to_text(frame: &Bytes) -> Option<Message> {
    let body = frame.get(FRAME_HEADER_BYTES..)?;
    match conclave_proto::decode_server(body) {
        Ok(f) => serde_json::to_string(&f)
            .ok()
            .map(|s| Message::Text(s.into())),
        Err(e) => {
            tracing::warn!(error = %e, "a queued frame did not decode; not sent to the web client");
            None
        }
    }
}

type Sink = SplitSink<WebSocket, Message>;

/// Writes queued frames as JSON text messages until the outbox closes, then says goodbye:
/// the frames still queued (unless the client was too slow), the disconnect event, and a
/// WebSocket close whose code says why.
pub async fn writer(mut sink: Sink, queue: OutboxQueue, outbox: Outbox) {
    let ended_by_itself = tokio::select! {
        _ = outbox.closed() => false,
        r = write_loop(&mut sink, &queue) => {
            if let Err(e) = r {
                outbox.close(DisconnectReason::Other, format!("write failed: {e}"));
            }
            true
        }
    };
    if !ended_by_itself {
        Box::pin(goodbye(&mut sink, queue, &outbox)).await;
    }
}

async fn write_loop(sink: &mut Sink, queue: &OutboxQueue) -> Result<(), axum::Error> {
    loop {
        let frames = queue.take();
        if frames.is_empty() {
            queue.wait().await;
            continue;
        }
        for f in frames.iter().flat_map(crate::outbox::frames_of) {
            if let Some(m) = to_text(&f) {
                sink.feed(m).await?;
            }
        }
        sink.flush().await?;
        queue.written();
    }
}

async fn goodbye(sink: &mut Sink, queue: OutboxQueue, outbox: &Outbox) {
    let (reason, message) = outbox.reason();
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        if reason != DisconnectReason::SlowConsumer {
            for f in queue.take().iter().flat_map(crate::outbox::frames_of) {
                if let Some(m) = to_text(&f) {
                    sink.feed(m).await?;
                }
            }
        }
        let bye = ServerFrame::Event(Event::Disconnect {
            reason,
            message: message.clone(),
        });
        if let Ok(text) = serde_json::to_string(&bye) {
            sink.feed(Message::Text(text.into())).await?;
        }
        sink.send(Message::Close(Some(CloseFrame {
            code: close_code(reason),
            reason: reason.as_str().into(),
        })))
        .await?;
        sink.close().await
    })
    .await;
}

/// The WebSocket close code for a disconnect reason (RFC 6455, 7.4.1).
pub fn close_code(reason: DisconnectReason) -> u16 {
    match reason {
        DisconnectReason::Quit => 1000,
        DisconnectReason::Shutdown => 1001,
        DisconnectReason::Malformed => 1007,
        DisconnectReason::TooLarge => 1009,
        DisconnectReason::Other => 1011,
        DisconnectReason::SlowConsumer
        | DisconnectReason::Timeout
        | DisconnectReason::Kicked
        | DisconnectReason::Banned
        | DisconnectReason::Flooding => 1008,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::Request;

    #[test]
    fn text_messages_parse_as_native_frames_under_the_native_limit() {
        match parse(r#"{"id":7,"req":{"Ping":{"nonce":3}}}"#, 1024) {
            Incoming::Frame(f) => {
                assert_eq!(f.id, 7);
                assert_eq!(f.req, Request::Ping { nonce: 3 });
            }
            _ => panic!("a ping parses"),
        }
        match parse(r#"{"id":1,"req":"Rooms"}"#, 1024) {
            Incoming::Frame(f) => assert_eq!(f.req, Request::Rooms),
            _ => panic!("a unit request parses"),
        }
        match parse(r#"{"id":1,"req":{"Nope":{}}}"#, 1024) {
            Incoming::Malformed(m) => assert!(m.contains("docs/web.md"), "{m}"),
            _ => panic!("an unknown request is malformed"),
        }
        // Under the JSON cap but over the native limit once decoded.
        let text = format!(
            r#"{{"id":1,"req":{{"Announce":{{"text":"{}"}}}}}}"#,
            "a".repeat(2000)
        );
        assert!(matches!(parse(&text, 1024), Incoming::TooLarge));
        assert!(matches!(parse(&"x".repeat(5000), 1024), Incoming::TooLarge));
    }
}
