//! Errors about one field: unknown names, wrong types, missing or out-of-range values.

mod common;
use common::{base_with, errors, only_error, BASE};

#[test]
fn a_misspelled_route_field_suggests_the_right_one() {
    let text = BASE.replace("    upstream: docs", "    upstrem: docs");
    assert_eq!(
        errors(&text),
        [
            "t.yaml:8:5: routes[0].upstream: missing required field `upstream`",
            "t.yaml:9:5: routes[0].upstrem: unknown field `upstrem`, did you mean `upstream`?",
        ]
    );
}

#[test]
fn a_misspelled_match_field_suggests_the_right_one() {
    assert_eq!(
        only_error(&base_with("    match:\n      path_prefx: /docs/\n")),
        "t.yaml:11:7: routes[0].match.path_prefx: unknown field `path_prefx`, did you mean `path_prefix`?"
    );
}

#[test]
fn a_misspelled_key_source_suggests_the_right_one() {
    let text = base_with("    sticky:\n      keys:\n        - hedaer: X-Doc\n");
    assert_eq!(
        only_error(&text),
        "t.yaml:12:11: routes[0].sticky.keys[0].hedaer: unknown field `hedaer`, did you mean `header`?"
    );
}

#[test]
fn an_unknown_field_with_no_close_match_lists_the_known_ones() {
    assert_eq!(
        only_error(&format!("{BASE}colour: blue\n")),
        "t.yaml:10:1: colour: unknown field `colour`, expected one of `server`, `listeners`, `admin`, `upstreams`, `routes`"
    );
}

#[test]
fn a_wrong_type_names_what_was_found() {
    assert_eq!(
        only_error(&base_with("    retries: two\n")),
        "t.yaml:10:14: routes[0].retries: expected an integer, found the string `two`"
    );
    assert_eq!(
        only_error(&BASE.replace(
            "    backends:\n      - address: 127.0.0.1:9101",
            "    backends: 127.0.0.1:9101"
        )),
        "t.yaml:5:15: upstreams.docs.backends: expected a list, found the string `127.0.0.1:9101`"
    );
    assert_eq!(
        only_error(&base_with("    long_poll: yes\n")),
        "t.yaml:10:16: routes[0].long_poll: expected true or false, found the string `yes`"
    );
}

#[test]
fn a_missing_required_field_points_at_its_mapping() {
    let text = BASE
        .replace("  - name: docs\n", "  - upstream: docs\n")
        .replace("    upstream: docs\n", "");
    assert_eq!(
        only_error(&text),
        "t.yaml:8:5: routes[0].name: missing required field `name`"
    );
}

#[test]
fn a_zero_weight_is_refused() {
    let text = BASE.replace("9101\n", "9101\n        weight: 0\n");
    assert_eq!(
        only_error(&text),
        "t.yaml:7:17: upstreams.docs.backends[0].weight: must be >= 1, found 0"
    );
}

#[test]
fn retries_above_sixteen_are_refused() {
    assert_eq!(
        only_error(&base_with("    retries: 17\n")),
        "t.yaml:10:14: routes[0].retries: must be <= 16, found 17"
    );
}

#[test]
fn zero_threads_are_refused() {
    assert_eq!(
        only_error(&format!("server: {{ threads: 0 }}\n{BASE}")),
        "t.yaml:1:20: server.threads: must be >= 1, found 0"
    );
}

#[test]
fn empty_lists_and_maps_are_refused() {
    let no_backends = BASE.replace(
        "    backends:\n      - address: 127.0.0.1:9101",
        "    backends: []",
    );
    assert_eq!(
        only_error(&no_backends),
        "t.yaml:5:15: upstreams.docs.backends: at least one backend is required"
    );
    let no_listeners = BASE.replace("listeners:\n  - address: 127.0.0.1:8080", "listeners: []");
    assert_eq!(
        only_error(&no_listeners),
        "t.yaml:1:12: listeners: at least one listener is required"
    );
    let no_routes = "listeners: [{ address: 127.0.0.1:8080 }]\nupstreams: { a: { backends: [{ address: 127.0.0.1:1 }] } }\nroutes:\n";
    assert_eq!(
        only_error(no_routes),
        "t.yaml:3:1: routes: at least one route is required"
    );
    let no_upstreams = "listeners: [{ address: 127.0.0.1:8080 }]\nupstreams: {}\nroutes: [{ name: a, upstream: a }]\n";
    assert_eq!(
        errors(no_upstreams),
        [
            "t.yaml:2:12: upstreams: at least one upstream is required",
            "t.yaml:3:31: routes[0].upstream: unknown upstream `a`; defined: none",
        ]
    );
}

