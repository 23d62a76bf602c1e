//! Rolling termination behind a real HAProxy: two pods (demo app + lameduck)
//! on 127.0.0.2 and 127.0.0.3, steady traffic through HAProxy, SIGTERM to pod
//! A's lameduck mid-run. Zero failed requests, exit 0, and the drain summary
//! agrees with what the client saw and what /metrics said before SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::Signal;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::haproxy::{Backend, Front, Haproxy};
use crate::load::{ClientProto, Job, Load, LoadConfig, Report};
use crate::support::*;

pub const POD_A: u8 = 2;
pub const POD_B: u8 = 3;

pub fn backends(a: &Pod, b: &Pod) -> Vec<Backend> {
    vec![
        Backend {
            name: "a".into(),
            proxy: a.proxy,
            admin: a.admin,
            tls_ca: None,
        },
        Backend {
            name: "b".into(),
            proxy: b.proxy,
            admin: b.admin,
            tls_ca: None,
        },
    ]
}

pub struct Scenario {
    pub front: Front,
    pub proto: ClientProto,
    pub pod_extra: Vec<&'static str>,
    pub jobs: Vec<Job>,
    pub duration: Duration,
    pub kill_at: Duration,
    pub max_requests: u64,
    pub drain_delay: Duration,
    /// The pods terminate TLS (pod_extra has their --tls-cert/--tls-key) and
    /// HAProxy verifies them against this CA.
    pub backend_tls_ca: Option<std::path::PathBuf>,
}

/// What a rolling run measured (times relative to the load's epoch).
pub struct Run {
    pub report: Report,
    pub t_kill: Duration,
    pub t_scrape: Duration,
    /// Pod A's drain start (its /status `drain_started_unix_ms`) on the load's clock.
    pub t_drain: Duration,
    pub requests_before: f64,
    pub haproxy_down_after: Option<Duration>,
    pub exit_after: Duration,
    pub summary: serde_json::Value,
    pub exit_code: Option<i32>,
    pub haproxy_log: String,
    pub a_stderr: String,
}

/// Clock slack between the client's timestamps and pod A's drain start.
const SLACK: Duration = Duration::from_millis(5);

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}

/// When pod A's drain started, on the load's clock (from /status, in ms).
async fn drain_started(pod: &Pod, epoch_unix: Duration) -> Duration {
    let deadline = Instant::now() + secs(2);
    loop {
        if let Ok(r) = http_get(pod.admin, "/status").await {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            if let Some(ms) = v["drain_started_unix_ms"].as_u64() {
                let at = Duration::from_millis(ms);
                return at.saturating_sub(epoch_unix);
            }
        }
        assert!(
            Instant::now() < deadline,
            "pod A's /status never showed drain_started_unix_ms"
        );
        tokio::time::sleep(ms(5)).await;
    }
}

