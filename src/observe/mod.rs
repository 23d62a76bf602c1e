//! Per-request observability: the access log, W3C trace context and (with
//! `--otlp-endpoint`) OpenTelemetry spans. A leaf: the proxy fills a
//! [`Record`] per request, the lifecycle owns the tasks that write and export.
//!
//! Off costs nothing: with the access log off and the request not sampled for
//! export, no `Record` is made, so the request path neither allocates nor
//! touches a queue for it. Trace context itself is fixed-size and always on.

pub mod access_log;
pub mod otlp;
pub mod trace_context;

use access_log::{AccessLog, End, Entry};
use otlp::SpanSink;
use trace_context::{RequestTrace, Sampler};

/// What the proxy needs to observe requests, fixed for the process.
#[derive(Clone)]
pub struct Observer {
    pub access_log: Option<AccessLog>,
    /// With --otlp-endpoint: where sampled requests' spans go.
    pub spans: Option<SpanSink>,
    pub sampler: Sampler,
}

impl Observer {
    /// Nothing observed; new traces sampled at `ratio`.
    pub fn off(ratio: f64) -> Self {
        Observer {
            access_log: None,
            spans: None,
            sampler: Sampler::new(ratio),
        }
    }

    /// Whether a request with this trace needs a [`Record`]; checked before
    /// building one, so an unobserved request builds nothing.
    #[inline]
    pub fn wants(&self, trace: Option<&RequestTrace>) -> bool {
        self.access_log.is_some() || (self.spans.is_some() && trace.is_some_and(|t| t.sampled))
    }

    /// The query is kept in the access log's path only with --access-log-query.
    pub fn with_query(&self) -> bool {
        self.access_log.as_ref().is_some_and(|l| l.with_query())
    }

    pub fn record(&self, entry: Entry) -> Record {
        let sampled = entry.trace.is_some_and(|t| t.sampled);
        Record {
            entry: Box::new(entry),
            access_log: self.access_log.clone(),
            spans: self.spans.clone().filter(|_| sampled),
        }
    }
}

/// One observed request, submitted when it ends.
pub struct Record {
    pub entry: Box<Entry>,
    access_log: Option<AccessLog>,
    spans: Option<SpanSink>,
}

impl Record {
    pub fn finish(mut self, end: End) {
        self.entry.end = end;
        if let Some(spans) = self.spans.take()
            && let Some(span) = otlp::request_span(&self.entry)
        {
            spans.submit(span);
        }
        if let Some(log) = self.access_log.take() {
            log.submit(self.entry);
        }
    }
}
