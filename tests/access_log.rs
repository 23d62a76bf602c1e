//! `--access-log`: one line per request after its response ends (per stream
//! in TCP mode), parsed back and checked field by field, on the own HTTP/1
//! path, hyper's HTTP/2 path and TCP mode, for answered, failed, aborted,
//! drained and forced requests.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client;
use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET on a new connection with this `x-request-id`.
async fn get_with_id(proxy: SocketAddr, path: &str, id: &str) -> HttpResponse {
    http_request(proxy, "GET", path, &[("x-request-id", id)], b"")
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:?}"))
}

/// Until a request is in flight.
async fn wait_in_flight(ld: &Lameduck) {
    wait_metric(
        ld.admin_addr(),
        "lameduck_requests_in_flight",
        |v| v >= 1.0,
        secs(5),
    )
    .await;
}

fn access_lines(ld: &Lameduck) -> Vec<Value> {
    ld.logs_with_message("access")
}

/// The access line of the request with this id (waits up to 5 s).
async fn line_for(ld: &Lameduck, request_id: &str) -> Value {
    let id = request_id.to_owned();
    ld.wait_for_log(
        move |v| message(v) == "access" && field_str(v, "request_id") == Some(&id),
        secs(5),
    )
    .await
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v[key].as_str()
}

fn n(v: &Value, key: &str) -> Option<u64> {
    v[key].as_u64()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} not a number in {v}"))
}

