//! Bounded-load placement (`bounded_load`) against the plain ring, on the workload issue 18
//! names: 10,000 documents whose open-stream counts follow a Zipf(1.1) law, over 8 backends,
//! the streams arriving in random order. Each stream asks the router for its document's
//! owner (the proxy's lookup) and counts itself on that backend (as the stream registry
//! does). Figures: `cargo test -p tether-routing --test bounded_load -- --nocapture`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tether_config::{Balance, BoundedLoad, KeySource, OnMissing, Sticky};
use tether_routing::Router;

const DOCUMENTS: usize = 10_000;
const BACKENDS: usize = 8;

/// Open streams of each document: `max(1, round(2000 / rank^1.1))`, about 15,000 in all.
fn zipf_streams() -> Vec<usize> {
    (1..=DOCUMENTS)
        .map(|rank| ((2000.0 / (rank as f64).powf(1.1)).round() as usize).max(1))
        .collect()
}

fn router(bounded: Option<f64>) -> Router {
    let mut upstream = upstream("docs", backends(BACKENDS), Balance::Ketama);
    upstream.bounded_load = bounded.map(|factor| BoundedLoad {
        factor,
        linger: Duration::from_secs(30),
    });
    let sticky = Sticky {
        keys: vec![KeySource::Path("/docs/{key}".into())],
        on_missing: OnMissing::Reject,
    };
    Router::new(&config(
        vec![upstream],
        vec![route("docs", prefix("/docs/"), Some(sticky), "docs")],
    ))
}

/// Opens every stream in a random order (`seed`); returns peak/mean open streams per backend
/// and the number of documents whose streams ended up on more than one backend.
fn run(bounded: Option<f64>, seed: u64) -> (f64, usize) {
    let router = router(bounded);
    let mut arrivals: Vec<usize> = zipf_streams()
        .iter()
        .enumerate()
        .flat_map(|(doc, &n)| std::iter::repeat_n(doc, n))
        .collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    rng.shuffle(&mut arrivals);
    let backends = &router.upstreams()[0].backends;
    let mut on: HashMap<usize, usize> = HashMap::new();
    let mut split = 0;
    for &doc in &arrivals {
        let owner = router.owner(0, &format!("doc-{doc}")).expect("an owner");
        backends[owner].streams.fetch_add(1, Ordering::Relaxed);
        match on.insert(doc, owner) {
            Some(before) if before != owner => split += 1,
            _ => {}
        }
    }
    let loads: Vec<usize> = backends
        .iter()
        .map(|b| b.streams.load(Ordering::Relaxed))
        .collect();
    let mean = arrivals.len() as f64 / BACKENDS as f64;
    let peak = *loads.iter().max().expect("backends") as f64;
    (peak / mean, split)
}

#[test]
fn bounded_load_keeps_zipf_documents_within_the_bound_and_never_splits_one() {
    let streams: usize = zipf_streams().iter().sum();
    let hottest = zipf_streams()[0] as f64 / streams as f64 * BACKENDS as f64;
    let mut ketama = Vec::new();
    let mut bounded = Vec::new();
    for seed in 1..=10 {
        let (peak, split) = run(None, seed);
        assert_eq!(split, 0);
        ketama.push(peak);
        let (peak, split) = run(Some(1.25), seed);
        assert_eq!(split, 0, "seed {seed}: a document was split");
        bounded.push(peak);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let (ketama_max, bounded_max) = (
        ketama.iter().copied().fold(0.0, f64::max),
        bounded.iter().copied().fold(0.0, f64::max),
    );
    eprintln!(
        "{DOCUMENTS} documents, {streams} streams (Zipf 1.1; the hottest alone is {hottest:.2}x \
         a backend's mean), {BACKENDS} backends, 10 arrival orders: peak/mean open streams per \
         backend: plain ketama median {:.3} (max {ketama_max:.3}); bounded_load 1.25 median \
         {:.3} (max {bounded_max:.3}); split documents 0",
        median(&mut ketama),
        median(&mut bounded),
    );
    assert!(bounded_max <= 1.3, "{bounded:?}");
    assert!(ketama_max > bounded_max, "{ketama:?} vs {bounded:?}");
}

#[test]
fn a_placement_holds_while_its_backend_is_usable_and_is_made_again_when_not() {
    let router = router(Some(1.25));
    let upstream = &router.upstreams()[0];
    let first = router.owner(0, "doc").expect("owner");
    // Load the document's backend far over the bound: the placement still holds.
    upstream.backends[first]
        .streams
        .store(1_000, Ordering::Relaxed);
    assert_eq!(router.owner(0, "doc"), Some(first));
    // A new document avoids the loaded backend, even where the ring would pick it.
    let mut avoided = 0;
    for i in 0..200 {
        let key = format!("new-{i}");
        let plain = self::router(None).owner(0, &key);
        if plain == Some(first) {
            assert_ne!(router.owner(0, &key), Some(first), "{key}");
            avoided += 1;
        }
    }
    assert!(avoided > 0);
    // Its backend drained: placed again elsewhere, and it stays there when it returns.
    upstream.backends[first]
        .draining
        .store(true, Ordering::Relaxed);
    let second = router.owner(0, "doc").expect("owner");
    assert_ne!(second, first);
    upstream.backends[first]
        .draining
        .store(false, Ordering::Relaxed);
    assert_eq!(router.owner(0, "doc"), Some(second));
    assert_eq!(
        upstream.placements.get("doc"),
        Some(upstream.backends[second].address)
    );
}
