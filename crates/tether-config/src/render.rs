//! `Config` -> YAML with every default written out, which `parse` reads back to an equal
//! `Config`. Used by `tether check --print-defaults` and `tether demo --print-config`.

use std::fmt::Write;
use std::time::Duration;

use crate::model::*;

/// Renders `config` as YAML text in the layout of the reference config.
///
/// Optional parts that are off (`server.threads`, `health_check`, `sticky`) are written as
/// comments so the output still shows they exist.
pub fn to_yaml(config: &Config) -> String {
    let mut out = Out::default();
    out.line(0, "server:");
    match config.server.threads {
        Some(threads) => out.line(2, &format!("threads: {threads}")),
        None => out.line(2, "# threads: not set, so one worker thread per CPU"),
    }
    out.line(
        2,
        &format!("grace_period: {}", duration(config.server.grace_period)),
    );
    if config.server.trusted_proxies.is_empty() {
        out.line(
            2,
            "# trusted_proxies: not set, so incoming X-Forwarded-For is replaced",
        );
    } else {
        out.line(2, "trusted_proxies:");
        for cidr in &config.server.trusted_proxies {
            out.line(4, &format!("- {}", scalar(&cidr.to_string())));
        }
    }
    match &config.server.state_file {
        Some(path) => out.line(
            2,
            &format!("state_file: {}", scalar(&path.display().to_string())),
        ),
        None => out.line(
            2,
            "# state_file: not set, so pins of upstreams without etcd are kept in memory only",
        ),
    }
    let l = &config.server.limits;
    out.line(2, "limits:");
    out.line(4, &format!("max_uri: {}", l.max_uri));
    out.line(4, &format!("max_header_bytes: {}", l.max_header_bytes));
    out.line(4, &format!("max_header_line: {}", l.max_header_line));
    out.line(4, &format!("max_headers: {}", l.max_headers));
    out.line(
        4,
        &format!("header_timeout: {}", duration(l.header_timeout)),
    );
    out.line(
        4,
        &format!("keepalive_timeout: {}", duration(l.keepalive_timeout)),
    );
    out.line(4, &format!("max_connections: {}", l.max_connections));
    match l.max_requests_per_connection {
        Some(n) => out.line(4, &format!("max_requests_per_connection: {n}")),
        None => out.line(4, "# max_requests_per_connection: not set, so no limit"),
    }
    out.line(
        4,
        &format!("max_concurrent_streams: {}", l.max_concurrent_streams),
    );
    let log = &config.server.access_log;
    out.line(2, "access_log:");
    out.line(4, &format!("format: {}", log.format.as_str()));
    out.line(4, &format!("sample: {}", log.sample));
    out.line(4, &format!("log_keys: {}", log.log_keys));
    out.line(0, "listeners:");
    for listener in &config.listeners {
        out.line(
            2,
            &format!("- address: {}", scalar(&listener.address.to_string())),
        );
        if let Some(tls) = &listener.tls {
            out.line(4, "tls:");
            out.line(
                6,
                &format!("cert: {}", scalar(&tls.cert.display().to_string())),
            );
            out.line(
                6,
                &format!("key: {}", scalar(&tls.key.display().to_string())),
            );
        }
    }
    out.line(0, "admin:");
    out.line(
        2,
        &format!("address: {}", scalar(&config.admin.address.to_string())),
    );
    match &config.admin.token_file {
        Some(path) => out.line(
            2,
            &format!("token_file: {}", scalar(&path.display().to_string())),
        ),
        None => out.line(
            2,
            "# token_file: not set, so the admin API has no authentication (loopback only)",
        ),
    }
    if config.admin.public.is_empty() {
        out.line(
            2,
            "# public: not set, so no path is served without the token",
        );
    } else {
        out.line(2, "public:");
        for p in &config.admin.public {
            out.line(4, &format!("- {}", scalar(p)));
        }
    }
    out.line(0, "upstreams:");
    for upstream in &config.upstreams {
        render_upstream(&mut out, upstream);
    }
    out.line(0, "routes:");
    for route in &config.routes {
        render_route(&mut out, route);
    }
    out.text
}

