//! The one owner of the running state: the current `Router` and its metric handles (swapped
//! as a whole on reload; requests take a snapshot at start and finish on it), the registry of
//! open streams, the hot documents of every upstream, and the signal that an upstream's key
//! owners changed.
//!
//! The installed config is the file's config with the backends of every `discovery` upstream
//! filled in from its source. Both a reload and a membership change go through one install
//! path, so health state, metrics and convergence behave the same for either.

use crate::documents::{DocumentBook, UpstreamDocuments};
use crate::fleet::Fleet;
use crate::metrics::{Metrics, RouterCounters};
use crate::streams::StreamRegistry;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tether_config::{Backend, Config, Discovery};
use tether_routing::{BackendState, PinBook, Router};
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
    /// Per upstream (router order), its hot documents (the book's, kept across reloads).
    pub documents: Vec<Arc<UpstreamDocuments>>,
}

impl Installed {
    fn from_router(config: &Config, router: Router, book: &DocumentBook) -> Installed {
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
        let documents = router
            .upstreams()
            .iter()
            .map(|u| book.upstream(&u.name))
            .collect();
        Installed {
            config: config.clone(),
            router,
            counters,
            limiters,
            documents,
        }
    }

    /// The configuration of upstream `index` (the router keeps upstreams in config order).
    pub fn config_upstream(&self, index: usize) -> Option<&tether_config::Upstream> {
        self.config.upstreams.get(index)
    }

    /// Whether `ip` is in `server.trusted_proxies` (its `X-Forwarded-For` is extended).
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.config
            .server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(ip))
    }
}

/// What an install is made from: the file's config and the members each source reported.
struct Inputs {
    /// The config as read from the file (discovery upstreams have no backends here).
    file: Config,
    /// Per upstream name: the source those members came from, and the members in address order.
    discovered: HashMap<String, (Discovery, Vec<Backend>)>,
}

impl Inputs {
    /// The file config with discovered backends filled in. Members count only while the
    /// upstream still names the source they came from.
    fn merged(&self) -> Config {
        let mut config = self.file.clone();
        for upstream in &mut config.upstreams {
            let Some(spec) = &upstream.discovery else {
                continue;
            };
            upstream.backends = match self.discovered.get(&upstream.name) {
                Some((from, members)) if from == spec => members.clone(),
                _ => Vec::new(),
            };
        }
        config
    }
}

/// How a discovery source is doing, for `/readyz` and `/upstreams`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryStatus {
    /// `etcd` or `dns`.
    pub source: &'static str,
    /// True once the source delivered a membership.
    pub loaded: bool,
    /// True while the source answers.
    pub up: bool,
    /// Why not, when not up.
    pub problem: Option<String>,
    /// Members in force.
    pub members: usize,
}

/// Shared, swappable proxy state.
pub struct ProxyState {
    current: ArcSwap<Installed>,
    /// Serialises installs (reload and discovery) and holds what they are built from.
    inputs: Mutex<Inputs>,
    /// Per discovery upstream, the state of its source.
    discovery: Mutex<HashMap<String, DiscoveryStatus>>,
    /// Every open WebSocket, SSE and long-poll stream.
    pub registry: Arc<StreamRegistry>,
    owners_changed: Notify,
    /// Counts the signals on `owners_changed`, so convergence knows whether owners may have
    /// changed since its last round even when it was busy when signalled.
    owner_generation: AtomicU64,
    /// Requests between routing and logging (streams included).
    in_flight: AtomicUsize,
    /// Idle keep-alive connections to backends (Tether's own HTTP/1 path).
    pub(crate) pool: crate::pool::UpstreamPool,
    /// Shutdown as the HTTP/1 path's idle connections wait for it.
    pub(crate) closing: Arc<crate::closing::Closing>,
    /// Every upstream's hot documents, kept across reloads.
    pub documents: DocumentBook,
    /// Every upstream's pinned documents, kept across reloads; changed only through
    /// [`ProxyState::set_pin`] and [`ProxyState::replace_pins`].
    pins: PinBook,
    /// Per upstream that shares bounded-load placements through etcd, its side of that.
    fleets: Mutex<HashMap<String, Arc<Fleet>>>,
}

/// Counts one request or tunnel in a backend's `active` (least-connections) while it lives.
pub struct Active(Arc<BackendState>);

impl Active {
    /// Counts one more on `backend` until dropped.
    pub fn new(backend: Arc<BackendState>) -> Active {
        backend.active.fetch_add(1, Ordering::Relaxed);
        Active(backend)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
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
        let documents = DocumentBook::default();
        let pins = PinBook::default();
        let router = Router::with_pins(config, None, &pins);
        let installed = Installed::from_router(config, router, &documents);
        Metrics::global().refresh_backend_up(&installed.router);
        ProxyState {
            current: ArcSwap::from_pointee(installed),
            inputs: Mutex::new(Inputs {
                file: config.clone(),
                discovered: HashMap::new(),
            }),
            discovery: Mutex::new(HashMap::new()),
            registry: Arc::new(StreamRegistry::default()),
            owners_changed: Notify::new(),
            owner_generation: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            pool: crate::pool::UpstreamPool::default(),
            closing: Arc::default(),
            documents,
            pins,
            fleets: Mutex::new(HashMap::new()),
        }
    }

