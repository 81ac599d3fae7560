//! End-to-end: active health checks and passive ejection take a backend out of the ring and
//! put it back, with the metrics that show it.

use crate::support::{metrics_text, series_value, Stack};
use std::time::Duration;
use tether_testkit::{http_get, wait_until_async, TestBackend};

/// Keys owned (per a plain GET) by `backend`.
async fn keys_of(stack: &Stack, backend: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..60 {
        let key = format!("k{i}");
        let r = http_get(&stack.url(&format!("/docs/{key}/x")), &[])
            .await
            .expect("GET");
        if r.header("x-backend") == Some(backend) {
            keys.push(key);
        }
    }
    keys
}

const ACTIVE: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    health_check:
      http: { path: /healthz, expect_status: 200 }
      interval: 100ms
      timeout: 500ms
      healthy_after: 2
      unhealthy_after: 2
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_http_check_takes_a_backend_out_and_a_passing_one_brings_it_back() {
    let stack = Stack::start(ACTIVE).await;
    let b1 = stack.backend("b1");
    let up = format!(
        r#"tether_backend_up{{backend="{}",upstream="docs"}}"#,
        b1.addr()
    );
    let owned = keys_of(&stack, "b1").await;
    assert!(!owned.is_empty());

    b1.set_healthy(false);
    let down = wait_until_async(Duration::from_secs(5), || async {
        series_value(&metrics_text(&stack).await, &up) == Some(0.0)
    })
    .await;
    assert!(down, "backend_up never went to 0");
    for key in &owned {
        let r = http_get(&stack.url(&format!("/docs/{key}/x")), &[])
            .await
            .expect("GET");
        assert_ne!(
            r.header("x-backend"),
            Some("b1"),
            "{key} still sent to an unhealthy backend"
        );
    }

    b1.set_healthy(true);
    let back = wait_until_async(Duration::from_secs(5), || async {
        series_value(&metrics_text(&stack).await, &up) == Some(1.0)
    })
    .await;
    assert!(back, "backend_up never returned to 1");
    for key in &owned {
        let r = http_get(&stack.url(&format!("/docs/{key}/x")), &[])
            .await
            .expect("GET");
        assert_eq!(r.header("x-backend"), Some("b1"), "{key} did not return");
    }
    let text = metrics_text(&stack).await;
    let changes = series_value(
        &text,
        r#"tether_ring_changes_total{cause="health",upstream="docs"}"#,
    );
    assert_eq!(changes, Some(2.0), "one change down, one up");
    let failures = format!(
        r#"tether_health_checks_total{{backend="{}",result="failure",upstream="docs"}}"#,
        b1.addr()
    );
    assert!(series_value(&text, &failures).unwrap_or(0.0) >= 2.0);
}

const PASSIVE: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    passive: { failures: 2, eject_for: 1s }
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

#[tokio::test(flavor = "multi_thread")]
async fn consecutive_connect_failures_eject_a_backend_for_eject_for() {
    let mut stack = Stack::start(PASSIVE).await;
    let owned = keys_of(&stack, "b1").await;
    assert!(!owned.is_empty());
    let addr = stack.backend("b1").addr();
    let up = format!(r#"tether_backend_up{{backend="{addr}",upstream="docs"}}"#);
    stack.backend("b1").stop().await;

    // Every GET still succeeds (retried on the next owner); two failures eject b1.
    for key in owned.iter().cycle().take(4) {
        let r = http_get(&stack.url(&format!("/docs/{key}/x")), &[])
            .await
            .expect("GET");
        assert_eq!(r.status, 200);
        assert_ne!(r.header("x-backend"), Some("b1"));
    }
    let text = metrics_text(&stack).await;
    assert_eq!(series_value(&text, &up), Some(0.0), "b1 not ejected");
    assert_eq!(
        series_value(
            &text,
            r#"tether_ring_changes_total{cause="passive",upstream="docs"}"#
        ),
        Some(1.0)
    );

    // Back on its address: after eject_for it owns its keys again.
    let restarted = TestBackend::start_at("b1", addr).await.expect("restart");
    let i = stack
        .backends
        .iter()
        .position(|b| b.name() == "b1")
        .expect("b1");
    stack.backends[i] = restarted;
    let back = wait_until_async(Duration::from_secs(5), || async {
        series_value(&metrics_text(&stack).await, &up) == Some(1.0)
    })
    .await;
    assert!(back, "ejection never ended");
    for key in &owned {
        let r = http_get(&stack.url(&format!("/docs/{key}/x")), &[])
            .await
            .expect("GET");
        assert_eq!(r.header("x-backend"), Some("b1"), "{key} did not return");
    }
}

const SLOW_ENDPOINT: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    passive: { failures: 2, eject_for: 30s }
  counted:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    passive: { failures: 2, eject_for: 30s, timeouts: true }
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    timeouts: { read: 200ms }
  - name: counted
    match: { path_prefix: /counted/ }
    sticky: { keys: [ { path: "/counted/{key}" } ] }
    upstream: counted
    timeouts: { read: 200ms }
"#;

/// A client asking one slow endpoint over and over gets 504s, but cannot get the healthy
/// backend behind it ejected: read timeouts do not count by default. With
/// `passive.timeouts: true` they do.
#[tokio::test(flavor = "multi_thread")]
async fn read_timeouts_eject_a_backend_only_when_passive_timeouts_says_so() {
    let stack = Stack::start(SLOW_ENDPOINT).await;
    for prefix in ["docs", "counted"] {
        for _ in 0..4 {
            let r = http_get(&stack.url(&format!("/{prefix}/k1/slow?ms=1000")), &[])
                .await
                .expect("GET");
            assert_eq!(r.status, 504, "{prefix}");
        }
    }
    let text = metrics_text(&stack).await;
    let ejections = |upstream: &str| {
        series_value(
            &text,
            &format!(r#"tether_ring_changes_total{{cause="passive",upstream="{upstream}"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        ejections("docs"),
        0.0,
        "a slow endpoint got a backend ejected"
    );
    // Counted: the slow endpoint's owner is ejected, then the next owner that times out.
    assert!(
        ejections("counted") >= 1.0,
        "timeouts: true did not count them"
    );
    // The slow endpoint's backend still serves its other requests on `docs`.
    let r = http_get(&stack.url("/docs/k1/x"), &[]).await.expect("GET");
    assert_eq!(r.status, 200);
}
