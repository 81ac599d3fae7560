//! The HTTP/2 adapter: Pingora's `ProxyHttp` serves HTTP/2 connections (TLS with ALPN `h2`)
//! and calls the same core as the HTTP/1 engine at each step: the checks (`tether_http::checks`),
//! the routing decision, the backend attempt and its passive-health accounting
//! (`core::attempt`), the header policy (`tether_http::policy`, through a [`FieldWriter`] over
//! Pingora's header maps), the response-head validation (`tether_http::framing`) and the record.
//! HTTP/1 never reaches it.

use crate::core::admission;
use crate::core::attempt::{Attempt, Fault};
use crate::core::record::{reason_phrase, record_exchange, ExchangeKind, Finished};
use crate::state::{InFlight, ProxyState};
use crate::streams::Registration;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::apps::HttpServerOptions;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::protocols::Digest;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::Peer;
use pingora::{ErrorSource, ErrorType};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tether_config::Limits;
use tether_http::checks;
use tether_http::framing;
use tether_http::policy::{self, FieldWriter, Forwarding, GeneratedId, Nominated};
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
    /// The route's body limit, and the body bytes seen so far.
    max_body: u64,
    body_seen: u64,
}

impl RequestCtx {
    fn is_closing(&self) -> bool {
        self.registration
            .as_ref()
            .is_some_and(|r| r.control().is_closing())
    }
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

/// The policy's fields into Pingora's request header.
struct MapWriter<'a>(&'a mut RequestHeader);

