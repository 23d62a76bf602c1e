//! Shared helpers for the black-box integration tests of `lameduck`.
//!
//! Everything here talks to the real binary (`CARGO_BIN_EXE_lameduck`) over
//! 127.0.0.1 only. Every wait has a deadline and every loop is bounded.
#![allow(dead_code)]

pub mod pki;

use std::convert::Infallible;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lameduck");

/// Deadline for the `listening` line after spawning.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Log helpers
// ---------------------------------------------------------------------------

/// A field of a JSON log line. The contract puts fields at top level; as a
/// courtesy this also looks into a nested `fields` object so that a single
/// dedicated test (not every test) reports a nesting deviation.
pub fn field<'a>(line: &'a Value, key: &str) -> Option<&'a Value> {
    line.get(key)
        .or_else(|| line.get("fields").and_then(|f| f.get(key)))
}

/// The `message` of a JSON log line ("" if absent).
pub fn message(line: &Value) -> &str {
    field(line, "message").and_then(Value::as_str).unwrap_or("")
}

/// A field as a string.
pub fn field_str<'a>(line: &'a Value, key: &str) -> Option<&'a str> {
    field(line, key).and_then(Value::as_str)
}

/// A numeric field as u64 (a number, or a string holding a number).
pub fn field_u64(line: &Value, key: &str) -> Option<u64> {
    match field(line, key)? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------

/// A running `lameduck` process.
pub struct Lameduck {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    proxy: SocketAddr,
    admin: SocketAddr,
    listening: Value,
    status: Option<ExitStatus>,
}

/// The env var the contract derives from a flag (`--drain-delay` -> `LAMEDUCK_DRAIN_DELAY`).
pub fn env_name(flag: &str) -> String {
    format!(
        "LAMEDUCK_{}",
        flag.trim_start_matches("--")
            .replace('-', "_")
            .to_ascii_uppercase()
    )
}

fn has_flag(args: &[&str], flag: &str) -> bool {
    let with_eq = format!("{flag}=");
    args.iter().any(|a| *a == flag || a.starts_with(&with_eq))
}

/// A clean command for the binary: no inherited LAMEDUCK_* or RUST_LOG.
pub fn base_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        // Nor the Kubernetes identity of a machine that happens to run in a
        // pod: tests that want the API pass it explicitly.
        let kubernetes = [
            "POD_NAME",
            "POD_NAMESPACE",
            "KUBECONFIG",
            "KUBERNETES_SERVICE_HOST",
        ];
        if k.starts_with("LAMEDUCK_") || k == "RUST_LOG" || kubernetes.contains(&k.as_str()) {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

impl Lameduck {
    /// Spawns the proxy with `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
    /// --log-format json --metrics-linger 0s --upstream <closed port>` plus
    /// `args`. A default is left out when `args` (or the env) sets that flag,
    /// so "later args override". Waits for the `listening` line.
    pub fn spawn(args: &[&str]) -> Lameduck {
        Self::spawn_full(&[], args, &[])
    }

    /// Like [`spawn`], with extra environment variables for the child.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Lameduck {
        Self::spawn_full(&[], args, env)
    }

    /// Like [`spawn`], with a subcommand (e.g. `run`) before the flags.
    pub fn spawn_subcommand(sub: &str, args: &[&str]) -> Lameduck {
        Self::spawn_full(&[sub], args, &[])
    }

    fn spawn_full(pre: &[&str], args: &[&str], env: &[(&str, &str)]) -> Lameduck {
        let closed = closed_port().to_string();
        let defaults: [(&str, &str); 5] = [
            ("--listen", "127.0.0.1:0"),
            ("--admin-listen", "127.0.0.1:0"),
            ("--log-format", "json"),
            ("--metrics-linger", "0s"),
            ("--upstream", closed.as_str()),
        ];
        // `demo` brings its own upstream; `inject` has none.
        let is_demo = matches!(pre.first(), Some(&"demo") | Some(&"inject"));
        let mut full: Vec<String> = pre.iter().map(|s| s.to_string()).collect();
        for (flag, value) in defaults {
            let in_env = env.iter().any(|(k, _)| *k == env_name(flag));
            if is_demo && flag == "--upstream" {
                continue;
            }
            if !has_flag(args, flag) && !in_env {
                full.push(flag.to_string());
                full.push(value.to_string());
            }
        }
        full.extend(args.iter().map(|s| s.to_string()));

        let mut cmd = base_command();
        cmd.args(&full)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));

        let logs = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        {
            let mut out = child.stdout.take().expect("stdout piped");
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match out.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => stdout
                            .lock()
                            .unwrap()
                            .push_str(&String::from_utf8_lossy(&buf[..n])),
                    }
                }
            });
        }
        let stderr = child.stderr.take().expect("stderr piped");
        let reader = {
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
                                if v.is_object() {
                                    logs.lock().unwrap().push(v);
                                }
                            }
                            lines.lock().unwrap().push(line);
                        }
                    }
                }
            })
        };

        let deadline = Instant::now() + STARTUP_DEADLINE;
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
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "lameduck {full:?} exited with {status} before logging `listening`; stderr:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "lameduck {full:?} did not log `listening` within {STARTUP_DEADLINE:?}; stderr:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let addr_of = |key: &str| -> SocketAddr {
            field_str(&listening, key)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    panic!("`listening` line has no parsable `{key}` address: {listening}")
                })
        };
        // The webhook's listener is logged as `webhook`.
        let proxy = addr_of(if field(&listening, "webhook").is_some() {
            "webhook"
        } else {
            "proxy"
        });
        let admin = addr_of("admin");
        Lameduck {
            child,
            logs,
            lines,
            stdout,
            reader: Some(reader),
            proxy,
            admin,
            listening,
            status: None,
        }
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The `listening` log line.
    pub fn listening_line(&self) -> &Value {
        &self.listening
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// All JSON log lines so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    /// All raw stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Log lines with the given message.
    pub fn logs_with_message(&self, msg: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| message(v) == msg)
            .collect()
    }

    /// The `drain complete` summary line, if logged.
    pub fn summary(&self) -> Option<Value> {
        self.logs_with_message("drain complete").into_iter().next()
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) failed: {e}", self.pid()));
    }

    /// The first log line matching `pred`, waiting up to `timeout`.
    pub async fn try_wait_for_log(
        &self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logs.lock().unwrap().iter().find(|v| pred(v)).cloned() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The first log line matching `pred`; panics after `timeout`.
    pub async fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        match self.try_wait_for_log(pred, timeout).await {
            Some(v) => v,
            None => panic!(
                "no matching log line within {timeout:?}; stderr so far:\n{}",
                self.stderr_lines().join("\n")
            ),
        }
    }

    /// Waits for `"message":"state changed"` with `state` = `state`.
    pub async fn wait_for_state_log(&self, state: &str, timeout: Duration) -> Value {
        let state = state.to_string();
        self.wait_for_log(
            move |v| message(v) == "state changed" && field_str(v, "state") == Some(&state),
            timeout,
        )
        .await
    }

    /// Exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits for the process to exit (polling); kills it and panics after
    /// `timeout`. Also waits (bounded) for the stderr reader to drain.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.try_status() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "lameduck did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr_lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.join_reader().await;
        status
    }

    async fn join_reader(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while let Some(r) = self.reader.as_ref() {
            if r.is_finished() || Instant::now() >= deadline {
                if r.is_finished() {
                    let _ = self.reader.take().map(|r| r.join());
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
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
                "---- lameduck stderr (pid {}) ----\n{}\n---- end ----",
                self.child.id(),
                self.lines.lock().unwrap().join("\n")
            );
        }
    }
}

