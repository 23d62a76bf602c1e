//! Certificate files → a checked [`CertifiedKey`], and the reloadable
//! resolver that serves the current one.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{TlsError, provider};
use crate::metrics::TlsMetrics;

/// Where a certificate and its key come from, and the flags that named them
/// (every error message says both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// e.g. `--tls-cert`
    pub cert_flag: &'static str,
    /// e.g. `--tls-key`
    pub key_flag: &'static str,
}

impl CertFiles {
    /// The current versions of both files, `None` if either is missing.
    pub fn versions(&self) -> Option<FileVersions> {
        Some(FileVersions {
            cert: FileVersion::of(&self.cert)?,
            key: FileVersion::of(&self.key)?,
        })
    }
}

/// What identifies one version of a file: metadata of the path with symlinks
/// resolved. Kubernetes replaces a Secret volume by pointing `..data` at a new
/// directory, so the resolved file is a new inode even when size and mtime
/// match; an editor or `cp` changes mtime or size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersion {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileVersion {
    pub(super) fn of(path: &Path) -> Option<FileVersion> {
        use std::os::unix::fs::MetadataExt;
        // `metadata` follows symlinks, every level of them.
        let meta = fs::metadata(path).ok()?;
        Some(FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// The versions of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersions {
    cert: FileVersion,
    key: FileVersion,
}

/// A loaded, checked pair: the chain and key rustls serves, plus the facts
/// the metrics and logs want.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// notAfter of the end-entity certificate, Unix seconds.
    pub not_after: i64,
    /// The end-entity certificate's subject, for logs.
    pub subject: String,
}

fn read_error(flag: &'static str, path: &Path) -> impl FnOnce(pem::Error) -> TlsError {
    let path = path.to_path_buf();
    move |e| match e {
        pem::Error::Io(source) => TlsError::Read { flag, path, source },
        source => TlsError::Pem { flag, path, source },
    }
}

/// Every certificate in a PEM file, in order; an empty file is an error.
pub fn load_certificates(
    path: &Path,
    flag: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read once, parse the bytes: a file swapped between an open for the
    // chain and one for a re-read must not mix two versions.
    let pem_bytes = fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(flag, path))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(
    path: &Path,
    flag: &'static str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem_bytes = fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem_bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            flag,
            path: path.to_path_buf(),
        },
        e => read_error(flag, path)(e),
    })
}

/// Loads the pair, checks that the key belongs to the end-entity
/// certificate, and reads its notAfter. Nothing is served from here: the
/// caller decides whether the pair replaces the current one.
pub fn load_pair(files: &CertFiles, provider: &CryptoProvider) -> Result<LoadedCert, TlsError> {
    let chain = load_certificates(&files.cert, files.cert_flag)?;
    let key = load_private_key(&files.key, files.key_flag)?;
    let (not_after, subject) =
        end_entity_facts(&chain[0]).map_err(|reason| TlsError::Certificate {
            flag: files.cert_flag,
            path: files.cert.clone(),
            reason,
        })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedKey {
            flag: files.key_flag,
            path: files.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // ring's signing keys all report their public key, so "unknown" cannot
    // happen here; treat it as a mismatch rather than serve an unchecked pair.
    certified
        .keys_match()
        .map_err(|source| TlsError::KeyMismatch {
            files: Box::new(files.clone()),
            source,
        })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        not_after,
        subject,
    })
}

/// (notAfter in Unix seconds, subject) of a DER certificate. rustls and
/// webpki keep the validity private, hence x509-parser for this one field.
fn end_entity_facts(der: &CertificateDer<'_>) -> Result<(i64, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    Ok((
        cert.validity().not_after.timestamp(),
        cert.subject().to_string(),
    ))
}

// === impl ReloadableCert ===

/// The server certificate of one listener, swappable while it serves.
///
/// rustls asks [`ResolvesServerCert::resolve`] once per handshake, so a swap
/// reaches every new handshake and no established connection (those keep the
/// keys they negotiated). The lock is held only to clone or replace an `Arc`,
/// never across an await or a file read.
#[derive(Debug)]
pub struct ReloadableCert {
    files: CertFiles,
    current: RwLock<LoadedCert>,
    /// The file versions the last load read (taken just before reading: a
    /// change during the read shows as a new version at the next poll).
    attempted: Mutex<Option<FileVersions>>,
    metrics: TlsMetrics,
    provider: Arc<CryptoProvider>,
}

/// What a successful [`ReloadableCert::reload`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub not_after: i64,
    pub subject: String,
}

impl ReloadableCert {
    /// The first load, at start-up: an error here is a start-up error.
    pub fn load(files: CertFiles, metrics: TlsMetrics) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let attempted = files.versions();
        let loaded = load_pair(&files, &provider)?;
        metrics.certificate_expiry.set(loaded.not_after as f64);
        Ok(Arc::new(ReloadableCert {
            files,
            current: RwLock::new(loaded),
            attempted: Mutex::new(attempted),
            metrics,
            provider,
        }))
    }

    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }

    /// The pair new handshakes get.
    pub fn current(&self) -> LoadedCert {
        // A poisoned lock only means a panic elsewhere while it was held for
        // a clone or an assignment, neither of which leaves it half-written.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The file versions the last load (or attempt) read.
    pub fn attempted(&self) -> Option<FileVersions> {
        self.attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads the files again; on success new handshakes get the new pair, on
    /// failure the current pair stays. Counted in `tls_reloads_total`; the
    /// caller logs (it knows why it reloaded).
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        *self
            .attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.files.versions();
        match load_pair(&self.files, &self.provider) {
            Ok(loaded) => {
                let reloaded = Reloaded {
                    not_after: loaded.not_after,
                    subject: loaded.subject.clone(),
                };
                self.metrics.certificate_expiry.set(loaded.not_after as f64);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded;
                self.metrics.reloads_success.inc();
                Ok(reloaded)
            }
            Err(e) => {
                self.metrics.reloads_failure.inc();
                Err(e)
            }
        }
    }
}

impl ResolvesServerCert for ReloadableCert {
    // One certificate per listener: SNI is not used to choose (a client
    // asking for a name the certificate does not cover gets it anyway and
    // decides itself, as with any single-certificate server).
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .key
                .clone(),
        )
    }
}
