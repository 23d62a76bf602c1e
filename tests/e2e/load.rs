//! The load generator: N tokio workers, each with its own client connection
//! (HTTP/1.1 keep-alive, HTTP/1.1 one connection per request, h2c, or raw
//! HTTP/1.0-style one-request TCP connections). Bounded in time and in count.
//! Every request is recorded (times relative to a shared epoch, the pod that
//! answered, and whether it was a success).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientProto {
    H1KeepAlive,
    H1Close,
    H2,
    /// `GET <path> HTTP/1.0`, read to EOF, one request per TCP connection.
    Tcp10,
}

#[derive(Clone, Debug)]
pub struct Job {
    pub path: String,
    pub expect: Vec<u8>,
}

impl Job {
    pub fn root() -> Job {
        Job {
            path: "/".into(),
            expect: b"hello from the demo app\n".to_vec(),
        }
    }

    pub fn slow(ms: u64) -> Job {
        Job {
            path: format!("/slow?ms={ms}"),
            expect: format!("slept {ms} ms\n").into_bytes(),
        }
    }

    pub fn bytes(n: usize) -> Job {
        Job {
            path: format!("/bytes?n={n}"),
            expect: vec![b'x'; n],
        }
    }
}

#[derive(Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub proto: ClientProto,
    pub workers: usize,
    pub duration: Duration,
    pub max_requests: u64,
    /// Worker `i` runs `jobs[i % jobs.len()]` in a loop.
    pub jobs: Vec<Job>,
    pub request_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub worker: usize,
    pub path: String,
    /// Since the epoch given to [`Load::start`].
    pub start: Duration,
    pub end: Duration,
    /// `x-served-by` (set by HAProxy), when there was a response.
    pub server: Option<String>,
    pub status: Option<u16>,
    /// None = success (200 and the expected body).
    pub error: Option<String>,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    connections: AtomicU64,
    /// A keep-alive connection found closed while idle, without the server
    /// having announced `connection: close`.
    idle_closes: AtomicU64,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    workers: Vec<JoinHandle<Vec<Record>>>,
    pub epoch: Instant,
}

pub struct Report {
    pub records: Vec<Record>,
    pub connections: u64,
    pub idle_closes: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn failures(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| !r.ok()).collect()
    }

    pub fn served_by(&self, server: &str) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| r.server.as_deref() == Some(server))
            .collect()
    }

    /// A readable list of the first `n` failures, times relative to `t0`.
    pub fn describe_failures(&self, t0: Duration, n: usize) -> String {
        let f = self.failures();
        let mut s = format!("{} failed of {} requests", f.len(), self.records.len());
        for r in f.iter().take(n) {
            s.push_str(&format!(
                "\n  worker {} {} started {:+.3}s ended {:+.3}s (rel. SIGTERM) server {:?} status {:?}: {}",
                r.worker,
                r.path,
                r.start.as_secs_f64() - t0.as_secs_f64(),
                r.end.as_secs_f64() - t0.as_secs_f64(),
                r.server,
                r.status,
                r.error.as_deref().unwrap_or("")
            ));
        }
        s
    }
}

impl Load {
    pub fn start(cfg: LoadConfig, epoch: Instant) -> Load {
        assert!(!cfg.jobs.is_empty());
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let cfg = Arc::new(cfg);
        let workers = (0..cfg.workers)
            .map(|i| {
                let (cfg, stop, counters) = (cfg.clone(), stop.clone(), counters.clone());
                tokio::spawn(async move { worker(i, cfg, stop, counters, epoch).await })
            })
            .collect();
        Load {
            stop,
            counters,
            workers,
            epoch,
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the workers (they finish the request in hand) and collects.
    pub async fn finish(self) -> Report {
        self.stop();
        let mut records = Vec::new();
        for w in self.workers {
            records.extend(w.await.expect("load worker panicked"));
        }
        records.sort_by_key(|r| r.start);
        Report {
            records,
            connections: self.counters.connections.load(Ordering::Relaxed),
            idle_closes: self.counters.idle_closes.load(Ordering::Relaxed),
            elapsed: self.epoch.elapsed(),
        }
    }
}

type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

enum Conn {
    None,
    H1(H1Sender),
    H2(H2Sender),
}

async fn connect_tcp(target: SocketAddr) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn open(cfg: &LoadConfig, counters: &Counters) -> Result<Conn, String> {
    let tcp = connect_tcp(cfg.target).await?;
    counters.connections.fetch_add(1, Ordering::Relaxed);
    match cfg.proto {
        ClientProto::H2 => {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Conn::H2(send))
        }
        _ => {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Conn::H1(send))
        }
    }
}

