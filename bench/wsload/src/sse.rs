//! The SSE modes of wsload: `sse` (hold N event streams, first-event latency, memory per
//! stream) and `fanout` (N streams of one document, events published through the proxy,
//! delivery latency). Plain HTTP/1.1 over tokio TcpStreams, requests written by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

use crate::{rss_all, stop_and_join, tree_cpu_ns, wait_count, Opts};

/// The document every fanout stream subscribes to and every publish goes to.
const FANOUT_DOC: &str = "doc-fanout";

/// open_stream's error for a 429 answer (counted as `refused`).
const REFUSED: &str = "status 429";

/// Process start: fanout timestamps are µs since then.
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// (host:port, path) of an http:// URL.
pub(crate) fn split_url(url: &str) -> (String, String) {
    let rest = &url["http://".len()..];
    let end = rest.find('/').unwrap_or(rest.len());
    let a = &rest[..end];
    let path = if end < rest.len() { &rest[end..] } else { "/" };
    (if a.contains(':') { a.to_string() } else { format!("{a}:80") }, path.to_string())
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A response head: status, and the headers the modes look at (lower-cased names).
pub(crate) struct Head {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "head not utf-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Head { status, headers })
}

/// Read until the end of a response head; returns it and the bytes after it.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(Head, Vec<u8>), String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            let head = parse_head(&buf[..p])?;
            let rest = buf[p + 4..].to_vec();
            buf.clear();
            return Ok((head, rest));
        }
        if buf.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Chunked transfer decoding (or pass-through), incremental.
enum Framing {
    Raw,
    Size(usize, bool), // hex digits so far, inside a chunk extension
    Data(usize),
    DataEnd,
    Done,
}

impl Framing {
    /// Append the body bytes of `input` to `out`; false once the body has ended.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> bool {
        while !input.is_empty() {
            match self {
                Framing::Raw => {
                    out.extend_from_slice(input);
                    return true;
                }
                Framing::Done => return false,
                Framing::Size(n, ext) => {
                    let b = input[0];
                    input = &input[1..];
                    match b {
                        b'\n' => *self = if *n == 0 { Framing::Done } else { Framing::Data(*n) },
                        b'\r' => {}
                        b';' => *ext = true,
                        _ if *ext => {}
                        _ => {
                            let d = (b as char).to_digit(16).unwrap_or(0) as usize;
                            *n = *n * 16 + d;
                        }
                    }
                }
                Framing::Data(left) => {
                    let k = (*left).min(input.len());
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    *left -= k;
                    if *left == 0 {
                        *self = Framing::DataEnd;
                    }
                }
                Framing::DataEnd => {
                    let b = input[0];
                    input = &input[1..];
                    if b == b'\n' {
                        *self = Framing::Size(0, false);
                    }
                }
            }
        }
        !matches!(self, Framing::Done)
    }
}

