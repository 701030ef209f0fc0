//! Per-conversation cursors: what this client has delivered, what it sent itself, and what it
//! has acknowledged. Plain state, no I/O: the connection's reader and [`crate::Events`] drive
//! it, and the tests below drive it directly.
//!
//! # The rule
//!
//! For each conversation the client keeps
//! - `seen`: the highest sequence number of a message **event** it accepted from the server
//!   (0 until the first one), and
//! - `own`: the sequence numbers, above `seen`, of messages **this client sent**, learnt from
//!   the `Sent` receipts (the server does not echo a message to the connection that sent it).
//!
//! A message event with sequence number `s`:
//! 1. `s <= seen`: a duplicate (a catch-up overlapping what was already delivered): dropped.
//! 2. `s` in `own`: this client's own message coming back in a catch-up after a reconnect;
//!    the sender already has its receipt: dropped, and `seen = s`.
//! 3. otherwise it is delivered, and `seen = s` (own entries `<= s` are forgotten).
//!
//! A receipt never moves `seen`. So if the receipt for seq 7 is handled while seq 6 from
//! someone else is still on its way, 6 is still above `seen` when it arrives and is delivered.
//! The reconnect login resumes each conversation from `seen` (never from an own seq), so no
//! such message can be skipped by the server either; the catch-up re-sends our own messages
//! after `seen`, and rule 2 drops them. `own` is capped at [`MAX_OWN_AHEAD`] entries per
//! conversation: past that the oldest entry is folded into `seen`. That is safe because the
//! server fans out in commit order on each connection (a `Sent` reply comes after every event
//! of that conversation committed before it), and it bounds both memory and how many of our
//! own messages a catch-up re-sends.
//!
//! Conversations with no `seen` yet (we only sent, or nothing arrived) are left out of the
//! resume cursors; the server then resumes them after the account's acknowledged position,
//! which is at most what we have (and rule 1 and 2 drop the overlap).
//!
//! # Acknowledgements
//!
//! An ack tells the server what the account has *received*, for a later connection that comes
//! without cursors (a new process). It is more careful than `seen`: a message counts once the
//! application has taken it from [`crate::Events`] (or dropped `Events`), not merely once it
//! was queued. An own message counts once every message event queued before its receipt was
//! taken (events and receipts of one connection come in commit order), so an ack never jumps
//! over a message that is still waiting in the queue.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use conclave_proto::{Conv, Cursor};

/// Own sequence numbers kept above `seen` per conversation; see the module documentation.
pub const MAX_OWN_AHEAD: usize = 256;
/// Most cursors sent in one login (resume) or one ack. The server's default limit is 10,000;
/// conversations left out resume after their acknowledged position, which is safe (duplicates
/// are dropped).
pub const MAX_CURSORS_PER_REQUEST: usize = 1000;
/// Own receipts waiting for the application to catch up before they can be acknowledged, per
/// conversation; beyond this, neighbours are merged (which only delays an ack).
const MAX_OWN_UNACKED: usize = 1024;

/// What to do with a message event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// New: give it to the application.
    Deliver,
    /// Already delivered: drop it.
    Duplicate,
    /// This client's own message (it has the receipt): drop it.
    OwnEcho,
}

#[derive(Debug, Default)]
struct ConvCursor {
    seen: u64,
    own: BTreeSet<u64>,
    /// Highest seq of a message event the application has taken.
    taken: u64,
    /// Own seqs with the number of message events queued for the application when the
    /// receipt came; acknowledgeable once that many have been taken.
    own_unacked: VecDeque<(u64, u64)>,
    /// Highest position known received by the application (messages and own sends).
    ack: u64,
    /// Highest position the server confirmed as acknowledged.
    confirmed: u64,
}

/// The cursors of every conversation this client has heard of.
#[derive(Debug, Default)]
pub(crate) struct Cursors {
    convs: HashMap<Conv, ConvCursor>,
    /// Message events queued for the application, ever.
    queued: u64,
    /// Message events the application has taken (or that were discarded), ever.
    taken: u64,
    /// Conversations whose acknowledgement may be behind.
    dirty: HashSet<Conv>,
}

