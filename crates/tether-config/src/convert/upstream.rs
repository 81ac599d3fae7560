//! `upstreams:` -> [`Upstream`]s: backends, balance, connect timeout, health check.

use super::{absolute_path, check_name, Spots};
use crate::defaults;
use crate::model::*;
use crate::names::{fields, BALANCES};
use crate::read::{field, item, Cx};
use crate::yaml::{Mark, Node};

pub(super) fn upstreams(cx: &mut Cx, node: &Node, spots: &mut Spots) -> Vec<Upstream> {
    let Some(all) = cx.any_map(node, "upstreams") else {
        return Vec::new();
    };
    spots.upstreams_readable = true;
    if all.entries.is_empty() {
        cx.error(node.mark, "upstreams", "at least one upstream is required");
    }
    let mut out = Vec::new();
    for entry in all.entries {
        let path = field("upstreams", &entry.key);
        check_name(cx, entry.key_mark, &path, &entry.key);
        let (upstream, backend_spots) = upstream(cx, &entry.key, &entry.value, &path);
        out.push(upstream);
        spots.backends.push(backend_spots);
    }
    out
}

fn upstream(cx: &mut Cx, name: &str, node: &Node, path: &str) -> (Upstream, Vec<(usize, Mark)>) {
    let mut up = Upstream {
        name: name.to_string(),
        backends: Vec::new(),
        discovery: None,
        balance: Balance::Ketama,
        connect_timeout: defaults::CONNECT_TIMEOUT,
        health_check: None,
        passive: None,
        rebalance: Rebalance::default(),
        bounded_load: None,
    };
    let mut spots = Vec::new();
    let Some(f) = cx.map(node, path, fields::UPSTREAM, &[]) else {
        return (up, spots);
    };
    if let Some(n) = f.get("discovery") {
        up.discovery = discovery(cx, n, &field(path, "discovery"));
        // With discovery the members come from the source; a static list beside it would be
        // ignored at run time, so it is refused rather than silently unused.
        if let Some(entry) = f.entry("backends") {
            cx.error(
                entry.key_mark,
                &field(path, "backends"),
                "`backends` and `discovery` exclude each other: with discovery the backends come from the source",
            );
        }
    } else if let Some(n) = cx.required(f, path, "backends") {
        let list_path = field(path, "backends");
        for (i, node) in cx
            .list(n, &list_path, "backend")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some((backend, mark)) = backend(cx, node, &item(&list_path, i)) {
                up.backends.push(backend);
                spots.push((i, mark));
            }
        }
    }
    if let Some(n) = f.get("balance") {
        up.balance = cx
            .choice(n, &field(path, "balance"), &BALANCES)
            .unwrap_or(up.balance);
    }
    if let Some(n) = f.get("connect_timeout") {
        let d = cx.positive_duration(n, &field(path, "connect_timeout"));
        up.connect_timeout = d.unwrap_or(up.connect_timeout);
    }
    if let Some(n) = f.get("health_check") {
        up.health_check = health_check(cx, n, &field(path, "health_check"));
    }
    if let Some(n) = f.get("passive") {
        up.passive = passive(cx, n, &field(path, "passive"));
    }
    if let Some(n) = f.get("rebalance") {
        up.rebalance = rebalance(cx, n, &field(path, "rebalance")).unwrap_or(up.rebalance);
    }
    if let Some(n) = f.get("bounded_load") {
        up.bounded_load = bounded_load(cx, n, &field(path, "bounded_load"));
        if up.bounded_load.is_some() && up.balance != Balance::Ketama {
            cx.error(
                n.mark,
                &field(path, "bounded_load"),
                "places documents on the ketama ring: needs balance: ketama",
            );
        }
    }
    (up, spots)
}

fn backend(cx: &mut Cx, node: &Node, path: &str) -> Option<(Backend, Mark)> {
    let f = cx.map(node, path, fields::BACKEND, &[])?;
    // Both fields are read before giving up, so both can be reported.
    let weight = match f.get("weight") {
        Some(n) => cx.integer(n, &field(path, "weight"), 1, defaults::MAX_WEIGHT.into()),
        None => Some(defaults::WEIGHT.into()),
    };
    let n = cx.required(f, path, "address")?;
    let address = cx.address(n, &field(path, "address"))?;
    if address.port() == 0 {
        cx.error(
            n.mark,
            &field(path, "address"),
            "backend port must not be 0",
        );
        return None;
    }
    let weight = u32::try_from(weight?).ok()?;
    Some((Backend { address, weight }, n.mark))
}

