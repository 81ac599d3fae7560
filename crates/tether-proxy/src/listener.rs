//! The connection entry: Tether's own accept loop on every configured listener. Each accepted
//! connection is counted and capped (`server.limits.max_connections`: 503 and close beyond
//! it), TLS ones are handshaken first (Pingora's rustls acceptor), and the connection is given
//! to its engine, once, for its whole life: HTTP/2 (TLS with ALPN `h2`) to the HTTP/2 engine
//! (`crate::h2`), everything else to the HTTP/1 engine (`crate::h1`).
//!
//! Why not Pingora's listening service: it spawns a task per connection whose future (8.8 KB,
//! sized for a TLS handshake) is moved and dropped even for plain TCP, arms a 60 s handshake
//! timer, and hands over its own stream type, which the HTTP/1 engine had to take apart again
//! (four syscalls per kept-alive connection) to read the socket directly. Here a plain
//! connection's socket goes straight to its engine's task, and is registered with the reactor
//! of the worker thread that serves it (Pingora's, like tokio's `accept`, registered it with
//! the accepting thread's: with several threads every readiness event crossed threads). The
//! listening sockets stay in Pingora's table of them, so a binary upgrade (`tether run
//! --upgrade`) hands them over as before.

use crate::h1::client::ClientStream;
use crate::metrics::Metrics;
use crate::state::ProxyState;
use async_trait::async_trait;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a TLS client has to finish its handshake (Pingora's listener allowed the same).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// The backlog of every listening socket (Pingora's, and the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 65535;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("listeners[{index}].address: cannot listen on {address}: {source}")]
pub struct ListenError {
    /// Index of the listener in `listeners`.
    pub index: usize,
    /// The address.
    pub address: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// One configured listener.
pub struct Endpoint {
    /// The address as configured: also the key of its socket in Pingora's table of listening
    /// sockets, which a binary upgrade hands over.
    key: String,
    /// Bound at start-up; `None` in an upgrade, where the socket comes from the running
    /// process (or is bound when the service starts, for a listener that is new).
    socket: Option<std::net::TcpListener>,
    /// The TLS acceptor of a TLS listener.
    tls: Option<Arc<Acceptor>>,
}

impl Endpoint {
    /// A listener on `address`, bound now unless `upgrade` (then its socket is taken from the
    /// process being replaced when the service starts).
    pub fn new(
        index: usize,
        address: SocketAddr,
        tls: Option<Acceptor>,
        upgrade: bool,
    ) -> Result<Endpoint, ListenError> {
        let socket = if upgrade {
            None
        } else {
            Some(bind(address).map_err(|source| ListenError {
                index,
                address,
                source,
            })?)
        };
        Ok(Endpoint {
            key: address.to_string(),
            socket,
            tls: tls.map(Arc::new),
        })
    }
}

/// A listening socket as the kernel should have it: address reuse (a restart does not wait
/// for the old connections' TIME_WAIT), Pingora's backlog, non-blocking for tokio.
fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Every listener of the proxy, as one Pingora service (so it runs on the proxy's worker
/// threads and takes part in Pingora's shutdown and upgrade).
pub struct Listeners {
    state: Arc<ProxyState>,
    /// Until the service starts, which takes them.
    endpoints: Vec<Endpoint>,
    /// Every listener's key in Pingora's table of listening sockets.
    keys: Vec<String>,
}

impl Listeners {
    /// Serves `endpoints` for `state`.
    pub fn new(state: Arc<ProxyState>, endpoints: Vec<Endpoint>) -> Listeners {
        let keys = endpoints.iter().map(|e| e.key.clone()).collect();
        Listeners {
            state,
            endpoints,
            keys,
        }
    }
}

#[async_trait]
impl Service for Listeners {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        self.state.closing.follow(&shutdown);
        let cap = Arc::new(Cap {
            state: self.state.clone(),
            open: AtomicUsize::new(0),
        });
        let mut loops = Vec::new();
        for endpoint in self.endpoints.drain(..) {
            let key = endpoint.key.clone();
            let listener = match listening_socket(endpoint.socket, &key, fds.as_ref()) {
                Ok(listener) => listener,
                Err(e) => {
                    // Only an upgrade gets here (otherwise the socket was bound at start-up,
                    // where an error stops the start with the listener's name).
                    tracing::error!("cannot listen on {key}: {e}");
                    std::process::exit(1);
                }
            };
            loops.push(tokio::spawn(accept_loop(
                listener,
                endpoint.tls,
                cap.clone(),
                shutdown.clone(),
            )));
        }
        for accept in loops {
            let _ = accept.await;
        }
    }

    fn name(&self) -> &str {
        "tether proxy"
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.keys.clone())
    }
}

/// The listening socket of `key`: the one bound at start-up, else the one the process being
/// replaced handed over, else a new one. Either way it ends up in Pingora's table, from which
/// the next upgrade hands it on.
fn listening_socket(
    bound: Option<std::net::TcpListener>,
    key: &str,
    fds: Option<&ListenFds>,
) -> std::io::Result<AsyncFd<std::net::TcpListener>> {
    let handed_over = fds.and_then(|fds| fds.lock().get(key).copied());
    let socket = match (bound, handed_over) {
        (Some(socket), _) => socket,
        (None, Some(fd)) => {
            // SAFETY: Pingora's table holds listening sockets received from the process being
            // replaced, one per address, and nothing else takes this one.
            let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            socket.set_nonblocking(true)?;
            socket
        }
        (None, None) => {
            let address = key
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            bind(address)?
        }
    };
    if let Some(fds) = fds {
        let mut fds = fds.lock();
        if fds.get(key).is_none() {
            fds.add(key.to_string(), socket.as_raw_fd());
        }
    }
    // SAFETY: a std `TcpListener` owns its descriptor until it is dropped, and `as_raw_fd`
    // always returns that one.
    Ok(unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?)
}

