//! Runtime state of upstreams and backends: what survives a reload and what the proxy updates.

use std::cell::OnceCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::balance::RoundRobin;
use crate::pins::Pins;
use crate::placements::{Placed, Placements};
use crate::ring::Ring;
use crate::Balance;
use crate::Chosen;

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
    /// Open WebSocket, SSE and long-poll streams (maintained by the proxy's stream registry;
    /// what `bounded_load` compares). Shared with the state that replaces this one when a
    /// reload changes the backend's weight, so streams opened before still count.
    pub streams: Arc<AtomicUsize>,
    /// When the backend last became available again ([`clock`] milliseconds), while it is
    /// taking its keys back under `rebalance.failback_after` and `ramp`; 0 once it owns all
    /// of them. Set by [`BackendState::mark_returned`]; cleared by the first lookup after the
    /// ramp ends.
    returned_at: AtomicU64,
}

/// Milliseconds on this process's monotonic clock, never 0 (0 marks "not returning").
pub fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A key's place in every returning backend's ramp, in [0, 1): FNV-1a of the key, mixed by
/// MurmurHash3's finaliser (FNV alone leaves the top bits of keys that differ only at the end,
/// such as `doc-17` and `doc-18`, close together), so the same documents go back first on
/// every instance, spread evenly and independent of the ring's CRC32 points.
fn ramp_point(key: &str) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash >> 11) as f64 / (1u64 << 53) as f64
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
            streams: Arc::default(),
            returned_at: AtomicU64::new(0),
        }
    }

    /// Records that the backend became available again just now (after being down, ejected
    /// or drained, or as a new member of a serving upstream): under `failback_after` and
    /// `ramp` it takes its keys back gradually from now on.
    pub fn mark_returned(&self) {
        self.returned_at.store(clock(), Ordering::Release);
    }

    /// Since when ([`clock`] ms) it has been returning; None once it owns all its keys.
    pub fn returned_at(&self) -> Option<u64> {
        match self.returned_at.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        }
    }

    /// A state for `address` with a new `weight` that keeps `old`'s health, ejection and drain.
    fn reweighted(old: &BackendState, weight: u32) -> BackendState {
        let mut state = BackendState::new(old.address, weight);
        state.streams = Arc::clone(&old.streams);
        for (to, from) in [
            (&state.up, &old.up),
            (&state.ejected, &old.ejected),
            (&state.draining, &old.draining),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let returned = old.returned_at.load(Ordering::Relaxed);
        state.returned_at.store(returned, Ordering::Relaxed);
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
    /// `(address, index)` of every backend, sorted by address: pins and placements name a
    /// backend by address (indices change with reloads), and a keyed request may look one up.
    by_address: Box<[(SocketAddr, usize)]>,
    /// Keys an operator pinned to a backend (the same table across reloads).
    pub pins: Arc<Pins>,
    /// Where `bounded_load` placed each document lately (the same table across reloads).
    pub placements: Arc<Placements>,
    /// `bounded_load`, if set.
    bounded: Option<Bounded>,
    /// Placements are agreed through etcd (see [`UpstreamState::shares_placements`]).
    shared: bool,
    /// `rebalance.failback_after`, in milliseconds.
    failback_after: u64,
    /// `rebalance.ramp`, in milliseconds.
    ramp: u64,
}

/// Who owns a key, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    /// The backend index.
    pub(crate) backend: usize,
    /// What chose it.
    pub(crate) chosen: Chosen,
}

