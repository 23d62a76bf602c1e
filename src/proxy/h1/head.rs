//! Message heads on lameduck's own HTTP/1.1 path: parse the client's request
//! head and write the one the app gets, parse the app's response head and write
//! the one the client gets. Each is one pass of `httparse` plus one pass that
//! writes the rewritten head straight into the outgoing buffer: no header map,
//! no allocation per header.
//!
//! The rewriting is the same as on the hyper path (`super::super::headers`):
//! hop-by-hop headers and those `Connection` names removed (RFC 9110 §7.6.1),
//! `x-forwarded-for` appended, `x-forwarded-proto` and `Host` added when
//! missing, `x-request-id` kept or generated and echoed. A request whose
//! framing or target is ambiguous is refused here ([`RequestHead::Reject`],
//! the rules of `crate::proxy::rules`, table in `docs/http1.md`); what this
//! path does not handle it hands to hyper ([`RequestHead::Handoff`]), which
//! applies the same rules.

use std::mem::MaybeUninit;

use crate::observe::trace_context::{self, RequestTrace, Sampler};
use crate::proxy::headers::{MAX_REQUEST_ID_LEN, RequestIds};
use crate::proxy::rules::{self, Refusal};

/// Headers per message; hyper's default limit too. More goes to hyper (431).
const MAX_HEADERS: usize = 100;
/// Tokens in `Connection` we remember; a longer list goes to hyper.
const MAX_CONNECTION_TOKENS: usize = 8;

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// The body ends when the app closes the connection (responses only).
    UntilClose,
}

/// A request this path will forward.
#[derive(Debug)]
pub struct Request {
    /// Bytes of the head in the input.
    pub head_len: usize,
    pub framing: Framing,
    pub is_head: bool,
    /// Safe to send twice (RFC 9110 §9.2.2): a retry on a fresh connection
    /// is allowed when a reused one died before answering.
    pub idempotent: bool,
    /// The client asked to close after this exchange.
    pub close: bool,
    /// The id sent to the app, echoed on the response.
    pub request_id: RequestId,
    /// The trace context sent to the app (`traceparent`, lameduck's span as parent).
    pub trace: RequestTrace,
}

/// Outcome of looking at the bytes of a request head.
#[derive(Debug)]
// Made once per request and matched at once: boxing `Request` would only add
// an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum RequestHead {
    /// Not all of the head has arrived.
    Partial,
    /// Parsed; the rewritten head has been appended to the output buffer.
    Forward(Request),
    /// Something this path leaves to hyper: upgrades, `Expect`, HTTP/1.0,
    /// `CONNECT`, absolute-form targets, heads that do not parse.
    Handoff(&'static str),
    /// Framing or target ambiguous: answer 400 and close; nothing is forwarded.
    Reject(Refusal),
}

/// A request id of at most [`MAX_REQUEST_ID_LEN`] bytes, kept inline.
#[derive(Clone)]
pub struct RequestId {
    len: u8,
    bytes: [u8; MAX_REQUEST_ID_LEN],
}

