//! HTTP/1.1 to the app for requests that hyper's server received: streams of
//! HTTP/2 clients, and HTTP/1 connections the own path handed over. The
//! request is written to a pooled app socket (the same pool the own path
//! uses) and the response read from it inside the request's own task; the
//! response body reads the socket directly as hyper's server polls it. No
//! client connection task, no channel between the two.
//!
//! Like the own path, the exchange is sequential: the request body is sent
//! before the response is read, and `--upstream-timeout` bounds both.
//! Trailers of a chunked response are not passed on (HTTP/1 apps rarely send
//! them; gRPC needs `--upstream-protocol http2`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::BodyCursor;
use super::chunked::ChunkedError;
use super::head::{self, Framing};
use crate::proxy::guard::RequestGuard;
use crate::proxy::upstream::{Attempts, BoxError, Upstream, UpstreamError};

/// First read of a response: most heads (and small bodies) fit; a 4 KiB
/// allocation per request stays cheap.
const HEAD_READ: usize = 4 * 1024;
/// Later reads of a body.
const BODY_READ: usize = 16 * 1024;

/// Why [`send`] produced no response.
#[derive(Debug)]
pub enum SendError {
    Upstream(UpstreamError),
    /// The client paused its request body for --body-read-timeout: not the
    /// app's failure (408, and the app connection with half a body is closed).
    BodyTimedOut,
    /// The client's request body broke its framing (e.g. a bad chunk size on
    /// hyper's HTTP/1 path, or an HTTP/2 body longer or shorter than its
    /// content-length): 400, and the app connection with half a body is closed.
    BadRequestBody(BoxError),
}

impl From<UpstreamError> for SendError {
    fn from(error: UpstreamError) -> Self {
        SendError::Upstream(error)
    }
}

/// Sends `req` (already rewritten for the app) and returns the response
/// head; its body streams from the app connection. `body_timeout` bounds
/// each wait for the next piece of the client's request body.
pub async fn send(
    upstream: &Upstream,
    req: Request<Incoming>,
    body_timeout: Duration,
    request: &mut RequestGuard,
) -> Result<Response<AppBody>, SendError> {
    let (parts, mut body) = req.into_parts();
    let is_head = parts.method == http::Method::HEAD;
    let mut out = Vec::with_capacity(512);
    let chunked = write_request_head(&parts, &body, &mut out);
    // Requests without a body are sent whole and may be sent twice.
    let replayable = body.is_end_stream() && parts.method.is_idempotent();
    let mut attempts = Attempts::new(upstream, replayable);
    loop {
        let mut app = attempts.connection().await?;
        request.upstream_connection(attempts.reused(), attempts.retried());
        if let Err(e) = app.write_all(&out).await {
            if attempts.retry() {
                continue;
            }
            return Err(UpstreamError::Closed(e.into()).into());
        }
        if !body.is_end_stream() {
            send_body(&mut app, &mut body, chunked, body_timeout, request).await?;
        }
        match read_response(app, is_head, upstream).await {
            Ok(response) => return Ok(response),
            // (`retry` is asked only when nothing came back.)
            Err(ReadError::NothingReceived(_)) if attempts.retry() => {}
            Err(ReadError::NothingReceived(e)) => {
                return Err(UpstreamError::Closed(e.into()).into());
            }
            Err(ReadError::Failed(e)) => return Err(e.into()),
        }
    }
}

