//! The gap follower: turns a lossy, duplicating, reordering stream of notices into exactly
//! once and in order per conversation, with the store filling the holes.
//!
//! Sans-IO, like the hub: notices, store answers and resets go in; deliveries and store reads
//! to make come out ([`Step`]). No clock, no channel, no task: the caller (a node's one
//! fan-out task) runs the reads and feeds the answers back, and tests drive every order of
//! events directly.
//!
//! Per conversation it keeps the last sequence number delivered (`last`):
//! - a notice with `last + 1` is delivered at once (the common case: no store read);
//! - a duplicate or older one is dropped;
//! - a later one is held (bounded) and the missing range `last+1 ..= first_held-1` is asked
//!   of the store ([`Fetch`]); the answer is delivered, then the held notices that follow it;
//! - a notice whose frame was left out (too large to travel) counts as a gap through itself;
//! - a [`Follower::reset`] (the bus reconnected, or dropped notices) asks for everything after
//!   `last` up to the store's newest message, for every conversation followed.
//!
//! One read per conversation is in flight at a time. An answer that brings nothing new counts as
//! fruitless; after [`FollowerLimits::max_fruitless_fetches`] in a row the follower stops asking
//! until the next notice, reset or [`Follower::retry_stalled`], so a notice naming a sequence
//! number the store does not have (yet) cannot make it read in a loop.

use std::collections::{BTreeMap, HashMap};

use conclave_proto::Conv;

/// An item the follower orders: a notice from the bus, or a message read from the store.
pub trait Sequenced {
    fn conv(&self) -> &Conv;
    fn seq(&self) -> u64;
    /// Whether it can be delivered as it is. A notice whose frame was left out cannot: its
    /// message is read from the store instead.
    fn complete(&self) -> bool {
        true
    }
}

/// The follower's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerLimits {
    /// Most conversations followed at once ([`Follower::follow`] refuses more).
    pub max_conversations: usize,
    /// Most notices held while one conversation waits for the store; beyond, notices are
    /// dropped and read from the store with the gap.
    pub max_held_per_conversation: usize,
    /// Most notices held over all conversations.
    pub max_held_total: usize,
    /// Store answers in a row that bring nothing new before the follower stops asking.
    pub max_fruitless_fetches: u32,
}

impl Default for FollowerLimits {
    fn default() -> Self {
        FollowerLimits {
            max_conversations: 100_000,
            max_held_per_conversation: 256,
            max_held_total: 16_384,
            max_fruitless_fetches: 3,
        }
    }
}

/// Names one store read, so its answer can be matched with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FetchId(pub u64);

/// A read to make from the store: the messages of `conv` with a sequence number above `after`
/// and at most `through` (`None`: up to the newest the store has). Answer with
/// [`Follower::fetched`] (a page is fine: say how far it is complete) or
/// [`Follower::fetch_failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub id: FetchId,
    pub conv: Conv,
    pub after: u64,
    pub through: Option<u64>,
}

/// What to do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<M> {
    /// Fan this out now: the next one of its conversation.
    Deliver(M),
    /// Read this from the store and give the answer back.
    Fetch(Fetch),
}

/// What the follower counted since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowerCounts {
    pub delivered: u64,
    /// Notices at or below what was delivered (or already held).
    pub duplicates: u64,
    /// Notices for conversations not followed.
    pub ignored: u64,
    /// Notices not held because a bound was reached (read from the store instead).
    pub held_dropped: u64,
    pub fetches: u64,
}

struct Track<M> {
    /// The last sequence number delivered.
    last: u64,
    /// The highest sequence number known to exist.
    known: u64,
    held: BTreeMap<u64, M>,
    /// The read in flight, and its `through`.
    fetching: Option<(FetchId, Option<u64>)>,
    /// A reset asked for everything after `last`; cleared by that read's answer.
    resync: bool,
    fruitless: u32,
    /// A read failed: nothing is asked until a retry or a reset.
    failed: bool,
}

