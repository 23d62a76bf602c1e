//! lameduck's own HTTP/1.1 path, for an HTTP/1.1 client in front of an
//! HTTP/1.1 app: the common case, and the one a sidecar pays for on every
//! request. One task per client connection does everything: it reads a request
//! head, writes the rewritten head and body to a pooled app connection, reads
//! the response and writes it back, and loops. There is no second task, no
//! channel and no header map per request, and the connection holds no buffer
//! while it waits for the next request (see BENCHMARKS.md for what that buys).
//!
//! Bodies are forwarded as they are framed: `Content-Length` bodies byte for
//! byte, chunked bodies verbatim (the [`chunked`] scanner only finds their
//! end), close-delimited responses until the app closes (and then the client
//! connection closes too).
//!
//! Anything else (protocol upgrades, `Expect`, HTTP/1.0, `CONNECT`, unusual
//! framing, heads that do not parse) is handed to hyper together with the
//! bytes already read ([`Handoff`]), and hyper serves the rest of that
//! connection exactly as it serves every connection when the app speaks h2.
//!
//! Drain behaviour is the same as hyper's path: while draining, every response
//! carries `Connection: close`; an idle connection closes when the lame-duck
//! window ends; the deadline drops the task (the caller's `select!`).

pub mod chunked;
pub mod client;
pub mod head;

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::Instrument;

use super::guard::RequestGuard;
use super::http::ConnShared;
use super::io::{SendTimer, write_all_within};
use super::rules;
use super::upstream::{Attempts, UpstreamError};
use crate::metrics::{TimeoutKind, UpstreamErrorKind};
use crate::observe::access_log::{End, Entry};
use chunked::{ChunkedError, ChunkedScanner};
use head::{Framing, RequestHead, ResponseHead};

/// Read size for heads and small bodies.
const READ_CHUNK: usize = 8 * 1024;
/// Read size once a body is known to be large.
const BODY_CHUNK: usize = 64 * 1024;

/// A connection handed to hyper, with the bytes this path read but did not use.
pub struct Handoff {
    pub stream: TcpStream,
    pub buffered: Vec<u8>,
    pub send_timer: SendTimer,
    pub reason: &'static str,
}

/// One client connection on this path.
pub struct Connection<'a> {
    shared: &'a ConnShared,
    client: TcpStream,
    /// --send-timeout's limit and counter (this path waits on the socket itself).
    send_timer: SendTimer,
    /// Bytes read from the client, not yet forwarded.
    input: Vec<u8>,
    /// Bytes about to be written: a rewritten head and the body bytes after it.
    out: Vec<u8>,
    /// Bytes read from the app.
    from_app: Vec<u8>,
}

/// What the connection does after an exchange.
enum Next {
    KeepAlive,
    Close,
    Handoff(&'static str),
}

/// Why an exchange with the app ended early.
enum Failure {
    /// Answered with a local error response (502/504).
    Upstream(UpstreamError),
    /// The client's request body was not valid chunked encoding (400).
    BadRequestBody(ChunkedError),
    /// The client paused its request body for --body-read-timeout (408).
    BodyTimedOut,
    /// The client went away, or a response broke half-way: nothing to send.
    Abort,
}

impl<'a> Connection<'a> {
    /// `sniffed`: the bytes read while telling HTTP/1 from HTTP/2.
    pub fn new(
        shared: &'a ConnShared,
        client: TcpStream,
        sniffed: Vec<u8>,
        send_timer: SendTimer,
    ) -> Self {
        Connection {
            shared,
            client,
            send_timer,
            input: sniffed,
            out: Vec::new(),
            from_app: Vec::new(),
        }
    }

    /// Serves requests until the connection ends, or returns it for hyper.
    pub async fn serve(mut self) -> Option<Handoff> {
        loop {
            if self.input.is_empty() {
                // Idle: give the buffers back before waiting.
                self.out = Vec::new();
                self.from_app = Vec::new();
                self.input = Vec::new();
                if !self.wait_for_request().await {
                    return None;
                }
            }
            let next = match self.read_head().await {
                Some(RequestHead::Forward(req)) => self.exchange(req).await,
                Some(RequestHead::Handoff(reason)) => Next::Handoff(reason),
                Some(RequestHead::Reject(why)) => self.refuse(why).await,
                Some(RequestHead::Partial) | None => Next::Close,
            };
            match next {
                Next::KeepAlive => {}
                Next::Close => {
                    let _ = self.client.shutdown().await;
                    return None;
                }
                Next::Handoff(reason) => {
                    return Some(Handoff {
                        stream: self.client,
                        buffered: self.input,
                        send_timer: self.send_timer,
                        reason,
                    });
                }
            }
        }
    }

