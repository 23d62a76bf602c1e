//! The drain state everyone observes: lifecycle state, drain phase, the
//! cancellation tree, connection counters and the drain's figures. A leaf:
//! `proxy`, `admin` and `kube` read it, `lifecycle` (the orchestrator on top)
//! changes it. One task (`lifecycle::run`) moves the state; everything else
//! only reads it, through atomics, so readiness and the hot path never wait on
//! a lock.

mod accept;
mod connections;

pub use accept::accept_until_stopped;
pub use connections::{ConnectionGuard, ConnectionTracker, wait_for_zero};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DeadlineSource, Metrics};

/// `starting → serving → draining → drained`; the order is the numeric order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Serving = 1,
    Draining = 2,
    Drained = 3,
}

impl State {
    fn from_u8(value: u8) -> State {
        match value {
            0 => State::Starting,
            1 => State::Serving,
            2 => State::Draining,
            _ => State::Drained,
        }
    }

    pub fn as_str(self) -> &'static str {
        crate::metrics::STATE_NAMES[self as usize]
    }
}

/// Where in the drain timeline we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not draining.
    Accepting = 0,
    /// Not ready, still accepting: endpoints are propagating.
    LameDuck = 1,
    /// Listener closed; waiting for in-flight work.
    Closing = 2,
    /// Deadline or second signal: closing what is left.
    Forcing = 3,
    /// Drained; the admin server keeps answering for --metrics-linger.
    Lingering = 4,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Accepting => "accepting",
            Phase::LameDuck => "lame_duck",
            Phase::Closing => "closing",
            Phase::Forcing => "forcing",
            Phase::Lingering => "lingering",
        }
    }

    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Accepting,
            1 => Phase::LameDuck,
            2 => Phase::Closing,
            3 => Phase::Forcing,
            _ => Phase::Lingering,
        }
    }
}

/// The cancellation tree: `force` ⊃ `stop_accepting`. Cancelling `force`
/// also cancels `stop_accepting`, so a forced exit closes the listener too
/// without anyone having to remember both. The start of the drain itself is
/// not a token: the hot path reads it from the state atomic
/// ([`DrainState::is_draining`]).
#[derive(Debug, Clone)]
pub struct DrainTokens {
    /// Cancelled at the deadline or on a second signal: drop what is left.
    pub force: CancellationToken,
    /// Cancelled when the lame-duck window ends: close the listener, close idle
    /// HTTP/1 connections, GOAWAY to HTTP/2 connections.
    pub stop_accepting: CancellationToken,
}

impl DrainTokens {
    fn new() -> Self {
        let force = CancellationToken::new();
        let stop_accepting = force.child_token();
        DrainTokens {
            force,
            stop_accepting,
        }
    }
}

/// How the drain ended; decides the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every connection finished on its own.
    Graceful,
    /// `--drain-timeout` ran out; what was left was closed.
    Deadline,
    /// A second signal forced the exit.
    Signal,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Graceful => "graceful",
            Outcome::Deadline => "deadline",
            Outcome::Signal => "signal",
        }
    }

    /// The documented exit status.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Graceful => 0,
            Outcome::Deadline => 3,
            Outcome::Signal => 4,
        }
    }
}

/// What `GET /drained` answers and the summary log line says.
#[derive(Debug, Clone, Serialize)]
pub struct DrainSummary {
    pub outcome: Outcome,
    pub duration_ms: u64,
    pub requests_during_drain: u64,
    pub connections_graceful: u64,
    pub connections_forced: u64,
    pub exit_code: u8,
}

#[derive(Debug, Clone, Copy)]
struct DrainClock {
    started: Instant,
    started_unix: Duration,
}

pub struct DrainState {
    state: AtomicU8,
    phase: AtomicU8,
    upstream_up: AtomicBool,
    pub tokens: DrainTokens,
    pub connections: ConnectionTracker,
    pub metrics: Metrics,
    drain_clock: OnceLock<DrainClock>,
    /// The drain's hard deadline (Unix ms; 0 before the drain). The
    /// lifecycle moves it once the pod's deletionTimestamp is known.
    deadline_unix_ms: AtomicU64,
    requests_during_drain: AtomicU64,
    drained: watch::Sender<Option<DrainSummary>>,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl DrainState {
    pub fn new(metrics: Metrics) -> Self {
        metrics.set_state(State::Starting as usize);
        DrainState {
            state: AtomicU8::new(State::Starting as u8),
            phase: AtomicU8::new(Phase::Accepting as u8),
            upstream_up: AtomicBool::new(false),
            tokens: DrainTokens::new(),
            connections: ConnectionTracker::default(),
            metrics,
            drain_clock: OnceLock::new(),
            deadline_unix_ms: AtomicU64::new(0),
            requests_during_drain: AtomicU64::new(0),
            drained: watch::channel(None).0,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// True from the first instant of the drain on: the one check on the hot path.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.state.load(Ordering::Relaxed) >= State::Draining as u8
    }

    /// What `/ready` answers: serving, and the app accepting connections.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match self.state() {
            State::Serving if self.upstream_up.load(Ordering::Acquire) => Ok(()),
            State::Serving => Err("upstream unavailable"),
            other => Err(other.as_str()),
        }
    }