/// The gap follower: see the module documentation.
pub struct Follower<M> {
    tracks: HashMap<Conv, Track<M>>,
    held_total: usize,
    next_fetch: u64,
    limits: FollowerLimits,
    counts: FollowerCounts,
}

impl<M: Sequenced> Follower<M> {
    pub fn new(limits: FollowerLimits) -> Self {
        Follower {
            tracks: HashMap::new(),
            held_total: 0,
            next_fetch: 0,
            limits,
            counts: FollowerCounts::default(),
        }
    }

    /// Follows `conv` from `last` (the newest sequence number its local audience has, usually
    /// the store's newest when the first local member arrives). Already followed: unchanged.
    /// Returns `false` when [`FollowerLimits::max_conversations`] are followed already.
    pub fn follow(&mut self, conv: Conv, last: u64) -> bool {
        if self.tracks.contains_key(&conv) {
            return true;
        }
        if self.tracks.len() >= self.limits.max_conversations {
            return false;
        }
        self.tracks.insert(
            conv,
            Track {
                last,
                known: last,
                held: BTreeMap::new(),
                fetching: None,
                resync: false,
                fruitless: 0,
                failed: false,
            },
        );
        true
    }

    /// Stops following `conv` (its last local member left); its held notices are dropped.
    pub fn unfollow(&mut self, conv: &Conv) {
        if let Some(t) = self.tracks.remove(conv) {
            self.held_total -= t.held.len();
        }
    }

    /// The last sequence number delivered in `conv`, if followed.
    pub fn last(&self, conv: &Conv) -> Option<u64> {
        self.tracks.get(conv).map(|t| t.last)
    }

    /// How many conversations are followed.
    pub fn followed(&self) -> usize {
        self.tracks.len()
    }

    /// How many notices are held, over all conversations.
    pub fn held(&self) -> usize {
        self.held_total
    }

    pub fn counts(&self) -> FollowerCounts {
        self.counts
    }

    /// A notice from the bus.
    pub fn notice(&mut self, m: M, out: &mut Vec<Step<M>>) {
        let Some(t) = self.tracks.get_mut(m.conv()) else {
            self.counts.ignored += 1;
            return;
        };
        let seq = m.seq();
        if seq <= t.last {
            self.counts.duplicates += 1;
            return;
        }
        t.fruitless = 0;
        t.known = t.known.max(seq);
        if seq == t.last.saturating_add(1) && m.complete() && t.held.is_empty() && t.known == seq {
            // The common case: next in line, nothing waiting, nothing missing.
            t.last = seq;
            self.counts.delivered += 1;
            out.push(Step::Deliver(m));
            return;
        }
        let conv = m.conv().clone();
        if seq == t.last.saturating_add(1) && m.complete() {
            t.last = seq;
            self.counts.delivered += 1;
            out.push(Step::Deliver(m));
        } else if m.complete() {
            let in_flight_covers = matches!(t.fetching, Some((_, Some(through))) if seq <= through);
            if in_flight_covers {
                // The read in flight brings it.
            } else if t.held.contains_key(&seq) {
                self.counts.duplicates += 1;
            } else if t.held.len() < self.limits.max_held_per_conversation
                && self.held_total < self.limits.max_held_total
            {
                t.held.insert(seq, m);
                self.held_total += 1;
            } else {
                self.counts.held_dropped += 1;
            }
        }
        settle(
            &conv,
            t,
            &mut self.held_total,
            &mut self.next_fetch,
            &self.limits,
            &mut self.counts,
            out,
        );
    }

