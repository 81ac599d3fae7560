//! The client connection of the HTTP/1 engine: Pingora's stream as the listener accepted it
//! (plain TCP, or TLS once Pingora's listener finished the handshake), or, once a plain
//! connection has shown it is kept alive, the socket itself.
//!
//! Why: every read through Pingora's stream goes through three layers and, when it has to
//! wait, reads the clock twice (Pingora times how long reads wait), and every write ends in a
//! flush through its write buffer: about 700 of the path's 12,700 instructions per request
//! (callgrind), for bookkeeping nothing on this path reads. Pingora's stream does not give its
//! socket back, so [`ClientStream::own`] duplicates the descriptor and drops the stream (the
//! WebSocket tunnel does the same to move runtimes). That costs four syscalls once per connection
//! (`fcntl`, two `epoll_ctl`, `close`), which is why a connection is taken over only after its
//! first kept-alive exchange: a connection that serves one request pays nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Pingora's plain-TCP client stream.
pub(crate) type PlainStream = pingora::protocols::l4::stream::Stream;

/// A client connection of the HTTP/1 engine.
pub(crate) enum ClientStream {
    /// Pingora's plain-TCP stream, as accepted.
    Pingora(Box<PlainStream>),
    /// The socket itself, registered with the worker's reactor.
    Own(TcpStream),
    /// A TLS stream from Pingora's listener (it cannot be taken apart).
    Tls(pingora::protocols::Stream),
}

impl ClientStream {
    /// Takes the socket off Pingora's stream, once. When the descriptor cannot be duplicated
    /// or registered, the connection stays on Pingora's stream, unchanged.
    pub(crate) fn own(&mut self) {
        let ClientStream::Pingora(stream) = self else {
            return;
        };
        // Nothing should be buffered (every write is flushed), but never lose bytes: a flush
        // that cannot finish at once leaves the connection as it is rather than wait.
        let mut cx = Context::from_waker(Waker::noop());
        if !matches!(
            Pin::new(&mut **stream).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ) {
            return;
        }
        let Some(socket) = duplicate(stream) else {
            return;
        };
        // Registered before Pingora's stream goes: on failure nothing is lost. Until then the
        // reactor knows the socket under both descriptors, which epoll allows.
        let Ok(socket) = TcpStream::from_std(socket) else {
            return;
        };
        // Dropping Pingora's stream deregisters and closes the original descriptor; the
        // connection lives on in the duplicate.
        *self = ClientStream::Own(socket);
    }

    /// Whether the connection is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

/// A second descriptor for the socket `stream` owns, for use once `stream` is dropped (which
/// deregisters and closes its own). It shares the original's file description, so it is
/// already non-blocking. `None` when no descriptor is left.
pub(crate) fn duplicate(stream: &PlainStream) -> Option<std::net::TcpStream> {
    // SAFETY: the descriptor is the live socket `stream` owns; `F_DUPFD_CLOEXEC` only reads it
    // and returns a new descriptor that nobody else owns.
    let dup = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: `dup` is a fresh descriptor of a connected TCP socket, owned from here on.
    (dup >= 0).then(|| unsafe { std::net::TcpStream::from_raw_fd(dup) })
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Pingora(stream) => Pin::new(stream).poll_read(cx, buf),
            ClientStream::Own(socket) => Pin::new(socket).poll_read(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Pingora(stream) => Pin::new(stream).poll_write(cx, buf),
            ClientStream::Own(socket) => Pin::new(socket).poll_write(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Pingora(stream) => Pin::new(stream).poll_flush(cx),
            ClientStream::Own(socket) => Pin::new(socket).poll_flush(cx),
            ClientStream::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Pingora(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientStream::Own(socket) => Pin::new(socket).poll_shutdown(cx),
            ClientStream::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
