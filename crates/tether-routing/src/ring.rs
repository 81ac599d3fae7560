//! The ketama ring: nginx's `hash $key consistent`, plus a clockwise walk past unusable backends.
//!
//! Points come from [`pingora_ketama::Continuum`] (160 points per weight unit, CRC32 of
//! `ip\0port`, the key hashed with CRC32), so a key's first point is the server nginx picks. When
//! that backend is down (or excluded by a retry), the walk continues clockwise to the next point
//! whose backend is usable, as nginx does for its first 20 tries; unlike nginx it never falls back
//! to round robin, so the successor is a pure function of the key and the usable set. Marking one
//! backend down therefore moves only that backend's keys.
//!
//! nginx hashes a server as written in its config, so the comparison holds when nginx lists the
//! same `ip:port` literals with the same weights. For IPv6, nginx hashes the bracketed `[::1]`
//! while the port hashes `::1`, so IPv6 backends land elsewhere than behind nginx.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum, DEFAULT_POINT_MULTIPLE};
use tether_config::defaults::MAX_WEIGHT;

use crate::upstream::BackendState;

/// A ketama continuum over an upstream's backends, with addresses mapped back to indices.
pub(crate) struct Ring {
    continuum: Continuum,
    /// `(address, backend index)` sorted by address, to map ring points back to backends.
    index: Box<[(SocketAddr, usize)]>,
    /// The fast way back from a ring point to its backend. `Continuum` hands out references
    /// into its own (private, immutable, heap-allocated) address table; a reference's offset
    /// from the lowest one seen indexes this table. Built once from every point, so a lookup
    /// is a subtraction instead of a binary search with `SocketAddr` comparisons (which was
    /// about a quarter of `decide` at 1,000 backends). `NOT_SEEN` falls back to `index`.
    by_slot: Box<[u32]>,
    /// Address of the lowest `SocketAddr` reference the continuum returned.
    slot_base: usize,
    /// Upper bound on the number of points (the walk never needs more steps than this).
    points: usize,
}

const NOT_SEEN: u32 = u32::MAX;

impl Ring {
    /// Builds the ring for `backends` in config order.
    pub(crate) fn new(backends: &[Arc<BackendState>]) -> Ring {
        let buckets: Vec<Bucket> = backends
            .iter()
            .map(|b| Bucket::new(b.address, ring_weight(b)))
            .collect();
        let mut index: Vec<(SocketAddr, usize)> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.address, i))
            .collect();
        index.sort_unstable();
        let points = backends
            .iter()
            .map(|b| ring_weight(b) as usize * DEFAULT_POINT_MULTIPLE as usize)
            .sum();
        let mut ring = Ring {
            continuum: Continuum::new(&buckets),
            index: index.into_boxed_slice(),
            by_slot: Box::new([]),
            slot_base: 0,
            points,
        };
        ring.build_slots();
        ring
    }

    /// Fills `by_slot` from every point of the continuum (see the field's comment).
    fn build_slots(&mut self) {
        // (reference address, backend) of every point; `get_addr` advances `at` and wraps
        // around to 0 after the last point, so one lap visits each point once.
        let mut seen: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        for _ in 0..self.points {
            let Some(address) = self.continuum.get_addr(&mut at) else {
                break;
            };
            if let Some(backend) = self.backend_by_search(address) {
                seen.push((address as *const SocketAddr as usize, backend));
            }
            if at == 0 {
                break;
            }
        }
        let Some(base) = seen.iter().map(|&(p, _)| p).min() else {
            return;
        };
        let size = std::mem::size_of::<SocketAddr>();
        let slots = seen
            .iter()
            .map(|&(p, _)| (p - base) / size)
            .max()
            .unwrap_or(0)
            + 1;
        let mut by_slot = vec![NOT_SEEN; slots];
        for (p, backend) in seen {
            by_slot[(p - base) / size] = backend as u32;
        }
        self.by_slot = by_slot.into_boxed_slice();
        self.slot_base = base;
    }

    /// The index of the backend of `address`, a reference the continuum returned.
    fn backend_of(&self, address: &SocketAddr) -> Option<usize> {
        let offset = (address as *const SocketAddr as usize).wrapping_sub(self.slot_base);
        match self.by_slot.get(offset / std::mem::size_of::<SocketAddr>()) {
            Some(&backend) if backend != NOT_SEEN => Some(backend as usize),
            _ => self.backend_by_search(address),
        }
    }

    /// The index of the backend with `address`, by value.
    fn backend_by_search(&self, address: &SocketAddr) -> Option<usize> {
        self.index
            .binary_search_by(|(a, _)| a.cmp(address))
            .ok()
            .map(|at| self.index[at].1)
    }

    /// The first backend clockwise from the point of `key` for which `usable` holds; None if no
    /// backend of `0..backends` is usable.
    ///
    /// Cost: one binary search when the first owner is usable (the common case); otherwise a
    /// scan of `usable` over all backends, then a walk that ends at the first usable point.
    pub(crate) fn owner(
        &self,
        key: &[u8],
        backends: usize,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut points = self.continuum.node_iter(key);
        let first = self.backend_of(points.next()?)?;
        if usable(first) {
            return Some(first);
        }
        // Checked up front so an all-down upstream costs O(backends), not a walk of the ring.
        if !(0..backends).any(&usable) {
            return None;
        }
        points
            .take(self.points)
            .filter_map(|address| self.backend_of(address))
            .find(|&backend| usable(backend))
    }
}

/// The weight on the ring, kept in the validated range (1..=1000) so that an unvalidated
/// `Config` cannot make the continuum panic (weight 0) or overflow its point count.
fn ring_weight(backend: &BackendState) -> u32 {
    backend.weight.clamp(1, MAX_WEIGHT)
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("backends", &self.index.len())
            .field("points", &self.points)
            .finish()
    }
}
