//! HTTP/2: h2c prior-knowledge clients, GOAWAY on drain, and proxying to an
//! HTTP/2 (gRPC-style) upstream.

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use h2::client::{self, SendRequest};
use hyper::{HeaderMap, Request};
use nix::sys::signal::Signal;
use support::*;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

struct H2Client {
    send: SendRequest<Bytes>,
    conn: JoinHandle<Result<(), h2::Error>>,
}

async fn h2_connect(addr: SocketAddr) -> H2Client {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = tokio::time::timeout(secs(5), client::handshake(tcp))
        .await
        .expect("h2 handshake timed out")
        .expect("h2 handshake");
    H2Client {
        send,
        conn: tokio::spawn(conn),
    }
}

struct H2Response {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
}

async fn read_h2_response(fut: h2::client::ResponseFuture) -> Result<H2Response, h2::Error> {
    let resp = fut.await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?;
    Ok(H2Response {
        status,
        headers,
        body: data,
        trailers,
    })
}

/// Sends a body-less request on `send`.
async fn h2_get(
    send: &mut SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
) -> Result<h2::client::ResponseFuture, h2::Error> {
    let mut ready = send.clone().ready().await?;
    let req = Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let (fut, _) = ready.send_request(req, true)?;
    *send = ready;
    Ok(fut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_requests_are_proxied_and_counted_as_http2() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let proxy = ld.proxy_addr();
    let mut c = h2_connect(proxy).await;
    for _ in 0..3 {
        let fut = h2_get(&mut c.send, proxy, "/").await.expect("send");
        let r = tokio::time::timeout(secs(10), read_h2_response(fut))
            .await
            .expect("h2 response timed out")
            .expect("h2 response");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello from the test app\n");
    }
    assert_eq!(
        metric(
            ld.admin_addr(),
            "lameduck_connections_active{protocol=\"http2\"}"
        )
        .await,
        1.0
    );
    drop(c.send);
    c.conn.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_goaway_while_the_in_flight_h2_stream_completes() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "10s"]).await;
    let proxy = ld.proxy_addr();
    let admin = ld.admin_addr();
    let mut c = h2_connect(proxy).await;

    let long = h2_get(&mut c.send, proxy, "/slow?ms=2500")
        .await
        .expect("send long stream");
    let long = tokio::spawn(read_h2_response(long));
    wait_metric(admin, "lameduck_requests_in_flight", |v| v >= 1.0, secs(5)).await;

    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    wait_admin(admin, "/ready", |s, _| s == 503, ms(500))
        .await
        .expect("/ready 503 after SIGTERM");

    // Probe with new streams until the client has seen GOAWAY. Streams that the
    // server accepted before its GOAWAY must still be answered normally.
    let mut goaway = false;
    for _ in 0..40 {
        match h2_get(&mut c.send, proxy, "/").await {
            Err(e) if e.is_go_away() => {
                goaway = true;
                break;
            }
            Err(e) => panic!("new stream failed without GOAWAY: {e:?}"),
            Ok(fut) => match tokio::time::timeout(secs(5), read_h2_response(fut)).await {
                Ok(Ok(r)) => assert_eq!(r.status, 200, "accepted stream during the window"),
                Ok(Err(e)) if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                    goaway = true;
                    break;
                }
                Ok(Err(e)) => panic!("probe stream failed: {e:?}"),
                Err(_) => panic!("probe stream timed out"),
            },
        }
        if t.elapsed() > ms(2500) {
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    assert!(
        goaway,
        "no GOAWAY seen by the h2 client within {:?} of SIGTERM (window 1s)",
        t.elapsed()
    );

    let r = tokio::time::timeout(secs(8), long)
        .await
        .expect("in-flight stream did not finish")
        .unwrap()
        .expect("in-flight stream must complete despite GOAWAY");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"slept 2500 ms\n");
    let done = Instant::now();

    let conn_end = tokio::time::timeout(secs(5), c.conn).await;
    assert!(
        conn_end.is_ok(),
        "h2 connection not closed by the proxy after its last stream"
    );
    let status = ld.wait_exit(secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        done.elapsed() < secs(3),
        "exit {:?} after the last stream",
        done.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_call_through_an_http2_upstream_passes_te_and_returns_trailers() {
    let app = H2App::start().await;
    let up = app.addr.to_string();
    let ld = Lameduck::spawn(&["--upstream", &up, "--upstream-protocol", "http2"]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let proxy = ld.proxy_addr();
    let c = h2_connect(proxy).await;

    let payload = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let req = Request::post(format!("http://{proxy}/demo.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = c.send.clone().ready().await.expect("ready");
    let (fut, mut stream) = send.send_request(req, false).expect("send_request");
    stream.send_data(payload.clone(), true).expect("send_data");
    let r = tokio::time::timeout(secs(10), read_h2_response(fut))
        .await
        .expect("gRPC call timed out")
        .expect("gRPC call");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/grpc")
    );
    assert_eq!(r.body, payload.to_vec());
    let trailers = r.trailers.expect("response trailers must arrive");
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0")
    );
    assert_eq!(
        trailers.get("grpc-message").and_then(|v| v.to_str().ok()),
        Some("ok")
    );

    let seen = app
        .requests()
        .into_iter()
        .find(|r| r.path == "/demo.Greeter/SayHello")
        .expect("upstream saw the call");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.version, "HTTP/2.0", "upstream is spoken to over h2");
    assert_eq!(
        seen.header("te"),
        Some("trailers"),
        "te: trailers must be passed"
    );
    assert_eq!(seen.header("content-type"), Some("application/grpc"));
    c.conn.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_is_proxied_to_an_http2_upstream() {
    let app = H2App::start().await;
    let up = app.addr.to_string();
    let ld = Lameduck::spawn(&["--upstream", &up, "--upstream-protocol", "http2"]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello over h2\n");
    let seen = app.requests();
    assert!(
        seen.iter()
            .any(|r| r.path == "/" && r.version == "HTTP/2.0"),
        "upstream saw {seen:?}"
    );
}
