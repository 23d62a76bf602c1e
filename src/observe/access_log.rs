//! The access log: one line per request (per connection in TCP mode), written
//! after the response has ended, as JSON or logfmt-style text.
//!
//! The request path only fills an [`Entry`] and hands it over with
//! `try_send` on a bounded queue; one writer task (owned by the lifecycle)
//! formats and writes. A full queue drops the line and counts it
//! (`lameduck_access_log_dropped_total`): a slow disk or a blocked stderr
//! pipe must never slow a request. With the log off no `Entry` exists at all.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::trace_context::RequestTrace;

/// Lines queued for the writer at most; more are dropped and counted.
pub const QUEUE_LINES: usize = 8192;
/// On stderr, lines are written in batches of at most this many bytes: a
/// write of at most PIPE_BUF (4096 on Linux) to a pipe is atomic, so access
/// lines and the other logs never interleave mid-line.
const STDERR_BATCH_BYTES: usize = 4096;
/// How long the writer lets lines gather after the first one, at most.
const GATHER: Duration = Duration::from_millis(20);
/// A file has the access log to itself: larger batches, fewer writes (each
/// one a hop to tokio's blocking pool).
const FILE_BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// How a request (or TCP stream) ended: the `outcome` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The whole response reached the client (whatever its status).
    Ok,
    /// The client closed or reset before the response ended.
    ClientAborted,
    /// The client paused its request body past --body-read-timeout (408).
    ClientTimeout,
    /// lameduck answered 400 itself (ambiguous framing, a bad body).
    Refused,
    /// The exchange with the app failed; the kind is `metrics::UpstreamErrorKind`'s.
    Upstream(&'static str),
    /// Still running at the drain deadline (or a second signal).
    Forced,
    /// TCP mode: no byte either way for --tunnel-idle-timeout.
    IdleTimeout,
    /// TCP mode: the stream broke (a reset or an I/O error on either side).
    Aborted,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Ok => "ok",
            End::ClientAborted => "client_aborted",
            End::ClientTimeout => "client_timeout",
            End::Refused => "refused",
            End::Upstream("connect") => "upstream_connect",
            End::Upstream("connect_timeout") => "upstream_connect_timeout",
            End::Upstream("timeout") => "upstream_timeout",
            End::Upstream("closed") => "upstream_closed",
            End::Upstream(_) => "upstream_protocol",
            End::Forced => "forced",
            End::IdleTimeout => "idle_timeout",
            End::Aborted => "aborted",
        }
    }
}

/// One access-log line, filled on the request path.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request head was received.
    pub time: SystemTime,
    /// The request id, the method and the logged path, one after the other:
    /// one allocation per request rather than three.
    text: String,
    method_at: usize,
    path_at: usize,
    pub trace: Option<RequestTrace>,
    /// `HTTP/1.1`, `HTTP/2`, `tcp`.
    pub protocol: &'static str,
    /// 0 in TCP mode.
    pub status: u16,
    /// Body bytes from the client, counted as they are read; `None` while
    /// nothing of a non-empty body was read (hyper's path).
    pub request_bytes: Option<u64>,
    pub response_bytes: u64,
    pub duration: Duration,
    /// From the request head to the app's response head (TCP: the connect).
    pub upstream_head: Option<Duration>,
    /// A pooled app connection (true) or a new one (false); `None` when not
    /// known (the shared HTTP/2 connection, upgrades).
    pub upstream_reused: Option<bool>,
    pub retried: bool,
    /// The drain phase when the request arrived (`accepting` when not draining).
    pub phase: &'static str,
    pub end: End,
}

impl Entry {
    /// A line with no method or path (TCP mode, a request line that did not
    /// parse).
    pub fn new(request_id: &[u8], protocol: &'static str, phase: &'static str) -> Self {
        Self::for_request(request_id, "", "", false, protocol, phase)
    }

