//! `lameduck inject`: a mutating admission webhook that adds the lameduck
//! sidecar to the Pods that ask for it, exactly as the chart's
//! `lameduck.sidecar` template would.
//!
//! - `settings`: the sidecar's settings, their validation, the container.
//! - `patch`: a Pod (JSON) → the JSON patch, the outcome, the warnings.
//! - `review`: AdmissionReview in, AdmissionReview out.
//! - `server`: the HTTPS listener, drained like the proxy's.
//!
//! The lifecycle runs it in place of the proxy: same admin port, probes,
//! metrics, logs and drain.

pub mod patch;
pub mod review;
pub mod server;
pub mod settings;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::tls::{self, Handshaker, ReloadableCert, TlsError};
pub use patch::Outcome;
pub use settings::{Sidecar, SidecarSettings};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("--sidecar-config {path}: {reason}")]
    SidecarConfig { path: String, reason: String },
}

/// How long a client has to finish its TLS handshake; the apiserver's own
/// timeout for a whole review is at most 30 s.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every review needs: the sidecar settings, the certificate (reloaded
/// when its files change, see `tls::watch_files`) and the webhook's metrics.
pub struct Injector {
    settings: Arc<SidecarSettings>,
    cert: Arc<ReloadableCert>,
    handshaker: Handshaker,
    pub metrics: WebhookMetrics,
}

impl Injector {
    /// `cert` is the listener's certificate, loaded at start-up (its
    /// metrics labelled `listener="webhook"`); HTTP/2 and HTTP/1.1 by ALPN.
    pub fn new(settings: SidecarSettings, cert: Arc<ReloadableCert>) -> Result<Self, TlsError> {
        let config = tls::server_config(cert.clone(), tls::ALPN_HTTP, None)?;
        let handshaker = Handshaker::new(config, HANDSHAKE_TIMEOUT, cert.metrics().clone());
        Ok(Injector {
            settings: Arc::new(settings),
            cert,
            handshaker,
            metrics: WebhookMetrics::default(),
        })
    }

    pub fn settings(&self) -> Arc<SidecarSettings> {
        self.settings.clone()
    }

    pub fn handshaker(&self) -> &Handshaker {
        &self.handshaker
    }

    /// For the lifecycle's reload task.
    pub fn certificate(&self) -> &Arc<ReloadableCert> {
        &self.cert
    }
}

/// Reads and validates `--sidecar-config`: JSON with the chart's sidecar
/// settings (the injector chart renders it from its values). Validated once
/// here so a bad file fails start-up, not every admission.
pub fn load_settings(path: &Path) -> Result<SidecarSettings, InjectError> {
    let error = |reason: String| InjectError::SidecarConfig {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let settings: SidecarSettings =
        serde_json::from_slice(&text).map_err(|e| error(e.to_string()))?;
    settings
        .clone()
        .validate()
        .map_err(|e| error(e.to_string()))?;
    Ok(settings)
}

type Labels = Vec<(&'static str, &'static str)>;

/// The webhook's own figures (the connection and request ones are the
/// proxy's, shared through `Metrics`).
#[derive(Clone)]
pub struct WebhookMetrics {
    reviews: Family<Labels, Counter>,
    review_duration: Histogram,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        WebhookMetrics {
            reviews: Family::default(),
            // 50 µs to ~1.6 s: a review is answered from memory.
            review_duration: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
        }
    }
}

impl WebhookMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "admission_reviews",
            "AdmissionReviews answered, by outcome (injected, unchanged, skipped, ignored, invalid)",
            self.reviews.clone(),
        );
        registry.register(
            "admission_review_duration_seconds",
            "Time from the review's request head to its answer",
            self.review_duration.clone(),
        );
    }

    pub fn reviewed(&self, outcome: &'static str, took: Duration) {
        self.reviews
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
        self.review_duration.observe(took.as_secs_f64());
    }
}
