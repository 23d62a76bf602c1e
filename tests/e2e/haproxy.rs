//! A real HAProxy in front of the pods: generated config, foreground process,
//! stats (CSV) to see what its health checks decided, and its log.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// HTTP/1.1 from clients, HTTP/1.1 to the lameducks.
    Http1,
    /// h2c (prior knowledge) from clients (`bind ... proto h2`), h2 to the
    /// lameducks (`server ... proto h2`).
    Http2,
    /// `mode tcp` end to end.
    Tcp,
}

pub struct Backend {
    pub name: String,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The lameduck terminates TLS (--tls-cert): HAProxy connects with
    /// `ssl verify required` against this CA (the certificate names
    /// `localhost`); the health check stays cleartext, on the admin port.
    pub tls_ca: Option<PathBuf>,
}

pub struct Haproxy {
    child: Option<Child>,
    pub front: SocketAddr,
    pub stats: SocketAddr,
    pub log_path: PathBuf,
    pub cfg_path: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn config(front: Front, listen: SocketAddr, stats: SocketAddr, backends: &[Backend]) -> String {
    let tcp = front == Front::Tcp;
    let mut c = String::new();
    // - nbthread 1: 2 cores are shared by the client, HAProxy, 2 lameducks, 2 apps.
    // - Logs to stdout (captured into a file) for post-mortems of failed requests.
    // - No `retry-on`: a request HAProxy could not deliver must show up as a failure.
    //   (HAProxy's default `retries 3` only covers failed *connects*, which never
    //   reach a lameduck's request handling.)
    // - No `option http-server-close`: keep-alive to the lameducks; `http-reuse`
    //   left at its default (safe).
    writeln!(
        c,
        "global\n    nbthread 1\n    maxconn 4000\n    no strict-limits\n    log stdout format raw local0 info\n"
    )
    .unwrap();
    writeln!(
        c,
        "defaults\n    mode {mode}\n    log global\n    option {logopt}\n    option dontlognull\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout tunnel 60s\n    timeout http-keep-alive 60s\n    timeout http-request 10s\n    timeout check 2s\n",
        mode = if tcp { "tcp" } else { "http" },
        logopt = if tcp { "tcplog" } else { "httplog" },
    )
    .unwrap();
    let bind_proto = if front == Front::Http2 {
        " proto h2"
    } else {
        ""
    };
    writeln!(
        c,
        "frontend fe\n    bind {listen}{bind_proto}\n    default_backend be\n"
    )
    .unwrap();
    writeln!(
        c,
        "backend be\n    balance roundrobin\n    option httpchk GET /ready\n    http-check expect status 200"
    )
    .unwrap();
    if !tcp {
        // Which pod answered: lets the test account for every request per pod.
        writeln!(c, "    http-response set-header x-served-by %[srv_name]").unwrap();
    }
    for b in backends {
        // The check goes to lameduck's admin port; with `proto h2` the check
        // must still speak HTTP/1 (the admin server is HTTP/1 only).
        let mut proto = if front == Front::Http2 {
            " proto h2 check-proto h1".to_string()
        } else {
            String::new()
        };
        if let Some(ca) = &b.tls_ca {
            write!(
                proto,
                " ssl verify required ca-file {} verifyhost localhost sni str(localhost) no-check-ssl",
                ca.display()
            )
            .unwrap();
        }
        writeln!(
            c,
            "    server {} {} check port {} inter 200ms fall 1 rise 2{proto}",
            b.name,
            b.proxy,
            b.admin.port()
        )
        .unwrap();
    }
    writeln!(
        c,
        "\nlisten stats\n    mode http\n    bind {stats}\n    stats enable\n    stats uri /stats\n    stats refresh 1s\n"
    )
    .unwrap();
    c
}

impl Haproxy {
    /// Writes the config into a tempdir, checks it (`-c`), runs `haproxy -db`
    /// and waits until every backend server is UP.
    pub async fn start(front: Front, backends: &[Backend]) -> Haproxy {
        let bin = require_tool("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr(ip(1));
        let stats = free_addr(ip(1));
        let cfg = config(front, listen, stats, backends);
        let cfg_path = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, &cfg).unwrap();
        let check = Command::new(&bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg_path)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy rejected the generated config:\n{cfg}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log_path = dir.path().join("haproxy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut h = Haproxy {
            child: Some(child),
            front: listen,
            stats,
            log_path,
            cfg_path,
            _dir: dir,
        };
        for b in backends {
            h.wait_server(&b.name, "UP", secs(10)).await;
        }
        h
    }

    /// `(server name, status)` for the servers of backend `be`.
    pub async fn server_states(&self) -> Result<Vec<(String, String)>, String> {
        let r = http_get(self.stats, "/stats;csv").await?;
        if r.status != 200 {
            return Err(format!("stats answered {}", r.status));
        }
        let text = r.text();
        let mut lines = text.lines();
        let header = lines.next().ok_or("empty stats")?;
        let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| cols.iter().position(|c| *c == name);
        let (px, sv, st) = (
            col("pxname").ok_or("no pxname")?,
            col("svname").ok_or("no svname")?,
            col("status").ok_or("no status")?,
        );
        Ok(lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == "be" && f[sv] != "BACKEND" && f[sv] != "FRONTEND")
            .map(|f| (f[sv].to_string(), f[st].to_string()))
            .collect())
    }

    pub async fn server_state(&self, server: &str) -> Option<String> {
        self.server_states()
            .await
            .ok()?
            .into_iter()
            .find(|(n, _)| n == server)
            .map(|(_, s)| s)
    }

    /// Waits until HAProxy reports `server` with exactly `state` ("UP", "DOWN").
    pub async fn wait_server(&mut self, server: &str, state: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last = None;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "haproxy exited ({st}); log:\n{}",
                        tail_file(&self.log_path, 50)
                    );
                }
            }
            last = self.server_state(server).await.or(last);
            if last.as_deref() == Some(state) {
                return start.elapsed();
            }
            if Instant::now() >= deadline {
                panic!(
                    "haproxy did not mark {server} {state} within {timeout:?} (last {last:?}); log:\n{}",
                    tail_file(&self.log_path, 50)
                );
            }
            tokio::time::sleep(ms(25)).await;
        }
    }

    /// Log lines that mention anything but a 200 / a clean session end.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log_text();
            let interesting: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" 200 ") || l.contains("Server") || l.contains("--"))
                .collect();
            let from = interesting.len().saturating_sub(80);
            eprintln!(
                "---- haproxy config ----\n{}\n---- haproxy log (non-200 / events, last 80 of {}) ----\n{}\n---- end ----",
                std::fs::read_to_string(&self.cfg_path).unwrap_or_default(),
                interesting.len(),
                interesting[from..].join("\n")
            );
        }
    }
}
