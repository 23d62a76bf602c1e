//! The accept loop every drained listener shares (the proxy's, the
//! webhook's): accept until the lame-duck window ends, then take what the
//! kernel had already completed, then close.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Hands every accepted connection to `accepted` until `stop` is cancelled.
/// Connections already in the backlog at that moment would be reset by the
/// close, so they are handed over too (they get `Connection: close` or
/// GOAWAY from their handler). The listener is closed on return.
pub async fn accept_until_stopped(
    listener: TcpListener,
    stop: &CancellationToken,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let next = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            next = listener.accept() => next,
        };
        match next {
            Ok((stream, peer)) => accepted(stream, peer),
            Err(e) => accept_failed(e).await,
        }
    }
    while let Ok(Ok((stream, peer))) = timeout(Duration::ZERO, listener.accept()).await {
        accepted(stream, peer);
    }
}

async fn accept_failed(error: std::io::Error) {
    // Per-connection failures (the peer gave up) are routine; running out of
    // file descriptors is not, and retrying at once would spin.
    match error.kind() {
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted => {}
        _ => {
            tracing::warn!(error = %error, "accept failed; retrying shortly");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
