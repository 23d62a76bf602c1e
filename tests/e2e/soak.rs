//! Soak: the rolling scenario 20 times over. Pod A's lameduck is drained and
//! restarted on the same addresses 20 times under steady HTTP/1.1 keep-alive
//! traffic through HAProxy. No failed request, every drain exits 0, and the
//! surviving pod B leaks neither connections nor file descriptors.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::haproxy::{Front, Haproxy};
use crate::load::{ClientProto, Job, Load, LoadConfig};
use crate::rolling::{POD_A, POD_B, backends};
use crate::support::*;

const CYCLES: usize = 20;
/// The whole soak stops by itself after this, finished or not.
const BUDGET: Duration = Duration::from_secs(150);

fn load_config(target: std::net::SocketAddr, duration: Duration, max: u64) -> LoadConfig {
    LoadConfig {
        target,
        proto: ClientProto::H1KeepAlive,
        workers: 8,
        duration,
        max_requests: max,
        jobs: vec![
            Job::root(),
            Job::bytes(16 * 1024),
            Job::root(),
            Job::slow(20),
        ],
        request_timeout: secs(10),
    }
}

/// Waits until pod B holds no downstream connection, then reads its fd count
/// (the minimum of a few readings, so a transient admin socket is not counted).
async fn quiet_fds(b: &Pod) -> (usize, usize) {
    wait_metric(
        b.admin,
        "lameduck_connections_active",
        |v| v == 0.0,
        secs(10),
    )
    .await;
    wait_metric(
        b.admin,
        "lameduck_requests_in_flight",
        |v| v == 0.0,
        secs(5),
    )
    .await;
    tokio::time::sleep(ms(200)).await;
    let mut best = fd_count(b.ld.pid());
    for _ in 0..4 {
        tokio::time::sleep(ms(100)).await;
        let c = fd_count(b.ld.pid());
        if c.0 < best.0 {
            best = c;
        }
    }
    best
}

#[test]
fn soak_20_drain_restart_cycles_behind_haproxy() {
    run_test(async {
        require_tool("haproxy");
        let started = Instant::now();
        // drain-delay 1s (not 2s) keeps 20 cycles inside the time budget.
        let extra = ["--drain-delay", "1s"];
        let mut a = Pod::start("pod-a", ip(POD_A), None, &extra).await;
        let b = Pod::start("pod-b", ip(POD_B), None, &extra).await;

        // Warm-up through a first HAProxy, so pod B's upstream pool is as
        // full as it will get; then the baseline fd count with no client.
        let mut hap = Haproxy::start(Front::Http1, &backends(&a, &b)).await;
        let warm = Load::start(load_config(hap.front, secs(2), 50_000), Instant::now())
            .finish()
            .await;
        assert!(
            warm.failures().is_empty(),
            "warm-up: {}",
            warm.describe_failures(Duration::ZERO, 10)
        );
        hap.stop();
        let fds_before = quiet_fds(&b).await;
        let b_requests_before = metric(b.admin, "lameduck_requests_total").await;

        let mut hap = Haproxy::start(Front::Http1, &backends(&a, &b)).await;
        let epoch = Instant::now();
        let load = Load::start(load_config(hap.front, BUDGET, 1_000_000), epoch);
        let mut cycles = Vec::new();
        for cycle in 0..CYCLES {
            assert!(
                started.elapsed() < BUDGET,
                "soak over budget after {cycle} cycles"
            );
            // Some steady traffic on both pods first.
            tokio::time::sleep(ms(300)).await;
            let t_kill = epoch.elapsed();
            a.ld.signal(Signal::SIGTERM);
            let status = a.ld.wait_exit(secs(15)).await;
            let t_exit = epoch.elapsed();
            let summary = a.ld.summary().expect("drain complete line");
            assert_eq!(
                status.code(),
                Some(0),
                "cycle {cycle}: pod A exit status; summary {summary}\n{}",
                a.ld.stderr_text()
            );
            assert_eq!(
                summary.get("outcome").and_then(|v| v.as_str()),
                Some("graceful"),
                "cycle {cycle}"
            );
            let during = field_u64(&summary, "requests_during_drain").unwrap_or(0);
            a.restart_proxy(&extra).await;
            let up_after = hap.wait_server("a", "UP", secs(10)).await;
            cycles.push((t_kill, t_exit - t_kill, during, up_after));
        }
        // A little traffic on the restarted pair, then stop.
        tokio::time::sleep(ms(300)).await;
        let report = load.finish().await;
        let total = report.records.len();
        let by_a = report.served_by("a").len();
        let by_b = report.served_by("b").len();
        eprintln!(
            "[soak] {CYCLES} cycles in {:.1}s: {total} requests ({by_a} by a, {by_b} by b, {} failed) over {} connections, idle closes {}",
            report.elapsed.as_secs_f64(),
            report.failures().len(),
            report.connections,
            report.idle_closes
        );
        for (i, (t, exit, during, up)) in cycles.iter().enumerate() {
            eprintln!(
                "[soak] cycle {i:2}: SIGTERM at {:6.2}s, exited after {:.2}s, requests_during_drain {during:3}, HAProxy saw the new A UP {up:.2?} after its /ready",
                t.as_secs_f64(),
                exit.as_secs_f64()
            );
        }
        // t0 of the failure listing: the first SIGTERM.
        let t0 = cycles.first().map(|c| c.0).unwrap_or_default();
        assert!(
            report.failures().is_empty(),
            "soak: {}\nHAProxy log (not 200):\n{}",
            report.describe_failures(t0, 30),
            hap.log_text()
                .lines()
                .filter(|l| !(l.contains(" 200 ") && l.contains(" ---- ")))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            report.idle_closes, 0,
            "HAProxy closed idle client connections"
        );
        assert!(by_a > 0 && by_b > 0);

        // No leak on the survivor: every connection closed, fds back to baseline.
        hap.stop();
        let fds_after = quiet_fds(&b).await;
        let b_requests_after = metric(b.admin, "lameduck_requests_total").await;
        let active_a = metric(a.admin, "lameduck_connections_active").await;
        eprintln!(
            "[soak] pod B fds (total, sockets): before {fds_before:?} after {fds_after:?}; B served {} requests in the soak",
            b_requests_after - b_requests_before
        );
        assert_eq!(
            b_requests_after - b_requests_before,
            by_b as f64,
            "pod B's requests_total delta != responses the client got from B"
        );
        // Pooled upstream connections are expected (at most one per
        // concurrent client); every other descriptor must be back to baseline.
        let pooled = established_to(b.app_addr);
        eprintln!("[soak] pod B keeps {pooled} pooled upstream connections");
        assert!(
            pooled <= 8,
            "pod B pools {pooled} upstream connections for 8 clients"
        );
        assert!(
            fds_after.0 - pooled <= fds_before.0 && fds_after.1 - pooled <= fds_before.1,
            "pod B's fds grew from {fds_before:?} to {fds_after:?} over the soak, {pooled} of them pooled upstream connections"
        );
        assert_eq!(
            active_a, 0.0,
            "the last pod A still has connections after HAProxy left"
        );
        assert!(
            started.elapsed() < secs(180),
            "soak took {:?}",
            started.elapsed()
        );
    });
}
