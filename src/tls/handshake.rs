//! The server side of a handshake: bounded by a timeout, counted by outcome,
//! with a short plaintext answer for a client that speaks cleartext HTTP to
//! the TLS port.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rustls::ServerConfig;
use rustls::{HandshakeKind, PeerIncompatible};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::CurrentServerConfig;
use crate::metrics::{HandshakeFailure, TlsMetrics};

/// The first byte of every TLS record that starts a handshake (RFC 8446
/// §5.1, ContentType handshake(22)). SSLv2-style hellos start with a high
/// bit set instead; rustls rejects those itself.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a client that sent `GET / HTTP/1.1` to the TLS port reads, like
/// nginx's "plain HTTP request was sent to HTTPS port".
const PLAINTEXT_HINT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 44\r\n\
connection: close\r\n\
\r\n\
This port speaks TLS: use https:// instead.\n";

/// Accepts TLS on accepted TCP connections for one listener.
#[derive(Clone)]
pub struct Handshaker {
    /// Taken afresh for every handshake: a client CA reload replaces it.
    config: Arc<CurrentServerConfig>,
    timeout: Duration,
    metrics: TlsMetrics,
}

/// Why a handshake did not produce a stream; already counted.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({}): {detail}", reason.as_str())]
pub struct HandshakeError {
    pub reason: HandshakeFailure,
    pub detail: String,
}

/// Holds one unit of `tls_handshakes_in_progress` and gives it back however
/// the handshake ends, including by the future being dropped (a forced drain
/// cancels connection tasks mid-handshake).
struct InProgress(Gauge);

impl InProgress {
    fn start(gauge: &Gauge) -> Self {
        gauge.inc();
        InProgress(gauge.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Handshaker {
    /// Every handshake with `config`, for good.
    pub fn new(config: Arc<ServerConfig>, timeout: Duration, metrics: TlsMetrics) -> Self {
        Self::following(Arc::new(CurrentServerConfig::new(config)), timeout, metrics)
    }

    /// Every handshake with the config `config` holds at its start (a
    /// [`super::ReloadableClientCa`] replaces it).
    pub fn following(
        config: Arc<CurrentServerConfig>,
        timeout: Duration,
        metrics: TlsMetrics,
    ) -> Self {
        Handshaker {
            config,
            timeout,
            metrics,
        }
    }

    /// The config the next handshake gets.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.get()
    }

    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }

    /// Runs the handshake within the timeout. Failures are counted by reason
    /// and returned; successes are counted as new or resumed sessions.
    pub async fn accept(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let _in_progress = InProgress::start(&self.metrics.handshakes_in_progress);
        let deadline = Instant::now() + self.timeout;
        let handshake = self.handshake(tcp, deadline);
        let mut handshake = std::pin::pin!(handshake);
        // Not `timeout()`: on expiry the socket must still be open while the
        // failure is counted, so a client that sees the close also sees it
        // in the metrics (it is closed when `handshake` drops, below).
        let result = tokio::select! {
            // The handshake first: the plaintext answer's lingering read
            // ends at this same deadline, and its outcome is the truer one.
            biased;
            result = &mut handshake => result,
            () = tokio::time::sleep_until(deadline) => Err(HandshakeError {
                reason: HandshakeFailure::Timeout,
                detail: format!("not finished within {:?}", self.timeout),
            }),
        };
        match &result {
            Ok(stream) => {
                let counter = match stream.get_ref().1.handshake_kind() {
                    Some(HandshakeKind::Resumed) => &self.metrics.handshakes_resumed,
                    _ => &self.metrics.handshakes_full,
                };
                counter.inc();
            }
            Err(e) => self.metrics.handshake_failed(e.reason),
        }
        result
    }

    async fn handshake(
        &self,
        mut tcp: TcpStream,
        deadline: Instant,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let mut first = [0u8; 1];
        let peeked = tcp.peek(&mut first).await.map_err(|e| HandshakeError {
            reason: HandshakeFailure::Closed,
            detail: e.to_string(),
        })?;
        if peeked == 0 {
            return Err(HandshakeError {
                reason: HandshakeFailure::Closed,
                detail: "closed before the ClientHello".into(),
            });
        }
        if first[0] != TLS_HANDSHAKE_RECORD && first[0].is_ascii_uppercase() {
            // An HTTP method: answer in cleartext so a human sees why.
            answer_plaintext(&mut tcp, deadline).await;
            return Err(HandshakeError {
                reason: HandshakeFailure::PlaintextHttp,
                detail: "cleartext HTTP on the TLS port, answered 400".into(),
            });
        }
        TlsAcceptor::from(self.config.get())
            .accept(tcp)
            .await
            .map_err(classify)
    }
}

/// Writes the hint, then reads and discards what the client sent (bounded
/// by the handshake deadline) before the close: closing a socket with unread
/// input makes the kernel send RST, which can destroy the answer before the
/// client reads it.
async fn answer_plaintext(tcp: &mut TcpStream, deadline: Instant) {
    if tcp.write_all(PLAINTEXT_HINT).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut budget = 64 * 1024usize;
    while budget > 0 {
        match tokio::time::timeout_at(deadline, tcp.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
            _ => return,
        }
    }
}

/// Maps what tokio-rustls returned to a reason. rustls errors arrive wrapped
/// in `io::Error` (kind InvalidData); transport errors are the client going away.
fn classify(e: io::Error) -> HandshakeError {
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => reason_of(tls),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => HandshakeFailure::Closed,
            _ => HandshakeFailure::Other,
        },
    };
    HandshakeError {
        reason,
        detail: e.to_string(),
    }
}

pub(super) fn reason_of(e: &rustls::Error) -> HandshakeFailure {
    use rustls::Error;
    match e {
        Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            // signature_algorithms is a TLS 1.2 extension (RFC 5246
            // §7.4.1.4.1): a hello without it is a TLS 1.0/1.1 one, which
            // rustls refuses on this ground before it looks at the version.
            | PeerIncompatible::SignatureAlgorithmsExtensionRequired,
        ) => HandshakeFailure::ProtocolVersion,
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => HandshakeFailure::Incompatible,
        Error::NoCertificatesPresented | Error::InvalidCertificate(_) => {
            HandshakeFailure::ClientCertificate
        }
        Error::AlertReceived(_) => HandshakeFailure::PeerAlert,
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::PeerMisbehaved(_)
        | Error::PeerSentOversizedRecord
        | Error::DecryptError => HandshakeFailure::Malformed,
        _ => HandshakeFailure::Other,
    }
}
