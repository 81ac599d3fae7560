//! Guards on client connections that Pingora does not have, wrapped around its app at the
//! connection level (its `ServerApp` extension point, no change to Pingora):
//!
//! - [`ConnectionCap`] counts every accepted connection (`tether_downstream_connections`) and
//!   answers 503 and closes the ones over `server.limits.max_connections`.
//! - It also closes an HTTP/1 connection that has not sent a whole request header within
//!   `server.limits.header_timeout` (slowloris): from the accept for the first request, from
//!   the end of the previous one (plus the keep-alive timeout) for later ones. Pingora's own
//!   timeout restarts on every read, so a client sending one byte a minute would hold a
//!   connection forever. The deadline is watched beside the connection's future, once per
//!   connection, and moved by the proxy's hooks ([`header_read`], [`request_done`]) through a
//!   task-local, so requests pay no extra layer.
//!
//! - It serves a plain-TCP HTTP/1 connection on Tether's own keep-alive path
//!   ([`crate::http1`]) until a request comes that the path leaves to Pingora; Pingora then
//!   serves the connection from that request on (the bytes already read are rewound).
//!
//! - It hands an HTTP/1 connection whose WebSocket handshake the proxy completed itself to
//!   [`crate::tunnel`] once Pingora has finished the request: every HTTP/1 stream is wrapped
//!   in a [`Tap`] that, when the proxy asked for it ([`hand_off`]), keeps the stream open
//!   instead of letting Pingora shut it down and drop it.
//!
//! The keep-alive and HTTP/2 limits of `server.limits` are Pingora options: [`server_options`],
//! [`h2_options`].

use crate::metrics::Metrics;
use crate::state::ProxyState;
use crate::tunnel::Tunnel;
use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_config::Limits;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// The header deadline of one HTTP/1 connection. HTTP/2 streams run in tasks of their own and
/// do not see it; an h2 connection gets no deadline (its headers arrive whole).
struct ConnectionState {
    /// Whether the connection is waiting for (the rest of) a request header.
    awaiting_header: Cell<bool>,
    /// When that wait ends the connection.
    deadline: Cell<Instant>,
    /// `header_timeout` and `keepalive_timeout` as they were at accept.
    header_timeout: Duration,
    keepalive_timeout: Duration,
    /// A WebSocket tunnel the proxy set up, waiting for Pingora to let go of the client.
    tunnel: Cell<Option<Box<Tunnel>>>,
    /// The client stream, kept by the [`Tap`] when Pingora dropped it during a hand-off.
    kept: Cell<Option<Stream>>,
    /// True from [`hand_off`] on.
    handing_off: Cell<bool>,
}

tokio::task_local! {
    static CONNECTION: ConnectionState;
}

/// Called by the proxy as soon as a request header has been read: the deadline no longer
/// applies to this request.
pub fn header_read() {
    let _ = CONNECTION.try_with(|c| c.awaiting_header.set(false));
}

/// Called by the proxy when a request is done: a kept-alive connection may idle for the
/// keep-alive timeout and then has `header_timeout` for the next header.
pub fn request_done() {
    let _ = CONNECTION.try_with(|c| {
        c.awaiting_header.set(true);
        c.deadline
            .set(Instant::now() + c.keepalive_timeout + c.header_timeout);
    });
}

/// Gives `tunnel` the client stream once Pingora is done with the current request (the
/// proxy answers the request itself and turns keep-alive off). False outside an HTTP/1
/// connection task.
pub fn hand_off(tunnel: Box<Tunnel>) -> bool {
    CONNECTION
        .try_with(|c| {
            c.tunnel.set(Some(tunnel));
            c.handing_off.set(true);
        })
        .is_ok()
}

fn handing_off() -> bool {
    CONNECTION
        .try_with(|c| c.handing_off.get())
        .unwrap_or(false)
}

/// The client stream as Pingora sees it: passes everything through, except that during a
/// hand-off it neither shuts the stream down nor closes it; dropping it parks the stream in
/// the connection's state for the tunnel.
#[derive(Debug)]
struct Tap {
    /// Always `Some` until dropped.
    inner: Option<Stream>,
}

