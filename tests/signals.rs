//! Signals other than the plain drain: SIGHUP (log filter reload), SIGTERM
//! during start-up, SIGPIPE.

mod support;

use std::time::Instant;

use nix::sys::signal::Signal;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_log_level_file_and_the_proxy_keeps_serving() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "info\n").unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let (_app, mut ld) = app_behind_lameduck(&["--log-level-file", &path]).await;

    std::fs::write(file.path(), "debug\n").unwrap();
    let before = ld.logs().len();
    ld.signal(Signal::SIGHUP);
    let reloaded = tokio::time::timeout(secs(3), async {
        loop {
            let logs = ld.logs();
            if let Some(l) = logs
                .iter()
                .skip(before)
                .find(|v| message(v).to_ascii_lowercase().contains("reload"))
            {
                return l.clone();
            }
            tokio::time::sleep(ms(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no log line mentioning a reload within 3s of SIGHUP; stderr:\n{}",
            ld.stderr_lines().join("\n")
        )
    });
    assert_ne!(
        field_str(&reloaded, "level")
            .map(str::to_ascii_uppercase)
            .as_deref(),
        Some("ERROR"),
        "the reload must succeed: {reloaded}"
    );
    assert!(ld.is_running(), "SIGHUP must not stop the process");
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200);
    let (status, _) = get(ld.admin_addr(), "/ready").await;
    assert_eq!(status, 200, "still serving after SIGHUP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_log_level_file_is_harmless() {
    let (_app, mut ld) = app_behind_lameduck(&[]).await;
    ld.signal(Signal::SIGHUP);
    tokio::time::sleep(ms(300)).await;
    assert!(ld.is_running(), "SIGHUP must not stop the process");
    assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
    assert_eq!(get(ld.admin_addr(), "/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_a_drain_does_not_stop_the_drain() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "info\n").unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let (_app, mut ld) = app_behind_lameduck(&[
        "--log-level-file",
        &path,
        "--drain-delay",
        "1s",
        "--drain-timeout",
        "5s",
    ])
    .await;
    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    ld.wait_for_state_log("draining", secs(2)).await;
    ld.signal(Signal::SIGHUP);
    tokio::time::sleep(ms(100)).await;
    let (status, body) = get(ld.admin_addr(), "/ready").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "draining\n"),
        "still draining after SIGHUP"
    );
    let status = ld.wait_exit(secs(6)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGHUP is not a second drain signal"
    );
    assert_between(
        t.elapsed(),
        ms(900),
        secs(3),
        "drain finished on its own schedule",
    );
    let s = ld.summary().expect("drain complete line");
    assert_eq!(field_str(&s, "outcome"), Some("graceful"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_startup_exits_0_after_the_window() {
    // The upstream never listens: the proxy stays in start-up.
    let mut ld = Lameduck::spawn(&["--drain-delay", "1s", "--drain-timeout", "5s"]);
    let (status, _) = get(ld.admin_addr(), "/ready").await;
    assert_eq!(status, 503, "not ready without an upstream");
    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    let status = ld.wait_exit(secs(6)).await;
    assert_eq!(status.code(), Some(0));
    assert_between(t.elapsed(), ms(900), secs(3), "exit after the 1s window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigpipe_does_not_kill_the_process() {
    let (_app, mut ld) = app_behind_lameduck(&[]).await;
    ld.signal(Signal::SIGPIPE);
    tokio::time::sleep(ms(200)).await;
    assert!(ld.is_running(), "SIGPIPE killed the process");
    assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resetting_mid_response_do_not_kill_the_process() {
    // Many clients that hang up while a large body is streaming: writes to closed
    // sockets must not kill the process (EPIPE, not SIGPIPE).
    let (_app, mut ld) = app_behind_lameduck(&[]).await;
    for _ in 0..10 {
        let mut c = RawConn::connect(ld.proxy_addr()).await;
        c.send_raw(&build_request("GET", "/bytes?n=4000000", &[], b""))
            .await
            .unwrap();
        let _ = c.stays_open_for(ms(20)).await;
        drop(c);
    }
    tokio::time::sleep(ms(200)).await;
    assert!(ld.is_running(), "process died after clients hung up");
    assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
}
