//! wsload --mode storm: a reconnect storm. --conns WebSockets are opened through the proxy
//! (one echo each); then every backend is told directly (`POST <close-url>`, the backends'
//! `/ws-close-all`, not through the proxy) to close all of its storm sockets with close code
//! 1012 (service restart), and every client reconnects at once on that code and does one echo.
//! Reported: the time from the close request until every connection is back, the spread of the
//! per-connection times, reconnect attempts that failed, and (--rss-pid) the CPU ns the watched
//! process tree spent from the close request until all were back (schedstat).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::sse::{read_head, split_url};
use crate::{connect, connect_line, echo_once, stop_and_join, tree_cpu_ns, wait_count, Opts, Ws};

#[derive(Default)]
struct Shared {
    attempts_done: AtomicU64,
    connected: AtomicU64,
    conn_err: AtomicU64,
    closed_1012: AtomicU64,
    /// Connections ended otherwise (another close code, EOF, error) before or during the storm.
    closed_other: AtomicU64,
    back: AtomicU64,
    reconnect_err: AtomicU64,
    first_err: Mutex<Option<String>>,
    /// Per connection: µs from the close request until its reconnected socket echoed.
    back_us: Mutex<Option<Histogram<u64>>>,
    t0: OnceLock<Instant>,
}

impl Shared {
    fn err(&self, e: String) {
        self.first_err.lock().unwrap().get_or_insert(e);
    }
}

/// Connect and echo once, within the timeout.
async fn open(o: &Opts, idx: usize) -> Result<Ws, String> {
    let t = Duration::from_millis(o.timeout_ms);
    let mut ws = tokio::time::timeout(t, connect(o, idx))
        .await
        .map_err(|_| "connect timeout".to_string())??;
    if !echo_once(&mut ws, idx as u64, o.size, t).await {
        return Err("echo failed".into());
    }
    Ok(ws)
}

