//! End-to-end lifecycle: reloads under load, bad files, graceful stop, fast stop and the
//! zero-downtime binary upgrade — without a failed request.

use crate::support::{tether_binary, Stack};
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_testkit::{
    http_get, wait_until_async, ws_connect, LaunchOptions, Message, Signal, TetherProcess,
};

/// Two valid configs over the same backends: B adds a route and changes timeouts and retries,
/// so no key changes owner between them.
const A: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
server: { grace_period: 10s }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

fn config_b(a: &str) -> String {
    a.replace(
        "routes:\n",
        "routes:\n  - name: extra\n    match: { path_prefix: /extra/ }\n    upstream: docs\n    retries: 1\n    timeouts: { read: 30s }\n",
    )
}

/// GETs over 50 keys from 4 workers until stopped; counts requests and failures.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: String, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let workers = (0..4)
            .map(|w| {
                let (base, stop, done, failed) =
                    (base.clone(), stop.clone(), done.clone(), failed.clone());
                tokio::spawn(async move {
                    // Bounded: at most 25,000 requests per worker.
                    for i in 0..25_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let url = format!("{base}/docs/k{}/{path}", (i * 4 + w) % 50);
                        match http_get(&url, &[]).await {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => {
                                eprintln!("GET {url}: {} {}", r.status, r.text());
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("GET {url}: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failed,
            workers,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.await;
        }
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn status(tether: &TetherProcess) -> serde_json::Value {
    http_get(&tether.admin_url("/config/status"), &[])
        .await
        .expect("status")
        .json()
        .expect("json")
}

async fn echo(ws: &mut tether_testkit::WsClient, text: &str) -> bool {
    if ws.send(Message::text(text)).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ws.next()).await,
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_reloads_under_load_fail_no_request_and_an_open_websocket_keeps_echoing() {
    let stack = Stack::start(A).await;
    let a = stack.config.clone();
    let b = config_b(&a);
    let (mut ws, _) = ws_connect(&stack.ws_url("/docs/live-doc/ws"), &[])
        .await
        .expect("ws");
    let load = Load::start(stack.url(""), "x");
    for n in 0..50u64 {
        stack
            .tether
            .write_config(if n % 2 == 0 { &b } else { &a })
            .expect("write config");
        if n % 2 == 0 {
            stack.tether.signal(Signal::SIGHUP).expect("SIGHUP");
        } else {
            let r = stack.admin_post("/reload").await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let generation = n + 2;
        let reached = wait_until_async(Duration::from_secs(5), || async {
            status(&stack.tether).await["generation"] == generation
        })
        .await;
        assert!(reached, "reload {n} never took effect");
        // Config B's extra route answers only while B is in force.
        let extra = http_get(&stack.url("/extra/x"), &[]).await.expect("GET");
        assert_eq!(extra.status, if n % 2 == 0 { 200 } else { 404 });
    }
    let (requests, failures) = load.finish().await;
    assert!(echo(&mut ws, "after 50 reloads").await, "WebSocket died");
    assert!(requests > 200, "load too small: {requests}");
    assert_eq!(failures, 0, "{failures} of {requests} requests failed");
    eprintln!("50 reloads: {requests} GETs, 0 failed, WebSocket still echoing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_file_changes_nothing_and_the_status_names_line_and_column() {
    let stack = Stack::start(A).await;
    let good = stack.config.clone();
    // A syntax error, then a semantic error (a route naming an unknown upstream).
    let syntax = format!("{good}\nroutes: [ {{ name: broken\n");
    let semantic = good.replace("    upstream: docs\n", "    upstream: nowhere\n");
    for (bad, expect) in [(&syntax, "tether.yaml:"), (&semantic, "routes[0].upstream")] {
        stack.tether.write_config(bad).expect("write");
        let r = stack.admin_post("/reload").await;
        assert_eq!(r.status, 422, "{}", r.text());
        let s = status(&stack.tether).await;
        assert_eq!(s["generation"], 1, "{s}");
        assert_eq!(s["last_result"], "failure");
        let error = s["last_error"].as_str().expect("error text");
        assert!(error.contains(expect), "{error}");
        // FILE:LINE:COLUMN
        let location = error.split(": ").next().expect("location");
        let parts: Vec<&str> = location.rsplitn(3, ':').collect();
        assert!(
            parts.len() == 3 && parts[0].parse::<u32>().is_ok() && parts[1].parse::<u32>().is_ok(),
            "no line:column in {error}"
        );
        // Still serving the old routes.
        let ok = http_get(&stack.url("/docs/k1/x"), &[]).await.expect("GET");
        assert_eq!(ok.status, 200);
    }
    let metrics = http_get(&stack.tether.admin_url("/metrics"), &[])
        .await
        .expect("metrics")
        .text();
    assert!(
        metrics.contains("tether_config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_watch_reloads_when_the_file_changes() {
    let options = LaunchOptions {
        args: &["--watch"],
        ..LaunchOptions::default()
    };
    let stack = Stack::start_with(A, options).await;
    stack
        .tether
        .write_config(&config_b(&stack.config))
        .expect("write");
    let reloaded = wait_until_async(Duration::from_secs(5), || async {
        status(&stack.tether).await["generation"] == 2
    })
    .await;
    assert!(reloaded, "the watched file change was not reloaded");
    let extra = http_get(&stack.url("/extra/x"), &[]).await.expect("GET");
    assert_eq!(extra.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_requests_in_flight_finish_closes_websockets_with_1001_and_exits_promptly() {
    let mut stack = Stack::start(A).await;
    let (mut ws, _) = ws_connect(&stack.ws_url("/docs/ws-doc/ws"), &[])
        .await
        .expect("ws");
    // Eight requests the backend answers only after 1.5 s, all in flight at SIGTERM.
    let mut slow = Vec::new();
    for i in 0..8 {
        let url = stack.url(&format!("/docs/slow{i}/slow?ms=1500"));
        slow.push(tokio::spawn(async move {
            let r = http_get(&url, &[]).await;
            (r, Instant::now())
        }));
    }
    let in_flight = wait_until_async(Duration::from_secs(5), || {
        let n: u64 = stack.backends.iter().map(|b| b.requests()).sum();
        async move { n >= 8 }
    })
    .await;
    assert!(in_flight);
    stack.tether.signal(Signal::SIGTERM).expect("SIGTERM");

    let close = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    match close {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a 1001 close frame, got {other:?}"),
    }
    let mut last_response = Instant::now();
    for task in slow {
        let (r, at) = task.await.expect("task");
        let r = r.expect("an in-flight request completed");
        assert_eq!(r.status, 200);
        assert!(r.json().is_ok(), "incomplete body: {}", r.text());
        last_response = last_response.max(at);
    }
    let exit = stack
        .tether
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exited");
    let exited_after = last_response.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        exited_after < Duration::from_secs(1),
        "exited {exited_after:?} after the last response"
    );
    eprintln!("SIGTERM: 8 slow requests completed, exit {exited_after:?} after the last one");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_exits_at_once_even_with_a_websocket_open() {
    let mut stack = Stack::start(A).await;
    let (_ws, _) = ws_connect(&stack.ws_url("/docs/ws-doc/ws"), &[])
        .await
        .expect("ws");
    let sent = Instant::now();
    stack.tether.signal(Signal::SIGINT).expect("SIGINT");
    stack
        .tether
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("exited");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
}

/// Each worker thread has its own runtime; on SIGINT Pingora tears them down one by one, and
/// an accept loop bound to a runtime already gone used to spin and keep the process alive
/// (3 stops in 20 hung with 4 threads). Several stops, so a race that loses sometimes shows.
#[tokio::test(flavor = "multi_thread")]
async fn sigint_exits_at_once_with_several_worker_threads() {
    let config = A.replace(
        "server: { grace_period: 10s }",
        "server: { grace_period: 10s, threads: 4 }",
    );
    for round in 0..12 {
        let mut stack = Stack::start(&config).await;
        let sent = Instant::now();
        stack.tether.signal(Signal::SIGINT).expect("SIGINT");
        if let Err(e) = stack.tether.wait_exit(Duration::from_secs(3)).await {
            panic!("stop {round} did not end the process: {e:?}");
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "stop {round}: {:?}",
            sent.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_upgrade_under_load_fails_no_request() {
    let mut stack = Stack::start(A).await;
    let admin = stack.tether.admin_addr();
    let load = Load::start(stack.url(""), "x");
    // The new process waits for the old one's listening sockets (it retries for ~5 s).
    let mut new = TetherProcess::start_with(
        tether_binary(),
        &stack.config,
        admin,
        LaunchOptions {
            args: &["-u"],
            ..LaunchOptions::default()
        },
    )
    .await
    .expect("new process started");
    stack.tether.signal(Signal::SIGQUIT).expect("SIGQUIT");
    stack
        .tether
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("old process exited");
    // The new one serves on its own now.
    let r = http_get(&stack.url("/docs/k1/x"), &[]).await.expect("GET");
    assert_eq!(r.status, 200);
    let (requests, failures) = load.finish().await;
    assert!(requests > 200, "load too small: {requests}");
    assert_eq!(failures, 0, "{failures} of {requests} requests failed");
    new.signal(Signal::SIGINT).expect("stop new");
    let _ = new.wait_exit(Duration::from_secs(5)).await;
    eprintln!("binary upgrade: {requests} GETs, 0 failed");
}
