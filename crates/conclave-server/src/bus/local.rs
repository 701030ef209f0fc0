//! The in-process bus: the nodes of one process over a tokio broadcast channel. One node alone
//! (nothing to tell), and tests of several nodes without a broker.
//!
//! Notices travel as values (no encoding), but are checked like the NATS bus checks them
//! before encoding, so a notice one bus refuses the other refuses too. A node that falls
//! behind the channel's capacity loses the oldest notices and is told so with
//! [`Incoming::Reset`] (`Lagged`), exactly like a slow consumer on NATS.

use std::sync::{Arc, Mutex};

use futures_util::stream;
use tokio::sync::broadcast;

use super::{
    Bus, BusCounts, BusStream, ClusterEvent, Commit, Counters, Incoming, PublishError, ResetReason,
    wire,
};

/// The notices a local cluster's channel keeps for its slowest node by default.
pub const DEFAULT_LOCAL_CAPACITY: usize = 4096;

#[derive(Clone)]
struct Sent {
    node: Arc<str>,
    item: Item,
}

#[derive(Clone)]
enum Item {
    Commit(Commit),
    Event(ClusterEvent),
}

/// The shared channel the nodes of one process join.
#[derive(Clone)]
pub struct LocalCluster {
    tx: broadcast::Sender<Sent>,
}

impl LocalCluster {
    /// A cluster whose channel keeps `capacity` notices (at least 1) for its slowest node.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        LocalCluster { tx }
    }

    /// A node named `node` on this cluster. It receives what the other nodes publish from now
    /// on.
    pub fn join(&self, node: &str) -> LocalBus {
        LocalBus {
            node: node.into(),
            tx: self.tx.clone(),
            rx: Mutex::new(Some(self.tx.subscribe())),
            counters: Arc::new(Counters::default()),
        }
    }
}

impl Default for LocalCluster {
    fn default() -> Self {
        LocalCluster::new(DEFAULT_LOCAL_CAPACITY)
    }
}

/// One node on a [`LocalCluster`].
pub struct LocalBus {
    node: Arc<str>,
    tx: broadcast::Sender<Sent>,
    rx: Mutex<Option<broadcast::Receiver<Sent>>>,
    counters: Arc<Counters>,
}

impl LocalBus {
    fn send(&self, item: Item) {
        // No receiver (a node alone) is not an error: there is nobody to tell.
        let _ = self.tx.send(Sent {
            node: self.node.clone(),
            item,
        });
        Counters::add(&self.counters.published);
    }
}

fn refused(e: wire::WireError) -> PublishError {
    PublishError::Invalid(e.to_string())
}

impl Bus for LocalBus {
    fn node(&self) -> &str {
        &self.node
    }

    fn publish_commit(&self, commit: Commit) -> Result<(), PublishError> {
        // The same checks as the NATS bus's encoder (the encoding itself is not needed here).
        wire::check_commit(&self.node, &commit).map_err(refused)?;
        self.send(Item::Commit(commit));
        Ok(())
    }

    fn publish_event(&self, event: ClusterEvent) -> Result<(), PublishError> {
        wire::check_event_of(&self.node, &event).map_err(refused)?;
        self.send(Item::Event(event));
        Ok(())
    }

    fn take_incoming(&self) -> Option<BusStream> {
        let rx = match self.rx.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }?;
        let me = self.node.clone();
        let counters = self.counters.clone();
        Some(Box::pin(stream::unfold(rx, move |mut rx| {
            let me = me.clone();
            let counters = counters.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(sent) if sent.node == me => continue,
                        Ok(sent) => {
                            Counters::add(&counters.received);
                            let node = sent.node.to_string();
                            let incoming = match sent.item {
                                Item::Commit(commit) => Incoming::Commit { node, commit },
                                Item::Event(event) => Incoming::Event { node, event },
                            };
                            return Some((incoming, rx));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            Counters::add(&counters.resets);
                            return Some((Incoming::Reset(ResetReason::Lagged(n)), rx));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        })))
    }

    fn counts(&self) -> BusCounts {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::Conv;
    use futures_util::StreamExt;
    use std::time::Duration;

    fn commit(seq: u64) -> Commit {
        Commit {
            conv: Conv::Room("general".into()),
            seq,
            msg_id: format!("m{seq}"),
            except: vec![],
            frame: Some(bytes::Bytes::from_static(b"\0\0\0\0")),
        }
    }

    async fn next(s: &mut BusStream) -> Incoming {
        match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
            Ok(Some(i)) => i,
            other => panic!("nothing received: {other:?}"),
        }
    }

    #[tokio::test]
    async fn nodes_hear_each_other_and_not_themselves() {
        let cluster = LocalCluster::default();
        let a = cluster.join("a");
        let b = cluster.join("b");
        let mut a_in = a.take_incoming().expect("first take");
        assert!(a.take_incoming().is_none(), "one consumer per node");
        let mut b_in = b.take_incoming().expect("first take");
        a.publish_commit(commit(1)).expect("published");
        b.publish_event(ClusterEvent::RoomChanged {
            room: "ops".into(),
            notice: None,
            to: vec![],
        })
        .expect("published");
        assert_eq!(
            next(&mut b_in).await,
            Incoming::Commit {
                node: "a".into(),
                commit: commit(1)
            }
        );
        assert_eq!(
            next(&mut a_in).await,
            Incoming::Event {
                node: "b".into(),
                event: ClusterEvent::RoomChanged {
                    room: "ops".into(),
                    notice: None,
                    to: vec![],
                }
            }
        );
        assert_eq!(a.counts().published, 1);
        assert_eq!(b.counts().received, 1);
    }

    #[tokio::test]
    async fn a_node_that_falls_behind_is_told_to_resync() {
        let cluster = LocalCluster::new(4);
        let a = cluster.join("a");
        let b = cluster.join("b");
        let mut b_in = b.take_incoming().expect("take");
        for seq in 1..=10 {
            a.publish_commit(commit(seq)).expect("published");
        }
        assert_eq!(
            next(&mut b_in).await,
            Incoming::Reset(ResetReason::Lagged(6))
        );
        assert!(matches!(
            next(&mut b_in).await,
            Incoming::Commit { commit, .. } if commit.seq == 7
        ));
    }

    #[test]
    fn invalid_notices_are_refused_before_they_travel() {
        let cluster = LocalCluster::default();
        let a = cluster.join("a");
        let mut bad = commit(1);
        bad.seq = 0;
        assert!(matches!(
            a.publish_commit(bad),
            Err(PublishError::Invalid(_))
        ));
        let bad = ClusterEvent::Presence {
            user: "Not A Name".into(),
            online: true,
        };
        assert!(a.publish_event(bad).is_err());
    }
}