fn render_upstream(out: &mut Out, upstream: &Upstream) {
    out.line(2, &format!("{}:", scalar(&upstream.name)));
    match &upstream.discovery {
        // The backends of a discovery upstream are whatever the source says at run time.
        Some(discovery) => render_discovery(out, discovery),
        None => {
            out.line(4, "backends:");
            for backend in &upstream.backends {
                out.line(
                    6,
                    &format!("- address: {}", scalar(&backend.address.to_string())),
                );
                out.line(8, &format!("weight: {}", backend.weight));
            }
        }
    }
    out.line(4, &format!("balance: {}", upstream.balance.as_str()));
    out.line(
        4,
        &format!("connect_timeout: {}", duration(upstream.connect_timeout)),
    );
    let r = &upstream.rebalance;
    out.line(4, "rebalance:");
    out.line(6, &format!("enabled: {}", r.enabled));
    out.line(6, &format!("max_per_second: {}", r.max_per_second));
    out.line(
        6,
        &format!("websocket_close_code: {}", r.websocket_close_code),
    );
    out.line(
        6,
        &format!("failback_after: {}", duration(r.failback_after)),
    );
    out.line(6, &format!("ramp: {}", duration(r.ramp)));
    match &upstream.bounded_load {
        Some(b) => {
            out.line(4, "bounded_load:");
            out.line(6, &format!("factor: {}", b.factor));
            out.line(6, &format!("linger: {}", duration(b.linger)));
        }
        None => out.line(
            4,
            "# bounded_load: not set, so every document goes to its owner on the ring",
        ),
    }
    match &upstream.passive {
        Some(p) => {
            out.line(4, "passive:");
            out.line(6, &format!("failures: {}", p.failures));
            out.line(6, &format!("eject_for: {}", duration(p.eject_for)));
            out.line(6, &format!("timeouts: {}", p.timeouts));
        }
        None => out.line(
            4,
            "# passive: not set, so failed requests do not eject a backend",
        ),
    }
    let Some(check) = &upstream.health_check else {
        out.line(
            4,
            "# health_check: not set, so backends are only marked down by failed connects",
        );
        return;
    };
    out.line(4, "health_check:");
    match &check.kind {
        HealthCheckKind::Http {
            path,
            expect_status,
        } => {
            out.line(6, "http:");
            out.line(8, &format!("path: {}", scalar(path)));
            out.line(8, &format!("expect_status: {expect_status}"));
        }
        HealthCheckKind::Tcp => out.line(6, "tcp: {}"),
    }
    out.line(6, &format!("interval: {}", duration(check.interval)));
    out.line(6, &format!("timeout: {}", duration(check.timeout)));
    out.line(6, &format!("healthy_after: {}", check.healthy_after));
    out.line(6, &format!("unhealthy_after: {}", check.unhealthy_after));
}

fn render_discovery(out: &mut Out, discovery: &Discovery) {
    out.line(4, "discovery:");
    match discovery {
        Discovery::Etcd(etcd) => {
            out.line(6, "etcd:");
            out.line(8, "endpoints:");
            for endpoint in &etcd.endpoints {
                out.line(10, &format!("- {}", scalar(endpoint)));
            }
            out.line(8, &format!("prefix: {}", scalar(&etcd.prefix)));
        }
        Discovery::Dns(dns) => {
            out.line(6, "dns:");
            out.line(8, &format!("name: {}", scalar(&dns.name)));
            out.line(8, &format!("port: {}", dns.port));
            out.line(8, &format!("interval: {}", duration(dns.interval)));
            match dns.resolver {
                Some(resolver) => {
                    out.line(8, &format!("resolver: {}", scalar(&resolver.to_string())))
                }
                None => out.line(
                    8,
                    "# resolver: not set, so the system resolver (/etc/resolv.conf)",
                ),
            }
        }
    }
}