/// Output of a command run to completion.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }
}

/// Runs the binary with exactly `args` (no defaults) until it exits. Kills it
/// and panics after `timeout`.
pub fn run_cmd_blocking(args: &[String], env: &[(String, String)], timeout: Duration) -> CmdOutput {
    let start = Instant::now();
    let mut child = base_command()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = start + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).to_string();
            panic!("`lameduck {args:?}` did not exit within {timeout:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).to_string();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).to_string();
    CmdOutput {
        status,
        stdout,
        stderr,
        elapsed,
    }
}

/// Async wrapper of [`run_cmd_blocking`].
pub async fn run_cmd(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> CmdOutput {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || run_cmd_blocking(&args, &env, timeout))
        .await
        .expect("run_cmd thread")
}

/// `lameduck demo-app --listen 127.0.0.1:<free port>` as a process.
pub struct DemoApp {
    pub addr: SocketAddr,
    child: Child,
}

impl DemoApp {
    /// Starts the sample app and waits (10s) until its port accepts connections.
    pub async fn start() -> DemoApp {
        let addr = closed_port();
        let child = base_command()
            .args(["demo-app", "--listen", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN} demo-app: {e}"));
        let mut app = DemoApp { addr, child };
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return app;
            }
            if let Ok(Some(s)) = app.child.try_wait() {
                panic!("demo-app exited early with {s}");
            }
            if Instant::now() >= deadline {
                panic!("demo-app did not listen on {addr} within {STARTUP_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// A 127.0.0.1 port that nothing listens on (bound then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap()
}

/// True if a TCP connect to `addr` is refused (within 2s).
pub async fn connect_refused(addr: SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// A small raw HTTP/1.1 client (full control over connection reuse & closing)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// `connection: close` present (token match, case-insensitive).
    pub fn has_connection_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// EOF before any byte of a response.
    Closed,
    /// EOF (or error) in the middle of a response.
    Truncated {
        status: Option<u16>,
        body_len: usize,
        detail: String,
    },
    Malformed(String),
    Timeout,
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

fn find_subslice(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Builds an HTTP/1.1 request. Adds `host` unless given and a
/// `content-length` when there is a body (or the method is POST/PUT).
pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        s.push_str("host: 127.0.0.1\r\n");
    }
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    if (!body.is_empty() || method == "POST" || method == "PUT")
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        s.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    s.push_str("\r\n");
    let mut v = s.into_bytes();
    v.extend_from_slice(body);
    v
}

pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// One client TCP connection speaking HTTP/1.1 by hand.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn try_connect(addr: SocketAddr) -> io::Result<RawConn> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
        })
    }

    pub async fn connect(addr: SocketAddr) -> RawConn {
        Self::try_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr} failed: {e}"))
    }

    pub async fn send_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await?;
        self.stream.flush().await
    }

    /// Sends a request and reads its response (15s deadline).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse, ClientError> {
        self.send_raw(&build_request(method, path, headers, body))
            .await?;
        self.read_response_for(method == "HEAD", RESPONSE_TIMEOUT)
            .await
    }

    pub async fn get(&mut self, path: &str) -> Result<HttpResponse, ClientError> {
        self.request("GET", path, &[], b"").await
    }

    pub async fn read_response(&mut self) -> Result<HttpResponse, ClientError> {
        self.read_response_for(false, RESPONSE_TIMEOUT).await
    }

    pub async fn read_response_for(
        &mut self,
        head: bool,
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        match tokio::time::timeout(timeout, self.read_response_inner(head)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    async fn read_line(&mut self) -> Result<Option<String>, io::Error> {
        loop {
            if let Some(pos) = find_subslice(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).to_string();
                self.buf.drain(..pos + 2);
                return Ok(Some(line));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn read_n(&mut self, n: usize) -> Result<Vec<u8>, (io::Error, Vec<u8>)> {
        while self.buf.len() < n {
            match self.fill().await {
                Ok(0) => {
                    let got = std::mem::take(&mut self.buf);
                    return Err((io::ErrorKind::UnexpectedEof.into(), got));
                }
                Ok(_) => {}
                Err(e) => return Err((e, std::mem::take(&mut self.buf))),
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>), ClientError> {
        loop {
            if let Some(pos) = find_subslice(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..pos]).to_string();
                self.buf.drain(..pos + 4);
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let mut parts = status_line.splitn(3, ' ');
                let version = parts.next().unwrap_or("");
                if !version.starts_with("HTTP/1.") {
                    return Err(ClientError::Malformed(format!(
                        "status line {status_line:?}"
                    )));
                }
                let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    ClientError::Malformed(format!("status line {status_line:?}"))
                })?;
                let mut headers = Vec::new();
                for l in lines {
                    if let Some((k, v)) = l.split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                return Ok((status, headers));
            }
            if self.buf.len() > 1 << 20 {
                return Err(ClientError::Malformed("response head over 1 MiB".into()));
            }
            match self.fill().await {
                Ok(0) if self.buf.is_empty() => return Err(ClientError::Closed),
                Ok(0) => {
                    return Err(ClientError::Truncated {
                        status: None,
                        body_len: 0,
                        detail: format!(
                            "EOF inside response head: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    });
                }
                Ok(_) => {}
                Err(e) if self.buf.is_empty() => return Err(ClientError::Io(e)),
                Err(e) => {
                    return Err(ClientError::Truncated {
                        status: None,
                        body_len: 0,
                        detail: format!("{e} inside response head"),
                    });
                }
            }
        }
    }

    async fn read_response_inner(&mut self, head: bool) -> Result<HttpResponse, ClientError> {
        let (status, headers) = loop {
            let (status, headers) = self.read_head().await?;
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            break (status, headers);
        };
        let mut resp = HttpResponse {
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        if head || status == 204 || status == 304 || status == 101 {
            return Ok(resp);
        }
        let truncated = |body_len: usize, detail: String| ClientError::Truncated {
            status: Some(status),
            body_len,
            detail,
        };
        let chunked = resp
            .header("transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        if chunked {
            for _ in 0..1_000_000 {
                let line = match self.read_line().await {
                    Ok(Some(l)) => l,
                    Ok(None) => return Err(truncated(resp.body.len(), "EOF at chunk size".into())),
                    Err(e) => return Err(truncated(resp.body.len(), format!("{e} at chunk size"))),
                };
                let size_str = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_str, 16)
                    .map_err(|_| ClientError::Malformed(format!("chunk size {line:?}")))?;
                if size == 0 {
                    for _ in 0..1000 {
                        match self.read_line().await {
                            Ok(Some(l)) if l.is_empty() => return Ok(resp),
                            Ok(Some(l)) => {
                                if let Some((k, v)) = l.split_once(':') {
                                    resp.trailers.push((
                                        k.trim().to_ascii_lowercase(),
                                        v.trim().to_string(),
                                    ));
                                }
                            }
                            Ok(None) => {
                                return Err(truncated(resp.body.len(), "EOF in trailers".into()));
                            }
                            Err(e) => {
                                return Err(truncated(resp.body.len(), format!("{e} in trailers")));
                            }
                        }
                    }
                    return Err(ClientError::Malformed("too many trailer lines".into()));
                }
                match self.read_n(size + 2).await {
                    Ok(mut data) => {
                        data.truncate(size);
                        resp.body.extend_from_slice(&data);
                    }
                    Err((e, partial)) => {
                        let got = partial.len().min(size);
                        return Err(truncated(resp.body.len() + got, format!("{e} in chunk")));
                    }
                }
            }
            return Err(ClientError::Malformed("too many chunks".into()));
        }
        if let Some(cl) = resp.header("content-length") {
            let n: usize = cl
                .parse()
                .map_err(|_| ClientError::Malformed(format!("content-length {cl:?}")))?;
            match self.read_n(n).await {
                Ok(data) => resp.body = data,
                Err((e, partial)) => {
                    return Err(truncated(
                        partial.len(),
                        format!("{e} after {} of {n} body bytes", partial.len()),
                    ));
                }
            }
            return Ok(resp);
        }
        // Close-delimited body.
        loop {
            match self.fill().await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(truncated(
                        self.buf.len(),
                        format!("{e} in close-delimited body"),
                    ));
                }
            }
        }
        resp.body = std::mem::take(&mut self.buf);
        Ok(resp)
    }

    /// Waits up to `timeout` for the peer to close (EOF or reset). Any bytes
    /// received meanwhile are discarded. True if closed.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {
                    if self.buf.len() > 1 << 20 {
                        self.buf.clear();
                    }
                }
            }
        }
    }

    /// True if nothing (neither data nor EOF) arrives within `wait`.
    pub async fn stays_open_for(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.fill()).await {
            Err(_) => true,
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
        }
    }

    /// Bytes received but not consumed yet.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// One request on a fresh connection.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, ClientError> {
    let mut c = RawConn::try_connect(addr).await?;
    c.request(method, path, headers, body).await
}

