//! The HTTP/2 engine: serves each HTTP/2 connection (TLS with ALPN `h2`) from its handshake to
//! its close, on the h2 crate (the framing, HPACK, flow control and the protocol's own checks;
//! Pingora's listener has done the TLS handshake). Each stream is refused at once if it is
//! malformed in ways the h2 crate lets through (`session`: bytes that would split a request
//! line, `Content-Length` values that disagree, a host named twice or two ways); everything
//! after that is done with the same core as the HTTP/1 engine: the checks (`tether_http::checks`), the
//! routing decision, the admission, and then `forward`: the backend attempt and its
//! passive-health accounting (`core::attempt`) over the engine's HTTP/1 backend connections and
//! pool, the header policy, the one response-head validation, and the record.
//!
//! Why not Pingora's `ProxyHttp` and HTTP/2 session: a task and an 8 KB future per stream,
//! the proxy phases, and head conversions into Pingora's types and back cost more CPU than the
//! exchange itself (BENCHMARKS.md). Here a connection is one task: its streams are futures polled beside the accept loop, so a
//! response written by a stream is flushed by the same wake-up that produced it.
//! HTTP/1 never reaches it.

mod forward;
mod session;

use crate::core::attempt::Attempt;
use crate::core::record::{record_exchange, ExchangeKind, Finished};
use crate::core::{admission, placement};
use crate::state::{InFlight, ProxyState};
use crate::streams::Registration;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::HeaderValue;
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::protocols::Stream;
use session::{Gone, Session};
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tether_config::Limits;
use tether_http::checks;
use tether_http::framing;
use tether_http::policy::{self, GeneratedId};
use tether_routing::RequestView;

/// Malformed streams (answered or reset as they were accepted) a connection may open before it
/// is closed (Pingora's bound).
const MAX_MALFORMED_STREAMS: usize = 32;

/// Per-request state.
pub struct RequestCtx {
    /// The routed request's way through its backends.
    attempt: Option<Attempt>,
    kind: ExchangeKind,
    request_id: Vec<u8>,
    client_ip: Option<IpAddr>,
    /// The connection is TLS (for `X-Forwarded-Proto`).
    tls: bool,
    /// Status answered by Tether itself (refusals, errors), when no upstream response was sent.
    local_status: Option<u16>,
    /// The stream's entry in the registry, for SSE and long-poll exchanges.
    registration: Option<Registration>,
    /// Counts this request for graceful stop while it lives.
    _in_flight: InFlight,
    started: Instant,
    /// The route's body limit.
    max_body: u64,
    /// How long the client may pause while sending its body.
    body_timeout: Duration,
    /// The request's `Content-Length`, when it declared a usable one.
    declared: Option<u64>,
}

/// HTTP/2 limits: streams per connection and header list size from `limits`, Pingora's
/// bounded defaults otherwise; the h2 crate bounds resets (Rapid Reset, MadeYouReset) and
/// CONTINUATION floods by default.
pub fn h2_options(limits: &Limits) -> H2Options {
    let mut options = default_h2_options();
    options.max_concurrent_streams(limits.max_concurrent_streams);
    options.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    options.initial_connection_window_size(1 << 20);
    options
}

/// Serves one HTTP/2 connection until the client closes it, it errs, it has been idle (no
/// open stream) for `keepalive_timeout`, or shutdown has drained it (GOAWAY, then its open
/// streams finish). `guard` holds the connection's place under `max_connections`.
pub(crate) async fn serve(
    state: Arc<ProxyState>,
    stream: Stream,
    client_ip: Option<IpAddr>,
    guard: Box<dyn Send>,
) {
    let tls = stream.get_ssl_digest().is_some();
    let (options, idle_timeout) = {
        let installed = state.current();
        let limits = &installed.config.server.limits;
        (h2_options(limits), limits.keepalive_timeout)
    };
    let closing = state.closing.join();
    let mut conn = match options.handshake::<_, Bytes>(stream).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!("HTTP/2 handshake failed: {e}");
            return;
        }
    };
    let mut streams = FuturesUnordered::new();
    let mut malformed = 0usize;
    let mut draining = false;
    let mut idle = pin!(tokio::time::sleep(idle_timeout));
    loop {
        let accepted = poll_fn(|cx| {
            // Streams first: what they write is flushed by the accept below, which drives the
            // connection, in the same wake-up.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {
                if streams.is_empty() {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
            if !draining && closing.poll_started(cx).is_ready() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(accepted) = conn.poll_accept(cx) {
                return Poll::Ready(Some(accepted));
            }
            if streams.is_empty() && !draining && idle.as_mut().poll(cx).is_ready() {
                // Idle with nothing in flight: closed at once, without waiting on a GOAWAY
                // exchange with a client that may be gone.
                return Poll::Ready(Some(None));
            }
            Poll::Pending
        })
        .await;
        match accepted {
            None => {
                // Shutdown: GOAWAY, and the open streams finish.
                conn.graceful_shutdown();
                draining = true;
            }
            Some(Some(Err(e))) => {
                // Clients often just close the TCP connection; not an error worth a log line.
                tracing::debug!("HTTP/2 connection ended: {e}");
                break;
            }
            Some(None) => break,
            Some(Some(Ok((request, respond)))) => match Session::accept(request, respond) {
                Some(session) => {
                    streams.push(exchange(state.clone(), session, client_ip, tls));
                }
                None => {
                    malformed += 1;
                    if malformed >= MAX_MALFORMED_STREAMS {
                        tracing::warn!(
                            "closing an HTTP/2 connection after {malformed} malformed requests"
                        );
                        break;
                    }
                }
            },
        }
    }
    // The connection is gone: streams still open learn it at their next wait and end (each
    // is recorded as it ends).
    drop(conn);
    while streams.next().await.is_some() {}
    drop(guard);
}

