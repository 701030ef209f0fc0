//! One connection: connecting and logging in ([`open`]), then its two tasks. The reader
//! decodes frames, hands replies to the requests that wait for them, passes message events
//! through the cursors and queues events for the application; the writer drains the outbound
//! queue into TLS and pings when idle.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conclave_proto::{
    ClientFrame, Conv, DisconnectReason, ErrorCode, Event, Reply, Request, RequestId, ServerFrame,
    decode_server, encode_client,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::supervisor::closed_by_us;
use super::{
    ClientEvent, Core, FramesIn, FramesOut, MAX_EARLY_EVENTS, MAX_HELD_EVENTS, codec, unexpected,
};
use crate::address::ServerList;
use crate::cursor::Verdict;
use crate::error::ClientError;
use crate::handshake::establish;
use crate::options::ConnectOptions;
use crate::trust::PinOutcome;

/// A connection that is logged in, before its tasks start.
pub(super) struct Opened {
    pub(super) frames_in: FramesIn,
    pub(super) frames_out: FramesOut,
    /// Events that came before the login reply.
    pub(super) early: Vec<Event>,
    pub(super) user: String,
    pub(super) admin: bool,
    pub(super) rooms: Vec<String>,
    pub(super) fingerprint: String,
    pub(super) trust: PinOutcome,
    pub(super) tls_version: String,
    pub(super) cipher_suite: String,
    pub(super) key_exchange: String,
    /// The position in the `--server` list of the address connected to.
    pub(super) index: usize,
}

/// Connects (TCP, TLS, version) to address number `index` of `servers` and sends `login`
/// (request `id`); returns once logged in.
pub(super) async fn open(
    servers: &ServerList,
    index: usize,
    opts: &ConnectOptions,
    id: RequestId,
    login: Bytes,
) -> Result<Opened, ClientError> {
    let addr = servers.get(index);
    let server = addr.to_string();
    let established = establish(addr, servers.key(), opts).await?;
    let (read_half, write_half) = tokio::io::split(established.stream);
    let mut frames_in = FramedRead::new(read_half, codec(opts.max_frame_bytes));
    let mut frames_out = FramedWrite::new(write_half, codec(opts.max_frame_bytes));
    let exchange = async {
        let broke = |e: std::io::Error| {
            ClientError::disconnected(
                DisconnectReason::Other,
                format!(
                    "the connection broke during login: {}",
                    crate::error::plain(&e)
                ),
            )
        };
        frames_out.send(login).await.map_err(broke)?;
        let mut early = Vec::new();
        loop {
            let bytes = match frames_in.next().await {
                None => {
                    return Err(ClientError::disconnected(
                        DisconnectReason::Other,
                        "the server closed the connection during login",
                    ));
                }
                Some(Err(e)) => return Err(broke(e)),
                Some(Ok(bytes)) => bytes,
            };
            let frame = decode_server(&bytes).map_err(|e| ClientError::NotConclave {
                server: server.clone(),
                detail: format!("its answer to the login cannot be read ({e})"),
            })?;
            match frame {
                ServerFrame::Reply { id: rid, result } if rid == id => {
                    return Ok((result, early));
                }
                ServerFrame::Reply { .. } => {}
                ServerFrame::Event(Event::Disconnect { reason, message }) => {
                    return Err(ClientError::disconnected(reason, message));
                }
                ServerFrame::Event(event) => {
                    if early.len() >= MAX_EARLY_EVENTS {
                        return Err(ClientError::UnexpectedReply {
                            request: "login",
                            reply: format!("more than {MAX_EARLY_EVENTS} events before it"),
                        });
                    }
                    early.push(event);
                }
            }
        }
    };
    let (result, early) = match tokio::time::timeout(opts.handshake_timeout, exchange).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ClientError::HandshakeTimeout {
                server,
                stage: "login",
                seconds: opts.handshake_timeout.as_secs(),
            });
        }
    };
    let reply = result.map_err(ClientError::Server)?;
    let Reply::LoggedIn { user, admin, rooms } = reply else {
        return Err(unexpected("login", &reply));
    };
    Ok(Opened {
        frames_in,
        frames_out,
        early,
        user,
        admin,
        rooms,
        fingerprint: established.fingerprint,
        trust: established.trust,
        tls_version: established.tls_version,
        cipher_suite: established.cipher_suite,
        key_exchange: established.key_exchange,
        index: index % servers.len(),
    })
}

