//! The test backend and the clients, exercised directly (no proxy in between).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use tether_testkit::{
    http_get, http_request, raw_request, raw_status, sse_events, wait_until, ws_connect, Message,
    TestBackend, TestkitError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_answer_reports_backend_method_raw_path_headers_and_body() {
    let backend = TestBackend::start("alpha").await;
    let response = http_request(
        Method::POST,
        &backend.url("/docs/abc/edit?doc=abc&x=%2F"),
        &[
            ("X-Doc-Id", "abc"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ],
        "hello",
    )
    .await
    .unwrap();
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-backend"), Some("alpha"));
    let seen = response.json().unwrap();
    assert_eq!(seen["backend"], "alpha");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/docs/abc/edit?doc=abc&x=%2F");
    assert_eq!(seen["headers"]["x-doc-id"], "abc");
    assert_eq!(seen["headers"]["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    assert_eq!(seen["headers"]["host"], backend.addr().to_string());
    assert_eq!(seen["body"], "hello");
    assert_eq!(backend.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_a_hundred_messages_in_order() {
    let backend = TestBackend::start("ws").await;
    let (mut ws, headers) = ws_connect(&backend.url("/docs/abc/ws").replace("http", "ws"), &[])
        .await
        .unwrap();
    assert_eq!(headers.get("x-backend").unwrap(), "ws");
    assert!(wait_until(DEADLINE, || backend.open_websockets() == 1).await);

    for i in 0..100u32 {
        let message = if i % 2 == 0 {
            Message::text(format!("message {i}"))
        } else {
            Message::binary(i.to_be_bytes().to_vec())
        };
        ws.send(message).await.unwrap();
    }
    for i in 0..100u32 {
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let expected = if i % 2 == 0 {
            Message::text(format!("message {i}"))
        } else {
            Message::binary(i.to_be_bytes().to_vec())
        };
        assert_eq!(echoed, expected);
    }

    ws.close(None).await.unwrap();
    assert!(wait_until(DEADLINE, || backend.open_websockets() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_answers_pings_echoes_close_and_sends_nothing_first() {
    let backend = TestBackend::start("ws").await;
    let url = format!("ws://{}/docs/k", backend.addr());
    let (mut ws, _) = ws_connect(&url, &[("Cookie", "doc_id=k")]).await.unwrap();

    let first = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
    assert!(first.is_err(), "backend spoke first: {first:?}");

    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));

    let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4001.into(),
        reason: "bye".into(),
    };
    ws.send(Message::Close(Some(frame))).await.unwrap();
    let reply = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match reply {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4001),
        other => panic!("expected the close echoed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sends_count_timestamped_events_interval_apart_then_ends() {
    let backend = TestBackend::start("events").await;
    let mut stream = sse_events(&backend.url("/docs/abc/sse?count=4&interval_ms=50"))
        .await
        .unwrap();
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(
        stream.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    assert_eq!(stream.headers.get("x-backend").unwrap(), "events");

    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE, stream.next_event())
        .await
        .unwrap()
    {
        events.push(event.unwrap());
    }
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e.json().unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3]);
    for event in &events {
        assert_eq!(event.json().unwrap()["backend"], "events");
        let latency = event.latency().expect("events carry sent_unix_micros");
        assert!(latency < Duration::from_secs(1), "{latency:?}");
    }
    // Unbuffered: each event arrives on its own, about interval_ms after the one before.
    let spread = events[3].arrived - events[0].arrived;
    assert!(spread >= Duration::from_millis(140), "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_with_hold_stays_open_until_the_client_leaves() {
    let backend = TestBackend::start("events").await;
    let mut stream = sse_events(&backend.url("/docs/abc?sse=1&count=1&hold=1"))
        .await
        .unwrap();
    let first = stream.next_event().await.unwrap().unwrap();
    assert_eq!(first.json().unwrap()["seq"], 0);
    let after = tokio::time::timeout(Duration::from_millis(300), stream.next_event()).await;
    assert!(
        after.is_err(),
        "a held stream ended or sent more: {after:?}"
    );
    assert_eq!(backend.open_event_streams(), 1);

    drop(stream);
    assert!(wait_until(DEADLINE, || backend.open_event_streams() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answers_after_wait_ms() {
    let backend = TestBackend::start("lp").await;
    let started = Instant::now();
    let response = http_get(&backend.url("/docs/abc/poll?wait_ms=200"), &[])
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(response.status, StatusCode::OK);
    let body = response.json().unwrap();
    assert_eq!(body["backend"], "lp");
    assert_eq!(body["waited_ms"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_holds_the_response_head_for_ms() {
    let backend = TestBackend::start("slow").await;
    let url = backend.url("/docs/abc/slow?ms=300");
    let early = tokio::time::timeout(Duration::from_millis(150), http_get(&url, &[])).await;
    assert!(early.is_err(), "the head came before 300 ms");

    let started = Instant::now();
    let response = http_get(&url, &[]).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(response.json().unwrap()["path"], "/docs/abc/slow?ms=300");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_set_healthy() {
    let backend = TestBackend::start("h").await;
    let health = || async {
        http_get(&backend.url("/healthz"), &[])
            .await
            .unwrap()
            .status
    };
    assert_eq!(health().await, StatusCode::OK);
    backend.set_healthy(false);
    assert_eq!(health().await, StatusCode::SERVICE_UNAVAILABLE);
    backend.set_healthy(true);
    assert_eq!(health().await, StatusCode::OK);
    assert_eq!(backend.health_checks(), 3);
    assert_eq!(backend.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_count_upgrades_too() {
    let backend = TestBackend::start("c").await;
    http_get(&backend.url("/a"), &[]).await.unwrap();
    let _ws = ws_connect(&format!("ws://{}/b", backend.addr()), &[])
        .await
        .unwrap();
    assert_eq!(backend.requests(), 2);
    assert_eq!(backend.health_checks(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_open_websockets_and_streams_and_refuses_new_connections() {
    let backend = TestBackend::start("doomed").await;
    let (mut ws, _) = ws_connect(&format!("ws://{}/docs/a", backend.addr()), &[])
        .await
        .unwrap();
    let mut events = sse_events(&backend.url("/sse?count=1&hold=1"))
        .await
        .unwrap();
    events.next_event().await.unwrap().unwrap();
    assert!(wait_until(DEADLINE, || backend.open_websockets() == 1).await);

    backend.stop().await;

    let ws_end = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("WebSocket still open");
    assert!(
        matches!(ws_end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{ws_end:?}"
    );
    let sse_end = tokio::time::timeout(DEADLINE, events.next_event())
        .await
        .expect("SSE still open");
    assert!(matches!(sse_end, None | Some(Err(_))), "{sse_end:?}");
    assert_eq!(backend.open_websockets(), 0);
    assert_eq!(backend.open_event_streams(), 0);

    let connect = TcpStream::connect(backend.addr()).await;
    assert_eq!(
        connect.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    assert!(matches!(
        http_get(&backend.url("/"), &[]).await,
        Err(TestkitError::Io(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_comes_back_on_the_same_address() {
    let backend = TestBackend::start("phoenix").await;
    let addr = backend.addr();
    backend.stop().await;
    drop(backend);

    let reborn = TestBackend::start_at("phoenix", addr).await.unwrap();
    let response = http_get(&reborn.url("/"), &[]).await.unwrap();
    assert_eq!(response.header("x-backend"), Some("phoenix"));
    assert_eq!(reborn.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_requests_see_the_bytes_on_the_wire() {
    let backend = TestBackend::start("raw").await;
    let response = raw_request(
        backend.addr(),
        b"GET /docs/x HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(raw_status(&response), Some(200));
    let text = String::from_utf8_lossy(&response).to_lowercase();
    assert!(text.contains("x-backend: raw"), "{text}");

    let garbage = raw_request(backend.addr(), b"NOT HTTP AT ALL\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(raw_status(&garbage), Some(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_reports_its_status_and_body() {
    // A server that refuses every upgrade, as a proxy with no healthy backend would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 4096];
        let _ = socket.read(&mut request).await.unwrap();
        socket
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown")
            .await
            .unwrap();
    });
    match ws_connect(&format!("ws://{addr}/docs/a"), &[]).await {
        Err(TestkitError::UpgradeRejected { status, body }) => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body, "down");
        }
        other => panic!("expected a rejected upgrade, got {other:?}"),
    }
}