/// GET on a fresh connection; panics on a transport error.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], b"")
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e:?}"))
}

/// Admin GET: (status, body). Panics on a transport error.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http_get(addr, path).await;
    (r.status, r.text())
}

/// Admin GET: (status, body) or None on a transport error.
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[], b"")
        .await
        .ok()
        .map(|r| (r.status, r.text()))
}

/// Admin POST with an empty body: (status, body).
pub async fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http_request(addr, "POST", path, &[], b"")
        .await
        .unwrap_or_else(|e| panic!("POST http://{addr}{path} failed: {e:?}"));
    (r.status, r.text())
}

/// Polls GET /ready until 200 (`serving`). Panics after `timeout`.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let r = try_get(admin, "/ready").await;
        if matches!(&r, Some((200, _))) {
            return;
        }
        last = r.or(last);
        if Instant::now() >= deadline {
            panic!("/ready did not become 200 within {timeout:?}; last answer {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls GET `path` on admin until `pred(status, body)`; returns how long it took.
pub async fn wait_admin(
    admin: SocketAddr,
    path: &str,
    pred: impl Fn(u16, &str) -> bool,
    timeout: Duration,
) -> Result<Duration, Option<(u16, String)>> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let r = try_get(admin, path).await;
        if let Some((s, b)) = &r {
            if pred(*s, b) {
                return Ok(start.elapsed());
            }
        }
        last = r.or(last);
        if start.elapsed() >= timeout {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

pub async fn metrics_text(admin: SocketAddr) -> String {
    let (status, body) = get(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The value of exactly `series` (e.g. `lameduck_connections_active{protocol="http1"}`).
pub fn parse_metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })
}

/// Sum of all series of metric `name` (any labels).
pub fn parse_metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with(' ') || rest.starts_with('{') {
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}').map(|(_, v)| v)
            } else {
                Some(rest)
            };
            if let Some(v) = value
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
            {
                sum += v;
                found = true;
            }
        }
    }
    found.then_some(sum)
}

