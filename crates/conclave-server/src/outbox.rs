//! A connection's outbound side: a bounded queue of encoded frames and the task that writes
//! them to the TLS stream.
//!
//! Why bounded: a client that stops reading must never make the server's memory grow. When its
//! queue is full, the connection is closed as a slow consumer (it can reconnect and catch up
//! from history), and nobody else waits for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use conclave_proto::{DisconnectReason, Event, FRAME_HEADER_BYTES, ServerFrame};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Queued frames are gathered up to this many bytes per write, so many small frames share one
/// TLS record. The gathering buffer lives only for that write: an idle connection holds none.
pub const WRITE_BATCH_BYTES: usize = 16 * 1024;
/// Time allowed to say goodbye (last frames, the disconnect event, TLS close_notify).
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// Encodes a server frame with its length prefix, ready to queue (once for any number of
/// recipients: `Bytes` clones share the buffer).
pub fn encode(frame: &ServerFrame) -> Bytes {
    let body = conclave_proto::encode_server(frame);
    let mut b = BytesMut::with_capacity(FRAME_HEADER_BYTES + body.len());
    b.put_u32(body.len() as u32);
    b.extend_from_slice(&body);
    b.freeze()
}

type Reason = Arc<Mutex<Option<(DisconnectReason, String)>>>;

/// A handle to queue frames for one connection, and to close it with a reason.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    close: CancellationToken,
    reason: Reason,
    /// Frames queued so far (for the monitor and the metrics).
    queued: Arc<AtomicU64>,
}

impl Outbox {
    /// A new outbox with room for `capacity` frames. It closes by itself when `parent` is
    /// cancelled (server shutdown).
    pub fn new(capacity: usize, parent: &CancellationToken) -> (Outbox, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Outbox {
                tx,
                close: parent.child_token(),
                reason: Arc::new(Mutex::new(None)),
                queued: Arc::default(),
            },
            rx,
        )
    }

    /// Queues an encoded frame; closes the connection if its queue is full.
    pub fn push(&self, frame: Bytes) {
        let sent = self.tx.try_send(frame);
        if sent.is_ok() {
            self.queued.fetch_add(1, Ordering::Relaxed);
        } else if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            self.close(
                DisconnectReason::SlowConsumer,
                format!(
                    "your connection fell behind: {} messages were waiting to be sent to you; reconnect to catch up",
                    self.tx.max_capacity()
                ),
            );
        }
    }

    /// Encodes and queues a frame.
    pub fn send(&self, frame: &ServerFrame) {
        self.push(encode(frame));
    }

    /// Closes the connection, telling the client why (the first reason given wins).
    pub fn close(&self, reason: DisconnectReason, message: impl Into<String>) {
        if let Ok(mut r) = self.reason.lock()
            && r.is_none()
        {
            *r = Some((reason, message.into()));
        }
        self.close.cancel();
    }

    /// Frames waiting to be written.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Frames queued since the connection opened.
    pub fn frames_queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }

    /// Completes when the connection is being closed.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// Why the connection is closing.
    pub fn reason(&self) -> (DisconnectReason, String) {
        self.reason.lock().ok().and_then(|r| r.clone()).unwrap_or((
            DisconnectReason::Shutdown,
            "the server is shutting down; reconnect later".to_string(),
        ))
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    w: &mut W,
    rx: &mut mpsc::Receiver<Bytes>,
    idle: &mut bool,
) -> std::io::Result<()> {
    loop {
        *idle = true;
        let Some(frame) = rx.recv().await else {
            return Ok(());
        };
        *idle = false;
        match rx.try_recv() {
            // The common case: one frame, written as it is (no copy).
            Err(_) => w.write_all(&frame).await?,
            Ok(next) => {
                let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES.max(frame.len() + next.len()));
                batch.extend_from_slice(&frame);
                batch.extend_from_slice(&next);
                while batch.len() < WRITE_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(f) => batch.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                w.write_all(&batch).await?;
            }
        }
        w.flush().await?;
    }
}

/// Writes queued frames until the outbox closes, then says goodbye: the frames still queued
/// (unless the client was too slow), the disconnect event, and a TLS close_notify.
pub async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Bytes>,
    outbox: Outbox,
) {
    let mut idle = true;
    let ended_by_itself = tokio::select! {
        _ = outbox.closed() => false,
        r = write_loop(&mut w, &mut rx, &mut idle) => {
            if let Err(e) = r {
                outbox.close(DisconnectReason::Other, format!("write failed: {e}"));
            }
            true
        }
    };
    let (reason, message) = outbox.reason();
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        // Mid-frame (cancelled inside a write) nothing more can be framed correctly.
        if !ended_by_itself && idle {
            if reason != DisconnectReason::SlowConsumer {
                while let Ok(f) = rx.try_recv() {
                    w.write_all(&f).await?;
                }
            }
            let bye = encode(&ServerFrame::Event(Event::Disconnect { reason, message }));
            w.write_all(&bye).await?;
            w.flush().await?;
        }
        w.shutdown().await
    })
    .await;
}
