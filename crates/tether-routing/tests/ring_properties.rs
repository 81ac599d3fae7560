//! Properties of the ketama ring through `Router::owner`: stable, minimal movement on membership
//! and health changes, even spread, weights honoured, nginx's ring for the successor.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use common::{backend, backends, ring_config};
use http::{HeaderMap, HeaderValue};
use pingora_ketama::{Bucket, Continuum};
use proptest::prelude::*;
use tether_config::Backend;
use tether_routing::{Reject, RequestView, Router};

fn router(backends: &[Backend]) -> Router {
    Router::new(&ring_config(backends.to_vec()))
}

/// Random document-id-like keys (CRC32 of sequential strings would be too regular).
fn keys(seed: u64, count: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| format!("doc-{:016x}", rng.u64(..)))
        .collect()
}

fn owner(router: &Router, key: &str) -> Option<SocketAddr> {
    router
        .owner(0, key)
        .map(|b| router.upstreams()[0].backends[b].address)
}

fn owners(router: &Router, keys: &[String]) -> Vec<SocketAddr> {
    keys.iter()
        .map(|k| owner(router, k).expect("an owner"))
        .collect()
}

fn mark_down(router: &Router, backend: usize) {
    router.upstreams()[0].backends[backend]
        .up
        .store(false, Ordering::Relaxed);
}

fn shares(owners: &[SocketAddr]) -> HashMap<SocketAddr, f64> {
    let mut counts: HashMap<SocketAddr, f64> = HashMap::new();
    for owner in owners {
        *counts.entry(*owner).or_default() += 1.0;
    }
    counts.values_mut().for_each(|c| *c /= owners.len() as f64);
    counts
}

/// A backend address derived from a proptest-chosen number, outside the `10.x` test range.
fn extra_backend(seed: u32) -> Backend {
    Backend {
        address: SocketAddr::from((
            [172, 16 + (seed % 16) as u8, (seed >> 8) as u8, seed as u8],
            9000,
        )),
        weight: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn a_key_always_maps_to_the_same_backend(count in 1usize..40, key in ".{0,64}") {
        let first = router(&backends(count));
        let rebuilt = router(&backends(count));
        let owner_now = owner(&first, &key);
        prop_assert!(owner_now.is_some());
        prop_assert_eq!(owner(&first, &key), owner_now);
        prop_assert_eq!(owner(&rebuilt, &key), owner_now);
    }

    #[test]
    fn removing_one_backend_moves_only_its_keys(count in 2usize..40, removed in any::<prop::sample::Index>(), seed in any::<u64>()) {
        let all = backends(count);
        let removed = removed.index(count);
        let gone = all[removed].address;
        let mut fewer = all.clone();
        fewer.remove(removed);
        let keys = keys(seed, 10_000);
        let before = owners(&router(&all), &keys);
        let after = owners(&router(&fewer), &keys);
        for ((key, old), new) in keys.iter().zip(&before).zip(&after) {
            if *old == gone {
                prop_assert_ne!(*new, gone);
            } else {
                prop_assert_eq!(old, new, "key {} moved although its owner stayed", key);
            }
        }
    }

    #[test]
    fn adding_one_backend_moves_about_its_share_only_to_it(count in 2usize..40, extra in any::<u32>(), seed in any::<u64>()) {
        let all = backends(count);
        let added = extra_backend(extra);
        let mut more = all.clone();
        more.push(added.clone());
        let keys = keys(seed, 10_000);
        let before = owners(&router(&all), &keys);
        let after = owners(&router(&more), &keys);
        let mut moved = 0usize;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                prop_assert_eq!(*new, added.address, "a key moved to an old backend");
                moved += 1;
            }
        }
        let fair = 1.0 / (count + 1) as f64;
        let fraction = moved as f64 / keys.len() as f64;
        prop_assert!(
            (0.5 * fair..=1.6 * fair).contains(&fraction),
            "moved {:.4} of keys, fair share {:.4}", fraction, fair
        );
    }

    #[test]
    fn a_down_backend_hands_its_keys_to_the_ring_successor(count in 2usize..40, down in any::<prop::sample::Index>(), seed in any::<u64>()) {
        let all = backends(count);
        let down = down.index(count);
        let down_address = all[down].address;
        let healthy = router(&all);
        let degraded = router(&all);
        mark_down(&degraded, down);
        // nginx's own ring, walked clockwise past the down backend.
        let buckets: Vec<Bucket> = all.iter().map(|b| Bucket::new(b.address, b.weight)).collect();
        let continuum = Continuum::new(&buckets);
        let mut fewer = all.clone();
        fewer.remove(down);
        let without = router(&fewer);
        for key in keys(seed, 2_000) {
            let old = owner(&healthy, &key);
            let new = owner(&degraded, &key);
            if old == Some(down_address) {
                let successor = continuum.node_iter(key.as_bytes()).find(|a| **a != down_address).copied();
                prop_assert_eq!(new, successor);
            } else {
                prop_assert_eq!(new, old, "key {} of a healthy backend moved", key);
            }
            // Marking a backend down is the same as removing it from the config.
            prop_assert_eq!(new, owner(&without, &key));
        }
    }

    /// The ring's own lookup arrays (points indexed by the top bits of the hash) agree with
    /// nginx's continuum key for key, weights included, and keys whose hash is past the last
    /// point wrap around to the first.
    #[test]
    fn every_key_goes_where_nginxs_ring_puts_it(
        count in 1usize..300,
        weights in prop::collection::vec(1u32..4, 300),
        seed in any::<u64>(),
    ) {
        let mut all = backends(count);
        for (b, w) in all.iter_mut().zip(&weights) {
            b.weight = *w;
        }
        let router = router(&all);
        let buckets: Vec<Bucket> = all.iter().map(|b| Bucket::new(b.address, b.weight)).collect();
        let continuum = Continuum::new(&buckets);
        for key in keys(seed, 2_000).iter().map(String::as_str).chain(["", "a", "zzzzzzzz"]) {
            prop_assert_eq!(owner(&router, key), continuum.node(key.as_bytes()), "key {:?}", key);
        }
    }

    #[test]
    fn every_backend_down_means_no_owner(count in 1usize..40, key in "[a-z0-9]{1,32}") {
        let all = backends(count);
        let router = router(&all);
        for i in 0..count {
            mark_down(&router, i);
        }
        prop_assert_eq!(router.owner(0, &key), None);
        let mut headers = HeaderMap::new();
        headers.insert("x-doc-id", HeaderValue::from_str(&key).unwrap());
        let request = RequestView { method: "GET", host: None, path: "/", query: None, headers: (&headers).into(), client_ip: None };
        prop_assert_eq!(router.decide(&request), Err(Reject::NoHealthyBackend { route: 0, upstream: 0 }));
        // One backend back up owns every key.
        router.upstreams()[0].backends[count - 1].up.store(true, Ordering::Relaxed);
        prop_assert_eq!(router.owner(0, &key), Some(count - 1));
    }
}

