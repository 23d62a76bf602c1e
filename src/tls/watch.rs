//! Reloads a [`ReloadableCert`] or a [`ReloadableClientCa`] when its files
//! change or on demand (SIGHUP).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{CaReloaded, ReloadableCert, ReloadableClientCa};

/// How often the watcher looks at the files by default. A Secret volume is
/// updated by kubelet's sync loop (a minute or more after the Secret changed),
/// so a second here adds nothing noticeable and costs two `stat` calls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Asks every watcher subscribed to it to reload now (SIGHUP). A watch
/// channel, not a `Notify`: a request made while a watcher is busy polling is
/// kept rather than lost, and many requests in a row coalesce into one.
#[derive(Debug, Clone)]
pub struct ReloadSignal(Arc<watch::Sender<u64>>);

impl ReloadSignal {
    pub fn new() -> Self {
        ReloadSignal(Arc::new(watch::Sender::new(0)))
    }

    pub fn trigger(&self) {
        self.0
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

impl Default for ReloadSignal {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`watch_files`] keeps current: files it can compare with the last
/// load, and a reload that writes its own log line.
pub trait WatchedFiles: Send + Sync + 'static {
    /// The files differ from what the last load (or attempt) read, and are
    /// all there (one missing mid-swap is seen at the next poll).
    fn changed_since_last_load(&self) -> bool;
    /// One reload with its one log line; `why` says what asked for it.
    fn reload_and_log(&self, why: &str);
}

/// Polls the files every `interval` and reloads when they changed, and
/// reloads whenever `reload` is triggered; returns when `stop` is
/// cancelled. The caller owns the task (spawn it on its tracker).
///
/// Files that fail to load (unreadable, not PEM, key and certificate not
/// matching, an empty CA bundle) are logged once per version and what is in
/// use stays; a write in two steps (certificate, then key) therefore logs
/// one refusal for the half-written state and then loads. The file reads
/// are blocking but small and local (a Secret volume is tmpfs), so they run
/// on this task rather than on the blocking pool.
pub async fn watch_files(
    target: Arc<impl WatchedFiles>,
    mut reload: watch::Receiver<u64>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut signal_open = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let why = tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {
                // Compared with what the last load attempt read, so a
                // broken version is refused once, not every second.
                if !target.changed_since_last_load() {
                    continue;
                }
                "files changed"
            }
            changed = reload.changed(), if signal_open => {
                if changed.is_err() {
                    // The signal's owner is gone: keep polling files only.
                    signal_open = false;
                    continue;
                }
                "reload requested"
            }
        };
        target.reload_and_log(why);
    }
}

impl WatchedFiles for ReloadableCert {
    fn changed_since_last_load(&self) -> bool {
        matches!(self.files().versions(), Some(now) if Some(&now) != self.attempted().as_ref())
    }

    fn reload_and_log(&self, why: &str) {
        reload_and_log(self, why)
    }
}

/// One reload with its one log line.
pub fn reload_and_log(cert: &ReloadableCert, why: &str) {
    let files = cert.files();
    let listener = cert.metrics().listener.as_str();
    match cert.reload() {
        Ok(reloaded) => tracing::info!(
            listener,
            why,
            cert = %files.cert.display(),
            subject = %reloaded.subject,
            not_after = reloaded.not_after,
            "TLS certificate loaded; new handshakes use it"
        ),
        Err(e) => tracing::error!(
            listener,
            why,
            error = %e,
            "TLS certificate reload refused, still serving the previous certificate"
        ),
    }
}

impl WatchedFiles for ReloadableClientCa {
    fn changed_since_last_load(&self) -> bool {
        ReloadableClientCa::changed_since_last_load(self)
    }

    fn reload_and_log(&self, why: &str) {
        let listener = self.metrics().listener.as_str();
        let ca = self.path().display();
        match self.reload() {
            Ok(CaReloaded::Replaced { certificates }) => tracing::info!(
                listener,
                why,
                %ca,
                certificates,
                "TLS client CA bundle loaded; new handshakes verify client certificates with it"
            ),
            Ok(CaReloaded::Unchanged) => tracing::info!(
                listener,
                why,
                %ca,
                "TLS client CA bundle unchanged; sessions keep resuming"
            ),
            Err(e) => tracing::error!(
                listener,
                why,
                error = %e,
                "TLS client CA reload refused, still verifying client certificates with the previous bundle"
            ),
        }
    }
}
