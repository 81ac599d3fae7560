//! Routing and sticky-key extraction never panic on any request, and a key they accept is
//! within the documented limits (at most 256 bytes, no control characters).
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tether_routing::{RequestView, Router};

const CONFIG: &str = r#"
listeners: [ { address: 127.0.0.1:8080 } ]
upstreams:
  docs:
    backends: [ { address: 10.0.0.1:80 }, { address: 10.0.0.2:80 }, { address: 10.0.0.3:80, weight: 2 } ]
routes:
  - name: docs
    match: { host: "*.example.com", path_prefix: /docs/ }
    sticky:
      keys: [ { header: X-Doc-Id }, { cookie: doc_id }, { query: doc }, { path: "/docs/{key}" } ]
      on_missing: reject
    upstream: docs
  - name: rest
    sticky: { keys: [ { query: k } ], on_missing: client_ip }
    upstream: docs
"#;

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| match tether_config::parse(CONFIG, "fuzz.yaml") {
        Ok(config) => Router::new(&config),
        Err(e) => panic!("{e}"),
    })
}

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xFF bytes: path, query, host, X-Doc-Id, Cookie.
    let mut fields = data.split(|b| *b == 0xFF);
    let mut next = || std::str::from_utf8(fields.next().unwrap_or_default()).unwrap_or("");
    let (path, query, host, doc_id, cookie) = (next(), next(), next(), next(), next());
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(doc_id) {
        headers.insert("x-doc-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(cookie) {
        headers.insert(http::header::COOKIE, v);
    }
    let view = RequestView {
        method: "GET",
        host: (!host.is_empty()).then_some(host),
        path,
        query: (!query.is_empty()).then_some(query),
        headers: (&headers).into(),
        client_ip: Some("192.0.2.1".parse().expect("literal")),
    };
    if let Ok(decision) = router().decide(&view) {
        if let Some(key) = &decision.key {
            assert!(
                key.len() <= 256 && !key.chars().any(char::is_control),
                "{key:?}"
            );
        }
        assert!(decision.backend < 3);
    }
});
