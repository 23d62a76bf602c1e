//! Processes and plumbing for the end-to-end suite: the real `lameduck`
//! binary (proxy and `demo-app`), small HTTP helpers, metrics parsing, and
//! the serialisation lock.
//!
//! Everything talks to 127.0.0.0/8 only; every wait has a deadline.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::net::TcpStream;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lameduck");

/// What to tell someone whose machine lacks a tool the suite needs.
pub const INSTALL_HINT: &str = "run the test command from README.md, which installs the \
     e2e tools first (apt-get install -y haproxy prometheus); the e2e suite never skips";

// ---------------------------------------------------------------------------
// Serialisation and runtime
// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Every e2e test uses fixed addresses (127.0.0.2/3) or loads the machine:
/// they run one at a time, whatever `--test-threads` says.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on a fresh multi-threaded runtime while holding the serial lock.
pub fn run_test<F: Future<Output = ()>>(f: F) {
    let _guard = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(f);
}

/// Path of an external tool, or a panic that says how to get it.
pub fn require_tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed on this machine: {INSTALL_HINT}");
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

pub fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A port on `ip` that was free a moment ago (bound to port 0, then released).
pub fn free_port(ip: IpAddr) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("cannot bind {ip}:0 ({e}); is 127.0.0.0/8 routed to lo?"));
    l.local_addr().unwrap().port()
}

pub fn free_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, free_port(ip))
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Polls `cond` every 20 ms until it is true; false after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ms(20)).await;
    }
}

/// True once a TCP connect to `addr` succeeds (within `timeout`).
pub async fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    eventually(timeout, || async move {
        matches!(
            tokio::time::timeout(ms(500), TcpStream::connect(addr)).await,
            Ok(Ok(_))
        )
    })
    .await
}

// ---------------------------------------------------------------------------
// A small HTTP/1.1 client for admin endpoints and one-off requests
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// One request on a fresh connection (`connection: close`), with a deadline.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Resp, String> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("connection", "close");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Resp { status, body })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{method} http://{addr}{path}: no answer within {timeout:?}"
        )),
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    http_request(addr, "GET", path, &[], secs(5)).await
}

// ---------------------------------------------------------------------------
// Metrics text
// ---------------------------------------------------------------------------

/// Sum of every series of `name` whose labels contain all of `labels`
/// (`name` matches exactly: `foo` does not match `foo_bucket`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let (label_part, value_part) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((ls, v)) => (ls, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        if !labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Some(v) = value_part
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Scrapes `admin`'s /metrics (classic text).
pub async fn scrape(admin: SocketAddr) -> Result<String, String> {
    let r = http_get(admin, "/metrics").await?;
    if r.status != 200 {
        return Err(format!("/metrics answered {}", r.status));
    }
    Ok(r.text())
}

/// `name` summed over labels from a fresh scrape (0 when absent).
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = scrape(admin).await.unwrap_or_else(|e| panic!("{e}"));
    metric_sum(&text, name, &[]).unwrap_or(0.0)
}

/// Waits until `name` (summed) satisfies `pred`; panics with the last value.
pub async fn wait_metric(
    admin: SocketAddr,
    name: &str,
    pred: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(text) = scrape(admin).await {
            let v = metric_sum(&text, name, &[]).unwrap_or(0.0);
            last = Some(v);
            if pred(v) {
                return v;
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "{name} on {admin} did not reach the expected value within {timeout:?}; last {last:?}"
            );
        }
        tokio::time::sleep(ms(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A clean command for the binary: no inherited LAMEDUCK_* or RUST_LOG.
pub fn lameduck_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("LAMEDUCK_") || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub fn send_signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}) failed: {e}"));
}

/// Open file descriptors of a process (entries of /proc/<pid>/fd): (total, sockets).
pub fn fd_count(pid: i32) -> (usize, usize) {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"));
    let mut total = 0;
    let mut sockets = 0;
    for e in dir.flatten() {
        total += 1;
        if std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false)
        {
            sockets += 1;
        }
    }
    (total, sockets)
}

/// Established TCP connections to `remote` (IPv4), from /proc/net/tcp: for a
/// pod's app address these are its lameduck's pooled upstream connections.
pub fn established_to(remote: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = remote else {
        panic!("established_to handles IPv4 only, got {remote}");
    };
    // /proc/net/tcp writes the address as the little-endian u32 in hex, then the port.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[2] == want && cols[3] == "01"
        })
        .count()
}

/// `lameduck demo-app` on a fixed address.
pub struct DemoApp {
    child: Option<Child>,
}

