//! Tether's own HTTP/1.1 keep-alive path for plain requests on plain-TCP listeners.
//!
//! Why: Pingora's per-request machinery costs about three times HAProxy's CPU per proxied
//! request (callgrind, `BENCHMARKS.md`): the ~7 KB per-request future moved into a box twice,
//! the request and response headers rebuilt as maps, a task spawned and a lock taken per
//! upstream connection returned to its pool, a timer per write. The requests that make up most
//! of a real-time product's HTTP traffic (body-less requests to a sticky backend) need none of
//! it, so this path serves them itself: it parses the head in place (`httparse`), routes on the
//! raw fields ([`tether_routing::Headers::Raw`]), writes the upstream head straight into one
//! buffer, reuses backend connections from [`crate::pool::UpstreamPool`] and relays the
//! response as it arrives, headers edited on the way.
//!
//! Anything else goes to Pingora with the bytes already read put back (`rewind`), for the rest
//! of the connection: request bodies, upgrades (WebSockets), SSE and long-poll routes, rate
//! limited routes, HTTP/1.0, `Expect`, absolute-form or oversized targets, and every request
//! that Tether refuses or answers itself, so refusals, their statuses and metrics have one
//! implementation. What this path does answer itself are the failures of its own exchange
//! (502, 504), with the same statuses and the same passive-health bookkeeping as the proxy.

use crate::chunked::ChunkedEnd;
use crate::client_stream::ClientStream;
use crate::closing::Waiter;
use crate::forwarding;
use crate::lazy_deadline::LazyDeadline;
use crate::passive;
use crate::proxy::{record_exchange, RequestCtx};
use crate::state::{Installed, ProxyState};
use crate::validity;
use pingora::protocols::GetSocketDigest;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::task::Poll;
use std::time::Duration;
use tether_config::Limits;
use tether_routing::{BackendState, Headers, RequestView};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Pingora's plain-TCP client stream.
pub(crate) type PlainStream = pingora::protocols::l4::stream::Stream;

/// Most header fields parsed in place; a request with more goes to Pingora.
const MAX_FIELDS: usize = 100;
/// Most header fields in a backend's response head.
const MAX_RESPONSE_FIELDS: usize = 128;
/// Largest backend response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long a connection idle at shutdown may take to deliver a request already sent.
const SHUTDOWN_READ_GRACE: Duration = Duration::from_millis(100);
/// Read size for the backend's responses.
const READ_SIZE: usize = 16 * 1024;
/// Read size for the client's request heads (most are well under 1 KB).
const REQUEST_READ_SIZE: usize = 4 * 1024;

/// How a connection left this path.
pub(crate) enum Served {
    /// It is finished; dropping the stream closes it.
    Done,
    /// A request this path does not serve: Pingora takes the connection from here, and reads
    /// the bytes already received first.
    ToPingora(Box<PlainStream>),
}

/// What comes after one exchange.
enum Next {
    KeepAlive,
    Close,
    ToPingora,
}

/// Facts about a request head that this path needs, all borrowed from the head.
struct Facts<'h, 'b> {
    /// The whole head, as received.
    raw: &'b [u8],
    /// All the header fields, as parsed.
    fields: &'h [httparse::Header<'b>],
    method: &'b str,
    target: &'b str,
    host: &'b str,
    /// The client asked to close after this request.
    close: bool,
    /// The first `X-Request-Id` value.
    request_id: Option<&'b [u8]>,
    /// The first `X-Forwarded-For` value (appended to for a trusted client).
    forwarded_for: Option<&'b [u8]>,
}

/// One client connection.
struct Conn<'s> {
    state: &'s Arc<ProxyState>,
    client: ClientStream,
    client_ip: Option<IpAddr>,
    /// `client_ip` as text, written once per connection for `X-Forwarded-For`.
    client_ip_text: Option<Vec<u8>>,
    /// Requests served so far.
    served: u64,
    /// Shutting down: answer this request, then close.
    closing: Waiter,
    /// The deadline of the wait for the client's next head.
    client_timer: LazyDeadline,
    /// The deadline of the waits for the backend's response.
    upstream_timer: LazyDeadline,
    /// When the last exchange ended (the start of the keep-alive idle time).
    idle_since: Instant,
    /// A head longer than this is left to Pingora (which refuses it).
    max_head: usize,
    scratch: Scratch,
}

