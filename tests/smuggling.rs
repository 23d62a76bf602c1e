//! Request smuggling, differentially: lameduck in front of a strict, independent
//! HTTP/1.1 parser (tests/strict_app/strict_app.py, h11), fed the raw requests of
//! tests/http1_cases.json on lameduck's own HTTP/1 path and on the hyper path (a
//! connection handed to hyper first), HTTP/2 requests that are malformed or carry
//! connection-specific headers, and generated mutations of valid heads (proptest).
//!
//! The invariants, checked on what the app recorded, for every row on every path:
//! - no forwarded request carries both Content-Length and Transfer-Encoding;
//! - the app's parser never rejected what lameduck sent it (a message cut off by
//!   a closed connection is an aborted request, not a rejected one);
//! - the app received exactly as many requests as the client got non-error
//!   responses, in order, and each response is the one for its own request;
//! - a canary on a fresh connection afterwards gets its own response (no response
//!   left queued on a pooled app connection).
//!
//! Plus each row's expected outcome (the `lameduck` column). All rows run and the
//! test reports every failing row at once.

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// How long the client waits for the first response to the row's bytes.
const FIRST_RESPONSE: Duration = Duration::from_secs(3);
/// Once a response arrived: how long it waits for more (pipelined ones).
const MORE_RESPONSES: Duration = Duration::from_millis(250);
/// A request lameduck's own path hands to hyper (`Expect`), answered at once
/// and keeping the connection open, so the row's bytes are parsed by hyper.
const HANDOFF_PREFIX: &[u8] =
    b"GET /prefix HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n";

// ---------------------------------------------------------------------------
// The strict app
// ---------------------------------------------------------------------------

static H11: Once = Once::new();

/// The same install as scripts/test.sh, so `cargo test --test smuggling` works alone.
fn ensure_h11() {
    H11.call_once(|| {
        let have = Command::new("python3")
            .args(["-c", "import h11"])
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            let ok = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "h11==0.16.0"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "python3 -m pip install h11==0.16.0 failed");
        }
    });
}

struct StrictApp {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl StrictApp {
    fn start() -> StrictApp {
        ensure_h11();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/strict_app/strict_app.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("0")
            .arg(&log)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 strict_app.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("strict app printed {line:?}, not a port"));
        StrictApp {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _dir: dir,
        }
    }

