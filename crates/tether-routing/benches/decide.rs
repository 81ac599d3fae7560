//! `Router::decide` on the hot path: a header key on a route with a 3-source key chain and a path
//! prefix, for upstreams of 3, 100 and 1,000 backends.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::{decide_headers, decide_request, decide_router};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide/header_key");
    for count in [3usize, 100, 1_000] {
        let router = decide_router(count);
        let headers = decide_headers();
        let request = decide_request(&headers);
        group.bench_with_input(
            BenchmarkId::from_parameter(count),
            &request,
            |b, request| b.iter(|| router.decide(black_box(request))),
        );
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
