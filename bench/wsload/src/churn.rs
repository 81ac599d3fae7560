//! wsload --mode churn: --conns loops, each: connect -> TLS 1.3 handshake (https://; resuming
//! the session its previous connection got, from a session cache of the loop's own, as one
//! client would) -> one `GET /docs/doc-<k>/content` with `X-Doc-Id: doc-<k>` and
//! `Connection: close` -> read the response -> wait for the server's close -> next, for
//! --duration s. Keys cycle over --ids. Reports requests/s, latency of the whole exchange
//! (connect to response), errors, and how many handshakes resumed a session (rustls's
//! handshake kind). WSLOAD_DEBUG set in the environment prints every connection's TLS version,
//! cipher suite, key exchange group and resumption to stderr.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sse::read_head;
use crate::tls::{self, Conn};
use crate::{authority, Opts};

#[derive(Default)]
struct Shared {
    requests: AtomicU64,
    errors: AtomicU64,
    resumed: AtomicU64,
    first_err: Mutex<Option<String>>,
}

/// One exchange on a new connection; Ok(resumed?).
async fn exchange(
    addr: &str,
    tls: Option<(&Arc<ClientConfig>, &ServerName<'static>)>,
    k: usize,
) -> Result<bool, String> {
    let mut c = Conn::connect(addr, tls).await?;
    let resumed = c.resumed();
    if std::env::var_os("WSLOAD_DEBUG").is_some() {
        eprintln!("{} resumed={resumed}", c.describe());
    }
    let req = format!(
        "GET /docs/doc-{k}/content HTTP/1.1\r\nHost: {addr}\r\nX-Doc-Id: doc-{k}\r\nConnection: close\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let (head, rest) = read_head(&mut c, &mut buf).await?;
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    let len: usize = head
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no content-length".to_string())?;
    let mut left = len.saturating_sub(rest.len());
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let n = c.read(&mut chunk).await.map_err(|e| format!("read body: {e}"))?;
        if n == 0 {
            return Err("closed in the body".into());
        }
        left = left.saturating_sub(n);
    }
    // `Connection: close`: the server closes; wait for it (bounded), so that every target's
    // connections end the same way (server first), then drop ours.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = c.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(resumed)
}

pub async fn run_churn(o: Opts, hard_deadline: Instant) {
    let (addr, host, is_tls) = authority(&o.url);
    let name = tls::server_name(&host);
    let sh = Arc::new(Shared::default());
    let start = Instant::now();
    let stop_at = (start + Duration::from_secs_f64(o.duration)).min(hard_deadline);
    let timeout = Duration::from_millis(o.timeout_ms);
    let mut handles = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        let (o2, sh2, addr2, name2) = (o.clone(), sh.clone(), addr.clone(), name.clone());
        handles.push(tokio::spawn(async move {
            // A session store of this loop's own: its next connection resumes its last session.
            let cfg = is_tls.then(|| tls::client_config(o2.sessions));
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut n = 0usize;
            while Instant::now() < stop_at {
                let k = (i + n * o2.conns) % o2.ids;
                n += 1;
                let t0 = Instant::now();
                let r = tokio::time::timeout(
                    timeout,
                    exchange(&addr2, cfg.as_ref().map(|c| (c, &name2)), k),
                )
                .await;
                match r {
                    Ok(Ok(resumed)) => {
                        let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
                        sh2.requests.fetch_add(1, Ordering::Relaxed);
                        if resumed {
                            sh2.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    other => {
                        let e = match other {
                            Ok(Err(e)) => e,
                            _ => "timeout".to_string(),
                        };
                        sh2.errors.fetch_add(1, Ordering::Relaxed);
                        sh2.first_err.lock().unwrap().get_or_insert(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            hist
        }));
    }
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let left = hard_deadline.saturating_duration_since(Instant::now());
    let timed_out = match tokio::time::timeout(left, futures_util::future::join_all(handles)).await
    {
        Ok(hs) => {
            for h in hs.into_iter().flatten() {
                let _ = merged.add(&h);
            }
            false
        }
        Err(_) => true,
    };
    let secs = start.elapsed().as_secs_f64().min(o.duration.max(1e-9)).max(1e-9);
    let requests = sh.requests.load(Ordering::Relaxed);
    let resumed = sh.resumed.load(Ordering::Relaxed);
    if let Some(e) = sh.first_err.lock().unwrap().as_ref() {
        eprintln!("[{}] first error: {e}", o.label);
    }
    let q = |p: f64| {
        if merged.is_empty() {
            0
        } else {
            merged.value_at_quantile(p)
        }
    };
    println!(
        "RESULT {{\"label\":\"{}\",\"mode\":\"churn\",\"tls\":{},\"conns\":{},\"requests\":{},\"errors\":{},\"resumed\":{},\"full\":{},\"resumed_frac\":{:.4},\"secs\":{:.3},\"req_per_s\":{:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"sessions\":{},\"timed_out\":{}}}",
        o.label,
        is_tls,
        o.conns,
        requests,
        sh.errors.load(Ordering::Relaxed),
        resumed,
        if is_tls { requests - resumed } else { 0 },
        if requests > 0 { resumed as f64 / requests as f64 } else { 0.0 },
        secs,
        requests as f64 / secs,
        q(0.5),
        q(0.99),
        merged.max(),
        o.sessions,
        timed_out
    );
}
