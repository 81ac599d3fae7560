//! End-to-end, HTTP/2 on a TLS listener, driven by the `h2` crate's client
//! (which sends what hyper would refuse to): the advertised stream limit, a header-list bomb, a
//! rapid-reset flood and a Content-Length that disagrees with the DATA. The proxy stays up,
//! keeps serving, and nothing malformed reaches a backend. Convergence ends HTTP/2 streams
//! as it ends HTTP/1 ones, and a client resetting its stream ends it in the proxy at once.

use crate::support::tls::Ca;
use crate::support::{assert_arrived_whole, start_read_counting_backend, Stack};
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request};
use std::time::Duration;
use tether_testkit::{https_requests, tls_connect, Alpn, LaunchOptions};

const CONFIG: &str = r#"
listeners:
  - address: $PROXY
    tls: { cert: cert.pem, key: key.pem }
admin: { address: $ADMIN }
server:
  limits: { max_concurrent_streams: 10, max_header_bytes: 8192 }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: long-poll
    match: { path_prefix: /lp/ }
    sticky: { keys: [ { path: "/lp/{key}" } ] }
    upstream: docs
    long_poll: true
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
    limits: { streams_per_key: 2 }
"#;

async fn start(ca: &Ca) -> Stack {
    start_config(ca, CONFIG).await
}

/// [`start`] with another config (its TLS files named `cert.pem` and `key.pem`).
async fn start_config(ca: &Ca, config: &str) -> Stack {
    let (cert, key, _) = ca.leaf();
    let files: &[(&str, &[u8])] = &[("cert.pem", cert.as_bytes()), ("key.pem", key.as_bytes())];
    Stack::start_with(
        config,
        LaunchOptions {
            files,
            ..LaunchOptions::default()
        },
    )
    .await
}

/// An h2 client connection; the connection task runs until dropped with the test.
async fn h2_client(stack: &Stack, ca: &Ca) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tls = tls_connect(stack.proxy, "localhost", ca.cert.der(), Alpn::H2)
        .await
        .expect("TLS");
    assert_eq!(tls.alpn.as_deref(), Some(b"h2".as_slice()));
    let (send, connection) = h2::client::handshake(tls.stream)
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, task)
}

fn get(path: &str) -> Request<()> {
    Request::builder()
        .method(Method::GET)
        .uri(format!("https://localhost{path}"))
        .body(())
        .expect("request")
}

/// Status of one GET on `send`, or None if the stream or connection failed.
async fn status(send: &mut SendRequest<Bytes>, request: Request<()>) -> Option<u16> {
    let mut ready = send.clone().ready().await.ok()?;
    let (response, _) = ready.send_request(request, true).ok()?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .ok()?
        .ok()?;
    *send = ready;
    Some(response.status().as_u16())
}

async fn still_serving(stack: &Stack, ca: &Ca) {
    let tls = tls_connect(stack.proxy, "localhost", ca.cert.der(), Alpn::H2)
        .await
        .expect("TLS after the attack");
    let r = https_requests(tls, "localhost", &[(Method::GET, "/docs/ok/x", vec![])])
        .await
        .expect("request after the attack");
    assert_eq!(r[0].status, 200);
}

