//! TLS on the proxy listener: the handshake of each accepted connection, then
//! the connection handed to its protocol as a stream like any other. Nothing
//! here reads a request: the drain signals, timeouts and headers are the
//! cleartext ones, applied by `http` and `tcp` to the decrypted stream.
//!
//! The connection is counted from accept (its guard is taken before the
//! handshake), so a drain waits for handshakes in progress, and the deadline
//! cuts them like any connection.

use std::net::SocketAddr;
use std::sync::Arc;

use ::http::HeaderValue;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;

use super::ProxyContext;
use super::http::{self, TlsFacts};
use super::tcp;
use crate::config::Mode;
use crate::drain::ConnectionGuard;
use crate::metrics::TimeoutKind;
use crate::tls::{Handshaker, PeerIdentity};

/// One TLS record's worth of plaintext: a whole request head, usually.
const FIRST_READ: usize = 16 * 1024;

pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ctx: Arc<ProxyContext>,
    handshaker: Handshaker,
) {
    let accepted = tokio::select! {
        accepted = handshaker.accept(stream) => accepted,
        () = ctx.lifecycle.tokens.force.cancelled() => {
            guard.mark_forced();
            return;
        }
    };
    let stream = match accepted {
        Ok(stream) => stream,
        Err(e) => {
            // Counted by reason in tls_handshake_failures_total; a scanner or
            // a misconfigured client must not flood the log.
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    match ctx.config.mode {
        Mode::Http => {
            let mut stream = stream;
            let Some(first) = first_bytes(&mut stream, &ctx).await else {
                return;
            };
            let client_cert = PeerIdentity::of(stream.get_ref().1)
                .and_then(|identity| HeaderValue::try_from(identity.header_value()).ok());
            let facts = TlsFacts { client_cert };
            http::serve_tls_connection(stream, first, peer, guard, ctx, facts).await;
        }
        Mode::Tcp => tcp::serve_stream(stream, guard, ctx).await,
    }
}

/// The connection's first decrypted bytes, read before hyper takes it, as
/// the cleartext path's sniffing does: hyper's graceful shutdown closes an
/// HTTP/1 connection it has read nothing from as idle, which over TLS loses
/// a request that was already on its way (hyperium/hyper#3792). With the
/// bytes in hand, hyper parses the request before it sees the shutdown.
/// `None`: the client sent nothing within --header-read-timeout, closed, or
/// the listener closed first (an idle connection goes with it, as in
/// cleartext).
async fn first_bytes(stream: &mut TlsStream<TcpStream>, ctx: &ProxyContext) -> Option<Vec<u8>> {
    let mut first = vec![0u8; FIRST_READ];
    let read = tokio::select! {
        read = timeout(ctx.config.header_read_timeout, stream.read(&mut first)) => read,
        () = ctx.lifecycle.tokens.stop_accepting.cancelled() => return None,
    };
    match read {
        Ok(Ok(n)) if n > 0 => {
            first.truncate(n);
            Some(first)
        }
        Ok(_) => None,
        Err(_) => {
            ctx.lifecycle.metrics.timed_out(TimeoutKind::HeaderRead);
            None
        }
    }
}
