//! The lab's load generator: clients that run on the lab's runtime (so their
//! sockets are in the lab's netns) against a Service's ClusterIP, and count
//! every request by outcome. Every loop is bounded in time and in count.
//!
//! HTTP/1 is spoken by hand (one request, one response with Content-Length or
//! chunked), so a failure can be classified exactly: refused at connect, reset,
//! EOF before a complete response, timeout, 5xx. A `Connection: close` in a
//! response (lameduck's signal during a drain) is honoured: the next request
//! goes on a new connection, and that is not a failure.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How each client talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1, one connection reused for request after request.
    KeepAlive,
    /// HTTP/1.1, a new connection per request (`Connection: close`).
    PerRequest,
    /// HTTP/2 (prior knowledge), requests one after another on a connection.
    Http2,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::KeepAlive => "HTTP/1.1 keep-alive",
            Kind::PerRequest => "HTTP/1.1 conn/request",
            Kind::Http2 => "HTTP/2",
        })
    }
}

/// Requests by outcome.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    /// Connect refused (nothing listening at the endpoint kube-proxy chose).
    pub refused: AtomicU64,
    /// ECONNRESET / EPIPE, or an HTTP/2 stream reset, on a sent request.
    pub reset: AtomicU64,
    /// The connection closed before a complete response.
    pub eof: AtomicU64,
    /// No response (or no connection) within the timeout.
    pub timeout: AtomicU64,
    /// A response with status >= 500.
    pub status_5xx: AtomicU64,
    /// Anything else (printed to stderr, first few only).
    pub other: AtomicU64,
    /// Re-sent, not failed: an HTTP/2 request the server never processed.
    /// Either hyper reported it `Canceled` (queued on a connection that
    /// closed after the server's GOAWAY, before it was written), or h2 failed
    /// it with the server's graceful GOAWAY (NO_ERROR): its stream was above
    /// the GOAWAY's last stream id, or opened after it, which RFC 9113 §6.8
    /// says the server did not process and a client may retry. The load
    /// generator sends it again once on a new connection, as hyper-util's
    /// pooled Client, Go's and gRPC's HTTP/2 clients do by themselves; a
    /// re-send that fails is counted as a failure of its kind.
    pub unsent: AtomicU64,
}

/// A snapshot of a [`Tally`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    pub eof: u64,
    pub timeout: u64,
    pub status_5xx: u64,
    pub other: u64,
    pub unsent: u64,
}

impl Counts {
    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.eof + self.timeout + self.status_5xx + self.other
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok {} failed {} (refused {}, reset {}, eof {}, timeout {}, 5xx {}, other {}); unsent {}",
            self.ok,
            self.failed(),
            self.refused,
            self.reset,
            self.eof,
            self.timeout,
            self.status_5xx,
            self.other,
            self.unsent
        )
    }
}

impl Tally {
    pub fn counts(&self) -> Counts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            ok: g(&self.ok),
            refused: g(&self.refused),
            reset: g(&self.reset),
            eof: g(&self.eof),
            timeout: g(&self.timeout),
            status_5xx: g(&self.status_5xx),
            other: g(&self.other),
            unsent: g(&self.unsent),
        }
    }
}

/// Failure of one request.
#[derive(Debug)]
enum Fail {
    Refused,
    Reset,
    Eof,
    Timeout,
    Status(u16),
    Other(String),
    Unsent,
}

