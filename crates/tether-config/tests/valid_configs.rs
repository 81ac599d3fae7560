//! What valid files parse into: defaults, normalisation, the round trip, the shipped configs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tether_config::AccessLog;
use tether_config::*;

mod common;
use common::{base_with, BASE};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn parse_ok(text: &str) -> Config {
    match parse(text, "t.yaml") {
        Ok(config) => config,
        Err(errors) => panic!("{errors}"),
    }
}

/// An annotated config that sets most fields the way a user would write them (the first
/// example of the format; discovery, passive ejection and rebalancing are tested below).
const ANNOTATED_EXAMPLE: &str = "\
server:
  threads: 2                    # worker threads; default: number of CPUs
  grace_period: 30s             # SIGTERM / upgrade drain time
listeners:                      # required, at least one
  - address: 0.0.0.0:8080
  - address: 0.0.0.0:8443
    tls: { cert: cert.pem, key: key.pem }     # rustls; ALPN h2 + http/1.1
admin:
  address: 127.0.0.1:9901       # /metrics and the admin API; loopback by default
upstreams:                      # required
  docs:
    backends:                   # required, at least one
      - address: 10.0.0.11:8080
      - { address: 10.0.0.12:8080, weight: 2 }    # weight >= 1
    balance: ketama             # ketama (default) | round_robin | least_connections
    connect_timeout: 1s
    health_check:               # optional; active checks
      http: { path: /healthz, expect_status: 200 }    # or  tcp: {}
      interval: 2s
      timeout: 1s
      healthy_after: 2
      unhealthy_after: 3
routes:                         # required; first match wins, in file order
  - name: doc-live
    match:
      host: docs.example.com    # exact or *.example.com; optional
      path_prefix: /docs/       # or path: /exact ; optional
      methods: [GET, POST]      # optional
      headers: { X-Env: prod }  # exact value; optional
    sticky:                     # optional; no sticky = balance of the upstream
      keys:                     # first one present wins
        - header: X-Doc-Id
        - cookie: doc_id
        - query: doc
        - path: /docs/{key}     # the {key} segment of the normalised path
      on_missing: reject        # reject (400) | random | client_ip
    upstream: docs
    timeouts: { read: 60s, idle: 1h }   # idle applies to WebSocket, SSE and long-poll
    retries: 2                  # connect failures only, each to the next owner on the ring
  - name: everything-else
    match: { path_prefix: / }
    upstream: docs
";

#[test]
fn the_annotated_example_parses_into_the_documented_model() {
    let config = parse_ok(ANNOTATED_EXAMPLE);
    assert_eq!(
        config.server,
        Server {
            threads: Some(2),
            grace_period: Duration::from_secs(30),
            access_log: AccessLog::default(),
            limits: tether_config::Limits::default(),
            trusted_proxies: Vec::new(),
            state_file: None,
        }
    );
    assert_eq!(
        config.listeners,
        [
            Listener {
                address: addr("0.0.0.0:8080"),
                tls: None,
            },
            Listener {
                address: addr("0.0.0.0:8443"),
                tls: Some(tether_config::ListenerTls {
                    cert: "cert.pem".into(),
                    key: "key.pem".into(),
                }),
            }
        ]
    );
    let docs = &config.upstreams[0];
    assert_eq!(docs.name, "docs");
    assert_eq!(
        docs.backends,
        [
            Backend {
                address: addr("10.0.0.11:8080"),
                weight: 1
            },
            Backend {
                address: addr("10.0.0.12:8080"),
                weight: 2
            },
        ]
    );
    assert_eq!(
        docs.health_check.as_ref().map(|h| &h.kind),
        Some(&HealthCheckKind::Http {
            path: "/healthz".into(),
            expect_status: 200
        })
    );
    let live = &config.routes[0];
    assert_eq!(
        live.matcher,
        RouteMatch {
            host: Some("docs.example.com".into()),
            path: Some(PathMatch::Prefix("/docs/".into())),
            methods: vec!["GET".into(), "POST".into()],
            headers: vec![("x-env".into(), "prod".into())],
        }
    );
    assert_eq!(
        live.sticky,
        Some(Sticky {
            keys: vec![
                KeySource::Header("x-doc-id".into()),
                KeySource::Cookie("doc_id".into()),
                KeySource::Query("doc".into()),
                KeySource::Path("/docs/{key}".into()),
            ],
            on_missing: OnMissing::Reject,
        })
    );
    assert_eq!(
        config.routes[1].matcher.path,
        Some(PathMatch::Prefix("/".into()))
    );
    assert_eq!(
        config.summary(),
        "2 routes, 1 upstream, 2 backends, 2 listeners"
    );
}

