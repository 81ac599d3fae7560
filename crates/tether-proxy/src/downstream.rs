//! Guards on client connections that Pingora does not have, as wrappers around its apps (its
//! own extension points, no change to Pingora):
//!
//! - [`ConnectionCap`] counts every accepted connection (`tether_downstream_connections`) and
//!   answers 503 and closes the ones over `server.limits.max_connections`.
//! - [`HeaderDeadline`] closes a connection that has not sent a whole request header within
//!   `server.limits.header_timeout` (slowloris). Pingora's own timeout restarts on every read,
//!   so a client sending one byte a minute would hold a connection forever.
//!
//! It also applies the keep-alive limits and the HTTP/2 limits of `server.limits`.

use crate::metrics::Metrics;
use crate::state::ProxyState;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_config::Limits;
use tokio::io::AsyncWriteExt;

/// What one HTTP/1.x connection's requests share. HTTP/2 streams run in tasks of their own and
/// do not see it; their headers arrive whole, so they need no deadline.
#[derive(Default)]
struct ConnectionState {
    /// Requests started on this connection.
    requests: Cell<u32>,
    /// Whether the current request's header has been read.
    header_read: Cell<bool>,
}

tokio::task_local! {
    static CONNECTION: ConnectionState;
}

/// Called by the proxy as soon as a request header has been read: the deadline no longer
/// applies to this request.
pub fn mark_header_read() {
    let _ = CONNECTION.try_with(|c| c.header_read.set(true));
}

/// Caps and counts open client connections; wraps the whole HTTP app.
pub struct ConnectionCap<A> {
    inner: Arc<A>,
    state: Arc<ProxyState>,
    open: AtomicUsize,
}

impl<A> ConnectionCap<A> {
    /// Wraps `inner`; the cap is read from the config in force for each new connection.
    pub fn new(inner: A, state: Arc<ProxyState>) -> ConnectionCap<A> {
        ConnectionCap {
            inner: Arc::new(inner),
            state,
            open: AtomicUsize::new(0),
        }
    }
}

/// One admitted connection; uncounted when dropped.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
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
        let _admitted = Admitted(&self.open);
        CONNECTION
            .scope(
                ConnectionState::default(),
                self.inner.process_new(stream, shutdown),
            )
            .await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Puts a deadline on each HTTP/1.x request header and applies the keep-alive and HTTP/2
/// limits; wraps Pingora's `HttpProxy`.
pub struct HeaderDeadline<A> {
    inner: Arc<A>,
    state: Arc<ProxyState>,
    options: HttpServerOptions,
}

impl<A> HeaderDeadline<A> {
    /// Wraps `inner`. `options` (keep-alive request cap, h2 idle timeout) are fixed at start;
    /// the deadline, keep-alive timeout and h2 limits follow the config in force.
    pub fn new(inner: A, state: Arc<ProxyState>, limits: &Limits) -> HeaderDeadline<A> {
        HeaderDeadline {
            inner: Arc::new(inner),
            state,
            options: server_options(limits),
        }
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

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for HeaderDeadline<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let installed = self.state.current();
        let limits = &installed.config.server.limits;
        // Pingora sets None when shutting down; keep that.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(limits.keepalive_timeout.as_secs().max(1)));
        }
        let earlier = CONNECTION.try_with(|c| {
            c.header_read.set(false);
            let n = c.requests.get();
            c.requests.set(n.saturating_add(1));
            n
        });
        let Ok(earlier) = earlier else {
            return self.inner.process_new_http(session, shutdown).await;
        };
        // A reused connection may first sit idle for the keep-alive timeout.
        let deadline = if earlier == 0 {
            limits.header_timeout
        } else {
            limits.header_timeout + limits.keepalive_timeout
        };
        drop(installed);
        let work = self.inner.process_new_http(session, shutdown);
        tokio::pin!(work);
        match tokio::time::timeout(deadline, &mut work).await {
            Ok(reused) => reused,
            Err(_) if CONNECTION.with(|c| c.header_read.get()) => work.await,
            Err(_) => {
                // Dropping the request closes the connection.
                Metrics::global()
                    .downstream_closed
                    .with_label_values(&["header_timeout"])
                    .inc();
                None
            }
        }
    }

    fn h2_options(&self) -> Option<H2Options> {
        Some(h2_options(&self.state.current().config.server.limits))
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}