/// An event-stream parser: dispatches the data of each event (comments and events without
/// `data:` lines are not events).
#[derive(Default)]
struct Events {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl Events {
    fn feed(&mut self, body: &[u8], mut on_event: impl FnMut(&[u8])) {
        for &b in body {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
            if line.is_empty() {
                if self.has_data {
                    on_event(&self.data);
                }
                self.data.clear();
                self.has_data = false;
            } else if let Some(v) = line.strip_prefix(b"data:") {
                let v = v.strip_prefix(b" ").unwrap_or(v);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(v);
                self.has_data = true;
            }
            self.line.clear();
        }
    }
}

/// One open event stream.
struct Stream {
    tcp: TcpStream,
    framing: Framing,
    events: Events,
    body: Vec<u8>,
}

impl Stream {
    /// Read once; calls on_event per complete event. Err when the stream ended or failed.
    async fn read(
        &mut self,
        buf: &mut [u8],
        on_event: &mut impl FnMut(&[u8]),
    ) -> Result<(), String> {
        let n = self.tcp.read(buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed by the peer".into());
        }
        self.body.clear();
        let open = self.framing.feed(&buf[..n], &mut self.body);
        self.events.feed(&self.body, &mut *on_event);
        if open {
            Ok(())
        } else {
            Err("response ended (last chunk)".into())
        }
    }
}

struct Shared {
    attempts_done: AtomicU64,
    up: AtomicU64,
    errors: AtomicU64,
    closed_early: AtomicU64,
    events: AtomicU64,
    pub_received: AtomicU64,
    refused: AtomicU64,
    first_err: Mutex<Option<String>>,
    first_event: Mutex<Histogram<u64>>,
    delivery: Mutex<Histogram<u64>>,
}

fn hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn err(sh: &Shared, e: String) {
    sh.first_err.lock().unwrap().get_or_insert(e);
    sh.errors.fetch_add(1, Ordering::Relaxed);
}

/// Connect, send the GET, check the head, read to the first event. The first-event latency
/// is measured from writing the request.
async fn open_stream(o: &Opts, doc: &str, sh: &Shared) -> Result<Stream, String> {
    let (addr, path) = split_url(&o.url);
    let mut tcp = TcpStream::connect(&addr).await.map_err(|e| format!("tcp: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-Doc-Id: {doc}\r\nAccept: text/event-stream\r\n\r\n"
    );
    let t0 = Instant::now();
    tcp.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let (head, rest) = read_head(&mut tcp, &mut buf).await?;
    if head.status == 429 {
        return Err(REFUSED.into());
    }
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    if !head.get("content-type").is_some_and(|v| v.starts_with("text/event-stream")) {
        return Err(format!("content-type {:?}", head.get("content-type")));
    }
    let chunked =
        head.get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut s = Stream {
        tcp,
        framing: if chunked { Framing::Size(0, false) } else { Framing::Raw },
        events: Events::default(),
        body: Vec::new(),
    };
    let mut got = 0u64;
    let open = s.framing.feed(&rest, &mut s.body);
    s.events.feed(&s.body, |_| got += 1);
    if !open && got == 0 {
        return Err("response ended before the first event".into());
    }
    let mut rbuf = [0u8; 4096];
    while got == 0 {
        s.read(&mut rbuf, &mut |_: &[u8]| got += 1).await?;
    }
    let us = t0.elapsed().as_micros() as u64;
    let _ = sh.first_event.lock().unwrap().record(us.max(1));
    sh.events.fetch_add(got, Ordering::Relaxed);
    Ok(s)
}

/// Spawn the subscriber tasks: each opens its stream (bounded by --timeout-ms and the
/// connect concurrency), then reads until `stop`; a stream the other side ends before
/// that is an error (closed_early). Fanout events (data = a µs timestamp) are timed.
fn spawn_streams(
    o: &Opts,
    sh: &Arc<Shared>,
    stop_rx: &watch::Receiver<bool>,
    fanout: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let sem = Arc::new(Semaphore::new(o.connect_concurrency));
    (0..o.conns)
        .map(|idx| {
            let o2 = o.clone();
            let sh2 = sh.clone();
            let sem2 = sem.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let doc = if fanout {
                    FANOUT_DOC.to_string()
                } else if !o2.doc.is_empty() {
                    o2.doc.clone()
                } else {
                    format!("doc-{}", idx % o2.ids)
                };
                let permit = sem2.acquire_owned().await.unwrap();
                let r = tokio::time::timeout(
                    Duration::from_millis(o2.timeout_ms),
                    open_stream(&o2, &doc, &sh2),
                )
                .await;
                drop(permit);
                sh2.attempts_done.fetch_add(1, Ordering::Relaxed);
                let mut s = match r {
                    Ok(Ok(s)) => {
                        sh2.up.fetch_add(1, Ordering::Relaxed);
                        s
                    }
                    Ok(Err(e)) if e == REFUSED => {
                        sh2.refused.fetch_add(1, Ordering::Relaxed);
                        if o2.refused_ok {
                            return;
                        }
                        return err(&sh2, e);
                    }
                    Ok(Err(e)) => return err(&sh2, e),
                    Err(_) => return err(&sh2, "no first event within --timeout-ms".into()),
                };
                let mut buf = [0u8; 4096];
                let mut on_event = |data: &[u8]| {
                    sh2.events.fetch_add(1, Ordering::Relaxed);
                    if fanout {
                        if let Some(sent) =
                            std::str::from_utf8(data).ok().and_then(|d| d.parse::<u64>().ok())
                        {
                            let us = now_us().saturating_sub(sent);
                            let _ = sh2.delivery.lock().unwrap().record(us.max(1));
                            sh2.pub_received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                };
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        r = s.read(&mut buf, &mut on_event) => if let Err(e) = r {
                            sh2.closed_early.fetch_add(1, Ordering::Relaxed);
                            return err(&sh2, format!("stream ended early: {e}"));
                        }
                    }
                }
                // Dropping the socket closes the stream.
            })
        })
        .collect()
}

