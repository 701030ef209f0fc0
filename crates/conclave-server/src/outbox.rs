//! A connection's outbound side: a bounded queue of encoded frames and the task that writes
//! them to the TLS stream.
//!
//! Why bounded: a client that stops reading must never make the server's memory grow. When its
//! queue is full, the connection is closed as a slow consumer (it can reconnect and catch up
//! from history), and nobody else waits for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use conclave_proto::{DisconnectReason, Event, FRAME_HEADER_BYTES, ServerFrame};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
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

/// The frames of one queued entry, each with its length prefix: the entry itself, or each
/// frame of a run queued by [`Outbox::push_run`]. For writers that handle frames one at a
/// time (the WebSocket writer transcodes each to JSON); the native writer sends entries as
/// they are. Entries are made by [`encode`], so they always split whole; bytes that do not
/// (never expected) are logged and left out rather than sent as a broken frame.
pub fn frames_of(entry: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut rest = entry.clone();
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = rest
            .get(..FRAME_HEADER_BYTES)
            .and_then(|h| <[u8; FRAME_HEADER_BYTES]>::try_from(h).ok())
            .map(|h| FRAME_HEADER_BYTES + u32::from_be_bytes(h) as usize);
        match len {
            Some(end) if end <= rest.len() => Some(rest.split_to(end)),
            _ => {
                tracing::warn!(
                    bytes = rest.len(),
                    "a queued entry ended inside a frame; its rest was not sent"
                );
                rest.clear();
                None
            }
        }
    })
}

/// A handle to queue frames for one connection, and to close it with a reason.
///
/// The queue is a plain `VecDeque` behind a mutex rather than a channel: the writer takes
/// everything waiting in one lock (fan-out queues many frames between two of its runs), and
/// an idle connection holds no queue memory at all (a channel keeps its first block of slots
/// allocated for the connection's lifetime).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Wakes the writer; holds one permit when frames arrive while it is busy.
    ready: Notify,
    /// Most frames waiting at once.
    capacity: usize,
    close: CancellationToken,
    reason: Mutex<Option<(DisconnectReason, String)>>,
    /// Frames queued so far (for the monitor and the metrics).
    queued: AtomicU64,
}

#[derive(Default)]
struct Queue {
    /// Encoded frames in order; one entry may hold several frames back to back (see
    /// [`Outbox::push_run`]).
    frames: VecDeque<Bytes>,
    /// How many frames the entries of `frames` hold.
    count: usize,
    /// Frames the writer has taken and not finished writing: they count against the
    /// capacity too, so a connection never holds more than `capacity` frames in all.
    taken: usize,
    /// The writer has stopped: frames queued from now on are dropped.
    writer_gone: bool,
}

/// The writer's end of an [`Outbox`] (one per connection).
pub struct OutboxQueue {
    inner: Arc<Inner>,
}

impl OutboxQueue {
    /// Takes every frame waiting, oldest first (empty when none). They still count against
    /// the capacity until [`OutboxQueue::written`].
    pub(crate) fn take(&self) -> VecDeque<Bytes> {
        let mut q = self.inner.lock_queue();
        let frames = std::mem::take(&mut q.frames);
        q.taken = std::mem::take(&mut q.count);
        frames
    }

    /// The frames last taken have been written.
    pub(crate) fn written(&self) {
        self.inner.lock_queue().taken = 0;
    }

    /// Waits until frames may be waiting (a permit is kept when they arrived in between).
    pub(crate) async fn wait(&self) {
        self.inner.ready.notified().await
    }
}

impl Drop for OutboxQueue {
    fn drop(&mut self) {
        let mut q = self.inner.lock_queue();
        q.writer_gone = true;
        q.frames = VecDeque::new();
        q.count = 0;
    }
}