    /// The placement agreement of `upstream` when it shares placements through etcd
    /// (`discovery: etcd` and `bounded_load`), started on first use; None otherwise.
    /// Must be called on a tokio runtime.
    pub fn fleet(&self, upstream: &str) -> Option<Arc<Fleet>> {
        let installed = self.current();
        let config = installed
            .config
            .upstreams
            .iter()
            .find(|u| u.name == upstream)?;
        let (Some(Discovery::Etcd(spec)), Some(_)) = (&config.discovery, &config.bounded_load)
        else {
            return None;
        };
        let mut fleets = self.fleets.lock().unwrap_or_else(|p| p.into_inner());
        match fleets.get(upstream) {
            Some(fleet) if fleet.spec == *spec => Some(Arc::clone(fleet)),
            _ => {
                let fleet = Fleet::start(spec);
                fleets.insert(upstream.to_string(), Arc::clone(&fleet));
                Some(fleet)
            }
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

    fn inputs(&self) -> std::sync::MutexGuard<'_, Inputs> {
        self.inputs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in a new validated config. Backends that stay keep their health, drain and load
    /// state; requests in flight finish on the router they started with. Every upstream whose
    /// backend set changed counts a `config` ring change, and convergence re-checks all streams.
    /// Discovery upstreams keep the members their source reported.
    pub fn install(&self, config: &Config) {
        let mut inputs = self.inputs();
        inputs.file = config.clone();
        self.swap(&inputs.merged(), Cause::Config);
    }

    /// Sets the members of discovery upstream `upstream` as reported by the source `from`,
    /// and installs the result if they changed (a `discovery` ring change; convergence runs).
    /// Ignored when the config no longer names that source for that upstream. Returns true
    /// when a new router was installed.
    pub fn set_members(&self, upstream: &str, from: &Discovery, members: Vec<Backend>) -> bool {
        let mut inputs = self.inputs();
        let current_spec = inputs
            .file
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
            .and_then(|u| u.discovery.as_ref());
        if current_spec != Some(from) {
            return false;
        }
        if let Some((spec, old)) = inputs.discovered.get(upstream) {
            if spec == from && *old == members {
                return false;
            }
        }
        inputs
            .discovered
            .insert(upstream.to_string(), (from.clone(), members));
        self.swap(&inputs.merged(), Cause::Discovery);
        true
    }

    /// The discovery upstreams of the file config now in force, with their sources.
    pub fn discovery_specs(&self) -> Vec<(String, Discovery)> {
        self.inputs()
            .file
            .upstreams
            .iter()
            .filter_map(|u| Some((u.name.clone(), u.discovery.clone()?)))
            .collect()
    }

    /// Records how the source of `upstream` is doing (None: the upstream has no source now).
    pub fn set_discovery_status(&self, upstream: &str, status: Option<DiscoveryStatus>) {
        let mut all = self.discovery.lock().unwrap_or_else(|p| p.into_inner());
        match status {
            Some(status) => all.insert(upstream.to_string(), status),
            None => all.remove(upstream),
        };
    }

    /// How each discovery source is doing, by upstream name.
    pub fn discovery_status(&self) -> HashMap<String, DiscoveryStatus> {
        self.discovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Builds and installs `config` (already merged); `cause` labels the ring changes.
    fn swap(&self, config: &Config, cause: Cause) {
        let old = self.current();
        let router = Router::with_pins(config, Some(&old.router), &self.pins);
        let installed = Installed::from_router(config, router, &self.documents);
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
            self.owner_changed(name, cause);
        }
        Metrics::global().refresh_backend_up(&self.current().router);
        // Routes may have moved keys between upstreams even when no ring changed.
        self.wake_convergence();
    }

    /// The one way a backend's availability changes (an active health check, passive
    /// ejection, a drain): writes the backend's flag and, when it changed, counts the ring
    /// change and wakes convergence, so no writer can forget to. Returns whether it changed.
    pub fn set_availability(
        &self,
        upstream: &str,
        backend: &BackendState,
        change: Availability,
    ) -> bool {
        let (flag, value, cause) = match change {
            Availability::Up(up) => (&backend.up, up, Cause::Health),
            Availability::Ejected(ejected) => (&backend.ejected, ejected, Cause::Passive),
            Availability::Draining(draining) => (&backend.draining, draining, Cause::Drain),
        };
        let was_available = backend.is_available();
        let changed = flag.swap(value, Ordering::AcqRel) != value;
        if changed {
            if !was_available && backend.is_available() {
                // Back: under `rebalance.failback_after` and `ramp` it takes its keys back
                // gradually from now, and convergence follows as it does.
                backend.mark_returned();
            }
            self.owner_changed(upstream, cause);
        }
        changed
    }

    /// The one way a single pin changes: pins `key` of `upstream` to `backend` (`None`
    /// unpins it) and, when that changed anything, counts a `pin` ring change and wakes
    /// convergence, which closes the key's streams if its owner moved. Returns whether it
    /// changed. (Storing the pin, in a state file or etcd, is `control::pins`'s job.)
    pub fn set_pin(&self, upstream: &str, key: &str, backend: Option<SocketAddr>) -> bool {
        let changed = self.pins.upstream(upstream).set(key, backend);
        if changed {
            self.owner_changed(upstream, Cause::Pin);
        }
        changed
    }

    /// Replaces every pin of `upstream` (a source, such as etcd, reported its whole set), as
    /// [`ProxyState::set_pin`] does for one.
    pub fn replace_pins(&self, upstream: &str, pins: &BTreeMap<String, SocketAddr>) -> bool {
        let changed = self.pins.upstream(upstream).replace(pins);
        if changed {
            self.owner_changed(upstream, Cause::Pin);
        }
        changed
    }

    /// The pins of `upstream`, by key.
    pub fn pins(&self, upstream: &str) -> BTreeMap<String, SocketAddr> {
        self.pins.upstream(upstream).all()
    }

    /// Every pin, by upstream then key (upstreams without pins left out).
    pub fn all_pins(&self) -> BTreeMap<String, BTreeMap<String, SocketAddr>> {
        self.pins.all()
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
        self.wake_convergence();
    }

    /// Wakes convergence after placements came from the fleet (no ring changed, so nothing is
    /// counted): streams of documents this instance had placed elsewhere move.
    pub fn placements_changed(&self) {
        self.wake_convergence();
    }

    fn wake_convergence(&self) {
        self.owner_generation.fetch_add(1, Ordering::AcqRel);
        self.owners_changed.notify_one();
    }

    /// Resolves when an owner change was signalled (after the last wait).
    pub async fn owners_changed(&self) {
        self.owners_changed.notified().await
    }

    /// How many owner changes were signalled so far: read before judging streams, a
    /// different value next time means every stream must be judged again.
    pub fn owner_generation(&self) -> u64 {
        self.owner_generation.load(Ordering::Acquire)
    }

    /// The routing state in force now.
    pub fn current(&self) -> Arc<Installed> {
        self.current.load_full()
    }
}

/// Why an upstream's owner function changed (the `cause` label of `ring_changes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// An active health check flipped a backend.
    Health,
    /// Passive ejection started or ended.
    Passive,
    /// A backend was drained or undrained.
    Drain,
    /// A new config was installed.
    Config,
    /// A discovery source (etcd, DNS) reported another member set.
    Discovery,
    /// A document was pinned to a backend or unpinned.
    Pin,
}

impl Cause {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Health => "health",
            Cause::Passive => "passive",
            Cause::Drain => "drain",
            Cause::Config => "config",
            Cause::Discovery => "discovery",
            Cause::Pin => "pin",
        }
    }
}

