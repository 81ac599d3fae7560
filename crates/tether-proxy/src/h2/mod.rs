//! The HTTP/2 adapter: Pingora serves HTTP/2 connections (TLS with ALPN `h2`) and hands each
//! request to `request_filter`, which does the whole exchange with the same core as the
//! HTTP/1 engine: the checks (`tether_http::checks`), the routing decision, the admission, and
//! then `forward`: the backend attempt and its passive-health accounting (`core::attempt`)
//! over the engine's HTTP/1 backend connections and pool, the header policy, the one
//! response-head validation, and the record. Pingora's own upstream side is never used.
//! HTTP/1 never reaches it.

mod forward;

use crate::core::attempt::Attempt;
use crate::core::record::{reason_phrase, record_exchange, ExchangeKind, Finished};
use crate::core::{admission, placement};
use crate::state::{InFlight, ProxyState};
use crate::streams::Registration;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::apps::HttpServerOptions;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tether_config::Limits;
use tether_http::checks;
use tether_http::framing;
use tether_http::policy::{self, GeneratedId};
use tether_routing::RequestView;

/// Per-request state.
pub struct RequestCtx {
    /// The routed request's way through its backends.
    attempt: Option<Attempt>,
    kind: ExchangeKind,
    request_id: Vec<u8>,
    client_ip: Option<IpAddr>,
    /// Status answered by Tether itself (refusals, errors), when no upstream response was sent.
    local_status: Option<u16>,
    /// The stream's entry in the registry, for SSE and long-poll exchanges.
    registration: Option<Registration>,
    /// Counts this request for graceful stop while it lives.
    _in_flight: InFlight,
    started: Instant,
    /// The route's body limit.
    max_body: u64,
    /// The request's `Content-Length`, when it declared a usable one.
    declared: Option<u64>,
}

/// The HTTP/2 proxy application.
pub struct H2Proxy {
    state: Arc<ProxyState>,
}

impl H2Proxy {
    /// A proxy serving whatever `state` holds at each request's start.
    pub fn new(state: Arc<ProxyState>) -> H2Proxy {
        H2Proxy { state }
    }
}

/// Pingora's per-connection options for `limits`.
pub fn server_options(limits: &Limits) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(limits.keepalive_timeout);
    options
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

/// Answers the request with a short text body and its advice headers.
async fn respond_local(session: &mut Session, status: u16, why: &str) -> Result<()> {
    let body = Bytes::from(format!("{status} {why}\n"));
    let mut header = ResponseHeader::build(status, Some(4))?;
    match status {
        426 => header.insert_header("Sec-WebSocket-Version", "13")?,
        429 | 503 => header.insert_header(http::header::RETRY_AFTER, "1")?,
        _ => {}
    }
    header.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// Answers locally and notes the status for the record (`request_filter`'s `true`).
async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    why: &str,
) -> Result<bool> {
    ctx.local_status = Some(status);
    respond_local(session, status, why).await?;
    Ok(true)
}

/// Maps a proxy error to the status the client gets: the explicit status when a filter chose
/// one, 504 for upstream timeouts, 502 for other upstream failures.
fn status_for(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            504
        }
        ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => 408,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

#[async_trait]
impl ProxyHttp for H2Proxy {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default registers a compression module that is
    /// disabled yet still runs on every request; Tether does not compress.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            attempt: None,
            kind: ExchangeKind::Plain,
            request_id: Vec::new(),
            client_ip: None,
            local_status: None,
            registration: None,
            _in_flight: self.state.enter(),
            started: Instant::now(),
            max_body: u64::MAX,
            declared: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let installed = self.state.current();
        let limits = &installed.config.server.limits;
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let req = session.req_header();
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
        let Ok(target) = std::str::from_utf8(req.raw_path()) else {
            let refusal = checks::Refusal::new(400, "bad_target", "request target is not ASCII");
            crate::metrics::refused(refusal.label, refusal.status);
            return answer(session, ctx, refusal.status, refusal.why).await;
        };
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
        let decision = placement::settle(&self.state, &installed, decision).await;
        installed
            .counters
            .route(Some(decision.route))
            .key_from(decision.key_source);
        let route = &installed.router.routes()[decision.route];
        let accepts = req
            .headers
            .get_all(http::header::ACCEPT)
            .iter()
            .map(HeaderValue::as_bytes);
        ctx.kind = ExchangeKind::of(false, accepts, route.long_poll);
        if ctx.kind != ExchangeKind::Plain {
            session.set_read_timeout(Some(route.timeouts.idle));
        } else {
            // A request body must keep arriving.
            session.set_read_timeout(Some(limits.body_timeout));
        }
        session.set_write_timeout(Some(limits.send_timeout));
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| framing::content_length(v.as_bytes()));
        let max_body = route.max_body;
        let admitted = admission::admit(&installed, &decision, declared, ctx.client_ip);
        ctx.attempt = Some(Attempt::new(installed.clone(), decision));
        if let Err(refusal) = admitted {
            crate::metrics::refused(refusal.label, refusal.status);
            return answer(session, ctx, refusal.status, refusal.why).await;
        }
        ctx.max_body = max_body;
        ctx.declared = declared;
        match forward::forward(&self.state, session, ctx).await {
            Ok(()) => Ok(true),
            Err(forward::Failure::AfterHead) => {
                // The stream is reset (the session goes without its end), so the client
                // cannot take the cut response for a whole one.
                tracing::warn!(
                    request_id = %String::from_utf8_lossy(&ctx.request_id),
                    "the backend broke off a response under way"
                );
                Error::e_explain(ErrorType::ConnectionClosed, "response broken off")
            }
            Err(failure) => {
                let (status, why) = failure.status();
                if status == 0 {
                    return Ok(true);
                }
                answer(session, ctx, status, why).await
            }
        }
    }

    /// Never called: `request_filter` answers every request itself.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::HTTPStatus(500),
            "requests are forwarded by the adapter",
        )
    }

    /// What went wrong is logged where it is known (a client leaving is not an error).
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = status_for(e);
        if code > 0 && session.response_written().is_none() {
            if let Err(write_err) = respond_local(session, code, reason_phrase(code)).await {
                tracing::debug!("could not send error response: {write_err}");
            }
            ctx.local_status = Some(code);
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.registration = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.local_status)
            .unwrap_or(0);
        let installed = match &ctx.attempt {
            Some(attempt) => attempt.installed.clone(),
            None => self.state.current(),
        };
        record_exchange(
            &installed,
            &Finished {
                decision: ctx.attempt.as_ref().map(|a| &a.decision),
                backend: ctx.attempt.as_ref().and_then(Attempt::backend_index),
                request_id: Some(&ctx.request_id),
                method: session.req_header().method.as_str(),
                kind: ctx.kind,
                status,
                bytes: session.body_bytes_sent(),
                elapsed: ctx.started.elapsed(),
            },
        );
    }
}