    /// A request's line. The path of `target` is kept without the query
    /// unless `with_query`.
    pub fn for_request(
        request_id: &[u8],
        method: &str,
        target: &str,
        with_query: bool,
        protocol: &'static str,
        phase: &'static str,
    ) -> Self {
        let path = if with_query {
            target
        } else {
            target.split_once('?').map_or(target, |(path, _)| path)
        };
        // Request ids are visible ASCII (ours always): no copy to fix them up.
        let id = String::from_utf8_lossy(request_id);
        let mut text = String::with_capacity(id.len() + method.len() + path.len());
        text.push_str(&id);
        let method_at = text.len();
        text.push_str(method);
        let path_at = text.len();
        text.push_str(path);
        Entry {
            time: SystemTime::now(),
            text,
            method_at,
            path_at,
            trace: None,
            protocol,
            status: 0,
            request_bytes: Some(0),
            response_bytes: 0,
            duration: Duration::ZERO,
            upstream_head: None,
            upstream_reused: None,
            retried: false,
            phase,
            end: End::Ok,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.text[..self.method_at]
    }

    /// Empty in TCP mode.
    pub fn method(&self) -> &str {
        &self.text[self.method_at..self.path_at]
    }

    /// Empty in TCP mode.
    pub fn path(&self) -> &str {
        &self.text[self.path_at..]
    }
}

/// The request path's handle: cheap to clone (one reference count: every
/// observed request holds one), never blocks.
#[derive(Clone)]
pub struct AccessLog(Arc<Queue>);

struct Queue {
    tx: mpsc::Sender<Box<Entry>>,
    dropped: Counter,
    with_query: bool,
}

impl AccessLog {
    /// The handle and the writer that drains it.
    pub fn new(format: Format, with_query: bool, dropped: Counter) -> (AccessLog, Writer) {
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        (
            AccessLog(Arc::new(Queue {
                tx,
                dropped: dropped.clone(),
                with_query,
            })),
            Writer {
                rx,
                lines: LineFormat::new(format),
                dropped,
            },
        )
    }

    /// Whether the logged path keeps the query (`--access-log-query`).
    pub fn with_query(&self) -> bool {
        self.0.with_query
    }

    pub fn submit(&self, entry: Box<Entry>) {
        if self.0.tx.try_send(entry).is_err() {
            self.0.dropped.inc();
        }
    }
}

/// Where the lines go.
pub enum Destination {
    Stderr,
    File(tokio::fs::File),
}

impl Destination {
    /// Opens `--access-log-file` for appending (created if missing).
    pub fn open(path: Option<&PathBuf>) -> io::Result<Destination> {
        let Some(path) = path else {
            return Ok(Destination::Stderr);
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Destination::File(tokio::fs::File::from_std(file)))
    }
}

/// The one task that writes access lines.
pub struct Writer {
    rx: mpsc::Receiver<Box<Entry>>,
    lines: LineFormat,
    dropped: Counter,
}

impl Writer {
    /// Writes lines until `stop`, then whatever is still queued, and flushes.
    pub async fn run(self, destination: Destination, stop: CancellationToken) {
        match destination {
            Destination::Stderr => {
                self.run_on(tokio::io::stderr(), STDERR_BATCH_BYTES, stop)
                    .await
            }
            Destination::File(file) => self.run_on(file, FILE_BATCH_BYTES, stop).await,
        }
    }

    async fn run_on<W: AsyncWrite + Unpin>(
        mut self,
        mut out: W,
        batch: usize,
        stop: CancellationToken,
    ) {
        let mut buf = Vec::with_capacity(2 * batch);
        let mut failed = false;
        loop {
            let first = tokio::select! {
                biased;
                entry = self.rx.recv() => entry,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            // Let lines gather: woken per line, the writer would cost a task
            // switch and a write per request (the queue holds far more than
            // what arrives meanwhile).
            tokio::select! {
                () = tokio::time::sleep(GATHER) => {}
                () = stop.cancelled() => {}
            }
            self.write_batch(Some(first), batch, &mut buf, &mut out, &mut failed)
                .await;
            while !self.rx.is_empty() && !stop.is_cancelled() {
                self.write_batch(None, batch, &mut buf, &mut out, &mut failed)
                    .await;
            }
        }
        // Stopping: the requests are done, so what is queued is all there is.
        while !self.rx.is_empty() {
            self.write_batch(None, batch, &mut buf, &mut out, &mut failed)
                .await;
        }
        let _ = out.flush().await;
    }

    async fn write_batch<W: AsyncWrite + Unpin>(
        &mut self,
        first: Option<Box<Entry>>,
        limit: usize,
        buf: &mut Vec<u8>,
        out: &mut W,
        failed: &mut bool,
    ) {
        buf.clear();
        let mut lines = 0u64;
        if let Some(first) = first {
            self.lines.push(&first, buf);
            lines += 1;
        }
        while buf.len() < limit {
            let Ok(entry) = self.rx.try_recv() else { break };
            let before = buf.len();
            self.lines.push(&entry, buf);
            if buf.len() > limit && before > 0 {
                // Keep the batch atomic: this line starts the next one. In
                // place, so the buffer keeps its capacity (no allocation
                // per batch).
                self.write(&buf[..before], out, failed, lines).await;
                buf.copy_within(before.., 0);
                buf.truncate(buf.len() - before);
                lines = 0;
            }
            lines += 1;
        }
        self.write(buf, out, failed, lines).await;
    }

    async fn write<W: AsyncWrite + Unpin>(
        &self,
        buf: &[u8],
        out: &mut W,
        failed: &mut bool,
        lines: u64,
    ) {
        if buf.is_empty() {
            return;
        }
        let written = async {
            out.write_all(buf).await?;
            out.flush().await
        };
        if let Err(error) = written.await {
            // Counted as dropped; warned about once (a full disk repeats).
            self.dropped.inc_by(lines);
            if !std::mem::replace(failed, true) {
                tracing::warn!(%error, "cannot write the access log; its lines are dropped and counted");
            }
        }
    }
}

fn upstream_connection(e: &Entry) -> Option<&'static str> {
    e.upstream_reused.map(|r| if r { "reused" } else { "new" })
}

/// Appends `bytes` as lowercase hex.
fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + bytes.len() * 2, 0);
    super::trace_context::hex_write(bytes, &mut out[start..]);
}

