//! Prometheus metrics of the proxy (prefix `tether_`), registered once in the default registry.
//!
//! Label handles are resolved when a router is installed, not per request, so the request path
//! only bumps atomics.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts,
};
use std::sync::OnceLock;
use std::time::Duration;
use tether_routing::{KeySourceKind, Router};

/// Every `tether_requests_refused_total` label, created at 0 at start: the checks before
/// routing (`tether_http::checks`), the request framing and body, and routing's refusals.
pub const REFUSALS: [&str; 14] = [
    "uri_too_long",
    "header_too_large",
    "method_not_allowed",
    "bad_target",
    "bad_websocket",
    "bad_host",
    "bad_framing",
    "bad_request",
    "body_too_large",
    "rate_limited",
    "bad_path",
    "no_route",
    "missing_key",
    "bad_key",
];

/// Counts a refused request and logs it, at most one line a second per process (an attack
/// must be visible without flooding the log).
pub fn refused(reason: &'static str, status: u16) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG: AtomicU64 = AtomicU64::new(0);
    // Handles resolved once, like the route metrics: a flood of refusals costs an atomic each.
    static HANDLES: OnceLock<Vec<(&'static str, IntCounter)>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        let family = &Metrics::global().requests_refused;
        REFUSALS
            .iter()
            .map(|r| (*r, family.with_label_values(&[r])))
            .collect()
    });
    match handles.iter().find(|(r, _)| *r == reason) {
        Some((_, counter)) => counter.inc(),
        None => Metrics::global()
            .requests_refused
            .with_label_values(&[reason])
            .inc(),
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_LOG.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(
            reason,
            status,
            "request refused (logged at most once a second)"
        );
    }
}

/// The process-wide metric families.
pub struct Metrics {
    /// `tether_http_requests_total{route,upstream,code}`.
    pub http_requests: IntCounterVec,
    /// `tether_streams_open{route,upstream,backend,kind}`.
    pub streams_open: IntGaugeVec,
    /// `tether_streams_closed_total{upstream,reason}`.
    pub streams_closed: IntCounterVec,
    /// `tether_backend_up{upstream,backend}`: 1 when the backend may own keys.
    pub backend_up: IntGaugeVec,
    /// `tether_health_checks_total{upstream,backend,result}`.
    pub health_checks: IntCounterVec,
    /// `tether_ring_changes_total{upstream,cause}`.
    pub ring_changes: IntCounterVec,
    /// `tether_split_keys{upstream}`.
    pub split_keys: IntGaugeVec,
    /// `tether_busiest_document_stream_share{upstream}`: the busiest document's share of the
    /// upstream's open streams (set at each scrape).
    pub busiest_document_share: GaugeVec,
    /// `tether_backend_stream_spread{upstream}`: the busiest backend's open streams over the
    /// mean of the upstream's backends (set at each scrape).
    pub backend_stream_spread: GaugeVec,
    /// `tether_config_reloads_total{result}`.
    pub config_reloads: IntCounterVec,
    /// `tether_config_generation`.
    pub config_generation: IntGauge,
    /// `tether_http_request_duration_seconds{route,upstream}`.
    pub http_request_duration: HistogramVec,
    /// `tether_upstream_connect_duration_seconds{upstream}`.
    pub upstream_connect_duration: HistogramVec,
    /// `tether_downstream_connections`.
    pub downstream_connections: IntGauge,
    /// `tether_downstream_closed_total{reason}`: connections closed before a request was read.
    pub downstream_closed: IntCounterVec,
    /// `tether_requests_refused_total{reason}`: requests answered locally as malformed, over a
    /// limit or unroutable; never forwarded.
    pub requests_refused: IntCounterVec,
    /// `tether_retries_total{route,upstream}`.
    pub retries: IntCounterVec,
    /// `tether_sticky_keys_total{route,source}`.
    pub sticky_keys: IntCounterVec,
    /// `tether_build_info{version}` = 1.
    pub build_info: IntGaugeVec,
    /// `tether_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// `tether_discovery_up{upstream,source}`: 1 while the membership source answers.
    pub discovery_up: IntGaugeVec,
    /// `tether_discovery_members{upstream}`: members the source reports (last known).
    pub discovery_members: IntGaugeVec,
    /// `tether_discovery_full_loads_total{upstream}`: full reads of the member set.
    pub discovery_full_loads: IntCounterVec,
    /// `tether_discovery_watch_resumes_total{upstream}`: etcd watches resumed from the last
    /// seen revision after a disconnect (no full reload).
    pub discovery_resumes: IntCounterVec,
    /// `(upstream, backend)` label pairs of `backend_up` now exported, to drop removed ones.
    backend_series: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name} is statically valid: {e}"));
    let _ = prometheus::register(Box::new(metric.clone()));
    metric
}

