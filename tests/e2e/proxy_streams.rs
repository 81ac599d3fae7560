//! End-to-end: WebSocket, SSE and long-poll through the real `tether` binary.

use crate::support::{Stack, STANDARD};
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tether_testkit::{http_get, raw_request_within, raw_status, sse_events, ws_connect, Message};

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_and_its_keys_http_requests_land_on_the_same_backend() {
    let stack = Stack::start(STANDARD).await;
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..20 {
        let key = format!("doc-{i}");
        let (mut ws, headers) = ws_connect(&stack.ws_url(&format!("/docs/{key}/live")), &[])
            .await
            .expect("upgrade through proxy");
        let ws_backend = headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .expect("x-backend on 101")
            .to_string();
        let http = http_get(&stack.url(&format!("/docs/{key}/state")), &[])
            .await
            .expect("GET through proxy");
        assert_eq!(http.header("x-backend"), Some(ws_backend.as_str()), "{key}");
        owners.insert(ws_backend);
        ws.close(None).await.expect("close");
    }
    assert_eq!(owners.len(), 3, "20 documents reached only {owners:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_websocket_echoes_arrive_in_order() {
    let stack = Stack::start(STANDARD).await;
    let (ws, _) = ws_connect(&stack.ws_url("/docs/echo/live"), &[])
        .await
        .expect("upgrade");
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for i in 0..1000 {
            tx.send(Message::text(format!("message {i}")))
                .await
                .expect("send");
        }
        tx
    });
    for i in 0..1000 {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("echo within 10 s")
            .expect("stream open")
            .expect("frame");
        assert_eq!(msg, Message::text(format!("message {i}")));
    }
    let mut tx = sender.await.expect("sender");
    tx.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_websocket_stays_open_past_65_seconds_with_default_timeouts() {
    let stack = Stack::start(STANDARD).await;
    let (mut ws, _) = ws_connect(&stack.ws_url("/docs/quiet/live"), &[])
        .await
        .expect("upgrade");
    // The idleness is the subject of the test: Pingora's own 60 s read timeout must not apply.
    tokio::time::sleep(Duration::from_secs(65)).await;
    ws.send(Message::text("still here?"))
        .await
        .expect("send after 65 s idle");
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5 s")
        .expect("open")
        .expect("frame");
    assert_eq!(echo, Message::text("still here?"));
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Each open WebSocket costs the proxy exactly its two sockets (client and backend; Tether's
/// own tunnel needs no third descriptor to be closable), and closing them gives all back and
/// deregisters the streams.
#[tokio::test(flavor = "multi_thread")]
async fn each_open_websocket_costs_the_proxy_two_descriptors() {
    const SOCKETS: usize = 100;
    let stack = Stack::start(STANDARD).await;
    let pid = stack.tether.pid().expect("pid");
    // Settle the admin and health-check connections before counting.
    let _ = crate::support::metrics_text(&stack).await;
    let before = open_descriptors(pid);
    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        let (mut ws, _) = ws_connect(&stack.ws_url(&format!("/docs/fd-{i}/live")), &[])
            .await
            .expect("upgrade");
        ws.send(Message::text("hi")).await.expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time");
        assert!(matches!(echo, Some(Ok(Message::Text(_)))), "{echo:?}");
        sockets.push(ws);
    }
    let during = open_descriptors(pid);
    let added = during.saturating_sub(before);
    println!("{SOCKETS} WebSockets: {before} -> {during} descriptors");
    assert!(
        (2 * SOCKETS - 10..=2 * SOCKETS + 10).contains(&added),
        "{SOCKETS} WebSockets added {added} descriptors (before {before}, during {during})"
    );
    for mut ws in sockets {
        ws.close(None).await.expect("close");
    }
    let released = tether_testkit::wait_until_async(Duration::from_secs(10), || async {
        open_descriptors(pid) <= before + 10
            && crate::support::metrics_text(&stack)
                .await
                .lines()
                .filter(|l| l.starts_with("tether_streams_open{"))
                .all(|l| l.ends_with(" 0"))
    })
    .await;
    assert!(
        released,
        "descriptors or streams not released: {} open",
        open_descriptors(pid)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_idle_past_the_routes_idle_timeout_is_closed() {
    let stack = Stack::start(STANDARD).await;
    let (mut ws, _) = ws_connect(&stack.ws_url("/idle/doc/live"), &[])
        .await
        .expect("upgrade");
    // Traffic keeps it open: 4 s of messages every 500 ms, longer than the 2 s idle timeout.
    let start = Instant::now();
    let mut silent_since = start;
    while start.elapsed() < Duration::from_secs(4) {
        ws.send(Message::text("ping"))
            .await
            .expect("send while active");
        let echo = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("echo while active");
        assert!(matches!(echo, Some(Ok(Message::Text(_)))), "{echo:?}");
        // The last traffic: the idle time counts from here.
        silent_since = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then silence: it must be closed soon after 2 s.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "idle WebSocket not closed within 10 s");
    let idle = silent_since.elapsed();
    assert!(
        idle >= Duration::from_millis(1500),
        "closed too early: {idle:?}"
    );
}

/// A client that leaves a silent SSE stream is noticed at once, not at the backend's next
/// event: its stream leaves the counts and its backend connection is closed (the backend's
/// stream ends), with nothing sent by the backend in between.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_a_silent_sse_stream_ends_it_at_once() {
    let stack = Stack::start(STANDARD).await;
    let mut events = sse_events(&stack.url("/docs/quiet/sse?count=1&hold=1"))
        .await
        .expect("SSE through proxy");
    assert_eq!(events.status, 200);
    let first = tokio::time::timeout(Duration::from_secs(5), events.next_event())
        .await
        .expect("first event within 5 s");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    let backend_streams = || {
        stack
            .backends
            .iter()
            .map(|b| b.open_event_streams())
            .sum::<usize>()
    };
    let streams_open = || async {
        crate::support::metrics_text(&stack)
            .await
            .lines()
            .filter(|l| l.starts_with("tether_streams_open{"))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    assert_eq!(backend_streams(), 1, "the backend holds the silent stream");
    assert_eq!(streams_open().await, 1.0, "Tether counts the stream");
    drop(events);
    let ended = tether_testkit::wait_until_async(Duration::from_secs(5), || async {
        backend_streams() == 0 && streams_open().await == 0.0
    })
    .await;
    assert!(
        ended,
        "5 s after the client left: {} backend streams, {} counted by Tether",
        backend_streams(),
        streams_open().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_sse_event_reaches_the_client_within_100ms_of_being_sent() {
    let stack = Stack::start(STANDARD).await;
    let mut events = sse_events(&stack.url("/docs/feed/sse?count=3&interval_ms=300"))
        .await
        .expect("SSE through proxy");
    assert_eq!(events.status, 200);
    assert_eq!(
        events
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut latencies = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next_event())
            .await
            .expect("event within 5 s")
            .expect("stream open")
            .expect("event parses");
        latencies.push(event.latency().expect("timestamped event"));
    }
    assert!(
        latencies[0] < Duration::from_millis(100),
        "first event took {:?}",
        latencies[0]
    );
    assert!(
        latencies.iter().all(|l| *l < Duration::from_millis(100)),
        "{latencies:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_70_second_long_poll_completes() {
    let stack = Stack::start(STANDARD).await;
    let request =
        b"GET /lp/doc/poll?wait_ms=70000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let started = Instant::now();
    let response = raw_request_within(stack.proxy, request, Duration::from_secs(90))
        .await
        .expect("long-poll through proxy");
    let text = String::from_utf8_lossy(&response);
    assert_eq!(raw_status(&response), Some(200), "{text}");
    assert!(text.contains("\"waited_ms\":70000"), "{text}");
    assert!(started.elapsed() >= Duration::from_secs(70));
}
