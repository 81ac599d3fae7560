//! End-to-end, HTTP/2 on a TLS listener, driven by the `h2` crate's client
//! (which sends what hyper would refuse to): the advertised stream limit, a header-list bomb, a
//! rapid-reset flood and a Content-Length that disagrees with the DATA. The proxy stays up,
//! keeps serving, and nothing malformed reaches a backend.

use crate::support::tls::Ca;
use crate::support::Stack;
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
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

async fn start(ca: &Ca) -> Stack {
    let (cert, key, _) = ca.leaf();
    let files: &[(&str, &[u8])] = &[("cert.pem", cert.as_bytes()), ("key.pem", key.as_bytes())];
    Stack::start_with(
        CONFIG,
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
