//! Checks across values: unique route names, routes naming known upstreams, no two backends of
//! an upstream on one address, and listeners that can all bind (with the admin listener too).

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::convert::Spots;
use crate::model::Config;
use crate::read::{item, suggest, Cx};

/// Records every cross-value problem of `config` (as converted, possibly partially).
pub(crate) fn check(cx: &mut Cx, config: &Config, spots: &Spots) {
    listeners(cx, config, spots);
    admin(cx, config, spots);
    backends(cx, config, spots);
    routes(cx, config, spots);
}

/// Two sockets cannot both bind: same port and same IP, or one of them is the wildcard.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn listeners(cx: &mut Cx, config: &Config, spots: &Spots) {
    for (k, (listener, (i, mark))) in config.listeners.iter().zip(&spots.listeners).enumerate() {
        let earlier = config.listeners[..k].iter().zip(&spots.listeners);
        if let Some((other, (j, _))) = earlier
            .clone()
            .find(|(l, _)| clash(l.address, listener.address))
        {
            let message = if other.address == listener.address {
                format!(
                    "duplicate listener address {} (also listeners[{j}])",
                    listener.address
                )
            } else {
                format!(
                    "listener address {} clashes with {} (listeners[{j}])",
                    listener.address, other.address
                )
            };
            cx.error(*mark, &format!("listeners[{i}].address"), message);
        }
    }
}

fn admin(cx: &mut Cx, config: &Config, spots: &Spots) {
    let admin = config.admin.address;
    for (listener, (i, mark)) in config.listeners.iter().zip(&spots.listeners) {
        if !clash(listener.address, admin) {
            continue;
        }
        match spots.admin {
            Some(admin_mark) => {
                let message = format!(
                    "admin address {admin} clashes with {} (listeners[{i}])",
                    listener.address
                );
                cx.error(admin_mark, "admin.address", message);
            }
            None => {
                let message = format!(
                    "listener address {} clashes with the default admin address {admin}",
                    listener.address
                );
                cx.error(*mark, &format!("listeners[{i}].address"), message);
            }
        }
    }
    // Without `token_file` there is no auth on the admin API, so it must stay on loopback.
    let has_token = config.admin.token_file.is_some();
    if let (Some(mark), false, false) = (spots.admin, admin.ip().is_loopback(), has_token) {
        let message = format!(
            "admin address {admin} is not loopback, so `admin.token_file` is required (every admin request then needs `Authorization: Bearer <token>`)"
        );
        cx.error(mark, "admin.address", message);
    }
}

fn backends(cx: &mut Cx, config: &Config, spots: &Spots) {
    for (upstream, marks) in config.upstreams.iter().zip(&spots.backends) {
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        for (backend, (i, mark)) in upstream.backends.iter().zip(marks) {
            if let Some(first) = seen.get(&backend.address) {
                let path = format!("upstreams.{}.backends[{i}].address", upstream.name);
                let message = format!(
                    "duplicate backend address {} (also backends[{first}])",
                    backend.address
                );
                cx.error(*mark, &path, message);
            } else {
                seen.insert(backend.address, *i);
            }
        }
    }
}

fn routes(cx: &mut Cx, config: &Config, spots: &Spots) {
    let upstream_names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, route) in config.routes.iter().enumerate() {
        let path = item("routes", i);
        if let Some(Some(mark)) = spots.route_names.get(i) {
            if let Some(first) = names.get(route.name.as_str()) {
                let message = format!(
                    "duplicate route name `{}` (also routes[{first}])",
                    route.name
                );
                cx.error(*mark, &format!("{path}.name"), message);
            } else {
                names.insert(&route.name, i);
            }
        }
        if let Some(Some(mark)) = spots.route_upstreams.get(i) {
            if spots.upstreams_readable && !upstream_names.contains(&route.upstream.as_str()) {
                let message = match suggest(&route.upstream, &upstream_names) {
                    Some(close) => format!(
                        "unknown upstream `{}`, did you mean `{close}`?",
                        route.upstream
                    ),
                    None => format!(
                        "unknown upstream `{}`; defined: {}",
                        route.upstream,
                        quoted(&upstream_names)
                    ),
                };
                cx.error(*mark, &format!("{path}.upstream"), message);
            }
        }
    }
}

fn quoted(names: &[&str]) -> String {
    if names.is_empty() {
        return "none".to_string();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
