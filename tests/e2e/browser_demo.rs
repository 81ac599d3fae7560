//! End-to-end: `tether demo` as a newcomer runs it. It starts fast, prints where to go, stops on
//! Ctrl-C and SIGTERM, prints a config `tether check` accepts, and two real browser pages
//! (headless chromium via tests/browser/demo.test.mjs) edit one document through the proxy.
//!
//! The browser test needs Debian's `chromium` and `npm ci` in tests/browser:
//! `scripts/setup-browser.sh` installs both.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tether_testkit::{free_addr, http_get, wait_until, wait_until_async};

/// The budget from starting `tether demo` to a page being served.
const START_BUDGET: Duration = Duration::from_secs(2);
/// SIGTERM waits out the demo's 1 s grace period, then at most 1 s for runtimes to stop.
const STOP_BUDGET: Duration = Duration::from_secs(5);

/// The demo starts several servers and chromium takes both cores: one test at a time, so a
/// start-time measurement is not a measurement of the neighbour test.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tether() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A running `tether demo` on free ports, killed on drop.
struct Demo {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    logs: PathBuf,
}

impl Demo {
    /// Starts it and waits until the proxy serves the home page; returns how long that took.
    async fn start(name: &str) -> (Demo, Duration) {
        let (proxy, admin) = (free_addr(), free_addr());
        // Per process: two runs of the suite at once share the target directory.
        let logs = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("demo-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&logs).expect("log dir");
        let started = Instant::now();
        let child = Command::new(tether())
            .args(["demo", "--app-port", "0", "--listen", &proxy.to_string()])
            .args(["--admin", &admin.to_string()])
            .stdin(Stdio::null())
            .stdout(File::create(logs.join("stdout.log")).expect("stdout file"))
            .stderr(File::create(logs.join("stderr.log")).expect("stderr file"))
            .spawn()
            .expect("spawn tether demo");
        let mut demo = Demo {
            child,
            proxy,
            admin,
            logs,
        };
        let url = demo.url("/");
        let ready = wait_until_async(Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), http_get(&url, &[])).await,
                    Ok(Ok(r)) if r.status == 200
                )
            }
        })
        .await;
        let took = started.elapsed();
        if let Ok(Some(status)) = demo.child.try_wait() {
            panic!("tether demo exited with {status}:\n{}", demo.output());
        }
        assert!(ready, "tether demo never served {url}:\n{}", demo.output());
        (demo, took)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    fn output(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.logs.join(f)).unwrap_or_default();
        format!(
            "---- stdout ----\n{}\n---- stderr ----\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits for the process to exit; returns its status and how long it took.
    async fn wait_exit(&mut self, within: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        let mut status = None;
        wait_until(within, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        })
        .await;
        (status, started.elapsed())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_serves_within_2s_prints_what_to_try_and_stops_on_ctrl_c() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut demo, took) = Demo::start("sigint").await;
    println!("tether demo served its first page {took:?} after start");
    assert!(took < START_BUDGET, "took {took:?}");

    let page = http_get(&demo.url("/docs/notes"), &[]).await.expect("page");
    assert_eq!(page.status, 200);
    let server = page
        .header("x-app-server")
        .expect("x-app-server")
        .to_owned();
    assert!(
        page.text().contains(&format!(">{server}<")),
        "the page names {server}"
    );

    let out = demo.output();
    assert!(out.contains(&demo.url("/docs/notes")), "{out}");
    assert!(out.contains(&demo.url("/unpinned/docs/notes")), "{out}");
    assert_eq!(
        out.matches("app-").count(),
        3,
        "three app servers listed: {out}"
    );

    demo.signal("-INT");
    let (status, stopped) = demo.wait_exit(STOP_BUDGET).await;
    println!("SIGINT: exited {status:?} after {stopped:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        demo.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_demo_after_its_short_grace_period() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut demo, _) = Demo::start("sigterm").await;
    demo.signal("-TERM");
    let (status, stopped) = demo.wait_exit(STOP_BUDGET).await;
    println!("SIGTERM: exited {status:?} after {stopped:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        demo.output()
    );
}

#[test]
fn print_config_prints_yaml_that_tether_check_accepts() {
    let run = |args: &[&str]| -> Output {
        Command::new(tether())
            .args(args)
            .output()
            .expect("run tether")
    };
    let printed = run(&[
        "demo",
        "--print-config",
        "--servers",
        "4",
        "--listen",
        "127.0.0.1:18080",
    ]);
    assert!(printed.status.success(), "{printed:?}");
    let yaml = String::from_utf8(printed.stdout).expect("utf-8");
    assert!(yaml.contains("127.0.0.1:9104"), "{yaml}");
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-config.yaml");
    std::fs::write(&file, &yaml).expect("write");
    let checked = run(&["check", "-c", &file.display().to_string()]);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{checked:?}");
    assert!(
        said.contains("5 routes, 2 upstreams, 8 backends, 1 listener"),
        "{said}"
    );
}

/// Runs `node --test <file>` from the repository root with `env`; panics with its output if
/// it fails.
fn node_test(file: &str, env: &[(&str, String)]) {
    let output = Command::new("node")
        .args(["--test", "--test-reporter=spec", file])
        .current_dir(repo())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("node must be installed (scripts/setup-browser.sh)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(
        output.status.success(),
        "node --test {file} failed:\n{report}"
    );
}

#[test]
fn the_browser_merges_edits_as_the_server_does() {
    node_test("tests/browser/ot.test.mjs", &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_browser_pages_edit_one_document_through_the_proxy() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no browser at {chromium}: run scripts/setup-browser.sh (or set CHROMIUM)"
    );
    assert!(
        repo()
            .join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "playwright-core is not installed: run scripts/setup-browser.sh"
    );
    let _one = ONE_AT_A_TIME.lock().await;
    let (demo, _) = Demo::start("browser").await;
    let artifacts = repo().join("target/browser-artifacts");
    let env = [
        ("TETHER_DEMO_URL", demo.url("")),
        ("TETHER_ADMIN_URL", format!("http://{}", demo.admin)),
        ("TETHER_ARTIFACTS", artifacts.display().to_string()),
        ("CHROMIUM", chromium),
    ];
    // node blocks this thread for the whole run; the demo is another process, so that is fine.
    tokio::task::block_in_place(|| node_test("tests/browser/demo.test.mjs", &env));
    assert!(
        artifacts.join("editor-ws.png").is_file(),
        "no screenshot saved"
    );
    drop(demo);
}
