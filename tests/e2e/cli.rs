//! The `tether` command line: `check` accepts good configs and pinpoints bad ones, its
//! `--print-defaults` output is itself valid, and `route` predicts exactly where the running
//! proxy sends a request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use crate::support::{fill, tether_binary, Stack, STANDARD};
use tether_testkit::{free_addr, http_get};

/// `tether route` runs per key source; each is one process, so keep it modest.
const KEYS_PER_SOURCE: usize = 50;
/// Checks (a proxy request and a `tether route` process) in flight at once.
const WORKERS: usize = 4;

#[test]
fn check_accepts_the_reference_config_and_every_example() {
    for config in shipped_configs() {
        let out = tether(&["check", "-c", &config.display().to_string()]);
        assert_success(&out, &config);
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: want one summary line, got {stdout:?}",
            config.display()
        );
        let prefix = format!("{}: ok: ", config.display());
        assert!(
            lines[0].starts_with(&prefix) && lines[0].len() > prefix.len(),
            "{}: summary {:?} does not start with {prefix:?}",
            config.display(),
            lines[0]
        );
    }
}

#[test]
fn check_reports_every_misspelled_field_at_its_line_and_column_with_a_suggestion() {
    let dir = Scratch::new("misspelled");
    // Line numbers below are the lines of this text, counting from 1.
    let file = dir.write(
        "tether.yaml",
        "listeners:
  - address: 127.0.0.1:8080
upstreams:
  docs:
    backends:
      - address: 127.0.0.1:9101
      - { address: 127.0.0.1:9102, wieght: 2 }
routes:
  - name: docs
    upstrem: docs
lisenters: []
",
    );
    let out = tether(&["check", "-c", &file]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let output = both(&out);
    for (at, path, suggestion) in [
        ("10:5", "routes[0].upstrem", "upstream"),
        ("11:1", "lisenters", "listeners"),
        ("7:36", "upstreams.docs.backends[1].wieght", "weight"),
    ] {
        let line = output
            .lines()
            .find(|l| l.starts_with(&format!("{file}:{at}: {path}:")))
            .unwrap_or_else(|| panic!("no `{file}:{at}: {path}:` error in:\n{output}"));
        assert!(
            line.contains(&format!("did you mean `{suggestion}`")),
            "no suggestion `{suggestion}` in {line:?}"
        );
    }
}

#[test]
fn print_defaults_output_is_itself_a_valid_config_with_the_same_summary() {
    let dir = Scratch::new("defaults");
    for (i, config) in shipped_configs().iter().enumerate() {
        let path = config.display().to_string();
        let original = tether(&["check", "-c", &path]);
        assert_success(&original, config);
        let printed = tether(&["check", "-c", &path, "--print-defaults"]);
        assert_success(&printed, config);
        let again = dir.write(&format!("defaults-{i}.yaml"), &text(&printed.stdout));
        let rechecked = tether(&["check", "-c", &again]);
        assert_success(&rechecked, Path::new(&again));
        assert_eq!(
            summary(&text(&rechecked.stdout)),
            summary(&text(&original.stdout)),
            "--print-defaults of {path} describes another config:\n{}",
            text(&printed.stdout)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_agrees_with_the_running_proxy_for_every_key_source() {
    let stack = Arc::new(Stack::start(STANDARD).await);
    let config = stack.tether.config_path().display().to_string();
    let cases: Arc<Vec<Case>> = Arc::new(
        (0..KEYS_PER_SOURCE)
            .flat_map(|i| {
                let key = if i % 2 == 0 {
                    format!("doc-{i}")
                } else {
                    format!("Room_{i}.v2")
                };
                Source::ALL.map(|source| Case {
                    source,
                    key: key.clone(),
                    inline_query: i % 4 == 1,
                })
            })
            .collect(),
    );

    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (stack, cases, config) = (stack.clone(), cases.clone(), config.clone());
        workers.spawn(async move {
            let mut disagreements = Vec::new();
            for case in cases.iter().skip(worker).step_by(WORKERS) {
                disagreements.extend(case.check(&stack, &config).await);
            }
            disagreements
        });
    }
    let mut disagreements = Vec::new();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(d) => disagreements.extend(d),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} requests: `tether route` disagrees with the proxy:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n")
    );
}

#[test]
fn check_against_reports_the_share_of_keys_that_move_and_the_route_changes() {
    let dir = Scratch::new("against");
    let base = |backends: &str, extra_route: &str| {
        format!(
            "listeners: [ {{ address: 127.0.0.1:18080 }} ]\n\
             upstreams:\n  docs:\n    backends: [ {backends} ]\n\
             routes:\n  - name: docs\n    match: {{ path_prefix: /docs/ }}\n    upstream: docs\n{extra_route}"
        )
    };
    let three = "{ address: 10.0.0.1:80 }, { address: 10.0.0.2:80 }, { address: 10.0.0.3:80 }";
    let four = "{ address: 10.0.0.1:80 }, { address: 10.0.0.2:80 }, { address: 10.0.0.3:80 }, { address: 10.0.0.4:80 }";
    let old = dir.write("old.yaml", &base(three, ""));
    let new = dir.write(
        "new.yaml",
        &base(
            four,
            "  - name: extra\n    match: { path: /x }\n    upstream: docs\n",
        ),
    );
    let out = tether(&["check", "-c", &new, "--against", &old]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", both(&out));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("upstream docs: "))
        .unwrap_or_else(|| panic!("no share line in {stdout}"));
    let share: f64 = line["upstream docs: ".len()..]
        .split('%')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unparsable {line}"));
    // A fourth backend takes about a quarter of the keys, all from the other three.
    assert!((15.0..35.0).contains(&share), "{line}");
    assert!(stdout.contains("routes added: extra"), "{stdout}");
    let same = tether(&["check", "-c", &old, "--against", &old]);
    assert!(text(&same.stdout).contains("upstream docs: 0.00% of keys change owner"));
}

#[test]
fn route_for_a_request_no_route_matches_exits_1_with_404() {
    let (_dir, config) = standard_config_file("no-route");
    let out = tether(&["route", "-c", &config, "--path", "/nowhere/at/all"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("404 "), "stderr: {stderr:?}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
}

#[test]
fn route_without_the_sticky_key_exits_1_with_400() {
    let (_dir, config) = standard_config_file("no-key");
    // `/h/` is sticky on X-Doc-Id with the default `on_missing: reject`.
    let out = tether(&["route", "-c", &config, "--path", "/h/doc"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("400 "), "stderr: {stderr:?}");
}

/// A listener whose address another socket holds stops the start at once, naming the listener
/// and why (Pingora's listener retried for 30 s, then panicked in a worker thread).
#[test]
fn run_on_an_address_in_use_exits_1_naming_the_listener() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = held.local_addr().expect("addr");
    let addrs: Vec<SocketAddr> = (0..6).map(|_| free_addr()).collect();
    let config = fill(STANDARD, busy, addrs[0], &addrs[1..4], &addrs[4..6]);
    let dir = Scratch::new("in-use");
    let file = dir.write("tether.yaml", &config);
    let mut child = std::process::Command::new(tether_binary())
        .args(["run", "-c", &file])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tether");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tether kept running on an address in use");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("listeners[0].address: cannot listen on {busy}")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
    drop(held);
}

/// Where a sticky key comes from, with the matching route of [`STANDARD`].
#[derive(Clone, Copy, Debug)]
enum Source {
    Header,
    Cookie,
    Query,
    Path,
}

impl Source {
    const ALL: [Source; 4] = [Source::Header, Source::Cookie, Source::Query, Source::Path];

    fn route(self) -> &'static str {
        match self {
            Source::Header => "by-header",
            Source::Cookie => "by-cookie",
            Source::Query => "by-query",
            Source::Path => "by-path",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::Cookie => "cookie",
            Source::Query => "query",
            Source::Path => "path",
        }
    }
}

/// One key sent one way, both through the proxy and to `tether route`.
struct Case {
    source: Source,
    key: String,
    /// For [`Source::Query`]: the query in `--path` instead of `--query`.
    inline_query: bool,
}

impl Case {
    /// What is wrong, if `tether route` and the proxy disagree on this case.
    async fn check(&self, stack: &Stack, config: &str) -> Vec<String> {
        let key = self.key.as_str();
        let cookie = format!("theme=dark; doc_id={key}");
        let (path, headers, cli): (String, Vec<(&str, &str)>, Vec<String>) = match self.source {
            Source::Header => (
                format!("/h/{key}"),
                vec![("x-doc-id", key)],
                vec!["--header".into(), format!("X-Doc-Id:{key}")],
            ),
            Source::Cookie => (
                "/c/room".into(),
                vec![("cookie", cookie.as_str())],
                vec![
                    "--cookie".into(),
                    "theme=dark".into(),
                    "--cookie".into(),
                    format!("doc_id={key}"),
                ],
            ),
            Source::Query if self.inline_query => (format!("/q/room?doc={key}"), vec![], vec![]),
            Source::Query => (
                format!("/q/room?doc={key}"),
                vec![],
                vec!["--query".into(), format!("doc={key}")],
            ),
            Source::Path => (format!("/docs/{key}/x"), vec![], vec![]),
        };
        let cli_path = match (self.source, self.inline_query) {
            (Source::Query, false) => "/q/room".to_string(),
            _ => path.clone(),
        };
        let what = format!("{:?} key {key:?} ({path})", self.source);

        let response = match http_get(&stack.url(&path), &headers).await {
            Ok(r) => r,
            Err(e) => return vec![format!("{what}: proxy request failed: {e}")],
        };
        let Some(answered) = response.header("x-backend") else {
            return vec![format!(
                "{what}: proxy answered {} without x-backend",
                response.status
            )];
        };
        let proxied = stack.backend(answered).addr();

        let mut args = vec!["route".to_string(), "-c".into(), config.into()];
        args.extend(["--path".to_string(), cli_path]);
        args.extend(cli);
        let out = match tokio::process::Command::new(tether_binary())
            .args(&args)
            .output()
            .await
        {
            Ok(o) => o,
            Err(e) => return vec![format!("{what}: cannot run tether route: {e}")],
        };
        if !out.status.success() {
            return vec![format!("{what}: tether {args:?} failed: {}", both(&out))];
        }
        let decision = decision(&text(&out.stdout));
        let mut wrong = Vec::new();
        let expect = [
            ("route", self.source.route().to_string()),
            ("key", key.to_string()),
            ("key_source", self.source.name().to_string()),
            ("upstream", "docs".to_string()),
        ];
        for (field, want) in expect {
            let got = decision.get(field).map(String::as_str);
            if got != Some(want.as_str()) {
                wrong.push(format!("{what}: {field}: {got:?}, want {want:?}"));
            }
        }
        match decision.get("backend").map(|b| b.parse::<SocketAddr>()) {
            Some(Ok(predicted)) if predicted == proxied => {}
            Some(Ok(predicted)) => wrong.push(format!(
                "{what}: tether route says {predicted}, proxy used {proxied} ({answered})"
            )),
            other => wrong.push(format!("{what}: no usable backend line: {other:?}")),
        }
        wrong
    }
}

/// `name: value` lines of `tether route` output.
fn decision(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The part of a `FILE: ok: SUMMARY` line after `ok: `.
fn summary(stdout: &str) -> String {
    match stdout.trim_end().split_once(": ok: ") {
        Some((_, s)) => s.to_string(),
        None => panic!("not a check summary: {stdout:?}"),
    }
}

/// `conf/tether.yaml` and every `conf/examples/*.yaml`.
fn shipped_configs() -> Vec<PathBuf> {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let examples = match std::fs::read_dir(conf.join("examples")) {
        Ok(entries) => entries,
        Err(e) => panic!("cannot list conf/examples: {e}"),
    };
    let mut files: Vec<PathBuf> = examples
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    assert!(!files.is_empty(), "conf/examples has no .yaml files");
    files.sort();
    files.insert(0, conf.join("tether.yaml"));
    files
}

/// [`STANDARD`] filled with addresses where nothing listens, written to a file.
fn standard_config_file(name: &str) -> (Scratch, String) {
    let addrs: Vec<SocketAddr> = (0..7).map(|_| free_addr()).collect();
    let config = fill(STANDARD, addrs[0], addrs[1], &addrs[2..5], &addrs[5..7]);
    let dir = Scratch::new(name);
    let file = dir.write("tether.yaml", &config);
    (dir, file)
}

/// Runs the `tether` binary to completion.
fn tether(args: &[&str]) -> Output {
    match std::process::Command::new(tether_binary())
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("cannot run tether {args:?}: {e}"),
    }
}

fn assert_success(out: &Output, config: &Path) {
    assert!(
        out.status.success(),
        "tether check -c {} exited {:?}:\n{}",
        config.display(),
        out.status.code(),
        both(out)
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// stdout then stderr, for assertions and failure messages.
fn both(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// A directory under the system temp dir for one test's files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tether-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        Scratch(dir)
    }

    /// Writes `contents` to `name` in the directory and returns its path as text.
    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        if let Err(e) = std::fs::write(&path, contents) {
            panic!("cannot write {}: {e}", path.display());
        }
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
