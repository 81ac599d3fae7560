//! Shared set-up for the end-to-end tests: three real backends and the real `tether` binary.

pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tether_testkit::{
    free_addr, http_request, wait_until_async, HttpResponse, LaunchOptions, TestBackend,
    TetherProcess,
};

/// Three backends named `b0`, `b1`, `b2`, and tether in front of them.
pub struct Stack {
    /// The running backends, in config order.
    pub backends: Vec<TestBackend>,
    /// The running proxy.
    pub tether: TetherProcess,
    /// The proxy listener.
    pub proxy: SocketAddr,
    /// The config the proxy runs with.
    pub config: String,
}

/// The `tether` binary built for this test run.
pub fn tether_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// Fills a config template: `$PROXY`, `$ADMIN`, `$B0`..`$B2` (live backends) and
/// `$DEAD0`, `$DEAD1` (addresses with nothing listening).
pub fn fill(
    template: &str,
    proxy: SocketAddr,
    admin: SocketAddr,
    backends: &[SocketAddr],
    dead: &[SocketAddr],
) -> String {
    let mut text = template
        .replace("$PROXY", &proxy.to_string())
        .replace("$ADMIN", &admin.to_string());
    for (i, b) in backends.iter().enumerate() {
        text = text.replace(&format!("$B{i}"), &b.to_string());
    }
    for (i, d) in dead.iter().enumerate() {
        text = text.replace(&format!("$DEAD{i}"), &d.to_string());
    }
    text
}

impl Stack {
    /// Starts three backends and tether with `template` (see [`fill`]), and waits until the
    /// proxy listener accepts connections.
    pub async fn start(template: &str) -> Stack {
        Stack::start_with(template, LaunchOptions::default()).await
    }

    /// [`Stack::start`] with extra arguments, files or environment for tether.
    pub async fn start_with(template: &str, options: LaunchOptions<'_>) -> Stack {
        let mut backends = Vec::new();
        for i in 0..3 {
            backends.push(TestBackend::start(&format!("b{i}")).await);
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
        let dead = vec![free_addr(), free_addr()];
        let proxy = free_addr();
        let admin = free_addr();
        let config = fill(template, proxy, admin, &addrs, &dead);
        let tether = match TetherProcess::start_with(tether_binary(), &config, admin, options).await
        {
            Ok(t) => t,
            Err(e) => panic!("tether did not start: {e}\nconfig:\n{config}"),
        };
        let listening = wait_until_async(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(proxy).await.is_ok()
        })
        .await;
        assert!(listening, "proxy listener {proxy} never accepted");
        Stack {
            backends,
            tether,
            proxy,
            config,
        }
    }

