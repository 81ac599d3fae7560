//! End-to-end: the real `tether` binary routing plain HTTP to three real backends.

use crate::support::{Stack, STANDARD};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tether_routing::Router;
use tether_testkit::{http_get, raw_request, raw_status, wait_until_async};

/// GETs `path` through the proxy and returns the answering backend's name.
async fn backend_for(stack: &Stack, path: &str, headers: &[(&str, &str)]) -> String {
    let resp = match http_get(&stack.url(path), headers).await {
        Ok(r) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    assert_eq!(resp.status, 200, "GET {path}: {}", resp.text());
    match resp.header("x-backend") {
        Some(name) => name.to_string(),
        None => panic!("GET {path}: no x-backend header"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_key_source_pins_every_request_of_a_key_to_one_backend_and_spreads_keys() {
    let stack = Stack::start(STANDARD).await;
    type Request = Box<dyn Fn(&str) -> (String, Vec<(String, String)>)>;
    let sources: Vec<(&str, Request)> = vec![
        (
            "header",
            Box::new(|k| (format!("/h/{k}"), vec![("x-doc-id".into(), k.into())])),
        ),
        (
            "cookie",
            Box::new(|k| {
                let cookie = format!("theme=dark; doc_id={k}");
                ("/c/page".into(), vec![("cookie".into(), cookie)])
            }),
        ),
        (
            "query",
            Box::new(|k| (format!("/q/page?x=1&doc={k}"), vec![])),
        ),
        ("path", Box::new(|k| (format!("/docs/{k}/edit"), vec![]))),
    ];
    for (source, request) in &sources {
        let mut owners = BTreeSet::new();
        for i in 0..30 {
            let key = format!("doc-{i}");
            let mut seen = BTreeSet::new();
            for _ in 0..3 {
                let (path, headers) = request(&key);
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                seen.insert(backend_for(&stack, &path, &headers).await);
            }
            assert_eq!(seen.len(), 1, "{source}: key {key} reached {seen:?}");
            owners.extend(seen);
        }
        assert_eq!(owners.len(), 3, "{source}: 30 keys reached only {owners:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_from_different_sources_and_unnormalised_paths_reaches_the_same_backend() {
    let stack = Stack::start(STANDARD).await;
    for i in 0..20 {
        let key = format!("k{i}");
        let by_path = backend_for(&stack, &format!("/docs/{key}/x"), &[]).await;
        let merged = backend_for(&stack, &format!("/docs//{key}/./x"), &[]).await;
        let dotted = backend_for(&stack, &format!("/other/../docs/{key}/x"), &[]).await;
        let by_header = backend_for(&stack, "/h/x", &[("x-doc-id", &key)]).await;
        assert_eq!(by_path, merged, "{key}");
        assert_eq!(by_path, dotted, "{key}");
        assert_eq!(by_path, by_header, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_arrive_at_the_backend_and_hop_by_hop_headers_do_not() {
    let stack = Stack::start(STANDARD).await;
    let resp = http_get(
        &stack.url("/h/fwd"),
        &[
            ("x-doc-id", "fwd"),
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=203.0.113.7"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "must-not-pass"),
            ("keep-alive", "timeout=5"),
        ],
    )
    .await
    .expect("request through proxy");
    assert_eq!(resp.status, 200);
    let seen = resp.json().expect("echo JSON");
    let h = &seen["headers"];
    // The client is not a trusted proxy: its claims are replaced, not extended.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert!(
        h.get("forwarded").is_none(),
        "an untrusted Forwarded header passed"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], stack.proxy.to_string());
    let id = h["x-request-id"].as_str().expect("x-request-id generated");
    assert!(!id.is_empty());
    assert_eq!(resp.header("x-request-id"), Some(id), "id echoed to client");
    assert!(
        h.get("x-secret").is_none(),
        "Connection-nominated header leaked"
    );
    assert!(h.get("keep-alive").is_none(), "Keep-Alive leaked");

    let resp = http_get(
        &stack.url("/h/fwd"),
        &[("x-doc-id", "fwd"), ("x-request-id", "client-chosen-42")],
    )
    .await
    .expect("request through proxy");
    let seen = resp.json().expect("echo JSON");
    assert_eq!(seen["headers"]["x-request-id"], "client-chosen-42");
    assert_eq!(resp.header("x-request-id"), Some("client-chosen-42"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_requests_get_404_and_400_and_never_reach_a_backend() {
    let stack = Stack::start(STANDARD).await;
    let before: u64 = stack.backends.iter().map(|b| b.requests()).sum();

    let no_route = http_get(&stack.url("/nowhere"), &[]).await.expect("404");
    assert_eq!(no_route.status, 404);

    let no_key = http_get(&stack.url("/h/x"), &[]).await.expect("400");
    assert_eq!(no_key.status, 400, "sticky key missing, on_missing: reject");

    let escape = raw_request(
        stack.proxy,
        b"GET /docs/../../etc/passwd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("raw request");
    assert_eq!(
        raw_status(&escape),
        Some(400),
        "{}",
        String::from_utf8_lossy(&escape)
    );

    let after: u64 = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(before, after, "a rejected request reached a backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failures_on_every_backend_give_502() {
    let stack = Stack::start(STANDARD).await;
    let resp = http_get(&stack.url("/refused/x"), &[]).await.expect("502");
    assert_eq!(resp.status, 502, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_with_no_healthy_backend_gives_503() {
    let stack = Stack::start(STANDARD).await;
    let url = stack.url("/dead/x");
    let got_503 = wait_until_async(Duration::from_secs(10), || {
        let url = url.clone();
        async move { matches!(http_get(&url, &[]).await, Ok(r) if r.status == 503) }
    })
    .await;
    assert!(
        got_503,
        "the health check never marked the dead backend down"
    );
    // A fast 503 that tells the client when to come back.
    let r = http_get(&url, &[]).await.expect("GET");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_read_timeout_gives_504() {
    let stack = Stack::start(STANDARD).await;
    // The route's read timeout is 500 ms; the backend waits 3 s before answering.
    let resp = http_get(&stack.url("/slow/x/slow?ms=3000"), &[])
        .await
        .expect("504");
    assert_eq!(resp.status, 504, "{}", resp.text());
    // And a response within the timeout passes.
    let resp = http_get(&stack.url("/slow/x/slow?ms=10"), &[])
        .await
        .expect("200");
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backends_keys_are_retried_on_the_next_owner_without_client_errors() {
    let stack = Stack::start(STANDARD).await;
    let config = tether_config::parse(&stack.config, "test.yaml").expect("config parses");
    let router = Router::new(&config);
    let docs = router
        .upstreams()
        .iter()
        .position(|u| u.name == "docs")
        .expect("docs upstream");

    let victim = stack.backend("b1");
    let victim_index = router.upstreams()[docs]
        .backends
        .iter()
        .position(|b| b.address == victim.addr())
        .expect("victim in config");
    let keys: Vec<String> = (0..300).map(|i| format!("doc-{i}")).collect();
    let owned: Vec<&String> = keys
        .iter()
        .filter(|k| router.owner(docs, k) == Some(victim_index))
        .collect();
    assert!(
        owned.len() > 30,
        "b1 owns too few keys to test: {}",
        owned.len()
    );

    victim.stop().await;
    // Where the ring sends b1's keys once b1 is down: its successor for each key.
    router.upstreams()[docs].backends[victim_index]
        .up
        .store(false, Ordering::Relaxed);
    let mut moved_to = HashMap::new();
    for key in &owned {
        let expected = router.owner(docs, key).expect("two backends left");
        let expected_addr = router.upstreams()[docs].backends[expected].address;
        let got = backend_for(&stack, "/h/x", &[("x-doc-id", key)]).await;
        assert_eq!(got, stack.name_of(expected_addr), "key {key}");
        *moved_to.entry(got).or_insert(0) += 1;
    }
    assert!(!moved_to.contains_key("b1"));
    // Keys of the other backends did not move.
    for key in keys.iter().filter(|k| !owned.contains(k)).take(50) {
        let owner = router.owner(docs, key).expect("owner");
        let addr = router.upstreams()[docs].backends[owner].address;
        let got = backend_for(&stack, "/h/x", &[("x-doc-id", key)]).await;
        assert_eq!(
            got,
            stack.name_of(addr),
            "key {key} of a live backend moved"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_proxys_forwarded_for_chain_is_extended() {
    let config = STANDARD.replace(
        "listeners:",
        "server:\n  trusted_proxies: [127.0.0.0/8]\nlisteners:",
    );
    let stack = Stack::start(&config).await;
    let resp = http_get(
        &stack.url("/h/fwd"),
        &[("x-doc-id", "fwd"), ("x-forwarded-for", "203.0.113.7")],
    )
    .await
    .expect("request through proxy");
    let seen = resp.json().expect("echo JSON");
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
}
