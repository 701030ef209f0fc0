//! Cluster mode's fan-out (issue 24): one task per node puts this node's commits, the other
//! nodes' notices and the store's answers in one order per conversation, and fans each message
//! out to this node's connections.
//!
//! On one node, the store thread's order is the delivery order ([`crate::dispatch`]). In a
//! cluster PostgreSQL assigns the sequence numbers, and node A may commit seq 6 of a room
//! before it has heard of node B's seq 5. So here local commits pass through the same
//! [`Follower`] as the other nodes' notices: 5 (read from the store if its notice is late or
//! lost) is delivered before 6, on every node, and the sender's `Sent` reply goes out when its
//! message's turn comes (after everything before it in its conversation, as on one node).
//! Every local commit is published on the bus at once, with its encoded frame.
//!
//! # Which conversations are followed
//! Those with local audience. A login's catch-up reports the newest sequence number of each of
//! the user's rooms, read just before the catch-up ([`Done::CaughtUp`]'s `marks`); a room not
//! followed yet is followed from there and read once to its newest (notices that came before
//! were not taken). A room joined later, or a direct conversation, is followed from the first
//! notice or local commit this node sees in it after that (a notice of it lost before that one
//! is not noticed: the message is in history, and in the next catch-up of a client that never
//! saw a later one). A conversation is unfollowed on the timer when no local connection is in
//! its audience any more.
//!
//! # Catch-up against live traffic
//! A connection is live once its catch-up is delivered. On one node the store's order makes
//! that exact; here, the catch-up's read and the follower's deliveries race, both ways:
//! - a message the follower delivers while the connection is still catching up (committed
//!   after the read, or before it but delivered in between) would be lost for it: such
//!   deliveries are kept for every connection that is not live yet (bounded: beyond
//!   [`MAX_WAITING_FRAMES`] it is closed and reconnects), and sent after its catch-up, those
//!   the catch-up already had left out (by the highest sequence number it sent per
//!   conversation);
//! - a message the catch-up read before the follower delivered it (committed elsewhere, its
//!   notice not here yet) would come twice: the connection gets a floor per such
//!   conversation, and the follower's deliveries at or below it skip it.
//!
//! Audiences are the local ones (rooms, direct and multi-recipient conversations, blockcast
//! exceptions): [`crate::hub::Hub::live_audience`], as the single-node dispatcher's.
//!
//! Sans-IO at its core: [`Fanout`] takes the inputs and returns the store reads to make;
//! [`run`] is the task around it (tests drive `Fanout` with a simulated shared store).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conclave_proto::{Conv, DisconnectReason, Event, Reply, ServerFrame};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::bus::{
    Bus, Commit, DEFAULT_MAX_INLINE_FRAME_BYTES, Fetch, Follower, FollowerLimits, Incoming,
    Sequenced, Step,
};
use crate::dispatch::{SendCtx, answer, message_frame, refusal};
use crate::hub::SessionId;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::shared_hub::SharedHub;
use crate::state::Shared;
use crate::store::{Appended, Done, StoreError};

/// Most messages one store read brings (a gap, a resync).
pub const FETCH_PAGE: u32 = 256;
/// How often stalled reads are tried again and idle conversations unfollowed.
pub const TICK_EVERY: Duration = Duration::from_secs(1);
/// Most frames kept for one connection while it catches up; beyond, it is closed (it
/// reconnects and resumes from what it has).
pub const MAX_WAITING_FRAMES: usize = 4096;
/// Most conversations whose audience is kept between two changes of the hub.
const MAX_CACHED_AUDIENCES: usize = 1024;

/// A message in the follower: a notice (another node's, or this node's own commit) or one read
/// from the store.
#[derive(Debug, Clone)]
pub struct Item {
    pub conv: Conv,
    pub seq: u64,
    pub except: Vec<String>,
    /// The outbox-ready frame; `None` for a notice whose frame was left out (too large).
    pub frame: Option<Bytes>,
}

impl Sequenced for Item {
    fn conv(&self) -> &Conv {
        &self.conv
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn complete(&self) -> bool {
        self.frame.is_some()
    }
}

impl Item {
    fn from_commit(c: Commit) -> Item {
        Item {
            conv: c.conv,
            seq: c.seq,
            except: c.except,
            frame: c.frame,
        }
    }

    fn from_stored(a: Appended) -> Item {
        let frame = message_frame(&a.msg);
        Item {
            conv: a.msg.conv,
            seq: a.msg.seq,
            except: a.except,
            frame: Some(frame),
        }
    }
}

/// A local send waiting for its message's turn: then its sender is answered.
struct Origin {
    ctx: SendCtx,
    reply: Reply,
}

/// What reached a connection while it caught up.
#[derive(Default)]
struct Waiting {
    frames: Vec<(Conv, u64, Bytes)>,
    overflow: bool,
    /// Its own messages delivered meanwhile (it has their replies).
    own: HashSet<(Conv, u64)>,
}

/// A connection whose catch-up was read, waiting for what is read for it besides.
struct Catching {
    ctx: SendCtx,
    user: String,
    messages: Vec<conclave_proto::Message>,
    truncated: bool,
    have: HashMap<Conv, u64>,
    /// Per conversation read for it: through which sequence number.
    upto: HashMap<Conv, u64>,
    outstanding: usize,
    read: Vec<Appended>,
    failed: bool,
}

/// A read for one connection catching up: what the node delivered in `conv` above `after`,
/// through `through`, before the connection was live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchRead {
    pub sid: SessionId,
    pub conv: Conv,
    pub after: u64,
    pub through: u64,
}

