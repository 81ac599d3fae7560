//! WebSocket tunnels that Tether runs itself instead of Pingora's upgraded-body relay.
//!
//! Why: for the whole life of an upgraded connection Pingora keeps its per-request proxy
//! future, two body tasks joined by channels and their buffers (53 KB of RSS per idle
//! WebSocket, measured), pays a channel hop per message, and gives no way to end the
//! connection from outside (convergence needed a third descriptor per WebSocket). Here the
//! proxy's `request_filter` does the handshake with the chosen backend on a socket of its own
//! ([`open`]), answers the request itself, and the connection task takes the client stream
//! back once Pingora has finished with it (`crate::downstream`) and relays bytes between the
//! two sockets ([`run`]) through one buffer per thread: an idle tunnel owns its two sockets
//! and a few hundred bytes.

use crate::exchange::{
    reason_phrase, status_for, valid_switch, websocket_close_frame, ExchangeKind, FrameCursor,
};
use crate::forwarding;
use crate::passive;
use crate::proxy::{answer_locally, record_exchange, RequestCtx};
use crate::state::{Active, InFlight, Installed, ProxyState};
use crate::streams::{CloseReason, Registration, StreamKind};
use bytes::Bytes;
use http::HeaderValue;
use pingora::prelude::*;
use pingora::protocols::http::v1::client::http_req_header_to_wire;
use pingora::protocols::Stream;
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_routing::Decision;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Largest backend response head to an upgrade request.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields in that head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Largest body of a backend's refusal (a non-101 answer) that is passed on to the client.
const MAX_REFUSAL_BODY: usize = 1 << 20;
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

/// An open WebSocket: the backend socket after a completed handshake, waiting for the client.
pub struct Tunnel {
    /// Taken out only while the tunnel moves between runtimes.
    backend: Option<TcpStream>,
    /// The 101 response head for the client, then whatever the backend sent right after it.
    to_client: Vec<u8>,
    head_len: usize,
    registration: Registration,
    /// The backend's `active` count, taken over from the request.
    _active: Option<Active>,
    _in_flight: Option<InFlight>,
    installed: Arc<Installed>,
    decision: Decision,
    backend_index: usize,
    request_id: Option<HeaderValue>,
    started: std::time::Instant,
}

impl Tunnel {
    /// The route's idle timeout.
    fn idle(&self) -> Duration {
        self.installed.router.routes()[self.decision.route]
            .timeouts
            .idle
    }

    /// The close frame Tether sends when it ends the stream for `reason`.
    fn close_frame(&self, reason: CloseReason) -> Bytes {
        match reason {
            CloseReason::Shutdown => websocket_close_frame(1001, "proxy going away"),
            CloseReason::Rebalance => websocket_close_frame(
                self.installed
                    .config_upstream(self.decision.upstream)
                    .map_or(1012, |u| u.rebalance.websocket_close_code),
                "document moved",
            ),
        }
    }
}

/// What the backend answered to the upgrade request.
struct Answer {
    header: ResponseHeader,
    /// The bytes read so far: the head (`head_len` of them), then the start of what follows.
    buf: Vec<u8>,
    head_len: usize,
}

