//! End-to-end convergence: when a key's owner changes, exactly the open streams of the moved
//! keys are closed (WebSocket close code 1012) and clients reconnect to the new owner.

use crate::support::{metric, Stack};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_testkit::{http_get, wait_until_async, ws_connect, Message, TestBackend, WsClient};
use tokio::sync::mpsc;

const CONFIG: &str = r#"
listeners:
  - address: $PROXY
admin:
  address: $ADMIN
upstreams:
  docs:
    backends:
      - address: $B0
      - address: $B1
      - address: $B2
    health_check:
      http: { path: /healthz }
      interval: 200ms
      # A killed backend refuses at once; the timeout only has to survive a loaded CI host
      # (with 200 ms, checks of live backends timed out there and every backend went down).
      timeout: 1s
      healthy_after: 1
      unhealthy_after: 1
    rebalance:
      max_per_second: 10
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
"#;

/// How a socket ended: the close code (None without a close frame) and when.
type Ending = Option<(Option<u16>, Instant)>;

/// One open WebSocket of a document, read by a background task.
struct LiveSocket {
    key: String,
    backend: String,
    sink: SplitSink<WsClient, Message>,
    echoes: mpsc::UnboundedReceiver<String>,
    /// Close code (None if closed without a close frame) and when, once closed.
    closed: Arc<Mutex<Ending>>,
}

impl LiveSocket {
    async fn open(stack: &Stack, key: &str) -> LiveSocket {
        let (ws, headers) = ws_connect(&stack.ws_url(&format!("/docs/{key}/live")), &[])
            .await
            .unwrap_or_else(|e| panic!("open {key}: {e}"));
        let backend = headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .expect("x-backend on 101")
            .to_string();
        let (sink, mut stream) = ws.split();
        let (tx, echoes) = mpsc::unbounded_channel();
        let closed = Arc::new(Mutex::new(None));
        let closed_by_reader = closed.clone();
        tokio::spawn(async move {
            let code = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let _ = tx.send(t.to_string());
                    }
                    Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break None,
                }
            };
            *closed_by_reader.lock().expect("lock") = Some((code, Instant::now()));
        });
        LiveSocket {
            key: key.to_string(),
            backend,
            sink,
            echoes,
            closed,
        }
    }

    fn closed(&self) -> Ending {
        *self.closed.lock().expect("lock")
    }

    /// True if a message sent now comes back within 2 s.
    async fn echoes(&mut self, n: usize) -> bool {
        let text = format!("{}-{n}", self.key);
        if self.sink.send(Message::text(text.clone())).await.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(2), self.echoes.recv()).await,
            Ok(Some(got)) if got == text
        )
    }
}

/// The sockets at `indices` were not closed and still echo.
async fn assert_open_and_echoing(sockets: &mut [LiveSocket], indices: &[usize]) {
    for (n, &i) in indices.iter().enumerate() {
        let key = sockets[i].key.clone();
        assert!(
            sockets[i].closed().is_none(),
            "{key} was closed: {:?}",
            sockets[i].closed()
        );
        assert!(sockets[i].echoes(n).await, "{key} stopped echoing");
    }
}

async fn open_all(stack: &Stack, n: usize) -> Vec<LiveSocket> {
    let mut sockets = Vec::new();
    for i in 0..n {
        sockets.push(LiveSocket::open(stack, &format!("doc-{i}")).await);
    }
    sockets
}

async fn split_keys_is_zero(stack: &Stack) -> bool {
    let split = r#"tether_split_keys{upstream="docs"}"#;
    wait_until_async(Duration::from_secs(5), || async {
        metric(stack, split).await == Some(0.0)
    })
    .await
}

