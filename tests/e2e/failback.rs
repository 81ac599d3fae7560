//! End-to-end: fail-back hysteresis and slow start (`rebalance: { failback_after, ramp }`).
//! A backend that flaps moves each of its documents at most twice (away, and back once it has
//! stayed available for `failback_after`) where without hysteresis every flap moves them; a
//! new backend takes its documents over `ramp`, not at once.
//!
//! Clients here reconnect as real ones do: each document has a WebSocket that reopens at once
//! when closed, and every connection records the backend that answered, so a move is seen
//! however short the flap. Timings are a tenth of the issue's (flap every 500 ms for 6 s,
//! `failback_after: 3s`); `FLAP_SCALE=1` runs them at full length (5 s, 1 min, 30 s) for the
//! figure in BENCHMARKS.md.

use crate::support::{backend_lines, metric, Stack};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_testkit::{http_get, wait_until_async, ws_connect, Message};

fn config(rebalance: &str, backends: &[&str]) -> String {
    let backends = backend_lines(backends);
    format!(
        r#"
listeners:
  - address: $PROXY
admin:
  address: $ADMIN
upstreams:
  docs:
    backends:
{backends}    rebalance: {rebalance}
routes:
  - name: docs
    match: {{ path_prefix: /docs/ }}
    sticky: {{ keys: [ {{ path: "/docs/{{key}}" }} ] }}
    upstream: docs
"#
    )
}

