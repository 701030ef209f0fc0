//! The hub behind its lock, shared by the sessions and the dispatcher.

use std::sync::{Mutex, MutexGuard};

use crate::hub::Hub;
use crate::outbox::Outbox;

/// The hub behind its lock. A panic while holding the lock must not take every later request
/// down with it, so a poisoned lock is recovered (the hub's state is updated in single steps).
///
/// Every mutable use of the hub counts a new version, so whoever keeps something derived from
/// it (the dispatcher's room audiences) knows, under the same lock, whether it is still true.
pub struct SharedHub {
    hub: Mutex<Hub<Outbox>>,
    version: std::sync::atomic::AtomicU64,
}

/// The locked hub: reads go through as they are, a mutable use counts a new version.
pub struct HubGuard<'a> {
    hub: MutexGuard<'a, Hub<Outbox>>,
    version: &'a std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for HubGuard<'_> {
    type Target = Hub<Outbox>;

    fn deref(&self) -> &Hub<Outbox> {
        &self.hub
    }
}

impl std::ops::DerefMut for HubGuard<'_> {
    fn deref_mut(&mut self) -> &mut Hub<Outbox> {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &mut self.hub
    }
}

impl HubGuard<'_> {
    /// Changes with every mutable use of the hub (read under its lock: stable while held).
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl SharedHub {
    pub fn new(hub: Hub<Outbox>) -> SharedHub {
        SharedHub {
            hub: Mutex::new(hub),
            version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn lock(&self) -> HubGuard<'_> {
        HubGuard {
            hub: self.hub.lock().unwrap_or_else(|e| e.into_inner()),
            version: &self.version,
        }
    }
}
