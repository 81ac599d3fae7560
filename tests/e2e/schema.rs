//! End-to-end, the config's JSON Schema: `tether schema` matches the committed
//! `conf/tether.schema.json`, every config shipped in the repository validates against it with
//! an independent validator (Python's `jsonschema`, in `.venv-tests/`, which
//! `scripts/setup-tests.sh` installs), and files the parser refuses for their shape are refused
//! by the schema too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::tether_binary;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {} {args:?}: {e}", program.display()),
    }
}

fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tests/schema/validate.py SCHEMA [--invalid] FILE...` in the tests' virtualenv.
fn validate(extra: &[&str]) -> Output {
    let python = repo().join(".venv-tests/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-tests.sh (scripts/test.sh does)",
        python.display()
    );
    let script = repo().join("tests/schema/validate.py");
    let schema = repo().join("conf/tether.schema.json");
    let mut args = vec![script.to_str().unwrap(), schema.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&python, &args)
}

#[test]
fn the_committed_schema_is_what_tether_schema_prints() {
    let out = run(tether_binary(), &["schema"]);
    assert!(out.status.success(), "tether schema: {}", both(&out));
    let committed = std::fs::read_to_string(repo().join("conf/tether.schema.json"))
        .expect("conf/tether.schema.json");
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "conf/tether.schema.json is stale; regenerate it with\n    \
         cargo run -- schema > conf/tether.schema.json"
    );
    let schema: serde_json::Value = serde_json::from_str(&committed).expect("JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
}

#[test]
fn the_reference_config_names_the_schema_for_editors() {
    let text = std::fs::read_to_string(repo().join("conf/tether.yaml")).unwrap();
    let first = text.lines().next().unwrap_or_default();
    let target = first
        .strip_prefix("# yaml-language-server: $schema=")
        .unwrap_or_else(|| panic!("conf/tether.yaml starts with {first:?}"));
    assert!(
        repo().join("conf").join(target).is_file(),
        "{target} is not a file next to conf/tether.yaml"
    );
}

/// Every `.yaml` under `conf/` and `deploy/`.
fn shipped_yaml() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("conf"), &mut files);
    walk(&repo().join("deploy"), &mut files);
    files.sort();
    files
}

#[test]
fn every_config_in_the_repository_validates_against_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<String> = shipped_yaml()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    // The demo's built-in config.
    let demo = run(tether_binary(), &["demo", "--print-config"]);
    assert!(demo.status.success(), "{}", both(&demo));
    let demo_file = dir.path().join("demo.yaml");
    std::fs::write(&demo_file, &demo.stdout).unwrap();
    files.push(demo_file.display().to_string());
    // The etcd variant commented out in the Kubernetes ConfigMap.
    let manifest = std::fs::read_to_string(repo().join("deploy/kubernetes/tether.yaml")).unwrap();
    let etcd = manifest
        .replace("  dns: { name", "  # dns: { name")
        .replace("  # etcd: {", "  etcd: {");
    assert_ne!(
        etcd, manifest,
        "the etcd variant is no longer in the manifest"
    );
    let etcd_file = dir.path().join("kubernetes-etcd.yaml");
    std::fs::write(&etcd_file, etcd).unwrap();
    files.push(etcd_file.display().to_string());

    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let out = validate(&args);
    let report = both(&out);
    assert!(out.status.success(), "schema validation failed:\n{report}");
    // Every config file, the ConfigMap's config (twice) and the demo's: nothing skipped.
    let valid = report.lines().filter(|l| l.ends_with(": valid")).count();
    let configs = shipped_yaml()
        .iter()
        .filter(|p| p.starts_with(repo().join("conf")))
        .count();
    assert_eq!(valid, configs + 3, "{report}");
    // And the parser accepts what the schema accepted.
    for file in &files {
        if file.contains("kubernetes") {
            continue; // manifests; their config is checked by tether-config's tests
        }
        let out = run(tether_binary(), &["check", "-c", file]);
        assert!(
            out.status.success(),
            "tether check -c {file}: {}",
            both(&out)
        );
    }
}

/// Files whose shape is wrong: the parser refuses each, and so does the schema.
const BAD: &[(&str, &str, &str)] = &[
    ("misspelled field", "upstream: docs", "upstrem: docs"),
    (
        "unknown top-level field",
        "routes:",
        "route_list: []\nroutes:",
    ),
    ("wrong type", "retries: 2", "retries: many"),
    ("value out of range", "retries: 2", "retries: 17"),
    ("unknown balance", "balance: ketama", "balance: ketamah"),
    (
        "duration without a unit",
        "connect_timeout: 1s",
        "connect_timeout: 5",
    ),
    ("zero timeout", "connect_timeout: 1s", "connect_timeout: 0s"),
    (
        "forbidden close code",
        "websocket_close_code: 1012",
        "websocket_close_code: 1005",
    ),
    (
        "path pattern without {key}",
        "path: /docs/{key}",
        "path: /docs/key",
    ),
    (
        "two key sources in one item",
        "- path: /docs/{key}",
        "- path: /docs/{key}\n          query: d",
    ),
    (
        "backends beside discovery",
        "balance: ketama",
        "balance: ketama\n    discovery: { dns: { name: a.b, port: 80 } }",
    ),
    (
        "host name as backend",
        "address: 127.0.0.1:9101",
        "address: app-1:9101",
    ),
    (
        "relative path prefix",
        "path_prefix: /docs/",
        "path_prefix: docs/",
    ),
];

const GOOD: &str = "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  docs:
    backends:
      - address: 127.0.0.1:9101
    balance: ketama
    connect_timeout: 1s
    rebalance: { websocket_close_code: 1012 }
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky:
      keys:
        - path: /docs/{key}
    upstream: docs
    retries: 2
";

#[test]
fn a_config_the_parser_refuses_for_its_shape_the_schema_refuses_too() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, GOOD).unwrap();
    let out = run(tether_binary(), &["check", "-c", good.to_str().unwrap()]);
    assert!(out.status.success(), "the base config: {}", both(&out));
    let out = validate(&[good.to_str().unwrap()]);
    assert!(out.status.success(), "the base config: {}", both(&out));

    let mut files = Vec::new();
    for (i, (what, from, to)) in BAD.iter().enumerate() {
        assert!(
            GOOD.contains(from),
            "{what}: {from:?} not in the base config"
        );
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, GOOD.replacen(from, to, 1)).unwrap();
        let out = run(tether_binary(), &["check", "-c", file.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: tether check accepted it"
        );
        files.push(file.display().to_string());
    }
    let args: Vec<&str> = ["--invalid"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let out = validate(&args);
    assert!(
        out.status.success(),
        "the schema accepted a config the parser refuses:\n{}",
        both(&out)
    );
}
