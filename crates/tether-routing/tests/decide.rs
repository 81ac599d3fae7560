//! `Router::decide`, `next_backend` and `with_previous` as the proxy uses them.

mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use http::{HeaderMap, HeaderValue};
use tether_config::{Balance, KeySource, OnMissing, PathMatch, RouteMatch};
use tether_routing::{Chosen, Decision, KeySourceKind, Reject, RequestView, Router};

fn request<'a>(headers: &'a HeaderMap, path: &'a str) -> RequestView<'a> {
    RequestView {
        method: "GET",
        host: Some("docs.example.com"),
        path,
        query: None,
        headers: headers.into(),
        client_ip: None,
    }
}

fn header(name: &'static str, value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(name, HeaderValue::from_str(value).unwrap());
    headers
}

fn route_name(router: &Router, decision: &Result<Decision, Reject>) -> String {
    match decision {
        Ok(d) => router.routes()[d.route].name.clone(),
        Err(e) => format!("{e:?}"),
    }
}

fn mark_down(router: &Router, backend: usize) {
    router.upstreams()[0].backends[backend]
        .up
        .store(false, Ordering::Relaxed);
}

fn matching_router() -> Router {
    let host = |h: &str| RouteMatch {
        host: Some(h.into()),
        ..RouteMatch::default()
    };
    let routes = vec![
        route(
            "admin-prod",
            RouteMatch {
                path: Some(PathMatch::Prefix("/admin/".into())),
                methods: vec!["POST".into()],
                headers: vec![("x-env".into(), "prod".into())],
                ..RouteMatch::default()
            },
            None,
            "docs",
        ),
        route(
            "exact-health",
            RouteMatch {
                path: Some(PathMatch::Exact("/healthz".into())),
                ..RouteMatch::default()
            },
            None,
            "docs",
        ),
        route("api-host", host("api.example.com"), None, "docs"),
        route("tenant-wildcard", host("*.example.com"), None, "docs"),
        route("docs", prefix("/docs/"), None, "docs"),
    ];
    Router::new(&config(
        vec![upstream("docs", backends(3), Balance::RoundRobin)],
        routes,
    ))
}

#[test]
fn the_first_matching_route_in_file_order_wins() {
    let router = matching_router();
    let none = HeaderMap::new();
    // Both the wildcard and `docs` match; the wildcard comes first.
    let d = router.decide(&RequestView {
        host: Some("a.example.com"),
        ..request(&none, "/docs/1")
    });
    assert_eq!(route_name(&router, &d), "tenant-wildcard");
    // The exact host comes before the wildcard.
    let d = router.decide(&RequestView {
        host: Some("API.example.com:8443"),
        ..request(&none, "/docs/1")
    });
    assert_eq!(route_name(&router, &d), "api-host");
}

#[test]
fn wildcard_host_does_not_match_the_bare_domain() {
    let router = matching_router();
    let none = HeaderMap::new();
    let d = router.decide(&RequestView {
        host: Some("example.com"),
        ..request(&none, "/docs/1")
    });
    assert_eq!(route_name(&router, &d), "docs");
    let d = router.decide(&RequestView {
        host: None,
        ..request(&none, "/other")
    });
    assert_eq!(d, Err(Reject::NoRoute));
}

#[test]
fn method_and_header_conditions_must_all_hold() {
    let router = matching_router();
    let prod = header("x-env", "prod");
    let staging = header("x-env", "staging");
    let none = HeaderMap::new();
    let admin = |headers, method| {
        router.decide(&RequestView {
            method,
            host: Some("example.com"),
            ..request(headers, "/admin/x")
        })
    };
    assert_eq!(route_name(&router, &admin(&prod, "POST")), "admin-prod");
    assert_eq!(admin(&prod, "GET"), Err(Reject::NoRoute));
    assert_eq!(admin(&staging, "POST"), Err(Reject::NoRoute));
    assert_eq!(admin(&none, "POST"), Err(Reject::NoRoute));
}