/// One request on `conn` (opening it if needed). Returns (status, server,
/// server-announced close, error).
async fn one_request(
    cfg: &LoadConfig,
    counters: &Counters,
    conn: &mut Conn,
    job: &Job,
) -> (Option<u16>, Option<String>, Option<String>) {
    if cfg.proto == ClientProto::Tcp10 {
        return tcp10_request(cfg, counters, job).await;
    }
    // A keep-alive connection the server closed while idle: note it, reconnect.
    match conn {
        Conn::H1(s) => {
            if s.ready().await.is_err() {
                counters.idle_closes.fetch_add(1, Ordering::Relaxed);
                *conn = Conn::None;
            }
        }
        Conn::H2(s) => {
            if s.ready().await.is_err() {
                counters.idle_closes.fetch_add(1, Ordering::Relaxed);
                *conn = Conn::None;
            }
        }
        Conn::None => {}
    }
    if matches!(conn, Conn::None) {
        match open(cfg, counters).await {
            Ok(c) => *conn = c,
            Err(e) => return (None, None, Some(e)),
        }
    }
    let close = cfg.proto == ClientProto::H1Close;
    let resp = match conn {
        Conn::H1(s) => {
            let mut b = Request::get(job.path.as_str()).header("host", cfg.target.to_string());
            if close {
                b = b.header("connection", "close");
            }
            s.send_request(b.body(Empty::new()).unwrap()).await
        }
        Conn::H2(s) => {
            let uri = format!("http://{}{}", cfg.target, job.path);
            s.send_request(Request::get(uri).body(Empty::new()).unwrap())
                .await
        }
        Conn::None => unreachable!(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            *conn = Conn::None;
            return (None, None, Some(format!("request: {e:?}")));
        }
    };
    let status = resp.status().as_u16();
    let server = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let announced_close = resp
        .headers()
        .get("connection")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
    let body = resp.into_body().collect().await;
    if close || announced_close {
        *conn = Conn::None;
    }
    let body = match body {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            *conn = Conn::None;
            return (
                Some(status),
                server,
                Some(format!("body after status {status}: {e:?}")),
            );
        }
    };
    let error = if status != 200 {
        Some(format!(
            "status {status}, body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    } else if body[..] != job.expect[..] {
        Some(format!(
            "unexpected body ({} bytes, expected {}): {:?}",
            body.len(),
            job.expect.len(),
            String::from_utf8_lossy(&body[..body.len().min(100)])
        ))
    } else {
        None
    };
    (Some(status), server, error)
}

async fn tcp10_request(
    cfg: &LoadConfig,
    counters: &Counters,
    job: &Job,
) -> (Option<u16>, Option<String>, Option<String>) {
    let mut s = match connect_tcp(cfg.target).await {
        Ok(s) => s,
        Err(e) => return (None, None, Some(e)),
    };
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let req = format!("GET {} HTTP/1.0\r\nhost: e2e\r\n\r\n", job.path);
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return (None, None, Some(format!("write: {e}")));
    }
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf).await {
        return (
            None,
            None,
            Some(format!("read after {} bytes: {e}", buf.len())),
        );
    }
    let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (
            None,
            None,
            Some(format!(
                "no complete response head in {} bytes: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            )),
        );
    };
    let head = String::from_utf8_lossy(&buf[..pos]).to_string();
    let status: Option<u16> = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let body = &buf[pos + 4..];
    let error = if status != Some(200) || !head.starts_with("HTTP/1.") {
        Some(format!("response head {head:?}"))
    } else if body != &job.expect[..] {
        Some(format!("unexpected body of {} bytes", body.len()))
    } else {
        None
    };
    (status, None, error)
}

async fn worker(
    i: usize,
    cfg: Arc<LoadConfig>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Vec<Record> {
    let job = cfg.jobs[i % cfg.jobs.len()].clone();
    let until = Instant::now() + cfg.duration;
    let mut records = Vec::new();
    let mut conn = Conn::None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        if counters.issued.fetch_add(1, Ordering::Relaxed) >= cfg.max_requests {
            break;
        }
        let start = epoch.elapsed();
        let (status, server, error) = match tokio::time::timeout(
            cfg.request_timeout,
            one_request(&cfg, &counters, &mut conn, &job),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                conn = Conn::None;
                (
                    None,
                    None,
                    Some(format!(
                        "no complete response within {:?}",
                        cfg.request_timeout
                    )),
                )
            }
        };
        if error.is_some() {
            // No tight loop against a refusing or failing peer.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        records.push(Record {
            worker: i,
            path: job.path.clone(),
            start,
            end: epoch.elapsed(),
            server,
            status,
            error,
        });
    }
    records
}
