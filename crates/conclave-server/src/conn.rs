//! A connection as the command handlers see it ([`Conn`]), and sending one event to many.

use std::net::SocketAddr;
use std::sync::Arc;

use conclave_proto::{ErrorBody, Event, Reply, ServerFrame};
use tokio::sync::Semaphore;

use crate::hub::SessionId;
use crate::outbox::{self, Outbox};
use crate::state::Shared;

/// One logged-in (or logging-in) connection, as the command handlers see it.
pub struct Conn {
    pub shared: Arc<Shared>,
    pub sid: SessionId,
    pub peer: SocketAddr,
    pub outbox: Outbox,
    pub user: Option<String>,
    /// Bounds this connection's sends awaiting their commit.
    pub inflight: Arc<Semaphore>,
    /// The end-to-end device this connection speaks for (after `E2eePublish`).
    pub device: Option<String>,
    /// Typing, read-marker and change budget; made at the first such request (idle
    /// connections carry only the pointer).
    pub presence_budget: Option<Box<crate::presence::ConnBudget>>,
}

impl Conn {
    pub fn reply(&self, id: u64, result: Result<Reply, ErrorBody>) {
        self.outbox.send(&ServerFrame::Reply { id, result });
    }
}

/// Sends an event to a set of connections.
pub fn broadcast<'a>(targets: impl IntoIterator<Item = &'a Outbox>, event: Event) {
    let frame = outbox::encode(&ServerFrame::Event(event));
    for o in targets {
        o.push(frame.clone());
    }
}
