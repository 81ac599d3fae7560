//! Tether's HTTP/1 engine: it serves every HTTP/1.0 and HTTP/1.1 connection, plain and TLS
//! (Pingora's listener accepts and terminates TLS and hands the stream over), from its first
//! request to its last. HTTP/2 is the HTTP/2 engine's (`crate::h2`).
//!
//! Why its own: Pingora's per-request machinery costs about three times HAProxy's CPU per
//! proxied request (callgrind, `BENCHMARKS.md`). Here a head is parsed in place (`httparse`),
//! routed on its raw fields, checked and edited by the shared core (`tether_http`,
//! `crate::core`), written to the backend in one buffer, and the response relayed as it
//! arrives. Backend connections are reused from the upstream pool (`crate::pool`).
//!
//! One exchange: read the head (`tether_http::request`) → checks → route → kind → read a small
//! body whole (`core::GATHER_LIMIT`) → connect or reuse → send the head with that body, or
//! then stream a larger one (`max_body`, `body_timeout`, `Expect: 100-continue`) → relay the
//! response (`response`) → record. A WebSocket whose backend switched protocols becomes a
//! [`tunnel`]. Requests sent before the previous response (pipelining)
//! are not served: the connection closes after the first, and nothing behind it is
//! forwarded (the client retries them, RFC 9112 9.3.2).

pub(crate) mod client;
pub(crate) mod deadline;
pub(crate) mod response;
pub(crate) mod stream;
pub mod tunnel;

use crate::closing::Waiter;
use crate::core::attempt::{Attempt, Fault};
use crate::core::record::{reason_phrase, record_exchange, ExchangeKind, Finished, Ongoing};
use crate::core::{admission, placement};
use crate::metrics::Metrics;
use crate::state::{InFlight, Installed, ProxyState};
use crate::streams::Registration;
use bytes::BufMut;
use client::ClientStream;
use deadline::LazyDeadline;
use response::{Relay, Relayed, UpstreamError};
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::task::Poll;
use std::time::Duration;
use tether_http::checks::Refusal;
use tether_http::chunked::ChunkedEnd;
use tether_http::policy::{self, Forwarding, GeneratedId};
use tether_http::request::{self, ReqBody, Request};
use tether_http::response::For;
use tether_routing::RequestView;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Header fields parsed without an allocation (a browser sends 10 to 20). The array lives in
/// the connection's task for its whole life, a held SSE stream's included: 32 bytes each.
const INLINE_FIELDS: usize = 32;
/// Most header fields parsed; a request with more is refused (431). `server.limits.max_headers`
/// is at most 256.
const MAX_FIELDS: usize = 257;
/// How long a connection idle at shutdown may take to deliver a request already sent.
const SHUTDOWN_READ_GRACE: Duration = Duration::from_millis(100);
/// The first read of a request head: most heads are well under 1 KB, and a small POST (an
/// edit of a document, 1 KiB) then comes whole with its head in one read. The buffer is kept
/// while the connection is idle, so it is not larger.
const FIRST_READ_SIZE: usize = 2048;
/// How much a longer head's buffer grows by.
const REQUEST_READ_SIZE: usize = 4 * 1024;
/// Largest body kept to be sent again on a fresh connection when a kept-alive one turns out
/// stale (Pingora's retry buffer is the same size).
const REPLAY_LIMIT: usize = 64 * 1024;

/// What outlives the connection task when a WebSocket tunnel takes the connection over (the
/// connection's place under `max_connections`).
pub type ConnectionGuard = Box<dyn Send + 'static>;

/// One client connection.
struct Conn<'s> {
    state: &'s Arc<ProxyState>,
    client: ClientStream,
    tls: bool,
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
    /// A head longer than this is refused (414 or 431).
    max_head: usize,
    scratch: Scratch,
}