fn render_route(out: &mut Out, route: &Route) {
    out.line(2, &format!("- name: {}", scalar(&route.name)));
    let m = &route.matcher;
    if *m == RouteMatch::default() {
        out.line(4, "match: {}");
    } else {
        out.line(4, "match:");
        if let Some(host) = &m.host {
            out.line(6, &format!("host: {}", scalar(host)));
        }
        match &m.path {
            Some(PathMatch::Prefix(p)) => out.line(6, &format!("path_prefix: {}", scalar(p))),
            Some(PathMatch::Exact(p)) => out.line(6, &format!("path: {}", scalar(p))),
            None => {}
        }
        if !m.methods.is_empty() {
            out.line(6, "methods:");
            for method in &m.methods {
                out.line(8, &format!("- {}", scalar(method)));
            }
        }
        if !m.headers.is_empty() {
            out.line(6, "headers:");
            for (name, value) in &m.headers {
                out.line(8, &format!("{}: {}", scalar(name), scalar(value)));
            }
        }
    }
    match &route.sticky {
        Some(sticky) => {
            out.line(4, "sticky:");
            out.line(6, "keys:");
            for key in &sticky.keys {
                out.line(8, &format!("- {}: {}", key.kind(), scalar(key.value())));
            }
            out.line(6, &format!("on_missing: {}", sticky.on_missing.as_str()));
        }
        None => out.line(
            4,
            "# sticky: not set, so the upstream's balance picks a backend",
        ),
    }
    out.line(4, &format!("upstream: {}", scalar(&route.upstream)));
    out.line(4, "timeouts:");
    out.line(6, &format!("read: {}", duration(route.timeouts.read)));
    out.line(6, &format!("idle: {}", duration(route.timeouts.idle)));
    out.line(4, &format!("retries: {}", route.retries));
    out.line(4, &format!("long_poll: {}", route.long_poll));
    out.line(4, &format!("max_body: {}", route.max_body));
    if let Some(r) = &route.rate_limit {
        let by = match r.by {
            RateLimitBy::ClientIp => "client_ip",
            RateLimitBy::Key => "key",
        };
        out.line(4, "rate_limit:");
        out.line(6, &format!("by: {by}"));
        out.line(6, &format!("per_second: {}", r.per_second));
        out.line(6, &format!("burst: {}", r.burst));
    }
    if let Some(n) = route.limits.streams_per_key {
        out.line(4, "limits:");
        out.line(6, &format!("streams_per_key: {n}"));
    }
}

#[derive(Default)]
struct Out {
    text: String,
}

impl Out {
    fn line(&mut self, indent: usize, text: &str) {
        let _ = writeln!(self.text, "{:indent$}{text}", "");
    }
}

/// `1m 30s` as `1m30s`: the humantime spelling without spaces, which humantime parses back.
pub(crate) fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// A YAML scalar that reads back as the same string: plain when unambiguous, else quoted.
fn scalar(s: &str) -> String {
    let plain_char = |c: char| c.is_ascii_alphanumeric() || "-_./:{}".contains(c);
    let starts_ok = s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '/' || c == '_');
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
    );
    let numeric = s.parse::<f64>().is_ok() || s.starts_with("0x") || s.starts_with("0o");
    if starts_ok && s.chars().all(plain_char) && !reserved && !numeric && !s.ends_with(':') {
        return s.to_string();
    }
    let mut quoted = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(quoted, "\\x{:02x}", c as u32);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_render_without_spaces() {
        assert_eq!(duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(duration(Duration::from_millis(500)), "500ms");
        assert_eq!(duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        assert_eq!(scalar("docs"), "docs");
        assert_eq!(scalar("/docs/{key}"), "/docs/{key}");
        assert_eq!(scalar("*.example.com"), "\"*.example.com\"");
        assert_eq!(scalar("404"), "\"404\"");
        assert_eq!(scalar("true"), "\"true\"");
        assert_eq!(scalar("[::1]:80"), "\"[::1]:80\"");
        assert_eq!(scalar("a \"b\"\n"), "\"a \\\"b\\\"\\x0a\"");
        assert_eq!(scalar(""), "\"\"");
    }
}
