//! OpenTelemetry spans to a collector over OTLP/HTTP (protobuf), with the
//! OpenTelemetry project's exporter (`opentelemetry-otlp`, sent by hyper).
//!
//! Why not the SDK's tracer and `BatchSpanProcessor`: it runs its own thread
//! (or detached runtime tasks) and its own queue, outside the lifecycle. Here
//! the request path builds a finished `SpanData` only for sampled requests and
//! `try_send`s it on a bounded queue (full: dropped and counted); one task,
//! owned by the lifecycle, batches and exports, counts what the collector did
//! not take, and is flushed at exit within the drain deadline. An export
//! failure is a counter and a rate-limited warning, never an error of lameduck.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::access_log::{End, Entry};
use crate::telemetry::LogBudget;

/// Spans queued for export at most; more are dropped and counted.
pub const QUEUE_SPANS: usize = 4096;
/// Spans per OTLP request at most (the SDK's default batch size).
const MAX_BATCH: usize = 512;
/// A batch goes out at the latest this long after its first span.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// How often a batch being filled takes what has arrived.
const GATHER: Duration = Duration::from_millis(50);
/// Bound on one export request (connect included).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// What happened to spans, the `lameduck_otlp_spans_total{result}` counters.
#[derive(Clone, Default)]
pub struct SpanCounters {
    pub exported: Counter,
    /// The collector refused them or could not be reached.
    pub failed: Counter,
    /// The queue was full.
    pub dropped: Counter,
}

/// The request path's handle.
#[derive(Clone)]
pub struct SpanSink {
    tx: mpsc::Sender<SpanData>,
    counters: SpanCounters,
}

impl SpanSink {
    pub fn submit(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.counters.dropped.inc();
        }
    }
}

/// The one task that exports.
pub struct Exporter {
    rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    counters: SpanCounters,
    warnings: LogBudget,
}