/// A running connection, as the supervisor holds it.
pub(super) struct Live {
    pub(super) generation: u64,
    pub(super) outbound: mpsc::Sender<Bytes>,
    /// Cancelled to close this connection.
    pub(super) cancel: CancellationToken,
    pub(super) reader: JoinHandle<Ended>,
}

/// Why a connection ended.
#[derive(Debug, Clone)]
pub(super) struct Ended {
    pub(super) reason: DisconnectReason,
    pub(super) message: String,
    pub(super) cause: Cause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// This client closed it.
    Us,
    /// The server said why ([`Event::Disconnect`]).
    Server,
    /// It broke: I/O error, end of stream, silence.
    Broken,
    /// The server sent something this client cannot take; it would again.
    Protocol,
}

impl Ended {
    pub(super) fn is_final(&self) -> bool {
        match self.cause {
            Cause::Us | Cause::Protocol => true,
            Cause::Server => matches!(
                self.reason,
                DisconnectReason::Quit
                    | DisconnectReason::Kicked
                    | DisconnectReason::Banned
                    | DisconnectReason::Flooding
                    | DisconnectReason::Malformed
                    | DisconnectReason::TooLarge
            ),
            Cause::Broken => false,
        }
    }
}

/// Per-connection state shared by its reader and writer.
#[derive(Default)]
pub(super) struct ConnShared {
    /// Set by the writer when a write failed, for the reader's report.
    write_error: Mutex<Option<String>>,
}

/// Starts the reader and writer of a logged-in connection.
pub(super) fn start(
    core: &Arc<Core>,
    opened: Opened,
    generation: u64,
    events: mpsc::Sender<ClientEvent>,
    after_reconnect: bool,
    resent_sends: HashMap<RequestId, Conv>,
) -> Live {
    let cancel = CancellationToken::new();
    let conn = Arc::new(ConnShared::default());
    let (outbound, outbound_rx) = mpsc::channel(core.opts.outbound_queue_frames.max(1));
    let reader = Reader {
        server: core.servers.get(opened.index).to_string(),
        core: core.clone(),
        events,
        cancel: cancel.clone(),
        conn: conn.clone(),
        after_reconnect,
        caught_up: false,
        missed: 0,
        held: (!resent_sends.is_empty()).then(Vec::new),
        resent_sends,
        resent_receipts: HashSet::new(),
    };
    let reader = tokio::spawn(reader.run(opened.frames_in, opened.early));
    tokio::spawn(write_loop(
        opened.frames_out,
        outbound_rx,
        core.clone(),
        conn,
        cancel.clone(),
    ));
    Live {
        generation,
        outbound,
        cancel,
        reader,
    }
}

/// A connection's reader.
pub(super) struct Reader {
    core: Arc<Core>,
    /// The address of this connection, for [`ClientEvent::Reconnected`].
    server: String,
    events: mpsc::Sender<ClientEvent>,
    cancel: CancellationToken,
    conn: Arc<ConnShared>,
    /// This connection replaces one that dropped: its catch-up ends with
    /// [`ClientEvent::Reconnected`].
    after_reconnect: bool,
    caught_up: bool,
    /// Messages delivered by the catch-up.
    missed: u32,
    /// Sends sent again on this connection (by request id), not answered yet.
    resent_sends: HashMap<RequestId, Conv>,
    /// What their receipts said: the catch-up's copies of these are not delivered.
    resent_receipts: HashSet<(Conv, u64)>,
    /// While sends sent again await their receipts, events wait here (see
    /// [`Reader::hold_or_push`]).
    held: Option<Vec<ClientEvent>>,
}

