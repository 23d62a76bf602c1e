//! The webhook's HTTPS listener: `POST /mutate` answers AdmissionReviews.
//!
//! It drains like the proxy: connections are counted from accept
//! (`ConnectionGuard`), HTTP/1 answers carry `Connection: close` from the
//! first instant of the drain, every connection gets its graceful shutdown
//! (GOAWAY for the apiserver's HTTP/2) when the lame-duck window ends, and
//! what is left is dropped at the deadline. Every task is owned by the
//! lifecycle's `TaskTracker`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::task::TaskTracker;

use super::review::{ReviewError, review};
use super::{Injector, WebhookMetrics};
use crate::drain::{ConnectionGuard, DrainState, accept_until_stopped};
use crate::metrics::Protocol;
use crate::proxy::TrackedExecutor;
use crate::proxy::guard::{ConnActivity, RequestGuard};

/// An AdmissionReview carries the whole Pod; the apiserver's own limit on a
/// request body is 3 MiB, so anything larger is not a review.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// The apiserver gives up on a webhook after its `timeoutSeconds` (≤ 30 s);
/// a client that takes longer than this to send a review is not one.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What every webhook connection shares.
pub struct WebhookContext {
    pub lifecycle: Arc<DrainState>,
    pub injector: Arc<Injector>,
    pub tasks: TaskTracker,
    pub max_connections: usize,
}

/// Accepts until the lame-duck window ends, then closes the listener.
pub async fn serve(listener: TcpListener, ctx: Arc<WebhookContext>) {
    let stop = ctx.lifecycle.tokens.stop_accepting.clone();
    accept_until_stopped(listener, &stop, |stream, peer| {
        spawn_connection(&ctx, stream, peer)
    })
    .await;
    tracing::info!(
        connections_active = ctx.lifecycle.connections.active(),
        "webhook listener closed"
    );
}

fn spawn_connection(ctx: &Arc<WebhookContext>, stream: TcpStream, peer: SocketAddr) {
    let Some(guard) = ConnectionGuard::try_open(&ctx.lifecycle, ctx.max_connections) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    ctx.tasks
        .spawn(serve_connection(stream, peer, guard, ctx.clone()));
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    mut guard: ConnectionGuard,
    ctx: Arc<WebhookContext>,
) {
    let tokens = &ctx.lifecycle.tokens;
    // Bounded and counted by the handshaker (`lameduck_tls_*{listener="webhook"}`).
    let tls = tokio::select! {
        tls = ctx.injector.handshaker().accept(stream) => tls,
        () = tokens.stop_accepting.cancelled() => return,
    };
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    guard.set_protocol(if h2 { Protocol::Http2 } else { Protocol::Http1 });
    let service = {
        let ctx = ctx.clone();
        service_fn(move |request| handle(ctx.clone(), request))
    };
    let mut builder = auto::Builder::new(TrackedExecutor(ctx.tasks.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
                }
                return;
            }
            () = tokens.stop_accepting.cancelled(), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            () = tokens.force.cancelled() => {
                guard.mark_forced();
                return;
            }
        }
    }
}

async fn handle(
    ctx: Arc<WebhookContext>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Counted like a proxied request: in flight, by status, during the drain.
    let mut guard = RequestGuard::start(ctx.lifecycle.clone(), Arc::new(ConnActivity::new()));
    let mut response = match (request.method(), request.uri().path()) {
        (&Method::POST, "/mutate") => mutate(&ctx, request).await,
        (_, "/mutate") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(StatusCode::NOT_FOUND, "the webhook answers POST /mutate\n"),
    };
    if ctx.lifecycle.is_draining() {
        // HTTP/1 clients move to another replica at once; hyper leaves the
        // header out of HTTP/2 answers (the GOAWAY does that job).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    guard.set_status(response.status().as_u16());
    Ok(response)
}

async fn mutate(ctx: &WebhookContext, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let metrics: &WebhookMetrics = &ctx.injector.metrics;
    let body = Limited::new(request.into_body(), MAX_REVIEW_BYTES);
    let body = match timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) => {
            metrics.reviewed("invalid", started.elapsed());
            return text(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the AdmissionReview: {e}\n"),
            );
        }
        Err(_) => {
            metrics.reviewed("invalid", started.elapsed());
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the AdmissionReview took too long to arrive\n",
            );
        }
    };
    // The whole review, for debugging a webhook (off unless asked for: it
    // holds the pod's spec).
    tracing::trace!(review = %String::from_utf8_lossy(&body), "admission review received");
    let settings = ctx.injector.settings();
    match review(&body, &settings) {
        Ok(reviewed) => {
            let outcome = reviewed.outcome.as_ref().map_or("ignored", |o| o.as_str());
            metrics.reviewed(outcome, started.elapsed());
            tracing::info!(
                namespace = %reviewed.namespace,
                pod = %reviewed.pod,
                outcome,
                reason = reviewed.outcome.as_ref().and_then(|o| match o {
                    super::Outcome::Skipped(reason) => Some(reason.as_str()),
                    _ => None,
                }),
                took_us = started.elapsed().as_micros() as u64,
                "admission review"
            );
            match serde_json::to_vec(&reviewed.response) {
                Ok(json) => {
                    let mut response = Response::new(Full::new(Bytes::from(json)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot encode the answer: {e}\n"),
                ),
            }
        }
        Err(e) => {
            metrics.reviewed("invalid", started.elapsed());
            tracing::warn!(error = %e, "malformed admission review");
            let status = match e {
                ReviewError::Patch(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            text(status, &format!("{e}\n"))
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