/// Answers the request with a short text body and its advice headers.
async fn respond_local(session: &mut Session, status: u16, why: &str) -> Result<(), Gone> {
    let body = Bytes::from(format!("{status} {why}\n"));
    let mut response = http::Response::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    match status {
        426 => {
            headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
        }
        429 | 503 => {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    session.send_head(response, false)?;
    session.send_data(body, true).await
}

/// Answers locally and notes the status for the record.
async fn answer(session: &mut Session, ctx: &mut RequestCtx, status: u16, why: &str) {
    ctx.local_status = Some(status);
    if respond_local(session, status, why).await.is_err() {
        tracing::debug!("could not send a local response: the client has gone");
    }
}

/// One request stream: checked, routed, admitted, forwarded, recorded.
async fn exchange(
    state: Arc<ProxyState>,
    mut session: Session,
    client_ip: Option<IpAddr>,
    tls: bool,
) {
    let mut ctx = RequestCtx {
        attempt: None,
        kind: ExchangeKind::Plain,
        request_id: Vec::new(),
        client_ip,
        tls,
        local_status: None,
        registration: None,
        _in_flight: state.enter(),
        started: Instant::now(),
        max_body: u64::MAX,
        body_timeout: Duration::MAX,
        declared: None,
    };
    handle(&state, &mut session, &mut ctx).await;
    ctx.registration = None;
    let status = session.status().or(ctx.local_status).unwrap_or(0);
    let installed = match &ctx.attempt {
        Some(attempt) => attempt.installed.clone(),
        None => state.current(),
    };
    record_exchange(
        &installed,
        &Finished {
            decision: ctx.attempt.as_ref().map(|a| &a.decision),
            backend: ctx.attempt.as_ref().and_then(Attempt::backend_index),
            request_id: Some(&ctx.request_id),
            method: session.request.method.as_str(),
            kind: ctx.kind,
            status,
            bytes: session.body_sent(),
            elapsed: ctx.started.elapsed(),
        },
    );
    // A response cut off by its backend (`Failure::AfterHead`) was never ended: dropping the
    // session resets the stream, so the client cannot take it for a whole one.
}

/// The exchange up to its end; what happened is left in `ctx` and `session` for the record.
async fn handle(state: &Arc<ProxyState>, session: &mut Session, ctx: &mut RequestCtx) {
    let installed = state.current();
    let limits = &installed.config.server.limits;
    let req = &session.request;
    ctx.request_id = req
        .headers
        .get("x-request-id")
        .map(HeaderValue::as_bytes)
        .filter(|v| policy::usable_request_id(v))
        .map_or_else(|| GeneratedId::new().as_bytes().to_vec(), <[u8]>::to_vec);
    let authority = req.uri.authority().map(|a| a.as_str().as_bytes());
    let fields: Vec<(&str, &[u8])> = req
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let target = session.target();
    let head = checks::Head {
        method: req.method.as_str(),
        target,
        http11: false,
        authority,
        fields: fields.iter().copied(),
    };
    let checked = match checks::check(&head, limits) {
        Ok(checked) => checked,
        Err(refusal) => {
            crate::metrics::refused(refusal.label, refusal.status);
            return answer(session, ctx, refusal.status, refusal.why).await;
        }
    };
    let view = RequestView {
        method: req.method.as_str(),
        host: checked.host,
        path: checked.path,
        query: checked.query,
        headers: tether_routing::Headers::Map(&req.headers),
        client_ip: ctx.client_ip,
    };
    let decision = match installed.router.decide(&view) {
        Ok(decision) => decision,
        Err(reject) => {
            let status = admission::routing_refusal(&reject);
            let why = reject.to_string();
            return answer(session, ctx, status, &why).await;
        }
    };
    let decision = placement::settle(state, &installed, decision).await;
    installed
        .counters
        .route(Some(decision.route))
        .key_from(decision.key_source);
    let route = &installed.router.routes()[decision.route];
    let req = &session.request;
    let accepts = req
        .headers
        .get_all(http::header::ACCEPT)
        .iter()
        .map(HeaderValue::as_bytes);
    ctx.kind = ExchangeKind::of(false, accepts, route.long_poll);
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| framing::content_length(v.as_bytes()));
    // A request body must keep arriving.
    ctx.body_timeout = limits.body_timeout;
    session.set_send_timeout(limits.send_timeout);
    let max_body = route.max_body;
    let admitted = admission::admit(&installed, &decision, declared, ctx.client_ip);
    ctx.attempt = Some(Attempt::new(installed.clone(), decision));
    if let Err(refusal) = admitted {
        crate::metrics::refused(refusal.label, refusal.status);
        return answer(session, ctx, refusal.status, refusal.why).await;
    }
    ctx.max_body = max_body;
    ctx.declared = declared;
    match forward::forward(state, session, ctx).await {
        Ok(()) => {}
        Err(forward::Failure::AfterHead) => {
            tracing::warn!(
                request_id = %String::from_utf8_lossy(&ctx.request_id),
                "the backend broke off a response under way"
            );
        }
        Err(failure) => {
            let (status, why) = failure.status();
            if status != 0 && session.status().is_none() {
                answer(session, ctx, status, why).await;
            }
        }
    }
}