impl RequestId {
    fn new(value: &[u8]) -> Self {
        let mut bytes = [0; MAX_REQUEST_ID_LEN];
        bytes[..value.len()].copy_from_slice(value);
        RequestId {
            len: value.len() as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// What the request rewrite adds, fixed per connection.
pub struct RewriteContext<'a> {
    /// The client's IP address, appended to `x-forwarded-for`.
    pub peer: &'a [u8],
    pub ids: &'a RequestIds,
    /// Decides for the traces this request starts.
    pub sampler: &'a Sampler,
}

/// Parses a request head from `input` and, if this path forwards it, appends
/// the head the app should get to `out`.
pub fn parse_request(input: &[u8], cx: &RewriteContext<'_>, out: &mut Vec<u8>) -> RequestHead {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, input, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return RequestHead::Partial,
        Err(_) => return RequestHead::Handoff("invalid or oversized head"),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return RequestHead::Handoff("not HTTP/1.1");
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return RequestHead::Handoff("CONNECT or a non-origin-form target");
    }
    let headers = &*req.headers;
    let origin_form = rules::Target {
        http11: true,
        authority: None,
    };
    if let Err(why) = rules::check_request(
        origin_form,
        headers.iter().map(|h| (h.name.as_bytes(), h.value)),
    ) {
        return RequestHead::Reject(why);
    }

    let mut connection = ConnectionTokens::default();
    let mut framing = Framing::Empty;
    let mut chunked = false;
    let mut has_proto = false;
    let mut has_upgrade = false;
    let mut request_id: Option<&[u8]> = None;
    let mut forwarded_for: Option<&[u8]> = None;
    let (mut traceparent, mut traceparents, mut has_tracestate) = (None, 0, false);
    for h in headers {
        let name = h.name.as_bytes();
        match name.len() {
            6 if name.eq_ignore_ascii_case(b"expect") => {
                return RequestHead::Handoff("Expect");
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => has_upgrade = true,
            11 if name.eq_ignore_ascii_case(b"traceparent") => {
                traceparent = Some(h.value);
                traceparents += 1;
            }
            // Collects the tokens; only a list too long to remember stops here.
            10 if name.eq_ignore_ascii_case(b"connection") && !connection.add_list(h.value) => {
                return RequestHead::Handoff("long Connection list");
            }
            10 if name.eq_ignore_ascii_case(b"tracestate") => has_tracestate = true,
            12 if name.eq_ignore_ascii_case(b"x-request-id") => {
                request_id.get_or_insert(h.value);
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let Some(n) = parse_content_length(h.value) else {
                    return RequestHead::Reject("invalid Content-Length");
                };
                match framing {
                    Framing::Length(m) if m != n => {
                        return RequestHead::Reject("conflicting Content-Length");
                    }
                    _ => framing = Framing::Length(n),
                }
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                forwarded_for.get_or_insert(h.value);
            }
            17 if name.eq_ignore_ascii_case(b"x-forwarded-proto") => has_proto = true,
            // A single plain `chunked` (the rules refused anything else).
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => chunked = true,
            _ => {}
        }
    }
    if has_upgrade && connection.upgrade {
        return RequestHead::Handoff("protocol upgrade");
    }
    if chunked {
        // RFC 9112 §6.1 allows processing by the coding and closing after;
        // refusing leaves no reading of the message to disagree on.
        if framing != Framing::Empty {
            return RequestHead::Reject("Transfer-Encoding with Content-Length");
        }
        framing = Framing::Chunked;
    }
    if framing == Framing::Length(0) {
        framing = Framing::Empty;
    }
    let request_id = match request_id {
        Some(id) if !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN => RequestId::new(id),
        _ => RequestId::new(&cx.ids.next_bytes()),
    };
    // Two `traceparent` lines are two parents: neither is trusted.
    let parent = match traceparent {
        Some(value) if traceparents == 1 => trace_context::parse_traceparent(value),
        _ => None,
    };
    let keep_tracestate = parent.is_some()
        && has_tracestate
        && trace_context::tracestate_is_valid(
            headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("tracestate"))
                .map(|h| h.value),
        );
    let trace = RequestTrace::start(parent, cx.sampler);

    out.reserve(head_len + 128);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length_written = false;
    for h in headers {
        let name = h.name.as_bytes();
        // Rewritten below, or hop-by-hop.
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"x-forwarded-for")
            || name.eq_ignore_ascii_case(b"x-request-id")
            || name.eq_ignore_ascii_case(b"traceparent")
            || (!keep_tracestate && name.eq_ignore_ascii_case(b"tracestate"))
            || connection.names(name)
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // Repeated identical lengths (RFC 9112 §6.3 rule 5) go out as
            // one plain number, the one the body is framed by.
            if !std::mem::replace(&mut length_written, true) {
                let n = match framing {
                    Framing::Length(n) => n,
                    _ => 0,
                };
                write_header(out, b"content-length", n.to_string().as_bytes());
            }
            continue;
        }
        write_header(out, name, h.value);
    }
    // A list that is not plain text is not a list of addresses: replace it.
    match forwarded_for.filter(|v| is_visible_text(v) && !v.trim_ascii().is_empty()) {
        Some(existing) => {
            out.extend_from_slice(b"x-forwarded-for: ");
            out.extend_from_slice(existing);
            out.extend_from_slice(b", ");
            out.extend_from_slice(cx.peer);
            out.extend_from_slice(b"\r\n");
        }
        None => write_header(out, b"x-forwarded-for", cx.peer),
    }
    if !has_proto {
        write_header(out, b"x-forwarded-proto", b"http");
    }
    write_header(out, b"x-request-id", request_id.as_bytes());
    write_header(out, b"traceparent", &trace.traceparent());
    if chunked {
        write_header(out, b"transfer-encoding", b"chunked");
    }
    out.extend_from_slice(b"\r\n");

    RequestHead::Forward(Request {
        head_len,
        framing,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        close: connection.close,
        request_id,
        trace,
    })
}

