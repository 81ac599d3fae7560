//! The one owner of the running routing state: the current `Router` and its metric handles,
//! swapped as a whole on reload. Requests take a snapshot at start and finish on it.

use crate::metrics::RouterCounters;
use arc_swap::ArcSwap;
use std::sync::Arc;
use tether_config::Config;
use tether_routing::Router;

/// A router together with everything derived from it.
pub struct Installed {
    /// The validated configuration the router was built from.
    pub config: Config,
    /// The routing table and backend states.
    pub router: Router,
    /// Pre-resolved request counters for the router's routes.
    pub counters: RouterCounters,
}

impl Installed {
    /// Builds the routing state for `config`.
    pub fn new(config: &Config) -> Installed {
        let router = Router::new(config);
        let counters = RouterCounters::new(&router);
        Installed {
            config: config.clone(),
            router,
            counters,
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
}

impl ProxyState {
    /// State serving `config`.
    pub fn new(config: &Config) -> ProxyState {
        ProxyState {
            current: ArcSwap::from_pointee(Installed::new(config)),
        }
    }

    /// The routing state in force now.
    pub fn current(&self) -> Arc<Installed> {
        self.current.load_full()
    }
}
