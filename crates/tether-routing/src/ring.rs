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

/// Bits of a key's hash that pick its slice of the ring in [`Ring::starts`].
const INDEX_BITS: u32 = 16;

/// A ketama ring over an upstream's backends: the points of nginx's continuum, laid out for a
/// lookup that touches a few cache lines instead of binary-searching the whole ring.
///
/// Why not [`Continuum`] itself: at 1,000 backends its 160,000 points make a lookup a
/// 17-step binary search of dependent cache misses (about a third of `Router::decide`). The
/// continuum is still built, once, to take nginx's points and its choice among colliding
/// points from it; the lookup then runs on these arrays.
pub(crate) struct Ring {
    /// Point hashes, ascending, without duplicates.
    hashes: Box<[u32]>,
    /// The backend index of each point.
    owners: Box<[u32]>,
    /// `starts[b]` is the first point whose hash's top [`INDEX_BITS`] bits are `>= b`
    /// (`2^INDEX_BITS + 1` entries), so a key's point is searched among a few points only.
    starts: Box<[u32]>,
    /// CRC32 state ready to hash a key (its CPU feature detection done once, not per key).
    hasher: crc32fast::Hasher,
}

impl Ring {
    /// Builds the ring for `backends` in config order.
    pub(crate) fn new(backends: &[Arc<BackendState>]) -> Ring {
        let buckets: Vec<Bucket> = backends
            .iter()
            .map(|b| Bucket::new(b.address, ring_weight(b)))
            .collect();
        let continuum = Continuum::new(&buckets);
        let mut index: Vec<(SocketAddr, usize)> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.address, i))
            .collect();
        index.sort_unstable();
        let backend_of = |address: &SocketAddr| {
            index
                .binary_search_by(|(a, _)| a.cmp(address))
                .ok()
                .map(|at| index[at].1 as u32)
        };
        // The continuum's points in ring order: its owners, including its pick where points
        // of two backends collide. `get_addr` wraps around to 0 after the last point.
        let mut owners = Vec::new();
        let mut at = 0;
        while let Some(address) = continuum.get_addr(&mut at) {
            owners.push(backend_of(address).unwrap_or(0));
            if at == 0 {
                break;
            }
        }
        let hashes = point_hashes(backends);
        // Both come from the same points, so they line up; were that ever not so, the ring
        // would be rebuilt from our own points (owner: the lowest backend index at a collision).
        let (hashes, owners) = if hashes.len() == owners.len() {
            (hashes.into_iter().map(|(h, _)| h).collect(), owners)
        } else {
            hashes.into_iter().unzip()
        };
        Ring::from_points(hashes, owners)
    }

    fn from_points(hashes: Vec<u32>, owners: Vec<u32>) -> Ring {
        let buckets = 1usize << INDEX_BITS;
        let mut starts = Vec::with_capacity(buckets + 1);
        let mut at = 0usize;
        for bucket in 0..=buckets {
            while at < hashes.len() && ((hashes[at] >> (32 - INDEX_BITS)) as usize) < bucket {
                at += 1;
            }
            starts.push(at as u32);
        }
        Ring {
            hashes: hashes.into_boxed_slice(),
            owners: owners.into_boxed_slice(),
            starts: starts.into_boxed_slice(),
            hasher: crc32fast::Hasher::new(),
        }
    }

    /// The index of the point that owns `key`: the first at or after the key's hash, wrapping
    /// around. None for an empty ring.
    fn point_of(&self, key: &[u8]) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let mut hasher = self.hasher.clone();
        hasher.update(key);
        let hash = hasher.finalize();
        let bucket = (hash >> (32 - INDEX_BITS)) as usize;
        let (from, to) = (
            self.starts[bucket] as usize,
            self.starts[bucket + 1] as usize,
        );
        let at = from + self.hashes[from..to].partition_point(|&h| h < hash);
        Some(if at == self.hashes.len() { 0 } else { at })
    }

    /// The first backend clockwise from the point of `key` for which `usable` holds; None if no
    /// backend of `0..backends` is usable.
    ///
    /// Cost: a hash and a search among the few points of one slice when the first owner is
    /// usable (the common case); otherwise a scan of `usable` over all backends, then a walk
    /// that ends at the first usable point.
    pub(crate) fn owner(
        &self,
        key: &[u8],
        backends: usize,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let start = self.point_of(key)?;
        let first = self.owners[start] as usize;
        if usable(first) {
            return Some(first);
        }
        // Checked up front so an all-down upstream costs O(backends), not a walk of the ring.
        if !(0..backends).any(&usable) {
            return None;
        }
        let (wrapped, from_start) = self.owners.split_at(start);
        from_start
            .iter()
            .chain(wrapped)
            .map(|&owner| owner as usize)
            .find(|&backend| usable(backend))
    }
}

/// Every point of nginx's ring over `backends` as `(hash, backend index)`, sorted by hash and
/// then index, one per hash (the lowest index where points collide): `weight × 160` points
/// per backend, each the CRC32 of `ip\0port` followed by the previous point's hash.
fn point_hashes(backends: &[Arc<BackendState>]) -> Vec<(u32, u32)> {
    let mut points = Vec::new();
    for (i, backend) in backends.iter().enumerate() {
        let mut base = crc32fast::Hasher::new();
        base.update(backend.address.ip().to_string().as_bytes());
        base.update(b"\0");
        base.update(backend.address.port().to_string().as_bytes());
        let mut prev: u32 = 0;
        for _ in 0..ring_weight(backend) * DEFAULT_POINT_MULTIPLE {
            let mut h = base.clone();
            h.update(&prev.to_le_bytes());
            let hash = h.finalize();
            points.push((hash, i as u32));
            prev = hash;
        }
    }
    points.sort_unstable();
    points.dedup_by_key(|p| p.0);
    points
}

/// The weight on the ring, kept in the validated range (1..=1000) so that an unvalidated
/// `Config` cannot make the continuum panic (weight 0) or overflow its point count.
fn ring_weight(backend: &BackendState) -> u32 {
    backend.weight.clamp(1, MAX_WEIGHT)
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("points", &self.hashes.len())
            .finish()
    }
}