#[test]
fn addresses_must_be_ip_and_port() {
    let with = |address: &str| only_error(&BASE.replace("127.0.0.1:9101", address));
    assert_eq!(
        with("localhost:9101"),
        "t.yaml:6:18: upstreams.docs.backends[0].address: expected ip:port; hostnames are not resolved, found `localhost:9101`"
    );
    assert_eq!(
        with("10.0.0.1"),
        "t.yaml:6:18: upstreams.docs.backends[0].address: expected ip:port, found `10.0.0.1` (missing port)"
    );
    assert_eq!(
        with("10.0.0.1:99999"),
        "t.yaml:6:18: upstreams.docs.backends[0].address: expected ip:port such as 127.0.0.1:8080 or [::1]:8080, found `10.0.0.1:99999`"
    );
    assert!(
        tether_config::parse(&BASE.replace("127.0.0.1:9101", "'[::1]:9101'"), "t.yaml").is_ok()
    );
}

#[test]
fn durations_need_a_unit() {
    let with = |timeout: &str| {
        only_error(&base_with(&format!(
            "    timeouts: {{ read: {timeout} }}\n"
        )))
    };
    assert_eq!(
        with("5"),
        "t.yaml:10:23: routes[0].timeouts.read: duration needs a unit, e.g. 5s"
    );
    assert!(with("5 parsecs")
        .starts_with("t.yaml:10:23: routes[0].timeouts.read: invalid duration `5 parsecs`: "));
    assert_eq!(
        with("0s"),
        "t.yaml:10:23: routes[0].timeouts.read: must be longer than 0s"
    );
}

#[test]
fn a_path_key_needs_exactly_one_whole_key_segment() {
    let with = |pattern: &str| {
        only_error(&base_with(&format!(
            "    sticky: {{ keys: [ {{ path: \"{pattern}\" }} ] }}\n"
        )))
    };
    let at = "t.yaml:10:31: routes[0].sticky.keys[0].path: ";
    assert_eq!(
        with("/docs/"),
        format!("{at}path pattern must contain exactly one `{{key}}` segment, e.g. /docs/{{key}}")
    );
    assert_eq!(
        with("/docs/{key}/{key}"),
        format!("{at}path pattern must contain exactly one `{{key}}` segment, e.g. /docs/{{key}}")
    );
    assert_eq!(
        with("/docs/x{key}"),
        format!("{at}`{{key}}` must be a whole path segment, e.g. /docs/{{key}}")
    );
    assert_eq!(
        with("docs/{key}"),
        format!("{at}must start with `/`, found `docs/{{key}}`")
    );
}

#[test]
fn a_key_source_has_exactly_one_kind() {
    let text = base_with("    sticky:\n      keys:\n        - { header: X-Doc, cookie: doc }\n");
    assert_eq!(
        only_error(&text),
        "t.yaml:12:28: routes[0].sticky.keys[0].cookie: a key source has exactly one of `header`, `cookie`, `query` or `path`; found `header` and `cookie`"
    );
    assert_eq!(
        only_error(&base_with("    sticky:\n      keys: []\n")),
        "t.yaml:11:13: routes[0].sticky.keys: at least one key source is required"
    );
}

#[test]
fn an_unknown_choice_suggests_the_right_one() {
    let text =
        base_with("    sticky:\n      keys: [ { cookie: doc } ]\n      on_missing: clientip\n");
    assert_eq!(
        only_error(&text),
        "t.yaml:12:19: routes[0].sticky.on_missing: unknown value `clientip`, did you mean `client_ip`?"
    );
    let text = BASE.replace(
        "      - address: 127.0.0.1:9101\n",
        "      - address: 127.0.0.1:9101\n    balance: fastest\n",
    );
    assert_eq!(
        only_error(&text),
        "t.yaml:7:14: upstreams.docs.balance: unknown value `fastest`, expected one of `ketama`, `round_robin`, `least_connections`"
    );
}

#[test]
fn path_and_path_prefix_together_are_refused() {
    assert_eq!(
        only_error(&base_with("    match: { path_prefix: /a/, path: /a/b }\n")),
        "t.yaml:10:32: routes[0].match.path: use either `path_prefix` or `path`, not both"
    );
}

#[test]
fn a_health_check_needs_exactly_one_probe() {
    let with = |check: &str| {
        only_error(&BASE.replace("9101\n", &format!("9101\n    health_check: {check}\n")))
    };
    assert_eq!(
        with("{ http: {}, tcp: {} }"),
        "t.yaml:7:31: upstreams.docs.health_check.tcp: use either `http` or `tcp`, not both"
    );
    assert_eq!(
        with("{ interval: 5s }"),
        "t.yaml:7:19: upstreams.docs.health_check: needs a probe: `http: { path: /healthz }` or `tcp: {}`"
    );
    assert_eq!(
        with("{ http: { expect_status: 700 } }"),
        "t.yaml:7:44: upstreams.docs.health_check.http.expect_status: must be <= 599, found 700"
    );
}

