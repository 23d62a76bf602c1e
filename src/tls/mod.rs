//! TLS termination for lameduck's listeners (the proxy, the admin port, the
//! admission webhook), on rustls with the process's one crypto provider
//! (ring, installed in `main.rs`).
//!
//! What it offers, in the order a listener uses it:
//! - [`CertFiles`] names a certificate chain and key and the flags they came
//!   from; [`load_pair`] reads them through `rustls-pki-types` (PEM), checks
//!   that the key matches the certificate (`CertifiedKey::keys_match`) and
//!   reads the notAfter (x509-parser: rustls keeps it private).
//! - [`ReloadableCert`] is the listener's `ResolvesServerCert`: the current
//!   pair sits behind a lock held only to clone or swap an `Arc`, so a reload
//!   reaches new handshakes and leaves running connections alone.
//!   [`ReloadableCert::reload`] refuses a broken or mismatched pair and keeps
//!   the previous one.
//! - [`ReloadableClientCa`] is an mTLS listener's client CA bundle: a
//!   reload that reads a valid, different bundle builds a new `ServerConfig`
//!   (new verifier, new session keys) and swaps the [`CurrentServerConfig`]
//!   new handshakes take; a broken or empty bundle is refused and the
//!   previous config stays.
//! - [`watch_files`] is the reload task the caller owns, for either of them
//!   ([`WatchedFiles`]): polls the files (resolved through symlinks, as a
//!   Kubernetes Secret volume swaps `..data`) and reloads on a
//!   [`ReloadSignal`] (SIGHUP), until cancelled.
//! - [`server_config`] builds the `ServerConfig`: TLS 1.2 and 1.3 only,
//!   session tickets plus a bounded session cache, no 0-RTT, optional client
//!   certificates ([`ClientCa`], verified by `WebPkiClientVerifier`).
//! - [`Handshaker::accept`] runs one handshake under a timeout, counts it
//!   (`tls_handshakes_in_progress`, `tls_handshakes_total`,
//!   `tls_handshake_failures_total{reason}`) and answers cleartext HTTP with a
//!   short 400 instead of a TLS alert.
//! - [`PeerIdentity`] is the verified client certificate as the
//!   `x-forwarded-client-cert` header ([`CLIENT_CERT_HEADER`]).
//!
//! A leaf: uses `metrics`, never `proxy`, `admin` or `lifecycle`. No
//! hand-written PEM, X.509 or TLS code; no task is spawned here.

mod cert;
mod client_ca;
mod handshake;
mod identity;
mod watch;

pub use cert::{
    CertFiles, FileVersion, FileVersions, LoadedCert, ReloadableCert, Reloaded, load_certificates,
    load_pair, load_private_key,
};
pub use client_ca::{CaReloaded, ClientCa, CurrentServerConfig, ReloadableClientCa};
pub use handshake::{HandshakeError, Handshaker};
pub use identity::{CLIENT_CERT_HEADER, PeerIdentity};
pub use watch::{DEFAULT_POLL_INTERVAL, ReloadSignal, WatchedFiles, reload_and_log, watch_files};

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier};

/// ALPN for an HTTP listener: h2 preferred, HTTP/1.1 otherwise. A client
/// that offers no ALPN at all gets HTTP/1.1 (RFC 7540 §3.3 requires ALPN for
/// h2 over TLS).
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Sessions remembered for TLS 1.2 session-id resumption; tickets (stateless)
/// cover TLS 1.3 and TLS 1.2 clients that support them. 256 entries is
/// rustls' own default: bounded memory whatever the client count.
pub const SESSION_CACHE_ENTRIES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: cannot read: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: not valid PEM: {source:?}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{flag} {}: no PEM certificate (BEGIN CERTIFICATE) in the file", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file", path.display())]
    NoKey { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: unsupported private key: {source}", path.display())]
    UnsupportedKey {
        flag: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{flag} {}: cannot parse the certificate: {reason}", path.display())]
    Certificate {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{} {} does not belong to the certificate in {} {}: {source}",
        files.key_flag,
        files.key.display(),
        files.cert_flag,
        files.cert.display()
    )]
    KeyMismatch {
        files: Box<CertFiles>,
        source: rustls::Error,
    },
    #[error("{flag} {}: not a usable CA certificate: {source}", path.display())]
    ClientCa {
        flag: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{flag} {}: cannot verify client certificates with it: {source}", path.display())]
    ClientVerifier {
        flag: &'static str,
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The process's crypto provider. `main` installs ring before anything uses
/// rustls; code without a `main` (unit tests, benches) gets the same ring
/// provider, so every config in the process agrees.
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The server config of one listener. `alpn` in order of preference (empty:
/// no ALPN, e.g. TCP mode); `client_ca`: require and verify client
/// certificates signed by it.
///
/// Defaults, and why: TLS 1.2 and 1.3 only (1.0/1.1 are deprecated by RFC
/// 8996); rustls' cipher suites (AEAD only, forward secrecy only); stateless
/// tickets (ring's ticketer, key rotated every 6 h) and a bounded session
/// cache for resumption; no early data (0-RTT requests can be replayed).
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    client_ca: Option<&ClientCa>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider)
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    flag: ca.flag,
                    path: ca.path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
