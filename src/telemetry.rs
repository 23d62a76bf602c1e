//! Structured logging: the tracing subscriber (JSON or text, on stderr) and the
//! handle that swaps the log filter at run time (SIGHUP).
//!
//! Logging never sits on the per-request hot path above `debug`; the warnings
//! a failing app can cause per request go through a [`LogBudget`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("cannot read --log-level-file {path}: {source}")]
    ReadFilterFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the log filter: {0}")]
    Reload(String),
    #[error("a global logger is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Re-applies the log filter from `--log-level-file`.
pub struct LogReloader {
    handle: reload::Handle<EnvFilter, Registry>,
    filter_file: Option<PathBuf>,
}

/// What a reload did, for the log line that reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied(String),
    NothingToReload,
}

fn parse_filter(filter: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| TelemetryError::BadFilter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })
}

fn read_filter_file(path: &Path) -> Result<String, TelemetryError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| TelemetryError::ReadFilterFile {
            path: path.to_owned(),
            source,
        })
}

/// Installs the global subscriber. The filter comes from, in order:
/// `--log-level-file`, `--log-level`, `RUST_LOG`, then `info`.
pub fn init(
    format: LogFormat,
    level: Option<&str>,
    filter_file: Option<&Path>,
) -> Result<LogReloader, TelemetryError> {
    let filter_text = match (filter_file, level) {
        (Some(path), _) => read_filter_file(path)?,
        (None, Some(level)) => level.to_owned(),
        (None, None) => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
    };
    let (filter, handle) = reload::Layer::new(parse_filter(&filter_text)?);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    installed.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(LogReloader {
        handle,
        filter_file: filter_file.map(Path::to_owned),
    })
}

impl LogReloader {
    /// Re-reads `--log-level-file`. A broken file keeps the filter in force.
    pub fn reload(&self) -> Result<ReloadOutcome, TelemetryError> {
        let Some(path) = &self.filter_file else {
            return Ok(ReloadOutcome::NothingToReload);
        };
        let text = read_filter_file(path)?;
        let filter = parse_filter(&text)?;
        self.handle
            .reload(filter)
            .map_err(|e| TelemetryError::Reload(e.to_string()))?;
        Ok(ReloadOutcome::Applied(text))
    }
}

/// Caps a log line that can repeat per request (an app outage makes every
/// request fail): at most `per_second` lines a second, and the next line
/// admitted reports how many were left out. Lock-free and approximate under
/// races, which is all a log budget needs.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    second: AtomicU64,
    used: AtomicU32,
    suppressed: AtomicU64,
}

impl LogBudget {
    pub const fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            second: AtomicU64::new(0),
            used: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(left_out)`: log this one, mentioning the lines left out since
    /// the last one logged. `None`: over budget, skip it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(crate::drain::now_ms() / 1000)
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        let current = self.second.load(Ordering::Relaxed);
        if current != second
            && self
                .second
                .compare_exchange(current, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod log_budget_tests {
    use super::LogBudget;

    #[test]
    fn lines_over_the_budget_are_counted_and_reported_by_the_next_one() {
        let budget = LogBudget::new(3);
        let first_second: Vec<_> = (0..5).map(|_| budget.admit_at(7)).collect();
        assert_eq!(first_second, [Some(0), Some(0), Some(0), None, None]);
        assert_eq!(budget.admit_at(8), Some(2));
        assert_eq!(budget.admit_at(8), Some(0));
    }
}
