//! Admin endpoints: /live, /ready, /metrics, /drain, /status, /drained.

mod support;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::*;

const FAMILIES: &[&str] = &[
    "lameduck_connections_active",
    "lameduck_connections_total",
    "lameduck_connections_rejected_total",
    "lameduck_requests_in_flight",
    "lameduck_requests_total",
    "lameduck_request_duration_seconds",
    "lameduck_upstream_errors_total",
    "lameduck_upgrades_active",
    "lameduck_draining",
    "lameduck_state",
    "lameduck_drain_started_timestamp_seconds",
    "lameduck_drain_duration_seconds",
    "lameduck_drain_connections_closed_total",
    "lameduck_build_info",
];

/// A family is present if it has a `# TYPE` line (a counter's TYPE line may
/// omit `_total`) or at least one sample (histograms: `_bucket/_sum/_count`).
fn family_present(text: &str, name: &str) -> bool {
    let base = name.strip_suffix("_total").unwrap_or(name);
    text.lines().any(|l| {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let n = rest.split_whitespace().next().unwrap_or("");
            n == name || n == base
        } else if l.starts_with('#') {
            false
        } else {
            let n = l.split(['{', ' ']).next().unwrap_or("");
            n == name
                || n == format!("{name}_bucket")
                || n == format!("{name}_count")
                || n == format!("{name}_sum")
        }
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_returns_200() {
    let ld = Lameduck::spawn(&[]);
    let (status, _) = get(ld.admin_addr(), "/live").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_top_level_keys_and_a_listening_line() {
    let app = TestApp::start().await;
    let upstream = app.addr.to_string();
    let ld = Lameduck::spawn(&["--upstream", &upstream]);
    let l = ld.listening_line();
    for key in [
        "timestamp",
        "level",
        "message",
        "target",
        "proxy",
        "admin",
        "mode",
        "upstream",
    ] {
        assert!(
            l.get(key).is_some(),
            "`listening` line lacks top-level key `{key}`: {l}"
        );
    }
    assert_eq!(l["message"], "listening");
    assert_eq!(l["mode"], "http", "{l}");
    assert!(
        l["upstream"]
            .as_str()
            .unwrap_or("")
            .contains(&app.addr.port().to_string()),
        "upstream field should name the upstream {upstream}: {l}"
    );
    assert_ne!(
        ld.proxy_addr().port(),
        0,
        "bound proxy port is logged, not 0"
    );
    assert_ne!(
        ld.admin_addr().port(),
        0,
        "bound admin port is logged, not 0"
    );
    // Every stderr line is a JSON object.
    for line in ld.stderr_lines() {
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "stderr line is not an object: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_upstream_is_down_then_200_once_it_listens() {
    let upstream = closed_port();
    let up = upstream.to_string();
    let ld = Lameduck::spawn(&["--upstream", &up]);
    let admin = ld.admin_addr();

    let (status, body) = get(admin, "/ready").await;
    assert_eq!(status, 503, "ready while upstream refuses: {body:?}");
    assert!(
        body == "upstream unavailable\n" || body == "starting\n",
        "503 body should be `upstream unavailable` or the state, got {body:?}"
    );
    // Still 503 a moment later: nothing listens yet.
    tokio::time::sleep(ms(300)).await;
    let (status, _) = get(admin, "/ready").await;
    assert_eq!(status, 503);

    let _app = TestApp::start_on(upstream).await;
    wait_ready(admin, secs(10)).await;
    let (status, body) = get(admin, "/ready").await;
    assert_eq!((status, body.as_str()), (200, "serving\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_200_serving_with_a_healthy_upstream() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let (status, body) = get(ld.admin_addr(), "/ready").await;
    assert_eq!((status, body.as_str()), (200, "serving\n"));
    ld.wait_for_state_log("serving", secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_contract_family_as_prometheus_text() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200);

    let resp = http_get(ld.admin_addr(), "/metrics").await;
    assert_eq!(resp.status, 200);
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "content-type should be text/plain; version=0.0.4, got {ct:?}"
    );
    let text = resp.text();
    let missing: Vec<&str> = FAMILIES
        .iter()
        .copied()
        .filter(|f| !family_present(&text, f))
        .collect();
    assert!(
        missing.is_empty(),
        "missing families {missing:?} in:\n{text}"
    );
    // No metric outside the lameduck_ prefix is required, but all contract ones carry it.
    assert!(
        !text.contains("# EOF"),
        "OpenMetrics `# EOF` must not be used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_state_build_info_and_counted_requests() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let admin = ld.admin_addr();
    for _ in 0..3 {
        assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
    }
    let text = metrics_text(admin).await;
    assert_eq!(
        parse_metric(&text, "lameduck_state{state=\"serving\"}"),
        Some(1.0),
        "{text}"
    );
    for s in ["starting", "draining", "drained"] {
        let v = parse_metric(&text, &format!("lameduck_state{{state=\"{s}\"}}"));
        assert!(
            v.is_none() || v == Some(0.0),
            "state {s} should be 0: {text}"
        );
    }
    assert_eq!(
        parse_metric(&text, "lameduck_draining"),
        Some(0.0),
        "{text}"
    );
    let build = text
        .lines()
        .find(|l| l.starts_with("lameduck_build_info{"))
        .unwrap_or_else(|| panic!("no build_info sample:\n{text}"));
    assert!(build.contains("version=\""), "{build}");
    assert!(build.trim_end().ends_with(" 1"), "{build}");
    let twoxx = parse_metric(&text, "lameduck_requests_total{code=\"2xx\"}").unwrap_or(0.0);
    assert!(
        twoxx >= 3.0,
        "requests_total{{code=2xx}} = {twoxx}:\n{text}"
    );
    let conns =
        parse_metric(&text, "lameduck_connections_total{protocol=\"http1\"}").unwrap_or(0.0);
    assert!(
        conns >= 3.0,
        "connections_total{{protocol=http1}} = {conns}:\n{text}"
    );
    let count = parse_metric(&text, "lameduck_request_duration_seconds_count").unwrap_or(0.0);
    assert!(
        count >= 3.0,
        "request_duration_seconds_count = {count}:\n{text}"
    );
    assert_eq!(
        parse_metric(&text, "lameduck_requests_in_flight"),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_returns_202_and_ready_flips_to_503() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "5s"]).await;
    let admin = ld.admin_addr();

    let (status, body) = post(admin, "/drain").await;
    assert_eq!(status, 202, "POST /drain: {body:?}");
    let flipped = wait_admin(admin, "/ready", |s, _| s == 503, ms(500)).await;
    assert!(
        flipped.is_ok(),
        "/ready still not 503 500ms after POST /drain: {flipped:?}"
    );
    let (status, body) = get(admin, "/ready").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    let (status, _) = get(admin, "/live").await;
    assert_eq!(status, 200, "/live stays 200 while draining");
    assert_eq!(metric(admin, "lameduck_draining").await, 1.0);
    assert_eq!(
        metric(admin, "lameduck_state{state=\"draining\"}").await,
        1.0
    );
    assert!(metric(admin, "lameduck_drain_started_timestamp_seconds").await > 1.0e9);

    let status = ld.wait_exit(secs(5)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_drain_is_405_and_does_not_drain() {
    let (_app, mut ld) = app_behind_lameduck(&[]).await;
    let admin = ld.admin_addr();
    let (status, _) = get(admin, "/drain").await;
    assert_eq!(status, 405);
    let (status, body) = get(admin, "/ready").await;
    assert_eq!((status, body.as_str()), (200, "serving\n"));
    assert!(ld.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_state_and_drain_times() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "4s"]).await;
    let admin = ld.admin_addr();

    let resp = http_get(admin, "/status").await;
    assert_eq!(resp.status, 200);
    let v: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", resp.text()));
    for key in [
        "state",
        "phase",
        "connections_active",
        "requests_in_flight",
        "drain_started_unix_ms",
        "drain_deadline_unix_ms",
    ] {
        assert!(v.get(key).is_some(), "/status lacks `{key}`: {v}");
    }
    assert_eq!(v["state"], "serving", "{v}");
    assert_eq!(v["connections_active"].as_u64(), Some(0), "{v}");
    assert_eq!(v["requests_in_flight"].as_u64(), Some(0), "{v}");

    let before = now_ms();
    let (status, _) = post(admin, "/drain").await;
    assert_eq!(status, 202);
    let after = now_ms();
    // 202 means accepted: the state flips asynchronously, within 500 ms.
    let flipped = wait_admin(admin, "/status", |_, b| b.contains("\"draining\""), ms(500)).await;
    assert!(
        flipped.is_ok(),
        "/status not draining 500ms after POST /drain: {flipped:?}"
    );
    let v: Value = serde_json::from_slice(&http_get(admin, "/status").await.body).unwrap();
    assert_eq!(v["state"], "draining", "{v}");
    let started = v["drain_started_unix_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("drain_started_unix_ms not a number while draining: {v}"));
    let deadline = v["drain_deadline_unix_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("drain_deadline_unix_ms not a number while draining: {v}"));
    assert!(
        started + 50 >= before && started <= after + 500,
        "drain_started_unix_ms {started} not within [{before}, {after} + 500ms]"
    );
    let span = deadline as i64 - started as i64;
    assert!(
        (3950..=4050).contains(&span),
        "deadline - started = {span} ms, expected the 4s --drain-timeout"
    );
    assert_eq!(ld.wait_exit(secs(5)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_times_out_with_504_while_serving() {
    let (_app, ld) = app_behind_lameduck(&[]).await;
    let admin = ld.admin_addr();
    let start = Instant::now();
    let (status, body) = get(admin, "/drained?timeout=200ms").await;
    let took = start.elapsed();
    assert_eq!(status, 504, "{body:?}");
    assert_between(took, ms(150), secs(2), "/drained?timeout=200ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_returns_200_json_summary_once_drained() {
    let (_app, mut ld) = app_behind_lameduck(&[
        "--drain-delay",
        "1s",
        "--drain-timeout",
        "5s",
        "--metrics-linger",
        "3s",
    ])
    .await;
    let admin = ld.admin_addr();

    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let r = http_request(admin, "GET", "/drained?timeout=10s", &[], b"").await;
        (r, start.elapsed())
    });
    // The waiter is parked: it must not have answered yet.
    tokio::time::sleep(ms(300)).await;
    assert!(!waiter.is_finished(), "/drained answered before any drain");
    let drain_at = Instant::now();
    assert_eq!(post(admin, "/drain").await.0, 202);

    let (r, _) = tokio::time::timeout(secs(8), waiter)
        .await
        .expect("/drained did not answer within 8s")
        .unwrap();
    let answered_after = drain_at.elapsed();
    let r = r.expect("/drained transport");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        answered_after >= ms(900),
        "/drained answered {answered_after:?} after drain start, before the 1s window ended"
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/drained body is not JSON ({e}): {}", r.text()));
    assert!(v.is_object(), "{v}");
    assert_eq!(v["outcome"], "graceful", "{v}");
    for key in [
        "duration_ms",
        "requests_during_drain",
        "connections_graceful",
        "connections_forced",
    ] {
        assert!(v.get(key).is_some(), "/drained summary lacks `{key}`: {v}");
    }
    // After drained, /metrics is still served during the linger.
    let (status, _) = get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics during --metrics-linger");
    assert_eq!(
        metric(admin, "lameduck_state{state=\"drained\"}").await,
        1.0
    );
    let d = metric(admin, "lameduck_drain_duration_seconds").await;
    assert!(
        (0.9..5.0).contains(&d),
        "drain_duration_seconds = {d} for a 1s window"
    );
    assert_eq!(ld.wait_exit(secs(6)).await.code(), Some(0));
}

/// The kubelet's preStop `GET /drained` on a keep-alive connection: the
/// answer closes it, and lameduck's exit does not wait for it (it waits only
/// for `hook=1` clients on loopback, its own container's hook; see
/// tests/drain_http1.rs), so the exit after SIGTERM costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_answer_closes_the_hooks_connection_and_the_exit_does_not_wait() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "500ms", "--metrics-linger", "20s"]).await;
    let admin = ld.admin_addr();
    let mut hook = tokio::net::TcpStream::connect(admin).await.unwrap();
    hook.write_all(b"GET /drained?timeout=10s HTTP/1.1\r\nHost: pod\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(post(admin, "/drain").await.0, 202);
    // Read to EOF: only the server's close ends this.
    let mut answer = Vec::new();
    tokio::time::timeout(secs(5), hook.read_to_end(&mut answer))
        .await
        .expect("the /drained connection stayed open after its answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    ld.wait_for_state_log("drained", secs(3)).await;
    let t = Instant::now();
    ld.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(ld.wait_exit(secs(5)).await.code(), Some(0));
    assert!(
        t.elapsed() < ms(700),
        "exit took {:?} after SIGTERM",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_linger_is_capped_by_the_drain_deadline() {
    let (_app, mut ld) = app_behind_lameduck(&[
        "--drain-delay",
        "1s",
        "--drain-timeout",
        "2s",
        "--metrics-linger",
        "15s",
    ])
    .await;
    let t = Instant::now();
    ld.signal(nix::sys::signal::Signal::SIGTERM);
    // Drained after the 1s window; /metrics is still served while lingering.
    ld.wait_for_state_log("drained", secs(3)).await;
    let (status, _) = get(ld.admin_addr(), "/metrics").await;
    assert_eq!(status, 200, "/metrics during the linger");
    let status = ld.wait_exit(secs(6)).await;
    assert_eq!(status.code(), Some(0), "lingering is not a forced exit");
    assert_between(
        t.elapsed(),
        ms(1800),
        ms(3500),
        "15s linger capped by the 2s deadline",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_upstream_unavailable_when_the_app_stops_and_recovers_when_it_returns() {
    let app = TestApp::start().await;
    let addr = app.addr;
    let up = addr.to_string();
    let ld = Lameduck::spawn(&["--upstream", &up]);
    let admin = ld.admin_addr();
    wait_ready(admin, secs(10)).await;

    drop(app);
    let down = wait_admin(
        admin,
        "/ready",
        |s, b| s == 503 && b == "upstream unavailable\n",
        secs(10),
    )
    .await;
    assert!(down.is_ok(), "/ready while the app refuses: last {down:?}");
    assert_eq!(
        get(admin, "/live").await.0,
        200,
        "/live is not about the upstream"
    );

    let mut back = None;
    for _ in 0..100 {
        if std::net::TcpListener::bind(addr).is_ok() {
            back = Some(TestApp::start_on(addr).await);
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    let _app = back.expect("re-bind the upstream port");
    wait_ready(admin, secs(10)).await;
}

/// The admin port is reachable from every pod. One that holds as many
/// connections as it can, each parked on `GET /drained?timeout=10m`, must not
/// lock out the kubelet (here: 127.0.0.1) from `/ready` or from the app's
/// preStop `GET /drained`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_flooding_the_admin_port_cannot_lock_out_the_kubelet() {
    let (_app, ld) = app_behind_lameduck(&["--drain-delay", "1s", "--metrics-linger", "3s"]).await;
    let admin = ld.admin_addr();
    let mut held = Vec::new();
    let mut served = 0;
    for _ in 0..200 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let Ok(mut stream) = socket.connect(admin).await else {
            continue;
        };
        use tokio::io::AsyncWriteExt;
        let _ = stream
            .write_all(b"GET /drained?timeout=10m HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        held.push(stream);
    }
    // The ones over the per-peer limit are closed at once.
    tokio::time::sleep(ms(300)).await;
    for stream in &held {
        let mut probe = [0u8; 1];
        if matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        {
            served += 1;
        }
    }
    assert!(
        (1..=16).contains(&served),
        "{served} of 200 connections from one peer are being served"
    );

    // The kubelet: readiness, then its preStop wait, both answered.
    assert_eq!(get(admin, "/ready").await.0, 200);
    let waiter =
        tokio::spawn(
            async move { http_request(admin, "GET", "/drained?timeout=10s", &[], b"").await },
        );
    tokio::time::sleep(ms(200)).await;
    assert_eq!(post(admin, "/drain").await.0, 202);
    let drained = tokio::time::timeout(secs(8), waiter)
        .await
        .expect("/drained answered within 8s")
        .unwrap()
        .expect("/drained transport");
    assert_eq!(drained.status, 200, "{}", drained.text());
    drop(held);
}
