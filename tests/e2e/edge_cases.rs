//! End-to-end, the edge cases of request framing, header syntax, targets, WebSocket upgrades,
//! forwarding headers and misbehaving backends that `hardening.rs` does not cover: raw bytes on
//! real sockets, the status each gets, and a recording backend that proves a refused request
//! (or a smuggled one) never arrived.
//!
//! Every case marks its target with `__cN` so the backends' logs show whether it arrived.

use crate::support::{start_faulty, RawBackend, Stack};
use std::time::Duration;
use tether_testkit::{raw_request_within, raw_status};

const CONFIG: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    max_body: 1000
  - name: by-cookie
    match: { path_prefix: /c/ }
    sticky: { keys: [ { cookie: doc } ] }
    upstream: docs
"#;

const SMUGGLED: &str = "GET /docs/s/__smuggled HTTP/1.1\r\nHost: h\r\n\r\n";

/// Bodies on any method, bad chunk syntax and pipelining never let a request
/// hide inside another one.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_chunks_and_pipelines_never_smuggle_a_request() {
    let stack = Stack::start(CONFIG).await;
    let n = SMUGGLED.len();
    let requests = [
        ("GET with a body", format!("GET /docs/a/x HTTP/1.1\r\nHost: h\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{SMUGGLED}")),
        ("OPTIONS with a body", format!("OPTIONS /docs/a/x HTTP/1.1\r\nHost: h\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{SMUGGLED}")),
        ("Connection names Content-Length", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nConnection: Content-Length, close\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("chunk size overflow", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nab\r\n0\r\n\r\n{SMUGGLED}")),
        ("0x chunk size", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
        ("negative chunk size", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
        ("missing CRLF after chunk data", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n{SMUGGLED}")),
        ("framing fields in trailers", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("chunk extension over 4 KiB", format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n{SMUGGLED}", "e".repeat(9000))),
    ];
    for (item, request) in &requests {
        let response = send(&stack, request.as_bytes()).await;
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.matches("HTTP/1.1 ").count() <= 1,
            "{item}: more than one response: {text}"
        );
    }
    assert!(
        !arrived(&stack, "__smuggled"),
        "a smuggled request reached a backend"
    );

    // Two pipelined requests for two documents in one write. Pipelining is off (Pingora's
    // default, a smaller attack surface): the first is answered by its key's backend, the
    // connection closes and the second is never served by anyone, so the client retries it
    // (RFC 9112 9.3.2). Never a response meant for the other document.
    let owner = |key: &'static str| {
        let stack = &stack;
        async move {
            let request =
                format!("GET /docs/{key}/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
            let r = send(stack, request.as_bytes()).await;
            String::from_utf8_lossy(&r)
                .lines()
                .find_map(|l| l.strip_prefix("x-backend: "))
                .map(str::to_owned)
                .expect("x-backend")
        }
    };
    let first = owner("pipe-1").await;
    let both = send(
        &stack,
        b"GET /docs/pipe-1/x HTTP/1.1\r\nHost: h\r\n\r\nGET /docs/pipe-2/__second HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&both);
    let backends: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("x-backend: "))
        .collect();
    assert_eq!(backends, [first.as_str()], "{text}");
    assert!(
        !arrived(&stack, "__second"),
        "the pipelined request was served"
    );
}

/// A request pipelined right behind a body the head's read cut (so the proxy reads the rest
/// of the body before sending anything): the POST gets its answer with exactly its body, the
/// connection closes, and the request behind it reaches no backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_pipelined_behind_a_cut_body_is_not_served() {
    let stack = Stack::start(&CONFIG.replace("max_body: 1000", "max_body: 10000")).await;
    let body = "b".repeat(3000);
    let request = format!(
        "POST /docs/pipe-3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3000\r\n\r\n{body}\
         GET /docs/pipe-3/__behind_the_body HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    );
    let response = send(&stack, request.as_bytes()).await;
    let text = String::from_utf8_lossy(&response);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !arrived(&stack, "__behind_the_body"),
        "the pipelined request was served"
    );
    // The backend echoes the body it got: all of it, nothing of the request behind it.
    assert!(text.contains(&format!("\"body\":\"{body}\"")), "{text}");
}

fn arrived(stack: &Stack, marker: &str) -> bool {
    stack
        .backends
        .iter()
        .any(|b| b.seen_targets().iter().any(|t| t.contains(marker)))
}

async fn send(stack: &Stack, request: &[u8]) -> Vec<u8> {
    raw_request_within(stack.proxy, request, Duration::from_secs(3))
        .await
        .expect("raw request")
}

/// A refused request: the status is one of `allowed` and its target never reached a backend.
struct Refused {
    item: &'static str,
    request: Vec<u8>,
    allowed: &'static [u16],
}

fn refused(item: &'static str, request: impl Into<Vec<u8>>, allowed: &'static [u16]) -> Refused {
    Refused {
        item,
        request: request.into(),
        allowed,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_fields_methods_and_versions_are_refused_and_never_forwarded() {
    let stack = Stack::start(CONFIG).await;
    let end = "Connection: close\r\n\r\n";
    let cases = vec![
        refused("NUL in a value", format!("GET /docs/a/__c1 HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n{end}"), &[400]),
        refused("bare CR in a value", format!("GET /docs/a/__c2 HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n{end}"), &[400]),
        refused("obs-fold", format!("GET /docs/a/__c4 HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n{end}"), &[400]),
        refused("space before colon", format!("GET /docs/a/__c5 HTTP/1.1\r\nHost: h\r\nX-A : b\r\n{end}"), &[400]),
        refused("whitespace-led first field", format!("GET /docs/a/__c6 HTTP/1.1\r\n X: y\r\nHost: h\r\n{end}"), &[400]),
        refused("name with parentheses", format!("GET /docs/a/__c7 HTTP/1.1\r\nHost: h\r\nX(T): v\r\n{end}"), &[400]),
        refused("name with a space", format!("GET /docs/a/__c8 HTTP/1.1\r\nHost: h\r\nX T: v\r\n{end}"), &[400]),
        refused("non-ASCII name", format!("GET /docs/a/__c9 HTTP/1.1\r\nHost: h\r\nX\u{e9}: v\r\n{end}"), &[400]),
        refused("empty name", format!("GET /docs/a/__c10 HTTP/1.1\r\nHost: h\r\n: v\r\n{end}"), &[400]),
        refused("CONNECT to an internal port", format!("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n{end}"), &[405, 400]),
        refused("OPTIONS *", format!("OPTIONS * HTTP/1.1\r\nHost: h\r\n{end}"), &[400, 404]),
        refused("HTTP/1.1x", format!("GET /docs/a/__c12 HTTP/1.1x\r\nHost: h\r\n{end}"), &[400, 505]),
        refused("lower-case version", format!("GET /docs/a/__c13 http/1.1\r\nHost: h\r\n{end}"), &[400, 505]),
        refused("HTTP/2.0 on the h1 port", format!("GET /docs/a/__c14 HTTP/2.0\r\nHost: h\r\n{end}"), &[400, 505]),
        refused("2 MiB header block", format!("GET /docs/a/__c15 HTTP/1.1\r\nHost: h\r\n{}{end}", "X-Big: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(28_000)), &[431, 400]),
        refused("32 KiB cookie on a cookie route", format!("GET /c/__c16 HTTP/1.1\r\nHost: h\r\nCookie: doc=a; pad={}\r\n{end}", "p".repeat(32 * 1024)), &[431]),
        refused("encoded slash", format!("GET /docs/a%2F..%2F__c17 HTTP/1.1\r\nHost: h\r\n{end}"), &[400]),
        refused("backslash", format!("GET /docs/a\\..\\__c18 HTTP/1.1\r\nHost: h\r\n{end}"), &[400]),
        refused("encoded NUL", format!("GET /docs/a%00/__c19 HTTP/1.1\r\nHost: h\r\n{end}"), &[400]),
        refused("overlong UTF-8 dot", format!("GET /docs/a/%C0%AE%C0%AE/__c20 HTTP/1.1\r\nHost: h\r\n{end}"), &[400]),
        refused("two doc cookies", format!("GET /c/__c22 HTTP/1.1\r\nHost: h\r\nCookie: doc=a; doc=b\r\n{end}"), &[400]),
        refused("doc cookies in two headers", format!("GET /c/__c25 HTTP/1.1\r\nHost: h\r\nCookie: doc=a\r\nCookie: x=1; doc=b\r\n{end}"), &[400]),
        refused("WebSocket upgrade without a key", format!("GET /docs/a/__c23 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{end}"), &[400]),
        refused("Expect: 100-continue over max_body", format!("POST /docs/a/__c24 HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n{end}"), &[413]),
    ];
    let mut wrong = Vec::new();
    for case in &cases {
        let response = send(&stack, &case.request).await;
        let status = raw_status(&response);
        if !status.is_some_and(|s| case.allowed.contains(&s)) {
            wrong.push(format!(
                "{}: got {status:?}, expected one of {:?}: {}",
                case.item,
                case.allowed,
                String::from_utf8_lossy(&response[..response.len().min(200)])
            ));
        }
    }
    for b in &stack.backends {
        for target in b.seen_targets().iter().filter(|t| t.contains("__c")) {
            wrong.push(format!("{target} reached a backend"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Still serving.
    let ok = send(
        &stack,
        b"GET /docs/a/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&ok), Some(200));
    // D6 fragment: Pingora's parser drops it before any hook sees the target, so the router and
    // the backend agree on the path; it is never forwarded.
    let fragment = send(
        &stack,
        b"GET /docs/a/frag#__x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&fragment), Some(200));
    assert!(arrived(&stack, "/docs/a/frag"));
    assert!(!arrived(&stack, "#"), "a fragment was forwarded");
}

/// Starts tether in front of one raw backend answering `answer`; returns the client's view of
/// `GET /x` (all bytes until close).
async fn through_faulty_backend(answer: &[u8], request: &[u8]) -> Vec<u8> {
    let backend = RawBackend::start(answer.to_vec(), false).await;
    let (tether, proxy) = start_faulty(backend.addr, "").await;
    let response = raw_request_within(proxy, request, Duration::from_secs(6))
        .await
        .expect("raw request");
    drop(tether);
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_backend_responses_become_502_and_are_never_passed_on() {
    let get = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".as_slice();
    let upgrade = b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".as_slice();
    let big_head = format!(
        "HTTP/1.1 200 OK\r\n{}Content-Length: 2\r\n\r\nok",
        "X-Pad: 0123456789012345678901234567890123456789012345678901234567890123\r\n".repeat(1500)
    );
    // (item, what the backend answers, what the client sends, statuses allowed)
    type Case<'a> = (&'a str, Vec<u8>, &'a [u8], &'a [u16]);
    let cases: Vec<Case> = vec![
        ("garbage head", b"HELLO WORLD\r\n\r\n".to_vec(), get, &[502]),
        ("HTTP/0.9 answer", b"just a body, no head".to_vec(), get, &[502]),
        ("two different Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nok".to_vec(), get, &[502]),
        ("invalid Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok".to_vec(), get, &[502]),
        ("response head over 64 KiB", big_head.into_bytes(), get, &[502]),
        ("101 to a request without Upgrade", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(), get, &[502]),
        ("101 with a wrong Sec-WebSocket-Accept", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n".to_vec(), upgrade, &[502]),
        ("101 without Sec-WebSocket-Accept", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(), upgrade, &[502]),
    ];
    let mut wrong = Vec::new();
    for (item, answer, request, allowed) in cases {
        let response = through_faulty_backend(&answer, request).await;
        let status = raw_status(&response);
        if !status.is_some_and(|s| allowed.contains(&s)) {
            wrong.push(format!(
                "{item}: got {status:?}: {}",
                String::from_utf8_lossy(&response[..response.len().min(300)])
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_reset_mid_body_reaches_the_client_as_a_truncated_close() {
    // Content-Length 100000, 1000 bytes, then the backend closes.
    let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
    answer.extend(std::iter::repeat_n(b'a', 1000));
    let response = through_faulty_backend(
        &answer,
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(
        body.len() < 100_000,
        "a truncated body was completed: {} bytes",
        body.len()
    );
    assert!(
        text.contains("content-length: 100000") || text.contains("Content-Length: 100000"),
        "{}",
        &text[..text.len().min(300)]
    );
}

/// The backend's view of one request: its echoed JSON (`headers` has lower-case names).
async fn echoed(stack: &Stack, request: &str) -> (Option<u16>, serde_json::Value) {
    let response = send(stack, request.as_bytes()).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (raw_status(&response), json)
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_tokens_and_underscore_headers_are_handled_safely() {
    let stack = Stack::start(CONFIG).await;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    // An upgrade offer on POST is not a WebSocket upgrade: never a 101.
    let (status, _) = echoed(
        &stack,
        &format!("POST /docs/a/x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n{key}Content-Length: 0\r\n\r\n"),
    )
    .await;
    assert_ne!(status, Some(101), "POST was upgraded");
    // HTTP/1.0 has no upgrades.
    let (status, _) = echoed(
        &stack,
        &format!("GET /docs/a/x HTTP/1.0\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}\r\n"),
    )
    .await;
    assert_ne!(status, Some(101), "HTTP/1.0 was upgraded");
    // An unsupported version gets 426 naming version 13; never a tunnel.
    let response = send(&stack, format!("GET /docs/a/__e3 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 1337\r\n{key}\r\n").as_bytes()).await;
    let text = String::from_utf8_lossy(&response);
    assert_eq!(raw_status(&response), Some(426), "{text}");
    assert!(
        text.to_lowercase().contains("sec-websocket-version: 13"),
        "{text}"
    );
    assert!(!arrived(&stack, "__e3"));
    let (status, _) = echoed(
        &stack,
        &format!("GET /docs/a/x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 1337\r\n{key}\r\n"),
    )
    .await;
    assert!(
        status.is_some_and(|s| s != 101 && s >= 400),
        "version 1337 got {status:?}"
    );
    // H2c is never offered to a backend, alone or beside websocket.
    let (status, seen) = echoed(
        &stack,
        "GET /docs/a/x HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n\r\n",
    )
    .await;
    assert_eq!(status, Some(200));
    assert!(
        seen["headers"].get("upgrade").is_none(),
        "h2c offered: {seen}"
    );
    // Underscore spellings of forwarding headers never reach the backend as given.
    let (status, seen) = echoed(
        &stack,
        "GET /docs/a/x HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real_IP: 6.6.6.6\r\nConnection: close\r\n\r\n",
    )
    .await;
    if status == Some(200) {
        let headers = seen["headers"].to_string();
        assert!(
            !headers.contains("6.6.6.6"),
            "spoofed address forwarded: {headers}"
        );
    } else {
        assert_eq!(status, Some(400), "F2");
    }
}

/// Tether (`send_timeout` 2 s) in front of a backend answering `answer`; a client with a small
/// receive buffer sends `request` and plays the slow reader: reads nothing for 5 s, notes the
/// proxy's RSS (kB), then drains the connection for up to 20 s. Returns the bytes received,
/// the RSS, and whether the connection ended.
async fn stall_then_drain(answer: Vec<u8>, request: &[u8]) -> (usize, u64, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = RawBackend::start(answer, true).await;
    let (tether, proxy) = start_faulty(backend.addr, "{ send_timeout: 2s }").await;
    let pid = tether.pid().expect("pid");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(proxy).await.expect("connect");
    stream.write_all(request).await.expect("write");
    // The stimulus, not a wait for the proxy.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    let mut received = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await
    .is_ok();
    (received, rss_kb, drained)
}

/// A client that never reads a 50 MB response is disconnected at the send timeout;
/// the proxy holds only its bounded buffers meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_disconnected_at_the_send_timeout() {
    const SIZE: usize = 50 * 1024 * 1024;
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes();
    answer.resize(answer.len() + SIZE, b'z');
    let (received, rss_kb, drained) = stall_then_drain(
        answer,
        b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(drained, "the connection was still open 25 s later");
    assert!(
        received < SIZE / 2,
        "{received} bytes arrived: the stalled client was not disconnected"
    );
    assert!(
        rss_kb < 100 * 1024,
        "proxy RSS {rss_kb} kB with one stalled client"
    );
    println!("stalled reader: {received} bytes before the close, proxy RSS {rss_kb} kB");
}

/// A backend that answers an upgrade request with 200 (no 101) leaves the client
/// connection HTTP: later bytes are parsed and forwarded as requests (with Tether's forwarding
/// headers), never tunnelled raw; bytes pipelined behind the upgrade request are not tunnelled
/// either.
#[tokio::test(flavor = "multi_thread")]
async fn no_tunnel_opens_unless_the_backend_switched_protocols() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        true,
    )
    .await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    let upgrade = "GET /up HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let after = "GET /__after HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";

    // The upgrade is answered 200, then the client sends another request.
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    stream.write_all(upgrade.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("a response")
        .expect("read");
    assert_eq!(raw_status(&buf[..n]), Some(200));
    let _ = stream.write_all(after.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut rest),
    )
    .await;

    // Request bytes pipelined right behind the upgrade request, before any answer.
    let e2 = raw_request_within(
        proxy,
        format!("{upgrade}{}", after.replace("__after", "__pipelined")).as_bytes(),
        std::time::Duration::from_secs(5),
    )
    .await
    .expect("raw request");
    assert_eq!(raw_status(&e2), Some(200));

    // Whatever reached the backend after the upgrade request came as proxied HTTP requests.
    let seen = backend.received();
    for marker in ["__after", "__pipelined"] {
        for (at, _) in seen.match_indices(marker) {
            let head_end = seen[at..].find("\r\n\r\n").map_or(seen.len(), |e| at + e);
            assert!(
                seen[at..head_end].to_lowercase().contains("x-request-id:"),
                "{marker} reached the backend raw, not as a proxied request: {}",
                &seen[at..head_end]
            );
        }
    }
}

/// The RFC 6455 example key and the accept a backend must answer to it.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
    )
}

/// A backend's valid 101 to [`upgrade_request`].
fn switching_protocols() -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    )
    .into_bytes()
}

/// Reads from `stream` until `done` says the bytes so far are enough, or 5 s pass.
async fn read_until(stream: &mut tokio::net::TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !done(&got) {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    got
}

/// A backend that refuses a WebSocket upgrade (here 403 with a chunked body) is passed on to
/// the client whole: status, body, and framing the client can read; the upgrade request went
/// out as exactly `Upgrade: websocket` with Tether's forwarding headers.
#[tokio::test(flavor = "multi_thread")]
async fn a_backends_refusal_of_an_upgrade_reaches_the_client_whole() {
    let backend = RawBackend::start(
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nX-Why: auth\r\n\r\n\
          5\r\nnope!\r\n0\r\n\r\n"
            .to_vec(),
        true,
    )
    .await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    let response = raw_request_within(
        proxy,
        upgrade_request("/refused").as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .expect("raw request");
    let text = String::from_utf8_lossy(&response).to_string();
    assert_eq!(raw_status(&response), Some(403), "{text}");
    let lower = text.to_lowercase();
    assert!(lower.contains("x-why: auth"), "{text}");
    // Relayed as the backend framed it, then the connection closes.
    assert!(lower.contains("transfer-encoding: chunked"), "{text}");
    assert!(lower.contains("connection: close"), "{text}");
    assert!(text.ends_with("\r\n\r\n5\r\nnope!\r\n0\r\n\r\n"), "{text}");
    let seen = backend.received().to_lowercase();
    assert!(seen.contains("upgrade: websocket\r\n"), "{seen}");
    assert!(seen.contains("connection: upgrade\r\n"), "{seen}");
    assert!(seen.contains("x-request-id:"), "{seen}");
}

/// Bytes a backend sends right behind its 101 (a greeting message in the same segment) reach
/// the client right after the 101, and the client's frames reach the backend.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_sent_with_the_101_reach_the_client_and_frames_flow_both_ways() {
    use tokio::io::AsyncWriteExt;
    let greeting = b"\x81\x05hello";
    let mut answer = switching_protocols();
    answer.extend_from_slice(greeting);
    let backend = RawBackend::start(answer, true).await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    stream
        .write_all(upgrade_request("/greeted").as_bytes())
        .await
        .expect("write");
    let got = read_until(&mut stream, |got| {
        got.windows(greeting.len()).any(|w| w == greeting)
    })
    .await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert_eq!(raw_status(&got), Some(101), "{text}");
    assert!(text.contains(WS_ACCEPT), "{text}");
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    assert_eq!(&got[head_end + 4..], greeting, "{text}");
    // A masked text frame "ping" from the client.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 4];
    frame.extend_from_slice(&mask);
    frame.extend(b"ping".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    stream.write_all(&frame).await.expect("write frame");
    let arrived = tether_testkit::wait_until_async(Duration::from_secs(5), || {
        let seen = backend.received_bytes();
        let frame = frame.clone();
        async move { seen.windows(frame.len()).any(|w| w == frame.as_slice()) }
    })
    .await;
    assert!(arrived, "the client's frame never reached the backend");
}

/// Tether's close frame never lands inside a frame: when the proxy stops while a backend is in
/// the middle of a message, the rest of that frame reaches the client first, then the close
/// frame (1001).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_lets_the_frame_in_flight_finish_before_the_close_frame() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (send_rest, rest_wanted) = tokio::sync::oneshot::channel::<()>();
    let backend = tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        // The 101, then the first half of a 100-byte binary frame.
        let mut first = switching_protocols();
        first.extend_from_slice(&[0x82, 100]);
        first.extend_from_slice(&[b'a'; 50]);
        if socket.write_all(&first).await.is_err() || rest_wanted.await.is_err() {
            return;
        }
        let _ = socket.write_all(&[b'b'; 50]).await;
        while matches!(socket.read(&mut chunk).await, Ok(n) if n > 0) {}
    });
    let (tether, proxy) = start_faulty(addr, "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    stream
        .write_all(upgrade_request("/mid-frame").as_bytes())
        .await
        .expect("write");
    let got = read_until(&mut stream, |got| {
        got.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|end| got.len() >= end + 4 + 52)
    })
    .await;
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the 101")
        + 4;
    assert_eq!(raw_status(&got), Some(101));
    tether
        .signal(tether_testkit::Signal::SIGTERM)
        .expect("SIGTERM");
    // The stimulus: the backend is still in the middle of its frame when the stop begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = send_rest.send(());
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection was not closed");
    let mut after_head = got[head_end..].to_vec();
    after_head.extend_from_slice(&rest);
    let mut expected = vec![0x82, 100];
    expected.extend_from_slice(&[b'a'; 50]);
    expected.extend_from_slice(&[b'b'; 50]);
    assert!(
        after_head.starts_with(&expected),
        "the frame was cut: {:?}",
        String::from_utf8_lossy(&after_head)
    );
    let close = &after_head[expected.len()..];
    assert!(
        close.len() >= 4 && close[0] == 0x88 && close[2..4] == 1001u16.to_be_bytes(),
        "no 1001 close frame after the frame: {close:?}"
    );
    backend.abort();
}

/// E10 for tunnels: a WebSocket client that stops reading while its backend keeps sending is
/// disconnected at `send_timeout`; the proxy does not buffer the backend's output for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_client_that_stops_reading_is_disconnected_at_the_send_timeout() {
    const SIZE: usize = 50 * 1024 * 1024;
    let mut answer = switching_protocols();
    // One binary frame of SIZE bytes (64-bit length).
    answer.extend_from_slice(&[0x82, 127]);
    answer.extend_from_slice(&(SIZE as u64).to_be_bytes());
    answer.resize(answer.len() + SIZE, b'z');
    let (received, rss_kb, drained) =
        stall_then_drain(answer, upgrade_request("/flood").as_bytes()).await;
    assert!(drained, "the tunnel was still open 25 s later");
    assert!(
        received > 0 && received < SIZE / 2,
        "{received} bytes arrived: the stalled client was not disconnected"
    );
    assert!(
        rss_kb < 100 * 1024,
        "proxy RSS {rss_kb} kB with one stalled client"
    );
    println!("stalled WebSocket reader: {received} bytes before the close, proxy RSS {rss_kb} kB");
}

const BLACKHOLE: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    connect_timeout: 500ms
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    retries: 2
    timeouts: { read: 1s }
"#;

/// A backend whose accept queue is full never completes a connect; its keys go to the next
/// owner after `connect_timeout`. H7: a backend that trickles its body slower than the read
/// timeout is cut off, and the client sees a truncated response, never a complete-looking one.
#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_backend_is_skipped_after_the_connect_timeout() {
    // A listener with a backlog of 0 that never accepts: once its queue holds one connection,
    // further SYNs are dropped and connects hang.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let blackhole = socket.listen(0).expect("listen");
    let hole = blackhole.local_addr().expect("addr");
    let mut fillers = Vec::new();
    while fillers.len() < 8 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(hole),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break, // the queue is full: connects now hang
        }
    }
    let b1 = tether_testkit::TestBackend::start("b1").await;
    let b2 = tether_testkit::TestBackend::start("b2").await;
    let proxy = tether_testkit::free_addr();
    let admin = tether_testkit::free_addr();
    let config = crate::support::fill(BLACKHOLE, proxy, admin, &[hole, b1.addr(), b2.addr()], &[]);
    let _tether = crate::support::start_listening(&config, proxy, admin).await;
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let started = std::time::Instant::now();
        let r = tether_testkit::http_get(&format!("http://{proxy}/docs/k{i}/x"), &[])
            .await
            .expect("GET");
        assert_eq!(r.status, 200, "k{i}: {}", r.text());
        slowest = slowest.max(started.elapsed());
    }
    // Keys owned by the blackhole cost one connect timeout (500 ms), never more.
    println!(
        "slowest of 30 requests: {slowest:?} ({} queued connects filled the backlog)",
        fillers.len()
    );
    assert!(
        slowest >= Duration::from_millis(450),
        "no request met the blackhole ({slowest:?}): the test did not test anything"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "slowest request {slowest:?}"
    );
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickling_backend_body_is_cut_at_the_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let backend = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
                    .await;
                // Then one byte every 5 s: slower than the route's 3 s read timeout.
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if stream.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (_tether, proxy) = start_faulty(addr, "").await;
    let started = std::time::Instant::now();
    let response = raw_request_within(
        proxy,
        b"GET /trickle HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        Duration::from_secs(15),
    )
    .await
    .expect("raw request");
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(body.len() < 100, "a truncated body was completed: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cut after {:?}, read timeout 3s",
        started.elapsed()
    );
    backend.abort();
}

/// Bytes a backend sends past its Content-Length (here a whole forged response) never
/// become another request's response: the upstream connection is not reused with them.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_past_a_responses_content_length_never_answer_another_request() {
    let backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
            .to_vec(),
        true,
    )
    .await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    for i in 0..10 {
        let response = raw_request_within(
            proxy,
            format!("GET /a{i} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await
        .expect("raw request");
        let text = String::from_utf8_lossy(&response);
        assert!(
            !text.contains("EVIL"),
            "request {i} got the forged response: {text}"
        );
    }
}

/// A backend that takes each request on a fresh connection and closes it unanswered (a
/// process killed with the request on it): a GET, which may be sent twice, goes on to the next
/// owner and is answered; a POST is never sent twice and gets 502. Each close is
/// counted as reset for passive health.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_whose_backend_closes_unanswered_goes_to_the_next_owner() {
    // Reads each request head and closes without a byte.
    let dropper_backend = RawBackend::start(Vec::new(), false).await;
    let dropper = dropper_backend.addr;
    let taken = |method: &str| {
        dropper_backend
            .received()
            .matches(&format!("{method} /docs/"))
            .count()
    };
    let good = tether_testkit::TestBackend::start("good").await;
    let proxy = tether_testkit::free_addr();
    let admin = tether_testkit::free_addr();
    let config = format!(
        "listeners: [ {{ address: {proxy} }} ]\nadmin: {{ address: {admin} }}\nupstreams:\n  docs:\n    backends: [ {{ address: {dropper} }}, {{ address: {} }} ]\nroutes:\n  - name: docs\n    match: {{ path_prefix: /docs/ }}\n    sticky: {{ keys: [ {{ path: \"/docs/{{key}}\" }} ] }}\n    upstream: docs\n",
        good.addr()
    );
    let _tether = crate::support::start_listening(&config, proxy, admin).await;
    let mut refused = 0;
    for k in 0..20 {
        let post = format!(
            "POST /docs/post-{k}/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        let response = raw_request_within(proxy, post.as_bytes(), Duration::from_secs(5))
            .await
            .expect("POST");
        match raw_status(&response) {
            Some(200) => {}
            Some(502) => refused += 1,
            other => panic!("POST {k}: {other:?}"),
        }
    }
    // Every POST the dropper took (each once) was answered 502, and no other.
    assert_eq!(refused, taken("POST"));
    assert!(refused > 0, "no key of 20 was the dropper's");
    for k in 0..20 {
        let get = format!("GET /docs/get-{k}/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let response = raw_request_within(proxy, get.as_bytes(), Duration::from_secs(5))
            .await
            .expect("GET");
        assert_eq!(
            raw_status(&response),
            Some(200),
            "GET {k}: {}",
            String::from_utf8_lossy(&response)
        );
    }
    let gets = taken("GET");
    assert!(
        gets > 0,
        "no GET reached the dropper: the test showed nothing"
    );
    eprintln!("dropper took {refused} POSTs and {gets} GETs, all GETs answered");
}