/// Accepts one connection: `accept4` with the socket non-blocking from the start, and not yet
/// registered with any reactor (tokio's `TcpListener::accept` registers it with the accepting
/// thread's, so with several worker threads every readiness event of a connection served on
/// another thread would cross threads).
fn accept(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: `accept4` writes at most `len` bytes of address into the storage `try_init`
    // provides and sets `len`; the descriptor it returns is new and owned from here on.
    let (fd, peer) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })
    }?;
    // SAFETY: `fd` is a connected TCP socket nobody else owns.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = peer
        .as_socket()
        .ok_or_else(|| std::io::Error::other("accepted a socket that is not IP"))?;
    Ok((socket, peer))
}

/// Accepts connections on `listener` until shutdown, each served on a worker thread Pingora
/// picks (as its own listener does) and registered with that thread's reactor.
async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    tls: Option<Arc<Acceptor>>,
    cap: Arc<Cap>,
    mut shutdown: ShutdownWatch,
) {
    loop {
        let accepted = tokio::select! {
            ready = listener.readable() => match ready {
                Ok(mut ready) => match ready.try_io(|l| accept(l.get_ref())) {
                    Ok(accepted) => accepted,
                    // Drained: wait for the next readiness.
                    Err(_would_block) => continue,
                },
                Err(e) => Err(e),
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
                continue;
            }
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                pause_after(&e).await;
                continue;
            }
        };
        // Small writes (a response head, a WebSocket frame) go out at once.
        let _ = socket.set_nodelay(true);
        let client_ip = Some(peer.ip());
        // Two kinds of task, so a plain connection's is not sized for a TLS handshake.
        let worker = pingora_runtime::current_handle();
        match &tls {
            None => drop(worker.spawn(serve_plain(socket, client_ip, cap.clone()))),
            Some(acceptor) => {
                drop(worker.spawn(handshake(acceptor.clone(), socket, client_ip, cap.clone())))
            }
        }
    }
}

/// Serves a plain connection on the worker thread this task runs on.
async fn serve_plain(socket: std::net::TcpStream, client_ip: Option<IpAddr>, cap: Arc<Cap>) {
    let Ok(socket) = TcpStream::from_std(socket) else {
        return;
    };
    match cap.admit() {
        Some(guard) => {
            let client = ClientStream::Plain(socket);
            crate::h1::serve(cap.state.clone(), client, client_ip, guard).await
        }
        None => refuse(socket).await,
    }
}

/// After a failed accept: out of descriptors or memory, pause a second so connections can
/// close (accepting again would fail at once, forever); otherwise (a client gone before it was
/// accepted) go on, after letting other tasks run.
async fn pause_after(e: &std::io::Error) {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::error!("accept failed: {e}; pausing accepts for 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        _ => {
            tracing::debug!("accept failed: {e}");
            tokio::task::yield_now().await;
        }
    }
}

/// Handshakes a TLS connection, then gives it to its engine on a task of its own: the
/// handshake's state (8.8 KB) should not stay allocated for a connection that lives for hours.
async fn handshake(
    acceptor: Arc<Acceptor>,
    socket: std::net::TcpStream,
    client_ip: Option<IpAddr>,
    cap: Arc<Cap>,
) {
    let Ok(socket) = TcpStream::from_std(socket) else {
        return;
    };
    // Pingora's stream over a tokio socket has no L4 buffers (its listener's default was a
    // 64 KiB read buffer): rustls frames records in buffers of its own, and one in front would
    // add a copy per read and stay allocated for the connection's life.
    let stream: Stream = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        acceptor.tls_handshake(L4Stream::from(socket)),
    )
    .await
    {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
    let Some(guard) = cap.admit() else {
        // An HTTP/1 client learns why; an h2 client just sees the close.
        if !h2 {
            refuse(stream).await;
        }
        return;
    };
    let state = cap.state.clone();
    if h2 {
        tokio::spawn(crate::h2::serve(state, stream, client_ip, guard));
    } else {
        tokio::spawn(crate::h1::serve(
            state,
            ClientStream::Tls(stream),
            client_ip,
            guard,
        ));
    }
}

/// Counts open client connections against `server.limits.max_connections`.
struct Cap {
    state: Arc<ProxyState>,
    open: AtomicUsize,
}

impl Cap {
    /// A place for one more connection, or `None` (counted) when the cap in force is reached.
    fn admit(self: &Arc<Self>) -> Option<crate::h1::ConnectionGuard> {
        let max = self.state.current().config.server.limits.max_connections;
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            Metrics::global()
                .downstream_closed
                .with_label_values(&["max_connections"])
                .inc();
            return None;
        }
        Metrics::global().downstream_connections.inc();
        Some(Box::new(Admitted(self.clone())))
    }
}

/// One admitted connection; uncounted when dropped.
struct Admitted(Arc<Cap>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        Metrics::global().downstream_connections.dec();
    }
}

const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 24\r\nRetry-After: 1\r\nConnection: close\r\n\r\n503 too many connections\n";

/// Tells an HTTP/1 client over the cap why it is closed, within a second.
async fn refuse(mut stream: impl AsyncWrite + Unpin) {
    let write = async {
        stream.write_all(OVER_CAPACITY).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
