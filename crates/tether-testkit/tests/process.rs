//! `TetherProcess` against a stand-in binary: a shell script that behaves like `tether run`
//! from the outside, with a `TestBackend` playing its admin `/healthz`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tether_testkit::{
    free_addr, wait_until, LaunchOptions, Signal, TestBackend, TestkitError, TetherProcess,
};

const DEADLINE: Duration = Duration::from_secs(5);

/// Echoes its arguments and config, says something on stderr, acknowledges SIGHUP and exits 0
/// on SIGTERM; otherwise idles. It prints `ready` once its signal handlers are in place.
const FAKE_TETHER: &str = r#"#!/bin/sh
trap 'echo "got HUP"' HUP
trap 'echo "draining"; exit 0' TERM
echo "args: $*"
echo "config: $(cat "$3")"
echo "cwd has: $(ls)"
echo "log level $RUST_LOG" >&2
echo "ready"
while :; do sleep 0.05; done
"#;

const CRASHING_TETHER: &str = "#!/bin/sh\necho 'config error at tether.yaml:3:5' >&2\nexit 3\n";

fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Starts, retrying "text file busy": another test's fork can briefly hold the fresh script open.
async fn start(
    binary: &Path,
    yaml: &str,
    admin: std::net::SocketAddr,
    options: LaunchOptions<'_>,
) -> Result<TetherProcess, TestkitError> {
    loop {
        match TetherProcess::start_with(binary, yaml, admin, options).await {
            Err(TestkitError::Io(err)) if err.raw_os_error() == Some(26) => continue,
            other => return other,
        }
    }
}

fn config(admin: std::net::SocketAddr) -> String {
    format!("admin:\n  address: {admin}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_waits_for_admin_healthz_and_captures_the_output() {
    let bin = TempDir::new().unwrap();
    let fake = script(&bin, "tether", FAKE_TETHER);
    let admin = TestBackend::start("admin").await;
    admin.set_healthy(false);
    let yaml = config(admin.addr());

    let starting = tokio::spawn({
        let yaml = yaml.clone();
        let addr = admin.addr();
        async move {
            let options = LaunchOptions {
                args: &["--watch"],
                files: &[("admin.token", b"secret")],
                env: &[("RUST_LOG", "debug")],
            };
            start(&fake, &yaml, addr, options).await
        }
    });
    // Not ready while /healthz says 503.
    assert!(wait_until(DEADLINE, || admin.health_checks() >= 2).await);
    assert!(!starting.is_finished());
    admin.set_healthy(true);
    let process = tokio::time::timeout(DEADLINE, starting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    assert_eq!(
        process.admin_url("/upstreams"),
        format!("http://{}/upstreams", admin.addr())
    );
    assert!(wait_until(DEADLINE, || process.stderr().contains("log level debug")).await);
    let stdout = process.stdout();
    let config_path = process.config_path();
    assert!(
        stdout.contains(&format!("args: run -c {} --watch", config_path.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("config: {}", yaml.trim_end())),
        "{stdout}"
    );
    assert!(stdout.contains("admin.token"), "{stdout}");
    assert!(config_path.starts_with(process.dir()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_exit_fails_start_with_the_stderr() {
    let bin = TempDir::new().unwrap();
    let crashing = script(&bin, "tether", CRASHING_TETHER);
    let admin = free_addr();
    match start(&crashing, &config(admin), admin, LaunchOptions::default()).await {
        Err(TestkitError::ProcessExited { status, stderr }) => {
            assert_eq!(status.code(), Some(3));
            assert!(stderr.contains("tether.yaml:3:5"), "{stderr}");
        }
        other => panic!("expected ProcessExited, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_without_the_admin_port_is_refused_at_once() {
    let admin = free_addr();
    let other = free_addr();
    let result = TetherProcess::start(Path::new("/nonexistent"), &config(other), admin).await;
    assert!(matches!(result, Err(TestkitError::AdminNotInConfig(a)) if a == admin));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_the_process_and_wait_exit_sees_it_leave() {
    let bin = TempDir::new().unwrap();
    let fake = script(&bin, "tether", FAKE_TETHER);
    let admin = TestBackend::start("admin").await;
    let mut process = start(
        &fake,
        &config(admin.addr()),
        admin.addr(),
        LaunchOptions::default(),
    )
    .await
    .unwrap();
    // The admin stand-in is healthy before the script has even set its traps.
    assert!(wait_until(DEADLINE, || process.stdout().contains("ready")).await);

    process.signal(Signal::SIGHUP).unwrap();
    assert!(wait_until(DEADLINE, || process.stdout().contains("got HUP")).await);
    assert!(process.wait_exit(Duration::from_millis(100)).await.is_err());

    process.signal(Signal::SIGTERM).unwrap();
    let status = process.wait_exit(DEADLINE).await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(process.stdout().contains("draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_config_replaces_the_file_it_runs_from() {
    let bin = TempDir::new().unwrap();
    let fake = script(&bin, "tether", FAKE_TETHER);
    let admin = TestBackend::start("admin").await;
    let process = start(
        &fake,
        &config(admin.addr()),
        admin.addr(),
        LaunchOptions::default(),
    )
    .await
    .unwrap();
    let next = format!("{}routes: []\n", config(admin.addr()));
    process.write_config(&next).unwrap();
    assert_eq!(
        std::fs::read_to_string(process.config_path()).unwrap(),
        next
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_kills_the_process() {
    let bin = TempDir::new().unwrap();
    let fake = script(&bin, "tether", FAKE_TETHER);
    let admin = TestBackend::start("admin").await;
    let process = start(
        &fake,
        &config(admin.addr()),
        admin.addr(),
        LaunchOptions::default(),
    )
    .await
    .unwrap();
    let pid = process.pid().unwrap();
    drop(process);
    // Gone, or a zombie waiting for tokio's reaper: either way no longer running.
    let stopped = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    };
    assert!(wait_until(DEADLINE, stopped).await);
}
