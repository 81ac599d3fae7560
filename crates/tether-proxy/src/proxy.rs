//! The `ProxyHttp` implementation: route with `Router::decide`, connect to the chosen backend,
//! retry connect failures on the next owner, and answer errors with the right status.

use crate::exchange::{exchange_kind, status_for, ExchangeKind};
use crate::forwarding::{self, X_REQUEST_ID};
use crate::passive;
use crate::state::{Active, InFlight, Installed, ProxyState};
use crate::streams::Registration;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::HOST;
use http::HeaderValue;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::Digest;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::Peer;
use pingora::{ErrorSource, ErrorType};
use smallvec::SmallVec;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_config::RateLimitBy;
use tether_routing::{BackendState, Decision, Reject, RequestView};

/// Per-request state.
pub struct RequestCtx {
    /// The routing state this request started on; it finishes on it even across a reload.
    pub(crate) installed: Option<Arc<Installed>>,
    pub(crate) decision: Option<Decision>,
    /// Backend indices tried so far (the last one is the current). Inline: most requests
    /// try one backend, and this spares an allocation per request.
    pub(crate) tried: SmallVec<[usize; 4]>,
    kind: ExchangeKind,
    pub(crate) request_id: Option<HeaderValue>,
    client_ip: Option<IpAddr>,
    /// Status answered by Tether itself (rejections, errors), when no upstream response was sent.
    pub(crate) local_status: Option<u16>,
    /// The `active` count this request holds on the backend it is connected to.
    pub(crate) holding: Option<Active>,
    /// The stream's entry in the registry, for SSE and long-poll exchanges.
    registration: Option<Registration>,
    /// Counts this request for graceful stop while it lives (a tunnel takes it over).
    pub(crate) in_flight: Option<InFlight>,
    /// True when a WebSocket tunnel took the exchange over (`crate::tunnel`); it records the
    /// exchange when the WebSocket ends.
    pub(crate) tunneled: bool,
    /// When the request arrived.
    pub(crate) started: Instant,
    /// When the current upstream connection attempt began.
    connect_started: Option<Instant>,
    /// The route's body limit, and the body bytes seen so far.
    max_body: u64,
    body_seen: u64,
}

/// The Tether proxy application.
pub struct TetherProxy {
    state: Arc<ProxyState>,
}

impl TetherProxy {
    /// A proxy serving whatever `state` holds at each request's start.
    pub fn new(state: Arc<ProxyState>) -> TetherProxy {
        TetherProxy { state }
    }
}

/// Answers the request with a short text body; 426 and 503 carry their advice headers.
pub(crate) async fn respond_local(session: &mut Session, status: u16, reason: &str) -> Result<()> {
    let body = Bytes::from(format!("{status} {reason}\n"));
    if status == 426 || status == 503 {
        let mut header = ResponseHeader::build(status, Some(3))?;
        if status == 426 {
            // RFC 6455 4.4: say which WebSocket version we speak.
            header.insert_header("Sec-WebSocket-Version", "13")?;
        } else {
            // No backend up (or a stream ended by convergence): come back shortly.
            header.insert_header(http::header::RETRY_AFTER, "1")?;
        }
        header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        header.insert_header(http::header::CONNECTION, "close")?;
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), false)
            .await?;
        return session.write_response_body(Some(body), true).await;
    }
    session.respond_error_with_body(status, body).await
}

/// Answers the request with [`respond_local`] and notes the status for the log: the request
/// was handled (`request_filter`'s `true`).
pub(crate) async fn answer_locally(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    why: &str,
) -> Result<bool> {
    ctx.local_status = Some(status);
    respond_local(session, status, why).await?;
    Ok(true)
}

impl RequestCtx {
    /// The context of a request that has just arrived (counted in flight from now on).
    pub(crate) fn for_request(state: &Arc<ProxyState>) -> RequestCtx {
        RequestCtx {
            installed: None,
            decision: None,
            tried: SmallVec::new(),
            kind: ExchangeKind::Plain,
            request_id: None,
            client_ip: None,
            local_status: None,
            holding: None,
            registration: None,
            in_flight: Some(state.enter()),
            tunneled: false,
            started: Instant::now(),
            connect_started: None,
            max_body: u64::MAX,
            body_seen: 0,
        }
    }