fn discovery(cx: &mut Cx, node: &Node, path: &str) -> Option<Discovery> {
    let f = cx.map(node, path, fields::DISCOVERY, &[])?;
    match (f.entry("etcd"), f.entry("dns")) {
        (Some(etcd), None) => etcd_discovery(cx, &etcd.value, &field(path, "etcd")),
        (None, Some(dns)) => dns_discovery(cx, &dns.value, &field(path, "dns")),
        (Some(a), Some(b)) => {
            let second = if a.key_mark > b.key_mark { a } else { b };
            cx.error(
                second.key_mark,
                &field(path, &second.key),
                "use either `etcd` or `dns`, not both",
            );
            None
        }
        (None, None) => {
            cx.error(
                f.mark,
                path,
                "needs a source: `etcd: { endpoints: [...], prefix: ... }` or `dns: { name: ..., port: ... }`",
            );
            None
        }
    }
}

fn etcd_discovery(cx: &mut Cx, node: &Node, path: &str) -> Option<Discovery> {
    let f = cx.map(node, path, fields::ETCD, &[])?;
    let mut endpoints = Vec::new();
    if let Some(n) = cx.required(f, path, "endpoints") {
        let list_path = field(path, "endpoints");
        for (i, item_node) in cx
            .list(n, &list_path, "endpoint")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(endpoint) = etcd_endpoint(cx, item_node, &item(&list_path, i)) {
                endpoints.push(endpoint);
            }
        }
    }
    let prefix = match cx.required(f, path, "prefix") {
        Some(n) => match cx.string(n, &field(path, "prefix")) {
            // An empty prefix would make every key in etcd a backend.
            Some(p) if p.is_empty() => {
                cx.error(n.mark, &field(path, "prefix"), "must not be empty");
                None
            }
            other => other,
        },
        None => None,
    };
    if endpoints.is_empty() {
        return None;
    }
    Some(Discovery::Etcd(EtcdDiscovery {
        endpoints,
        prefix: prefix?,
    }))
}

/// `host:port` or `http://host:port` of an etcd client endpoint, kept as `host:port`. Unlike
/// backends, etcd endpoints may be host names (resolved when connecting): they are usually
/// service names in a cluster.
fn etcd_endpoint(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let text = cx.string(node, path)?;
    let text = text.trim();
    if text.starts_with("https://") {
        cx.error(
            node.mark,
            path,
            "TLS to etcd is not supported yet; use http://",
        );
        return None;
    }
    let bare = text.strip_prefix("http://").unwrap_or(text);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    let valid = match bare.rsplit_once(':') {
        Some((host, port)) => {
            let host_ok = if let Some(v6) = host.strip_prefix('[') {
                v6.strip_suffix(']')
                    .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
            } else {
                !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
            };
            host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    };
    if !valid {
        cx.error(
            node.mark,
            path,
            format!(
                "expected host:port or http://host:port such as 127.0.0.1:2379, found `{text}`"
            ),
        );
        return None;
    }
    Some(bare.to_string())
}

fn dns_discovery(cx: &mut Cx, node: &Node, path: &str) -> Option<Discovery> {
    let f = cx.map(node, path, fields::DNS, &[])?;
    let name = match cx.required(f, path, "name") {
        Some(n) => {
            let name = cx.string(n, &field(path, "name"));
            match name {
                Some(name) if is_dns_name(&name) => Some(name),
                Some(name) => {
                    cx.error(
                        n.mark,
                        &field(path, "name"),
                        format!("expected a DNS name such as docs.default.svc.cluster.local, found `{name}`"),
                    );
                    None
                }
                None => None,
            }
        }
        None => None,
    };
    let port = cx
        .required(f, path, "port")
        .and_then(|n| cx.integer(n, &field(path, "port"), 1, 65535));
    let mut interval = defaults::DNS_INTERVAL;
    if let Some(n) = f.get("interval") {
        interval = cx
            .positive_duration(n, &field(path, "interval"))
            .unwrap_or(interval);
    }
    let resolver = match f.get("resolver") {
        Some(n) => Some(cx.address(n, &field(path, "resolver"))?),
        None => None,
    };
    Some(Discovery::Dns(DnsDiscovery {
        name: name?,
        port: u16::try_from(port?).ok()?,
        interval,
        resolver,
    }))
}

/// Letters, digits, `-` and `.` in labels of 1..=63 characters; a trailing dot is allowed.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn health_check(cx: &mut Cx, node: &Node, path: &str) -> Option<HealthCheck> {
    let f = cx.map(node, path, fields::HEALTH_CHECK, &[])?;
    let kind = match (f.entry("http"), f.entry("tcp")) {
        (Some(http), None) => http_probe(cx, &http.value, &field(path, "http")),
        (None, Some(tcp)) => cx
            .map(&tcp.value, &field(path, "tcp"), fields::TCP_PROBE, &[])
            .map(|_| HealthCheckKind::Tcp),
        (Some(a), Some(b)) => {
            let second = if a.key_mark > b.key_mark { a } else { b };
            cx.error(
                second.key_mark,
                &field(path, &second.key),
                "use either `http` or `tcp`, not both",
            );
            None
        }
        (None, None) => {
            cx.error(
                f.mark,
                path,
                "needs a probe: `http: { path: /healthz }` or `tcp: {}`",
            );
            None
        }
    };
    let mut check = HealthCheck::with_defaults(kind.unwrap_or(HealthCheckKind::Tcp));
    if let Some(n) = f.get("interval") {
        check.interval = cx
            .positive_duration(n, &field(path, "interval"))
            .unwrap_or(check.interval);
    }
    if let Some(n) = f.get("timeout") {
        check.timeout = cx
            .positive_duration(n, &field(path, "timeout"))
            .unwrap_or(check.timeout);
    }
    for (key, slot) in [
        ("healthy_after", &mut check.healthy_after),
        ("unhealthy_after", &mut check.unhealthy_after),
    ] {
        if let Some(n) = f.get(key) {
            *slot = cx
                .integer(n, &field(path, key), 1, 1000)
                .map_or(*slot, |v| v as u32);
        }
    }
    Some(check)
}

