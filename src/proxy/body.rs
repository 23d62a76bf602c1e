//! The response body lameduck sends: the app's body streamed through, or a
//! short local one (errors). It carries the request's accounting and the
//! upstream connection, so both are settled exactly when the body ends: the
//! request stops being "in flight" and the connection goes back to the pool
//! only after the last byte, never before.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::guard::RequestGuard;
use super::upstream::PooledConn;
use crate::metrics::UpstreamErrorKind;

enum Kind {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

pub struct ProxyBody {
    kind: Kind,
    /// Returned to the pool when the upstream body ends cleanly; dropped
    /// (closing the connection) if the body is abandoned or fails.
    pooled: Option<PooledConn>,
    request: Option<RequestGuard>,
}

impl ProxyBody {
    pub fn upstream(body: Incoming, pooled: Option<PooledConn>, request: RequestGuard) -> Self {
        let mut this = ProxyBody {
            kind: Kind::Upstream(body),
            pooled,
            request: Some(request),
        };
        // hyper does not poll a body that is already known to be empty, so
        // settle now or the connection would never be reused.
        if this.is_end_stream() {
            this.finish();
        }
        this
    }

    pub fn local(text: &'static str, request: Option<RequestGuard>) -> Self {
        ProxyBody {
            kind: Kind::Local(Some(Bytes::from_static(text.as_bytes()))),
            pooled: None,
            request,
        }
    }

    fn finish(&mut self) {
        if let Some(conn) = self.pooled.take() {
            conn.release();
        }
        self.request.take();
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body dropped after its end was read still has a reusable
        // connection; one dropped half-way does not (`pooled` is just dropped).
        if self.pooled.is_some() && self.is_end_stream() {
            self.finish();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        match &polled {
            // hyper stops polling once `is_end_stream` is true (a body with a
            // Content-Length), so the last data frame is the end too.
            Poll::Ready(Some(Ok(_))) if this.is_end_stream() => this.finish(),
            // Trailers are the last frame, and hyper reads nothing after them.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.finish(),
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                // A body that failed half-way leaves the connection unusable.
                this.pooled.take();
                if let Some(request) = this.request.take() {
                    request.upstream_failed(UpstreamErrorKind::Closed);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Local(Some(data)) => SizeHint::with_exact(data.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
        }
    }
}
