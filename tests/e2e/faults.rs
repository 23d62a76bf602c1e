//! Faults the per-behaviour tests in tests/*.rs do not cover: the app
//! restarting under load, a 10 MB header flood, a client resetting mid-upload,
//! SIGTERM twice under traffic. After each, a normal request works and the
//! counters are back to rest (connections_active 0, requests_in_flight 0).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::{ClientProto, Job, Load, LoadConfig};
use crate::support::*;

async fn assert_at_rest_and_serving(pod: &Pod) {
    wait_metric(
        pod.admin,
        "lameduck_requests_in_flight",
        |v| v == 0.0,
        secs(5),
    )
    .await;
    wait_metric(
        pod.admin,
        "lameduck_connections_active",
        |v| v == 0.0,
        secs(5),
    )
    .await;
    let r = http_get(pod.proxy, "/").await.expect("a normal request");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from the demo app\n")
    );
    let r = http_get(pod.admin, "/ready").await.expect("/ready");
    assert_eq!(r.status, 200, "/ready: {}", r.text());
}

#[test]
fn app_restart_under_load_gives_fast_502s_then_recovers() {
    run_test(async {
        let mut pod = Pod::start("pod", ip(1), None, &[]).await;
        let epoch = Instant::now();
        let load = Load::start(
            LoadConfig {
                target: pod.proxy,
                proto: ClientProto::H1KeepAlive,
                workers: 4,
                duration: secs(8),
                max_requests: 100_000,
                jobs: vec![Job::root(), Job::bytes(4096)],
                request_timeout: secs(5),
            },
            epoch,
        );
        tokio::time::sleep(secs(1)).await;
        let t_kill = epoch.elapsed();
        pod.app.as_mut().unwrap().kill();
        let admin = pod.admin;
        let unready = eventually(secs(3), || async move {
            matches!(http_get(admin, "/ready").await,
                Ok(r) if r.status == 503 && r.text() == "upstream unavailable\n")
        })
        .await;
        let t_unready = epoch.elapsed();
        assert!(
            unready,
            "/ready did not turn 503 \"upstream unavailable\" within 3s of the app dying"
        );
        tokio::time::sleep(secs(1)).await;
        let t_restart = epoch.elapsed();
        pod.app = Some(DemoApp::start(pod.app_addr).await);
        let ready = eventually(secs(5), || async move {
            matches!(http_get(admin, "/ready").await, Ok(r) if r.status == 200)
        })
        .await;
        let t_ready = epoch.elapsed();
        assert!(
            ready,
            "/ready did not come back within 5s of the app restarting"
        );
        tokio::time::sleep(secs(2)).await;
        let report = load.finish().await;

        let rel = |d: Duration| d.as_secs_f64() - t_kill.as_secs_f64();
        let n502 = report
            .records
            .iter()
            .filter(|r| r.status == Some(502))
            .count();
        let slowest_502 = report
            .records
            .iter()
            .filter(|r| r.status == Some(502))
            .map(|r| r.end - r.start)
            .max()
            .unwrap_or_default();
        let figures = format!(
            "{} requests, {n502} x 502 (slowest {slowest_502:?}); app killed at 0, /ready 503 at {:+.3}s, app restarted {:+.3}s, /ready 200 {:+.3}s",
            report.records.len(),
            rel(t_unready),
            rel(t_restart),
            rel(t_ready)
        );
        eprintln!("[app restart] {figures}");
        // Only 502s (never a hang, a reset or a truncated answer), and only
        // while the app was down.
        let bad: Vec<_> = report
            .records
            .iter()
            .filter(|r| !r.ok() && r.status != Some(502))
            .collect();
        assert!(
            bad.is_empty(),
            "failures other than 502: {bad:#?}\n{figures}"
        );
        assert!(n502 > 0, "no 502 while the app was down\n{figures}");
        assert!(
            slowest_502 < ms(1000),
            "a 502 took {slowest_502:?}\n{figures}"
        );
        let late_502: Vec<_> = report
            .records
            .iter()
            .filter(|r| !r.ok() && (r.start > t_ready + ms(50) || r.end < t_kill))
            .collect();
        assert!(
            late_502.is_empty(),
            "502s outside the outage (after /ready was back): {late_502:#?}\n{figures}"
        );
        let during_outage_ok = report
            .records
            .iter()
            .filter(|r| r.start > t_unready && r.end < t_restart && r.ok())
            .count();
        assert_eq!(
            during_outage_ok, 0,
            "200s while the app was dead?\n{figures}"
        );
        assert!(
            report.records.iter().any(|r| r.start > t_ready && r.ok()),
            "no success after the app came back\n{figures}"
        );
        let connect_errors = scrape(pod.admin)
            .await
            .map(|t| metric_sum(&t, "lameduck_upstream_errors_total", &[("kind", "connect")]))
            .unwrap();
        assert!(
            connect_errors.unwrap_or(0.0) >= 1.0,
            "upstream_errors_total{{kind=connect}} {connect_errors:?}"
        );
        drop(report);
        assert_at_rest_and_serving(&pod).await;
    });
}