impl Reader {
    /// Reads frames until the connection ends; then stops the writer too.
    async fn run(mut self, frames: FramesIn, early: Vec<Event>) -> Ended {
        let ended = self.read(frames, early).await;
        // Stop the writer, and lose nothing held: what is not known to be a copy of our own
        // send goes out (unless the session is closing).
        self.cancel.cancel();
        let _ = self.release().await;
        ended
    }

    async fn read(&mut self, mut frames: FramesIn, early: Vec<Event>) -> Ended {
        for event in early {
            if let Some(ended) = self.handle(ServerFrame::Event(event)).await {
                return ended;
            }
        }
        let opts = &self.core.opts;
        let max_frame_bytes = opts.max_frame_bytes;
        let silence = opts.keepalive_interval * 2 + opts.handshake_timeout;
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return self.closed_by_us(),
                next = tokio::time::timeout(silence, frames.next()) => next,
            };
            let bytes = match next {
                Err(_) => {
                    return Ended {
                        reason: DisconnectReason::Timeout,
                        message: format!(
                            "nothing from the server for {} s (keep-alive unanswered); the \
                             connection seems dead",
                            silence.as_secs()
                        ),
                        cause: Cause::Broken,
                    };
                }
                Ok(None) => {
                    return Ended {
                        reason: DisconnectReason::Other,
                        message: "the server closed the connection without saying why".into(),
                        cause: Cause::Broken,
                    };
                }
                Ok(Some(Err(e))) => {
                    let too_big = e.to_string().contains("frame size too big");
                    return Ended {
                        reason: DisconnectReason::Other,
                        message: read_error_text(&e, max_frame_bytes),
                        cause: if too_big {
                            Cause::Protocol
                        } else {
                            Cause::Broken
                        },
                    };
                }
                Ok(Some(Ok(bytes))) => bytes,
            };
            let frame = match decode_server(&bytes) {
                Ok(frame) => frame,
                Err(e) => {
                    return Ended {
                        reason: DisconnectReason::Other,
                        message: format!("the server sent a frame this client cannot read ({e})"),
                        cause: Cause::Protocol,
                    };
                }
            };
            if let Some(ended) = self.handle(frame).await {
                return ended;
            }
        }
    }

    /// Handles one frame; `Some` when the connection ends.
    async fn handle(&mut self, frame: ServerFrame) -> Option<Ended> {
        match frame {
            ServerFrame::Reply { id, result } => {
                let waiter = {
                    let mut state = self.core.lock();
                    let waiter = state.pending.remove(&id);
                    match (waiter, &result) {
                        // "Shutting down, try again after the restart": a request that is safe
                        // to repeat waits for the reconnect instead of failing.
                        (Some(p), Err(body))
                            if body.code == ErrorCode::ShuttingDown
                                && p.resend.is_some()
                                && self.core.opts.reconnect.allows(0, Duration::ZERO) =>
                        {
                            state.pending.insert(id, p);
                            None
                        }
                        (Some(p), Ok(Reply::Sent { seq, .. })) => {
                            if let Some(conv) = &p.conv {
                                state.cursors.on_own_receipt(conv, *seq);
                            }
                            Some(p)
                        }
                        (waiter, _) => waiter,
                    }
                };
                if let Some(conv) = self.resent_sends.remove(&id)
                    && let Ok(Reply::Sent { seq, .. }) = &result
                {
                    self.resent_receipts.insert((conv, *seq));
                }
                match waiter {
                    // The requester may have given up; that is fine.
                    Some(p) => {
                        let _ = p.tx.send(result.map_err(ClientError::Server));
                    }
                    // Keep-alive pings, abandoned requests and requests kept for the next
                    // connection have nobody waiting here.
                    None => tracing::trace!(id, "reply with nobody waiting"),
                }
                if self.held.is_some() && self.caught_up && self.resent_sends.is_empty() {
                    return self.release().await;
                }
                None
            }
            ServerFrame::Event(Event::Disconnect { reason, message }) => Some(Ended {
                reason,
                message,
                cause: Cause::Server,
            }),
            ServerFrame::Event(Event::Message(m)) => {
                let verdict = self.core.lock().cursors.on_event(&m.conv, m.seq);
                match verdict {
                    Verdict::Deliver => {
                        self.hold_or_push(ClientEvent::Server(Event::Message(m)))
                            .await
                    }
                    Verdict::Duplicate | Verdict::OwnEcho => {
                        tracing::trace!(seq = m.seq, ?verdict, "message not delivered again");
                        None
                    }
                }
            }
            ServerFrame::Event(Event::CaughtUp { count, truncated }) => {
                self.caught_up = true;
                let event = if self.after_reconnect {
                    // `missed` is filled in when it goes out.
                    ClientEvent::Reconnected {
                        missed: 0,
                        truncated,
                        server: self.server.clone(),
                    }
                } else {
                    ClientEvent::Server(Event::CaughtUp { count, truncated })
                };
                if let Some(ended) = self.hold_or_push(event).await {
                    return Some(ended);
                }
                if self.held.is_some() && self.resent_sends.is_empty() {
                    return self.release().await;
                }
                None
            }
            ServerFrame::Event(event) => {
                self.core.on_file_event(&event);
                self.hold_or_push(ClientEvent::Server(event)).await
            }
        }
    }

    /// Gives an event to the application, or holds it.
    ///
    /// After a reconnect, sends whose reply was lost are sent again. One that the server had
    /// stored comes back in the catch-up as a message from this account, before its receipt
    /// (`duplicate: true`). So while such sends await their receipts (a moment: the server
    /// answers them right after the catch-up), every event waits here, in order; then the
    /// catch-up's copies of our own sends are dropped and the rest goes out. At most
    /// [`MAX_HELD_EVENTS`] wait; past that, or if the connection ends first, they go out as
    /// they are (a copy whose receipt did not come is then delivered: a repeat, never a loss).
    async fn hold_or_push(&mut self, event: ClientEvent) -> Option<Ended> {
        if let Some(held) = &mut self.held {
            held.push(event);
            if held.len() >= MAX_HELD_EVENTS {
                return self.release().await;
            }
            return None;
        }
        let in_catch_up = !self.caught_up;
        self.push_counted(event, in_catch_up).await
    }

    /// Stops holding and sends what was held, without the copies of our own resent sends.
    async fn release(&mut self) -> Option<Ended> {
        let held = self.held.take()?;
        // Held events up to the end of the catch-up are the catch-up's.
        let mut in_catch_up = true;
        for event in held {
            if let ClientEvent::Server(Event::Message(m)) = &event
                && m.from == self.core.user
                && self.resent_receipts.contains(&(m.conv.clone(), m.seq))
            {
                tracing::trace!(seq = m.seq, "copy of a resent send not delivered");
                // It was counted as queued for the application; it never will be.
                self.core.lock().cursors.on_taken(&m.conv, m.seq);
                continue;
            }
            let ends_catch_up = matches!(
                event,
                ClientEvent::Reconnected { .. } | ClientEvent::Server(Event::CaughtUp { .. })
            );
            if let Some(ended) = self.push_counted(event, in_catch_up).await {
                return Some(ended);
            }
            in_catch_up &= !ends_catch_up;
        }
        None
    }

    /// Pushes an event, counting the catch-up's messages for [`ClientEvent::Reconnected`].
    async fn push_counted(&mut self, mut event: ClientEvent, in_catch_up: bool) -> Option<Ended> {
        match &mut event {
            ClientEvent::Server(Event::Message(_)) if in_catch_up => {
                self.missed = self.missed.saturating_add(1);
            }
            ClientEvent::Reconnected { missed, .. } => *missed = self.missed,
            _ => {}
        }
        self.push(event).await
    }

    /// Queues an event for the application (waiting while the queue is full).
    ///
    /// A message counts as delivered in the cursors before it gets here, so only the end of
    /// the session may stop this, not the end of the connection: a reconnect would not send
    /// it again.
    async fn push(&self, event: ClientEvent) -> Option<Ended> {
        tokio::select! {
            _ = self.core.close.cancelled() => Some(self.closed_by_us()),
            sent = self.events.send(event) => {
                // The application dropped `Events`: the event is discarded, and counts as
                // received.
                if let Err(mpsc::error::SendError(ClientEvent::Server(Event::Message(m)))) = sent {
                    self.core.lock().cursors.on_taken(&m.conv, m.seq);
                }
                None
            }
        }
    }

    fn closed_by_us(&self) -> Ended {
        let write_error = self
            .conn
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match write_error {
            Some(message) => Ended {
                reason: DisconnectReason::Other,
                message,
                cause: Cause::Broken,
            },
            None if self.core.close.is_cancelled() => {
                let (reason, message) = closed_by_us();
                Ended {
                    reason,
                    message,
                    cause: Cause::Us,
                }
            }
            None => Ended {
                reason: DisconnectReason::Other,
                message: "the connection was closed".into(),
                cause: Cause::Broken,
            },
        }
    }
}

