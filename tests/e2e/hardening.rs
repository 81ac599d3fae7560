//! End-to-end: malformed or oversized requests get the right 4xx from Tether and never reach a
//! backend (raw sockets, since client libraries refuse to send these bytes).

use crate::support::Stack;
use std::time::Duration;
use tether_testkit::{raw_request_within, raw_status};

const CONFIG: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
server:
  limits: { max_uri: 1024, max_header_bytes: 8192, max_header_line: 4096, max_headers: 20 }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    max_body: 1000
"#;

async fn status_of(stack: &Stack, request: &[u8]) -> Option<u16> {
    let response = raw_request_within(stack.proxy, request, Duration::from_secs(5))
        .await
        .expect("raw request");
    raw_status(&response)
}

fn received(stack: &Stack) -> u64 {
    stack.backends.iter().map(|b| b.requests()).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_status_and_never_reach_a_backend() {
    let stack = Stack::start(CONFIG).await;
    let long_target = format!(
        "GET /docs/a/{} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        "x".repeat(2000)
    );
    let big_header = format!(
        "GET /docs/a HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "y".repeat(5000)
    );
    let many_headers = format!(
        "GET /docs/a HTTP/1.1\r\nHost: h\r\n{}Connection: close\r\n\r\n",
        (0..30)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let big_block = format!(
        "GET /docs/a HTTP/1.1\r\nHost: h\r\n{}Connection: close\r\n\r\n",
        (0..3)
            .map(|i| format!("X-B{i}: {}\r\n", "z".repeat(3000)))
            .collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("target over max_uri", long_target.into_bytes(), 414),
        ("header over max_header_line", big_header.into_bytes(), 431),
        ("more than max_headers", many_headers.into_bytes(), 431),
        ("block over max_header_bytes", big_block.into_bytes(), 431),
        ("no Host on HTTP/1.1", b"GET /docs/a HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("two Host headers", b"GET /docs/a HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("Host with a space", b"GET /docs/a HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("Host with userinfo", b"GET /docs/a HTTP/1.1\r\nHost: a@b\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("Host with a bad port", b"GET /docs/a HTTP/1.1\r\nHost: h:99999\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("absolute form naming another host", b"GET http://other/docs/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec(), 400),
        ("TRACE", b"TRACE /docs/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec(), 405),
        ("declared body over max_body", b"POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n".to_vec(), 413),
    ];
    let before = received(&stack);
    for (what, request, expected) in &cases {
        assert_eq!(status_of(&stack, request).await, Some(*expected), "{what}");
    }
    assert_eq!(
        received(&stack),
        before,
        "a refused request reached a backend"
    );
    // Each refusal is counted by reason.
    let metrics = crate::support::metrics_text(&stack).await;
    for (reason, at_least) in [
        ("uri_too_long", 1.0),
        ("header_too_large", 3.0),
        ("bad_host", 3.0),
        ("method_not_allowed", 1.0),
        ("body_too_large", 1.0),
    ] {
        let series = format!("tether_requests_refused_total{{reason=\"{reason}\"}}");
        let got = crate::support::series_value(&metrics, &series).unwrap_or(0.0);
        assert!(got >= at_least, "{series} = {got}, expected >= {at_least}");
    }

    // The same requests within the limits pass.
    let fine = b"GET /docs/a HTTP/1.1\r\nHost: h:8080\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&stack, fine).await, Some(200));
    let small_body =
        b"POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    assert_eq!(status_of(&stack, small_body).await, Some(200));
    let absolute_same = b"GET http://h/docs/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&stack, absolute_same).await, Some(200));
    let http10 = b"GET /docs/a HTTP/1.0\r\n\r\n";
    assert_eq!(status_of(&stack, http10).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_body_that_grows_past_max_body_is_refused_with_413() {
    let stack = Stack::start(CONFIG).await;
    let chunk = "a".repeat(600);
    let request = format!(
        "POST /docs/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    assert_eq!(status_of(&stack, request.as_bytes()).await, Some(413));
}

#[tokio::test(flavor = "multi_thread")]
async fn only_websocket_upgrades_are_tunnelled_and_h2c_is_not() {
    let stack = Stack::start(CONFIG).await;
    let h2c = b"GET /docs/a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n";
    let response = raw_request_within(stack.proxy, h2c, Duration::from_secs(5))
        .await
        .expect("raw request");
    let text = String::from_utf8_lossy(&response);
    // Served as a plain request: no 101, and the backend never saw an upgrade offer.
    assert_eq!(raw_status(&response), Some(200), "{text}");
    let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
    let json_start = body.find('{').expect("echo body");
    let seen: serde_json::Value =
        serde_json::from_str(body[json_start..].trim_end_matches(|c| c != '}')).expect("json");
    assert!(seen["headers"].get("upgrade").is_none(), "{seen}");
    assert!(seen["headers"].get("http2-settings").is_none(), "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_port_never_serves_admin_or_metrics() {
    let stack = Stack::start(CONFIG).await;
    for path in ["/metrics", "/healthz", "/reload", "/config"] {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let response = raw_request_within(stack.proxy, request.as_bytes(), Duration::from_secs(5))
            .await
            .expect("raw request");
        let text = String::from_utf8_lossy(&response);
        assert_eq!(raw_status(&response), Some(404), "{path}: {text}");
        assert!(!text.contains("# TYPE"), "{path} served metrics");
    }
}

const LIMITED: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: by-ip
    match: { path_prefix: /ip/ }
    upstream: docs
    rate_limit: { by: client_ip, per_second: 5, burst: 2 }
  - name: by-key
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    rate_limit: { by: key, per_second: 5 }
"#;

async fn burst(stack: &Stack, path: &str, n: usize) -> (usize, usize, bool) {
    let (mut ok, mut limited, mut retry_after) = (0, 0, true);
    for _ in 0..n {
        let r = tether_testkit::http_get(&stack.url(path), &[])
            .await
            .expect("GET");
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                retry_after &= r.header("retry-after") == Some("1");
            }
            other => panic!("{path}: unexpected {other}"),
        }
    }
    (ok, limited, retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_route_answers_429_with_retry_after_and_keys_are_limited_apart() {
    let stack = Stack::start(LIMITED).await;
    let before = received(&stack);
    // 20 requests well within one second (or two windows at most): 5/s + burst 2.
    let (ok, limited, retry_after) = burst(&stack, "/ip/x", 20).await;
    assert!(limited >= 6, "only {limited} of 20 limited");
    assert!((7..=14).contains(&ok), "{ok} passed");
    assert!(retry_after, "429 without Retry-After: 1");
    assert_eq!(
        received(&stack) - before,
        ok as u64,
        "a limited request reached a backend"
    );
    // Per key: another document has its own allowance.
    let (a_ok, a_limited, _) = burst(&stack, "/docs/doc-a/x", 12).await;
    let (b_ok, _, _) = burst(&stack, "/docs/doc-b/x", 5).await;
    assert!(a_limited >= 1, "doc-a never limited ({a_ok} passed)");
    assert_eq!(b_ok, 5, "doc-b was limited by doc-a's traffic");
}

const SMUGGLED: &str = "GET /docs/s/__smuggled HTTP/1.1\r\nHost: h\r\n\r\n";

fn smuggled_arrived(stack: &Stack) -> bool {
    stack
        .backends
        .iter()
        .any(|b| b.seen_targets().iter().any(|t| t.contains("__smuggled")))
}

/// Sends `request` on one connection and returns the first status line's code.
async fn first_status(stack: &Stack, request: &str) -> Option<u16> {
    let response = raw_request_within(stack.proxy, request.as_bytes(), Duration::from_secs(3))
        .await
        .expect("raw request");
    raw_status(&response)
}

#[tokio::test(flavor = "multi_thread")]
async fn framing_attacks_are_refused_and_nothing_is_smuggled() {
    let stack = Stack::start(CONFIG).await;
    let cl_te = format!(
        "POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    let te_cl = format!(
        "POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
        SMUGGLED.len()
    );
    // CL + TE: Pingora drops the Content-Length, frames by chunked (RFC 9112 6.3) and closes the
    // connection after the response (6.1) — the RFC's alternative to a 400. Either way the
    // smuggled request must never arrive, and the connection must not be reused.
    for (what, request) in [("CL.TE", &cl_te), ("TE.CL", &te_cl)] {
        let started = std::time::Instant::now();
        let response = raw_request_within(stack.proxy, request.as_bytes(), Duration::from_secs(3))
            .await
            .expect("raw request");
        let text = String::from_utf8_lossy(&response);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: connection kept open"
        );
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{what}: {text}");
    }
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "space before colon",
            format!("POST /docs/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"),
            400,
        ),
        (
            "xchunked",
            format!("POST /docs/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"),
            400,
        ),
        (
            "chunked, identity",
            format!("POST /docs/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            400,
        ),
        (
            "two different Content-Lengths",
            format!("POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            400,
        ),
        (
            "Content-Length +5",
            format!("POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello{SMUGGLED}"),
            400,
        ),
        (
            "Content-Length overflow",
            format!("POST /docs/a HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551617\r\n\r\nh{SMUGGLED}"),
            400,
        ),
        (
            "HTTP/1.0 with chunked",
            format!("POST /docs/a HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            400,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, request, expected) in &cases {
        let got = first_status(&stack, request).await;
        if got != Some(*expected) {
            wrong.push(format!("{what}: got {got:?}, expected {expected}"));
        }
    }
    assert!(
        !smuggled_arrived(&stack),
        "a smuggled request reached a backend"
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_behind_a_local_reply_never_becomes_a_request() {
    let stack = Stack::start(CONFIG).await;
    // 404 (no route), 413 (declared body over max_body): the proxy answers itself.
    for head in ["POST /nowhere HTTP/1.1", "POST /docs/a HTTP/1.1"] {
        let body = if head.contains("nowhere") {
            SMUGGLED.to_string()
        } else {
            format!("{SMUGGLED}{}", "x".repeat(2000))
        };
        let request = format!(
            "{head}\r\nHost: h\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = first_status(&stack, &request).await;
    }
    assert!(!smuggled_arrived(&stack), "a body became a request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_sticky_key_gets_400_and_never_reaches_a_backend() {
    let stack = Stack::start(CONFIG).await;
    let before = received(&stack);
    let long = "k".repeat(300);
    for target in [
        format!("/docs/{long}/x"),
        "/docs/a%0Ab/x".to_string(),
        "/docs/a%zzb/x".to_string(),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        assert_eq!(
            status_of(&stack, request.as_bytes()).await,
            Some(400),
            "{target}"
        );
    }
    assert_eq!(received(&stack), before, "a bad key reached a backend");
}
