//! End-to-end: hot documents. `GET /documents/top` ranks an upstream's documents by open
//! streams (exact, from the stream registry), by requests per second and by bytes per second
//! (bounded sketches); `tether top` prints the same ranking; the concentration gauges follow
//! the open streams without ever naming a document in a label.

use crate::support::{metric, metrics_text, tether_binary, Stack, STANDARD};
use http::Method;
use serde_json::Value;
use std::time::Duration;
use tether_testkit::{http_get, http_request, wait_until_async};

async fn top(stack: &Stack, query: &str) -> (u16, Value) {
    let r = http_get(
        &stack.tether.admin_url(&format!("/documents/top?{query}")),
        &[],
    )
    .await
    .expect("admin");
    let body = r.json().unwrap_or(Value::Null);
    (r.status.as_u16(), body)
}

fn keys(answer: &Value) -> Vec<String> {
    answer["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| d["key"].as_str().expect("key").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hottest_documents_are_ranked_by_streams_requests_and_bytes() {
    let stack = Stack::start(STANDARD).await;

    // Open streams: hot 3, warm 2, cold 1.
    let mut held = Vec::new();
    for (key, n) in [("hot", 3), ("warm", 2), ("cold", 1)] {
        for _ in 0..n {
            let mut events =
                tether_testkit::sse_events(&stack.url(&format!("/docs/{key}/sse?count=1&hold=1")))
                    .await
                    .expect("SSE");
            events.next_event().await.expect("open").expect("event");
            held.push(events);
        }
    }
    let (status, streams) = top(&stack, "upstream=docs&by=streams&n=2").await;
    assert_eq!(status, 200, "{streams}");
    assert_eq!(keys(&streams), ["hot", "warm"], "{streams}");
    assert_eq!(streams["total"], 6);
    assert_eq!(streams["documents"][0]["streams"], 3);
    assert_eq!(streams["documents"][0]["share"], 0.5);
    let owner = streams["documents"][0]["owner"].as_str().expect("owner");
    assert_eq!(
        streams["documents"][0]["backends"][owner], 3,
        "the owner holds the document's streams: {streams}"
    );
    assert_eq!(
        metric(
            &stack,
            r#"tether_busiest_document_stream_share{upstream="docs"}"#
        )
        .await,
        Some(0.5)
    );
    let spread = metric(&stack, r#"tether_backend_stream_spread{upstream="docs"}"#)
        .await
        .expect("spread gauge");
    assert!((1.0..=3.0).contains(&spread), "{spread}");
    assert!(
        !metrics_text(&stack).await.contains("hot"),
        "a document became a label"
    );

    // Requests: busy 40, calm 10 (small answers); bytes: heavy, 5 answers of 20 KB.
    for _ in 0..40 {
        http_get(&stack.url("/docs/busy/x"), &[])
            .await
            .expect("GET");
    }
    for _ in 0..10 {
        http_get(&stack.url("/docs/calm/x"), &[])
            .await
            .expect("GET");
    }
    for _ in 0..5 {
        let r = http_request(
            Method::POST,
            &stack.url("/docs/heavy/x"),
            &[],
            vec![b'x'; 20_000],
        )
        .await
        .expect("POST");
        assert_eq!(r.status, 200);
    }
    let (status, requests) = top(&stack, "upstream=docs&by=requests&n=3").await;
    assert_eq!(status, 200, "{requests}");
    assert_eq!(keys(&requests), ["busy", "calm", "heavy"], "{requests}");
    let rate = |answer: &Value, i: usize, unit: &str| answer["documents"][i][unit].as_f64();
    let (busy, calm) = (
        rate(&requests, 0, "requests_per_second").expect("rate"),
        rate(&requests, 1, "requests_per_second").expect("rate"),
    );
    assert!(busy > 3.0 * calm && calm > 0.0, "{requests}");
    assert_eq!(requests["documents"][0]["error"], 0.0, "few keys: exact");
    let (_, bytes) = top(&stack, "upstream=docs&by=bytes&n=1").await;
    assert_eq!(keys(&bytes), ["heavy"], "{bytes}");

    // What is asked for wrongly gets a 400 that says why.
    // (This config has three upstreams, so leaving `upstream` out is a question too.)
    for query in [
        "by=size",
        "n=0",
        "n=100000",
        "upstream=nope",
        "what=1",
        "by=streams",
    ] {
        let (status, answer) = top(&stack, query).await;
        assert_eq!(status, 400, "{query}: {answer}");
        assert!(answer["error"].is_string(), "{query}: {answer}");
    }

    // `tether top` prints the same ranking.
    let out = tokio::process::Command::new(tether_binary())
        .args(["top", "-c"])
        .arg(stack.tether.config_path())
        .args(["--upstream", "docs", "--by", "streams", "-n", "2"])
        .output()
        .await
        .expect("tether top");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (hot, warm) = (
        text.find(" hot ").expect("hot"),
        text.find(" warm ").expect("warm"),
    );
    assert!(hot < warm && !text.contains(" cold "), "{text}");
    eprintln!("{text}");
    let out = tokio::process::Command::new(tether_binary())
        .args(["top", "-c"])
        .arg(stack.tether.config_path())
        .args(["--upstream", "docs", "--by", "requests", "-n", "1"])
        .output()
        .await
        .expect("tether top");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(" busy "), "{text}");
    eprintln!("{text}");

    // Streams that end leave the ranking.
    drop(held);
    let gone = wait_until_async(Duration::from_secs(5), || async {
        top(&stack, "upstream=docs&by=streams").await.1["total"] == 0
    })
    .await;
    assert!(gone, "ended streams still counted");
}

const LIMITED: &str = r#"
listeners:
  - address: $PROXY
admin:
  address: $ADMIN
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    limits: { streams_per_key: 2 }
"#;

/// `limits.streams_per_key`: a document at its limit gets 429 with `Retry-After` for another
/// SSE stream and for a WebSocket (before any 101, and the backend never sees the upgrade);
/// other documents are not limited; a stream that ends makes room.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_at_its_stream_limit_gets_429_and_others_do_not() {
    use tether_testkit::{raw_request_within, raw_status};
    let stack = Stack::start(LIMITED).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut events = tether_testkit::sse_events(&stack.url("/docs/full/sse?count=1&hold=1"))
            .await
            .expect("SSE");
        events.next_event().await.expect("open").expect("event");
        held.push(events);
    }
    let third = raw_request_within(
        stack.proxy,
        b"GET /docs/full/sse?count=1&hold=1 HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .expect("third stream");
    assert_eq!(raw_status(&third), Some(429));
    let text = String::from_utf8_lossy(&third);
    assert!(text.contains("Retry-After: 1"), "{text}");
    let upgrade = raw_request_within(
        stack.proxy,
        b"GET /docs/full/live HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .expect("upgrade");
    assert_eq!(
        raw_status(&upgrade),
        Some(429),
        "a WebSocket past the limit"
    );
    assert!(
        stack
            .backends
            .iter()
            .all(|b| b.open_websockets() == 0
                && !b.seen_targets().iter().any(|t| t.contains("live"))),
        "the refused upgrade reached a backend"
    );
    // Another document is not limited.
    let mut other = tether_testkit::sse_events(&stack.url("/docs/other/sse?count=1&hold=1"))
        .await
        .expect("SSE of another document");
    other.next_event().await.expect("open").expect("event");
    assert_eq!(
        metric(
            &stack,
            r#"tether_requests_refused_total{reason="streams_per_key"}"#
        )
        .await,
        Some(2.0)
    );
    // One of the document's streams ends: room for one more.
    drop(held.pop());
    let room = wait_until_async(Duration::from_secs(5), || async {
        top(&stack, "by=streams").await.1["documents"][0]["streams"] == 1
    })
    .await;
    assert!(room, "the ended stream is still counted");
    let mut again = tether_testkit::sse_events(&stack.url("/docs/full/sse?count=1&hold=1"))
        .await
        .expect("SSE after one ended");
    again.next_event().await.expect("open").expect("event");
}