pub async fn rolling(s: Scenario) -> Run {
    require_tool("haproxy");
    // E2E_POD_A_EXTRA="--log-level info,h2=debug": more flags for pod A (post-mortems).
    let a_extra_env = std::env::var("E2E_POD_A_EXTRA").unwrap_or_default();
    let mut a_extra = s.pod_extra.clone();
    a_extra.extend(a_extra_env.split_whitespace());
    let a = Pod::start("pod-a", ip(POD_A), None, &a_extra).await;
    let b = Pod::start("pod-b", ip(POD_B), None, &s.pod_extra).await;
    let mut pods = backends(&a, &b);
    for backend in &mut pods {
        backend.tls_ca = s.backend_tls_ca.clone();
    }
    let mut hap = Haproxy::start(s.front, &pods).await;
    let mut a = a;
    let epoch = Instant::now();
    let epoch_unix = unix_now();
    let load = Load::start(
        LoadConfig {
            target: hap.front,
            proto: s.proto,
            workers: 8,
            duration: s.duration,
            max_requests: s.max_requests,
            jobs: s.jobs.clone(),
            request_timeout: secs(10),
        },
        epoch,
    );
    tokio::time::sleep(s.kill_at.saturating_sub(epoch.elapsed())).await;
    let t_scrape = epoch.elapsed();
    let before = scrape(a.admin).await.expect("scrape pod A before SIGTERM");
    let requests_before = metric_sum(&before, "lameduck_requests_total", &[]).unwrap_or(0.0);
    let t_kill = epoch.elapsed();
    a.ld.signal(Signal::SIGTERM);
    let t_drain = drain_started(&a, epoch_unix).await;

    // HAProxy's view while pod A drains.
    let mut haproxy_down_after = None;
    let deadline = Instant::now() + secs(15);
    while a.ld.try_status().is_none() && Instant::now() < deadline {
        if haproxy_down_after.is_none() {
            if let Some(st) = hap.server_state("a").await {
                if st.starts_with("DOWN") {
                    haproxy_down_after = Some(epoch.elapsed() - t_kill);
                }
            }
        }
        tokio::time::sleep(ms(20)).await;
    }
    let status = a.ld.wait_exit(secs(15)).await;
    let exit_after = epoch.elapsed() - t_kill;
    let summary = a.ld.summary().unwrap_or_else(|| {
        panic!(
            "pod A exited ({status}) without a `drain complete` line:\n{}",
            a.ld.stderr_text()
        )
    });
    // Keep the load going on pod B alone until the planned end.
    tokio::time::sleep(s.duration.saturating_sub(epoch.elapsed())).await;
    let report = load.finish().await;
    // Pod B is still fine.
    hap.wait_server("b", "UP", secs(1)).await;
    drop(b);
    hap.stop();
    // E2E_DUMP_DIR=<dir>: keep pod A's stderr and HAProxy's log for a post-mortem.
    if let Some(dir) = std::env::var_os("E2E_DUMP_DIR") {
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("pod-a.stderr"), a.ld.stderr_text());
        let _ = std::fs::write(dir.join("haproxy.log"), hap.log_text());
    }
    Run {
        haproxy_log: hap.log_text(),
        a_stderr: a.ld.stderr_text(),
        report,
        t_kill,
        t_scrape,
        t_drain,
        requests_before,
        haproxy_down_after,
        exit_after,
        summary,
        exit_code: status.code(),
    }
}

impl Run {
    pub fn count_a(&self, pred: impl Fn(&crate::load::Record) -> bool) -> usize {
        self.report
            .records
            .iter()
            .filter(|r| r.server.as_deref() == Some("a") && pred(r))
            .count()
    }

    pub fn figures(&self, label: &str) -> String {
        let rep = &self.report;
        format!(
            "[{label}] requests {} ({} by a, {} by b, {} failed) in {:.1}s over {} client connections \
             (idle closes {}); SIGTERM at {:.2}s; HAProxy marked a DOWN after {:?}; pod A exited {:?} after {:.2}s; \
             requests_total(a) before SIGTERM {}; summary {}",
            rep.records.len(),
            rep.served_by("a").len(),
            rep.served_by("b").len(),
            rep.failures().len(),
            rep.elapsed.as_secs_f64(),
            rep.connections,
            rep.idle_closes,
            self.t_kill.as_secs_f64(),
            self.haproxy_down_after,
            self.exit_code,
            self.exit_after.as_secs_f64(),
            self.requests_before,
            self.summary
        )
    }

    /// HAProxy log lines other than successful requests (events, errors).
    pub fn haproxy_non_200(&self, max: usize) -> String {
        let lines: Vec<&str> = self
            .haproxy_log
            .lines()
            .filter(|l| !(l.contains(" 200 ") && l.contains(" ---- ")))
            .collect();
        let from = lines.len().saturating_sub(max);
        lines[from..].join("\n")
    }