/// Buffers a connection reuses between its requests (nothing allocated per request).
#[derive(Default)]
struct Scratch {
    /// The upstream request head.
    head: Vec<u8>,
    /// What goes to the client next: a response head and the body bytes that came with it.
    out: Vec<u8>,
    /// Request body bytes read after the head.
    body: Vec<u8>,
    /// Forwarding field values.
    text: Vec<u8>,
}

impl Scratch {
    /// Lets go of buffers a large exchange grew, so an idle connection stays small.
    fn keep_if_small(&mut self) {
        const KEEP: usize = 4 * 1024;
        for buf in [
            &mut self.head,
            &mut self.out,
            &mut self.body,
            &mut self.text,
        ] {
            if buf.capacity() > KEEP {
                *buf = Vec::new();
            }
        }
    }
}

/// Serves `client` until it closes, idles out, or becomes a WebSocket tunnel (which then
/// owns `guard`). The caller has made `state.closing` follow the server's shutdown.
pub(crate) async fn serve(
    state: Arc<ProxyState>,
    client: ClientStream,
    client_ip: Option<IpAddr>,
    guard: ConnectionGuard,
) {
    let state = &state;
    let (header_timeout, keepalive_timeout, max_head) = {
        let installed = state.current();
        let limits = &installed.config.server.limits;
        (
            limits.header_timeout,
            limits.keepalive_timeout,
            limits.max_uri + limits.max_header_bytes + 1024,
        )
    };
    let accepted = Instant::now();
    let client_ip_text = client_ip.map(|ip| {
        let mut text = Vec::new();
        policy::push_ip(&mut text, ip);
        text
    });
    let mut conn = Conn {
        state,
        tls: client.is_tls(),
        client,
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
    let mut guard = Some(guard);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // The first request's head must arrive within `header_timeout` of the accept; later
        // ones may idle for `keepalive_timeout` first (slowloris).
        let (idle_deadline, head_deadline) = if conn.served == 0 {
            let end = accepted + header_timeout;
            (end, end)
        } else {
            let idle_end = conn.idle_since + keepalive_timeout;
            (idle_end, idle_end + header_timeout)
        };
        let head_len = match read_head(&mut conn, &mut buf, idle_deadline, head_deadline).await {
            Head::Complete(len) => len,
            Head::Closed => return,
            Head::TooLarge => {
                let refusal = if memchr::memchr(b'\n', &buf).is_none() {
                    Refusal::new(414, "uri_too_long", "request target too long")
                } else {
                    Refusal::new(431, "header_too_large", "request header too large")
                };
                refuse(&mut conn, &refusal, "", b"", std::time::Instant::now()).await;
                return;
            }
        };
        let next = {
            // Uninitialised: filling the fields per request was 1 % of the CPU. A small array
            // in the connection's future (held for its whole life, streams included), and one
            // on the heap, sized by the limit, for the rare head with more fields.
            let mut fields =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; INLINE_FIELDS];
            let mut more: Vec<MaybeUninit<httparse::Header<'_>>> = Vec::new();
            let mut req = httparse::Request::new(&mut []);
            let mut parsed = req.parse_with_uninit_headers(&buf[..head_len], &mut fields);
            if parsed == Err(httparse::Error::TooManyHeaders) {
                more.resize_with(MAX_FIELDS, MaybeUninit::uninit);
                req = httparse::Request::new(&mut []);
                parsed = req.parse_with_uninit_headers(&buf[..head_len], &mut more);
            }
            match parsed {
                // Shorter than found: the head ended at a bare empty line, and what follows
                // it is a body or a further request.
                Ok(httparse::Status::Complete(len)) if len <= head_len => {
                    exchange(&mut conn, &buf, len, &req).await
                }
                Err(httparse::Error::TooManyHeaders) => {
                    let refusal = Refusal::new(431, "header_too_large", "too many header fields");
                    refuse(&mut conn, &refusal, "", b"", std::time::Instant::now()).await;
                    Next::Close
                }
                _ => {
                    let refusal = Refusal::new(400, "bad_request", "malformed request");
                    refuse(&mut conn, &refusal, "", b"", std::time::Instant::now()).await;
                    Next::Close
                }
            }
        };
        match next {
            Next::Tunnel(tunnel) => {
                if let Some(guard) = guard.take() {
                    tunnel::start(conn.client, *tunnel, guard);
                }
                return;
            }
            Next::Stream(tail) => {
                if let Some(guard) = guard.take() {
                    stream::start(conn.client, *tail, guard);
                }
                return;
            }
            Next::Close => {
                // TLS ends with a close_notify. Plain TCP just closes: closing the socket sends
                // the FIN (or, with unread bytes, the RST it would send after a shutdown too),
                // so a shutdown first would be one more syscall per connection for nothing.
                if conn.client.is_tls() {
                    let _ = timeout(Duration::from_secs(1), conn.client.shutdown()).await;
                }
                return;
            }
            Next::KeepAlive => {
                buf.clear();
                if buf.capacity() > REQUEST_READ_SIZE {
                    // A long head grew it: an idle connection keeps only the usual size.
                    buf = Vec::new();
                }
            }
        }
    }
}

