//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text format),
//! `GET /upstreams`, `POST|DELETE /upstreams/{name}/backends/{address}/drain`,
//! `GET|POST|DELETE /upstreams/{name}/keys/{key}/pin` and `GET /upstreams/{name}/pins` (documents
//! pinned to a backend), and `GET /documents/top` (the hottest documents of an upstream).

use crate::control::pins;
use crate::control::reload::{Reloader, Trigger};
use crate::documents::{self, Measure};
use crate::state::{Availability, ProxyState};
use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_routing::described::DescribedRequest;
use tether_routing::Router;

/// The admin HTTP application.
pub struct AdminApp {
    state: Arc<ProxyState>,
    reloader: Option<Arc<Reloader>>,
    /// When set, every request must carry `Authorization: Bearer <token>`...
    token: Option<String>,
    /// ...except these paths.
    public: Vec<String>,
}

/// Compares without an early exit, so response time does not reveal how much of a guess was
/// right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminApp {
    /// The admin API over `state`; `reloader` is None when the config is built in; with a
    /// `token`, requests outside `public` paths need it as a bearer token.
    pub fn new(
        state: Arc<ProxyState>,
        reloader: Option<Arc<Reloader>>,
        token: Option<String>,
        public: &[String],
    ) -> AdminApp {
        AdminApp {
            state,
            reloader,
            token,
            public: public.to_vec(),
        }
    }

    /// True when the request may proceed.
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let req = session.req_header();
        if self.public.iter().any(|p| p == req.uri.path()) {
            return true;
        }
        req.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| same_secret(given.trim().as_bytes(), token.as_bytes()))
    }

    /// `POST /reload`.
    async fn reload(&self) -> Response<Vec<u8>> {
        let Some(reloader) = &self.reloader else {
            return json_error(
                StatusCode::CONFLICT,
                "the config is built in; nothing to reload",
            );
        };
        match reloader.reload(Trigger::Admin).await {
            Ok(generation) => json_reply(
                StatusCode::OK,
                &json!({ "result": "success", "generation": generation }),
            ),
            Err(error) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({ "result": "failure", "error": error }),
            ),
        }
    }

    /// `GET /readyz`: 200 once every listener accepts and every upstream has a backend that
    /// may own keys; 503 with the reasons otherwise.
    ///
    /// A discovery source that cannot be reached does not make the instance unready: it keeps
    /// routing on the last known members, which is what the fleet needs (turning every proxy
    /// unready because etcd is down would take the whole service down). It stays 200 with
    /// `"degraded"` listing the stale sources; `tether_discovery_up` says the same.
    async fn readyz(&self) -> Response<Vec<u8>> {
        let installed = self.state.current();
        let mut problems = Vec::new();
        for listener in &installed.config.listeners {
            let probe = tokio::time::timeout(
                std::time::Duration::from_millis(500),
                tokio::net::TcpStream::connect(listener.address),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                problems.push(format!("listener {} is not accepting", listener.address));
            }
        }
        let discovery = self.state.discovery_status();
        let mut degraded = Vec::new();
        for u in installed.router.upstreams() {
            let status = discovery.get(&u.name);
            if !u.backends.iter().any(|b| b.is_available()) {
                let why = match status {
                    Some(s) if !s.loaded => format!(
                        "upstream {} has no available backend: its {} discovery has not loaded yet{}",
                        u.name,
                        s.source,
                        s.problem.as_deref().map(|p| format!(" ({p})")).unwrap_or_default()
                    ),
                    _ => format!("upstream {} has no available backend", u.name),
                };
                problems.push(why);
            }
            if let Some(s) = status.filter(|s| s.loaded && !s.up) {
                degraded.push(format!(
                    "upstream {}: {} discovery unreachable ({}); serving the last known members ({})",
                    u.name,
                    s.source,
                    s.problem.as_deref().unwrap_or("no answer"),
                    s.members
                ));
            }
        }
        if problems.is_empty() {
            let mut body = json!({ "ready": true });
            if !degraded.is_empty() {
                body["degraded"] = json!(degraded);
            }
            json_reply(StatusCode::OK, &body)
        } else {
            json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "ready": false, "problems": problems, "degraded": degraded }),
            )
        }
    }

    /// `GET /config`: the effective config with every default filled in, as JSON. (It holds no
    /// secrets: the admin token, when there is one, is a file path, never its contents.)
    fn config(&self) -> Response<Vec<u8>> {
        let yaml = tether_config::to_yaml(&self.state.current().config);
        match serde_yaml::from_str::<serde_json::Value>(&yaml) {
            Ok(value) => json_reply(StatusCode::OK, &value),
            Err(e) => json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("config rendering failed: {e}"),
            ),
        }
    }

    /// `GET /upstreams/{name}/keys/{key}/pin`: the key's pin, and who owns it now.
    fn pin(&self, upstream: &str, key: &str) -> Response<Vec<u8>> {
        let installed = self.state.current();
        let router = &installed.router;
        let Some(index) = router.upstream_index(upstream) else {
            return json_error(StatusCode::NOT_FOUND, "no such upstream");
        };
        let pinned = self.state.pins(upstream).get(key).copied();
        let owner = owner_address(router, index, key);
        json_reply(
            StatusCode::OK,
            &json!({
                "upstream": upstream,
                "key": key,
                "pinned": pinned.map(|b| b.to_string()),
                "owner": owner.map(|b| b.to_string()),
                "in_force": pinned.is_some() && pinned == owner,
            }),
        )
    }

    /// `GET /upstreams/{name}/pins`: every pinned key of the upstream.
    fn pins(&self, upstream: &str) -> Response<Vec<u8>> {
        let installed = self.state.current();
        let router = &installed.router;
        let Some(index) = router.upstream_index(upstream) else {
            return json_error(StatusCode::NOT_FOUND, "no such upstream");
        };
        let pins: Vec<_> = self
            .state
            .pins(upstream)
            .into_iter()
            .map(|(key, backend)| {
                let in_force = owner_address(router, index, &key) == Some(backend);
                json!({ "key": key, "backend": backend.to_string(), "in_force": in_force })
            })
            .collect();
        json_reply(
            StatusCode::OK,
            &json!({ "upstream": upstream, "pins": pins }),
        )
    }

    /// `POST /upstreams/{name}/keys/{key}/pin` with `{"backend": "ip:port"}` (`backend` None:
    /// `DELETE`, unpin): stores the pin and puts it in force; convergence then closes the
    /// key's streams on its old owner.
    async fn set_pin(
        &self,
        upstream: &str,
        key: &str,
        backend: Option<SocketAddr>,
    ) -> Response<Vec<u8>> {
        match pins::set(&self.state, upstream, key, backend).await {
            Ok((stored, in_force)) => {
                tracing::info!(upstream, key, backend = ?backend, stored = stored.as_str(), "pin changed");
                json_reply(
                    StatusCode::OK,
                    &json!({
                        "upstream": upstream,
                        "key": key,
                        "pinned": backend.map(|b| b.to_string()),
                        "stored": stored.as_str(),
                        "in_force": in_force,
                    }),
                )
            }
            Err(e) => json_error(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &e.to_string(),
            ),
        }
    }

    /// `GET /route?method=&host=&path=&header=Name:Value&cookie=name=value&query=name=value`:
    /// the routing decision for a described request, as the proxy would make it now.
    fn route(&self, query: &str) -> Response<Vec<u8>> {
        let mut method = "GET".to_string();
        let mut host = None;
        let mut path = "/".to_string();
        let (mut headers, mut cookies, mut queries) = (Vec::new(), Vec::new(), Vec::new());
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode_segment(&value.replace('+', " "));
            match name {
                "method" => method = value,
                "host" => host = Some(value),
                "path" => path = value,
                "header" => headers.push(value),
                "cookie" => cookies.push(value),
                "query" => queries.push(value),
                other => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter {other:?}"),
                    )
                }
            }
        }
        let mut request = DescribedRequest::new(&method, host.as_deref(), &path);
        for h in &headers {
            if let Err(e) = request.header(h) {
                return json_error(StatusCode::BAD_REQUEST, &e);
            }
        }
        for c in &cookies {
            if let Err(e) = request.cookie(c) {
                return json_error(StatusCode::BAD_REQUEST, &e);
            }
        }
        for q in &queries {
            request.query(q);
        }
        let installed = self.state.current();
        let router = &installed.router;
        match router.decide(&request.view()) {
            Ok(d) => json_reply(
                StatusCode::OK,
                &json!({
                    "route": router.routes()[d.route].name,
                    "key": d.key.as_deref(),
                    "key_source": d.key_source.as_str(),
                    "upstream": router.upstreams()[d.upstream].name,
                    "backend": d.address.to_string(),
                    "reason": d.reason(),
                }),
            ),
            Err(reject) => json_reply(
                StatusCode::OK,
                &json!({ "rejected": reject.status(), "reason": reject.to_string() }),
            ),
        }
    }

    /// `GET /documents/top?upstream=NAME&by=streams|requests|bytes&n=20`: the upstream's
    /// hottest documents (`upstream` may be left out when there is one upstream).
    fn documents_top(&self, query: &str) -> Response<Vec<u8>> {
        let (mut upstream, mut by, mut n) = (None, Measure::Streams, 20usize);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode_segment(value);
            match name {
                "upstream" => upstream = Some(value),
                "by" => match Measure::parse(&value) {
                    Some(m) => by = m,
                    None => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            "by: expected streams, requests or bytes",
                        )
                    }
                },
                "n" => match value.parse::<usize>() {
                    Ok(v) if (1..=documents::TRACKED).contains(&v) => n = v,
                    _ => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            &format!("n: expected 1 to {}", documents::TRACKED),
                        )
                    }
                },
                other => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter {other:?}"),
                    )
                }
            }
        }
        let installed = self.state.current();
        let router = &installed.router;
        let names: Vec<&str> = router.upstreams().iter().map(|u| u.name.as_str()).collect();
        let index = match &upstream {
            Some(name) => names.iter().position(|u| u == name),
            None if names.len() == 1 => Some(0),
            None => None,
        };
        let Some(index) = index else {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("upstream: expected one of {}", names.join(", ")),
            );
        };
        let name = names[index];
        let owner = |key: &str| {
            router
                .owner(index, key)
                .and_then(|b| router.upstreams()[index].backends.get(b))
                .map(|b| b.address.to_string())
        };
        let body = match by {
            Measure::Streams => {
                let (top, total) = documents::by_streams(&self.state.registry.snapshot(), name, n);
                let docs: Vec<_> = top
                    .iter()
                    .map(|d| {
                        let backends: serde_json::Map<String, serde_json::Value> = d
                            .backends
                            .iter()
                            .map(|(addr, count)| (addr.to_string(), json!(count)))
                            .collect();
                        json!({
                            "key": d.key,
                            "streams": d.streams,
                            "share": d.streams as f64 / total.max(1) as f64,
                            "backends": backends,
                            "owner": owner(&d.key),
                        })
                    })
                    .collect();
                json!({ "upstream": name, "by": "streams", "total": total, "documents": docs })
            }
            Measure::Requests | Measure::Bytes => {
                let Some(ranking) = installed
                    .documents
                    .get(index)
                    .and_then(|d| d.ranking(by, n))
                else {
                    return json_error(StatusCode::INTERNAL_SERVER_ERROR, "no sketch");
                };
                let unit = if by == Measure::Requests {
                    "requests_per_second"
                } else {
                    "bytes_per_second"
                };
                let docs: Vec<_> = ranking
                    .top
                    .iter()
                    .map(|h| {
                        json!({
                            "key": h.key,
                            unit: h.rate,
                            "error": h.error,
                            "share": if ranking.total > 0.0 { h.rate / ranking.total } else { 0.0 },
                            "owner": owner(&h.key),
                        })
                    })
                    .collect();
                json!({
                    "upstream": name,
                    "by": if by == Measure::Requests { "requests" } else { "bytes" },
                    "unit": unit,
                    "window_seconds": documents::WINDOW.as_secs(),
                    "total": ranking.total,
                    "error_bound": ranking.error_bound,
                    "tracked_at_most": documents::TRACKED,
                    "memory_bytes": ranking.memory_bytes,
                    "documents": docs,
                })
            }
        };
        json_reply(StatusCode::OK, &body)
    }

    /// `GET /config/status`.
    fn config_status(&self) -> Response<Vec<u8>> {
        match &self.reloader {
            Some(reloader) => json_reply(StatusCode::OK, &reloader.status_json()),
            None => json_reply(
                StatusCode::OK,
                &json!({ "file": null, "generation": 1, "last_result": "none" }),
            ),
        }
    }

    /// `GET /upstreams`: every backend with its state and open streams.
    fn upstreams(&self) -> Response<Vec<u8>> {
        let installed = self.state.current();
        let discovery = self.state.discovery_status();
        let mut streams: HashMap<(String, SocketAddr), usize> = HashMap::new();
        for s in self.state.registry.snapshot() {
            *streams
                .entry((s.upstream.to_string(), s.backend))
                .or_default() += 1;
        }
        let upstreams: Vec<_> = installed
            .router
            .upstreams()
            .iter()
            .enumerate()
            .map(|(index, u)| {
                let shares = installed
                    .config_upstream(index)
                    .map(|c| tether_routing::share::ring_shares(&c.backends))
                    .unwrap_or_default();
                let backends: Vec<_> = u
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        json!({
                            "ring_share": shares.get(i).copied().unwrap_or(0.0),
                            "address": b.address.to_string(),
                            "weight": b.weight,
                            "available": b.is_available(),
                            "healthy": b.up.load(Ordering::Relaxed),
                            "ejected": b.ejected.load(Ordering::Relaxed),
                            "draining": b.draining.load(Ordering::Relaxed),
                            // Under rebalance.failback_after / ramp: the share of its keys
                            // it has taken back (1 when it never left).
                            "keys_back": u.share_in_force(i),
                            "active": b.active.load(Ordering::Relaxed),
                            "open_streams": streams.get(&(u.name.clone(), b.address)).copied().unwrap_or(0),
                        })
                    })
                    .collect();
                let mut entry = json!({ "name": u.name, "balance": format!("{:?}", u.balance), "backends": backends });
                if installed.config_upstream(index).is_some_and(|c| c.bounded_load.is_some()) {
                    entry["placed_documents"] = json!(u.placements.len());
                }
                if let Some(d) = discovery.get(&u.name) {
                    entry["discovery"] = json!({
                        "source": d.source,
                        "loaded": d.loaded,
                        "up": d.up,
                        "problem": d.problem,
                        "members": d.members,
                    });
                }
                entry
            })
            .collect();
        json_reply(StatusCode::OK, &json!({ "upstreams": upstreams }))
    }

    /// `POST` (drain) or `DELETE` (undrain) `/upstreams/{name}/backends/{address}/drain`.
    fn drain(&self, upstream: &str, address: &str, drain: bool) -> Response<Vec<u8>> {
        let Ok(address) = address.parse::<SocketAddr>() else {
            return json_error(StatusCode::BAD_REQUEST, "backend address must be ip:port");
        };
        let installed = self.state.current();
        let Some(up) = installed.router.upstream(upstream) else {
            return json_error(StatusCode::NOT_FOUND, "no such upstream");
        };
        let Some(backend) = up.backend_index(address).map(|i| &up.backends[i]) else {
            return json_error(StatusCode::NOT_FOUND, "no such backend in this upstream");
        };
        if self
            .state
            .set_availability(upstream, backend, Availability::Draining(drain))
        {
            tracing::info!(upstream, backend = %address, drain, "drain state changed");
        }
        json_reply(
            StatusCode::OK,
            &json!({ "upstream": upstream, "backend": address.to_string(), "draining": drain }),
        )
    }
}

