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
use std::time::{Duration, SystemTime};

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
    pub request_id: String,
    pub trace: Option<RequestTrace>,
    /// Empty in TCP mode.
    pub method: String,
    pub path: String,
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
    pub fn new(request_id: String, protocol: &'static str, phase: &'static str) -> Self {
        Entry {
            time: SystemTime::now(),
            request_id,
            trace: None,
            method: String::new(),
            path: String::new(),
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

    /// Keeps the path of a request target, without the query unless asked.
    pub fn set_target(&mut self, target: &str, with_query: bool) {
        let path = if with_query {
            target
        } else {
            target.split_once('?').map_or(target, |(path, _)| path)
        };
        self.path = path.to_owned();
    }
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Box<Entry>>,
    dropped: Counter,
    pub with_query: bool,
}

impl AccessLog {
    /// The handle and the writer that drains it.
    pub fn new(format: Format, with_query: bool, dropped: Counter) -> (AccessLog, Writer) {
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        (
            AccessLog {
                tx,
                dropped: dropped.clone(),
                with_query,
            },
            Writer {
                rx,
                format,
                dropped,
            },
        )
    }

    pub fn submit(&self, entry: Box<Entry>) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.inc();
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
    format: Format,
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
            format_line(&first, self.format, buf);
            lines += 1;
        }
        while buf.len() < limit {
            let Ok(entry) = self.rx.try_recv() else { break };
            let before = buf.len();
            format_line(&entry, self.format, buf);
            if buf.len() > limit && before > 0 {
                // Keep the batch atomic: this line starts the next one.
                let rest = buf.split_off(before);
                self.write(buf, out, failed, lines).await;
                *buf = rest;
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

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
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

/// Appends `s` as a JSON string (RFC 8259 §7 escapes).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => {
                use std::io::Write;
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Appends `,"key":value`, or `null` for none.
fn push_number(out: &mut Vec<u8>, key: &str, value: Option<impl std::fmt::Display>) {
    use std::io::Write;
    let _ = match value {
        Some(v) => write!(out, ",\"{key}\":{v}"),
        None => write!(out, ",\"{key}\":null"),
    };
}

/// Appends one line (with its newline) for `e`. Written straight into the
/// batch buffer: no intermediate strings (the writer shares the proxy's
/// threads, so its cost is the proxy's).
pub fn format_line(e: &Entry, format: Format, out: &mut Vec<u8>) {
    use std::io::Write;
    let time = humantime::format_rfc3339_micros(e.time);
    match format {
        Format::Json => {
            let _ = write!(
                out,
                "{{\"timestamp\":\"{time}\",\"level\":\"INFO\",\"target\":\"lameduck::access\",\"message\":\"access\",\"request_id\":"
            );
            push_json_str(out, &e.request_id);
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
            for (key, value) in [("method", &e.method), ("path", &e.path)] {
                let _ = write!(out, ",\"{key}\":");
                if value.is_empty() {
                    out.extend_from_slice(b"null");
                } else {
                    push_json_str(out, value);
                }
            }
            let _ = write!(out, ",\"protocol\":\"{}\"", e.protocol);
            push_number(out, "status", (e.status != 0).then_some(e.status));
            push_number(out, "request_bytes", e.request_bytes);
            push_number(out, "response_bytes", Some(e.response_bytes));
            push_number(out, "duration_ms", Some(ms(e.duration)));
            push_number(out, "upstream_head_ms", e.upstream_head.map(ms));
            out.extend_from_slice(b",\"upstream_connection\":");
            match upstream_connection(e) {
                Some(c) => {
                    let _ = write!(out, "\"{c}\"");
                }
                None => out.extend_from_slice(b"null"),
            }
            let _ = writeln!(
                out,
                ",\"retried\":{},\"draining\":{},\"phase\":\"{}\",\"outcome\":\"{}\"}}",
                e.retried,
                e.phase != "accepting",
                e.phase,
                e.end.as_str()
            );
        }
        Format::Text => {
            let _ = write!(out, "{time} access request_id={:?} trace_id=", e.request_id);
            match &e.trace {
                Some(t) => {
                    push_hex(out, &t.trace_id);
                    out.extend_from_slice(b" span_id=");
                    push_hex(out, &t.span_id);
                }
                None => out.extend_from_slice(b"- span_id=-"),
            }
            let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                out,
                " method={} path={:?} protocol={} status={} request_bytes={} response_bytes={} duration_ms={} upstream_head_ms={} upstream_connection={} retried={} draining={} phase={} outcome={}",
                if e.method.is_empty() { "-" } else { &e.method },
                if e.path.is_empty() { "-" } else { &e.path },
                e.protocol,
                dash((e.status != 0).then(|| e.status.to_string())),
                dash(e.request_bytes.map(|n| n.to_string())),
                e.response_bytes,
                ms(e.duration),
                dash(e.upstream_head.map(|d| ms(d).to_string())),
                upstream_connection(e).unwrap_or("-"),
                e.retried,
                e.phase != "accepting",
                e.phase,
                e.end.as_str(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut e = Entry::new("abc".into(), "HTTP/1.1", "lame_duck");
        e.method = "GET".into();
        e.set_target("/a b?q=1", false);
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
        let mut e = entry();
        e.path = "/a\"b\\c\u{1}\u{e9}".into();
        e.request_bytes = None;
        let mut out = Vec::new();
        format_line(&e, Format::Json, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}\u{e9}");
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
        let mut e = entry();
        e.set_target("/p?secret=1", true);
        assert_eq!(e.path, "/p?secret=1");
        e.set_target("/p?secret=1", false);
        assert_eq!(e.path, "/p");
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