fn arrived(stack: &Stack, marker: &str) -> bool {
    stack
        .backends
        .iter()
        .any(|b| b.seen_targets().iter().any(|t| t.contains(marker)))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_limit_is_advertised_and_more_requests_queue_behind_it() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let tls = tls_connect(stack.proxy, "localhost", ca.cert.der(), Alpn::H2)
        .await
        .expect("TLS");
    let (mut send, mut connection) = h2::client::handshake(tls.stream).await.expect("h2");
    // Drive the connection by hand for the first request, to read the server's SETTINGS after.
    let first = {
        let request = status(&mut send, get("/docs/a/x"));
        tokio::pin!(request);
        tokio::select! {
            got = &mut request => got,
            _ = &mut connection => panic!("connection ended"),
        }
    };
    assert_eq!(first, Some(200));
    // SETTINGS_MAX_CONCURRENT_STREAMS is server.limits.max_concurrent_streams.
    assert_eq!(connection.max_concurrent_send_streams(), 10);
    let _task = tokio::spawn(async move {
        let _ = connection.await;
    });
    // 30 at once: the client queues behind the limit and every one is answered.
    let mut pending = Vec::new();
    for i in 0..30 {
        let mut send = send.clone();
        pending.push(tokio::spawn(async move {
            status(&mut send, get(&format!("/docs/k{i}/slow?ms=100"))).await
        }));
    }
    for p in pending {
        assert_eq!(p.await.expect("join"), Some(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_list_bomb_never_reaches_a_backend() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let (mut send, _task) = h2_client(&stack, &ca).await;
    // 40 headers of 1 KiB: 40 KiB of header list against an 8 KiB limit.
    let mut request = get("/docs/a/__bomb");
    for i in 0..40 {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-bomb-{i}").as_bytes()).expect("name"),
            http::HeaderValue::from_str(&"b".repeat(1024)).expect("value"),
        );
    }
    let got = status(&mut send, request).await;
    assert!(
        got.is_none_or(|s| s == 431 || s == 400),
        "a 40 KiB header list got {got:?}"
    );
    assert!(
        !arrived(&stack, "__bomb"),
        "the header bomb reached a backend"
    );
    still_serving(&stack, &ca).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rapid_reset_flood_is_cut_off_and_the_proxy_keeps_serving() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let (send, task) = h2_client(&stack, &ca).await;
    // (CVE-2023-44487) open streams and cancel them at once, as fast as possible.
    let mut sent = 0;
    let mut send = Some(send);
    while sent < 2_000 {
        let Some(ready) = send.take() else { break };
        let Ok(Ok(mut ready_send)) =
            tokio::time::timeout(Duration::from_secs(5), ready.ready()).await
        else {
            break;
        };
        match ready_send.send_request(get(&format!("/docs/r{sent}/__reset")), true) {
            Ok((response, _)) => {
                drop(response); // dropping the response future resets the stream (CANCEL)
                sent += 1;
                send = Some(ready_send);
            }
            Err(_) => break,
        }
    }
    // The server either kept up or sent GOAWAY; either way the connection is bounded and the
    // proxy serves a new one.
    task.abort();
    println!("{sent} streams opened and reset before the connection ended");
    still_serving(&stack, &ca).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_content_length_that_disagrees_with_the_data_is_a_stream_error() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    for (declared, sent) in [(10usize, 3usize), (3, 10)] {
        let (send, _task) = h2_client(&stack, &ca).await;
        let mut ready = send.ready().await.expect("ready");
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("https://localhost/docs/a/__cl{declared}"))
            .header(http::header::CONTENT_LENGTH, declared)
            .body(())
            .expect("request");
        let (response, mut body) = ready.send_request(request, false).expect("send");
        let _ = body.send_data(Bytes::from(vec![b'x'; sent]), true);
        let got = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("no answer within 10 s");
        // A stream error, never a normal answer with the body cut or padded.
        assert!(
            got.as_ref().map_or(true, |r| r.status().as_u16() >= 400),
            "content-length {declared} with {sent} bytes got {:?}",
            got.map(|r| r.status())
        );
    }
    still_serving(&stack, &ca).await;
}

/// Streams of one kind open in the proxy (`tether_streams_open`, all routes and backends).
async fn open_streams(stack: &Stack, kind: &str) -> f64 {
    crate::support::metrics_text(stack)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("tether_streams_open{") && l.contains(&format!("kind=\"{kind}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The body of an h2 response up to the first SSE event, and the backend that sent it.
async fn first_event(body: &mut h2::RecvStream) -> String {
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\n\n") {
        let data = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("first event in time")
            .expect("stream open")
            .expect("data");
        let _ = body.flow_control().release_capacity(data.len());
        seen.extend_from_slice(&data);
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    let json = text
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .expect("data line");
    let event: serde_json::Value = serde_json::from_str(json.trim()).expect("event json");
    event["backend"].as_str().expect("backend").to_string()
}

/// A GET of `path` that asks for an event stream.
fn sse_request(path: &str) -> Request<()> {
    Request::builder()
        .method(Method::GET)
        .uri(format!("https://localhost{path}"))
        .header(http::header::ACCEPT, "text/event-stream")
        .body(())
        .expect("request")
}

/// Opens the SSE stream of `path` on `send`: the response, its body to be read.
async fn open_sse(send: &SendRequest<Bytes>, path: &str) -> http::Response<h2::RecvStream> {
    let mut ready = send.clone().ready().await.expect("ready");
    let (response, _) = ready.send_request(sse_request(path), true).expect("send");
    tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered in time")
        .expect("response")
}

/// How a stream's body ends, skipping empty DATA frames: `None` for a clean end, `Some(Err)`
/// for a reset, `Some(Ok)` if more data came.
async fn body_end(
    body: &mut h2::RecvStream,
    within: Duration,
) -> Result<Option<Result<Bytes, h2::Error>>, tokio::time::error::Elapsed> {
    tokio::time::timeout(within, async {
        loop {
            match body.data().await {
                Some(Ok(data)) if data.is_empty() => continue,
                other => return other,
            }
        }
    })
    .await
}

/// Convergence over HTTP/2: draining a backend ends the SSE streams of its keys (their HTTP/2
/// streams end) and answers its waiting long-polls 503; every other stream goes on. The
/// HTTP/2 engine relays these streams itself, over the shared backend connections, so it ends
/// them as the HTTP/1 engine does.
#[tokio::test(flavor = "multi_thread")]
async fn draining_ends_the_moved_sse_streams_and_long_polls_over_http2_only() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let mut streams = Vec::new();
    for i in 0..12 {
        let key = format!("h2-sse-{i}");
        let (send, task) = h2_client(&stack, &ca).await;
        let response = open_sse(&send, &format!("/docs/{key}/sse?count=1&hold=1")).await;
        assert_eq!(response.status(), 200, "{key}");
        let mut body = response.into_body();
        let backend = first_event(&mut body).await;
        streams.push((key, backend, body, send, task));
    }
    let mut polls = Vec::new();
    for i in 0..6 {
        let key = format!("h2-poll-{i}");
        let (send, task) = h2_client(&stack, &ca).await;
        let mut ready = send.ready().await.expect("ready");
        let (state, _) = ready
            .send_request(get(&format!("/lp/{key}/state")), true)
            .expect("send");
        let state = state.await.expect("state");
        let owner = state.headers()["x-backend"]
            .to_str()
            .expect("x-backend")
            .to_string();
        let mut ready = ready.ready().await.expect("ready");
        let (waiting, _) = ready
            .send_request(get(&format!("/lp/{key}/poll?wait_ms=20000")), true)
            .expect("send");
        polls.push((key, owner, tokio::spawn(waiting), ready, task));
    }
    let all_waiting = tether_testkit::wait_until_async(Duration::from_secs(5), || async {
        open_streams(&stack, "long_poll").await == 6.0
    })
    .await;
    assert!(all_waiting, "not all long-polls are registered");

    let target = ["b0", "b1", "b2"]
        .into_iter()
        .max_by_key(|b| {
            streams.iter().filter(|s| s.1 == *b).count()
                + polls.iter().filter(|p| p.1 == *b).count()
        })
        .expect("backends")
        .to_string();
    stack.set_drain(&target, true).await;

    let mut ended = 0;
    for (key, backend, body, ..) in &mut streams {
        if *backend == target {
            // The stream ends (an empty last DATA frame, or a reset) with nothing more sent.
            let next = body_end(body, Duration::from_secs(10)).await;
            assert!(
                matches!(next, Ok(None) | Ok(Some(Err(_)))),
                "{key} on the drained backend was not ended: {next:?}"
            );
            ended += 1;
        }
    }
    let mut polls_ended = 0;
    for (key, owner, waiting, ..) in &mut polls {
        if *owner == target {
            let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("long-poll of the drained backend answered in time")
                .expect("task")
                .expect("response");
            assert_eq!(answer.status(), 503, "{key}");
            polls_ended += 1;
        }
    }
    for (key, backend, body, ..) in &mut streams {
        if *backend != target {
            let next = tokio::time::timeout(Duration::from_millis(100), body.data()).await;
            assert!(next.is_err(), "{key} on {backend} was touched: {next:?}");
        }
    }
    for (key, owner, waiting, ..) in &polls {
        if *owner != target {
            assert!(!waiting.is_finished(), "{key} ended early");
        }
    }
    assert!(ended + polls_ended >= 6, "{ended} {polls_ended}");
    let closed = crate::support::metric(
        &stack,
        r#"tether_streams_closed_total{reason="rebalance",upstream="docs"}"#,
    )
    .await;
    assert_eq!(closed, Some((ended + polls_ended) as f64));
    for (_, _, waiting, ..) in polls {
        waiting.abort();
    }
}

/// A client that resets its SSE stream ends it in the proxy at once (its registration and
/// backend connection go), though the backend has nothing more to send.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_resetting_its_sse_stream_ends_it_at_once() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let (send, _task) = h2_client(&stack, &ca).await;
    let mut body = open_sse(&send, "/docs/leaving/sse?count=1&hold=1")
        .await
        .into_body();
    first_event(&mut body).await;
    assert_eq!(open_streams(&stack, "sse").await, 1.0);
    drop(body);
    let gone = tether_testkit::wait_until_async(Duration::from_secs(5), || async {
        open_streams(&stack, "sse").await == 0.0
    })
    .await;
    assert!(gone, "the proxy still holds the stream its client reset");
    still_serving(&stack, &ca).await;
}

/// HTTP/1 and HTTP/2 requests share one pool of backend connections: the connection an
/// HTTP/1.1 request left kept alive serves the HTTP/2 requests that follow, one at a time.
#[tokio::test(flavor = "multi_thread")]
async fn http1_and_http2_requests_share_the_backend_connections() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let tls = tls_connect(stack.proxy, "localhost", ca.cert.der(), Alpn::Http1)
        .await
        .expect("TLS");
    let r = https_requests(tls, "localhost", &[(Method::GET, "/docs/pooled/x", vec![])])
        .await
        .expect("HTTP/1.1 request");
    assert_eq!(r[0].status, 200);
    let owner = stack
        .backends
        .iter()
        .find(|b| b.requests() == 1)
        .expect("the backend that answered");
    assert_eq!(owner.connections(), 1);
    let (mut send, _task) = h2_client(&stack, &ca).await;
    for _ in 0..5 {
        assert_eq!(status(&mut send, get("/docs/pooled/x")).await, Some(200));
    }
    assert_eq!(owner.requests(), 6);
    assert_eq!(
        owner.connections(),
        1,
        "HTTP/2 requests opened backend connections of their own"
    );
}

/// A backend that dies in the middle of a response resets the client's HTTP/2 stream: the
/// client sees an error, never a clean end it could take for the whole response.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_dying_mid_response_resets_the_stream() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let (send, _task) = h2_client(&stack, &ca).await;
    let mut body = open_sse(&send, "/docs/dying/sse?count=1&hold=1")
        .await
        .into_body();
    let backend = first_event(&mut body).await;
    stack.backend(&backend).stop().await;
    let end = body_end(&mut body, Duration::from_secs(10))
        .await
        .expect("the stream ended in time");
    assert!(
        matches!(end, Some(Err(_))),
        "a broken response ended like a whole one: {end:?}"
    );
}

