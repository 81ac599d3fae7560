//! WebSocket tunnels: once a backend switched protocols, the HTTP/1 engine hands the client
//! connection and the backend socket to a tunnel, which relays bytes between the two (`run`)
//! through one buffer per thread: an idle tunnel owns its two sockets and a few hundred bytes.
//! Convergence ends a tunnel through its registration's waker; the tunnel then finishes the
//! frame the backend is sending and adds a close frame.

use super::client::ClientStream;
use super::deadline::poll_timer;
use crate::core::record::{ExchangeKind, Ongoing};
use crate::streams::{CloseReason, Registration};
use bytes::Bytes;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_http::websocket::{close_frame, FrameCursor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Reads per direction in one wake-up before the tunnel yields to other tasks.
const BURST: usize = 16;
/// The per-thread relay buffer.
const SCRATCH_SIZE: usize = 16 * 1024;
/// How long the last bytes and a close frame may take to reach a client at the end.
const LINGER: Duration = Duration::from_secs(1);

thread_local! {
    /// Every tunnel on a thread reads into this buffer and writes straight out of it; only
    /// bytes a peer cannot take at once are copied into the tunnel's own memory.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// An open WebSocket: the backend socket after a completed handshake, waiting for its relay.
pub struct Tunnel {
    /// Taken out only while the tunnel moves between runtimes.
    backend: Option<TcpStream>,
    /// The 101 response head for the client, then whatever the backend sent right after it.
    to_client: Vec<u8>,
    /// What the client sent right behind its upgrade request (early frames).
    early: Vec<u8>,
    head_len: usize,
    registration: Registration,
    ongoing: Ongoing,
}

/// What the engine hands a tunnel.
pub(crate) struct Opened {
    pub backend: TcpStream,
    /// The client's 101 head, then the backend's first bytes.
    pub to_client: Vec<u8>,
    /// The length of that head.
    pub head_len: usize,
    pub early: Vec<u8>,
    pub registration: Registration,
    pub ongoing: Ongoing,
}

impl Tunnel {
    /// A tunnel for a switched connection.
    pub(crate) fn new(opened: Opened) -> Tunnel {
        Tunnel {
            backend: Some(opened.backend),
            to_client: opened.to_client,
            early: opened.early,
            head_len: opened.head_len,
            registration: opened.registration,
            ongoing: opened.ongoing,
        }
    }

    /// The route's idle timeout.
    fn idle(&self) -> Duration {
        self.ongoing.installed.router.routes()[self.ongoing.decision.route]
            .timeouts
            .idle
    }

    /// The close frame Tether sends when it ends the stream for `reason`.
    fn close_frame(&self, reason: CloseReason) -> Bytes {
        match reason {
            CloseReason::Shutdown => close_frame(1001, "proxy going away"),
            CloseReason::Rebalance => close_frame(
                self.ongoing
                    .installed
                    .config_upstream(self.ongoing.decision.upstream)
                    .map_or(1012, |u| u.rebalance.websocket_close_code),
                "document moved",
            ),
        }
    }
}

/// One direction of a tunnel.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet taken by the other side (empty, unallocated, while idle).
    pending: Vec<u8>,
    sent: usize,
    needs_flush: bool,
    /// The source has ended.
    eof: bool,
    /// Bytes delivered to the other side.
    bytes: u64,
    /// Since when the other side has not taken what is pending.
    blocked_since: Option<Instant>,
    /// Frame boundaries of what the source sent (backend to client only).
    frames: Option<FrameCursor>,
}

/// Where one direction stands after a turn.
enum Flow {
    /// Waiting for the source.
    Reading,
    /// Waiting for the other side to take bytes.
    Blocked,
    /// The source ended and everything was delivered.
    Done,
    /// Used its burst; will continue on the next turn.
    Yielded,
}

/// Moves bytes from `src` to `dst` until one of them would wait.
fn pump<R, W>(
    cx: &mut Context<'_>,
    src: &mut R,
    dst: &mut W,
    dir: &mut Direction,
    scratch: &mut [u8],
) -> io::Result<Flow>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    for _ in 0..BURST {
        while dir.sent < dir.pending.len() {
            match Pin::new(&mut *dst).poll_write(cx, &dir.pending[dir.sent..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    dir.sent += n;
                    dir.bytes += n as u64;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Flow::Blocked),
            }
        }
        if !dir.pending.is_empty() {
            // Give the memory back: an idle tunnel holds no buffer.
            dir.pending = Vec::new();
            dir.sent = 0;
            dir.needs_flush = true;
        }
        if dir.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => dir.needs_flush = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Flow::Blocked),
            }
        }
        if dir.eof {
            return Ok(Flow::Done);
        }
        let mut read = ReadBuf::new(scratch);
        match Pin::new(&mut *src).poll_read(cx, &mut read) {
            Poll::Pending => return Ok(Flow::Reading),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Ready(Ok(())) => {}
        }
        let n = read.filled().len();
        if n == 0 {
            dir.eof = true;
            continue;
        }
        if let Some(frames) = dir.frames.as_mut() {
            frames.advance(&scratch[..n]);
        }
        let written = match Pin::new(&mut *dst).poll_write(cx, &scratch[..n]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(w)) => w,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => 0,
        };
        dir.bytes += written as u64;
        dir.needs_flush = true;
        if written < n {
            dir.pending = scratch[written..n].to_vec();
        }
    }
    cx.waker().wake_by_ref();
    Ok(Flow::Yielded)
}

