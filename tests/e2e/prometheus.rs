//! End-to-end: the Grafana dashboard and the alert rules in `dashboards/` against a real
//! Prometheus scraping the real `tether`.
//!
//! After HTTP (2xx, 404, 5xx, retries), WebSocket, SSE and long-poll traffic, a failed and a
//! successful reload, a split key and a stopped backend, every query of the dashboard and every
//! alert expression must return data, every metric they name must be served on `/metrics`, and
//! `TetherBackendDown` must fire for the stopped backend. `alerts.yaml` is loaded unchanged,
//! with its real `for:` durations (`TetherBackendDown` has `for: 10s`).
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package): run
//! `scripts/setup-prometheus.sh`.

use crate::support::{metrics_text, Stack};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_testkit::{free_addr, http_get, sse_connect, wait_until_async, ws_connect, Message};

const SETUP_HINT: &str =
    "install it with scripts/setup-prometheus.sh (Debian's `prometheus` package)";

/// Shared backends in two upstreams: `docs` rebalances moved streams, `pinned` does not (so a
/// health flip leaves a split key behind). `flaky` has a dead first choice for some keys (retries);
/// `dead` has no live backend at all (503s and an upstream with no healthy backend).
const CONFIG: &str = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    health_check:
      http: { path: /healthz, expect_status: 200 }
      interval: 200ms
      timeout: 200ms
      healthy_after: 1
      unhealthy_after: 1
  pinned:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
    health_check:
      http: { path: /healthz, expect_status: 200 }
      interval: 200ms
      timeout: 200ms
      healthy_after: 1
      unhealthy_after: 1
    rebalance: { enabled: false }
  flaky:
    backends: [ { address: $DEAD1 }, { address: $B0 } ]
  dead:
    backends: [ { address: $DEAD0 } ]
    health_check: { tcp: {}, interval: 200ms, timeout: 100ms, unhealthy_after: 1 }
routes:
  - name: by-header
    match: { path_prefix: /h/ }
    sticky: { keys: [ { header: X-Doc-Id } ] }
    upstream: docs
  - name: by-cookie
    match: { path_prefix: /c/ }
    sticky: { keys: [ { cookie: doc_id } ] }
    upstream: docs
  - name: by-query
    match: { path_prefix: /q/ }
    sticky: { keys: [ { query: doc } ] }
    upstream: docs
  - name: live
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
  - name: poll
    match: { path_prefix: /lp/ }
    sticky: { keys: [ { path: "/lp/{key}" } ] }
    upstream: docs
    long_poll: true
  - name: anonymous
    match: { path_prefix: /any/ }
    sticky: { keys: [ { header: X-Doc-Id } ], on_missing: random }
    upstream: docs
  - name: pinned
    match: { path_prefix: /pinned/ }
    sticky: { keys: [ { path: "/pinned/{key}" } ] }
    upstream: pinned
  - name: flaky
    match: { path_prefix: /flaky/ }
    sticky: { keys: [ { path: "/flaky/{key}" } ] }
    upstream: flaky
    retries: 1
  - name: dead
    match: { path_prefix: /dead/ }
    upstream: dead
"#;

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_repo_file(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs `program` with `args`, failing with the setup hint when it is not installed.
fn run_tool(program: &str, args: &[&str]) -> std::process::Output {
    match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed: {SETUP_HINT}")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

// ---- the dashboard --------------------------------------------------------------------------

fn dashboard() -> Value {
    serde_json::from_str(&read_repo_file("dashboards/tether.json"))
        .unwrap_or_else(|e| panic!("dashboards/tether.json is not JSON: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `(panel title, expr)` for every `targets[].expr` of the dashboard.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.to_string(), expr.to_string()));
            }
        }
    }
    out
}

/// The `label_values(selector, label)` query of every query variable.
fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or_else(|| panic!("variable {} has no query", var["name"]));
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query is not label_values(..): {query}"));
        let (selector, label) = inner
            .rsplit_once(',')
            .unwrap_or_else(|| panic!("label_values needs a selector and a label: {query}"));
        out.push((selector.trim().to_string(), label.trim().to_string()));
    }
    out
}