impl Cursors {
    /// Starts from cursors given by the application (a previous run's).
    pub fn seed(&mut self, cursors: &[Cursor]) {
        for c in cursors {
            let cc = self.convs.entry(c.conv.clone()).or_default();
            cc.seen = cc.seen.max(c.seq);
        }
    }

    fn conv(&mut self, conv: &Conv) -> &mut ConvCursor {
        if !self.convs.contains_key(conv) {
            self.convs.insert(conv.clone(), ConvCursor::default());
        }
        self.convs.get_mut(conv).expect("inserted above")
    }

    /// A message event arrived; a [`Verdict::Deliver`] counts it as queued for the
    /// application.
    pub fn on_event(&mut self, conv: &Conv, seq: u64) -> Verdict {
        let queued = self.queued;
        let c = self.conv(conv);
        if seq <= c.seen {
            return Verdict::Duplicate;
        }
        let own = c.own.remove(&seq);
        c.seen = seq;
        c.own = c.own.split_off(&(seq + 1));
        if own {
            // Acknowledgeable like a receipt: once what is queued before it was taken.
            push_unacked(&mut c.own_unacked, seq, queued);
            self.dirty.insert(conv.clone());
            Verdict::OwnEcho
        } else {
            self.queued += 1;
            Verdict::Deliver
        }
    }

    /// The receipt of a message this client sent.
    pub fn on_own_receipt(&mut self, conv: &Conv, seq: u64) {
        let queued = self.queued;
        let c = self.conv(conv);
        if seq > c.seen {
            c.own.insert(seq);
            while c.own.len() > MAX_OWN_AHEAD {
                if let Some(oldest) = c.own.pop_first() {
                    c.seen = oldest;
                }
            }
        }
        push_unacked(&mut c.own_unacked, seq, queued);
        self.dirty.insert(conv.clone());
    }

    /// The application took a delivered message event (or it was discarded because the
    /// application dropped its events).
    pub fn on_taken(&mut self, conv: &Conv, seq: u64) {
        self.taken += 1;
        let c = self.conv(conv);
        c.taken = c.taken.max(seq);
        self.dirty.insert(conv.clone());
    }

    /// Where each conversation resumes on a reconnect: after `seen`. At most
    /// [`MAX_CURSORS_PER_REQUEST`], the highest first (stable order).
    pub fn resume(&self) -> Vec<Cursor> {
        let mut out: Vec<Cursor> = self
            .convs
            .iter()
            .filter(|(_, c)| c.seen > 0)
            .map(|(conv, c)| Cursor {
                conv: conv.clone(),
                seq: c.seen,
            })
            .collect();
        out.sort_by(|a, b| b.seq.cmp(&a.seq).then_with(|| a.conv.cmp(&b.conv)));
        out.truncate(MAX_CURSORS_PER_REQUEST);
        out
    }

    /// The acknowledgements due: conversations whose received position moved past what the
    /// server confirmed, at most `max`. Nothing changes until [`Cursors::ack_confirmed`].
    pub fn ack_due(&mut self, max: usize) -> Vec<Cursor> {
        let taken = self.taken;
        let mut out = Vec::new();
        let mut clean = Vec::new();
        for conv in &self.dirty {
            let Some(c) = self.convs.get_mut(conv) else {
                clean.push(conv.clone());
                continue;
            };
            while let Some(&(seq, queued_before)) = c.own_unacked.front() {
                if queued_before > taken {
                    break;
                }
                c.ack = c.ack.max(seq);
                c.own_unacked.pop_front();
            }
            c.ack = c.ack.max(c.taken);
            if c.ack > c.confirmed {
                if out.len() < max {
                    out.push(Cursor {
                        conv: conv.clone(),
                        seq: c.ack,
                    });
                }
            } else if c.own_unacked.is_empty() {
                clean.push(conv.clone());
            }
        }
        for conv in clean {
            self.dirty.remove(&conv);
        }
        out.sort_by(|a, b| a.conv.cmp(&b.conv));
        out
    }