/// What comes after one exchange.
enum Next {
    KeepAlive,
    Close,
    /// The connection is a WebSocket tunnel from here on.
    Tunnel(Box<tunnel::Tunnel>),
    /// The connection carries a waiting stream from here on, then closes.
    Stream(Box<stream::Tail>),
}

enum Head {
    /// A whole head of this many bytes is at the start of the buffer.
    Complete(usize),
    Closed,
    /// The head grew past the limit before it ended.
    TooLarge,
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
            return Head::TooLarge;
        }
        let deadline = if buf.is_empty() {
            idle_deadline
        } else {
            head_deadline
        };
        if buf.capacity() == 0 {
            buf.reserve(FIRST_READ_SIZE);
        } else if buf.capacity() - buf.len() < 512 {
            buf.reserve(REQUEST_READ_SIZE);
        }
        // Shutting down (graceful stop, binary upgrade): an idle connection closes, but a
        // request already on its way gets a moment to arrive and is served.
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
                    Metrics::global()
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
    static LF_LF: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));
    // Bare LF line ends are legal for a recipient to accept (RFC 9112 2.2); httparse does. A
    // head that ends with a bare empty line before a CRLF CRLF further on is found by the
    // parser, which stops there (`serve` takes its length).
    match CRLF_CRLF.find(buf) {
        Some(at) => Some(at + 4),
        None => LF_LF.find(buf).map(|at| at + 2),
    }
}

/// Answers a request Tether refuses before routing (counted by reason), records it, and
/// closes the connection.
async fn refuse(
    conn: &mut Conn<'_>,
    refusal: &Refusal,
    method: &str,
    request_id: &[u8],
    started: std::time::Instant,
) {
    crate::metrics::refused(refusal.label, refusal.status);
    let installed = conn.state.current();
    let local = Local {
        decision: None,
        kind: ExchangeKind::Plain,
        method,
        request_id,
        started,
    };
    answer_locally(conn, &installed, &local, refusal.status, refusal.why).await;
}

/// A request Tether answers itself, as its record needs it.
struct Local<'a> {
    decision: Option<&'a tether_routing::Decision>,
    kind: ExchangeKind,
    method: &'a str,
    request_id: &'a [u8],
    started: std::time::Instant,
}

/// Writes Tether's own answer (see [`write_local`]) and records the exchange; the connection
/// closes after it.
async fn answer_locally(
    conn: &mut Conn<'_>,
    installed: &Installed,
    local: &Local<'_>,
    status: u16,
    why: &str,
) -> Next {
    let send_timeout = installed.config.server.limits.send_timeout;
    let _ = write_local(&mut conn.client, status, why, send_timeout).await;
    record_exchange(
        installed,
        &Finished {
            decision: local.decision,
            backend: None,
            request_id: (!local.request_id.is_empty()).then_some(local.request_id),
            method: local.method,
            kind: local.kind,
            status,
            bytes: 0,
            elapsed: local.started.elapsed(),
        },
    );
    Next::Close
}