fn new_shared() -> Arc<Shared> {
    Arc::new(Shared {
        attempts_done: AtomicU64::new(0),
        up: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        closed_early: AtomicU64::new(0),
        events: AtomicU64::new(0),
        pub_received: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        first_err: Mutex::new(None),
        first_event: Mutex::new(hist()),
        delivery: Mutex::new(hist()),
    })
}

fn ms(h: &Histogram<u64>, q: Option<f64>) -> String {
    if h.is_empty() {
        return "null".into();
    }
    let us = match q {
        Some(q) => h.value_at_quantile(q),
        None => h.max(),
    };
    format!("{:.3}", us as f64 / 1000.0)
}

/// RSS of the watched processes: the max of a few samples over `d` (at least one).
async fn rss_max_over(pids: &[u32], d: Duration) -> u64 {
    let until = Instant::now() + d;
    let mut m = rss_all(pids);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250).min(until - Instant::now())).await;
        m = m.max(rss_all(pids));
    }
    m
}

/// The connect phase shared by both modes; returns (connected, connect secs, rss_before).
async fn connect_phase(
    o: &Opts,
    sh: &Arc<Shared>,
    stop_rx: &watch::Receiver<bool>,
    fanout: bool,
    hard_deadline: Instant,
) -> (u64, f64, u64, Vec<tokio::task::JoinHandle<()>>) {
    let rss_before = rss_all(&o.rss_pids);
    let t0 = Instant::now();
    let handles = spawn_streams(o, sh, stop_rx, fanout);
    let all = wait_count(&sh.attempts_done, o.conns, hard_deadline).await;
    let secs = t0.elapsed().as_secs_f64();
    let up = sh.up.load(Ordering::Relaxed);
    eprintln!(
        "[{}] {}: {} streams up (first event seen), {} failed in {:.2}s{}",
        o.label,
        o.mode,
        up,
        sh.errors.load(Ordering::Relaxed),
        secs,
        if all { "" } else { " (deadline hit)" }
    );
    (up, secs, rss_before, handles)
}

async fn finish(
    sh: &Shared,
    label: &str,
    stop_tx: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    hard_deadline: Instant,
) {
    stop_and_join(&stop_tx, handles, hard_deadline).await;
    if let Some(e) = sh.first_err.lock().unwrap().as_ref() {
        eprintln!("[{label}] first error: {e}");
    }
}

fn kb_per(delta_kb: i64, n: u64, have_pids: bool) -> String {
    if !have_pids || n == 0 {
        "null".into()
    } else {
        format!("{:.2}", delta_kb as f64 / n as f64)
    }
}

