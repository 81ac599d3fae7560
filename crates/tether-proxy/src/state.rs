//! The one owner of the running state: the current `Router` and its metric handles (swapped
//! as a whole on reload; requests take a snapshot at start and finish on it), the registry of
//! open streams, and the signal that an upstream's key owners changed.

use crate::convergence::Cause;
use crate::metrics::{Metrics, RouterCounters};
use crate::streams::StreamRegistry;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tether_config::Config;
use tether_routing::Router;
use tokio::sync::Notify;

/// A router together with everything derived from it.
pub struct Installed {
    /// The validated configuration the router was built from.
    pub config: Config,
    /// The routing table and backend states.
    pub router: Router,
    /// Pre-resolved request counters for the router's routes.
    pub counters: RouterCounters,
    /// Per route, the request-rate estimator of its `rate_limit` (None without one).
    pub limiters: Vec<Option<pingora_limits::rate::Rate>>,
}

impl Installed {
    /// Builds the routing state for `config`.
    pub fn new(config: &Config) -> Installed {
        Installed::from_router(config, Router::new(config))
    }

    fn from_router(config: &Config, router: Router) -> Installed {
        let metrics = Metrics::global();
        for upstream in &config.upstreams {
            metrics.touch_upstream(&upstream.name);
        }
        let counters = RouterCounters::new(&router);
        let limiters = config
            .routes
            .iter()
            .map(|r| {
                r.rate_limit
                    .map(|_| pingora_limits::rate::Rate::new(std::time::Duration::from_secs(1)))
            })
            .collect();
        Installed {
            config: config.clone(),
            router,
            counters,
            limiters,
        }
    }

    /// The configuration of upstream `index` (the router keeps upstreams in config order).
    pub fn config_upstream(&self, index: usize) -> Option<&tether_config::Upstream> {
        self.config.upstreams.get(index)
    }
}

/// Shared, swappable proxy state.
pub struct ProxyState {
    current: ArcSwap<Installed>,
    /// Every open WebSocket, SSE and long-poll stream.
    pub registry: Arc<StreamRegistry>,
    owners_changed: Notify,
    /// Requests between routing and logging (streams included).
    in_flight: AtomicUsize,
}

/// Counts one request in flight while it lives.
pub struct InFlight(Arc<ProxyState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ProxyState {
    /// State serving `config`.
    pub fn new(config: &Config) -> ProxyState {
        let installed = Installed::new(config);
        Metrics::global().refresh_backend_up(&installed.router);
        ProxyState {
            current: ArcSwap::from_pointee(installed),
            registry: Arc::new(StreamRegistry::default()),
            owners_changed: Notify::new(),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Swaps in a new validated config. Backends that stay keep their health, drain and load
    /// state; requests in flight finish on the router they started with. Every upstream whose
    /// backend set changed counts a `config` ring change, and convergence re-checks all streams.
    pub fn install(&self, config: &Config) {
        let old = self.current();
        let router = Router::with_previous(config, &old.router);
        let installed = Installed::from_router(config, router);
        let changed: Vec<String> = config
            .upstreams
            .iter()
            .filter(|u| {
                old.config
                    .upstreams
                    .iter()
                    .find(|o| o.name == u.name)
                    .is_none_or(|o| o.backends != u.backends)
            })
            .map(|u| u.name.clone())
            .collect();
        self.current.store(Arc::new(installed));
        for name in &changed {
            self.owner_changed(name, Cause::Config);
        }
        Metrics::global().refresh_backend_up(&self.current().router);
        // Routes may have moved keys between upstreams even when no ring changed.
        self.owners_changed.notify_one();
    }

    /// Records that the key owners of `upstream` changed (counted in `ring_changes_total`) and
    /// wakes convergence.
    pub fn owner_changed(&self, upstream: &str, cause: Cause) {
        let metrics = Metrics::global();
        metrics
            .ring_changes
            .with_label_values(&[upstream, cause.as_str()])
            .inc();
        metrics.refresh_backend_up(&self.current().router);
        self.owners_changed.notify_one();
    }

    /// Resolves when an owner change was signalled (after the last wait).
    pub async fn owners_changed(&self) {
        self.owners_changed.notified().await
    }

    /// The routing state in force now.
    pub fn current(&self) -> Arc<Installed> {
        self.current.load_full()
    }
}
