//! Prometheus metrics of the proxy (prefix `tether_`), registered once in the default registry.
//!
//! Label handles are resolved when a router is installed, not per request, so the request path
//! only bumps atomics.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use std::sync::OnceLock;
use tether_routing::Router;

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
    /// `tether_config_reloads_total{result}`.
    pub config_reloads: IntCounterVec,
    /// `tether_config_generation`.
    pub config_generation: IntGauge,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is statically valid: {e}"));
    // Registration only fails on a duplicate name; `global()` registers exactly once.
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
                "Changes of an upstream's key owners, by cause (health|passive|drain|config)",
                &["upstream", "cause"],
            ),
            split_keys: gauge(
                "tether_split_keys",
                "Keys with open streams on more than one backend",
                &["upstream"],
            ),
            config_reloads: counter(
                "tether_config_reloads_total",
                "Config reload attempts, by result (success|failure)",
                &["result"],
            ),
            config_generation: {
                let g = IntGauge::new(
                    "tether_config_generation",
                    "Generation of the config in force (1 at start, +1 per successful reload)",
                )
                .unwrap_or_else(|e| panic!("metric is statically valid: {e}"));
                let _ = prometheus::register(Box::new(g.clone()));
                g
            },
        }
    }

    /// Sets `backend_up` for every backend of `router` from its current state.
    pub fn refresh_backend_up(&self, router: &Router) {
        for upstream in router.upstreams() {
            for backend in &upstream.backends {
                self.backend_up
                    .with_label_values(&[&upstream.name, &backend.address.to_string()])
                    .set(i64::from(backend.is_available()));
            }
        }
    }

    /// The metrics, registered on first use.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::register)
    }
}

/// Status classes used as the `code` label.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Pre-resolved request counters for one route: one per status class.
pub struct RouteCounters([IntCounter; 5]);

impl RouteCounters {
    /// Counts one answered request with `status`.
    pub fn observe(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.0[class].inc();
    }
}

/// Counters for every route of a router, by route index, plus one set for unrouted requests.
pub struct RouterCounters {
    routes: Vec<RouteCounters>,
    unrouted: RouteCounters,
}

impl RouterCounters {
    /// Resolves the label handles for every route of `router`.
    pub fn new(router: &Router) -> RouterCounters {
        let metrics = Metrics::global();
        let set = |route: &str, upstream: &str| {
            RouteCounters(CLASSES.map(|class| {
                metrics
                    .http_requests
                    .with_label_values(&[route, upstream, class])
            }))
        };
        RouterCounters {
            routes: router
                .routes()
                .iter()
                .map(|r| set(&r.name, &r.upstream))
                .collect(),
            unrouted: set("", ""),
        }
    }

    /// The counters of route `index`, or of "no route" when `index` is None or out of range.
    pub fn route(&self, index: Option<usize>) -> &RouteCounters {
        index
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.unrouted)
    }
}
