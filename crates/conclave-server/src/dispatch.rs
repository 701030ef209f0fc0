//! Fan-out of stored messages, in commit order.
//!
//! The store thread reports its work on one channel in the order it did it (commits with their
//! sequence numbers, and catch-up reads); this task takes the reports one by one, encodes each
//! message once, queues it for every recipient connection, and answers the sender. Because one
//! task does it in order, every client sees a conversation's messages in sequence order, and a
//! connection that catches up gets everything committed before its catch-up from the catch-up
//! and everything after it live: nothing lost, nothing twice.

use std::collections::HashMap;
use std::sync::Arc;

use conclave_proto::{Conv, ErrorBody, ErrorCode, Event, Reply, ServerFrame};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::hub::SessionId;
use crate::metrics::Metrics;
use crate::outbox::{self, Outbox};
use crate::shared_hub::SharedHub;
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

/// Most rooms whose audience the dispatcher keeps at once (beyond it, it starts over).
const MAX_CACHED_ROOMS: usize = 1024;

/// The caught-up connections of rooms with traffic, with their users, as the hub had them at
/// `version`. Finding a room's recipients in the hub hashes every member's name and every
/// connection id, for every message; with this, a room costs that once per change of the hub
/// (a login, a join, a part...), and each message walks a list.
#[derive(Default)]
struct Audiences {
    version: u64,
    rooms: HashMap<String, Vec<(SessionId, String, Outbox)>>,
}

/// Runs until the store thread stops.
pub async fn run(
    hub: Arc<SharedHub>,
    mut done: mpsc::Receiver<Done<SendCtx>>,
    metrics: Arc<Metrics>,
) {
    let mut audiences = Audiences::default();
    while let Some(d) = done.recv().await {
        match d {
            Done::Appended { result, ctx } => appended(&hub, &mut audiences, result, ctx, &metrics),
            Done::CaughtUp { result, ctx, .. } => caught_up(&hub, result, ctx, &metrics),
        }
    }
}

/// Queues `frame` for every recipient of a new message; returns how many.
fn fan_out(
    hub: &SharedHub,
    audiences: &mut Audiences,
    msg: &conclave_proto::Message,
    except: &[String],
    origin: SessionId,
    frame: &bytes::Bytes,
) -> usize {
    let hub = hub.lock();
    let Conv::Room(room) = &msg.conv else {
        let mut recipients = 0;
        for o in hub.recipients(&msg.conv, except, Some(origin)) {
            o.push(frame.clone());
            recipients += 1;
        }
        return recipients;
    };
    // Checked under the hub's lock: no change can slip in between.
    if audiences.version != hub.version() {
        audiences.rooms.clear();
        audiences.version = hub.version();
    }
    if !audiences.rooms.contains_key(room) {
        if audiences.rooms.len() >= MAX_CACHED_ROOMS {
            audiences.rooms.clear();
        }
        let audience = hub
            .room_audience(room)
            .into_iter()
            .map(|(sid, user, o)| (sid, user.to_string(), o.clone()))
            .collect();
        audiences.rooms.insert(room.clone(), audience);
    }
    let mut recipients = 0;
    for (sid, user, o) in audiences.rooms.get(room).into_iter().flatten() {
        if *sid == origin || except.iter().any(|e| e == user) {
            continue;
        }
        o.push(frame.clone());
        recipients += 1;
    }
    recipients
}

fn appended(
    hub: &SharedHub,
    audiences: &mut Audiences,
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
                let recipients = fan_out(hub, audiences, &a.msg, &a.except, ctx.origin, &frame);
                metrics.message(&a.msg.conv, recipients);
            }
            Ok(Reply::Sent {
                msg_id: a.msg.msg_id,
                seq: a.msg.seq,
                ts_ms: a.msg.ts_ms,
                duplicate: a.duplicate,
            })
        }
        Err(e) => Err(refusal(&e, metrics)),
    };
    if !ctx.silent {
        ctx.outbox.send(&ServerFrame::Reply {
            id: ctx.req_id,
            result,
        });
    }
}

/// What the sender of a message the store refused (`error`, the store's text) is told.
pub(crate) fn refusal(error: &str, metrics: &Metrics) -> ErrorBody {
    if error == crate::store::DISK_FULL {
        metrics.storage_full("message");
        crate::replies::storage_full()
    } else if error.starts_with("PostgreSQL: error communicating") {
        // The connection broke while the batch was under way, perhaps during its commit.
        ErrorBody::new(
            ErrorCode::Internal,
            "the connection to the cluster's database broke while the message was being \
             stored, so it may or may not be stored; try again with the same idempotency key \
             and it is stored once either way",
        )
    } else {
        ErrorBody::new(
            ErrorCode::Internal,
            "the message could not be stored; it was not sent. Try again",
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Hub, HubLimits};
    use crate::outbox::OutboxQueue;
    use crate::store::RoomRow;
    use tokio_util::sync::CancellationToken;

    fn message(room: &str) -> conclave_proto::Message {
        conclave_proto::Message {
            msg_id: "m".into(),
            conv: Conv::Room(room.into()),
            from: "alice".into(),
            seq: 1,
            ts_ms: 0,
            body: conclave_proto::Body::text("hi"),
            extra: None,
        }
    }

    #[test]
    fn a_cached_audience_follows_every_change_of_the_hub() {
        let root = CancellationToken::new();
        let users = ["alice", "bob", "carol"]
            .iter()
            .map(|u| (u.to_string(), false));
        let rooms = vec![RoomRow {
            name: "general".into(),
            private: false,
            pw_hash: None,
            owner: None,
            members: vec!["alice".into(), "bob".into(), "carol".into()],
            invited: vec![],
            votekick: true,
        }];
        let limits = HubLimits {
            max_message_bytes: 100,
            max_recipients: 3,
            max_rooms: 10,
        };
        let hub = SharedHub::new(Hub::new(limits, users, rooms));
        let mut queues: Vec<(Outbox, OutboxQueue)> = Vec::new();
        for (sid, user) in ["alice", "bob", "carol"].into_iter().enumerate() {
            let (o, q) = Outbox::new(16, &root);
            queues.push((o.clone(), q));
            let mut h = hub.lock();
            h.connect(user, sid as u64, o);
            h.set_live(sid as u64);
        }
        let mut audiences = Audiences::default();
        let frame = bytes::Bytes::from_static(b"frame");
        let m = message("general");
        // From alice's connection: bob and carol.
        assert_eq!(fan_out(&hub, &mut audiences, &m, &[], 0, &frame), 2);
        // Blockcast: carol left out, from the same cached audience.
        assert_eq!(
            fan_out(&hub, &mut audiences, &m, &["carol".to_string()], 0, &frame),
            1
        );
        // Carol leaves the room: the next message must not reach her.
        hub.lock().remove_member("general", "carol");
        assert_eq!(fan_out(&hub, &mut audiences, &m, &[], 0, &frame), 1);
        // Bob disconnects: nobody else hears alice.
        hub.lock().disconnect(1);
        assert_eq!(fan_out(&hub, &mut audiences, &m, &[], 0, &frame), 0);
        // A room nobody is in, and a room that does not exist.
        assert_eq!(
            fan_out(&hub, &mut audiences, &message("nowhere"), &[], 0, &frame),
            0
        );
        let depths: Vec<usize> = queues.iter().map(|(o, _)| o.depth()).collect();
        assert_eq!(depths, vec![0, 3, 1], "alice, bob, carol");
    }
}