/// Appends `n` in decimal. By hand: `core::fmt` machinery was most of the
/// writer's cost per line.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `n` as exactly `width` digits, zero-padded.
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends `d` in milliseconds to the microsecond, as the shortest decimal
/// (`1.5`, `0.012`, `20`).
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let micros = (d.as_nanos() + 500) / 1000;
    let micros = u64::try_from(micros).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    let mut fraction = micros % 1000;
    if fraction != 0 {
        let mut width = 3;
        while fraction % 10 == 0 {
            fraction /= 10;
            width -= 1;
        }
        out.push(b'.');
        push_padded(out, fraction, width);
    }
}

/// Appends `s` as a JSON string (RFC 8259 §7 escapes). Runs of bytes that
/// need no escape (all of them, in practice) are copied whole.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if escaped.is_empty() {
            out.extend_from_slice(b"\\u00");
            push_hex(out, &[b]);
        } else {
            out.extend_from_slice(escaped);
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Appends `,"key":value`, or `null` for none.
fn push_number(out: &mut Vec<u8>, key: &str, value: Option<u64>) {
    push_key(out, key);
    match value {
        Some(v) => push_u64(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends `,"key":`.
fn push_key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// The timestamps of one writer's lines: the date and time to the second
/// are formatted once per second, the microseconds per line.
#[derive(Debug, Default)]
struct Clock {
    /// (Unix second, `YYYY-MM-DDTHH:MM:SS` of it), the last one formatted.
    second: Option<(u64, [u8; 19])>,
}

impl Clock {
    /// Appends `time` as RFC 3339 in UTC with microseconds.
    fn push(&mut self, time: SystemTime, out: &mut Vec<u8>) {
        let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since_epoch.as_secs();
        let prefix = match self.second {
            Some((cached, prefix)) if cached == second => prefix,
            _ => {
                let whole = UNIX_EPOCH + Duration::from_secs(second);
                let text = humantime::format_rfc3339_seconds(whole).to_string();
                let mut prefix = [0u8; 19];
                // `YYYY-MM-DDTHH:MM:SSZ`: four-digit years until 9999.
                prefix.copy_from_slice(&text.as_bytes()[..19]);
                self.second = Some((second, prefix));
                prefix
            }
        };
        out.extend_from_slice(&prefix);
        out.push(b'.');
        push_padded(out, u64::from(since_epoch.subsec_micros()), 6);
        out.push(b'Z');
    }
}

/// Formats lines, straight into the batch buffer: no intermediate strings
/// and no `core::fmt` on the JSON path (the writer shares the proxy's
/// threads, so its cost is the proxy's).
#[derive(Debug)]
struct LineFormat {
    format: Format,
    clock: Clock,
}

impl LineFormat {
    fn new(format: Format) -> Self {
        LineFormat {
            format,
            clock: Clock::default(),
        }
    }

    /// Appends one line (with its newline) for `e`.
    fn push(&mut self, e: &Entry, out: &mut Vec<u8>) {
        match self.format {
            Format::Json => self.push_json(e, out),
            Format::Text => self.push_text(e, out),
        }
    }

    fn push_json(&mut self, e: &Entry, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        self.clock.push(e.time, out);
        out.extend_from_slice(
            b"\",\"level\":\"INFO\",\"target\":\"lameduck::access\",\"message\":\"access\",\"request_id\":",
        );
        push_json_str(out, e.request_id());
        match &e.trace {
            Some(t) => {
                out.extend_from_slice(b",\"trace_id\":\"");
                push_hex(out, &t.trace_id);
                out.extend_from_slice(b"\",\"span_id\":\"");
                push_hex(out, &t.span_id);
                out.push(b'"');
            }
            None => out.extend_from_slice(b",\"trace_id\":null,\"span_id\":null"),
        }
        for (key, value) in [("method", e.method()), ("path", e.path())] {
            push_key(out, key);
            if value.is_empty() {
                out.extend_from_slice(b"null");
            } else {
                push_json_str(out, value);
            }
        }
        out.extend_from_slice(b",\"protocol\":\"");
        out.extend_from_slice(e.protocol.as_bytes());
        out.push(b'"');
        push_number(
            out,
            "status",
            (e.status != 0).then_some(u64::from(e.status)),
        );
        push_number(out, "request_bytes", e.request_bytes);
        push_number(out, "response_bytes", Some(e.response_bytes));
        push_key(out, "duration_ms");
        push_ms(out, e.duration);
        push_key(out, "upstream_head_ms");
        match e.upstream_head {
            Some(head) => push_ms(out, head),
            None => out.extend_from_slice(b"null"),
        }
        push_key(out, "upstream_connection");
        match upstream_connection(e) {
            Some(c) => {
                out.push(b'"');
                out.extend_from_slice(c.as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        let bool_text = |b: bool| -> &'static [u8] { if b { b"true" } else { b"false" } };
        push_key(out, "retried");
        out.extend_from_slice(bool_text(e.retried));
        push_key(out, "draining");
        out.extend_from_slice(bool_text(e.phase != "accepting"));
        out.extend_from_slice(b",\"phase\":\"");
        out.extend_from_slice(e.phase.as_bytes());
        out.extend_from_slice(b"\",\"outcome\":\"");
        out.extend_from_slice(e.end.as_str().as_bytes());
        out.extend_from_slice(b"\"}\n");
    }

    fn push_text(&mut self, e: &Entry, out: &mut Vec<u8>) {
        use std::io::Write;
        self.clock.push(e.time, out);
        let _ = write!(out, " access request_id={:?} trace_id=", e.request_id());
        match &e.trace {
            Some(t) => {
                push_hex(out, &t.trace_id);
                out.extend_from_slice(b" span_id=");
                push_hex(out, &t.span_id);
            }
            None => out.extend_from_slice(b"- span_id=-"),
        }
        let or_dash = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
        let _ = write!(
            out,
            " method={} path={:?} protocol={} status=",
            or_dash(e.method()),
            or_dash(e.path()),
            e.protocol,
        );
        let dash_or = |out: &mut Vec<u8>, n: Option<u64>| match n {
            Some(n) => push_u64(out, n),
            None => out.push(b'-'),
        };
        dash_or(out, (e.status != 0).then_some(u64::from(e.status)));
        out.extend_from_slice(b" request_bytes=");
        dash_or(out, e.request_bytes);
        out.extend_from_slice(b" response_bytes=");
        push_u64(out, e.response_bytes);
        out.extend_from_slice(b" duration_ms=");
        push_ms(out, e.duration);
        out.extend_from_slice(b" upstream_head_ms=");
        match e.upstream_head {
            Some(head) => push_ms(out, head),
            None => out.push(b'-'),
        }
        let _ = writeln!(
            out,
            " upstream_connection={} retried={} draining={} phase={} outcome={}",
            upstream_connection(e).unwrap_or("-"),
            e.retried,
            e.phase != "accepting",
            e.phase,
            e.end.as_str(),
        );
    }
}

/// Appends one line (with its newline) for `e`, as the writer does.
pub fn format_line(e: &Entry, format: Format, out: &mut Vec<u8>) {
    LineFormat::new(format).push(e, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut e = Entry::for_request(b"abc", "GET", "/a b?q=1", false, "HTTP/1.1", "lame_duck");
        e.status = 200;
        e.response_bytes = 5;
        e.duration = Duration::from_micros(1500);
        e.upstream_head = Some(Duration::from_micros(1200));
        e.upstream_reused = Some(true);
        e
    }

    #[test]
    fn json_lines_carry_every_field() {
        let mut out = Vec::new();
        format_line(&entry(), Format::Json, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["message"], "access");
        assert_eq!(v["path"], "/a b");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["upstream_head_ms"], 1.2);
        assert_eq!(v["upstream_connection"], "reused");
        assert_eq!(v["draining"], true);
        assert_eq!(v["trace_id"], serde_json::Value::Null);
        assert_eq!(v["outcome"], "ok");
        assert_eq!(v["request_bytes"], 0);
        assert_eq!(v["status"], 200);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut e = Entry::for_request(
            b"abc",
            "GET",
            "/a\"b\\c\u{1}\u{e9}\u{7f}\n",
            false,
            "HTTP/1.1",
            "accepting",
        );
        e.request_bytes = None;
        let mut out = Vec::new();
        format_line(&e, Format::Json, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}\u{e9}\u{7f}\n");
        assert_eq!(v["request_bytes"], serde_json::Value::Null);
    }

    #[test]
    fn text_lines_quote_what_may_hold_spaces() {
        let mut out = Vec::new();
        format_line(&entry(), Format::Text, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains(" path=\"/a b\" "), "{line}");
        assert!(line.contains(" status=200 "), "{line}");
        assert!(line.ends_with(" outcome=ok\n"), "{line}");
    }

    #[test]
    fn the_query_is_kept_only_when_asked() {
        let e = Entry::for_request(b"id", "GET", "/p?secret=1", true, "HTTP/1.1", "accepting");
        assert_eq!(
            (e.request_id(), e.method(), e.path()),
            ("id", "GET", "/p?secret=1")
        );
        let e = Entry::for_request(b"id", "GET", "/p?secret=1", false, "HTTP/1.1", "accepting");
        assert_eq!(e.path(), "/p");
    }

    #[test]
    fn numbers_and_times_read_as_before() {
        let mut e = entry();
        for (micros, text) in [
            (1500, "1.5"),
            (12, "0.012"),
            (20_000, "20"),
            (1_234_567, "1234.567"),
            (0, "0"),
        ] {
            e.duration = Duration::from_micros(micros);
            let mut out = Vec::new();
            format_line(&e, Format::Json, &mut out);
            let line = String::from_utf8(out).unwrap();
            assert!(
                line.contains(&format!(",\"duration_ms\":{text},")),
                "{line}"
            );
        }
        // The cached second and the microseconds, across a second's change.
        let mut lines = LineFormat::new(Format::Json);
        for t in [
            1_700_000_000_999_999u64,
            1_700_000_001_000_001,
            1_700_000_001_500_000,
        ] {
            e.time = UNIX_EPOCH + Duration::from_micros(t);
            let mut out = Vec::new();
            lines.push(&e, &mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let expected = humantime::format_rfc3339_micros(e.time).to_string();
            assert_eq!(v["timestamp"], expected.as_str());
        }
    }

    /// Records every write as it came.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn batches_are_whole_lines_within_the_limit() {
        let (log, writer) = AccessLog::new(Format::Json, false, Counter::default());
        const LINES: usize = 500;
        for i in 0..LINES {
            let id = format!("request-{i}");
            let mut e =
                Entry::for_request(id.as_bytes(), "GET", "/x", false, "HTTP/1.1", "accepting");
            e.response_bytes = i as u64;
            log.submit(Box::new(e));
        }
        let stop = CancellationToken::new();
        stop.cancel();
        let mut writes = Writes::default();
        writer.run_on(&mut writes, STDERR_BATCH_BYTES, stop).await;
        assert!(writes.0.len() > 1, "{} writes", writes.0.len());
        let mut seen = 0;
        for batch in &writes.0 {
            assert!(batch.len() <= STDERR_BATCH_BYTES, "{} bytes", batch.len());
            assert!(batch.ends_with(b"\n"));
            for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                assert_eq!(v["request_id"], format!("request-{seen}").as_str());
                assert_eq!(v["response_bytes"], seen);
                seen += 1;
            }
        }
        assert_eq!(seen, LINES);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dropped = Counter::default();
        let (log, writer) = AccessLog::new(Format::Json, false, dropped.clone());
        for _ in 0..QUEUE_LINES + 3 {
            log.submit(Box::new(entry()));
        }
        assert_eq!(dropped.get(), 3);
        drop(writer);
    }
}
