//! Spreading requests that carry no sticky key: weighted round robin, least connections, random.
//!
//! Keyed requests never come here: they always go to the key's owner on the ketama ring, whatever
//! the upstream's `balance` says. `balance: ketama` without a key means round robin.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::upstream::{BackendState, UpstreamState};
use crate::Balance;

/// Largest `total weight x backends` for which the smooth schedule is precomputed.
const SCHEDULE_BUDGET: u64 = 1 << 22;

/// Weighted round robin: a lock-free counter over a fixed schedule of backend indices.
pub(crate) struct RoundRobin {
    counter: AtomicUsize,
    order: Order,
}

enum Order {
    /// nginx's smooth weighted round robin, precomputed for one period (weights divided by
    /// their gcd), e.g. weights 1,2,3 give `2 1 0 2 1 2`.
    Schedule(Box<[u32]>),
    /// For huge weight sums: slot `(n * stride) % total` of the cumulative weights, with `stride`
    /// coprime to `total` so each period still visits every slot once, spread out.
    Stride {
        cumulative: Box<[u64]>,
        total: u64,
        stride: u64,
    },
}

impl RoundRobin {
    pub(crate) fn new(backends: &[Arc<BackendState>]) -> RoundRobin {
        let weights: Vec<u64> = backends
            .iter()
            .map(|b| u64::from(b.weight.max(1)))
            .collect();
        let divisor = weights.iter().copied().fold(0, gcd).max(1);
        let weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
        let total: u64 = weights.iter().sum();
        let order = if total.saturating_mul(weights.len() as u64) <= SCHEDULE_BUDGET {
            Order::Schedule(smooth_schedule(&weights, total))
        } else {
            let cumulative = weights
                .iter()
                .scan(0, |sum, w| {
                    *sum += w;
                    Some(*sum)
                })
                .collect();
            let mut stride = (total as f64 * 0.618_033_988_7) as u64;
            while gcd(stride, total) != 1 {
                stride += 1;
            }
            Order::Stride {
                cumulative,
                total,
                stride,
            }
        };
        RoundRobin {
            counter: AtomicUsize::new(0),
            order,
        }
    }

    /// The next backend in weighted order, moving on to the next usable one in index order.
    pub(crate) fn pick(&self, backends: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if backends == 0 {
            return None;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let start = match &self.order {
            Order::Schedule(schedule) => schedule
                .get(n % schedule.len().max(1))
                .map_or(0, |&i| i as usize),
            Order::Stride {
                cumulative,
                total,
                stride,
            } => {
                let slot = (n as u64 % total) * stride % total;
                cumulative.partition_point(|&end| end <= slot)
            }
        };
        (0..backends)
            .map(|offset| (start + offset) % backends)
            .find(|&i| usable(i))
    }
}

/// One period of nginx's smooth weighted round robin.
fn smooth_schedule(weights: &[u64], total: u64) -> Box<[u32]> {
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .filter_map(|_| {
            for (c, w) in current.iter_mut().zip(weights) {
                *c += *w as i64;
            }
            // Highest current weight, lowest index on ties.
            let best = (0..current.len()).rev().max_by_key(|&i| current[i])?;
            current[best] -= total as i64;
            Some(best as u32)
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundRobin")
            .field("counter", &self.counter.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The usable backend with the fewest `active / weight`; ties go to the lowest index.
pub(crate) fn least_connections(
    backends: &[Arc<BackendState>],
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, u128, u128)> = None;
    for (i, backend) in backends.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        let active = backend.active.load(Ordering::Relaxed) as u128;
        let weight = u128::from(backend.weight.max(1));
        // active/weight < best_active/best_weight, without division.
        if best
            .is_none_or(|(_, best_active, best_weight)| active * best_weight < best_active * weight)
        {
            best = Some((i, active, weight));
        }
    }
    best.map(|(i, _, _)| i)
}

/// A usable backend at random, with probability about proportional to its weight (a random point
/// on the ring, walked past unusable backends).
pub(crate) fn random(upstream: &UpstreamState, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let point = fastrand::u32(..).to_le_bytes();
    upstream.ring.owner(&point, upstream.backends.len(), usable)
}

/// A backend for a request without a key, by the upstream's balance.
pub(crate) fn keyless(upstream: &UpstreamState, usable: impl Fn(usize) -> bool) -> Option<usize> {
    match upstream.balance {
        Balance::Ketama | Balance::RoundRobin => {
            upstream.round_robin.pick(upstream.backends.len(), usable)
        }
        Balance::LeastConnections => least_connections(&upstream.backends, usable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn states(weights: &[u32]) -> Vec<Arc<BackendState>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                Arc::new(BackendState::new(
                    SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                    weight,
                ))
            })
            .collect()
    }

    fn counts(
        rr: &RoundRobin,
        backends: usize,
        picks: usize,
        usable: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for _ in 0..picks {
            counts[rr.pick(backends, &usable).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_each_period() {
        let backends = states(&[1, 2, 3]);
        let rr = RoundRobin::new(&backends);
        assert_eq!(counts(&rr, 3, 600, |_| true), vec![100, 200, 300]);
    }

    #[test]
    fn round_robin_interleaves_rather_than_bursting() {
        let backends = states(&[1, 1, 1]);
        let rr = RoundRobin::new(&backends);
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(3, |_| true).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_with_huge_weights_still_follows_weights() {
        // Sum x count far over the schedule budget: the stride order is used.
        let weights: Vec<u32> = (0..100).map(|i| 100_000 + i).collect();
        let backends = states(&weights);
        let rr = RoundRobin::new(&backends);
        assert!(matches!(rr.order, Order::Stride { .. }));
        let c = counts(&rr, 100, 100_000, |_| true);
        assert!(c.iter().all(|&n| (900..=1100).contains(&n)), "{c:?}");
    }

    #[test]
    fn round_robin_skips_unusable_backends() {
        let backends = states(&[1, 1, 1]);
        let rr = RoundRobin::new(&backends);
        let c = counts(&rr, 3, 300, |i| i != 1);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], 300);
        assert_eq!(rr.pick(3, |_| false), None);
    }

    #[test]
    fn least_connections_prefers_fewest_active_per_weight() {
        let backends = states(&[1, 2, 1]);
        backends[0].active.store(3, Ordering::Relaxed);
        backends[1].active.store(4, Ordering::Relaxed); // 2 per weight unit
        backends[2].active.store(5, Ordering::Relaxed);
        assert_eq!(least_connections(&backends, |_| true), Some(1));
        assert_eq!(least_connections(&backends, |i| i != 1), Some(0));
        assert_eq!(least_connections(&backends, |_| false), None);
    }

    #[test]
    fn least_connections_ties_go_to_the_lowest_index() {
        let backends = states(&[1, 1, 1]);
        backends[0].active.store(2, Ordering::Relaxed);
        assert_eq!(least_connections(&backends, |_| true), Some(1));
    }
}
