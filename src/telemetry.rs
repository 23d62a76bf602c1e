//! Structured logging: the tracing subscriber (JSON or text, on stderr) and the
//! handle that swaps the log filter at run time (SIGHUP).
//!
//! Logging never sits on the per-request hot path above `debug`.

use std::path::{Path, PathBuf};

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