/// `limits.streams_per_key` over HTTP/2 as over HTTP/1: the third SSE stream of a document
/// (limit 2) gets 429 with `Retry-After`, on the same connection as the first two.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_at_its_stream_limit_gets_429_over_http2_too() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let (send, _task) = h2_client(&stack, &ca).await;
    let path = "/docs/crowded/sse?count=1&hold=1";
    let mut held = Vec::new();
    for _ in 0..2 {
        let response = open_sse(&send, path).await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        first_event(&mut body).await;
        held.push(body);
    }
    let response = open_sse(&send, path).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(open_streams(&stack, "sse").await, 2.0);
}

/// A POST's body with a declared length, sent in two DATA frames, reaches the backend with its
/// head in one write, as over HTTP/1 (`core::GATHER_LIMIT`): before, a write for the head and
/// one per DATA frame.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_body_reaches_the_backend_with_its_head_in_one_write() {
    let (backend, seen) = start_read_counting_backend().await;
    let ca = Ca::new();
    let config = format!(
        r#"
listeners:
  - address: $PROXY
    tls: {{ cert: cert.pem, key: key.pem }}
admin: {{ address: $ADMIN }}
upstreams:
  raw:
    backends: [ {{ address: {backend} }} ]
routes:
  - name: raw
    match: {{ path_prefix: / }}
    upstream: raw
"#
    );
    let stack = start_config(&ca, &config).await;
    let (send, _task) = h2_client(&stack, &ca).await;
    for _ in 0..5 {
        let mut ready = send.clone().ready().await.expect("ready");
        let request = Request::builder()
            .method(Method::POST)
            .uri("https://localhost/edit")
            .header(http::header::CONTENT_LENGTH, 2000)
            .body(())
            .expect("request");
        let (response, mut body) = ready.send_request(request, false).expect("send");
        body.send_data(Bytes::from(vec![b'x'; 1000]), false)
            .expect("first frame");
        body.send_data(Bytes::from(vec![b'y'; 1000]), true)
            .expect("second frame");
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("an answer within 5 s")
            .expect("response");
        assert_eq!(response.status(), 200);
    }
    assert_arrived_whole(&seen, 5, 2000);
}