pub(super) fn read_error_text(e: &std::io::Error, max_frame_bytes: usize) -> String {
    let text = e.to_string();
    if text.contains("frame size too big") {
        format!(
            "the server sent a frame over this client's limit of {max_frame_bytes} bytes \
             (max_frame_bytes)"
        )
    } else {
        format!("the connection broke: {}", crate::error::plain(e))
    }
}

/// Writes queued frames until the connection is cancelled or a write fails. On a clean close
/// it first writes what is already queued (a last acknowledgement, say), bounded by the
/// handshake timeout.
pub(super) async fn write_loop(
    mut sink: FramesOut,
    mut outbound: mpsc::Receiver<Bytes>,
    core: Arc<Core>,
    conn: Arc<ConnShared>,
    cancel: CancellationToken,
) {
    let keepalive_interval = core.opts.keepalive_interval;
    let close_timeout = core.opts.handshake_timeout;
    let work = async {
        loop {
            match tokio::time::timeout(keepalive_interval, outbound.recv()).await {
                // Idle: a ping keeps the server's idle timeout from ending the connection.
                // Its reply finds nobody waiting and is dropped.
                Err(_) => {
                    let id = core.next_id();
                    let ping = encode_client(&ClientFrame {
                        id,
                        req: Request::Ping { nonce: id },
                    });
                    sink.send(Bytes::from(ping)).await?;
                }
                Ok(None) => return Ok(()),
                Ok(Some(frame)) => {
                    sink.feed(frame).await?;
                    if outbound.is_empty() {
                        SinkExt::<Bytes>::flush(&mut sink).await?;
                    }
                }
            }
        }
    };
    let result: std::io::Result<()> = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        result = work => result,
    };
    match result {
        Ok(()) => {
            // Flush what is queued and send TLS close_notify, but don't hang on a peer
            // that stopped reading.
            outbound.close();
            let drain = async {
                while let Some(frame) = outbound.recv().await {
                    sink.feed(frame).await?;
                }
                SinkExt::<Bytes>::close(&mut sink).await
            };
            let _ = tokio::time::timeout(close_timeout, drain).await;
        }
        Err(e) => {
            *conn.write_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                "could not send to the server: {}",
                crate::error::plain(&e)
            ));
        }
    }
    cancel.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_drops_are_final() {
        let ended = |reason, cause| Ended {
            reason,
            message: String::new(),
            cause,
        };
        use DisconnectReason::*;
        for reason in [Shutdown, SlowConsumer, Timeout, Other] {
            assert!(!ended(reason, Cause::Server).is_final(), "{reason:?}");
        }
        for reason in [Quit, Kicked, Banned, Flooding, Malformed, TooLarge] {
            assert!(ended(reason, Cause::Server).is_final(), "{reason:?}");
        }
        assert!(!ended(Other, Cause::Broken).is_final());
        assert!(ended(Quit, Cause::Us).is_final());
        assert!(ended(Other, Cause::Protocol).is_final());
    }
}