#[test]
fn omitted_fields_take_their_defaults() {
    let config = parse_ok(&format!(
        "{BASE}    sticky: {{ keys: [ {{ query: doc }} ] }}\n"
    ));
    assert_eq!(
        config.server,
        Server {
            threads: None,
            grace_period: Duration::from_secs(30),
            access_log: AccessLog::default(),
            limits: tether_config::Limits::default(),
            trusted_proxies: Vec::new(),
            state_file: None,
        }
    );
    assert_eq!(config.admin.address, addr("127.0.0.1:9901"));
    let up = &config.upstreams[0];
    assert_eq!(up.backends[0].weight, 1);
    assert_eq!(up.balance, Balance::Ketama);
    assert_eq!(up.connect_timeout, Duration::from_secs(1));
    assert_eq!(up.health_check, None);
    let route = &config.routes[0];
    assert_eq!(route.matcher, RouteMatch::default());
    assert_eq!(
        route.sticky.as_ref().map(|s| s.on_missing),
        Some(OnMissing::Reject)
    );
    assert_eq!(
        route.timeouts,
        Timeouts {
            read: Duration::from_secs(60),
            idle: Duration::from_secs(3600)
        }
    );
    assert_eq!(route.retries, 2);
    assert!(!route.long_poll);
}

#[test]
fn a_health_check_fills_in_probe_defaults() {
    let text = BASE.replace("9101\n", "9101\n    health_check: { http: {} }\n");
    let check = parse_ok(&text).upstreams[0].health_check.clone();
    assert_eq!(
        check,
        Some(HealthCheck {
            kind: HealthCheckKind::Http {
                path: "/healthz".into(),
                expect_status: 200
            },
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
        })
    );
    let tcp = BASE.replace("9101\n", "9101\n    health_check:\n      tcp:\n");
    let tcp = parse_ok(&tcp).upstreams[0].health_check.clone();
    assert_eq!(tcp.map(|h| h.kind), Some(HealthCheckKind::Tcp));
}

#[test]
fn hosts_methods_and_header_names_are_normalised() {
    let text = format!("{BASE}    match: {{ host: \"*.Example.COM\", methods: [get, Post], headers: {{ X-Env: Prod }} }}\n");
    let m = parse_ok(&text).routes[0].matcher.clone();
    assert_eq!(m.host.as_deref(), Some("*.example.com"));
    assert_eq!(m.methods, ["GET", "POST"]);
    assert_eq!(m.headers, [("x-env".to_string(), "Prod".to_string())]);
}

#[test]
fn a_full_config_survives_the_round_trip_through_to_yaml() {
    let mut config = parse_ok(ANNOTATED_EXAMPLE);
    // Exercise every variant the renderer must handle, including ones the example lacks.
    config.server.grace_period = Duration::from_millis(1500);
    config.listeners.push(Listener {
        address: addr("[::1]:8081"),
        tls: None,
    });
    config.server.limits.max_requests_per_connection = Some(1000);
    config.server.limits.header_timeout = Duration::from_millis(2500);
    config.upstreams[0].balance = Balance::LeastConnections;
    config.routes[1].matcher.path = Some(PathMatch::Exact("/exact path?".into()));
    config.routes[1].matcher.host = Some("*.example.com".into());
    config.routes[1].sticky = Some(Sticky {
        keys: vec![KeySource::Query("404".into())],
        on_missing: OnMissing::ClientIp,
    });
    config.routes[1].long_poll = true;
    config.routes[1].retries = 0;
    config.routes[0]
        .matcher
        .headers
        .push(("x-quote".into(), "a \"b\" #c: d".into()));
    let yaml = to_yaml(&config);
    // The exact path with a space is not valid config, so only compare what parse accepts.
    config.routes[1].matcher.path = Some(PathMatch::Exact("/exact".into()));
    let yaml = yaml.replace("/exact path?", "/exact");
    assert_eq!(parse_ok(&yaml), config, "{yaml}");
}

