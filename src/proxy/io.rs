//! The downstream socket as the HTTP server sees it: the bytes read while
//! sniffing the protocol are replayed first, every read tells the
//! connection's [`ConnActivity`] that a request head may be arriving, and a
//! write that stays blocked for --send-timeout fails (a client that stopped
//! reading must not hold its connection, and the app connection behind it,
//! forever).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep, timeout};
use tokio_rustls::server::TlsStream;

use super::guard::ConnActivity;
use crate::metrics::Protocol;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes read before hyper took the connection (while sniffing, or by
/// lameduck's own HTTP/1 path), replayed before the socket's.
#[derive(Debug, Default)]
struct Replay {
    buf: Vec<u8>,
    start: usize,
}

/// The client's connection as hyper reads it: the socket, or a TLS session
/// on it (terminated by lameduck; see `proxy::tls`). Boxed: a TLS session is
/// large and most deployments never make one.
pub enum Downstream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl From<TcpStream> for Downstream {
    fn from(stream: TcpStream) -> Self {
        Downstream::Tcp(stream)
    }
}

macro_rules! on_stream {
    ($self:expr, $stream:ident => $body:expr) => {
        match $self {
            Downstream::Tcp($stream) => $body,
            Downstream::Tls($stream) => $body,
        }
    };
}

impl AsyncRead for Downstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Downstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_stream!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    /// On a TLS session: close_notify, then the TCP write shutdown.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// After lameduck's side of a connection is closed (close_notify and FIN
/// sent), how long it goes on reading, and discarding, what the client still
/// sends, until the client closes too. A socket closed with unread bytes in
/// it is answered with a reset, and a reset can destroy the last response in
/// the client's receive queue before the client has read it (nginx's
/// `lingering_close` exists for this). A TLS client's own close_notify and an
/// HTTP/2 client's WINDOW_UPDATE after the last response are such bytes; so
/// is a pipelined request after `Connection: close`. A client that keeps
/// sending past [`LINGER_BYTES`] is not absorbed (a flood cut off with a 431
/// must stay cut off): the socket is closed then, reset or not.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

pub struct ServerIo {
    stream: Downstream,
    replay: Replay,
    activity: Arc<ConnActivity>,
    track_heads: bool,
    send: SendTimer,
    /// Set once the write side is shut down: the bound on lingering.
    linger: Option<Pin<Box<Sleep>>>,
    /// Bytes dropped while lingering.
    lingered: usize,
}

/// --send-timeout for hyper's writes: armed when a write blocks, disarmed by
/// the next write that makes progress. The timer is allocated on the first
/// stall only; a connection whose writes never block never touches a clock.
pub struct SendTimer {
    limit: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    armed: bool,
    timeouts: Counter,
}

impl SendTimer {
    /// `timeouts` counts the connections it cuts.
    pub fn new(limit: Duration, timeouts: Counter) -> Self {
        SendTimer {
            limit,
            stall: None,
            armed: false,
            timeouts,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    pub fn counter(&self) -> &Counter {
        &self.timeouts
    }

    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if write.is_ready() {
            self.armed = false;
            return write;
        }
        if !self.armed {
            let deadline = Instant::now() + self.limit;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(sleep(self.limit))),
            }
            self.armed = true;
        }
        match self.stall.as_mut().map(|stall| stall.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                self.armed = false;
                self.timeouts.inc();
                Poll::Ready(Err(send_timed_out()))
            }
            _ => Poll::Pending,
        }
    }
}

fn send_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "write to the client blocked past --send-timeout",
    )
}

/// Writes all of `buf` to the client, failing with `TimedOut` (and counting
/// it) when one wait for the socket to take more lasts `limit`. The common
/// case, a socket that takes everything at once, sets no timer.
pub async fn write_all_within(
    stream: &TcpStream,
    mut buf: &[u8],
    limit: Duration,
    timeouts: &Counter,
) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if timeout(limit, stream.writable()).await.is_err() {
                    timeouts.inc();
                    return Err(send_timed_out());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// First read of a connection: usually the whole first request head.
const FIRST_READ: usize = 8 * 1024;

/// Reads the connection's first bytes and tells HTTP/2 prior knowledge from
/// HTTP/1 by them. Reads once more only while what arrived is a prefix of the
/// HTTP/2 preface. No buffer is allocated until the socket is readable, so a
/// connection that sends nothing costs none. `Ok(None)` if the peer closed
/// before sending anything.
pub async fn sniff(
    stream: TcpStream,
    activity: Arc<ConnActivity>,
    send: SendTimer,
) -> io::Result<Option<(Protocol, ServerIo)>> {
    let mut read = Vec::new();
    loop {
        stream.readable().await?;
        read.reserve(FIRST_READ);
        match stream.try_read_buf(&mut read) {
            Ok(0) if read.is_empty() => return Ok(None),
            Ok(0) => break,
            Ok(_) if read.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&read) => {}
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let protocol = if read.starts_with(H2_PREFACE) {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    Ok(Some((
        protocol,
        ServerIo::new(stream, read, activity, protocol, send),
    )))
}

impl ServerIo {
    /// `read` is replayed to hyper before anything else from the socket.
    pub fn new(
        stream: impl Into<Downstream>,
        read: Vec<u8>,
        activity: Arc<ConnActivity>,
        protocol: Protocol,
        send: SendTimer,
    ) -> Self {
        ServerIo {
            stream: stream.into(),
            replay: Replay {
                buf: read,
                start: 0,
            },
            activity,
            track_heads: protocol == Protocol::Http1,
            send,
            linger: None,
            lingered: 0,
        }
    }

    /// Reads and drops what the client still sends until it closes, fails,
    /// [`LINGER`] has passed or it has sent [`LINGER_BYTES`].
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(until) = self.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 1024];
        loop {
            if until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    self.lingered += buf.filled().len();
                    if self.lingered >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                // The client closed (or broke) its side: done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The socket, the bytes not yet replayed, and the send timer; `None`
    /// for a TLS session (lameduck's own HTTP/1 path works on sockets only).
    pub fn into_parts(self) -> Option<(TcpStream, Vec<u8>, SendTimer)> {
        let Downstream::Tcp(stream) = self.stream else {
            return None;
        };
        let mut read = self.replay.buf;
        read.drain(..self.replay.start);
        Some((stream, read, self.send))
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replay.start < this.replay.buf.len() {
            let pending = &this.replay.buf[this.replay.start..];
            let n = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..n]);
            this.replay.start += n;
            if this.replay.start == this.replay.buf.len() {
                this.replay = Replay::default();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.track_heads && buf.filled().len() > before {
            this.activity.on_bytes_read();
        }
        result
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let write = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.send.guard(cx, write)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let write = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.send.guard(cx, write)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    /// close_notify and FIN, then the linger (see [`LINGER`]).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(sleep(LINGER)));
        }
        this.poll_linger(cx)
    }
}
