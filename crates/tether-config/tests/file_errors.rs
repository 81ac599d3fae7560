//! Errors across fields and about the file as a whole.

mod common;
use common::{base_with, errors, only_error, BASE};

#[test]
fn a_route_naming_an_unknown_upstream_is_refused_with_a_suggestion() {
    assert_eq!(
        only_error(&BASE.replace("    upstream: docs", "    upstream: dcos")),
        "t.yaml:9:15: routes[0].upstream: unknown upstream `dcos`, did you mean `docs`?"
    );
    assert_eq!(
        only_error(&BASE.replace("    upstream: docs", "    upstream: chat")),
        "t.yaml:9:15: routes[0].upstream: unknown upstream `chat`; defined: `docs`"
    );
}

#[test]
fn duplicate_route_names_are_refused() {
    assert_eq!(
        only_error(&base_with("  - name: docs\n    upstream: docs\n")),
        "t.yaml:10:11: routes[1].name: duplicate route name `docs` (also routes[0])"
    );
}

#[test]
fn duplicate_backend_addresses_are_refused() {
    let text = BASE.replace(
        "9101\n",
        "9101\n      - address: 127.0.0.1:9102\n      - { address: 127.0.0.1:9101, weight: 2 }\n",
    );
    assert_eq!(
        only_error(&text),
        "t.yaml:8:20: upstreams.docs.backends[2].address: duplicate backend address 127.0.0.1:9101 (also backends[0])"
    );
}

#[test]
fn clashing_listener_addresses_are_refused() {
    let twice = BASE.replace("8080\n", "8080\n  - address: 127.0.0.1:8080\n");
    assert_eq!(
        only_error(&twice),
        "t.yaml:3:14: listeners[1].address: duplicate listener address 127.0.0.1:8080 (also listeners[0])"
    );
    let wildcard = BASE.replace("8080\n", "8080\n  - address: 0.0.0.0:8080\n");
    assert_eq!(
        only_error(&wildcard),
        "t.yaml:3:14: listeners[1].address: listener address 0.0.0.0:8080 clashes with 127.0.0.1:8080 (listeners[0])"
    );
}

#[test]
fn a_listener_on_the_admin_address_is_refused() {
    assert_eq!(
        only_error(&BASE.replace("127.0.0.1:8080", "127.0.0.1:9901")),
        "t.yaml:2:14: listeners[0].address: listener address 127.0.0.1:9901 clashes with the default admin address 127.0.0.1:9901"
    );
    assert_eq!(
        only_error(&format!("admin: {{ address: 127.0.0.1:8080 }}\n{BASE}")),
        "t.yaml:1:19: admin.address: admin address 127.0.0.1:8080 clashes with 127.0.0.1:8080 (listeners[0])"
    );
}

#[test]
fn a_non_loopback_admin_address_needs_a_token_file() {
    assert_eq!(
        only_error(&format!("admin: {{ address: 0.0.0.0:9901 }}\n{BASE}")),
        "t.yaml:1:19: admin.address: admin address 0.0.0.0:9901 is not loopback, so `admin.token_file` is required (every admin request then needs `Authorization: Bearer <token>`)"
    );
    let with_token = format!(
        "admin: {{ address: 0.0.0.0:9901, token_file: admin.token, public: [/metrics, /healthz] }}\n{BASE}"
    );
    let config = tether_config::parse(&with_token, "t.yaml").expect("valid with a token");
    assert_eq!(
        config.admin.token_file.as_deref(),
        Some(std::path::Path::new("admin.token"))
    );
    assert_eq!(config.admin.public, ["/metrics", "/healthz"]);
    assert_eq!(
        only_error(&format!("admin: {{ public: [metrics] }}\n{BASE}")),
        "t.yaml:1:19: admin.public[0]: must start with `/`, found `metrics`"
    );
}

#[test]
fn a_duplicate_key_is_refused_at_its_second_occurrence() {
    let text = BASE.replace(
        "    upstream: docs",
        "    upstream: docs\n    upstream: docs",
    );
    assert_eq!(
        only_error(&text),
        "t.yaml:10:5: routes[0].upstream: duplicate key `upstream` (first defined at line 9)"
    );
}

#[test]
fn a_yaml_syntax_error_has_a_position_and_path() {
    let error = only_error(&BASE.replace("  - name: docs", "  - name: [docs"));
    assert!(error.starts_with("t.yaml:9:"), "{error}");
    assert!(
        error.contains(": routes[0].name[0]: YAML syntax error: "),
        "{error}"
    );
    let tabs = only_error("listeners:\n\t- address: 127.0.0.1:8080\n");
    assert!(
        tabs.starts_with("t.yaml:2:2: listeners: YAML syntax error: tabs disallowed"),
        "{tabs}"
    );
}

#[test]
fn an_empty_file_is_refused() {
    let expected = "t.yaml:1:1: (root): the file is empty; at least `listeners`, `upstreams` and `routes` are required";
    assert_eq!(only_error(""), expected);
    assert_eq!(only_error("# only a comment\n"), expected);
}

#[test]
fn a_top_level_that_is_not_a_mapping_is_refused() {
    assert_eq!(
        only_error("- a\n- b\n"),
        "t.yaml:1:1: (root): expected a mapping, found a list"
    );
}

#[test]
fn missing_top_level_sections_are_all_reported() {
    assert_eq!(
        errors("server: {}\n"),
        [
            "t.yaml:1:1: listeners: missing required field `listeners`",
            "t.yaml:1:1: upstreams: missing required field `upstreams`",
            "t.yaml:1:1: routes: missing required field `routes`",
        ]
    );
}

#[test]
fn every_error_in_a_file_is_reported_in_file_order() {
    let text = "\
routes:
  - name: a
    upstream: nowhere
    retries: -1
listeners:
  - address: localhost:80
upstreams:
  docs:
    backends:
      - { address: 127.0.0.1:1, weight: 0 }
    conect_timeout: 1s
";
    assert_eq!(
        errors(text),
        [
            "t.yaml:3:15: routes[0].upstream: unknown upstream `nowhere`; defined: `docs`",
            "t.yaml:4:14: routes[0].retries: must be >= 0, found -1",
            "t.yaml:6:14: listeners[0].address: expected ip:port; hostnames are not resolved, found `localhost:80`",
            "t.yaml:10:41: upstreams.docs.backends[0].weight: must be >= 1, found 0",
            "t.yaml:11:5: upstreams.docs.conect_timeout: unknown field `conect_timeout`, did you mean `connect_timeout`?",
        ]
    );
}

#[test]
fn an_unreadable_file_is_an_error_naming_it() {
    let path = std::path::Path::new("/nonexistent/tether.yaml");
    let errors = tether_config::load(path).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let shown = errors.to_string();
    assert!(
        shown.starts_with("/nonexistent/tether.yaml:0:0: (root): cannot read the config file: "),
        "{shown}"
    );
}

#[test]
fn errors_print_one_per_line() {
    let errors = tether_config::parse("server: {}\n", "t.yaml").unwrap_err();
    assert_eq!(errors.to_string().lines().count(), 3);
    let as_error: &dyn std::error::Error = &errors;
    assert!(as_error
        .to_string()
        .contains("missing required field `routes`"));
}
