//! The byte relay of TCP mode and of upgraded (WebSocket) connections: both
//! directions copied until each side has closed, a half-close passed on as a
//! write shutdown (`copy_bidirectional`), and the pair cut once no byte has
//! moved either way for `--tunnel-idle-timeout`.
//!
//! Activity is the byte counts the reads bump (no clock read per I/O); a
//! timer looks at them eight times per timeout, so an idle pair is cut
//! between one and one and an eighth timeouts after its last byte. The same
//! counts are the access log's byte fields, readable even when the relay was
//! dropped at the deadline.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, MissedTickBehavior, interval_at};

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed.
    Finished,
    Failed(io::Error),
    /// Nothing moved for the idle timeout.
    Idle,
}

impl RelayEnd {
    /// Debug only: how a stream ends is routine, the metrics count the rest.
    pub fn log(self, what: &'static str) {
        match self {
            RelayEnd::Finished => {}
            RelayEnd::Failed(e) => tracing::debug!(error = %e, "{what} ended with an error"),
            RelayEnd::Idle => {
                tracing::debug!("{what} closed after --tunnel-idle-timeout without traffic");
            }
        }
    }
}

/// Bytes read from each side of a relay, and which side's I/O failed (a
/// reset, a broken pipe): `copy_bidirectional`'s error does not say.
#[derive(Debug, Default)]
pub struct Transferred {
    pub from_a: AtomicU64,
    pub from_b: AtomicU64,
    pub a_failed: AtomicBool,
    pub b_failed: AtomicBool,
}

impl Transferred {
    fn total(&self) -> u64 {
        self.from_a.load(Ordering::Relaxed) + self.from_b.load(Ordering::Relaxed)
    }
}

pub async fn relay<A, B>(
    a: &mut A,
    b: &mut B,
    idle_timeout: Duration,
    bytes: &Transferred,
) -> RelayEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Counted {
        io: a,
        bytes: &bytes.from_a,
        failed: &bytes.a_failed,
    };
    let mut b = Counted {
        io: b,
        bytes: &bytes.from_b,
        failed: &bytes.b_failed,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let tick = (idle_timeout / 8).max(Duration::from_millis(10));
    let mut ticks = interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut seen, mut quiet_since) = (0, Instant::now());
    loop {
        tokio::select! {
            copied = &mut copy => {
                return match copied {
                    Ok(_) => RelayEnd::Finished,
                    Err(e) => RelayEnd::Failed(e),
                };
            }
            _ = ticks.tick() => {
                let now_seen = bytes.total();
                if now_seen != seen {
                    (seen, quiet_since) = (now_seen, Instant::now());
                } else if quiet_since.elapsed() >= idle_timeout {
                    return RelayEnd::Idle;
                }
            }
        }
    }
}

/// An I/O object whose bytes read are counted, and its failures noted.
struct Counted<'a, T> {
    io: &'a mut T,
    bytes: &'a AtomicU64,
    failed: &'a AtomicBool,
}

impl<T> Counted<'_, T> {
    fn note<R>(&self, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Poll::Ready(Err(_)) = &polled {
            self.failed.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.bytes.fetch_add(read as u64, Ordering::Relaxed);
        }
        this.note(polled)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, buf);
        this.note(polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_flush(cx);
        this.note(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_shutdown(cx);
        this.note(polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test(start_paused = true)]
    async fn a_silent_pair_is_cut_and_a_talking_one_is_not() {
        let (mut client, mut proxy_client_side) = duplex(64);
        let (mut proxy_app_side, mut app) = duplex(64);
        let relayed = tokio::spawn(async move {
            relay(
                &mut proxy_client_side,
                &mut proxy_app_side,
                Duration::from_secs(8),
                &Transferred::default(),
            )
            .await
        });
        // Talking every 5 s keeps it open past several timeouts' worth of time.
        for _ in 0..6 {
            client.write_all(b"ping").await.unwrap();
            let mut got = [0; 4];
            app.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(!relayed.is_finished());
        }
        // 5 s of silence so far; cut once 8 s have passed, at the next 1 s tick.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        let ended = tokio::time::timeout(Duration::from_millis(1), relayed)
            .await
            .expect("not cut 9.5 s into an 8 s idle timeout");
        assert!(matches!(ended.unwrap(), RelayEnd::Idle));
    }
}
