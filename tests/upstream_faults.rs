//! Upstream failures (refusing, hanging, dying mid-response) and what the
//! proxy adds to / removes from requests on the way to the app.

mod support;

use std::time::Instant;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_gives_a_fast_502_with_a_short_body() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let app_addr = app.addr;
    drop(app);
    let mut refused = false;
    for _ in 0..100 {
        if connect_refused(app_addr).await {
            refused = true;
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    assert!(refused, "test app still listening after drop");

    let start = Instant::now();
    let r = http_get(ld.proxy_addr(), "/").await;
    let took = start.elapsed();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(took < secs(2), "502 took {took:?}");
    assert!(
        r.body.len() <= 512,
        "502 body should be short, got {} bytes",
        r.body.len()
    );
    let errors = metric_or_zero(
        ld.admin_addr(),
        "lameduck_upstream_errors_total{kind=\"connect\"}",
    )
    .await;
    assert!(
        errors >= 1.0,
        "upstream_errors_total{{kind=connect}} = {errors}"
    );
    let fivexx = metric_or_zero(ld.admin_addr(), "lameduck_requests_total{code=\"5xx\"}").await;
    assert!(fivexx >= 1.0, "requests_total{{code=5xx}} = {fivexx}");
}

/// An app outage fails every request; the log must not fail with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failure_warnings_are_capped_and_count_what_they_left_out() {
    let ld = Lameduck::spawn(&["--upstream", &closed_port().to_string()]);
    let mut conn = RawConn::connect(ld.proxy_addr()).await;
    let started = Instant::now();
    for _ in 0..200 {
        let r = conn.get("/").await.expect("a 502, not a broken connection");
        assert_eq!(r.status, 502);
    }
    let burst = started.elapsed();
    // The next second's budget: its first line reports the ones left out.
    tokio::time::sleep(secs(1)).await;
    assert_eq!(conn.get("/").await.expect("a 502").status, 502);
    let failures = |ld: &Lameduck| ld.logs_with_message("upstream request failed");
    let last = ld
        .wait_for_log(
            |line| {
                message(line) == "upstream request failed" && field_u64(line, "left_out") > Some(0)
            },
            secs(5),
        )
        .await;
    let logged = failures(&ld).len();
    // 10 a second: the burst spans at most a few seconds' budgets.
    let budgets = burst.as_secs() + 3;
    assert!(
        logged as u64 <= 10 * budgets,
        "{logged} warnings for 201 failures in {burst:?}"
    );
    let left_out: u64 = failures(&ld)
        .iter()
        .filter_map(|l| field_u64(l, "left_out"))
        .sum();
    assert_eq!(
        logged as u64 + left_out,
        201,
        "every failure is either logged or counted: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_not_answering_syns_fails_at_the_connect_timeout() {
    let (app, ld) = app_behind_lameduck(&[
        "--upstream-connect-timeout",
        "500ms",
        "--upstream-timeout",
        "10s",
    ])
    .await;
    let port = app.addr;
    drop(app);
    // Re-bind the upstream port with a backlog of 1 and fill the accept queue:
    // further SYNs are dropped, so connects hang instead of being refused.
    let mut blackhole = None;
    for _ in 0..100 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if sock.bind(port).is_ok() {
            blackhole = Some(sock.listen(1).unwrap());
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    let _blackhole = blackhole.expect("re-bind the upstream port");
    let mut parked = Vec::new();
    let mut full = false;
    for _ in 0..16 {
        match tokio::time::timeout(ms(300), tokio::net::TcpStream::connect(port)).await {
            Ok(Ok(s)) => parked.push(s),
            Ok(Err(e)) => panic!("filling the backlog: {e}"),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(full, "could not fill the upstream accept queue");

    let start = Instant::now();
    let r = http_get(ld.proxy_addr(), "/").await;
    let took = start.elapsed();
    assert!(
        r.status == 502 || r.status == 504,
        "connect timeout should give a gateway error, got {} {}",
        r.status,
        r.text()
    );
    assert_between(took, ms(400), ms(2500), "--upstream-connect-timeout 500ms");
    let errors = metric_or_zero(
        ld.admin_addr(),
        "lameduck_upstream_errors_total{kind=\"connect_timeout\"}",
    )
    .await;
    assert!(
        errors >= 1.0,
        "upstream_errors_total{{kind=connect_timeout}} = {errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_hanging_gives_504_at_the_upstream_timeout() {
    let (_app, ld) = app_behind_lameduck(&["--upstream-timeout", "500ms"]).await;
    let start = Instant::now();
    let r = http_get(ld.proxy_addr(), "/hang").await;
    let took = start.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_between(took, ms(400), ms(2500), "504 with --upstream-timeout 500ms");
    let errors = metric_or_zero(
        ld.admin_addr(),
        "lameduck_upstream_errors_total{kind=\"timeout\"}",
    )
    .await;
    assert!(
        errors >= 1.0,
        "upstream_errors_total{{kind=timeout}} = {errors}"
    );
    // The proxy keeps serving.
    assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_response_is_not_passed_off_as_complete() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let r = http_request(ld.proxy_addr(), "GET", "/die", &[], b"").await;
    match &r {
        Err(ClientError::Truncated { .. }) | Err(ClientError::Closed) | Err(ClientError::Io(_)) => {
        }
        Ok(resp) if resp.status == 502 => {}
        other => panic!(
            "a response cut by the upstream must reach the client truncated (or as 502), got {other:?}"
        ),
    }
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200, "next request to a healthy path works");
    assert_eq!(r.text(), "hello from the test app\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_generated_when_absent_and_seen_by_the_app() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let r1 = http_get(ld.proxy_addr(), "/headers").await;
    assert_eq!(r1.status, 200);
    let id1 = r1
        .header("x-request-id")
        .expect("x-request-id returned to the client")
        .to_string();
    assert!(!id1.is_empty());
    let seen = app.last_request("/headers").unwrap();
    assert_eq!(
        seen.header("x-request-id"),
        Some(id1.as_str()),
        "app saw the same id"
    );
    assert!(r1.text().contains(&format!("x-request-id: {id1}")));

    let r2 = http_get(ld.proxy_addr(), "/headers").await;
    let id2 = r2.header("x-request-id").expect("x-request-id").to_string();
    assert_ne!(id1, id2, "generated ids are unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_from_the_client_is_preserved() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let r = http_request(
        ld.proxy_addr(),
        "GET",
        "/headers",
        &[("x-request-id", "client-chosen-id-42")],
        b"",
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("client-chosen-id-42"));
    let seen = app.last_request("/headers").unwrap();
    assert_eq!(seen.header_all("x-request-id"), vec!["client-chosen-id-42"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_and_proto_reach_the_app() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let r = http_get(ld.proxy_addr(), "/headers").await;
    assert_eq!(r.status, 200);
    let seen = app.last_request("/headers").unwrap();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{:?}",
        seen.headers
    );
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("http"),
        "{:?}",
        seen.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_reach_the_app() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let r = http_request(
        ld.proxy_addr(),
        "GET",
        "/headers",
        &[
            ("connection", "keep-alive, x-hop-secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("x-hop-secret", "must-not-pass"),
            ("x-end-to-end", "passes"),
        ],
        b"",
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200);
    let seen = app.last_request("/headers").unwrap();
    for h in ["keep-alive", "proxy-connection", "x-hop-secret"] {
        assert!(
            !seen.has_header(h),
            "hop-by-hop `{h}` reached the app: {:?}",
            seen.headers
        );
    }
    for v in seen.header_all("connection") {
        assert!(
            !v.to_ascii_lowercase().contains("x-hop-secret"),
            "client's Connection header was forwarded: {v}"
        );
    }
    assert_eq!(
        seen.header("x-end-to-end"),
        Some("passes"),
        "end-to-end headers pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_pass_through_intact() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let body: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let r = http_request(ld.proxy_addr(), "POST", "/echo", &[], &body)
        .await
        .expect("POST /echo");
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "echoed body differs ({} bytes back)",
        r.body.len()
    );

    let r = http_get(ld.proxy_addr(), "/bytes?n=3000000").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 3_000_000);
    assert!(r.body.iter().all(|b| *b == b'x'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_is_forwarded() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    c.send_raw(
        b"POST /echo HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n7\r\n chunks\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let r = c.read_response().await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello chunks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_request_gets_headers_without_a_body() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = c
        .request("HEAD", "/bytes?n=100", &[], b"")
        .await
        .expect("HEAD");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    // The connection is still in sync: a GET on it works.
    let r = c.get("/").await.expect("GET after HEAD");
    assert_eq!(r.text(), "hello from the test app\n");
}