fn http_probe(cx: &mut Cx, node: &Node, path: &str) -> Option<HealthCheckKind> {
    let f = cx.map(node, path, fields::HTTP_PROBE, &[])?;
    let probe_path = match f.get("path") {
        Some(n) => absolute_path(cx, n, &field(path, "path")),
        None => Some(defaults::HEALTH_PATH.to_string()),
    };
    let expect_status = match f.get("expect_status") {
        Some(n) => cx.integer(n, &field(path, "expect_status"), 100, 599),
        None => Some(defaults::EXPECT_STATUS.into()),
    };
    Some(HealthCheckKind::Http {
        path: probe_path?,
        expect_status: u16::try_from(expect_status?).ok()?,
    })
}

fn passive(cx: &mut Cx, node: &Node, path: &str) -> Option<Passive> {
    let f = cx.map(node, path, fields::PASSIVE, &[])?;
    let mut passive = Passive::default();
    if let Some(n) = f.get("failures") {
        passive.failures = cx
            .integer(n, &field(path, "failures"), 1, 1000)
            .map_or(passive.failures, |v| v as u32);
    }
    if let Some(n) = f.get("eject_for") {
        passive.eject_for = cx
            .positive_duration(n, &field(path, "eject_for"))
            .unwrap_or(passive.eject_for);
    }
    if let Some(n) = f.get("timeouts") {
        passive.timeouts = cx
            .boolean(n, &field(path, "timeouts"))
            .unwrap_or(passive.timeouts);
    }
    Some(passive)
}

fn bounded_load(cx: &mut Cx, node: &Node, path: &str) -> Option<BoundedLoad> {
    let f = cx.map(node, path, fields::BOUNDED_LOAD, &[])?;
    let mut bounded = BoundedLoad::default();
    if let Some(n) = f.get("factor") {
        bounded.factor = cx
            .number(n, &field(path, "factor"), 1.0, 100.0)
            .unwrap_or(bounded.factor);
    }
    if let Some(n) = f.get("linger") {
        match cx.duration(n, &field(path, "linger")) {
            Some(d) if d <= MAX_FAILBACK => bounded.linger = d,
            Some(_) => cx.error(n.mark, &field(path, "linger"), "must be at most 1h"),
            None => {}
        }
    }
    Some(bounded)
}

/// The longest `failback_after`, `ramp` and `linger`: a backend kept out for longer is an
/// operator's drain, not hysteresis.
const MAX_FAILBACK: std::time::Duration = std::time::Duration::from_secs(3600);

fn rebalance(cx: &mut Cx, node: &Node, path: &str) -> Option<Rebalance> {
    let f = cx.map(node, path, fields::REBALANCE, &[])?;
    let mut rebalance = Rebalance::default();
    if let Some(n) = f.get("enabled") {
        rebalance.enabled = cx
            .boolean(n, &field(path, "enabled"))
            .unwrap_or(rebalance.enabled);
    }
    if let Some(n) = f.get("max_per_second") {
        rebalance.max_per_second = cx
            .integer(n, &field(path, "max_per_second"), 1, 1_000_000)
            .map_or(rebalance.max_per_second, |v| v as u32);
    }
    if let Some(n) = f.get("websocket_close_code") {
        // RFC 6455 7.4: 1000-2999 are protocol codes (1004-1006 and 1015 are never sent),
        // 3000-4999 are for registered and private use.
        let code = cx.integer(n, &field(path, "websocket_close_code"), 1000, 4999);
        match code {
            Some(1004..=1006 | 1015) => cx.error(
                n.mark,
                &field(path, "websocket_close_code"),
                "1004, 1005, 1006 and 1015 must not be sent in a close frame",
            ),
            Some(c) => rebalance.websocket_close_code = c as u16,
            None => {}
        }
    }
    for (name, slot) in [
        ("failback_after", &mut rebalance.failback_after),
        ("ramp", &mut rebalance.ramp),
    ] {
        let Some(n) = f.get(name) else { continue };
        match cx.duration(n, &field(path, name)) {
            Some(d) if d <= MAX_FAILBACK => *slot = d,
            Some(_) => cx.error(n.mark, &field(path, name), "must be at most 1h"),
            None => {}
        }
    }
    Some(rebalance)
}