/// `bounded_load` of an upstream, in the units the lookup uses.
#[derive(Debug, Clone, Copy)]
struct Bounded {
    factor: f64,
    /// Milliseconds.
    linger: u64,
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
                    None => {
                        let state = BackendState::new(backend.address, weight);
                        // A member joining an upstream that serves takes keys from the others:
                        // it returns. (The first members of an upstream take nobody's keys.)
                        if previous.is_some_and(|p| !p.backends.is_empty()) {
                            state.mark_returned();
                        }
                        Arc::new(state)
                    }
                }
            })
            .collect();
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut by_address: Box<[(SocketAddr, usize)]> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.address, i))
            .collect();
        by_address.sort_unstable();
        UpstreamState {
            name: config.name.clone(),
            balance: config.balance,
            ring: Ring::new(&backends),
            round_robin: RoundRobin::new(&backends),
            backends,
            by_address,
            pins,
            placements: previous.map_or_else(Arc::default, |p| Arc::clone(&p.placements)),
            bounded: config.bounded_load.map(|b| Bounded {
                factor: b.factor,
                linger: millis(b.linger),
            }),
            shared: config.bounded_load.is_some()
                && matches!(config.discovery, Some(tether_config::Discovery::Etcd(_))),
            failback_after: millis(config.rebalance.failback_after),
            ramp: millis(config.rebalance.ramp),
        }
    }

    /// The index of the backend at `address`, if it is a member.
    pub fn backend_index(&self, address: SocketAddr) -> Option<usize> {
        self.by_address
            .binary_search_by(|(a, _)| a.cmp(&address))
            .ok()
            .map(|at| self.by_address[at].1)
    }

    /// The share of its keys backend `index` owns now, in [0, 1]: 0 within `failback_after` of
    /// its return, then growing linearly over `ramp`, 1 after (and for a backend that never
    /// left). Availability is not considered.
    pub fn share_in_force(&self, index: usize) -> f64 {
        self.backends
            .get(index)
            .map_or(0.0, |backend| self.share(backend, clock()))
    }

    fn share(&self, backend: &BackendState, now: u64) -> f64 {
        let Some(since) = backend.returned_at() else {
            return 1.0;
        };
        let elapsed = now.saturating_sub(since);
        let Some(ramping) = elapsed.checked_sub(self.failback_after) else {
            return 0.0;
        };
        if ramping >= self.ramp {
            // Fully back: later lookups skip the clock. Only a newer return may replace it.
            let _ =
                backend
                    .returned_at
                    .compare_exchange(since, 0, Ordering::AcqRel, Ordering::Relaxed);
            return 1.0;
        }
        ramping as f64 / self.ramp as f64
    }

    /// The owner of `key` among the backends `usable` allows: its pinned backend when it has
    /// one that is usable and back past `failback_after`, else the first backend of its ring
    /// walk that is usable and has taken `key` back (see [`UpstreamState::share_in_force`]);
    /// when every usable backend is still returning, the first usable one.
    pub(crate) fn owner(&self, key: &str, usable: impl Fn(usize) -> bool) -> Option<Owner> {
        self.owner_at(key, usable, clock)
    }

    /// [`UpstreamState::owner`] with the time read from `now` (tests choose it).
    fn owner_at(
        &self,
        key: &str,
        usable: impl Fn(usize) -> bool,
        read_clock: impl Fn() -> u64,
    ) -> Option<Owner> {
        // The clock and the key's ramp point only when a returning backend is met.
        let now = OnceCell::new();
        let now = || *now.get_or_init(&read_clock);
        let point = OnceCell::new();
        // `pin`: a pinned backend takes its document at any share above 0.
        let takes = |i: usize, pin: bool| {
            let backend = &self.backends[i];
            if backend.returned_at().is_none() {
                return true;
            }
            let share = self.share(backend, now());
            share >= 1.0 || (pin && share > 0.0) || *point.get_or_init(|| ramp_point(key)) < share
        };
        if let Some(address) = self.pins.get(key) {
            let pinned = self.backend_index(address);
            // A pin takes its document back as soon as `failback_after` has passed.
            let back = |i: usize| usable(i) && takes(i, true);
            if let Some(backend) = pinned.filter(|&i| back(i)) {
                return Some(Owner {
                    backend,
                    chosen: Chosen::Pin,
                });
            }
        }
        let owns = |i: usize| usable(i) && takes(i, false);
        let n = self.backends.len();
        let Some(bounded) = &self.bounded else {
            return self
                .ring
                .owner(key.as_bytes(), n, owns)
                .or_else(|| self.ring.owner(key.as_bytes(), n, &usable))
                .map(|backend| Owner {
                    backend,
                    chosen: Chosen::Ring,
                });
        };
        // Bounded load: the document's placement while its backend is usable; otherwise a
        // new one, made under the shard's lock so two requests cannot place it twice.
        let mut shard = self.placements.shard(key);
        if let Some(placed) = shard.get_mut(key) {
            let at = self.backend_index(placed.backend);
            if let Some(backend) = at.filter(|&i| usable(i)) {
                placed.seen = now();
                // Until the fleet agreed, every request of the document asks it again (the
                // answer is the same for all), so none goes ahead of the agreement.
                return Some(Owner {
                    backend,
                    chosen: placed.chosen(),
                });
            }
        }
        let (mut total, mut count) = (0usize, 0usize);
        for (i, b) in self.backends.iter().enumerate() {
            if usable(i) {
                total += b.streams.load(Ordering::Relaxed);
                count += 1;
            }
        }
        // ⌈factor × mean⌉, the mean counting the stream about to open.
        let bound = (bounded.factor * (total + 1) as f64 / count.max(1) as f64).ceil() as usize;
        let light = |i: usize| owns(i) && self.backends[i].streams.load(Ordering::Relaxed) < bound;
        let backend = self
            .ring
            .owner(key.as_bytes(), n, light)
            .or_else(|| self.ring.owner(key.as_bytes(), n, owns))
            .or_else(|| self.ring.owner(key.as_bytes(), n, &usable))?;
        let placed = Placed {
            backend: self.backends[backend].address,
            seen: now(),
            agreed: !self.shared,
        };
        shard.insert(key.into(), placed);
        Some(Owner {
            backend,
            chosen: placed.chosen(),
        })
    }

    /// Renews the placements of documents with open streams (`keys`) and forgets those idle
    /// for longer than `bounded_load.linger`, returning their keys. Nothing to do without
    /// `bounded_load`.
    pub fn hold_placements<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Vec<Box<str>> {
        let Some(bounded) = &self.bounded else {
            return Vec::new();
        };
        let now = clock();
        for key in keys {
            self.placements.hold(key, now);
        }
        self.placements.expire(now, bounded.linger)
    }

    /// Whether this upstream places new documents by load (`bounded_load`), so its placements
    /// must be held while their documents have open streams.
    pub fn places_by_load(&self) -> bool {
        self.bounded.is_some()
    }

    /// Whether this upstream's placements are agreed with a fleet (etcd discovery and
    /// `bounded_load`): a new placement is then only a proposal until the fleet confirms it.
    pub fn shares_placements(&self) -> bool {
        self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_config::{Backend, Rebalance, Upstream};

    const KEYS: usize = 4000;

    fn config(backends: usize, failback_after: u64, ramp: u64) -> Upstream {
        Upstream {
            name: "docs".into(),
            backends: (0..backends)
                .map(|i| Backend {
                    address: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                    weight: 1,
                })
                .collect(),
            discovery: None,
            balance: crate::Balance::Ketama,
            connect_timeout: Duration::from_secs(1),
            health_check: None,
            passive: None,
            rebalance: Rebalance {
                failback_after: Duration::from_secs(failback_after),
                ramp: Duration::from_secs(ramp),
                ..Rebalance::default()
            },
            bounded_load: None,
        }
    }

    fn upstream(backends: usize, failback_after: u64, ramp: u64) -> UpstreamState {
        UpstreamState::new(
            &config(backends, failback_after, ramp),
            None,
            Arc::default(),
        )
    }

    fn owners(upstream: &UpstreamState) -> Vec<usize> {
        owners_at(upstream, clock())
    }

    fn owners_at(upstream: &UpstreamState, now: u64) -> Vec<usize> {
        let available = |i: usize| upstream.backends[i].is_available();
        (0..KEYS)
            .map(|k| {
                let key = format!("doc-{k}");
                upstream.owner_at(&key, available, || now).unwrap().backend
            })
            .collect()
    }

    #[test]
    fn a_returning_backend_takes_no_key_within_failback_after_then_a_growing_share_by_key_hash() {
        let up = upstream(4, 30, 60);
        let all_in = owners(&up);
        let mine: Vec<usize> = (0..KEYS).filter(|&k| all_in[k] == 0).collect();
        up.backends[0].up.store(false, Ordering::Release);
        let while_down = owners(&up);
        up.backends[0].up.store(true, Ordering::Release);

        // Back just now, failback_after 30 s: its keys stay where they went.
        up.backends[0].mark_returned();
        assert_eq!(owners(&up), while_down);
        assert_eq!(up.share_in_force(0), 0.0);

        // Half-way through the ramp: about half of its keys are back, exactly those with the
        // lowest ramp points (the same on every instance), and no other key moved.
        let since = up.backends[0].returned_at().expect("returning");
        let half = since + 30_000 + 30_000;
        assert!((up.share(&up.backends[0], half) - 0.5).abs() < 1e-9);
        let now = owners_at(&up, half);
        for k in 0..KEYS {
            let back = all_in[k] == 0 && ramp_point(&format!("doc-{k}")) < 0.5;
            let expected = if back { 0 } else { while_down[k] };
            assert_eq!(now[k], expected, "doc-{k}");
        }
        let back = mine.iter().filter(|&&k| now[k] == 0).count();
        assert!(
            back * 10 > mine.len() * 3 && back * 10 < mine.len() * 7,
            "{back} of {}",
            mine.len()
        );
        // Later in the ramp, more; a key once back stays back.
        let later = owners_at(&up, half + 20_000);
        let more = mine.iter().filter(|&&k| later[k] == 0).count();
        assert!(more > back, "{more} after {back}");
        assert!(mine.iter().all(|&k| now[k] != 0 || later[k] == 0));
        // After the ramp it owns them all again, and the mark is cleared.
        assert_eq!(owners_at(&up, since + 90_001), all_in);
        assert_eq!(up.backends[0].returned_at(), None);
        assert_eq!(owners(&up), all_in);
    }

    #[test]
    fn without_failback_or_ramp_a_returning_backend_takes_its_keys_at_once() {
        let up = upstream(3, 0, 0);
        let all_in = owners(&up);
        up.backends[1].mark_returned();
        assert_eq!(owners(&up), all_in);
        assert_eq!(
            up.backends[1].returned_at(),
            None,
            "cleared at the first lookup"
        );
    }

    #[test]
    fn when_every_backend_is_returning_keys_keep_their_ring_owner() {
        let up = upstream(3, 30, 0);
        let all_in = owners(&up);
        for b in &up.backends {
            b.mark_returned();
        }
        assert_eq!(owners(&up), all_in);
    }

    #[test]
    fn a_new_member_of_a_serving_upstream_returns_but_the_first_members_do_not() {
        let first = upstream(2, 30, 0);
        assert!(first.backends.iter().all(|b| b.returned_at().is_none()));
        let grown = UpstreamState::new(&config(3, 30, 0), Some(&first), Arc::default());
        assert!(grown.backends[..2]
            .iter()
            .all(|b| b.returned_at().is_none()));
        assert!(grown.backends[2].returned_at().is_some());
        // Within failback_after it owns nothing: every key stays with the first two.
        assert_eq!(owners(&grown), owners(&first));
    }

    #[test]
    fn ramp_points_of_similar_keys_spread_evenly() {
        // 120 keys that differ only in their last characters: every tenth of [0, 1) holds
        // some, none holds more than twice its share.
        let mut tenths = [0usize; 10];
        for k in 0..120 {
            tenths[(ramp_point(&format!("doc-{k}")) * 10.0) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| (1..=24).contains(&n)), "{tenths:?}");
    }

    #[test]
    fn a_fleet_placement_stays_a_proposal_for_every_lookup_until_it_is_agreed() {
        let mut shared = config(3, 0, 0);
        shared.bounded_load = Some(tether_config::BoundedLoad::default());
        shared.discovery = Some(tether_config::Discovery::Etcd(
            tether_config::EtcdDiscovery {
                endpoints: vec!["127.0.0.1:2379".into()],
                prefix: "/p/".into(),
            },
        ));
        let up = UpstreamState::new(&shared, None, Arc::default());
        let all = |_: usize| true;
        let first = up.owner("doc", all).expect("owner");
        assert_eq!(first.chosen, Chosen::NewPlacement);
        // A second request before the agreement must wait for it too.
        assert_eq!(
            up.owner("doc", all).expect("owner").chosen,
            Chosen::NewPlacement
        );
        let address = up.backends[first.backend].address;
        up.placements.adopt("doc", address, clock());
        assert_eq!(
            up.owner("doc", all),
            Some(Owner {
                backend: first.backend,
                chosen: Chosen::Placement
            })
        );
    }
}
