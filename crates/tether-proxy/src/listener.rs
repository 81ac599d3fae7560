//! The connection entry: every accepted client connection comes here (Pingora's `ServerApp`
//! extension point), is counted and capped (`server.limits.max_connections`: 503 and close
//! beyond it), and is given to its engine, once, for its whole life: HTTP/2 (TLS with ALPN
//! `h2`) to the HTTP/2 engine (`crate::h2`), everything else to the HTTP/1 engine
//! (`crate::h1`).

use crate::h1::client::{ClientStream, PlainStream};
use crate::metrics::Metrics;
use crate::state::ProxyState;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Caps and counts open client connections, and picks each one's engine.
pub struct ConnectionCap {
    state: Arc<ProxyState>,
    open: Arc<AtomicUsize>,
}

impl ConnectionCap {
    /// The cap is read from the config in force for each connection.
    pub fn new(state: Arc<ProxyState>) -> ConnectionCap {
        ConnectionCap {
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
impl ServerApp for ConnectionCap {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let max = self.state.current().config.server.limits.max_connections;
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            Metrics::global()
                .downstream_closed
                .with_label_values(&["max_connections"])
                .inc();
            // An HTTP/1 client learns why; an h2 client just sees the close.
            if !h2 {
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
        // Each engine serves the connection on a task of its own, sized by the engine's
        // future alone: the task Pingora spawned for the accept also holds its TLS
        // handshake's state (8.8 KB), which a connection that lives for hours (an SSE stream,
        // an idle keep-alive) should not keep.
        self.state.closing.follow(shutdown);
        if h2 {
            tokio::spawn(crate::h2::serve(
                self.state.clone(),
                stream,
                Box::new(admitted),
            ));
            return None;
        }
        let client_ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(SocketAddr::ip));
        let client = if stream.as_any().is::<PlainStream>() {
            match stream.into_any().downcast::<PlainStream>() {
                Ok(plain) => ClientStream::Pingora(plain),
                Err(_) => return None,
            }
        } else {
            ClientStream::Tls(stream)
        };
        tokio::spawn(crate::h1::serve(
            self.state.clone(),
            client,
            client_ip,
            Box::new(admitted),
        ));
        None
    }
}