/// `CONFIG` with other `server.limits`.
fn with_limits(limits: &str) -> String {
    CONFIG.replace(
        "limits: { max_concurrent_streams: 10, max_header_bytes: 8192 }",
        &format!("limits: {{ max_concurrent_streams: 10, max_header_bytes: 8192, {limits} }}"),
    )
}

/// A connection with no open stream is closed after `keepalive_timeout`; one holding a quiet
/// SSE stream stays open past it, and its stream with it.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed_but_one_with_an_open_stream_is_not() {
    let ca = Ca::new();
    let stack = start_config(&ca, &with_limits("keepalive_timeout: 1s")).await;
    let (send, mut streaming) = h2_client(&stack, &ca).await;
    let mut body = open_sse(&send, "/docs/quiet/sse?count=1&hold=1")
        .await
        .into_body();
    first_event(&mut body).await;
    let (mut idle_send, idle) = h2_client(&stack, &ca).await;
    assert_eq!(status(&mut idle_send, get("/docs/idle/x")).await, Some(200));
    let closed = tokio::time::timeout(Duration::from_secs(10), idle).await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    // By now the SSE connection has been quiet for longer than the timeout too.
    let still = tokio::time::timeout(Duration::from_millis(1500), &mut streaming).await;
    assert!(
        still.is_err(),
        "the connection with an open stream was closed"
    );
    assert_eq!(open_streams(&stack, "sse").await, 1.0);
    drop(body);
}

