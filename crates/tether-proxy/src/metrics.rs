//! Prometheus metrics of the proxy (prefix `tether_`), registered once in the default registry.
//!
//! Label handles are resolved when a router is installed, not per request, so the request path
//! only bumps atomics.

use prometheus::{IntCounter, IntCounterVec, Opts};
use std::sync::OnceLock;
use tether_routing::Router;

/// The process-wide metric families.
pub struct Metrics {
    /// `tether_http_requests_total{route,upstream,code}`.
    pub http_requests: IntCounterVec,
}

impl Metrics {
    fn register() -> Metrics {
        let http_requests = IntCounterVec::new(
            Opts::new(
                "tether_http_requests_total",
                "HTTP requests answered, by route, upstream and status class (2xx..5xx)",
            ),
            &["route", "upstream", "code"],
        )
        .unwrap_or_else(|e| panic!("metric definition is static and valid: {e}"));
        // Registration only fails on a duplicate name; `global()` registers exactly once.
        let _ = prometheus::register(Box::new(http_requests.clone()));
        Metrics { http_requests }
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