#[test]
fn to_yaml_writes_every_default_and_parses_back() {
    let config = parse_ok(BASE);
    let yaml = to_yaml(&config);
    for default in [
        "grace_period: 30s",
        "address: 127.0.0.1:9901",
        "weight: 1",
        "balance: ketama",
        "connect_timeout: 1s",
        "read: 1m",
        "idle: 1h",
        "retries: 2",
        "long_poll: false",
        "match: {}",
    ] {
        assert!(yaml.contains(default), "missing `{default}` in:\n{yaml}");
    }
    assert_eq!(parse_ok(&yaml), config);
    assert_eq!(to_yaml(&parse_ok(&yaml)), yaml);
}

#[test]
fn every_shipped_config_parses() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf");
    let mut files = vec![conf.join("tether.yaml")];
    let examples = std::fs::read_dir(conf.join("examples")).unwrap();
    files.extend(
        examples
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml")),
    );
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let config = match load(&file) {
            Ok(config) => config,
            Err(errors) => panic!("{errors}"),
        };
        assert_eq!(parse_ok(&to_yaml(&config)), config, "{}", file.display());
    }
}

#[test]
fn each_example_uses_its_own_key_source() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf/examples");
    for kind in ["header", "cookie", "query", "path"] {
        let config = load(&conf.join(format!("{kind}.yaml"))).unwrap();
        let keys = &config.routes[0].sticky.as_ref().unwrap().keys;
        assert_eq!(keys.iter().map(KeySource::kind).collect::<Vec<_>>(), [kind]);
        assert_eq!(config.listeners[0].address, addr("127.0.0.1:8080"));
        let backends: Vec<_> = config.upstreams[0]
            .backends
            .iter()
            .map(|b| b.address)
            .collect();
        assert_eq!(
            backends,
            [
                addr("127.0.0.1:9101"),
                addr("127.0.0.1:9102"),
                addr("127.0.0.1:9103")
            ]
        );
    }
}

#[test]
fn the_summary_counts_in_singular_and_plural() {
    assert_eq!(
        parse_ok(BASE).summary(),
        "1 route, 1 upstream, 1 backend, 1 listener"
    );
}

#[test]
fn the_access_log_settings_parse_and_round_trip() {
    let text = BASE.replace(
        "listeners:",
        "server:\n  access_log: { format: logfmt, sample: 0.25, log_keys: true }\nlisteners:",
    );
    let config = parse_ok(&text);
    assert_eq!(
        config.server.access_log,
        AccessLog {
            format: tether_config::AccessLogFormat::Logfmt,
            sample: 0.25,
            log_keys: true
        }
    );
    let again = parse_ok(&tether_config::to_yaml(&config));
    assert_eq!(again, config);
}

#[test]
fn trusted_proxies_parse_as_networks_and_round_trip() {
    let text = BASE.replace(
        "listeners:",
        "server:\n  trusted_proxies: [10.0.0.0/8, \"::1\", 192.168.1.7]\nlisteners:",
    );
    let config = parse_ok(&text);
    let nets = &config.server.trusted_proxies;
    assert_eq!(nets.len(), 3);
    assert!(nets[0].contains("10.200.3.4".parse().unwrap()));
    assert!(!nets[0].contains("11.0.0.1".parse().unwrap()));
    assert!(nets[1].contains("::1".parse().unwrap()));
    assert!(
        nets[2].contains("::ffff:192.168.1.7".parse().unwrap()),
        "v4-mapped"
    );
    assert!(!nets[2].contains("192.168.1.8".parse().unwrap()));
    assert_eq!(parse_ok(&tether_config::to_yaml(&config)), config);
    let bad = BASE.replace(
        "listeners:",
        "server:\n  trusted_proxies: [10.0.0.0/33]\nlisteners:",
    );
    let errors = tether_config::parse(&bad, "t.yaml")
        .expect_err("bad network")
        .to_string();
    assert!(
        errors.contains("server.trusted_proxies[0]: expected an IP network"),
        "{errors}"
    );
}