    /// Every record so far, in the order the app wrote them.
    fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for StrictApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One parsed request the app recorded.
#[derive(Debug, Clone)]
struct AppRequest {
    tag: String,
    conn: u64,
    target: String,
    headers: Vec<(String, String)>,
    cl_and_te: bool,
    body: Vec<u8>,
    content_length: Vec<String>,
}

impl AppRequest {
    fn from(v: &Value) -> Option<AppRequest> {
        let conn = v["conn"].as_u64()?;
        let seq = v["seq"].as_u64()?;
        let headers = v["headers"]
            .as_array()?
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap_or("").to_ascii_lowercase(),
                    p[1].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        Some(AppRequest {
            tag: format!("{conn}.{seq}"),
            conn,
            target: v["target"].as_str()?.to_string(),
            headers,
            cl_and_te: v["cl_and_te"].as_bool().unwrap_or(false),
            body: b64(v["body_b64"].as_str().unwrap_or("")),
            content_length: v["content_length"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn b64(s: &str) -> Vec<u8> {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let Some(v) = ALPHA.iter().position(|&a| a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn short(&self) -> String {
        format!(
            "{} seq={:?} target={:?} body={:?}",
            self.status,
            self.header("x-app-seq"),
            self.header("x-app-target"),
            String::from_utf8_lossy(&self.body[..self.body.len().min(60)])
        )
    }
}

#[derive(Debug, Default)]
struct Outcome {
    /// Final responses, in order (1xx left out).
    responses: Vec<Resp>,
    interim: usize,
    /// The server closed the connection (EOF or reset).
    closed: bool,
    /// Bytes that did not form a response.
    garbage: Vec<u8>,
}

/// Splits one complete response off the front of `buf`, or None if incomplete.
/// `Err` for bytes that are no response.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(Resp, usize)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = res.code.unwrap_or(0);
    let hs: Vec<(String, Vec<u8>)> = res
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let get = |n: &str| {
        hs.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
    };
    let rest = &buf[head_len..];
    let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
        (Vec::new(), 0)
    } else if get("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        match dechunk(rest)? {
            Some(x) => x,
            None => return Ok(None),
        }
    } else if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().map_err(|_| ())?;
        if rest.len() < n {
            return Ok(None);
        }
        (rest[..n].to_vec(), n)
    } else if eof {
        (rest.to_vec(), rest.len())
    } else {
        return Ok(None);
    };
    Ok(Some((
        Resp {
            status,
            headers: hs,
            body,
        },
        head_len + used,
    )))
}

fn dechunk(mut b: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
    let total = b.len();
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&b[..eol]).map_err(|_| ())?;
        let size =
            usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).map_err(|_| ())?;
        b = &b[eol + 2..];
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                b = &b[eol + 2..];
                if eol == 0 {
                    return Ok(Some((out, total - b.len())));
                }
            }
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.expect("connect to lameduck"),
            buf: Vec::new(),
            closed: false,
        }
    }

    /// Reads until one more final response is complete, the connection closes
    /// or `wait` passes without one.
    async fn next_response(&mut self, wait: Duration, out: &mut Outcome) -> Option<Resp> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match parse_response(&self.buf, self.closed) {
                Ok(Some((resp, used))) => {
                    self.buf.drain(..used);
                    if (100..200).contains(&resp.status) {
                        out.interim += 1;
                        continue;
                    }
                    return Some(resp);
                }
                Ok(None) => {}
                Err(()) => {
                    out.garbage = std::mem::take(&mut self.buf);
                    return None;
                }
            }
            if self.closed {
                if !self.buf.is_empty() {
                    out.garbage = std::mem::take(&mut self.buf);
                }
                return None;
            }
            let mut tmp = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    out.closed = true;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Sends `bytes` and collects every response to them.
    async fn send_and_collect(&mut self, bytes: &[u8], first_wait: Duration) -> Outcome {
        let mut out = Outcome::default();
        if self.stream.write_all(bytes).await.is_err() {
            out.closed = true;
            return out;
        }
        let mut wait = first_wait;
        while let Some(resp) = self.next_response(wait, &mut out).await {
            out.responses.push(resp);
            wait = MORE_RESPONSES;
        }
        // Was it closed right after the last response?
        if !self.closed && !out.responses.is_empty() {
            let mut probe = Outcome::default();
            if let Some(extra) = self.next_response(MORE_RESPONSES, &mut probe).await {
                out.responses.push(extra);
            }
            out.closed |= probe.closed;
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Cases and checks
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Case {
    name: String,
    bytes: Vec<u8>,
    /// forward | refuse | bad_gateway | any (generated: invariants only)
    expect: String,
    /// Where hyper's HTTP/1 parser (after a hand-off) does something else
    /// that is still safe (the `hyper` column, with its reason in `hyper_why`).
    expect_hyper: Option<String>,
    app_requests: Option<usize>,
    body_error: bool,
    row: Value,
}

fn latin1_bytes(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).expect("bytes are U+0000..U+00FF"))
        .collect()
}

fn load_cases() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/http1_cases.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Case {
            name: r["name"].as_str().unwrap().to_string(),
            bytes: latin1_bytes(r["bytes"].as_str().unwrap()),
            expect: r["lameduck"].as_str().unwrap().to_string(),
            expect_hyper: r["hyper"].as_str().map(str::to_string),
            app_requests: r["app_requests"].as_u64().map(|n| n as usize),
            body_error: r["body_error"].as_bool().unwrap_or(false),
            row: r.clone(),
        })
        .collect()
}