/// What Grafana would send with "All" selected and a 1-minute rate interval.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${upstream}", ".*")
        .replace("$upstream", ".*")
        .replace("${route}", ".*")
        .replace("$route", ".*")
}

/// `tether_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("tether_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_alert_rules_pass_promtool_and_the_dashboard_is_an_importable_grafana_model() {
    let rules = repo_file("dashboards/alerts.yaml");
    let output = run_tool("promtool", &["check", "rules", &rules.to_string_lossy()]);
    assert!(
        output.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let dash = dashboard();
    assert!(
        dash["uid"].as_str().is_some_and(|s| !s.is_empty()),
        "no uid"
    );
    assert!(
        dash["title"].as_str().is_some_and(|s| !s.is_empty()),
        "no title"
    );
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for var in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            var["datasource"]["uid"], "${datasource}",
            "variable {}",
            var["name"]
        );
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, i64, i64, i64, i64)> = Vec::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        let pos = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| pos[k].as_i64().expect("gridPos"));
        assert!(
            x >= 0 && w > 0 && h > 0 && x + w <= 24,
            "{title}: bad gridPos {pos}"
        );
        for (other, ox, oy, ow, oh) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "panels {title:?} and {other:?} overlap");
        }
        boxes.push((title.clone(), x, y, w, h));
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                ref_ids.insert(target["refId"].as_str().expect("refId")),
                "{title}"
            );
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("tether_"), "{title}: {expr}");
            assert!(!expr.contains("datasource"), "{title}: {expr}");
            // Windows follow the scrape interval Grafana knows, never a hard-coded one.
            for window in expr.split('[').skip(1) {
                assert!(window.starts_with("$__rate_interval]"), "{title}: {expr}");
            }
        }
    }
    assert!(dashboard_exprs(&dash).len() >= 15, "too few queries");
}

// ---- Prometheus -----------------------------------------------------------------------------

/// A Prometheus server in a temp dir, killed (and its dir removed) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `target`'s `/metrics` every second, with `dashboards/alerts.yaml`
    /// evaluated every second, and waits until it is ready.
    async fn start(target: SocketAddr) -> Prometheus {
        let listen = free_addr();
        let dir = std::env::temp_dir().join(format!(
            "tether-prometheus-{}-{}",
            std::process::id(),
            listen.port()
        ));
        std::fs::create_dir_all(dir.join("data")).expect("temp dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: tether\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: ['{target}']\n",
            rules = repo_file("dashboards/alerts.yaml").display(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("`prometheus` is not installed: {SETUP_HINT}")
            }
            Err(e) => panic!("cannot start prometheus: {e}"),
        };
        let prometheus = Prometheus {
            child,
            dir,
            url: format!("http://{listen}"),
        };
        let ready_url = prometheus.url("/-/ready");
        let ready = wait_until_async(Duration::from_secs(20), || async {
            http_get(&ready_url, &[])
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
        assert!(ready, "prometheus not ready:\n{}", prometheus.log());
        prometheus
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `data` of an API answer, or why there is none.
    async fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let response = http_get(&self.url(path_and_query), &[])
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_slice(&response.body).map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{} {}", body["errorType"], body["error"]));
        }
        Ok(body["data"].clone())
    }

    /// The instant result of `expr`: series (or a scalar) with their values.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await?;
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                Ok(data["result"].as_array().cloned().unwrap_or_default())
            }
            _ => Ok(vec![data["result"].clone()]),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter value.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// True when some series of an instant result has a number (not NaN): the query measured
/// something, rather than dividing zero by zero.
fn has_number(result: &[Value]) -> bool {
    result.iter().any(|series| {
        let value = series["value"][1].as_str().or(series[1].as_str());
        value.is_some_and(|v| v != "NaN")
    })
}

