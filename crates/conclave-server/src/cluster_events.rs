//! Cluster-wide events (issue 24): what a node tells the others when presence, a kick, a ban,
//! an announcement or a room changes, and what it does with theirs.
//!
//! [`publish`] queues an event on the bus (nothing when the node is alone: `Shared::bus` is
//! `None`); [`apply`] acts on an event another node published, on this node's own connections.
//! In progress: `apply` acts on nothing yet.

use crate::bus::ClusterEvent;
use crate::state::Shared;

/// Tells the other nodes, if any. Never waits; an event the bus cannot queue is logged and
/// counted by the bus (what must survive is in the store).
pub fn publish(shared: &Shared, event: ClusterEvent) {
    let Some(bus) = &shared.bus else { return };
    if let Err(e) = bus.publish_event(event) {
        tracing::warn!(error = %e, "a cluster event was not published");
    }
}

/// Acts on an event that node `node` published.
pub fn apply(shared: &Shared, node: &str, event: ClusterEvent) {
    let _ = (shared, node, event);
}