    /// Waits for the next request's first bytes and reads them into `input`;
    /// false if the connection should close instead (the client closed, the
    /// idle timeout, the end of the lame-duck window). The first request's
    /// bytes are already here (read while sniffing).
    async fn wait_for_request(&mut self) -> bool {
        let limit = self.shared.ctx.config.idle_timeout;
        let stop = &self.shared.ctx.lifecycle.tokens.stop_accepting;
        let first_bytes = async {
            loop {
                // Readiness can be stale; a read that would block clears it,
                // and the buffer is only kept once bytes are in it.
                self.client.readable().await?;
                self.input.reserve(READ_CHUNK);
                match self.client.try_read_buf(&mut self.input) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.input = Vec::new(),
                    Err(e) => return Err(e),
                }
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => false,
            read = timeout(limit, first_bytes) => match read {
                Ok(Ok(n)) => n > 0,
                Ok(Err(_)) => false,
                Err(_) => {
                    self.shared.ctx.lifecycle.metrics.timed_out(TimeoutKind::Idle);
                    false
                }
            },
        }
    }

    /// Reads until a whole head is buffered (or it is clearly not one this
    /// path handles). `None`: the client closed, failed or was too slow.
    async fn read_head(&mut self) -> Option<RequestHead> {
        let deadline = Instant::now() + self.shared.ctx.config.header_read_timeout;
        let ctx = &self.shared.ctx;
        let rewrite = head::RewriteContext {
            peer: self.shared.peer_value.as_bytes(),
            ids: &ctx.ids,
            sampler: &ctx.observer.sampler,
        };
        loop {
            self.out.clear();
            match head::parse_request(&self.input, &rewrite, &mut self.out) {
                RequestHead::Partial if self.input.len() < super::MAX_HEADER_BYTES => {}
                // Too large: hyper answers 431.
                RequestHead::Partial => return Some(RequestHead::Handoff("oversized head")),
                parsed => return Some(parsed),
            }
            self.input.reserve(READ_CHUNK);
            match timeout_at(deadline, self.client.read_buf(&mut self.input)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => {
                    tracing::debug!("request head not received within the header-read timeout");
                    ctx.lifecycle.metrics.timed_out(TimeoutKind::HeaderRead);
                    return None;
                }
            }
        }
    }