/// Buffers for the heads a connection writes, kept between its requests (the socket copies
/// from memory that is already warm, and nothing is allocated per request).
#[derive(Default)]
struct Scratch {
    /// The upstream request head.
    head: Vec<u8>,
    /// What goes to the client next: a response head and the body bytes that came with it.
    out: Vec<u8>,
}

impl Scratch {
    /// Lets go of buffers a large exchange grew, so an idle connection stays small.
    fn keep_if_small(&mut self) {
        const KEEP: usize = 4 * 1024;
        for buf in [&mut self.head, &mut self.out] {
            if buf.capacity() > KEEP {
                *buf = Vec::new();
            }
        }
    }
}

/// Serves `client` until it closes, idles out, or sends a request for Pingora.
pub(crate) async fn serve(
    state: &Arc<ProxyState>,
    client: Box<PlainStream>,
    shutdown: &ShutdownWatch,
) -> Served {
    let (header_timeout, keepalive_timeout, max_head) = {
        let installed = state.current();
        let limits = &installed.config.server.limits;
        (
            limits.header_timeout,
            limits.keepalive_timeout,
            limits.max_uri + limits.max_header_bytes + 1024,
        )
    };
    let client_ip = client
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(SocketAddr::ip));
    state.closing.follow(shutdown);
    let accepted = Instant::now();
    let client_ip_text = client_ip.map(|ip| {
        let mut text = Vec::new();
        forwarding::push_ip(&mut text, ip);
        text
    });
    let mut conn = Conn {
        state,
        client: ClientStream::Pingora(client),
        client_ip,
        client_ip_text,
        served: 0,
        closing: state.closing.join(),
        client_timer: LazyDeadline::default(),
        upstream_timer: LazyDeadline::default(),
        idle_since: accepted,
        max_head,
        scratch: Scratch::default(),
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // The first request's head must arrive within `header_timeout` of the accept; later
        // ones may idle for `keepalive_timeout` first (slowloris, catalogue G1).
        let (idle_deadline, head_deadline) = if conn.served == 0 {
            let end = accepted + header_timeout;
            (end, end)
        } else {
            let idle_end = conn.idle_since + keepalive_timeout;
            (idle_end, idle_end + header_timeout)
        };
        let head_len = match read_head(&mut conn, &mut buf, idle_deadline, head_deadline).await {
            Head::Complete(len) => len,
            Head::Closed => return Served::Done,
            Head::ToPingora => return Served::ToPingora(conn.client.into_pingora(&buf)),
        };
        let next = {
            // Uninitialised: filling 100 empty fields per request was 1 % of the CPU.
            let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
            let mut req = httparse::Request::new(&mut []);
            match req.parse_with_uninit_headers(&buf[..head_len], &mut fields) {
                Ok(httparse::Status::Complete(len)) if len == head_len => {
                    // Pipelining is off, as on Pingora's path (a smaller attack surface,
                    // catalogue A11): a request sent before the previous response is not
                    // served; the connection closes after the first and the client retries.
                    let pipelined = buf.len() > head_len;
                    exchange(&mut conn, &buf[..head_len], &req, pipelined).await
                }
                _ => Next::ToPingora,
            }
        };
        match next {
            Next::ToPingora => return Served::ToPingora(conn.client.into_pingora(&buf)),
            Next::Close => {
                let _ = timeout(Duration::from_secs(1), conn.client.shutdown()).await;
                return Served::Done;
            }
            Next::KeepAlive => {
                if conn.served == 1 {
                    // Kept alive: worth the socket of its own (see `client_stream`).
                    conn.client.own();
                }
                buf.drain(..head_len);
                if buf.is_empty() && buf.capacity() > REQUEST_READ_SIZE {
                    // A long head grew it: an idle connection keeps only the usual size.
                    buf = Vec::new();
                }
            }
        }
    }
}

enum Head {
    /// A whole head of this many bytes is at the start of the buffer.
    Complete(usize),
    Closed,
    ToPingora,
}