/// A change of one backend's availability (see [`ProxyState::set_availability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Active health checks found it up (true) or down.
    Up(bool),
    /// Passive ejection took it out (true) or let it back.
    Ejected(bool),
    /// An operator drained it (true) or undrained it.
    Draining(bool),
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
listeners:
  - address: 127.0.0.1:1
upstreams:
  app:
    backends:
      - address: 127.0.0.1:2
      - address: 127.0.0.1:3
routes:
  - name: all
    match: { path_prefix: / }
    upstream: app
";

    #[tokio::test]
    async fn an_availability_change_is_counted_once_and_wakes_convergence() {
        let config = tether_config::parse(CONFIG, "t.yaml").expect("config");
        let state = ProxyState::new(&config);
        let installed = state.current();
        let backend = &installed.router.upstreams()[0].backends[0];
        let changes = || {
            Metrics::global()
                .ring_changes
                .with_label_values(&["app", "drain"])
                .get()
        };
        let before = changes();
        assert!(state.set_availability("app", backend, Availability::Draining(true)));
        assert!(backend.draining.load(Ordering::Acquire));
        // Convergence is woken (the notification is kept until it waits).
        tokio::time::timeout(std::time::Duration::from_secs(5), state.owners_changed())
            .await
            .expect("woken");
        assert!(!state.set_availability("app", backend, Availability::Draining(true)));
        assert_eq!(
            changes(),
            before + 1,
            "an unchanged flag counts no ring change"
        );
        assert!(state.set_availability("app", backend, Availability::Draining(false)));
        assert_eq!(changes(), before + 2);
    }
}
