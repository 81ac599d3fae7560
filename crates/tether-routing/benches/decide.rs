//! `Router::decide` on the hot path: a header key on a route with a 3-source key chain and a path
//! prefix, for upstreams of 3, 100 and 1,000 backends.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::{backends, config, doc_chain, prefix, route, upstream};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue};
use tether_config::{Balance, OnMissing};
use tether_routing::{RequestView, Router};

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide/header_key");
    for count in [3usize, 100, 1_000] {
        let router = Router::new(&config(
            vec![upstream("docs", backends(count), Balance::Ketama)],
            vec![
                route("static", prefix("/static/"), None, "docs"),
                route(
                    "docs",
                    prefix("/docs/"),
                    Some(doc_chain(OnMissing::Reject)),
                    "docs",
                ),
            ],
        ));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-doc-id",
            HeaderValue::from_static("b7c1a7e0-3f2d-4c55-9a1e-6d0f4e2b9c11"),
        );
        headers.insert(
            "cookie",
            HeaderValue::from_static("theme=dark; session=abc"),
        );
        headers.insert("user-agent", HeaderValue::from_static("bench"));
        let request = RequestView {
            method: "GET",
            host: Some("docs.example.com"),
            path: "/docs/b7c1a7e0-3f2d-4c55-9a1e-6d0f4e2b9c11/ws",
            query: Some("v=2"),
            headers: &headers,
            client_ip: None,
        };
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
