//! The one lifecycle: start-up, the drain timeline and the single way out.
//!
//! `run` owns every long-lived task (signals, admin server, accept loop,
//! connections, upstream probe, upstream pool) and closes them in dependency
//! order: downstream connections, then the upstream pool, then the admin
//! server last. It returns how the drain ended; `main` turns that into the
//! exit status. Nothing else in the program exits the process.

pub mod signals;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::drain::{DrainState, Event, Outcome, Phase};

use crate::admin::AdminServer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ProxyContext, upstream::Upstream};
use crate::telemetry::{LogReloader, ReloadOutcome};

/// How long connection tasks get to notice a forced close.
const FORCE_GRACE: Duration = Duration::from_secs(2);
/// How long the upstream pool and the admin server get to close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Readiness probe of the app: how often while it is up, and while it is down.
const PROBE_INTERVAL_UP: Duration = Duration::from_secs(1);
const PROBE_INTERVAL_DOWN: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {flag} {addr}: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let error = |source| StartError::Bind { flag, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    // A deep backlog absorbs bursts of new connections (and a rolling update
    // moving traffic here) without SYN drops.
    socket.listen(4096).map_err(error)
}

/// Start-up's fallible part: signal handlers first (so a SIGTERM during
/// start-up is a drain, not a crash), then both listeners. Nothing is served
/// yet; an error here leaves nothing half-started.
pub struct Bound {
    signals: signals::OsSignals,
    proxy: TcpListener,
    admin: TcpListener,
    /// The bound addresses (a port 0 in the flags is resolved here).
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// Must be called inside the runtime (signal handlers register with it).
pub fn bind_all(config: &Config) -> Result<Bound, StartError> {
    let signals = signals::OsSignals::register().map_err(StartError::Signals)?;
    let proxy = bind("--listen", config.listen)?;
    let admin = bind("--admin-listen", config.admin_listen)?;
    Ok(Bound {
        signals,
        proxy_addr: proxy.local_addr().unwrap_or(config.listen),
        admin_addr: admin.local_addr().unwrap_or(config.admin_listen),
        proxy,
        admin,
    })
}

/// Runs lameduck until it has drained; returns how the drain ended.
pub async fn run(config: Config, bound: Bound, logs: LogReloader) -> Outcome {
    let (events_tx, events) = mpsc::channel(16);
    let signal_task = AbortOnDrop(tokio::spawn(bound.signals.forward(events_tx.clone())));
    let (proxy_listener, admin_listener) = (bound.proxy, bound.admin);
    let (proxy_addr, admin_addr) = (bound.proxy_addr, bound.admin_addr);

    let lifecycle = Arc::new(DrainState::new(Metrics::new()));
    let upstream = Upstream::new(&config);
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        mode = config.mode.as_str(),
        upstream = %config.upstream_name,
        drain_delay = ?config.drain_delay,
        drain_timeout = ?config.drain_timeout,
        "listening"
    );
    let admin = AdminServer::start(admin_listener, lifecycle.clone(), events_tx);

    let connections = TaskTracker::new();
    let ctx = Arc::new(ProxyContext::new(
        config.clone(),
        lifecycle.clone(),
        upstream.clone(),
        connections.clone(),
    ));
    let accept_loop = tokio::spawn(proxy::serve(proxy_listener, ctx));
    let probe_stop = CancellationToken::new();
    let probe = tokio::spawn(probe_upstream(
        upstream.clone(),
        lifecycle.clone(),
        probe_stop.clone(),
    ));

    let mut driver = Driver {
        config: &config,
        lifecycle: &lifecycle,
        events,
        logs,
        force_on_signal: false,
    };
    driver.force_on_signal = driver.wait_for_drain_request().await;
    let deadline = Instant::now() + config.drain_timeout;
    let outcome = driver.drain(deadline).await;

    // Downstream first: the accept loop and every connection task are done
    // (or were forced) before the things they depend on go away.
    connections.close();
    if timeout(FORCE_GRACE, connections.wait()).await.is_err() {
        tracing::warn!("connection tasks still running after the forced close");
    }
    let _ = accept_loop.await;
    probe_stop.cancel();
    let _ = probe.await;
    upstream.close(CLOSE_GRACE).await;

    let summary = lifecycle.finish_drain(outcome);
    tracing::info!(
        outcome = summary.outcome.as_str(),
        duration_ms = summary.duration_ms,
        requests_during_drain = summary.requests_during_drain,
        connections_graceful = summary.connections_graceful,
        connections_forced = summary.connections_forced,
        exit_code = summary.exit_code,
        "drain complete"
    );
    if outcome == Outcome::Graceful {
        driver.linger(deadline).await;
    }
    // The admin server goes last: /metrics and /ready answered until the end.
    admin.shutdown(CLOSE_GRACE).await;
    drop(signal_task);
    outcome
}