/// A response head the client will get.
#[derive(Debug)]
pub struct Response {
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The app's connection can carry another request after this response.
    pub reusable: bool,
    /// The head asks the client to close, and the connection closes after.
    pub close_client: bool,
}

#[derive(Debug)]
pub enum ResponseHead {
    Partial,
    /// Parsed; the rewritten head has been appended to the output buffer.
    /// A 1xx interim response is forwarded too, and the final one follows.
    Forward(Response),
    Invalid(&'static str),
}

/// Per-response choices made by the connection.
pub struct ResponseContext<'a> {
    pub request_is_head: bool,
    pub request_id: &'a [u8],
    /// Ask the client to close (draining, or it asked to).
    pub close: bool,
}

/// Parses the app's response head and appends the client's version to `out`.
pub fn parse_response(input: &[u8], cx: &ResponseContext<'_>, out: &mut Vec<u8>) -> ResponseHead {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, input, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return ResponseHead::Partial,
        Err(_) => return ResponseHead::Invalid("invalid response head"),
    };
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return ResponseHead::Invalid("invalid status line");
    };
    if status == 101 {
        // This path never forwards an Upgrade, so a switch is a broken app.
        return ResponseHead::Invalid("101 without an upgrade request");
    }
    let headers = &*res.headers;
    let framed = match frame_response(version, status, cx.request_is_head, headers) {
        Ok(framed) => framed,
        Err(why) => return ResponseHead::Invalid(why),
    };
    let ResponseFraming {
        framing,
        reusable,
        connection,
        transfer_encoding,
    } = framed;
    let interim = (100..200).contains(&status);
    let close_client = cx.close || framing == Framing::UntilClose;

    out.reserve(head_len + 96);
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers {
        let name = h.name.as_bytes();
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"x-request-id")
            || connection.names(name)
            // With a transfer coding the length is the coding's (RFC 9112 §6.3).
            || (transfer_encoding.is_some() && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        write_header(out, name, h.value);
    }
    if let Some(codings) = transfer_encoding {
        write_header(out, b"transfer-encoding", codings);
    }
    if !interim {
        write_header(out, b"x-request-id", cx.request_id);
        if close_client {
            write_header(out, b"connection", b"close");
        }
    }
    out.extend_from_slice(b"\r\n");
    ResponseHead::Forward(Response {
        head_len,
        status,
        framing,
        reusable,
        close_client,
    })
}

/// How a response is delimited, and what its headers say about the connection.
pub struct ResponseFraming<'a> {
    pub framing: Framing,
    /// The app's connection can carry another request after this response.
    pub reusable: bool,
    connection: ConnectionTokens<'a>,
    /// The `Transfer-Encoding` value, if any.
    pub transfer_encoding: Option<&'a [u8]>,
}

