//! The validated configuration model: what the rest of Tether consumes.
//!
//! Every value here has passed validation; defaults are filled in.

use std::net::SocketAddr;
use std::time::Duration;

/// A complete, validated Tether configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Process-wide settings.
    pub server: Server,
    /// Downstream listeners (at least one, addresses unique).
    pub listeners: Vec<Listener>,
    /// The admin listener.
    pub admin: Admin,
    /// Upstreams in file order; names are unique.
    pub upstreams: Vec<Upstream>,
    /// Routes in file order; the first match wins. Names are unique.
    pub routes: Vec<Route>,
}

/// `server:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Worker threads; `None` = number of CPUs.
    pub threads: Option<usize>,
    /// SIGTERM / upgrade drain time. Default 30s.
    pub grace_period: Duration,
    /// The per-request access log.
    pub access_log: AccessLog,
    /// Request size limits.
    pub limits: Limits,
    /// Networks whose `X-Forwarded-For` and `Forwarded` headers are believed and appended to;
    /// from anyone else they are replaced. Default: none.
    pub trusted_proxies: Vec<Cidr>,
    /// Where runtime state an operator set through the admin API (pins of keys to backends)
    /// is kept across restarts. None: such state of upstreams without etcd discovery lives in
    /// memory only.
    pub state_file: Option<std::path::PathBuf>,
}

/// An IP network, `10.0.0.0/8` or `::1/128` (a bare address means a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub address: std::net::IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ip/prefix` or a bare `ip`.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (text, None),
        };
        let address: std::net::IpAddr = ip.trim().parse().ok()?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { address, prefix })
    }

    /// True when `ip` lies in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// `server.limits`: requests over a limit are answered locally and never reach a backend;
/// connections over a limit are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request target in bytes (414). Default 8192.
    pub max_uri: usize,
    /// Largest header block in bytes, names and values (431). Default 65536.
    pub max_header_bytes: usize,
    /// Largest single header (name + value) in bytes (431). Default 16384.
    pub max_header_line: usize,
    /// Most header fields (431). Default 100.
    pub max_headers: usize,
    /// Time a client has to send a whole request header, counted from the accept (first
    /// request) or from the end of keep-alive idle (later requests); then the connection is
    /// closed. Default 15s.
    pub header_timeout: Duration,
    /// Longest pause while a client sends a request body; then 408 and close. Default 30s.
    pub body_timeout: Duration,
    /// Longest a write to a client may wait for it to read (responses and streams alike); then
    /// the connection is closed. Default 60s.
    pub send_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request. Default 60s.
    pub keepalive_timeout: Duration,
    /// Most client connections open at once; more are answered 503 and closed. Default 10000.
    pub max_connections: usize,
    /// Requests served on one keep-alive connection before it is closed. Default: no limit.
    pub max_requests_per_connection: Option<u32>,
    /// HTTP/2 streams open at once on one connection (TLS listeners with h2). Default 100.
    pub max_concurrent_streams: u32,
}

/// `server.access_log`: one structured line per request on stdout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessLog {
    /// Line format. Default off.
    pub format: AccessLogFormat,
    /// Fraction of requests logged, 0.0..=1.0. Default 1.0.
    pub sample: f64,
    /// Include the sticky key itself (it may be personal data). Default false.
    pub log_keys: bool,
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// No access log.
    Off,
    /// One JSON object per line.
    Json,
    /// `key=value` pairs (logfmt).
    Logfmt,
}

impl AccessLogFormat {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLogFormat::Off => "off",
            AccessLogFormat::Json => "json",
            AccessLogFormat::Logfmt => "logfmt",
        }
    }
}

/// One `listeners:` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Address to bind, `ip:port`.
    pub address: SocketAddr,
    /// Terminate TLS here (HTTP/2 and HTTP/1.1 offered by ALPN). None = plain HTTP/1.1.
    pub tls: Option<ListenerTls>,
}

/// `listeners[].tls`: the certificate chain and private key, PEM files read at start and at
/// every config reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

/// `admin:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// Address of the admin listener. Default 127.0.0.1:9901.
    pub address: SocketAddr,
    /// File holding the bearer token every admin request must carry (required when the
    /// address is not loopback). Relative paths are relative to the working directory.
    pub token_file: Option<std::path::PathBuf>,
    /// Paths served without a token, e.g. `/metrics` and `/healthz` for scrapers and probes.
    pub public: Vec<String>,
}