    /// Forwards one request and its response.
    async fn exchange(&mut self, req: head::Request) -> Next {
        let ctx = &self.shared.ctx;
        let mut request = RequestGuard::start(ctx.lifecycle.clone(), self.shared.activity.clone());
        if ctx.observer.wants(Some(&req.trace)) {
            observe(&mut request, &ctx.observer, &self.input, &req);
        }
        let span = tracing::debug_span!("request", id = ?req.request_id, trace_id = %req.trace, line = %RequestLine(&self.input));

        // The body bytes that came with the head go out with it.
        let mut body = BodyCursor::new(req.framing);
        let taken = match body.take(&self.input[req.head_len..]) {
            Ok(n) => n,
            Err(e) => {
                self.input.clear();
                return self
                    .local_error(Failure::BadRequestBody(e), &req, request)
                    .await;
            }
        };
        request.add_request_bytes(taken);
        self.out
            .extend_from_slice(&self.input[req.head_len..req.head_len + taken]);
        self.input.drain(..req.head_len + taken);
        // Replayable: the whole request is in `out`.
        let replayable = body.is_done() && req.idempotent;

        let limit = ctx.config.upstream_timeout;
        let sent = timeout(limit, self.send(&mut body, replayable, &req, &mut request))
            .instrument(span.clone())
            .await
            .unwrap_or(Err(Failure::Upstream(UpstreamError::Timeout(limit))));
        let (app, response) = match sent {
            Ok(sent) => sent,
            Err(failure) => {
                if !body.is_done() {
                    // The rest of the request body is still on the wire.
                    self.input.clear();
                    return self.local_error(failure, &req, request).await.or_close();
                }
                return self.local_error(failure, &req, request).await;
            }
        };
        request.set_status(response.status);
        let forwarded = self
            .forward_response(app, &response, &mut request)
            .instrument(span)
            .await;
        match forwarded {
            Ok(()) => {
                request.complete();
                if response.close_client {
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            }
            Err(kind) => {
                match kind {
                    Some(kind) => request.upstream_failed(kind),
                    None => request.set_end(End::ClientAborted),
                }
                Next::Close
            }
        }
    }

    /// Writes the request to an app connection and reads the response head.
    /// The rewritten response head is left in `out`, the bytes after it in
    /// `from_app[response.head_len..]`.
    async fn send(
        &mut self,
        body: &mut BodyCursor,
        replayable: bool,
        req: &head::Request,
        request: &mut RequestGuard,
    ) -> Result<(TcpStream, head::Response), Failure> {
        let mut attempts = Attempts::new(&self.shared.ctx.upstream, replayable);
        loop {
            let mut app = attempts.connection().await.map_err(Failure::Upstream)?;
            request.upstream_connection(attempts.reused(), attempts.retried());
            if let Err(e) = app.write_all(&self.out).await {
                if attempts.retry() {
                    continue;
                }
                return Err(closed(e));
            }
            if !body.is_done() {
                self.forward_request_body(&mut app, body, request).await?;
            }
            match self.read_response_head(&mut app, req).await {
                Ok(response) => {
                    request.upstream_answered();
                    return Ok((app, response));
                }
                // (`retry` is asked only when nothing came back.)
                Err(ReadHeadError::ClosedBeforeResponse(_)) if attempts.retry() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Streams the rest of a request body from the client to the app.
    async fn forward_request_body(
        &mut self,
        app: &mut TcpStream,
        body: &mut BodyCursor,
        request: &mut RequestGuard,
    ) -> Result<(), Failure> {
        let limit = self.shared.ctx.config.body_read_timeout;
        while !body.is_done() {
            self.input.reserve(BODY_CHUNK);
            match timeout(limit, self.client.read_buf(&mut self.input)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::Abort),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Failure::BodyTimedOut),
            }
            let taken = body.take(&self.input).map_err(Failure::BadRequestBody)?;
            request.add_request_bytes(taken);
            app.write_all(&self.input[..taken]).await.map_err(closed)?;
            self.input.drain(..taken);
        }
        Ok(())
    }

    async fn read_response_head(
        &mut self,
        app: &mut TcpStream,
        req: &head::Request,
    ) -> Result<head::Response, ReadHeadError> {
        let response_cx = head::ResponseContext {
            request_is_head: req.is_head,
            request_id: req.request_id.as_bytes(),
            close: req.close || self.shared.ctx.lifecycle.is_draining(),
        };
        self.from_app.clear();
        loop {
            self.from_app.reserve(READ_CHUNK);
            let received_before = !self.from_app.is_empty();
            match app.read_buf(&mut self.from_app).await {
                Ok(0) if received_before => return Err(ReadHeadError::Truncated),
                Ok(0) => {
                    return Err(ReadHeadError::ClosedBeforeResponse(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before responding",
                    )));
                }
                Err(e) if !received_before => return Err(ReadHeadError::ClosedBeforeResponse(e)),
                Err(e) => return Err(ReadHeadError::Io(e)),
                Ok(_) => {}
            }
            loop {
                self.out.clear();
                match head::parse_response(&self.from_app, &response_cx, &mut self.out) {
                    ResponseHead::Partial if self.from_app.len() < super::MAX_HEADER_BYTES => break,
                    ResponseHead::Partial => return Err(ReadHeadError::Invalid("oversized head")),
                    ResponseHead::Invalid(why) => return Err(ReadHeadError::Invalid(why)),
                    ResponseHead::Forward(interim) if (100..200).contains(&interim.status) => {
                        // 1xx: forward it, the final response follows.
                        self.write_out()
                            .await
                            .map_err(|_| ReadHeadError::ClientGone)?;
                        self.from_app.drain(..interim.head_len);
                    }
                    ResponseHead::Forward(response) => return Ok(response),
                }
            }
        }
    }

    /// Writes the response head (in `out`) and streams the body. `Err(kind)`:
    /// the exchange broke and the client connection must close; `kind` is the
    /// app's failure, if it was the app's.
    async fn forward_response(
        &mut self,
        mut app: TcpStream,
        response: &head::Response,
        request: &mut RequestGuard,
    ) -> Result<(), Option<UpstreamErrorKind>> {
        let mut body = BodyCursor::new(response.framing);
        let after_head = &self.from_app[response.head_len..];
        let taken = body
            .take(after_head)
            .map_err(|_| Some(UpstreamErrorKind::Protocol))?;
        // Bytes beyond the response: the app broke framing; do not reuse.
        let mut surplus = taken < after_head.len();
        request.add_response_bytes(taken);
        self.out.extend_from_slice(&after_head[..taken]);
        self.write_out().await.map_err(|_| None)?;
        while !body.is_done() {
            self.from_app.clear();
            self.from_app
                .reserve(if body.remaining_hint() > READ_CHUNK {
                    BODY_CHUNK
                } else {
                    READ_CHUNK
                });
            let n = app
                .read_buf(&mut self.from_app)
                .await
                .map_err(|_| Some(UpstreamErrorKind::Closed))?;
            if n == 0 {
                if body.ends_at_close() {
                    break;
                }
                return Err(Some(UpstreamErrorKind::Closed));
            }
            let taken = body
                .take(&self.from_app)
                .map_err(|_| Some(UpstreamErrorKind::Protocol))?;
            surplus |= taken < n;
            let timer = &self.send_timer;
            write_all_within(
                &self.client,
                &self.from_app[..taken],
                timer.limit(),
                timer.counter(),
            )
            .await
            .map_err(|_| None)?;
            request.add_response_bytes(taken);
        }
        if response.reusable && !surplus {
            self.shared.ctx.upstream.release_stream(app);
        }
        Ok(())
    }

    /// Writes `out` to the client within --send-timeout.
    async fn write_out(&self) -> io::Result<()> {
        let timer = &self.send_timer;
        write_all_within(&self.client, &self.out, timer.limit(), timer.counter()).await
    }

    /// Answers 400 to a request whose framing or target is ambiguous, and
    /// closes: where its body (if any) ends is exactly what is in doubt.
    async fn refuse(&mut self, why: rules::Refusal) -> Next {
        let ctx = &self.shared.ctx;
        let mut request = RequestGuard::start(ctx.lifecycle.clone(), self.shared.activity.clone());
        request.set_status(400);
        let request_id = ctx.ids.next_bytes();
        if ctx.observer.wants(None) {
            let (method, target) = request_line(&self.input).unwrap_or(("", ""));
            let entry = Entry::for_request(
                &request_id,
                method,
                target,
                ctx.observer.with_query(),
                "HTTP/1.1",
                request.phase(),
            );
            request.observe(ctx.observer.record(entry));
        }
        request.set_end(End::Refused);
        tracing::debug!(reason = why, line = %RequestLine(&self.input), "request refused");
        self.input.clear();
        self.out.clear();
        head::write_local_response(
            &mut self.out,
            400,
            "Bad Request",
            "bad request\n",
            &request_id,
            true,
        );
        if self.write_out().await.is_ok() {
            request.complete();
        }
        Next::Close
    }

    /// Answers a failed exchange locally; keeps the connection when the
    /// request was read to its end.
    async fn local_error(
        &mut self,
        failure: Failure,
        req: &head::Request,
        mut request: RequestGuard,
    ) -> Next {
        let (status, reason, text) = match &failure {
            Failure::Upstream(error) => {
                self.shared
                    .upstream_failed(error, &mut request, &req.request_id);
                let status = error.status();
                let reason = status.canonical_reason().unwrap_or("");
                (status.as_u16(), reason, error.client_message())
            }
            Failure::BadRequestBody(e) => {
                tracing::debug!(error = %e, "invalid request body");
                request.set_end(End::Refused);
                (400, "Bad Request", "invalid chunked request body\n")
            }
            Failure::BodyTimedOut => {
                tracing::debug!("request body paused past --body-read-timeout");
                request.set_end(End::ClientTimeout);
                self.shared
                    .ctx
                    .lifecycle
                    .metrics
                    .timed_out(TimeoutKind::BodyRead);
                (408, "Request Timeout", "request body timed out\n")
            }
            Failure::Abort => {
                request.set_end(End::ClientAborted);
                return Next::Close;
            }
        };
        request.set_status(status);
        let close = req.close
            || self.shared.ctx.lifecycle.is_draining()
            || matches!(failure, Failure::BadRequestBody(_) | Failure::BodyTimedOut);
        self.out.clear();
        head::write_local_response(
            &mut self.out,
            status,
            reason,
            text,
            req.request_id.as_bytes(),
            close,
        );
        if self.write_out().await.is_err() {
            return Next::Close;
        }
        request.complete();
        if close { Next::Close } else { Next::KeepAlive }
    }
}

impl Next {
    fn or_close(self) -> Next {
        match self {
            Next::KeepAlive => Next::Close,
            other => other,
        }
    }
}

enum ReadHeadError {
    /// Nothing arrived before the app closed: a replayable request may retry.
    ClosedBeforeResponse(io::Error),
    Truncated,
    Io(io::Error),
    Invalid(&'static str),
    ClientGone,
}

impl From<ReadHeadError> for Failure {
    fn from(e: ReadHeadError) -> Self {
        match e {
            ReadHeadError::ClosedBeforeResponse(e) | ReadHeadError::Io(e) => closed(e),
            ReadHeadError::Truncated => closed(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed in the middle of the response head",
            )),
            ReadHeadError::Invalid(why) => Failure::Upstream(UpstreamError::Protocol(why.into())),
            ReadHeadError::ClientGone => Failure::Abort,
        }
    }
}

fn closed(error: io::Error) -> Failure {
    Failure::Upstream(UpstreamError::Closed(error.into()))
}

/// Where a body ends, fed the bytes as they arrive.
pub(super) enum BodyCursor {
    Done,
    Length(u64),
    Chunked(ChunkedScanner),
    UntilClose,
}

impl BodyCursor {
    pub(super) fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => BodyCursor::Done,
            Framing::Length(n) => BodyCursor::Length(n),
            Framing::Chunked => BodyCursor::Chunked(ChunkedScanner::new()),
            Framing::UntilClose => BodyCursor::UntilClose,
        }
    }

