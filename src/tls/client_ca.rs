//! The client CA bundle of an mTLS listener (`--tls-client-ca`), and the
//! listener's `ServerConfig`, rebuilt when the bundle changes.
//!
//! The certificate is swapped inside a config (its resolver is asked on
//! every handshake); the client verifier cannot be: rustls'
//! `ClientCertVerifier::root_hint_subjects` lends a slice out of the
//! verifier itself, which a verifier behind a lock cannot lend. So a reload
//! builds a whole new `ServerConfig` (the same resolver and ALPN) and swaps
//! the `Arc` that new handshakes take.
//!
//! The new config has a new ticket key and session cache, on purpose: rustls
//! does not verify the client certificate again when a session resumes, so
//! a session opened under a CA that was just removed must not resume.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;
use rustls_pki_types::CertificateDer;

use super::cert::FileVersion;
use super::{TlsError, load_certificates, server_config};
use crate::metrics::TlsMetrics;

/// The CAs that sign acceptable client certificates (`--tls-client-ca`).
#[derive(Debug, Clone)]
pub struct ClientCa {
    pub roots: Arc<RootCertStore>,
    pub path: PathBuf,
    pub flag: &'static str,
    /// The bundle as read, to tell a changed bundle from the same one read
    /// again (a SIGHUP for the log filter must not end every TLS session).
    certificates: Vec<CertificateDer<'static>>,
}

impl ClientCa {
    /// Reads and checks the bundle; an empty file, a file without a PEM
    /// certificate or one rustls cannot use as a trust anchor is an error.
    pub fn load(path: &Path, flag: &'static str) -> Result<ClientCa, TlsError> {
        let certificates = load_certificates(path, flag)?;
        let mut roots = RootCertStore::empty();
        for cert in &certificates {
            roots
                .add(cert.clone())
                .map_err(|source| TlsError::ClientCa {
                    flag,
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        Ok(ClientCa {
            roots: Arc::new(roots),
            path: path.to_path_buf(),
            flag,
            certificates,
        })
    }

    pub fn len(&self) -> usize {
        self.certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }
}

// === impl CurrentServerConfig ===

/// The `ServerConfig` the next handshake on a listener gets. Read once per
/// handshake (an `Arc` clone under a read lock, as the certificate resolver
/// does); replaced only by a client CA reload. The lock is never held across
/// an await or a file read.
#[derive(Debug)]
pub struct CurrentServerConfig(RwLock<Arc<ServerConfig>>);

impl CurrentServerConfig {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        CurrentServerConfig(RwLock::new(config))
    }

    pub fn get(&self) -> Arc<ServerConfig> {
        // A poisoned lock only means a panic elsewhere while it was held for
        // a clone or an assignment, neither of which leaves it half-written.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = config;
    }
}

// === impl ReloadableClientCa ===

/// A listener's client CA bundle, reloadable while it serves, and the
/// config built from it.
pub struct ReloadableClientCa {
    path: PathBuf,
    flag: &'static str,
    /// The file version the last load read (taken just before reading, as
    /// for the certificate).
    attempted: Mutex<Option<FileVersion>>,
    /// The bundle the current config verifies with.
    in_use: Mutex<ClientCa>,
    /// What a rebuilt config needs besides the bundle.
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
    config: Arc<CurrentServerConfig>,
    metrics: TlsMetrics,
}

/// What a successful [`ReloadableClientCa::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaReloaded {
    /// A different bundle: new handshakes verify with it.
    Replaced { certificates: usize },
    /// The same certificates as before: the config (and its sessions) kept.
    Unchanged,
}

impl ReloadableClientCa {
    /// The first load, at start-up: an error here is a start-up error.
    /// `resolver` and `alpn` go into every config built from the bundle.
    pub fn load(
        path: &Path,
        flag: &'static str,
        resolver: Arc<dyn ResolvesServerCert>,
        alpn: &[&[u8]],
        metrics: TlsMetrics,
    ) -> Result<Arc<Self>, TlsError> {
        let attempted = FileVersion::of(path);
        let ca = ClientCa::load(path, flag)?;
        let config = server_config(resolver.clone(), alpn, Some(&ca))?;
        Ok(Arc::new(ReloadableClientCa {
            path: path.to_path_buf(),
            flag,
            attempted: Mutex::new(attempted),
            in_use: Mutex::new(ca),
            resolver,
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            config: Arc::new(CurrentServerConfig::new(config)),
            metrics,
        }))
    }

    /// The config the listener's handshakes take.
    pub fn config(&self) -> &Arc<CurrentServerConfig> {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }

    /// The bundle's file changed since the last load attempt (and is there:
    /// a file missing mid-swap is seen at the next poll).
    pub fn changed_since_last_load(&self) -> bool {
        match FileVersion::of(&self.path) {
            Some(now) => {
                Some(&now)
                    != self
                        .attempted
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_ref()
            }
            None => false,
        }
    }

    /// Reads the bundle again; a valid, different one replaces the config
    /// new handshakes get, a broken or empty one leaves the current config.
    /// Counted in `tls_reloads_total`; the caller logs.
    pub fn reload(&self) -> Result<CaReloaded, TlsError> {
        *self
            .attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = FileVersion::of(&self.path);
        let result = self.load_and_swap();
        let counter = match &result {
            Ok(_) => &self.metrics.reloads_success,
            Err(_) => &self.metrics.reloads_failure,
        };
        counter.inc();
        result
    }

    fn load_and_swap(&self) -> Result<CaReloaded, TlsError> {
        let ca = ClientCa::load(&self.path, self.flag)?;
        let mut in_use = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        if in_use.certificates == ca.certificates {
            return Ok(CaReloaded::Unchanged);
        }
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let config = server_config(self.resolver.clone(), &alpn, Some(&ca))?;
        let certificates = ca.len();
        self.config.replace(config);
        *in_use = ca;
        Ok(CaReloaded::Replaced { certificates })
    }
}

impl std::fmt::Debug for ReloadableClientCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableClientCa")
            .field("path", &self.path)
            .field("flag", &self.flag)
            .finish_non_exhaustive()
    }
}
