//! Graceful drain of HTTP/1.1 traffic: signals, lame-duck window, deadline,
//! exit codes, the `drain` subcommand and the summary line.

mod support;

use std::time::Instant;

use nix::sys::signal::Signal;
use support::*;

/// Starts an upstream test app and the proxy in front of it, waits for `serving`.
/// Sends `sig` and waits (≤ 500 ms) for /ready to answer 503. Returns when the signal was sent.
async fn signal_and_wait_not_ready(ld: &Lameduck, sig: Signal) -> Instant {
    let at = Instant::now();
    ld.signal(sig);
    let r = wait_admin(ld.admin_addr(), "/ready", |s, _| s == 503, ms(500)).await;
    assert!(
        r.is_ok(),
        "/ready not 503 within 500ms of {sig}: last {r:?}"
    );
    at
}

/// Starts `GET path` on its own connection in a task and waits until the proxy counts it in flight.
async fn start_in_flight(
    ld: &Lameduck,
    path: &str,
) -> tokio::task::JoinHandle<Result<HttpResponse, ClientError>> {
    let proxy = ld.proxy_addr();
    let path = path.to_string();
    let task = tokio::spawn(async move {
        let mut c = RawConn::try_connect(proxy).await?;
        c.send_raw(&build_request("GET", &path, &[], b"")).await?;
        c.read_response_for(false, secs(30)).await
    });
    wait_metric(
        ld.admin_addr(),
        "lameduck_requests_in_flight",
        |v| v >= 1.0,
        secs(5),
    )
    .await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flips_ready_to_503_within_500ms_while_live_stays_200() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "2s", "--drain-timeout", "6s"]).await;
    let admin = ld.admin_addr();
    signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;
    let (status, body) = get(admin, "/ready").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    let (status, _) = get(admin, "/live").await;
    assert_eq!(status, 200, "/live must stay 200 while draining");
    ld.wait_for_state_log("draining", secs(1)).await;
    assert_eq!(ld.wait_exit(secs(6)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keepalive_request_during_window_gets_connection_close_and_is_then_closed() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "2s", "--drain-timeout", "6s"]).await;
    signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;

    // A brand-new connection during the window is still accepted and served.
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = c.get("/").await.expect("request during the window");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from the test app\n");
    assert!(
        r.has_connection_close(),
        "response during the window should carry `connection: close`: {:?}",
        r.headers
    );
    assert!(
        c.closed_within(secs(1)).await,
        "proxy should close the connection after the `connection: close` response"
    );
    assert_eq!(ld.wait_exit(secs(6)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_from_before_sigterm_stays_usable_during_the_window() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "2s", "--drain-timeout", "6s"]).await;
    let mut c = RawConn::connect(ld.proxy_addr()).await;
    let r = c.get("/").await.expect("request before SIGTERM");
    assert_eq!(r.status, 200);
    assert!(
        !r.has_connection_close(),
        "keep-alive before the drain: {:?}",
        r.headers
    );

    let t = signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;
    assert!(
        c.stays_open_for(ms(500)).await,
        "idle keep-alive connection was closed {:?} after SIGTERM, inside the 2s window",
        t.elapsed()
    );
    let r = c
        .get("/")
        .await
        .expect("request on the old connection during the window");
    assert!(t.elapsed() < secs(2), "still inside the window");
    assert_eq!(r.status, 200);
    assert!(
        r.has_connection_close(),
        "response during the window should carry `connection: close`: {:?}",
        r.headers
    );
    assert!(
        c.closed_within(secs(1)).await,
        "closed after the `connection: close` response"
    );
    assert_eq!(ld.wait_exit(secs(6)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_refused_after_the_window() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "8s"]).await;
    let proxy = ld.proxy_addr();
    // Keeps the process alive past the window.
    let slow = start_in_flight(&ld, "/slow?ms=3500").await;
    let t = signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;

    tokio::time::sleep_until((t + ms(1500)).into()).await;
    assert!(
        ld.is_running(),
        "process must still be draining the slow request"
    );
    assert!(
        connect_refused(proxy).await,
        "a new TCP connect after the window must be refused"
    );

    let r = slow.await.unwrap().expect("slow request");
    assert_eq!(r.status, 200);
    assert_eq!(ld.wait_exit(secs(5)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_started_before_sigterm_completes_and_process_exits_0() {
    slow_request_completes_through_the_drain(&[]).await;
}

/// The same drain on the single-threaded runtime lameduck uses when it has one CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_worker_thread_drains_the_same_way() {
    slow_request_completes_through_the_drain(&["--worker-threads", "1"]).await;
}

async fn slow_request_completes_through_the_drain(extra: &[&str]) {
    let mut args = vec!["--drain-delay", "1s", "--drain-timeout", "10s"];
    args.extend_from_slice(extra);
    let (_app, mut ld) = app_behind_lameduck(&args).await;
    let slow = start_in_flight(&ld, "/slow?ms=3000").await;
    let t = signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;

    let r = tokio::time::timeout(secs(8), slow)
        .await
        .expect("slow request did not finish")
        .unwrap()
        .expect("slow request must complete despite the drain");
    let done = Instant::now();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slept 3000 ms\n");

    let status = ld.wait_exit(secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        done.elapsed() < secs(3),
        "exit came {:?} after the last request finished",
        done.elapsed()
    );
    assert!(t.elapsed() < secs(8), "exit well before the 10s deadline");
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("graceful"), "{s}");
    assert_eq!(field_u64(&s, "connections_forced"), Some(0), "{s}");
    assert!(
        field_u64(&s, "connections_graceful").unwrap_or(0) >= 1,
        "{s}"
    );
    assert_eq!(field_u64(&s, "exit_code"), Some(0), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_proxy_exits_0_right_after_the_window() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "5s"]).await;
    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    let status = ld.wait_exit(secs(6)).await;
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0));
    assert_between(took, ms(900), secs(3), "exit after SIGTERM with no traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_slower_than_drain_timeout_is_forced_and_exit_code_is_3() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "2s"]).await;
    let slow = start_in_flight(&ld, "/slow?ms=10000").await;
    let t = signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;

    let status = ld.wait_exit(secs(6)).await;
    let took = t.elapsed();
    assert_eq!(
        status.code(),
        Some(3),
        "deadline hit with a connection still busy"
    );
    assert_between(took, ms(1800), secs(4), "forced exit near the 2s deadline");

    let r = tokio::time::timeout(secs(3), slow)
        .await
        .expect("client still hanging after the proxy exited")
        .unwrap();
    assert!(
        !matches!(&r, Ok(resp) if resp.status == 200),
        "the forced request cannot have completed normally: {r:?}"
    );
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("deadline"), "{s}");
    assert!(field_u64(&s, "connections_forced").unwrap_or(0) >= 1, "{s}");
    assert_eq!(field_u64(&s, "exit_code"), Some(3), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_during_drain_exits_4_promptly() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "3s", "--drain-timeout", "10s"]).await;
    signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;
    ld.wait_for_state_log("draining", secs(1)).await;
    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    let status = ld.wait_exit(secs(5)).await;
    assert_eq!(status.code(), Some(4));
    assert!(
        t.elapsed() < secs(1),
        "second signal exit took {:?}",
        t.elapsed()
    );
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("signal"), "{s}");
    assert_eq!(field_u64(&s, "exit_code"), Some(4), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "5s"]).await;
    let t = signal_and_wait_not_ready(&ld, Signal::SIGINT).await;
    let (status, body) = get(ld.admin_addr(), "/ready").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    let status = ld.wait_exit(secs(6)).await;
    assert_eq!(status.code(), Some(0));
    assert_between(
        t.elapsed(),
        ms(900),
        secs(3),
        "exit after SIGINT with no traffic",
    );
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("graceful"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_subcommand_with_wait_returns_0_after_the_drain_completes() {
    let (_app, mut ld) = app_behind_lameduck(&[
        "--drain-delay",
        "1s",
        "--drain-timeout",
        "5s",
        "--metrics-linger",
        "2s",
    ])
    .await;
    let admin = ld.admin_addr().to_string();
    let out = run_cmd(&["drain", "--admin", &admin, "--wait"], &[], secs(10)).await;
    assert_eq!(out.status.code(), Some(0), "drain --wait: {out:?}");
    assert!(
        out.elapsed >= ms(900),
        "drain --wait returned after {:?}, before the 1s window could end",
        out.elapsed
    );
    ld.wait_for_state_log("drained", secs(1)).await;
    let (status, body) = get(ld.admin_addr(), "/ready").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "drained\n"),
        "admin during linger"
    );
    assert_eq!(ld.wait_exit(secs(5)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_subcommand_without_wait_triggers_the_drain_and_returns_at_once() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "1s", "--drain-timeout", "5s"]).await;
    let admin = ld.admin_addr().to_string();
    let out = run_cmd(&["drain", "--admin", &admin], &[], secs(10)).await;
    assert_eq!(out.status.code(), Some(0), "drain: {out:?}");
    assert!(
        out.elapsed < ms(900),
        "drain without --wait took {:?}",
        out.elapsed
    );
    let flipped = wait_admin(ld.admin_addr(), "/ready", |s, _| s == 503, ms(500)).await;
    assert!(
        flipped.is_ok(),
        "/ready not 503 500ms after `drain`: {flipped:?}"
    );
    assert_eq!(ld.wait_exit(secs(5)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_subcommand_wait_gives_up_with_1_after_its_timeout() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "3s", "--drain-timeout", "6s"]).await;
    let admin = ld.admin_addr().to_string();
    let out = run_cmd(
        &["drain", "--admin", &admin, "--wait", "--timeout", "500ms"],
        &[],
        secs(10),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "drain outlasting --timeout: {out:?}"
    );
    assert_between(
        out.elapsed,
        ms(400),
        ms(2500),
        "drain --wait --timeout 500ms",
    );
    // The drain itself was triggered and carries on.
    let (status, body) = get(ld.admin_addr(), "/ready").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert_eq!(ld.wait_exit(secs(6)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_subcommand_fails_with_1_when_the_admin_is_unreachable() {
    let nobody = closed_port().to_string();
    let out = run_cmd(&["drain", "--admin", &nobody, "--wait"], &[], secs(10)).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_line_has_all_fields_and_counts_requests_served_during_the_drain() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "2s", "--drain-timeout", "6s"]).await;
    // Traffic before the drain is not counted.
    for _ in 0..2 {
        assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
    }
    let t = signal_and_wait_not_ready(&ld, Signal::SIGTERM).await;
    for _ in 0..3 {
        let r = http_get(ld.proxy_addr(), "/").await;
        assert_eq!(r.status, 200);
    }
    assert!(t.elapsed() < secs(2), "requests were inside the window");
    let status = ld.wait_exit(secs(6)).await;
    assert_eq!(status.code(), Some(0));

    let summaries = ld.logs_with_message("drain complete");
    assert_eq!(
        summaries.len(),
        1,
        "exactly one summary line: {summaries:?}"
    );
    let s = &summaries[0];
    for key in [
        "outcome",
        "duration_ms",
        "requests_during_drain",
        "connections_graceful",
        "connections_forced",
        "exit_code",
    ] {
        assert!(field(s, key).is_some(), "summary lacks `{key}`: {s}");
    }
    assert_eq!(field_str(s, "outcome"), Some("graceful"), "{s}");
    assert_eq!(field_u64(s, "requests_during_drain"), Some(3), "{s}");
    assert_eq!(field_u64(s, "connections_forced"), Some(0), "{s}");
    assert!(field_u64(s, "connections_graceful").is_some(), "{s}");
    assert_eq!(field_u64(s, "exit_code"), Some(0), "{s}");
    let d = field_u64(s, "duration_ms").expect("duration_ms is a number");
    assert!(
        (1900..=4500).contains(&d),
        "duration_ms {d} for a 2s window with no stragglers"
    );

    // State changes are logged in order.
    let logs = ld.logs();
    let idx = |state: &str| {
        logs.iter()
            .position(|v| message(v) == "state changed" && field_str(v, "state") == Some(state))
            .unwrap_or_else(|| panic!("no `state changed` to {state}"))
    };
    assert!(idx("serving") < idx("draining"));
    assert!(idx("draining") < idx("drained"));
    let summary_idx = logs
        .iter()
        .position(|v| message(v) == "drain complete")
        .unwrap();
    assert!(
        idx("drained") < summary_idx,
        "summary comes after `drained`"
    );
}

