//! One downstream HTTP connection: protocol sniffing, hyper's HTTP/1 or HTTP/2
//! server, the drain signals that apply to it, its timeouts, and the service
//! that forwards each request to the app.
//!
//! Drain semantics per connection kind:
//! - HTTP/2: GOAWAY when the window ends (two-phase, so every stream the
//!   client sent before seeing it is answered), not at its start. Measured
//!   behind HAProxy 2.6 (tests/e2e/rolling.rs): a GOAWAY while the load
//!   balancer still sends makes it reset the connection with a response in
//!   flight (`SD--`), or, on a connection it just opened, leaves it unable to
//!   send at all (503 after its retries hit the closed listener). By the end
//!   of the window the balancer has stopped choosing this replica; a direct
//!   client is served normally until then.
//! - HTTP/1: while draining every response carries `Connection: close`; idle
//!   keep-alive connections are closed only when the window ends (closing them
//!   earlier races with a client reusing one).
//! - Upgraded (WebSocket): hyper stops tracking them, so the tunnel keeps the
//!   connection's guard and ends at the deadline at the latest.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};
use tracing::Instrument;

use super::body::{ProxyBody, RequestBody};
use super::guard::{ConnActivity, GaugeGuard, RequestGuard, TimerVerdict};
use super::h1;
use super::h1::client::SendError;
use super::headers;
use super::io::{SendTimer, ServerIo, sniff};
use super::relay::{RelayEnd, Transferred, relay};
use super::rules;
use super::upstream::UpstreamError;
use super::{ProxyContext, TrackedExecutor};
use crate::drain::ConnectionGuard;
use crate::metrics::{Protocol, TimeoutKind};
use crate::observe::Record;
use crate::observe::access_log::{End, Entry};

pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    mut guard: ConnectionGuard,
    ctx: Arc<ProxyContext>,
) {
    let activity = Arc::new(ConnActivity::new());
    let send_timer = SendTimer::new(
        ctx.config.send_timeout,
        ctx.lifecycle.metrics.timeout_counter(TimeoutKind::Send),
    );
    let tokens = &ctx.lifecycle.tokens;
    let sniffed = tokio::select! {
        sniffed = timeout(ctx.config.header_read_timeout, sniff(stream, activity.clone(), send_timer)) => sniffed,
        // A connection that has not sent a byte yet is idle: close it with the listener.
        () = tokens.stop_accepting.cancelled() => return,
    };
    let (protocol, mut io) = match sniffed {
        Ok(Ok(Some(sniffed))) => sniffed,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed before its first request");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no request within the header-read timeout");
            ctx.lifecycle.metrics.timed_out(TimeoutKind::HeaderRead);
            return;
        }
    };
    guard.set_protocol(protocol);
    let guard = Arc::new(guard);
    let shared = Arc::new(ConnShared {
        ctx: ctx.clone(),
        peer_value: headers::peer_value(peer.ip()),
        guard: guard.clone(),
        activity: activity.clone(),
        downstream_h2: protocol == Protocol::Http2,
        tls: None,
    });
    if protocol == Protocol::Http1 && !ctx.upstream.is_http2() {
        // lameduck's own HTTP/1 path; hyper takes over what it does not handle.
        // A sniffed connection is a socket, so the parts are always there.
        let Some((stream, sniffed, send_timer)) = io.into_parts() else {
            return;
        };
        let served = tokio::select! {
            handoff = h1::Connection::new(&shared, stream, sniffed, send_timer).serve() => handoff,
            () = tokens.force.cancelled() => {
                guard.mark_forced();
                return;
            }
        };
        let Some(handoff) = served else { return };
        tracing::debug!(reason = handoff.reason, "connection continues on hyper");
        io = ServerIo::new(
            handoff.stream,
            handoff.buffered,
            activity.clone(),
            protocol,
            handoff.send_timer,
        );
    }
    let service = ProxyService(shared);
    // Boxed: the task of every connection is as large as its largest state,
    // and most connections never get here (see h1).
    Box::pin(serve_with_hyper(
        ctx, io, service, guard, activity, protocol,
    ))
    .await;
}

