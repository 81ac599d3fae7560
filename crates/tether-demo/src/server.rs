//! [`AppServer`]: one demo app server on a loopback port; [`spawn_in_background`] runs several
//! on a thread and runtime of their own, for a process whose main thread belongs to the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::docs::Docs;
use crate::error::DemoError;
use crate::routes;

/// How often long-poll viewers that stopped polling are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);

/// A demo app server, serving until [`stop`](Self::stop)ped or dropped.
#[derive(Debug)]
pub struct AppServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// What every connection of one server shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) name_header: HeaderValue,
    pub(crate) addr: SocketAddr,
    pub(crate) docs: Docs,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl AppServer {
    /// Starts a server called `name` (shown on its pages, sent as `x-app-server`) on `addr`;
    /// port 0 lets the OS pick. Must be called on a tokio runtime.
    pub async fn start(name: &str, addr: SocketAddr) -> Result<AppServer, DemoError> {
        let name_header =
            HeaderValue::from_str(name).map_err(|_| DemoError::InvalidName(name.to_owned()))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DemoError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DemoError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            name_header,
            addr,
            docs: Docs::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        shared
            .tasks
            .spawn(accept_loop(listener, Arc::clone(&shared)));
        shared.tasks.spawn(expire_viewers(Arc::clone(&shared)));
        Ok(AppServer { addr, shared })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Stops accepting and closes every connection; returns once all are closed.
    pub async fn stop(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Starts `count` servers named `app-1`, `app-2`, ... on 127.0.0.1, at `first_port`,
/// `first_port + 1`, ... (or OS-picked ports if `first_port` is 0), on a new thread with its own
/// tokio runtime, and returns their names and addresses once all listen. They serve until the
/// process exits.
pub fn spawn_in_background(
    count: usize,
    first_port: u16,
) -> Result<Vec<(String, SocketAddr)>, DemoError> {
    let mut addrs = Vec::with_capacity(count);
    for i in 0..count {
        let port = if first_port == 0 {
            0
        } else {
            u16::try_from(i)
                .ok()
                .and_then(|i| first_port.checked_add(i))
                .ok_or(DemoError::PortRange { first_port, count })?
        };
        addrs.push((
            format!("app-{}", i + 1),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tether-demo-app")
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tether-demo".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut servers = Vec::with_capacity(addrs.len());
                for (name, addr) in &addrs {
                    match AppServer::start(name, *addr).await {
                        Ok(server) => servers.push(server),
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    }
                }
                let listening = servers
                    .iter()
                    .map(|s| (s.name().to_owned(), s.addr()))
                    .collect();
                let _ = started_tx.send(Ok(listening));
                // The servers live as long as this future: until the process exits.
                std::future::pending::<()>().await;
            });
        })
        .map_err(DemoError::Runtime)?;
    started_rx.recv().map_err(|_| DemoError::ThreadDied)?
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                shared
                    .tasks
                    .spawn(serve_connection(stream, Arc::clone(&shared)));
            }
            // Transient (e.g. the peer reset before accept); yield so an error storm cannot spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // Edits are small writes that must go out at once; Nagle would hold them back.
    let _ = stream.set_nodelay(true);
    let service_state = Arc::clone(&shared);
    let service = service_fn(move |req| routes::handle(req, Arc::clone(&service_state)));
    let connection = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        _ = shared.shutdown.cancelled() => {}
        _ = connection => {}
    }
}

async fn expire_viewers(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = every.tick() => shared.docs.expire_viewers(Instant::now()),
        }
    }
}
