//! wsload: small WebSocket load tool for bench/run.sh (started from the shared kit's wsload).
//!
//! Modes
//!   echo: open --conns connections, wait until all attempts are done, then every
//!         connection sends up to --msgs binary messages request/response style
//!         (one outstanding message per connection), paced at --rate msgs/s in
//!         total (0 = as fast as the echo comes back), bounded by --duration.
//!         Reports established/errors, msgs/s and latency p50/p99/p999.
//!   idle: open --conns connections and hold them idle for --hold seconds.
//!         With --rss-pid PID it samples VmRSS of PID and all its descendants
//!         before connecting and after all connections are up, and reports the
//!         increase per connection. With --warm-msgs N every connection first echoes N
//!         messages, alternately 64 bytes and --warm-size bytes (so that buffers grow),
//!         and the hold (and the RSS samples) start once every connection is done.
//!   storm: open --conns WebSockets (one echo each), then POST --close-urls (the backends'
//!         `/ws-close-all`, not through the proxy): the backends close every socket with
//!         1012; each client reconnects at once and does one echo. Reports the time from the
//!         close until all are back, reconnect errors, and (--rss-pid) the CPU ns of the
//!         watched tree over the storm (/proc/.../schedstat).
//!   churn: --conns loops of connect -> (TLS 1.3, resuming the loop's last session) -> one
//!         `GET` with `X-Doc-Id` and `Connection: close` -> read the response -> close, for
//!         --duration s (--url http:// or https://). Reports requests/s, latency, and the
//!         handshakes that resumed a session.
//!   sse:  open --conns HTTP/1.1 event streams (`GET` with `Accept: text/event-stream`,
//!         `X-Doc-Id: doc-<i % ids>`; --url http://HOST:PORT/sse/...), check 200 and
//!         text/event-stream, time each from writing the request to its first complete
//!         event; once all are up sample VmRSS (--rss-pid) and report the increase per
//!         stream, hold them --hold seconds (a stream ended early is an error), close.
//!         --doc ID: every stream of the one document ID instead (a flood of one document).
//!         A 429 answer is counted as `refused` (and, unless --refused-ok 1, as an error too).
//!   fanout: --conns event streams all of `X-Doc-Id: doc-fanout`; once all are up, --msgs
//!         events published through the same URL's host (`POST /publish/x`, same doc id,
//!         body = send time in µs), one every --interval-ms on one keep-alive connection;
//!         every subscriber times each event's arrival. Reports delivery p50/p99/max,
//!         missed events, and (with --rss-pid) the CPU ns the watched process tree spent
//!         from the first publish until the deliveries were in (/proc/.../schedstat).
//!
//! Everything is bounded: --max-secs is a hard wall-clock limit for the whole run.
//! ws:// or wss:// URLs (echo, idle, storm), http:// URLs (sse, fanout), http:// or https://
//! (churn); TLS is rustls, TLS 1.3, accepting any certificate (tls.rs); intended for 127.0.0.1.

mod churn;
mod sse;
mod storm;
mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Clone, Debug)]
struct Opts {
    url: String,
    mode: String,
    conns: usize,
    msgs: u64,
    rate: f64,
    size: usize,
    ids: usize,
    duration: f64,
    hold: f64,
    max_secs: f64,
    connect_concurrency: usize,
    timeout_ms: u64,
    threads: usize,
    interval_ms: u64,
    rss_pids: Vec<u32>,
    label: String,
    warm_msgs: u64,
    warm_size: usize,
    close_urls: Vec<String>,
    wait: f64,
    sessions: usize,
    doc: String,
    refused_ok: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: wsload --url ws[s]://127.0.0.1:PORT/ws/x [--mode echo|idle|storm] [--conns N] [--msgs M]\n\
         \x20      wsload --url http://127.0.0.1:PORT/sse/x --mode sse|fanout [--interval-ms MS]\n\
         \x20      [--doc ID] [--refused-ok 0|1] (sse)\n\
         \x20      wsload --url http[s]://127.0.0.1:PORT/ --mode churn [--sessions S]\n\
         \x20      [--warm-msgs N --warm-size BYTES] (idle) [--close-urls URL,.. --wait S] (storm)\n\
         \x20      [--rate TOTAL_MSGS_PER_S (0=unpaced)] [--size BYTES] [--ids K] [--duration S]\n\
         \x20      [--hold S] [--max-secs S] [--connect-concurrency C] [--timeout-ms MS]\n\
         \x20      [--threads T] [--rss-pid PID[,PID..]] [--label NAME]"
    );
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(k: &str, v: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("bad value for {k}: {v}");
        std::process::exit(2)
    })
}