pub async fn run_sse(o: Opts, hard_deadline: Instant) {
    let t_start = Instant::now();
    let sh = new_shared();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (up, connect_secs, rss_before, handles) =
        connect_phase(&o, &sh, &stop_rx, false, hard_deadline).await;
    drop(stop_rx);
    // Hold: RSS sampled over the first second (the backends send 3 events 100 ms apart) and
    // then every second; the max is the figure. Streams that end meanwhile are errors.
    let hold_until = (Instant::now() + Duration::from_secs_f64(o.hold)).min(hard_deadline);
    let mut rss_after = rss_max_over(
        &o.rss_pids,
        Duration::from_secs(1).min(hold_until - Instant::now().min(hold_until)),
    )
    .await;
    while Instant::now() < hold_until {
        let left = hold_until.saturating_duration_since(Instant::now());
        rss_after =
            rss_after.max(rss_max_over(&o.rss_pids, Duration::from_secs(1).min(left)).await);
    }
    let still_open = up - sh.closed_early.load(Ordering::Relaxed);
    finish(&sh, &o.label, stop_tx, handles, hard_deadline).await;
    let fe = sh.first_event.lock().unwrap();
    let delta = rss_after as i64 - rss_before as i64;
    println!(
        "RESULT {{\"label\":\"{}\",\"mode\":\"sse\",\"conns\":{},\"connected\":{},\"errors\":{},\"refused\":{},\"closed_early\":{},\"still_open\":{},\"first_event_p50_ms\":{},\"first_event_p99_ms\":{},\"first_event_max_ms\":{},\"rss_before_kb\":{},\"rss_after_kb\":{},\"kb_per_stream\":{},\"events\":{},\"connect_secs\":{:.2},\"hold\":{},\"secs\":{:.3}}}",
        o.label,
        o.conns,
        up,
        sh.errors.load(Ordering::Relaxed),
        sh.refused.load(Ordering::Relaxed),
        sh.closed_early.load(Ordering::Relaxed),
        still_open,
        ms(&fe, Some(0.5)),
        ms(&fe, Some(0.99)),
        ms(&fe, None),
        if o.rss_pids.is_empty() { "null".into() } else { rss_before.to_string() },
        if o.rss_pids.is_empty() { "null".into() } else { rss_after.to_string() },
        kb_per(delta, up, !o.rss_pids.is_empty()),
        sh.events.load(Ordering::Relaxed),
        connect_secs,
        o.hold,
        t_start.elapsed().as_secs_f64()
    );
}