/// One thing the dashboard or the alerts need from Prometheus.
enum Check {
    /// An instant query returns series (with a number, when `needs_number`).
    Query {
        what: String,
        expr: String,
        needs_number: bool,
    },
    /// A variable's `label_values(selector, label)` offers at least one value.
    LabelValues { selector: String, label: String },
}

impl Check {
    /// Ok when it holds now; else what was seen. Panics on an invalid query: waiting longer
    /// cannot fix it.
    async fn run(&self, prometheus: &Prometheus) -> Result<(), String> {
        match self {
            Check::Query {
                what,
                expr,
                needs_number,
            } => match prometheus.query(expr).await {
                Ok(result) if !result.is_empty() && (!needs_number || has_number(&result)) => {
                    Ok(())
                }
                Ok(result) => Err(format!("  {what}: {expr}\n    -> {result:?}")),
                Err(e) if e.contains("bad_data") => panic!("{what}: invalid query {expr}: {e}"),
                Err(e) => Err(format!("  {what}: {expr}\n    -> error {e}")),
            },
            Check::LabelValues { selector, label } => {
                let path = format!("/api/v1/label/{label}/values?match[]={}", encode(selector));
                match prometheus.api(&path).await {
                    Ok(values) if values.as_array().is_some_and(|v| !v.is_empty()) => Ok(()),
                    Ok(values) => Err(format!(
                        "  variable label_values({selector}, {label}) -> {values}"
                    )),
                    Err(e) => Err(format!("  variable label_values({selector}, {label}): {e}")),
                }
            }
        }
    }
}

// ---- traffic --------------------------------------------------------------------------------

/// One round of every kind of request, each on a new connection. Failures are ignored here:
/// what the proxy counted is what the queries judge.
async fn traffic_round(proxy: SocketAddr, n: u64) {
    let url = |path: &str| format!("http://{proxy}{path}");
    let key = format!("doc-{}", n % 7);
    let cookie = format!("doc_id={key}");
    let plain = async {
        let _ = http_get(&url("/h/x"), &[("x-doc-id", &key)]).await;
        let _ = http_get(&url("/c/x"), &[("cookie", &cookie)]).await;
        let _ = http_get(&url(&format!("/q/x?doc={key}")), &[]).await;
        let _ = http_get(&url(&format!("/docs/{key}/state")), &[]).await;
        let _ = http_get(&url("/any/x"), &[]).await;
        let _ = http_get(&url("/pinned/p/state"), &[]).await;
        let _ = http_get(&url("/nowhere"), &[]).await; // 404
        let _ = http_get(&url("/dead/x"), &[]).await; // 503: no healthy backend
        for i in 0..3 {
            let _ = http_get(&url(&format!("/flaky/f{}/x", n * 3 + i)), &[]).await;
        }
    };
    let long_poll = async {
        let _ = http_get(&url(&format!("/lp/{key}/poll?wait_ms=50")), &[]).await;
    };
    let sse = async {
        if let Ok(mut stream) = sse_connect(
            &url(&format!("/docs/{key}/sse?count=2&interval_ms=10")),
            &[],
        )
        .await
        {
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_secs(2), stream.next_event()).await
            {
            }
        }
    };
    let ws = async {
        if let Ok((mut ws, _)) = ws_connect(&format!("ws://{proxy}/docs/{key}/live"), &[]).await {
            let _ = ws.send(Message::text("ping")).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
            let _ = ws.close(None).await;
        }
    };
    tokio::join!(plain, long_poll, sse, ws);
}

/// Rounds of traffic in the background until stopped (at most about a minute), so that the
/// counters keep rising between scrapes and every rate() has something to measure.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Traffic {
    fn start(proxy: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            // Pacing between rounds, not a wait for readiness.
            let mut pace = tokio::time::interval(Duration::from_millis(200));
            let mut rounds = 0;
            while !flag.load(Ordering::SeqCst) && rounds < 300 {
                pace.tick().await;
                traffic_round(proxy, rounds).await;
                rounds += 1;
            }
            rounds
        });
        Traffic { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("traffic task")
    }
}