impl DemoApp {
    pub async fn start(addr: SocketAddr) -> DemoApp {
        let child = lameduck_command()
            .args(["demo-app", "--listen", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN} demo-app: {e}"));
        let mut app = DemoApp { child: Some(child) };
        if !wait_listening(addr, secs(10)).await {
            app.kill();
            panic!("demo-app on {addr} did not start listening within 10s");
        }
        app
    }

    /// SIGKILL, as a crashing app would go.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `lameduck` proxy, its stderr parsed as JSON lines.
pub struct Lameduck {
    pub name: String,
    child: Child,
    pub args: Vec<String>,
    logs: Arc<Mutex<Vec<Value>>>,
    lines: Arc<Mutex<Vec<String>>>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    status: Option<ExitStatus>,
}

pub fn message(v: &Value) -> &str {
    v.get("message").and_then(Value::as_str).unwrap_or("")
}

pub fn field_u64(v: &Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

impl Lameduck {
    /// Spawns `lameduck --log-format json <args>` and waits for `listening`.
    pub fn spawn(name: &str, args: &[String]) -> Lameduck {
        let mut full = vec!["--log-format".to_string(), "json".to_string()];
        full.extend(args.iter().cloned());
        let mut child = lameduck_command()
            .args(&full)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let logs = logs.clone();
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                                logs.lock().unwrap().push(v);
                            }
                            lines.lock().unwrap().push(line);
                        }
                    }
                }
            });
        }
        let deadline = Instant::now() + secs(10);
        let listening = loop {
            if let Some(v) = logs
                .lock()
                .unwrap()
                .iter()
                .find(|v| message(v) == "listening")
                .cloned()
            {
                break v;
            }
            if let Ok(Some(st)) = child.try_wait() {
                std::thread::sleep(ms(100));
                panic!(
                    "{name}: lameduck {full:?} exited ({st}) before `listening`:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{name}: lameduck {full:?} did not log `listening` within 10s:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(ms(5));
        };
        let addr = |k: &str| -> SocketAddr {
            listening
                .get(k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("`listening` has no `{k}`: {listening}"))
        };
        Lameduck {
            name: name.to_string(),
            proxy: addr("proxy"),
            admin: addr("admin"),
            child,
            args: full,
            logs,
            lines,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) {
        send_signal(self.pid(), sig);
    }

    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn summary(&self) -> Option<Value> {
        self.logs()
            .into_iter()
            .find(|v| message(v) == "drain complete")
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Polls until `/ready` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let admin = self.admin;
        let ok = eventually(timeout, || async move {
            matches!(http_get(admin, "/ready").await, Ok(r) if r.status == 200)
        })
        .await;
        assert!(
            ok,
            "{}: /ready did not answer 200 within {timeout:?}; stderr:\n{}",
            self.name,
            self.stderr_text()
        );
    }

    /// Waits for the exit (polling); kills and panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                // Let the stderr reader catch the last lines.
                let until = Instant::now() + secs(2);
                while self.summary().is_none() && Instant::now() < until {
                    tokio::time::sleep(ms(10)).await;
                }
                tokio::time::sleep(ms(30)).await;
                return s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{}: lameduck did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            tokio::time::sleep(ms(5)).await;
        }
    }
}

impl Drop for Lameduck {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {} lameduck stderr (pid {}, args {:?}) ----\n{}\n---- end ----",
                self.name,
                self.child.id(),
                self.args,
                self.stderr_text()
            );
        }
    }
}

/// One "pod": the demo app plus a lameduck in front of it, on one loopback IP.
pub struct Pod {
    pub name: String,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub app_addr: SocketAddr,
    pub app: Option<DemoApp>,
    pub ld: Lameduck,
}

/// The lameduck flags of a pod, before the per-test `extra` ones.
pub fn pod_args(proxy: SocketAddr, admin: SocketAddr, upstream: SocketAddr) -> Vec<String> {
    [
        "--listen",
        &proxy.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--upstream",
        &upstream.to_string(),
        "--drain-delay",
        "2s",
        "--drain-timeout",
        "10s",
        "--metrics-linger",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Pod {
    /// Starts the demo app (unless `upstream` is given) and the lameduck; waits for /ready.
    pub async fn start(
        name: &str,
        ip: IpAddr,
        upstream: Option<SocketAddr>,
        extra: &[&str],
    ) -> Pod {
        let (app, app_addr) = match upstream {
            Some(a) => (None, a),
            None => {
                let a = free_addr(ip);
                (Some(DemoApp::start(a).await), a)
            }
        };
        let proxy = free_addr(ip);
        let admin = free_addr(ip);
        let ld = Self::spawn_ld(name, proxy, admin, app_addr, extra);
        ld.wait_ready(secs(10)).await;
        Pod {
            name: name.to_string(),
            proxy,
            admin,
            app_addr,
            app,
            ld,
        }
    }

    fn spawn_ld(
        name: &str,
        proxy: SocketAddr,
        admin: SocketAddr,
        upstream: SocketAddr,
        extra: &[&str],
    ) -> Lameduck {
        // Later flags win: drop a default that `extra` sets again.
        let defaults = pod_args(proxy, admin, upstream);
        let mut args = Vec::new();
        for pair in defaults.chunks(2) {
            if !extra.contains(&pair[0].as_str()) {
                args.extend_from_slice(pair);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let ld = Lameduck::spawn(name, &args);
        assert_eq!(ld.proxy, proxy, "{name}: proxy bound elsewhere");
        assert_eq!(ld.admin, admin, "{name}: admin bound elsewhere");
        ld
    }

    /// A new lameduck on the same addresses (the old one must have exited).
    pub async fn restart_proxy(&mut self, extra: &[&str]) {
        let ld = Self::spawn_ld(&self.name, self.proxy, self.admin, self.app_addr, extra);
        ld.wait_ready(secs(10)).await;
        self.ld = ld;
    }
}

/// Shows a short view of a tempdir file (HAProxy/Prometheus logs) on failure.
pub fn tail_file(path: &std::path::Path, max_lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(max_lines);
    lines[from..].join("\n")
}