#[test]
fn a_rate_limit_parses_and_round_trips() {
    let text = BASE.replace(
        "    upstream: docs",
        "    upstream: docs\n    rate_limit: { by: key, per_second: 50, burst: 10 }",
    );
    let config = parse_ok(&text);
    let limit = config.routes[0].rate_limit.expect("rate limit");
    assert_eq!(limit.by, tether_config::RateLimitBy::Key);
    assert_eq!((limit.per_second, limit.burst), (50, 10));
    assert_eq!(parse_ok(&tether_config::to_yaml(&config)), config);
}

/// `BASE` with the backend list replaced by `discovery` lines (indent 4).
fn with_discovery(discovery: &str) -> String {
    BASE.replace(
        "    backends:\n      - address: 127.0.0.1:9101\n",
        discovery,
    )
}

#[test]
fn etcd_discovery_parses_and_round_trips() {
    let text = with_discovery(
        "    discovery:\n      etcd: { endpoints: [127.0.0.1:2379, \"http://etcd-1.example:2379/\"], prefix: /tether/docs/ }\n",
    );
    let config = parse_ok(&text);
    let up = &config.upstreams[0];
    assert!(up.backends.is_empty());
    assert_eq!(
        up.discovery,
        Some(Discovery::Etcd(EtcdDiscovery {
            endpoints: vec!["127.0.0.1:2379".into(), "etcd-1.example:2379".into()],
            prefix: "/tether/docs/".into(),
        }))
    );
    assert_eq!(
        config.summary(),
        "1 route, 1 upstream, 0 backends, 1 listener (1 upstream by discovery)"
    );
    assert_eq!(parse_ok(&to_yaml(&config)), config);
}

#[test]
fn dns_discovery_parses_with_defaults_and_round_trips() {
    let text = with_discovery(
        "    discovery:\n      dns: { name: docs.default.svc.cluster.local, port: 8080 }\n",
    );
    let config = parse_ok(&text);
    let Some(Discovery::Dns(dns)) = &config.upstreams[0].discovery else {
        panic!(
            "dns discovery expected: {:?}",
            config.upstreams[0].discovery
        );
    };
    assert_eq!(dns.name, "docs.default.svc.cluster.local");
    assert_eq!(dns.port, 8080);
    assert_eq!(dns.interval, Duration::from_secs(5));
    assert_eq!(dns.resolver, None);
    assert_eq!(parse_ok(&to_yaml(&config)), config);

    let text = with_discovery(
        "    discovery:\n      dns: { name: app.test, port: 80, interval: 200ms, resolver: 127.0.0.1:5353 }\n",
    );
    let config = parse_ok(&text);
    let Some(Discovery::Dns(dns)) = &config.upstreams[0].discovery else {
        panic!("dns discovery expected");
    };
    assert_eq!(dns.interval, Duration::from_millis(200));
    assert_eq!(dns.resolver, Some(addr("127.0.0.1:5353")));
    assert_eq!(parse_ok(&to_yaml(&config)), config);
}

/// The config inside the ConfigMap of the Kubernetes example (`deploy/kubernetes/tether.yaml`).
#[test]
fn the_kubernetes_example_config_parses() {
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/tether.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    // The block scalar under `tether.yaml: |`, indented by four spaces, ends at the next `---`.
    let embedded: String = text
        .lines()
        .skip_while(|l| l.trim() != "tether.yaml: |")
        .skip(1)
        .take_while(|l| *l != "---")
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let config = parse_ok(&embedded);
    assert!(matches!(
        config.upstreams[0].discovery,
        Some(Discovery::Dns(_))
    ));
    assert_eq!(config.admin.public, ["/healthz", "/readyz", "/metrics"]);
    // The commented etcd alternative is valid too.
    let etcd = embedded
        .replace("  dns: { name", "  # dns: { name")
        .replace("  # etcd: {", "  etcd: {");
    assert!(matches!(
        parse_ok(&etcd).upstreams[0].discovery,
        Some(Discovery::Etcd(_))
    ));
}

