//! `upstreams:` -> [`Upstream`]s: backends, balance, connect timeout, health check.

use super::{absolute_path, check_name, Spots};
use crate::defaults;
use crate::model::*;
use crate::names::BALANCES;
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

const UPSTREAM: [&str; 6] = [
    "backends",
    "balance",
    "connect_timeout",
    "health_check",
    "passive",
    "rebalance",
];
const UPSTREAM_LATER: [(&str, &str); 1] = [(
    "discovery",
    "`discovery` is not supported yet; list the backends",
)];

fn upstream(cx: &mut Cx, name: &str, node: &Node, path: &str) -> (Upstream, Vec<(usize, Mark)>) {
    let mut up = Upstream {
        name: name.to_string(),
        backends: Vec::new(),
        balance: Balance::Ketama,
        connect_timeout: defaults::CONNECT_TIMEOUT,
        health_check: None,
        passive: None,
        rebalance: Rebalance::default(),
    };
    let mut spots = Vec::new();
    let Some(f) = cx.map(node, path, &UPSTREAM, &UPSTREAM_LATER) else {
        return (up, spots);
    };
    if let Some(n) = cx.required(f, path, "backends") {
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
    (up, spots)
}

fn backend(cx: &mut Cx, node: &Node, path: &str) -> Option<(Backend, Mark)> {
    let f = cx.map(node, path, &["address", "weight"], &[])?;
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

const HEALTH: [&str; 6] = [
    "http",
    "tcp",
    "interval",
    "timeout",
    "healthy_after",
    "unhealthy_after",
];

fn health_check(cx: &mut Cx, node: &Node, path: &str) -> Option<HealthCheck> {
    let f = cx.map(node, path, &HEALTH, &[])?;
    let kind = match (f.entry("http"), f.entry("tcp")) {
        (Some(http), None) => http_probe(cx, &http.value, &field(path, "http")),
        (None, Some(tcp)) => cx
            .map(&tcp.value, &field(path, "tcp"), &[], &[])
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
    let f = cx.map(node, path, &["path", "expect_status"], &[])?;
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
    let f = cx.map(node, path, &["failures", "eject_for"], &[])?;
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
    Some(passive)
}

fn rebalance(cx: &mut Cx, node: &Node, path: &str) -> Option<Rebalance> {
    let keys = ["enabled", "max_per_second", "websocket_close_code"];
    let f = cx.map(node, path, &keys, &[])?;
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
    Some(rebalance)
}