/// A connection lameduck terminated TLS for (`proxy::tls`, handshake done,
/// counted since accept): ALPN chose the protocol, and hyper serves both
/// (lameduck's own HTTP/1 path works on plain sockets only).
pub async fn serve_tls_connection(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    first: Vec<u8>,
    peer: SocketAddr,
    mut guard: ConnectionGuard,
    ctx: Arc<ProxyContext>,
    tls: TlsFacts,
) {
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    guard.set_protocol(protocol);
    let guard = Arc::new(guard);
    let activity = Arc::new(ConnActivity::new());
    let send_timer = SendTimer::new(
        ctx.config.send_timeout,
        ctx.lifecycle.metrics.timeout_counter(TimeoutKind::Send),
    );
    let io = ServerIo::new(
        super::io::Downstream::Tls(Box::new(stream)),
        first,
        activity.clone(),
        protocol,
        send_timer,
    );
    let service = ProxyService(Arc::new(ConnShared {
        ctx: ctx.clone(),
        peer_value: headers::peer_value(peer.ip()),
        guard: guard.clone(),
        activity: activity.clone(),
        downstream_h2: protocol == Protocol::Http2,
        tls: Some(tls),
    }));
    Box::pin(serve_with_hyper(
        ctx, io, service, guard, activity, protocol,
    ))
    .await;
}

/// What a TLS connection tells every request on it.
pub struct TlsFacts {
    /// The verified client certificate as `x-forwarded-client-cert`.
    pub client_cert: Option<HeaderValue>,
}

async fn serve_with_hyper(
    ctx: Arc<ProxyContext>,
    io: ServerIo,
    service: ProxyService,
    guard: Arc<ConnectionGuard>,
    activity: Arc<ConnActivity>,
    protocol: Protocol,
) {
    let tokens = &ctx.lifecycle.tokens;
    let io = TokioIo::new(io);
    // Busy HTTP/1 connections close through `Connection: close` during the
    // window; HTTP/2 ones and idle HTTP/1 ones get their graceful shutdown
    // (GOAWAY / close) when the window ends (module docs: why not at t0).
    let shutdown = tokens.stop_accepting.cancelled();
    match protocol {
        Protocol::Http2 => {
            let conn = ctx.http2.serve_connection(io, service);
            drive(conn, &ctx, &guard, &activity, false, shutdown).await;
        }
        _ => {
            let conn = ctx.http1.serve_connection(io, service).with_upgrades();
            drive(conn, &ctx, &guard, &activity, true, shutdown).await;
        }
    }
}

/// Runs a connection to its end: graceful shutdown once `shutdown` resolves,
/// dropped on `force`, and cut by its own header-read and idle timers.
async fn drive<C>(
    conn: C,
    ctx: &ProxyContext,
    guard: &ConnectionGuard,
    activity: &ConnActivity,
    track_heads: bool,
    shutdown: impl Future<Output = ()>,
) where
    C: Graceful,
{
    let mut shutdown = std::pin::pin!(shutdown);
    let (header_timeout, idle_timeout) = (ctx.config.header_read_timeout, ctx.config.idle_timeout);
    let mut conn = std::pin::pin!(conn);
    let timer = sleep(header_timeout.min(idle_timeout));
    let mut timer = std::pin::pin!(timer);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            // The connection first: on a connection that arrives with the
            // shutdown already due, hyper must read the request it was
            // handed before it is told to close as idle (hyperium/hyper#3792).
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut shutdown, if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            () = ctx.lifecycle.tokens.force.cancelled() => {
                guard.mark_forced();
                return;
            }
            () = &mut timer => {
                match activity.verdict(header_timeout, idle_timeout, track_heads) {
                    TimerVerdict::HeadTimedOut => {
                        tracing::debug!("request head not received within the header-read timeout");
                        ctx.lifecycle.metrics.timed_out(TimeoutKind::HeaderRead);
                        return;
                    }
                    TimerVerdict::Idle => {
                        if !shutting_down {
                            ctx.lifecycle.metrics.timed_out(TimeoutKind::Idle);
                            conn.as_mut().graceful_shutdown();
                            shutting_down = true;
                        }
                        timer.as_mut().reset(Instant::now() + header_timeout);
                    }
                    TimerVerdict::CheckAgainIn(after) => timer.as_mut().reset(Instant::now() + after),
                }
            }
        }
    }
}