    /// The assertions every HTTP variant shares.
    pub fn assert_zero_failures_and_consistent_summary(&self, label: &str, http: bool) {
        let figures = self.figures(label);
        eprintln!("{figures}");
        let rep = &self.report;
        assert!(
            rep.failures().is_empty(),
            "{label}: {}\n{figures}\nHAProxy log lines that are not a 200:\n{}\npod A stderr (last 30 lines):\n{}",
            rep.describe_failures(self.t_kill, 20),
            self.haproxy_non_200(60),
            self.a_stderr
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            rep.records.len() > 100,
            "{label}: too little traffic\n{figures}"
        );
        // The load outlived pod A (it was not cut short by its request cap).
        let after_exit = self.t_kill + self.exit_after + ms(500);
        assert!(
            rep.records.iter().any(|r| r.start > after_exit),
            "{label}: no request after pod A exited; raise max_requests\n{figures}"
        );
        assert_eq!(
            self.exit_code,
            Some(0),
            "{label}: pod A exit code\n{figures}"
        );
        let s = &self.summary;
        assert_eq!(
            s.get("outcome").and_then(|v| v.as_str()),
            Some("graceful"),
            "{label}\n{figures}"
        );
        assert_eq!(
            field_u64(s, "connections_forced"),
            Some(0),
            "{label}\n{figures}"
        );
        let down = self
            .haproxy_down_after
            .unwrap_or_else(|| panic!("{label}: HAProxy never showed pod A DOWN\n{figures}"));
        assert!(
            down < secs(1),
            "{label}: HAProxy took {down:?} to mark A DOWN"
        );
        if !http {
            return;
        }
        // Every request pod A served, per the client (HAProxy's x-served-by).
        let total_a = rep.served_by("a").len() as u64;
        assert!(total_a > 0, "{label}: pod A served nothing\n{figures}");
        assert!(
            rep.records.iter().all(|r| r.server.is_some()),
            "{label}: a response without x-served-by"
        );
        let during = field_u64(s, "requests_during_drain")
            .unwrap_or_else(|| panic!("{label}: no requests_during_drain in {s}"));
        let (t_kill, t_drain) = (self.t_kill, self.t_drain);
        // Surely finished after the drain started: sent after it (+ slack).
        let lower = self.count_a(|r| r.start > t_drain + SLACK) as u64;
        // Possibly finished after the drain started: received after SIGTERM.
        let upper = self.count_a(|r| r.end + SLACK > t_kill) as u64;
        // Finished by pod A between the /metrics scrape and the drain start.
        let before = self.requests_before as u64;
        let between_max =
            self.count_a(|r| r.end > self.t_scrape && r.start < t_drain + SLACK) as u64;
        eprintln!(
            "[{label}] accounting: served by a {total_a} = requests_total before SIGTERM {before} \
             + requests_during_drain {during} + {} finished between scrape and SIGTERM (<= {between_max}); \
             client-side bounds for requests_during_drain: [{lower}, {upper}]; drain started {:.1} ms after kill()",
            total_a as i64 - before as i64 - during as i64,
            (t_drain.as_secs_f64() - t_kill.as_secs_f64()) * 1000.0
        );
        assert!(during > 0, "{label}: requests_during_drain is 0\n{figures}");
        assert!(
            (lower..=upper).contains(&during),
            "{label}: requests_during_drain {during} outside the client-side bounds [{lower}, {upper}]\n{figures}"
        );
        assert!(
            before + during <= total_a,
            "{label}: requests_total before SIGTERM {before} + requests_during_drain {during} > {total_a} served by A\n{figures}"
        );
        assert!(
            total_a - before - during <= between_max,
            "{label}: {} requests unaccounted for (at most {between_max} could have finished between the scrape and SIGTERM)\n{figures}",
            total_a - before - during
        );
    }
}

fn h1_scenario(proto: ClientProto, front: Front, max_requests: u64) -> Scenario {
    Scenario {
        front,
        proto,
        pod_extra: vec![],
        jobs: vec![
            Job::root(),
            Job::bytes(16 * 1024),
            Job::root(),
            Job::slow(20),
        ],
        duration: secs(8),
        kill_at: ms(2500),
        max_requests,
        drain_delay: secs(2),
        backend_tls_ca: None,
    }
}

#[test]
fn rolling_http1_keepalive_zero_failures() {
    run_test(async {
        let run = rolling(h1_scenario(ClientProto::H1KeepAlive, Front::Http1, 60_000)).await;
        run.assert_zero_failures_and_consistent_summary("h1 keep-alive", true);
        assert_eq!(
            run.report.idle_closes, 0,
            "HAProxy closed idle client connections"
        );
    });
}