/// Why the handshake with the backend failed, and what the client gets.
enum Failure {
    /// The backend could not be reached or misbehaved at the transport level (502, counts
    /// towards passive ejection).
    Transport(&'static str),
    /// The backend did not answer in time (504, counts towards passive ejection).
    Timeout,
    /// The backend answered something that is not a usable response (502).
    Protocol(&'static str),
}

/// Does the WebSocket handshake of the routed request in `ctx` with its backend, retrying
/// connect failures on the next owner like the proxy does. On a valid 101 the tunnel is handed
/// to the connection task and the client gets the 101 from there; any other answer, or an
/// error, is sent to the client here. Always answers the request (returns true).
pub(crate) async fn open(
    state: &Arc<ProxyState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    let (Some(installed), Some(decision)) = (ctx.installed.clone(), ctx.decision.clone()) else {
        return Ok(false);
    };
    let router = &installed.router;
    let route = &router.routes()[decision.route];
    let upstream = &router.upstreams()[decision.upstream];
    let passive_cfg = installed
        .config_upstream(decision.upstream)
        .and_then(|u| u.passive);
    let send_timeout = installed.config.server.limits.send_timeout;

    // The same attempts, retries and bookkeeping as the proxy's `upstream_peer` and
    // `fail_to_connect`.
    let first = match ctx.next_attempt() {
        Ok(backend) => backend,
        Err(e) => {
            let status = status_for(&e);
            return answer_locally(session, ctx, status, reason_phrase(status)).await;
        }
    };
    let Some((mut socket, backend)) = ctx.connect(state, first).await else {
        return answer_locally(session, ctx, 502, "Bad Gateway").await;
    };

    let mut request = session.req_header().clone();
    forwarding::websocket_upgrade_request(&mut request)?;
    crate::proxy::add_forwarding(session, ctx, &mut request)?;
    let answer = match handshake(&mut socket, &request, send_timeout, route.timeouts.read).await {
        Ok(answer) => answer,
        Err(failure) => {
            let (status, why) = match failure {
                Failure::Transport(why) => (502, why),
                Failure::Timeout => (504, "backend did not answer the upgrade in time"),
                Failure::Protocol(why) => (502, why),
            };
            if !matches!(failure, Failure::Protocol(_)) {
                passive::record_failure(state, &upstream.name, passive_cfg, &backend);
            }
            tracing::debug!(backend = %backend.address, "WebSocket handshake failed: {why}");
            return answer_locally(session, ctx, status, why).await;
        }
    };
    passive::record_success(&backend);

    if answer.header.status.as_u16() != 101 {
        return pass_refusal(session, ctx, socket, answer, route.timeouts.read).await;
    }
    let key = session
        .req_header()
        .headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes());
    let accept = answer
        .header
        .headers
        .get(http::header::SEC_WEBSOCKET_ACCEPT)
        .map(|a| a.as_bytes());
    if !valid_switch(key, accept) {
        return answer_locally(
            session,
            ctx,
            502,
            "backend switched protocols without completing the WebSocket handshake",
        )
        .await;
    }

    let mut header = answer.header;
    if let Some(id) = &ctx.request_id {
        header.insert_header("X-Request-Id", id.clone())?;
    }
    let mut to_client = Vec::with_capacity(256 + answer.buf.len() - answer.head_len);
    to_client.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    header.header_to_h1_wire(&mut to_client);
    to_client.extend_from_slice(b"\r\n");
    let head_len = to_client.len();
    to_client.extend_from_slice(&answer.buf[answer.head_len..]);

    let registration = state.registry.register(
        Arc::from(route.name.as_str()),
        Arc::from(upstream.name.as_str()),
        decision.key.as_deref().map(Arc::from),
        backend.address,
        StreamKind::WebSocket,
    );
    let tunnel = Tunnel {
        backend: Some(socket),
        to_client,
        head_len,
        registration,
        _active: ctx.holding.take(),
        _in_flight: ctx.in_flight.take(),
        backend_index: ctx.tried.last().copied().unwrap_or(decision.backend),
        installed: installed.clone(),
        decision,
        request_id: ctx.request_id.clone(),
        started: ctx.started,
    };
    if !crate::downstream::hand_off(Box::new(tunnel)) {
        // Only HTTP/1.1 requests upgrade, and every HTTP/1 connection can hand off.
        return answer_locally(session, ctx, 500, "cannot hand off the connection").await;
    }
    session.set_keepalive(None);
    ctx.tunneled = true;
    ctx.local_status = Some(101);
    Ok(true)
}

/// Sends the upgrade request and reads the backend's response head.
async fn handshake(
    socket: &mut TcpStream,
    request: &RequestHeader,
    send_timeout: Duration,
    read_timeout: Duration,
) -> std::result::Result<Answer, Failure> {
    let wire =
        http_req_header_to_wire(request).ok_or(Failure::Protocol("request cannot be written"))?;
    match timeout(send_timeout, socket.write_all(&wire)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(Failure::Transport("could not send the upgrade request")),
        Err(_) => return Err(Failure::Timeout),
    }
    let deadline = Instant::now() + read_timeout;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(Failure::Protocol("response head too large"));
        }
        buf.reserve(1024);
        let read = tokio::time::timeout_at(deadline, socket.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) => return Err(Failure::Transport("backend closed before answering")),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(Failure::Transport("read error")),
            Err(_) => return Err(Failure::Timeout),
        }
        if let Some(answer) = parse_head(&buf)? {
            return Ok(Answer {
                header: answer.0,
                head_len: answer.1,
                buf,
            });
        }
    }
}

/// Parses a response head at the start of `buf`: the header and its length, or None when
/// more bytes are needed.
fn parse_head(buf: &[u8]) -> std::result::Result<Option<(ResponseHeader, usize)>, Failure> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failure::Protocol("malformed response head")),
    };
    let bad = Failure::Protocol("malformed response head");
    let status = response.code.ok_or(Failure::Protocol("no status"))?;
    let mut header =
        ResponseHeader::build(status, Some(response.headers.len())).map_err(|_| bad)?;
    for field in response.headers.iter() {
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| Failure::Protocol("malformed header value"))?;
        header
            .append_header(field.name.to_owned(), value)
            .map_err(|_| Failure::Protocol("malformed header name"))?;
    }
    Ok(Some((header, len)))
}

