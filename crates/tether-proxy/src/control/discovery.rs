//! Discovery glue: runs one membership source (`tether-discovery`) per upstream that has
//! `discovery:`, and installs every new member set through the same path as a config reload,
//! so health state, metrics and convergence behave exactly as when a reload changes backends.
//! Sources follow reloads: a new or changed `discovery:` starts its source, a removed one stops.

use crate::metrics::Metrics;
use crate::state::{DiscoveryStatus, ProxyState};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_config::{Backend, Discovery};
use tether_discovery::{PlacementEvent, Snapshot, Source};
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

/// How often the config in force is compared with the running sources (reloads are rare).
const RECONCILE_EVERY: Duration = Duration::from_millis(250);

/// The background service that keeps discovery upstreams' backends current.
pub struct DiscoveryService {
    state: Arc<ProxyState>,
}

/// One running source and the task applying its snapshots.
struct Running {
    spec: Discovery,
    follower: JoinHandle<()>,
}

impl DiscoveryService {
    /// Discovery for the upstreams of `state`'s config, now and after reloads.
    pub fn new(state: Arc<ProxyState>) -> DiscoveryService {
        DiscoveryService { state }
    }
}

/// Applies each snapshot of `source` to `upstream` until aborted, and follows the fleet's
/// placements when the source reports them.
async fn follow(state: Arc<ProxyState>, upstream: String, spec: Discovery, mut source: Source) {
    // Ends with this follower (an aborted follower drops the handle).
    let _placements = source.take_placements().map(|events| {
        AbortOnDropHandle::new(tokio::spawn(follow_placements(
            state.clone(),
            upstream.clone(),
            events,
        )))
    });
    follow_members(state, upstream, spec, source).await
}

/// Takes the fleet's placements of `upstream` as its watch reports them: each is adopted (a
/// document this instance placed otherwise moves to the agreed backend, and convergence moves
/// its streams); a removed one this instance still has streams of is placed again.
async fn follow_placements(
    state: Arc<ProxyState>,
    upstream: String,
    mut events: tokio::sync::mpsc::UnboundedReceiver<PlacementEvent>,
) {
    while let Some(event) = events.recv().await {
        let installed = state.current();
        let Some(up) = installed.router.upstream(&upstream) else {
            continue;
        };
        let now = tether_routing::clock();
        let mut moved = false;
        match event {
            PlacementEvent::Loaded(all) => {
                for (key, backend) in &all {
                    moved |= up.placements.adopt(key, *backend, now);
                }
            }
            PlacementEvent::Placed(key, backend) => moved = up.placements.adopt(&key, backend, now),
            PlacementEvent::Removed(key) => {
                let held = up.placements.get(&key);
                match (held, state.fleet(&upstream)) {
                    (Some(backend), Some(fleet)) if state.registry.open_of(&upstream, &key) > 0 => {
                        if let Ok(agreed) = fleet.place(&key, backend).await {
                            moved = up.placements.adopt(&key, agreed, now);
                        }
                    }
                    _ => up.placements.remove(&key),
                }
            }
        }
        if moved {
            // Streams this instance opened elsewhere follow the agreed placement.
            state.placements_changed();
        }
    }
}

/// Applies each snapshot of `source` to `upstream` until aborted.
async fn follow_members(state: Arc<ProxyState>, upstream: String, spec: Discovery, source: Source) {
    let mut snapshots = source.subscribe();
    let mut seen = Snapshot::default();
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        apply(&state, &upstream, &spec, &seen, &snapshot);
        seen = snapshot;
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

fn apply(state: &ProxyState, upstream: &str, spec: &Discovery, seen: &Snapshot, now: &Snapshot) {
    let metrics = Metrics::global();
    metrics
        .discovery_up
        .with_label_values(&[upstream, spec.kind()])
        .set(i64::from(now.up));
    metrics
        .discovery_members
        .with_label_values(&[upstream])
        .set(now.members.len() as i64);
    // Counters mirror the source's own counts.
    let loads = now.full_loads.saturating_sub(seen.full_loads);
    metrics
        .discovery_full_loads
        .with_label_values(&[upstream])
        .inc_by(loads);
    let resumes = now.resumes.saturating_sub(seen.resumes);
    metrics
        .discovery_resumes
        .with_label_values(&[upstream])
        .inc_by(resumes);
    if now.loaded {
        let members: Vec<Backend> = now
            .members
            .iter()
            .map(|m| Backend {
                address: m.address,
                weight: m.weight,
            })
            .collect();
        if matches!(spec, Discovery::Etcd(_)) && state.replace_pins(upstream, &now.pins) {
            tracing::info!(upstream, pins = now.pins.len(), "pins changed in etcd");
        }
        if state.set_members(upstream, spec, members) {
            tracing::info!(
                upstream,
                source = spec.kind(),
                members = now.members.len(),
                "membership changed; ring rebuilt"
            );
        }
    }
    state.set_discovery_status(
        upstream,
        Some(DiscoveryStatus {
            source: spec.kind(),
            loaded: now.loaded,
            up: now.up,
            problem: now.problem.clone(),
            members: now.members.len(),
        }),
    );
}

fn forget(state: &ProxyState, upstream: &str, spec: &Discovery) {
    let metrics = Metrics::global();
    let _ = metrics
        .discovery_up
        .remove_label_values(&[upstream, spec.kind()]);
    let _ = metrics.discovery_members.remove_label_values(&[upstream]);
    state.set_discovery_status(upstream, None);
}

#[async_trait]
impl BackgroundService for DiscoveryService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut running: HashMap<String, Running> = HashMap::new();
        loop {
            let wanted: HashMap<String, Discovery> =
                self.state.discovery_specs().into_iter().collect();
            running.retain(|name, run| {
                let keep = wanted.get(name) == Some(&run.spec);
                if !keep {
                    run.follower.abort();
                    forget(&self.state, name, &run.spec);
                    tracing::info!(upstream = %name, "discovery source stopped");
                }
                keep
            });
            for (name, spec) in wanted {
                if running.contains_key(&name) {
                    continue;
                }
                tracing::info!(upstream = %name, source = spec.kind(), "discovery source started");
                Metrics::global()
                    .discovery_full_loads
                    .with_label_values(&[&name]);
                Metrics::global()
                    .discovery_resumes
                    .with_label_values(&[&name]);
                let source = Source::start(&spec);
                let follower = tokio::spawn(follow(
                    self.state.clone(),
                    name.clone(),
                    spec.clone(),
                    source,
                ));
                running.insert(name, Running { spec, follower });
            }
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                _ = shutdown.changed() => {
                    for run in running.values() {
                        run.follower.abort();
                    }
                    return;
                }
            }
        }
    }
}