#[test]
fn exact_path_matches_only_that_path() {
    let router = matching_router();
    let none = HeaderMap::new();
    let at = |path| {
        router.decide(&RequestView {
            host: Some("example.com"),
            ..request(&none, path)
        })
    };
    assert_eq!(route_name(&router, &at("/healthz")), "exact-health");
    assert_eq!(route_name(&router, &at("/x/../healthz")), "exact-health");
    assert_eq!(at("/healthz/"), Err(Reject::NoRoute));
}

#[test]
fn routes_match_the_normalised_path_not_the_raw_one() {
    let router = matching_router();
    let prod = header("x-env", "prod");
    let d = router.decide(&RequestView {
        method: "POST",
        host: Some("example.com"),
        ..request(&prod, "/docs/%2e%2E//admin/./x")
    });
    assert_eq!(route_name(&router, &d), "admin-prod");
    let d = d.unwrap();
    assert_eq!(d.normalized_path.as_deref(), Some("/admin/x"));
    assert_eq!(d.path("/docs/%2e%2E//admin/./x"), "/admin/x");
}

#[test]
fn a_path_escaping_the_root_is_a_bad_path() {
    let router = matching_router();
    let none = HeaderMap::new();
    let d = router.decide(&request(&none, "/docs/../../etc/passwd"));
    assert!(matches!(d, Err(Reject::BadPath(_))));
    assert_eq!(d.unwrap_err().status(), 400);
}

fn sticky_router(on_missing: OnMissing, balance: Balance) -> Router {
    Router::new(&sticky_config(on_missing, balance))
}

fn sticky_config(on_missing: OnMissing, balance: Balance) -> tether_config::Config {
    let mut chain = doc_chain(on_missing);
    chain.keys.push(KeySource::Path("/docs/{key}".into()));
    config(
        vec![upstream("docs", backends(5), balance)],
        vec![route("docs", prefix("/"), Some(chain), "docs")],
    )
}

#[test]
fn a_keyed_request_goes_to_the_key_owner() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let headers = header("x-doc-id", "doc-17");
    let d = router.decide(&request(&headers, "/docs/other")).unwrap();
    assert_eq!(d.key.as_deref(), Some("doc-17"));
    assert_eq!(d.key_source, KeySourceKind::Header);
    assert_eq!(Some(d.backend), router.owner(0, "doc-17"));
    assert_eq!(d.address, router.upstreams()[0].backends[d.backend].address);
}

#[test]
fn the_same_key_from_any_source_lands_on_the_same_backend() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let none = HeaderMap::new();
    let cookie = header("cookie", "doc_id=a b");
    let by_header = router
        .decide(&request(&header("x-doc-id", "a b"), "/"))
        .unwrap();
    let by_cookie = router.decide(&request(&cookie, "/")).unwrap();
    let by_query = router
        .decide(&RequestView {
            query: Some("doc=a+b"),
            ..request(&none, "/")
        })
        .unwrap();
    let by_path = router.decide(&request(&none, "/docs/a%20b/ws")).unwrap();
    let sources: Vec<_> = [&by_header, &by_cookie, &by_query, &by_path]
        .iter()
        .map(|d| d.key_source)
        .collect();
    assert_eq!(
        sources,
        [
            KeySourceKind::Header,
            KeySourceKind::Cookie,
            KeySourceKind::Query,
            KeySourceKind::Path
        ]
    );
    for d in [&by_cookie, &by_query, &by_path] {
        assert_eq!(d.key.as_deref(), Some("a b"));
        assert_eq!(d.backend, by_header.backend);
    }
}

#[test]
fn sticky_routes_on_round_robin_upstreams_still_use_the_ring() {
    for balance in [Balance::RoundRobin, Balance::LeastConnections] {
        let router = sticky_router(OnMissing::Reject, balance);
        for key in ["a", "b", "c", "d", "e", "f"] {
            let headers = header("x-doc-id", key);
            for _ in 0..3 {
                let d = router.decide(&request(&headers, "/")).unwrap();
                assert_eq!(Some(d.backend), router.owner(0, key), "{balance:?} {key}");
            }
        }
    }
}