/// One named upstream (a pool of backends).
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// The map key under `upstreams:`.
    pub name: String,
    /// Backends from the file: at least one, addresses unique within the upstream. Empty when
    /// `discovery` is set (the running proxy fills them in from the membership source).
    pub backends: Vec<Backend>,
    /// Where the backends come from at run time instead of the file; None = `backends`.
    pub discovery: Option<Discovery>,
    /// Balancing algorithm. Default ketama.
    pub balance: Balance,
    /// TCP connect timeout to a backend. Default 1s.
    pub connect_timeout: Duration,
    /// Optional active health check.
    pub health_check: Option<HealthCheck>,
    /// Optional passive ejection on consecutive transport failures.
    pub passive: Option<Passive>,
    /// How open streams whose key changed owner are moved.
    pub rebalance: Rebalance,
    /// Placement of new documents by load (`balance: ketama` only); None = the ring alone.
    pub bounded_load: Option<BoundedLoad>,
}

/// `bounded_load:` of an upstream: consistent hashing with bounded loads, per document.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundedLoad {
    /// A document with no placement goes to the first available backend of its ring walk
    /// whose open streams are below ⌈factor × mean⌉. Default 1.25.
    pub factor: f64,
    /// How long a placement outlives its document's last open stream. Default 30s.
    pub linger: Duration,
}

/// `discovery:` of an upstream: a membership source that replaces the static backend list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Discovery {
    /// Keys under a prefix in etcd, each bound to a lease.
    Etcd(EtcdDiscovery),
    /// A and AAAA records of a DNS name, re-resolved every interval.
    Dns(DnsDiscovery),
}

impl Discovery {
    /// The metric label of the source: `etcd` or `dns`.
    pub fn kind(&self) -> &'static str {
        match self {
            Discovery::Etcd(_) => "etcd",
            Discovery::Dns(_) => "dns",
        }
    }
}

/// `discovery.etcd`: backends are the keys under `prefix`, with JSON values
/// `{"address": "ip:port", "weight": 1}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EtcdDiscovery {
    /// etcd client endpoints as `host:port` (plain HTTP), tried in order. At least one.
    pub endpoints: Vec<String>,
    /// The key prefix; every key under it is one backend.
    pub prefix: String,
}

/// `discovery.dns`: backends are `ip:port` for every A/AAAA record of `name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsDiscovery {
    /// The name to resolve, e.g. a Kubernetes headless service.
    pub name: String,
    /// The backend port (DNS A/AAAA records carry none).
    pub port: u16,
    /// Time between resolutions. Default 5s.
    pub interval: Duration,
    /// A nameserver to ask instead of the system's (`/etc/resolv.conf`), `ip:port`.
    pub resolver: Option<SocketAddr>,
}

/// `passive:` of an upstream: eject a backend after consecutive connect or transport failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passive {
    /// Consecutive failures that eject the backend (>= 1).
    pub failures: u32,
    /// How long an ejected backend stays out.
    pub eject_for: Duration,
    /// Whether a backend that does not answer within the route's `timeouts.read` counts as a
    /// failure. Default false: refused and reset connections and broken responses count, but
    /// one slow endpoint (or a client asking for one) must not eject a healthy backend.
    pub timeouts: bool,
}

/// `rebalance:` of an upstream: convergence of open streams when key owners change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebalance {
    /// Close streams whose key moved. Default true.
    pub enabled: bool,
    /// At most this many closes per second for this upstream. Default 200.
    pub max_per_second: u32,
    /// Close code sent to WebSocket clients. Default 1012 (service restart).
    pub websocket_close_code: u16,
    /// A backend that becomes available again (health, end of ejection, undrain, a new member)
    /// owns no keys until it has stayed available this long. Default 0s.
    pub failback_after: std::time::Duration,
    /// After `failback_after`, the backend takes its keys back over this long, a growing share
    /// chosen by key hash (the same keys on every instance). Default 0s: all at once.
    pub ramp: std::time::Duration,
}

/// One backend of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// `ip:port` of the app server.
    pub address: SocketAddr,
    /// Relative weight, >= 1. Default 1.
    pub weight: u32,
}

