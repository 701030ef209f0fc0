//! Fan-out of stored messages, in commit order.
//!
//! The store thread reports its work on one channel in the order it did it (commits with their
//! sequence numbers, and catch-up reads); this task takes the reports one by one, encodes each
//! message once, queues it for every recipient connection, and answers the sender. Because one
//! task does it in order, every client sees a conversation's messages in sequence order, and a
//! connection that catches up gets everything committed before its catch-up from the catch-up
//! and everything after it live: nothing lost, nothing twice.

use std::sync::Arc;

use conclave_proto::{ErrorBody, ErrorCode, Event, Reply, ServerFrame};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::hub::SessionId;
use crate::metrics::Metrics;
use crate::outbox::{self, Outbox};
use crate::server::SharedHub;
use crate::store::Done;

/// Who a store report is for.
pub struct SendCtx {
    pub origin: SessionId,
    pub outbox: Outbox,
    pub req_id: u64,
    /// Held until a send is answered: bounds each connection's sends in flight.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Told the stored message (or `None` on failure) once it is durable and fanned out.
    pub notify: Option<tokio::sync::oneshot::Sender<Option<conclave_proto::Message>>>,
    /// No reply (a message the server itself stores).
    pub silent: bool,
}

/// Runs until the store thread stops.
pub async fn run(
    hub: Arc<SharedHub>,
    mut done: mpsc::Receiver<Done<SendCtx>>,
    metrics: Arc<Metrics>,
) {
    while let Some(d) = done.recv().await {
        match d {
            Done::Appended { result, ctx } => appended(&hub, result, ctx, &metrics),
            Done::CaughtUp { result, ctx } => caught_up(&hub, result, ctx, &metrics),
        }
    }
}

fn appended(
    hub: &SharedHub,
    result: Result<crate::store::Appended, String>,
    mut ctx: SendCtx,
    metrics: &Metrics,
) {
    if let Some(n) = ctx.notify.take() {
        let _ = n.send(result.as_ref().ok().map(|a| a.msg.clone()));
    }
    let result = match result {
        Ok(a) => {
            metrics.storage_ok();
            if !a.duplicate {
                let frame = outbox::encode(&ServerFrame::Event(Event::Message(a.msg.clone())));
                let hub = hub.lock();
                let mut recipients = 0;
                for o in hub.recipients(&a.msg.conv, &a.except, Some(ctx.origin)) {
                    o.push(frame.clone());
                    recipients += 1;
                }
                metrics.message(&a.msg.conv, recipients);
            }
            Ok(Reply::Sent {
                msg_id: a.msg.msg_id,
                seq: a.msg.seq,
                ts_ms: a.msg.ts_ms,
                duplicate: a.duplicate,
            })
        }
        Err(e) if e == crate::store::DISK_FULL => {
            metrics.storage_full("message");
            Err(crate::cmd::storage_full())
        }
        Err(_) => Err(ErrorBody::new(
            ErrorCode::Internal,
            "the message could not be stored; it was not sent. Try again",
        )),
    };
    if !ctx.silent {
        ctx.outbox.send(&ServerFrame::Reply {
            id: ctx.req_id,
            result,
        });
    }
}

fn caught_up(
    hub: &SharedHub,
    result: Result<(Vec<conclave_proto::Message>, bool), String>,
    ctx: SendCtx,
    metrics: &Metrics,
) {
    let (messages, truncated) = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "catch-up failed");
            (Vec::new(), true)
        }
    };
    let count = messages.len() as u32;
    metrics.catch_up(messages.len());
    for m in messages {
        ctx.outbox.send(&ServerFrame::Event(Event::Message(m)));
    }
    ctx.outbox
        .send(&ServerFrame::Event(Event::CaughtUp { count, truncated }));
    hub.lock().set_live(ctx.origin);
}
