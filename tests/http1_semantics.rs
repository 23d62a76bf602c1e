//! HTTP/1.1 proxying semantics, black-box. Each test scripts the exact bytes
//! an upstream app sends (a small hand-written TCP server inside the test that
//! also records every request it reads), puts a lameduck in front of it, and
//! checks what a raw client and the app see: framing (Content-Length, chunked,
//! close-delimited, HEAD / 204 / 304, 1xx), pipelining, keep-alive after every
//! kind of exchange, header rewriting both ways, stale pooled connections and
//! upstream failures.

mod support;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use support::*;

// ---------------------------------------------------------------------------
// A scripted upstream
// ---------------------------------------------------------------------------

/// Bound on every single read or write the scripted upstream does.
const UPSTREAM_IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Larger request heads, chunk lines or bodies are treated as garbage.
const UPSTREAM_MAX_HEAD: usize = 1 << 20;
const UPSTREAM_MAX_BODY: usize = 64 << 20;

/// A request exactly as the scripted upstream read it off the wire.
#[derive(Debug, Clone)]
struct UpRequest {
    /// Which accepted upstream connection carried it (1-based, in accept
    /// order; the readiness probe's connections are counted too).
    conn: usize,
    method: String,
    /// The request-target, byte for byte.
    target: String,
    version: String,
    /// Header lines in order, names lowercased, values trimmed.
    headers: Vec<(String, String)>,
    /// `transfer-encoding: chunked` framing.
    chunked: bool,
    /// The body bytes as sent (chunk framing included).
    raw_body: Vec<u8>,
    /// The decoded body.
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl UpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

type UpLog = Arc<Mutex<Vec<UpRequest>>>;

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One accepted upstream connection.
struct UpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    id: usize,
    log: UpLog,
}

