//! `--otlp-endpoint` against a real OpenTelemetry Collector (OTLP receiver,
//! file exporter; built once by `scripts/otelcol-build.sh`): the spans it
//! writes are read back and checked against what the app saw in
//! `traceparent`, the drain's span against the timeline; with the collector
//! down, lameduck serves as usual and counts what it could not export.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

static COLLECTOR_BIN: OnceLock<PathBuf> = OnceLock::new();

/// The collector binary; builds it once (cached, flock'd) unless
/// `LAMEDUCK_OTELCOL_BIN` names one.
fn collector_bin() -> &'static Path {
    COLLECTOR_BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("LAMEDUCK_OTELCOL_BIN") {
            return PathBuf::from(bin);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/otelcol-build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed", script.display());
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().unwrap_or("").trim())
    })
}

/// A collector receiving OTLP/HTTP on `addr`, writing spans as OTLP JSON
/// lines to `out`.
struct Collector {
    child: Child,
    addr: SocketAddr,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Collector {
    async fn start() -> Collector {
        let dir = tempfile::tempdir().unwrap();
        let addr = closed_port();
        let out = dir.path().join("spans.json");
        let config = dir.path().join("config.yaml");
        // The collector's own metrics are off: their default port would
        // collide between parallel tests.
        std::fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: {addr}\n\
                 exporters:\n  file:\n    path: {}\n    flush_interval: 100ms\n\
                 service:\n  telemetry:\n    metrics:\n      level: none\n\
                 \x20 pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [file]\n",
                out.display()
            ),
        )
        .unwrap();
        let child = Command::new(collector_bin())
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the collector");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the collector did not listen on {addr}"
            );
            tokio::time::sleep(ms(50)).await;
        }
        Collector {
            child,
            addr,
            out,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span written so far, with its resource's attributes.
    fn spans(&self) -> Vec<(Value, Value)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut spans = Vec::new();
        // Only whole lines: the collector may be writing the last one.
        let lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let request: Value = serde_json::from_str(line).unwrap();
            for rs in request["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        spans.push((rs["resource"].clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// Waits until a span satisfies `pred` (the file exporter flushes on a timer).
    async fn wait_span(&self, pred: impl Fn(&Value) -> bool) -> (Value, Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = self.spans().into_iter().find(|(_, s)| pred(s)) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no such span; have {:#?}",
                self.spans()
            );
            tokio::time::sleep(ms(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An attribute's value as text (OTLP JSON: `{"stringValue": ..}`,
/// `{"intValue": "200"}`, `{"boolValue": true}`).
fn attr(item: &Value, key: &str) -> Option<String> {
    let kv = item["attributes"]
        .as_array()?
        .iter()
        .find(|kv| kv["key"] == key)?;
    let v = &kv["value"];
    v["stringValue"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| v["intValue"].as_str().map(str::to_owned))
        .or_else(|| v["intValue"].as_i64().map(|n| n.to_string()))
        .or_else(|| v["boolValue"].as_bool().map(|b| b.to_string()))
        .or_else(|| v["doubleValue"].as_f64().map(|f| f.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_drain_spans_reach_a_real_collector() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let (app, mut ld) = app_behind_lameduck(&[
        "--otlp-endpoint",
        &endpoint,
        "--trace-sample-ratio",
        "1",
        "--drain-delay",
        "300ms",
    ])
    .await;
    let proxy = ld.proxy_addr();
    // A caller in a sampled trace, one with none, one that is not sampled.
    let sampled = format!("00-{TRACE}-{PARENT}-01");
    let r = http_request(proxy, "GET", "/headers", &[("traceparent", &sampled)], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let continued = app.last_request("/headers").unwrap();
    let continued = continued.header("traceparent").unwrap().to_owned();
    let r = http_request(proxy, "GET", "/bytes?n=7", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let rooted = app.last_request("/bytes").unwrap();
    let rooted = rooted.header("traceparent").unwrap().to_owned();
    let unsampled_trace = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let unsampled = format!("00-{unsampled_trace}-{PARENT}-00");
    let r = http_request(proxy, "GET", "/", &[("traceparent", &unsampled)], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    ld.signal(Signal::SIGTERM);
    assert_eq!(ld.wait_exit(secs(10)).await.code(), Some(0));

    // The span of the continued trace: the app's parent is lameduck's span,
    // whose parent is the caller's.
    let (resource, span) = collector.wait_span(|s| s["traceId"] == TRACE).await;
    assert_eq!(span["spanId"], continued[36..52], "{span:#}");
    assert_eq!(span["parentSpanId"], PARENT);
    assert_eq!(span["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(span["name"], "GET");
    assert_eq!(attr(&span, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attr(&span, "url.path").as_deref(), Some("/headers"));
    assert_eq!(
        attr(&span, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(&span, "network.protocol.version").as_deref(),
        Some("1.1")
    );
    assert_eq!(
        attr(&span, "lameduck.drain.phase").as_deref(),
        Some("accepting")
    );
    assert_eq!(
        attr(&span, "lameduck.upstream.reused").as_deref(),
        Some("false")
    );
    assert_eq!(attr(&span, "lameduck.outcome").as_deref(), Some("ok"));
    assert_eq!(attr(&resource, "service.name").as_deref(), Some("lameduck"));

    // The new root: the trace the app was given, no parent.
    let (_, root) = collector.wait_span(|s| s["traceId"] == rooted[3..35]).await;
    assert_eq!(root["spanId"], rooted[36..52]);
    assert!(
        root["parentSpanId"].as_str().unwrap_or("").is_empty(),
        "{root:#}"
    );
    assert_eq!(attr(&root, "http.response.body.size").as_deref(), Some("7"));
    assert_eq!(
        attr(&root, "lameduck.upstream.reused").as_deref(),
        Some("true")
    );

    // The drain: one span, the timeline as its events.
    let (_, drain) = collector.wait_span(|s| s["name"] == "lameduck drain").await;
    let events: Vec<&str> = drain["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "drain started",
            "deadline set",
            "lame-duck window ended",
            "drained"
        ],
        "{drain:#}"
    );
    assert_eq!(
        attr(&drain, "lameduck.drain.outcome").as_deref(),
        Some("graceful")
    );
    let start: u128 = drain["startTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let end: u128 = drain["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(
        end - start >= 300_000_000,
        "the span covers the 300ms window"
    );

    // Not sampled: not exported.
    assert!(
        !collector
            .spans()
            .iter()
            .any(|(_, s)| s["traceId"] == unsampled_trace),
        "an unsampled request was exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_requests_are_served_and_failures_counted() {
    let down = format!("http://{}", closed_port());
    let (_app, mut ld) = app_behind_lameduck(&[
        "--otlp-endpoint",
        &down,
        "--trace-sample-ratio",
        "1",
        "--drain-delay",
        "0s",
    ])
    .await;
    for _ in 0..5 {
        assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
    }
    let failed = wait_metric(
        ld.admin_addr(),
        "lameduck_otlp_spans_total{result=\"failed\"}",
        |v| v >= 5.0,
        secs(10),
    )
    .await;
    assert_eq!(failed, 5.0);
    assert_eq!(
        metric(
            ld.admin_addr(),
            "lameduck_otlp_spans_total{result=\"exported\"}"
        )
        .await,
        0.0
    );
    assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
    ld.signal(Signal::SIGTERM);
    assert_eq!(ld.wait_exit(secs(10)).await.code(), Some(0), "never fatal");
    assert!(
        !ld.logs_with_message("OTLP export failed; the spans are counted and dropped")
            .is_empty()
    );
}
