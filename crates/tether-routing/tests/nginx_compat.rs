//! Pins `Router::owner` to nginx's `hash $key consistent` without running nginx, using owners
//! nginx itself logged (see `tests/data/README.md`).

mod common;

use std::net::SocketAddr;

use common::ring_config;
use tether_config::Backend;
use tether_routing::Router;

fn router(addresses: &[&str], weight: u32) -> Router {
    let backends = addresses
        .iter()
        .map(|a| Backend {
            address: a.parse().unwrap(),
            weight,
        })
        .collect();
    Router::new(&ring_config(backends))
}

fn owner_address(router: &Router, key: &str) -> SocketAddr {
    let backend = router.owner(0, key).expect("an owner");
    router.upstreams()[0].backends[backend].address
}

#[test]
fn owners_match_every_key_logged_by_nginx() {
    let addresses: Vec<String> = (1..=9).map(|i| format!("10.0.0.{i}:443")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let router = router(&addresses, 100);
    let sample = include_str!("data/nginx-sample-upstream.csv");
    let mut checked = 0;
    for line in sample.lines().filter(|l| !l.is_empty()) {
        let (uri, expected) = line.split_once(',').expect("uri,upstream");
        assert_eq!(
            owner_address(&router, uri),
            expected.parse::<SocketAddr>().unwrap(),
            "key {uri}"
        );
        checked += 1;
    }
    assert_eq!(checked, 1001);
}

#[test]
fn owners_match_nginx_for_two_backends_on_one_host() {
    // Expectations from pingora-ketama's `matches_nginx_sample` test (nginx, weight 1).
    let router = router(&["127.0.0.1:7777", "127.0.0.1:7778"], 1);
    let expected = [
        ("/some/path", "127.0.0.1:7778"),
        ("/some/longer/path", "127.0.0.1:7777"),
        ("/sad/zaidoon", "127.0.0.1:7778"),
        ("/g", "127.0.0.1:7777"),
        (
            "/pingora/team/is/cool/and/this/is/a/long/uri",
            "127.0.0.1:7778",
        ),
        ("/i/am/not/confident/in/this/code", "127.0.0.1:7777"),
    ];
    for (key, address) in expected {
        assert_eq!(
            owner_address(&router, key),
            address.parse::<SocketAddr>().unwrap(),
            "key {key}"
        );
    }
}
