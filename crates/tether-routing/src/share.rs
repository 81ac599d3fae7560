//! The exact share of the key space whose owner differs between two backend sets, computed
//! from the rings themselves rather than by sampling keys (`tether check --against`).
//!
//! A key hashes (CRC32) to a point on a ring of 2^32 positions and belongs to the first ring
//! point at or after it (wrapping around). So ownership is constant between consecutive points
//! of the *union* of both rings, and the moved share is the total length of the arcs whose owner
//! differs, divided by 2^32. The points are generated exactly as `pingora_ketama` (nginx) does:
//! `weight × 160` points per backend, each the CRC32 of `ip\0port` followed by the previous
//! point's hash. Where two backends' points collide on the same hash, `pingora_ketama` keeps one
//! of them in unspecified order; this module keeps the lowest address, so for such (rare) arcs
//! the figure may differ from the live ring by that arc's length.

use std::net::SocketAddr;

use pingora_ketama::DEFAULT_POINT_MULTIPLE;
use tether_config::Backend;

/// Sorted `(point hash, owner address)` of a ketama ring over `backends`.
fn ring_points(backends: &[Backend]) -> Vec<(u32, SocketAddr)> {
    let mut points = Vec::new();
    for backend in backends {
        let mut base = crc32fast::Hasher::new();
        base.update(backend.address.ip().to_string().as_bytes());
        base.update(b"\0");
        base.update(backend.address.port().to_string().as_bytes());
        let mut prev: u32 = 0;
        for _ in 0..backend.weight.max(1) * DEFAULT_POINT_MULTIPLE {
            let mut h = base.clone();
            h.update(&prev.to_le_bytes());
            let hash = h.finalize();
            points.push((hash, backend.address));
            prev = hash;
        }
    }
    points.sort_unstable();
    points.dedup_by_key(|p| p.0);
    points
}

/// Owner of ring position `hash`: the first point at or after it, wrapping around.
fn owner_at(points: &[(u32, SocketAddr)], hash: u32) -> Option<SocketAddr> {
    let i = points.partition_point(|p| p.0 < hash);
    points.get(i).or(points.first()).map(|p| p.1)
}

/// Fraction (0.0..=1.0) of all keys whose owner differs between a ring over `old` and a ring
/// over `new` (all backends available). 1.0 when either set is empty and the other is not.
pub fn moved_share(old: &[Backend], new: &[Backend]) -> f64 {
    let (a, b) = (ring_points(old), ring_points(new));
    if a.is_empty() || b.is_empty() {
        return if a.is_empty() && b.is_empty() {
            0.0
        } else {
            1.0
        };
    }
    // Breakpoints of the union; arc (prev, cut] has one owner in each ring.
    let mut cuts: Vec<u32> = a.iter().chain(&b).map(|p| p.0).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut moved: u64 = 0;
    let last = cuts[cuts.len() - 1];
    for (i, &cut) in cuts.iter().enumerate() {
        // The arc ending at `cut` starts after the previous cut (for the first: after the last
        // cut, wrapping around through 2^32).
        let len = if i == 0 {
            u64::from(cut) + (1u64 << 32) - u64::from(last)
        } else {
            u64::from(cut - cuts[i - 1])
        };
        if owner_at(&a, cut) != owner_at(&b, cut) {
            moved += len;
        }
    }
    moved as f64 / (1u64 << 32) as f64
}

/// Each backend's share (0.0..=1.0) of the key space on a ring over `backends` with all of them
/// available, in `backends` order.
pub fn ring_shares(backends: &[Backend]) -> Vec<f64> {
    let points = ring_points(backends);
    let mut owned = vec![0u64; backends.len()];
    let Some(&(last, _)) = points.last() else {
        return vec![0.0; backends.len()];
    };
    for (i, &(hash, address)) in points.iter().enumerate() {
        let len = if i == 0 {
            u64::from(hash) + (1u64 << 32) - u64::from(last)
        } else {
            u64::from(hash - points[i - 1].0)
        };
        if let Some(j) = backends.iter().position(|b| b.address == address) {
            owned[j] += len;
        }
    }
    owned
        .into_iter()
        .map(|o| o as f64 / (1u64 << 32) as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_ketama::{Bucket, Continuum};

    fn backends(n: u8, weight: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                address: SocketAddr::from(([10, 0, 0, i + 1], 8080)),
                weight,
            })
            .collect()
    }

    #[test]
    fn the_reconstructed_ring_agrees_with_pingora_ketama_for_every_key() {
        let set = backends(7, 2);
        let points = ring_points(&set);
        let buckets: Vec<Bucket> = set
            .iter()
            .map(|b| Bucket::new(b.address, b.weight))
            .collect();
        let continuum = Continuum::new(&buckets);
        for i in 0..20_000 {
            let key = format!("doc-{i}");
            let hash = crc32fast::hash(key.as_bytes());
            assert_eq!(
                owner_at(&points, hash),
                continuum.node(key.as_bytes()),
                "{key}"
            );
        }
    }

    #[test]
    fn the_share_matches_what_sampled_keys_show() {
        let old = backends(4, 1);
        let mut new = old.clone();
        new.push(Backend {
            address: SocketAddr::from(([10, 0, 0, 99], 8080)),
            weight: 1,
        });
        let exact = moved_share(&old, &new);
        let (a, b) = (ring_points(&old), ring_points(&new));
        let n = 200_000;
        let moved = (0..n)
            .filter(|i| {
                let h = crc32fast::hash(format!("k{i}").as_bytes());
                owner_at(&a, h) != owner_at(&b, h)
            })
            .count();
        let sampled = moved as f64 / n as f64;
        assert!(
            (exact - sampled).abs() < 0.005,
            "exact {exact} sampled {sampled}"
        );
        assert!(exact > 0.1 && exact < 0.3, "about 1/5 expected: {exact}");
    }

    #[test]
    fn shares_add_up_to_one_and_follow_weights() {
        let mut set = backends(3, 1);
        set[2].weight = 2;
        let shares = ring_shares(&set);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(shares[2] > shares[0] && shares[2] > shares[1], "{shares:?}");
    }

    #[test]
    fn identical_sets_move_nothing_and_disjoint_sets_move_everything() {
        let set = backends(5, 1);
        assert_eq!(moved_share(&set, &set), 0.0);
        let mut reordered = set.clone();
        reordered.reverse();
        assert_eq!(moved_share(&set, &reordered), 0.0, "order does not matter");
        let other: Vec<Backend> = set
            .iter()
            .map(|b| Backend {
                address: SocketAddr::new(b.address.ip(), 9090),
                weight: 1,
            })
            .collect();
        assert!((moved_share(&set, &other) - 1.0).abs() < 1e-9);
    }
}
