//! The per-request cost of Tether's metrics: the handles are resolved per route at config load,
//! so a request pays for a few atomic increments and one histogram observation.
//! `cargo bench -p tether-proxy --bench metrics`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;
use tether_proxy::metrics::RouterCounters;
use tether_routing::{KeySourceKind, Router};

const CONFIG: &str = r#"
listeners: [ { address: 127.0.0.1:8080 } ]
upstreams:
  docs:
    backends: [ { address: 127.0.0.1:9101 }, { address: 127.0.0.1:9102 }, { address: 127.0.0.1:9103 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

fn per_request_metrics(c: &mut Criterion) {
    let config = match tether_config::parse(CONFIG, "bench.yaml") {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    };
    let router = Router::new(&config);
    let counters = RouterCounters::new(&router);
    let route = counters.route(Some(0));
    c.bench_function("metrics_per_request", |b| {
        b.iter(|| {
            // What one proxied request records: key source, connect time, status and duration.
            route.key_from(black_box(KeySourceKind::Path));
            route.connected_in(black_box(Duration::from_micros(80)));
            route.observe(black_box(200), black_box(Duration::from_micros(450)));
        })
    });
    c.bench_function("no_metrics_baseline", |b| {
        b.iter(|| black_box((KeySourceKind::Path, Duration::from_micros(80), 200u16)))
    });
}

criterion_group!(benches, per_request_metrics);
criterion_main!(benches);