    pub fn upstream_up(&self) -> bool {
        self.upstream_up.load(Ordering::Acquire)
    }

    /// Records the app's reachability; the first success moves `starting` to `serving`.
    pub fn set_upstream_up(&self, up: bool) {
        let was = self.upstream_up.swap(up, Ordering::AcqRel);
        if was != up {
            if up {
                tracing::info!("upstream reachable");
            } else {
                tracing::warn!("upstream unreachable");
            }
        }
        if up {
            self.transition(State::Starting, State::Serving);
        }
    }

    /// Moves `from → to` if the state is still `from`; logs and updates metrics.
    fn transition(&self, from: State, to: State) -> bool {
        let moved = self
            .state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            self.metrics.set_state(to as usize);
            tracing::info!(state = to.as_str(), "state changed");
        }
        moved
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// t0: readiness fails from here on. Returns false if a drain already started.
    pub(crate) fn begin_drain(&self) -> bool {
        let started = Instant::now();
        let started_unix = unix_now();
        if self
            .drain_clock
            .set(DrainClock {
                started,
                started_unix,
            })
            .is_err()
        {
            return false;
        }
        // Store before anything else so /ready fails at once, whatever state we were in.
        let previous = State::from_u8(self.state.swap(State::Draining as u8, Ordering::AcqRel));
        self.phase.store(Phase::LameDuck as u8, Ordering::Release);
        self.connections.set_draining();
        self.metrics.set_state(State::Draining as usize);
        self.metrics.draining.set(1);
        self.metrics
            .drain_started_timestamp
            .set(started_unix.as_secs_f64());
        tracing::info!(
            state = "draining",
            from = previous.as_str(),
            "state changed"
        );
        true
    }

    pub fn drain_started(&self) -> Option<Instant> {
        self.drain_clock.get().map(|c| c.started)
    }

    pub fn drain_started_unix_ms(&self) -> Option<u64> {
        self.drain_clock
            .get()
            .map(|c| c.started_unix.as_millis() as u64)
    }

    pub fn drain_deadline_unix_ms(&self) -> Option<u64> {
        Some(self.deadline_unix_ms.load(Ordering::Acquire)).filter(|&ms| ms != 0)
    }

    /// Publishes the drain's deadline (status, metrics) under its source.
    pub(crate) fn set_deadline(&self, deadline: SystemTime, source: DeadlineSource) {
        let unix = deadline.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.deadline_unix_ms
            .store(unix.as_millis() as u64, Ordering::Release);
        self.metrics.set_drain_deadline(source, unix.as_secs_f64());
    }

    /// Called once per finished request; counts those served while draining.
    #[inline]
    pub fn request_finished(&self) {
        if self.is_draining() {
            self.requests_during_drain.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// t2: everything closed; publishes the summary to `/drained` waiters.
    pub(crate) fn finish_drain(&self, outcome: Outcome) -> DrainSummary {
        let duration = self
            .drain_started()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let (graceful, forced) = self.connections.drain_closures();
        let summary = DrainSummary {
            outcome,
            duration_ms: duration.as_millis() as u64,
            requests_during_drain: self.requests_during_drain.load(Ordering::Relaxed),
            connections_graceful: graceful,
            connections_forced: forced,
            exit_code: outcome.exit_code(),
        };
        self.metrics.drain_duration.set(duration.as_secs_f64());
        self.transition(State::Draining, State::Drained);
        self.set_phase(Phase::Lingering);
        self.drained.send_replace(Some(summary.clone()));
        summary
    }

    /// Waits for the drain summary (for `GET /drained`).
    pub fn subscribe_drained(&self) -> watch::Receiver<Option<DrainSummary>> {
        self.drained.subscribe()
    }
}

/// What the lifecycle reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT: start the drain, or force the exit if draining.
    Stop(&'static str),
    /// SIGHUP: reload what can be reloaded.
    Reload,
    /// `POST /drain` on the admin port.
    DrainRequested,
}

/// Milliseconds on a process-wide monotonic clock; never 0, so 0 can mean "unset".
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
