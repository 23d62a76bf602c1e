//! The bodies on hyper's path. [`ProxyBody`] is the response body hyper's
//! server sends: the app's body streamed through, or a short local one
//! (errors). It carries the request's accounting, so the request stops being
//! "in flight" exactly when the body ends (or is dropped). The app connection
//! itself is settled by the inner body: an HTTP/1 one goes back to the pool
//! after its last byte (`h1::client::AppBody`). [`RequestBody`] is the
//! client's body on its way to the app through hyper's client (an HTTP/2
//! app, an upgrade), counting its bytes for the access log as they stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::guard::RequestGuard;
use super::h1::client::AppBody;
use super::upstream::BoxError;
use crate::metrics::UpstreamErrorKind;

enum Kind {
    /// From an HTTP/1 app, read by lameduck.
    App(AppBody),
    /// From an HTTP/2 app, or a non-upgraded answer to an upgrade request (hyper's client).
    Hyper(Incoming),
    Local(Option<Bytes>),
}

pub struct ProxyBody {
    kind: Kind,
    request: Option<RequestGuard>,
}

impl ProxyBody {
    pub fn app(body: AppBody, request: RequestGuard) -> Self {
        Self::settled_if_empty(Kind::App(body), request)
    }

    pub fn hyper(body: Incoming, request: RequestGuard) -> Self {
        Self::settled_if_empty(Kind::Hyper(body), request)
    }

    fn settled_if_empty(kind: Kind, request: RequestGuard) -> Self {
        let mut this = ProxyBody {
            kind,
            request: Some(request),
        };
        // hyper does not poll a body that is already known to be empty.
        if this.is_end_stream() {
            this.settle();
        }
        this
    }

    pub fn local(text: &'static str, request: Option<RequestGuard>) -> Self {
        ProxyBody {
            kind: Kind::Local(Some(Bytes::from_static(text.as_bytes()))),
            request,
        }
    }
}

impl ProxyBody {
    /// The body has been sent whole: the request ends here.
    fn settle(&mut self) {
        if let Some(request) = self.request.take() {
            request.complete();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::App(body) => Pin::new(body).poll_frame(cx),
            Kind::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(request)) = (&polled, &mut this.request)
            && let Some(data) = frame.data_ref()
        {
            request.add_response_bytes(data.len());
        }
        match &polled {
            // hyper stops polling once `is_end_stream` is true (a body with a
            // Content-Length), and after trailers: either is the end too.
            Poll::Ready(Some(Ok(frame))) if this.is_end_stream() || frame.is_trailers() => {
                this.settle();
            }
            Poll::Ready(None) => this.settle(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut request) = this.request.take() {
                    request.upstream_failed(UpstreamErrorKind::Closed);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::App(body) => body.is_end_stream(),
            Kind::Hyper(body) => body.is_end_stream(),
            Kind::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::App(body) => body.size_hint(),
            Kind::Hyper(body) => body.size_hint(),
            Kind::Local(Some(data)) => SizeHint::with_exact(data.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
        }
    }
}

// === impl RequestBody ===

/// The data bytes of a request body read so far, shared between the body
/// (moved into hyper's client, polled on its connection task) and the
/// request's guard, which reads it when the request ends. One writer: the
/// body.
#[derive(Debug)]
pub struct StreamedBytes(AtomicU64);

/// Nothing read yet: the body's size is still unknown.
const NOTHING_READ: u64 = u64::MAX;

impl StreamedBytes {
    pub fn new() -> Self {
        StreamedBytes(AtomicU64::new(NOTHING_READ))
    }

    /// The bytes read, `None` while nothing of the body was read (not even
    /// its end).
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|&n| n != NOTHING_READ)
    }

    fn add(&self, n: usize) {
        // One writer, so a load and a store (no read-modify-write) suffice.
        let before = self.0.load(Ordering::Relaxed);
        let before = if before == NOTHING_READ { 0 } else { before };
        self.0.store(before + n as u64, Ordering::Release);
    }
}

impl Default for StreamedBytes {
    fn default() -> Self {
        Self::new()
    }
}

/// A client's request body sent through hyper's client. With `counted`
/// (the request is observed), every data frame's length is added as it
/// passes, before hyper sends it on: when the app has the whole body, the
/// count is complete. Without it, a plain pass-through.
pub struct RequestBody {
    inner: Incoming,
    counted: Option<Arc<StreamedBytes>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, counted: Option<Arc<StreamedBytes>>) -> Self {
        RequestBody { inner, counted }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(counted) = &this.counted {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    counted.add(frame.data_ref().map_or(0, Bytes::len));
                }
                // The end, with no data frame before it: an empty body.
                Poll::Ready(None) => counted.add(0),
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
