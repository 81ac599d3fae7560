//! Builders for `Config` values, shared by the integration tests and the benchmark.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tether_config::{
    Admin, Backend, Balance, Config, KeySource, Listener, OnMissing, PathMatch, Route, RouteMatch,
    Server, Sticky, Timeouts, Upstream,
};

/// `count` backends `10.a.b.c:8080`, weight 1.
pub fn backends(count: usize) -> Vec<Backend> {
    (0..count).map(|i| backend(i, 1)).collect()
}

/// The `i`-th test backend address with `weight`.
pub fn backend(i: usize, weight: u32) -> Backend {
    let i = i as u32 + 1;
    Backend {
        address: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
        weight,
    }
}

pub fn upstream(name: &str, backends: Vec<Backend>, balance: Balance) -> Upstream {
    Upstream {
        name: name.to_owned(),
        backends,
        discovery: None,
        balance,
        connect_timeout: Duration::from_secs(1),
        health_check: None,
        passive: None,
        rebalance: tether_config::Rebalance::default(),
    }
}

pub fn route(name: &str, matcher: RouteMatch, sticky: Option<Sticky>, upstream: &str) -> Route {
    Route {
        name: name.to_owned(),
        matcher,
        sticky,
        upstream: upstream.to_owned(),
        timeouts: Timeouts {
            read: Duration::from_secs(60),
            idle: Duration::from_secs(3600),
        },
        retries: 2,
        long_poll: false,
        max_body: 1 << 20,
        rate_limit: None,
    }
}

pub fn prefix(path: &str) -> RouteMatch {
    RouteMatch {
        path: Some(PathMatch::Prefix(path.to_owned())),
        ..RouteMatch::default()
    }
}

pub fn sticky(keys: Vec<KeySource>, on_missing: OnMissing) -> Sticky {
    Sticky { keys, on_missing }
}

/// The design's chain: header `x-doc-id`, cookie `doc_id`, query `doc`.
pub fn doc_chain(on_missing: OnMissing) -> Sticky {
    sticky(
        vec![
            KeySource::Header("x-doc-id".into()),
            KeySource::Cookie("doc_id".into()),
            KeySource::Query("doc".into()),
        ],
        on_missing,
    )
}

pub fn config(upstreams: Vec<Upstream>, routes: Vec<Route>) -> Config {
    Config {
        server: Server::default(),
        listeners: vec![Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
        }],
        admin: Admin::default(),
        upstreams,
        routes,
    }
}

/// One ketama upstream `docs` with `backends` and one catch-all sticky route on the key chain.
pub fn ring_config(backends: Vec<Backend>) -> Config {
    config(
        vec![upstream("docs", backends, Balance::Ketama)],
        vec![route(
            "all",
            prefix("/"),
            Some(doc_chain(OnMissing::Reject)),
            "docs",
        )],
    )
}
