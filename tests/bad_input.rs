//! Hostile or broken clients: garbage, malformed requests, huge headers,
//! slowloris, connection floods. The proxy must answer or cut them off and
//! keep serving everyone else.

mod support;

use std::time::Instant;

use support::*;

/// A normal request succeeds and, once every client is gone, no connection is active.
async fn assert_still_healthy(ld: &Lameduck) {
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from the test app\n");
    wait_no_active_connections(ld.admin_addr(), secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_400_and_the_connection_closes_without_hurting_others() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let mut bystander = RawConn::connect(ld.proxy_addr()).await;
    assert_eq!(bystander.get("/").await.expect("bystander").status, 200);

    let mut c = RawConn::connect(ld.proxy_addr()).await;
    c.send_raw(b"\x00\x01\x02\xff\xfe garbage \x7f\r\n\r\n")
        .await
        .unwrap();
    let r = c.read_response().await.expect("an HTTP answer to garbage");
    assert_eq!(r.status, 400);
    assert!(
        c.closed_within(secs(2)).await,
        "connection closed after the 400"
    );

    let r = bystander.get("/").await.expect("bystander after garbage");
    assert_eq!(r.status, 200, "other connections are unaffected");
    drop(bystander);
    assert_still_healthy(&ld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_line_gets_400() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    for bad in [
        &b"GET /no-version\r\nhost: x\r\n\r\n"[..],
        &b"GET / HTTP/1.1 trailing-junk\r\nhost: x\r\n\r\n"[..],
        &b"G E T / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
    ] {
        let mut c = RawConn::connect(ld.proxy_addr()).await;
        c.send_raw(bad).await.unwrap();
        let r = c.read_response().await.unwrap_or_else(|e| {
            panic!(
                "no HTTP answer to {:?}: {e:?}",
                String::from_utf8_lossy(bad)
            )
        });
        assert_eq!(r.status, 400, "request {:?}", String::from_utf8_lossy(bad));
        assert!(
            c.closed_within(secs(2)).await,
            "connection closed after the 400"
        );
    }
    assert_still_healthy(&ld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kib_header_gets_431() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let big = "a".repeat(100 * 1024);
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    // The proxy may answer and close before reading everything: ignore write errors.
    let _ = c
        .send_raw(&build_request(
            "GET",
            "/big-header",
            &[("x-big", &big)],
            b"",
        ))
        .await;
    let r = c
        .read_response()
        .await
        .expect("an HTTP answer to a huge header");
    assert_eq!(r.status, 431);
    assert!(
        app.last_request("/big-header").is_none(),
        "the oversized request must not reach the app"
    );
    drop(c);
    assert_still_healthy(&ld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trickled_one_byte_per_200ms_are_cut_at_the_header_read_timeout() {
    let (app, ld) = app_behind_lameduck(&["--header-read-timeout", "1s"]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let start = Instant::now();
    let trickle = b"GET /trickle HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_at = None;
    for &b in trickle.iter().take(40) {
        if c.send_raw(&[b]).await.is_err() {
            cut_at = Some(start.elapsed());
            break;
        }
        if c.closed_within(ms(200)).await {
            cut_at = Some(start.elapsed());
            break;
        }
    }
    let cut_at = cut_at.expect("slow client was never cut off (8s of trickling)");
    assert_between(
        cut_at,
        ms(800),
        secs(3),
        "slowloris cut-off with --header-read-timeout 1s",
    );
    assert!(
        app.last_request("/trickle").is_none(),
        "nothing reached the app"
    );
    let header_read = "lameduck_timeouts_total{kind=\"header_read\"}";
    assert_eq!(metric(ld.admin_addr(), header_read).await, 1.0);
    drop(c);
    assert_still_healthy(&ld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed_at_once_while_established_ones_work() {
    let (_app, ld) = app_behind_lameduck(&["--max-connections", "5"]).await;
    let proxy = ld.proxy_addr();
    let admin = ld.admin_addr();

    let mut established = RawConn::connect(proxy).await;
    assert_eq!(established.get("/").await.expect("established").status, 200);
    // Four more keep-alive connections, each used once, then left idle.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = RawConn::connect(proxy).await;
        assert_eq!(c.get("/").await.expect("keep-alive").status, 200);
        idle.push(c);
    }
    wait_metric_sum(admin, "lameduck_connections_active", |v| v == 5.0, secs(3)).await;

    // Five more: over the limit, each closed straight away.
    let mut extra = Vec::new();
    for _ in 0..5 {
        if let Ok(c) = RawConn::try_connect(proxy).await {
            extra.push(c);
        }
    }
    let mut closed = 0;
    for c in extra.iter_mut() {
        if c.closed_within(secs(1)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        extra.len(),
        "every connection over --max-connections 5 is closed at once"
    );
    for c in idle.iter_mut() {
        assert!(
            c.stays_open_for(ms(10)).await,
            "accepted idle connections stay open"
        );
    }
    let r = established
        .get("/")
        .await
        .expect("established connection after the flood");
    assert_eq!(r.status, 200);
    let rejected = metric(admin, "lameduck_connections_rejected_total").await;
    assert!(rejected >= 5.0, "connections_rejected_total = {rejected}");

    drop(idle);
    drop(extra);
    drop(established);
    wait_no_active_connections(admin, secs(5)).await;
    assert_still_healthy(&ld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let mut batch = build_request("GET", "/slow?ms=200", &[], b"");
    batch.extend(build_request("GET", "/", &[], b""));
    batch.extend(build_request("POST", "/echo", &[], b"third"));
    c.send_raw(&batch).await.unwrap();
    let r1 = c.read_response().await.expect("first pipelined response");
    let r2 = c.read_response().await.expect("second pipelined response");
    let r3 = c.read_response().await.expect("third pipelined response");
    assert_eq!((r1.status, r1.text().as_str()), (200, "slept 200 ms\n"));
    assert_eq!(
        (r2.status, r2.text().as_str()),
        (200, "hello from the test app\n")
    );
    assert_eq!((r3.status, r3.text().as_str()), (200, "third"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_is_closed_after_the_idle_timeout() {
    let (_app, ld) = app_behind_lameduck(&["--idle-timeout", "1s"]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    assert_eq!(c.get("/").await.expect("first request").status, 200);
    let idle_since = Instant::now();
    assert!(
        c.closed_within(secs(4)).await,
        "idle keep-alive connection still open 4s into a 1s --idle-timeout"
    );
    assert_between(
        idle_since.elapsed(),
        ms(800),
        secs(3),
        "idle close with --idle-timeout 1s",
    );
    wait_no_active_connections(ld.admin_addr(), secs(3)).await;
    assert_eq!(
        metric(ld.admin_addr(), "lameduck_timeouts_total{kind=\"idle\"}").await,
        1.0
    );
    assert_still_healthy(&ld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_request_frees_its_connection() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    c.send_raw(&build_request("GET", "/slow?ms=5000", &[], b""))
        .await
        .unwrap();
    wait_metric(
        ld.admin_addr(),
        "lameduck_requests_in_flight",
        |v| v == 1.0,
        secs(3),
    )
    .await;
    drop(c);
    wait_metric(
        ld.admin_addr(),
        "lameduck_requests_in_flight",
        |v| v == 0.0,
        secs(7),
    )
    .await;
    assert_still_healthy(&ld).await;
}
