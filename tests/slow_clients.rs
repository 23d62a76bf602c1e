//! Slow and stuck clients: a request body that stops arriving is cut at
//! --body-read-timeout (408 while a response can still be sent), a client
//! that stops reading a response is cut at --send-timeout; both are counted
//! in `lameduck_timeouts_total{kind}`, on the own HTTP/1 path, on hyper's
//! HTTP/1 path and for HTTP/2 clients, and neither costs another client
//! anything.

mod support;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use support::*;

const BODY_TIMEOUT: &str = "body_read";
const SEND_TIMEOUT: &str = "send";

async fn behind_lameduck() -> (TestApp, Lameduck) {
    app_behind_lameduck(&["--body-read-timeout", "500ms", "--send-timeout", "500ms"]).await
}

fn timeouts(kind: &str) -> String {
    format!("lameduck_timeouts_total{{kind=\"{kind}\"}}")
}

/// Another client is served normally while a slow one is being cut.
async fn others_are_served(proxy: SocketAddr) {
    let started = Instant::now();
    let (status, body) = get(proxy, "/").await;
    assert_eq!((status, body.as_str()), (200, "hello from the test app\n"));
    assert!(
        started.elapsed() < secs(2),
        "a healthy client waited {:?}",
        started.elapsed()
    );
}

/// Sends a head promising 10 body bytes and 3 of them, then nothing.
async fn stalled_upload(proxy: SocketAddr, version: &str) -> RawConn {
    let mut conn = RawConn::connect(proxy).await;
    let head = format!(
        "POST /echo {version}\r\nHost: app\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\nabc"
    );
    conn.send_raw(head.as_bytes()).await.unwrap();
    conn
}

async fn assert_cut_with_408(conn: &mut RawConn) {
    let started = Instant::now();
    let response = conn
        .read_response_for(false, secs(5))
        .await
        .expect("a 408 response");
    assert_eq!(response.status, 408, "{}", response.text());
    assert!(response.has_connection_close());
    assert!(
        conn.closed_within(secs(2)).await,
        "connection left open after the 408"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "cut after {waited:?}, before the timeout"
    );
}

/// An HTTP/1 upload that stops after 3 of its 10 bytes.
async fn stalled_upload_gets_408(version: &str) {
    let (app, ld) = behind_lameduck().await;
    let mut conn = stalled_upload(ld.proxy_addr(), version).await;
    others_are_served(ld.proxy_addr()).await;
    assert_cut_with_408(&mut conn).await;
    wait_metric(
        ld.admin_addr(),
        &timeouts(BODY_TIMEOUT),
        |v| v >= 1.0,
        secs(2),
    )
    .await;
    // The app got the head and part of a body; that connection is not reused.
    others_are_served(ld.proxy_addr()).await;
    assert!(app.last_request("/").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_on_the_own_http1_path() {
    stalled_upload_gets_408("HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_on_hypers_http1_path() {
    // HTTP/1.0 requests are served by hyper.
    stalled_upload_gets_408("HTTP/1.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_request_body_gets_408() {
    let (_app, ld) = behind_lameduck().await;
    let mut client = h2_client(ld.proxy_addr(), Arc::default()).await;
    let request = http::Request::post("http://app/echo").body(()).unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(b"abc"), false).unwrap();
    others_are_served(ld.proxy_addr()).await;
    let response = tokio::time::timeout(secs(5), response)
        .await
        .expect("a response within 5s")
        .expect("a response");
    assert_eq!(response.status(), 408);
    wait_metric(
        ld.admin_addr(),
        &timeouts(BODY_TIMEOUT),
        |v| v >= 1.0,
        secs(2),
    )
    .await;
}

/// Asks for a response far larger than the socket buffers and never reads it.
async fn unread_download(proxy: SocketAddr, version: &str) -> TcpStream {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let head = format!("GET /bytes?n=200000000 {version}\r\nHost: app\r\n\r\n");
    stream.writable().await.unwrap();
    stream.try_write(head.as_bytes()).unwrap();
    stream
}

/// Waits for lameduck to close a connection whose reader stopped (the
/// kernel then reports the peer's FIN or RST once we drain what is queued).
async fn closed_by_lameduck(stream: TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut sink = vec![0u8; 1 << 20];
    // Give the timeout time to fire with the buffers full.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while Instant::now() < deadline {
        stream.readable().await.unwrap();
        match stream.try_read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

/// A client that stops reading a large response on an HTTP/1 connection.
async fn reader_that_stops_is_cut(version: &str) {
    let (_app, ld) = behind_lameduck().await;
    let stream = unread_download(ld.proxy_addr(), version).await;
    wait_metric(
        ld.admin_addr(),
        &timeouts(SEND_TIMEOUT),
        |v| v >= 1.0,
        secs(10),
    )
    .await;
    others_are_served(ld.proxy_addr()).await;
    assert!(closed_by_lameduck(stream, secs(20)).await);
    wait_no_active_connections(ld.admin_addr(), secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_on_the_own_http1_path() {
    reader_that_stops_is_cut("HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_on_hypers_http1_path() {
    // HTTP/1.0 requests are served by hyper.
    reader_that_stops_is_cut("HTTP/1.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_the_socket_is_cut() {
    let (_app, ld) = behind_lameduck().await;
    let paused = Arc::new(AtomicBool::new(false));
    let mut client = h2_client(ld.proxy_addr(), paused.clone()).await;
    let request = http::Request::get("http://app/bytes?n=200000000")
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = tokio::time::timeout(secs(5), response)
        .await
        .expect("response head within 5s")
        .expect("response head");
    assert_eq!(response.status(), 200);
    // The windows are huge, so only TCP can hold lameduck back now.
    paused.store(true, Ordering::Release);
    wait_metric(
        ld.admin_addr(),
        &timeouts(SEND_TIMEOUT),
        |v| v >= 1.0,
        secs(10),
    )
    .await;
    others_are_served(ld.proxy_addr()).await;
    wait_no_active_connections(ld.admin_addr(), secs(5)).await;
}

/// An HTTP/2 client with windows large enough that flow control never stops
/// the server; reads stop for good once `paused` is set.
async fn h2_client(addr: SocketAddr, paused: Arc<AtomicBool>) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let io = PausableRead { inner: tcp, paused };
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 30)
        .initial_connection_window_size(1 << 30)
        .handshake(io)
        .await
        .expect("h2 handshake");
    // Dropped with the test's runtime.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.expect("h2 ready")
}

struct PausableRead {
    inner: TcpStream,
    paused: Arc<AtomicBool>,
}

impl AsyncRead for PausableRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.paused.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PausableRead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