impl Inner {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock leaves a consistent queue: keep using it.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Outbox {
    /// A new outbox with room for `capacity` frames. It closes by itself when `parent` is
    /// cancelled (server shutdown).
    pub fn new(capacity: usize, parent: &CancellationToken) -> (Outbox, OutboxQueue) {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            capacity,
            close: parent.child_token(),
            reason: Mutex::new(None),
            queued: AtomicU64::new(0),
        });
        (
            Outbox {
                inner: inner.clone(),
            },
            OutboxQueue { inner },
        )
    }

    /// Queues an encoded frame; closes the connection if its queue is full.
    pub fn push(&self, frame: Bytes) {
        let mut q = self.inner.lock_queue();
        if q.writer_gone {
            return;
        }
        if q.count + q.taken >= self.inner.capacity {
            drop(q);
            self.fell_behind();
            return;
        }
        let was_empty = q.frames.is_empty();
        q.frames.push_back(frame);
        q.count += 1;
        drop(q);
        self.queued(1, was_empty);
    }

    /// Queues a run of frames, `frames` in order, as one entry: `joined` is the same frames
    /// back to back (one buffer shared by every recipient of the run, so a recipient costs one
    /// queue entry, one reference count and one wake-up for the whole run, and its writer one
    /// write). When the run does not fit in the capacity, the frames are queued one by one as
    /// [`Outbox::push`] does, so the connection gets as many as fit before it is closed.
    pub fn push_run(&self, joined: &Bytes, frames: &[Bytes]) {
        let mut q = self.inner.lock_queue();
        if q.writer_gone {
            return;
        }
        if q.count + q.taken + frames.len() > self.inner.capacity {
            drop(q);
            for f in frames {
                self.push(f.clone());
            }
            return;
        }
        let was_empty = q.frames.is_empty();
        q.frames.push_back(joined.clone());
        q.count += frames.len();
        drop(q);
        self.queued(frames.len() as u64, was_empty);
    }

    /// Counts `n` frames queued and wakes the writer if the queue was empty before them.
    fn queued(&self, n: u64, was_empty: bool) {
        self.inner.queued.fetch_add(n, Ordering::Relaxed);
        // The writer empties the whole queue each time it wakes: when frames were already
        // waiting, it has been woken for them and will take these too.
        if was_empty {
            self.inner.ready.notify_one();
        }
    }

    fn fell_behind(&self) {
        self.close(
            DisconnectReason::SlowConsumer,
            format!(
                "your connection fell behind: {} messages were waiting to be sent to you; reconnect to catch up",
                self.inner.capacity
            ),
        );
    }

    /// Encodes and queues a frame.
    pub fn send(&self, frame: &ServerFrame) {
        self.push(encode(frame));
    }

    /// Closes the connection, telling the client why (the first reason given wins).
    pub fn close(&self, reason: DisconnectReason, message: impl Into<String>) {
        if let Ok(mut r) = self.inner.reason.lock()
            && r.is_none()
        {
            *r = Some((reason, message.into()));
        }
        self.inner.close.cancel();
    }

    /// Frames waiting to be written (including those the writer is writing).
    pub fn depth(&self) -> usize {
        let q = self.inner.lock_queue();
        q.count + q.taken
    }

    /// Frames queued since the connection opened.
    pub fn frames_queued(&self) -> u64 {
        self.inner.queued.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.inner.close.is_cancelled()
    }

    /// Completes when the connection is being closed.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.inner.close.cancelled()
    }

    /// Why the connection is closing.
    pub fn reason(&self) -> (DisconnectReason, String) {
        self.inner
            .reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or((
                DisconnectReason::Shutdown,
                "the server is shutting down; reconnect later".to_string(),
            ))
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    w: &mut W,
    queue: &OutboxQueue,
    idle: &mut bool,
) -> std::io::Result<()> {
    loop {
        *idle = true;
        let mut frames = queue.take();
        if frames.is_empty() {
            queue.wait().await;
            continue;
        }
        *idle = false;
        write_frames(w, &mut frames).await?;
        w.flush().await?;
        queue.written();
    }
}