#[test]
fn rolling_http1_connection_per_request_zero_failures() {
    run_test(async {
        let run = rolling(h1_scenario(ClientProto::H1Close, Front::Http1, 60_000)).await;
        run.assert_zero_failures_and_consistent_summary("h1 no keep-alive", true);
    });
}

#[test]
fn rolling_h2c_to_haproxy_and_h2_to_lameduck_zero_failures() {
    run_test(async {
        let run = rolling(h1_scenario(ClientProto::H2, Front::Http2, 60_000)).await;
        run.assert_zero_failures_and_consistent_summary("h2c", true);
        assert_eq!(
            run.report.idle_closes, 0,
            "HAProxy closed idle h2 client connections"
        );
    });
}

#[test]
fn rolling_https_to_lameduck_behind_haproxy_ssl_verify_required_zero_failures() {
    run_test(async {
        // HAProxy checks the name `localhost` (verifyhost), not the pod IPs.
        let pki = crate::pki::Pki::new();
        let (crt, key) = pki.leaf("localhost", "DNS:localhost");
        // Scenario flags are 'static; the strings live until the process ends.
        let leak = |p: std::path::PathBuf| -> &'static str {
            Box::leak(p.display().to_string().into_boxed_str())
        };
        let mut s = h1_scenario(ClientProto::H1KeepAlive, Front::Http1, 60_000);
        s.pod_extra = vec!["--tls-cert", leak(crt), "--tls-key", leak(key)];
        s.backend_tls_ca = Some(pki.path("ca.crt"));
        let run = rolling(s).await;
        // Zero failures proves TLS on both sides: HAProxy speaking TLS to a
        // cleartext port, or cleartext to the TLS port (a 400), would fail.
        run.assert_zero_failures_and_consistent_summary("https backends", true);
    });
}

#[test]
fn rolling_requests_longer_than_the_lame_duck_window_finish() {
    run_test(async {
        let s = Scenario {
            front: Front::Http1,
            proto: ClientProto::H1KeepAlive,
            pod_extra: vec!["--drain-delay", "1s"],
            // 6 workers loop on 3 s requests, 2 on fast ones. HAProxy's
            // round-robin alternates the first 8 requests between the pods,
            // so at least 2 slow ones are in flight on pod A at SIGTERM (with
            // 4 slow workers all of them could land on B: seen once).
            jobs: vec![
                Job::slow(3000),
                Job::slow(3000),
                Job::slow(3000),
                Job::root(),
            ],
            duration: secs(8),
            kill_at: ms(1500),
            max_requests: 60_000,
            drain_delay: secs(1),
            backend_tls_ca: None,
        };
        let window = s.drain_delay;
        let run = rolling(s).await;
        run.assert_zero_failures_and_consistent_summary("slow requests", true);
        let t_kill = run.t_kill;
        let slow_after_window = run.count_a(|r| {
            r.path.starts_with("/slow") && r.start < t_kill && r.end > t_kill + window
        });
        assert!(
            slow_after_window >= 1,
            "no 3 s request on pod A spanned the end of the lame-duck window\n{}",
            run.figures("slow")
        );
        // The drain waited for them: pod A exited after the slow ones ended.
        assert!(
            run.exit_after > window + ms(200),
            "pod A exited {:?} after SIGTERM, before its slow requests could finish",
            run.exit_after
        );
        eprintln!(
            "[slow requests] {slow_after_window} slow requests on A finished 200 after the window"
        );
    });
}

#[test]
fn rolling_tcp_mode_zero_failures() {
    run_test(async {
        let run = rolling(Scenario {
            front: Front::Tcp,
            proto: ClientProto::Tcp10,
            pod_extra: vec!["--mode", "tcp"],
            jobs: vec![Job::root(), Job::bytes(8 * 1024)],
            duration: secs(8),
            kill_at: ms(2500),
            max_requests: 60_000,
            drain_delay: secs(2),
            backend_tls_ca: None,
        })
        .await;
        run.assert_zero_failures_and_consistent_summary("tcp", false);
        // TCP streams are connections, not requests: pod A closed those it got
        // during the window gracefully.
        let graceful = field_u64(&run.summary, "connections_graceful").unwrap_or(0);
        assert!(
            graceful >= 1,
            "tcp: no connection closed gracefully during the drain: {}",
            run.summary
        );
    });
}

