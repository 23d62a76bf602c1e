//! A real Prometheus scrapes a lameduck through a drain (--metrics-linger 3s):
//! it must have recorded lameduck_draining == 1, the drain duration and the
//! graceful closures. `promtool check metrics` accepts a scrape taken during
//! the drain. `GET /drained` answers when the drain completes, not after the
//! linger, and the process exits after the linger.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::*;

struct Prometheus {
    child: Option<Child>,
    addr: SocketAddr,
    log_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let bin = require_tool("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 500ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: lameduck\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let data = dir.path().join("data");
        let addr = free_addr(ip(1));
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut p = Prometheus {
            child: Some(child),
            addr,
            log_path,
            _dir: dir,
        };
        let ready = eventually(secs(30), || async move {
            matches!(http_get(addr, "/-/ready").await, Ok(r) if r.status == 200)
        })
        .await;
        if !ready {
            let log = tail_file(&p.log_path, 40);
            p.stop();
            panic!("prometheus did not become ready within 30s:\n{log}");
        }
        p
    }

    /// An instant query; returns the values of the result vector.
    async fn query(&self, q: &str) -> Vec<f64> {
        let path = format!("/api/v1/query?query={}", url_encode(q));
        let r = http_get(self.addr, &path)
            .await
            .unwrap_or_else(|e| panic!("prometheus query {q}: {e}"));
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "prometheus answered {} non-JSON ({e}): {}",
                r.status,
                r.text()
            )
        });
        assert_eq!(v["status"], "success", "query {q}: {v}");
        v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["value"][1].as_str().and_then(|x| x.parse().ok()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A range query over the last `seconds`: whether Prometheus accepted it
    /// (its error otherwise) and how many series it returned.
    async fn query_range(&self, q: &str, seconds: u64) -> Result<usize, String> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let path = format!(
            "/api/v1/query_range?query={}&start={}&end={end}&step=1",
            url_encode(q),
            end - seconds
        );
        let r = http_get(self.addr, &path)
            .await
            .map_err(|e| format!("prometheus query {q}: {e}"))?;
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {}", r.text()))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus log ----\n{}\n---- end ----",
                tail_file(&self.log_path, 40)
            );
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_records_the_drain_and_drained_answers_before_the_linger() {
    run_test(async {
        require_tool("prometheus");
        let promtool = require_tool("promtool");
        let mut pod = Pod::start(
            "pod",
            ip(1),
            None,
            &[
                "--drain-delay",
                "1s",
                "--metrics-linger",
                "3s",
                "--drain-timeout",
                "10s",
            ],
        )
        .await;
        let prom = Prometheus::start(pod.admin).await;
        let up = eventually(secs(15), || {
            let prom = &prom;
            async move { prom.query("up{job=\"lameduck\"}").await == vec![1.0] }
        })
        .await;
        assert!(up, "prometheus never scraped the lameduck successfully");
        // A couple of samples from before the drain.
        tokio::time::sleep(ms(1500)).await;

        let epoch = Instant::now();
        let proxy = pod.proxy;
        let slow = tokio::spawn(async move {
            let r = http_request(proxy, "GET", "/slow?ms=2000", &[], secs(10)).await;
            (r, epoch.elapsed())
        });
        wait_metric(
            pod.admin,
            "lameduck_requests_in_flight",
            |v| v == 1.0,
            secs(3),
        )
        .await;
        let admin = pod.admin;
        let drained = tokio::spawn(async move {
            let r = http_request(admin, "GET", "/drained?timeout=30s", &[], secs(35)).await;
            (r, epoch.elapsed())
        });
        tokio::time::sleep(ms(100)).await;
        let t_kill = epoch.elapsed();
        pod.ld.signal(Signal::SIGTERM);

        // A scrape in the middle of the drain, checked by promtool.
        tokio::time::sleep(ms(400)).await;
        let during = scrape(pod.admin).await.expect("scrape during the drain");
        assert_eq!(metric_sum(&during, "lameduck_draining", &[]), Some(1.0));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &during).unwrap();
        let check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(file.path()).unwrap())
            .output()
            .expect("promtool");
        assert!(
            check.status.success(),
            "promtool check metrics failed on a scrape taken during the drain:\n{}{}\n--- scrape ---\n{during}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        let status = pod.ld.wait_exit(secs(15)).await;
        let t_exit = epoch.elapsed();
        let (slow_resp, t_slow) = slow.await.unwrap();
        let (drained_resp, t_drained) = drained.await.unwrap();
        let slow_resp = slow_resp.expect("slow request");
        assert_eq!(slow_resp.status, 200);
        assert_eq!(slow_resp.text(), "slept 2000 ms\n");
        let drained_resp = drained_resp.expect("/drained");
        assert_eq!(
            drained_resp.status,
            200,
            "/drained: {}",
            drained_resp.text()
        );
        let summary: Value = serde_json::from_slice(&drained_resp.body).expect("/drained JSON");
        let rel = |d: Duration| d.as_secs_f64() - t_kill.as_secs_f64();
        let figures = format!(
            "SIGTERM at 0; slow request done {:+.3}s; /drained answered {:+.3}s; exit {:+.3}s ({:?}); /drained {summary}",
            rel(t_slow),
            rel(t_drained),
            rel(t_exit),
            status.code()
        );
        eprintln!("[prometheus] {figures}");
        assert_eq!(status.code(), Some(0), "{figures}");
        // /drained answers when the last connection is gone, not after the linger.
        assert!(
            t_drained >= t_slow && t_drained <= t_slow + ms(500),
            "/drained did not answer right at the drain's end\n{figures}"
        );
        // The process lingers for --metrics-linger 3s, then exits.
        let linger = t_exit.saturating_sub(t_drained);
        assert!(
            linger >= ms(2800) && linger <= ms(4000),
            "exit {linger:?} after /drained, expected the 3 s linger\n{figures}"
        );

        // Prometheus saw it all (scrapes during the drain and the linger).
        tokio::time::sleep(ms(500)).await;
        let q = |s: &'static str| {
            let prom = &prom;
            async move { prom.query(s).await }
        };
        let draining = q("max_over_time(lameduck_draining[1m])").await;
        let duration = q("max_over_time(lameduck_drain_duration_seconds[1m])").await;
        let graceful =
            q("max_over_time(lameduck_drain_connections_closed_total{how=\"graceful\"}[1m])").await;
        let drained_state = q("max_over_time(lameduck_state{state=\"drained\"}[1m])").await;
        let samples = q("count_over_time(lameduck_draining[1m])").await;
        eprintln!(
            "[prometheus] draining {draining:?}, drain_duration_seconds {duration:?}, closed graceful {graceful:?}, state=drained {drained_state:?}, samples {samples:?}"
        );
        assert_eq!(draining, vec![1.0], "max_over_time(lameduck_draining[1m])");
        assert!(
            duration.len() == 1 && duration[0] > 0.0,
            "lameduck_drain_duration_seconds {duration:?}"
        );
        let expected = summary["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0;
        assert!(
            (duration[0] - expected).abs() < 0.05,
            "drain_duration_seconds {} vs summary {expected}",
            duration[0]
        );
        assert!(
            graceful.len() == 1 && graceful[0] >= 1.0,
            "drain_connections_closed_total{{how=\"graceful\"}} {graceful:?}"
        );
        assert_eq!(drained_state, vec![1.0], "state{{state=\"drained\"}}");

        // Every query of the Grafana dashboard is valid PromQL for this
        // Prometheus, and the drain panels show this drain.
        check_dashboard(&prom).await;
    });
}