/// Writes frames in order: a lone frame as it is (no copy), several gathered into writes of
/// about [`WRITE_BATCH_BYTES`] so that they share TLS records and system calls.
async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    if frames.len() == 1 {
        if let Some(f) = frames.pop_front() {
            w.write_all(&f).await?;
        }
        return Ok(());
    }
    let total: usize = frames.iter().map(Bytes::len).sum();
    let mut batch = Vec::with_capacity(total.min(WRITE_BATCH_BYTES));
    while let Some(f) = frames.pop_front() {
        if !batch.is_empty() && batch.len() + f.len() > WRITE_BATCH_BYTES {
            w.write_all(&batch).await?;
            batch.clear();
        }
        if batch.is_empty() && f.len() >= WRITE_BATCH_BYTES {
            w.write_all(&f).await?;
        } else {
            batch.extend_from_slice(&f);
        }
    }
    if !batch.is_empty() {
        w.write_all(&batch).await?;
    }
    Ok(())
}

/// Writes queued frames until the outbox closes, then says goodbye: the frames still queued
/// (unless the client was too slow), the disconnect event, and a TLS close_notify.
///
/// Returns the stream, and whether the goodbye was delivered to the peer's side within
/// [`GOODBYE_TIMEOUT`] (when not, the peer has stopped reading: see `TlsWriter::reset`).
pub async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    queue: OutboxQueue,
    outbox: Outbox,
) -> (W, bool) {
    let mut idle = true;
    let ended_by_itself = tokio::select! {
        _ = outbox.closed() => false,
        r = write_loop(&mut w, &queue, &mut idle) => {
            if let Err(e) = r {
                outbox.close(DisconnectReason::Other, format!("write failed: {e}"));
            }
            true
        }
    };
    // Boxed: only a closing connection needs this state, not every idle writer.
    let delivered = Box::pin(goodbye(&mut w, queue, outbox, ended_by_itself, idle)).await;
    (w, delivered)
}