/// Caught-up connections per conversation, with their users, as the hub had them at `version`.
#[derive(Default)]
struct Audiences {
    version: u64,
    convs: HashMap<Conv, Vec<(SessionId, String, Outbox)>>,
}

/// What the fan-out counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanoutCounts {
    /// Frames queued for this node's connections.
    pub queued: u64,
    /// Deliveries a connection skipped because its catch-up had them.
    pub floored: u64,
    /// Frames kept for connections catching up and sent after it.
    pub kept: u64,
    /// Connections closed because too much arrived while they caught up.
    pub waiting_overflows: u64,
    /// Local commits the bus did not take (the other nodes read them from the store).
    pub publish_failures: u64,
}

/// The core of a node's fan-out: see the module documentation.
pub struct Fanout {
    follower: Follower<Item>,
    followed: HashSet<Conv>,
    origins: HashMap<Conv, BTreeMap<u64, Origin>>,
    waiting: HashMap<SessionId, Waiting>,
    floors: HashMap<SessionId, HashMap<Conv, u64>>,
    catching: HashMap<SessionId, Catching>,
    catch_reads: Vec<CatchRead>,
    audiences: Audiences,
    steps: Vec<Step<Item>>,
    counts: FanoutCounts,
}

impl Fanout {
    pub fn new(limits: FollowerLimits) -> Fanout {
        Fanout {
            follower: Follower::new(limits),
            followed: HashSet::new(),
            origins: HashMap::new(),
            waiting: HashMap::new(),
            floors: HashMap::new(),
            catching: HashMap::new(),
            catch_reads: Vec::new(),
            audiences: Audiences::default(),
            steps: Vec::new(),
            counts: FanoutCounts::default(),
        }
    }

    pub fn counts(&self) -> FanoutCounts {
        self.counts
    }

    /// The follower's last delivered sequence number in `conv`, if followed.
    pub fn last(&self, conv: &Conv) -> Option<u64> {
        self.follower.last(conv)
    }

    /// A report of this node's store thread: a commit (published on `bus`, then delivered in
    /// its turn) or a catch-up.
    pub fn local(
        &mut self,
        hub: &SharedHub,
        metrics: &Metrics,
        bus: Option<&dyn Bus>,
        done: Done<SendCtx>,
    ) -> Vec<Fetch> {
        match done {
            Done::Appended { result, mut ctx } => {
                if let Some(n) = ctx.notify.take() {
                    let _ = n.send(result.as_ref().ok().map(|a| a.msg.clone()));
                }
                let a = match result {
                    Ok(a) => a,
                    Err(e) => {
                        let error = refusal(&e, metrics);
                        answer(&ctx, Err(error));
                        return Vec::new();
                    }
                };
                metrics.storage_ok();
                let reply = Reply::Sent {
                    msg_id: a.msg.msg_id.clone(),
                    seq: a.msg.seq,
                    ts_ms: a.msg.ts_ms,
                    duplicate: a.duplicate,
                };
                if a.duplicate {
                    // A retry of a message stored before: fanned out then.
                    answer(&ctx, Ok(reply));
                    return Vec::new();
                }
                let frame = message_frame(&a.msg);
                if let Some(bus) = bus {
                    let notice = Commit::new(
                        &a.msg,
                        &a.except,
                        frame.clone(),
                        DEFAULT_MAX_INLINE_FRAME_BYTES,
                    );
                    if let Err(e) = bus.publish_commit(notice) {
                        self.counts.publish_failures += 1;
                        if self.counts.publish_failures.is_power_of_two() {
                            tracing::warn!(error = %e, failures = self.counts.publish_failures, "a commit notice was not published");
                        }
                    }
                }
                let conv = a.msg.conv.clone();
                let seq = a.msg.seq;
                if !self.followed.contains(&conv) {
                    self.start_following(conv.clone(), seq.saturating_sub(1), false);
                }
                if self.follower.last(&conv).is_some_and(|last| last >= seq) {
                    // Passed over (this conversation was followed from a later notice): a read
                    // for its sender, if catching up, must not bring it back.
                    let h = hub.lock();
                    if h.is_connected(ctx.origin) && !h.is_live(ctx.origin) {
                        let w = self.waiting.entry(ctx.origin).or_default();
                        if w.own.len() >= MAX_WAITING_FRAMES {
                            w.overflow = true;
                        } else {
                            w.own.insert((conv.clone(), seq));
                        }
                    }
                    drop(h);
                    answer(&ctx, Ok(reply));
                    return Vec::new();
                }
                self.origins
                    .entry(conv.clone())
                    .or_default()
                    .insert(seq, Origin { ctx, reply });
                let item = Item {
                    conv: conv.clone(),
                    seq,
                    except: a.except,
                    frame: Some(frame),
                };
                self.follower.notice(item, &mut self.steps);
                self.settle(hub, metrics, Some(&conv))
            }
            Done::CaughtUp { result, marks, ctx } => {
                self.caught_up(hub, metrics, result, marks, ctx)
            }
        }
    }