impl Fail {
    fn of(e: &io::Error) -> Fail {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Fail::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Fail::Reset,
            io::ErrorKind::UnexpectedEof => Fail::Eof,
            io::ErrorKind::TimedOut => Fail::Timeout,
            _ => Fail::Other(e.to_string()),
        }
    }

    fn count(self, t: &Tally, what: Kind) {
        self.count_because(t, what, "");
    }

    /// Counts it; the first few are printed with `why` (the error's own
    /// words, e.g. an HTTP/2 reason code), for a post-mortem.
    fn count_because(self, t: &Tally, what: Kind, why: &str) {
        let c = match &self {
            Fail::Refused => &t.refused,
            Fail::Reset => &t.reset,
            Fail::Eof => &t.eof,
            Fail::Timeout => &t.timeout,
            Fail::Status(_) => &t.status_5xx,
            Fail::Other(_) => &t.other,
            Fail::Unsent => &t.unsent,
        };
        if c.fetch_add(1, Ordering::Relaxed) < 3 {
            eprintln!("load: {what}: failed request: {self:?} {why}");
        }
    }
}

/// Running clients; [`Load::stop`] ends them and returns the counts.
pub struct Load {
    pub kind: Kind,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    workers: Vec<JoinHandle<()>>,
}

/// A request that gets no answer within this is a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Hard bound per client, whatever the test does.
const MAX_REQUESTS_PER_CLIENT: u64 = 5_000_000;

impl Load {
    /// `clients` clients of `kind` against `addr`, for at most `max` (or
    /// until [`Load::stop`]).
    pub fn start(addr: SocketAddr, kind: Kind, clients: usize, max: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let until = Instant::now() + max;
        let workers = (0..clients)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                tokio::spawn(async move {
                    let go = || !stop.load(Ordering::Relaxed) && Instant::now() < until;
                    match kind {
                        Kind::KeepAlive | Kind::PerRequest => {
                            http1_client(addr, kind, &tally, go).await
                        }
                        Kind::Http2 => http2_client(addr, &tally, go).await,
                    }
                })
            })
            .collect();
        Load {
            kind,
            stop,
            tally,
            workers,
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.tally.counts()
    }

    /// Waits until one client has been served through `addr` (a new
    /// Service's ClusterIP works only once kube-proxy has programmed it, up
    /// to a second or more after the Deployment is available); what failed
    /// before that is not counted anywhere. Panics after `within`.
    pub async fn wait_until_served(addr: SocketAddr, within: Duration) {
        let probe = Load::start(addr, Kind::PerRequest, 1, within);
        let until = Instant::now() + within;
        while probe.counts().ok == 0 {
            assert!(
                Instant::now() < until,
                "{addr} served nothing within {within:?}: {}",
                probe.counts()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        probe.stop().await;
    }

    /// Stops the clients (each finishes its request in flight) and returns
    /// the final counts.
    pub async fn stop(self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, w).await;
        }
        self.tally.counts()
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, Fail> {
    match tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(Fail::of(&e)),
        Err(_) => Err(Fail::Timeout),
    }
}

/// After a failure, a short pause keeps a client from spinning on an address
/// that refuses (bounded retry rate, not a synchronisation).
const BACKOFF: Duration = Duration::from_millis(10);

async fn http1_client(addr: SocketAddr, kind: Kind, tally: &Tally, go: impl Fn() -> bool) {
    let request: &[u8] = if kind == Kind::KeepAlive {
        b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
    };
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..MAX_REQUESTS_PER_CLIENT {
        if !go() {
            break;
        }
        let mut stream = match conn.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(f) => {
                    f.count(tally, kind);
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            },
        };
        let exchange = async {
            stream.write_all(request).await.map_err(|e| Fail::of(&e))?;
            read_response(&mut stream, &mut buf).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok((status, keep))) if status < 500 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                if keep && kind == Kind::KeepAlive {
                    conn = Some(stream);
                }
            }
            Ok(Ok((status, _))) => Fail::Status(status).count(tally, kind),
            Ok(Err(f)) => {
                f.count(tally, kind);
                tokio::time::sleep(BACKOFF).await;
            }
            Err(_) => Fail::Timeout.count(tally, kind),
        }
    }
}

