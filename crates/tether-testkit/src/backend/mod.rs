//! [`TestBackend`]: a real HTTP/WebSocket/SSE app server on 127.0.0.1 that a test can kill.

mod endpoints;
mod sse;
mod websocket;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use http::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Result, TestkitError};

/// A backend app server for end-to-end tests, serving on `127.0.0.1` until stopped or dropped.
///
/// Every response carries `x-backend: <name>`. What it answers, by the last path segment
/// (or the query flag in brackets), whatever the path before it:
///
/// | request | answer |
/// | --- | --- |
/// | `Upgrade: websocket` | WebSocket echo of text and binary, in order; sends nothing first |
/// | `.../healthz` | 200 `ok`, or 503 after [`set_healthy(false)`](Self::set_healthy) |
/// | `.../sse` (`?sse=1`) | `text/event-stream`: `count` (3) events `interval_ms` (100) apart, each `{"backend","seq","sent_unix_micros"}`; `hold=1` keeps it open after |
/// | `.../poll?wait_ms=N` (`?poll=1`) | waits N ms (1000), then 200 `{"backend","waited_ms"}` |
/// | `.../slow?ms=N` (`?slow=1`) | waits N ms (1000) before the response head, then the echo below |
/// | anything else | 200 JSON `{"backend","method","path","headers","body"}`: `path` is the raw path and query, `headers` lower-case names, repeats joined by `", "` |
///
/// [`stop`](Self::stop) (or drop) closes the listener and every open connection at once,
/// WebSockets and event streams included, like a killed process.
#[derive(Debug)]
pub struct TestBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// State shared by the accept loop, every connection and the test's handle.
#[derive(Debug)]
struct Shared {
    name: String,
    name_header: HeaderValue,
    healthy: AtomicBool,
    requests: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    /// Request targets (path and query) in arrival order, for "never reached the backend" checks.
    seen_targets: std::sync::Mutex<Vec<String>>,
    health_checks: AtomicU64,
    open_websockets: AtomicUsize,
    open_event_streams: AtomicUsize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl TestBackend {
    /// Starts a backend called `name` on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If no loopback port can be bound or `name` is not a valid header value; a test cannot
    /// go on without its backend.
    pub async fn start(name: &str) -> TestBackend {
        match Self::start_at(name, SocketAddr::from(([127, 0, 0, 1], 0))).await {
            Ok(backend) => backend,
            Err(err) => panic!("cannot start test backend {name:?}: {err}"),
        }
    }

    /// Starts a backend on a given address, e.g. the address of a stopped one, to bring it back.
    pub async fn start_at(name: &str, addr: SocketAddr) -> Result<TestBackend> {
        let name_header = HeaderValue::from_str(name)
            .map_err(|_| TestkitError::InvalidBackendName(name.to_owned()))?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            name_header,
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            seen_targets: std::sync::Mutex::new(Vec::new()),
            health_checks: AtomicU64::new(0),
            open_websockets: AtomicUsize::new(0),
            open_event_streams: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        shared
            .tasks
            .spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(TestBackend { addr, shared })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name, as sent in `x-backend`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// `http://<addr><path>`, for talking to it directly.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Makes `/healthz` answer 200 (`true`) or 503 (`false`).
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Every request target (path and query) received so far, in order.
    pub fn seen_targets(&self) -> Vec<String> {
        self.shared
            .seen_targets
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Requests received so far, including upgrades and health checks.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far (a proxy reusing its connections opens few).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Requests to `/healthz` received so far (a subset of [`requests`](Self::requests)).
    pub fn health_checks(&self) -> u64 {
        self.shared.health_checks.load(Ordering::SeqCst)
    }

    /// WebSockets open right now.
    pub fn open_websockets(&self) -> usize {
        self.shared.open_websockets.load(Ordering::SeqCst)
    }

    /// SSE responses being streamed right now.
    pub fn open_event_streams(&self) -> usize {
        self.shared.open_event_streams.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes every open connection; returns once all are closed.
    pub async fn stop(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        // Tasks see the cancellation and drop their sockets on their own.
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                shared
                    .tasks
                    .spawn(serve_connection(stream, Arc::clone(&shared)));
            }
            // Transient (e.g. the peer reset before accept); yield so an error storm cannot spin.
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // Event streams are latency-measured; Nagle would hold small chunks back.
    let _ = stream.set_nodelay(true);
    let service_state = Arc::clone(&shared);
    let service = service_fn(move |req| endpoints::handle(req, Arc::clone(&service_state)));
    let connection = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    // Dropping the connection future closes the socket, which is what stop() promises.
    tokio::select! {
        _ = shared.shutdown.cancelled() => {}
        _ = connection => {}
    }
}

/// Counts one open stream in a gauge of [`Shared`] for as long as it lives.
struct OpenGuard {
    shared: Arc<Shared>,
    gauge: fn(&Shared) -> &AtomicUsize,
}

impl OpenGuard {
    fn new(shared: Arc<Shared>, gauge: fn(&Shared) -> &AtomicUsize) -> Self {
        gauge(&shared).fetch_add(1, Ordering::SeqCst);
        OpenGuard { shared, gauge }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.shared).fetch_sub(1, Ordering::SeqCst);
    }
}