/// A request body that stops arriving is answered 408 after `body_timeout`, and a small one
/// (read whole before it is sent) never reaches a backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_stops_arriving_gets_408() {
    let ca = Ca::new();
    let stack = start_config(&ca, &with_limits("body_timeout: 1s")).await;
    let (send, _task) = h2_client(&stack, &ca).await;
    let mut ready = send.ready().await.expect("ready");
    let request = Request::builder()
        .method(Method::POST)
        .uri("https://localhost/docs/stalled/x")
        .header(http::header::CONTENT_LENGTH, "100")
        .body(())
        .expect("request");
    let (response, mut body) = ready.send_request(request, false).expect("send");
    body.send_data(Bytes::from_static(b"0123456789"), false)
        .expect("data");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered in time")
        .expect("response");
    assert_eq!(response.status(), 408);
    assert!(
        !arrived(&stack, "stalled"),
        "the stalled request reached a backend"
    );
    still_serving(&stack, &ca).await;
}

/// Streams refused as malformed while they are accepted (here: a `Host` that disagrees with
/// `:authority`, answered 400 as the stream is accepted) are answered one by one, and a
/// connection that keeps sending them is closed after 32; none reaches a backend, and the
/// proxy keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_keeps_sending_malformed_streams_is_closed() {
    let ca = Ca::new();
    let stack = start(&ca).await;
    let (send, mut connection) = h2_client(&stack, &ca).await;
    let mut refused = 0;
    for i in 0..40 {
        let Ok(mut ready) = send.clone().ready().await else {
            break;
        };
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("https://localhost/docs/malformed-{i}/x"))
            .header(http::header::HOST, "elsewhere")
            .body(())
            .expect("request");
        let Ok((response, _)) = ready.send_request(request, true) else {
            break;
        };
        match tokio::time::timeout(Duration::from_secs(10), response).await {
            Ok(Ok(response)) => {
                assert_eq!(response.status(), 400, "stream {i}");
                refused += 1;
            }
            Ok(Err(_)) => break,
            Err(_) => panic!("stream {i} was not answered"),
        }
    }
    assert!(
        (31..=32).contains(&refused),
        "{refused} streams were refused"
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), &mut connection).await;
    assert!(closed.is_ok(), "the connection was not closed");
    assert!(
        !arrived(&stack, "malformed"),
        "a malformed request reached a backend"
    );
    still_serving(&stack, &ca).await;
}

