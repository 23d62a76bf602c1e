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
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::trace_context::RequestTrace;

/// Lines queued for the writer at most; more are dropped and counted.
pub const QUEUE_LINES: usize = 8192;
/// Lines are written in batches of at most this many bytes: a write of at most
/// PIPE_BUF (4096 on Linux) to a pipe is atomic, so access lines and the
/// other logs on stderr never interleave mid-line.
const BATCH_BYTES: usize = 4096;

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
    /// Body bytes from the client; `None` where unknown (a streamed body on
    /// hyper's path).
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
            Destination::Stderr => self.run_on(tokio::io::stderr(), stop).await,
            Destination::File(file) => self.run_on(file, stop).await,
        }
    }

    async fn run_on<W: AsyncWrite + Unpin>(mut self, mut out: W, stop: CancellationToken) {
        let mut buf = Vec::with_capacity(2 * BATCH_BYTES);
        let mut failed = false;
        loop {
            let first = tokio::select! {
                biased;
                entry = self.rx.recv() => entry,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            self.write_batch(Some(first), &mut buf, &mut out, &mut failed)
                .await;
        }
        // Stopping: the requests are done, so what is queued is all there is.
        while !self.rx.is_empty() {
            self.write_batch(None, &mut buf, &mut out, &mut failed)
                .await;
        }
        let _ = out.flush().await;
    }

    async fn write_batch<W: AsyncWrite + Unpin>(
        &mut self,
        first: Option<Box<Entry>>,
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
        while buf.len() < BATCH_BYTES {
            let Ok(entry) = self.rx.try_recv() else { break };
            let before = buf.len();
            format_line(&entry, self.format, buf);
            if buf.len() > BATCH_BYTES && before > 0 {
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

#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: String,
    level: &'static str,
    target: &'static str,
    message: &'static str,
    request_id: &'a str,
    trace_id: Option<String>,
    span_id: Option<String>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: &'static str,
    status: Option<u16>,
    request_bytes: Option<u64>,
    response_bytes: u64,
    duration_ms: f64,
    upstream_head_ms: Option<f64>,
    upstream_connection: Option<&'static str>,
    retried: bool,
    draining: bool,
    phase: &'static str,
    outcome: &'static str,
}

fn upstream_connection(e: &Entry) -> Option<&'static str> {
    e.upstream_reused.map(|r| if r { "reused" } else { "new" })
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    super::trace_context::hex_write(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends one line (with its newline) for `e`.
pub fn format_line(e: &Entry, format: Format, out: &mut Vec<u8>) {
    let timestamp = humantime::format_rfc3339_micros(e.time).to_string();
    let trace_id = e.trace.map(|t| hex(&t.trace_id));
    let span_id = e.trace.map(|t| hex(&t.span_id));
    match format {
        Format::Json => {
            let line = JsonLine {
                timestamp,
                level: "INFO",
                target: "lameduck::access",
                message: "access",
                request_id: &e.request_id,
                trace_id,
                span_id,
                method: (!e.method.is_empty()).then_some(e.method.as_str()),
                path: (!e.path.is_empty()).then_some(e.path.as_str()),
                protocol: e.protocol,
                status: (e.status != 0).then_some(e.status),
                request_bytes: e.request_bytes,
                response_bytes: e.response_bytes,
                duration_ms: ms(e.duration),
                upstream_head_ms: e.upstream_head.map(ms),
                upstream_connection: upstream_connection(e),
                retried: e.retried,
                draining: e.phase != "accepting",
                phase: e.phase,
                outcome: e.end.as_str(),
            };
            // Serialising plain strings and numbers cannot fail.
            let _ = serde_json::to_writer(&mut *out, &line);
            out.push(b'\n');
        }
        Format::Text => {
            use std::io::Write;
            let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                out,
                "{timestamp} access request_id={:?} trace_id={} span_id={} method={} path={:?} protocol={} status={} request_bytes={} response_bytes={} duration_ms={} upstream_head_ms={} upstream_connection={} retried={} draining={} phase={} outcome={}",
                e.request_id,
                dash(trace_id),
                dash(span_id),
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