/// Normal requests on fresh connections every 100 ms while `busy` runs; each
/// must answer 200 within 1 s. Returns how many were made.
async fn keep_checking(proxy: SocketAddr, until: Instant) -> usize {
    let mut n = 0;
    while Instant::now() < until {
        let r = http_request(proxy, "GET", "/", &[], secs(1))
            .await
            .unwrap_or_else(|e| panic!("a normal request failed during the fault: {e}"));
        assert_eq!(r.status, 200);
        n += 1;
        tokio::time::sleep(ms(100)).await;
    }
    n
}

#[test]
fn a_10mb_header_flood_is_cut_off_and_others_are_served() {
    run_test(async {
        let pod = Pod::start("pod", ip(1), None, &[]).await;
        let proxy = pod.proxy;
        let flood = tokio::spawn(async move {
            let s = TcpStream::connect(proxy).await.expect("connect");
            let (mut rd, mut wr) = s.into_split();
            let start = Instant::now();
            let writer = tokio::spawn(async move {
                let mut sent = 0usize;
                let mut line_no = 0u64;
                if wr
                    .write_all(b"GET / HTTP/1.1\r\nhost: flood\r\n")
                    .await
                    .is_err()
                {
                    return (sent, "write failed at once".to_string());
                }
                while sent < 10 * 1024 * 1024 {
                    let mut chunk = String::with_capacity(64 * 1024);
                    while chunk.len() < 64 * 1024 - 120 {
                        line_no += 1;
                        chunk.push_str(&format!("x-flood-{line_no}: {}\r\n", "a".repeat(90)));
                    }
                    match tokio::time::timeout(secs(5), wr.write_all(chunk.as_bytes())).await {
                        Ok(Ok(())) => sent += chunk.len(),
                        Ok(Err(e)) => return (sent, format!("write error: {e}")),
                        Err(_) => return (sent, "write blocked for 5s".into()),
                    }
                }
                (sent, "all 10 MB written".into())
            });
            let mut resp = Vec::new();
            let read = tokio::time::timeout(secs(15), rd.read_to_end(&mut resp)).await;
            let closed_after = start.elapsed();
            let (sent, how) = tokio::time::timeout(secs(10), writer)
                .await
                .expect("flood writer stuck")
                .unwrap();
            (
                read.map(|r| r.map_err(|e| e.to_string())),
                resp,
                closed_after,
                sent,
                how,
            )
        });
        let checks = keep_checking(proxy, Instant::now() + ms(1500)).await;
        let (read, resp, closed_after, sent, how) = flood.await.unwrap();
        let head = String::from_utf8_lossy(&resp[..resp.len().min(80)]).to_string();
        eprintln!(
            "[header flood] {sent} bytes of headers written ({how}); connection ended after {closed_after:?}: {read:?}, response {head:?}; {checks} normal requests meanwhile"
        );
        let read = read.expect("the proxy never closed the flooding connection (15s)");
        // 431, or a reset / close without a response; never a 200 after 10 MB.
        match read {
            Ok(_) if resp.is_empty() => {}
            Ok(_) => assert!(
                head.starts_with("HTTP/1.1 431"),
                "flood answered {head:?}, expected 431"
            ),
            Err(_) => assert!(
                resp.is_empty() || head.starts_with("HTTP/1.1 431"),
                "{head:?}"
            ),
        }
        assert!(
            closed_after < secs(5),
            "the flood connection lived {closed_after:?}"
        );
        assert!(
            sent < 10 * 1024 * 1024,
            "the proxy swallowed all 10 MB of headers"
        );
        assert!(checks >= 5);
        assert_at_rest_and_serving(&pod).await;
    });
}

