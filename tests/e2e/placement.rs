//! End-to-end: `bounded_load` placement with real streams. 1,000 documents whose WebSocket
//! counts follow a Zipf(1.1) law (1,333 streams, the hottest document 100) open in random
//! order through one Tether in front of 8 backends: the busiest backend stays within 1.3×
//! the mean, no document is ever split (`tether_split_keys` 0 throughout, and every stream of
//! a document answered by one backend), and `/route` says `placed`. The 10,000-document
//! figure against the plain ring is `crates/tether-routing/tests/bounded_load.rs`.

use crate::support::{
    backend_lines, open_tagged, shuffle, spread, tether_binary, zipf_streams, SplitWatch,
};
use futures_util::{stream, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tether_testkit::{free_addr, http_get, TestBackend, TetherProcess, WsClient};

const DOCUMENTS: usize = 1000;

fn config(listener: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) -> String {
    let backends = backend_lines(backends);
    format!(
        r#"
listeners:
  - address: {listener}
admin:
  address: {admin}
upstreams:
  docs:
    backends:
{backends}    bounded_load: {{ factor: 1.25, linger: 30s }}
routes:
  - name: docs
    match: {{ path_prefix: /docs/ }}
    sticky: {{ keys: [ {{ path: "/docs/{{key}}" }} ] }}
    upstream: docs
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn zipf_documents_are_placed_within_the_bound_and_never_split() {
    let mut backends = Vec::new();
    for i in 0..8 {
        backends.push(TestBackend::start(&format!("b{i}")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(TestBackend::addr).collect();
    let (listener, admin) = (free_addr(), free_addr());
    let tether = TetherProcess::start(tether_binary(), &config(listener, admin, &addrs), admin)
        .await
        .expect("tether");

    let counts = zipf_streams(DOCUMENTS, 100.0);
    let mut arrivals: Vec<usize> = counts
        .iter()
        .enumerate()
        .flat_map(|(doc, &n)| std::iter::repeat_n(doc, n))
        .collect();
    shuffle(&mut arrivals, 7);
    let total = arrivals.len();

    // Watch tether_split_keys while the streams open.
    let split_watch = SplitWatch::start(vec![tether.admin_url("/metrics")]);

    // Open them, 32 at a time, in the shuffled order; keep every socket open.
    let opened: Vec<(usize, String, WsClient)> = stream::iter(arrivals)
        .map(|doc| async move {
            let (backend, ws) = open_tagged(&format!("ws://{listener}/docs/doc-{doc}/live")).await;
            (doc, backend, ws)
        })
        .buffered(32)
        .collect()
        .await;
    // One more convergence pass sees them all.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let worst_split = split_watch.worst().await;

    let (split, per_backend) = spread(opened.iter().map(|(d, b, _)| (*d, b.as_str())));
    assert!(split.is_empty(), "split documents: {split:?}");
    assert_eq!(worst_split, 0.0, "tether_split_keys rose above 0");
    let mean = total as f64 / 8.0;
    let peak = *per_backend.values().max().expect("backends") as f64;
    eprintln!(
        "{DOCUMENTS} Zipf documents, {total} WebSockets, 8 backends, bounded_load 1.25: \
         per backend {per_backend:?}, peak/mean {:.3}, split_keys max {worst_split}",
        peak / mean
    );
    assert!(peak / mean <= 1.3, "peak/mean {:.3}", peak / mean);

    // /route gives the hottest document's placement as the reason.
    let route = http_get(&tether.admin_url("/route?path=/docs/doc-0/live"), &[])
        .await
        .expect("route")
        .json()
        .expect("json");
    assert_eq!(route["reason"], "placed", "{route}");
    let upstreams = http_get(&tether.admin_url("/upstreams"), &[])
        .await
        .expect("upstreams")
        .json()
        .expect("json");
    assert_eq!(
        upstreams["upstreams"][0]["placed_documents"], DOCUMENTS,
        "{upstreams}"
    );
}
