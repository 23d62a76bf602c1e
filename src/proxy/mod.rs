//! The proxy listener: accepts connections, counts them (refusing those over
//! `--max-connections`), and hands each to its protocol's handler. Stops
//! accepting when the lame-duck window ends and closes the listener.
//!
//! Every connection task is spawned on the context's `TaskTracker`, which the
//! lifecycle owns and waits on.

pub mod body;
pub mod guard;
pub mod h1;
pub mod headers;
pub mod http;
pub mod io;
pub mod relay;
pub mod rules;
pub mod tcp;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::config::{Config, Mode};
use crate::drain::DrainState;
use crate::drain::{ConnectionGuard, accept_until_stopped};
use crate::observe::Observer;
use crate::telemetry::LogBudget;
use headers::RequestIds;
use upstream::Upstream;

/// Largest request head accepted; larger ones get 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Warnings about failed app requests logged per second, at most.
const UPSTREAM_FAILURE_LOGS_PER_SECOND: u32 = 10;

/// Everything a connection needs, shared by all of them.
pub struct ProxyContext {
    pub lifecycle: Arc<DrainState>,
    pub upstream: Upstream,
    pub config: Config,
    pub ids: RequestIds,
    /// Owns connection and tunnel tasks.
    pub tasks: TaskTracker,
    /// Failures of the app repeat per request; their warnings are capped.
    pub upstream_failure_log: LogBudget,
    /// Access log, trace sampling (and span export): see `crate::observe`.
    pub observer: Observer,
    /// TLS on the listener (--tls-cert): every connection's handshake.
    pub tls: Option<crate::tls::Handshaker>,
    http1: http1::Builder,
    http2: http2::Builder<TrackedExecutor>,
}

/// hyper's executor for HTTP/2 stream tasks: spawns them on a `TaskTracker`,
/// so they have an owner that waits for them instead of being detached.
#[derive(Clone)]
pub struct TrackedExecutor(pub TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

impl ProxyContext {
    pub fn new(
        config: Config,
        lifecycle: Arc<DrainState>,
        upstream: Upstream,
        tasks: TaskTracker,
    ) -> Self {
        let mut http1 = http1::Builder::new();
        // lameduck enforces the header-read timeout itself (see ConnActivity):
        // hyper's timer would also run while a keep-alive connection is idle.
        http1
            .header_read_timeout(None)
            .max_header_size(MAX_HEADER_BYTES)
            .writev(false)
            .timer(TokioTimer::new());
        let mut http2 = http2::Builder::new(TrackedExecutor(tasks.clone()));
        http2.timer(TokioTimer::new());
        let observer = Observer::off(config.trace_sample_ratio);
        ProxyContext {
            lifecycle,
            upstream,
            config,
            ids: RequestIds::new(),
            tasks,
            upstream_failure_log: LogBudget::new(UPSTREAM_FAILURE_LOGS_PER_SECOND),
            observer,
            tls: None,
            http1,
            http2,
        }
    }

    /// Terminates TLS on every connection with `handshaker`.
    pub fn with_tls(mut self, handshaker: Option<crate::tls::Handshaker>) -> Self {
        self.tls = handshaker;
        self
    }
}

impl ProxyContext {
    /// The observer the lifecycle built (its writer and exporter tasks run there).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = observer;
        self
    }
}

/// Accepts until the lame-duck window ends, then closes the listener.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    let stop = ctx.lifecycle.tokens.stop_accepting.clone();
    accept_until_stopped(listener, &stop, |stream, peer| {
        spawn_connection(&ctx, stream, peer)
    })
    .await;
    tracing::info!(
        connections_active = ctx.lifecycle.connections.active(),
        "listener closed"
    );
}

fn spawn_connection(ctx: &Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let Some(guard) =
        ConnectionGuard::try_open(&ctx.lifecycle, ctx.config.max_connections as usize)
    else {
        tracing::debug!(%peer, "connection refused: --max-connections reached");
        return;
    };
    let _ = stream.set_nodelay(true);
    if let Some(handshaker) = &ctx.tls {
        ctx.tasks.spawn(tls::serve_connection(
            stream,
            peer,
            guard,
            ctx.clone(),
            handshaker.clone(),
        ));
        return;
    }
    match ctx.config.mode {
        Mode::Http => ctx
            .tasks
            .spawn(http::serve_connection(stream, peer, guard, ctx.clone())),
        Mode::Tcp => ctx
            .tasks
            .spawn(tcp::serve_stream(stream, guard, ctx.clone())),
    };
}