/// Wait for the 1012 close (true) or the stop signal (false).
async fn await_close(ws: &mut Ws, stop: &mut watch::Receiver<bool>, sh: &Shared) -> bool {
    loop {
        tokio::select! {
            _ = stop.changed() => return false,
            m = ws.next() => match m {
                Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::Restart => {
                    // Send the close reply tungstenite queued, then go.
                    let _ = tokio::time::timeout(Duration::from_millis(500), ws.flush()).await;
                    return true;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => {
                    sh.closed_other.fetch_add(1, Ordering::Relaxed);
                    sh.err(format!("ended without 1012: {other:?}"));
                    return false;
                }
            }
        }
    }
}

/// POST to one backend's close-all URL; the number of sockets it closes (`x-closed`).
async fn close_all(url: &str) -> Result<u64, String> {
    let (addr, path) = split_url(url);
    let mut tcp = TcpStream::connect(&addr).await.map_err(|e| format!("close-all tcp: {e}"))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.map_err(|e| format!("close-all write: {e}"))?;
    let mut buf = Vec::new();
    let (head, _) = read_head(&mut tcp, &mut buf).await?;
    if head.status != 200 {
        return Err(format!("close-all status {}", head.status));
    }
    Ok(head.get("x-closed").and_then(|v| v.parse().ok()).unwrap_or(0))
}

pub async fn run_storm(o: Opts, hard_deadline: Instant) {
    let sh = Arc::new(Shared::default());
    *sh.back_us.lock().unwrap() = Some(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap());
    let sem = Arc::new(Semaphore::new(o.connect_concurrency));
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_until = Arc::new(OnceLock::<Instant>::new());
    let mut handles = Vec::with_capacity(o.conns);
    let t_connect = Instant::now();
    for idx in 0..o.conns {
        let (o2, sh2, sem2, mut stop, until) =
            (o.clone(), sh.clone(), sem.clone(), stop_rx.clone(), wait_until.clone());
        handles.push(tokio::spawn(async move {
            let permit = sem2.acquire_owned().await.unwrap();
            let r = open(&o2, idx).await;
            drop(permit);
            sh2.attempts_done.fetch_add(1, Ordering::Relaxed);
            let mut ws = match r {
                Ok(ws) => ws,
                Err(e) => {
                    sh2.conn_err.fetch_add(1, Ordering::Relaxed);
                    sh2.err(e);
                    return;
                }
            };
            sh2.connected.fetch_add(1, Ordering::Relaxed);
            if !await_close(&mut ws, &mut stop, &sh2).await {
                let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
                return;
            }
            drop(ws);
            sh2.closed_1012.fetch_add(1, Ordering::Relaxed);
            // Reconnect at once; a failed attempt is counted and retried after 100 ms, until
            // the storm's wait is over.
            let mut ws = loop {
                match open(&o2, idx).await {
                    Ok(ws) => break ws,
                    Err(e) => {
                        sh2.reconnect_err.fetch_add(1, Ordering::Relaxed);
                        sh2.err(format!("reconnect: {e}"));
                        let give_up =
                            until.get().copied().unwrap_or(hard_deadline).min(hard_deadline);
                        if Instant::now() + Duration::from_millis(100) >= give_up {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            if let Some(t0) = sh2.t0.get() {
                let us = t0.elapsed().as_micros() as u64;
                if let Some(h) = sh2.back_us.lock().unwrap().as_mut() {
                    let _ = h.record(us.max(1));
                }
            }
            sh2.back.fetch_add(1, Ordering::Relaxed);
            let _ = stop.changed().await;
            let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
        }));
    }
    drop(stop_rx);
    let all = wait_count(&sh.attempts_done, o.conns, hard_deadline).await;
    let connected = sh.connected.load(Ordering::Relaxed);
    eprintln!("{}", connect_line(&o.label, "storm", &sh.connected, &sh.conn_err, t_connect, all));
    // Let the connect phase's work settle, then close everything at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = tree_cpu_ns(&o.rss_pids);
    let t0 = Instant::now();
    let _ = sh.t0.set(t0);
    let until = (t0 + Duration::from_secs_f64(o.wait)).min(hard_deadline);
    let _ = wait_until.set(until);
    let closes = futures_util::future::join_all(o.close_urls.iter().map(|u| close_all(u))).await;
    let (mut closed_by_backends, mut close_err) = (0u64, 0u64);
    for r in closes {
        match r {
            Ok(n) => closed_by_backends += n,
            Err(e) => {
                close_err += 1;
                sh.err(e);
            }
        }
    }
    let all_back = wait_count(&sh.back, connected as usize, until).await;
    let storm_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let cpu1 = tree_cpu_ns(&o.rss_pids);
    let back = sh.back.load(Ordering::Relaxed);
    eprintln!(
        "[{}] storm: {} of {} back in {:.0} ms ({} closed by the backends, {} failed reconnects)",
        o.label,
        back,
        connected,
        storm_ms,
        closed_by_backends,
        sh.reconnect_err.load(Ordering::Relaxed)
    );
    if let Some(e) = sh.first_err.lock().unwrap().as_ref() {
        eprintln!("[{}] first error: {e}", o.label);
    }
    stop_and_join(&stop_tx, handles, hard_deadline).await;
    let h = sh.back_us.lock().unwrap().take().unwrap();
    let ms = |q: f64| {
        if h.is_empty() {
            "null".to_string()
        } else {
            format!("{:.1}", h.value_at_quantile(q) as f64 / 1000.0)
        }
    };
    let not_back = connected.saturating_sub(back);
    let reconnect_err = sh.reconnect_err.load(Ordering::Relaxed);
    let conn_err = sh.conn_err.load(Ordering::Relaxed);
    println!(
        "RESULT {{\"label\":\"{}\",\"mode\":\"storm\",\"conns\":{},\"connected\":{},\"conn_err\":{},\"closed_by_backends\":{},\"closed_1012\":{},\"closed_other\":{},\"back\":{},\"not_back\":{},\"reconnect_err\":{},\"close_err\":{},\"errors\":{},\"all_back_ms\":{},\"storm_ms\":{:.1},\"back_p50_ms\":{},\"back_p99_ms\":{},\"back_max_ms\":{},\"storm_cpu_ns\":{}}}",
        o.label,
        o.conns,
        connected,
        conn_err,
        closed_by_backends,
        sh.closed_1012.load(Ordering::Relaxed),
        sh.closed_other.load(Ordering::Relaxed),
        back,
        not_back,
        reconnect_err,
        close_err,
        conn_err + not_back + reconnect_err + close_err + sh.closed_other.load(Ordering::Relaxed),
        if all_back { format!("{storm_ms:.1}") } else { "null".into() },
        storm_ms,
        ms(0.5),
        ms(0.99),
        ms(1.0),
        if o.rss_pids.is_empty() { "null".to_string() } else { (cpu1.saturating_sub(cpu0)).to_string() }
    );
}