/// The fields every HTTP line has, whatever happened.
fn assert_well_formed(v: &Value) {
    for key in [
        "timestamp",
        "request_id",
        "trace_id",
        "span_id",
        "method",
        "path",
        "protocol",
        "phase",
        "outcome",
    ] {
        assert!(v[key].is_string(), "{key} missing in {v}");
    }
    assert_eq!(s(v, "trace_id").unwrap().len(), 32, "{v}");
    assert_eq!(s(v, "span_id").unwrap().len(), 16, "{v}");
    assert!(
        humantime::parse_rfc3339(s(v, "timestamp").unwrap()).is_ok(),
        "{v}"
    );
    assert!(f(v, "duration_ms") >= 0.0);
    assert!(
        v["retried"].is_boolean() && v["draining"].is_boolean(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_requests_are_logged_field_by_field() {
    let (app, ld) = app_behind_lameduck(&["--access-log", "json"]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = c
        .request(
            "GET",
            "/bytes?n=5&token=secret",
            &[("x-request-id", "first")],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = c
        .request(
            "POST",
            "/echo",
            &[("x-request-id", "second")],
            b"hello world",
        )
        .await
        .unwrap();
    assert_eq!(r.text(), "hello world");

    let first = line_for(&ld, "first").await;
    assert_well_formed(&first);
    assert_eq!(s(&first, "method"), Some("GET"));
    assert_eq!(
        s(&first, "path"),
        Some("/bytes"),
        "query left out by default"
    );
    assert_eq!(s(&first, "protocol"), Some("HTTP/1.1"));
    assert_eq!(n(&first, "status"), Some(200));
    assert_eq!(n(&first, "request_bytes"), Some(0));
    assert_eq!(n(&first, "response_bytes"), Some(5));
    let head = f(&first, "upstream_head_ms");
    assert!(head > 0.0 && head <= f(&first, "duration_ms"), "{first}");
    assert_eq!(s(&first, "upstream_connection"), Some("new"));
    assert_eq!(first["retried"], false);
    assert_eq!(first["draining"], false);
    assert_eq!(s(&first, "phase"), Some("accepting"));
    assert_eq!(s(&first, "outcome"), Some("ok"));
    // The trace the line names is the one the app was told about.
    let seen = app.last_request("/bytes").unwrap();
    let traceparent = seen.header("traceparent").unwrap();
    assert_eq!(&traceparent[3..35], s(&first, "trace_id").unwrap());
    assert_eq!(&traceparent[36..52], s(&first, "span_id").unwrap());

    let second = line_for(&ld, "second").await;
    assert_well_formed(&second);
    assert_eq!(s(&second, "method"), Some("POST"));
    assert_eq!(n(&second, "request_bytes"), Some(11));
    assert_eq!(n(&second, "response_bytes"), Some(11));
    assert_eq!(
        s(&second, "upstream_connection"),
        Some("reused"),
        "the app connection of the first request carried the second"
    );
    assert_ne!(s(&first, "trace_id"), s(&second, "trace_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_is_logged_only_with_access_log_query() {
    let (_app, ld) = app_behind_lameduck(&["--access-log", "json", "--access-log-query"]).await;
    let r = get_with_id(ld.proxy_addr(), "/?a=1&b=2", "q").await;
    assert_eq!(r.status, 200);
    assert_eq!(s(&line_for(&ld, "q").await, "path"), Some("/?a=1&b=2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_logged_with_their_kind() {
    let (_app, ld) =
        app_behind_lameduck(&["--access-log", "json", "--upstream-timeout", "300ms"]).await;
    let proxy = ld.proxy_addr();
    let r = get_with_id(proxy, "/hang", "hang").await;
    assert_eq!(r.status, 504);
    let line = line_for(&ld, "hang").await;
    assert_well_formed(&line);
    assert_eq!(n(&line, "status"), Some(504));
    assert_eq!(s(&line, "outcome"), Some("upstream_timeout"));
    assert_eq!(
        line["upstream_head_ms"],
        Value::Null,
        "no response head came"
    );

    // Headers and 1000 of 100000 bytes, then the app drops the connection.
    let _ = http_request(proxy, "GET", "/die", &[("x-request-id", "die")], b"").await;
    let line = line_for(&ld, "die").await;
    assert_eq!(n(&line, "status"), Some(200));
    assert_eq!(s(&line, "outcome"), Some("upstream_closed"));
    assert_eq!(n(&line, "response_bytes"), Some(1000));

    // No app at all (spawn waits for the listening line).
    let down = closed_port().to_string();
    let ld2 = Lameduck::spawn(&["--upstream", &down, "--access-log", "json"]);
    let r = get_with_id(ld2.proxy_addr(), "/", "refused").await;
    assert_eq!(r.status, 502);
    let line = line_for(&ld2, "refused").await;
    assert_eq!(n(&line, "status"), Some(502));
    assert_eq!(s(&line, "outcome"), Some("upstream_connect"));
    assert_eq!(
        line["upstream_connection"],
        Value::Null,
        "no app connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_logged_as_aborted() {
    let (_app, ld) = app_behind_lameduck(&["--access-log", "json"]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    c.send_raw(&build_request(
        "GET",
        "/bytes?n=50000000",
        &[("x-request-id", "gone")],
        b"",
    ))
    .await
    .unwrap();
    let mut some = [0u8; 4096];
    let _ = c.stream.read(&mut some).await.unwrap();
    // Close with unread data: the kernel resets the connection.
    drop(c);
    let line = line_for(&ld, "gone").await;
    assert_eq!(s(&line, "outcome"), Some("client_aborted"));
    assert_eq!(n(&line, "status"), Some(200), "the head was sent");
    let sent = n(&line, "response_bytes").unwrap();
    assert!(sent < 50_000_000, "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_the_drain_are_marked_with_their_phase() {
    let (_app, ld) = app_behind_lameduck(&["--access-log", "json", "--drain-delay", "2s"]).await;
    ld.signal(Signal::SIGTERM);
    ld.wait_for_state_log("draining", secs(5)).await;
    let r = get_with_id(ld.proxy_addr(), "/", "late").await;
    assert_eq!(r.status, 200);
    assert!(r.has_connection_close());
    let line = line_for(&ld, "late").await;
    assert_eq!(line["draining"], true);
    assert_eq!(s(&line, "phase"), Some("lame_duck"));
    assert_eq!(s(&line, "outcome"), Some("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_at_the_deadline_are_logged_as_forced_before_exit() {
    let (_app, mut ld) = app_behind_lameduck(&[
        "--access-log",
        "json",
        "--drain-delay",
        "0s",
        "--drain-timeout",
        "1s",
    ])
    .await;
    let proxy = ld.proxy_addr();
    let pending = tokio::spawn(async move {
        http_request(proxy, "GET", "/hang", &[("x-request-id", "stuck")], b"").await
    });
    wait_in_flight(&ld).await;
    ld.signal(Signal::SIGTERM);
    let status = ld.wait_exit(secs(10)).await;
    assert_eq!(status.code(), Some(3), "deadline exit");
    let _ = pending.await;
    // Written before the process went: the line is there once it has exited.
    let line = access_lines(&ld)
        .into_iter()
        .find(|v| s(v, "request_id") == Some("stuck"))
        .expect("the forced request's line was flushed at exit");
    assert_eq!(s(&line, "outcome"), Some("forced"));
    assert_eq!(
        s(&line, "phase"),
        Some("accepting"),
        "it arrived before the drain"
    );
    assert_eq!(n(&line, "status"), Some(499));
}

struct H2 {
    send: client::SendRequest<Bytes>,
    _conn: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

async fn h2_connect(addr: SocketAddr) -> H2 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = client::handshake(tcp).await.unwrap();
    H2 {
        send,
        _conn: tokio::spawn(conn),
    }
}

impl H2 {
    async fn start(&mut self, addr: SocketAddr, path: &str, id: &str) -> client::ResponseFuture {
        let mut ready = self.send.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("x-request-id", id)
            .body(())
            .unwrap();
        let (fut, _) = ready.send_request(req, true).unwrap();
        self.send = ready;
        fut
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_logged_one_line_each() {
    let (_app, ld) = app_behind_lameduck(&["--access-log", "json"]).await;
    let proxy = ld.proxy_addr();
    let mut c = h2_connect(proxy).await;
    let resp = c.start(proxy, "/", "h2-ok").await.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.unwrap();
    }
    let line = line_for(&ld, "h2-ok").await;
    assert_well_formed(&line);
    assert_eq!(s(&line, "protocol"), Some("HTTP/2"));
    assert_eq!(n(&line, "status"), Some(200));
    assert_eq!(n(&line, "request_bytes"), Some(0));
    assert_eq!(n(&line, "response_bytes"), Some(24));
    assert_eq!(s(&line, "upstream_connection"), Some("new"));
    assert_eq!(s(&line, "outcome"), Some("ok"));

    // A stream the client resets while the app is still thinking.
    let slow = c.start(proxy, "/slow?ms=2000", "h2-reset").await;
    wait_in_flight(&ld).await;
    drop(slow);
    drop(c);
    let line = line_for(&ld, "h2-reset").await;
    assert_eq!(s(&line, "outcome"), Some("client_aborted"));
    assert_eq!(n(&line, "status"), Some(499));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_streams_are_logged_one_line_each() {
    let up = TcpEcho::start(EchoMode::Streaming).await;
    let a = up.addr.to_string();
    let ld = Lameduck::spawn(&["--mode", "tcp", "--upstream", &a, "--access-log", "json"]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let mut s1 = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    s1.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    s1.read_exact(&mut back).await.unwrap();
    s1.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s1.read_to_end(&mut rest).await.unwrap();
    let line = ld.wait_for_log(|v| message(v) == "access", secs(5)).await;
    assert_eq!(s(&line, "protocol"), Some("tcp"));
    assert_eq!(n(&line, "request_bytes"), Some(5));
    assert_eq!(n(&line, "response_bytes"), Some(5));
    assert_eq!(line["status"], Value::Null);
    assert_eq!(line["method"], Value::Null);
    assert_eq!(line["trace_id"], Value::Null);
    assert_eq!(s(&line, "upstream_connection"), Some("new"));
    assert_eq!(s(&line, "outcome"), Some("ok"));
    assert!(s(&line, "request_id").is_some_and(|id| !id.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_format_and_the_file_carry_the_same_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let path_arg = path.to_str().unwrap().to_owned();
    let (_app, mut ld) = app_behind_lameduck(&[
        "--access-log",
        "text",
        "--access-log-file",
        &path_arg,
        "--drain-delay",
        "0s",
    ])
    .await;
    let r = get_with_id(ld.proxy_addr(), "/bytes?n=3", "txt").await;
    assert_eq!(r.status, 200);
    ld.signal(Signal::SIGTERM);
    assert_eq!(ld.wait_exit(secs(10)).await.code(), Some(0));
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("request_id=\"txt\""))
        .expect(&text);
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(humantime::parse_rfc3339(time).is_ok(), "{line}");
    let fields: std::collections::HashMap<&str, &str> = rest
        .strip_prefix("access ")
        .expect(line)
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(fields["method"], "GET");
    assert_eq!(fields["path"], "\"/bytes\"");
    assert_eq!(fields["protocol"], "HTTP/1.1");
    assert_eq!(fields["status"], "200");
    assert_eq!(fields["request_bytes"], "0");
    assert_eq!(fields["response_bytes"], "3");
    assert_eq!(fields["upstream_connection"], "new");
    assert_eq!(fields["retried"], "false");
    assert_eq!(fields["draining"], "false");
    assert_eq!(fields["phase"], "accepting");
    assert_eq!(fields["outcome"], "ok");
    assert_eq!(fields["trace_id"].len(), 32);
    assert!(
        !ld.stderr_lines()
            .iter()
            .any(|l| l.contains("request_id=\"txt\"")),
        "with a file, stderr has no access lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_access_log_off_nothing_is_logged() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(ms(300)).await;
    assert!(access_lines(&ld).is_empty());
    assert_eq!(
        metric(ld.admin_addr(), "lameduck_access_log_dropped_total").await,
        0.0
    );
}

// === upgraded (WebSocket) tunnels ===

/// Bytes a client wrote and read on its connection.
#[derive(Default)]
struct ByteCounts {
    written: std::sync::atomic::AtomicU64,
    read: std::sync::atomic::AtomicU64,
}

impl ByteCounts {
    fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.written.load(Relaxed), self.read.load(Relaxed))
    }
}

/// The client's TCP connection, counting what goes through it: after the
/// handshake, exactly the bytes the tunnel carries (frames and all).
struct CountingStream {
    tcp: TcpStream,
    counts: std::sync::Arc<ByteCounts>,
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counts
            .read
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        polled
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.counts
                .written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

type CountedWs = tokio_tungstenite::WebSocketStream<CountingStream>;

/// A WebSocket through the proxy with this `x-request-id`; the counts
/// start at zero once the 101 has been read.
async fn ws_connect(proxy: SocketAddr, id: &str) -> (CountedWs, std::sync::Arc<ByteCounts>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let counts = std::sync::Arc::new(ByteCounts::default());
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let stream = CountingStream {
        tcp,
        counts: counts.clone(),
    };
    let mut request = format!("ws://{proxy}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    let (ws, response) =
        tokio::time::timeout(secs(5), tokio_tungstenite::client_async(request, stream))
            .await
            .expect("WebSocket handshake in time")
            .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status().as_u16(), 101);
    // The app speaks only when spoken to: what was read so far is the 101.
    counts
        .written
        .store(0, std::sync::atomic::Ordering::Relaxed);
    counts.read.store(0, std::sync::atomic::Ordering::Relaxed);
    (ws, counts)
}

async fn ws_echo(ws: &mut CountedWs, text: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(text.to_owned())).await.unwrap();
    let echoed = tokio::time::timeout(secs(3), ws.next())
        .await
        .expect("echo in time");
    match echoed {
        Some(Ok(Message::Text(got))) => assert_eq!(got, text),
        other => panic!("no echo of {text:?}: {other:?}"),
    }
}

async fn ws_behind_lameduck(extra: &[&str]) -> (WsEcho, Lameduck) {
    let app = WsEcho::start().await;
    let up = app.addr.to_string();
    let mut args = vec!["--upstream", up.as_str(), "--access-log", "json"];
    args.extend_from_slice(extra);
    let ld = Lameduck::spawn(&args);
    wait_ready(ld.admin_addr(), secs(10)).await;
    (app, ld)
}

fn lines_with_id(ld: &Lameduck, id: &str) -> Vec<Value> {
    access_lines(ld)
        .into_iter()
        .filter(|v| field_str(v, "request_id") == Some(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_is_logged_once_when_it_ends_with_its_bytes_and_duration() {
    use futures_util::StreamExt;
    let (_app, ld) = ws_behind_lameduck(&[]).await;
    let opened = std::time::Instant::now();
    let (mut ws, counts) = ws_connect(ld.proxy_addr(), "ws-ok").await;
    ws_echo(&mut ws, "hello").await;
    ws_echo(&mut ws, &"x".repeat(300)).await;
    tokio::time::sleep(ms(400)).await;
    assert!(
        lines_with_id(&ld, "ws-ok").is_empty(),
        "logged before the tunnel ended: {:?}",
        lines_with_id(&ld, "ws-ok")
    );

    // A clean close: the close handshake, then the app's FIN and ours.
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let (written, read) = counts.get();
    let line = line_for(&ld, "ws-ok").await;
    let lifetime_ms = opened.elapsed().as_secs_f64() * 1e3;

    assert_well_formed(&line);
    assert_eq!(s(&line, "method"), Some("GET"));
    assert_eq!(s(&line, "path"), Some("/ws"));
    assert_eq!(s(&line, "protocol"), Some("HTTP/1.1"));
    assert_eq!(n(&line, "status"), Some(101));
    assert_eq!(n(&line, "request_bytes"), Some(written), "{line}");
    assert_eq!(n(&line, "response_bytes"), Some(read), "{line}");
    // Two echoes of 5 and 300 bytes plus the close frames, framed (RFC 6455).
    assert!(written > 305 && read > 305, "{written} {read}");
    let duration = f(&line, "duration_ms");
    assert!(
        (400.0..=lifetime_ms).contains(&duration),
        "duration {duration} ms, the tunnel lived 400..{lifetime_ms} ms"
    );
    let head = f(&line, "upstream_head_ms");
    assert!(head > 0.0 && head < duration, "{line}");
    assert_eq!(s(&line, "outcome"), Some("ok"));
    assert_eq!(s(&line, "phase"), Some("accepting"));
    tokio::time::sleep(ms(200)).await;
    assert_eq!(lines_with_id(&ld, "ws-ok").len(), 1, "one line per tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reset_by_the_client_or_cut_at_the_deadline_is_logged_as_such() {
    let (_app, mut ld) =
        ws_behind_lameduck(&["--drain-delay", "100ms", "--drain-timeout", "1500ms"]).await;
    let (mut reset, reset_counts) = ws_connect(ld.proxy_addr(), "ws-reset").await;
    let (mut cut, cut_counts) = ws_connect(ld.proxy_addr(), "ws-forced").await;
    ws_echo(&mut reset, "going away").await;
    ws_echo(&mut cut, "staying").await;

    // SO_LINGER 0: the close is a reset, as from a client that crashed.
    reset.get_ref().tcp.set_zero_linger().unwrap();
    let (written, read) = reset_counts.get();
    drop(reset);
    let line = line_for(&ld, "ws-reset").await;
    assert_eq!(n(&line, "status"), Some(101));
    assert_eq!(n(&line, "request_bytes"), Some(written), "{line}");
    assert_eq!(n(&line, "response_bytes"), Some(read), "{line}");
    assert_eq!(s(&line, "outcome"), Some("client_aborted"), "{line}");

    ld.signal(Signal::SIGTERM);
    assert_eq!(ld.wait_exit(secs(10)).await.code(), Some(3));
    let (written, read) = cut_counts.get();
    let line = line_for(&ld, "ws-forced").await;
    assert_eq!(n(&line, "status"), Some(101));
    assert_eq!(n(&line, "request_bytes"), Some(written), "{line}");
    assert_eq!(n(&line, "response_bytes"), Some(read), "{line}");
    assert_eq!(s(&line, "outcome"), Some("forced"), "{line}");
    // Opened before the drain, cut at its deadline 1.5 s into it.
    assert_eq!(s(&line, "phase"), Some("accepting"));
    assert!(f(&line, "duration_ms") >= 1500.0, "{line}");
    drop(cut);
}

// === streamed request bodies on hyper's path ===

/// POST `path` over HTTP/2 with a body of unknown size (no content-length,
/// DATA frames sent with pauses between them, END_STREAM on the last one):
/// (status, response body).
async fn h2_streamed_upload(
    c: &mut H2,
    addr: SocketAddr,
    path: &str,
    id: &str,
    parts: &[&[u8]],
) -> (u16, Vec<u8>) {
    let mut ready = c.send.clone().ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("x-request-id", id)
        .body(())
        .unwrap();
    let (response, mut upload) = ready.send_request(req, false).unwrap();
    c.send = ready;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        upload
            .send_data(Bytes::copy_from_slice(part), last)
            .unwrap();
        if !last {
            tokio::time::sleep(ms(50)).await;
        }
    }
    let response = tokio::time::timeout(secs(5), response)
        .await
        .expect("response in time")
        .unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, got)
}

const UPLOAD: [&[u8]; 3] = [b"first part, ", &[b'x'; 2000], b", the end"];

fn assert_streamed_upload_logged(line: &Value) {
    let sent: u64 = UPLOAD.iter().map(|p| p.len() as u64).sum();
    assert_well_formed(line);
    assert_eq!(s(line, "protocol"), Some("HTTP/2"));
    assert_eq!(s(line, "method"), Some("POST"));
    assert_eq!(n(line, "status"), Some(200));
    assert_eq!(n(line, "request_bytes"), Some(sent), "{line}");
    assert_eq!(n(line, "response_bytes"), Some(sent), "echoed: {line}");
    assert_eq!(s(line, "outcome"), Some("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_http2_upload_to_an_http1_app_is_counted() {
    let (_app, ld) = app_behind_lameduck(&["--access-log", "json"]).await;
    let proxy = ld.proxy_addr();
    let mut c = h2_connect(proxy).await;
    let (status, echoed) = h2_streamed_upload(&mut c, proxy, "/echo", "h2-up", &UPLOAD).await;
    assert_eq!(status, 200);
    assert_eq!(echoed, UPLOAD.concat());
    assert_streamed_upload_logged(&line_for(&ld, "h2-up").await);
    // A bodiless stream on the same connection stays at 0.
    let resp = c.start(proxy, "/", "h2-get").await.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.unwrap();
    }
    assert_eq!(n(&line_for(&ld, "h2-get").await, "request_bytes"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_http2_upload_to_an_http2_app_is_counted() {
    let app = H2App::start().await;
    let up = app.addr.to_string();
    let ld = Lameduck::spawn(&[
        "--upstream",
        &up,
        "--upstream-protocol",
        "http2",
        "--access-log",
        "json",
    ]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let proxy = ld.proxy_addr();
    let mut c = h2_connect(proxy).await;
    let (status, echoed) = h2_streamed_upload(&mut c, proxy, "/upload", "h2-h2-up", &UPLOAD).await;
    assert_eq!(status, 200);
    assert_eq!(echoed, UPLOAD.concat());
    assert_streamed_upload_logged(&line_for(&ld, "h2-h2-up").await);
}