/// Reads one response; returns its status and whether the connection may be
/// reused.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, bool), Fail> {
    buf.clear();
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(Fail::Other("response head over 64 KiB".into()));
        }
        read_more(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Fail::Other(format!("bad status line: {head:?}")))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    let keep = header("connection").is_none_or(|v| !v.contains("close"));
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| Fail::Other(format!("bad content-length {len}")))?;
        while buf.len() < head_end + len {
            read_more(stream, buf).await?;
        }
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while find(&buf[head_end..], b"0\r\n\r\n").is_none() {
            read_more(stream, buf).await?;
        }
    } else {
        // Delimited by close.
        loop {
            match stream.read_buf(buf).await {
                Ok(0) => return Ok((status, false)),
                Ok(_) => {}
                Err(e) => return Err(Fail::of(&e)),
            }
        }
    }
    Ok((status, keep))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Fail> {
    match stream.read_buf(buf).await {
        Ok(0) => Err(Fail::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(Fail::of(&e)),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn http2_client(addr: SocketAddr, tally: &Tally, go: impl Fn() -> bool) {
    let mut sender: Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> = None;
    // A request hyper never wrote (its connection closed after GOAWAY) is
    // sent again once on a new connection, as pooled HTTP/2 clients do; if
    // that fails too, it counts as failed.
    let mut resend = false;
    for _ in 0..MAX_REQUESTS_PER_CLIENT {
        if !go() && !resend {
            break;
        }
        // A connection that got GOAWAY stops being ready: a new one, and no
        // request was lost.
        let reusable = match sender.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut s = match reusable {
            Some(s) => s,
            None => {
                let stream = match connect(addr).await {
                    Ok(s) => s,
                    Err(f) => {
                        f.count(tally, Kind::Http2);
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                };
                match hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                {
                    Ok((s, conn)) => {
                        tokio::spawn(conn);
                        s
                    }
                    Err(e) => {
                        h2_fail(&e).count_because(
                            tally,
                            Kind::Http2,
                            &format!("(handshake: {e:?})"),
                        );
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                }
            }
        };
        let req = http::Request::get(format!("http://{addr}/"))
            .body(Empty::<Bytes>::new())
            .expect("a static request");
        let exchange = async {
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(status)) if status < 500 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                sender = Some(s);
                resend = false;
            }
            Ok(Ok(status)) => {
                Fail::Status(status).count(tally, Kind::Http2);
                sender = Some(s);
                resend = false;
            }
            Ok(Err(e)) if never_processed(&e) && !resend => {
                tally.unsent.fetch_add(1, Ordering::Relaxed);
                resend = true;
            }
            Ok(Err(e)) => {
                resend = false;
                h2_fail(&e).count_because(tally, Kind::Http2, &format!("({e:?})"));
                tokio::time::sleep(BACKOFF).await;
            }
            Err(_) => {
                resend = false;
                Fail::Timeout.count(tally, Kind::Http2)
            }
        }
    }
}

/// The first I/O or h2 error in `e`'s chain of sources.
enum Cause<'a> {
    Io(&'a io::Error),
    H2(&'a h2::Error),
}

fn cause(e: &hyper::Error) -> Option<Cause<'_>> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return Some(Cause::Io(io));
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return Some(Cause::H2(h2));
        }
        src = s.source();
    }
    None
}

/// The server did not process the request: see `Tally::unsent`.
fn never_processed(e: &hyper::Error) -> bool {
    e.is_canceled()
        || matches!(cause(e), Some(Cause::H2(h2))
            if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
}

fn h2_fail(e: &hyper::Error) -> Fail {
    if never_processed(e) {
        return Fail::Unsent;
    }
    match cause(e) {
        Some(Cause::Io(io)) => return Fail::of(io),
        Some(Cause::H2(h2)) if h2.is_io() || h2.is_reset() || h2.is_go_away() => {
            return Fail::Reset;
        }
        Some(Cause::H2(h2)) => return Fail::Other(h2.to_string()),
        None => {}
    }
    if e.is_incomplete_message() || e.is_closed() {
        return Fail::Eof;
    }
    Fail::Other(e.to_string())
}