/// Scrapes /metrics and returns the value of `series`; panics if absent.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = metrics_text(admin).await;
    parse_metric(&text, series)
        .unwrap_or_else(|| panic!("metric series {series} not found in /metrics:\n{text}"))
}

/// Like [`metric`] but 0 when the series is absent (labelled counters that
/// never fired are often not exported).
pub async fn metric_or_zero(admin: SocketAddr, series: &str) -> f64 {
    parse_metric(&metrics_text(admin).await, series).unwrap_or(0.0)
}

/// Polls /metrics until `read(text)` satisfies `pred`; returns the last value.
async fn wait_metrics_until(
    admin: SocketAddr,
    what: &str,
    read: impl Fn(&str) -> Option<f64>,
    pred: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some((200, text)) = try_get(admin, "/metrics").await {
            last = read(&text);
            if let Some(v) = last.filter(|v| pred(*v)) {
                return v;
            }
        }
        if Instant::now() >= deadline {
            panic!("{what} did not reach the expected value within {timeout:?}; last {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls /metrics until `series` satisfies `pred`; returns the last value.
pub async fn wait_metric(
    admin: SocketAddr,
    series: &str,
    pred: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let what = format!("metric {series}");
    wait_metrics_until(admin, &what, |t| parse_metric(t, series), pred, timeout).await
}

/// Polls /metrics until the sum of all series of `name` satisfies `pred`.
pub async fn wait_metric_sum(
    admin: SocketAddr,
    name: &str,
    pred: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let what = format!("sum of {name}");
    wait_metrics_until(admin, &what, |t| parse_metric_sum(t, name), pred, timeout).await
}

/// Polls /metrics until the sum of all `lameduck_connections_active` series is 0.
pub async fn wait_no_active_connections(admin: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some((200, text)) = try_get(admin, "/metrics").await {
            last = parse_metric_sum(&text, "lameduck_connections_active");
            if last == Some(0.0) {
                return;
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "lameduck_connections_active did not return to 0 within {timeout:?}; last sum {last:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// In-process upstreams
// ---------------------------------------------------------------------------

pub type TestBody = UnsyncBoxBody<Bytes, io::Error>;

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| v.to_string())
        })
    })
}

