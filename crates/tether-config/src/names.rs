//! The YAML spellings of the model's enums, shared by parsing and rendering.

use crate::model::{AccessLogFormat, Balance, KeySource, OnMissing, RateLimitBy};

/// Every `balance:` value with its spelling.
pub(crate) const BALANCES: [(&str, Balance); 3] = [
    ("ketama", Balance::Ketama),
    ("round_robin", Balance::RoundRobin),
    ("least_connections", Balance::LeastConnections),
];

/// Every `on_missing:` value with its spelling.
pub(crate) const ON_MISSING: [(&str, OnMissing); 3] = [
    ("reject", OnMissing::Reject),
    ("random", OnMissing::Random),
    ("client_ip", OnMissing::ClientIp),
];

/// The keys that name a sticky key source.
pub(crate) const KEY_SOURCES: [&str; 4] = ["header", "cookie", "query", "path"];

impl Balance {
    /// The config spelling: `ketama`, `round_robin` or `least_connections`.
    pub fn as_str(self) -> &'static str {
        BALANCES
            .iter()
            .find(|(_, b)| *b == self)
            .map_or("ketama", |(name, _)| name)
    }
}

impl OnMissing {
    /// The config spelling: `reject`, `random` or `client_ip`.
    pub fn as_str(self) -> &'static str {
        ON_MISSING
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("reject", |(name, _)| name)
    }
}

impl KeySource {
    /// The source kind as written in config and metrics: `header`, `cookie`, `query` or `path`.
    pub fn kind(&self) -> &'static str {
        match self {
            KeySource::Header(_) => "header",
            KeySource::Cookie(_) => "cookie",
            KeySource::Query(_) => "query",
            KeySource::Path(_) => "path",
        }
    }

    /// The header/cookie/query name or the path pattern.
    pub fn value(&self) -> &str {
        match self {
            KeySource::Header(v)
            | KeySource::Cookie(v)
            | KeySource::Query(v)
            | KeySource::Path(v) => v,
        }
    }
}

/// Every `server.access_log.format:` value with its spelling.
pub(crate) const ACCESS_LOG_FORMATS: [(&str, AccessLogFormat); 3] = [
    ("off", AccessLogFormat::Off),
    ("json", AccessLogFormat::Json),
    ("logfmt", AccessLogFormat::Logfmt),
];

/// Every `rate_limit.by:` value with its spelling.
pub(crate) const RATE_LIMIT_BY: [(&str, RateLimitBy); 2] = [
    ("client_ip", RateLimitBy::ClientIp),
    ("key", RateLimitBy::Key),
];

/// The fields the parser accepts in each mapping of the file. `schema.rs` describes the same
/// mappings for editors; its tests hold the two equal.
pub(crate) mod fields {
    pub const TOP: &[&str] = &["server", "listeners", "admin", "upstreams", "routes"];
    pub const SERVER: &[&str] = &[
        "threads",
        "grace_period",
        "access_log",
        "limits",
        "trusted_proxies",
        "state_file",
    ];
    pub const LIMITS: &[&str] = &[
        "max_uri",
        "max_header_bytes",
        "max_header_line",
        "max_headers",
        "header_timeout",
        "body_timeout",
        "send_timeout",
        "keepalive_timeout",
        "max_connections",
        "max_requests_per_connection",
        "max_concurrent_streams",
    ];
    pub const ACCESS_LOG: &[&str] = &["format", "sample", "log_keys"];
    pub const LISTENER: &[&str] = &["address", "tls"];
    pub const TLS: &[&str] = &["cert", "key"];
    pub const ADMIN: &[&str] = &["address", "token_file", "public"];
    pub const UPSTREAM: &[&str] = &[
        "backends",
        "discovery",
        "balance",
        "connect_timeout",
        "health_check",
        "passive",
        "rebalance",
        "bounded_load",
    ];
    pub const BOUNDED_LOAD: &[&str] = &["factor", "linger"];
    pub const BACKEND: &[&str] = &["address", "weight"];
    pub const DISCOVERY: &[&str] = &["etcd", "dns"];
    pub const ETCD: &[&str] = &["endpoints", "prefix"];
    pub const DNS: &[&str] = &["name", "port", "interval", "resolver"];
    pub const HEALTH_CHECK: &[&str] = &[
        "http",
        "tcp",
        "interval",
        "timeout",
        "healthy_after",
        "unhealthy_after",
    ];
    pub const HTTP_PROBE: &[&str] = &["path", "expect_status"];
    pub const TCP_PROBE: &[&str] = &[];
    pub const PASSIVE: &[&str] = &["failures", "eject_for", "timeouts"];
    pub const REBALANCE: &[&str] = &[
        "enabled",
        "max_per_second",
        "websocket_close_code",
        "failback_after",
        "ramp",
    ];
    pub const ROUTE: &[&str] = &[
        "name",
        "match",
        "sticky",
        "upstream",
        "timeouts",
        "retries",
        "long_poll",
        "max_body",
        "rate_limit",
        "limits",
    ];
    pub const MATCH: &[&str] = &["host", "path_prefix", "path", "methods", "headers"];
    pub const STICKY: &[&str] = &["keys", "on_missing"];
    pub const KEY_SOURCE: &[&str] = &super::KEY_SOURCES;
    pub const TIMEOUTS: &[&str] = &["read", "idle"];
    pub const RATE_LIMIT: &[&str] = &["by", "per_second", "burst"];
    pub const ROUTE_LIMITS: &[&str] = &["streams_per_key", "requests_per_second_per_key"];
}
