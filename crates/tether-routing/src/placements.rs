//! Placements: where an upstream with `bounded_load` put each document it has seen lately.
//!
//! Consistent hashing with bounded loads as HAProxy (`hash-balance-factor`) and Envoy
//! (`hash_balance_factor`) do it spills a busy document's *requests* onto the next server and
//! splits the document. Tether bounds *placements* instead: a document without a placement
//! goes to the first backend of its ring walk whose open streams are below ⌈factor × mean⌉,
//! and the placement then holds while the document has open streams (the proxy's convergence
//! pass renews it) and for `linger` after, so every request and stream of the document goes
//! to one backend. A placement on a backend that is no longer usable is made again.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Mutex;

use crate::Chosen;

/// Shards of the table, so requests of different documents rarely wait for each other.
const SHARDS: usize = 32;

/// One document's placement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placed {
    /// The backend it was placed on.
    pub(crate) backend: SocketAddr,
    /// When it was last used or held ([`crate::upstream::clock`] milliseconds).
    pub(crate) seen: u64,
    /// False while a fleet has yet to agree to it (see `UpstreamState::shares_placements`).
    pub(crate) agreed: bool,
}

impl Placed {
    /// What a lookup reports: a placement, or one the fleet has yet to agree to.
    pub(crate) fn chosen(&self) -> Chosen {
        if self.agreed {
            Chosen::Placement
        } else {
            Chosen::NewPlacement
        }
    }
}

/// The placements of one upstream, by document key; kept across reloads.
#[derive(Debug)]
pub struct Placements {
    shards: [Mutex<HashMap<Box<str>, Placed>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Placements {
    fn default() -> Self {
        Placements {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl Placements {
    /// The shard holding `key`, locked.
    pub(crate) fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Placed>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews the placement of `key` (it has open streams) at `now`.
    pub fn hold(&self, key: &str, now: u64) {
        if let Some(placed) = self.shard(key).get_mut(key) {
            placed.seen = now;
        }
    }

    /// Forgets placements not used or held for longer than `linger_ms` before `now`; returns
    /// their keys.
    pub fn expire(&self, now: u64, linger_ms: u64) -> Vec<Box<str>> {
        let mut gone = Vec::new();
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|key, placed| {
                    let keep = now.saturating_sub(placed.seen) <= linger_ms;
                    if !keep {
                        gone.push(key.clone());
                    }
                    keep
                });
        }
        gone
    }

    /// Takes the placement a fleet agreed on for `key` (it replaces this instance's own, if
    /// another); returns whether the document's backend changed.
    pub fn adopt(&self, key: &str, backend: SocketAddr, now: u64) -> bool {
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some(placed) if placed.backend == backend => {
                placed.seen = now;
                placed.agreed = true;
                false
            }
            Some(placed) => {
                *placed = Placed {
                    backend,
                    seen: now,
                    agreed: true,
                };
                true
            }
            None => {
                let placed = Placed {
                    backend,
                    seen: now,
                    agreed: true,
                };
                shard.insert(key.into(), placed);
                true
            }
        }
    }

    /// Forgets the placement of `key`.
    pub fn remove(&self, key: &str) {
        self.shard(key).remove(key);
    }

    /// The backend `key` is placed on, if it has a placement.
    pub fn get(&self, key: &str) -> Option<SocketAddr> {
        self.shard(key).get(key).map(|p| p.backend)
    }

    /// How many documents have a placement.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True when no document has a placement.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_placements_stay_and_idle_ones_expire_after_linger() {
        let placements = Placements::default();
        let backend: SocketAddr = "10.0.0.1:80".parse().unwrap();
        for key in ["held", "idle"] {
            placements.shard(key).insert(
                key.into(),
                Placed {
                    backend,
                    seen: 1_000,
                    agreed: true,
                },
            );
        }
        placements.hold("held", 20_000);
        placements.expire(25_000, 10_000);
        assert_eq!(placements.get("held"), Some(backend));
        assert_eq!(placements.get("idle"), None);
        assert_eq!(placements.len(), 1);
    }
}
