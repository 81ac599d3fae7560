//! The defaults of every optional field, in one place (also what `to_yaml` prints).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::model::{
    AccessLog, AccessLogFormat, Admin, BoundedLoad, HealthCheck, HealthCheckKind, Limits,
    OnMissing, Passive, Rebalance, Server, Timeouts,
};

/// `server.grace_period` when not given.
pub const GRACE_PERIOD: Duration = Duration::from_secs(30);
/// `admin.address` when not given: loopback only.
pub const ADMIN_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
/// `upstreams.*.backends[].weight` when not given.
pub const WEIGHT: u32 = 1;
/// Largest accepted backend weight (each unit is 160 ketama points).
pub const MAX_WEIGHT: u32 = 1000;
/// `upstreams.*.connect_timeout` when not given.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// `discovery.dns.interval` when not given.
pub const DNS_INTERVAL: Duration = Duration::from_secs(5);
/// `health_check.http.path` when not given.
pub const HEALTH_PATH: &str = "/healthz";
/// `health_check.http.expect_status` when not given.
pub const EXPECT_STATUS: u16 = 200;
/// `routes[].retries` when not given.
pub const RETRIES: u32 = 2;
/// Largest accepted `routes[].retries`.
pub const MAX_RETRIES: u32 = 16;
/// `routes[].sticky.on_missing` when not given.
pub const ON_MISSING: OnMissing = OnMissing::Reject;

impl Default for Server {
    /// CPU-count threads, 30s grace period.
    fn default() -> Self {
        Server {
            threads: None,
            grace_period: GRACE_PERIOD,
            access_log: AccessLog::default(),
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            state_file: None,
        }
    }
}

impl Default for Admin {
    /// 127.0.0.1:9901.
    fn default() -> Self {
        Admin {
            address: ADMIN_ADDRESS,
            token_file: None,
            public: Vec::new(),
        }
    }
}

impl Default for Timeouts {
    /// read 60s, idle 1h.
    fn default() -> Self {
        Timeouts {
            read: Duration::from_secs(60),
            idle: Duration::from_secs(3600),
        }
    }
}

impl HealthCheck {
    /// A check of `kind` with the default interval (2s), timeout (1s) and thresholds (2 up, 3 down).
    pub fn with_defaults(kind: HealthCheckKind) -> Self {
        HealthCheck {
            kind,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
        }
    }
}

impl Default for BoundedLoad {
    /// Factor 1.25, linger 30s.
    fn default() -> Self {
        BoundedLoad {
            factor: 1.25,
            linger: std::time::Duration::from_secs(30),
        }
    }
}

impl Default for Rebalance {
    /// Enabled, 200 closes per second, close code 1012, keys back at once.
    fn default() -> Self {
        Rebalance {
            enabled: true,
            max_per_second: 200,
            websocket_close_code: 1012,
            failback_after: std::time::Duration::ZERO,
            ramp: std::time::Duration::ZERO,
        }
    }
}

impl Default for Passive {
    /// Eject after 3 consecutive failures, for 10s.
    fn default() -> Self {
        Passive {
            failures: 3,
            eject_for: Duration::from_secs(10),
            timeouts: false,
        }
    }
}

impl Default for AccessLog {
    /// Off; when on, every request, without keys.
    fn default() -> Self {
        AccessLog {
            format: AccessLogFormat::Off,
            sample: 1.0,
            log_keys: false,
        }
    }
}

/// `routes[].max_body` when not given: 10 MiB.
pub const MAX_BODY: u64 = 10 * 1024 * 1024;

impl Default for Limits {
    /// 8 KiB target, 64 KiB header block, 16 KiB per header, 100 headers, 15 s to send a
    /// header, 30 s body pauses, 60 s send stalls, 60 s keep-alive, 10,000 connections, 100 HTTP/2 streams per connection.
    fn default() -> Self {
        Limits {
            max_uri: 8192,
            max_header_bytes: 65536,
            max_header_line: 16384,
            max_headers: 100,
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_requests_per_connection: None,
            max_concurrent_streams: 100,
        }
    }
}