fn header_pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect()
}

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The proxy's end of the upstream connection that carried the request.
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

type Log = Arc<Mutex<Vec<Recorded>>>;

fn record(log: &Log, peer: SocketAddr, req: &Request<Incoming>) {
    log.lock().unwrap().push(Recorded {
        peer,
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        version: format!("{:?}", req.version()),
        headers: header_pairs(req.headers()),
    });
}

/// HTTP/1.1 test app:
/// - `GET /` 200 "hello from the test app\n"
/// - `GET /slow?ms=N` sleeps N ms (default 3000) then 200 "slept N ms\n"
/// - `GET /headers` 200, request headers as "name: value\n" lines
/// - `GET /hang` never answers
/// - `GET /die` sends headers (content-length 100000) and 1000 bytes, then drops the socket
/// - `GET /bytes?n=N` N bytes of 'x'
/// - `POST /echo` echoes the body
/// - `GET /healthz` 200
/// - `GET /empty` 204 with no body; `GET /chunked` a body without a length
pub struct TestApp {
    pub addr: SocketAddr,
    log: Log,
    task: JoinHandle<()>,
}

async fn test_app_handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    log: Log,
) -> Result<Response<TestBody>, Infallible> {
    record(&log, peer, &req);
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/" => Response::new(full("hello from the test app\n")),
        "/healthz" => Response::new(full("ok\n")),
        "/empty" => Response::builder().status(204).body(full("")).unwrap(),
        "/chunked" => {
            let frames: Vec<Result<Frame<Bytes>, io::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"chunk one\n"))),
                Ok(Frame::data(Bytes::from_static(b"chunk two\n"))),
            ];
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        }
        "/slow" => {
            let ms: u64 = query_param(&req, "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(3000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(format!("slept {ms} ms\n")))
        }
        "/headers" => {
            let mut s = String::new();
            for (k, v) in header_pairs(req.headers()) {
                s.push_str(&format!("{k}: {v}\n"));
            }
            Response::new(full(s))
        }
        "/hang" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/die" => {
            let stream = futures_util::stream::unfold(0u8, |st| async move {
                match st {
                    0 => Some((Ok(Frame::data(Bytes::from(vec![b'x'; 1000]))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((Err(io::Error::other("test upstream dies mid-response")), 2))
                    }
                    _ => None,
                }
            });
            Response::builder()
                .header("content-length", "100000")
                .body(StreamBody::new(stream).boxed_unsync())
                .unwrap()
        }
        "/bytes" => {
            let n: usize = query_param(&req, "n")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Response::new(full(vec![b'x'; n]))
        }
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Response::new(full(body))
        }
        _ => Response::builder()
            .status(404)
            .body(full("not found\n"))
            .unwrap(),
    };
    Ok(resp)
}