/// The address of the backend that owns `key` in upstream `index` now (pins included).
fn owner_address(router: &Router, index: usize, key: &str) -> Option<SocketAddr> {
    let owner = router.owner(index, key)?;
    Some(router.upstreams()[index].backends[owner].address)
}

/// The `backend` of a pin request's JSON body.
fn pin_backend(body: &[u8]) -> Result<SocketAddr, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PinBody {
        backend: String,
    }
    let body: PinBody = serde_json::from_slice(body)
        .map_err(|e| format!("expected {{\"backend\": \"ip:port\"}}: {e}"))?;
    body.backend
        .trim()
        .parse()
        .map_err(|_| format!("backend {:?} is not ip:port", body.backend))
}

/// The largest admin request body read (a pin is a few dozen bytes).
const MAX_ADMIN_BODY: usize = 4096;

/// Reads the request body, up to [`MAX_ADMIN_BODY`] bytes.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(format!("body over {MAX_ADMIN_BODY} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(format!("reading the body: {e}")),
        }
    }
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn json_error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_reply(status, &json!({ "error": message }))
}

/// Percent-decodes an admin path segment (addresses like `[::1]:80` may arrive encoded).
fn decode_segment(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    resp
}

fn metrics_text() -> Response<Vec<u8>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&prometheus::gather(), &mut body) {
        Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("metrics encoding failed: {e}\n").into_bytes(),
        ),
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if !self.authorized(session) {
            let mut resp = json_error(StatusCode::UNAUTHORIZED, "admin token required");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
        let req = session.req_header();
        let method = req.method.as_str();
        let path = req.uri.path();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["upstreams", name, "keys", key, "pin"] = segments.as_slice() {
            let (name, key) = (decode_segment(name), decode_segment(key));
            return match method {
                "GET" => self.pin(&name, &key),
                "POST" => match read_body(session).await.and_then(|b| pin_backend(&b)) {
                    Ok(backend) => self.set_pin(&name, &key, Some(backend)).await,
                    Err(e) => json_error(StatusCode::BAD_REQUEST, &e),
                },
                "DELETE" => self.set_pin(&name, &key, None).await,
                _ => json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET, POST or DELETE"),
            };
        }
        if let ["upstreams", name, "pins"] = segments.as_slice() {
            return match method {
                "GET" => self.pins(&decode_segment(name)),
                _ => json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            };
        }
        if let ["upstreams", name, "backends", address, "drain"] = segments.as_slice() {
            let (name, address) = (decode_segment(name), decode_segment(address));
            return match method {
                "POST" => self.drain(&name, &address, true),
                "DELETE" => self.drain(&name, &address, false),
                _ => json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST or DELETE"),
            };
        }
        match (method, path) {
            ("GET", "/upstreams") => self.upstreams(),
            ("GET", "/readyz") => self.readyz().await,
            ("GET", "/config") => self.config(),
            ("GET", "/route") => self.route(req.uri.query().unwrap_or("")),
            ("GET", "/documents/top") => self.documents_top(req.uri.query().unwrap_or("")),
            ("POST", "/reload") => self.reload().await,
            ("GET", "/config/status") => self.config_status(),
            ("GET" | "HEAD", "/healthz") => reply(
                StatusCode::OK,
                "application/json",
                b"{\"status\":\"ok\"}\n".to_vec(),
            ),
            ("GET" | "HEAD", "/metrics") => {
                let installed = self.state.current();
                documents::update_gauges(&self.state.registry.snapshot(), &installed.router);
                metrics_text()
            }
            (_, "/healthz" | "/metrics") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                b"{\"error\":\"method not allowed\"}\n".to_vec(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                b"{\"error\":\"not found\"}\n".to_vec(),
            ),
        }
    }
}
