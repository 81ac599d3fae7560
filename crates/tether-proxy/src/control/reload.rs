//! Config reload: from SIGHUP, `POST /reload` or a watched file. The new file is read and
//! validated completely before anything changes; a bad file changes nothing, and the error is
//! logged, kept for `GET /config/status` and counted.

use crate::metrics::Metrics;
use crate::state::ProxyState;
use crate::tls::TlsListeners;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_config::Config;

/// What started a reload (logged).
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /reload`.
    Admin,
    /// The config file changed (`run --watch`).
    Watch,
}

/// The outcome of the last reload attempt.
#[derive(Debug, Clone)]
struct Status {
    generation: u64,
    loaded_at: SystemTime,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
}

/// Reloads the config file into the running proxy; one reload at a time.
pub struct Reloader {
    state: Arc<ProxyState>,
    path: PathBuf,
    tls: Arc<TlsListeners>,
    status: Mutex<Status>,
    serial: tokio::sync::Mutex<()>,
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Reloader {
    /// A reloader of `path` (the file the running `config` came from) into `state`.
    /// `tls` holds the running TLS listeners' certificates, re-read on every reload.
    pub fn new(state: Arc<ProxyState>, path: PathBuf, tls: Arc<TlsListeners>) -> Reloader {
        Metrics::global().config_generation.set(1);
        Reloader {
            state,
            path,
            tls,
            status: Mutex::new(Status {
                generation: 1,
                loaded_at: SystemTime::now(),
                last_attempt: None,
                last_error: None,
            }),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads, validates and installs the config file. On success returns the new generation;
    /// on failure the running config stays and the error (`FILE:LINE:COLUMN: ...`) is returned.
    pub async fn reload(&self, trigger: Trigger) -> Result<u64, String> {
        let _one_at_a_time = self.serial.lock().await;
        let path = self.path.clone();
        let tls = self.tls.clone();
        // Reading and validating is blocking file work; keep it off the async workers.
        // Certificates are swapped only when the whole file is good, and the file is installed
        // only when every certificate loaded.
        let loaded = tokio::task::spawn_blocking(move || {
            let config = tether_config::load(&path).map_err(|errors| errors.to_string())?;
            tls.reload(&config)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(config)
        })
        .await
        .map_err(|e| format!("config loader failed: {e}"))
        .and_then(|r| r);
        let metrics = Metrics::global();
        let now = SystemTime::now();
        match loaded {
            Ok(config) => {
                self.warn_about_restart_only_changes(&config);
                self.state.install(&config);
                let mut status = self.status();
                status.generation += 1;
                status.loaded_at = now;
                status.last_attempt = Some(now);
                status.last_error = None;
                metrics.config_reloads.with_label_values(&["success"]).inc();
                metrics.config_generation.set(status.generation as i64);
                tracing::info!(
                    ?trigger,
                    generation = status.generation,
                    "config reloaded: {}",
                    config.summary()
                );
                Ok(status.generation)
            }
            Err(error) => {
                let mut status = self.status();
                status.last_attempt = Some(now);
                status.last_error = Some(error.clone());
                metrics.config_reloads.with_label_values(&["failure"]).inc();
                tracing::error!(
                    ?trigger,
                    "config reload failed, still serving generation {}:\n{error}",
                    status.generation
                );
                Err(error)
            }
        }
    }

    /// Listener addresses, the admin listener, threads, the grace period, the keep-alive
    /// request cap and the HTTP/2 limits are bound at start; say so. (Limits, trusted proxies, the access log and
    /// certificates follow the reload.)
    fn warn_about_restart_only_changes(&self, new: &Config) {
        let old = self.state.current();
        let addresses = |c: &Config| -> Vec<_> {
            c.listeners
                .iter()
                .map(|l| (l.address, l.tls.is_some()))
                .collect()
        };
        let (o, n) = (&old.config.server, &new.server);
        if addresses(&old.config) != addresses(new)
            || old.config.admin != new.admin
            || o.threads != n.threads
            || o.grace_period != n.grace_period
            || o.limits.max_requests_per_connection != n.limits.max_requests_per_connection
            || o.limits.max_concurrent_streams != n.limits.max_concurrent_streams
        {
            tracing::warn!(
                "listener addresses, admin, threads, grace_period, \
                 max_requests_per_connection and HTTP/2 limits change only on restart or \
                 binary upgrade; everything else was reloaded"
            );
        }
    }

    /// `GET /config/status` as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let status = self.status().clone();
        json!({
            "file": self.path.display().to_string(),
            "generation": status.generation,
            "loaded_at_unix": unix_seconds(status.loaded_at),
            "last_attempt_unix": status.last_attempt.map(unix_seconds),
            "last_result": if status.last_attempt.is_none() { "none" } else if status.last_error.is_some() { "failure" } else { "success" },
            "last_error": status.last_error,
        })
    }
}

/// Reloads on SIGHUP. (Until this service runs, SIGHUP is ignored rather than fatal: see `run`.)
pub struct SighupReload(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for SighupReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot listen for SIGHUP: {e}");
                    return;
                }
            };
        loop {
            tokio::select! {
                _ = hangups.recv() => { let _ = self.0.reload(Trigger::Signal).await; }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Reloads when the config file changes (`run --watch`): polls its contents' hash, and waits
/// for the file to stay unchanged for a moment (editors write in steps).
pub struct WatchReload {
    reloader: Arc<Reloader>,
    /// The file as it was when the proxy was built from it. Taken then, not when the watch
    /// service starts: that can be after the proxy already serves, and a change made in
    /// between would become the baseline and never be loaded.
    loaded: Option<u64>,
}

impl WatchReload {
    /// Watches the file `reloader` loads, as it is now.
    pub fn new(reloader: Arc<Reloader>) -> WatchReload {
        let loaded = fingerprint(&reloader.path);
        WatchReload { reloader, loaded }
    }
}

const WATCH_INTERVAL: Duration = Duration::from_millis(250);

fn fingerprint(path: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

#[async_trait]
impl BackgroundService for WatchReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let path = self.reloader.path.clone();
        let mut seen = self.loaded;
        let mut pending: Option<Option<u64>> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let now = fingerprint(&path);
            match pending {
                // Debounce: reload once the new contents held still for one interval.
                Some(candidate) if candidate == now => {
                    pending = None;
                    seen = now;
                    let _ = self.reloader.reload(Trigger::Watch).await;
                }
                _ if now != seen => pending = Some(now),
                _ => pending = None,
            }
        }
    }
}