/// The queries of deploy/grafana/lameduck-drain.json, with Grafana's
/// variables as Grafana would substitute them for "All" and a 1 s scrape.
async fn check_dashboard(prom: &Prometheus) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/lameduck-drain.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let must_show_the_drain = [
        "Replicas draining",
        "Requests answered by status class",
        "Last drain duration",
        "Connections closed at the drain",
        "Why the lame-duck window ended",
        "Drain deadline, by where it came from",
        "Open connections by protocol",
    ];
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let q = expr
                .replace("$namespace", ".*")
                .replace("$pod", ".*")
                .replace("$__rate_interval", "4s");
            let series = prom
                .query_range(&q, 60)
                .await
                .unwrap_or_else(|e| panic!("dashboard panel {title:?}: {expr}: {e}"));
            if must_show_the_drain.contains(&title) {
                assert!(series > 0, "dashboard panel {title:?} shows nothing: {q}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 16, "only {checked} dashboard queries");
    eprintln!("[prometheus] {checked} dashboard queries valid; the drain panels show the drain");
}

#[test]
fn metrics_linger_is_capped_by_the_drain_timeout() {
    run_test(async {
        let mut pod = Pod::start(
            "pod",
            ip(1),
            None,
            &[
                "--drain-delay",
                "1s",
                "--metrics-linger",
                "30s",
                "--drain-timeout",
                "3s",
            ],
        )
        .await;
        let admin = pod.admin;
        let start = Instant::now();
        let drained = tokio::spawn(async move {
            let r = http_request(admin, "GET", "/drained?timeout=10s", &[], secs(12)).await;
            (r, start.elapsed())
        });
        tokio::time::sleep(ms(100)).await;
        let t_kill = start.elapsed();
        pod.ld.signal(Signal::SIGTERM);
        let status = pod.ld.wait_exit(secs(10)).await;
        let exit_after = start.elapsed() - t_kill;
        let (r, t_drained) = drained.await.unwrap();
        let r = r.expect("/drained");
        let drained_after = t_drained - t_kill;
        eprintln!(
            "[linger cap] /drained {} after {drained_after:?}, exit {:?} after {exit_after:?} (linger 30s, timeout 3s)",
            r.status,
            status.code()
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            status.code(),
            Some(0),
            "a capped linger is still a graceful drain"
        );
        assert!(
            drained_after >= ms(950) && drained_after <= ms(1500),
            "/drained answered {drained_after:?} after SIGTERM, expected at the 1 s window's end"
        );
        assert!(
            exit_after >= ms(2900) && exit_after <= ms(4000),
            "exit {exit_after:?} after SIGTERM: the 30 s linger must stop at the 3 s deadline"
        );
    });
}
