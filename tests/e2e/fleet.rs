//! End-to-end fleets: several Tether instances take their backends from a real etcd (Debian's
//! `etcd-server`, started here on free loopback ports) or from DNS (`dnsmasq` with a hosts file
//! the test rewrites), agree on every key's owner, follow `tether announce`, converge their
//! streams on every membership change, and keep serving through an etcd outage.
//!
//! `scripts/setup-tests.sh` installs `etcd-server` and `dnsmasq-base`.

use crate::support::{
    open_tagged, pin_request, series_value, shuffle, spread, tether_binary, zipf_streams, Socket,
    SplitWatch,
};
use futures_util::{stream, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_testkit::{
    free_addr, free_port, http_get, wait_until_async, TestBackend, TetherProcess,
};
use tokio::process::{Child, Command};

// ---------------------------------------------------------------------------------------------
// Processes the tests control: etcd, dnsmasq, announcers, proxies.

/// A program from Debian packages, looked up in PATH and in the sbin directories.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]);
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed; scripts/setup-tests.sh installs it (etcd-server, dnsmasq-base)"
    );
}

/// A single-member etcd on free loopback ports with its data in a temp dir; killed on drop.
struct Etcd {
    dir: tempfile::TempDir,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

impl Etcd {
    async fn start() -> Etcd {
        let mut etcd = Etcd {
            dir: tempfile::tempdir().expect("temp dir"),
            client: free_addr(),
            peer: free_addr(),
            child: None,
        };
        etcd.run().await;
        etcd
    }

    /// Starts (or restarts, on the same data and ports) and waits until it answers.
    async fn run(&mut self) {
        let client_url = format!("http://{}", self.client);
        let peer_url = format!("http://{}", self.peer);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("log");
        let child = Command::new(program("etcd"))
            .arg("--name=fleet")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=fleet={peer_url}"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let health = format!("{client_url}/health");
        let up = wait_until_async(Duration::from_secs(15), || {
            let health = health.clone();
            async move {
                http_get(&health, &[])
                    .await
                    .is_ok_and(|r| r.text().contains("true"))
            }
        })
        .await;
        assert!(up, "etcd did not start:\n{}", self.log());
    }

    /// Kills it (SIGKILL) and reaps it.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

/// A running `tether announce`; SIGKILLed on drop.
struct Announcer {
    child: Child,
}

impl Announcer {
    fn start(etcd: &Etcd, prefix: &str, address: SocketAddr, ttl: &str) -> Announcer {
        let child = Command::new(tether_binary())
            .args(["announce", "--etcd", &etcd.url(), "--prefix", prefix])
            .args(["--address", &address.to_string(), "--ttl", ttl])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tether announce");
        Announcer { child }
    }

    fn signal(&self, signal: Signal) {
        let pid = self.child.id().expect("announcer running");
        kill(Pid::from_raw(pid as i32), signal).expect("signal announcer");
    }
}

/// One proxy of the fleet.
struct Proxy {
    tether: TetherProcess,
    listener: SocketAddr,
}

const PREFIX: &str = "/tether/upstreams/docs/";

fn fleet_config(listener: SocketAddr, admin: SocketAddr, discovery: &str, extra: &str) -> String {
    format!(
        r#"
server:
  grace_period: 1s
listeners:
  - address: {listener}
admin:
  address: {admin}
upstreams:
  docs:
    discovery:
      {discovery}
    rebalance:
      max_per_second: 1000
{extra}routes:
  - name: docs
    match: {{ path_prefix: /docs/ }}
    sticky: {{ keys: [ {{ path: "/docs/{{key}}" }} ] }}
    upstream: docs
"#
    )
}

impl Proxy {
    async fn start(discovery: &str) -> Proxy {
        Proxy::start_with(discovery, "").await
    }

