//! End-to-end, WebSocket conformance: the Autobahn WebSocket cases (run by kosoku) give the same result
//! through Tether as directly against the backend. A proxy must be transparent: a case that is
//! OK or NON-STRICT directly and FAILED through Tether is a Tether defect. Performance (9.*) and
//! permessage-deflate (12.*, 13.*) cases are left out.
//!
//! Needs `.venv-ws/bin/kosoku`; `scripts/setup-tests.sh` installs it (scripts/setup-ws-conformance.sh).

use crate::support::Stack;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const CONFIG: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 } ]
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

fn kosoku() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-ws/bin/kosoku")
}

/// Runs the cases against `url`; case id -> (behavior, behaviorClose).
async fn run_cases(url: &str, out: &Path) -> BTreeMap<String, (String, String)> {
    let output = tokio::process::Command::new(kosoku())
        .arg(url)
        .args(["-x", "9.*", "-x", "12.*", "-x", "13.*", "-p", "4", "-o"])
        .arg(out)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), output)
        .await
        .expect("kosoku ran over 2 minutes")
        .expect("kosoku is not installed: run scripts/setup-tests.sh");
    let index = std::fs::read_to_string(out.join("index.json")).unwrap_or_else(|e| {
        panic!(
            "no kosoku report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let index: serde_json::Value = serde_json::from_str(&index).expect("index.json");
    let agent = index
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(|a| a.as_object())
        .expect("one agent in index.json");
    agent
        .iter()
        .map(|(case, r)| {
            let text = |k: &str| r[k].as_str().unwrap_or("?").to_string();
            (case.clone(), (text("behavior"), text("behaviorClose")))
        })
        .collect()
}

fn passed(result: &(String, String)) -> bool {
    let ok = |b: &str| matches!(b, "OK" | "NON-STRICT" | "INFORMATIONAL");
    ok(&result.0) && ok(&result.1)
}

#[tokio::test(flavor = "multi_thread")]
async fn autobahn_cases_pass_through_tether_as_they_do_directly() {
    let stack = Stack::start(CONFIG).await;
    let reports = stack.tether.dir().join("autobahn");
    let backend = stack.backends[0].addr();
    let direct = run_cases(
        &format!("ws://{backend}/docs/k/ws"),
        &reports.join("direct"),
    )
    .await;
    let proxied = run_cases(
        &format!("ws://{}/docs/k/ws", stack.proxy),
        &reports.join("proxied"),
    )
    .await;
    assert!(direct.len() > 200, "only {} cases ran", direct.len());
    assert_eq!(
        direct.keys().collect::<Vec<_>>(),
        proxied.keys().collect::<Vec<_>>()
    );
    let broken: Vec<String> = direct
        .iter()
        .filter(|(case, d)| passed(d) && !passed(&proxied[*case]))
        .map(|(case, d)| format!("{case}: direct {d:?}, through tether {:?}", proxied[case]))
        .collect();
    let direct_failures = direct.values().filter(|d| !passed(d)).count();
    println!(
        "{} cases; failing directly: {direct_failures}; failing only through tether: {}",
        direct.len(),
        broken.len()
    );
    assert!(broken.is_empty(), "{broken:#?}");
}