/// At a graceful stop an HTTP/2 connection gets GOAWAY: the requests in flight on it finish
/// whole, a new one is not taken, and the proxy exits once they are done.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_streams_in_flight_finish_and_takes_no_new_one() {
    let ca = Ca::new();
    let mut stack = start(&ca).await;
    let (send, _task) = h2_client(&stack, &ca).await;
    let mut slow = Vec::new();
    for i in 0..4 {
        let mut ready = send.clone().ready().await.expect("ready");
        let (response, _) = ready
            .send_request(get(&format!("/docs/slow{i}/slow?ms=1500")), true)
            .expect("send");
        slow.push(tokio::spawn(async move {
            let response = response.await?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(data) = body.data().await {
                let data = data?;
                let _ = body.flow_control().release_capacity(data.len());
                bytes.extend_from_slice(&data);
            }
            Ok::<_, h2::Error>((status, bytes))
        }));
    }
    let in_flight = tether_testkit::wait_until_async(Duration::from_secs(5), || {
        let n: u64 = stack.backends.iter().map(|b| b.requests()).sum();
        async move { n >= 4 }
    })
    .await;
    assert!(in_flight, "the slow requests did not reach the backends");
    stack
        .tether
        .signal(tether_testkit::Signal::SIGTERM)
        .expect("SIGTERM");
    for task in slow {
        let (status, body) = task
            .await
            .expect("task")
            .expect("an in-flight stream finished");
        assert_eq!(status, 200);
        assert!(
            serde_json::from_slice::<serde_json::Value>(&body).is_ok(),
            "incomplete body: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // Refused (GOAWAY) or the connection is gone: either way no answer from a backend.
    let late = status(&mut send.clone(), get("/docs/late/x")).await;
    assert_eq!(late, None, "a stream opened after GOAWAY was served");
    assert!(!arrived(&stack, "late"));
    let exit = stack
        .tether
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exited");
    assert!(exit.success(), "{exit:?}");
}