/// Reads until `buf` holds a whole request head.
async fn read_head(
    conn: &mut Conn<'_>,
    buf: &mut Vec<u8>,
    idle_deadline: Instant,
    head_deadline: Instant,
) -> Head {
    loop {
        if let Some(len) = head_end(buf) {
            return Head::Complete(len);
        }
        if buf.len() > conn.max_head {
            // Pingora reads it and Tether refuses it (414, 431) in one place.
            return Head::ToPingora;
        }
        let deadline = if buf.is_empty() {
            idle_deadline
        } else {
            head_deadline
        };
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(REQUEST_READ_SIZE);
        }
        // Shutting down (graceful stop, binary upgrade): an idle connection closes, but a
        // request already on its way gets a moment to arrive and is served, as on Pingora's
        // path (vendor/pingora-proxy).
        let idle = buf.is_empty();
        let read = if idle && conn.closing.started() {
            None
        } else {
            let closing = &conn.closing;
            let mut read =
                std::pin::pin!(conn.client_timer.until(deadline, conn.client.read_buf(buf)));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(read) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(read));
                }
                if idle && closing.poll_started(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await
        };
        let read = match read {
            Some(read) => read,
            None => match timeout(SHUTDOWN_READ_GRACE, conn.client.read_buf(buf)).await {
                Ok(read) => Ok(read),
                Err(_) => return Head::Closed,
            },
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Closed,
            Ok(Ok(_)) => {}
            Err(_) => {
                if !buf.is_empty() || conn.served == 0 {
                    crate::metrics::Metrics::global()
                        .downstream_closed
                        .with_label_values(&["header_timeout"])
                        .inc();
                }
                return Head::Closed;
            }
        }
    }
}

/// The length of the request head at the start of `buf`, once it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    // Built once: `memmem::find` would build a searcher on every call.
    static CRLF_CRLF: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    if let Some(at) = CRLF_CRLF.find(buf) {
        return Some(at + 4);
    }
    // Bare LF line ends are legal for a recipient to accept (RFC 9112 2.2); httparse does.
    memchr::memmem::find(buf, b"\n\n").map(|at| at + 2)
}

/// Whether `name` is `lower` (ASCII, case-insensitive).
fn is(name: &str, lower: &str) -> bool {
    name.len() == lower.len() && name.eq_ignore_ascii_case(lower)
}

/// The facts of a request this path serves, or None for one Pingora should.
fn facts<'h, 'b>(
    raw: &'b [u8],
    req: &'h httparse::Request<'_, 'b>,
    limits: &Limits,
) -> Option<Facts<'h, 'b>> {
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    let target = req.path?;
    let fields = req.headers.iter().map(|f| (f.name.len(), f.value.len()));
    // What Tether would refuse is refused on Pingora's path, in one place.
    if !target.starts_with('/')
        || matches!(method, "CONNECT" | "TRACE")
        || validity::check_sizes(target.len(), req.headers.len(), fields, limits).is_err()
        || validity::check_target(target.as_bytes()).is_err()
    {
        return None;
    }
    let mut facts = Facts {
        raw,
        fields: req.headers,
        method,
        target,
        host: "",
        close: false,
        request_id: None,
        forwarded_for: None,
    };
    let mut hosts = 0;
    for field in req.headers.iter() {
        let (name, value) = (field.name, field.value);
        if name.contains('_') {
            return None;
        }
        match name.len() {
            4 if is(name, "host") => {
                hosts += 1;
                facts.host = std::str::from_utf8(value).ok()?;
            }
            6 if is(name, "accept")
                && memchr::memmem::find(value, b"text/event-stream").is_some() =>
            {
                return None
            }
            6 if is(name, "expect") => return None,
            7 if is(name, "upgrade") => return None,
            10 if is(name, "connection") => {
                for token in value.split(|&b| b == b',') {
                    match token.trim_ascii() {
                        t if t.eq_ignore_ascii_case(b"close") => facts.close = true,
                        t if t.eq_ignore_ascii_case(b"keep-alive") || t.is_empty() => {}
                        // Any other nominated field: Pingora's general handling.
                        _ => return None,
                    }
                }
            }
            12 if is(name, "x-request-id") && facts.request_id.is_none() => {
                facts.request_id = Some(value);
            }
            14 if is(name, "content-length") && value.trim_ascii() != b"0" => return None,
            15 if is(name, "x-forwarded-for") && facts.forwarded_for.is_none() => {
                facts.forwarded_for = Some(value);
            }
            17 if is(name, "transfer-encoding") => return None,
            _ => {}
        }
    }
    if hosts != 1 || !validity::valid_host(facts.host.as_bytes()) {
        return None;
    }
    Some(facts)
}

