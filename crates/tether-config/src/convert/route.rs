//! One `routes:` entry -> [`Route`]: match, sticky key sources, timeouts, retries.

use super::{absolute_path, check_name, check_token, token, Spots};
use crate::defaults;
use crate::model::*;
use crate::names::{fields, KEY_SOURCES, ON_MISSING, RATE_LIMIT_BY};
use crate::read::{field, item, Cx};
use crate::yaml::{Mark, Node};

pub(super) fn route(cx: &mut Cx, node: &Node, path: &str, spots: &mut Spots) -> Route {
    let mut route = Route {
        name: String::new(),
        matcher: RouteMatch::default(),
        sticky: None,
        upstream: String::new(),
        timeouts: Timeouts::default(),
        retries: defaults::RETRIES,
        long_poll: false,
        max_body: defaults::MAX_BODY,
        rate_limit: None,
        limits: Default::default(),
    };
    let (mut name_mark, mut upstream_mark) = (None, None);
    if let Some(f) = cx.map(node, path, fields::ROUTE, &[]) {
        if let Some(n) = cx.required(f, path, "name") {
            if let Some(name) = cx.string(n, &field(path, "name")) {
                if check_name(cx, n.mark, &field(path, "name"), &name) {
                    name_mark = Some(n.mark);
                }
                route.name = name;
            }
        }
        if let Some(n) = cx.required(f, path, "upstream") {
            if let Some(upstream) = cx.string(n, &field(path, "upstream")) {
                route.upstream = upstream;
                upstream_mark = Some(n.mark);
            }
        }
        if let Some(n) = f.get("match") {
            route.matcher = route_match(cx, n, &field(path, "match"));
        }
        if let Some(n) = f.get("sticky") {
            route.sticky = sticky(cx, n, &field(path, "sticky"));
        }
        if let Some(n) = f.get("timeouts") {
            route.timeouts = timeouts(cx, n, &field(path, "timeouts"));
        }
        if let Some(n) = f.get("retries") {
            let max = defaults::MAX_RETRIES.into();
            route.retries = cx
                .integer(n, &field(path, "retries"), 0, max)
                .map_or(route.retries, |r| r as u32);
        }
        if let Some(n) = f.get("rate_limit") {
            route.rate_limit = rate_limit(cx, n, &field(path, "rate_limit"));
        }
        if let Some(n) = f.get("limits") {
            let (limits, per_key_rate) = limits(cx, n, &field(path, "limits"));
            route.limits = limits;
            // `limits.requests_per_second_per_key: R` is `rate_limit: { by: key,
            // per_second: R }` written where the other per-document limit is; one limiter.
            if let Some((rate, mark)) = per_key_rate {
                if route.rate_limit.is_some() {
                    cx.error(
                        mark,
                        &field(path, "limits.requests_per_second_per_key"),
                        "the route has a rate_limit too; keep one of the two",
                    );
                } else {
                    route.rate_limit = Some(RateLimit {
                        by: RateLimitBy::Key,
                        per_second: rate,
                        burst: 0,
                    });
                }
            }
        }
        if let Some(n) = f.get("max_body") {
            route.max_body = cx
                .integer(n, &field(path, "max_body"), 0, u64::MAX >> 1)
                .unwrap_or(route.max_body);
        }
        if let Some(n) = f.get("long_poll") {
            route.long_poll = cx.boolean(n, &field(path, "long_poll")).unwrap_or(false);
        }
    }
    spots.route_names.push(name_mark);
    spots.route_upstreams.push(upstream_mark);
    route
}

fn route_match(cx: &mut Cx, node: &Node, path: &str) -> RouteMatch {
    let mut m = RouteMatch::default();
    let Some(f) = cx.map(node, path, fields::MATCH, &[]) else {
        return m;
    };
    if let Some(n) = f.get("host") {
        m.host = host(cx, n, &field(path, "host"));
    }
    if let (Some(a), Some(b)) = (f.entry("path_prefix"), f.entry("path")) {
        let second = if a.key_mark > b.key_mark { a } else { b };
        cx.error(
            second.key_mark,
            &field(path, &second.key),
            "use either `path_prefix` or `path`, not both",
        );
    } else if let Some(n) = f.get("path_prefix") {
        m.path = absolute_path(cx, n, &field(path, "path_prefix")).map(PathMatch::Prefix);
    } else if let Some(n) = f.get("path") {
        m.path = absolute_path(cx, n, &field(path, "path")).map(PathMatch::Exact);
    }
    if let Some(n) = f.get("methods") {
        let list_path = field(path, "methods");
        for (i, node) in cx
            .list(n, &list_path, "method")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let item_path = item(&list_path, i);
            if let Some(method) = token(cx, node, &item_path, "method") {
                m.methods.push(method.to_ascii_uppercase());
            }
        }
    }
    if let Some(n) = f.get("headers") {
        let headers_path = field(path, "headers");
        if let Some(headers) = cx.any_map(n, &headers_path) {
            for entry in headers.entries {
                let entry_path = field(&headers_path, &entry.key);
                let name = check_token(cx, entry.key_mark, &entry_path, "header name", &entry.key);
                let value = cx.string(&entry.value, &entry_path);
                if let (Some(name), Some(value)) = (name, value) {
                    m.headers.push((name.to_ascii_lowercase(), value));
                }
            }
        }
    }
    m
}