/// Tether's own answer: a short text body, advice headers where the status has them, and
/// the connection closes after it.
async fn write_local(
    client: &mut ClientStream,
    status: u16,
    why: &str,
    send_timeout: Duration,
) -> Result<(), ()> {
    let reason = reason_phrase(status);
    let body = format!("{status} {why}\n");
    let advice = match status {
        // RFC 6455 4.4: say which WebSocket version we speak.
        426 => "Sec-WebSocket-Version: 13\r\n",
        // No backend up, a stream ended by convergence, a rate limit: come back shortly.
        429 | 503 => "Retry-After: 1\r\n",
        _ => "",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Cache-Control: private, no-store\r\n{advice}Connection: close\r\n\r\n{body}",
        body.len()
    );
    response::write_client(client, response.as_bytes(), send_timeout).await
}

/// The request's bookkeeping from routing to the end: in flight for a graceful stop, and
/// what the access log and route metrics get.
struct Ticket {
    started: std::time::Instant,
    in_flight: Option<InFlight>,
}

/// Serves one parsed request.
async fn exchange<'b>(
    conn: &mut Conn<'_>,
    buf: &'b [u8],
    head_len: usize,
    req: &httparse::Request<'_, 'b>,
) -> Next {
    let installed = conn.state.current();
    let limits = &installed.config.server.limits;
    let ticket = Ticket {
        started: std::time::Instant::now(),
        in_flight: Some(conn.state.enter()),
    };
    conn.served += 1;
    let raw = &buf[..head_len];
    let read = Request::read(raw, req);
    // The client's id when usable, else a new one; kept as bytes. From the facts' pass over
    // the fields when the head's framing was readable, else by a search of its own.
    let client_id = match &read {
        Ok(facts) => facts.request_id,
        Err(_) => req
            .headers
            .iter()
            .find(|f| policy::is(f.name, "x-request-id"))
            .map(|f| f.value),
    };
    let generated;
    let request_id = match client_id.filter(|v| policy::usable_request_id(v)) {
        Some(id) => id,
        None => {
            generated = GeneratedId::new();
            generated.as_bytes()
        }
    };
    // Plain matches, not combinators: the facts are a few hundred bytes, and every move of
    // them was a `memcpy` per request.
    let method = req.method.unwrap_or("");
    let facts = match read {
        Ok(facts) => facts,
        Err(refusal) => {
            refuse(conn, &refusal, method, request_id, ticket.started).await;
            return Next::Close;
        }
    };
    let checked = match facts.check(limits) {
        Ok(checked) => checked,
        Err(refusal) => {
            refuse(conn, &refusal, method, request_id, ticket.started).await;
            return Next::Close;
        }
    };
    let view = RequestView {
        method: facts.method,
        host: checked.host,
        path: checked.path,
        query: checked.query,
        headers: tether_routing::Headers::Raw(facts.fields),
        client_ip: conn.client_ip,
    };
    let decision = match installed.router.decide(&view) {
        Ok(decision) => decision,
        Err(reject) => {
            let status = admission::routing_refusal(&reject);
            let local = Local {
                decision: None,
                kind: ExchangeKind::Plain,
                method: facts.method,
                request_id,
                started: ticket.started,
            };
            return answer_locally(conn, &installed, &local, status, &reject.to_string()).await;
        }
    };
    let decision = placement::settle(conn.state, &installed, decision).await;
    installed
        .counters
        .route(Some(decision.route))
        .key_from(decision.key_source);
    let route = &installed.router.routes()[decision.route];
    let kind = ExchangeKind::of(
        checked.websocket,
        facts.accepts.iter().copied(),
        route.long_poll,
    );
    let declared = match facts.body {
        ReqBody::Length(n) => Some(n),
        _ => None,
    };
    if let Err(refusal) = admission::admit(&installed, &decision, declared, conn.client_ip) {
        crate::metrics::refused(refusal.label, refusal.status);
        let local = Local {
            decision: Some(&decision),
            kind,
            method: facts.method,
            request_id,
            started: ticket.started,
        };
        return answer_locally(conn, &installed, &local, refusal.status, refusal.why).await;
    }

    let close = facts.close
        || conn.closing.started()
        || limits
            .max_requests_per_connection
            .is_some_and(|max| conn.served >= u64::from(max));
    let path = decision.path(checked.path);
    let trusted = conn.client_ip.is_some_and(|ip| installed.trusts(ip));
    let mut scratch = std::mem::take(&mut conn.scratch);
    {
        let up = request::Upstream {
            path,
            query: checked.query,
            websocket: kind == ExchangeKind::WebSocket,
            forwarding: Forwarding {
                client_ip: conn.client_ip_text.as_deref(),
                trusted,
                tls: conn.tls,
                host: checked.host.map(str::as_bytes),
                chain: &facts.chain,
                proto: facts.forwarded_proto,
                forwarded_host: facts.forwarded_host,
                request_id,
            },
        };
        request::upstream_head(&facts, &up, &mut scratch.head, &mut scratch.text);
    }
    let mut attempt = Attempt::new(installed.clone(), decision);
    let outcome = proxy(
        conn,
        &installed,
        &facts,
        &buf[head_len..],
        kind,
        request_id,
        &mut attempt,
        close,
        ticket.started,
        &mut scratch,
    )
    .await;
    scratch.keep_if_small();
    conn.scratch = scratch;
    let decision = &attempt.decision;
    let (status, body_bytes, close) = match outcome {
        Ok(Proxied::Done { done, pipelined }) => (
            done.status,
            done.body_bytes,
            close || done.close || pipelined,
        ),
        Ok(Proxied::Switched {
            to_client,
            head_len: switched_head,
            backend,
            registration,
        }) => {
            let early = buf[head_len..].to_vec();
            let tunnel = tunnel::Tunnel::new(tunnel::Opened {
                backend,
                to_client,
                head_len: switched_head,
                early,
                registration,
                ongoing: ongoing(&mut attempt, ticket, &installed, request_id),
            });
            return Next::Tunnel(Box::new(tunnel));
        }
        Ok(Proxied::Waiting {
            body,
            backend,
            registration,
            read_timeout,
        }) => {
            return Next::Stream(Box::new(stream::Tail {
                body,
                backend,
                registration,
                read_timeout,
                send_timeout: limits.send_timeout,
                method: facts.method.into(),
                kind,
                ongoing: ongoing(&mut attempt, ticket, &installed, request_id),
            }));
        }
        Err(failure) => {
            // Nothing reached the client yet: answer, then close.
            let (status, why) = failure.status();
            if status > 0 {
                let _ = write_local(&mut conn.client, status, why, limits.send_timeout).await;
            }
            if let Failure::Refused(refusal) = &failure {
                crate::metrics::refused(refusal.label, refusal.status);
            }
            if let Failure::Closing = failure {
                tracing::debug!("a stream was ended before its response started");
            }
            (status, 0, true)
        }
    };
    let finished = Instant::now();
    conn.idle_since = finished;
    record_exchange(
        &installed,
        &Finished {
            decision: Some(decision),
            backend: attempt.backend_index(),
            request_id: Some(request_id),
            method: facts.method,
            kind,
            status,
            bytes: body_bytes,
            elapsed: finished
                .into_std()
                .saturating_duration_since(ticket.started),
        },
    );
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// The exchange as it outlives this task (a tunnel, a stream's tail).
fn ongoing(
    attempt: &mut Attempt,
    ticket: Ticket,
    installed: &Arc<Installed>,
    request_id: &[u8],
) -> Ongoing {
    Ongoing {
        active: attempt.take_active(),
        in_flight: ticket.in_flight,
        installed: installed.clone(),
        decision: attempt.decision.clone(),
        backend_index: attempt.backend_index().unwrap_or(attempt.decision.backend),
        request_id: request_id.to_vec(),
        started: ticket.started,
    }
}

/// How a proxied exchange went.
enum Proxied {
    /// A response reached the client; `pipelined` when bytes of a further request came with
    /// this one (they are not served).
    Done {
        done: response::Done,
        pipelined: bool,
    },
    /// The backend switched to the WebSocket protocol.
    Switched {
        to_client: Vec<u8>,
        /// The length of the `101` head at the start of `to_client`.
        head_len: usize,
        backend: TcpStream,
        registration: Registration,
    },
    /// A stream's head went out and it waits for more (see `stream`).
    Waiting {
        body: response::BodyState,
        backend: TcpStream,
        registration: Registration,
        read_timeout: Duration,
    },
}

/// Why an exchange failed before anything reached the client.
enum Failure {
    /// No backend could be reached, or the backend broke the exchange off (502).
    Gateway,
    /// The backend did not answer in time (504).
    Timeout,
    /// The stream was ended before its response started (503, come back).
    Closing,
    /// The request was refused while its body arrived (400 framing, 413).
    Refused(Refusal),
    /// The client stopped sending its body (408).
    BodyTimeout,
    /// The client went away (nothing to answer).
    ClientGone,
}

impl Failure {
    fn status(&self) -> (u16, &'static str) {
        match self {
            Failure::Gateway => (502, "Bad Gateway"),
            Failure::Timeout => (504, "Gateway Timeout"),
            Failure::Closing => (503, "Service Unavailable"),
            Failure::Refused(r) => (r.status, r.why),
            Failure::BodyTimeout => (408, "request body timed out"),
            Failure::ClientGone => (0, ""),
        }
    }
}

/// A document over its route's `limits.streams_per_key`.
const STREAMS_PER_KEY: Refusal = Refusal::new(
    429,
    "streams_per_key",
    "this document has as many open streams as its route allows",
);

/// Connects (or reuses a connection), sends the request and its body, relays the response.
#[allow(clippy::too_many_arguments)]
async fn proxy(
    conn: &mut Conn<'_>,
    installed: &Installed,
    facts: &Request<'_, '_>,
    after_head: &[u8],
    kind: ExchangeKind,
    request_id: &[u8],
    attempt: &mut Attempt,
    close: bool,
    started: std::time::Instant,
    scratch: &mut Scratch,
) -> Result<Proxied, Failure> {
    // The attempt's routing state, borrowed from the caller (no reference count per request).
    let limits = &installed.config.server.limits;
    let route = &installed.router.routes()[attempt.decision.route];
    let read_timeout = match kind {
        ExchangeKind::Plain => route.timeouts.read,
        _ => route.timeouts.idle,
    };
    let websocket = kind == ExchangeKind::WebSocket;
    let websocket_key = websocket
        .then(|| {
            facts
                .fields
                .iter()
                .find(|f| policy::is(f.name, "sec-websocket-key"))
                .map(|f| f.value)
        })
        .flatten();
    // The body that came with the head, when it is all there: sent with the head in one
    // write, and again on a fresh connection if a kept-alive one turns out stale.
    let inline_body = facts.body.whole_in(after_head, route.max_body);
    let mut pipelined = match inline_body {
        Some(body) => after_head.len() > body.len(),
        None => false,
    };
    // A small body that did not all come in the head's read (2 KiB on a fresh buffer, so a
    // POST of a few KiB is cut) is read whole before anything is sent (`core::GATHER_LIMIT`): head
    // and body then leave in one write, as the client sent them, not a write per read.
    let gather = match (inline_body, facts.body) {
        (None, ReqBody::Length(n)) if !facts.expect_continue && n <= crate::core::GATHER_LIMIT => {
            Some(n as usize)
        }
        _ => None,
    };
    let replayable = (inline_body.is_some_and(|b| b.len() <= REPLAY_LIMIT) || gather.is_some())
        && crate::core::attempt::replayable_method(facts.method);
    let Scratch {
        head, out, body, ..
    } = scratch;
    let sent_inline = inline_body.is_some() || gather.is_some();
    if let Some(inline) = inline_body {
        head.extend_from_slice(inline);
    }
    if let Some(length) = gather {
        // `whole_in` found fewer than `length` bytes after the head.
        head.extend_from_slice(after_head);
        let body_end = head.len() + length.saturating_sub(after_head.len());
        // Reads ask for one byte more than the body: the read that ends it then comes up
        // short, which tells tokio the socket is drained, so the next head read waits for
        // readiness instead of first trying a read that finds nothing. A byte that does come
        // belongs to a further request (pipelined, as in `send_body`).
        head.reserve(body_end + 1 - head.len());
        while head.len() < body_end {
            let want = body_end + 1 - head.len();
            let mut rest = (&mut *head).limit(want);
            match timeout(limits.body_timeout, conn.client.read_buf(&mut rest)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::ClientGone),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Failure::BodyTimeout),
            }
        }
        if head.len() > body_end {
            head.truncate(body_end);
            pipelined = true;
        }
    }

    let mut backend = attempt.next_backend().ok_or(Failure::Gateway)?;
    // WebSockets always get a connection of their own.
    let mut pooled = !websocket;
    loop {
        let (mut socket, reused) = attempt
            .take_or_connect(conn.state, &mut backend, pooled, started)
            .await
            .ok_or(Failure::Gateway)?;
        let registration = match kind.stream_kind() {
            // Refused before anything is sent (a WebSocket before its 101).
            Some(stream_kind) => Some(
                attempt
                    .register_stream(conn.state, stream_kind, &backend)
                    .map_err(|_| Failure::Refused(STREAMS_PER_KEY))?,
            ),
            None => None,
        };
        // The head (and the body when it came with it).
        match conn
            .upstream_timer
            .within(limits.send_timeout, socket.write_all(head))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) if reused && replayable => {
                pooled = false;
                continue;
            }
            Ok(Err(_)) if replayable => {
                backend = attempt
                    .next_after_reset(conn.state)
                    .ok_or(Failure::Gateway)?;
                continue;
            }
            Ok(Err(_)) => {
                attempt.fault(conn.state, if reused { Fault::Stale } else { Fault::Reset });
                return Err(Failure::Gateway);
            }
            Err(_) => {
                attempt.fault(conn.state, Fault::Timeout);
                return Err(Failure::Timeout);
            }
        }
        let mut body_pipelined = false;
        if !sent_inline {
            // The rest of the body streams from the client to the backend.
            if facts.expect_continue
                && after_head.is_empty()
                && response::write_client(
                    &mut conn.client,
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    limits.send_timeout,
                )
                .await
                .is_err()
            {
                return Err(Failure::ClientGone);
            }
            body_pipelined = send_body(
                conn,
                facts,
                after_head,
                &mut socket,
                body,
                route.max_body,
                limits,
            )
            .await?;
        }
        let state = conn.state;
        let address = backend.address;
        let keep = move |socket: TcpStream| {
            // Idle since the request started, as far as the pool's age limit goes.
            state.pool.put(address, socket, started);
        };
        let exchange = response::Exchange {
            asked: For {
                head_request: facts.method == "HEAD",
                close: close || pipelined || body_pipelined || websocket,
                http11_client: facts.http11,
                request_id,
                websocket_key,
            },
            read_timeout,
            send_timeout: limits.send_timeout,
            control: registration.as_ref().map(|r| &**r.control()),
            keep: (!websocket).then_some(&keep as &(dyn Fn(TcpStream) + Sync)),
            hand_off: true,
        };
        let mut upstream = Some(socket);
        let relayed = response::relay(
            &mut conn.client,
            &mut upstream,
            &mut conn.upstream_timer,
            &exchange,
            out,
        )
        .await;
        match relayed {
            Ok(Relayed::Response(done)) => {
                attempt.answered();
                return Ok(Proxied::Done {
                    done,
                    pipelined: pipelined || body_pipelined,
                });
            }
            Ok(Relayed::Switched {
                to_client,
                head_len,
            }) => {
                attempt.answered();
                let (Some(registration), Some(socket)) = (registration, upstream) else {
                    return Err(Failure::Gateway);
                };
                return Ok(Proxied::Switched {
                    to_client,
                    head_len,
                    backend: socket,
                    registration,
                });
            }
            Ok(Relayed::Waiting(body)) => {
                attempt.answered();
                let (Some(registration), Some(backend)) = (registration, upstream) else {
                    // Not reached: only a registered stream with its connection waits.
                    return Ok(Proxied::Done {
                        done: body.into_done(),
                        pipelined: true,
                    });
                };
                return Ok(Proxied::Waiting {
                    body,
                    backend,
                    registration,
                    read_timeout,
                });
            }
            Err(Relay::Upstream(UpstreamError::Io { got_bytes: false }))
                if replayable && sent_inline =>
            {
                if reused {
                    // A stale pooled connection: try a fresh one to the same backend.
                    pooled = false;
                } else {
                    // A fresh one that ended unanswered: the next owner.
                    backend = attempt
                        .next_after_reset(conn.state)
                        .ok_or(Failure::Gateway)?;
                }
                continue;
            }
            Err(Relay::Upstream(error)) => {
                let fault = match error {
                    UpstreamError::Io { got_bytes } if reused && !got_bytes => Fault::Stale,
                    UpstreamError::Io { .. } => Fault::Reset,
                    UpstreamError::Timeout => Fault::Timeout,
                    UpstreamError::Protocol => Fault::BrokenResponse,
                };
                attempt.fault(conn.state, fault);
                return Err(match error {
                    UpstreamError::Timeout => Failure::Timeout,
                    _ => Failure::Gateway,
                });
            }
            Err(Relay::Closing) => return Err(Failure::Closing),
            Err(Relay::Client) => return Err(Failure::ClientGone),
            Err(Relay::AfterHead(done)) => {
                return Ok(Proxied::Done {
                    done,
                    pipelined: true,
                })
            }
        }
    }
}