// ---------------------------------------------------------------------------
// WebSocket sessions across the drain
// ---------------------------------------------------------------------------

/// A tiny WebSocket echo server (text and binary echoed), in-process.
pub async fn ws_echo_server(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.expect("bind ws echo");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

#[derive(Debug)]
struct Session {
    id: usize,
    server: Option<String>,
    opened: Duration,
    /// Echoes received back, and how many of them after SIGTERM.
    echoes: u64,
    echoes_after_kill: u64,
    /// When and why it ended before the test stopped it.
    closed: Option<(Duration, String)>,
    mismatch: Option<String>,
}

async fn ws_session(
    id: usize,
    front: SocketAddr,
    epoch: Instant,
    kill: Arc<std::sync::Mutex<Option<Duration>>>,
    stop: Arc<AtomicBool>,
) -> Session {
    let opened = epoch.elapsed();
    let mut s = Session {
        id,
        server: None,
        opened,
        echoes: 0,
        echoes_after_kill: 0,
        closed: None,
        mismatch: None,
    };
    let tcp = match tokio::net::TcpStream::connect(front).await {
        Ok(t) => t,
        Err(e) => {
            s.closed = Some((epoch.elapsed(), format!("connect: {e}")));
            return s;
        }
    };
    let (mut ws, resp) = match tokio::time::timeout(
        secs(5),
        tokio_tungstenite::client_async(format!("ws://{front}/ws"), tcp),
    )
    .await
    {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            s.closed = Some((epoch.elapsed(), format!("handshake: {e}")));
            return s;
        }
        Err(_) => {
            s.closed = Some((epoch.elapsed(), "handshake timed out".into()));
            return s;
        }
    };
    s.server = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut n = 0u64;
    // Bounded: the test sets `stop` after a few seconds; 2000 messages max.
    while !stop.load(Ordering::Relaxed) && n < 2000 {
        n += 1;
        let text = format!("session {id} message {n}");
        if let Err(e) = ws.send(Message::Text(text.clone())).await {
            s.closed = Some((epoch.elapsed(), format!("send: {e}")));
            return s;
        }
        match tokio::time::timeout(secs(3), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t == text => {
                s.echoes += 1;
                if kill.lock().unwrap().is_some_and(|k| epoch.elapsed() > k) {
                    s.echoes_after_kill += 1;
                }
            }
            Ok(Some(Ok(other))) => {
                if other.is_close() {
                    s.closed = Some((epoch.elapsed(), format!("close frame {other:?}")));
                    return s;
                }
                s.mismatch = Some(format!("sent {text:?}, got {other:?}"));
                return s;
            }
            Ok(Some(Err(e))) => {
                s.closed = Some((epoch.elapsed(), format!("receive: {e}")));
                return s;
            }
            Ok(None) => {
                s.closed = Some((epoch.elapsed(), "stream ended".into()));
                return s;
            }
            Err(_) => {
                s.closed = Some((epoch.elapsed(), "no echo within 3s".into()));
                return s;
            }
        }
        tokio::time::sleep(ms(50)).await;
    }
    let _ = ws.close(None).await;
    s
}

