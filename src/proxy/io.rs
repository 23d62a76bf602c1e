//! The downstream socket as the HTTP server sees it: the bytes read while
//! sniffing the protocol are replayed first, and every read tells the
//! connection's [`ConnActivity`] that a request head may be arriving.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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

pub struct ServerIo {
    stream: TcpStream,
    replay: Replay,
    activity: Arc<ConnActivity>,
    track_heads: bool,
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
        ServerIo::new(stream, read, activity, protocol),
    )))
}

impl ServerIo {
    /// `read` is replayed to hyper before anything else from the socket.
    pub fn new(
        stream: TcpStream,
        read: Vec<u8>,
        activity: Arc<ConnActivity>,
        protocol: Protocol,
    ) -> Self {
        ServerIo {
            stream,
            replay: Replay {
                buf: read,
                start: 0,
            },
            activity,
            track_heads: protocol == Protocol::Http1,
        }
    }

    /// The socket and the bytes not yet replayed.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let mut read = self.replay.buf;
        read.drain(..self.replay.start);
        (self.stream, read)
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
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