async fn goodbye<W: AsyncWrite + Unpin>(
    w: &mut W,
    queue: OutboxQueue,
    outbox: Outbox,
    ended_by_itself: bool,
    idle: bool,
) -> bool {
    let (reason, message) = outbox.reason();
    let done = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        // Mid-frame (cancelled inside a write) nothing more can be framed correctly.
        if !ended_by_itself && idle {
            if reason != DisconnectReason::SlowConsumer {
                write_frames(w, &mut queue.take()).await?;
            }
            let bye = encode(&ServerFrame::Event(Event::Disconnect { reason, message }));
            w.write_all(&bye).await?;
            w.flush().await?;
        }
        w.shutdown().await
    })
    .await;
    matches!(done, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    #[tokio::test]
    async fn frames_are_written_in_order_and_a_full_queue_closes_the_connection() {
        let root = CancellationToken::new();
        let (outbox, queue) = Outbox::new(4, &root);
        for n in 0..4 {
            outbox.push(frame(n, 10));
        }
        assert_eq!(outbox.depth(), 4);
        assert!(!outbox.is_closed());
        outbox.push(frame(9, 10));
        assert!(
            outbox.is_closed(),
            "a fifth frame overflows a queue of four"
        );
        assert_eq!(outbox.reason().0, DisconnectReason::SlowConsumer);
        let mut written = Vec::new();
        write_frames(&mut written, &mut queue.take()).await.unwrap();
        let expected: Vec<u8> = (0..4u8).flat_map(|n| vec![n; 10]).collect();
        assert_eq!(written, expected);
        assert_eq!(outbox.depth(), 4, "taken frames count until written");
        queue.written();
        assert_eq!(outbox.depth(), 0);
        assert_eq!(outbox.frames_queued(), 4);
    }

    #[tokio::test]
    async fn frames_the_writer_holds_count_against_the_capacity() {
        let root = CancellationToken::new();
        let (outbox, queue) = Outbox::new(4, &root);
        for n in 0..3 {
            outbox.push(frame(n, 10));
        }
        let held = queue.take();
        assert_eq!(held.len(), 3);
        outbox.push(frame(3, 10));
        assert!(!outbox.is_closed(), "four frames in all fit");
        outbox.push(frame(4, 10));
        assert!(
            outbox.is_closed(),
            "three held by the writer and two queued overflow a capacity of four"
        );
    }

    #[tokio::test]
    async fn a_run_counts_as_its_frames_and_does_not_overflow_as_one() {
        let root = CancellationToken::new();
        let (outbox, queue) = Outbox::new(5, &root);
        let frames: Vec<Bytes> = (1..=3).map(|n| frame(n, 4)).collect();
        let joined: Bytes = frames.concat().into();
        outbox.push(frame(0, 4));
        outbox.push_run(&joined, &frames);
        assert_eq!(outbox.depth(), 4, "one frame and a run of three");
        assert_eq!(outbox.frames_queued(), 4);
        let held = queue.take();
        assert_eq!(held.len(), 2, "the run is one entry");
        assert_eq!(outbox.depth(), 4, "taken frames count until written");
        // Three more do not fit next to the four held: queued one by one, the first fits and
        // the second closes the connection, as pushing them alone would.
        outbox.push_run(&joined, &frames);
        assert!(outbox.is_closed());
        assert_eq!(outbox.reason().0, DisconnectReason::SlowConsumer);
        assert_eq!(outbox.depth(), 5);
        let mut written = Vec::new();
        write_frames(&mut written, &mut held.clone()).await.unwrap();
        write_frames(&mut written, &mut queue.take()).await.unwrap();
        let expected: Vec<u8> = [0u8, 1, 2, 3, 1].iter().flat_map(|n| vec![*n; 4]).collect();
        assert_eq!(written, expected);
    }

    #[test]
    fn an_entry_splits_into_its_frames() {
        let frames: Vec<Bytes> = ["a", "bb", ""]
            .iter()
            .map(|t| {
                encode(&ServerFrame::Event(Event::Typing {
                    conv: conclave_proto::Conv::Room(t.to_string()),
                    user: "u".into(),
                }))
            })
            .collect();
        let joined: Bytes = frames.concat().into();
        assert_eq!(frames_of(&joined).collect::<Vec<_>>(), frames);
        assert_eq!(
            frames_of(&frames[1]).collect::<Vec<_>>(),
            vec![frames[1].clone()]
        );
        // A cut entry gives its whole frames and nothing of the broken one.
        let cut = joined.slice(..joined.len() - 1);
        assert_eq!(frames_of(&cut).collect::<Vec<_>>(), frames[..2].to_vec());
        assert_eq!(frames_of(&Bytes::from_static(&[0, 0])).count(), 0);
    }

    #[tokio::test]
    async fn batches_split_at_the_batch_size_without_reordering() {
        let root = CancellationToken::new();
        let (outbox, queue) = Outbox::new(100, &root);
        outbox.push(frame(1, WRITE_BATCH_BYTES - 5));
        outbox.push(frame(2, 10));
        outbox.push(frame(3, WRITE_BATCH_BYTES * 2));
        outbox.push(frame(4, 3));
        let mut written = Vec::new();
        write_frames(&mut written, &mut queue.take()).await.unwrap();
        let mut expected = vec![1u8; WRITE_BATCH_BYTES - 5];
        expected.extend(vec![2u8; 10]);
        expected.extend(vec![3u8; WRITE_BATCH_BYTES * 2]);
        expected.extend(vec![4u8; 3]);
        assert_eq!(written, expected);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_frames_and_says_goodbye() {
        let root = CancellationToken::new();
        let (outbox, queue) = Outbox::new(16, &root);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(writer(server, queue, outbox.clone()));
        outbox.push(frame(7, 5));
        let mut client = client;
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(got, [7; 5]);
        outbox.close(DisconnectReason::Quit, "bye");
        let (_, delivered) = task.await.unwrap();
        assert!(delivered);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest)
            .await
            .unwrap();
        let body = &rest[FRAME_HEADER_BYTES..];
        match conclave_proto::decode_server(body).unwrap() {
            ServerFrame::Event(Event::Disconnect { reason, .. }) => {
                assert_eq!(reason, DisconnectReason::Quit)
            }
            other => panic!("expected a disconnect event, got {other:?}"),
        }
        // The writer is gone: later frames are dropped, not kept.
        outbox.push(frame(8, 5));
        assert_eq!(outbox.depth(), 0);
    }
}