/// Passes a backend's refusal of the upgrade (401, 403, 404, ...) on to the client, body
/// included (bounded), and closes the backend connection.
async fn pass_refusal(
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut socket: TcpStream,
    answer: Answer,
    read_timeout: Duration,
) -> Result<bool> {
    let Answer {
        mut header,
        mut buf,
        head_len,
    } = answer;
    let status = header.status.as_u16();
    if status < 200 {
        return answer_locally(session, ctx, 502, "unexpected informational response").await;
    }
    let framing = Framing::of(&header);
    buf.drain(..head_len);
    let deadline = Instant::now() + read_timeout;
    let body = loop {
        match framing.body(&buf) {
            Ok(Some(body)) => break body,
            Ok(None) => {}
            Err(why) => return answer_locally(session, ctx, 502, why).await,
        }
        if buf.len() > MAX_REFUSAL_BODY + 64 * 1024 {
            return answer_locally(session, ctx, 502, "refusal body too large").await;
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, socket.read_buf(&mut buf)).await {
            Ok(Ok(0)) if framing == Framing::UntilClose => break buf.clone(),
            Ok(Ok(0)) => return answer_locally(session, ctx, 502, "truncated response").await,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return answer_locally(session, ctx, 502, "read error").await,
            Err(_) => return answer_locally(session, ctx, 504, "Gateway Timeout").await,
        }
    };
    drop(socket);
    forwarding::strip_response_hop_by_hop(&mut header);
    header.remove_header(&http::header::TRANSFER_ENCODING);
    if framing != Framing::None {
        header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    }
    if let Some(id) = &ctx.request_id {
        header.insert_header("X-Request-Id", id.clone())?;
    }
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(true)
}

/// How the body of a backend's refusal is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// 204 and 304: no body.
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

impl Framing {
    fn of(header: &ResponseHeader) -> Framing {
        let status = header.status.as_u16();
        if status == 204 || status == 304 {
            return Framing::None;
        }
        let chunked = header
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        if chunked {
            return Framing::Chunked;
        }
        match header
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            Some(len) => Framing::Length(len),
            None => Framing::UntilClose,
        }
    }

    /// The whole body once `buf` holds it (None: read more).
    fn body(self, buf: &[u8]) -> std::result::Result<Option<Vec<u8>>, &'static str> {
        match self {
            Framing::None => Ok(Some(Vec::new())),
            Framing::Length(len) if len > MAX_REFUSAL_BODY => Err("refusal body too large"),
            Framing::Length(len) => Ok((buf.len() >= len).then(|| buf[..len].to_vec())),
            Framing::Chunked => decode_chunked(buf),
            Framing::UntilClose if buf.len() > MAX_REFUSAL_BODY => Err("refusal body too large"),
            Framing::UntilClose => Ok(None),
        }
    }
}