/// One keep-alive publisher connection: POST /publish/x, X-Doc-Id FANOUT_DOC, body = the send
/// time (µs since the tool's start). Returns x-delivered.
struct Publisher {
    addr: String,
    tcp: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Publisher {
    async fn publish(&mut self) -> Result<u64, String> {
        if self.tcp.is_none() {
            let t =
                TcpStream::connect(&self.addr).await.map_err(|e| format!("publish tcp: {e}"))?;
            let _ = t.set_nodelay(true);
            self.tcp = Some(t);
        }
        let tcp = self.tcp.as_mut().unwrap();
        let body = now_us().to_string();
        let req = format!(
            "POST /publish/x HTTP/1.1\r\nHost: {}\r\nX-Doc-Id: {FANOUT_DOC}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let r = async {
            tcp.write_all(req.as_bytes()).await.map_err(|e| format!("publish write: {e}"))?;
            let (head, mut rest) = read_head(tcp, &mut self.buf).await?;
            let len: usize = head.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut chunk = [0u8; 1024];
            while rest.len() < len {
                let n = tcp.read(&mut chunk).await.map_err(|e| format!("publish read: {e}"))?;
                if n == 0 {
                    return Err("publish: closed in the body".to_string());
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            if head.status != 200 {
                return Err(format!("publish status {}", head.status));
            }
            if head.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                return Ok((
                    head.get("x-delivered").and_then(|v| v.parse().ok()).unwrap_or(0),
                    true,
                ));
            }
            Ok((head.get("x-delivered").and_then(|v| v.parse().ok()).unwrap_or(0), false))
        }
        .await;
        match r {
            Ok((d, close)) => {
                if close {
                    self.tcp = None;
                }
                Ok(d)
            }
            Err(e) => {
                self.tcp = None;
                Err(e)
            }
        }
    }
}

pub async fn run_fanout(o: Opts, hard_deadline: Instant) {
    let t_start = Instant::now();
    let sh = new_shared();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (up, connect_secs, rss_before, handles) =
        connect_phase(&o, &sh, &stop_rx, true, hard_deadline).await;
    drop(stop_rx);
    // Let the backends' 3 opening events (100 ms apart) pass, and take the memory figure.
    let rss_after = rss_max_over(&o.rss_pids, Duration::from_millis(400)).await;
    let (addr, _) = split_url(&o.url);
    let mut p = Publisher { addr, tcp: None, buf: Vec::new() };
    let interval = Duration::from_millis(o.interval_ms.max(1));
    let cpu0 = tree_cpu_ns(&o.rss_pids);
    let t_pub = Instant::now();
    let (mut published, mut pub_errors, mut delivered_backend) = (0u64, 0u64, 0u64);
    for k in 0..o.msgs {
        let at = t_pub + interval * k as u32;
        if at >= hard_deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        match tokio::time::timeout(Duration::from_millis(o.timeout_ms), p.publish()).await {
            Ok(Ok(d)) => {
                published += 1;
                delivered_backend += d;
            }
            Ok(Err(e)) => {
                pub_errors += 1;
                sh.first_err.lock().unwrap().get_or_insert(e);
            }
            Err(_) => {
                pub_errors += 1;
                p.tcp = None;
                sh.first_err.lock().unwrap().get_or_insert("publish timeout".into());
            }
        }
    }
    // Wait (bounded) until every stream that is up has every published event. Not
    // x-delivered: it also counts streams whose client is gone but whose backend connection
    // has not noticed yet (it does on the next write).
    let want = published * up;
    let grace = (Instant::now() + Duration::from_secs(5)).min(hard_deadline);
    while sh.pub_received.load(Ordering::Relaxed) < want && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pub_secs = t_pub.elapsed().as_secs_f64();
    let cpu1 = tree_cpu_ns(&o.rss_pids);
    let received = sh.pub_received.load(Ordering::Relaxed);
    let still_open = up - sh.closed_early.load(Ordering::Relaxed);
    finish(&sh, &o.label, stop_tx, handles, hard_deadline).await;
    let expected = published * up;
    let fe = sh.first_event.lock().unwrap();
    let dl = sh.delivery.lock().unwrap();
    let have = !o.rss_pids.is_empty();
    println!(
        "RESULT {{\"label\":\"{}\",\"mode\":\"fanout\",\"conns\":{},\"connected\":{},\"errors\":{},\"closed_early\":{},\"still_open\":{},\"msgs\":{},\"interval_ms\":{},\"published\":{},\"pub_errors\":{},\"delivered_backend\":{},\"expected\":{},\"received\":{},\"missed\":{},\"delivery_p50_ms\":{},\"delivery_p99_ms\":{},\"delivery_max_ms\":{},\"first_event_p50_ms\":{},\"first_event_p99_ms\":{},\"first_event_max_ms\":{},\"kb_per_stream\":{},\"pub_cpu_ns\":{},\"pub_secs\":{:.3},\"events\":{},\"connect_secs\":{:.2},\"secs\":{:.3}}}",
        o.label,
        o.conns,
        up,
        sh.errors.load(Ordering::Relaxed) + pub_errors,
        sh.closed_early.load(Ordering::Relaxed),
        still_open,
        o.msgs,
        o.interval_ms,
        published,
        pub_errors,
        delivered_backend,
        expected,
        received,
        expected.saturating_sub(received),
        ms(&dl, Some(0.5)),
        ms(&dl, Some(0.99)),
        ms(&dl, None),
        ms(&fe, Some(0.5)),
        ms(&fe, Some(0.99)),
        ms(&fe, None),
        kb_per(rss_after as i64 - rss_before as i64, up, have),
        if have { cpu1.saturating_sub(cpu0).to_string() } else { "null".into() },
        pub_secs,
        sh.events.load(Ordering::Relaxed),
        connect_secs,
        t_start.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_events() {
        let raw = b"1b\r\nid: 0\nevent: tick\ndata: 1\n\n\r\n7\r\ndata: 2\r\n5\r\n\n\n: x\r\n6\r\n\n\ndata\r\n0\r\n\r\n";
        let mut f = Framing::Size(0, false);
        let mut ev = Events::default();
        let mut got = vec![];
        for b in raw.chunks(3) {
            let mut out = vec![];
            f.feed(b, &mut out);
            ev.feed(&out, |d| got.push(String::from_utf8(d.to_vec()).unwrap()));
        }
        assert_eq!(got, vec!["1", "2"]);
        assert!(matches!(f, Framing::Done));
    }
}
