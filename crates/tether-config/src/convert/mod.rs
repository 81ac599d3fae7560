//! Marked node tree -> model, section by section, with defaults filled in.
//!
//! Checks that need only one value (types, ranges, formats) happen here; checks across values
//! (unique names, known upstreams, clashing addresses) are in `validate`, fed by [`Spots`].

mod route;
mod upstream;

use crate::model::*;
use crate::names::{fields, ACCESS_LOG_FORMATS};
use crate::read::{field, item, Cx};
use crate::yaml::{Mark, Node};
use route::route;
use upstream::upstreams;

/// Where the values that `validate` compares were written, aligned with the model's vectors.
#[derive(Debug, Default)]
pub(crate) struct Spots {
    /// Index in the file and position of the address of each listener kept in
    /// `Config::listeners` (a listener with an invalid address is not kept).
    pub listeners: Vec<(usize, Mark)>,
    /// `admin.address`, when written in the file.
    pub admin: Option<Mark>,
    /// Per upstream, index in the file and position of the address of each backend kept.
    pub backends: Vec<Vec<(usize, Mark)>>,
    /// Per route, where its name and its upstream were written (if they were valid).
    pub route_names: Vec<Option<Mark>>,
    pub route_upstreams: Vec<Option<Mark>>,
    /// False when `upstreams` itself was unreadable, so routes are not blamed for it.
    pub upstreams_readable: bool,
}

/// Converts the document root. The result is only meaningful when `cx` holds no errors.
pub(crate) fn config(cx: &mut Cx, root: &Node) -> (Config, Spots) {
    let mut spots = Spots::default();
    let mut config = Config {
        server: Server::default(),
        listeners: Vec::new(),
        admin: Admin::default(),
        upstreams: Vec::new(),
        routes: Vec::new(),
    };
    let Some(top) = cx.map(root, "", fields::TOP, &[]) else {
        return (config, spots);
    };
    if let Some(node) = top.get("server") {
        config.server = server(cx, node);
    }
    if let Some(node) = cx.required(top, "", "listeners") {
        config.listeners = listeners(cx, node, &mut spots);
    }
    if let Some(node) = top.get("admin") {
        config.admin = admin(cx, node, &mut spots);
    }
    if let Some(node) = cx.required(top, "", "upstreams") {
        config.upstreams = upstreams(cx, node, &mut spots);
    }
    if let Some(node) = cx.required(top, "", "routes") {
        if let Some(items) = cx.list(node, "routes", "route") {
            for (i, node) in items.iter().enumerate() {
                config
                    .routes
                    .push(route(cx, node, &item("routes", i), &mut spots));
            }
        }
    }
    (config, spots)
}

fn server(cx: &mut Cx, node: &Node) -> Server {
    let mut server = Server::default();
    let Some(f) = cx.map(node, "server", fields::SERVER, &[]) else {
        return server;
    };
    if let Some(n) = f.get("trusted_proxies") {
        for (i, entry) in cx
            .list(n, "server.trusted_proxies", "network")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let path = item("server.trusted_proxies", i);
            match cx.string(entry, &path).map(|t| (Cidr::parse(&t), t)) {
                Some((Some(cidr), _)) => server.trusted_proxies.push(cidr),
                Some((None, text)) => cx.error(
                    entry.mark,
                    &path,
                    format!("expected an IP network like 10.0.0.0/8, found `{text}`"),
                ),
                None => {}
            }
        }
    }
    if let Some(n) = f.get("state_file") {
        match cx.string(n, "server.state_file") {
            Some(path) if !path.trim().is_empty() => server.state_file = Some(path.into()),
            Some(_) => cx.error(n.mark, "server.state_file", "must name a file"),
            None => {}
        }
    }
    if let Some(n) = f.get("limits") {
        server.limits = limits(cx, n).unwrap_or(server.limits);
    }
    if let Some(n) = f.get("access_log") {
        server.access_log = access_log(cx, n).unwrap_or(server.access_log);
    }
    if let Some(n) = f.get("threads") {
        server.threads = cx.integer(n, "server.threads", 1, 4096).map(|t| t as usize);
    }
    if let Some(n) = f.get("grace_period") {
        server.grace_period = cx
            .duration(n, "server.grace_period")
            .unwrap_or(server.grace_period);
    }
    server
}

fn limits(cx: &mut Cx, node: &Node) -> Option<Limits> {
    let path = "server.limits";
    let f = cx.map(node, path, fields::LIMITS, &[])?;
    let mut limits = Limits::default();
    for (key, slot, max) in [
        ("max_uri", &mut limits.max_uri, 1 << 20),
        ("max_header_bytes", &mut limits.max_header_bytes, 1 << 20),
        ("max_header_line", &mut limits.max_header_line, 1 << 20),
        ("max_headers", &mut limits.max_headers, 256),
        ("max_connections", &mut limits.max_connections, 1_000_000),
    ] {
        if let Some(n) = f.get(key) {
            // Pingora itself stops at 1 MiB of headers and 256 fields; limits can only be lower.
            *slot = cx
                .integer(n, &field(path, key), 1, max)
                .map_or(*slot, |v| v as usize);
        }
    }
    for (key, slot) in [
        ("header_timeout", &mut limits.header_timeout),
        ("body_timeout", &mut limits.body_timeout),
        ("send_timeout", &mut limits.send_timeout),
        ("keepalive_timeout", &mut limits.keepalive_timeout),
    ] {
        if let Some(n) = f.get(key) {
            *slot = cx.positive_duration(n, &field(path, key)).unwrap_or(*slot);
        }
    }
    if let Some(n) = f.get("max_requests_per_connection") {
        let key = field(path, "max_requests_per_connection");
        limits.max_requests_per_connection = cx
            .integer(n, &key, 1, u64::from(u32::MAX))
            .map(|v| v as u32);
    }
    if let Some(n) = f.get("max_concurrent_streams") {
        let key = field(path, "max_concurrent_streams");
        limits.max_concurrent_streams = cx
            .integer(n, &key, 1, 10_000)
            .map_or(limits.max_concurrent_streams, |v| v as u32);
    }
    Some(limits)
}