/// A hyper server connection that can be asked to finish gracefully.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl Graceful
    for hyper::server::conn::http1::UpgradeableConnection<TokioIo<ServerIo>, ProxyService>
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl Graceful
    for hyper::server::conn::http2::Connection<TokioIo<ServerIo>, ProxyService, TrackedExecutor>
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

/// What every request on one connection shares.
pub struct ConnShared {
    pub ctx: Arc<ProxyContext>,
    /// The peer's IP as a header value, for `x-forwarded-for`.
    pub peer_value: HeaderValue,
    guard: Arc<ConnectionGuard>,
    pub activity: Arc<ConnActivity>,
    downstream_h2: bool,
    /// Set when the connection is TLS terminated by lameduck.
    tls: Option<TlsFacts>,
}

#[derive(Clone)]
struct ProxyService(Arc<ConnShared>);

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move { Ok(shared.handle(req).await) })
    }
}

impl ConnShared {
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let mut request = RequestGuard::start(self.ctx.lifecycle.clone(), self.activity.clone());
        let request_id = headers::ensure_request_id(req.headers_mut(), &self.ctx.ids);
        let observer = &self.ctx.observer;
        let trace = headers::continue_trace(req.headers_mut(), &observer.sampler);
        if observer.wants(Some(&trace)) {
            let protocol = if self.downstream_h2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            };
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut entry = Entry::for_request(
                request_id.as_bytes(),
                req.method().as_str(),
                target,
                observer.with_query(),
                protocol,
                request.phase(),
            );
            entry.trace = Some(trace);
            // Counted as it is read (Content-Length or not); unknown until
            // then, unless there is no body at all.
            entry.request_bytes = hyper::body::Body::is_end_stream(req.body()).then_some(0);
            if req.version() < http::Version::HTTP_11 {
                entry.protocol = "HTTP/1.0";
            }
            request.observe(observer.record(entry));
        }
        let span = tracing::debug_span!("request", id = ?request_id, trace_id = %trace, method = %req.method(), path = %req.uri().path());
        self.forward(req, request, request_id)
            .instrument(span)
            .await
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        request: RequestGuard,
        request_id: HeaderValue,
    ) -> Response<ProxyBody> {
        let ctx = &self.ctx;
        {
            let target = rules::Target {
                http11: req.version() == http::Version::HTTP_11,
                authority: req.uri().authority().map(|a| a.as_str().as_bytes()),
            };
            let lines = req
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
            if let Err(why) = rules::check_request(target, lines) {
                tracing::debug!(reason = why, "request refused");
                let mut request = request;
                request.set_end(End::Refused);
                let response = self.local_response(
                    StatusCode::BAD_REQUEST,
                    "bad request\n",
                    request,
                    request_id,
                );
                // Where this request's body ends is what is in doubt.
                return self.closing(response);
            }
            let upgrade = if headers::is_upgrade_request(&req) {
                req.headers().get(header::UPGRADE).cloned()
            } else {
                None
            };
            let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
            let upstream = &ctx.upstream;
            headers::strip_hop_by_hop(req.headers_mut(), upstream.is_http2());
            if let Some(protocol) = upgrade {
                req.headers_mut().insert(header::UPGRADE, protocol);
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            if let Some(tls) = &self.tls {
                headers::add_tls_facts(req.headers_mut(), tls.client_cert.as_ref());
            }
            headers::add_forwarded(req.headers_mut(), &self.peer_value);
            if headers::set_upstream_target(&mut req, upstream.is_http2(), upstream.authority())
                .is_err()
            {
                return self.local_response(
                    StatusCode::BAD_REQUEST,
                    "invalid request target\n",
                    request,
                    request_id,
                );
            }
            let limit = ctx.config.upstream_timeout;
            let mut request = request;
            if upstream.is_http2() || client_upgrade.is_some() {
                // A bodiless request (every upgrade, most h2 ones) costs no counter.
                let counted = if hyper::body::Body::is_end_stream(req.body()) {
                    None
                } else {
                    request.count_streamed_body()
                };
                let req = req.map(|body| RequestBody::new(body, counted));
                let sent = if upstream.is_http2() {
                    timeout(limit, upstream.send_http2(req)).await
                } else {
                    timeout(limit, upstream.send_upgrade(req)).await
                };
                let mut response = match sent.unwrap_or(Err(UpstreamError::Timeout(limit))) {
                    Ok(response) => response,
                    Err(error) => return self.upstream_error(error, request, request_id),
                };
                request.upstream_answered();
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_upgrade) = client_upgrade
                {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    request.set_status(101);
                    // The request ends with its 101; its access-log line
                    // waits for the tunnel's end, so it can tell the
                    // tunnel's bytes, duration and how it ended.
                    let observed = request.take_record();
                    ctx.tasks.spawn(tunnel(
                        client_upgrade,
                        upstream_upgrade,
                        self.guard.clone(),
                        ctx.clone(),
                        observed,
                    ));
                    response
                        .headers_mut()
                        .insert(headers::X_REQUEST_ID.clone(), request_id);
                    return response.map(|body| ProxyBody::hyper(body, request));
                }
                return self.proxied(response, request, request_id, ProxyBody::hyper);
            }
            let body_timeout = ctx.config.body_read_timeout;
            let sent = timeout(
                limit,
                h1::client::send(upstream, req, body_timeout, &mut request),
            )
            .await;
            match sent.unwrap_or(Err(UpstreamError::Timeout(limit).into())) {
                Ok(response) => {
                    request.upstream_answered();
                    self.proxied(response, request, request_id, ProxyBody::app)
                }
                Err(SendError::Upstream(error)) => self.upstream_error(error, request, request_id),
                Err(SendError::BodyTimedOut) => {
                    tracing::debug!("request body paused past --body-read-timeout");
                    ctx.lifecycle.metrics.timed_out(TimeoutKind::BodyRead);
                    request.set_end(End::ClientTimeout);
                    let response = self.local_response(
                        StatusCode::REQUEST_TIMEOUT,
                        "request body timed out\n",
                        request,
                        request_id,
                    );
                    self.closing(response)
                }
                Err(SendError::BadRequestBody(error)) => {
                    tracing::debug!(%error, "invalid request body");
                    request.set_end(End::Refused);
                    let response = self.local_response(
                        StatusCode::BAD_REQUEST,
                        "invalid request body\n",
                        request,
                        request_id,
                    );
                    self.closing(response)
                }
            }
        }
    }

    /// The app's response as the client gets it, whichever client produced it.
    fn proxied<B>(
        &self,
        mut response: Response<B>,
        mut request: RequestGuard,
        request_id: HeaderValue,
        body: impl FnOnce(B, RequestGuard) -> ProxyBody,
    ) -> Response<ProxyBody> {
        headers::strip_hop_by_hop(response.headers_mut(), false);
        self.finish_headers(response.headers_mut(), request_id);
        request.set_status(response.status().as_u16());
        response.map(|b| body(b, request))
    }

    /// `x-request-id` on every response; `Connection: close` on HTTP/1 ones
    /// while draining, so keep-alive clients move to another replica.
    fn finish_headers(&self, headers: &mut http::HeaderMap, request_id: HeaderValue) {
        headers.insert(headers::X_REQUEST_ID.clone(), request_id);
        if !self.downstream_h2 && self.ctx.lifecycle.is_draining() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// Asks an HTTP/1 client to close after this response (HTTP/2 streams
    /// end on their own).
    fn closing(&self, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
        if !self.downstream_h2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    fn upstream_error(
        &self,
        error: UpstreamError,
        mut request: RequestGuard,
        request_id: HeaderValue,
    ) -> Response<ProxyBody> {
        self.upstream_failed(&error, &mut request, &request_id);
        self.local_response(error.status(), error.client_message(), request, request_id)
    }

    /// Logs and counts a failed exchange with the app (both HTTP paths).
    pub fn upstream_failed(
        &self,
        error: &UpstreamError,
        request: &mut RequestGuard,
        request_id: &dyn std::fmt::Debug,
    ) {
        if let Some(left_out) = self.ctx.upstream_failure_log.admit() {
            tracing::warn!(request_id = ?request_id, error = %error, left_out, "upstream request failed");
        }
        request.upstream_failed(error.kind());
        if matches!(error, UpstreamError::Connect { .. }) {
            // Passive health: readiness fails now, the probe restores it.
            self.ctx.lifecycle.set_upstream_up(false);
        }
    }

    fn local_response(
        &self,
        status: StatusCode,
        text: &'static str,
        mut request: RequestGuard,
        request_id: HeaderValue,
    ) -> Response<ProxyBody> {
        request.set_status(status.as_u16());
        let mut response = Response::new(ProxyBody::local(text, Some(request)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        self.finish_headers(response.headers_mut(), request_id);
        response
    }
}

/// Copies bytes both ways between an upgraded client and app connection until
/// either side closes, or the deadline forces it. Holds the connection's guard,
/// so the connection counts as open (and the drain waits) until it ends.
/// `observed`: the upgrade request's record and start, finished here as the
/// tunnel's access-log line (status 101, bytes each way over the tunnel's
/// life, duration from the request head to the tunnel's end).
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    conn: Arc<ConnectionGuard>,
    ctx: Arc<ProxyContext>,
    observed: Option<(Record, std::time::Instant)>,
) {
    let finish = |end: End, bytes: Option<&Transferred>| {
        let Some((mut record, started)) = observed else {
            return;
        };
        let entry = &mut record.entry;
        entry.status = 101;
        if let Some(bytes) = bytes {
            entry.request_bytes = Some(bytes.from_a.load(Ordering::Relaxed));
            entry.response_bytes = bytes.from_b.load(Ordering::Relaxed);
        }
        entry.duration = started.elapsed();
        record.finish(end);
    };
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            let end = if client.is_err() {
                End::ClientAborted
            } else {
                End::Upstream("closed")
            };
            tracing::debug!(client = ?client.err(), upstream = ?upstream.err(), "upgrade failed");
            finish(end, None);
            return;
        }
    };
    let _open = GaugeGuard::new(&ctx.lifecycle.metrics.upgrades_active);
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let idle_timeout = ctx.config.tunnel_idle_timeout;
    let bytes = Transferred::default();
    let end = tokio::select! {
        ended = relay(&mut client, &mut upstream, idle_timeout, &bytes) => {
            let end = match &ended {
                RelayEnd::Finished => End::Ok,
                RelayEnd::Idle => End::IdleTimeout,
                RelayEnd::Failed(_) if bytes.a_failed.load(Ordering::Relaxed) => End::ClientAborted,
                RelayEnd::Failed(_) => End::Aborted,
            };
            ended.log("tunnel");
            end
        }
        () = ctx.lifecycle.tokens.force.cancelled() => {
            conn.mark_forced();
            End::Forced
        }
    };
    finish(end, Some(&bytes));
}
