//! TCP mode: byte-for-byte passthrough. `copy_bidirectional` forwards a FIN
//! from either side as a write shutdown on the other, so half-closed streams
//! work. Streams run until they end, go idle for --tunnel-idle-timeout, or the
//! drain deadline forces them.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::ProxyContext;
use super::relay::relay;
use super::upstream::UpstreamError;
use crate::drain::ConnectionGuard;
use crate::metrics::Protocol;

/// `client` is the accepted socket, or the TLS session on it (`proxy::tls`):
/// the app gets the decrypted bytes, and the client's close_notify or ours
/// travels as the FIN it stands for.
pub async fn serve_stream<S>(mut client: S, mut guard: ConnectionGuard, ctx: Arc<ProxyContext>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    guard.set_protocol(Protocol::Tcp);
    let force = &ctx.lifecycle.tokens.force;
    let connected = tokio::select! {
        connected = ctx.upstream.connect_tcp() => connected,
        () = force.cancelled() => {
            guard.mark_forced();
            return;
        }
    };
    let mut upstream = match connected {
        Ok(stream) => stream,
        Err(error) => {
            if let Some(left_out) = ctx.upstream_failure_log.admit() {
                tracing::warn!(error = %error, left_out, "upstream connection failed");
            }
            ctx.lifecycle.metrics.upstream_error(error.kind());
            if matches!(error, UpstreamError::Connect { .. }) {
                ctx.lifecycle.set_upstream_up(false);
            }
            return;
        }
    };
    let idle_timeout = ctx.config.tunnel_idle_timeout;
    tokio::select! {
        ended = relay(&mut client, &mut upstream, idle_timeout) => ended.log("tcp stream"),
        () = force.cancelled() => guard.mark_forced(),
    }
}
