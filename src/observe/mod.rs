//! Per-request observability: the access log, W3C trace context and (with
//! `--otlp-endpoint`) OpenTelemetry spans. A leaf: the proxy fills a
//! [`Record`] per request, the lifecycle owns the tasks that write and export.
//!
//! Off costs nothing: with the access log off and the request not sampled for
//! export, no `Record` is made, so the request path neither allocates nor
//! touches a queue for it. Trace context itself is fixed-size and always on.

pub mod access_log;
pub mod trace_context;

use access_log::{AccessLog, End, Entry};
use trace_context::{RequestTrace, Sampler};

/// What the proxy needs to observe requests, fixed for the process.
#[derive(Clone)]
pub struct Observer {
    pub access_log: Option<AccessLog>,
    pub sampler: Sampler,
}

impl Observer {
    /// Nothing observed; new traces sampled at `ratio`.
    pub fn off(ratio: f64) -> Self {
        Observer {
            access_log: None,
            sampler: Sampler::new(ratio),
        }
    }

    /// Whether a request with this trace needs a [`Record`]; checked before
    /// building one, so an unobserved request builds nothing.
    #[inline]
    pub fn wants(&self, _trace: Option<&RequestTrace>) -> bool {
        self.access_log.is_some()
    }

    /// The query is kept in the access log's path only with --access-log-query.
    pub fn with_query(&self) -> bool {
        self.access_log.as_ref().is_some_and(|l| l.with_query)
    }

    pub fn record(&self, entry: Entry) -> Record {
        Record {
            entry: Box::new(entry),
            access_log: self.access_log.clone(),
        }
    }
}

/// One observed request, submitted when it ends.
pub struct Record {
    pub entry: Box<Entry>,
    access_log: Option<AccessLog>,
}

impl Record {
    pub fn finish(mut self, end: End) {
        self.entry.end = end;
        if let Some(log) = self.access_log.take() {
            log.submit(self.entry);
        }
    }
}