#[test]
fn rolling_websocket_sessions_across_the_drain_are_forced_at_the_deadline() {
    run_test(async {
        require_tool("haproxy");
        let ws_a = free_addr(ip(POD_A));
        let ws_b = free_addr(ip(POD_B));
        let _echo_a = ws_echo_server(ws_a).await;
        let _echo_b = ws_echo_server(ws_b).await;
        let extra = ["--drain-delay", "1s", "--drain-timeout", "4s"];
        let mut a = Pod::start("pod-a", ip(POD_A), Some(ws_a), &extra).await;
        let b = Pod::start("pod-b", ip(POD_B), Some(ws_b), &extra).await;
        let mut hap = Haproxy::start(Front::Http1, &backends(&a, &b)).await;
        let epoch = Instant::now();
        let kill: Arc<std::sync::Mutex<Option<Duration>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for id in 0..6 {
            tasks.push(tokio::spawn(ws_session(
                id,
                hap.front,
                epoch,
                kill.clone(),
                stop.clone(),
            )));
            tokio::time::sleep(ms(30)).await;
        }
        tokio::time::sleep(secs(1)).await;
        let t_kill = epoch.elapsed();
        *kill.lock().unwrap() = Some(t_kill);
        a.ld.signal(Signal::SIGTERM);
        let down_after = hap.wait_server("a", "DOWN", secs(2)).await;
        // New sessions opened during the drain land on pod B.
        for id in 6..8 {
            tasks.push(tokio::spawn(ws_session(
                id,
                hap.front,
                epoch,
                kill.clone(),
                stop.clone(),
            )));
        }
        let status = a.ld.wait_exit(secs(12)).await;
        let exit_after = epoch.elapsed() - t_kill;
        // B's sessions keep going a little longer, then the test ends them.
        tokio::time::sleep(ms(1000)).await;
        stop.store(true, Ordering::Relaxed);
        let mut sessions = Vec::new();
        for t in tasks {
            sessions.push(t.await.expect("session task"));
        }
        let summary = a.ld.summary().expect("drain complete line");
        let figures = format!(
            "SIGTERM at {:.2}s, HAProxy marked a DOWN after {down_after:?}, pod A exited {:?} after {exit_after:?}; summary {summary}\nsessions: {sessions:#?}",
            t_kill.as_secs_f64(),
            status.code()
        );
        eprintln!("[websocket] {figures}");
        let on_a: Vec<&Session> = sessions
            .iter()
            .filter(|s| s.server.as_deref() == Some("a"))
            .collect();
        let on_b: Vec<&Session> = sessions
            .iter()
            .filter(|s| s.server.as_deref() == Some("b"))
            .collect();
        assert!(
            !on_a.is_empty() && !on_b.is_empty(),
            "sessions not on both pods\n{figures}"
        );
        assert_eq!(
            on_a.len() + on_b.len(),
            sessions.len(),
            "a session without x-served-by\n{figures}"
        );
        assert!(
            sessions.iter().all(|s| s.mismatch.is_none()),
            "wrong echo\n{figures}"
        );
        for s in &on_a {
            assert!(
                s.opened < t_kill,
                "a session opened during the drain went to A\n{figures}"
            );
            assert!(
                s.echoes_after_kill > 0,
                "session {} on A stopped echoing at SIGTERM\n{figures}",
                s.id
            );
            let (at, why) = s.closed.as_ref().unwrap_or_else(|| {
                panic!(
                    "session {} on A outlived the drain deadline\n{figures}",
                    s.id
                )
            });
            let after = *at - t_kill;
            assert!(
                after >= ms(3800) && after <= ms(6000),
                "session {} on A closed {after:?} after SIGTERM ({why}); expected at the 4 s deadline\n{figures}",
                s.id
            );
        }
        for s in &on_b {
            assert!(
                s.closed.is_none(),
                "session {} on B was closed: {:?}\n{figures}",
                s.id,
                s.closed
            );
            assert!(s.echoes > 0);
        }
        assert_eq!(status.code(), Some(3), "pod A exit code\n{figures}");
        assert_eq!(
            summary.get("outcome").and_then(|v| v.as_str()),
            Some("deadline")
        );
        let forced = field_u64(&summary, "connections_forced").unwrap_or(0);
        assert!(forced >= 1, "connections_forced {forced}\n{figures}");
        assert_eq!(
            forced,
            on_a.len() as u64,
            "connections_forced should count exactly the sessions open on A\n{figures}"
        );
        assert!(
            exit_after >= ms(3900) && exit_after <= ms(7000),
            "pod A exited {exit_after:?} after SIGTERM, expected right after the 4 s deadline"
        );
        hap.stop();
        drop(b);
    });
}