/// Request fields not passed to the backend: hop-by-hop ones, and those Tether sets itself.
fn dropped_request_field(name: &str, client_trusted: bool, replaces_forwarded_for: bool) -> bool {
    forwarding::is_hop_by_hop(name)
        || match name.len() {
            9 => is(name, "forwarded") && !client_trusted,
            12 => is(name, "x-request-id"),
            15 => is(name, "x-forwarded-for") && replaces_forwarded_for,
            16 => is(name, "x-forwarded-host"),
            17 => is(name, "x-forwarded-proto"),
            _ => false,
        }
}

/// Serves one parsed request.
async fn exchange<'b>(
    conn: &mut Conn<'_>,
    raw: &'b [u8],
    req: &httparse::Request<'_, 'b>,
    pipelined: bool,
) -> Next {
    let installed = conn.state.current();
    let limits = &installed.config.server.limits;
    let Some(facts) = facts(raw, req, limits) else {
        return Next::ToPingora;
    };
    let (path, query) = match memchr::memchr(b'?', facts.target.as_bytes()) {
        Some(at) => (&facts.target[..at], Some(&facts.target[at + 1..])),
        None => (facts.target, None),
    };
    let view = RequestView {
        method: facts.method,
        host: Some(facts.host),
        path,
        query,
        headers: Headers::Raw(req.headers),
        client_ip: conn.client_ip,
    };
    // Refusals and Tether's own answers are Pingora's path's business.
    let Ok(decision) = installed.router.decide(&view) else {
        return Next::ToPingora;
    };
    let route = &installed.router.routes()[decision.route];
    if route.long_poll || route.rate_limit.is_some() {
        return Next::ToPingora;
    }
    installed
        .counters
        .route(Some(decision.route))
        .key_from(decision.key_source);

    let mut ctx = RequestCtx::for_request(conn.state);
    ctx.installed = Some(installed.clone());
    ctx.decision = Some(decision);
    // The client's id when usable (httparse has checked it is a valid field value), else a
    // new one; kept as bytes (no `HeaderValue` allocated per request).
    let generated;
    let request_id = match facts
        .request_id
        .filter(|v| forwarding::usable_request_id(v))
    {
        Some(id) => id,
        None => {
            generated = forwarding::GeneratedId::new();
            generated.as_bytes()
        }
    };
    conn.served += 1;
    let mut close = facts.close
        || pipelined
        || conn.closing.started()
        || limits
            .max_requests_per_connection
            .is_some_and(|max| conn.served >= u64::from(max));

    let mut scratch = std::mem::take(&mut conn.scratch);
    let outcome = proxy(
        conn,
        &facts,
        request_id,
        &installed,
        &mut ctx,
        close,
        &mut scratch,
    )
    .await;
    scratch.keep_if_small();
    conn.scratch = scratch;
    let (status, body_bytes) = match outcome {
        Ok(done) => {
            close |= done.close;
            (done.status, done.body_bytes)
        }
        Err(failure) => {
            // Nothing reached the client yet: answer, then close (as Pingora does after an
            // error it generated).
            let status = failure.status();
            if status > 0 {
                let _ = write_local(&mut conn.client, status, limits.send_timeout).await;
            }
            close = true;
            (status, 0)
        }
    };
    // One clock reading for the exchange's duration and the start of the keep-alive wait.
    let finished = Instant::now();
    conn.idle_since = finished;
    ctx.holding = None;
    if let (Some(installed), Some(decision)) = (&ctx.installed, &ctx.decision) {
        record_exchange(
            installed,
            Some(decision),
            ctx.tried.last().copied(),
            Some(request_id),
            facts.method,
            crate::exchange::ExchangeKind::Plain,
            status,
            body_bytes,
            finished.saturating_duration_since(ctx.started.into()),
        );
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// How a proxied exchange that reached the client ended.
struct Done {
    status: u16,
    body_bytes: usize,
    /// The client connection cannot be kept (the response ran until the backend closed, or
    /// broke off midway).
    close: bool,
}

/// Why an exchange failed before anything reached the client.
enum Failure {
    /// No backend could be reached, or the backend broke the exchange off (502).
    Gateway,
    /// The backend did not answer in time (504).
    Timeout,
    /// The client went away (nothing to answer).
    ClientGone,
}

impl Failure {
    fn status(&self) -> u16 {
        match self {
            Failure::Gateway => 502,
            Failure::Timeout => 504,
            Failure::ClientGone => 0,
        }
    }
}

/// A transport error on the backend connection, and whether the connection had been reused
/// (then a fresh connection is tried once before the backend is blamed).
enum UpstreamError {
    Io { reused: bool },
    Timeout,
    Protocol,
}

/// Connects (or reuses a connection), sends the request, relays the response.
async fn proxy(
    conn: &mut Conn<'_>,
    facts: &Facts<'_, '_>,
    request_id: &[u8],
    installed: &Installed,
    ctx: &mut RequestCtx,
    close: bool,
    scratch: &mut Scratch,
) -> Result<Done, Failure> {
    let Some((route, upstream)) = ctx.decision.as_ref().map(|d| (d.route, d.upstream)) else {
        return Err(Failure::Gateway);
    };
    let limits = &installed.config.server.limits;
    let read_timeout = installed.router.routes()[route].timeouts.read;
    let upstream_name = &installed.router.upstreams()[upstream].name;
    let passive_cfg = installed.config_upstream(upstream).and_then(|u| u.passive);
    let trusted = conn.client_ip.is_some_and(|ip| installed.trusts(ip));
    let Scratch { head, out } = scratch;
    upstream_head(
        facts,
        conn.client_ip_text.as_deref(),
        trusted,
        request_id,
        head,
    );
    let idempotent = matches!(facts.method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE");

    // The same attempts, retries and bookkeeping as the proxy's `upstream_peer` and
    // `fail_to_connect`; a pooled connection that turns out dead is replaced by a fresh one
    // to the same backend once, without counting against the backend or the retries.
    let mut backend = ctx.next_attempt().map_err(|_| Failure::Gateway)?;
    let mut pooled = true;
    loop {
        let kept = if pooled {
            conn.state.pool.take(backend.address, ctx.started)
        } else {
            None
        };
        let reused = kept.is_some();
        let mut socket = match kept {
            Some(socket) => {
                ctx.connected();
                socket
            }
            None => {
                let (socket, connected) = ctx
                    .connect(conn.state, backend.clone())
                    .await
                    .ok_or(Failure::Gateway)?;
                backend = connected;
                socket
            }
        };
        let exchange = Exchange {
            head,
            head_request: facts.method == "HEAD",
            reused,
            read_timeout,
            send_timeout: limits.send_timeout,
            close,
            request_id,
            backend: &backend,
        };
        let relayed = relay(
            &mut conn.client,
            &mut socket,
            &mut conn.upstream_timer,
            &exchange,
            out,
        )
        .await;
        match relayed {
            Ok((done, keep_upstream)) => {
                if keep_upstream {
                    // Idle since the request started, as far as the pool's age limit goes:
                    // a little early, and no clock reading.
                    conn.state.pool.put(backend.address, socket, ctx.started);
                }
                return Ok(done);
            }
            Err(Relay::Upstream(UpstreamError::Io { reused: true })) if idempotent && reused => {
                // A stale pooled connection: try a fresh one to the same backend.
                pooled = false;
                continue;
            }
            Err(Relay::Upstream(error)) => {
                // A kept connection that went stale is not the backend's fault.
                if !matches!(
                    error,
                    UpstreamError::Protocol | UpstreamError::Io { reused: true }
                ) {
                    passive::record_failure(conn.state, upstream_name, passive_cfg, &backend);
                }
                return Err(match error {
                    UpstreamError::Timeout => Failure::Timeout,
                    _ => Failure::Gateway,
                });
            }
            Err(Relay::Client) => return Err(Failure::ClientGone),
            Err(Relay::AfterHead(done)) => return Ok(done),
        }
    }
}

/// The request head as the backend gets it: the client's request line and fields minus the
/// hop-by-hop ones, plus the forwarding fields (as `forwarding::add_forwarding_headers` sets
/// them on Pingora's path).
fn upstream_head(
    facts: &Facts<'_, '_>,
    client_ip: Option<&[u8]>,
    trusted: bool,
    request_id: &[u8],
    head: &mut Vec<u8>,
) {
    head.clear();
    head.extend_from_slice(facts.method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(facts.target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let replaces_forwarded_for = client_ip.is_some() || !trusted;
    copy_field_lines(facts.raw, facts.fields, head, |field| {
        !dropped_request_field(field.name, trusted, replaces_forwarded_for)
    });
    if let Some(ip) = client_ip {
        head.extend_from_slice(b"X-Forwarded-For: ");
        match facts.forwarded_for.map(<[u8]>::trim_ascii) {
            Some(prev) if trusted && !prev.is_empty() => {
                head.extend_from_slice(prev);
                head.extend_from_slice(b", ");
            }
            _ => {}
        }
        head.extend_from_slice(ip);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
    push_field(head, b"X-Forwarded-Host", facts.host.as_bytes());
    push_field(head, b"X-Request-Id", request_id);
    head.extend_from_slice(b"\r\n");
}

/// Writes the field lines of a parsed head (`raw`, up to and with its blank line) that `keep`
/// keeps to `out`. Runs of consecutive kept lines are copied as the peer sent them, one copy
/// per run (writing each line anew was 5 % of the path's instructions); a head with a bare-LF
/// line end has every kept line written anew as `Name: value` CRLF instead.
fn copy_field_lines(
    raw: &[u8],
    fields: &[httparse::Header<'_>],
    out: &mut Vec<u8>,
    mut keep: impl FnMut(&httparse::Header<'_>) -> bool,
) {
    let base = raw.as_ptr() as usize;
    let start = |field: &httparse::Header<'_>| {
        (field.name.as_ptr() as usize)
            .checked_sub(base)
            .filter(|&at| at < raw.len())
    };
    // Every line before a field's line ends in CRLF, and so does the last one.
    let crlf = raw.ends_with(b"\r\n\r\n")
        && fields.iter().all(|field| {
            start(field).is_some_and(|at| at >= 2 && raw.get(at - 2..at) == Some(b"\r\n"))
        });
    if !crlf {
        for field in fields {
            if keep(field) {
                push_field(out, field.name.as_bytes(), field.value);
            }
        }
        return;
    }
    // The field lines end where the blank line starts.
    let end = raw.len() - 2;
    let mut run: Option<usize> = None;
    for field in fields {
        let at = start(field).unwrap_or(end);
        if keep(field) {
            run.get_or_insert(at);
        } else if let Some(from) = run.take() {
            out.extend_from_slice(raw.get(from..at).unwrap_or_default());
        }
    }
    if let Some(from) = run {
        out.extend_from_slice(raw.get(from..end).unwrap_or_default());
    }
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One request on one backend connection.
struct Exchange<'a> {
    head: &'a [u8],
    head_request: bool,
    /// The connection came from the pool.
    reused: bool,
    read_timeout: Duration,
    send_timeout: Duration,
    /// Tell the client this connection closes after the response.
    close: bool,
    request_id: &'a [u8],
    backend: &'a BackendState,
}

/// Why [`relay`] stopped early.
enum Relay {
    /// The backend failed before a response head reached the client.
    Upstream(UpstreamError),
    /// The client went away before a response head reached it.
    Client,
    /// Something broke after the head went out: the client connection must close.
    AfterHead(Done),
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head, already rewritten for the client into the output buffer.
struct ResponseHead {
    len: usize,
    status: u16,
    body: Body,
    /// The backend connection may serve another request afterwards.
    reusable: bool,
}

/// Sends the request head, then relays the response to the client. On success, says whether
/// the backend connection can go back to the pool.
async fn relay(
    client: &mut ClientStream,
    socket: &mut TcpStream,
    timer: &mut LazyDeadline,
    exchange: &Exchange<'_>,
    out: &mut Vec<u8>,
) -> Result<(Done, bool), Relay> {
    let io_error = |got_bytes: bool| {
        Relay::Upstream(UpstreamError::Io {
            reused: exchange.reused && !got_bytes,
        })
    };
    match timer
        .within(exchange.send_timeout, socket.write_all(exchange.head))
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(io_error(false)),
        Err(_) => return Err(Relay::Upstream(UpstreamError::Timeout)),
    }
    let mut pooled = ResponseBuf::take();
    let buf = &mut pooled.0;
    out.clear();
    let head = loop {
        if !buf.is_empty() {
            match response_head(buf, exchange, out) {
                Ok(Some(head)) if head.status >= 200 => {
                    passive::record_success(exchange.backend);
                    break head;
                }
                Ok(Some(informational)) => {
                    // 100 or 103: pass it on, then look for the final response.
                    if write_client(client, out, exchange.send_timeout)
                        .await
                        .is_err()
                    {
                        return Err(Relay::Client);
                    }
                    out.clear();
                    buf.drain(..informational.len);
                    continue;
                }
                Ok(None) if buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(Relay::Upstream(UpstreamError::Protocol))
                }
                Ok(None) => {}
                Err(()) => return Err(Relay::Upstream(UpstreamError::Protocol)),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_SIZE);
        }
        match timer
            .within(exchange.read_timeout, socket.read_buf(buf))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(io_error(!buf.is_empty())),
            Ok(Ok(_)) => {}
            Err(_) => return Err(Relay::Upstream(UpstreamError::Timeout)),
        }
    };

    // The body bytes that came with the head, then the rest as it arrives.
    let mut done = Done {
        status: head.status,
        body_bytes: 0,
        close: matches!(head.body, Body::UntilClose),
    };
    let mut reusable = head.reusable;
    let mut left = match head.body {
        Body::Length(n) => n,
        _ => 0,
    };
    let mut chunks = ChunkedEnd::default();
    let mut finished = head.body == Body::None || (head.body == Body::Length(0));
    let mut start = head.len;
    let mut first_write = true;
    loop {
        let arrived = &buf[start.min(buf.len())..];
        let take = if finished {
            0
        } else {
            match head.body {
                Body::None => 0,
                Body::Length(_) => {
                    let take = left.min(arrived.len() as u64) as usize;
                    left -= take as u64;
                    finished = left == 0;
                    take
                }
                Body::Chunked => match chunks.feed(arrived) {
                    Ok(Some(end)) => {
                        finished = true;
                        end
                    }
                    Ok(None) => arrived.len(),
                    Err(_) => {
                        done.close = true;
                        reusable = false;
                        finished = true;
                        arrived.len()
                    }
                },
                Body::UntilClose => arrived.len(),
            }
        };
        if take < arrived.len() {
            // The backend sent more than the response: do not trust the connection again.
            reusable = false;
        }
        out.extend_from_slice(&arrived[..take]);
        done.body_bytes += take;
        if !out.is_empty() || first_write {
            if write_client(client, out, exchange.send_timeout)
                .await
                .is_err()
            {
                done.close = true;
                return if first_write {
                    Err(Relay::Client)
                } else {
                    Err(Relay::AfterHead(done))
                };
            }
            first_write = false;
        }
        if finished {
            let reusable = reusable && !done.close;
            return Ok((done, reusable));
        }
        out.clear();
        buf.clear();
        start = 0;
        if buf.capacity() < 1024 {
            buf.reserve(READ_SIZE);
        }
        match timer
            .within(exchange.read_timeout, socket.read_buf(buf))
            .await
        {
            Ok(Ok(0)) if head.body == Body::UntilClose => return Ok((done, false)),
            Ok(Ok(n)) if n > 0 => {}
            // Truncated, broken or too slow after the head went out: the client can only
            // learn by the connection closing.
            _ => {
                done.close = true;
                return Err(Relay::AfterHead(done));
            }
        }
    }
}

/// A buffer for a backend's response, from a per-thread stack of recently used ones.
///
/// Why: a fresh 16 KB buffer per exchange took the allocator's slow path on every request
/// (about 300 instructions), and a recently used buffer is still in the CPU's cache when the
/// kernel copies the response into it (HAProxy's buffer pools work the same way). Buffers
/// are held only while an exchange runs, so idle connections keep none.
struct ResponseBuf(Vec<u8>);

thread_local! {
    static RESPONSE_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ResponseBuf {
    /// Most buffers kept per thread.
    const KEPT: usize = 64;

    fn take() -> ResponseBuf {
        let reused = RESPONSE_BUFS
            .try_with(|bufs| bufs.try_borrow_mut().ok().and_then(|mut bufs| bufs.pop()))
            .ok()
            .flatten();
        ResponseBuf(reused.unwrap_or_else(|| Vec::with_capacity(READ_SIZE)))
    }
}

impl Drop for ResponseBuf {
    fn drop(&mut self) {
        // A buffer a large response grew is let go.
        if self.0.capacity() > 2 * READ_SIZE {
            return;
        }
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        let _ = RESPONSE_BUFS.try_with(|bufs| {
            if let Ok(mut bufs) = bufs.try_borrow_mut() {
                if bufs.len() < Self::KEPT {
                    bufs.push(buf);
                }
            }
        });
    }
}

/// Parses the response head at the start of `buf` and writes it, edited for the client, to
/// `out`: hop-by-hop fields (and those `Connection` nominates) dropped, Tether's
/// `X-Request-Id` set, `Connection: close` when the client connection ends after it.
/// `Ok(None)`: the head is not complete yet. `Err`: not a usable response.
fn response_head(
    buf: &[u8],
    exchange: &Exchange<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ()> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = response.code.ok_or(())?;
    // No upgrade was asked for, so a 101 is a broken backend.
    if status == 101 || !(100..=999).contains(&status) {
        return Err(());
    }
    let mut reusable = response.version == Some(1);
    let mut nominated: smallvec::SmallVec<[&[u8]; 4]> = smallvec::SmallVec::new();
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for field in response.headers.iter() {
        if is(field.name, "connection") {
            for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    nominated.push(token);
                }
            }
        } else if is(field.name, "content-length") {
            let value = field.value.trim_ascii();
            // At most 19 digits: no overflow, and no body is that long.
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n = value
                .iter()
                .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|m| m != n) {
                return Err(());
            }
            length = Some(n);
        } else if is(field.name, "transfer-encoding") {
            // The last coding decides; only `chunked` delimits the body.
            chunked = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .map(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    if chunked.is_some() && length.is_some() {
        // Both framings at once is how responses get smuggled (RFC 9112 6.3).
        return Err(());
    }
    let body = if status < 200 || status == 204 || status == 304 || exchange.head_request {
        Body::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Body::Chunked,
            (Some(false), _) => Body::UntilClose,
            (None, Some(n)) => Body::Length(n),
            (None, None) => Body::UntilClose,
        }
    };
    if body == Body::UntilClose {
        reusable = false;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    copy_field_lines(&buf[..len], response.headers, out, |field| {
        let name = field.name;
        // Tether sets its own `X-Request-Id`.
        let hop_by_hop = forwarding::is_hop_by_hop(name) || is(name, "x-request-id");
        let framing = is(name, "content-length") || is(name, "transfer-encoding");
        !(hop_by_hop
            || (!framing
                && nominated
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))))
    });
    push_field(out, b"X-Request-Id", exchange.request_id);
    if status >= 200 && (exchange.close || body == Body::UntilClose) {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        len,
        status,
        body,
        reusable,
    }))
}

/// Writes all of `bytes` to the client within `send_timeout`.
async fn write_client(
    client: &mut ClientStream,
    bytes: &[u8],
    send_timeout: Duration,
) -> Result<(), ()> {
    let write = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    // Most writes finish at once and never touch a timer; a blocked one arms its own.
    match LazyDeadline::default().within(send_timeout, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Tether's own answer to a failed exchange; the connection closes after it.
async fn write_local(
    client: &mut ClientStream,
    status: u16,
    send_timeout: Duration,
) -> Result<(), ()> {
    let reason = crate::exchange::reason_phrase(status);
    let body = format!("{status} {reason}\n");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Cache-Control: private, no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_client(client, response.as_bytes(), send_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field lines `copy_field_lines` writes for `head`, dropping fields named `drop`.
    fn copied(head: &[u8], drop: &[&str]) -> String {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        assert!(req.parse(head).unwrap().is_complete());
        let mut out = Vec::new();
        copy_field_lines(head, req.headers, &mut out, |f| {
            !drop.iter().any(|d| d.eq_ignore_ascii_case(f.name))
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn kept_field_lines_are_copied_as_sent_and_dropped_ones_are_not() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nX-A:1 \r\nX-B: 2\r\nKeep-Alive: 5\r\n\r\n";
        assert_eq!(
            copied(head, &["connection", "keep-alive"]),
            "Host: a\r\nX-A:1 \r\nX-B: 2\r\n"
        );
        assert_eq!(
            copied(head, &["host"]),
            "Connection: keep-alive\r\nX-A:1 \r\nX-B: 2\r\nKeep-Alive: 5\r\n"
        );
        assert_eq!(
            copied(head, &["host", "connection", "x-a", "x-b", "keep-alive"]),
            ""
        );
        assert_eq!(
            copied(head, &[]),
            "Host: a\r\nConnection: keep-alive\r\nX-A:1 \r\nX-B: 2\r\nKeep-Alive: 5\r\n"
        );
    }

    #[test]
    fn a_head_with_a_bare_lf_has_its_lines_written_anew_with_crlf() {
        let head = b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\nConnection: close\r\n\r\n";
        assert_eq!(copied(head, &["connection"]), "Host: a\r\nX-A: 1\r\n");
        let head = b"GET / HTTP/1.1\nHost: a\nX-A: 1\n\n";
        assert_eq!(copied(head, &[]), "Host: a\r\nX-A: 1\r\n");
    }
}
