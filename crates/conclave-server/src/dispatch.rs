//! Fan-out of stored messages, in commit order.
//!
//! The store thread answers appends on one channel in the order it assigned their sequence
//! numbers; this task takes them one by one, encodes each message once, queues it for every
//! recipient connection, and answers the sender. Because one task does it in order, every
//! client sees a conversation's messages in sequence order.

use std::sync::Arc;

use conclave_proto::{ErrorBody, ErrorCode, Event, Reply, ServerFrame};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::hub::SessionId;
use crate::outbox::{self, Outbox};
use crate::server::SharedHub;
use crate::store::Committed;

/// What the dispatcher needs to answer a send.
pub struct SendCtx {
    pub origin: SessionId,
    pub outbox: Outbox,
    pub req_id: u64,
    /// Held until the send is answered: bounds each connection's sends in flight.
    pub permit: OwnedSemaphorePermit,
}

/// Runs until the store thread stops.
pub async fn run(hub: Arc<SharedHub>, mut commits: mpsc::Receiver<Committed<SendCtx>>) {
    while let Some(c) = commits.recv().await {
        let ctx = c.ctx;
        let result = match c.result {
            Ok(a) => {
                if !a.duplicate {
                    let frame = outbox::encode(&ServerFrame::Event(Event::Message(a.msg.clone())));
                    let hub = hub.lock();
                    for o in hub.recipients(&a.msg.conv, &a.except, Some(ctx.origin)) {
                        o.push(frame.clone());
                    }
                }
                Ok(Reply::Sent {
                    msg_id: a.msg.msg_id,
                    seq: a.msg.seq,
                    ts_ms: a.msg.ts_ms,
                    duplicate: a.duplicate,
                })
            }
            Err(_) => Err(ErrorBody::new(
                ErrorCode::Internal,
                "the message could not be stored; it was not sent. Try again",
            )),
        };
        ctx.outbox.send(&ServerFrame::Reply {
            id: ctx.req_id,
            result,
        });
        drop(ctx.permit);
    }
}