/// Writes the request line and headers; true if the body goes chunked.
fn write_request_head(parts: &http::request::Parts, body: &Incoming, out: &mut Vec<u8>) -> bool {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length_written = false;
    for (name, value) in &parts.headers {
        // An HTTP/2 client may repeat an identical content-length; the app
        // gets one (differing ones were refused by h2 as malformed).
        if name == header::CONTENT_LENGTH && std::mem::replace(&mut length_written, true) {
            continue;
        }
        head::write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framed = parts.headers.contains_key(header::CONTENT_LENGTH);
    let chunked = !framed && !body.is_end_stream() && body.size_hint().exact().is_none();
    if chunked {
        head::write_header(out, b"transfer-encoding", b"chunked");
    } else if !framed && let Some(n) = body.size_hint().exact().filter(|&n| n > 0) {
        head::write_header(out, b"content-length", n.to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

async fn send_body(
    app: &mut TcpStream,
    body: &mut Incoming,
    chunked: bool,
    body_timeout: Duration,
    request: &mut RequestGuard,
) -> Result<(), SendError> {
    let closed = |e: io::Error| UpstreamError::Closed(e.into());
    // A small chunk goes out whole in one write: size line, data, CRLF.
    let mut chunk = Vec::new();
    loop {
        let Ok(frame) = timeout(body_timeout, body.frame()).await else {
            return Err(SendError::BodyTimedOut);
        };
        let Some(frame) = frame else { break };
        // The client's body failed: the app must not take a truncated one.
        let frame = frame.map_err(|e| SendError::BadRequestBody(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // The data as the client sent it, before any framing for the app.
        request.add_request_bytes(data.len());
        if !chunked {
            app.write_all(&data).await.map_err(closed)?;
        } else if data.is_empty() {
            // An empty chunk would end the body early.
        } else if data.len() <= BODY_READ {
            chunk.clear();
            chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            app.write_all(&chunk).await.map_err(closed)?;
        } else {
            app.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await
                .map_err(closed)?;
            app.write_all(&data).await.map_err(closed)?;
            app.write_all(b"\r\n").await.map_err(closed)?;
        }
    }
    // The body ended: its size is known now, even with no data in it.
    request.add_request_bytes(0);
    if chunked {
        app.write_all(b"0\r\n\r\n").await.map_err(closed)?;
    }
    Ok(())
}

enum ReadError {
    /// The app closed (or failed) before sending a byte.
    NothingReceived(io::Error),
    Failed(UpstreamError),
}

async fn read_response(
    mut app: TcpStream,
    is_head: bool,
    upstream: &Upstream,
) -> Result<Response<AppBody>, ReadError> {
    let mut buf = BytesMut::with_capacity(HEAD_READ);
    loop {
        buf.reserve(HEAD_READ);
        match tokio::io::AsyncReadExt::read_buf(&mut app, &mut buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(ReadError::NothingReceived(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Err(e) if buf.is_empty() => return Err(ReadError::NothingReceived(e)),
            Ok(0) => return Err(ReadError::Failed(closed_mid_head())),
            Err(e) => return Err(ReadError::Failed(UpstreamError::Closed(e.into()))),
            Ok(_) => {}
        }
        loop {
            match parse_response(&buf, is_head).map_err(ReadError::Failed)? {
                None if buf.len() < crate::proxy::MAX_HEADER_BYTES => break,
                None => return Err(ReadError::Failed(protocol("oversized response head"))),
                // 1xx: hyper's server has no way to send it on; the final one follows.
                Some((head_len, response, _)) if response.status().is_informational() => {
                    buf.advance(head_len);
                }
                Some((head_len, response, (framing, reusable))) => {
                    buf.advance(head_len);
                    let body = AppBody::new(app, buf, framing, reusable, upstream.clone());
                    return Ok(response.map(|()| body));
                }
            }
        }
    }
}

type ParsedHead = (usize, Response<()>, (Framing, bool));

/// `Ok(None)`: more bytes needed.
fn parse_response(input: &[u8], is_head: bool) -> Result<Option<ParsedHead>, UpstreamError> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(protocol(e)),
    };
    let (Some(version), Some(code)) = (res.version, res.code) else {
        return Err(protocol("invalid status line"));
    };
    let status = StatusCode::from_u16(code).map_err(protocol)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(protocol("101 without an upgrade request"));
    }
    let framed = head::frame_response(version, code, is_head, res.headers).map_err(protocol)?;
    if let Some(codings) = framed.transfer_encoding
        && !codings.trim_ascii().eq_ignore_ascii_case(b"chunked")
    {
        // A coding other than chunked would reach the client undeclared
        // (HTTP/2 has no Transfer-Encoding).
        return Err(protocol("a transfer coding other than chunked"));
    }
    let mut map = HeaderMap::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(protocol)?;
        // With a transfer coding the length is the coding's (RFC 9112 §6.3).
        if framed.transfer_encoding.is_some() && name == header::CONTENT_LENGTH {
            continue;
        }
        let value = HeaderValue::from_bytes(h.value).map_err(protocol)?;
        map.append(name, value);
    }
    let (framing, reusable) = (framed.framing, framed.reusable);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = map;
    Ok(Some((head_len, response, (framing, reusable))))
}

fn protocol(e: impl Into<BoxError>) -> UpstreamError {
    UpstreamError::Protocol(e.into())
}

fn closed_mid_head() -> UpstreamError {
    UpstreamError::Closed("closed in the middle of the response head".into())
}

/// A response body read straight from the app connection. The connection goes
/// back to the pool once the body has been read to its end; a body dropped
/// half-way closes it.
pub struct AppBody {
    app: Option<TcpStream>,
    buf: BytesMut,
    state: BodyCursor,
    reusable: bool,
    upstream: Upstream,
}

impl AppBody {
    fn new(
        app: TcpStream,
        buf: BytesMut,
        framing: Framing,
        reusable: bool,
        upstream: Upstream,
    ) -> Self {
        let state = BodyCursor::new(framing);
        let mut body = AppBody {
            app: Some(app),
            buf,
            state,
            reusable,
            upstream,
        };
        if body.is_end_stream() {
            body.finish();
        }
        body
    }

    /// The body ended cleanly: the connection can carry the next request,
    /// unless the app sent more than the body.
    fn finish(&mut self) {
        self.state = BodyCursor::Done;
        if let Some(app) = self.app.take()
            && self.reusable
            && self.buf.is_empty()
        {
            self.upstream.release_stream(app);
        }
    }

    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.app = None;
        self.state = BodyCursor::Done;
        Poll::Ready(Some(Err(error.into())))
    }

    /// The next body bytes already buffered, if any.
    fn buffered_frame(&mut self) -> Result<Option<Bytes>, ChunkedError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match &mut self.state {
            BodyCursor::Done => Ok(None),
            BodyCursor::UntilClose => Ok(Some(self.buf.split().freeze())),
            BodyCursor::Length(remaining) => {
                let n = (*remaining).min(self.buf.len() as u64);
                *remaining -= n;
                let data = self.buf.split_to(n as usize).freeze();
                if *remaining == 0 {
                    self.finish();
                }
                Ok(Some(data))
            }
            BodyCursor::Chunked(decoder) => loop {
                let (consumed, data) = decoder.decode(&self.buf)?;
                let data_len = data.len();
                let done = decoder.is_done();
                self.buf.advance(consumed - data_len);
                if data_len > 0 {
                    return Ok(Some(self.buf.split_to(data_len).freeze()));
                }
                if done {
                    self.finish();
                    return Ok(None);
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
            },
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.buffered_frame() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            if this.state.is_done() {
                return Poll::Ready(None);
            }
            let Some(app) = this.app.as_mut() else {
                return Poll::Ready(None);
            };
            this.buf.reserve(BODY_READ);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(app),
                cx,
                &mut this.buf
            )) {
                Ok(0) if this.state.ends_at_close() => {
                    this.app = None;
                    this.state = BodyCursor::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail("the app closed the connection in the middle of the body");
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyCursor::Length(n) => SizeHint::with_exact(n),
            BodyCursor::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
