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
