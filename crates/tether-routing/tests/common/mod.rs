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
        bounded_load: None,
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
        limits: Default::default(),
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

/// A chain of three sources: header `x-doc-id`, cookie `doc_id`, query `doc`.
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

/// The routing table `Router::decide` is measured on (benchmark and callgrind loop): a
/// path-prefix route without a key, then a sticky route with the 3-source key chain, over
/// `count` backends.
pub fn decide_router(count: usize) -> tether_routing::Router {
    tether_routing::Router::new(&config(
        vec![upstream("docs", backends(count), Balance::Ketama)],
        vec![
            route("static", prefix("/static/"), None, "docs"),
            route(
                "docs",
                prefix("/docs/"),
                Some(doc_chain(OnMissing::Reject)),
                "docs",
            ),
        ],
    ))
}

/// The headers of the measured request: the key header among a cookie and a user agent.
pub fn decide_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "x-doc-id",
        http::HeaderValue::from_static("b7c1a7e0-3f2d-4c55-9a1e-6d0f4e2b9c11"),
    );
    headers.insert(
        "cookie",
        http::HeaderValue::from_static("theme=dark; session=abc"),
    );
    headers.insert("user-agent", http::HeaderValue::from_static("bench"));
    headers
}

/// The measured request, with `headers` from [`decide_headers`].
pub fn decide_request(headers: &http::HeaderMap) -> tether_routing::RequestView<'_> {
    tether_routing::RequestView {
        method: "GET",
        host: Some("docs.example.com"),
        path: "/docs/b7c1a7e0-3f2d-4c55-9a1e-6d0f4e2b9c11/ws",
        query: Some("v=2"),
        headers: headers.into(),
        client_ip: None,
    }
}