impl FieldWriter for MapWriter<'_> {
    fn push(&mut self, name: &'static str, value: &[u8]) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            let _ = self.0.append_header(name, value);
        }
    }
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
            body_seen: 0,
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
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let kind = ctx.kind;
        let Some(attempt) = ctx.attempt.as_mut() else {
            return Error::e_explain(ErrorType::HTTPStatus(500), "request was not routed");
        };
        let backend = attempt
            .next_backend()
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(502), "no backend left"))?;
        let installed = &attempt.installed;
        let route = &installed.router.routes()[attempt.decision.route];
        let read_timeout = match kind {
            ExchangeKind::Plain => route.timeouts.read,
            _ => route.timeouts.idle,
        };
        let mut peer = HttpPeer::new(backend.address, false, String::new());
        peer.options.connection_timeout = Some(attempt.connect_timeout());
        peer.options.read_timeout = Some(read_timeout);
        // A backend that stops reading what we forward is let go like a client that does.
        peer.options.write_timeout = Some(installed.config.server.limits.send_timeout);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(attempt) = &ctx.attempt {
            attempt.fault(&self.state, Fault::Connect);
            if attempt.may_retry() {
                e.set_retry(true);
            }
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.is_closing() {
            // Convergence ended this stream on purpose: not a backend fault, never retried.
            e.set_retry(false);
            return e;
        }
        if e.esource() == &ErrorSource::Upstream {
            let fault = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => Some(Fault::Timeout),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
                    Some(Fault::Reset)
                }
                ErrorType::InvalidHTTPHeader | ErrorType::HTTPStatus(502) => {
                    Some(Fault::BrokenResponse)
                }
                _ => None,
            };
            if let (Some(fault), Some(attempt)) = (fault, &ctx.attempt) {
                attempt.fault(&self.state, fault);
            }
        }
        // Pingora's default policy: retry only idempotent requests whose body is still buffered.
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(attempt) = ctx.attempt.as_mut() else {
            return Ok(());
        };
        attempt.connected();
        let Some(kind) = ctx.kind.stream_kind() else {
            return Ok(());
        };
        let Some(backend) = peer.address().as_inet().copied() else {
            return Ok(());
        };
        let router = &attempt.installed.router;
        let decision = &attempt.decision;
        // A retry replaces the registration of the failed attempt.
        ctx.registration = None;
        let registration = self.state.registry.register(
            Arc::from(router.routes()[decision.route].name.as_str()),
            Arc::from(router.upstreams()[decision.upstream].name.as_str()),
            decision.key.as_deref().map(Arc::from),
            backend,
            kind,
        );
        // Pingora relays the stream and has no way to end it from outside: the registry keeps
        // a duplicate of the upstream socket and shuts its reading side to end it.
        registration.control().attach_upstream(fd);
        ctx.registration = Some(registration);
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > ctx.max_body {
                crate::metrics::refused("body_too_large", 413);
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(attempt) = &ctx.attempt else {
            return Ok(());
        };
        let trusted = ctx.client_ip.is_some_and(|ip| attempt.installed.trusts(ip));
        // The target Tether routed on.
        if let Some(path) = &attempt.decision.normalized_path {
            let target = match upstream_request.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
            if let Ok(uri) = http::Uri::try_from(target) {
                upstream_request.set_uri(uri);
            }
        }
        let headers = &session.req_header().headers;
        let mut nominated = Nominated::new();
        for value in headers.get_all(http::header::CONNECTION) {
            policy::nominated(value.as_bytes(), &mut nominated);
        }
        let dropped: Vec<http::HeaderName> = headers
            .keys()
            .filter(|name| !policy::keeps_request_field(name.as_str(), trusted, &nominated))
            .cloned()
            .collect();
        for name in &dropped {
            upstream_request.remove_header(name);
        }
        upstream_request.remove_header(&http::header::EXPECT);
        let values = |name: &str| -> Vec<&[u8]> {
            headers
                .get_all(name)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect()
        };
        let chain = values("x-forwarded-for");
        let host = headers
            .get(http::header::HOST)
            .map(HeaderValue::as_bytes)
            .or_else(|| {
                session
                    .req_header()
                    .uri
                    .authority()
                    .map(|a| a.as_str().as_bytes())
            });
        let mut ip_text = Vec::new();
        if let Some(ip) = ctx.client_ip {
            policy::push_ip(&mut ip_text, ip);
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let forwarding = Forwarding {
            client_ip: ctx.client_ip.map(|_| &ip_text[..]),
            trusted,
            tls,
            host,
            chain: &chain,
            proto: headers.get("x-forwarded-proto").map(HeaderValue::as_bytes),
            forwarded_host: headers.get("x-forwarded-host").map(HeaderValue::as_bytes),
            request_id: &ctx.request_id,
        };
        policy::write_forwarding(
            &mut MapWriter(upstream_request),
            &forwarding,
            &mut Vec::new(),
        );
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        let head_request = session.req_header().method == http::Method::HEAD;
        let fields = upstream_response
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()));
        let checked = framing::response(status, true, head_request, fields);
        if checked.is_err() || status == 101 {
            if let Some(attempt) = &ctx.attempt {
                attempt.fault(&self.state, Fault::BrokenResponse);
            }
            return Error::e_explain(ErrorType::HTTPStatus(502), "unusable response from backend");
        }
        if let Some(attempt) = &ctx.attempt {
            attempt.answered();
        }
        let dropped: Vec<http::HeaderName> = {
            let mut nominated = Nominated::new();
            for value in upstream_response.headers.get_all(http::header::CONNECTION) {
                policy::nominated(value.as_bytes(), &mut nominated);
            }
            upstream_response
                .headers
                .keys()
                .filter(|name| !policy::keeps_response_field(name.as_str(), &nominated))
                .cloned()
                .collect()
        };
        for name in &dropped {
            upstream_response.remove_header(name);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Ok(id) = HeaderValue::from_bytes(&ctx.request_id) {
            upstream_response.insert_header("X-Request-Id", id)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // A stream convergence ended before its response started (a waiting long-poll): 503
        // tells the client to come back, and it will reach the key's new owner.
        let code = if ctx.is_closing() { 503 } else { status_for(e) };
        if code > 0 && session.response_written().is_none() {
            if let Err(write_err) = respond_local(session, code, reason_phrase(code)).await {
                tracing::debug!("could not send error response: {write_err}");
            }
        }
        if code > 0 {
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
