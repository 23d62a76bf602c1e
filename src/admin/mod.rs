//! The admin server: /ready, /live, /metrics, /drain, /drained, /status.
//!
//! It runs on its own port, never on the proxy's (cleartext, or TLS with
//! --admin-tls-cert), and is the last thing to close. It only reads the
//! lifecycle's atomics; the one thing it can change (`POST /drain`) is a
//! message to the lifecycle, accepted from loopback only, because every pod
//! in the cluster can reach this port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::drain::{DrainState, Event, State, wait_for_zero};
use crate::tls::Handshaker;

/// Admin connections served at once; more are closed at accept.
const MAX_ADMIN_CONNECTIONS: usize = 512;
/// Admin connections one peer address may hold. Every pod can reach this
/// port, and the kubelet's probes and the app's preStop `GET /drained` come
/// from the node's address: no other peer may crowd them out. A waiting
/// `/drained` costs a connection and nothing else, so it needs no cap of
/// its own (a cap on waiters was a way to turn the kubelet's hook into an
/// immediate 503, and the app's SIGTERM into lost requests).
const MAX_ADMIN_CONNECTIONS_PER_PEER: usize = 16;
const DEFAULT_DRAINED_WAIT: Duration = Duration::from_secs(60);
const MAX_DRAINED_WAIT: Duration = Duration::from_secs(600);
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

struct AdminState {
    lifecycle: Arc<DrainState>,
    events: mpsc::Sender<Event>,
    /// Open connections that have asked `GET /drained`: the preStop hooks
    /// waiting on the drain. The admin server's shutdown waits for them to
    /// close first, so that lameduck exiting (and the container with it) never
    /// kills a hook that got its answer but has not exited yet (the kubelet
    /// would report `FailedPreStopHook`, exit 137).
    drained_clients: AtomicUsize,
    drained_clients_gone: Notify,
}

pub struct AdminServer {
    state: Arc<AdminState>,
    shutdown: CancellationToken,
    accept_loop: tokio::task::JoinHandle<()>,
    connections: TaskTracker,
}

impl AdminServer {
    pub fn start(
        listener: TcpListener,
        lifecycle: Arc<DrainState>,
        events: mpsc::Sender<Event>,
        tls: Option<Handshaker>,
    ) -> Self {
        let state = Arc::new(AdminState {
            lifecycle,
            events,
            drained_clients: AtomicUsize::new(0),
            drained_clients_gone: Notify::new(),
        });
        let shutdown = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept_loop = tokio::spawn(accept(
            listener,
            state.clone(),
            shutdown.clone(),
            connections.clone(),
            tls,
        ));
        AdminServer {
            state,
            shutdown,
            accept_loop,
            connections,
        }
    }

    /// Lets the `/drained` clients close their connections (bounded), then
    /// stops accepting and finishes the requests being answered, bounded.
    pub async fn shutdown(self, wait_at_most: Duration) {
        let state = &self.state;
        let hooks_gone = wait_for_zero(&state.drained_clients, &state.drained_clients_gone);
        if timeout(wait_at_most, hooks_gone).await.is_err() {
            tracing::debug!("a /drained client kept its connection open at exit");
        }
        self.shutdown.cancel();
        let _ = self.accept_loop.await;
        self.connections.close();
        if timeout(wait_at_most, self.connections.wait())
            .await
            .is_err()
        {
            tracing::debug!("admin connections still open at exit");
        }
    }
}