/// `http://host:port` means the collector's standard path for traces.
pub fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = trimmed
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    if has_path {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

/// The handle and the exporter task's state; `resource` names this replica.
pub fn start(
    endpoint: &str,
    resource: Resource,
    counters: SpanCounters,
) -> Result<(SpanSink, Exporter), OtlpError> {
    let url = traces_url(endpoint);
    let client =
        opentelemetry_http::hyper::HyperClient::with_default_connector(EXPORT_TIMEOUT, None);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| OtlpError::Exporter {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(QUEUE_SPANS);
    Ok((
        SpanSink {
            tx,
            counters: counters.clone(),
        },
        Exporter {
            rx,
            exporter,
            counters,
            warnings: LogBudget::new(1),
        },
    ))
}

impl Exporter {
    /// Exports batches until `stop`, then what is still queued.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = tokio::select! {
                biased;
                span = self.rx.recv() => span,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            batch.push(first);
            // Gather for a moment rather than wake per span; a full batch
            // goes at once, and nothing waits longer than BATCH_DELAY.
            let due = Instant::now() + BATCH_DELAY;
            loop {
                while batch.len() < MAX_BATCH {
                    let Ok(span) = self.rx.try_recv() else { break };
                    batch.push(span);
                }
                if batch.len() >= MAX_BATCH || Instant::now() >= due {
                    break;
                }
                tokio::select! {
                    () = sleep_until(due.min(Instant::now() + GATHER)) => {}
                    () = stop.cancelled() => break,
                }
            }
            self.export(&mut batch).await;
        }
        // Stopping: the requests and the drain span are all queued by now.
        while !self.rx.is_empty() {
            while batch.len() < MAX_BATCH {
                let Ok(span) = self.rx.try_recv() else { break };
                batch.push(span);
            }
            self.export(&mut batch).await;
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanData>) {
        let spans = std::mem::take(batch);
        let n = spans.len() as u64;
        // The client has its own timeout; this one bounds the encoding too.
        let result = timeout(EXPORT_TIMEOUT * 2, self.exporter.export(spans)).await;
        let error = match result {
            Ok(Ok(())) => {
                self.counters.exported.inc_by(n);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        self.counters.failed.inc_by(n);
        if let Some(left_out) = self.warnings.admit() {
            tracing::warn!(%error, spans = n, left_out, "OTLP export failed; the spans are counted and dropped");
        }
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("lameduck")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// The server span of one request, from its access-log entry. `None`
/// without a trace (TCP mode).
pub fn request_span(entry: &Entry) -> Option<SpanData> {
    let trace = entry.trace?;
    let mut attributes = vec![
        KeyValue::new("http.request.method", entry.method().to_owned()),
        KeyValue::new("url.path", entry.path().to_owned()),
        KeyValue::new("url.scheme", "http"),
        KeyValue::new(
            "network.protocol.version",
            entry.protocol.trim_start_matches("HTTP/"),
        ),
        KeyValue::new("http.response.status_code", i64::from(entry.status)),
        KeyValue::new("http.response.body.size", entry.response_bytes as i64),
        KeyValue::new("lameduck.request_id", entry.request_id().to_owned()),
        KeyValue::new("lameduck.drain.phase", entry.phase),
        KeyValue::new("lameduck.draining", entry.phase != "accepting"),
        KeyValue::new("lameduck.outcome", entry.end.as_str()),
        KeyValue::new("lameduck.upstream.retried", entry.retried),
    ];
    if let Some(n) = entry.request_bytes {
        attributes.push(KeyValue::new("http.request.body.size", n as i64));
    }
    if let Some(reused) = entry.upstream_reused {
        attributes.push(KeyValue::new("lameduck.upstream.reused", reused));
    }
    if let Some(head) = entry.upstream_head {
        attributes.push(KeyValue::new(
            "lameduck.upstream.head_ms",
            head.as_secs_f64() * 1e3,
        ));
    }
    // Semantic conventions: server spans are errors for 5xx, not 4xx, and
    // for exchanges that did not complete.
    let failed = entry.status >= 500 || !matches!(entry.end, End::Ok | End::Refused);
    if failed {
        attributes.push(KeyValue::new("error.type", error_type(entry)));
    }
    let flags = if trace.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace.trace_id),
            SpanId::from_bytes(trace.span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: trace
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: trace.parent_span_id.is_some(),
        span_kind: SpanKind::Server,
        // No route is known to a proxy: the method alone (semantic conventions).
        name: Cow::Owned(entry.method().to_owned()),
        start_time: entry.time,
        end_time: entry.time + entry.duration,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if failed {
            Status::error(entry.end.as_str())
        } else {
            Status::Unset
        },
        instrumentation_scope: scope(),
    })
}

fn error_type(entry: &Entry) -> String {
    match entry.end {
        End::Ok | End::Refused => entry.status.to_string(),
        end => end.as_str().to_owned(),
    }
}

/// One step of the drain timeline, an event on the drain span.
#[derive(Debug, Clone)]
pub struct TimelineEvent {
    pub at: SystemTime,
    pub name: &'static str,
    pub attributes: Vec<KeyValue>,
}

/// The span of one drain: from its start to the exit, one event per step of
/// the timeline. A trace of its own (a drain is no request's child).
pub fn drain_span(
    started: SystemTime,
    ended: SystemTime,
    events: Vec<TimelineEvent>,
    attributes: Vec<KeyValue>,
    failed: bool,
) -> SpanData {
    let trace =
        super::trace_context::RequestTrace::start(None, &super::trace_context::Sampler::new(1.0));
    // (`SpanEvents` is non-exhaustive: filled in place.)
    let mut span_events = SpanEvents::default();
    span_events.events = events
        .into_iter()
        .map(|e| opentelemetry::trace::Event::new(e.name, e.at, e.attributes, 0))
        .collect();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace.trace_id),
            SpanId::from_bytes(trace.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: Cow::Borrowed("lameduck drain"),
        start_time: started,
        end_time: ended,
        attributes,
        dropped_attributes_count: 0,
        events: span_events,
        links: SpanLinks::default(),
        status: if failed {
            Status::error("forced")
        } else {
            Status::Unset
        },
        instrumentation_scope: scope(),
    }
}

/// Who sends: `service.name` lameduck (or OTEL_SERVICE_NAME) and the pod.
pub fn resource(pod_name: Option<&str>, pod_namespace: Option<&str>) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name("lameduck");
    }
    let mut attributes = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(name) = pod_name {
        attributes.push(KeyValue::new("k8s.pod.name", name.to_owned()));
    }
    if let Some(namespace) = pod_namespace {
        attributes.push(KeyValue::new("k8s.namespace.name", namespace.to_owned()));
    }
    builder.with_attributes(attributes).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_endpoint_gets_the_traces_path() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/custom"), "http://c:4318/custom");
    }

    #[test]
    fn request_spans_carry_the_trace_the_app_saw() {
        let mut entry = Entry::for_request(b"id", "GET", "/", false, "HTTP/1.1", "lame_duck");
        let parent = super::super::trace_context::Parent {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled: true,
        };
        let trace = super::super::trace_context::RequestTrace::start(
            Some(parent),
            &super::super::trace_context::Sampler::new(0.0),
        );
        entry.trace = Some(trace);
        entry.status = 503;
        let span = request_span(&entry).unwrap();
        assert_eq!(span.span_context.trace_id(), TraceId::from_bytes([1; 16]));
        assert_eq!(
            span.span_context.span_id(),
            SpanId::from_bytes(trace.span_id)
        );
        assert_eq!(span.parent_span_id, SpanId::from_bytes([2; 8]));
        assert!(matches!(span.status, Status::Error { .. }));
        assert!(
            span.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "lameduck.drain.phase")
        );
    }
}