/// The flap timings times `FLAP_SCALE` (default 0.1).
fn scaled(d: Duration) -> Duration {
    let scale: f64 = std::env::var("FLAP_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.1);
    d.mul_f64(scale)
}

/// A document's WebSocket that reopens whenever it is closed, until stopped; it lists the
/// backend of every connection it made.
struct Reconnecting {
    key: String,
    backends: Arc<Mutex<Vec<String>>>,
}

impl Reconnecting {
    fn start(url: String, key: String, stop: Arc<AtomicBool>) -> Reconnecting {
        let backends = Arc::new(Mutex::new(Vec::new()));
        let seen = backends.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let Ok((ws, headers)) = ws_connect(&url, &[]).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let backend = headers
                    .get("x-backend")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                seen.lock().expect("lock").push(backend);
                let (_sink, mut stream) = ws.split();
                loop {
                    tokio::select! {
                        message = stream.next() => match message {
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                            Some(Ok(_)) => {}
                        },
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {
                            if stop.load(Ordering::Acquire) {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Reconnecting { key, backends }
    }

    /// How many times the document changed backend.
    fn moves(&self) -> usize {
        let backends = self.backends.lock().expect("lock");
        backends.windows(2).filter(|w| w[0] != w[1]).count()
    }

    fn first(&self) -> Option<String> {
        self.backends.lock().expect("lock").first().cloned()
    }

    fn last(&self) -> Option<String> {
        self.backends.lock().expect("lock").last().cloned()
    }
}

/// `count` documents `doc-0`.. with a reconnecting WebSocket each, all connected once.
async fn connect(stack: &Stack, count: usize, stop: &Arc<AtomicBool>) -> Vec<Reconnecting> {
    let docs: Vec<Reconnecting> = (0..count)
        .map(|i| {
            let key = format!("doc-{i}");
            let url = stack.ws_url(&format!("/docs/{key}/live"));
            Reconnecting::start(url, key, stop.clone())
        })
        .collect();
    let connected = wait_until_async(Duration::from_secs(10), || async {
        docs.iter().all(|d| d.first().is_some())
    })
    .await;
    assert!(connected, "not every document connected");
    docs
}

/// Drains and undrains `b0` every `period` for `length` with 40 documents connected, then
/// leaves it available and waits for `settle`; returns each of b0's documents' moves.
async fn flap(rebalance: &str, period: Duration, length: Duration, settle: Duration) -> Vec<usize> {
    let template = config(rebalance, &["$B0", "$B1", "$B2"]);
    let stack = Stack::start(&template).await;
    let stop = Arc::new(AtomicBool::new(false));
    let docs = connect(&stack, 40, &stop).await;
    let started = Instant::now();
    let mut drained = false;
    while started.elapsed() < length {
        drained = !drained;
        stack.set_drain("b0", drained).await;
        tokio::time::sleep(period).await;
    }
    if drained {
        stack.set_drain("b0", false).await;
    }
    // Back for good: its documents return after failback_after (and the ramp).
    let on_b0: Vec<&Reconnecting> = docs
        .iter()
        .filter(|d| d.first().as_deref() == Some("b0"))
        .collect();
    assert!(!on_b0.is_empty(), "no document on b0");
    let returned = wait_until_async(settle, || async {
        on_b0.iter().all(|d| d.last().as_deref() == Some("b0"))
    })
    .await;
    stop.store(true, Ordering::Release);
    assert!(returned, "b0's documents did not come back");
    let others_moved: usize = docs
        .iter()
        .filter(|d| d.first().as_deref() != Some("b0"))
        .map(|d| d.moves())
        .sum();
    assert_eq!(others_moved, 0, "a document of another backend moved");
    on_b0
        .iter()
        .map(|d| {
            eprintln!("{}: {} moves", d.key, d.moves());
            d.moves()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flapping_backend_moves_each_document_at_most_twice_with_failback_after() {
    let (period, length) = (
        scaled(Duration::from_secs(5)),
        scaled(Duration::from_secs(60)),
    );
    let failback = scaled(Duration::from_secs(30));
    let transitions = (length.as_millis() / period.as_millis()) as usize;

    let without = flap(
        "{ max_per_second: 1000 }",
        period,
        length,
        Duration::from_secs(10),
    )
    .await;
    let with = flap(
        &format!(
            "{{ max_per_second: 1000, failback_after: {}ms }}",
            failback.as_millis()
        ),
        period,
        length,
        failback + Duration::from_secs(10),
    )
    .await;
    let most = |moves: &[usize]| moves.iter().copied().max().unwrap_or(0);
    eprintln!(
        "flapping every {period:?} for {length:?} ({transitions} drains and undrains): \
         without failback_after each of b0's {} documents moved {:?} times (max {}); \
         with failback_after {failback:?}, {} documents moved at most {} times",
        without.len(),
        without,
        most(&without),
        with.len(),
        most(&with)
    );
    assert!(most(&with) <= 2, "with failback_after: {with:?}");
    assert!(
        most(&without) >= transitions / 2,
        "without failback_after every flap should move them: {without:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_backend_takes_its_documents_over_the_ramp_not_at_once() {
    let ramp = Duration::from_secs(3);
    let rebalance = format!("{{ max_per_second: 1000, ramp: {}ms }}", ramp.as_millis());
    let stack = Stack::start(&config(&rebalance, &["$B0", "$B1"])).await;
    let stop = Arc::new(AtomicBool::new(false));
    let docs = connect(&stack, 120, &stop).await;

    // b2 joins through a reload; sample how many documents it holds every 100 ms.
    let grown = config(&rebalance, &["$B0", "$B1", "$B2"]);
    let addrs: Vec<_> = stack.backends.iter().map(|b| b.addr()).collect();
    let grown = crate::support::fill(&grown, stack.proxy, stack.tether.admin_addr(), &addrs, &[]);
    stack.tether.write_config(&grown).expect("write config");
    let started = Instant::now();
    let r = stack.admin_post("/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let on_b2 = || {
        docs.iter()
            .filter(|d| d.last().as_deref() == Some("b2"))
            .count()
    };
    let mut samples = Vec::new();
    while started.elapsed() < ramp + Duration::from_secs(2) {
        samples.push((started.elapsed(), on_b2()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Release);
    let last = samples.last().map_or(0, |s| s.1);
    eprintln!("documents on the new backend over a {ramp:?} ramp: {samples:?}");

    // Every document b2 owns in the end is on it, and no other moved.
    let b2 = stack.backend("b2").addr().to_string();
    let mut owned = 0;
    for d in &docs {
        let url = stack
            .tether
            .admin_url(&format!("/route?path=/docs/{}/live", d.key));
        let route = http_get(&url, &[]).await.expect("route");
        if route.json().expect("json")["backend"] == b2.as_str() {
            owned += 1;
            assert_eq!(d.moves(), 1, "{}", d.key);
        } else {
            assert_eq!(d.moves(), 0, "{} moved", d.key);
        }
    }
    assert!(owned >= 20, "b2 owns {owned} of 120");
    assert_eq!(last, owned, "{samples:?}");
    // Not at once: the first half second holds at most a third of them, and they arrive in
    // several steps spread over at least half the ramp.
    let early = samples
        .iter()
        .filter(|(t, _)| *t <= Duration::from_millis(500))
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    assert!(
        early * 3 <= owned,
        "{early} of {owned} at once: {samples:?}"
    );
    let steps: std::collections::BTreeSet<usize> = samples
        .iter()
        .map(|s| s.1)
        .filter(|&n| n > 0 && n < owned)
        .collect();
    assert!(
        steps.len() >= 3,
        "arrived in {} steps: {samples:?}",
        steps.len()
    );
    let first = samples.iter().find(|s| s.1 > 0).map(|s| s.0);
    let full = samples.iter().find(|s| s.1 == owned).map(|s| s.0);
    if let (Some(first), Some(full)) = (first, full) {
        assert!(full - first >= ramp / 2, "{samples:?}");
    }
    let rebalanced = metric(
        &stack,
        r#"tether_streams_closed_total{reason="rebalance",upstream="docs"}"#,
    )
    .await;
    assert_eq!(rebalanced, Some(owned as f64));
}
