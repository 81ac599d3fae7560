//! Runtime state of upstreams and backends: what survives a reload and what the proxy updates.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::balance::RoundRobin;
use crate::pins::Pins;
use crate::ring::Ring;
use crate::Balance;

/// Runtime state of one backend, shared between the router and the proxy (health, load).
#[derive(Debug)]
pub struct BackendState {
    /// Address from the config.
    pub address: SocketAddr,
    /// Weight from the config.
    pub weight: u32,
    /// False when active health checks say the backend is down. Starts true.
    pub up: AtomicBool,
    /// True while passive ejection (consecutive transport failures) keeps the backend out.
    pub ejected: AtomicBool,
    /// True while an operator drains the backend: it owns no keys, but open streams stay.
    pub draining: AtomicBool,
    /// Consecutive connect / transport failures (kept by the proxy for passive ejection).
    pub failures: AtomicU32,
    /// In-flight requests + open streams (maintained by the proxy; used by least_connections).
    pub active: AtomicUsize,
}

impl BackendState {
    /// A fresh backend: up, not ejected, not draining, no load.
    pub fn new(address: SocketAddr, weight: u32) -> BackendState {
        BackendState {
            address,
            weight,
            up: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            active: AtomicUsize::new(0),
        }
    }

    /// A state for `address` with a new `weight` that keeps `old`'s health, ejection and drain.
    fn reweighted(old: &BackendState, weight: u32) -> BackendState {
        let state = BackendState::new(old.address, weight);
        for (to, from) in [
            (&state.up, &old.up),
            (&state.ejected, &old.ejected),
            (&state.draining, &old.draining),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        state
    }

    /// Whether the backend may own keys and take new requests: up, not ejected, not draining.
    pub fn is_available(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            && !self.ejected.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// One upstream with its ring and backend states.
#[derive(Debug)]
pub struct UpstreamState {
    /// Name from the config.
    pub name: String,
    /// Balance from the config.
    pub balance: Balance,
    /// Backends in config order; `Arc` so a reload can carry state over for unchanged addresses.
    pub backends: Vec<Arc<BackendState>>,
    /// The nginx-compatible ketama ring over `backends` (used for every keyed request).
    pub(crate) ring: Ring,
    /// Weighted round robin for keyless requests.
    pub(crate) round_robin: RoundRobin,
    /// Keys an operator pinned to a backend (the same table across reloads).
    pub pins: Arc<Pins>,
}

/// Who owns a key, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    /// The backend index.
    pub(crate) backend: usize,
    /// True when the key is pinned to it; false when the ring chose it.
    pub(crate) pinned: bool,
}

impl UpstreamState {
    /// Builds the state of `config`, reusing `previous` states for the same address and weight;
    /// a backend whose weight changed gets a fresh state that keeps its `up` flag.
    pub(crate) fn new(
        config: &tether_config::Upstream,
        previous: Option<&UpstreamState>,
        pins: Arc<Pins>,
    ) -> UpstreamState {
        let backends: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|backend| {
                // Weight 0 cannot happen after validation; 1 keeps the ring well-defined anyway.
                let weight = backend.weight.max(1);
                let old =
                    previous.and_then(|p| p.backends.iter().find(|s| s.address == backend.address));
                match old {
                    Some(old) if old.weight == weight => Arc::clone(old),
                    Some(old) => Arc::new(BackendState::reweighted(old, weight)),
                    None => Arc::new(BackendState::new(backend.address, weight)),
                }
            })
            .collect();
        UpstreamState {
            name: config.name.clone(),
            balance: config.balance,
            ring: Ring::new(&backends),
            round_robin: RoundRobin::new(&backends),
            backends,
            pins,
        }
    }

    /// The owner of `key` among the backends `usable` allows: its pinned backend when it has
    /// one that is usable, else the first usable backend of its ring walk.
    pub(crate) fn owner(&self, key: &str, usable: impl Fn(usize) -> bool) -> Option<Owner> {
        if let Some(address) = self.pins.get(key) {
            let pinned = self.backends.iter().position(|b| b.address == address);
            if let Some(backend) = pinned.filter(|&i| usable(i)) {
                return Some(Owner {
                    backend,
                    pinned: true,
                });
            }
        }
        self.ring
            .owner(key.as_bytes(), self.backends.len(), usable)
            .map(|backend| Owner {
                backend,
                pinned: false,
            })
    }
}