/// A test app with a lameduck (given `extra` flags) in front of it, ready.
pub async fn app_behind_lameduck(extra: &[&str]) -> (TestApp, Lameduck) {
    let app = TestApp::start().await;
    let up = app.addr.to_string();
    let mut args = vec!["--upstream", up.as_str()];
    args.extend_from_slice(extra);
    let ld = Lameduck::spawn(&args);
    wait_ready(ld.admin_addr(), secs(10)).await;
    (app, ld)
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Binds exactly `addr` (e.g. a port reserved earlier with [`closed_port`]).
    pub async fn start_on(addr: SocketAddr) -> TestApp {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("test app cannot bind {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let log = log2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| test_app_handle(req, peer, log.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestApp { addr, log, task }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    /// The last request the app saw for `path`.
    pub fn last_request(&self, path: &str) -> Option<Recorded> {
        self.requests().into_iter().rev().find(|r| r.path == path)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Cleartext HTTP/2 (prior knowledge) upstream, gRPC-style:
/// - `POST <any>`: 200 `content-type: application/grpc`, echoes the body,
///   then trailers `grpc-status: 0`, `grpc-message: ok`.
/// - `GET <any>`: 200 "hello over h2\n".
pub struct H2App {
    pub addr: SocketAddr,
    log: Log,
    task: JoinHandle<()>,
}

async fn h2_app_handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    log: Log,
) -> Result<Response<TestBody>, Infallible> {
    record(&log, peer, &req);
    if req.method() == hyper::Method::POST {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, io::Error>> =
            vec![Ok(Frame::data(body)), Ok(Frame::trailers(trailers))];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap());
    }
    Ok(Response::new(full("hello over h2\n")))
}

impl H2App {
    pub async fn start() -> H2App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let log = log2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| h2_app_handle(req, peer, log.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        H2App { addr, log, task }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for H2App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// WebSocket echo upstream (text and binary messages are echoed).
pub struct WsEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl WsEcho {
    pub async fn start() -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    // Bounded by the peer: ends on close / EOF.
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        WsEcho { addr, task }
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoMode {
    /// Reads until EOF, then writes everything back and shuts down its write side.
    AfterEof,
    /// Echoes as data arrives; on EOF shuts down its write side.
    Streaming,
}

/// Raw TCP echo upstream.
pub struct TcpEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start(mode: EchoMode) -> TcpEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    match mode {
                        EchoMode::AfterEof => {
                            let mut data = Vec::new();
                            if s.read_to_end(&mut data).await.is_ok() {
                                let _ = s.write_all(&data).await;
                                let _ = s.shutdown().await;
                            }
                        }
                        EchoMode::Streaming => {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                match s.read(&mut buf).await {
                                    Ok(0) => {
                                        let _ = s.shutdown().await;
                                        break;
                                    }
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                });
            }
        });
        TcpEcho { addr, task }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

/// Short alias for durations in milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Short alias for durations in seconds.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Asserts `d` lies in [lo, hi].
#[track_caller]
pub fn assert_between(d: Duration, lo: Duration, hi: Duration, what: &str) {
    assert!(
        d >= lo && d <= hi,
        "{what}: took {d:?}, expected between {lo:?} and {hi:?}"
    );
}