async fn accept(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    tls: Option<Handshaker>,
) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let peers = Arc::new(PeerSlots::default());
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(peer_slot) = peers.acquire(peer.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slots = (slot, peer_slot);
            // Boxed: admin traffic is a probe or a scrape at a time, and one
            // connection type keeps one hyper instantiation for both.
            let stream: Box<dyn Stream> = match tls {
                None => Box::new(stream),
                Some(handshaker) => {
                    let accepted = tokio::select! {
                        accepted = handshaker.accept(stream) => accepted,
                        () = shutdown.cancelled() => return,
                    };
                    match accepted {
                        Ok(stream) => Box::new(stream),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                            return;
                        }
                    }
                }
            };
            let hook = Arc::new(DrainedClient {
                state: state.clone(),
                marked: AtomicBool::new(false),
            });
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                if req.uri().path() == "/drained" && outlived(peer, req.uri().query()) {
                    hook.mark();
                }
                async move { Ok::<_, Infallible>(route(&state, peer, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// An admin connection: the socket, or a TLS session on it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// `GET /drained?hook=1` from loopback: a preStop hook in lameduck's own
/// container (`lameduck drain --wait`), which the kernel kills when
/// lameduck, the container's first process, exits. lameduck therefore waits
/// (bounded) for such a client to close its connection, at the hook's own
/// exit. Only loopback: a peer outside the pod has no process lameduck's
/// exit could kill, and must not be able to hold the exit up.
fn outlived(peer: SocketAddr, query: Option<&str>) -> bool {
    peer.ip().to_canonical().is_loopback()
        && query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .any(|pair| pair == "hook=1")
}

/// An admin connection that has asked `GET /drained?hook=1` (see
/// [`outlived`]): counted in `AdminState::drained_clients` from then until
/// it closes.
struct DrainedClient {
    state: Arc<AdminState>,
    marked: AtomicBool,
}

impl DrainedClient {
    fn mark(&self) {
        if !self.marked.swap(true, Ordering::AcqRel) {
            self.state.drained_clients.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for DrainedClient {
    fn drop(&mut self) {
        if self.marked.load(Ordering::Acquire)
            && self.state.drained_clients.fetch_sub(1, Ordering::AcqRel) == 1
        {
            self.state.drained_clients_gone.notify_waiters();
        }
    }
}

/// Admin connections per peer address. Touched once at accept and once at
/// close of an admin connection, never on the proxy's path and never across
/// an `.await`.
#[derive(Default)]
struct PeerSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerSlots {
    fn acquire(self: &Arc<Self>, peer: IpAddr) -> Option<PeerSlot> {
        let peer = peer.to_canonical();
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(peer).or_default();
        if *count >= MAX_ADMIN_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            slots: self.clone(),
            peer,
        })
    }
}

/// One admin connection of `peer`, released on drop.
struct PeerSlot {
    slots: Arc<PeerSlots>,
    peer: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

async fn route(
    state: &AdminState,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let lifecycle = &state.lifecycle;
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/ready" if read => match lifecycle.readiness() {
            Ok(()) => text(StatusCode::OK, "serving\n"),
            Err("starting") => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Err("draining") => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            Err("drained") => text(StatusCode::SERVICE_UNAVAILABLE, "drained\n"),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable\n"),
        },
        "/live" if read => text(StatusCode::OK, "alive\n"),
        "/metrics" if read => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok());
            let (content_type, body) = lifecycle.metrics.encode_for(accept);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        "/status" if read => json(StatusCode::OK, &Status::of(lifecycle)),
        "/drained" if read => {
            let mut response = drained(state, req.uri().query()).await;
            // Any other waiter's connection (the kubelet's httpGet hook for
            // the app, a person's curl) closes with the answer: nothing to
            // keep it for, and a kept-alive one only delays the admin
            // server's close.
            if !outlived(peer, req.uri().query()) {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        "/drain" if req.method() == Method::POST => {
            if !peer.ip().to_canonical().is_loopback() {
                return text(
                    StatusCode::FORBIDDEN,
                    "POST /drain is accepted from loopback only\n",
                );
            }
            match lifecycle.state() {
                State::Draining => text(StatusCode::ACCEPTED, "already draining\n"),
                State::Drained => text(StatusCode::OK, "already drained\n"),
                _ => {
                    // A full queue means a drain request is already waiting: fine.
                    let _ = state.events.try_send(Event::DrainRequested);
                    text(StatusCode::ACCEPTED, "draining\n")
                }
            }
        }
        "/drain" => method_not_allowed("POST"),
        "/ready" | "/live" | "/metrics" | "/status" | "/drained" => method_not_allowed("GET, HEAD"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready /live /metrics /status /drained, POST /drain\n",
        ),
    }
}

/// `GET /drained[?timeout=30s]`: answers once the drain has completed.
async fn drained(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let wait = match query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("timeout="))
    {
        Some(value) => match crate::config::parse_duration(value) {
            Ok(wait) => wait.min(MAX_DRAINED_WAIT),
            Err(e) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({ "error": format!("timeout: {e}") }),
                );
            }
        },
        None => DEFAULT_DRAINED_WAIT,
    };
    let mut drained = state.lifecycle.subscribe_drained();
    match timeout(wait, drained.wait_for(Option::is_some)).await {
        Ok(Ok(summary)) => json(StatusCode::OK, &*summary),
        _ => json(
            StatusCode::GATEWAY_TIMEOUT,
            &serde_json::json!({ "error": "not drained yet", "state": state.lifecycle.state().as_str() }),
        ),
    }
}

#[derive(Serialize)]
struct Status {
    state: &'static str,
    phase: &'static str,
    ready: bool,
    upstream_up: bool,
    connections_active: usize,
    requests_in_flight: i64,
    upgrades_active: i64,
    drain_started_unix_ms: Option<u64>,
    drain_deadline_unix_ms: Option<u64>,
    version: &'static str,
}

impl Status {
    fn of(lifecycle: &DrainState) -> Status {
        Status {
            state: lifecycle.state().as_str(),
            phase: lifecycle.phase().as_str(),
            ready: lifecycle.readiness().is_ok(),
            upstream_up: lifecycle.upstream_up(),
            connections_active: lifecycle.connections.active(),
            requests_in_flight: lifecycle.metrics.requests_in_flight.get(),
            upgrades_active: lifecycle.metrics.upgrades_active.get(),
            drain_started_unix_ms: lifecycle.drain_started_unix_ms(),
            drain_deadline_unix_ms: lifecycle.drain_deadline_unix_ms(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}