    /// Starts the next connection attempt of the routed request: the decision's backend
    /// first, then (a retry) the next owner not tried yet. Counts the attempt in the backend's
    /// `active` (releasing the previous one) and notes when it began.
    pub(crate) fn next_attempt(&mut self) -> Result<Arc<BackendState>> {
        let (Some(installed), Some(decision)) = (&self.installed, &self.decision) else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(500),
                "request was not routed",
            ));
        };
        let router = &installed.router;
        let retry = !self.tried.is_empty();
        let index = if retry {
            router.next_backend(decision, &self.tried).ok_or_else(|| {
                Error::explain(ErrorType::HTTPStatus(502), "no backend left to retry")
            })?
        } else {
            decision.backend
        };
        let backend = router.upstreams()[decision.upstream]
            .backends
            .get(index)
            .ok_or_else(|| {
                Error::explain(ErrorType::HTTPStatus(500), "backend index out of range")
            })?
            .clone();
        if retry {
            installed.counters.route(Some(decision.route)).retried();
        }
        self.tried.push(index);
        self.holding = Some(Active::new(backend.clone()));
        self.connect_started = Some(Instant::now());
        Ok(backend)
    }

    /// Whether a failed connect may be tried again on the next owner (the route's `retries`).
    /// Nothing was sent upstream yet, so any method may.
    pub(crate) fn may_retry(&self) -> bool {
        let retries = match (&self.installed, &self.decision) {
            (Some(installed), Some(d)) => installed.router.routes()[d.route].retries as usize,
            _ => 0,
        };
        self.tried.len() <= retries
    }

    /// Opens a new connection for the routed request, starting with `backend` (its current
    /// attempt, from [`next_attempt`](Self::next_attempt)). A failed connect counts towards
    /// the backend's passive ejection and moves on to the next owner while the route's
    /// retries allow. None when every attempt failed (the client gets 502).
    pub(crate) async fn connect(
        &mut self,
        state: &Arc<ProxyState>,
        mut backend: Arc<BackendState>,
    ) -> Option<(tokio::net::TcpStream, Arc<BackendState>)> {
        let installed = self.installed.clone()?;
        let upstream_index = self.decision.as_ref()?.upstream;
        let upstream = &installed.router.upstreams()[upstream_index];
        let config = installed.config_upstream(upstream_index);
        let connect_timeout = config.map_or(Duration::from_secs(1), |u| u.connect_timeout);
        let passive_config = config.and_then(|u| u.passive);
        loop {
            let connect = tokio::net::TcpStream::connect(backend.address);
            match tokio::time::timeout(connect_timeout, connect).await {
                Ok(Ok(socket)) => {
                    self.connected();
                    // Requests and WebSocket messages are small and latency-bound.
                    let _ = socket.set_nodelay(true);
                    return Some((socket, backend));
                }
                Ok(Err(e)) => tracing::debug!(backend = %backend.address, "connect failed: {e}"),
                Err(_) => tracing::debug!(backend = %backend.address, "connect timed out"),
            }
            passive::record_failure(state, &upstream.name, passive_config, &backend);
            if !self.may_retry() {
                return None;
            }
            backend = self.next_attempt().ok()?;
        }
    }

    /// Counts the connect time of the current attempt in the route's metrics.
    pub(crate) fn connected(&mut self) {
        if let (Some(installed), Some(d), Some(t)) =
            (&self.installed, &self.decision, self.connect_started.take())
        {
            installed
                .counters
                .route(Some(d.route))
                .connected_in(t.elapsed());
        }
    }

    /// The backend currently tried, with its upstream's name and passive settings.
    fn current_backend(
        &self,
    ) -> Option<(&str, Option<tether_config::Passive>, &Arc<BackendState>)> {
        let installed = self.installed.as_ref()?;
        let decision = self.decision.as_ref()?;
        let index = *self.tried.last()?;
        let upstream = installed.router.upstreams().get(decision.upstream)?;
        let passive = installed.config_upstream(decision.upstream)?.passive;
        Some((&upstream.name, passive, upstream.backends.get(index)?))
    }

    fn is_closing(&self) -> bool {
        self.registration
            .as_ref()
            .is_some_and(|r| r.control().is_closing())
    }
}

