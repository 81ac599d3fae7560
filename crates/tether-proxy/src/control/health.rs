//! Active health checks: probes each backend of every upstream that has a `health_check`, with
//! Pingora's own TCP and HTTP checkers, and flips `BackendState::up` after `healthy_after`
//! successes or `unhealthy_after` failures. Backends count as up until their first verdict.

use crate::metrics::Metrics;
use crate::state::{Availability, ProxyState};
use async_trait::async_trait;
use pingora::lb::health_check::{HealthCheck as Probe, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::Backend;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tether_config::{HealthCheck, HealthCheckKind};
use tokio::time::Instant;

/// Consecutive results of one backend, keyed by upstream name and address so they survive reloads.
#[derive(Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

/// The background service running all health checks.
pub struct HealthChecker {
    state: Arc<ProxyState>,
}

impl HealthChecker {
    /// Health checks for whatever upstreams `state` holds at each round.
    pub fn new(state: Arc<ProxyState>) -> HealthChecker {
        HealthChecker { state }
    }
}

/// A probe for one backend. Built once per backend and check and then reused: building one
/// makes a Pingora connector, which (with TLS compiled in) loads the system's CA certificates.
type SharedProbe = Arc<dyn Probe + Send + Sync>;

fn probe_for(check: &HealthCheck, address: SocketAddr) -> SharedProbe {
    match &check.kind {
        HealthCheckKind::Tcp => {
            let mut probe = TcpHealthCheck::new();
            probe.peer_template.options.connection_timeout = Some(check.timeout);
            Arc::new(*probe)
        }
        HealthCheckKind::Http {
            path,
            expect_status,
        } => {
            let mut probe = HttpHealthCheck::new(&address.to_string(), false);
            probe.peer_template.options.connection_timeout = Some(check.timeout);
            probe.peer_template.options.read_timeout = Some(check.timeout);
            match path.parse::<http::Uri>() {
                Ok(uri) => probe.req.set_uri(uri),
                Err(e) => tracing::warn!("health check path {path}: {e}"),
            }
            let expected = *expect_status;
            probe.validator = Some(Box::new(move |resp| {
                if resp.status.as_u16() == expected {
                    Ok(())
                } else {
                    pingora::Error::e_explain(
                        pingora::ErrorType::CustomCode("unexpected status", resp.status.as_u16()),
                        "during http health check",
                    )
                }
            }));
            Arc::new(probe)
        }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut streaks: HashMap<(String, SocketAddr), Streak> = HashMap::new();
        let mut due: HashMap<String, Instant> = HashMap::new();
        let mut built: HashMap<(String, SocketAddr), (HealthCheck, SharedProbe)> = HashMap::new();
        loop {
            let installed = self.state.current();
            let now = Instant::now();
            let mut next_wake = now + Duration::from_secs(1);
            let mut probes = tokio::task::JoinSet::new();
            for (index, upstream) in installed.router.upstreams().iter().enumerate() {
                let Some(check) = installed
                    .config_upstream(index)
                    .and_then(|u| u.health_check.clone())
                else {
                    continue;
                };
                let when = due.entry(upstream.name.clone()).or_insert(now);
                if *when > now {
                    next_wake = next_wake.min(*when);
                    continue;
                }
                *when = now + check.interval;
                next_wake = next_wake.min(*when);
                for backend in &upstream.backends {
                    let backend = backend.clone();
                    let check = check.clone();
                    let name = upstream.name.clone();
                    let slot = built
                        .entry((name.clone(), backend.address))
                        .or_insert_with(|| (check.clone(), probe_for(&check, backend.address)));
                    if slot.0 != check {
                        *slot = (check.clone(), probe_for(&check, backend.address));
                    }
                    let probe = slot.1.clone();
                    probes.spawn(async move {
                        let target = Backend {
                            addr: pingora::protocols::l4::socket::SocketAddr::Inet(backend.address),
                            weight: 1,
                            ext: Default::default(),
                        };
                        let result =
                            tokio::time::timeout(check.timeout, probe.check(&target)).await;
                        let ok = matches!(result, Ok(Ok(())));
                        (name, backend, check, ok)
                    });
                }
            }
            // Forget probes of backends a reload removed.
            let current: std::collections::HashSet<(&str, SocketAddr)> = installed
                .router
                .upstreams()
                .iter()
                .flat_map(|u| u.backends.iter().map(|b| (u.name.as_str(), b.address)))
                .collect();
            built.retain(|(name, address), _| current.contains(&(name.as_str(), *address)));
            while let Some(done) = probes.join_next().await {
                let Ok((name, backend, check, ok)) = done else {
                    continue;
                };
                let streak = streaks.entry((name.clone(), backend.address)).or_default();
                if ok {
                    streak.successes += 1;
                    streak.failures = 0;
                } else {
                    streak.failures += 1;
                    streak.successes = 0;
                }
                let address = backend.address.to_string();
                Metrics::global()
                    .health_checks
                    .with_label_values(&[
                        name.as_str(),
                        &address,
                        if ok { "success" } else { "failure" },
                    ])
                    .inc();
                let was_up = backend.up.load(Ordering::Relaxed);
                if was_up && streak.failures >= check.unhealthy_after {
                    tracing::warn!(upstream = %name, backend = %address, "backend is down");
                    self.state
                        .set_availability(&name, &backend, Availability::Up(false));
                } else if !was_up && streak.successes >= check.healthy_after {
                    tracing::info!(upstream = %name, backend = %address, "backend is up");
                    self.state
                        .set_availability(&name, &backend, Availability::Up(true));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_wake) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
