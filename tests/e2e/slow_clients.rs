//! End-to-end, slow and silent clients are closed at the request-header
//! deadline, connections over the cap are refused while the others keep working, keep-alive
//! connections end after their idle time and request count, and slowhttptest's slowloris run
//! is cut off while normal requests succeed.
//!
//! Needs `slowhttptest` on `PATH`; `scripts/setup-tests.sh` installs it.

use crate::support::{metric, Stack};
use std::time::{Duration, Instant};
use tether_testkit::{http_get, raw_status, wait_until_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
server:
  limits: { header_timeout: 2s, keepalive_timeout: 4s, max_connections: 20, max_requests_per_connection: 5 }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

/// Reads one response (head plus a Content-Length body) from a keep-alive connection.
/// None when the connection closes first.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some((raw_status(&buf)?, head));
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn keepalive_get(stream: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    read_response(stream).await
}

/// Waits for the server to close `stream`; how long that took from `since`.
async fn closed_after(mut stream: TcpStream, since: Instant) -> Duration {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after 20 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_silent_clients_are_closed_at_the_header_deadline() {
    let stack = Stack::start(CONFIG).await;
    let start = Instant::now();
    let silent = TcpStream::connect(stack.proxy).await.expect("connect");
    let mut slow = TcpStream::connect(stack.proxy).await.expect("connect");
    // A kept-alive connection that finished a request is not subject to the header deadline
    // while it idles (the keep-alive timeout, 4 s, is).
    let mut idle = TcpStream::connect(stack.proxy).await.expect("connect");
    assert_eq!(
        keepalive_get(&mut idle, "/docs/a/x").await.map(|r| r.0),
        Some(200)
    );
    let trickle = tokio::spawn(async move {
        // One header line every 300 ms: each read resets a per-read timer, never the deadline.
        let _ = slow
            .write_all(b"GET /docs/a/x HTTP/1.1\r\nHost: h\r\n")
            .await;
        let mut i = 0;
        while slow
            .write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_ok()
        {
            i += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if i > 100 {
                break;
            }
        }
        slow
    });
    let silent_closed = tokio::spawn(closed_after(silent, start));
    // Normal requests keep working meanwhile.
    for i in 0..10 {
        let r = http_get(&stack.url(&format!("/docs/n{i}/x")), &[])
            .await
            .expect("GET");
        assert_eq!(r.status, 200);
    }
    let silent_closed = silent_closed.await.expect("join");
    let slow = trickle.await.expect("join");
    let slow_closed = closed_after(slow, start).await;
    for (what, after) in [("silent", silent_closed), ("slow", slow_closed)] {
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
            "{what} connection closed after {after:?}, deadline 2 s"
        );
    }
    // The idle keep-alive connection outlived the header deadline and still serves.
    assert_eq!(
        keepalive_get(&mut idle, "/docs/b/x").await.map(|r| r.0),
        Some(200),
        "keep-alive connection was cut by the header deadline"
    );
    assert!(
        metric(
            &stack,
            "tether_downstream_closed_total{reason=\"header_timeout\"}"
        )
        .await
        .unwrap_or(0.0)
            >= 2.0
    );
    // Then the keep-alive timeout ends it.
    let idle_closed = closed_after(idle, Instant::now()).await;
    assert!(
        idle_closed >= Duration::from_secs(3) && idle_closed < Duration::from_secs(8),
        "idle keep-alive closed after {idle_closed:?}, keepalive_timeout 4 s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keepalive_connection_ends_after_max_requests_per_connection() {
    let stack = Stack::start(CONFIG).await;
    let mut stream = TcpStream::connect(stack.proxy).await.expect("connect");
    for i in 0..5 {
        let (status, head) = keepalive_get(&mut stream, "/docs/a/x")
            .await
            .unwrap_or_else(|| panic!("request {i} got no response"));
        assert_eq!(status, 200);
        assert_eq!(
            head.contains("connection: close"),
            i == 4,
            "request {i}: {head}"
        );
    }
    assert!(
        keepalive_get(&mut stream, "/docs/a/x").await.is_none(),
        "a sixth request was served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_get_503_and_the_others_keep_working() {
    let stack = Stack::start(CONFIG).await;
    // Fill the cap (20) with kept-alive connections that each served a request.
    let mut held = Vec::new();
    for i in 0..20 {
        let mut stream = TcpStream::connect(stack.proxy).await.expect("connect");
        let got = keepalive_get(&mut stream, &format!("/docs/k{i}/x")).await;
        assert_eq!(got.map(|r| r.0), Some(200), "connection {i}");
        held.push(stream);
    }
    let before = received(&stack);
    for _ in 0..5 {
        let refused = tether_testkit::raw_request_within(
            stack.proxy,
            b"GET /docs/over/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await
        .expect("raw request");
        assert_eq!(
            raw_status(&refused),
            Some(503),
            "{}",
            String::from_utf8_lossy(&refused)
        );
    }
    assert_eq!(
        received(&stack),
        before,
        "a refused connection reached a backend"
    );
    assert_eq!(
        metric(
            &stack,
            "tether_downstream_closed_total{reason=\"max_connections\"}"
        )
        .await,
        Some(5.0)
    );
    assert_eq!(
        metric(&stack, "tether_downstream_connections").await,
        Some(20.0)
    );
    // The held connections still work.
    for stream in held.iter_mut().take(3) {
        assert_eq!(
            keepalive_get(stream, "/docs/again/x").await.map(|r| r.0),
            Some(200)
        );
    }
    // Release five: new connections are admitted again.
    held.truncate(15);
    let admitted = wait_until_async(Duration::from_secs(5), || async {
        http_get(&stack.url("/docs/after/x"), &[])
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(admitted, "no connection admitted after five were released");
}

fn received(stack: &Stack) -> u64 {
    stack.backends.iter().map(|b| b.requests()).sum()
}

/// slowhttptest in slow-headers mode (slowloris): 200 connections, one header line a second.
/// Each is closed about 2 s after it opened; the tool's own probe and our requests keep
/// being served.
#[tokio::test(flavor = "multi_thread")]
async fn slowhttptest_slowloris_is_cut_off_at_the_header_deadline() {
    let stack = Stack::start(&CONFIG.replace("max_connections: 20", "max_connections: 1000")).await;
    // The report goes into tether's own temporary working directory.
    let prefix = stack.tether.dir().join("slowloris");
    let mut tool = tokio::process::Command::new("slowhttptest")
        .args([
            "-H", "-c", "200", "-i", "1", "-r", "100", "-l", "15", "-p", "2", "-g",
        ])
        .arg("-o")
        .arg(&prefix)
        .arg("-u")
        .arg(stack.url("/docs/slow/x"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("slowhttptest is not installed: run scripts/setup-tests.sh");
    let mut served = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let r = http_get(&stack.url("/docs/normal/x"), &[])
            .await
            .expect("GET");
        assert_eq!(r.status, 200, "a normal request failed during the attack");
        served += 1;
    }
    let status = tokio::time::timeout(Duration::from_secs(30), tool.wait())
        .await
        .expect("slowhttptest did not stop")
        .expect("slowhttptest");
    assert!(status.success(), "slowhttptest: {status}");
    let csv = std::fs::read_to_string(prefix.with_extension("csv")).expect("slowhttptest csv");
    // Seconds,Closed,Pending,Connected,Service Available
    let rows: Vec<Vec<u64>> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').map(|v| v.trim().parse().ok()).collect())
        .collect();
    let peak = rows.iter().map(|r| r[3]).max().unwrap_or(0);
    let last = rows.last().expect("csv rows");
    println!("slowhttptest: {csv}");
    println!("{served} normal requests served during the attack");
    assert!(
        peak >= 100,
        "the attack never held many connections ({peak})"
    );
    // slowhttptest stops early ("No open connections left") once every connection is closed;
    // its last sample row may be taken just before the final closes. It was told to run 15 s.
    assert!(
        last[0] <= 8,
        "slow connections lasted until second {}, deadline 2 s",
        last[0]
    );
    // The last column is nonzero while slowhttptest's probe request is being answered.
    assert!(
        rows.iter().all(|r| r[4] > 0),
        "slowhttptest's probe found the service unavailable: {csv}"
    );
    let closed = metric(
        &stack,
        "tether_downstream_closed_total{reason=\"header_timeout\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(closed >= 190.0, "{closed} closed at the deadline");
}

/// CPU time (user + system, clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

/// Out of file descriptors, the proxy neither crashes nor spins, and recovers once the
/// clients leave.
#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_neither_crashes_nor_spins() {
    let config = CONFIG
        .replace("header_timeout: 2s", "header_timeout: 60s")
        .replace("max_connections: 20", "max_connections: 1000");
    let stack = Stack::start(&config).await;
    let pid = stack.tether.pid().expect("pid");
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=256:256"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success());
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(stack.proxy).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // The backlog keeps the surplus waiting while the proxy cannot accept them.
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // 100 ticks per second: under 50% of one CPU over 2 s.
    assert!(used < 100, "{used} ticks in 2 s: the accept loop spins");
    drop(held);
    let recovered = wait_until_async(Duration::from_secs(15), || async {
        http_get(&stack.url("/docs/after/x"), &[])
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(recovered, "no request served after the clients left");
    assert!(
        stack.tether.stderr().contains("Too many open files")
            || stack.tether.stderr().contains("os error 24"),
        "EMFILE was not logged"
    );
}

/// A request body that stalls is cut with 408; a slow *response* is not a stalled body.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_request_body_gets_408_and_a_slow_response_does_not() {
    let config = CONFIG.replace("header_timeout: 2s", "header_timeout: 2s, body_timeout: 1s");
    let stack = Stack::start(&config).await;
    let mut stream = TcpStream::connect(stack.proxy).await.expect("connect");
    let started = Instant::now();
    stream
        .write_all(
            b"POST /docs/a/__stalled HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await
        .expect("write");
    let got = read_response(&mut stream).await;
    let after = started.elapsed();
    assert_eq!(got.map(|r| r.0), Some(408), "after {after:?}");
    assert!(after < Duration::from_secs(5), "cut after {after:?}");
    // A response that takes 2.5 s (longer than body_timeout) to start is still delivered.
    let slow = http_get(&stack.url("/docs/a/slow?ms=2500"), &[])
        .await
        .expect("GET");
    assert_eq!(slow.status, 200);
    let slow_post = tether_testkit::http_request(
        http::Method::POST,
        &stack.url("/docs/a/slow?ms=2500"),
        &[],
        "a small body",
    )
    .await
    .expect("POST");
    assert_eq!(slow_post.status, 200);
}

/// `max_requests_per_connection` counts every request of a connection, with a body or not:
/// the fifth of GETs and POSTs closes it, and a sixth is never served.
#[tokio::test(flavor = "multi_thread")]
async fn max_requests_per_connection_counts_requests_with_bodies_too() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start(CONFIG).await;
    let mut stream = TcpStream::connect(stack.proxy).await.expect("connect");
    for i in 0..5 {
        let (status, head) = if i % 2 == 1 {
            stream
                .write_all(b"POST /docs/a/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody")
                .await
                .expect("write");
            read_response(&mut stream)
                .await
                .unwrap_or_else(|| panic!("request {i} got no response"))
        } else {
            keepalive_get(&mut stream, "/docs/a/x")
                .await
                .unwrap_or_else(|| panic!("request {i} got no response"))
        };
        assert_eq!(status, 200, "request {i}");
        assert_eq!(
            head.contains("connection: close"),
            i == 4,
            "request {i}: {head}"
        );
    }
    assert!(
        keepalive_get(&mut stream, "/docs/a/x").await.is_none(),
        "a sixth request was served"
    );
}