/// Decodes a complete chunked body (trailers dropped), or None while it is incomplete.
fn decode_chunked(mut buf: &[u8]) -> std::result::Result<Option<Vec<u8>>, &'static str> {
    let mut body = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("malformed chunked body"),
        };
        buf = &buf[used..];
        let size = usize::try_from(size).map_err(|_| "malformed chunked body")?;
        if size == 0 {
            // Trailer fields, then an empty line.
            let mut rest = buf;
            loop {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[end + 2..];
            }
        }
        if body.len() + size > MAX_REFUSAL_BODY {
            return Err("refusal body too large");
        }
        if buf.len() < size + 2 {
            return Ok(None);
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err("malformed chunked body");
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
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
        tunnel.installed.config.server.limits.send_timeout,
    );
    let Some(backend) = tunnel.backend.as_mut() else {
        return End::Failed(io::ErrorKind::NotConnected.into());
    };
    let mut last_activity = Instant::now();
    let sleep = tokio::time::sleep_until(last_activity + idle);
    tokio::pin!(sleep);
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
        }
        while sleep.as_mut().poll(cx).is_ready() {
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

/// Pingora's plain-TCP stream: the only kind a tunnel can take apart.
type PlainStream = pingora::protocols::l4::stream::Stream;

/// The runtime tunnels run on, once [`configure_runtime`] built it.
static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

/// Builds the runtime for WebSocket tunnels: `threads` workers that take tasks from the global
/// queue every 4 polls (tokio's default is 31 or more). With 1,000 busy tunnels on one worker
/// the local run queue (256) overflows into the global one, and a task waiting there waits
/// for that interval: shared/research/pingora-perf.md §5.1 measured the interval as the tail
/// of a busy WebSocket proxy. Pingora's own runtime does not expose the setting (bench/README.md,
/// upstream text 6), so plain-TCP tunnels move to this runtime. Called once at start; without
/// it tunnels stay on Pingora's runtime.
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

/// Starts `tunnel` with the `client` stream Pingora let go of, in a task of its own (Pingora's
/// connection task, about 9 KB by DHAT, ends here). A plain-TCP tunnel moves to the tunnels'
/// runtime: both sockets leave Pingora's reactor and join that runtime's (a TLS stream cannot
/// be taken apart, so it stays). `guard` lives as long as the tunnel.
pub(crate) fn start(client: Stream, tunnel: Tunnel, guard: impl Send + 'static) {
    // Without the tunnels' runtime, or for TLS, the tunnel stays on Pingora's runtime.
    let Some(runtime) = RUNTIME
        .get()
        .filter(|_| client.as_any().is::<PlainStream>())
    else {
        drop(tokio::spawn(async move {
            let _guard = guard;
            run(client, tunnel).await;
        }));
        return;
    };
    let Ok(client) = client.into_any().downcast::<PlainStream>() else {
        return;
    };
    drop(tokio::spawn(async move {
        let mut tunnel = tunnel;
        let (client, backend) = match detach(client, &mut tunnel).await {
            Ok(sockets) => sockets,
            Err(Some(client)) => {
                // No descriptor to spare for the move (at the open-file limit): run here.
                let _guard = guard;
                run(client, tunnel).await;
                return;
            }
            Err(None) => {
                tracing::debug!("could not move a WebSocket tunnel to its runtime");
                return;
            }
        };
        drop(runtime.spawn(async move {
            let _guard = guard;
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
    }));
}

/// Takes both sockets off Pingora's reactor: the client's descriptor is duplicated and Pingora's
/// stream dropped (which deregisters and closes the original; the connection lives on in the
/// duplicate), and the backend socket is taken back from tokio. When the duplicate cannot be
/// made, the client stream comes back untouched; `Err(None)` means the tunnel is lost.
async fn detach(
    mut client: Box<PlainStream>,
    tunnel: &mut Tunnel,
) -> Result<(std::net::TcpStream, std::net::TcpStream), Option<Box<PlainStream>>> {
    // Nothing should be buffered (Tether wrote nothing through it), but never lose bytes.
    client.flush().await.map_err(|_| None)?;
    let Some(client_std) = crate::client_stream::duplicate(&client) else {
        return Err(Some(client));
    };
    // The duplicate shares the accepted socket's file description, non-blocking already.
    drop(client);
    let backend = tunnel
        .backend
        .take()
        .ok_or(None)?
        .into_std()
        .map_err(|_| None)?;
    Ok((client_std, backend))
}

/// Runs a tunnel to its end: sends the 101 (and the backend's first bytes) to `client`,
/// relays, ends the connection the way the end calls for, then records the exchange.
async fn run<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, mut tunnel: Tunnel) {
    let mut up = Direction::default();
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
        installed,
        decision,
        backend_index,
        request_id,
        started,
        head_len,
        ..
    } = tunnel;
    // Deregister first, so the stream counts as closed before the exchange is logged.
    drop(registration);
    record_exchange(
        &installed,
        Some(&decision),
        Some(backend_index),
        request_id.as_ref().map(HeaderValue::as_bytes),
        "GET",
        ExchangeKind::WebSocket,
        101,
        usize::try_from(down.bytes)
            .unwrap_or(usize::MAX)
            .saturating_sub(head_len),
        started.elapsed(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_decoded_once_complete() {
        let whole = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for cut in 0..whole.len() {
            assert_eq!(decode_chunked(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(decode_chunked(whole), Ok(Some(b"hello world".to_vec())));
        assert!(decode_chunked(b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(decode_chunked(b"zz\r\n").is_err());
    }

    #[test]
    fn response_heads_parse_with_their_length_and_field_case() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Accept: abc\r\n\r\n\x81\x02hi";
        let Ok(Some((header, len))) = parse_head(raw) else {
            panic!("complete head expected");
        };
        assert_eq!(header.status.as_u16(), 101);
        assert_eq!(&raw[len..], b"\x81\x02hi");
        let mut wire = Vec::new();
        header.header_to_h1_wire(&mut wire);
        assert_eq!(
            wire,
            b"Upgrade: websocket\r\nSec-WebSocket-Accept: abc\r\n".to_vec()
        );
        assert!(matches!(parse_head(&raw[..20]), Ok(None)));
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn refusal_framing_follows_the_headers() {
        let mut h = ResponseHeader::build(403, None).expect("header");
        assert_eq!(Framing::of(&h), Framing::UntilClose);
        h.insert_header("Content-Length", "3").expect("header");
        assert_eq!(Framing::of(&h), Framing::Length(3));
        assert_eq!(Framing::Length(3).body(b"ab"), Ok(None));
        assert_eq!(Framing::Length(3).body(b"abcd"), Ok(Some(b"abc".to_vec())));
        h.insert_header("Transfer-Encoding", "chunked")
            .expect("header");
        assert_eq!(Framing::of(&h), Framing::Chunked);
        let none = ResponseHeader::build(204, None).expect("header");
        assert_eq!(Framing::of(&none), Framing::None);
    }
}