    /// The store's answer to the read `id` of `conv`: its messages in sequence order, the
    /// highest sequence number the answer is complete through (the last message's when the page
    /// was cut short, else the smaller of the read's `through` and the newest the store has),
    /// and whether the page was cut short (more may follow). Answers to reads superseded by a
    /// reset are still used (the store is the truth).
    pub fn fetched(
        &mut self,
        id: FetchId,
        conv: &Conv,
        items: impl IntoIterator<Item = M>,
        complete_through: u64,
        cut_short: bool,
        out: &mut Vec<Step<M>>,
    ) {
        let Some(t) = self.tracks.get_mut(conv) else {
            return;
        };
        let before = t.last;
        for m in items {
            let seq = m.seq();
            if m.conv() != conv || seq <= t.last || seq > complete_through {
                continue;
            }
            deliver_held_below(t, seq, &mut self.held_total, &mut self.counts, out);
            t.last = seq;
            self.counts.delivered += 1;
            out.push(Step::Deliver(m));
        }
        if complete_through > t.last {
            deliver_held_below(
                t,
                complete_through.saturating_add(1),
                &mut self.held_total,
                &mut self.counts,
                out,
            );
            t.last = complete_through;
            t.known = t.known.max(complete_through);
        }
        if let Some((in_flight, through)) = t.fetching
            && in_flight == id
        {
            t.fetching = None;
            t.failed = false;
            if through.is_none() && !cut_short {
                t.resync = false;
            }
            if t.last > before {
                t.fruitless = 0;
            } else {
                t.fruitless += 1;
            }
        }
        settle(
            conv,
            t,
            &mut self.held_total,
            &mut self.next_fetch,
            &self.limits,
            &mut self.counts,
            out,
        );
    }

    /// The read `id` of `conv` failed (the store is down?). Nothing is asked again until the
    /// next notice, reset or [`Follower::retry_stalled`], so the caller chooses the pace.
    pub fn fetch_failed(&mut self, id: FetchId, conv: &Conv) {
        if let Some(t) = self.tracks.get_mut(conv)
            && t.fetching.is_some_and(|(f, _)| f == id)
        {
            t.fetching = None;
            t.failed = true;
        }
    }

    /// The bus may have lost notices (it reconnected, or dropped some for a slow consumer):
    /// asks for everything after what was delivered, in every conversation followed. Reads in
    /// flight are superseded (their answers are still used).
    pub fn reset(&mut self, out: &mut Vec<Step<M>>) {
        for (conv, t) in &mut self.tracks {
            t.fetching = None;
            t.resync = true;
            t.fruitless = 0;
            t.failed = false;
            settle(
                conv,
                t,
                &mut self.held_total,
                &mut self.next_fetch,
                &self.limits,
                &mut self.counts,
                out,
            );
        }
    }

    /// Asks for everything after what was delivered in `conv` (as [`Follower::reset`] does
    /// for every conversation): a conversation just followed whose earlier notices this node
    /// did not take may have missed some.
    pub fn resync(&mut self, conv: &Conv, out: &mut Vec<Step<M>>) {
        let Some(t) = self.tracks.get_mut(conv) else {
            return;
        };
        t.resync = true;
        t.fruitless = 0;
        t.failed = false;
        settle(
            conv,
            t,
            &mut self.held_total,
            &mut self.next_fetch,
            &self.limits,
            &mut self.counts,
            out,
        );
    }

    /// Asks again for what stalled conversations miss (after failed or fruitless reads); call
    /// it on a timer, at the pace the store can take.
    pub fn retry_stalled(&mut self, out: &mut Vec<Step<M>>) {
        for (conv, t) in &mut self.tracks {
            if t.fetching.is_none() {
                t.fruitless = 0;
                t.failed = false;
                settle(
                    conv,
                    t,
                    &mut self.held_total,
                    &mut self.next_fetch,
                    &self.limits,
                    &mut self.counts,
                    out,
                );
            }
        }
    }
}

/// Delivers the held notices below `below`, in order (the store's answer covers their range).
fn deliver_held_below<M: Sequenced>(
    t: &mut Track<M>,
    below: u64,
    held_total: &mut usize,
    counts: &mut FollowerCounts,
    out: &mut Vec<Step<M>>,
) {
    while let Some(entry) = t.held.first_entry() {
        let seq = *entry.key();
        if seq >= below {
            break;
        }
        let m = entry.remove();
        *held_total -= 1;
        if seq > t.last {
            t.last = seq;
            counts.delivered += 1;
            out.push(Step::Deliver(m));
        }
    }
}