// ---- the end-to-end test --------------------------------------------------------------------

/// Series names (`name` of `name{...} value`) served on tether's `/metrics`.
fn served_series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

async fn reload(stack: &Stack, config: &str) -> u16 {
    stack.tether.write_config(config).expect("write config");
    let response = stack.admin_post("/reload").await;
    response.status.as_u16()
}

async fn backend_up(stack: &Stack, upstream: &str, backend: SocketAddr) -> Option<String> {
    let series = format!(r#"tether_backend_up{{backend="{backend}",upstream="{upstream}"}} "#);
    metrics_text(stack)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&series).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_and_alert_has_data_and_a_stopped_backend_fires_backend_down() {
    let stack = Stack::start(CONFIG).await;
    let prometheus = Prometheus::start(stack.tether.admin_addr()).await;

    // Reloads come first: installing a config rebuilds the router, and must not disturb the
    // health state the alerts are judged on below. The failed one is real: TetherReloadFailed's
    // condition is met, not just its counter read.
    assert_eq!(reload(&stack, &stack.config).await, 200, "a valid reload");
    assert_eq!(
        reload(&stack, "listeners: [ oops").await,
        422,
        "an invalid reload"
    );

    let traffic = Traffic::start(stack.proxy);

    // Streams held open for the whole test, so streams_open has series of every kind.
    let mut held_ws = Vec::new();
    for i in 0..6 {
        let (ws, _) = ws_connect(&stack.ws_url(&format!("/docs/held-{i}/live")), &[])
            .await
            .expect("held websocket");
        held_ws.push(ws);
    }
    let held_sse = sse_connect(&stack.url("/docs/held-sse/sse?count=1&hold=1"), &[])
        .await
        .expect("held event stream");
    assert_eq!(held_sse.status, 200);
    let poll_url = stack.url("/lp/held/poll?wait_ms=30000");
    let held_poll = tokio::spawn(async move { http_get(&poll_url, &[]).await });

    // The backend failure the alert is about: b2 killed outright.
    let b2 = stack.backend("b2");
    b2.stop().await;
    let b2_down = wait_until_async(Duration::from_secs(10), || async {
        backend_up(&stack, "docs", b2.addr()).await.as_deref() == Some("0")
            && backend_up(&stack, "pinned", b2.addr()).await.as_deref() == Some("0")
    })
    .await;
    assert!(b2_down, "b2 never went down");

    // A split key, for real: a stream of key K on b1 in `pinned` (rebalance disabled), then b1
    // fails its health check, K moves to b0 (b2 is down), and a new stream of K lands there
    // while the first stays on b1.
    let b1 = stack.backend("b1");
    let mut on_b1 = None;
    for i in 0..50 {
        let key = format!("p{i}");
        let (ws, headers) = ws_connect(&stack.ws_url(&format!("/pinned/{key}/live")), &[])
            .await
            .expect("pinned websocket (b0 or b1)");
        if headers.get("x-backend").is_some_and(|v| v == "b1") {
            on_b1 = Some((key, ws));
            break;
        }
    }
    let (split_key, first_ws) = on_b1.expect("no key of 50 is owned by b1");
    b1.set_healthy(false);
    let moved = wait_until_async(Duration::from_secs(10), || async {
        backend_up(&stack, "pinned", b1.addr()).await.as_deref() == Some("0")
    })
    .await;
    assert!(moved, "b1 never went down in `pinned`");
    let (second_ws, headers) = ws_connect(&stack.ws_url(&format!("/pinned/{split_key}/live")), &[])
        .await
        .expect("second websocket of the split key");
    assert_eq!(
        headers.get("x-backend").and_then(|v| v.to_str().ok()),
        Some("b0")
    );

    // Every query must return data at least once before the deadline. Alert expressions are
    // conditions and are queried as written: each one's condition really holds here (b1 and
    // b2 down, `dead` has no healthy backend, its route answers only 5xx, the split key above,
    // the failed reload). Dashboard queries must also have a number, not only NaN; the
    // dashboard's variables must offer at least one value.
    let dash = dashboard();
    let mut pending: Vec<Check> = dashboard_exprs(&dash)
        .into_iter()
        .map(|(title, expr)| Check::Query {
            what: format!("dashboard {title:?}"),
            expr: substitute(&expr),
            needs_number: true,
        })
        .collect();
    for (selector, label) in variable_queries(&dash) {
        pending.push(Check::LabelValues {
            selector: substitute(&selector),
            label,
        });
    }
    let rules = prometheus.api("/api/v1/rules").await.expect("rules API");
    let mut rule_names = BTreeSet::new();
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["name"].as_str().expect("rule name").to_string();
            let expr = rule["query"].as_str().expect("rule query").to_string();
            pending.push(Check::Query {
                what: format!("alert {name}"),
                expr,
                needs_number: false,
            });
            rule_names.insert(name);
        }
    }
    let in_file = read_repo_file("dashboards/alerts.yaml")
        .matches("- alert:")
        .count();
    assert_eq!(
        rule_names.len(),
        in_file,
        "prometheus loaded {rule_names:?}"
    );

    let b2_address = b2.addr().to_string();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut failures: Vec<String> = Vec::new();
    let mut firing = false;
    loop {
        let mut still = Vec::new();
        failures.clear();
        for check in pending {
            match check.run(&prometheus).await {
                Ok(()) => {}
                Err(why) => {
                    failures.push(why);
                    still.push(check);
                }
            }
        }
        pending = still;
        if !firing {
            let alerts = prometheus.api("/api/v1/alerts").await.unwrap_or_default();
            firing = alerts["alerts"].as_array().into_iter().flatten().any(|a| {
                a["labels"]["alertname"] == "TetherBackendDown"
                    && a["labels"]["backend"] == b2_address.as_str()
                    && a["state"] == "firing"
            });
        }
        if (pending.is_empty() && firing) || Instant::now() >= deadline {
            break;
        }
        // Polling the API with the deadline above; a scrape or evaluation is due every second.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        pending.is_empty() && firing,
        "{} queries never returned data{}:\n{}",
        pending.len(),
        if firing {
            String::new()
        } else {
            format!(", and TetherBackendDown never fired for {b2_address}")
        },
        failures.join("\n")
    );

    // Every rule evaluated without error.
    let rules = prometheus.api("/api/v1/rules").await.expect("rules API");
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            assert_eq!(
                rule["health"], "ok",
                "rule {} : {}",
                rule["name"], rule["lastError"]
            );
        }
    }

    // Every metric the dashboard or the alerts name is served, and every family tether serves
    // is on the dashboard.
    let text = metrics_text(&stack).await;
    let served = served_series(&text);
    let mut referenced = BTreeSet::new();
    for (_, expr) in dashboard_exprs(&dash) {
        referenced.extend(metric_names(&expr));
    }
    for (selector, _) in variable_queries(&dash) {
        referenced.extend(metric_names(&selector));
    }
    let on_dashboard = referenced.clone();
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            referenced.extend(metric_names(rule["query"].as_str().unwrap_or("")));
        }
    }
    let missing: Vec<&String> = referenced.iter().filter(|n| !served.contains(*n)).collect();
    assert!(missing.is_empty(), "not on tether's /metrics: {missing:?}");
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|n| n.starts_with("tether_"))
        .collect();
    let unshown: Vec<&&str> = families
        .iter()
        .filter(|f| {
            !on_dashboard
                .iter()
                .any(|n| n == **f || n.strip_suffix("_bucket") == Some(**f))
        })
        .collect();
    assert!(
        unshown.is_empty(),
        "served but not on the dashboard: {unshown:?}"
    );

    let rounds = traffic.stop().await;
    assert!(rounds >= 2, "only {rounds} rounds of traffic");
    drop((held_ws, held_sse, first_ws, second_ws));
    held_poll.abort();
    drop(prometheus);
}