fn access_log(cx: &mut Cx, node: &Node) -> Option<AccessLog> {
    let path = "server.access_log";
    let f = cx.map(node, path, fields::ACCESS_LOG, &[])?;
    let mut log = AccessLog::default();
    if let Some(n) = f.get("format") {
        log.format = cx
            .choice(n, &field(path, "format"), &ACCESS_LOG_FORMATS)
            .unwrap_or(log.format);
    }
    if let Some(n) = f.get("sample") {
        log.sample = cx
            .number(n, &field(path, "sample"), 0.0, 1.0)
            .unwrap_or(log.sample);
    }
    if let Some(n) = f.get("log_keys") {
        log.log_keys = cx.boolean(n, &field(path, "log_keys")).unwrap_or(false);
    }
    Some(log)
}

fn listeners(cx: &mut Cx, node: &Node, spots: &mut Spots) -> Vec<Listener> {
    let mut out = Vec::new();
    for (i, node) in cx
        .list(node, "listeners", "listener")
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = item("listeners", i);
        let Some(f) = cx.map(node, &path, fields::LISTENER, &[]) else {
            continue;
        };
        let tls = f
            .get("tls")
            .and_then(|n| listener_tls(cx, n, &field(&path, "tls")));
        let Some(n) = cx.required(f, &path, "address") else {
            continue;
        };
        if let Some(address) = cx.address(n, &field(&path, "address")) {
            out.push(Listener { address, tls });
            spots.listeners.push((i, n.mark));
        }
    }
    out
}

/// `tls: { cert, key }`. The files are read by the proxy (at start and on reload), which
/// reports a missing or unreadable file with the same field path.
fn listener_tls(cx: &mut Cx, node: &Node, path: &str) -> Option<ListenerTls> {
    let f = cx.map(node, path, fields::TLS, &[])?;
    let file = |cx: &mut Cx, key: &str| {
        let n = cx.required(f, path, key)?;
        match cx.string(n, &field(path, key)) {
            Some(p) if !p.trim().is_empty() => Some(std::path::PathBuf::from(p)),
            Some(_) => {
                cx.error(n.mark, &field(path, key), "must name a PEM file");
                None
            }
            None => None,
        }
    };
    let cert = file(cx, "cert");
    let key = file(cx, "key");
    Some(ListenerTls {
        cert: cert?,
        key: key?,
    })
}

fn admin(cx: &mut Cx, node: &Node, spots: &mut Spots) -> Admin {
    let mut admin = Admin::default();
    let Some(f) = cx.map(node, "admin", fields::ADMIN, &[]) else {
        return admin;
    };
    if let Some(n) = f.get("token_file") {
        match cx.string(n, "admin.token_file") {
            Some(path) if !path.trim().is_empty() => admin.token_file = Some(path.into()),
            Some(_) => cx.error(n.mark, "admin.token_file", "must name a file"),
            None => {}
        }
    }
    if let Some(n) = f.get("public") {
        for (i, item_node) in cx
            .list(n, "admin.public", "path")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(p) = absolute_path(cx, item_node, &item("admin.public", i)) {
                admin.public.push(p);
            }
        }
    }
    if let Some(n) = f.get("address") {
        if let Some(address) = cx.address(n, "admin.address") {
            admin.address = address;
            spots.admin = Some(n.mark);
        }
    }
    admin
}

/// Upstream and route names go into metrics labels and admin URLs, so keep them plain.
pub(super) fn check_name(cx: &mut Cx, mark: Mark, path: &str, name: &str) -> bool {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        cx.error(
            mark,
            path,
            format!("invalid name `{name}`: use letters, digits, `-`, `_` and `.`"),
        );
    }
    ok
}

/// A string that must start with `/` (path prefixes, exact paths, probe paths).
pub(super) fn absolute_path(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let value = cx.string(node, path)?;
    if !value.starts_with('/') {
        cx.error(
            node.mark,
            path,
            format!("must start with `/`, found `{value}`"),
        );
        return None;
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        cx.error(
            node.mark,
            path,
            "must not contain spaces or control characters",
        );
        return None;
    }
    Some(value)
}

/// An HTTP token (RFC 9110 `tchar`s): method, header and cookie names.
pub(super) fn token(cx: &mut Cx, node: &Node, path: &str, what: &str) -> Option<String> {
    let value = cx.string(node, path)?;
    check_token(cx, node.mark, path, what, &value)
}

pub(super) fn check_token(
    cx: &mut Cx,
    mark: Mark,
    path: &str,
    what: &str,
    value: &str,
) -> Option<String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if value.is_empty() || !value.chars().all(is_tchar) {
        cx.error(mark, path, format!("invalid {what} `{value}`"));
        return None;
    }
    Some(value.to_string())
}