#[test]
fn invalid_names_tokens_and_hosts_are_refused() {
    assert_eq!(
        only_error(&BASE.replace("- name: docs", "- name: my docs")),
        "t.yaml:8:11: routes[0].name: invalid name `my docs`: use letters, digits, `-`, `_` and `.`"
    );
    assert_eq!(
        only_error(&base_with("    match: { methods: [GET, \"PO ST\"] }\n")),
        "t.yaml:10:29: routes[0].match.methods[1]: invalid method `PO ST`"
    );
    assert_eq!(
        only_error(&base_with("    match: { host: \"docs.example.com:8080\" }\n")),
        "t.yaml:10:20: routes[0].match.host: host must not include a port, found `docs.example.com:8080`"
    );
    assert_eq!(
        only_error(&base_with("    match: { headers: { \"X Env\": prod } }\n")),
        "t.yaml:10:25: routes[0].match.headers.X Env: invalid header name `X Env`"
    );
}

#[test]
fn a_tls_listener_needs_both_files() {
    let tls = BASE.replace("8080\n", "8080\n    tls: { cert: c.pem }\n");
    assert_eq!(
        only_error(&tls),
        "t.yaml:3:10: listeners[0].tls.key: missing required field `key`"
    );
}

#[test]
fn discovery_is_checked_field_by_field() {
    let both = BASE.replace(
        "9101\n",
        "9101\n    discovery: { dns: { name: a.test, port: 80 } }\n",
    );
    assert_eq!(
        only_error(&both),
        "t.yaml:5:5: upstreams.docs.backends: `backends` and `discovery` exclude each other: with discovery the backends come from the source"
    );
    let replace = |discovery: &str| {
        BASE.replace(
            "    backends:\n      - address: 127.0.0.1:9101\n",
            &format!("    discovery: {discovery}\n"),
        )
    };
    assert_eq!(
        only_error(&replace("{}")),
        "t.yaml:5:16: upstreams.docs.discovery: needs a source: `etcd: { endpoints: [...], prefix: ... }` or `dns: { name: ..., port: ... }`"
    );
    assert_eq!(
        errors(&replace("{ etcd: { endpoints: [], prefix: \"\" } }")),
        [
            "t.yaml:5:37: upstreams.docs.discovery.etcd.endpoints: at least one endpoint is required",
            "t.yaml:5:49: upstreams.docs.discovery.etcd.prefix: must not be empty",
        ]
    );
    assert_eq!(
        only_error(&replace("{ etcd: { endpoints: [\"https://e:2379\"], prefix: /p/ } }")),
        "t.yaml:5:38: upstreams.docs.discovery.etcd.endpoints[0]: TLS to etcd is not supported yet; use http://"
    );
    assert_eq!(
        only_error(&replace("{ etcd: { endpoints: [e], prefix: /p/ } }")),
        "t.yaml:5:38: upstreams.docs.discovery.etcd.endpoints[0]: expected host:port or http://host:port such as 127.0.0.1:2379, found `e`"
    );
    assert_eq!(
        errors(&replace("{ dns: { name: \"a b\", port: 0, intervl: 1s } }")),
        [
            "t.yaml:5:31: upstreams.docs.discovery.dns.name: expected a DNS name such as docs.default.svc.cluster.local, found `a b`",
            "t.yaml:5:44: upstreams.docs.discovery.dns.port: must be >= 1, found 0",
            "t.yaml:5:47: upstreams.docs.discovery.dns.intervl: unknown field `intervl`, did you mean `interval`?",
        ]
    );
    assert_eq!(
        only_error(&replace(
            "{ dns: { name: a.test, port: 80 }, etcd: { endpoints: [e:1], prefix: /p/ } }"
        )),
        "t.yaml:5:51: upstreams.docs.discovery.etcd: use either `etcd` or `dns`, not both"
    );
}

#[test]
fn rebalance_and_passive_settings_are_checked() {
    let text = BASE.replace(
        "9101\n",
        "9101\n    passive: { failures: 0 }\n    rebalance: { websocket_close_code: 1006, max_per_secnd: 5 }\n",
    );
    let found = errors(&text);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found[0].starts_with("t.yaml:7:26: upstreams.docs.passive.failures:"),
        "{found:?}"
    );
    assert!(
        found[1].starts_with(
            "t.yaml:8:40: upstreams.docs.rebalance.websocket_close_code: 1004, 1005, 1006"
        ),
        "{found:?}"
    );
    assert!(
        found[2].starts_with("t.yaml:8:46: upstreams.docs.rebalance.max_per_secnd:")
            && found[2].contains("max_per_second"),
        "{found:?}"
    );
}

#[test]
fn a_backend_reports_a_bad_weight_and_a_missing_address_together() {
    let text = BASE.replace(
        "      - address: 127.0.0.1:9101",
        "      - { weight: many }",
    );
    assert_eq!(
        errors(&text),
        [
            "t.yaml:6:9: upstreams.docs.backends[0].address: missing required field `address`",
            "t.yaml:6:19: upstreams.docs.backends[0].weight: expected an integer, found the string `many`",
        ]
    );
}