/// The items of a comma-separated option value.
fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').filter(|s| !s.is_empty())
}

fn parse() -> Opts {
    let mut o = Opts {
        url: String::new(),
        mode: "echo".into(),
        conns: 100,
        msgs: 1_000_000,
        rate: 0.0,
        size: 64,
        ids: 1000,
        duration: 10.0,
        hold: 10.0,
        max_secs: 120.0,
        connect_concurrency: 256,
        timeout_ms: 5000,
        threads: 1,
        interval_ms: 100,
        rss_pids: vec![],
        label: String::new(),
        warm_msgs: 0,
        warm_size: 8192,
        close_urls: vec![],
        wait: 30.0,
        sessions: 8,
        doc: String::new(),
        refused_ok: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let k = args[i].as_str();
        if k == "-h" || k == "--help" {
            usage();
        }
        let v = args.get(i + 1).cloned().unwrap_or_else(|| usage());
        match k {
            "--url" => o.url = v.clone(),
            "--mode" => o.mode = v.clone(),
            "--conns" => o.conns = num(k, &v),
            "--msgs" => o.msgs = num(k, &v),
            "--rate" => o.rate = num(k, &v),
            "--size" => o.size = num(k, &v),
            "--ids" => o.ids = num(k, &v),
            "--duration" => o.duration = num(k, &v),
            "--hold" => o.hold = num(k, &v),
            "--max-secs" => o.max_secs = num(k, &v),
            "--connect-concurrency" => o.connect_concurrency = num(k, &v),
            "--timeout-ms" => o.timeout_ms = num(k, &v),
            "--threads" => o.threads = num(k, &v),
            "--interval-ms" => o.interval_ms = num(k, &v),
            "--rss-pid" => o.rss_pids = list(&v).map(|s| num(k, s)).collect(),
            "--label" => o.label = v.clone(),
            "--warm-msgs" => o.warm_msgs = num(k, &v),
            "--warm-size" => o.warm_size = num(k, &v),
            "--close-urls" => o.close_urls = list(&v).map(String::from).collect(),
            "--wait" => o.wait = num(k, &v),
            "--sessions" => o.sessions = num(k, &v),
            "--doc" => o.doc = v.clone(),
            "--refused-ok" => o.refused_ok = num::<u8>(k, &v) != 0,
            _ => {
                eprintln!("unknown option {k}");
                usage()
            }
        }
        i += 2;
    }
    let schemes: &[&str] = match o.mode.as_str() {
        "sse" | "fanout" => &["http://"],
        "churn" => &["http://", "https://"],
        _ => &["ws://", "wss://"],
    };
    if !schemes.iter().any(|s| o.url.starts_with(s)) {
        eprintln!("--url {}HOST:PORT/PATH is required for --mode {}", schemes.join(" or "), o.mode);
        usage();
    }
    o.size = o.size.max(8);
    o.ids = o.ids.max(1);
    o.connect_concurrency = o.connect_concurrency.max(1);
    o
}

