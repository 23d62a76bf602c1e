//! Downstream connection accounting: a connection is counted from the moment
//! its guard exists until the guard drops, whatever path the code takes out.
//! The same atomics answer "is anything left?" for the drain and feed the
//! metrics; nothing ever scans a list of connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::DrainState;
use crate::metrics::Protocol;

/// Counts open downstream connections (all protocols, tunnels included).
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    active: AtomicUsize,
    draining: AtomicBool,
    closed_graceful: AtomicU64,
    closed_forced: AtomicU64,
    all_closed: Notify,
}

impl ConnectionTracker {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// (graceful, forced) closures counted since the drain started.
    pub fn drain_closures(&self) -> (u64, u64) {
        (
            self.closed_graceful.load(Ordering::Acquire),
            self.closed_forced.load(Ordering::Acquire),
        )
    }

    fn release(&self) {
        let was = self.active.fetch_sub(1, Ordering::AcqRel);
        // Only the drain waits for zero; outside it, skip the Notify's lock.
        if was == 1 && self.draining.load(Ordering::Acquire) {
            self.all_closed.notify_waiters();
        }
    }

    /// Resolves once no connection is open.
    pub async fn wait_all_closed(&self) {
        wait_for_zero(&self.active, &self.all_closed).await;
    }
}

/// Resolves once `count` is 0. Whoever brings it to 0 calls
/// `zero.notify_waiters()`.
pub async fn wait_for_zero(count: &AtomicUsize, zero: &Notify) {
    loop {
        let notified = zero.notified();
        tokio::pin!(notified);
        // Register before checking, so a decrement between the check and the
        // await cannot be missed.
        notified.as_mut().enable();
        if count.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

/// One open downstream connection. Shared (`Arc`) with an upgraded tunnel, so
/// the connection stays counted until both the HTTP side and the tunnel end.
pub struct ConnectionGuard {
    lifecycle: Arc<DrainState>,
    protocol: Option<Protocol>,
    forced: AtomicBool,
}

impl ConnectionGuard {
    /// Counts a new connection, or refuses it when `max` are already open.
    pub fn try_open(lifecycle: &Arc<DrainState>, max: usize) -> Option<ConnectionGuard> {
        let tracker = &lifecycle.connections;
        if tracker.active.fetch_add(1, Ordering::AcqRel) >= max {
            tracker.release();
            lifecycle.metrics.connections_rejected.inc();
            return None;
        }
        Some(ConnectionGuard {
            lifecycle: lifecycle.clone(),
            protocol: None,
            forced: AtomicBool::new(false),
        })
    }

    /// The protocol is known only once the first bytes are read.
    pub fn set_protocol(&mut self, protocol: Protocol) {
        debug_assert!(self.protocol.is_none());
        self.lifecycle.metrics.connection_opened(protocol);
        self.protocol = Some(protocol);
    }

    /// This connection is being closed by the deadline, not by its peer.
    pub fn mark_forced(&self) {
        self.forced.store(true, Ordering::Release);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let metrics = &self.lifecycle.metrics;
        if let Some(protocol) = self.protocol {
            metrics.connections_active(protocol).dec();
        }
        let tracker = &self.lifecycle.connections;
        if tracker.draining.load(Ordering::Acquire) {
            if self.forced.load(Ordering::Acquire) {
                tracker.closed_forced.fetch_add(1, Ordering::AcqRel);
                metrics.drain_closed_forced.inc();
            } else {
                tracker.closed_graceful.fetch_add(1, Ordering::AcqRel);
                metrics.drain_closed_graceful.inc();
            }
        }
        tracker.release();
    }
}