#[test]
fn a_client_resetting_mid_upload_frees_the_request_and_upstream() {
    run_test(async {
        let pod = Pod::start("pod", ip(1), None, &[]).await;
        let proxy = pod.proxy;
        let declared = 50 * 1024 * 1024;
        let s = TcpStream::connect(proxy).await.expect("connect");
        let head = format!(
            "POST /echo HTTP/1.1\r\nhost: e2e\r\ncontent-type: application/octet-stream\r\ncontent-length: {declared}\r\n\r\n"
        );
        let mut s = s;
        s.write_all(head.as_bytes()).await.unwrap();
        // Upload ~4 MB without reading the echo, so buffers fill both ways.
        let chunk = vec![b'u'; 64 * 1024];
        let mut sent = 0;
        while sent < 4 * 1024 * 1024 {
            match tokio::time::timeout(ms(500), s.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                Ok(Err(e)) => panic!("upload failed after {sent} bytes: {e}"),
                Err(_) => break, // back-pressure: enough is in flight
            }
        }
        wait_metric(
            pod.admin,
            "lameduck_requests_in_flight",
            |v| v == 1.0,
            secs(3),
        )
        .await;
        // SO_LINGER 0: close() sends a RST instead of a FIN.
        s.set_zero_linger().expect("SO_LINGER 0");
        drop(s);
        let t_reset = Instant::now();
        wait_metric(
            pod.admin,
            "lameduck_requests_in_flight",
            |v| v == 0.0,
            secs(5),
        )
        .await;
        let freed_after = t_reset.elapsed();
        eprintln!(
            "[reset mid-upload] {sent} of {declared} bytes sent, then RST; request freed after {freed_after:?}"
        );
        // The proxy still serves, uploads included.
        let body = vec![b'z'; 1024 * 1024];
        let mut c = TcpStream::connect(proxy).await.unwrap();
        let req = format!(
            "POST /echo HTTP/1.1\r\nhost: e2e\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        c.write_all(req.as_bytes()).await.unwrap();
        c.write_all(&body).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(secs(10), c.read_to_end(&mut resp))
            .await
            .expect("echo after the reset timed out")
            .unwrap();
        let pos = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head");
        assert!(
            resp.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&resp[..pos])
        );
        let rest = &resp[pos + 4..];
        // The demo app streams the echo back (chunked or sized): every z must be there.
        assert!(
            rest.iter().filter(|b| **b == b'z').count() == body.len(),
            "the echo after the reset lost bytes"
        );
        drop(c);
        assert_at_rest_and_serving(&pod).await;
    });
}

#[test]
fn sigterm_twice_under_traffic_exits_4_and_cuts_the_rest() {
    run_test(async {
        let extra = ["--drain-delay", "5s", "--drain-timeout", "20s"];
        let mut pod = Pod::start("pod", ip(1), None, &extra).await;
        let epoch = Instant::now();
        let load = Load::start(
            LoadConfig {
                target: pod.proxy,
                proto: ClientProto::H1KeepAlive,
                workers: 4,
                duration: secs(6),
                max_requests: 50_000,
                jobs: vec![Job::slow(10_000), Job::root()],
                request_timeout: secs(15),
            },
            epoch,
        );
        tokio::time::sleep(ms(500)).await;
        pod.ld.signal(Signal::SIGTERM);
        let admin = pod.admin;
        let draining = eventually(secs(2), || async move {
            matches!(http_get(admin, "/ready").await, Ok(r) if r.status == 503)
        })
        .await;
        assert!(draining, "no drain after the first SIGTERM");
        tokio::time::sleep(ms(300)).await;
        let t_second = epoch.elapsed();
        pod.ld.signal(Signal::SIGTERM);
        let status = pod.ld.wait_exit(secs(5)).await;
        let exit_after = epoch.elapsed() - t_second;
        let report = load.finish().await;
        let summary = pod.ld.summary().expect("drain complete line");
        // The 10 s requests were cut at the second signal, not left hanging.
        let cut: Vec<_> = report
            .records
            .iter()
            .filter(|r| r.path.starts_with("/slow") && r.start < t_second)
            .collect();
        eprintln!(
            "[sigterm twice] exit {:?} {exit_after:?} after the second SIGTERM; summary {summary}; slow requests in flight at the 2nd SIGTERM (end rel. to it, error): {:?}",
            status.code(),
            cut.iter()
                .map(|r| (
                    r.end.as_secs_f64() - t_second.as_secs_f64(),
                    r.error.clone()
                ))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            status.code(),
            Some(4),
            "exit status after the second SIGTERM"
        );
        assert!(
            exit_after < secs(3),
            "exit took {exit_after:?} after the second SIGTERM"
        );
        assert_eq!(
            summary.get("outcome").and_then(|v| v.as_str()),
            Some("signal")
        );
        assert_eq!(field_u64(&summary, "exit_code"), Some(4));
        assert!(
            field_u64(&summary, "connections_forced").unwrap_or(0) >= 1,
            "{summary}"
        );
        assert!(!cut.is_empty());
        for r in &cut {
            assert!(
                r.end < t_second + secs(3),
                "a slow request hung past the forced exit: {r:?}"
            );
        }
        // Nothing listens any more; a new instance on the same addresses serves.
        assert!(
            TcpStream::connect(pod.proxy).await.is_err(),
            "proxy port still open"
        );
        pod.restart_proxy(&extra).await;
        assert_at_rest_and_serving(&pod).await;
    });
}