#[test]
fn missing_key_with_reject_is_a_400_naming_the_route() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let none = HeaderMap::new();
    let d = router.decide(&request(&none, "/elsewhere"));
    assert_eq!(d, Err(Reject::MissingKey { route: 0 }));
    assert_eq!(d.unwrap_err().status(), 400);
}

#[test]
fn missing_key_with_random_picks_an_up_backend_without_a_key() {
    let router = sticky_router(OnMissing::Random, Balance::Ketama);
    mark_down(&router, 2);
    let none = HeaderMap::new();
    let mut seen = [0usize; 5];
    for _ in 0..500 {
        let d = router.decide(&request(&none, "/elsewhere")).unwrap();
        assert_eq!(d.key, None);
        assert_eq!(d.key_source, KeySourceKind::Random);
        seen[d.backend] += 1;
    }
    assert_eq!(seen[2], 0, "a down backend was picked");
    assert!(
        seen.iter().enumerate().all(|(i, &n)| i == 2 || n > 0),
        "{seen:?}"
    );
}

#[test]
fn missing_key_with_client_ip_keys_on_the_client_address() {
    let router = sticky_router(OnMissing::ClientIp, Balance::Ketama);
    let none = HeaderMap::new();
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let d = router
        .decide(&RequestView {
            client_ip: Some(ip),
            ..request(&none, "/elsewhere")
        })
        .unwrap();
    assert_eq!(d.key.as_deref(), Some("192.0.2.7"));
    assert_eq!(d.key_source, KeySourceKind::ClientIp);
    assert_eq!(Some(d.backend), router.owner(0, "192.0.2.7"));
    // Without a client address it behaves as random.
    let d = router.decide(&request(&none, "/elsewhere")).unwrap();
    assert_eq!((d.key, d.key_source), (None, KeySourceKind::Random));
}

#[test]
fn non_sticky_round_robin_cycles_over_up_backends() {
    let router = Router::new(&config(
        vec![upstream("docs", backends(3), Balance::RoundRobin)],
        vec![route("all", prefix("/"), None, "docs")],
    ));
    let none = HeaderMap::new();
    let picks: Vec<usize> = (0..6)
        .map(|_| router.decide(&request(&none, "/")).unwrap())
        .inspect(|d| {
            assert_eq!(
                (d.key.as_deref(), d.key_source),
                (None, KeySourceKind::None)
            )
        })
        .map(|d| d.backend)
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    mark_down(&router, 1);
    let picks: Vec<usize> = (0..4)
        .map(|_| router.decide(&request(&none, "/")).unwrap().backend)
        .collect();
    assert!(!picks.contains(&1), "{picks:?}");
}

#[test]
fn non_sticky_least_connections_picks_the_least_loaded_up_backend() {
    let router = Router::new(&config(
        vec![upstream("docs", backends(3), Balance::LeastConnections)],
        vec![route("all", prefix("/"), None, "docs")],
    ));
    let backends = &router.upstreams()[0].backends;
    backends[0].active.store(5, Ordering::Relaxed);
    backends[1].active.store(1, Ordering::Relaxed);
    backends[2].active.store(3, Ordering::Relaxed);
    let none = HeaderMap::new();
    assert_eq!(router.decide(&request(&none, "/")).unwrap().backend, 1);
    mark_down(&router, 1);
    assert_eq!(router.decide(&request(&none, "/")).unwrap().backend, 2);
}

#[test]
fn a_down_owner_is_skipped_and_all_down_is_a_503() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let headers = header("x-doc-id", "doc-1");
    let owner = router.decide(&request(&headers, "/")).unwrap().backend;
    mark_down(&router, owner);
    let successor = router.decide(&request(&headers, "/")).unwrap().backend;
    assert_ne!(successor, owner);
    for i in 0..5 {
        mark_down(&router, i);
    }
    let d = router.decide(&request(&headers, "/"));
    assert_eq!(
        d,
        Err(Reject::NoHealthyBackend {
            route: 0,
            upstream: 0
        })
    );
    assert_eq!(d.unwrap_err().status(), 503);
    assert_eq!(router.owner(0, "doc-1"), None);
}