/// The native sidecar's preStop hook is `lameduck drain --wait` inside the
/// container. With `--metrics-linger 0s` lameduck exits the moment the drain
/// completes, and when a container's first process exits the kernel kills
/// everything else in it: a hook that has its answer but has not exited yet
/// dies with exit 137 (the kubelet reports FailedPreStopHook). So lameduck
/// waits (up to 1 s) for its `/drained?hook=1` clients on loopback to close
/// their connections, and `lameduck drain --wait` (which sends `hook=1`)
/// closes its connection only at its own exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lameduck_outlives_a_drained_client_that_has_its_answer() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "200ms", "--metrics-linger", "0s"]).await;
    let mut hook = RawConn::connect(ld.admin_addr()).await;
    hook.send_raw(b"GET /drained?timeout=10s&hook=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(post(ld.admin_addr(), "/drain").await.0, 202);
    let answer = hook.read_response().await.expect("/drained answered");
    assert_eq!(answer.status, 200);
    // The hook, between its answer and its exit.
    tokio::time::sleep(ms(400)).await;
    assert!(
        ld.is_running(),
        "lameduck exited before its /drained client closed"
    );
    let closed = Instant::now();
    drop(hook);
    assert_eq!(ld.wait_exit(secs(5)).await.code(), Some(0));
    assert!(
        closed.elapsed() < ms(800),
        "exit {:?} after the client closed",
        closed.elapsed()
    );
}

