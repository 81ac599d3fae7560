//! Properties of path normalisation and of `decide` on arbitrary input.

mod common;

use common::{backends, config, doc_chain, prefix, route, upstream};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use tether_config::{Balance, KeySource, OnMissing};
use tether_routing::normalize::normalize_path;
use tether_routing::{RequestView, Router};

/// Paths built from pieces that stress the rules: dots, encoded dots and slashes, empties.
fn tricky_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("."),
        Just(".."),
        Just("%2e"),
        Just("%2E%2e"),
        Just(".%2e"),
        Just("%2f"),
        Just("%2F"),
        Just("%5c"),
        Just("%41"),
        Just("%zz"),
        Just("%"),
        Just(""),
        Just("docs"),
        Just("a"),
        Just("é"),
        Just("\\"),
    ];
    prop::collection::vec(prop::collection::vec(piece, 0..3), 0..8).prop_map(|segments| {
        format!(
            "/{}",
            segments
                .iter()
                .map(|s| s.concat())
                .collect::<Vec<_>>()
                .join("/")
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn normalising_twice_changes_nothing(path in tricky_path()) {
        if let Ok(once) = normalize_path(&path) {
            prop_assert_eq!(normalize_path(&once), Ok(once.clone()));
        }
    }

    #[test]
    fn normalised_paths_have_no_dot_or_empty_segments(path in tricky_path()) {
        if let Ok(normalized) = normalize_path(&path) {
            prop_assert!(normalized.starts_with('/'));
            let inner = normalized.trim_start_matches('/').trim_end_matches('/');
            if !inner.is_empty() {
                for segment in inner.split('/') {
                    prop_assert!(!matches!(segment, "" | "." | ".."), "{} -> {}", path, normalized);
                }
            }
            prop_assert!(!normalized.to_ascii_lowercase().contains("%2e"), "{} -> {}", path, normalized);
        }
    }

    #[test]
    fn decide_never_panics(path in ".{0,80}", query in proptest::option::of(".{0,40}"), value in "[ -~]{0,40}", host in proptest::option::of(".{0,30}")) {
        let mut chain = doc_chain(OnMissing::ClientIp);
        chain.keys.push(KeySource::Path("/docs/{key}".into()));
        let router = Router::new(&config(
            vec![upstream("docs", backends(4), Balance::Ketama)],
            vec![route("docs", prefix("/docs/"), Some(chain), "docs"), route("rest", prefix("/"), None, "docs")],
        ));
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-doc-id", v.clone());
            headers.insert("cookie", v);
        }
        let request = RequestView {
            method: "GET",
            host: host.as_deref(),
            path: &path,
            query: query.as_deref(),
            headers: (&headers).into(),
            client_ip: None,
        };
        if let Ok(decision) = router.decide(&request) {
            prop_assert!(decision.backend < 4);
            prop_assert!(decision.key.as_ref().is_none_or(|k| !k.is_empty() && k.len() <= 1024));
        }
    }
}
