//! An HTTP/2 request's exchange with its backend, over the same HTTP/1 backend connections as
//! the HTTP/1 engine's: one upstream pool (`crate::pool`), the same backend attempt
//! (`core::attempt`: owner walk, retries, connect, faults for passive health), the head the
//! header policy writes, the body streamed as DATA frames arrive (chunked when the client
//! declared no length), the response head checked and edited by the one validation
//! (`tether_http::response::edit_head`), and its body, decoded, as DATA frames.
//!
//! This task owns the backend connection, so a stream that convergence ends is ended here, as
//! the HTTP/1 engine ends its own: 503 while it waits for its response, the end of the HTTP/2
//! stream after.

use super::session::Session;
use super::RequestCtx;
use crate::core::attempt::{replayable_method, Attempt, Fault};
use crate::core::record::ExchangeKind;
use crate::state::ProxyState;
use crate::streams::StreamControl;
use bytes::Bytes;
use http::HeaderValue;
use std::future::{poll_fn, Future};
use std::io::Write as _;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tether_http::chunked::ChunkedEnd;
use tether_http::framing::Body;
use tether_http::policy::{self, is, Forwarding, Nominated};
use tether_http::response::{edit_head, For, Head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Largest backend response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for the backend's responses.
const READ_SIZE: usize = 16 * 1024;
/// Most fields in an edited response head.
const MAX_FIELDS: usize = 128;

/// Why an exchange ended without a whole response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// No backend could be reached, or it broke the exchange off (502).
    Gateway,
    /// The backend did not answer in time (504).
    Timeout,
    /// The stream was ended before its response started (503, come back).
    Closing,
    /// The request body outgrew the route's `max_body` (413).
    TooLarge,
    /// The document holds as many open streams as its route's `limits.streams_per_key` (429).
    TooManyStreams,
    /// The client stopped sending its body (408).
    BodyTimeout,
    /// The client went away, or broke its own stream (nothing to answer).
    ClientGone,
    /// The backend broke off after the response head went out: the stream is reset, so the
    /// client cannot take a cut response for a whole one.
    AfterHead,
}

impl Failure {
    /// The status the client gets (0: none).
    pub(super) fn status(self) -> (u16, &'static str) {
        match self {
            Failure::Gateway => (502, "Bad Gateway"),
            Failure::Timeout => (504, "Gateway Timeout"),
            Failure::Closing => (503, "Service Unavailable"),
            Failure::TooLarge => (413, "request body too large"),
            Failure::TooManyStreams => (
                429,
                "this document has as many open streams as its route allows",
            ),
            Failure::BodyTimeout => (408, "request body timed out"),
            Failure::ClientGone | Failure::AfterHead => (0, ""),
        }
    }
}

/// What a wait ended with.
enum Waited<T> {
    Done(T),
    /// Convergence (or shutdown) ended the stream.
    Closing,
    /// The client reset or closed its stream.
    ClientGone,
}

/// Waits for `work` unless the stream is ended or its client leaves first. The client's
/// stream is watched only while a response is awaited or relayed: an SSE client sends nothing
/// while it listens, so its leaving is seen at once, not at the next event.
async fn watched<F: Future>(
    session: &mut Session,
    control: Option<&StreamControl>,
    work: F,
) -> Waited<F::Output> {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Some(control) = control {
            control.attach_relay(cx.waker());
            if control.reason().is_some() {
                return Poll::Ready(Waited::Closing);
            }
        }
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Waited::Done(out));
        }
        if session.poll_gone(cx).is_ready() {
            return Poll::Ready(Waited::ClientGone);
        }
        Poll::Pending
    })
    .await
}

