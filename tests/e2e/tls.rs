//! End-to-end: a TLS listener (certificates made here by rcgen, signed by a test CA) serves
//! HTTP/1.1, HTTP/2 and WebSocket, all sticky, and swaps its certificate on reload.

use crate::support::tls::Ca;
use crate::support::Stack;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use std::collections::HashMap;
use tether_testkit::{
    https_requests, tls_connect, wss_connect, Alpn, LaunchOptions, Message, TlsConnection,
};

const CONFIG: &str = r#"
listeners:
  - address: $PROXY
    tls: { cert: cert.pem, key: key.pem }
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { header: X-Doc-Id } ] }
    upstream: docs
"#;

async fn connect(stack: &Stack, ca: &Ca, alpn: Alpn) -> TlsConnection {
    tls_connect(stack.proxy, "localhost", ca.cert.der(), alpn)
        .await
        .expect("TLS handshake")
}

/// `GET /docs/x` for each key on one connection; the backend that answered each.
async fn owners(stack: &Stack, ca: &Ca, alpn: Alpn, keys: &[String]) -> HashMap<String, String> {
    let connection = connect(stack, ca, alpn).await;
    let expected: &[u8] = match alpn {
        Alpn::Http1 => b"http/1.1",
        Alpn::H2 => b"h2",
    };
    assert_eq!(connection.alpn.as_deref(), Some(expected), "ALPN");
    let requests: Vec<_> = keys
        .iter()
        .map(|k| (Method::GET, "/docs/x", vec![("x-doc-id", k.as_str())]))
        .collect();
    let responses = https_requests(connection, "localhost", &requests)
        .await
        .expect("https requests");
    keys.iter()
        .zip(responses)
        .map(|(k, r)| {
            assert_eq!(r.status, 200, "{k}: {}", r.text());
            let seen = r.json().expect("echo json");
            assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");
            (
                k.clone(),
                r.header("x-backend").expect("x-backend").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_http2_and_websocket_over_tls_are_sticky_and_certificates_reload() {
    let ca = Ca::new();
    let (cert, key, first_der) = ca.leaf();
    let files: &[(&str, &[u8])] = &[("cert.pem", cert.as_bytes()), ("key.pem", key.as_bytes())];
    let stack = Stack::start_with(
        CONFIG,
        LaunchOptions {
            files,
            ..LaunchOptions::default()
        },
    )
    .await;

    let keys: Vec<String> = (0..30).map(|i| format!("doc-{i}")).collect();
    let over_h1 = owners(&stack, &ca, Alpn::Http1, &keys).await;
    let over_h2 = owners(&stack, &ca, Alpn::H2, &keys).await;
    assert_eq!(over_h1, over_h2, "HTTP/1.1 and HTTP/2 disagree on owners");
    let used: std::collections::HashSet<_> = over_h1.values().collect();
    assert!(used.len() > 1, "30 keys all on one backend: {used:?}");
    // The same keys again, on fresh connections: still the same owners.
    assert_eq!(owners(&stack, &ca, Alpn::H2, &keys).await, over_h1);

    // WebSockets over TLS land where HTTP for the same key does, and echo.
    let mut sockets = Vec::new();
    for k in keys.iter().take(6) {
        let connection = connect(&stack, &ca, Alpn::Http1).await;
        assert_eq!(connection.leaf.as_deref(), Some(first_der.as_slice()));
        let (mut ws, headers) =
            wss_connect(connection, "localhost", "/docs/ws", &[("x-doc-id", k)])
                .await
                .expect("wss upgrade");
        let backend = headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .expect("x-backend on the 101");
        assert_eq!(backend, over_h1[k], "{k}");
        ws.send(Message::text(format!("hello {k}")))
            .await
            .expect("send");
        let echo = ws.next().await.expect("echo").expect("echo frame");
        assert_eq!(
            echo.into_text().expect("text").as_str(),
            format!("hello {k}")
        );
        sockets.push(ws);
    }

    // A renewed certificate is served after a reload, to new connections only.
    let (cert, key, second_der) = ca.leaf();
    std::fs::write(stack.tether.dir().join("cert.pem"), &cert).expect("write cert");
    std::fs::write(stack.tether.dir().join("key.pem"), &key).expect("write key");
    let reload = stack.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    let renewed = connect(&stack, &ca, Alpn::H2).await;
    assert_eq!(renewed.leaf.as_deref(), Some(second_der.as_slice()));
    for ws in &mut sockets {
        ws.send(Message::text("still here")).await.expect("send");
        let echo = ws.next().await.expect("echo").expect("frame");
        assert_eq!(echo.into_text().expect("text").as_str(), "still here");
    }

    // A broken certificate file fails the reload and changes nothing.
    std::fs::write(stack.tether.dir().join("cert.pem"), "not a certificate").expect("write");
    let reload = stack.admin_post("/reload").await;
    assert_ne!(reload.status, 200, "a broken certificate was accepted");
    assert!(
        reload.text().contains("listeners[0].tls"),
        "error names the field: {}",
        reload.text()
    );
    let still = connect(&stack, &ca, Alpn::Http1).await;
    assert_eq!(still.leaf.as_deref(), Some(second_der.as_slice()));
    assert_eq!(owners(&stack, &ca, Alpn::Http1, &keys[..5]).await.len(), 5);
}
