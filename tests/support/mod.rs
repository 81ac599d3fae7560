//! Shared set-up for the end-to-end tests: three real backends and the real `tether` binary.
#![allow(dead_code)] // each test binary uses a different part of this module

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
    /// Addresses where nothing listens (for connect-failure cases).
    pub dead: Vec<SocketAddr>,
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
            dead,
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