/// How a tunnel ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    BackendClosed,
    Closing(CloseReason),
    IdleTimeout,
    SendTimeout,
    Failed(io::Error),
}

/// Relays between the client and the backend until one ends, the tunnel idles out, a peer
/// stops taking bytes for `send_timeout`, or convergence closes the stream.
async fn relay<C: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    client: &mut C,
    tunnel: &mut Tunnel,
    up: &mut Direction,
    down: &mut Direction,
) -> End {
    let control = tunnel.registration.control().clone();
    let (idle, send_timeout) = (
        tunnel.idle(),
        tunnel.ongoing.installed.config.server.limits.send_timeout,
    );
    let Some(backend) = tunnel.backend.as_mut() else {
        return End::Failed(io::ErrorKind::NotConnected.into());
    };
    let mut last_activity = Instant::now();
    let sleep = tokio::time::sleep_until(last_activity + idle);
    tokio::pin!(sleep);
    // Whether the timer holds this task's waker: polled since its last reset, it needs polling
    // again only once it has fired (a poll per wake-up was a twentieth of a relayed message's
    // cost). Firing takes the waker; the loop below polls after every reset, past the task's
    // budget (`poll_timer`).
    let mut armed = false;
    poll_fn(|cx| {
        control.attach_relay(cx.waker());
        if let Some(reason) = control.reason() {
            return Poll::Ready(End::Closing(reason));
        }
        let moved = up.bytes + down.bytes;
        let flows = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let to_backend = pump(cx, &mut *client, &mut *backend, up, &mut scratch)?;
            let to_client = pump(cx, &mut *backend, &mut *client, down, &mut scratch)?;
            Ok::<_, io::Error>((to_backend, to_client))
        });
        let (to_backend, to_client) = match flows {
            Ok(flows) => flows,
            Err(e) => return Poll::Ready(End::Failed(e)),
        };
        if matches!(to_backend, Flow::Done) {
            return Poll::Ready(End::ClientClosed);
        }
        if matches!(to_client, Flow::Done) {
            return Poll::Ready(End::BackendClosed);
        }
        let now_if_moved = (up.bytes + down.bytes != moved).then(Instant::now);
        if let Some(now) = now_if_moved {
            last_activity = now;
        }
        for (dir, flow) in [(&mut *up, &to_backend), (&mut *down, &to_client)] {
            if matches!(flow, Flow::Blocked) {
                if dir.blocked_since.is_none() {
                    dir.blocked_since = Some(now_if_moved.unwrap_or_else(Instant::now));
                }
            } else {
                dir.blocked_since = None;
            }
        }
        // The timer is moved only when it fires or a shorter deadline appears, not per message.
        let deadline = |up: &Direction, down: &Direction, last: Instant| {
            let blocked = [up.blocked_since, down.blocked_since]
                .into_iter()
                .flatten()
                .min()
                .map(|since| since + send_timeout);
            let idle_end = last + idle;
            match blocked {
                Some(b) if b < idle_end => (b, true),
                _ => (idle_end, false),
            }
        };
        let (due, _) = deadline(up, down, last_activity);
        if due < sleep.deadline() {
            sleep.as_mut().reset(due);
            armed = false;
        }
        if armed && !sleep.is_elapsed() {
            return Poll::Pending;
        }
        armed = true;
        while poll_timer(sleep.as_mut(), cx).is_ready() {
            let (due, blocked) = deadline(up, down, last_activity);
            if Instant::now() >= due {
                return Poll::Ready(if blocked {
                    End::SendTimeout
                } else {
                    End::IdleTimeout
                });
            }
            sleep.as_mut().reset(due);
        }
        Poll::Pending
    })
    .await
}

/// The runtime tunnels run on, once [`configure_runtime`] built it.
static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