impl Case {
    fn expect_on(&self, path: Path1) -> &str {
        match (path, &self.expect_hyper) {
            (Path1::Hyper, Some(hyper)) => hyper,
            _ => &self.expect,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path1 {
    Own,
    Hyper,
}

impl Path1 {
    fn name(self) -> &'static str {
        match self {
            Path1::Own => "own",
            Path1::Hyper => "hyper",
        }
    }
}

struct Harness {
    app: StrictApp,
    ld: Lameduck,
}

const HANDOFF_LOG: &str = "connection continues on hyper";

impl Harness {
    async fn start() -> Harness {
        let app = StrictApp::start();
        let up = app.addr.to_string();
        let ld = Lameduck::spawn(&[
            "--upstream",
            &up,
            "--header-read-timeout",
            "5s",
            "--log-level",
            "info,lameduck::proxy::http=debug",
        ]);
        wait_ready(ld.admin_addr(), secs(10)).await;
        Harness { app, ld }
    }

    fn handoffs(&self) -> usize {
        self.ld.logs_with_message(HANDOFF_LOG).len()
    }

    /// Runs one case on one path; every broken invariant or expectation is
    /// one string in the result.
    async fn run(&self, case: &Case, path: Path1, first_wait: Duration) -> Vec<String> {
        let mut fails = Vec::new();
        let proxy = self.ld.proxy_addr();
        let before = self.app.records().len();
        let handoffs_before = self.handoffs();

        let mut client = Client::connect(proxy).await;
        if path == Path1::Hyper {
            let mut o = Outcome::default();
            client.stream.write_all(HANDOFF_PREFIX).await.unwrap();
            match client.next_response(FIRST_RESPONSE, &mut o).await {
                Some(r)
                    if r.status == 200
                        && r.header("x-app-target").as_deref() == Some("/prefix") => {}
                other => fails.push(format!("handoff prefix not answered by the app: {other:?}")),
            }
            // The log line may trail the response by a moment.
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.handoffs() == handoffs_before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if self.handoffs() == handoffs_before {
                fails.push("the prefix did not hand the connection to hyper".into());
            }
        }
        let outcome = client.send_and_collect(&case.bytes, first_wait).await;
        drop(client);

        // Canaries: a fresh connection, two requests on it.
        let tag = format!("{}-{}", case.name, path.name());
        let mut canary = Client::connect(proxy).await;
        let c1 = format!("/canary?{tag}");
        let c2 = format!("/canary2?{tag}");
        let mut canary_out = Outcome::default();
        let mut canaries = Vec::new();
        for target in [&c1, &c2] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n");
            canary.stream.write_all(req.as_bytes()).await.unwrap();
            canaries.push((
                target.clone(),
                canary.next_response(FIRST_RESPONSE, &mut canary_out).await,
            ));
        }
        drop(canary);
        // Records of aborted messages arrive when lameduck closes the app
        // connection; give them a moment.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let records: Vec<Value> = self.app.records()[before..].to_vec();

        // --- invariants
        let mut row_reqs = Vec::new();
        let mut bad_resp_reqs = Vec::new();
        let mut all_reqs = Vec::new();
        let mut truncated = Vec::new();
        for r in &records {
            if let Some(err) = r.get("parse_error") {
                if r["truncated"].as_bool() == Some(true) {
                    truncated.push(err.to_string());
                } else {
                    fails.push(format!(
                        "INVARIANT the app's parser rejected what lameduck sent: {err}"
                    ));
                }
                continue;
            }
            let Some(req) = AppRequest::from(r) else {
                fails.push(format!("unreadable app record {r}"));
                continue;
            };
            if req.cl_and_te {
                fails.push(format!(
                    "INVARIANT app got Content-Length and Transfer-Encoding: {} {:?}",
                    req.target, req.headers
                ));
            }
            // A complete request whose body disagrees with its own length.
            if let Some(cl) = req.content_length.first()
                && req.all("transfer-encoding").is_empty()
                && cl.parse::<usize>().ok() != Some(req.body.len())
            {
                fails.push(format!(
                    "INVARIANT app body {} bytes, Content-Length {cl}",
                    req.body.len()
                ));
            }
            // Framing or routing fields in trailers are never forwarded (RFC 9110 §6.5.1).
            for t in r["trailers"].as_array().into_iter().flatten() {
                let name = t[0].as_str().unwrap_or("").to_ascii_lowercase();
                if matches!(
                    name.as_str(),
                    "content-length" | "transfer-encoding" | "host"
                ) {
                    fails.push(format!(
                        "INVARIANT app got a {name} trailer on {}",
                        req.target
                    ));
                }
            }
            all_reqs.push(req.clone());
            if req.target.starts_with("/canary") || req.target == "/prefix" {
                continue;
            }
            if req.target.starts_with("/bad-response/") {
                bad_resp_reqs.push(req);
            } else {
                row_reqs.push(req);
            }
        }
        let ok: Vec<&Resp> = outcome
            .responses
            .iter()
            .filter(|r| r.status < 400)
            .collect();
        if ok.len() != row_reqs.len() {
            fails.push(format!(
                "INVARIANT app received {} request(s) {:?}, client got {} non-error response(s) {:?}",
                row_reqs.len(),
                row_reqs.iter().map(|r| &r.target).collect::<Vec<_>>(),
                ok.len(),
                outcome.responses.iter().map(Resp::short).collect::<Vec<_>>()
            ));
        }
        for (resp, req) in ok.iter().zip(&row_reqs) {
            if resp.header("x-app-seq").as_deref() != Some(req.tag.as_str())
                || resp.header("x-app-target").as_deref() != Some(req.target.as_str())
                || resp.body != format!("ok {}", req.tag).as_bytes()
            {
                fails.push(format!(
                    "INVARIANT response {} is not the one for app request {} {}",
                    resp.short(),
                    req.tag,
                    req.target
                ));
            }
        }
        for (target, resp) in &canaries {
            let Some(resp) = resp else {
                fails.push(format!("INVARIANT canary {target} got no response"));
                continue;
            };
            let rec = all_reqs.iter().find(|r| &r.target == target);
            let fine = resp.status == 200
                && resp.header("x-app-target").as_deref() == Some(target.as_str())
                && rec.is_some_and(|rec| {
                    resp.header("x-app-seq").as_deref() == Some(rec.tag.as_str())
                        && resp.body == format!("ok {}", rec.tag).as_bytes()
                });
            if !fine {
                fails.push(format!(
                    "INVARIANT canary {target} got someone else's response (leftover on a pooled connection?): {}",
                    resp.short()
                ));
            }
        }

        // --- the expected column
        let first = outcome.responses.first();
        let statuses: Vec<u16> = outcome.responses.iter().map(|r| r.status).collect();
        match case.expect_on(path) {
            "forward" => {
                let want = case.app_requests.unwrap_or(1);
                if row_reqs.len() != want || statuses.iter().any(|s| *s >= 400) {
                    fails.push(format!(
                        "EXPECTED forward ({want} app request(s), all answered): app got {}, client statuses {statuses:?}, closed {}",
                        row_reqs.len(),
                        outcome.closed
                    ));
                }
                if !truncated.is_empty() {
                    fails.push(format!(
                        "EXPECTED forward: app saw an aborted message: {truncated:?}"
                    ));
                }
                if let Some(req) = row_reqs.first() {
                    check_headers(&case.row, req, &mut fails);
                }
            }
            "refuse" => {
                let status_ok = match first {
                    Some(r) => r.status == 400,
                    // Closing without a response is allowed only once a response started.
                    None => false,
                };
                if !status_ok || !row_reqs.is_empty() {
                    fails.push(format!(
                        "EXPECTED refuse (400, app gets nothing): client statuses {statuses:?}, app got {:?}",
                        row_reqs.iter().map(|r| (&r.target, &r.headers)).collect::<Vec<_>>()
                    ));
                }
                if !case.body_error && !truncated.is_empty() {
                    fails.push(format!(
                        "EXPECTED refuse: the app saw part of the request: {truncated:?}"
                    ));
                }
                if !outcome.closed {
                    fails.push(
                        "EXPECTED refuse: the client connection stayed open after the 400".into(),
                    );
                }
            }
            "bad_gateway" => {
                if first.map(|r| r.status) != Some(502) {
                    fails.push(format!(
                        "EXPECTED 502 for a malformed app response: statuses {statuses:?} {:?}",
                        outcome
                            .responses
                            .iter()
                            .map(Resp::short)
                            .collect::<Vec<_>>()
                    ));
                }
                if bad_resp_reqs.len() != 1 {
                    fails.push(format!(
                        "EXPECTED the app to get the request once, got {}",
                        bad_resp_reqs.len()
                    ));
                }
                let canary_conns: Vec<u64> = all_reqs
                    .iter()
                    .filter(|r| r.target.starts_with("/canary"))
                    .map(|r| r.conn)
                    .collect();
                if let Some(bad) = bad_resp_reqs.first()
                    && canary_conns.contains(&bad.conn)
                {
                    fails.push(format!(
                        "EXPECTED the broken app connection {} not to be reused",
                        bad.conn
                    ));
                }
            }
            _ => {}
        }
        if !outcome.garbage.is_empty() {
            fails.push(format!(
                "client got bytes that are no response: {:?}",
                String::from_utf8_lossy(&outcome.garbage[..outcome.garbage.len().min(120)])
            ));
        }
        fails
    }
}

fn check_headers(row: &Value, req: &AppRequest, fails: &mut Vec<String>) {
    if let Some(body) = row["app_body"].as_str()
        && req.body != latin1_bytes(body)
    {
        fails.push(format!(
            "EXPECTED app body {body:?}, got {:?}",
            String::from_utf8_lossy(&req.body)
        ));
    }
    for name in row["app_must_not_have_headers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap();
        if !req.all(name).is_empty() {
            fails.push(format!(
                "EXPECTED no {name} at the app, got {:?}",
                req.all(name)
            ));
        }
    }
    for pair in row["app_must_have_headers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = pair[0].as_str().unwrap();
        let got = req.all(name);
        let fine = match pair[1].as_str() {
            None => !got.is_empty(),
            Some(v) => got.iter().any(|g| g.eq_ignore_ascii_case(v)),
        };
        if !fine {
            fails.push(format!(
                "EXPECTED {name}: {:?} at the app, got {got:?}",
                pair[1]
            ));
        }
    }
    for pair in row["app_header_must_not_contain"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (name, needle) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        if req.all(name).iter().any(|v| v.contains(needle)) {
            fails.push(format!(
                "EXPECTED the client's {name} {needle:?} removed, app got {:?}",
                req.all(name)
            ));
        }
    }
    for pair in row["app_header_counts"].as_array().into_iter().flatten() {
        let (name, n) = (
            pair[0].as_str().unwrap(),
            pair[1].as_u64().unwrap() as usize,
        );
        if req.all(name).len() != n {
            fails.push(format!(
                "EXPECTED {n} {name} line(s) at the app, got {:?}",
                req.all(name)
            ));
        }
    }
}

async fn run_rows(path: Path1) {
    let h = Harness::start().await;
    let cases = load_cases();
    assert!(
        cases.len() >= 40,
        "tests/http1_cases.json has {} rows",
        cases.len()
    );
    let mut report = Vec::new();
    for case in &cases {
        let fails = h.run(case, path, FIRST_RESPONSE).await;
        if !fails.is_empty() {
            report.push(format!(
                "[{}] {} ({}):\n    {}",
                path.name(),
                case.name,
                case.expect_on(path),
                fails.join("\n    ")
            ));
        }
    }
    assert!(
        report.is_empty(),
        "{} of {} rows failed on the {} path:\n{}",
        report.len(),
        cases.len(),
        path.name(),
        report.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_on_the_own_http1_path() {
    run_rows(Path1::Own).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_on_the_hyper_path() {
    run_rows(Path1::Hyper).await;
}

#[test]
fn the_case_list_covers_the_policy() {
    let cases = load_cases();
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "duplicate row {}", c.name);
        assert!(
            matches!(c.expect.as_str(), "forward" | "refuse" | "bad_gateway"),
            "{}: lameduck = {:?}",
            c.name,
            c.expect
        );
        assert!(
            c.row["rfc"].as_str().is_some_and(|s| !s.is_empty()),
            "{}: no rfc",
            c.name
        );
    }
    for required in [
        "connection-content-length-smuggle",
        "host-twice",
        "cl-and-te",
        "te-http10",
        "obs-fold",
        "chunk-size-overflow",
        "trailer-content-length",
        "bad-response-cl-te",
        "bare-lf-head",
    ] {
        assert!(names.contains(required), "row {required} missing");
    }
}

// ---------------------------------------------------------------------------
// Generated heads
// ---------------------------------------------------------------------------

mod generated {
    use super::*;
    use proptest::prelude::*;

    fn case_of(name: &str) -> impl Strategy<Value = String> {
        let name = name.to_string();
        prop_oneof![
            Just(name.to_ascii_lowercase()),
            Just(name.clone()),
            Just(name.to_ascii_uppercase()),
        ]
    }

    fn content_length() -> impl Strategy<Value = String> {
        (
            case_of("Content-Length"),
            prop_oneof![Just(""), Just(" ")],
            prop::sample::select(vec![
                "15",
                "5",
                "0",
                "15, 15",
                "5, 15",
                "+15",
                "015",
                " 15",
                "15 ",
                "0x0f",
                "-1",
                "99999999999999999999",
            ]),
        )
            .prop_map(|(n, ws, v)| format!("{n}{ws}: {v}\r\n"))
    }

    fn transfer_encoding() -> impl Strategy<Value = String> {
        (
            case_of("Transfer-Encoding"),
            prop::sample::select(vec![
                "chunked",
                "Chunked",
                " chunked",
                "chunked ",
                "chunked\x0b",
                "\tchunked",
                "gzip, chunked",
                "chunked, gzip",
                "identity",
                "xchunked",
                "\"chunked\"",
                "chunked, chunked",
                "chunked,",
            ]),
        )
            .prop_map(|(n, v)| format!("{n}: {v}\r\n"))
    }

    fn connection() -> impl Strategy<Value = String> {
        (
            case_of("Connection"),
            prop::collection::vec(
                prop::sample::select(vec![
                    "keep-alive",
                    "close",
                    "content-length",
                    "Content-Length",
                    "transfer-encoding",
                    "host",
                    "foo",
                    "te",
                    "upgrade",
                    "x-forwarded-for",
                ]),
                1..4,
            ),
            prop_oneof![Just(", "), Just(","), Just(" , ")],
        )
            .prop_map(|(n, toks, sep)| format!("{n}: {}\r\n", toks.join(sep)))
    }

    fn host() -> impl Strategy<Value = Vec<String>> {
        prop_oneof![
            6 => Just(vec!["Host: app\r\n".to_string()]),
            1 => Just(vec![]),
            1 => Just(vec!["Host: app\r\n".to_string(), "Host: evil\r\n".to_string()]),
            1 => Just(vec!["Host: app\r\n".to_string(), "host: app\r\n".to_string()]),
            1 => Just(vec!["Host:\r\n".to_string()]),
        ]
    }

    fn chunk_body() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec![
                "5",
                "05",
                "0x5",
                "5 ",
                " 5",
                "5;ext",
                "5;e=\"v\"",
                "5;e=v",
                "+5",
                "5;a@b",
            ]),
            prop_oneof![4 => Just("\r\n"), 1 => Just("\n")],
            prop::sample::select(vec!["", "X-T: 1\r\n", "Content-Length: 5\r\n"]),
        )
            .prop_map(|(size, eol, trailer)| format!("{size}{eol}hello\r\n0\r\n{trailer}\r\n"))
    }

    /// (bytes, use the hyper path)
    pub(super) fn request() -> impl Strategy<Value = (Vec<u8>, bool)> {
        (
            host(),
            prop::collection::vec(content_length(), 0..3),
            prop::collection::vec(transfer_encoding(), 0..3),
            prop::collection::vec(connection(), 0..3),
            prop_oneof![Just("1.1"), Just("1.1"), Just("1.0")],
            chunk_body(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_flat_map(
                |(host, cls, tes, conns, version, chunked_body, pipeline, hyper)| {
                    let mut lines = host;
                    lines.extend(cls);
                    lines.extend(tes);
                    lines.extend(conns);
                    lines.push("X-Other: 1\r\n".into());
                    (
                        Just(lines).prop_shuffle(),
                        Just(version),
                        Just(chunked_body),
                        Just(pipeline),
                        Just(hyper),
                    )
                },
            )
            .prop_map(|(lines, version, chunked_body, pipeline, hyper)| {
                let mut s = format!("POST /gen HTTP/{version}\r\n");
                for l in &lines {
                    s.push_str(l);
                }
                s.push_str("\r\n");
                let framed_chunked = lines
                    .iter()
                    .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding"));
                if framed_chunked {
                    s.push_str(&chunked_body);
                } else {
                    // Exactly 15 bytes, like the chunked body, so most
                    // length variants are complete.
                    s.push_str("hellohellohello");
                }
                if pipeline {
                    s.push_str("GET /gen2 HTTP/1.1\r\nHost: app\r\n\r\n");
                }
                (latin1_bytes(&s), hyper)
            })
    }
}

#[test]
fn generated_heads_keep_the_invariants() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(Harness::start());
    let config = proptest::test_runner::Config {
        cases: 64,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "proptest-regressions/smuggling.txt",
            ),
        )),
        max_shrink_iters: 32,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let started = Instant::now();
    let result = runner.run(&generated::request(), |(bytes, hyper)| {
        let case = Case {
            name: "generated".into(),
            bytes: bytes.clone(),
            expect: "any".into(),
            expect_hyper: None,
            app_requests: None,
            body_error: true,
            row: Value::Null,
        };
        let path = if hyper { Path1::Hyper } else { Path1::Own };
        let fails = rt.block_on(h.run(&case, path, Duration::from_millis(1500)));
        // Only the invariants; the expected column is the rows' job.
        let fails: Vec<_> = fails
            .into_iter()
            .filter(|f| f.starts_with("INVARIANT"))
            .collect();
        if fails.is_empty() {
            Ok(())
        } else {
            Err(proptest::test_runner::TestCaseError::fail(format!(
                "[{}] {:?}:\n    {}",
                path.name(),
                String::from_utf8_lossy(&bytes),
                fails.join("\n    ")
            )))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("generated cases took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// HTTP/2 clients
// ---------------------------------------------------------------------------

/// An h2 (prior knowledge) client connection to lameduck.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends one h2 request, with `data` as DATA frames; the status, or the error.
async fn h2_send(
    addr: SocketAddr,
    req: http::Request<()>,
    data: &[&'static [u8]],
) -> Result<u16, String> {
    let send = h2_client(addr).await;
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let end = data.is_empty();
    let (resp, mut stream) = send
        .send_request(req, end)
        .map_err(|e| format!("local: {e}"))?;
    for (i, d) in data.iter().enumerate() {
        stream
            .send_data(Bytes::from_static(d), i + 1 == data.len())
            .map_err(|e| format!("send_data: {e}"))?;
    }
    match tokio::time::timeout(FIRST_RESPONSE, resp).await {
        Err(_) => Err("no response within 3s".into()),
        Ok(Err(e)) => Err(format!("{e}")),
        Ok(Ok(r)) => Ok(r.status().as_u16()),
    }
}

/// The invariants on what the app got for h2 requests sent since `before`.
fn h2_invariants(app: &StrictApp, before: usize, what: &str) -> Vec<AppRequest> {
    let mut got = Vec::new();
    for r in &app.records()[before..] {
        if let Some(err) = r.get("parse_error") {
            assert_eq!(
                r["truncated"].as_bool(),
                Some(true),
                "{what}: the app's parser rejected what lameduck sent: {err}"
            );
            continue;
        }
        let req = AppRequest::from(r).unwrap();
        assert!(
            !req.cl_and_te,
            "{what}: CL and TE at the app: {:?}",
            req.headers
        );
        if let Some(cl) = req.content_length.first() {
            assert_eq!(
                cl.parse::<usize>().ok(),
                Some(req.body.len()),
                "{what}: app got a complete request whose body disagrees with its Content-Length"
            );
        }
        assert!(
            req.all("host").len() <= 1,
            "{what}: two Host lines at the app: {:?}",
            req.headers
        );
        got.push(req);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_content_length_disagreeing_with_data_never_reaches_the_app_whole() {
    let h = Harness::start().await;
    let addr = h.ld.proxy_addr();
    for (what, cl, data) in [
        ("more DATA than content-length", "2", &[&b"hello"[..]][..]),
        ("less DATA than content-length", "10", &[&b"hello"[..]][..]),
        (
            "split DATA beyond content-length",
            "5",
            &[&b"hel"[..], &b"lo!!"[..]][..],
        ),
    ] {
        let before = h.app.records().len();
        let req = http::Request::post(format!("http://app/h2-cl?{}", cl))
            .header("content-length", cl)
            .body(())
            .unwrap();
        let result = h2_send(addr, req, data).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = h2_invariants(&h.app, before, what);
        assert!(
            got.is_empty(),
            "{what}: the app got complete request(s) {got:?}; client saw {result:?}"
        );
        assert!(
            !matches!(result, Ok(s) if s < 400),
            "{what}: client got {result:?}"
        );
    }
    // And the connection pool is clean afterwards.
    assert_eq!(get(addr, "/after-h2").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_host_and_obs_text() {
    let h = Harness::start().await;
    let addr = h.ld.proxy_addr();

    let before = h.app.records().len();
    let req = http::Request::get("http://app/h2-host")
        .header("host", "evil")
        .body(())
        .unwrap();
    let result = h2_send(addr, req, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = h2_invariants(&h.app, before, ":authority vs host");
    match result {
        Ok(s) if s < 400 => {
            assert_eq!(got.len(), 1, "one request at the app: {got:?}");
            let hosts = got[0].all("host");
            assert!(
                hosts.len() == 1 && !hosts[0].contains("evil"),
                ":authority app with host evil forwarded as Host {hosts:?} (RFC 9113 §8.3.1: \
                 malformed, or :authority wins)"
            );
        }
        _ => assert!(
            got.is_empty(),
            "refused ({result:?}) but the app got {got:?}"
        ),
    }

    let before = h.app.records().len();
    let req = http::Request::get("http://app/h2-obs-text")
        .header("x-name", http::HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .body(())
        .unwrap();
    let result = h2_send(addr, req, &[]).await;
    let got = h2_invariants(&h.app, before, "obs-text");
    if matches!(result, Ok(s) if s < 400) {
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].all("x-name"),
            ["caf\u{e9}"],
            "obs-text value changed"
        );
    } else {
        assert!(
            got.is_empty(),
            "refused ({result:?}) but the app got {got:?}"
        );
    }
}

/// The h2 crate refuses to send connection-specific headers (RFC 9113 §8.2.2),
/// so these go out as hand-made frames: HPACK literals without indexing.
fn h2_raw_request(extra: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
    let mut block = Vec::new();
    let mut lit = |n: &str, v: &str| {
        block.push(0x00);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    };
    lit(":method", "POST");
    lit(":scheme", "http");
    lit(":authority", "app");
    lit(":path", "/h2-raw");
    for (n, v) in extra {
        lit(n, v);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let len = block.len();
    let flags = 0x4 | if end_stream { 0x1 } else { 0 };
    out.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        flags,
        0,
        0,
        0,
        1,
    ]);
    out.extend_from_slice(&block);
    if !end_stream {
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        out.extend_from_slice(&[0, 0, body.len() as u8, 0, 1, 0, 0, 0, 1]);
        out.extend_from_slice(body);
    }
    out
}

/// Frame types the server sent on stream 1 (and GOAWAY), until 2 s pass or EOF.
async fn h2_raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<&'static str> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut tmp = [0u8; 8192];
    let mut seen = Vec::new();
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            match (buf[3], stream) {
                (1, 1) => seen.push("HEADERS"),
                (3, 1) => seen.push("RST_STREAM"),
                (7, _) => seen.push("GOAWAY"),
                _ => {}
            }
            buf.drain(..9 + len);
        }
        if seen
            .iter()
            .any(|f| *f == "RST_STREAM" || *f == "GOAWAY" || *f == "HEADERS")
        {
            return seen;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => return seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connection_specific_headers_are_malformed() {
    let h = Harness::start().await;
    let addr = h.ld.proxy_addr();
    // The h2 crate itself will not send them.
    let req = http::Request::post("http://app/h2-te")
        .header("transfer-encoding", "chunked")
        .body(())
        .unwrap();
    assert!(
        h2_send(addr, req, &[]).await.is_err(),
        "h2 crate sent transfer-encoding"
    );

    for (what, extra, end) in [
        ("connection", vec![("connection", "keep-alive")], true),
        (
            "transfer-encoding",
            vec![("transfer-encoding", "chunked")],
            false,
        ),
        (
            "transfer-encoding with content-length",
            vec![("transfer-encoding", "chunked"), ("content-length", "4")],
            false,
        ),
        ("keep-alive", vec![("keep-alive", "timeout=5")], true),
        ("upgrade", vec![("upgrade", "websocket")], true),
        (
            "proxy-connection",
            vec![("proxy-connection", "keep-alive")],
            true,
        ),
        ("te gzip", vec![("te", "gzip")], true),
        (
            "connection nominating content-length",
            vec![("connection", "content-length"), ("content-length", "15")],
            false,
        ),
    ] {
        let before = h.app.records().len();
        let frames = h2_raw_exchange(addr, &h2_raw_request(&extra, end)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = h2_invariants(&h.app, before, what);
        assert!(
            got.is_empty(),
            "{what}: a malformed HTTP/2 request (RFC 9113 §8.2.2) reached the app: {got:?} (frames {frames:?})"
        );
        assert!(
            frames.contains(&"RST_STREAM") || frames.contains(&"GOAWAY"),
            "{what}: expected the stream reset as malformed, saw {frames:?}"
        );
    }
    // te: trailers is the one allowed value.
    let before = h.app.records().len();
    let frames = h2_raw_exchange(addr, &h2_raw_request(&[("te", "trailers")], true)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = h2_invariants(&h.app, before, "te trailers");
    assert_eq!(got.len(), 1, "te: trailers is allowed (frames {frames:?})");
    assert!(
        got[0].all("te").is_empty(),
        "te forwarded to an HTTP/1 app: {:?}",
        got[0].headers
    );
}