/// The request head the backend gets, in HTTP/1.1: the target Tether routed on, `Host` from
/// the client's `Host` or `:authority`, the client's fields the policy keeps (as the HTTP/1
/// engine keeps them: several `Cookie` fields stay several, as an HTTP/1 client's do), the
/// framing of the body, Tether's forwarding fields.
fn upstream_head(
    session: &Session,
    attempt: &Attempt,
    ctx_ip: Option<std::net::IpAddr>,
    tls: bool,
    request_id: &[u8],
    chunked: bool,
    head: &mut Vec<u8>,
) {
    let req = &session.request;
    let trusted = ctx_ip.is_some_and(|ip| attempt.installed.trusts(ip));
    head.extend_from_slice(req.method.as_str().as_bytes());
    head.push(b' ');
    let path = attempt
        .decision
        .normalized_path
        .as_deref()
        .unwrap_or_else(|| req.uri.path());
    head.extend_from_slice(path.as_bytes());
    if let Some(query) = req.uri.query() {
        head.push(b'?');
        head.extend_from_slice(query.as_bytes());
    }
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = &req.headers;
    let host = headers
        .get(http::header::HOST)
        .map(HeaderValue::as_bytes)
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()));
    if let Some(host) = host {
        policy::push_field(head, b"Host", host);
    }
    let mut nominated = Nominated::new();
    for value in headers.get_all(http::header::CONNECTION) {
        policy::nominated(value.as_bytes(), &mut nominated);
    }
    for (name, value) in headers {
        let name = name.as_str();
        if name == "host" || name == "expect" {
            continue;
        }
        if policy::keeps_request_field(name, trusted, &nominated) {
            policy::push_field(head, name.as_bytes(), value.as_bytes());
        }
    }
    if chunked {
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    let values = |name: &str| -> Vec<&[u8]> {
        headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    };
    let chain = values("x-forwarded-for");
    let mut ip_text = Vec::new();
    if let Some(ip) = ctx_ip {
        policy::push_ip(&mut ip_text, ip);
    }
    let forwarding = Forwarding {
        client_ip: ctx_ip.map(|_| &ip_text[..]),
        trusted,
        tls,
        host,
        chain: &chain,
        proto: headers.get("x-forwarded-proto").map(HeaderValue::as_bytes),
        forwarded_host: headers.get("x-forwarded-host").map(HeaderValue::as_bytes),
        request_id,
    };
    policy::write_forwarding(head, &forwarding, &mut Vec::new());
    head.extend_from_slice(b"\r\n");
}

/// The request body's next DATA frame (None at its end), within `max_body` in all (`seen`).
async fn next_body_bytes(
    session: &mut Session,
    seen: &mut u64,
    max_body: u64,
    body_timeout: Duration,
) -> Result<Option<bytes::Bytes>, Failure> {
    let data = match timeout(body_timeout, session.read_body()).await {
        Ok(Ok(Some(data))) => data,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(_)) => return Err(Failure::ClientGone),
        Err(_) => return Err(Failure::BodyTimeout),
    };
    *seen += data.len() as u64;
    if *seen > max_body {
        crate::metrics::refused("body_too_large", 413);
        return Err(Failure::TooLarge);
    }
    Ok(Some(data))
}

/// Streams the request body from the client to the backend as its DATA frames arrive.
async fn send_body(
    session: &mut Session,
    socket: &mut TcpStream,
    chunked: bool,
    (max_body, body_timeout): (u64, Duration),
    send_timeout: Duration,
) -> Result<(), Failure> {
    let mut seen = 0u64;
    let mut framed = Vec::new();
    while let Some(data) = next_body_bytes(session, &mut seen, max_body, body_timeout).await? {
        if data.is_empty() {
            continue;
        }
        let bytes: &[u8] = if chunked {
            framed.clear();
            // The chunk's size line, written in place (no string per chunk).
            let _ = write!(framed, "{:x}\r\n", data.len());
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            &framed
        } else {
            &data
        };
        match timeout(send_timeout, socket.write_all(bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Failure::Gateway),
            Err(_) => return Err(Failure::Timeout),
        }
    }
    if chunked {
        match timeout(send_timeout, socket.write_all(b"0\r\n\r\n")).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Failure::Gateway),
            Err(_) => return Err(Failure::Timeout),
        }
    }
    Ok(())
}

/// The client's response head from the edited HTTP/1 head in `edited`: its status and fields,
/// less those HTTP/2 has no place for (RFC 9113 8.2.2).
fn h2_head(edited: &[u8]) -> Option<http::Response<()>> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut fields);
    parsed.parse(edited).ok()?;
    let status = parsed.code?;
    let mut response = http::Response::new(());
    *response.status_mut() = http::StatusCode::from_u16(status).ok()?;
    let headers = response.headers_mut();
    headers.reserve(parsed.headers.len());
    for field in parsed.headers.iter() {
        // The edit kept no hop-by-hop field but the framing, and may have added `Connection`.
        if policy::is_hop_by_hop(field.name) || is(field.name, "transfer-encoding") {
            continue;
        }
        let mut value = HeaderValue::from_bytes(field.value).ok()?;
        // A request id never repeats: HPACK indexing it would only churn the connection's
        // table, and the h2 crate's encoder compares each new value with every indexed one of
        // the same name (about 6 % of the CPU per request, perf). Never indexed, it is sent as
        // a literal and compared with nothing.
        if is(field.name, "x-request-id") {
            value.set_sensitive(true);
        }
        // `from_bytes` lower-cases the name itself, and well-known names need no allocation.
        let name = http::HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        headers.append(name, value);
    }
    Some(response)
}

