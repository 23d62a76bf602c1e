//! TCP mode: byte-for-byte passthrough. `copy_bidirectional` forwards a FIN
//! from either side as a write shutdown on the other, so half-closed streams
//! work. Streams run until they end, go idle for --tunnel-idle-timeout, or the
//! drain deadline forces them. With the access log on, one line per stream.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::ProxyContext;
use super::relay::{RelayEnd, Transferred, relay};
use super::upstream::UpstreamError;
use crate::drain::ConnectionGuard;
use crate::metrics::Protocol;
use crate::observe::access_log::{End, Entry};

/// `client` is the accepted socket, or the TLS session on it (`proxy::tls`):
/// the app gets the decrypted bytes, and the client's close_notify or ours
/// travels as the FIN it stands for.
pub async fn serve_stream<S>(mut client: S, mut guard: ConnectionGuard, ctx: Arc<ProxyContext>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    guard.set_protocol(Protocol::Tcp);
    let started = Instant::now();
    let mut entry = ctx
        .observer
        .access_log
        .is_some()
        .then(|| Entry::new(&ctx.ids.next_bytes(), "tcp", ctx.lifecycle.phase().as_str()));
    let log = |entry: Option<Entry>, end: End, bytes: Option<&Transferred>| {
        let (Some(mut entry), Some(log)) = (entry, &ctx.observer.access_log) else {
            return;
        };
        if let Some(bytes) = bytes {
            entry.request_bytes = Some(bytes.from_a.load(std::sync::atomic::Ordering::Relaxed));
            entry.response_bytes = bytes.from_b.load(std::sync::atomic::Ordering::Relaxed);
        }
        entry.duration = started.elapsed();
        entry.end = end;
        log.submit(Box::new(entry));
    };
    let force = &ctx.lifecycle.tokens.force;
    let connected = tokio::select! {
        connected = ctx.upstream.connect_tcp() => connected,
        () = force.cancelled() => {
            guard.mark_forced();
            log(entry, End::Forced, None);
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
            log(entry, End::Upstream(error.kind().as_str()), None);
            return;
        }
    };
    if let Some(entry) = &mut entry {
        entry.upstream_head = Some(started.elapsed());
        entry.upstream_reused = Some(false);
    }
    let idle_timeout = ctx.config.tunnel_idle_timeout;
    let bytes = Transferred::default();
    let end = tokio::select! {
        ended = relay(&mut client, &mut upstream, idle_timeout, &bytes) => {
            let end = match &ended {
                RelayEnd::Finished => End::Ok,
                RelayEnd::Idle => End::IdleTimeout,
                RelayEnd::Failed(_) => End::Aborted,
            };
            ended.log("tcp stream");
            end
        }
        () = force.cancelled() => {
            guard.mark_forced();
            End::Forced
        }
    };
    log(entry, end, Some(&bytes));
}