    /// The server recorded these acknowledgements.
    pub fn ack_confirmed(&mut self, cursors: &[Cursor]) {
        for cursor in cursors {
            if let Some(c) = self.convs.get_mut(&cursor.conv) {
                c.confirmed = c.confirmed.max(cursor.seq);
                if c.confirmed >= c.ack && c.own_unacked.is_empty() {
                    self.dirty.remove(&cursor.conv);
                }
            }
        }
    }
}

/// Appends an own seq waiting for the application; merges the two oldest when over the cap
/// (the later one's condition is the stricter, so this only delays the older ack).
fn push_unacked(q: &mut VecDeque<(u64, u64)>, seq: u64, queued: u64) {
    q.push_back((seq, queued));
    if q.len() > MAX_OWN_UNACKED
        && let (Some((s1, _)), Some((s2, q2))) = (q.pop_front(), q.pop_front())
    {
        q.push_front((s1.max(s2), q2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> Conv {
        Conv::Room(name.into())
    }

    fn cur(conv: &Conv, seq: u64) -> Cursor {
        Cursor {
            conv: conv.clone(),
            seq,
        }
    }

    #[test]
    fn duplicates_are_dropped_new_messages_delivered() {
        let mut c = Cursors::default();
        let g = room("general");
        assert_eq!(c.on_event(&g, 1), Verdict::Deliver);
        assert_eq!(c.on_event(&g, 2), Verdict::Deliver);
        // A catch-up that overlaps.
        assert_eq!(c.on_event(&g, 1), Verdict::Duplicate);
        assert_eq!(c.on_event(&g, 2), Verdict::Duplicate);
        // Gaps are normal (a blockcast that left us out, a message before we joined).
        assert_eq!(c.on_event(&g, 5), Verdict::Deliver);
        assert_eq!(c.on_event(&g, 4), Verdict::Duplicate);
        // Conversations are independent.
        assert_eq!(c.on_event(&room("ops"), 1), Verdict::Deliver);
        assert_eq!(c.resume(), vec![cur(&g, 5), cur(&room("ops"), 1)]);
    }

    #[test]
    fn a_receipt_does_not_hide_an_earlier_message_still_in_flight() {
        let mut c = Cursors::default();
        let g = room("general");
        assert_eq!(c.on_event(&g, 5), Verdict::Deliver);
        // Our send got seq 7 while seq 6 (someone else's) is still on its way.
        c.on_own_receipt(&g, 7);
        assert_eq!(c.resume(), vec![cur(&g, 5)], "resume never skips 6");
        assert_eq!(c.on_event(&g, 6), Verdict::Deliver);
        // A catch-up after a reconnect re-sends our own 7: not delivered.
        assert_eq!(c.on_event(&g, 7), Verdict::OwnEcho);
        assert_eq!(c.on_event(&g, 7), Verdict::Duplicate);
        assert_eq!(c.on_event(&g, 8), Verdict::Deliver);
        assert_eq!(c.resume(), vec![cur(&g, 8)]);
    }

    #[test]
    fn own_messages_skipped_over_are_forgotten() {
        let mut c = Cursors::default();
        let g = room("general");
        c.on_own_receipt(&g, 3);
        c.on_own_receipt(&g, 4);
        // Only sends so far: no baseline, so the server resumes from the account's ack.
        assert_eq!(c.resume(), vec![]);
        assert_eq!(c.on_event(&g, 3), Verdict::OwnEcho);
        assert_eq!(c.on_event(&g, 5), Verdict::Deliver);
        // Everything up to 5 is behind us now, our own 4 included.
        assert!(c.convs[&g].own.is_empty());
        assert_eq!(c.on_event(&g, 4), Verdict::Duplicate);
    }

    #[test]
    fn own_set_is_bounded() {
        let mut c = Cursors::default();
        let g = room("general");
        assert_eq!(c.on_event(&g, 1), Verdict::Deliver);
        let n = MAX_OWN_AHEAD as u64 + 10;
        for seq in 2..2 + n {
            c.on_own_receipt(&g, seq);
        }
        let conv = &c.convs[&g];
        assert_eq!(conv.own.len(), MAX_OWN_AHEAD);
        assert_eq!(conv.seen, 11);
        assert_eq!(c.on_event(&g, 11), Verdict::Duplicate);
        assert_eq!(c.on_event(&g, 12), Verdict::OwnEcho);
    }

    #[test]
    fn acks_follow_what_the_application_took() {
        let mut c = Cursors::default();
        let g = room("general");
        let dm = Conv::Direct(vec!["alice".into(), "bob".into()]);
        assert_eq!(c.ack_due(10), vec![]);
        assert_eq!(c.on_event(&g, 1), Verdict::Deliver);
        assert_eq!(c.on_event(&g, 2), Verdict::Deliver);
        // Queued but not taken: nothing to acknowledge.
        assert_eq!(c.ack_due(10), vec![]);
        c.on_taken(&g, 1);
        assert_eq!(c.ack_due(10), vec![cur(&g, 1)]);
        // Not confirmed yet: still due.
        assert_eq!(c.ack_due(10), vec![cur(&g, 1)]);
        c.ack_confirmed(&[cur(&g, 1)]);
        assert_eq!(c.ack_due(10), vec![]);

        // Our sends' receipts came after event 2 was queued: they wait for it to be taken
        // (whatever their conversation: the count is of everything queued before).
        c.on_own_receipt(&g, 3);
        c.on_own_receipt(&dm, 1);
        assert_eq!(c.ack_due(10), vec![]);
        c.on_taken(&g, 2);
        assert_eq!(c.ack_due(10), vec![cur(&g, 3), cur(&dm, 1)]);
        assert_eq!(c.ack_due(1).len(), 1);
        c.ack_confirmed(&[cur(&dm, 1), cur(&g, 3)]);
        assert_eq!(c.ack_due(10), vec![]);
        assert!(c.dirty.is_empty());
    }

    #[test]
    fn an_echoed_own_message_is_acknowledged_in_order() {
        let mut c = Cursors::default();
        let g = room("general");
        c.seed(&[cur(&g, 4)]);
        assert_eq!(c.on_event(&g, 5), Verdict::Deliver);
        c.on_own_receipt(&g, 6);
        // The connection dropped; the catch-up re-sends our own 6.
        assert_eq!(c.on_event(&g, 6), Verdict::OwnEcho);
        // 5 is still queued for the application, so 6 is not acknowledged yet.
        assert_eq!(c.ack_due(10), vec![]);
        c.on_taken(&g, 5);
        assert_eq!(c.ack_due(10), vec![cur(&g, 6)]);
    }

    #[test]
    fn unacked_own_receipts_are_bounded() {
        let mut q = VecDeque::new();
        for i in 0..(MAX_OWN_UNACKED as u64 + 50) {
            push_unacked(&mut q, i + 1, i);
        }
        assert_eq!(q.len(), MAX_OWN_UNACKED);
        // Merged entries keep the higher seq with the later (stricter) condition.
        let (seq, queued) = q[0];
        assert_eq!((seq, queued), (51, 50));
    }

    #[test]
    fn resume_is_bounded() {
        let mut c = Cursors::default();
        for i in 0..(MAX_CURSORS_PER_REQUEST + 5) {
            c.on_event(&room(&format!("r{i}")), i as u64 + 1);
        }
        let r = c.resume();
        assert_eq!(r.len(), MAX_CURSORS_PER_REQUEST);
        assert_eq!(r[0].seq, MAX_CURSORS_PER_REQUEST as u64 + 5);
    }
}