    /// Another node's commit notice.
    pub fn remote(&mut self, hub: &SharedHub, metrics: &Metrics, commit: Commit) -> Vec<Fetch> {
        let conv = commit.conv.clone();
        if !self.followed.contains(&conv) {
            if !hub.lock().has_local_audience(&conv) {
                return Vec::new();
            }
            self.start_following(conv.clone(), commit.seq.saturating_sub(1), false);
        }
        self.follower
            .notice(Item::from_commit(commit), &mut self.steps);
        self.settle(hub, metrics, Some(&conv))
    }

    /// The bus may have lost notices: every followed conversation is read to its newest.
    pub fn reset(&mut self, hub: &SharedHub, metrics: &Metrics) -> Vec<Fetch> {
        self.follower.reset(&mut self.steps);
        self.settle(hub, metrics, None)
    }

    /// The store's answer to `fetch` (a [`crate::store::Messages::conv_range`] of it).
    pub fn fetched(
        &mut self,
        hub: &SharedHub,
        metrics: &Metrics,
        fetch: &Fetch,
        result: Result<(Vec<Appended>, bool), StoreError>,
    ) -> Vec<Fetch> {
        match result {
            Ok((messages, more)) => {
                let last = messages.last().map(|a| a.msg.seq);
                let complete_through = if more {
                    last.unwrap_or(fetch.after)
                } else {
                    fetch.through.or(last).unwrap_or(fetch.after)
                };
                let items: Vec<Item> = messages.into_iter().map(Item::from_stored).collect();
                self.follower.fetched(
                    fetch.id,
                    &fetch.conv,
                    items,
                    complete_through,
                    more,
                    &mut self.steps,
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "a cluster read of missed messages failed; it is retried");
                self.follower.fetch_failed(fetch.id, &fetch.conv);
            }
        }
        self.settle(hub, metrics, Some(&fetch.conv))
    }

    /// On the timer: stalled reads are asked again, conversations without local audience are
    /// unfollowed, and what was kept for connections that are gone is dropped.
    pub fn tick(&mut self, hub: &SharedHub, metrics: &Metrics) -> Vec<Fetch> {
        let idle: Vec<Conv> = {
            let h = hub.lock();
            self.waiting.retain(|sid, _| h.is_connected(*sid));
            self.floors.retain(|sid, _| h.is_connected(*sid));
            self.catching.retain(|sid, _| h.is_connected(*sid));
            self.followed
                .iter()
                .filter(|c| !h.has_local_audience(c) && !self.origins.contains_key(*c))
                .cloned()
                .collect()
        };
        for conv in idle {
            self.follower.unfollow(&conv);
            self.followed.remove(&conv);
        }
        self.follower.retry_stalled(&mut self.steps);
        self.settle(hub, metrics, None)
    }

    fn start_following(&mut self, conv: Conv, last: u64, resync: bool) {
        if !self.follower.follow(conv.clone(), last) {
            tracing::warn!(
                "the cluster fan-out follows as many conversations as it may; a new one is not followed"
            );
            return;
        }
        self.followed.insert(conv.clone());
        if resync {
            self.follower.resync(&conv, &mut self.steps);
        }
    }