/// A GET load over all 60 keys until stopped; returns (requests, failures).
fn start_get_load(stack: &Stack) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(u64, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let base = stack.url("/docs/");
    let stop_flag = stop.clone();
    let handle = tokio::spawn(async move {
        let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (base, stop, done, failed) = (
                base.clone(),
                stop_flag.clone(),
                done.clone(),
                failed.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut i = w;
                // Bounded: at most 20,000 requests per worker.
                while !stop.load(Ordering::Relaxed) && i < 80_000 {
                    let url = format!("{base}doc-{}/state", i % 60);
                    match http_get(&url, &[]).await {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => {
                            eprintln!("GET {url}: {}", r.status);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("GET {url}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 4;
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
        (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    });
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backend_fails_over_and_its_return_moves_back_exactly_its_keys_streams() {
    let mut stack = Stack::start(CONFIG).await;
    let mut sockets = open_all(&stack, 60).await;
    let (stop_load, load) = start_get_load(&stack);

    // Kill b1: its streams die with it; GETs keep working through retries and failover.
    let victim_addr = stack.backend("b1").addr();
    stack.backend("b1").stop().await;
    let victims: Vec<usize> = (0..60).filter(|&i| sockets[i].backend == "b1").collect();
    let others: Vec<usize> = (0..60).filter(|&i| sockets[i].backend != "b1").collect();
    assert!(
        victims.len() >= 8,
        "b1 owns only {} of 60 keys",
        victims.len()
    );
    // Clients of the dead backend reconnect once the proxy has seen it down: they land on the
    // next owner. (Before that, an upgrade retried past the refusing owner lands on the next
    // backend while the owner still counts as up, and convergence rightly ends it: it would
    // split the document the moment the owner answered again.)
    let up = format!(r#"tether_backend_up{{backend="{victim_addr}",upstream="docs"}}"#);
    assert!(
        wait_until_async(Duration::from_secs(5), || {
            let up = up.clone();
            let stack = &stack;
            async move { metric(stack, &up).await == Some(0.0) }
        })
        .await,
        "the proxy never saw the killed backend down"
    );
    for &i in &victims {
        sockets[i] = LiveSocket::open(&stack, &sockets[i].key.clone()).await;
        assert_ne!(sockets[i].backend, "b1");
    }

    // Bring b1 back on the same address.
    let restarted = TestBackend::start_at("b1", victim_addr)
        .await
        .expect("restart b1");
    let restarted_at = Instant::now();
    let b1_index = stack
        .backends
        .iter()
        .position(|b| b.name() == "b1")
        .expect("b1");
    stack.backends[b1_index] = restarted;

    // The moved-back keys' streams are closed with 1012 within 2 s of the first passing check
    // (checks run every 200 ms); the others stay open.
    let all_closed = wait_until_async(Duration::from_secs(3), || {
        let done = victims.iter().all(|&i| sockets[i].closed().is_some());
        async move { done }
    })
    .await;
    assert!(
        all_closed,
        "not every stream of a key returning to b1 was closed"
    );
    let mut last_close = restarted_at;
    for &i in &victims {
        let (code, at) = sockets[i].closed().expect("closed");
        assert_eq!(code, Some(1012), "{}", sockets[i].key);
        last_close = last_close.max(at);
    }
    let converged_in = last_close - restarted_at;
    assert!(
        converged_in < Duration::from_millis(2200),
        "took {converged_in:?}"
    );
    assert_open_and_echoing(&mut sockets, &others).await;
    // Reconnected clients land on the restored backend.
    for &i in &victims {
        let again = LiveSocket::open(&stack, &sockets[i].key).await;
        assert_eq!(again.backend, "b1", "{}", again.key);
        sockets[i] = again;
    }
    assert!(
        split_keys_is_zero(&stack).await,
        "split_keys did not return to 0"
    );

    stop_load.store(true, Ordering::Relaxed);
    let (requests, failures) = load.await.expect("load task");
    assert!(requests > 100, "load too small: {requests}");
    assert_eq!(failures, 0, "{failures} of {requests} GETs failed");
    eprintln!(
        "kill/restart: keys moved {}, streams closed {}, untouched {}, converged in {:?}, GETs {requests} with 0 errors",
        victims.len(),
        victims.len(),
        others.len(),
        converged_in
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_a_backend_moves_all_its_streams_at_the_configured_rate_and_nothing_else() {
    let stack = Stack::start(CONFIG).await;
    let mut sockets = open_all(&stack, 60).await;
    // Drain the backend with the most streams: at least 20 of 60, enough to see the rate.
    let target = ["b0", "b1", "b2"]
        .into_iter()
        .max_by_key(|b| sockets.iter().filter(|s| s.backend == *b).count())
        .expect("three backends");
    let drained: Vec<usize> = (0..60).filter(|&i| sockets[i].backend == target).collect();
    let others: Vec<usize> = (0..60).filter(|&i| sockets[i].backend != target).collect();
    assert!(drained.len() >= 20);

    let started = Instant::now();
    stack.set_drain(target, true).await;
    let all_closed = wait_until_async(Duration::from_secs(10), || {
        let done = drained.iter().all(|&i| sockets[i].closed().is_some());
        async move { done }
    })
    .await;
    assert!(
        all_closed,
        "not every stream of the drained backend was closed"
    );
    let mut times: Vec<Duration> = drained
        .iter()
        .map(|&i| {
            let (code, at) = sockets[i].closed().expect("closed");
            assert_eq!(
                code,
                Some(1012),
                "{} closed {:?} after the drain",
                sockets[i].key,
                at.checked_duration_since(started)
            );
            at - started
        })
        .collect();
    times.sort();
    // 10 per second with a one-second burst: the last of n closes comes (n - 10) / 10 s in.
    let expected = Duration::from_secs_f64((drained.len() - 10) as f64 / 10.0);
    let last = *times.last().expect("some");
    assert!(
        last >= expected.mul_f64(0.8),
        "{} closes in {last:?}: faster than 10/s",
        drained.len()
    );
    assert!(
        last <= expected + Duration::from_secs(2),
        "too slow: {last:?}"
    );
    assert_open_and_echoing(&mut sockets, &others).await;
    for &i in &drained {
        let again = LiveSocket::open(&stack, &sockets[i].key).await;
        assert_ne!(again.backend, target, "a drained backend took a new stream");
        sockets[i] = again;
    }
    assert!(split_keys_is_zero(&stack).await);
    eprintln!(
        "drain: keys moved {}, streams closed {}, untouched {}, last close after {last:?}",
        drained.len(),
        drained.len(),
        others.len()
    );
}

/// After a change that adds `newcomer` to the ring (at `since`): exactly the streams whose key
/// now belongs to `newcomer` are closed with 1012, every other stream still echoes, reconnects
/// land on `newcomer`, and split_keys returns to 0. Returns (moved, untouched, converged in).
async fn assert_only_streams_moving_to(
    stack: &Stack,
    sockets: &mut [LiveSocket],
    before: &BTreeMap<String, String>,
    newcomer: &str,
    since: Instant,
) -> (usize, usize, Duration) {
    // Which keys moved: ask where a new request for each key goes now.
    let mut moved = Vec::new();
    for (i, s) in sockets.iter().enumerate() {
        let now = http_get(&stack.url(&format!("/docs/{}/state", s.key)), &[])
            .await
            .expect("GET");
        let owner = now.header("x-backend").expect("x-backend").to_string();
        if owner != before[&s.key] {
            assert_eq!(owner, newcomer, "{} moved between old backends", s.key);
            moved.push(i);
        }
    }
    assert!(!moved.is_empty(), "no key moved to {newcomer}");
    let all_closed = wait_until_async(Duration::from_secs(5), || {
        let done = moved.iter().all(|&i| sockets[i].closed().is_some());
        async move { done }
    })
    .await;
    assert!(all_closed, "not every moved stream was closed");
    let converged_in = moved
        .iter()
        .map(|&i| sockets[i].closed().expect("closed").1 - since)
        .max()
        .unwrap_or_default();
    let untouched: Vec<usize> = (0..sockets.len()).filter(|i| !moved.contains(i)).collect();
    assert_open_and_echoing(sockets, &untouched).await;
    for &i in &moved {
        assert_eq!(sockets[i].closed().expect("closed").0, Some(1012));
        sockets[i] = LiveSocket::open(stack, &sockets[i].key).await;
        assert_eq!(sockets[i].backend, newcomer);
    }
    assert!(split_keys_is_zero(stack).await);
    (moved.len(), untouched.len(), converged_in)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_joining_the_ring_takes_only_the_streams_of_keys_that_moved_to_it() {
    // b2 starts drained (out of the ring), the stand-in for a fourth backend added by config:
    // undraining it is the same ring change as adding it.
    let stack = Stack::start(CONFIG).await;
    stack.set_drain("b2", true).await;
    let mut sockets = open_all(&stack, 60).await;
    assert!(sockets.iter().all(|s| s.backend != "b2"));
    let before: BTreeMap<String, String> = sockets
        .iter()
        .map(|s| (s.key.clone(), s.backend.clone()))
        .collect();

    let joined_at = Instant::now();
    stack.set_drain("b2", false).await;
    let (moved, untouched, converged_in) =
        assert_only_streams_moving_to(&stack, &mut sockets, &before, "b2", joined_at).await;
    eprintln!(
        "join: keys moved {moved}, streams closed {moved}, untouched {untouched}, converged in {converged_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_ends_the_sse_and_long_poll_responses_of_moved_keys_only() {
    let stack = Stack::start(CONFIG).await;
    // 30 event streams held open (no events after the first), one per key.
    let mut streams = Vec::new();
    for i in 0..30 {
        let key = format!("sse-{i}");
        let mut events =
            tether_testkit::sse_events(&stack.url(&format!("/docs/{key}/sse?count=1&hold=1")))
                .await
                .expect("SSE through proxy");
        let first = events.next_event().await.expect("open").expect("event");
        let backend = first.json().expect("json")["backend"]
            .as_str()
            .expect("backend")
            .to_string();
        streams.push((key, backend, events));
    }
    // 30 long-polls waiting 20 s; their owner is where a plain GET of the key goes.
    let mut polls = Vec::new();
    for i in 0..30 {
        let key = format!("poll-{i}");
        let owner = http_get(&stack.url(&format!("/lp/{key}/state")), &[])
            .await
            .expect("GET")
            .header("x-backend")
            .expect("x-backend")
            .to_string();
        let request = format!(
            "GET /lp/{key}/poll?wait_ms=20000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        );
        let proxy = stack.proxy;
        let waiting = tokio::spawn(async move {
            let started = Instant::now();
            let response = tether_testkit::raw_request_within(
                proxy,
                request.as_bytes(),
                Duration::from_secs(30),
            )
            .await
            .expect("long-poll");
            (tether_testkit::raw_status(&response), started.elapsed())
        });
        polls.push((key, owner, waiting));
    }
    // Let every long-poll reach its backend before the drain.
    let all_waiting = wait_until_async(Duration::from_secs(5), || async {
        let text = http_get(&stack.tether.admin_url("/metrics"), &[])
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        let polls: f64 = text
            .lines()
            .filter(|l| l.starts_with("tether_streams_open{") && l.contains("kind=\"long_poll\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        polls == 30.0
    })
    .await;
    assert!(all_waiting, "not all long-polls are registered");

    let target = ["b0", "b1", "b2"]
        .into_iter()
        .max_by_key(|b| streams.iter().filter(|s| s.1 == *b).count())
        .expect("backends");
    stack.set_drain(target, true).await;

    let mut ended = 0;
    for (key, backend, events) in &mut streams {
        if *backend == target {
            let next = tokio::time::timeout(Duration::from_secs(10), events.next_event()).await;
            assert!(
                matches!(next, Ok(None) | Ok(Some(Err(_)))),
                "{key} on the drained backend was not ended: {next:?}"
            );
            ended += 1;
        }
    }
    let mut polls_ended = 0;
    let mut polls_waiting = Vec::new();
    for (key, owner, waiting) in polls {
        if owner == target {
            let (status, after) = tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("long-poll of a drained backend ended")
                .expect("task");
            assert_eq!(status, Some(503), "{key}");
            assert!(after < Duration::from_secs(15), "{key} waited {after:?}");
            polls_ended += 1;
        } else {
            polls_waiting.push((key, waiting));
        }
    }
    // Everything else is untouched: streams quiet, long-polls still waiting.
    for (key, backend, events) in &mut streams {
        if *backend != target {
            let next = tokio::time::timeout(Duration::from_millis(100), events.next_event()).await;
            assert!(next.is_err(), "{key} on {backend} was touched: {next:?}");
        }
    }
    for (key, waiting) in &polls_waiting {
        assert!(!waiting.is_finished(), "{key} ended early");
    }
    assert!(ended >= 10 && polls_ended >= 1, "{ended} {polls_ended}");
    let closed = metric(
        &stack,
        r#"tether_streams_closed_total{reason="rebalance",upstream="docs"}"#,
    )
    .await;
    assert_eq!(closed, Some((ended + polls_ended) as f64));
    for (_, waiting) in polls_waiting {
        waiting.abort();
    }
    eprintln!(
        "sse/long-poll drain: sse ended {ended} of 30, long-polls answered 503 {polls_ended} of 30, others untouched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fourth_backend_added_by_reload_takes_only_the_streams_of_keys_that_moved_to_it() {
    let stack = Stack::start(CONFIG).await;
    let b3 = TestBackend::start("b3").await;
    let mut sockets = open_all(&stack, 60).await;
    let before: BTreeMap<String, String> = sockets
        .iter()
        .map(|s| (s.key.clone(), s.backend.clone()))
        .collect();

    let b2 = stack.backend("b2").addr().to_string();
    let four = stack.config.replace(
        &format!("      - address: {b2}\n"),
        &format!("      - address: {b2}\n      - address: {}\n", b3.addr()),
    );
    assert_ne!(four, stack.config, "the fourth backend was not added");
    stack.tether.write_config(&four).expect("write config");
    let reloaded_at = Instant::now();
    let r = stack.admin_post("/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());

    let (moved, untouched, converged_in) =
        assert_only_streams_moving_to(&stack, &mut sockets, &before, "b3", reloaded_at).await;
    let changes = metric(
        &stack,
        r#"tether_ring_changes_total{cause="config",upstream="docs"}"#,
    )
    .await;
    assert_eq!(changes, Some(1.0));
    eprintln!(
        "reload 3->4: keys moved {moved}, streams closed {moved}, untouched {untouched}, converged in {converged_in:?}"
    );
}