#[test]
fn retries_walk_distinct_owners_clockwise_until_none_is_left() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let headers = header("x-doc-id", "doc-9");
    let decision = router.decide(&request(&headers, "/")).unwrap();
    let mut tried = vec![decision.backend];
    while let Some(next) = router.next_backend(&decision, &tried) {
        assert!(!tried.contains(&next), "{next} retried twice");
        // The retry target is the owner once every tried backend is down.
        let probe = sticky_router(OnMissing::Reject, Balance::Ketama);
        for &t in &tried {
            mark_down(&probe, t);
        }
        assert_eq!(probe.owner(0, "doc-9"), Some(next));
        tried.push(next);
    }
    assert_eq!(tried.len(), 5);
}

#[test]
fn retries_skip_down_backends() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let headers = header("x-doc-id", "doc-9");
    let decision = router.decide(&request(&headers, "/")).unwrap();
    let first_retry = router.next_backend(&decision, &[]).unwrap();
    assert_ne!(first_retry, decision.backend);
    mark_down(&router, first_retry);
    let retry = router.next_backend(&decision, &[]).unwrap();
    assert!(retry != first_retry && retry != decision.backend);
}

#[test]
fn keyless_retries_use_the_balance() {
    let router = Router::new(&config(
        vec![upstream("docs", backends(2), Balance::RoundRobin)],
        vec![route("all", prefix("/"), None, "docs")],
    ));
    let none = HeaderMap::new();
    let d = router.decide(&request(&none, "/")).unwrap();
    assert_eq!(router.next_backend(&d, &[]), Some(1 - d.backend));
    assert_eq!(router.next_backend(&d, &[1 - d.backend]), None);
}

#[test]
fn reload_keeps_the_state_of_backends_that_remain() {
    let old = Router::new(&ring_config(backends(3)));
    let kept = &old.upstreams()[0].backends;
    kept[1].up.store(false, Ordering::Relaxed);
    kept[1].active.store(7, Ordering::Relaxed);
    kept[2].streams.store(5, Ordering::Relaxed);

    let mut next = backends(4);
    next[2].weight = 3;
    next.remove(0);
    let new = Router::with_previous(&ring_config(next), &old);
    let states = &new.upstreams()[0].backends;
    assert_eq!(states.len(), 3);
    // Same address and weight: the very same state.
    assert!(Arc::ptr_eq(&states[0], &kept[1]));
    assert_eq!(states[0].active.load(Ordering::Relaxed), 7);
    // Weight changed: new weight, a fresh state that keeps health.
    assert!(!Arc::ptr_eq(&states[1], &kept[2]));
    assert_eq!(states[1].weight, 3);
    assert!(states[1].up.load(Ordering::Relaxed));
    // ...and the same open-stream count, which streams opened before go on decrementing.
    assert_eq!(states[1].streams.load(Ordering::Relaxed), 5);
    kept[2].streams.fetch_sub(1, Ordering::Relaxed);
    assert_eq!(states[1].streams.load(Ordering::Relaxed), 4);
    // New backend: fresh and up.
    assert!(states[2].up.load(Ordering::Relaxed));
    // The down backend is still down after the reload: it owns no key.
    for i in 0..200 {
        assert_ne!(new.owner(0, &format!("doc-{i}")), Some(0));
    }
}

#[test]
fn reload_does_not_share_state_across_upstreams() {
    let old = Router::new(&config(
        vec![upstream("a", backends(2), Balance::Ketama)],
        vec![route("all", prefix("/"), None, "a")],
    ));
    let new = Router::with_previous(
        &config(
            vec![upstream("b", backends(2), Balance::Ketama)],
            vec![route("all", prefix("/"), None, "b")],
        ),
        &old,
    );
    assert!(!Arc::ptr_eq(
        &old.upstreams()[0].backends[0],
        &new.upstreams()[0].backends[0]
    ));
}