    /// How many of `input`'s bytes belong to the body.
    fn take(&mut self, input: &[u8]) -> Result<usize, ChunkedError> {
        match self {
            BodyCursor::Done => Ok(0),
            BodyCursor::Length(remaining) => {
                let n = (*remaining).min(input.len() as u64);
                *remaining -= n;
                if *remaining == 0 {
                    *self = BodyCursor::Done;
                }
                Ok(n as usize)
            }
            BodyCursor::Chunked(scanner) => {
                let n = scanner.scan(input)?;
                if scanner.is_done() {
                    *self = BodyCursor::Done;
                }
                Ok(n)
            }
            BodyCursor::UntilClose => Ok(input.len()),
        }
    }

    pub(super) fn is_done(&self) -> bool {
        matches!(self, BodyCursor::Done)
    }

    pub(super) fn ends_at_close(&self) -> bool {
        matches!(self, BodyCursor::UntilClose)
    }

    /// Bytes still expected, where known (for the read size).
    fn remaining_hint(&self) -> usize {
        match self {
            BodyCursor::Length(n) => usize::try_from(*n).unwrap_or(usize::MAX),
            BodyCursor::Done => 0,
            BodyCursor::Chunked(_) | BodyCursor::UntilClose => usize::MAX,
        }
    }
}

/// Starts the access-log entry (and span record) of a request on this path.
/// Out of line: only observed requests pay for the strings.
#[cold]
fn observe(
    request: &mut RequestGuard,
    observer: &crate::observe::Observer,
    input: &[u8],
    req: &head::Request,
) {
    let (method, target) = request_line(input).unwrap_or(("", ""));
    let mut entry = Entry::for_request(
        req.request_id.as_bytes(),
        method,
        target,
        observer.with_query(),
        "HTTP/1.1",
        request.phase(),
    );
    entry.trace = Some(req.trace);
    request.observe(observer.record(entry));
}

/// Method and target of the request line at the start of `input`.
fn request_line(input: &[u8]) -> Option<(&str, &str)> {
    let end = input.iter().position(|&b| b == b'\r')?;
    let line = std::str::from_utf8(&input[..end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    Some((parts.next()?, parts.next()?))
}

/// The request line, for the request's span (formatted only when enabled).
struct RequestLine<'a>(&'a [u8]);

impl std::fmt::Display for RequestLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = self
            .0
            .iter()
            .position(|&b| b == b'\r')
            .unwrap_or(self.0.len())
            .min(256);
        f.write_str(&String::from_utf8_lossy(&self.0[..end]))
    }
}