#[test]
fn equal_weights_spread_keys_within_1_3_of_the_mean() {
    let keys = keys(0x7e7e, 100_000);
    for count in 3..=50 {
        let owners = owners(&router(&backends(count)), &keys);
        let shares = shares(&owners);
        assert_eq!(shares.len(), count, "every backend owns keys");
        let max = shares.values().copied().fold(0.0, f64::max);
        let ratio = max * count as f64;
        assert!(ratio <= 1.3, "{count} backends: max/mean share {ratio:.3}");
    }
}

#[test]
fn shares_follow_weights() {
    let keys = keys(0x3e1, 100_000);
    let weighted: Vec<Backend> = (1..=3).map(|w| backend(w as usize - 1, w)).collect();
    let shares = shares(&owners(&router(&weighted), &keys));
    for b in &weighted {
        let expected = b.weight as f64 / 6.0;
        let share = shares[&b.address];
        assert!(
            (share - expected).abs() <= 0.1 * expected,
            "weight {}: share {share:.4}, expected {expected:.4}",
            b.weight
        );
    }
}

#[test]
fn shares_of_weight_classes_follow_weights_across_many_backends() {
    let keys = keys(0x5eed, 100_000);
    // 30 backends with weights 1, 2, 3, 1, 2, 3, ...: the classes own 1/6, 2/6 and 3/6.
    let weighted: Vec<Backend> = (0..30).map(|i| backend(i, i as u32 % 3 + 1)).collect();
    let shares = shares(&owners(&router(&weighted), &keys));
    for weight in 1..=3u32 {
        let class: f64 = weighted
            .iter()
            .filter(|b| b.weight == weight)
            .map(|b| shares.get(&b.address).copied().unwrap_or(0.0))
            .sum();
        let expected = weight as f64 / 6.0;
        assert!(
            (class - expected).abs() <= 0.1 * expected,
            "weight {weight}: share {class:.4}"
        );
    }
}