fn sticky(cx: &mut Cx, node: &Node, path: &str) -> Option<Sticky> {
    let f = cx.map(node, path, fields::STICKY, &[])?;
    let mut on_missing = defaults::ON_MISSING;
    if let Some(n) = f.get("on_missing") {
        on_missing = cx
            .choice(n, &field(path, "on_missing"), &ON_MISSING)
            .unwrap_or(on_missing);
    }
    let n = cx.required(f, path, "keys")?;
    let list_path = field(path, "keys");
    let mut keys = Vec::new();
    for (i, node) in cx
        .list(n, &list_path, "key source")
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        keys.extend(key_source(cx, node, &item(&list_path, i)));
    }
    Some(Sticky { keys, on_missing })
}

fn key_source(cx: &mut Cx, node: &Node, path: &str) -> Option<KeySource> {
    let f = cx.map(node, path, fields::KEY_SOURCE, &[])?;
    let mut present = f
        .entries
        .iter()
        .filter(|e| KEY_SOURCES.contains(&e.key.as_str()));
    let Some(entry) = present.next() else {
        if f.entries.is_empty() {
            cx.error(
                f.mark,
                path,
                "needs one of `header`, `cookie`, `query` or `path`",
            );
        }
        return None;
    };
    if let Some(extra) = present.next() {
        let message = format!("a key source has exactly one of `header`, `cookie`, `query` or `path`; found `{}` and `{}`", entry.key, extra.key);
        cx.error(extra.key_mark, &field(path, &extra.key), message);
        return None;
    }
    let value_path = field(path, &entry.key);
    match entry.key.as_str() {
        "header" => token(cx, &entry.value, &value_path, "header name")
            .map(|h| KeySource::Header(h.to_ascii_lowercase())),
        "cookie" => token(cx, &entry.value, &value_path, "cookie name").map(KeySource::Cookie),
        "query" => {
            let name = cx.string(&entry.value, &value_path)?;
            if name.is_empty() {
                cx.error(
                    entry.value.mark,
                    &value_path,
                    "query parameter name must not be empty",
                );
                return None;
            }
            Some(KeySource::Query(name))
        }
        _ => path_pattern(cx, &entry.value, &value_path).map(KeySource::Path),
    }
}

/// A `path:` key pattern: absolute, with exactly one whole `{key}` segment.
fn path_pattern(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let pattern = absolute_path(cx, node, path)?;
    let segments: Vec<&str> = pattern.split('/').collect();
    let keys = segments.iter().filter(|s| **s == "{key}").count();
    let message = if pattern.matches("{key}").count() > keys {
        "`{key}` must be a whole path segment, e.g. /docs/{key}"
    } else if keys != 1 {
        "path pattern must contain exactly one `{key}` segment, e.g. /docs/{key}"
    } else if segments
        .iter()
        .any(|s| *s != "{key}" && (s.contains('{') || s.contains('}')))
    {
        "only `{key}` may appear in braces, e.g. /docs/{key}"
    } else {
        return Some(pattern);
    };
    cx.error(node.mark, path, message);
    None
}

/// A route's `limits`, and its `requests_per_second_per_key` with where it was written.
fn limits(cx: &mut Cx, node: &Node, path: &str) -> (RouteLimits, Option<(u32, Mark)>) {
    let mut l = RouteLimits::default();
    let Some(f) = cx.map(node, path, fields::ROUTE_LIMITS, &[]) else {
        return (l, None);
    };
    if let Some(n) = f.get("streams_per_key") {
        l.streams_per_key = cx
            .integer(n, &field(path, "streams_per_key"), 1, 1_000_000)
            .map(|v| v as u32);
    }
    let rate = f.get("requests_per_second_per_key").and_then(|n| {
        let name = field(path, "requests_per_second_per_key");
        let rate = cx.integer(n, &name, 1, 10_000_000)? as u32;
        Some((rate, n.mark))
    });
    (l, rate)
}

fn timeouts(cx: &mut Cx, node: &Node, path: &str) -> Timeouts {
    let mut t = Timeouts::default();
    let Some(f) = cx.map(node, path, fields::TIMEOUTS, &[]) else {
        return t;
    };
    if let Some(n) = f.get("read") {
        t.read = cx
            .positive_duration(n, &field(path, "read"))
            .unwrap_or(t.read);
    }
    if let Some(n) = f.get("idle") {
        t.idle = cx
            .positive_duration(n, &field(path, "idle"))
            .unwrap_or(t.idle);
    }
    t
}

/// `host:` exact (`docs.example.com`) or wildcard (`*.example.com`), lower-cased, no port.
fn host(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let value = cx.string(node, path)?.to_ascii_lowercase();
    let name = value.strip_prefix("*.").unwrap_or(&value);
    let label_ok =
        |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if value.contains(':') {
        cx.error(
            node.mark,
            path,
            format!("host must not include a port, found `{value}`"),
        );
        return None;
    }
    if !name.split('.').all(label_ok) {
        cx.error(
            node.mark,
            path,
            format!(
                "invalid host `{value}`: expected a name like docs.example.com or *.example.com"
            ),
        );
        return None;
    }
    Some(value)
}

fn rate_limit(cx: &mut Cx, node: &Node, path: &str) -> Option<RateLimit> {
    let f = cx.map(node, path, fields::RATE_LIMIT, &[])?;
    let by = match f.get("by") {
        Some(n) => cx.choice(n, &field(path, "by"), &RATE_LIMIT_BY)?,
        None => RateLimitBy::ClientIp,
    };
    let per_second = cx.required(f, path, "per_second")?;
    let per_second = cx.integer(per_second, &field(path, "per_second"), 1, 10_000_000)? as u32;
    let burst = match f.get("burst") {
        Some(n) => cx.integer(n, &field(path, "burst"), 0, 10_000_000)? as u32,
        None => 0,
    };
    Some(RateLimit {
        by,
        per_second,
        burst,
    })
}