/// (host:port, host, TLS?) of a ws://, wss://, http:// or https:// URL.
fn authority(url: &str) -> (String, String, bool) {
    let (tls, rest) = match url.split_once("://") {
        Some((s, rest)) => (s == "wss" || s == "https", rest),
        None => (false, url),
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let a = &rest[..end];
    let host = a.rsplit_once(':').map_or(a, |(h, _)| h).to_string();
    let a =
        if a.contains(':') { a.to_string() } else { format!("{a}:{}", if tls { 443 } else { 80 }) };
    (a, host, tls)
}

/// The TLS client of wss:// connections: one config, no session resumption (every WebSocket
/// client a separate one, with a full handshake).
static WS_TLS: std::sync::OnceLock<(
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
)> = std::sync::OnceLock::new();

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

type Ws = WebSocketStream<tls::Conn>;

async fn connect(o: &Opts, idx: usize) -> Result<Ws, String> {
    let (addr, host, is_tls) = authority(&o.url);
    let tls =
        is_tls.then(|| WS_TLS.get_or_init(|| (tls::client_config(0), tls::server_name(&host))));
    let tcp = tls::Conn::connect(&addr, tls.map(|(c, n)| (c, n))).await?;
    let mut req = o.url.as_str().into_client_request().map_err(|e| format!("req: {e}"))?;
    let id = format!("doc-{}", idx % o.ids);
    req.headers_mut().insert("x-doc-id", HeaderValue::from_str(&id).unwrap());
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config()))
        .await
        .map_err(|e| format!("ws: {e}"))?;
    Ok(ws)
}

/// pid and all of its descendants.
fn tree_pids(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        out.push(p);
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    stack.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
                }
            }
        }
    }
    out
}