/// Sends the request to its backend and relays the response: connects or reuses (a stale kept
/// connection is replaced when the request can be sent again), sends the head and body, waits
/// for the response head, relays the body. Registers a stream with the registry.
pub(super) async fn forward(
    state: &Arc<ProxyState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), Failure> {
    let RequestCtx {
        attempt,
        kind,
        request_id,
        client_ip,
        tls,
        registration,
        max_body,
        body_timeout,
        declared,
        ..
    } = ctx;
    let Some(attempt) = attempt.as_mut() else {
        return Err(Failure::Gateway);
    };
    let request_id: &[u8] = request_id;
    let installed = attempt.installed.clone();
    let limits = &installed.config.server.limits;
    let route = &installed.router.routes()[attempt.decision.route];
    let read_timeout = match kind {
        ExchangeKind::Plain => route.timeouts.read,
        _ => route.timeouts.idle,
    };
    let send_timeout = limits.send_timeout;
    let has_body = !session.is_body_empty();
    let (chunked, head_request, replayable, gather) = {
        let req = &session.request;
        let method = req.method.as_str();
        let expect_continue = has_body
            && req
                .headers
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // A small body with a declared length is read whole and sent with the head in one
        // write, as the HTTP/1 engine does (`core::GATHER_LIMIT`). Not when the client
        // asked for `100 Continue`: it may hold its body back for a while (Pingora's HTTP/2
        // session sends no interim response), and the head goes to the backend meanwhile.
        let gather = has_body
            && !expect_continue
            && declared.is_some_and(|n| n <= crate::core::GATHER_LIMIT);
        (
            has_body && !req.headers.contains_key(http::header::CONTENT_LENGTH),
            method == "HEAD",
            // May be sent twice: a replayable method, with no body or a body read whole.
            (!has_body || gather) && replayable_method(method),
            gather,
        )
    };
    let mut head = Vec::with_capacity(1024);
    upstream_head(
        session, attempt, *client_ip, *tls, request_id, chunked, &mut head,
    );
    if gather {
        let mut seen = 0u64;
        while let Some(data) = next_body_bytes(session, &mut seen, *max_body, *body_timeout).await?
        {
            head.extend_from_slice(&data);
        }
    }
    let asked = For {
        head_request,
        close: false,
        http11_client: true,
        request_id,
        websocket_key: None,
    };
    let started = Instant::now();
    let mut backend = attempt.next_backend().ok_or(Failure::Gateway)?;
    let mut pooled = true;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_SIZE);
    let mut out: Vec<u8> = Vec::new();
    'attempt: loop {
        let (mut socket, reused) = attempt
            .take_or_connect(state, &mut backend, pooled, started)
            .await
            .ok_or(Failure::Gateway)?;
        // A retry replaces the registration of the failed attempt.
        *registration = None;
        if let Some(stream_kind) = kind.stream_kind() {
            match attempt.register_stream(state, stream_kind, &backend) {
                Ok(r) => *registration = Some(r),
                Err(_) => {
                    crate::metrics::refused("streams_per_key", 429);
                    return Err(Failure::TooManyStreams);
                }
            }
        }
        match timeout(send_timeout, socket.write_all(&head)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if reused && replayable => {
                pooled = false;
                continue;
            }
            Ok(Err(_)) if replayable => {
                backend = attempt.next_after_reset(state).ok_or(Failure::Gateway)?;
                continue;
            }
            Ok(Err(_)) => {
                attempt.fault(state, if reused { Fault::Stale } else { Fault::Reset });
                return Err(Failure::Gateway);
            }
            Err(_) => {
                attempt.fault(state, Fault::Timeout);
                return Err(Failure::Timeout);
            }
        }
        if has_body && !gather {
            let limits = (*max_body, *body_timeout);
            if let Err(failure) =
                send_body(session, &mut socket, chunked, limits, send_timeout).await
            {
                match failure {
                    Failure::Gateway => attempt.fault(state, Fault::Reset),
                    Failure::Timeout => attempt.fault(state, Fault::Timeout),
                    _ => {}
                }
                return Err(failure);
            }
        }
        let control = registration.as_ref().map(|r| &**r.control());

        // The response head (interim responses are not passed on).
        buf.clear();
        let final_head = loop {
            if !buf.is_empty() {
                out.clear();
                match edit_head(&buf, &asked, &mut out) {
                    Ok(Some(Head::Final(head))) => break head,
                    Ok(Some(Head::Interim(len))) => {
                        buf.drain(..len);
                        continue;
                    }
                    Ok(None) if buf.len() <= MAX_RESPONSE_HEAD => {}
                    Ok(_) | Err(_) => {
                        attempt.fault(state, Fault::BrokenResponse);
                        return Err(Failure::Gateway);
                    }
                }
            }
            buf.reserve(READ_SIZE);
            let read = timeout(read_timeout, socket.read_buf(&mut buf));
            match watched(session, control, read).await {
                Waited::Closing => return Err(Failure::Closing),
                Waited::ClientGone => return Err(Failure::ClientGone),
                Waited::Done(Err(_)) => {
                    attempt.fault(state, Fault::Timeout);
                    return Err(Failure::Timeout);
                }
                Waited::Done(Ok(Ok(0) | Err(_))) => {
                    if reused && replayable && buf.is_empty() {
                        // A stale kept connection: a fresh one to the same backend.
                        pooled = false;
                        continue 'attempt;
                    }
                    if replayable && buf.is_empty() {
                        // A fresh one that ended unanswered: the next owner.
                        backend = attempt.next_after_reset(state).ok_or(Failure::Gateway)?;
                        continue 'attempt;
                    }
                    let stale = reused && buf.is_empty();
                    attempt.fault(state, if stale { Fault::Stale } else { Fault::Reset });
                    return Err(Failure::Gateway);
                }
                Waited::Done(Ok(Ok(_))) => {}
            }
        };
        let Some(response) = h2_head(&out) else {
            attempt.fault(state, Fault::BrokenResponse);
            return Err(Failure::Gateway);
        };
        attempt.answered();
        let mut finished = matches!(final_head.body, Body::None | Body::Length(0));
        if session.send_head(response, finished).is_err() {
            return Err(Failure::ClientGone);
        }

        // The body: what came with the head, then each read as it arrives.
        let mut left = match final_head.body {
            Body::Length(n) => n,
            _ => 0,
        };
        let mut chunks = ChunkedEnd::default();
        let mut trailing = false;
        let mut start = final_head.len;
        let mut data = Vec::new();
        while !finished {
            let pending = &buf[start..];
            match final_head.body {
                Body::None => finished = true,
                Body::Length(_) => {
                    let take = left.min(pending.len() as u64) as usize;
                    data.extend_from_slice(&pending[..take]);
                    left -= take as u64;
                    finished = left == 0;
                    trailing = take < pending.len();
                }
                Body::Chunked => match chunks.decode(pending, &mut data) {
                    Ok(Some(end)) => {
                        finished = true;
                        trailing = end < pending.len();
                    }
                    Ok(None) => {}
                    Err(_) => {
                        attempt.fault(state, Fault::BrokenResponse);
                        return Err(Failure::AfterHead);
                    }
                },
                Body::UntilClose => data.extend_from_slice(pending),
            }
            if !data.is_empty() || finished {
                let chunk = Bytes::from(std::mem::take(&mut data));
                if session.send_data(chunk, finished).await.is_err() {
                    return Err(Failure::ClientGone);
                }
            }
            if finished {
                break;
            }
            buf.clear();
            buf.reserve(READ_SIZE);
            start = 0;
            let read = timeout(read_timeout, socket.read_buf(&mut buf));
            match watched(session, control, read).await {
                Waited::Closing => {
                    // Ended on purpose: the stream ends cleanly and its client comes back.
                    let _ = session.finish();
                    return Ok(());
                }
                Waited::ClientGone => return Err(Failure::ClientGone),
                Waited::Done(Ok(Ok(0))) if final_head.body == Body::UntilClose => {
                    finished = true;
                    if session.finish().is_err() {
                        return Err(Failure::ClientGone);
                    }
                }
                Waited::Done(Ok(Ok(0) | Err(_))) => {
                    attempt.fault(state, Fault::Reset);
                    return Err(Failure::AfterHead);
                }
                Waited::Done(Err(_)) => {
                    attempt.fault(state, Fault::Timeout);
                    return Err(Failure::AfterHead);
                }
                Waited::Done(Ok(Ok(_))) => {}
            }
        }
        if final_head.reusable && !trailing && final_head.body != Body::UntilClose {
            // Idle since the request started, as far as the pool's age limit goes.
            state.pool.put(backend.address, socket, started);
        }
        return Ok(());
    }
}