#[test]
fn a_state_file_parses_round_trips_and_must_name_a_file() {
    let text = BASE.replace(
        "listeners:",
        "server:\n  state_file: /var/lib/tether/state.json\nlisteners:",
    );
    let config = parse_ok(&text);
    assert_eq!(
        config.server.state_file.as_deref(),
        Some(std::path::Path::new("/var/lib/tether/state.json"))
    );
    assert_eq!(parse_ok(&tether_config::to_yaml(&config)), config);
    let bad = BASE.replace("listeners:", "server:\n  state_file: \"\"\nlisteners:");
    let errors = tether_config::parse(&bad, "t.yaml")
        .expect_err("empty file name")
        .to_string();
    assert!(
        errors.contains("server.state_file: must name a file"),
        "{errors}"
    );
}

#[test]
fn failback_and_ramp_parse_round_trip_and_are_bounded() {
    let text = BASE.replace(
        "9101\n",
        "9101\n    rebalance: { failback_after: 30s, ramp: 1m }\n",
    );
    let config = parse_ok(&text);
    let rebalance = &config.upstreams[0].rebalance;
    assert_eq!(rebalance.failback_after, Duration::from_secs(30));
    assert_eq!(rebalance.ramp, Duration::from_secs(60));
    assert_eq!(parse_ok(&tether_config::to_yaml(&config)), config);
    let errors = tether_config::parse(&text.replace("ramp: 1m", "ramp: 2h"), "t.yaml")
        .expect_err("2h ramp")
        .to_string();
    assert!(
        errors.contains("rebalance.ramp: must be at most 1h"),
        "{errors}"
    );
}

#[test]
fn requests_per_second_per_key_is_a_rate_limit_by_key() {
    let with_limits = base_with("    limits: { requests_per_second_per_key: 50 }\n");
    let with_rate_limit = base_with("    rate_limit: { by: key, per_second: 50 }\n");
    let a = parse_ok(&with_limits);
    assert_eq!(a, parse_ok(&with_rate_limit));
    assert_eq!(parse_ok(&tether_config::to_yaml(&a)), a);
    let both = base_with(
        "    rate_limit: { by: client_ip, per_second: 5 }\n    limits: { requests_per_second_per_key: 50 }\n",
    );
    let errors = tether_config::parse(&both, "t.yaml")
        .expect_err("both")
        .to_string();
    assert!(
        errors.contains(
            "routes[0].limits.requests_per_second_per_key: the route has a rate_limit too"
        ),
        "{errors}"
    );
}

#[test]
fn bounded_load_parses_round_trips_and_needs_ketama() {
    let text = BASE.replace(
        "9101\n",
        "9101\n    bounded_load: { factor: 1.5, linger: 10s }\n",
    );
    let config = parse_ok(&text);
    let bounded = config.upstreams[0].bounded_load.expect("bounded_load");
    assert_eq!(
        (bounded.factor, bounded.linger),
        (1.5, Duration::from_secs(10))
    );
    assert_eq!(parse_ok(&tether_config::to_yaml(&config)), config);
    let defaults = parse_ok(&BASE.replace("9101\n", "9101\n    bounded_load: {}\n"));
    assert_eq!(
        defaults.upstreams[0].bounded_load,
        Some(tether_config::BoundedLoad::default())
    );
    for (bad, says) in [
        (
            "{ factor: 0.9 }",
            "bounded_load.factor: must be a number from 1.0 to 100.0",
        ),
        ("{ linger: 2h }", "bounded_load.linger: must be at most 1h"),
    ] {
        let text = BASE.replace("9101\n", &format!("9101\n    bounded_load: {bad}\n"));
        let errors = tether_config::parse(&text, "t.yaml")
            .expect_err(bad)
            .to_string();
        assert!(errors.contains(says), "{errors}");
    }
    let text = BASE.replace(
        "9101\n",
        "9101\n    balance: round_robin\n    bounded_load: {}\n",
    );
    let errors = tether_config::parse(&text, "t.yaml")
        .expect_err("round robin")
        .to_string();
    assert!(errors.contains("needs balance: ketama"), "{errors}");
}
