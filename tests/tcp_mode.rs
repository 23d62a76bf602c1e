//! `--mode tcp`: byte-exact passthrough, half-close, and drain.

mod support;

use std::time::Instant;

use nix::sys::signal::Signal;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup(mode: EchoMode, extra: &[&str]) -> (TcpEcho, Lameduck) {
    let up = TcpEcho::start(mode).await;
    let a = up.addr.to_string();
    let mut args = vec!["--mode", "tcp", "--upstream", a.as_str()];
    args.extend_from_slice(extra);
    let ld = Lameduck::spawn(&args);
    wait_ready(ld.admin_addr(), secs(10)).await;
    (up, ld)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + i / 251) % 256) as u8).collect()
}

/// Writes `data`, reads `data.len()` bytes back (3s deadline).
async fn roundtrip(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).await.expect("write");
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(secs(3), s.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo read");
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_is_logged_in_the_listening_line() {
    let (_up, ld) = setup(EchoMode::Streaming, &[]).await;
    assert_eq!(field_str(ld.listening_line(), "mode"), Some("tcp"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_passes_through_byte_for_byte() {
    let (_up, ld) = setup(EchoMode::AfterEof, &[]).await;
    let data = pattern(1 << 20);
    let mut s = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let (w, r) = tokio::join!(
        async {
            wr.write_all(&data).await?;
            wr.shutdown().await
        },
        async {
            let mut back = Vec::new();
            tokio::time::timeout(secs(20), rd.read_to_end(&mut back))
                .await
                .map(|r| r.map(|_| back))
        }
    );
    w.expect("write 1 MiB and shut down");
    let back = r.expect("reading back timed out").expect("read back");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ after the round trip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_propagated_and_the_reply_still_arrives() {
    let (_up, ld) = setup(EchoMode::AfterEof, &[]).await;
    let mut s = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    s.write_all(b"ping over a half-closed stream")
        .await
        .unwrap();
    // The upstream only answers after it sees our EOF.
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(secs(5), s.read_to_end(&mut back))
        .await
        .expect("reply after half-close timed out")
        .expect("read");
    assert_eq!(back, b"ping over a half-closed stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tcp_stream_is_counted_as_an_active_tcp_connection() {
    let (_up, ld) = setup(EchoMode::Streaming, &[]).await;
    let mut s = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    roundtrip(&mut s, b"hello").await;
    assert_eq!(
        metric(
            ld.admin_addr(),
            "lameduck_connections_active{protocol=\"tcp\"}"
        )
        .await,
        1.0
    );
    drop(s);
    wait_no_active_connections(ld.admin_addr(), secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_streams_after_the_window_keeps_open_ones_then_exits_0() {
    let (_up, mut ld) = setup(
        EchoMode::Streaming,
        &["--drain-delay", "1s", "--drain-timeout", "10s"],
    )
    .await;
    let proxy = ld.proxy_addr();
    let mut s = TcpStream::connect(proxy).await.unwrap();
    roundtrip(&mut s, b"before").await;

    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    wait_admin(ld.admin_addr(), "/ready", |st, _| st == 503, ms(500))
        .await
        .expect("/ready 503 after SIGTERM");
    roundtrip(&mut s, b"inside the window").await;

    tokio::time::sleep_until((t + ms(1500)).into()).await;
    assert!(ld.is_running(), "an open stream keeps the process draining");
    assert!(
        connect_refused(proxy).await,
        "new connects are refused after the window"
    );
    roundtrip(&mut s, &pattern(64 * 1024)).await;

    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(secs(3), s.read_to_end(&mut rest))
        .await
        .expect("stream not closed after our half-close")
        .expect("read to end");
    let closed = Instant::now();
    drop(s);
    let status = ld.wait_exit(secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        closed.elapsed() < secs(3),
        "exit {:?} after the stream closed",
        closed.elapsed()
    );
}

/// A stream nobody uses any more is closed after --tunnel-idle-timeout; one
/// that keeps talking outlives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_closed_after_the_tunnel_idle_timeout() {
    let (_up, ld) = setup(EchoMode::Streaming, &["--tunnel-idle-timeout", "1s"]).await;
    let mut talking = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    let mut silent = TcpStream::connect(ld.proxy_addr()).await.unwrap();
    roundtrip(&mut silent, b"hello").await;
    let silent_since = Instant::now();
    // 3 s of traffic every 250 ms: three timeouts' worth.
    for _ in 0..12 {
        roundtrip(&mut talking, b"still here").await;
        tokio::time::sleep(ms(250)).await;
    }
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(secs(5), silent.read(&mut buf))
        .await
        .expect("the silent stream was not closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_between(
        silent_since.elapsed(),
        ms(900),
        secs(5),
        "idle close after 1s",
    );
    roundtrip(&mut talking, b"and now").await;
}