    /// `http://<proxy><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    /// `ws://<proxy><path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.proxy, path)
    }

    /// The backend with this name.
    pub fn backend(&self, name: &str) -> &TestBackend {
        match self.backends.iter().find(|b| b.name() == name) {
            Some(b) => b,
            None => panic!("no backend named {name}"),
        }
    }

    /// `POST` to the admin API (`/reload`, a drain path) with no body.
    pub async fn admin_post(&self, path: &str) -> HttpResponse {
        match http_request(
            http::Method::POST,
            &self.tether.admin_url(path),
            &[],
            Vec::new(),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    /// Drains (`true`) or undrains backend `name` of upstream `docs` through the admin API.
    pub async fn set_drain(&self, name: &str, drain: bool) {
        let addr = self.backend(name).addr();
        let method = if drain {
            http::Method::POST
        } else {
            http::Method::DELETE
        };
        let url = self
            .tether
            .admin_url(&format!("/upstreams/docs/backends/{addr}/drain"));
        let resp = tether_testkit::http_request(method, &url, &[], Vec::new())
            .await
            .expect("drain request");
        assert_eq!(resp.status, 200, "{}", resp.text());
    }

    /// The name of the backend at `addr`.
    pub fn name_of(&self, addr: SocketAddr) -> &str {
        match self.backends.iter().find(|b| b.addr() == addr) {
            Some(b) => b.name(),
            None => panic!("no backend at {addr}"),
        }
    }
}

/// The text of tether's `GET /metrics` ("" if it cannot be fetched).
pub async fn metrics_text(stack: &Stack) -> String {
    tether_testkit::http_get(&stack.tether.admin_url("/metrics"), &[])
        .await
        .map(|r| r.text())
        .unwrap_or_default()
}

/// The value of one series, named with its labels exactly as served (labels sorted by name),
/// e.g. `tether_split_keys{upstream="docs"}`.
pub fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// [`series_value`] of a fresh scrape.
pub async fn metric(stack: &Stack, series: &str) -> Option<f64> {
    series_value(&metrics_text(stack).await, series)
}

/// The config most tests use: one sticky route per key source, plus routes for the error cases.
pub const STANDARD: &str = r#"
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
  refused:
    backends:
      - address: $DEAD0
      - address: $DEAD1
  dead:
    backends:
      - address: $DEAD0
    health_check:
      tcp: {}
      interval: 100ms
      timeout: 100ms
      unhealthy_after: 1
routes:
  - name: by-header
    match: { path_prefix: /h/ }
    sticky: { keys: [ { header: X-Doc-Id } ] }
    upstream: docs
  - name: by-cookie
    match: { path_prefix: /c/ }
    sticky: { keys: [ { cookie: doc_id } ] }
    upstream: docs
  - name: by-query
    match: { path_prefix: /q/ }
    sticky: { keys: [ { query: doc } ] }
    upstream: docs
  - name: by-path
    match: { path_prefix: /docs/ }
    sticky:
      keys:
        - header: X-Doc-Id
        - path: /docs/{key}
    upstream: docs
  - name: long-poll
    match: { path_prefix: /lp/ }
    sticky: { keys: [ { path: "/lp/{key}" } ] }
    upstream: docs
    long_poll: true
  - name: short-idle
    match: { path_prefix: /idle/ }
    sticky: { keys: [ { path: "/idle/{key}" } ] }
    upstream: docs
    timeouts: { idle: 2s }
  - name: slow
    match: { path_prefix: /slow/ }
    upstream: docs
    timeouts: { read: 500ms }
  - name: refused
    match: { path_prefix: /refused/ }
    upstream: refused
    retries: 1
  - name: dead
    match: { path_prefix: /dead/ }
    upstream: dead
"#;

/// A backend that answers every connection with fixed bytes (after reading the request head),
/// then closes: for response-side faults no real server would produce.
pub struct RawBackend {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// Every byte the backend received, all connections in order of arrival.
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawBackend {
    /// Answers the first request head of each connection with `answer` and closes; with
    /// `keep_alive`, answers every request head (bodiless requests) and keeps the connection.
    pub async fn start(answer: Vec<u8>, keep_alive: bool) -> RawBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = answer.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut chunk = vec![0u8; 65536];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if let Ok(mut all) = log.lock() {
                            all.extend_from_slice(&chunk[..n]);
                        }
                        pending.extend_from_slice(&chunk[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            if stream.write_all(&answer).await.is_err() {
                                return;
                            }
                            if !keep_alive {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            task,
            received,
            accepted,
        }
    }

    /// How many connections it has accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Everything received so far.
    pub fn received_bytes(&self) -> Vec<u8> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Everything received so far, as text.
    pub fn received(&self) -> String {
        self.received
            .lock()
            .map(|r| String::from_utf8_lossy(&r).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One route to one upstream of one backend (`$FAULTY`), for [`start_faulty`].
pub const FAULTY: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  faulty:
    backends: [ { address: $FAULTY } ]
routes:
  - name: faulty
    match: { path_prefix: / }
    upstream: faulty
    timeouts: { read: 3s }
"#;

/// Tether in front of one raw backend, `server_limits` (YAML flow map or "") applied; returns
/// once its listener accepts connections.
pub async fn start_faulty(
    backend: std::net::SocketAddr,
    server_limits: &str,
) -> (tether_testkit::TetherProcess, std::net::SocketAddr) {
    let proxy = tether_testkit::free_addr();
    let admin = tether_testkit::free_addr();
    let mut config = FAULTY
        .replace("$PROXY", &proxy.to_string())
        .replace("$ADMIN", &admin.to_string())
        .replace("$FAULTY", &backend.to_string());
    if !server_limits.is_empty() {
        config = config.replace(
            "admin: {",
            &format!("server: {{ limits: {server_limits} }}\nadmin: {{"),
        );
    }
    (start_listening(&config, proxy, admin).await, proxy)
}

/// Tether on `config` (admin on `admin`); returns once its listener on `proxy` accepts
/// connections.
pub async fn start_listening(
    config: &str,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> tether_testkit::TetherProcess {
    let tether = tether_testkit::TetherProcess::start(tether_binary(), config, admin)
        .await
        .expect("tether");
    let listening = tether_testkit::wait_until_async(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(proxy).await.is_ok()
    })
    .await;
    assert!(listening, "proxy listener never accepted");
    tether
}

/// An open WebSocket of one document that remembers how it ended, read in the background.
pub struct Socket {
    /// The document.
    pub key: String,
    /// The backend that answered the upgrade (`x-backend`).
    pub backend: String,
    /// Close code (None: no close frame) once the socket ended.
    ended: std::sync::Arc<std::sync::Mutex<Option<Option<u16>>>>,
    _keep: tokio::task::JoinHandle<()>,
}

impl Socket {
    /// Opens `url` for document `key`.
    pub async fn open(url: &str, key: &str) -> Socket {
        use futures_util::StreamExt;
        let (backend, ws) = open_tagged(url).await;
        let ended = std::sync::Arc::new(std::sync::Mutex::new(None));
        let ended_by_reader = ended.clone();
        let keep = tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            let code = loop {
                match stream.next().await {
                    Some(Ok(tether_testkit::Message::Close(frame))) => {
                        break frame.map(|f| u16::from(f.code))
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break None,
                }
            };
            *ended_by_reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
        });
        Socket {
            key: key.to_string(),
            backend,
            ended,
            _keep: keep,
        }
    }

    /// How it ended: `Some(close code)` once it did.
    pub fn ended(&self) -> Option<Option<u16>> {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `POST` (Some backend) or `DELETE` (None) the pin of document `key` of upstream `docs`
/// through `tether`'s admin API: the status and the JSON answer.
pub async fn pin_request(
    tether: &TetherProcess,
    key: &str,
    backend: Option<&str>,
) -> (u16, serde_json::Value) {
    let url = tether.admin_url(&format!("/upstreams/docs/keys/{key}/pin"));
    let (method, body) = match backend {
        Some(b) => (http::Method::POST, format!("{{\"backend\":\"{b}\"}}")),
        None => (http::Method::DELETE, String::new()),
    };
    let r = http_request(method, &url, &[], body.into_bytes())
        .await
        .expect("pin request");
    (
        r.status.as_u16(),
        r.json().unwrap_or(serde_json::Value::Null),
    )
}

/// `backends:` list entries (`      - address: A`, one line each) for a config template.
pub fn backend_lines<A: std::fmt::Display>(addresses: &[A]) -> String {
    addresses
        .iter()
        .map(|a| format!("      - address: {a}\n"))
        .collect()
}

/// Fisher-Yates with a fixed-seed xorshift, so every run opens streams in one order.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed.max(1);
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

/// Open streams of `documents` documents following a Zipf(1.1) law: `max(1, round(top /
/// rank^1.1))` for ranks 1, 2, ...
pub fn zipf_streams(documents: usize, top: f64) -> Vec<usize> {
    (1..=documents)
        .map(|rank| ((top / (rank as f64).powf(1.1)).round() as usize).max(1))
        .collect()
}

/// Opens a WebSocket at `url`: the backend that answered (`x-backend`) and the socket.
pub async fn open_tagged(url: &str) -> (String, tether_testkit::WsClient) {
    let (ws, headers) = tether_testkit::ws_connect(url, &[])
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    let backend = headers
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    (backend, ws)
}

/// Where streams of documents landed, as (document, backend) pairs: the documents found on
/// more than one backend, and the streams per backend.
pub fn spread<'a>(
    streams: impl IntoIterator<Item = (usize, &'a str)>,
) -> (Vec<usize>, std::collections::BTreeMap<&'a str, usize>) {
    use std::collections::{BTreeMap, BTreeSet};
    let mut on: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for (doc, backend) in streams {
        on.entry(doc).or_default().insert(backend);
        *per_backend.entry(backend).or_default() += 1;
    }
    let split = on
        .into_iter()
        .filter(|(_, b)| b.len() > 1)
        .map(|(doc, _)| doc)
        .collect();
    (split, per_backend)
}

/// Polls `tether_split_keys{upstream="docs"}` on every admin `/metrics` URL every 100 ms
/// until [`SplitWatch::worst`] is asked for the highest value seen.
pub struct SplitWatch {
    watching: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

impl SplitWatch {
    /// Starts polling `metrics_urls`.
    pub fn start(metrics_urls: Vec<String>) -> SplitWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        let watching = std::sync::Arc::new(AtomicBool::new(true));
        let polling = watching.clone();
        let task = tokio::spawn(async move {
            let mut worst = 0.0f64;
            while polling.load(Ordering::Acquire) {
                for url in &metrics_urls {
                    if let Ok(r) = tether_testkit::http_get(url, &[]).await {
                        let split =
                            series_value(&r.text(), r#"tether_split_keys{upstream="docs"}"#);
                        worst = worst.max(split.unwrap_or(0.0));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            worst
        });
        SplitWatch { watching, task }
    }

    /// Stops polling: the highest value seen.
    pub async fn worst(self) -> f64 {
        self.watching
            .store(false, std::sync::atomic::Ordering::Release);
        self.task.await.expect("split watcher")
    }
}

/// A backend that answers every request on every connection with `200 ok`, and notes for each
/// request how many of its bytes the backend's first read of it held, and how many it had.
pub async fn start_read_counting_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let noted = noted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok(first) = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await
                    else {
                        return;
                    };
                    if first == 0 {
                        return;
                    }
                    let mut got = first;
                    let whole = loop {
                        let text = String::from_utf8_lossy(&buf[..got]).to_ascii_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length: usize = text[..end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse().expect("length"));
                            if got >= end + 4 + length {
                                break end + 4 + length;
                            }
                        }
                        match tokio::io::AsyncReadExt::read(&mut socket, &mut buf[got..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got += n,
                        }
                    };
                    assert_eq!(got, whole, "the proxy sent past the request");
                    noted.lock().expect("lock").push((first, whole));
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if tokio::io::AsyncWriteExt::write_all(&mut socket, ok)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// What [`start_read_counting_backend`] noted: `n` requests with bodies over `body` bytes, each
/// whole in the backend's first read of it.
pub fn assert_arrived_whole(seen: &std::sync::Mutex<Vec<(usize, usize)>>, n: usize, body: usize) {
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), n, "{seen:?}");
    for (first, whole) in &seen {
        assert!(*whole > body, "{seen:?}");
        assert_eq!(
            first, whole,
            "a request reached the backend in pieces: {seen:?}"
        );
    }
}
