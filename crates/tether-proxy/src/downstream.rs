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
//! The keep-alive and HTTP/2 limits of `server.limits` are Pingora options: [`server_options`],
//! [`h2_options`].

use crate::metrics::Metrics;
use crate::state::ProxyState;
use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_config::Limits;
use tokio::io::AsyncWriteExt;
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
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let work = self.inner.process_new(stream, shutdown);
        if h2 {
            return work.await;
        }
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
        };
        CONNECTION
            .scope(state, async {
                tokio::select! {
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
                }
            })
            .await
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