/// VmRSS (kB) of pid plus all of its descendants.
fn tree_rss_kb(pid: u32) -> u64 {
    let mut total = 0;
    for p in tree_pids(pid) {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            for line in s.lines() {
                if let Some(r) = line.strip_prefix("VmRSS:") {
                    total += r.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

/// CPU time (ns on CPU, /proc/PID/task/TID/schedstat) of the threads of the given process
/// trees: finer than the clock ticks of /proc/PID/stat, for short phases.
fn tree_cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for p in pids.iter().flat_map(|p| tree_pids(*p)) {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                    total += s
                        .split_whitespace()
                        .next()
                        .and_then(|x| x.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    total
}

fn rss_all(pids: &[u32]) -> u64 {
    pids.iter().map(|p| tree_rss_kb(*p)).sum()
}

struct Counters {
    connected: AtomicU64,
    conn_err: AtomicU64,
    attempts_done: AtomicU64,
    msg_err: AtomicU64,
    msgs: AtomicU64,
    dropped: AtomicU64,
    warmed: AtomicU64,
}

fn new_counters() -> Arc<Counters> {
    Arc::new(Counters {
        connected: AtomicU64::new(0),
        conn_err: AtomicU64::new(0),
        attempts_done: AtomicU64::new(0),
        msg_err: AtomicU64::new(0),
        msgs: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        warmed: AtomicU64::new(0),
    })
}

/// "[label] what: N connected, M failed in S s" for the end of a connect phase begun at `t0`.
fn connect_line(
    label: &str,
    what: &str,
    ok: &AtomicU64,
    failed: &AtomicU64,
    t0: Instant,
    all: bool,
) -> String {
    format!(
        "[{label}] {what}: {} connected, {} failed in {:.2}s{}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        if all { "" } else { " (deadline hit)" }
    )
}

/// Tell every connection task to stop, and wait (at most 15 s, within the hard deadline, but at
/// least 2 s) for them to close their sockets.
async fn stop_and_join(
    stop_tx: &watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    hard_deadline: Instant,
) {
    let _ = stop_tx.send(true);
    let left = hard_deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(2));
    let _ = tokio::time::timeout(
        left.min(Duration::from_secs(15)),
        futures_util::future::join_all(handles),
    )
    .await;
}

async fn wait_attempts(c: &Counters, n: usize, deadline: Instant) -> bool {
    wait_count(&c.attempts_done, n, deadline).await
}

/// Wait until `count` reaches n (true) or the deadline passes (false).
async fn wait_count(count: &AtomicU64, n: usize, deadline: Instant) -> bool {
    loop {
        if count.load(Ordering::Relaxed) as usize >= n {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_echo(o: Opts, hard_deadline: Instant) {
    let c = new_counters();
    let sem = Arc::new(Semaphore::new(o.connect_concurrency));
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let first_err: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut handles = Vec::with_capacity(o.conns);
    let t_connect = Instant::now();
    for idx in 0..o.conns {
        let o2 = o.clone();
        let c2 = c.clone();
        let sem2 = sem.clone();
        let mut start_rx2 = start_rx.clone();
        let fe = first_err.clone();
        handles.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let permit = sem2.acquire_owned().await.unwrap();
            let ws =
                tokio::time::timeout(Duration::from_millis(o2.timeout_ms), connect(&o2, idx)).await;
            drop(permit);
            let mut ws = match ws {
                Ok(Ok(ws)) => {
                    c2.connected.fetch_add(1, Ordering::Relaxed);
                    c2.attempts_done.fetch_add(1, Ordering::Relaxed);
                    ws
                }
                Ok(Err(e)) => {
                    fe.lock().unwrap().get_or_insert(e);
                    c2.conn_err.fetch_add(1, Ordering::Relaxed);
                    c2.attempts_done.fetch_add(1, Ordering::Relaxed);
                    return hist;
                }
                Err(_) => {
                    fe.lock().unwrap().get_or_insert("connect timeout".into());
                    c2.conn_err.fetch_add(1, Ordering::Relaxed);
                    c2.attempts_done.fetch_add(1, Ordering::Relaxed);
                    return hist;
                }
            };
            // Wait for the common start signal.
            let start = loop {
                if let Some(s) = *start_rx2.borrow() {
                    break s;
                }
                if start_rx2.changed().await.is_err() {
                    return hist;
                }
            };
            let stop_at = start + Duration::from_secs_f64(o2.duration);
            // Pacing: per-connection period, phase spread over the period.
            let period = if o2.rate > 0.0 {
                Some(Duration::from_secs_f64(o2.conns as f64 / o2.rate))
            } else {
                None
            };
            let mut next = match period {
                Some(p) => start + p.mul_f64((idx as f64) / (o2.conns as f64)),
                None => start,
            };
            let mut payload = vec![b'x'; o2.size];
            let timeout = Duration::from_millis(o2.timeout_ms);
            for seq in 0..o2.msgs {
                if let Some(p) = period {
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep_until(next.into()).await;
                    }
                    next += p;
                }
                if Instant::now() >= stop_at {
                    break;
                }
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                let t0 = Instant::now();
                if ws.send(Message::Binary(payload.clone().into())).await.is_err() {
                    c2.msg_err.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let ok = loop {
                    match tokio::time::timeout(timeout, ws.next()).await {
                        Ok(Some(Ok(Message::Binary(b)))) => {
                            break b.len() == o2.size && b[..8] == seq.to_le_bytes();
                        }
                        Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                        _ => break false,
                    }
                };
                if !ok {
                    c2.msg_err.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let us = t0.elapsed().as_micros() as u64;
                let _ = hist.record(us.max(1));
                c2.msgs.fetch_add(1, Ordering::Relaxed);
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
            hist
        }));
    }
    drop(start_rx);
    let all = wait_attempts(&c, o.conns, hard_deadline).await;
    eprintln!(
        "{}",
        connect_line(&o.label, "connect phase", &c.connected, &c.conn_err, t_connect, all)
    );
    // With --rss-pid: the watched tree's CPU ns over the send window only (the connect phase,
    // TLS handshakes included, and the closing left out), and the messages echoed in it.
    let cpu0 = (!o.rss_pids.is_empty()).then(|| tree_cpu_ns(&o.rss_pids));
    let start = Instant::now();
    let _ = start_tx.send(Some(start));
    let window_cpu = cpu0.map(|cpu0| {
        let (pids, c2) = (o.rss_pids.clone(), c.clone());
        let stop_at = start + Duration::from_secs_f64(o.duration);
        tokio::spawn(async move {
            tokio::time::sleep_until(stop_at.into()).await;
            (tree_cpu_ns(&pids).saturating_sub(cpu0), c2.msgs.load(Ordering::Relaxed))
        })
    });

    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let remaining = hard_deadline.saturating_duration_since(Instant::now());
    let joined = tokio::time::timeout(remaining, futures_util::future::join_all(handles)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let timed_out = joined.is_err();
    if let Ok(hs) = joined {
        for h in hs.into_iter().flatten() {
            let _ = merged.add(&h);
        }
    }
    let msgs = c.msgs.load(Ordering::Relaxed);
    // Rate over the send window (duration) unless everything finished earlier.
    let window = elapsed.min(o.duration).max(1e-9);
    let q = |p: f64| {
        if !merged.is_empty() {
            merged.value_at_quantile(p)
        } else {
            0
        }
    };
    if let Some(e) = first_err.lock().unwrap().as_ref() {
        eprintln!("[{}] first connect error: {e}", o.label);
    }
    let window_cpu = match window_cpu {
        Some(h) => match h.await {
            Ok((ns, n)) => format!(",\"window_cpu_ns\":{ns},\"window_msgs\":{n}"),
            Err(_) => String::new(),
        },
        None => String::new(),
    };
    println!(
        "RESULT {{\"label\":\"{}\",\"mode\":\"echo\",\"conns\":{},\"connected\":{},\"conn_err\":{},\"msg_err\":{},\"msgs\":{},\"secs\":{:.3},\"msgs_per_s\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"rate_target\":{},\"size\":{},\"timed_out\":{}{}}}",
        o.label,
        o.conns,
        c.connected.load(Ordering::Relaxed),
        c.conn_err.load(Ordering::Relaxed),
        c.msg_err.load(Ordering::Relaxed),
        msgs,
        window,
        msgs as f64 / window,
        q(0.5),
        q(0.99),
        q(0.999),
        merged.max(),
        o.rate,
        o.size,
        timed_out,
        window_cpu
    );
}

/// Echo one message of `size` bytes (sequence number in its first 8 bytes) and wait for it.
async fn echo_once(ws: &mut Ws, seq: u64, size: usize, timeout: Duration) -> bool {
    let mut payload = vec![b'x'; size.max(8)];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    if ws.send(Message::Binary(payload.into())).await.is_err() {
        return false;
    }
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                return b.len() == size.max(8) && b[..8] == seq.to_le_bytes()
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return false,
        }
    }
}

/// --warm-msgs echoes, alternately 64 bytes and --warm-size bytes; false on the first failure.
async fn warm(ws: &mut Ws, o: &Opts, c: &Counters) -> bool {
    let timeout = Duration::from_millis(o.timeout_ms);
    for seq in 0..o.warm_msgs {
        let size = if seq % 2 == 0 { 64 } else { o.warm_size };
        if !echo_once(ws, seq, size, timeout).await {
            c.msg_err.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        c.msgs.fetch_add(1, Ordering::Relaxed);
    }
    true
}

async fn run_idle(o: Opts, hard_deadline: Instant) {
    let c = new_counters();
    let rss_before = rss_all(&o.rss_pids);
    let sem = Arc::new(Semaphore::new(o.connect_concurrency));
    let (stop_tx, stop_rx) = watch::channel(false);
    let first_err: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut handles = Vec::with_capacity(o.conns);
    let t0 = Instant::now();
    for idx in 0..o.conns {
        let o2 = o.clone();
        let c2 = c.clone();
        let sem2 = sem.clone();
        let mut stop = stop_rx.clone();
        let fe = first_err.clone();
        handles.push(tokio::spawn(async move {
            let permit = sem2.acquire_owned().await.unwrap();
            let r =
                tokio::time::timeout(Duration::from_millis(o2.timeout_ms), connect(&o2, idx)).await;
            drop(permit);
            c2.attempts_done.fetch_add(1, Ordering::Relaxed);
            let mut ws = match r {
                Ok(Ok(ws)) => {
                    c2.connected.fetch_add(1, Ordering::Relaxed);
                    ws
                }
                Ok(Err(e)) => {
                    fe.lock().unwrap().get_or_insert(e);
                    c2.conn_err.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    fe.lock().unwrap().get_or_insert("connect timeout".into());
                    c2.conn_err.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            // Traffic first (--warm-msgs), so that the proxy's buffers for this connection
            // have grown before it idles.
            let warm_ok = warm(&mut ws, &o2, &c2).await;
            c2.warmed.fetch_add(1, Ordering::Relaxed);
            if !warm_ok {
                c2.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            c2.dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        _ => {}
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(1000), ws.close(None)).await;
        }));
    }
    drop(stop_rx);
    let all = wait_attempts(&c, o.conns, hard_deadline).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = c.connected.load(Ordering::Relaxed);
    eprintln!(
        "{}; holding {:.0}s",
        connect_line(&o.label, "idle", &c.connected, &c.conn_err, t0, all),
        o.hold
    );
    if let Some(e) = first_err.lock().unwrap().as_ref() {
        eprintln!("[{}] first connect error: {e}", o.label);
    }
    // Every connection warms up as soon as it is open: the time is from the start of the
    // connect phase until all have echoed their messages.
    if o.warm_msgs > 0 {
        let done = wait_count(&c.warmed, connected as usize, hard_deadline).await;
        eprintln!(
            "[{}] warm-up: {} messages echoed, {} errors, all done {:.2}s after the first connect{}",
            o.label,
            c.msgs.load(Ordering::Relaxed),
            c.msg_err.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64(),
            if done { "" } else { " (deadline hit)" }
        );
    }
    let warm_secs = t0.elapsed().as_secs_f64();
    // Let the proxy settle, then sample RSS a few times while holding; keep the max.
    let hold_until = (Instant::now() + Duration::from_secs_f64(o.hold)).min(hard_deadline);
    let mut rss_after = 0;
    let mut samples = 0;
    tokio::time::sleep(
        Duration::from_secs(2).min(hold_until.saturating_duration_since(Instant::now())),
    )
    .await;
    while Instant::now() < hold_until || samples == 0 {
        rss_after = rss_after.max(rss_all(&o.rss_pids));
        samples += 1;
        let left = hold_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1).min(left)).await;
    }
    let still_open = connected - c.dropped.load(Ordering::Relaxed);
    stop_and_join(&stop_tx, handles, hard_deadline).await;
    let delta = rss_after as i64 - rss_before as i64;
    let per_conn = if still_open > 0 { delta as f64 / still_open as f64 } else { 0.0 };
    println!(
        "RESULT {{\"label\":\"{}\",\"mode\":\"idle\",\"conns\":{},\"connected\":{},\"conn_err\":{},\"still_open\":{},\"rss_before_kb\":{},\"rss_after_kb\":{},\"delta_kb\":{},\"kb_per_conn\":{:.2},\"connect_secs\":{:.2},\"warm_msgs\":{},\"warm_size\":{},\"warm_echoed\":{},\"warm_err\":{},\"warm_secs\":{:.2}}}",
        o.label,
        o.conns,
        connected,
        c.conn_err.load(Ordering::Relaxed),
        still_open,
        rss_before,
        rss_after,
        delta,
        per_conn,
        connect_secs,
        o.warm_msgs,
        o.warm_size,
        c.msgs.load(Ordering::Relaxed),
        c.msg_err.load(Ordering::Relaxed),
        warm_secs
    );
}

fn main() {
    let o = parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    let hard_deadline = Instant::now() + Duration::from_secs_f64(o.max_secs);
    let max = o.max_secs;
    rt.block_on(async move {
        let mode = o.mode.clone();
        let work = async move {
            match mode.as_str() {
                "echo" => run_echo(o, hard_deadline).await,
                "idle" => run_idle(o, hard_deadline).await,
                "sse" => sse::run_sse(o, hard_deadline).await,
                "fanout" => sse::run_fanout(o, hard_deadline).await,
                "storm" => storm::run_storm(o, hard_deadline).await,
                "churn" => churn::run_churn(o, hard_deadline).await,
                _ => usage(),
            }
        };
        // Absolute safety net: never run longer than max-secs + 20 s.
        if tokio::time::timeout(Duration::from_secs_f64(max + 20.0), work).await.is_err() {
            eprintln!("wsload: hard time limit reached, exiting");
            std::process::exit(3);
        }
    });
    // Do not wait for stray tasks.
    rt.shutdown_timeout(Duration::from_millis(200));
}