/// How an upstream spreads requests that carry no sticky key (and, for ketama, how keys map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// nginx-compatible consistent hashing (`hash $key consistent`).
    Ketama,
    /// Weighted round robin.
    RoundRobin,
    /// Fewest in-flight requests / open streams.
    LeastConnections,
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// What a probe does.
    pub kind: HealthCheckKind,
    /// Time between probes. Default 2s.
    pub interval: Duration,
    /// Probe timeout. Default 1s.
    pub timeout: Duration,
    /// Consecutive successes that mark a down backend up. Default 2.
    pub healthy_after: u32,
    /// Consecutive failures that mark an up backend down. Default 3.
    pub unhealthy_after: u32,
}

/// The kind of active probe.
#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheckKind {
    /// `GET path`, healthy when the status equals `expect_status` (default 200).
    Http { path: String, expect_status: u16 },
    /// A TCP connect succeeds.
    Tcp,
}

/// One route: a match, an optional sticky policy and an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Unique route name (used in metrics and logs).
    pub name: String,
    /// Conditions, all of which must hold.
    pub matcher: RouteMatch,
    /// Sticky-key policy; `None` = the upstream's balance.
    pub sticky: Option<Sticky>,
    /// Name of an upstream in `Config::upstreams` (validated to exist).
    pub upstream: String,
    /// Read and idle timeouts.
    pub timeouts: Timeouts,
    /// Connect-failure retries, each to the next owner on the ring. Default 2.
    pub retries: u32,
    /// Largest request body in bytes (413). Default 10 MiB.
    pub max_body: u64,
    /// Optional request rate limit (429 with `Retry-After`).
    pub rate_limit: Option<RateLimit>,
    /// Per-document limits.
    pub limits: RouteLimits,
    /// Requests on this route are long-polls: governed by `timeouts.idle` instead of
    /// `timeouts.read`, and counted as streams. Default false.
    pub long_poll: bool,
}

/// `match:` of a route. Empty = matches every request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteMatch {
    /// Exact host (`docs.example.com`) or wildcard (`*.example.com`), lower-cased, no port.
    pub host: Option<String>,
    /// Path condition on the normalised path.
    pub path: Option<PathMatch>,
    /// Upper-case method names; empty = any method.
    pub methods: Vec<String>,
    /// Exact header values (header names lower-cased), in file order.
    pub headers: Vec<(String, String)>,
}

/// Path condition of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `path_prefix:` the normalised path starts with this.
    Prefix(String),
    /// `path:` the normalised path equals this.
    Exact(String),
}

/// `sticky:` of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Sticky {
    /// Key sources, tried in order; the first present wins. At least one.
    pub keys: Vec<KeySource>,
    /// What to do when no source yields a key. Default reject.
    pub on_missing: OnMissing,
}

/// Where a sticky key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Request header (name lower-cased).
    Header(String),
    /// Cookie by name.
    Cookie(String),
    /// Query parameter by name.
    Query(String),
    /// Path pattern such as `/docs/{key}`; contains exactly one `{key}` segment.
    Path(String),
}

/// Policy when a sticky route finds no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// Answer 400.
    Reject,
    /// Pick a backend at random.
    Random,
    /// Use the client IP as the key.
    ClientIp,
}

/// `timeouts:` of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Max wait for upstream response data on ordinary responses. Default 60s.
    pub read: Duration,
    /// Max silence on WebSocket, SSE and long-poll streams. Default 1h.
    pub idle: Duration,
}

/// `limits:` of a route: what one document (sticky key) may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteLimits {
    /// Most open WebSocket, SSE and long-poll streams of one key on the route's upstream when
    /// a new one of this route opens (the next gets 429 with `Retry-After`, a WebSocket before
    /// its 101). None = no limit.
    pub streams_per_key: Option<u32>,
}

/// `rate_limit:` of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// What is limited: each client address, or each sticky key (document).
    pub by: RateLimitBy,
    /// Requests allowed per second.
    pub per_second: u32,
    /// Extra requests allowed on top within one second. Default 0.
    pub burst: u32,
}

/// The subject of a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitBy {
    /// The client IP address.
    ClientIp,
    /// The request's sticky key (requests without one are limited by client IP).
    Key,
}
