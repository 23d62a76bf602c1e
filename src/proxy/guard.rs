//! RAII accounting: a connection or request is counted from the moment its
//! guard exists until the guard drops, whatever path the code takes out.
//! The same atomics answer "is anything left?" for the drain and feed the
//! metrics; nothing ever scans a list of connections.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::lifecycle::Lifecycle;
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
        loop {
            let notified = self.all_closed.notified();
            tokio::pin!(notified);
            // Register before checking, so a release between the check and the
            // await cannot be missed.
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open downstream connection. Shared (`Arc`) with an upgraded tunnel, so
/// the connection stays counted until both the HTTP side and the tunnel end.
pub struct ConnectionGuard {
    lifecycle: Arc<Lifecycle>,
    protocol: Option<Protocol>,
    forced: AtomicBool,
}

impl ConnectionGuard {
    /// Counts a new connection, or refuses it when `max` are already open.
    pub fn try_open(lifecycle: &Arc<Lifecycle>, max: usize) -> Option<ConnectionGuard> {
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

/// Milliseconds on a process-wide monotonic clock; never 0, so 0 can mean "unset".
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Per-connection activity, read by the connection's timer to enforce the
/// header-read and idle timeouts. Written by the connection's own I/O and
/// requests only, so every access is uncontended.
#[derive(Debug)]
pub struct ConnActivity {
    in_flight: AtomicU32,
    /// When the bytes of a request head started arriving (0: none pending).
    head_started_ms: AtomicU64,
    /// When the last request finished (or the connection opened).
    idle_since_ms: AtomicU64,
}

/// What the connection timer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum TimerVerdict {
    /// A request head has been arriving for longer than --header-read-timeout.
    HeadTimedOut,
    /// No request for longer than --idle-timeout.
    Idle,
    /// Nothing expired; look again after this long.
    CheckAgainIn(Duration),
}

impl ConnActivity {
    /// A connection starts as "a head is pending": a client that connects and
    /// sends nothing is cut at the header-read timeout too.
    pub fn new() -> Self {
        let now = now_ms();
        ConnActivity {
            in_flight: AtomicU32::new(0),
            head_started_ms: AtomicU64::new(now),
            idle_since_ms: AtomicU64::new(now),
        }
    }

    /// Bytes arrived while no request is in flight: a new head is starting.
    #[inline]
    pub fn on_bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == 0
        {
            self.head_started_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started_ms.store(0, Ordering::Relaxed);
    }

    #[inline]
    pub fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Decides what the connection's timer does. `track_heads` is false for
    /// HTTP/2, where bytes arrive all the time (pings, window updates).
    pub fn verdict(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
        track_heads: bool,
    ) -> TimerVerdict {
        let now = now_ms();
        let header_ms = header_timeout.as_millis() as u64;
        let idle_ms = idle_timeout.as_millis() as u64;
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return TimerVerdict::CheckAgainIn(idle_timeout);
        }
        let head_started = self.head_started_ms.load(Ordering::Relaxed);
        if track_heads && head_started != 0 {
            let waited = now.saturating_sub(head_started);
            return if waited >= header_ms {
                TimerVerdict::HeadTimedOut
            } else {
                TimerVerdict::CheckAgainIn(Duration::from_millis(header_ms - waited))
            };
        }
        let idle_for = now.saturating_sub(self.idle_since_ms.load(Ordering::Relaxed));
        if idle_for >= idle_ms {
            return TimerVerdict::Idle;
        }
        let next = Duration::from_millis(idle_ms - idle_for);
        // A head may start while we sleep; wake in time to enforce its limit.
        TimerVerdict::CheckAgainIn(if track_heads {
            next.min(header_timeout)
        } else {
            next
        })
    }
}

impl Default for ConnActivity {
    fn default() -> Self {
        Self::new()
    }
}

/// One request, from its head to the end of its response body.
pub struct RequestGuard {
    lifecycle: Arc<Lifecycle>,
    activity: Arc<ConnActivity>,
    started: Instant,
    status: u16,
}

impl RequestGuard {
    pub fn start(lifecycle: Arc<Lifecycle>, activity: Arc<ConnActivity>) -> RequestGuard {
        lifecycle.metrics.requests_in_flight.inc();
        activity.request_started();
        RequestGuard {
            lifecycle,
            activity,
            started: Instant::now(),
            // Until a response exists, a dropped request counts as a failure.
            status: 499,
        }
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub fn upstream_failed(&self, kind: crate::metrics::UpstreamErrorKind) {
        self.lifecycle.metrics.upstream_error(kind);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let metrics = &self.lifecycle.metrics;
        metrics.requests_in_flight.dec();
        metrics.request_finished(self.status, self.started.elapsed().as_secs_f64());
        self.lifecycle.request_finished();
        self.activity.request_finished();
    }
}

/// Holds a gauge up by one for as long as it lives.
pub struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    pub fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