/// Reads a response's framing from its headers (RFC 9112 §6.3).
pub fn frame_response<'a>(
    version: u8,
    status: u16,
    request_is_head: bool,
    headers: &[httparse::Header<'a>],
) -> Result<ResponseFraming<'a>, &'static str> {
    let mut connection = ConnectionTokens::default();
    let mut length = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            // An overlong list still has its `close` noted; names beyond the
            // limit are stripped anyway if they are hop-by-hop ones.
            connection.add_list(h.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            match (parse_content_length(h.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err("invalid Content-Length"),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if transfer_encoding.is_some() {
                return Err("repeated Transfer-Encoding");
            }
            transfer_encoding = Some(h.value);
        }
    }
    // RFC 9112 §6.3 rule 3: "ought to be handled as an error". Reading it by
    // the coding alone would still leave the app and the client free to
    // disagree; a 502 and a closed app connection leave nothing to disagree on.
    if transfer_encoding.is_some() && length.is_some() {
        return Err("Transfer-Encoding with Content-Length");
    }
    // The final coding decides the framing (RFC 9112 §6.1); the codings
    // before it are the client's to undo.
    let chunked = transfer_encoding.is_some_and(|v| {
        v.rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    });
    let framing =
        if (100..200).contains(&status) || request_is_head || status == 204 || status == 304 {
            Framing::Empty
        } else if chunked {
            Framing::Chunked
        } else if transfer_encoding.is_some() {
            // A coding we cannot delimit: read to the end (RFC 9112 §6.3 rule 4).
            Framing::UntilClose
        } else {
            match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
    let reusable = version == 1 && !connection.close && framing != Framing::UntilClose;
    Ok(ResponseFraming {
        framing,
        reusable,
        connection,
        transfer_encoding,
    })
}

/// A complete response lameduck makes itself (errors), keep-alive unless `close`.
pub fn write_local_response(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    body: &str,
    request_id: &[u8],
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    write_header(out, b"x-request-id", request_id);
    if close {
        write_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

fn push_status(out: &mut Vec<u8>, status: u16) {
    // httparse guarantees three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
}

pub fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The fixed hop-by-hop set of RFC 9110 §7.6.1, plus the legacy ones.
fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 7] = [
        b"connection",
        b"te",
        b"transfer-encoding",
        b"trailer",
        b"upgrade",
        b"keep-alive",
        b"proxy-connection",
    ];
    NAMES
        .iter()
        .any(|n| n.len() == name.len() && n.eq_ignore_ascii_case(name))
}

/// `HeaderValue::to_str`'s rule: visible ASCII, space and tab.
fn is_visible_text(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// A `Content-Length` value: digits only. A list (`5, 5`), which RFC 9110
/// §8.6 lets a recipient either refuse or read as one value, is refused, as
/// hyper's parser (the hand-off path) and nginx do.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// The tokens of the `Connection` header(s) of one message.
#[derive(Default)]
struct ConnectionTokens<'a> {
    close: bool,
    upgrade: bool,
    /// Other tokens: names of headers to remove as hop-by-hop.
    named: [&'a [u8]; MAX_CONNECTION_TOKENS],
    count: usize,
}

impl<'a> ConnectionTokens<'a> {
    /// Adds one header's comma-separated tokens; false if there were too many.
    fn add_list(&mut self, value: &'a [u8]) -> bool {
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive") {
            } else if self.count < MAX_CONNECTION_TOKENS {
                self.named[self.count] = token;
                self.count += 1;
            } else {
                return false;
            }
        }
        true
    }

    /// Whether `Connection` names this header (as hop-by-hop). Never the
    /// headers lameduck itself vouches for.
    fn names(&self, name: &[u8]) -> bool {
        self.named[..self.count]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name))
            && !name.eq_ignore_ascii_case(b"x-forwarded-for")
            && !name.eq_ignore_ascii_case(b"x-request-id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOP_BY_HOP: [&str; 7] = [
        "connection",
        "te",
        "transfer-encoding",
        "trailer",
        "upgrade",
        "keep-alive",
        "proxy-connection",
    ];

    fn rewrite(input: &[u8]) -> (RequestHead, Vec<u8>) {
        let ids = RequestIds::new();
        let sampler = Sampler::new(0.0);
        let cx = RewriteContext {
            peer: b"10.1.2.3",
            ids: &ids,
            sampler: &sampler,
        };
        let mut out = Vec::new();
        (parse_request(input, &cx, &mut out), out)
    }

    /// The head as the app gets it, parsed back: (method, target, headers).
    fn reparse(out: &[u8]) -> (String, String, Vec<(String, Vec<u8>)>) {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(out).unwrap().is_complete(), "{out:?}");
        let headers = req
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        (
            req.method.unwrap().into(),
            req.path.unwrap().into(),
            headers,
        )
    }

    fn values<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    #[test]
    fn a_plain_get_is_rewritten_like_the_hyper_path_does() {
        let (head, out) = rewrite(
            b"GET /a?b=1 HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, X-Secret\r\n\
              X-Secret: 1\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: abc\r\n\r\n",
        );
        let RequestHead::Forward(req) = head else {
            panic!("{head:?}")
        };
        assert_eq!(req.framing, Framing::Empty);
        assert!(!req.close && req.idempotent);
        assert_eq!(req.request_id.as_bytes(), b"abc");
        let (method, target, headers) = reparse(&out);
        assert_eq!((method.as_str(), target.as_str()), ("GET", "/a?b=1"));
        assert_eq!(values(&headers, "host"), [b"app"]);
        assert!(values(&headers, "x-secret").is_empty());
        assert_eq!(values(&headers, "x-forwarded-for"), [b"10.0.0.1, 10.1.2.3"]);
        assert_eq!(values(&headers, "x-forwarded-proto"), [b"http"]);
        assert_eq!(values(&headers, "x-request-id"), [b"abc"]);
    }

    #[test]
    fn trace_context_is_continued_with_lameduck_as_the_parent() {
        let (head, out) = rewrite(
            b"GET / HTTP/1.1\r\nHost: a\r\n\
              traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
              tracestate: rojo=00f067aa0ba902b7\r\ntracestate: congo=t61rcWkgMzE\r\n\r\n",
        );
        let RequestHead::Forward(req) = head else {
            panic!("{head:?}")
        };
        let (_, _, headers) = reparse(&out);
        let sent = values(&headers, "traceparent");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0], &req.trace.traceparent()[..]);
        assert!(sent[0].starts_with(b"00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!sent[0].windows(16).any(|w| w == b"00f067aa0ba902b7"));
        assert_eq!(
            values(&headers, "tracestate"),
            [&b"rojo=00f067aa0ba902b7"[..], b"congo=t61rcWkgMzE"]
        );
    }

    #[test]
    fn a_broken_traceparent_starts_a_new_trace_and_drops_its_tracestate() {
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-01",
        ] {
            let input = format!(
                "GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {bad}\r\ntracestate: a=1\r\n\r\n"
            );
            let (head, out) = rewrite(input.as_bytes());
            assert!(matches!(head, RequestHead::Forward(_)), "{bad}");
            let (_, _, headers) = reparse(&out);
            let sent = values(&headers, "traceparent");
            assert_eq!(sent.len(), 1, "{bad}");
            assert!(
                !sent[0].starts_with(b"00-4bf92f3577b34da6a3ce929d0e0e4736"),
                "{bad}"
            );
            assert!(trace_context::parse_traceparent(sent[0]).is_some());
            assert!(values(&headers, "tracestate").is_empty(), "{bad}");
        }
    }

    #[test]
    fn what_this_path_does_not_handle_goes_to_hyper() {
        for input in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            let (head, _) = rewrite(input);
            assert!(
                matches!(head, RequestHead::Handoff(_)),
                "{}: {head:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn ambiguous_framing_or_target_is_refused_here() {
        for input in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let (head, _) = rewrite(input);
            assert!(
                matches!(head, RequestHead::Reject(_)),
                "{}: {head:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let cases: [(&[u8], bool, Framing, bool); 6] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                false,
                Framing::Length(5),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                true,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\n\r\n",
                false,
                Framing::UntilClose,
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false,
                Framing::Length(1),
                false,
            ),
        ];
        for (input, request_is_head, framing, reusable) in cases {
            let cx = ResponseContext {
                request_is_head,
                request_id: b"id",
                close: false,
            };
            let mut out = Vec::new();
            let ResponseHead::Forward(res) = parse_response(input, &cx, &mut out) else {
                panic!("{}", String::from_utf8_lossy(input))
            };
            assert_eq!(
                (res.framing, res.reusable),
                (framing, reusable),
                "{}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(res.close_client, framing == Framing::UntilClose);
        }
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(HOP_BY_HOP.to_vec()).prop_map(str::to_owned),
            Just("x-forwarded-for".to_owned()),
            Just("x-request-id".to_owned()),
            Just("host".to_owned()),
            "[A-Za-z][A-Za-z0-9-]{0,10}",
        ]
    }

    fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
        let method = proptest::sample::select(vec!["GET", "POST", "HEAD", "DELETE", "PURGE"]);
        let header = (header_name(), "[ -~]{0,30}");
        (
            method,
            "/[!-~]{0,30}",
            proptest::collection::vec(header, 0..12),
        )
            .prop_map(|(method, path, headers)| {
                // One Host up front, so most heads get past the rules.
                let mut s = format!("{method} {path} HTTP/1.1\r\nhost: app\r\n");
                for (name, value) in headers {
                    s.push_str(&format!("{name}: {value}\r\n"));
                }
                s.push_str("\r\n");
                s.into_bytes()
            })
    }

    proptest! {
        #[test]
        fn forwarded_heads_are_valid_and_carry_no_hop_by_hop_header(input in request_bytes()) {
            let (head, out) = rewrite(&input);
            let RequestHead::Forward(req) = head else { return Ok(()) };
            prop_assert_eq!(req.head_len, input.len());
            let (_, _, headers) = reparse(&out);
            for name in HOP_BY_HOP {
                let allowed = name == "transfer-encoding" && req.framing == Framing::Chunked;
                prop_assert!(allowed || values(&headers, name).is_empty(), "{} survived", name);
            }
            let xff = values(&headers, "x-forwarded-for");
            prop_assert_eq!(xff.len(), 1);
            prop_assert!(xff[0].ends_with(b"10.1.2.3"));
            prop_assert_eq!(values(&headers, "x-request-id"), vec![req.request_id.as_bytes()]);
            prop_assert!(!req.request_id.as_bytes().is_empty());
            prop_assert!(!values(&headers, "host").is_empty());
        }

        #[test]
        fn a_head_cut_short_is_partial(input in request_bytes(), cut in any::<proptest::sample::Index>()) {
            let cut = cut.index(input.len());
            let (head, out) = rewrite(&input[..cut]);
            prop_assert!(matches!(head, RequestHead::Partial | RequestHead::Handoff(_)), "{:?}", head);
            if matches!(head, RequestHead::Partial) {
                prop_assert!(out.is_empty());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = rewrite(&input);
            let cx = ResponseContext { request_is_head: false, request_id: b"id", close: true };
            let _ = parse_response(&input, &cx, &mut Vec::new());
        }

        #[test]
        fn forwarded_responses_are_valid_and_carry_the_request_id(
            status in 100u16..600,
            headers in proptest::collection::vec((header_name(), "[ -~]{0,30}"), 0..12),
            close in any::<bool>(),
        ) {
            let mut input = format!("HTTP/1.1 {status} Whatever\r\n");
            for (name, value) in &headers {
                input.push_str(&format!("{name}: {value}\r\n"));
            }
            input.push_str("\r\n");
            let cx = ResponseContext { request_is_head: false, request_id: b"the-id", close };
            let mut out = Vec::new();
            let ResponseHead::Forward(res) = parse_response(input.as_bytes(), &cx, &mut out) else {
                return Ok(());
            };
            let mut parsed = [httparse::EMPTY_HEADER; 128];
            let mut reparsed = httparse::Response::new(&mut parsed);
            prop_assert!(reparsed.parse(&out).unwrap().is_complete());
            prop_assert_eq!(reparsed.code, Some(res.status));
            let names: Vec<String> = reparsed.headers.iter().map(|h| h.name.to_ascii_lowercase()).collect();
            for name in ["te", "trailer", "upgrade", "keep-alive", "proxy-connection"] {
                prop_assert!(!names.iter().any(|n| n == name), "{} survived", name);
            }
            if status >= 200 {
                let ids: Vec<&[u8]> = reparsed.headers.iter().filter(|h| h.name == "x-request-id").map(|h| h.value).collect();
                prop_assert_eq!(ids, vec![&b"the-id"[..]]);
                let closes = reparsed.headers.iter().any(|h| h.name == "connection" && h.value == b"close");
                prop_assert_eq!(closes, res.close_client);
                prop_assert!(res.close_client || !close);
            }
        }
    }
}