    fn caught_up(
        &mut self,
        hub: &SharedHub,
        metrics: &Metrics,
        result: Result<(Vec<conclave_proto::Message>, bool), String>,
        marks: Vec<(Conv, u64)>,
        ctx: SendCtx,
    ) -> Vec<Fetch> {
        let (messages, truncated) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "catch-up failed");
                (Vec::new(), true)
            }
        };
        metrics.catch_up(messages.len());
        let sid = ctx.origin;
        // What the connection has through, per conversation: what its catch-up sent, and at
        // least the newest before the catch-up's read (what it did not send up to there was
        // not for it).
        let mut have: HashMap<Conv, u64> = HashMap::new();
        for m in &messages {
            let h = have.entry(m.conv.clone()).or_default();
            *h = (*h).max(m.seq);
        }
        let news: Vec<(Conv, u64)> = have.iter().map(|(c, h)| (c.clone(), *h)).collect();
        for (conv, mark) in marks.iter().cloned().chain(news) {
            if !self.followed.contains(&conv) {
                self.start_following(conv, mark, true);
            }
        }
        for (conv, mark) in marks {
            let h = have.entry(conv).or_default();
            *h = (*h).max(mark);
        }
        let mut fetches = self.settle(hub, metrics, None);
        // What the follower delivered above that before now (or passed over, following a
        // conversation from a later notice) is read for this connection alone.
        let mut upto = HashMap::new();
        for (conv, h) in &have {
            if let Some(last) = self.follower.last(conv)
                && last > *h
            {
                self.catch_reads.push(CatchRead {
                    sid,
                    conv: conv.clone(),
                    after: *h,
                    through: last,
                });
                upto.insert(conv.clone(), last);
            }
        }
        let user = hub.lock().session_user(sid).unwrap_or_default().to_string();
        let catching = Catching {
            ctx,
            user,
            messages,
            truncated,
            have,
            outstanding: upto.len(),
            upto,
            read: Vec::new(),
            failed: false,
        };
        if catching.outstanding == 0 {
            fetches.extend(self.finish(hub, metrics, catching));
        } else {
            self.catching.insert(sid, catching);
        }
        fetches
    }

    /// The reads for connections catching up asked since the last call.
    pub fn take_catch_reads(&mut self) -> Vec<CatchRead> {
        std::mem::take(&mut self.catch_reads)
    }

    /// The store's answer to a [`CatchRead`].
    pub fn catch_read(
        &mut self,
        hub: &SharedHub,
        metrics: &Metrics,
        read: &CatchRead,
        result: Result<(Vec<Appended>, bool), StoreError>,
    ) -> Vec<Fetch> {
        let Some(c) = self.catching.get_mut(&read.sid) else {
            return Vec::new();
        };
        c.outstanding -= 1;
        match result {
            Ok((messages, false)) => c.read.extend(messages),
            Ok((_, true)) => c.failed = true,
            Err(e) => {
                tracing::warn!(error = %e, "a catch-up's read of what the node delivered meanwhile failed");
                c.failed = true;
            }
        }
        if c.outstanding > 0 {
            return Vec::new();
        }
        let Some(c) = self.catching.remove(&read.sid) else {
            return Vec::new();
        };
        self.finish(hub, metrics, c)
    }

    /// Sends a caught-up connection its catch-up, what was read for it, what reached it
    /// meanwhile and is not in either, then marks it live.
    fn finish(&mut self, hub: &SharedHub, metrics: &Metrics, c: Catching) -> Vec<Fetch> {
        let sid = c.ctx.origin;
        let waiting = self.waiting.remove(&sid).unwrap_or_default();
        if c.failed || waiting.overflow {
            self.counts.waiting_overflows += 1;
            c.ctx.outbox.close(
                DisconnectReason::SlowConsumer,
                "this connection could not be caught up with what arrived meanwhile; reconnect to resume",
            );
            return Vec::new();
        }
        let mut count = c.messages.len() as u32;
        for m in c.messages {
            c.ctx.outbox.send(&ServerFrame::Event(Event::Message(m)));
        }
        for a in c.read {
            let seq = a.msg.seq;
            let conv = &a.msg.conv;
            let wanted = c.have.get(conv).is_some_and(|h| seq > *h)
                && c.upto.get(conv).is_some_and(|u| seq <= *u)
                && !a.except.contains(&c.user)
                && !waiting.own.contains(&(conv.clone(), seq));
            if wanted {
                count += 1;
                self.counts.kept += 1;
                c.ctx
                    .outbox
                    .send(&ServerFrame::Event(Event::Message(a.msg)));
            }
        }
        for (conv, seq, frame) in waiting.frames {
            if c.upto.get(&conv).is_some_and(|u| seq <= *u)
                || c.have.get(&conv).is_some_and(|h| seq <= *h)
            {
                continue;
            }
            self.counts.kept += 1;
            c.ctx.outbox.push(frame);
        }
        c.ctx.outbox.send(&ServerFrame::Event(Event::CaughtUp {
            count,
            truncated: c.truncated,
        }));
        hub.lock().set_live(sid);
        for (conv, h) in c.have {
            if self.follower.last(&conv).is_some_and(|last| last < h) {
                self.floors.entry(sid).or_default().insert(conv, h);
            }
        }
        self.settle(hub, metrics, None)
    }

    /// Carries out the follower's steps; answers the local senders whose messages' turn has
    /// passed in `conv` (or in every conversation); returns the reads to make.
    fn settle(&mut self, hub: &SharedHub, metrics: &Metrics, conv: Option<&Conv>) -> Vec<Fetch> {
        let mut fetches = Vec::new();
        let steps = std::mem::take(&mut self.steps);
        for step in steps {
            match step {
                Step::Deliver(item) => self.deliver(hub, metrics, item),
                Step::Fetch(f) => fetches.push(f),
            }
        }
        // Senders whose message was passed over without a delivery (the store had no longer
        // got it, or its conversation is no longer followed) are answered all the same.
        let convs: Vec<Conv> = match conv {
            Some(c) => vec![c.clone()],
            None => self.origins.keys().cloned().collect(),
        };
        for c in convs {
            let last = self.follower.last(&c);
            let Some(waiting) = self.origins.get_mut(&c) else {
                continue;
            };
            while let Some(entry) = waiting.first_entry() {
                if last.is_some_and(|l| *entry.key() > l) {
                    break;
                }
                let o = entry.remove();
                answer(&o.ctx, Ok(o.reply));
            }
            if waiting.is_empty() {
                self.origins.remove(&c);
            }
        }
        fetches
    }

    fn deliver(&mut self, hub: &SharedHub, metrics: &Metrics, item: Item) {
        let Some(frame) = item.frame else {
            return;
        };
        let origin = self
            .origins
            .get_mut(&item.conv)
            .and_then(|o| o.remove(&item.seq));
        let skip = origin.as_ref().map(|o| o.ctx.origin);
        let mut recipients = 0;
        {
            let h = hub.lock();
            if self.audiences.version != h.version() {
                self.audiences.convs.clear();
                self.audiences.version = h.version();
            }
            if !self.audiences.convs.contains_key(&item.conv) {
                if self.audiences.convs.len() >= MAX_CACHED_AUDIENCES {
                    self.audiences.convs.clear();
                }
                let audience = h
                    .live_audience(&item.conv)
                    .into_iter()
                    .map(|(sid, user, o)| (sid, user.to_string(), o.clone()))
                    .collect();
                self.audiences.convs.insert(item.conv.clone(), audience);
            }
            for (sid, user, o) in self.audiences.convs.get(&item.conv).into_iter().flatten() {
                if Some(*sid) == skip || item.except.iter().any(|e| e == user) {
                    continue;
                }
                if !self.floors.is_empty()
                    && let Some(floors) = self.floors.get_mut(sid)
                    && let Some(floor) = floors.get(&item.conv).copied()
                {
                    if item.seq <= floor {
                        self.counts.floored += 1;
                        if item.seq == floor {
                            floors.remove(&item.conv);
                        }
                        continue;
                    }
                    floors.remove(&item.conv);
                }
                o.push(frame.clone());
                recipients += 1;
            }
            if h.waiting() > 0 {
                if let Some(sid) = skip
                    && h.is_connected(sid)
                    && !h.is_live(sid)
                {
                    let w = self.waiting.entry(sid).or_default();
                    if w.own.len() >= MAX_WAITING_FRAMES {
                        w.overflow = true;
                    } else {
                        w.own.insert((item.conv.clone(), item.seq));
                    }
                }
                for (sid, user) in h.waiting_audience(&item.conv) {
                    if Some(sid) == skip || item.except.iter().any(|e| e == user) {
                        continue;
                    }
                    let w = self.waiting.entry(sid).or_default();
                    if w.frames.len() >= MAX_WAITING_FRAMES {
                        w.overflow = true;
                        w.frames = Vec::new();
                    } else if !w.overflow {
                        w.frames.push((item.conv.clone(), item.seq, frame.clone()));
                    }
                }
            }
        }
        self.floors.retain(|_, f| !f.is_empty());
        self.counts.queued += recipients as u64;
        metrics.message(&item.conv, recipients);
        if let Some(o) = origin {
            answer(&o.ctx, Ok(o.reply));
        }
    }
}