fn plain_gauge(name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help)
        .unwrap_or_else(|e| panic!("metric {name} is statically valid: {e}"));
    let _ = prometheus::register(Box::new(metric.clone()));
    metric
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is statically valid: {e}"));
    // Registration only fails on a duplicate name; `global()` registers exactly once.
    let _ = prometheus::register(Box::new(metric.clone()));
    metric
}

fn float_gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is statically valid: {e}"));
    let _ = prometheus::register(Box::new(metric.clone()));
    metric
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is statically valid: {e}"));
    let _ = prometheus::register(Box::new(metric.clone()));
    metric
}

impl Metrics {
    fn register() -> Metrics {
        Metrics {
            http_requests: counter(
                "tether_http_requests_total",
                "HTTP requests answered, by route, upstream and status class (2xx..5xx)",
                &["route", "upstream", "code"],
            ),
            streams_open: gauge(
                "tether_streams_open",
                "Open WebSocket, SSE and long-poll streams",
                &["route", "upstream", "backend", "kind"],
            ),
            streams_closed: counter(
                "tether_streams_closed_total",
                "Streams that ended, by why: ended (by either peer), rebalance, shutdown",
                &["upstream", "reason"],
            ),
            backend_up: gauge(
                "tether_backend_up",
                "1 when the backend may own keys (healthy, not ejected, not draining)",
                &["upstream", "backend"],
            ),
            health_checks: counter(
                "tether_health_checks_total",
                "Active health check probes, by result (success|failure)",
                &["upstream", "backend", "result"],
            ),
            ring_changes: counter(
                "tether_ring_changes_total",
                "Changes of an upstream's key owners, by cause (health|passive|drain|config|discovery|pin)",
                &["upstream", "cause"],
            ),
            split_keys: gauge(
                "tether_split_keys",
                "Keys with open streams on more than one backend",
                &["upstream"],
            ),
            busiest_document_share: float_gauge(
                "tether_busiest_document_stream_share",
                "The busiest document's share of the upstream's open streams (0 without streams)",
                &["upstream"],
            ),
            backend_stream_spread: float_gauge(
                "tether_backend_stream_spread",
                "Open streams of the busiest backend over the mean of the upstream's backends",
                &["upstream"],
            ),
            config_reloads: counter(
                "tether_config_reloads_total",
                "Config reload attempts, by result (success|failure)",
                &["result"],
            ),
            config_generation: plain_gauge(
                "tether_config_generation",
                "Generation of the config in force (1 at start, +1 per successful reload)",
            ),
            http_request_duration: histogram(
                "tether_http_request_duration_seconds",
                "Time from request to the end of the response (streams: their whole life)",
                &["route", "upstream"],
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ],
            ),
            upstream_connect_duration: histogram(
                "tether_upstream_connect_duration_seconds",
                "Time to get a connection to a backend (new or from the pool)",
                &["upstream"],
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ],
            ),
            downstream_connections: plain_gauge(
                "tether_downstream_connections",
                "Open client connections (from accept to close)",
            ),
            requests_refused: counter(
                "tether_requests_refused_total",
                "Requests Tether answered itself and never forwarded, by why: uri_too_long, \
                 header_too_large, method_not_allowed, bad_target, bad_websocket, bad_host, \
                 body_too_large, rate_limited, bad_path, no_route, missing_key, bad_key",
                &["reason"],
            ),
            downstream_closed: counter(
                "tether_downstream_closed_total",
                "Client connections closed by Tether before a request was read, by why: \
                 header_timeout (slow or silent client) | max_connections",
                &["reason"],
            ),
            retries: counter(
                "tether_retries_total",
                "Requests retried on another backend after a connect failure",
                &["route", "upstream"],
            ),
            sticky_keys: counter(
                "tether_sticky_keys_total",
                "Routed requests by where the sticky key came from",
                &["route", "source"],
            ),
            build_info: gauge(
                "tether_build_info",
                "Always 1; the version label says which build",
                &["version"],
            ),
            access_log_dropped: {
                let c = IntCounter::new(
                    "tether_access_log_dropped_total",
                    "Access log lines dropped because stdout could not keep up",
                )
                .unwrap_or_else(|e| panic!("metric is statically valid: {e}"));
                let _ = prometheus::register(Box::new(c.clone()));
                c
            },
            discovery_up: gauge(
                "tether_discovery_up",
                "1 while the upstream's membership source (etcd, dns) answers; 0 = serving the last known members",
                &["upstream", "source"],
            ),
            discovery_members: gauge(
                "tether_discovery_members",
                "Members the upstream's discovery source reports (the last known set while it is down)",
                &["upstream"],
            ),
            discovery_full_loads: counter(
                "tether_discovery_full_loads_total",
                "Full reads of an upstream's member set (etcd range loads, DNS answers)",
                &["upstream"],
            ),
            discovery_resumes: counter(
                "tether_discovery_watch_resumes_total",
                "etcd watches resumed from the last seen revision after a disconnect",
                &["upstream"],
            ),
            backend_series: Default::default(),
        }
    }

    /// Creates every series an upstream can have at 0, so `increase()` and alerts see the first
    /// event too (a series born at 1 looks like no change).
    pub fn touch_upstream(&self, upstream: &str) {
        for cause in ["health", "passive", "drain", "config", "discovery", "pin"] {
            self.ring_changes.with_label_values(&[upstream, cause]);
        }
        for reason in ["ended", "rebalance", "shutdown"] {
            self.streams_closed.with_label_values(&[upstream, reason]);
        }
        self.split_keys.with_label_values(&[upstream]);
    }

    /// Sets `backend_up` for every backend of `router` from its current state.
    /// Series of backends a reload removed are deleted, so they cannot alert forever.
    pub fn refresh_backend_up(&self, router: &Router) {
        let mut now = std::collections::HashSet::new();
        for upstream in router.upstreams() {
            for backend in &upstream.backends {
                let address = backend.address.to_string();
                self.backend_up
                    .with_label_values(&[&upstream.name, &address])
                    .set(i64::from(backend.is_available()));
                now.insert((upstream.name.clone(), address));
            }
        }
        let mut known = self
            .backend_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (upstream, backend) in known.difference(&now) {
            let _ = self.backend_up.remove_label_values(&[upstream, backend]);
        }
        *known = now;
    }

    /// The metrics, registered on first use.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let metrics = Metrics::register();
            metrics
                .build_info
                .with_label_values(&[env!("CARGO_PKG_VERSION")])
                .set(1);
            for result in ["success", "failure"] {
                metrics.config_reloads.with_label_values(&[result]);
            }
            for reason in ["header_timeout", "max_connections"] {
                metrics.downstream_closed.with_label_values(&[reason]);
            }
            for reason in REFUSALS {
                metrics.requests_refused.with_label_values(&[reason]);
            }
            metrics
        })
    }
}