/// Streams the request body that did not come with the head from the client to the backend:
/// `after_head` first, then reads (each within `body_timeout`). Returns whether bytes of a
/// further request came behind the body.
async fn send_body(
    conn: &mut Conn<'_>,
    facts: &Request<'_, '_>,
    after_head: &[u8],
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
    max_body: u64,
    limits: &tether_config::Limits,
) -> Result<bool, Failure> {
    let too_large = || {
        Failure::Refused(Refusal::new(
            413,
            "body_too_large",
            "request body too large",
        ))
    };
    let mut left = match facts.body {
        ReqBody::Length(n) => n,
        _ => 0,
    };
    let mut chunks = ChunkedEnd::default();
    let mut pending: &[u8] = after_head;
    let mut read_more = false;
    loop {
        if read_more {
            buf.clear();
            buf.reserve(response::READ_SIZE);
            match timeout(limits.body_timeout, conn.client.read_buf(buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::ClientGone),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Failure::BodyTimeout),
            }
            pending = &buf[..];
        }
        let (take, done) = match facts.body {
            ReqBody::None => (0, true),
            ReqBody::Length(_) => {
                let take = left.min(pending.len() as u64) as usize;
                left -= take as u64;
                (take, left == 0)
            }
            ReqBody::Chunked => match chunks.feed(pending) {
                Ok(Some(end)) => (end, true),
                Ok(None) => (pending.len(), false),
                Err(_) => {
                    return Err(Failure::Refused(Refusal::new(
                        400,
                        "bad_framing",
                        "malformed chunked body",
                    )))
                }
            },
        };
        if chunks.data_bytes() > max_body {
            return Err(too_large());
        }
        if take > 0 {
            match timeout(limits.send_timeout, socket.write_all(&pending[..take])).await {
                Ok(Ok(())) => {}
                _ => return Err(Failure::Gateway),
            }
        }
        if done {
            return Ok(take < pending.len());
        }
        read_more = true;
    }
}
