//! End-to-end: a TLS listener (certificates made here by rcgen, signed by a test CA) serves
//! HTTP/1.1, HTTP/2 and WebSocket, all sticky, and swaps its certificate on reload.

use crate::support::tls::Ca;
use crate::support::{metric, Stack};
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

/// Tether on a TLS listener with a leaf certificate of `ca`; the leaf's DER.
async fn start(ca: &Ca) -> (Stack, Vec<u8>) {
    start_config(ca, CONFIG).await
}

/// [`start`] with `config` (`CONFIG` edited) instead of `CONFIG`.
async fn start_config(ca: &Ca, config: &str) -> (Stack, Vec<u8>) {
    let (cert, key, der) = ca.leaf();
    let files: &[(&str, &[u8])] = &[("cert.pem", cert.as_bytes()), ("key.pem", key.as_bytes())];
    let stack = Stack::start_with(
        config,
        LaunchOptions {
            files,
            ..LaunchOptions::default()
        },
    )
    .await;
    (stack, der)
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_http2_and_websocket_over_tls_are_sticky_and_certificates_reload() {
    let ca = Ca::new();
    let (stack, first_der) = start(&ca).await;

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

/// Convergence over TLS: draining a backend ends exactly its WebSockets (close 1012) and SSE
/// responses, on TLS connections as on plain ones; the other streams go on.
#[tokio::test(flavor = "multi_thread")]
async fn draining_ends_the_moved_websockets_and_sse_streams_over_tls_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new();
    let (stack, _) = start(&ca).await;
    let keys: Vec<String> = (0..12).map(|i| format!("tls-doc-{i}")).collect();
    let owner = owners(&stack, &ca, Alpn::Http1, &keys).await;
    let drained = owner[&keys[0]].clone();

    let mut sockets = Vec::new();
    for k in &keys {
        let connection = connect(&stack, &ca, Alpn::Http1).await;
        let (ws, _) = wss_connect(connection, "localhost", "/docs/ws", &[("x-doc-id", k)])
            .await
            .expect("wss upgrade");
        sockets.push((k.clone(), ws));
    }
    // One SSE stream per key, over HTTP/1.1 on TLS, held open after its first event.
    let mut streams = Vec::new();
    for k in &keys {
        let mut connection = connect(&stack, &ca, Alpn::Http1).await;
        let request = format!(
            "GET /docs/sse?count=1&hold=1 HTTP/1.1\r\nHost: localhost\r\nX-Doc-Id: {k}\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        connection
            .stream
            .write_all(request.as_bytes())
            .await
            .expect("write");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data:") {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                connection.stream.read(&mut buf),
            )
            .await
            .expect("first event in time")
            .expect("read");
            assert!(n > 0, "{k}: closed before the first event");
            seen.extend_from_slice(&buf[..n]);
        }
        streams.push((k.clone(), connection));
    }

    stack.set_drain(&drained, true).await;

    for (k, ws) in &mut sockets {
        if owner[k.as_str()] == drained {
            let closed = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
                .await
                .expect("closed in time");
            match closed {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), 1012, "{k}")
                }
                other => panic!("{k}: expected a 1012 close, got {other:?}"),
            }
        } else {
            ws.send(Message::text("still here")).await.expect("send");
            let echo = ws.next().await.expect("echo").expect("frame");
            assert_eq!(
                echo.into_text().expect("text").as_str(),
                "still here",
                "{k}"
            );
        }
    }
    for (k, connection) in &mut streams {
        if owner[k.as_str()] != drained {
            continue;
        }
        // The response ends: the connection reaches its end within the deadline.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connection.stream.read_to_end(&mut rest),
        )
        .await;
        assert!(
            ended.is_ok(),
            "{k}: SSE stream of a drained backend still open"
        );
    }
    let moved = owners(&stack, &ca, Alpn::Http1, &keys).await;
    assert!(
        moved.values().all(|b| *b != drained),
        "a key still on the drained backend"
    );
}

/// Over `max_connections`, a TLS client is refused after its handshake like a plain one: an
/// HTTP/1 client reads a 503, an HTTP/2 one sees the connection close; both are counted, and
/// neither reaches a backend.
#[tokio::test(flavor = "multi_thread")]
async fn tls_connections_over_max_connections_are_refused_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new();
    let config = CONFIG.replace(
        "admin: { address: $ADMIN }",
        "admin: { address: $ADMIN }\nserver: { limits: { max_connections: 2 } }",
    );
    let (stack, _) = start_config(&ca, &config).await;
    let get = b"GET /docs/x HTTP/1.1\r\nHost: localhost\r\nX-Doc-Id: held\r\n\r\n";
    // Two connections take the places; a response on each shows the proxy admitted it.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut connection = connect(&stack, &ca, Alpn::Http1).await;
        connection.stream.write_all(get).await.expect("write");
        let mut first = [0u8; 12];
        connection
            .stream
            .read_exact(&mut first)
            .await
            .expect("read");
        assert_eq!(&first, b"HTTP/1.1 200", "a held connection was not served");
        held.push(connection);
    }
    let served: u64 = stack.backends.iter().map(|b| b.requests()).sum();

    let mut refused = connect(&stack, &ca, Alpn::Http1).await;
    let _ = refused.stream.write_all(get).await;
    let mut answer = Vec::new();
    let _ = refused.stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");

    let mut h2 = connect(&stack, &ca, Alpn::H2).await;
    let mut rest = Vec::new();
    let _ = h2.stream.read_to_end(&mut rest).await;
    assert!(
        rest.is_empty(),
        "an HTTP/2 client over the cap got bytes: {rest:?}"
    );

    let refusals = metric(
        &stack,
        "tether_downstream_closed_total{reason=\"max_connections\"}",
    )
    .await;
    assert_eq!(refusals, Some(2.0));
    let now: u64 = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(now, served, "a refused connection reached a backend");
}

/// A client that presents an IP address as SNI (wrk, `openssl s_client -servername`) is served
/// without a warning line per connection: rustls's complaint about the client's SNI is not the
/// operator's business (the build before logged one WARN per handshake).
#[tokio::test(flavor = "multi_thread")]
async fn an_ip_address_as_sni_is_served_without_a_warning_per_connection() {
    let ca = Ca::new();
    let (stack, _) = start(&ca).await;
    let ip = stack.proxy.ip().to_string();
    let connect = stack.proxy.to_string();
    let request =
        "GET /docs/x HTTP/1.1\r\nHost: localhost\r\nX-Doc-Id: sni\r\nConnection: close\r\n\r\n";
    for _ in 0..3 {
        let s_client = tokio::task::spawn_blocking({
            let (ip, connect) = (ip.clone(), connect.clone());
            move || {
                use std::io::Write;
                let mut child = std::process::Command::new("openssl")
                    .args([
                        "s_client",
                        "-connect",
                        &connect,
                        "-servername",
                        &ip,
                        "-quiet",
                    ])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("openssl s_client");
                let mut stdin = child.stdin.take().expect("stdin");
                let _ = stdin.write_all(request.as_bytes());
                // stdin stays open until the response has come (s_client exits at EOF).
                let out = child.wait_with_output().expect("s_client output");
                drop(stdin);
                out
            }
        });
        let out = tokio::time::timeout(std::time::Duration::from_secs(10), s_client)
            .await
            .expect("s_client finished within 10 s")
            .expect("join");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    let log = stack.tether.stderr();
    assert!(!log.contains("SNI"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}