#[test]
fn a_draining_or_ejected_backend_owns_no_keys_and_its_keys_go_where_a_down_ones_would() {
    let keys: Vec<String> = (0..500).map(|i| format!("doc-{i}")).collect();
    let reference = sticky_router(OnMissing::Reject, Balance::Ketama);
    mark_down(&reference, 2);
    for flag in ["draining", "ejected"] {
        let router = sticky_router(OnMissing::Reject, Balance::Ketama);
        let before: Vec<Option<usize>> = keys.iter().map(|k| router.owner(0, k)).collect();
        let state = &router.upstreams()[0].backends[2];
        match flag {
            "draining" => state.draining.store(true, Ordering::Relaxed),
            _ => state.ejected.store(true, Ordering::Relaxed),
        }
        assert!(!state.is_available());
        for (key, old) in keys.iter().zip(&before) {
            let now = router.owner(0, key);
            assert_ne!(now, Some(2), "{flag}: {key} still owned by backend 2");
            assert_eq!(now, reference.owner(0, key), "{flag}: {key}");
            if *old != Some(2) {
                assert_eq!(now, *old, "{flag}: {key} of another backend moved");
            }
        }
        state.draining.store(false, Ordering::Relaxed);
        state.ejected.store(false, Ordering::Relaxed);
        let after: Vec<Option<usize>> = keys.iter().map(|k| router.owner(0, k)).collect();
        assert_eq!(after, before, "{flag}: undoing restores every owner");
    }
}

#[test]
fn a_pinned_key_goes_to_its_backend_while_it_is_available_and_no_other_key_moves() {
    let router = sticky_router(OnMissing::Reject, Balance::Ketama);
    let keys: Vec<String> = (0..300).map(|i| format!("doc-{i}")).collect();
    let before: Vec<Option<usize>> = keys.iter().map(|k| router.owner(0, k)).collect();
    let ring_owner = before[7].expect("an owner");
    let pinned = (ring_owner + 1) % 5;
    let address = router.upstreams()[0].backends[pinned].address;
    assert!(router.upstreams()[0].pins.set(&keys[7], Some(address)));

    let headers = header("x-doc-id", &keys[7]);
    let d = router.decide(&request(&headers, "/docs/x")).unwrap();
    assert_eq!(
        (d.backend, d.chosen, d.address),
        (pinned, Chosen::Pin, address)
    );
    for (i, key) in keys.iter().enumerate() {
        let expected = if i == 7 { Some(pinned) } else { before[i] };
        assert_eq!(router.owner(0, key), expected, "{key}");
    }
    // A retry after the pinned backend failed walks the ring as for any key.
    let retry = router.next_backend(&d, &[]).expect("another backend");
    assert_ne!(retry, pinned);

    // Unavailable: the ring's owner (not pinned); back: the pin again.
    mark_down(&router, pinned);
    let d = router.decide(&request(&headers, "/docs/x")).unwrap();
    assert_eq!((d.backend, d.chosen), (ring_owner, Chosen::Ring));
    router.upstreams()[0].backends[pinned]
        .up
        .store(true, Ordering::Relaxed);
    assert_eq!(router.owner(0, &keys[7]), Some(pinned));

    // A reload keeps the pin; a pin to an address that left the upstream is not in force.
    let reloaded =
        Router::with_previous(&sticky_config(OnMissing::Reject, Balance::Ketama), &router);
    assert_eq!(reloaded.owner(0, &keys[7]), Some(pinned));
    let outsider = "10.9.9.9:80".parse().unwrap();
    reloaded.upstreams()[0].pins.set(&keys[7], Some(outsider));
    assert_eq!(reloaded.owner(0, &keys[7]), before[7]);
    assert!(reloaded.upstreams()[0].pins.set(&keys[7], None));
    assert_eq!(reloaded.owner(0, &keys[7]), before[7]);
}
