//! WebSocket (HTTP/1.1 Upgrade) tunnels through the proxy, and how a drain treats them.

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::Signal;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<TcpStream>;

async fn ws_connect(proxy: SocketAddr) -> Ws {
    let tcp = TcpStream::connect(proxy).await.expect("connect");
    let (ws, resp) = tokio::time::timeout(
        secs(5),
        tokio_tungstenite::client_async(format!("ws://{proxy}/ws"), tcp),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Sends a text message and expects it echoed back within 3s.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_string()))
        .await
        .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    let got = tokio::time::timeout(secs(3), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no echo for {text:?} within 3s"))
    .unwrap_or_else(|e| panic!("echo of {text:?} failed: {e}"));
    assert_eq!(got, text);
}

async fn setup(extra: &[&str]) -> (WsEcho, Lameduck) {
    let up = WsEcho::start().await;
    let a = up.addr.to_string();
    let mut args = vec!["--upstream", a.as_str()];
    args.extend_from_slice(extra);
    let ld = Lameduck::spawn(&args);
    wait_ready(ld.admin_addr(), secs(10)).await;
    (up, ld)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_works_through_the_proxy() {
    let (_up, ld) = setup(&[]).await;
    let mut ws = ws_connect(ld.proxy_addr()).await;
    for i in 0..5 {
        echo(&mut ws, &format!("message {i}")).await;
    }
    ws.send(Message::Binary(vec![0, 1, 2, 255])).await.unwrap();
    let got = tokio::time::timeout(secs(3), ws.next())
        .await
        .expect("binary echo");
    assert!(matches!(got, Some(Ok(Message::Binary(b))) if b == vec![0, 1, 2, 255]));
    assert_eq!(
        metric(ld.admin_addr(), "lameduck_upgrades_active").await,
        1.0
    );
    ws.close(None).await.unwrap();
    // Finish the close handshake (bounded), then hang up like a real client.
    let _ = tokio::time::timeout(secs(2), async { while ws.next().await.is_some() {} }).await;
    drop(ws);
    wait_metric(
        ld.admin_addr(),
        "lameduck_upgrades_active",
        |v| v == 0.0,
        secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_websocket_keeps_working_across_the_drain_and_exit_follows_its_close() {
    let (_up, mut ld) = setup(&["--drain-delay", "1s", "--drain-timeout", "10s"]).await;
    let admin = ld.admin_addr();
    let mut ws = ws_connect(ld.proxy_addr()).await;
    echo(&mut ws, "before").await;
    assert_eq!(metric(admin, "lameduck_upgrades_active").await, 1.0);

    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    wait_admin(admin, "/ready", |s, _| s == 503, ms(500))
        .await
        .expect("/ready 503 after SIGTERM");
    echo(&mut ws, "inside the window").await;

    tokio::time::sleep_until((t + ms(1500)).into()).await;
    assert!(
        ld.is_running(),
        "an open WebSocket keeps the process draining"
    );
    echo(&mut ws, "after the window").await;
    assert_eq!(
        metric(admin, "lameduck_upgrades_active").await,
        1.0,
        "the tunnel is an active connection"
    );
    assert!(
        connect_refused(ld.proxy_addr()).await,
        "listener closed after the window"
    );

    ws.close(None).await.expect("client close");
    let closed = Instant::now();
    // Drain the close handshake (bounded).
    let _ = tokio::time::timeout(secs(2), async { while ws.next().await.is_some() {} }).await;
    drop(ws);
    let status = ld.wait_exit(secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        closed.elapsed() < secs(3),
        "exit {:?} after the last WebSocket closed",
        closed.elapsed()
    );
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("graceful"), "{s}");
    assert_eq!(field_u64(&s, "connections_forced"), Some(0), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_still_open_at_the_deadline_is_closed_and_exit_code_is_3() {
    let (_up, mut ld) = setup(&["--drain-delay", "1s", "--drain-timeout", "2s"]).await;
    let mut ws = ws_connect(ld.proxy_addr()).await;
    echo(&mut ws, "hello").await;

    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    let status = ld.wait_exit(secs(6)).await;
    assert_eq!(status.code(), Some(3));
    assert_between(
        t.elapsed(),
        ms(1800),
        secs(4),
        "forced exit near the 2s deadline",
    );

    // The client sees its WebSocket end (close frame, error or EOF).
    let end = tokio::time::timeout(secs(3), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "the proxy must close the WebSocket at the deadline"
    );
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("deadline"), "{s}");
    assert!(field_u64(&s, "connections_forced").unwrap_or(0) >= 1, "{s}");
}