impl Tap {
    fn inner(&mut self) -> std::io::Result<&mut Stream> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(stream) = self.inner.take() {
            // Outside the connection's scope (or without a hand-off) the stream just closes.
            let _ = CONNECTION.try_with(move |c| {
                if c.handing_off.get() {
                    c.kept.set(Some(stream));
                }
            });
        }
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().inner() {
            Ok(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().inner() {
            Ok(s) => Pin::new(&mut **s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if handing_off() {
            return Poll::Ready(Ok(()));
        }
        match self.get_mut().inner() {
            Ok(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[async_trait]
impl Shutdown for Tap {
    async fn shutdown(&mut self) {
        if handing_off() {
            return;
        }
        if let Some(s) = self.inner.as_mut() {
            Shutdown::shutdown(&mut **s).await;
        }
    }
}

impl UniqueID for Tap {
    fn id(&self) -> UniqueIDType {
        self.inner.as_ref().map_or(-1, |s| s.id())
    }
}

impl Ssl for Tap {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.as_ref().and_then(|s| s.get_ssl())
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.as_ref().and_then(|s| s.get_ssl_digest())
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.as_ref().and_then(|s| s.selected_alpn_proto())
    }
}

impl GetTimingDigest for Tap {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner
            .as_ref()
            .map_or_else(Vec::new, |s| s.get_timing_digest())
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner
            .as_ref()
            .map_or(Duration::ZERO, |s| s.get_read_pending_time())
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner
            .as_ref()
            .map_or(Duration::ZERO, |s| s.get_write_pending_time())
    }
}

impl GetProxyDigest for Tap {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.as_ref().and_then(|s| s.get_proxy_digest())
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        if let Some(s) = self.inner.as_mut() {
            s.set_proxy_digest(digest);
        }
    }
}

impl GetSocketDigest for Tap {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.as_ref().and_then(|s| s.get_socket_digest())
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        if let Some(s) = self.inner.as_mut() {
            s.set_socket_digest(digest);
        }
    }
}

#[async_trait]
impl Peek for Tap {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        match self.inner.as_mut() {
            Some(s) => s.try_peek(buf).await,
            None => Ok(false),
        }
    }
}

/// Resolves when the connection's header deadline passes while it waits for a header.
async fn header_deadline() {
    loop {
        let Ok((awaiting, deadline, period)) =
            CONNECTION.try_with(|c| (c.awaiting_header.get(), c.deadline.get(), c.header_timeout))
        else {
            return std::future::pending().await;
        };
        let now = Instant::now();
        if awaiting && now >= deadline {
            return;
        }
        // While a request is in flight, look again after a while: it may end and the next
        // wait begin.
        let wake = if awaiting { deadline } else { now + period };
        tokio::time::sleep_until(wake).await;
    }
}

/// Caps and counts open client connections; wraps the whole HTTP app.
pub struct ConnectionCap<A> {
    inner: Arc<A>,
    state: Arc<ProxyState>,
    open: Arc<AtomicUsize>,
}

impl<A> ConnectionCap<A> {
    /// Wraps `inner`; the cap is read from the config in force for each new connection.
    pub fn new(inner: A, state: Arc<ProxyState>) -> ConnectionCap<A> {
        ConnectionCap {
            inner: Arc::new(inner),
            state,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// One admitted connection; uncounted when dropped.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        Metrics::global().downstream_connections.dec();
    }
}

const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 24\r\nRetry-After: 1\r\nConnection: close\r\n\r\n503 too many connections\n";

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionCap<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let max = self.state.current().config.server.limits.max_connections;
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            Metrics::global()
                .downstream_closed
                .with_label_values(&["max_connections"])
                .inc();
            // An HTTP/1 client learns why; an h2 client (TLS ALPN) just sees the close.
            if !matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
                let write = async {
                    stream.write_all(OVER_CAPACITY).await?;
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
            }
            return None;
        }
        Metrics::global().downstream_connections.inc();
        let admitted = Admitted(self.open.clone());
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        // Plain-TCP HTTP/1 starts on Tether's own keep-alive path; Pingora takes over from
        // the first request that path leaves to it.
        let stream: Stream = if stream.as_any().is::<crate::http1::PlainStream>() {
            let Ok(plain) = stream.into_any().downcast::<crate::http1::PlainStream>() else {
                return None;
            };
            match crate::http1::serve(&self.state, plain, shutdown).await {
                crate::http1::Served::Done => return None,
                crate::http1::Served::ToPingora(plain) => plain,
            }
        } else {
            stream
        };
        let stream: Stream = Box::new(Tap {
            inner: Some(stream),
        });
        let work = self.inner.process_new(stream, shutdown);
        // Copied out, so a long-lived connection does not keep an old config alive.
        let (header_timeout, keepalive_timeout) = {
            let installed = self.state.current();
            let limits = &installed.config.server.limits;
            (limits.header_timeout, limits.keepalive_timeout)
        };
        let state = ConnectionState {
            awaiting_header: Cell::new(true),
            deadline: Cell::new(Instant::now() + header_timeout),
            header_timeout,
            keepalive_timeout,
            tunnel: Cell::new(None),
            kept: Cell::new(None),
            handing_off: Cell::new(false),
        };
        let (reused, tunnel, kept) = CONNECTION
            .scope(state, async {
                let reused = tokio::select! {
                    biased;
                    reused = work => reused,
                    () = header_deadline() => {
                        // Dropping the connection's future closes it.
                        Metrics::global()
                            .downstream_closed
                            .with_label_values(&["header_timeout"])
                            .inc();
                        None
                    }
                };
                let (tunnel, kept) = CONNECTION.with(|c| (c.tunnel.take(), c.kept.take()));
                (reused, tunnel, kept)
            })
            .await;
        let Some(tunnel) = tunnel else {
            return reused;
        };
        // Pingora dropped the stream (the proxy turned keep-alive off); should it ever hand
        // it back for reuse instead, take it from there.
        let client = kept.or_else(|| {
            reused
                .and_then(|s| s.into_any().downcast::<Tap>().ok())
                .and_then(|mut tap| tap.inner.take())
        });
        match client {
            Some(client) => crate::tunnel::start(client, *tunnel, admitted),
            None => tracing::debug!("WebSocket tunnel lost its client stream"),
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Pingora's per-connection options for `limits`.
pub fn server_options(limits: &Limits) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    // Pingora counts reuses after the first request; the config counts requests.
    options.keepalive_request_limit = limits
        .max_requests_per_connection
        .map(|n| n.saturating_sub(1));
    options.h2_idle_timeout = Some(limits.keepalive_timeout);
    options
}

/// HTTP/2 limits (catalogue M): streams per connection and header list size from `limits`,
/// Pingora's bounded defaults otherwise; the h2 crate bounds resets (Rapid Reset,
/// MadeYouReset) and CONTINUATION floods by default.
pub fn h2_options(limits: &Limits) -> H2Options {
    let mut options = default_h2_options();
    options.max_concurrent_streams(limits.max_concurrent_streams);
    options.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    options.initial_connection_window_size(1 << 20);
    options
}