/// The part of `run` that reacts to events while time passes.
struct Driver<'a> {
    config: &'a Config,
    lifecycle: &'a DrainState,
    events: mpsc::Receiver<Event>,
    logs: LogReloader,
    /// A stop signal forces the exit (true once a signal started the drain).
    force_on_signal: bool,
}

impl Driver<'_> {
    fn reload(&self) {
        match self.logs.reload() {
            Ok(ReloadOutcome::Applied(filter)) => {
                tracing::info!(%filter, "SIGHUP: log filter reloaded")
            }
            Ok(ReloadOutcome::NothingToReload) => {
                tracing::info!("SIGHUP: nothing to reload (no --log-level-file)")
            }
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: reload failed; keeping the current log filter")
            }
        }
    }

    /// Waits for SIGTERM/SIGINT or `POST /drain`. Returns whether a signal
    /// started it (then the next signal forces the exit).
    async fn wait_for_drain_request(&mut self) -> bool {
        loop {
            match self.events.recv().await {
                Some(Event::Reload) => self.reload(),
                Some(Event::Stop(signal)) => {
                    tracing::info!(signal, "signal received; starting the drain");
                    return true;
                }
                Some(Event::DrainRequested) => {
                    tracing::info!("drain requested through the admin port");
                    return false;
                }
                // Every sender is owned by `run`; this cannot end first.
                None => return false,
            }
        }
    }

    /// Runs `work` to completion unless the deadline or a forcing signal comes first.
    async fn until<F: Future>(&mut self, work: F, deadline: Instant) -> Result<F::Output, Outcome> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Ok(output),
                () = sleep_until(deadline) => return Err(Outcome::Deadline),
                Some(event) = self.events.recv() => match event {
                    Event::Reload => self.reload(),
                    Event::DrainRequested => {}
                    Event::Stop(signal) if self.force_on_signal => {
                        tracing::warn!(signal, "second signal; forcing the exit");
                        return Err(Outcome::Signal);
                    }
                    Event::Stop(signal) => {
                        // The drain came from the admin port (a preStop hook); this
                        // is kubelet's SIGTERM after it, not an impatient operator.
                        tracing::info!(signal, "signal received while draining; the next one forces the exit");
                        self.force_on_signal = true;
                    }
                },
            }
        }
    }

    async fn drain(&mut self, deadline: Instant) -> Outcome {
        let lifecycle = self.lifecycle;
        lifecycle.begin_drain(self.config.drain_timeout);
        if let Err(outcome) = self.until(sleep(self.config.drain_delay), deadline).await {
            return self.force(outcome).await;
        }
        lifecycle.set_phase(Phase::Closing);
        lifecycle.tokens.stop_accepting.cancel();
        tracing::info!(
            connections_active = lifecycle.connections.active(),
            "lame-duck window over; waiting for connections to finish"
        );
        match self
            .until(lifecycle.connections.wait_all_closed(), deadline)
            .await
        {
            Ok(()) => Outcome::Graceful,
            Err(outcome) => self.force(outcome).await,
        }
    }

    async fn force(&self, outcome: Outcome) -> Outcome {
        let lifecycle = self.lifecycle;
        lifecycle.set_phase(Phase::Forcing);
        tracing::warn!(
            reason = outcome.as_str(),
            connections_active = lifecycle.connections.active(),
            "closing the remaining connections forcibly"
        );
        lifecycle.tokens.force.cancel();
        if timeout(FORCE_GRACE, lifecycle.connections.wait_all_closed())
            .await
            .is_err()
        {
            tracing::error!(
                connections_active = lifecycle.connections.active(),
                "connections still counted after the forced close"
            );
        }
        outcome
    }

    /// Keeps the admin server up so one more scrape sees the final figures;
    /// never past the deadline, and any stop signal ends it at once.
    async fn linger(&mut self, deadline: Instant) {
        let until = (Instant::now() + self.config.metrics_linger).min(deadline);
        if until <= Instant::now() {
            return;
        }
        tracing::info!(linger = ?until.duration_since(Instant::now()), "drained; lingering for a last metrics scrape");
        loop {
            tokio::select! {
                () = sleep_until(until) => return,
                Some(event) = self.events.recv() => match event {
                    Event::Reload => self.reload(),
                    Event::DrainRequested => {}
                    Event::Stop(signal) => {
                        tracing::info!(signal, "signal received while lingering; exiting");
                        return;
                    }
                },
            }
        }
    }
}

/// Watches whether the app accepts TCP connections: `starting → serving` on the
/// first success, and `/ready` fails while the app refuses.
async fn probe_upstream(upstream: Upstream, lifecycle: Arc<DrainState>, stop: CancellationToken) {
    loop {
        let up = tokio::select! {
            connected = upstream.connect_tcp() => connected.is_ok(),
            () = stop.cancelled() => return,
        };
        lifecycle.set_upstream_up(up);
        let pause = if up {
            PROBE_INTERVAL_UP
        } else {
            PROBE_INTERVAL_DOWN
        };
        tokio::select! {
            () = sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// A task that must not outlive its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