/// The real hook process: it has exited by the time lameduck has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_hook_exits_before_lameduck_even_without_linger() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "200ms", "--metrics-linger", "0s"]).await;
    let admin = ld.admin_addr().to_string();
    let mut hook = base_command()
        .args(["drain", "--admin", &admin, "--wait"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(ld.wait_exit(secs(10)).await.code(), Some(0));
    let hook_status = hook.try_wait().unwrap();
    assert!(
        hook_status.is_some_and(|s| s.success()),
        "lameduck exited while its drain hook was still running: {hook_status:?}"
    );
}

/// The deadline counts from the start of the drain, not from start-up: a
/// process that has served longer than --drain-timeout still drains gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_long_after_start_up_gets_its_whole_deadline() {
    let (_app, mut ld) =
        app_behind_lameduck(&["--drain-delay", "300ms", "--drain-timeout", "1s"]).await;
    tokio::time::sleep(ms(1500)).await;
    let proxy = ld.proxy_addr();
    let slow = tokio::spawn(async move { get(proxy, "/slow?ms=600").await });
    tokio::time::sleep(ms(100)).await;
    ld.signal(Signal::SIGTERM);
    assert_eq!(slow.await.unwrap().0, 200);
    assert_eq!(
        ld.wait_exit(secs(5)).await.code(),
        Some(0),
        "{:?}",
        ld.stderr_lines()
    );
}