impl UpConn {
    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let n = tokio::time::timeout(UPSTREAM_IO_TIMEOUT, self.stream.read(&mut tmp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream read timed out"))??;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// The next line, CRLF included.
    async fn take_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..pos + 2).collect());
            }
            if self.buf.len() > UPSTREAM_MAX_HEAD {
                return Err(invalid("line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn take_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one complete request (head and body) and records it. `None` on
    /// EOF, a timeout or bytes that are not an HTTP/1.1 request.
    async fn read_request(&mut self) -> Option<UpRequest> {
        let req = self.try_read_request().await.ok()?;
        self.log.lock().unwrap().push(req.clone());
        Some(req)
    }

    async fn try_read_request(&mut self) -> io::Result<UpRequest> {
        let head = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..pos + 4).collect();
                break String::from_utf8_lossy(&head[..pos]).into_owned();
            }
            if self.buf.len() > UPSTREAM_MAX_HEAD {
                return Err(invalid("request head too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let parts: Vec<&str> = request_line.split(' ').collect();
        let [method, target, version] = parts[..] else {
            return Err(invalid(format!("request line {request_line:?}")));
        };
        let mut headers = Vec::new();
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("header line {line:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut req = UpRequest {
            conn: self.id,
            method: method.to_string(),
            target: target.to_string(),
            version: version.to_string(),
            headers,
            chunked: false,
            raw_body: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
        };
        let te = req.header_all("transfer-encoding").join(",");
        let lengths = req.header_all("content-length");
        if !te.is_empty() {
            if !te.trim().to_ascii_lowercase().ends_with("chunked") {
                return Err(invalid(format!("transfer-encoding {te:?}")));
            }
            req.chunked = true;
            self.read_chunked(&mut req).await?;
        } else if let Some(cl) = lengths.first() {
            let n: usize = cl
                .parse()
                .map_err(|_| invalid(format!("content-length {cl:?}")))?;
            if n > UPSTREAM_MAX_BODY {
                return Err(invalid("body too large"));
            }
            req.raw_body = self.take_n(n).await?;
            req.body = req.raw_body.clone();
        }
        Ok(req)
    }

    async fn read_chunked(&mut self, req: &mut UpRequest) -> io::Result<()> {
        loop {
            let line = self.take_line().await?;
            req.raw_body.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| invalid(format!("chunk size line {text:?}")))?;
            if size == 0 {
                loop {
                    let line = self.take_line().await?;
                    req.raw_body.extend_from_slice(&line);
                    if line == b"\r\n" {
                        return Ok(());
                    }
                    let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
                    let (k, v) = text
                        .split_once(':')
                        .ok_or_else(|| invalid(format!("trailer line {text:?}")))?;
                    req.trailers
                        .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            if req.body.len() + size > UPSTREAM_MAX_BODY {
                return Err(invalid("chunked body too large"));
            }
            let data = self.take_n(size + 2).await?;
            if !data.ends_with(b"\r\n") {
                return Err(invalid("chunk data not followed by CRLF"));
            }
            req.raw_body.extend_from_slice(&data);
            req.body.extend_from_slice(&data[..size]);
        }
    }

    /// Writes `bytes`; false if the proxy went away.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        matches!(
            tokio::time::timeout(UPSTREAM_IO_TIMEOUT, write).await,
            Ok(Ok(()))
        )
    }

    /// Writes each piece in its own write, `gap` apart.
    async fn send_pieces(&mut self, pieces: &[Vec<u8>], gap: Duration) -> bool {
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if !self.send(piece).await {
                return false;
            }
        }
        true
    }

    /// Closes the connection cleanly (FIN, not RST).
    async fn close(mut self) {
        let _ = tokio::time::timeout(UPSTREAM_IO_TIMEOUT, self.stream.shutdown()).await;
    }
}

/// What the upstream answers to one request.
struct Reply {
    /// Each one written separately, `gap` apart.
    pieces: Vec<Vec<u8>>,
    gap: Duration,
    /// Close the connection after the last piece.
    close: bool,
}

impl Reply {
    fn raw(bytes: impl AsRef<[u8]>) -> Reply {
        Reply {
            pieces: vec![bytes.as_ref().to_vec()],
            gap: Duration::ZERO,
            close: false,
        }
    }

    fn pieces(pieces: Vec<Vec<u8>>, gap: Duration) -> Reply {
        Reply {
            pieces,
            gap,
            close: false,
        }
    }

    /// `200 OK` with a Content-Length body.
    fn ok(body: impl AsRef<[u8]>) -> Reply {
        Reply::raw(ok_bytes(body.as_ref()))
    }

    fn and_close(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// `HTTP/1.1 200 OK` with `content-length` and the body.
fn ok_bytes(body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// One chunk of a chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

/// Deterministic, non-repeating-looking test data.
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// FNV-1a, to name a large body in a failure message.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[track_caller]
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: got {} bytes (fnv {:x}), want {} bytes (fnv {:x}); first difference at {:?}",
        got.len(),
        fnv(got),
        want.len(),
        fnv(want),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// A scripted HTTP/1.1 upstream on 127.0.0.1. Dropping it stops the accept
/// loop and every connection task.
struct Upstream {
    addr: SocketAddr,
    log: UpLog,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Runs `on_conn` for every accepted connection (including the readiness
    /// probe's, which send nothing: `read_request` gives `None` for them).
    async fn start<F, Fut>(on_conn: F) -> Upstream
    where
        F: Fn(UpConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("scripted upstream: bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let log: UpLog = Arc::default();
        let conn_log = log.clone();
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it aborts every connection task.
            let mut conns = JoinSet::new();
            let mut next_id = 0;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(ms(10)).await;
                            continue;
                        };
                        next_id += 1;
                        conns.spawn(on_conn(UpConn {
                            stream,
                            buf: Vec::new(),
                            id: next_id,
                            log: conn_log.clone(),
                        }));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Upstream { addr, log, task }
    }

    /// A keep-alive app answering every request with `reply(request)`.
    async fn replying<F>(reply: F) -> Upstream
    where
        F: Fn(&UpRequest) -> Reply + Send + Sync + 'static,
    {
        let reply = Arc::new(reply);
        Self::start(move |mut conn| {
            let reply = reply.clone();
            async move {
                while let Some(req) = conn.read_request().await {
                    let r = reply(&req);
                    if !conn.send_pieces(&r.pieces, r.gap).await {
                        return;
                    }
                    if r.close {
                        conn.close().await;
                        return;
                    }
                }
            }
        })
        .await
    }

    fn requests(&self) -> Vec<UpRequest> {
        self.log.lock().unwrap().clone()
    }

    /// The last request the upstream read for `target`; panics if none.
    fn request_for(&self, target: &str) -> UpRequest {
        let all = self.requests();
        all.iter()
            .rev()
            .find(|r| r.target == target)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "the upstream saw no request for {target:?}; it saw {:?}",
                    all.iter()
                        .map(|r| format!("{} {}", r.method, r.target))
                        .collect::<Vec<_>>()
                )
            })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A lameduck in front of `up`, ready.
async fn lameduck_for(up: &Upstream) -> Lameduck {
    let ld = Lameduck::spawn(&["--upstream", &up.addr.to_string()]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    ld
}

async fn expect_response(c: &mut RawConn, what: &str) -> HttpResponse {
    c.read_response()
        .await
        .unwrap_or_else(|e| panic!("{what}: no complete response: {e:?}"))
}

async fn expect_request(
    c: &mut RawConn,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    c.request(method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: no complete response: {e:?}"))
}

/// A GET on `c` answered `200 <body>`: the connection is still in sync.
async fn assert_reusable(c: &mut RawConn, up: &Upstream, path: &str) {
    let r = expect_request(c, "GET", path, &[], b"").await;
    assert_eq!(r.status, 200, "GET {path} on the reused connection");
    assert_eq!(r.text(), format!("reply to {path}"));
    up.request_for(path);
}

/// The usual answer of these upstreams to anything not scripted.
fn default_reply(req: &UpRequest) -> Reply {
    Reply::ok(format!("reply to {}", req.target))
}

/// Counts header lines named `name` in a response.
fn count_headers(r: &HttpResponse, name: &str) -> usize {
    r.headers.iter().filter(|(k, _)| k == name).count()
}

/// A forwarded request carries its body with valid framing: chunked and no
/// Content-Length, or a Content-Length equal to the body size.
#[track_caller]
fn assert_body_framing(req: &UpRequest, want: &[u8], what: &str) {
    let lengths = req.header_all("content-length");
    if req.chunked {
        assert!(
            lengths.is_empty(),
            "{what}: chunked request also carries content-length {lengths:?}"
        );
    } else if !want.is_empty() || !lengths.is_empty() {
        assert_eq!(
            lengths,
            vec![want.len().to_string()],
            "{what}: content-length must equal the body size"
        );
    }
    assert_same_bytes(&req.body, want, what);
}

// ---------------------------------------------------------------------------
// Framing and keep-alive
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pipelined_gets_in_one_write_are_answered_in_order() {
    let up = Upstream::replying(|req| match req.target.as_str() {
        // Each response framed differently.
        "/two" => Reply::raw(
            [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                &chunk(b"reply to "),
                &chunk(b"/two"),
                b"0\r\n\r\n",
            ]
            .concat(),
        ),
        "/three" => Reply::ok(format!("reply to /three {}", "3".repeat(5000))),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let batch = [
        build_request("GET", "/one", &[], b""),
        build_request("GET", "/two", &[], b""),
        build_request("GET", "/three", &[], b""),
    ]
    .concat();
    c.send_raw(&batch).await.unwrap();
    let r1 = expect_response(&mut c, "first pipelined response").await;
    let r2 = expect_response(&mut c, "second pipelined response").await;
    let r3 = expect_response(&mut c, "third pipelined response").await;
    assert_eq!((r1.status, r1.text()), (200, "reply to /one".to_string()));
    assert_eq!((r2.status, r2.text()), (200, "reply to /two".to_string()));
    assert_eq!(r3.status, 200);
    assert_eq!(r3.text(), format!("reply to /three {}", "3".repeat(5000)));
    let targets: Vec<String> = up.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/one", "/two", "/three"], "upstream order");
    assert_reusable(&mut c, &up, "/four").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_kib_content_length_body_arrives_intact() {
    let up = Upstream::replying(|req| match req.method.as_str() {
        "POST" => Reply::ok(&req.body),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let body = pattern(300 * 1024, 2);
    let wire = build_request("POST", "/upload?name=big", &[], &body);
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    // The head with a first slice of the body, then the rest in a few writes.
    let head_len = find(&wire, b"\r\n\r\n").unwrap() + 4;
    let cuts = [
        0,
        head_len + 1000,
        head_len + 70_000,
        head_len + 200_000,
        wire.len(),
    ];
    for w in cuts.windows(2) {
        c.send_raw(&wire[w[0]..w[1]]).await.unwrap();
        tokio::time::sleep(ms(20)).await;
    }
    let r = expect_response(&mut c, "POST of 300 KiB").await;
    assert_eq!(r.status, 200);

    let seen = up.request_for("/upload?name=big");
    assert_eq!(seen.method, "POST");
    assert_body_framing(&seen, &body, "300 KiB body seen upstream");
    assert_same_bytes(&r.body, &body, "300 KiB body echoed back");
    assert_reusable(&mut c, &up, "/after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_with_extensions_and_trailers_arrives_decoded() {
    let up = Upstream::replying(|req| match req.method.as_str() {
        "POST" => Reply::ok(format!("got {} bytes", req.body.len())),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let middle = pattern(70_000, 3);
    let want = [&b"hello"[..], &middle, b", bye"].concat();
    let wire = [
        &b"POST /chunked-upload HTTP/1.1\r\nhost: 127.0.0.1\r\n\
           transfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"[..],
        b"5;name=value\r\nhello\r\n",
        format!("{:X}\r\n", middle.len()).as_bytes(),
        &middle,
        b"\r\n5;quoted=\"a b\";flag\r\n, bye\r\n",
        b"0\r\nx-checksum: abc\r\n\r\n",
    ]
    .concat();
    // Cut inside the first size line, inside the big chunk, and between the
    // CR and LF of the last-chunk line.
    let head_len = find(&wire, b"\r\n\r\n").unwrap() + 4;
    let last = find(&wire[head_len..], b"0\r\nx-checksum").unwrap() + head_len;
    let cuts = [0, head_len + 2, head_len + 5000, last + 2, wire.len()];
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    for w in cuts.windows(2) {
        c.send_raw(&wire[w[0]..w[1]]).await.unwrap();
        tokio::time::sleep(ms(20)).await;
    }
    let r = expect_response(&mut c, "chunked POST").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("got {} bytes", want.len()));
    let seen = up.request_for("/chunked-upload");
    assert_body_framing(&seen, &want, "chunked request body seen upstream");

    // An empty chunked body, on the same connection (so the trailer of the
    // first one was consumed exactly).
    c.send_raw(
        b"POST /empty-chunked HTTP/1.1\r\nhost: 127.0.0.1\r\n\
          transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let r = expect_response(&mut c, "empty chunked POST").await;
    assert_eq!((r.status, r.text()), (200, "got 0 bytes".to_string()));
    let seen = up.request_for("/empty-chunked");
    assert_body_framing(&seen, b"", "empty chunked body seen upstream");
    assert_reusable(&mut c, &up, "/after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_in_slow_pieces_is_decoded_and_the_connection_reused() {
    let up = Upstream::replying(|req| match req.target.as_str() {
        "/chunked" => Reply::pieces(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                    .to_vec(),
                b"5\r\nhello\r\n".to_vec(),
                b"6;ext=1\r\n world\r\n".to_vec(),
                // A chunk whose size line is cut in two writes.
                b"1".to_vec(),
                [&b"0\r\n"[..], &[b'!'; 16], b"\r\n"].concat(),
                chunk(&pattern(20_000, 4)),
                // A last chunk with a trailer.
                b"0\r\nx-checksum: 1\r\n\r\n".to_vec(),
            ],
            ms(30),
        ),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = expect_request(&mut c, "GET", "/chunked", &[], b"").await;
    assert_eq!(r.status, 200);
    let want = [&b"hello world"[..], &[b'!'; 16], &pattern(20_000, 4)].concat();
    assert_same_bytes(&r.body, &want, "decoded chunked response");
    assert_reusable(&mut c, &up, "/second").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_response_in_slow_pieces_arrives_whole_and_the_connection_reused() {
    let body = pattern(40_000, 5);
    let reply_body = body.clone();
    let up = Upstream::replying(move |req| match req.target.as_str() {
        "/slow-pieces" => {
            let b = &reply_body;
            Reply::pieces(
                vec![
                    b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
                    format!("ngth: {}\r\n\r", b.len()).into_bytes(),
                    [&b"\n"[..], &b[..1]].concat(),
                    b[1..10_000].to_vec(),
                    b[10_000..10_001].to_vec(),
                    b[10_001..].to_vec(),
                ],
                ms(40),
            )
        }
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = expect_request(&mut c, "GET", "/slow-pieces", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_same_bytes(&r.body, &body, "response body written in pieces");
    assert_reusable(&mut c, &up, "/second").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_gets_the_content_length_and_no_body_and_the_connection_stays_in_sync() {
    let up = Upstream::replying(|req| match req.method.as_str() {
        "HEAD" => Reply::raw(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n",
        ),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    for i in 0..2 {
        let r = expect_request(&mut c, "HEAD", "/resource", &[], b"").await;
        assert_eq!(r.status, 200, "HEAD #{i}");
        assert_eq!(
            r.header("content-length"),
            Some("1234"),
            "HEAD #{i} keeps the app's content-length: {:?}",
            r.headers
        );
        assert!(r.body.is_empty());
        assert_eq!(up.request_for("/resource").method, "HEAD");
        // Any stray body byte would come before the next response.
        assert_reusable(&mut c, &up, &format!("/after-head-{i}")).await;
        assert!(
            c.pending_bytes().is_empty(),
            "stray bytes after the GET: {:?}",
            String::from_utf8_lossy(c.pending_bytes())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_204_and_304_have_no_body_and_the_connection_stays_in_sync() {
    let up = Upstream::replying(|req| match req.target.as_str() {
        "/no-content" => Reply::raw("HTTP/1.1 204 No Content\r\nx-app: 204\r\n\r\n"),
        // A 304 may carry the Content-Length of the representation it stands
        // for; it still has no body.
        "/not-modified" => {
            Reply::raw("HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 42\r\n\r\n")
        }
        "/not-modified-bare" => Reply::raw("HTTP/1.1 304 Not Modified\r\netag: \"v2\"\r\n\r\n"),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = expect_request(&mut c, "GET", "/no-content", &[], b"").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-app"), Some("204"));
    assert!(
        r.header("transfer-encoding").is_none(),
        "204 with transfer-encoding: {:?}",
        r.headers
    );
    assert_reusable(&mut c, &up, "/after-204").await;

    for path in ["/not-modified", "/not-modified-bare"] {
        let r = expect_request(&mut c, "GET", path, &[("if-none-match", "\"v0\"")], b"").await;
        assert_eq!(r.status, 304, "{path}");
        assert!(
            r.header("etag").is_some(),
            "{path}: etag kept: {:?}",
            r.headers
        );
        assert!(
            r.header("transfer-encoding").is_none(),
            "304 with transfer-encoding: {:?}",
            r.headers
        );
        assert_reusable(&mut c, &up, &format!("/after-{path}")).await;
    }
    assert!(
        c.pending_bytes().is_empty(),
        "stray bytes: {:?}",
        String::from_utf8_lossy(c.pending_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_response_arrives_complete() {
    let body = pattern(100_000, 8);
    let reply_body = body.clone();
    let up = Upstream::start(move |mut conn| {
        let body = reply_body.clone();
        async move {
            while let Some(req) = conn.read_request().await {
                if req.target != "/close-delimited" {
                    if !conn
                        .send(&ok_bytes(format!("reply to {}", req.target).as_bytes()))
                        .await
                    {
                        return;
                    }
                    continue;
                }
                // HTTP/1.1, no content-length, no transfer-encoding: the body
                // ends when the connection does.
                let mut pieces =
                    vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec()];
                pieces.extend(body.chunks(30_000).map(<[u8]>::to_vec));
                conn.send_pieces(&pieces, ms(20)).await;
                conn.close().await;
                return;
            }
        }
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = expect_request(&mut c, "GET", "/close-delimited", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_same_bytes(&r.body, &body, "close-delimited body");
    let framed = r.header("content-length").is_some() || r.header("transfer-encoding").is_some();
    if framed {
        // The proxy re-framed the body: the connection may go on or be closed.
        match c.get("/same-conn").await {
            Ok(r) => assert_eq!(
                (r.status, r.text()),
                (200, "reply to /same-conn".to_string())
            ),
            Err(ClientError::Closed) | Err(ClientError::Io(_)) => {}
            Err(e) => panic!("after a re-framed close-delimited body: {e:?}"),
        }
    }
    // The upstream connection that ended the body must not be reused.
    let mut fresh = RawConn::connect(ld.proxy_addr()).await;
    assert_reusable(&mut fresh, &up, "/next").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_103_responses_before_the_final_one_are_handled() {
    let up = Upstream::replying(|req| match req.target.as_str() {
        "/early-hints" => Reply::pieces(
            vec![
                b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload; as=style\r\n\r\n"
                    .to_vec(),
                ok_bytes(b"final body"),
            ],
            ms(50),
        ),
        "/two-hints" => Reply::raw(
            [
                &b"HTTP/1.1 103 Early Hints\r\nlink: </a.js>; rel=preload\r\n\r\n"[..],
                b"HTTP/1.1 103 Early Hints\r\nlink: </b.js>; rel=preload\r\n\r\n",
                &ok_bytes(b"after two hints"),
            ]
            .concat(),
        ),
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    // `read_response` skips well-formed 1xx heads, forwarded or not.
    let r = expect_request(&mut c, "GET", "/early-hints", &[], b"").await;
    assert_eq!((r.status, r.text()), (200, "final body".to_string()));
    let r = expect_request(&mut c, "GET", "/two-hints", &[], b"").await;
    assert_eq!((r.status, r.text()), (200, "after two hints".to_string()));
    assert_reusable(&mut c, &up, "/after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_mib_response_streamed_in_uneven_pieces_arrives_intact() {
    let body = pattern(2 * 1024 * 1024 + 7, 17);
    let reply_body = body.clone();
    let up = Upstream::replying(move |req| match req.target.as_str() {
        "/big" => {
            let b = &reply_body;
            let mut pieces = vec![
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", b.len()).into_bytes(),
            ];
            let mut at = 0;
            for size in [1, 65_535, 65_536, 65_537, 3, 100_000].into_iter().cycle() {
                if at >= b.len() {
                    break;
                }
                let end = (at + size).min(b.len());
                pieces.push(b[at..end].to_vec());
                at = end;
            }
            Reply::pieces(pieces, ms(2))
        }
        _ => default_reply(req),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = expect_request(&mut c, "GET", "/big", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_same_bytes(&r.body, &body, "2 MiB response body");
    assert_reusable(&mut c, &up, "/after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_right_after_a_post_body_is_answered_too() {
    let up = Upstream::replying(|req| {
        Reply::ok(format!(
            "reply to {} ({} bytes)",
            req.target,
            req.body.len()
        ))
    })
    .await;
    let ld = lameduck_for(&up).await;

    let post_body = pattern(5000, 9);
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let batch = [
        build_request("POST", "/first", &[], &post_body),
        build_request("GET", "/second", &[], b""),
        // A chunked POST followed directly by a GET, too.
        b"POST /third HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n"
            .to_vec(),
        build_request("GET", "/fourth", &[], b""),
    ]
    .concat();
    c.send_raw(&batch).await.unwrap();
    for (path, len) in [
        ("/first", 5000),
        ("/second", 0),
        ("/third", 3),
        ("/fourth", 0),
    ] {
        let r = expect_response(&mut c, path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.text(), format!("reply to {path} ({len} bytes)"));
    }
    assert_body_framing(&up.request_for("/first"), &post_body, "/first body");
    assert_body_framing(&up.request_for("/third"), b"abc", "/third body");
    let second = up.request_for("/second");
    assert!(
        second.body.is_empty(),
        "/second got a body: {:?}",
        second.body
    );
    assert_eq!(second.method, "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_a_100_and_the_body_goes_through() {
    let up = Upstream::start(|mut conn| async move {
        // An app that honours `expect: 100-continue` if the proxy forwards it.
        loop {
            let head_only = loop {
                if let Some(pos) = find(&conn.buf, b"\r\n\r\n") {
                    break String::from_utf8_lossy(&conn.buf[..pos]).to_ascii_lowercase();
                }
                match conn.fill().await {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            };
            if head_only.contains("\r\nexpect: 100-continue")
                && !conn.send(b"HTTP/1.1 100 Continue\r\n\r\n").await
            {
                return;
            }
            let Some(req) = conn.read_request().await else {
                return;
            };
            let reply = ok_bytes(format!("got {} bytes", req.body.len()).as_bytes());
            if !conn.send(&reply).await {
                return;
            }
        }
    })
    .await;
    let ld = lameduck_for(&up).await;

    let body = b"hello world";
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    c.send_raw(
        b"POST /expect HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 11\r\n\
          expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    // Wait (bounded) for the interim response before sending the body.
    let deadline = tokio::time::Instant::now() + secs(5);
    while !c.pending_bytes().starts_with(b"HTTP/1.1 100") && tokio::time::Instant::now() < deadline
    {
        assert!(
            c.stays_open_for(ms(100)).await,
            "connection closed while waiting for 100 Continue"
        );
        assert!(
            c.pending_bytes().len() < 12 || c.pending_bytes().starts_with(b"HTTP/1.1 100"),
            "a final response before the body was sent: {:?}",
            String::from_utf8_lossy(c.pending_bytes())
        );
    }
    assert!(
        c.pending_bytes().starts_with(b"HTTP/1.1 100"),
        "no 100 Continue within 5s: {:?}",
        String::from_utf8_lossy(c.pending_bytes())
    );
    c.send_raw(body).await.unwrap();
    let r = expect_response(&mut c, "POST with expect: 100-continue").await;
    assert_eq!((r.status, r.text()), (200, "got 11 bytes".to_string()));
    assert_body_framing(&up.request_for("/expect"), body, "body after 100 Continue");
    let r = expect_request(&mut c, "POST", "/again", &[], b"abc").await;
    assert_eq!((r.status, r.text()), (200, "got 3 bytes".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_an_unchunked_response_and_a_close() {
    let up = Upstream::replying(|req| {
        // The app answers chunked: HTTP/1.0 has no chunked encoding.
        Reply::raw(
            [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                &chunk(b"reply to "),
                &chunk(req.target.as_bytes()),
                b"0\r\n\r\n",
            ]
            .concat(),
        )
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    c.send_raw(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
    let r = expect_response(&mut c, "HTTP/1.0 request").await;
    assert_eq!((r.status, r.text()), (200, "reply to /old".to_string()));
    assert!(
        r.header("transfer-encoding").is_none(),
        "chunked response to an HTTP/1.0 client: {:?}",
        r.headers
    );
    assert!(
        c.closed_within(secs(5)).await,
        "connection to an HTTP/1.0 client (no keep-alive) stays open"
    );
    let seen = up.request_for("/old");
    assert!(
        seen.header("host").is_some_and(|h| !h.is_empty()),
        "no Host upstream: {:?}",
        seen.headers
    );
}

// ---------------------------------------------------------------------------
// Header rewriting
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_are_rewritten_on_the_way_to_the_app() {
    let up = Upstream::replying(default_reply).await;
    let ld = lameduck_for(&up).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;

    // Hop-by-hop headers go, forwarding headers are extended, the id is kept.
    let r = expect_request(
        &mut c,
        "GET",
        "/hop",
        &[
            ("host", "example.test"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("proxy-connection", "x"),
            ("te", "gzip"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-request-id", "abc"),
            ("x-end-to-end", "kept"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("abc"), "{:?}", r.headers);
    assert_eq!(count_headers(&r, "x-request-id"), 1, "{:?}", r.headers);
    let seen = up.request_for("/hop");
    for h in ["x-secret", "keep-alive", "proxy-connection", "te"] {
        assert!(
            seen.header(h).is_none(),
            "hop-by-hop `{h}` reached the app: {:?}",
            seen.headers
        );
    }
    for v in seen.header_all("connection") {
        assert!(
            !v.to_ascii_lowercase().contains("x-secret"),
            "client's Connection header forwarded: {v}"
        );
    }
    assert_eq!(seen.header_all("x-forwarded-for"), ["10.0.0.1, 127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.header_all("x-request-id"), ["abc"]);
    assert_eq!(seen.header_all("host"), ["example.test"]);
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    assert_eq!(seen.version, "HTTP/1.1");

    // No id: one is generated, seen by the app and echoed to the client. An
    // x-forwarded-proto set by an earlier proxy is kept.
    let r = expect_request(
        &mut c,
        "GET",
        "/no-id",
        &[("x-forwarded-proto", "https")],
        b"",
    )
    .await;
    let id = r
        .header("x-request-id")
        .expect("generated x-request-id")
        .to_string();
    assert_eq!(id.len(), 33, "generated id {id:?}");
    let seen = up.request_for("/no-id");
    assert_eq!(seen.header_all("x-request-id"), [id.as_str()]);
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), ["https"]);

    // Empty and over-long (201 bytes) ids are replaced; 200 bytes are kept.
    let long = "L".repeat(201);
    let max = "M".repeat(200);
    for (path, given, kept) in [
        ("/empty-id", "", false),
        ("/long-id", long.as_str(), false),
        ("/max-id", max.as_str(), true),
    ] {
        let r = expect_request(&mut c, "GET", path, &[("x-request-id", given)], b"").await;
        let id = r.header("x-request-id").expect("x-request-id").to_string();
        if kept {
            assert_eq!(id, given, "{path}");
        } else {
            assert_eq!(
                id.len(),
                33,
                "{path}: replaced by a generated id, got {id:?}"
            );
        }
        assert_eq!(
            count_headers(&r, "x-request-id"),
            1,
            "{path}: {:?}",
            r.headers
        );
        assert_eq!(
            up.request_for(path).header_all("x-request-id"),
            [id.as_str()]
        );
    }

    // A client cannot strip the headers the proxy vouches for by naming
    // them in Connection.
    let r = expect_request(
        &mut c,
        "GET",
        "/named",
        &[
            ("connection", "x-request-id, x-forwarded-for"),
            ("x-request-id", "keep-me"),
            ("x-forwarded-for", "10.0.0.2"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("keep-me"));
    let seen = up.request_for("/named");
    assert_eq!(seen.header_all("x-request-id"), ["keep-me"]);
    assert_eq!(seen.header_all("x-forwarded-for"), ["10.0.0.2, 127.0.0.1"]);

    // No Host at all in HTTP/1.1: lameduck answers 400 itself and closes
    // (RFC 9112 §3.2); the app never sees it.
    c.send_raw(b"GET /no-host HTTP/1.1\r\n\r\n").await.unwrap();
    let r = expect_response(&mut c, "request without Host").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        up.requests().iter().all(|seen| seen.target != "/no-host"),
        "the app got a request without Host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_lose_hop_by_hop_ones_and_carry_the_request_id() {
    let up = Upstream::replying(|req| match req.target.as_str() {
        "/after" => default_reply(req),
        _ => Reply::raw(
            "HTTP/1.1 200 OK\r\nconnection: x-internal\r\nx-internal: 1\r\n\
             keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\n\
             x-request-id: other\r\nx-app: yes\r\ncontent-length: 2\r\n\r\nok",
        ),
    })
    .await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let check = |r: &HttpResponse, want_id: &str| {
        assert_eq!((r.status, r.text()), (200, "ok".to_string()));
        for h in ["x-internal", "keep-alive", "proxy-connection"] {
            assert!(
                r.header(h).is_none(),
                "`{h}` reached the client: {:?}",
                r.headers
            );
        }
        for (k, v) in &r.headers {
            if k == "connection" {
                assert!(
                    !v.to_ascii_lowercase().contains("x-internal"),
                    "app's Connection header forwarded: {v}"
                );
            }
        }
        let ids: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "x-request-id")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ids, [want_id], "x-request-id on the response");
        assert_eq!(r.header("x-app"), Some("yes"));
    };

    let r = expect_request(
        &mut c,
        "GET",
        "/given-id",
        &[("x-request-id", "client-id-11")],
        b"",
    )
    .await;
    check(&r, "client-id-11");

    let r = expect_request(&mut c, "GET", "/generated-id", &[], b"").await;
    let seen = up.request_for("/generated-id");
    let id = seen
        .header("x-request-id")
        .expect("id sent upstream")
        .to_string();
    assert_eq!(id.len(), 33);
    check(&r, &id);
    assert_reusable(&mut c, &up, "/after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_client_is_honoured() {
    let up = Upstream::replying(default_reply).await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    assert_reusable(&mut c, &up, "/first").await;
    let r = expect_request(&mut c, "GET", "/last", &[("connection", "close")], b"").await;
    assert_eq!((r.status, r.text()), (200, "reply to /last".to_string()));
    assert!(
        r.has_connection_close(),
        "response to `connection: close` lacks it: {:?}",
        r.headers
    );
    assert!(
        c.closed_within(secs(5)).await,
        "the proxy kept the connection open after `connection: close`"
    );
    assert!(
        up.request_for("/last")
            .header("connection")
            .is_none_or(|v| !v.to_ascii_lowercase().contains("close")),
        "the client's `connection: close` is hop-by-hop"
    );
}

// ---------------------------------------------------------------------------
// Targets and methods
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_targets_and_methods_pass_through_unchanged() {
    let up = Upstream::replying(|req| {
        Reply::ok(format!("{} {} {}", req.method, req.target, req.body.len()))
    })
    .await;
    let ld = lameduck_for(&up).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;

    for target in [
        "/a/b?x=1&y=%20z",
        "/p;matrix=1/q?a=b&a=c&empty=",
        "//double//slash/./dot/../x",
        "/%E2%9C%93/~user?q=a/b?c:d@e!$'()*+,;=",
        "/?",
        "/trailing/",
    ] {
        let r = expect_request(&mut c, "GET", target, &[], b"").await;
        assert_eq!(r.status, 200, "{target}");
        assert_eq!(r.text(), format!("GET {target} 0"));
        up.request_for(target);
    }

    let r = expect_request(&mut c, "OPTIONS", "*", &[], b"").await;
    assert_eq!((r.status, r.text()), (200, "OPTIONS * 0".to_string()));

    for (method, target, body) in [
        ("PATCH", "/items/7", &b"{\"op\":\"inc\"}"[..]),
        ("DELETE", "/items/7", b"reason=test"),
        ("DELETE", "/items/8", b""),
        ("OPTIONS", "/items", b""),
        ("PUT", "/items/9", b"put body"),
        ("PURGE", "/cache/x", b""),
    ] {
        let r = expect_request(&mut c, method, target, &[], body).await;
        assert_eq!(r.status, 200, "{method} {target}");
        assert_eq!(r.text(), format!("{method} {target} {}", body.len()));
        let seen = up
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.method == method && r.target == target)
            .unwrap_or_else(|| panic!("{method} {target} did not reach the app"));
        assert_body_framing(&seen, body, &format!("{method} {target}"));
    }
}

// ---------------------------------------------------------------------------
// Upstream connection management and failures
// ---------------------------------------------------------------------------

/// Answers for [`upstream_connection_reuse`]: every way an HTTP/1.1 response
/// can end, each of which leaves the connection reusable.
fn reuse_reply(req: &UpRequest) -> Reply {
    let chunked_head = &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..];
    match (req.method.as_str(), req.target.as_str()) {
        ("HEAD", _) => Reply::raw("HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"),
        (_, "/chunked") => Reply::raw([chunked_head, &chunk(b"abc"), b"0\r\n\r\n"].concat()),
        (_, "/chunked-ext") => Reply::pieces(
            vec![
                chunked_head.to_vec(),
                b"3;e=1\r\nabc\r\n".to_vec(),
                b"0\r\n\r\n".to_vec(),
            ],
            ms(20),
        ),
        (_, "/chunked-trailers") => {
            Reply::raw([chunked_head, &chunk(b"abc"), b"0\r\nx-checksum: 1\r\n\r\n"].concat())
        }
        (_, "/204") => Reply::raw("HTTP/1.1 204 No Content\r\n\r\n"),
        (_, "/304") => {
            Reply::raw("HTTP/1.1 304 Not Modified\r\netag: \"v\"\r\ncontent-length: 42\r\n\r\n")
        }
        (_, "/103") => Reply::raw(
            [
                &b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n"[..],
                &ok_bytes(b"hinted"),
            ]
            .concat(),
        ),
        (_, "/empty") => Reply::raw("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        _ => Reply::ok(format!("{} {} {}", req.method, req.target, req.body.len())),
    }
}

/// Which of lameduck's two HTTP/1 servers the connection ends up on.
#[derive(Clone, Copy, PartialEq)]
enum Server {
    /// lameduck's own HTTP/1 path (every plain request starts there).
    Own,
    /// hyper: the first request carries `Expect`, which the own path hands
    /// over together with the rest of the connection.
    Hyper,
}

/// Sends `requests` one after the other on one client connection and
/// asserts the app saw all of them on a single upstream connection.
async fn upstream_connection_reuse(server: Server, requests: &[(&str, &str)]) {
    let up = Upstream::replying(reuse_reply).await;
    let ld = lameduck_for(&up).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let mut requests = requests.to_vec();
    if server == Server::Hyper {
        requests.insert(0, ("POST", "/post"));
    }
    for (i, (method, path)) in requests.iter().enumerate() {
        let body: &[u8] = if *method == "POST" { b"post body" } else { b"" };
        let headers: &[(&str, &str)] = if server == Server::Hyper && i == 0 {
            &[("expect", "100-continue")]
        } else {
            &[]
        };
        let r = expect_request(&mut c, method, path, headers, body).await;
        assert!(
            [200, 204, 304].contains(&r.status),
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), requests.len());
    let conns: Vec<(usize, String)> = reqs
        .iter()
        .map(|r| (r.conn, format!("{} {}", r.method, r.target)))
        .collect();
    assert!(
        conns.iter().all(|(conn, _)| *conn == conns[0].0),
        "sequential requests used several upstream connections (conn, request): {conns:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_connection_serves_every_kind_of_response_in_turn() {
    for server in [Server::Own, Server::Hyper] {
        upstream_connection_reuse(server, &EVERY_KIND).await;
    }
}

const EVERY_KIND: [(&str, &str); 11] = [
    ("GET", "/cl"),
    ("GET", "/chunked"),
    ("GET", "/cl"),
    ("GET", "/chunked-ext"),
    ("HEAD", "/head"),
    ("GET", "/204"),
    ("GET", "/304"),
    ("GET", "/103"),
    ("GET", "/empty"),
    ("POST", "/post"),
    ("GET", "/cl"),
];

/// hyper's server reads nothing after a trailers frame: the connection must go
/// back to the pool on the trailers, not only on the end of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_connection_is_reused_after_a_chunked_response_with_trailers() {
    for server in [Server::Own, Server::Hyper] {
        let requests = [("GET", "/cl"), ("GET", "/chunked-trailers"), ("GET", "/cl")];
        upstream_connection_reuse(server, &requests).await;
    }
}

/// An app that closes every connection right after its first response,
/// without saying `connection: close`.
async fn one_request_per_connection_app() -> Upstream {
    Upstream::start(|mut conn| async move {
        if let Some(req) = conn.read_request().await {
            let reply = format!(
                "reply to {} {} on conn {}",
                req.method, req.target, req.conn
            );
            if conn.send(&ok_bytes(reply.as_bytes())).await {
                conn.close().await;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_app_closed_is_not_used_for_the_next_get() {
    let up = one_request_per_connection_app().await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    for i in 0..5 {
        let path = format!("/stale/{i}");
        let r = expect_request(&mut c, "GET", &path, &[], b"").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(
            r.text().starts_with(&format!("reply to GET {path} ")),
            "{}",
            r.text()
        );
        tokio::time::sleep(ms(200)).await;
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 5, "each request reached the app exactly once");
    let mut conns: Vec<usize> = reqs.iter().map(|r| r.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    assert_eq!(conns.len(), 5, "one upstream connection per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_app_closed_is_not_used_for_the_next_post() {
    let up = one_request_per_connection_app().await;
    let ld = lameduck_for(&up).await;

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    for i in 0..5 {
        let path = format!("/stale-post/{i}");
        let body = pattern(1000 + i, 20);
        let r = expect_request(&mut c, "POST", &path, &[], &body).await;
        assert_eq!(r.status, 200, "POST {i}: {}", r.text());
        assert!(
            r.text().starts_with(&format!("reply to POST {path} ")),
            "{}",
            r.text()
        );
        assert_body_framing(&up.request_for(&path), &body, &path);
        tokio::time::sleep(ms(200)).await;
    }
    assert_eq!(
        up.requests().len(),
        5,
        "each POST reached the app exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_connection_close_from_the_app_is_followed_by_a_fresh_connection() {
    let up = Upstream::replying(|req| {
        let body = format!("reply to {} on conn {}", req.target, req.conn);
        Reply::raw(format!(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .and_close()
    })
    .await;
    let ld = lameduck_for(&up).await;

    // Straight after each other: no time for the proxy to notice the close
    // other than through the `connection: close` it was told.
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    for i in 0..5 {
        let path = format!("/closing/{i}");
        let r = expect_request(&mut c, "GET", &path, &[], b"").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(
            r.text().starts_with(&format!("reply to {path} ")),
            "{}",
            r.text()
        );
        // The app's `connection: close` is hop-by-hop. Should the proxy close
        // the client connection too, it must say so.
        if r.has_connection_close() {
            assert!(
                c.closed_within(secs(5)).await,
                "`connection: close` but open"
            );
            c = RawConn::connect(ld.proxy_addr()).await;
        }
    }
    let mut conns: Vec<usize> = up.requests().iter().map(|r| r.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    assert_eq!(conns.len(), 5, "a connection the app closed was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_answering_garbage_gives_502() {
    let up = Upstream::replying(|_| Reply::raw("HELLO\r\n\r\n")).await;
    let ld = lameduck_for(&up).await;
    for i in 0..2 {
        let r = http_get(ld.proxy_addr(), "/garbage").await;
        assert_eq!(r.status, 502, "request {i}: {}", r.text());
        assert!(r.body.len() <= 512, "502 body should be short");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_closing_without_a_complete_response_gives_502() {
    let up = Upstream::start(|mut conn| async move {
        if let Some(req) = conn.read_request().await {
            if req.target == "/half-head" {
                conn.send(b"HTTP/1.1 200 OK\r\ncontent-le").await;
            }
            conn.close().await;
        }
    })
    .await;
    let ld = lameduck_for(&up).await;
    for path in ["/no-answer", "/half-head", "/no-answer"] {
        let r = http_get(ld.proxy_addr(), path).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_app_gives_502() {
    // Nothing listens there; the proxy starts anyway (not ready).
    let ld = Lameduck::spawn(&["--upstream", &closed_port().to_string()]);
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = expect_request(&mut c, "GET", "/", &[], b"").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.header("x-request-id").is_some(), "{:?}", r.headers);
    let r = http_request(ld.proxy_addr(), "POST", "/post", &[], b"body")
        .await
        .expect("POST to an unreachable app");
    assert_eq!(r.status, 502, "{}", r.text());
}

// ---------------------------------------------------------------------------
// HTTP/2 clients in front of the HTTP/1 app
// ---------------------------------------------------------------------------

/// What an HTTP/2 client gets for each kind of HTTP/1 response: bodies
/// decoded from their HTTP/1 framing (chunked, with extensions and trailers),
/// none for HEAD / 204 / 304, the final response after a 1xx, request bodies
/// of unknown length sent chunked; and the app connection back in the pool
/// after every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_every_kind_of_http1_response_decoded() {
    let up = Upstream::replying(reuse_reply).await;
    let ld = lameduck_for(&up).await;
    let tcp = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    let (mut send, conn) = tokio::time::timeout(secs(5), h2::client::handshake(tcp))
        .await
        .expect("h2 handshake timed out")
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let cases: [(&str, &str, u16, &[u8]); 10] = [
        ("GET", "/cl", 200, b"GET /cl 0"),
        ("GET", "/chunked", 200, b"abc"),
        ("GET", "/chunked-ext", 200, b"abc"),
        ("GET", "/chunked-trailers", 200, b"abc"),
        ("HEAD", "/head", 200, b""),
        ("GET", "/204", 204, b""),
        ("GET", "/304", 304, b""),
        ("GET", "/103", 200, b"hinted"),
        ("POST", "/post", 200, b"POST /post 9"),
        ("GET", "/cl", 200, b"GET /cl 0"),
    ];
    for (method, path, status, body) in cases {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1{path}"))
            .body(())
            .unwrap();
        let has_body = method == "POST";
        let (response, mut stream) = send.send_request(request, !has_body).unwrap();
        if has_body {
            // Two DATA frames and no content-length: the app gets it chunked.
            stream
                .send_data(Bytes::from_static(b"post "), false)
                .unwrap();
            stream.send_data(Bytes::from_static(b"body"), true).unwrap();
        }
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, response)
            .await
            .expect("response timed out")
            .expect("response");
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let mut received = Vec::new();
        let mut data = response.into_body();
        while let Some(chunk) = tokio::time::timeout(RESPONSE_TIMEOUT, data.data())
            .await
            .expect("body timed out")
        {
            let chunk = chunk.expect("body");
            let _ = data.flow_control().release_capacity(chunk.len());
            received.extend_from_slice(&chunk);
        }
        assert_eq!(received, body, "{method} {path}");
    }
    let reqs = up.requests();
    let post = reqs.iter().find(|r| r.method == "POST").expect("the POST");
    assert!(
        post.chunked,
        "a body of unknown length goes chunked: {post:?}"
    );
    let conns: Vec<usize> = reqs.iter().map(|r| r.conn).collect();
    assert!(
        conns.iter().all(|&c| c == conns[0]),
        "sequential requests used several upstream connections: {conns:?}"
    );
    conn.abort();
}