/// Records a finished exchange: the route's status and duration metrics, and the access log
/// line (unless the access log is off).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_exchange(
    installed: &Installed,
    decision: Option<&Decision>,
    backend: Option<usize>,
    request_id: Option<&[u8]>,
    method: &str,
    kind: ExchangeKind,
    status: u16,
    bytes: usize,
    elapsed: Duration,
) {
    if status > 0 {
        installed
            .counters
            .route(decision.map(|d| d.route))
            .observe(status, elapsed);
    }
    let log = &installed.config.server.access_log;
    if log.format == tether_config::AccessLogFormat::Off {
        return;
    }
    let router = &installed.router;
    let backend = match (decision, backend) {
        (Some(d), Some(i)) => router.upstreams()[d.upstream]
            .backends
            .get(i)
            .map(|b| b.address.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let entry = crate::access_log::Entry {
        request_id: request_id
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or(""),
        method,
        route: decision.map_or("", |d| router.routes()[d.route].name.as_str()),
        key_source: decision.map_or("none", |d| d.key_source.as_str()),
        key: decision.and_then(|d| d.key.as_deref()),
        upstream: decision.map_or("", |d| router.upstreams()[d.upstream].name.as_str()),
        backend: &backend,
        kind: kind.as_str(),
        status,
        bytes,
        duration: elapsed.as_secs_f64(),
    };
    crate::access_log::log(log, &entry);
}

/// Adds the forwarding headers (X-Forwarded-*, Forwarded, X-Request-Id) to a request about to
/// go to a backend.
pub(crate) fn add_forwarding(
    session: &Session,
    ctx: &RequestCtx,
    upstream_request: &mut RequestHeader,
) -> Result<()> {
    let original_host = session.req_header().headers.get(HOST).cloned();
    let request_id = ctx
        .request_id
        .clone()
        .unwrap_or_else(forwarding::new_request_id);
    let trusted = match (&ctx.installed, ctx.client_ip) {
        (Some(installed), Some(ip)) => installed.trusts(ip),
        _ => false,
    };
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    forwarding::add_forwarding_headers(
        upstream_request,
        ctx.client_ip,
        trusted,
        tls,
        original_host.as_ref(),
        &request_id,
    )
}

#[async_trait]
impl ProxyHttp for TetherProxy {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default registers a response compression module that
    /// is disabled yet still runs on every request; Tether does not compress.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        // Pingora makes the context right after reading a request header: stop its deadline.
        crate::downstream::header_read();
        RequestCtx::for_request(&self.state)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let installed = self.state.current();
        // The configured keep-alive instead of Pingora's 60 s (None means shutting down: keep).
        if session.get_keepalive().is_some() {
            let idle = installed.config.server.limits.keepalive_timeout;
            session.set_keepalive(Some(idle.as_secs().max(1)));
        }
        if let Err(refusal) =
            crate::validity::check(session.req_header(), &installed.config.server.limits)
        {
            ctx.installed = Some(installed);
            crate::metrics::refused(refusal.label, refusal.status);
            return answer_locally(session, ctx, refusal.status, refusal.why).await;
        }
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let req = session.req_header();
        ctx.request_id = Some(
            req.headers
                .get(&X_REQUEST_ID)
                .filter(|v| forwarding::usable_request_id(v.as_bytes()))
                .cloned()
                .unwrap_or_else(forwarding::new_request_id),
        );
        let host = req
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        let view = RequestView {
            method: req.method.as_str(),
            host,
            path: req.uri.path(),
            query: req.uri.query(),
            headers: tether_routing::Headers::Map(&req.headers),
            client_ip: ctx.client_ip,
        };
        let outcome = installed.router.decide(&view);
        ctx.installed = Some(installed.clone());
        match outcome {
            Ok(decision) => {
                installed
                    .counters
                    .route(Some(decision.route))
                    .key_from(decision.key_source);
                let route = &installed.router.routes()[decision.route];
                ctx.kind = exchange_kind(session, route.long_poll);
                if ctx.kind != ExchangeKind::Plain {
                    // Pingora's 60 s downstream read timeout would cut an idle WebSocket; the
                    // route's idle timeout governs streams instead. Both read timers re-arm on
                    // traffic in either direction (Pingora's duplex loop re-polls them).
                    session.set_read_timeout(Some(route.timeouts.idle));
                } else {
                    // A request body must keep arriving (catalogue G3: slow body).
                    session.set_read_timeout(Some(installed.config.server.limits.body_timeout));
                }
                // A client that stops reading is let go (G4 slow read, E10 back-pressure):
                // Pingora's buffers stay bounded and the backend connection is released.
                session.set_write_timeout(Some(installed.config.server.limits.send_timeout));
                let declared = session
                    .req_header()
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|len| len > route.max_body) {
                    crate::metrics::refused("body_too_large", 413);
                    return answer_locally(session, ctx, 413, "request body too large").await;
                }
                if let (Some(limit), Some(Some(rate))) =
                    (route.rate_limit, installed.limiters.get(decision.route))
                {
                    // Count-min estimate over one-second windows (pingora-limits).
                    let seen = match (limit.by, decision.key.as_deref(), ctx.client_ip) {
                        (RateLimitBy::Key, Some(key), _) => rate.observe(&key, 1),
                        (_, _, Some(ip)) => rate.observe(&ip, 1),
                        (_, _, None) => 0,
                    };
                    if seen > limit.per_second as isize + limit.burst as isize {
                        ctx.local_status = Some(429);
                        crate::metrics::refused("rate_limited", 429);
                        let mut resp = ResponseHeader::build(429, Some(2))?;
                        resp.insert_header(http::header::RETRY_AFTER, "1")?;
                        resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
                        session.write_response_header(Box::new(resp), true).await?;
                        return Ok(true);
                    }
                }
                ctx.max_body = route.max_body;
                ctx.decision = Some(decision);
                if ctx.kind == ExchangeKind::WebSocket {
                    // WebSockets run in Tether's own tunnel, never in Pingora's relay.
                    return crate::tunnel::open(&self.state, session, ctx).await;
                }
                Ok(false)
            }
            Err(reject) => {
                let status = reject.status();
                let label = match reject {
                    Reject::BadPath(_) => Some("bad_path"),
                    Reject::NoRoute => Some("no_route"),
                    Reject::MissingKey { .. } => Some("missing_key"),
                    Reject::BadKey { .. } => Some("bad_key"),
                    // Not the client's doing.
                    Reject::NoHealthyBackend { .. } => None,
                };
                if let Some(label) = label {
                    crate::metrics::refused(label, status);
                }
                answer_locally(session, ctx, status, &reject.to_string()).await
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let backend = ctx.next_attempt()?;
        let (Some(installed), Some(decision)) = (&ctx.installed, &ctx.decision) else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(500),
                "request was not routed",
            ));
        };
        let route = &installed.router.routes()[decision.route];
        let read_timeout = match ctx.kind {
            ExchangeKind::Plain => route.timeouts.read,
            _ => route.timeouts.idle,
        };
        let connect_timeout = installed
            .config_upstream(decision.upstream)
            .map_or(Duration::from_secs(1), |u| u.connect_timeout);
        let send_timeout = installed.config.server.limits.send_timeout;

        let mut peer = HttpPeer::new(backend.address, false, String::new());
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = Some(read_timeout);
        // A backend that stops reading what we forward is let go like a client that does.
        peer.options.write_timeout = Some(send_timeout);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some((upstream, passive, backend)) = ctx.current_backend() {
            passive::record_failure(&self.state, upstream, passive, backend);
        }
        if ctx.may_retry() {
            e.set_retry(true);
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
        let transport_failure = e.esource() == &ErrorSource::Upstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed
                    | ErrorType::ReadError
                    | ErrorType::WriteError
                    | ErrorType::ReadTimedout
                    | ErrorType::WriteTimedout
            );
        if ctx.is_closing() {
            // Convergence ended this stream on purpose: not a backend fault, never retried.
            e.set_retry(false);
            return e;
        }
        if transport_failure {
            if let Some((upstream, passive, backend)) = ctx.current_backend() {
                passive::record_failure(&self.state, upstream, passive, backend);
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
        ctx.connected();
        let Some(kind) = ctx.kind.stream_kind() else {
            return Ok(());
        };
        let (Some(installed), Some(decision)) = (&ctx.installed, &ctx.decision) else {
            return Ok(());
        };
        let Some(backend) = peer.address().as_inet().copied() else {
            return Ok(());
        };
        let router = &installed.router;
        // A retry replaces the registration of the failed attempt.
        ctx.registration = None;
        let registration = self.state.registry.register(
            Arc::from(router.routes()[decision.route].name.as_str()),
            Arc::from(router.upstreams()[decision.upstream].name.as_str()),
            decision.key.as_deref().map(Arc::from),
            backend,
            kind,
        );
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
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body too large",
                ));
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
        add_forwarding(session, ctx, upstream_request)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some((_, _, backend)) = ctx.current_backend() {
            passive::record_success(backend);
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let key = (ctx.kind == ExchangeKind::WebSocket)
                .then(|| {
                    session
                        .req_header()
                        .headers
                        .get(http::header::SEC_WEBSOCKET_KEY)
                })
                .flatten()
                .map(|k| k.as_bytes());
            let accept = upstream_response
                .headers
                .get(http::header::SEC_WEBSOCKET_ACCEPT)
                .map(|a| a.as_bytes());
            if !crate::exchange::valid_switch(key, accept) {
                return Error::e_explain(
                    ErrorType::HTTPStatus(502),
                    "backend switched protocols without completing the WebSocket handshake",
                );
            }
        }
        forwarding::strip_response_hop_by_hop(upstream_response);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(id) = &ctx.request_id {
            // A titled static name: Pingora would title-case a HeaderName into a new buffer.
            upstream_response.insert_header("X-Request-Id", id.clone())?;
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
            let reason = crate::exchange::reason_phrase(code);
            if let Err(write_err) = respond_local(session, code, reason).await {
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
        ctx.holding = None;
        if ctx.tunneled {
            // The tunnel records the exchange when the WebSocket ends.
            return;
        }
        // The next request on this connection (if any) has a header deadline again.
        crate::downstream::request_done();
        ctx.registration = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.local_status)
            .unwrap_or(0);
        let Some(installed) = &ctx.installed else {
            return;
        };
        record_exchange(
            installed,
            ctx.decision.as_ref(),
            ctx.tried.last().copied(),
            ctx.request_id.as_ref().map(HeaderValue::as_bytes),
            session.req_header().method.as_str(),
            ctx.kind,
            status,
            session.body_bytes_sent(),
            ctx.started.elapsed(),
        );
    }
}
