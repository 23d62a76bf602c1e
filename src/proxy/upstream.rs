//! Connections to the app: a small pool of HTTP/1 connections (LIFO, so the
//! most recently used, least likely timed-out connection goes first) or one
//! shared, multiplexed HTTP/2 connection.
//!
//! Owns every upstream connection task (a `TaskTracker`); `close` ends them,
//! and the lifecycle calls it only after the downstream connections are gone.
//! No lock here is held across an `.await`.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::RequestBody;
use crate::config::{Config, UpstreamProtocol};
use crate::metrics::UpstreamErrorKind;

/// Idle HTTP/1 connections kept for reuse; more are closed when released.
const MAX_IDLE_HTTP1: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to the upstream {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("the upstream sent no response headers within {0:?}")]
    Timeout(Duration),
    #[error("the upstream closed the connection: {0}")]
    Closed(BoxError),
    #[error("the upstream sent an invalid response: {0}")]
    Protocol(BoxError),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl UpstreamError {
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            UpstreamError::Connect { .. } => UpstreamErrorKind::Connect,
            UpstreamError::ConnectTimeout { .. } => UpstreamErrorKind::ConnectTimeout,
            UpstreamError::Timeout(_) => UpstreamErrorKind::Timeout,
            UpstreamError::Closed(_) => UpstreamErrorKind::Closed,
            UpstreamError::Protocol(_) => UpstreamErrorKind::Protocol,
        }
    }

    /// 504 when the app was too slow, 502 when it failed.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The short body the client gets (no internal detail beyond the cause).
    pub fn client_message(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "upstream refused the connection\n",
            UpstreamError::ConnectTimeout { .. } => "upstream connect timed out\n",
            UpstreamError::Timeout(_) => "upstream response timed out\n",
            UpstreamError::Closed(_) => "upstream closed the connection\n",
            UpstreamError::Protocol(_) => "upstream sent an invalid response\n",
        }
    }

    fn from_hyper(error: hyper::Error) -> Self {
        if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
            UpstreamError::Protocol(error.into())
        } else {
            UpstreamError::Closed(error.into())
        }
    }
}

struct Inner {
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    /// Idle HTTP/1 connections (`proxy::h1`): plain sockets, no task and no
    /// buffer while idle.
    idle_streams: Mutex<Vec<TcpStream>>,
    shared_http2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    tasks: TaskTracker,
    closing: CancellationToken,
}

impl Inner {
    fn idle_streams(&self) -> MutexGuard<'_, Vec<TcpStream>> {
        // A panic while holding this lock leaves a Vec of sockets, still valid.
        self.idle_streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shared(&self) -> MutexGuard<'_, Option<http2::SendRequest<RequestBody>>> {
        self.shared_http2.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// App connections for one HTTP/1 request: a pooled one first, else a new
/// one. A pooled connection may have been closed by the app a moment ago, so
/// a replayable request (safe to send twice, RFC 9110 §9.2.2) that fails on
/// one before the app answered gets one more try, on a new connection.
pub struct Attempts<'a> {
    upstream: &'a Upstream,
    replayable: bool,
    last_was_pooled: bool,
    retried: bool,
}

impl<'a> Attempts<'a> {
    pub fn new(upstream: &'a Upstream, replayable: bool) -> Self {
        Attempts {
            upstream,
            replayable,
            last_was_pooled: false,
            retried: false,
        }
    }

    pub async fn connection(&mut self) -> Result<TcpStream, UpstreamError> {
        let pooled = if self.retried {
            None
        } else {
            self.upstream.checkout_stream()
        };
        self.last_was_pooled = pooled.is_some();
        match pooled {
            Some(stream) => Ok(stream),
            None => self.upstream.connect_tcp().await,
        }
    }

    /// The connection last handed out came from the pool.
    pub fn reused(&self) -> bool {
        self.last_was_pooled
    }

    /// This is the second try, on a new connection.
    pub fn retried(&self) -> bool {
        self.retried
    }