/// The node's fan-out task: this node's store reports, the bus's notices and events, the
/// store's answers to reads, a timer. Runs until the store thread stops.
pub async fn run(shared: Arc<Shared>, mut done: mpsc::Receiver<Done<SendCtx>>) {
    let bus = shared.bus.clone();
    let mut incoming = bus.as_ref().and_then(|b| b.take_incoming());
    let (answers_tx, mut answers) =
        mpsc::unbounded_channel::<(Fetch, Result<(Vec<Appended>, bool), StoreError>)>();
    let (catch_tx, mut catch_answers) =
        mpsc::unbounded_channel::<(CatchRead, Result<(Vec<Appended>, bool), StoreError>)>();
    let mut fanout = Fanout::new(FollowerLimits::default());
    let mut tick = tokio::time::interval(TICK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hub = shared.hub.clone();
    let metrics = shared.metrics.clone();
    loop {
        // Biased: this node's store reports come first. A read's answer comes from the store
        // thread after the reports of every commit before it (the syncer answers in order), so
        // a local message is known as local (its sender skipped and answered) before a read
        // can bring it.
        let fetches = tokio::select! {
            biased;
            d = done.recv() => match d {
                Some(d) => fanout.local(&hub, &metrics, bus.as_deref(), d),
                None => break,
            },
            Some((fetch, result)) = answers.recv() => fanout.fetched(&hub, &metrics, &fetch, result),
            Some((read, result)) = catch_answers.recv() => fanout.catch_read(&hub, &metrics, &read, result),
            i = next(&mut incoming) => match i {
                Some(Incoming::Commit { commit, .. }) => fanout.remote(&hub, &metrics, commit),
                Some(Incoming::Event { node, event }) => {
                    crate::cluster_events::apply(&shared, &node, event);
                    Vec::new()
                }
                Some(Incoming::Reset(reason)) => {
                    tracing::info!(reason = ?reason, "the bus may have lost notices: reading every followed conversation from the store");
                    crate::cluster_events::reset(&shared);
                    fanout.reset(&hub, &metrics)
                }
                None => {
                    tracing::error!("the bus's stream ended: this node no longer hears the others");
                    incoming = None;
                    Vec::new()
                }
            },
            _ = tick.tick() => fanout.tick(&hub, &metrics),
        };
        for r in fanout.take_catch_reads() {
            let store = shared.store.clone();
            let tx = catch_tx.clone();
            tokio::spawn(async move {
                let (conv, after, through) = (r.conv.clone(), r.after, r.through);
                let limit = MAX_WAITING_FRAMES as u32;
                let result = store
                    .call(move |db| db.conv_range(&conv, after, Some(through), limit))
                    .await;
                let _ = tx.send((r, result));
            });
        }
        for f in fetches {
            let store = shared.store.clone();
            let tx = answers_tx.clone();
            tokio::spawn(async move {
                let (conv, after, through) = (f.conv.clone(), f.after, f.through);
                let result = store
                    .call(move |db| db.conv_range(&conv, after, through, FETCH_PAGE))
                    .await;
                let _ = tx.send((f, result));
            });
        }
    }
}

/// The next item of the bus's stream; pending forever without one.
async fn next(incoming: &mut Option<crate::bus::BusStream>) -> Option<Incoming> {
    match incoming {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BusCounts, BusStream, ClusterEvent, PublishError};
    use crate::hub::{Hub, HubLimits};
    use crate::outbox::OutboxQueue;
    use crate::store::RoomRow;
    use conclave_proto::{Body, Message};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tokio_util::sync::CancellationToken;

    /// A bus that keeps what a node publishes; the test carries it to the other nodes.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Commit>>);

    impl Bus for Recorder {
        fn node(&self) -> &str {
            "test"
        }
        fn publish_commit(&self, commit: Commit) -> Result<(), PublishError> {
            self.0.lock().expect("lock").push(commit);
            Ok(())
        }
        fn publish_event(&self, _: ClusterEvent) -> Result<(), PublishError> {
            Ok(())
        }
        fn take_incoming(&self) -> Option<BusStream> {
            None
        }
        fn counts(&self) -> BusCounts {
            BusCounts::default()
        }
    }

    /// A stored message, and which connection sent it.
    #[derive(Clone)]
    struct Stored {
        appended: Appended,
        origin: SessionId,
    }

    /// The shared store: one sequence per conversation, as PostgreSQL's.
    #[derive(Default)]
    struct SharedStore {
        convs: HashMap<Conv, Vec<Stored>>,
        next_id: u64,
    }

    impl SharedStore {
        fn commit(
            &mut self,
            conv: &Conv,
            from: &str,
            except: Vec<String>,
            origin: SessionId,
        ) -> Appended {
            self.next_id += 1;
            let log = self.convs.entry(conv.clone()).or_default();
            let appended = Appended {
                msg: Message {
                    msg_id: format!("m{}", self.next_id),
                    conv: conv.clone(),
                    from: from.to_string(),
                    seq: log.len() as u64 + 1,
                    ts_ms: 0,
                    body: Body::text("x"),
                    extra: None,
                },
                except,
                duplicate: false,
            };
            log.push(Stored {
                appended: appended.clone(),
                origin,
            });
            appended
        }

        fn newest(&self, conv: &Conv) -> u64 {
            self.convs.get(conv).map_or(0, |l| l.len() as u64)
        }

        fn range(&self, f: &Fetch, limit: usize) -> (Vec<Appended>, bool) {
            let through = f.through.unwrap_or(u64::MAX);
            let all: Vec<Appended> = self
                .convs
                .get(&f.conv)
                .into_iter()
                .flatten()
                .filter(|s| s.appended.msg.seq > f.after && s.appended.msg.seq <= through)
                .map(|s| s.appended.clone())
                .collect();
            let more = all.len() > limit;
            (all.into_iter().take(limit).collect(), more)
        }
    }

    struct Connection {
        sid: SessionId,
        user: &'static str,
        node: usize,
        outbox: Outbox,
        queue: OutboxQueue,
        logged_in: bool,
        /// Sends whose `Sent` reply is expected.
        sent: u64,
        /// What its catch-up had (its own messages come back in it, as on one node).
        caught: HashSet<(Conv, u64)>,
    }

    struct Node {
        fanout: Fanout,
        hub: SharedHub,
        bus: Recorder,
        /// What the store thread reported, in its order, not yet taken by the fan-out.
        local: VecDeque<Done<SendCtx>>,
    }

    fn room(n: &str) -> Conv {
        Conv::Room(n.into())
    }

    fn direct(users: &[&str]) -> Conv {
        Conv::Direct(users.iter().map(|u| u.to_string()).collect())
    }

    fn members(conv: &Conv) -> Vec<&'static str> {
        let all = ["alice", "bob", "carol", "dave", "erin", "frank"];
        match conv {
            Conv::Room(r) if r == "ops" => vec!["alice", "bob", "dave"],
            Conv::Room(_) => all.to_vec(),
            Conv::Direct(users) => all
                .into_iter()
                .filter(|u| users.iter().any(|x| x == u))
                .collect(),
        }
    }

    fn hub() -> SharedHub {
        let users = ["alice", "bob", "carol", "dave", "erin", "frank"]
            .iter()
            .map(|u| (u.to_string(), false));
        let rooms = ["general", "ops"].iter().map(|r| RoomRow {
            name: r.to_string(),
            private: false,
            pw_hash: None,
            owner: None,
            members: members(&room(r)).iter().map(|m| m.to_string()).collect(),
            invited: vec![],
            votekick: true,
        });
        let limits = HubLimits {
            max_message_bytes: 1000,
            max_recipients: 10,
            max_rooms: 10,
        };
        SharedHub::new(Hub::new(limits, users, rooms))
    }

    fn ctx(c: &Connection, req_id: u64) -> SendCtx {
        SendCtx {
            origin: c.sid,
            outbox: c.outbox.clone(),
            req_id,
            permit: None,
            notify: None,
            silent: false,
        }
    }

    /// The catch-up a store thread reads for `user` from nothing: everything of its
    /// conversations it may see, and the newest of its rooms just before.
    fn catch_up(store: &SharedStore, user: &str) -> (Vec<Message>, Vec<(Conv, u64)>) {
        let marks = ["general", "ops"]
            .iter()
            .map(|r| room(r))
            .filter(|c| members(c).contains(&user))
            .map(|c| {
                let n = store.newest(&c);
                (c, n)
            })
            .collect();
        let mut messages = Vec::new();
        for (conv, log) in &store.convs {
            if !members(conv).contains(&user) {
                continue;
            }
            for s in log {
                if !s.appended.except.iter().any(|e| e == user) {
                    messages.push(s.appended.msg.clone());
                }
            }
        }
        (messages, marks)
    }

    /// One run: three nodes, six connections (three log in later), random sends, notices lost,
    /// duplicated and late, store reads answered late, resets; then everything settles and each
    /// connection must have had every message it may see exactly once, in order, and each
    /// sender one reply per send.
    fn run_seed(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let metrics = Metrics::default();
        let root = CancellationToken::new();
        let mut nodes: Vec<Node> = (0..3)
            .map(|_| Node {
                fanout: Fanout::new(FollowerLimits::default()),
                hub: hub(),
                bus: Recorder::default(),
                local: VecDeque::new(),
            })
            .collect();
        let placement = [
            ("alice", 0),
            ("bob", 1),
            ("carol", 2),
            ("dave", 0),
            ("erin", 1),
            ("frank", 2),
        ];
        let mut conns: Vec<Connection> = placement
            .iter()
            .enumerate()
            .map(|(i, (user, node))| {
                let (outbox, queue) = Outbox::new(1 << 20, &root);
                Connection {
                    sid: i as u64 + 1,
                    user,
                    node: *node,
                    outbox,
                    queue,
                    logged_in: false,
                    sent: 0,
                    caught: HashSet::new(),
                }
            })
            .collect();
        let convs = [
            room("general"),
            room("ops"),
            direct(&["alice", "bob"]),
            direct(&["bob", "carol", "erin"]),
        ];
        let mut store = SharedStore::default();
        // Direct conversations are followed from their catch-up: each has a message first.
        store.commit(&convs[2], "alice", vec![], 0);
        store.commit(&convs[3], "bob", vec![], 0);
        // In flight: notices (to node, commit), reads (node, fetch), catch-ups to read (conn).
        let mut notices: Vec<(usize, Commit)> = Vec::new();
        let mut reads: Vec<(usize, Fetch)> = Vec::new();
        let mut catch_reads: Vec<(usize, CatchRead)> = Vec::new();
        let mut pending_logins: Vec<usize> = Vec::new();
        let login = |c: &mut Connection, nodes: &mut [Node], pending: &mut Vec<usize>, i: usize| {
            nodes[c.node]
                .hub
                .lock()
                .connect(c.user, c.sid, c.outbox.clone());
            c.logged_in = true;
            pending.push(i);
        };
        for (i, c) in conns.iter_mut().enumerate().take(3) {
            login(c, &mut nodes, &mut pending_logins, i);
        }
        let mut req = 0;
        let steps = 600;
        for step in 0..steps + 5000 {
            let settling = step >= steps;
            let choice = rng.random_range(0..100);
            if !settling && choice < 30 {
                // A send from a logged-in connection, committed at once in the shared store.
                let i = rng.random_range(0..conns.len());
                if !conns[i].logged_in {
                    continue;
                }
                let conv = convs[rng.random_range(0..convs.len())].clone();
                if !members(&conv).contains(&conns[i].user) {
                    continue;
                }
                let except = if matches!(conv, Conv::Room(_)) && rng.random_bool(0.2) {
                    vec!["frank".to_string(), "bob".to_string()]
                } else {
                    vec![]
                };
                let except: Vec<String> =
                    except.into_iter().filter(|e| e != conns[i].user).collect();
                let a = store.commit(&conv, conns[i].user, except, conns[i].sid);
                req += 1;
                conns[i].sent += 1;
                let ctx = ctx(&conns[i], req);
                nodes[conns[i].node]
                    .local
                    .push_back(Done::Appended { result: Ok(a), ctx });
            } else if !settling && choice < 33 {
                let i = rng.random_range(3..conns.len());
                if !conns[i].logged_in {
                    login(&mut conns[i], &mut nodes, &mut pending_logins, i);
                }
            } else if choice < 45 && !pending_logins.is_empty() {
                // The store thread reads a catch-up.
                let i = pending_logins.remove(rng.random_range(0..pending_logins.len()));
                let (messages, marks) = catch_up(&store, conns[i].user);
                conns[i].caught = messages.iter().map(|m| (m.conv.clone(), m.seq)).collect();
                let ctx = ctx(&conns[i], 0);
                nodes[conns[i].node].local.push_back(Done::CaughtUp {
                    result: Ok((messages, false)),
                    marks,
                    ctx,
                });
            } else if choice < 65 {
                // A node's fan-out takes its store thread's next report.
                let n = rng.random_range(0..nodes.len());
                let node = &mut nodes[n];
                if let Some(d) = node.local.pop_front() {
                    let fs = node.fanout.local(&node.hub, &metrics, Some(&node.bus), d);
                    reads.extend(fs.into_iter().map(|f| (n, f)));
                }
                for c in std::mem::take(&mut *node.bus.0.lock().expect("lock")) {
                    for to in 0..3 {
                        if to == n || (!settling && rng.random_bool(0.2)) {
                            continue; // lost (or our own)
                        }
                        notices.push((to, c.clone()));
                        if rng.random_bool(0.1) {
                            notices.push((to, c.clone()));
                        }
                    }
                }
            } else if choice < 85 && !notices.is_empty() {
                let (to, c) = notices.remove(rng.random_range(0..notices.len()));
                let node = &mut nodes[to];
                let fs = node.fanout.remote(&node.hub, &metrics, c);
                reads.extend(fs.into_iter().map(|f| (to, f)));
            } else if choice < 90 && !catch_reads.is_empty() {
                let (n, r) = catch_reads.remove(rng.random_range(0..catch_reads.len()));
                let node = &mut nodes[n];
                while let Some(d) = node.local.pop_front() {
                    let fs = node.fanout.local(&node.hub, &metrics, Some(&node.bus), d);
                    reads.extend(fs.into_iter().map(|f| (n, f)));
                }
                let f = Fetch {
                    id: crate::bus::FetchId(0),
                    conv: r.conv.clone(),
                    after: r.after,
                    through: Some(r.through),
                };
                let answer = Ok(store.range(&f, MAX_WAITING_FRAMES));
                let fs = node.fanout.catch_read(&node.hub, &metrics, &r, answer);
                reads.extend(fs.into_iter().map(|f| (n, f)));
            } else if choice < 97 && !reads.is_empty() {
                let (n, f) = reads.remove(rng.random_range(0..reads.len()));
                let node = &mut nodes[n];
                // The store thread reported its commits before it answers a later read, and
                // the task takes its reports first (`biased`).
                while let Some(d) = node.local.pop_front() {
                    let fs = node.fanout.local(&node.hub, &metrics, Some(&node.bus), d);
                    reads.extend(fs.into_iter().map(|f| (n, f)));
                }
                let answer = if !settling && rng.random_bool(0.1) {
                    Err(StoreError::Stopped)
                } else {
                    Ok(store.range(&f, rng.random_range(1..5)))
                };
                let fs = node.fanout.fetched(&node.hub, &metrics, &f, answer);
                reads.extend(fs.into_iter().map(|f| (n, f)));
            } else if choice < 99 || settling {
                let n = rng.random_range(0..nodes.len());
                let node = &mut nodes[n];
                let fs = if rng.random_bool(0.5) {
                    node.fanout.tick(&node.hub, &metrics)
                } else {
                    node.fanout.reset(&node.hub, &metrics)
                };
                reads.extend(fs.into_iter().map(|f| (n, f)));
            }
            for (n, node) in nodes.iter_mut().enumerate() {
                catch_reads.extend(node.fanout.take_catch_reads().into_iter().map(|r| (n, r)));
            }
            if settling
                && notices.is_empty()
                && catch_reads.is_empty()
                && reads.is_empty()
                && pending_logins.is_empty()
                && nodes.iter().all(|n| n.local.is_empty())
            {
                break;
            }
        }
        // Quiet at last: one reset everywhere, every read answered.
        for (n, node) in nodes.iter_mut().enumerate() {
            let fs = node.fanout.reset(&node.hub, &metrics);
            reads.extend(fs.into_iter().map(|f| (n, f)));
        }
        for _ in 0..100_000 {
            let Some((n, f)) = reads.pop() else { break };
            let node = &mut nodes[n];
            let answer = Ok(store.range(&f, 3));
            let fs = node.fanout.fetched(&node.hub, &metrics, &f, answer);
            reads.extend(fs.into_iter().map(|f| (n, f)));
        }
        assert!(reads.is_empty(), "seed {seed}: reads still asked for");
        for c in &conns {
            let mut got: HashMap<Conv, Vec<u64>> = HashMap::new();
            let mut replies = 0;
            let mut caught_up = 0;
            for frame in c.queue.take() {
                let f = conclave_proto::decode_server(&frame[4..]).expect("a valid frame");
                if std::env::var("TRACE").is_ok_and(|u| u == c.user) {
                    eprintln!("{}: {f:?}", c.user);
                }
                match f {
                    ServerFrame::Event(Event::Message(m)) => {
                        got.entry(m.conv).or_default().push(m.seq)
                    }
                    ServerFrame::Event(Event::CaughtUp { .. }) => caught_up += 1,
                    ServerFrame::Reply {
                        result: Ok(Reply::Sent { .. }),
                        ..
                    } => replies += 1,
                    other => panic!("seed {seed}: unexpected {other:?}"),
                }
            }
            assert_eq!(caught_up, u32::from(c.logged_in), "seed {seed}: {}", c.user);
            assert_eq!(replies, c.sent, "seed {seed}: {}'s replies", c.user);
            for conv in &convs {
                let expected: Vec<u64> = if c.logged_in && members(conv).contains(&c.user) {
                    store.convs[conv]
                        .iter()
                        .filter(|s| {
                            let seq = s.appended.msg.seq;
                            (s.origin != c.sid || c.caught.contains(&(conv.clone(), seq)))
                                && !s.appended.except.iter().any(|e| e == c.user)
                        })
                        .map(|s| s.appended.msg.seq)
                        .collect()
                } else {
                    vec![]
                };
                let got = got.remove(conv).unwrap_or_default();
                assert_eq!(got, expected, "seed {seed}: {} in {conv:?}", c.user);
            }
        }
    }

    #[test]
    fn three_nodes_deliver_every_message_once_in_one_order_whatever_the_bus_and_store_do() {
        let only: Option<u64> = std::env::var("SEED").ok().and_then(|s| s.parse().ok());
        for seed in 0..200 {
            if only.is_some_and(|o| o != seed) {
                continue;
            }
            run_seed(seed);
        }
    }
}
