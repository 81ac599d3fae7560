//! Helpers shared by the config tests.
#![allow(dead_code)]

/// Every error of `text` (named `t.yaml`), as printed.
pub fn errors(text: &str) -> Vec<String> {
    match tether_config::parse(text, "t.yaml") {
        Ok(config) => panic!("expected errors, parsed: {config:?}"),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

/// The single error of `text`, as printed.
pub fn only_error(text: &str) -> String {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap_or_default()
}

/// A valid config whose last line is `    upstream: docs` inside route `docs`, so tests can
/// append route fields (indent 4) or replace lines. Line numbers:
/// 1 listeners / 2 address / 3 upstreams / 4 docs / 5 backends / 6 address / 7 routes /
/// 8 name / 9 upstream.
pub const BASE: &str = "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  docs:
    backends:
      - address: 127.0.0.1:9101
routes:
  - name: docs
    upstream: docs
";

/// `BASE` followed by `extra` lines.
pub fn base_with(extra: &str) -> String {
    format!("{BASE}{extra}")
}