/// Status classes used as the `code` label.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Key sources, in `KeySourceKind` order, used as the `source` label.
const SOURCES: [KeySourceKind; 7] = [
    KeySourceKind::Header,
    KeySourceKind::Cookie,
    KeySourceKind::Query,
    KeySourceKind::Path,
    KeySourceKind::ClientIp,
    KeySourceKind::Random,
    KeySourceKind::None,
];

/// Pre-resolved metric handles for one route.
pub struct RouteMetrics {
    requests: [IntCounter; 5],
    duration: Histogram,
    retries: IntCounter,
    sticky_keys: [IntCounter; 7],
    connect: Histogram,
}

impl RouteMetrics {
    fn new(metrics: &Metrics, route: &str, upstream: &str) -> RouteMetrics {
        RouteMetrics {
            requests: CLASSES.map(|class| {
                metrics
                    .http_requests
                    .with_label_values(&[route, upstream, class])
            }),
            duration: metrics
                .http_request_duration
                .with_label_values(&[route, upstream]),
            retries: metrics.retries.with_label_values(&[route, upstream]),
            sticky_keys: SOURCES.map(|source| {
                metrics
                    .sticky_keys
                    .with_label_values(&[route, source.as_str()])
            }),
            connect: metrics
                .upstream_connect_duration
                .with_label_values(&[upstream]),
        }
    }

    /// Counts one answered request with `status` that took `elapsed`.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a retry on another backend.
    pub fn retried(&self) {
        self.retries.inc();
    }

    /// Counts where a request's sticky key came from.
    pub fn key_from(&self, source: KeySourceKind) {
        let i = SOURCES.iter().position(|s| *s == source).unwrap_or(6);
        self.sticky_keys[i].inc();
    }

    /// Records how long connecting to a backend took.
    pub fn connected_in(&self, elapsed: Duration) {
        self.connect.observe(elapsed.as_secs_f64());
    }
}

/// Handles for every route of a router, by route index, plus one set for unrouted requests.
pub struct RouterCounters {
    routes: Vec<RouteMetrics>,
    unrouted: RouteMetrics,
}

impl RouterCounters {
    /// Resolves the label handles for every route of `router`.
    pub fn new(router: &Router) -> RouterCounters {
        let metrics = Metrics::global();
        RouterCounters {
            routes: router
                .routes()
                .iter()
                .map(|r| RouteMetrics::new(metrics, &r.name, &r.upstream))
                .collect(),
            unrouted: RouteMetrics::new(metrics, "", ""),
        }
    }

    /// The handles of route `index`, or of "no route" when `index` is None or out of range.
    pub fn route(&self, index: Option<usize>) -> &RouteMetrics {
        index
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.unrouted)
    }
}