    /// A proxy whose upstream has `extra` (upstream-level YAML lines) too.
    async fn start_with(discovery: &str, extra: &str) -> Proxy {
        let (listener, admin) = (free_addr(), free_addr());
        let config = fleet_config(listener, admin, discovery, extra);
        let tether = TetherProcess::start(tether_binary(), &config, admin)
            .await
            .unwrap_or_else(|e| panic!("tether did not start: {e}\n{config}"));
        Proxy { tether, listener }
    }

    async fn etcd(etcd: &Etcd) -> Proxy {
        let discovery = format!("etcd: {{ endpoints: [{}], prefix: {PREFIX} }}", etcd.client);
        Proxy::start(&discovery).await
    }

    async fn admin_json(&self, path: &str) -> serde_json::Value {
        match http_get(&self.tether.admin_url(path), &[]).await {
            Ok(r) => r.json().unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// The backend addresses of upstream `docs` now, in ring order.
    async fn members(&self) -> Vec<String> {
        let upstreams = self.admin_json("/upstreams").await;
        upstreams["upstreams"][0]["backends"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter_map(|b| b["address"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The backend `key` routes to now, asked through the admin API.
    async fn owner(&self, key: &str) -> String {
        let route = self.admin_json(&format!("/route?path=/docs/{key}")).await;
        route["backend"].as_str().unwrap_or("none").to_string()
    }

    /// Owners of `keys`, 32 lookups at a time.
    async fn owners(&self, keys: &[String]) -> Vec<String> {
        stream::iter(keys)
            .map(|k| self.owner(k))
            .buffered(32)
            .collect()
            .await
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        let text = http_get(&self.tether.admin_url("/metrics"), &[])
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        series_value(&text, series)
    }

    fn ws_url(&self, key: &str) -> String {
        format!("ws://{}/docs/{key}/live", self.listener)
    }
}

/// Waits until every proxy reports exactly `members`; returns how long that took.
async fn wait_for_members(
    proxies: &[&Proxy],
    members: &[SocketAddr],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut want: Vec<String> = members.iter().map(ToString::to_string).collect();
    want.sort();
    let agreed = wait_until_async(within, || {
        let want = want.clone();
        async move {
            for p in proxies {
                let mut have = p.members().await;
                have.sort();
                if have != want {
                    return false;
                }
            }
            true
        }
    })
    .await;
    if !agreed {
        let mut seen = Vec::new();
        for p in proxies {
            seen.push(p.members().await);
        }
        panic!("proxies did not reach members {want:?} within {within:?}; they have {seen:?}");
    }
    started.elapsed()
}

/// Keys of the sockets that ended so far.
fn ended_keys(sockets: &[Socket]) -> BTreeSet<String> {
    sockets
        .iter()
        .filter(|s| s.ended().is_some())
        .map(|s| s.key.clone())
        .collect()
}

/// Backend name -> address, for reading `x-backend`.
fn names(backends: &[TestBackend]) -> BTreeMap<String, SocketAddr> {
    backends
        .iter()
        .map(|b| (b.name().to_string(), b.addr()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// etcd

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_agree_on_every_owner_and_follow_announcements_and_lease_expiry() {
    let etcd = Etcd::start().await;
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(TestBackend::start(&format!("b{i}")).await);
    }
    let addr: Vec<SocketAddr> = backends.iter().map(TestBackend::addr).collect();
    let first_three: Vec<Announcer> = addr[..3]
        .iter()
        .map(|a| Announcer::start(&etcd, PREFIX, *a, "2s"))
        .collect();
    let (a, b) = (Proxy::etcd(&etcd).await, Proxy::etcd(&etcd).await);
    wait_for_members(&[&a, &b], &addr[..3], Duration::from_secs(10)).await;

    // Same members in the same order, so the same owner for every one of 10,000 keys.
    assert_eq!(a.members().await, b.members().await);
    let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i}")).collect();
    let (owners_a, owners_b) = tokio::join!(a.owners(&keys), b.owners(&keys));
    let agree = owners_a
        .iter()
        .zip(&owners_b)
        .filter(|(x, y)| x == y)
        .count();
    eprintln!("3 backends: {agree} of 10000 keys have the same owner on both proxies");
    assert_eq!(agree, 10_000);
    let used: BTreeSet<&String> = owners_a.iter().collect();
    assert_eq!(used.len(), 3, "keys spread over every backend: {used:?}");

    // 40 documents, each with a WebSocket through each proxy.
    let docs: Vec<String> = (0..40).map(|i| format!("doc-{i}")).collect();
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for key in &docs {
        on_a.push(Socket::open(&a.ws_url(key), key).await);
        on_b.push(Socket::open(&b.ws_url(key), key).await);
    }
    for (x, y) in on_a.iter().zip(&on_b) {
        assert_eq!(x.backend, y.backend, "{} opened on two backends", x.key);
    }

    // A fourth backend announces itself: both proxies switch within 1 s...
    let fourth = Announcer::start(&etcd, PREFIX, addr[3], "2s");
    let switch = wait_for_members(&[&a, &b], &addr, Duration::from_secs(5)).await;
    eprintln!("announce of a 4th backend: both proxies switched after {switch:?}");
    assert!(switch < Duration::from_secs(1), "switch took {switch:?}");

    // ...and close exactly the streams whose key moved to it, the same set on both.
    let new_owners = a.owners(&docs).await;
    assert_eq!(new_owners, b.owners(&docs).await);
    let b3 = addr[3].to_string();
    let moved: BTreeSet<String> = docs
        .iter()
        .zip(&new_owners)
        .filter(|(_, o)| **o == b3)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!moved.is_empty(), "no document moved to the new backend");
    let settled = wait_until_async(Duration::from_secs(5), || {
        let done = ended_keys(&on_a) == moved && ended_keys(&on_b) == moved;
        async move { done }
    })
    .await;
    assert!(
        settled,
        "closed on a: {:?}, on b: {:?}, moved: {moved:?}",
        ended_keys(&on_a),
        ended_keys(&on_b)
    );
    for s in on_a.iter().chain(&on_b).filter(|s| moved.contains(&s.key)) {
        assert_eq!(s.ended(), Some(Some(1012)), "{} closed without 1012", s.key);
    }
    eprintln!(
        "after the announce, both proxies closed the same {} of 40 streams each",
        moved.len()
    );
    // Reconnecting lands on the new backend through either proxy.
    let names = names(&backends);
    let key = moved.iter().next().cloned().unwrap_or_default();
    let again = Socket::open(&b.ws_url(&key), &key).await;
    assert_eq!(names.get(&again.backend), Some(&addr[3]));
    let (owners_a, owners_b) = tokio::join!(a.owners(&keys), b.owners(&keys));
    let agree = owners_a
        .iter()
        .zip(&owners_b)
        .filter(|(x, y)| x == y)
        .count();
    eprintln!("4 backends: {agree} of 10000 keys have the same owner on both proxies");
    assert_eq!(agree, 10_000);

    // A crashed announcer (SIGKILL) stops renewing: its backend leaves both rings when the
    // lease expires, at most the TTL (2 s) after the kill, plus etcd's expiry sweep (every
    // 500 ms) and a margin for a busy machine.
    fourth.signal(Signal::SIGKILL);
    let removal = wait_for_members(&[&a, &b], &addr[..3], Duration::from_secs(6)).await;
    eprintln!("SIGKILLed announcer: its backend left both proxies after {removal:?} (TTL 2s)");
    assert!(
        removal <= Duration::from_secs(3),
        "removal took {removal:?}"
    );

    // A clean stop (SIGTERM) revokes the lease: the backend leaves at once.
    let third = &first_three[2];
    third.signal(Signal::SIGTERM);
    let left = wait_for_members(&[&a, &b], &addr[..2], Duration::from_secs(3)).await;
    eprintln!("SIGTERMed announcer: its backend left both proxies after {left:?}");
    assert!(left < Duration::from_secs(1), "revoke took {left:?}");
}

/// `count` backends `b0`.., each announced under [`PREFIX`] with a 5 s lease.
async fn announced(
    etcd: &Etcd,
    count: usize,
) -> (Vec<TestBackend>, Vec<SocketAddr>, Vec<Announcer>) {
    let mut backends = Vec::new();
    for i in 0..count {
        backends.push(TestBackend::start(&format!("b{i}")).await);
    }
    let addr: Vec<SocketAddr> = backends.iter().map(TestBackend::addr).collect();
    let announcers = addr
        .iter()
        .map(|a| Announcer::start(etcd, PREFIX, *a, "5s"))
        .collect();
    (backends, addr, announcers)
}

/// `POST` (Some) or `DELETE` (None) the pin of `key` through `proxy`'s admin API.
async fn set_pin(proxy: &Proxy, key: &str, backend: Option<SocketAddr>) -> serde_json::Value {
    let backend = backend.map(|b| b.to_string());
    let (status, answer) = pin_request(&proxy.tether, key, backend.as_deref()).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Waits until every proxy routes `key` to `backend` for `reason`; returns how long it took.
async fn wait_for_route(proxies: &[&Proxy], key: &str, backend: &str, reason: &str) -> Duration {
    let started = Instant::now();
    let agreed = wait_until_async(Duration::from_secs(5), || async move {
        for p in proxies {
            let route = p.admin_json(&format!("/route?path=/docs/{key}")).await;
            if route["backend"] != backend || route["reason"] != reason {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        agreed,
        "{key} not routed to {backend} ({reason}) everywhere"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_set_through_one_proxy_holds_on_every_proxy_within_a_second_and_after_a_restart() {
    let etcd = Etcd::start().await;
    let (_backends, addr, _announcers) = announced(&etcd, 3).await;
    let (a, mut b) = (Proxy::etcd(&etcd).await, Proxy::etcd(&etcd).await);
    wait_for_members(&[&a, &b], &addr, Duration::from_secs(10)).await;
    let key = "big-doc";
    let owner = a.owner(key).await;
    let target = *addr
        .iter()
        .find(|x| x.to_string() != owner)
        .expect("another backend");
    let on_b = Socket::open(&b.ws_url(key), key).await;

    // Pinned through a: in force on both within 1 s, and b closes its stream on the old owner.
    let answer = set_pin(&a, key, Some(target)).await;
    assert_eq!(answer["stored"], "etcd", "{answer}");
    assert_eq!(answer["in_force"], true, "{answer}");
    let took = wait_for_route(&[&a, &b], key, &target.to_string(), "pinned").await;
    eprintln!("pin through one proxy: in force on both after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let closed = wait_until_async(Duration::from_secs(5), || {
        let ended = on_b.ended();
        async move { ended.is_some() }
    })
    .await;
    assert!(
        closed && on_b.ended() == Some(Some(1012)),
        "{:?}",
        on_b.ended()
    );

    // A restarted proxy reads the pin from etcd.
    b.tether.kill().await.expect("kill b");
    b = Proxy::etcd(&etcd).await;
    wait_for_members(&[&b], &addr, Duration::from_secs(10)).await;
    wait_for_route(&[&b], key, &target.to_string(), "pinned").await;

    // Unpinned through the new b: back to the ring's owner on both within 1 s.
    let answer = set_pin(&b, key, None).await;
    assert_eq!(answer["stored"], "etcd", "{answer}");
    let took = wait_for_route(&[&a, &b], key, &owner, "ring").await;
    eprintln!("unpin: back to the ring's owner on both after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // The pin never became a member.
    assert_eq!(a.members().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_sharing_etcd_place_zipf_documents_alike_within_the_bound() {
    let etcd = Etcd::start().await;
    let (_backends, addr, _announcers) = announced(&etcd, 8).await;
    let discovery = format!("etcd: {{ endpoints: [{}], prefix: {PREFIX} }}", etcd.client);
    let bounded = "    bounded_load: { factor: 1.25, linger: 30s }\n";
    let a = Proxy::start_with(&discovery, bounded).await;
    let b = Proxy::start_with(&discovery, bounded).await;
    wait_for_members(&[&a, &b], &addr, Duration::from_secs(10)).await;

    // 1,000 documents with Zipf(1.1) stream counts; each stream opens through a or b at
    // random, 32 at a time, so both proxies see most documents first at about the same time.
    let counts = zipf_streams(1000, 100.0);
    let mut arrivals: Vec<(usize, bool)> = counts
        .iter()
        .enumerate()
        .flat_map(|(doc, &n)| (0..n).map(move |i| (doc, (doc + i) % 2 == 0)))
        .collect();
    shuffle(&mut arrivals, 11);
    let total = arrivals.len();
    let split_watch = SplitWatch::start(vec![
        a.tether.admin_url("/metrics"),
        b.tether.admin_url("/metrics"),
    ]);
    let (a_listener, b_listener) = (a.listener, b.listener);
    let opened: Vec<(usize, String, tether_testkit::WsClient)> = stream::iter(arrivals)
        .map(|(doc, through_a)| async move {
            let listener = if through_a { a_listener } else { b_listener };
            let (backend, ws) = open_tagged(&format!("ws://{listener}/docs/doc-{doc}/live")).await;
            (doc, backend, ws)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let worst_split = split_watch.worst().await;

    let (split, per_backend) = spread(opened.iter().map(|(d, b, _)| (*d, b.as_str())));
    let peak = *per_backend.values().max().expect("backends") as f64;
    let ratio = peak / (total as f64 / 8.0);
    eprintln!(
        "two proxies sharing etcd, 1000 Zipf documents, {total} WebSockets, 8 backends, \
         bounded_load 1.25: per backend {per_backend:?}, peak/mean {ratio:.3}, documents on \
         two backends {}, split_keys max {worst_split}",
        split.len()
    );
    assert!(
        split.is_empty(),
        "documents split across the fleet: {split:?}"
    );
    assert_eq!(worst_split, 0.0);
    assert!(ratio <= 1.3, "peak/mean {ratio:.3}");
    // Both proxies give the same placement.
    for key in ["doc-0", "doc-1", "doc-500"] {
        assert_eq!(a.owner(key).await, b.owner(key).await, "{key}");
    }
}

/// `GET /docs/doc-{i}/x` for every `i` in `docs` over `connections` keep-alive connections
/// to `listener`; how long it took. Panics on any answer but 200.
async fn get_documents(
    listener: SocketAddr,
    docs: std::ops::Range<usize>,
    connections: usize,
) -> Duration {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(docs.start as u64));
    let end = docs.end as u64;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(listener)
                .await
                .expect("connect");
            let mut stream = BufReader::new(stream);
            loop {
                let doc = next.fetch_add(1, Ordering::Relaxed);
                if doc >= end {
                    return;
                }
                let request = format!("GET /docs/doc-{doc}/x HTTP/1.1\r\nHost: docs\r\n\r\n");
                stream
                    .get_mut()
                    .write_all(request.as_bytes())
                    .await
                    .expect("write");
                let mut status = String::new();
                stream.read_line(&mut status).await.expect("status");
                assert!(status.starts_with("HTTP/1.1 200"), "doc-{doc}: {status}");
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    stream.read_line(&mut line).await.expect("header");
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().expect("length");
                    }
                }
                let mut body = vec![0; length];
                stream.read_exact(&mut body).await.expect("body");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    started.elapsed()
}

/// Resident memory of process `pid` in KB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The cost of fleet placement at 100,000 documents: a measurement for BENCHMARKS.md, not a
/// check (`cargo test --test e2e -- --ignored placing_100000 --nocapture`). Two proxies share
/// etcd; 100,000 new documents get one GET each through proxy a (each one etcd transaction),
/// then the same GETs again (placed: no transaction); proxy b learns every placement from its
/// watch.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement (about a minute), run by hand for BENCHMARKS.md"]
async fn placing_100000_documents_through_a_fleet() {
    const DOCS: usize = 100_000;
    let etcd = Etcd::start().await;
    let (_backends, addr, _announcers) = announced(&etcd, 8).await;
    let discovery = format!("etcd: {{ endpoints: [{}], prefix: {PREFIX} }}", etcd.client);
    let bounded = "    bounded_load: { factor: 1.25, linger: 10m }\n";
    let a = Proxy::start_with(&discovery, bounded).await;
    let b = Proxy::start_with(&discovery, bounded).await;
    wait_for_members(&[&a, &b], &addr, Duration::from_secs(10)).await;
    let pids = (a.tether.pid().expect("a"), b.tether.pid().expect("b"));
    let before = (rss_kb(pids.0), rss_kb(pids.1));

    let started = Instant::now();
    let first = get_documents(a.listener, 0..DOCS, 64).await;
    let placed_b = |b: &Proxy| {
        let url = b.tether.admin_url("/upstreams");
        async move {
            http_get(&url, &[])
                .await
                .ok()
                .and_then(|r| r.json().ok())
                .and_then(|v| v["upstreams"][0]["placed_documents"].as_u64())
                .unwrap_or(0)
        }
    };
    let all_on_b = wait_until_async(Duration::from_secs(120), || async {
        placed_b(&b).await >= DOCS as u64
    })
    .await;
    let on_b_after = started.elapsed();
    let again = get_documents(a.listener, 0..DOCS, 64).await;
    let after = (rss_kb(pids.0), rss_kb(pids.1));
    let etcd_bytes: u64 = walk_size(&etcd.dir.path().join("data"));
    eprintln!(
        "{DOCS} new documents through one proxy, 64 connections: {first:?} ({:.0}/s, one etcd \
         transaction each); the same {DOCS} again, placed: {again:?} ({:.0}/s); the other \
         proxy had all {DOCS} placements {} after the first request ({on_b_after:?}); RSS \
         a {} -> {} KB, b {} -> {} KB; etcd data dir {} MB",
        DOCS as f64 / first.as_secs_f64(),
        DOCS as f64 / again.as_secs_f64(),
        if all_on_b { "at most" } else { "NOT within" },
        before.0,
        after.0,
        before.1,
        after.1,
        etcd_bytes / (1 << 20),
    );
    assert!(all_on_b, "b saw {} placements", placed_b(&b).await);
}

fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        walk_size(&path)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A GET load through every proxy over 60 documents until stopped: (requests, failures).
fn start_load(urls: Vec<String>) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(u64, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let handle = tokio::spawn(async move {
        let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut workers = Vec::new();
        for (w, base) in urls.into_iter().enumerate() {
            let (stop, done, failed) = (stop_flag.clone(), done.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                let mut i = w;
                // Bounded: at most 50,000 requests per worker.
                while !stop.load(Ordering::Relaxed) && i < 50_000 {
                    let url = format!("{base}/docs/doc-{}/state", i % 60);
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
                    i += 1;
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
async fn an_etcd_outage_under_load_fails_no_request_and_the_watch_resumes() {
    let mut etcd = Etcd::start().await;
    let mut backends = Vec::new();
    for i in 0..3 {
        backends.push(TestBackend::start(&format!("b{i}")).await);
    }
    let addr: Vec<SocketAddr> = backends.iter().map(TestBackend::addr).collect();
    let _announcers: Vec<Announcer> = addr
        .iter()
        .map(|a| Announcer::start(&etcd, PREFIX, *a, "2s"))
        .collect();
    let (a, b) = (Proxy::etcd(&etcd).await, Proxy::etcd(&etcd).await);
    wait_for_members(&[&a, &b], &addr, Duration::from_secs(10)).await;
    let up = r#"tether_discovery_up{source="etcd",upstream="docs"}"#;
    let loads = r#"tether_discovery_full_loads_total{upstream="docs"}"#;
    let resumes = r#"tether_discovery_watch_resumes_total{upstream="docs"}"#;
    for p in [&a, &b] {
        assert_eq!(p.metric(up).await, Some(1.0));
        assert_eq!(p.metric(loads).await, Some(1.0));
    }

    let urls = vec![
        format!("http://{}", a.listener),
        format!("http://{}", a.listener),
        format!("http://{}", b.listener),
        format!("http://{}", b.listener),
    ];
    let (stop_load, load) = start_load(urls);

    // etcd goes away for 10 s: both proxies notice, say so, and keep serving.
    etcd.stop().await;
    let noticed = wait_until_async(Duration::from_secs(5), || async {
        a.metric(up).await == Some(0.0) && b.metric(up).await == Some(0.0)
    })
    .await;
    assert!(noticed, "tether_discovery_up did not drop to 0");
    for p in [&a, &b] {
        let ready = http_get(&p.tether.admin_url("/readyz"), &[])
            .await
            .expect("readyz");
        assert_eq!(ready.status, 200, "{}", ready.text());
        let body = ready.json().expect("json");
        let degraded = body["degraded"][0].as_str().unwrap_or("");
        assert!(degraded.contains("etcd discovery unreachable"), "{body}");
        assert_eq!(p.members().await.len(), 3);
    }
    // The outage itself: traffic keeps flowing on the last known membership.
    tokio::time::sleep(Duration::from_secs(10)).await;

    etcd.run().await;
    let back = Instant::now();
    let resumed = wait_until_async(Duration::from_secs(10), || async {
        a.metric(up).await == Some(1.0) && b.metric(up).await == Some(1.0)
    })
    .await;
    assert!(resumed, "the proxies did not see etcd come back");
    eprintln!(
        "etcd back: both proxies watching again after {:?}",
        back.elapsed()
    );
    stop_load.store(true, Ordering::Relaxed);
    let (requests, failures) = load.await.expect("load");
    eprintln!("etcd outage of 10 s under load: {requests} requests, {failures} failed");
    assert_eq!(failures, 0);
    assert!(requests > 100, "too little load: {requests}");

    // Resumed from the last revision, not reloaded; and the announcers' leases survived.
    for p in [&a, &b] {
        assert_eq!(p.metric(loads).await, Some(1.0), "a full reload happened");
        assert!(p.metric(resumes).await >= Some(1.0), "no watch resumption");
    }
    // Still in agreement, and following changes again.
    let keys: Vec<String> = (0..2_000).map(|i| format!("key-{i}")).collect();
    assert_eq!(a.owners(&keys).await, b.owners(&keys).await);
    let extra = TestBackend::start("b3").await;
    let _late = Announcer::start(&etcd, PREFIX, extra.addr(), "2s");
    let mut all = addr.clone();
    all.push(extra.addr());
    wait_for_members(&[&a, &b], &all, Duration::from_secs(5)).await;
    assert_eq!(a.owners(&keys).await, b.owners(&keys).await);
}

// ---------------------------------------------------------------------------------------------
// DNS

/// dnsmasq answering for names in a hosts file the test rewrites (SIGHUP re-reads it).
struct Dnsmasq {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Dnsmasq {
    async fn start(hosts: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("temp dir");
        // dnsmasq started as root reads its files as an unprivileged user.
        set_mode(dir.path(), 0o755);
        write_hosts(dir.path(), hosts);
        let port = free_port();
        let child = Command::new(program("dnsmasq"))
            .arg("--keep-in-foreground")
            .arg(format!("--port={port}"))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--pid-file="])
            .arg(format!(
                "--addn-hosts={}",
                dir.path().join("hosts").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dnsmasq");
        Dnsmasq { dir, port, child }
    }

    /// Replaces the hosts file and tells dnsmasq to read it again.
    fn write(&self, hosts: &str) {
        write_hosts(self.dir.path(), hosts);
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
        }
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Writes `dir/hosts` in one step (aside, then renamed), readable by anyone.
fn write_hosts(dir: &Path, hosts: &str) {
    let staged = dir.join("hosts.next");
    std::fs::write(&staged, hosts).expect("write hosts");
    set_mode(&staged, 0o644);
    std::fs::rename(&staged, dir.join("hosts")).expect("rename hosts");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Backends on 127.0.0.2, .3 and .4, all on one port (DNS records carry no port).
async fn backends_on_one_port() -> (u16, Vec<TestBackend>) {
    for _ in 0..20 {
        let port = free_port();
        let mut started = Vec::new();
        for (i, last) in [2u8, 3, 4].iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, *last], port));
            match TestBackend::start_at(&format!("d{i}"), addr).await {
                Ok(b) => started.push(b),
                Err(_) => break,
            }
        }
        if started.len() == 3 {
            return (port, started);
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_discovery_follows_the_records_and_converges_streams() {
    const NAME: &str = "app.fleet.test";
    let (port, backends) = backends_on_one_port().await;
    let addr: Vec<SocketAddr> = backends.iter().map(TestBackend::addr).collect();
    let hosts = |members: &[SocketAddr]| -> String {
        members
            .iter()
            .map(|a| format!("{} {NAME}\n", a.ip()))
            .collect()
    };
    let mut dns = Dnsmasq::start(&hosts(&addr[..2])).await;
    let discovery = format!(
        "dns: {{ name: {NAME}, port: {port}, interval: 200ms, resolver: 127.0.0.1:{} }}",
        dns.port
    );
    let (a, b) = (
        Proxy::start(&discovery).await,
        Proxy::start(&discovery).await,
    );
    wait_for_members(&[&a, &b], &addr[..2], Duration::from_secs(10)).await;

    let docs: Vec<String> = (0..30).map(|i| format!("doc-{i}")).collect();
    let mut sockets = Vec::new();
    for key in &docs {
        sockets.push(Socket::open(&a.ws_url(key), key).await);
    }

    // A third record appears: both proxies take it within a few intervals...
    dns.write(&hosts(&addr));
    let took = wait_for_members(&[&a, &b], &addr, Duration::from_secs(5)).await;
    eprintln!("DNS: a new A record reached both proxies after {took:?} (interval 200ms)");
    let keys: Vec<String> = (0..2_000).map(|i| format!("key-{i}")).collect();
    assert_eq!(a.owners(&keys).await, b.owners(&keys).await);

    // ...and exactly the streams whose key moved to it are closed.
    let new_owners = a.owners(&docs).await;
    let third = addr[2].to_string();
    let moved: BTreeSet<String> = docs
        .iter()
        .zip(&new_owners)
        .filter(|(_, o)| **o == third)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!moved.is_empty(), "no document moved to the new backend");
    let settled = wait_until_async(Duration::from_secs(5), || {
        let done = ended_keys(&sockets) == moved;
        async move { done }
    })
    .await;
    assert!(
        settled,
        "closed {:?}, moved {moved:?}",
        ended_keys(&sockets)
    );
    let changes = r#"tether_ring_changes_total{cause="discovery",upstream="docs"}"#;
    assert!(a.metric(changes).await >= Some(2.0));

    // A record removed: the backend leaves.
    dns.write(&hosts(&addr[1..]));
    wait_for_members(&[&a, &b], &addr[1..], Duration::from_secs(5)).await;

    // The resolver goes away: the last known members stay, and the proxies say so.
    dns.stop().await;
    let up = r#"tether_discovery_up{source="dns",upstream="docs"}"#;
    let noticed = wait_until_async(Duration::from_secs(10), || async {
        a.metric(up).await == Some(0.0)
    })
    .await;
    assert!(noticed, "tether_discovery_up did not drop to 0");
    assert_eq!(a.members().await.len(), 2);
    let ready = http_get(&a.tether.admin_url("/readyz"), &[])
        .await
        .expect("readyz");
    assert_eq!(ready.status, 200);
    assert!(
        ready.text().contains("dns discovery unreachable"),
        "{}",
        ready.text()
    );
    let r = http_get(&format!("http://{}/docs/x/state", a.listener), &[])
        .await
        .expect("GET");
    assert_eq!(r.status, 200);
}