/// Builds the runtime for WebSocket tunnels: `threads` workers that take tasks from the global
/// queue every 4 polls (tokio's default is 31 or more). With 1,000 busy tunnels on one worker
/// the local run queue (256) overflows into the global one, and a task waiting there waits
/// for that interval: measured as the tail latency of a busy WebSocket proxy (BENCHMARKS.md).
/// Pingora's own runtime does not expose the setting, so plain-TCP tunnels move to this
/// runtime. Called once at start; without it tunnels stay on the accepting runtime.
pub fn configure_runtime(threads: usize) -> std::io::Result<()> {
    if RUNTIME.get().is_some() {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("tether tunnels")
        .global_queue_interval(4)
        .enable_all()
        .build()?;
    let _ = RUNTIME.set(runtime);
    Ok(())
}

/// Starts `tunnel` on `client` in a task of its own (the connection's task ends here). A
/// plain-TCP tunnel moves to the tunnels' runtime: both sockets leave the accepting runtime's
/// reactor and join that runtime's (a TLS stream cannot be taken apart, so it stays). `guard`
/// lives as long as the tunnel.
pub(crate) fn start(client: ClientStream, tunnel: Tunnel, guard: impl Send + 'static) {
    let runtime = RUNTIME.get();
    let client = match (client, runtime) {
        (ClientStream::Plain(socket), Some(_)) => match socket.into_std() {
            Ok(socket) => Ok(socket),
            Err(e) => {
                tracing::debug!("could not move a WebSocket tunnel to its runtime: {e}");
                return;
            }
        },
        (other, _) => Err(other),
    };
    match (client, runtime) {
        (Ok(client), Some(runtime)) => {
            let mut tunnel = tunnel;
            let backend = tunnel.backend.take().map(TcpStream::into_std);
            drop(runtime.spawn(async move {
                let _guard = guard;
                let Some(Ok(backend)) = backend else {
                    return;
                };
                match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
                    (Ok(client), Ok(backend)) => {
                        tunnel.backend = Some(backend);
                        run(client, tunnel).await;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!("could not register a WebSocket tunnel: {e}");
                    }
                }
            }));
        }
        (Ok(client), None) => match TcpStream::from_std(client) {
            Ok(client) => drop(tokio::spawn(async move {
                let _guard = guard;
                run(client, tunnel).await;
            })),
            Err(e) => tracing::debug!("could not register a WebSocket tunnel: {e}"),
        },
        (Err(client), _) => drop(tokio::spawn(async move {
            let _guard = guard;
            run(client, tunnel).await;
        })),
    }
}

/// Runs a tunnel to its end: sends the 101 (and the backend's first bytes) to `client`,
/// relays, ends the connection the way the end calls for, then records the exchange.
async fn run<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, mut tunnel: Tunnel) {
    let mut up = Direction {
        pending: std::mem::take(&mut tunnel.early),
        ..Direction::default()
    };
    let mut frames = FrameCursor::default();
    frames.advance(&tunnel.to_client[tunnel.head_len..]);
    let mut down = Direction {
        pending: std::mem::take(&mut tunnel.to_client),
        frames: Some(frames),
        ..Direction::default()
    };
    let end = relay(&mut client, &mut tunnel, &mut up, &mut down).await;
    let finish = async {
        match &end {
            End::Closing(reason) => {
                // What the backend already sent goes first, then the close frame.
                client.write_all(&down.pending[down.sent..]).await?;
                // The close frame must not land inside a frame the backend is still sending:
                // let that one finish first (within the linger time).
                let frames = down.frames.get_or_insert_with(FrameCursor::default);
                let mut buf = Vec::new();
                while !frames.at_boundary() {
                    buf.resize(4096, 0);
                    let Some(backend) = tunnel.backend.as_mut() else {
                        break;
                    };
                    let n = backend.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    let take = frames.finish_frame(&buf[..n]);
                    client.write_all(&buf[..take]).await?;
                    down.bytes += take as u64;
                }
                if frames.at_boundary() {
                    client.write_all(&tunnel.close_frame(*reason)).await?;
                }
                client.flush().await?;
                client.shutdown().await
            }
            End::BackendClosed => {
                client.flush().await?;
                client.shutdown().await
            }
            End::ClientClosed => match tunnel.backend.as_mut() {
                Some(backend) => backend.shutdown().await,
                None => Ok(()),
            },
            End::IdleTimeout | End::SendTimeout | End::Failed(_) => Ok(()),
        }
    };
    if let Ok(Err(e)) = timeout(LINGER, finish).await {
        tracing::debug!("ending a WebSocket tunnel: {e}");
    }
    match &end {
        End::Failed(e) => tracing::debug!("WebSocket tunnel failed: {e}"),
        other => tracing::debug!(end = ?other, "WebSocket tunnel ended"),
    }
    let Tunnel {
        registration,
        ongoing,
        head_len,
        ..
    } = tunnel;
    // Deregister first, so the stream counts as closed before the exchange is logged.
    drop(registration);
    let bytes = usize::try_from(down.bytes)
        .unwrap_or(usize::MAX)
        .saturating_sub(head_len);
    ongoing.finish("GET", ExchangeKind::WebSocket, 101, bytes);
}
