//! RAII accounting of requests and per-connection activity: a request is
//! counted from its head until its guard drops, whatever path the code takes
//! out. Connection counting lives in the drain state ([`crate::drain`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::body::StreamedBytes;
use crate::drain::{DrainState, now_ms};
use crate::observe::Record;
use crate::observe::access_log::{End, Entry};

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

/// One request, from its head to the end of its response body. Also how it
/// ended, for the access log and the request's span: `complete` when the
/// response reached the client, else the failure set on the way, else a
/// forced close or a client that went away.
pub struct RequestGuard {
    lifecycle: Arc<DrainState>,
    activity: Arc<ConnActivity>,
    started: Instant,
    status: u16,
    completed: bool,
    end: Option<End>,
    /// Only when the request is observed (access log on, or exported).
    record: Option<Record>,
    /// A request body that streams through hyper's client: its bytes, read
    /// into the record when the request ends.
    streamed_body: Option<Arc<StreamedBytes>>,
}

impl RequestGuard {
    pub fn start(lifecycle: Arc<DrainState>, activity: Arc<ConnActivity>) -> RequestGuard {
        lifecycle.metrics.requests_in_flight.inc();
        activity.request_started();
        RequestGuard {
            lifecycle,
            activity,
            started: Instant::now(),
            // Until a response exists, a dropped request counts as a failure.
            status: 499,
            completed: false,
            end: None,
            record: None,
            streamed_body: None,
        }
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub fn upstream_failed(&mut self, kind: crate::metrics::UpstreamErrorKind) {
        self.lifecycle.metrics.upstream_error(kind);
        self.end.get_or_insert(End::Upstream(kind.as_str()));
    }

    /// How the request ended, when it was not the app's failure.
    pub fn set_end(&mut self, end: End) {
        self.end.get_or_insert(end);
    }

    /// The response reached the client whole.
    pub fn complete(mut self) {
        self.completed = true;
    }

    /// The drain phase, for a record made when the request arrives.
    pub fn phase(&self) -> &'static str {
        self.lifecycle.phase().as_str()
    }

    pub fn observe(&mut self, record: Record) {
        self.record = Some(record);
    }

    /// Takes the record out, with when the request started, for what
    /// outlives the request: an upgraded tunnel logs when it ends, not at
    /// its 101. The request itself still ends (and is counted) here.
    pub fn take_record(&mut self) -> Option<(Record, Instant)> {
        self.record.take().map(|record| (record, self.started))
    }

    /// The access-log entry, when the request is observed.
    #[inline]
    pub fn entry(&mut self) -> Option<&mut Entry> {
        self.record.as_mut().map(|r| &mut *r.entry)
    }

    #[inline]
    pub fn add_response_bytes(&mut self, n: usize) {
        if let Some(e) = self.entry() {
            e.response_bytes += n as u64;
        }
    }

    /// A counter for a request body that streams through hyper's client,
    /// when the request is observed (`None` otherwise: nothing to count).
    pub fn count_streamed_body(&mut self) -> Option<Arc<StreamedBytes>> {
        self.record.as_ref()?;
        Some(
            self.streamed_body
                .insert(Arc::new(StreamedBytes::new()))
                .clone(),
        )
    }

    #[inline]
    pub fn add_request_bytes(&mut self, n: usize) {
        if let Some(e) = self.entry() {
            e.request_bytes = Some(e.request_bytes.unwrap_or(0) + n as u64);
        }
    }

    /// The app's response head arrived.
    #[inline]
    pub fn upstream_answered(&mut self) {
        let elapsed = self.started.elapsed();
        if let Some(e) = self.entry() {
            e.upstream_head = Some(elapsed);
        }
    }

    /// Which app connection carried the request, and whether it was retried.
    #[inline]
    pub fn upstream_connection(&mut self, reused: bool, retried: bool) {
        if let Some(e) = self.entry() {
            e.upstream_reused = Some(reused);
            e.retried = retried;
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let metrics = &self.lifecycle.metrics;
        let elapsed = self.started.elapsed();
        metrics.requests_in_flight.dec();
        metrics.request_finished(self.status, elapsed.as_secs_f64());
        self.lifecycle.request_finished();
        self.activity.request_finished();
        if let Some(mut record) = self.record.take() {
            let end = match self.end {
                Some(end) => end,
                None if self.completed => End::Ok,
                // Dropped unfinished: the deadline's doing, or the client's.
                None if self.lifecycle.tokens.force.is_cancelled() => End::Forced,
                None => End::ClientAborted,
            };
            record.entry.status = self.status;
            record.entry.duration = elapsed;
            if let Some(bytes) = self.streamed_body.as_ref().and_then(|b| b.get()) {
                record.entry.request_bytes = Some(bytes);
            }
            record.finish(end);
        }
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