/// Delivers what the held notices allow, then asks for what is missing (one read at a time).
fn settle<M: Sequenced>(
    conv: &Conv,
    t: &mut Track<M>,
    held_total: &mut usize,
    next_fetch: &mut u64,
    limits: &FollowerLimits,
    counts: &mut FollowerCounts,
    out: &mut Vec<Step<M>>,
) {
    while let Some(entry) = t.held.first_entry() {
        let seq = *entry.key();
        if seq > t.last.saturating_add(1) {
            break;
        }
        let m = entry.remove();
        *held_total -= 1;
        if seq == t.last.saturating_add(1) {
            t.last = seq;
            counts.delivered += 1;
            out.push(Step::Deliver(m));
        }
    }
    if t.fetching.is_some() || t.failed || t.fruitless >= limits.max_fruitless_fetches {
        return;
    }
    let through = if t.resync {
        None
    } else {
        let gap_end = t.held.first_key_value().map_or(t.known, |(&k, _)| k - 1);
        if gap_end <= t.last {
            return;
        }
        Some(gap_end)
    };
    let id = FetchId(*next_fetch);
    *next_fetch += 1;
    counts.fetches += 1;
    t.fetching = Some((id, through));
    out.push(Step::Fetch(Fetch {
        id,
        conv: conv.clone(),
        after: t.last,
        through,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A notice or a stored message: `complete == false` is a notice whose frame was left out.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Item {
        conv: Conv,
        seq: u64,
        complete: bool,
    }

    impl Sequenced for Item {
        fn conv(&self) -> &Conv {
            &self.conv
        }
        fn seq(&self) -> u64 {
            self.seq
        }
        fn complete(&self) -> bool {
            self.complete
        }
    }

    fn room(name: &str) -> Conv {
        Conv::Room(name.into())
    }

    fn item(conv: &Conv, seq: u64) -> Item {
        Item {
            conv: conv.clone(),
            seq,
            complete: true,
        }
    }

    fn delivered(steps: &[Step<Item>]) -> Vec<u64> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Deliver(i) => Some(i.seq),
                Step::Fetch(_) => None,
            })
            .collect()
    }

    fn fetches(steps: &[Step<Item>]) -> Vec<Fetch> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Fetch(f) => Some(f.clone()),
                Step::Deliver(_) => None,
            })
            .collect()
    }

    #[test]
    fn in_order_notices_are_delivered_without_the_store() {
        let g = room("general");
        let mut f = Follower::new(FollowerLimits::default());
        assert!(f.follow(g.clone(), 10));
        let mut out = Vec::new();
        for seq in 11..=20 {
            f.notice(item(&g, seq), &mut out);
        }
        assert_eq!(delivered(&out), (11..=20).collect::<Vec<_>>());
        assert!(fetches(&out).is_empty());
        assert_eq!(f.last(&g), Some(20));
    }

    #[test]
    fn duplicates_and_older_notices_are_dropped() {
        let g = room("general");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(g.clone(), 5);
        let mut out = Vec::new();
        f.notice(item(&g, 5), &mut out);
        f.notice(item(&g, 6), &mut out);
        f.notice(item(&g, 6), &mut out);
        f.notice(item(&g, 2), &mut out);
        assert_eq!(delivered(&out), [6]);
        assert_eq!(f.counts().duplicates, 3);
        f.notice(item(&room("elsewhere"), 1), &mut out);
        assert_eq!(f.counts().ignored, 1);
    }

    #[test]
    fn a_gap_is_read_from_the_store_then_the_held_notices_follow() {
        let g = room("general");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(g.clone(), 0);
        let mut out = Vec::new();
        f.notice(item(&g, 1), &mut out);
        f.notice(item(&g, 4), &mut out);
        f.notice(item(&g, 5), &mut out);
        assert_eq!(delivered(&out), [1]);
        let fs = fetches(&out);
        assert_eq!(fs.len(), 1, "one read in flight: {fs:?}");
        assert_eq!((fs[0].after, fs[0].through), (1, Some(3)));
        out.clear();
        f.fetched(fs[0].id, &g, [item(&g, 2), item(&g, 3)], 3, false, &mut out);
        assert_eq!(delivered(&out), [2, 3, 4, 5]);
        assert!(fetches(&out).is_empty());
        assert_eq!(f.held(), 0);
    }

    #[test]
    fn a_notice_without_its_frame_is_read_from_the_store() {
        let g = room("general");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(g.clone(), 0);
        let mut out = Vec::new();
        f.notice(
            Item {
                conv: g.clone(),
                seq: 1,
                complete: false,
            },
            &mut out,
        );
        let fs = fetches(&out);
        assert_eq!((fs[0].after, fs[0].through), (0, Some(1)));
        out.clear();
        f.fetched(fs[0].id, &g, [item(&g, 1)], 1, false, &mut out);
        assert_eq!(delivered(&out), [1]);
    }

    #[test]
    fn a_page_cut_short_asks_for_the_rest() {
        let g = room("general");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(g.clone(), 0);
        let mut out = Vec::new();
        f.notice(item(&g, 10), &mut out);
        let first = fetches(&out).remove(0);
        assert_eq!(first.through, Some(9));
        out.clear();
        f.fetched(
            first.id,
            &g,
            (1..=4).map(|s| item(&g, s)),
            4,
            true,
            &mut out,
        );
        assert_eq!(delivered(&out), [1, 2, 3, 4]);
        let next = fetches(&out).remove(0);
        assert_eq!((next.after, next.through), (4, Some(9)));
        out.clear();
        f.fetched(
            next.id,
            &g,
            (5..=9).map(|s| item(&g, s)),
            9,
            false,
            &mut out,
        );
        assert_eq!(delivered(&out), [5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_reset_reads_everything_after_what_was_delivered() {
        let a = room("a");
        let b = room("b");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(a.clone(), 3);
        f.follow(b.clone(), 0);
        let mut out = Vec::new();
        f.reset(&mut out);
        let mut fs = fetches(&out);
        fs.sort_by(|x, y| x.conv.cmp(&y.conv));
        assert_eq!(fs.len(), 2);
        assert_eq!((fs[0].after, fs[0].through), (3, None));
        assert_eq!((fs[1].after, fs[1].through), (0, None));
        out.clear();
        // A notice that arrives while the resync is read waits for it.
        f.notice(item(&a, 6), &mut out);
        assert!(out.is_empty());
        f.fetched(fs[0].id, &a, [item(&a, 4), item(&a, 5)], 5, false, &mut out);
        assert_eq!(delivered(&out), [4, 5, 6]);
        out.clear();
        // Nothing new in b: no further read.
        f.fetched(fs[1].id, &b, [], 0, false, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_resync_reads_one_conversation_to_its_newest() {
        let a = room("a");
        let b = room("b");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(a.clone(), 3);
        f.follow(b.clone(), 7);
        let mut out = Vec::new();
        f.resync(&a, &mut out);
        f.resync(&room("not-followed"), &mut out);
        let fs = fetches(&out);
        assert_eq!(fs.len(), 1, "only the conversation asked for");
        assert_eq!((&fs[0].conv, fs[0].after, fs[0].through), (&a, 3, None));
        out.clear();
        f.fetched(fs[0].id, &a, [item(&a, 4)], 4, false, &mut out);
        assert_eq!(delivered(&out), [4]);
        assert!(fetches(&out).is_empty(), "read to the newest: done");
        assert_eq!(f.last(&b), Some(7));
    }

    #[test]
    fn a_store_that_lacks_what_a_notice_claims_is_not_asked_forever() {
        let g = room("general");
        let limits = FollowerLimits::default();
        let mut f = Follower::new(limits);
        f.follow(g.clone(), 0);
        let mut out = Vec::new();
        f.notice(item(&g, 1_000_000), &mut out);
        let mut reads = 0;
        while let Some(fetch) = fetches(&out).pop() {
            reads += 1;
            assert!(reads <= 10, "the follower keeps asking");
            out.clear();
            f.fetched(fetch.id, &g, [], 0, false, &mut out);
        }
        assert_eq!(reads, limits.max_fruitless_fetches as usize);
        // A later retry asks again, once.
        f.retry_stalled(&mut out);
        assert_eq!(fetches(&out).len(), 1);
    }

    #[test]
    fn a_failed_read_waits_for_a_retry() {
        let g = room("general");
        let mut f = Follower::new(FollowerLimits::default());
        f.follow(g.clone(), 0);
        let mut out = Vec::new();
        f.notice(item(&g, 3), &mut out);
        let fetch = fetches(&out).remove(0);
        f.fetch_failed(fetch.id, &g);
        out.clear();
        f.notice(item(&g, 4), &mut out);
        assert!(fetches(&out).is_empty(), "no immediate retry: {out:?}");
        f.retry_stalled(&mut out);
        let again = fetches(&out).remove(0);
        assert_eq!((again.after, again.through), (0, Some(2)));
        out.clear();
        f.fetched(again.id, &g, [item(&g, 1), item(&g, 2)], 2, false, &mut out);
        assert_eq!(delivered(&out), [1, 2, 3, 4]);
    }

    #[test]
    fn held_notices_are_bounded_and_the_overflow_comes_from_the_store() {
        let g = room("general");
        let limits = FollowerLimits {
            max_held_per_conversation: 4,
            ..FollowerLimits::default()
        };
        let mut f = Follower::new(limits);
        f.follow(g.clone(), 0);
        let mut out = Vec::new();
        for seq in 2..=20 {
            f.notice(item(&g, seq), &mut out);
        }
        assert_eq!(f.held(), 4);
        assert_eq!(f.counts().held_dropped, 15);
        let fetch = fetches(&out).remove(0);
        assert_eq!(fetch.through, Some(1));
        out.clear();
        f.fetched(fetch.id, &g, [item(&g, 1)], 1, false, &mut out);
        assert_eq!(delivered(&out), [1, 2, 3, 4, 5]);
        let rest = fetches(&out).remove(0);
        assert_eq!((rest.after, rest.through), (5, Some(20)));
    }

    #[test]
    fn follow_is_bounded_and_unfollow_frees_what_was_held() {
        let limits = FollowerLimits {
            max_conversations: 2,
            ..FollowerLimits::default()
        };
        let mut f = Follower::<Item>::new(limits);
        assert!(f.follow(room("a"), 0));
        assert!(f.follow(room("b"), 0));
        assert!(!f.follow(room("c"), 0));
        let mut out = Vec::new();
        f.notice(item(&room("a"), 5), &mut out);
        assert_eq!(f.held(), 1);
        f.unfollow(&room("a"));
        assert_eq!(f.held(), 0);
        assert!(f.follow(room("c"), 0));
    }

    /// The store in the randomized test: every conversation's messages, 1..=n.
    struct FakeStore {
        heads: HashMap<Conv, u64>,
        page: usize,
    }

    impl FakeStore {
        /// Answers `fetch` like the real store: at most a page, and how far it is complete.
        fn read(&self, fetch: &Fetch) -> (Vec<Item>, u64, bool) {
            let head = self.heads.get(&fetch.conv).copied().unwrap_or(0);
            let end = fetch.through.map_or(head, |t| t.min(head));
            let items: Vec<Item> = (fetch.after + 1..=end)
                .take(self.page)
                .map(|s| item(&fetch.conv, s))
                .collect();
            let cut_short = items.len() == self.page && end > fetch.after + self.page as u64;
            let complete = if cut_short {
                items.last().map_or(fetch.after, |i| i.seq)
            } else {
                end.max(fetch.after)
            };
            (items, complete, cut_short)
        }
    }

    /// Reorders, duplicates and drops notices, leaves frames out, fails and answers reads in
    /// any order, resets at random: every message is delivered exactly once, in order.
    #[test]
    fn randomized_loss_reordering_and_resets_deliver_everything_once_in_order() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let convs = [
                room("a"),
                room("b"),
                Conv::Direct(vec!["alice".into(), "bob".into()]),
            ];
            let limits = FollowerLimits {
                max_held_per_conversation: rng.random_range(1..8),
                max_held_total: rng.random_range(4..16),
                ..FollowerLimits::default()
            };
            let mut f = Follower::new(limits);
            let mut store = FakeStore {
                heads: HashMap::new(),
                page: rng.random_range(1..6),
            };
            for c in &convs {
                f.follow(c.clone(), 0);
            }
            let mut wire: Vec<Item> = Vec::new();
            let mut reads: Vec<Fetch> = Vec::new();
            let mut got: HashMap<Conv, Vec<u64>> = HashMap::new();
            let mut out = Vec::new();
            let take = |out: &mut Vec<Step<Item>>,
                        reads: &mut Vec<Fetch>,
                        got: &mut HashMap<Conv, Vec<u64>>| {
                for s in out.drain(..) {
                    match s {
                        Step::Deliver(i) => {
                            let seen = got.entry(i.conv.clone()).or_default();
                            assert_eq!(
                                i.seq,
                                seen.last().copied().unwrap_or(0) + 1,
                                "seed {seed}: {:?} delivered out of order",
                                i.conv
                            );
                            assert!(i.complete, "seed {seed}: a frame-less notice delivered");
                            seen.push(i.seq);
                        }
                        Step::Fetch(fetch) => reads.push(fetch),
                    }
                }
            };
            for _ in 0..600 {
                match rng.random_range(0..100) {
                    0..30 => {
                        let c = &convs[rng.random_range(0..convs.len())];
                        let head = store.heads.entry(c.clone()).or_insert(0);
                        *head += 1;
                        let n = Item {
                            conv: c.clone(),
                            seq: *head,
                            complete: rng.random_bool(0.9),
                        };
                        if rng.random_bool(0.85) {
                            if rng.random_bool(0.1) {
                                wire.push(n.clone());
                            }
                            wire.push(n);
                        }
                    }
                    30..65 if !wire.is_empty() => {
                        // Mostly the oldest (a broker keeps order), sometimes any.
                        let at = if rng.random_bool(0.7) {
                            0
                        } else {
                            rng.random_range(0..wire.len())
                        };
                        f.notice(wire.remove(at), &mut out);
                    }
                    65..90 if !reads.is_empty() => {
                        let fetch = reads.remove(rng.random_range(0..reads.len()));
                        if rng.random_bool(0.05) {
                            f.fetch_failed(fetch.id, &fetch.conv);
                        } else {
                            let (items, complete, cut) = store.read(&fetch);
                            f.fetched(fetch.id, &fetch.conv, items, complete, cut, &mut out);
                        }
                    }
                    90..93 => f.reset(&mut out),
                    93..96 => f.retry_stalled(&mut out),
                    _ => {}
                }
                take(&mut out, &mut reads, &mut got);
            }
            // The bus delivers what it still has; then a reset (what a reconnect, a slow
            // consumer or the publisher's owed notices bring) and the store settle the rest.
            while !wire.is_empty() {
                f.notice(wire.remove(0), &mut out);
                take(&mut out, &mut reads, &mut got);
            }
            f.reset(&mut out);
            take(&mut out, &mut reads, &mut got);
            let mut rounds = 0;
            while let Some(fetch) = reads.pop() {
                rounds += 1;
                assert!(rounds < 10_000, "seed {seed}: reads never end");
                let (items, complete, cut) = store.read(&fetch);
                f.fetched(fetch.id, &fetch.conv, items, complete, cut, &mut out);
                take(&mut out, &mut reads, &mut got);
            }
            for c in &convs {
                let head = store.heads.get(c).copied().unwrap_or(0);
                let seen = got.get(c).cloned().unwrap_or_default();
                assert_eq!(
                    seen,
                    (1..=head).collect::<Vec<_>>(),
                    "seed {seed}: {c:?} not delivered exactly once in order"
                );
            }
            assert_eq!(f.held(), 0, "seed {seed}");
        }
    }
}