    /// The last connection failed before the app answered: whether to try
    /// again (on a new connection).
    pub fn retry(&mut self) -> bool {
        let retry = self.last_was_pooled && self.replayable && !self.retried;
        self.retried |= retry;
        retry
    }
}

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
    authority: Authority,
}

impl Upstream {
    pub fn new(config: &Config) -> Self {
        let authority = Authority::try_from(config.upstream.to_string())
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        Upstream {
            inner: Arc::new(Inner {
                addr: config.upstream,
                protocol: config.upstream_protocol,
                connect_timeout: config.upstream_connect_timeout,
                idle_streams: Mutex::new(Vec::new()),
                shared_http2: Mutex::new(None),
                tasks: TaskTracker::new(),
                closing: CancellationToken::new(),
            }),
            authority,
        }
    }

    /// Used as `Host`/`:authority` when the client sent none.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn is_http2(&self) -> bool {
        self.inner.protocol == UpstreamProtocol::Http2
    }

    /// Opens a TCP connection to the app (also the readiness probe).
    pub async fn connect_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let addr = self.inner.addr;
        let after = self.inner.connect_timeout;
        let stream = timeout(after, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { addr, after })?
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        // Small proxied writes must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// An idle HTTP/1 connection for `proxy::h1`, most recently used first.
    /// Ones the app has closed (or sent unsolicited bytes on) are dropped.
    pub fn checkout_stream(&self) -> Option<TcpStream> {
        loop {
            let stream = self.inner.idle_streams().pop()?;
            // Usually no syscall: tokio answers from the readiness it already
            // has, and a socket with nothing new to read has none.
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(stream),
                _ => continue,
            }
        }
    }

    /// Puts a connection whose last response was read to the end back.
    pub fn release_stream(&self, stream: TcpStream) {
        if self.inner.closing.is_cancelled() {
            return;
        }
        let mut idle = self.inner.idle_streams();
        if idle.len() < MAX_IDLE_HTTP1 {
            idle.push(stream);
        }
    }

    /// Sends a protocol-upgrade request (WebSocket) over a new HTTP/1
    /// connection driven by hyper, which hands over the upgraded stream. The
    /// connection is never pooled: after a 101 it belongs to the tunnel.
    pub async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let mut sender = self.connect_http1().await?;
        sender
            .send_request(req)
            .await
            .map_err(UpstreamError::from_hyper)
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let stream = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::from_hyper)?;
        let closing = self.inner.closing.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                result = conn.with_upgrades() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "upstream connection ended");
                    }
                }
                () = closing.cancelled() => {}
            }
        });
        Ok(sender)
    }

    pub async fn send_http2(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let mut sender = self.shared_http2().await?;
        match sender.try_send_request(req).await {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
                // The shared connection went away before the request left: one
                // retry on a fresh connection.
                Some(unsent) => {
                    self.inner.shared().take();
                    let mut sender = self.shared_http2().await?;
                    sender
                        .try_send_request(unsent)
                        .await
                        .map_err(|e| UpstreamError::from_hyper(e.into_error()))
                }
                None => Err(UpstreamError::from_hyper(e.into_error())),
            },
        }
    }

    async fn shared_http2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        if let Some(sender) = self.inner.shared().as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let stream = self.connect_tcp().await?;
        let addr = self.inner.addr;
        let after = self.inner.connect_timeout;
        let (sender, conn) = timeout(
            after,
            http2::Builder::new(super::TrackedExecutor(self.inner.tasks.clone()))
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(stream)),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr, after })?
        .map_err(UpstreamError::from_hyper)?;
        let closing = self.inner.closing.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "upstream h2 connection ended");
                    }
                }
                () = closing.cancelled() => {}
            }
        });
        *self.inner.shared() = Some(sender.clone());
        Ok(sender)
    }

    /// Closes every upstream connection and waits (bounded) for their tasks.
    pub async fn close(&self, wait_at_most: Duration) {
        self.inner.closing.cancel();
        self.inner.idle_streams().clear();
        self.inner.shared().take();
        self.inner.tasks.close();
        if timeout(wait_at_most, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("upstream connections did not close in time");
        }
    }
}
