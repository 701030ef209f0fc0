//! Keeping the order of requests that the library handles itself.
//!
//! A request to an end-to-end conversation is more than one exchange with the server (encrypt,
//! perhaps wait for a commit, send, record locally), so front ends run each in a task of its
//! own. [`CallOrder`] makes those tasks take turns in the order they were started: a send is
//! in the history asked for right after it, and messages keep their order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use conclave_proto::Request;
use tokio::sync::oneshot;

/// The requests [`crate::Client::call`] may handle itself for end-to-end encryption (sends,
/// joins, invitations, new rooms, history, search): while any of them is under way, the others
/// take their turn behind it.
pub fn is_conversation_request(req: &Request) -> bool {
    matches!(
        req,
        Request::Send { .. }
            | Request::Join { .. }
            | Request::Part { .. }
            | Request::Invite { .. }
            | Request::CreateRoom { .. }
            | Request::History { .. }
            | Request::Thread { .. }
            | Request::Search { .. }
            | Request::Files
    )
}

/// Hands out turns in the order they were asked for.
#[derive(Default)]
pub struct CallOrder {
    /// Completes when the last turn handed out has ended.
    last: Option<oneshot::Receiver<()>>,
    /// Turns handed out and not ended yet.
    pending: Arc<AtomicUsize>,
}

impl CallOrder {
    /// Whether some turn has not ended yet: a request that could go straight to the server
    /// should then take a turn too, or it could overtake one given before it.
    pub fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// The next turn: [`Turn::wait`] completes once every turn handed out before it has
    /// ended (been dropped).
    pub fn turn(&mut self) -> Turn {
        let (done, next) = oneshot::channel();
        let previous = self.last.replace(next);
        self.pending.fetch_add(1, Ordering::AcqRel);
        Turn {
            previous,
            _done: done,
            pending: self.pending.clone(),
        }
    }
}

/// One place in a [`CallOrder`]; ends when dropped, however its task ends.
pub struct Turn {
    previous: Option<oneshot::Receiver<()>>,
    /// Dropping it tells the next turn.
    _done: oneshot::Sender<()>,
    pending: Arc<AtomicUsize>,
}

impl Turn {
    /// Waits until the turns before this one have ended.
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            // Dropped without a value is the only way a turn ends: an error here is expected.
            let _ = previous.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_run_in_the_order_given_whatever_their_speed() {
        let mut order = CallOrder::default();
        assert!(!order.busy());
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // The first turns are the slowest: without turns they would finish last.
        for i in 0..5u64 {
            let mut turn = order.turn();
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                turn.wait().await;
                tokio::time::sleep(Duration::from_millis(5 * (5 - i))).await;
                log.lock().unwrap().push(i);
            }));
        }
        assert!(order.busy());
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("in time")
                .expect("task");
        }
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert!(!order.busy());
    }

    #[tokio::test]
    async fn a_turn_dropped_without_running_lets_the_next_go() {
        let mut order = CallOrder::default();
        let first = order.turn();
        let mut second = order.turn();
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second.wait())
            .await
            .expect("the second turn starts");
        drop(second);
        assert!(!order.busy());
    }
}
