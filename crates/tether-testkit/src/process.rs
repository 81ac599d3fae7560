//! [`TetherProcess`]: the real `tether` binary, run from a temp dir, killed on drop.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::client::http_get;
use crate::error::{Result, TestkitError};

/// How long [`TetherProcess::start`] waits for admin `/healthz` to answer 200.
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

const CONFIG_FILE: &str = "tether.yaml";
const STDOUT_FILE: &str = "stdout.log";
const STDERR_FILE: &str = "stderr.log";

/// What else to give the process besides its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchOptions<'a> {
    /// Arguments after `run -c <file>`, e.g. `["--watch"]`.
    pub args: &'a [&'a str],
    /// Files to write into the working directory first, e.g. an `admin.token` or a cert.
    pub files: &'a [(&'a str, &'a [u8])],
    /// Extra environment variables, e.g. `("RUST_LOG", "debug")`.
    pub env: &'a [(&'a str, &'a str)],
}

/// A running `tether run -c <dir>/tether.yaml`, working in its own temp dir, with stdout and
/// stderr captured to files there. Dropping it kills the process (SIGKILL); if the test is
/// panicking, the captured output is printed first so the failure shows what tether said.
#[derive(Debug)]
pub struct TetherProcess {
    child: Child,
    dir: TempDir,
    admin: SocketAddr,
}

impl TetherProcess {
    /// Writes `config_yaml`, spawns `binary run -c <file>` and waits (up to 20 s) until
    /// `GET http://<admin>/healthz` is 200. `admin` must be the config's `admin.address`.
    /// On failure the error carries the captured stderr.
    pub async fn start(binary: &Path, config_yaml: &str, admin: SocketAddr) -> Result<Self> {
        Self::start_with(binary, config_yaml, admin, LaunchOptions::default()).await
    }

    /// [`start`](Self::start) with extra arguments, files or environment.
    pub async fn start_with(
        binary: &Path,
        config_yaml: &str,
        admin: SocketAddr,
        options: LaunchOptions<'_>,
    ) -> Result<Self> {
        // A config that names another admin port would only show up as a 20 s timeout.
        if !config_yaml.contains(&format!(":{}", admin.port())) {
            return Err(TestkitError::AdminNotInConfig(admin));
        }
        let dir = tempfile::Builder::new().prefix("tether-e2e-").tempdir()?;
        for (name, contents) in options.files {
            std::fs::write(dir.path().join(name), contents)?;
        }
        let config = dir.path().join(CONFIG_FILE);
        std::fs::write(&config, config_yaml)?;
        let child = Command::new(binary)
            .arg("run")
            .arg("-c")
            .arg(&config)
            .args(options.args)
            .envs(options.env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join(STDOUT_FILE))?)
            .stderr(File::create(dir.path().join(STDERR_FILE))?)
            .kill_on_drop(true)
            .spawn()?;
        let mut process = TetherProcess { child, dir, admin };
        process.wait_healthy().await?;
        Ok(process)
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let started = Instant::now();
        let url = self.admin_url("/healthz");
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(TestkitError::ProcessExited {
                    status,
                    stderr: self.stderr(),
                });
            }
            let probe = tokio::time::timeout(Duration::from_secs(1), http_get(&url, &[])).await;
            if matches!(probe, Ok(Ok(ref r)) if r.status.is_success()) {
                return Ok(());
            }
            if started.elapsed() >= READY_DEADLINE {
                return Err(TestkitError::ProcessNotReady {
                    admin: self.admin,
                    waited: started.elapsed(),
                    stderr: self.stderr(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin address it was started with.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Its working directory (relative paths in the config resolve here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file it was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(CONFIG_FILE)
    }

    /// Replaces the config file in one step (write aside, then rename), so a watcher or a
    /// reload never reads half a file. Reloading is up to the test (SIGHUP, `POST /reload`).
    pub fn write_config(&self, config_yaml: &str) -> Result<()> {
        let staged = self.dir.path().join(".tether.yaml.next");
        std::fs::write(&staged, config_yaml)?;
        std::fs::rename(&staged, self.config_path())?;
        Ok(())
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join(STDOUT_FILE))
    }

    /// Everything written to stderr so far (tether logs here).
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join(STDERR_FILE))
    }

    /// The process id, until it has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal, e.g. `Signal::SIGHUP` (reload) or `Signal::SIGTERM` (drain).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().ok_or(TestkitError::ProcessGone)?;
        let pid = i32::try_from(pid).map_err(|_| TestkitError::ProcessGone)?;
        kill(Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// Waits for the process to exit, for at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| TestkitError::Timeout {
                after: timeout,
                during: "waiting for tether to exit",
            })?
            .map_err(TestkitError::from)
    }

    /// Kills it now (SIGKILL) and reaps it.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

impl Drop for TetherProcess {
    fn drop(&mut self) {
        // The temp dir (and the logs) go with us: show them while they still exist.
        if std::thread::panicking() {
            eprintln!(
                "---- tether stdout ----\n{}\n---- tether stderr ----\n{}",
                self.stdout(),
                self.stderr()
            );
        }
        let _ = self.child.start_kill();
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
