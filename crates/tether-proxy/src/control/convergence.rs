//! Convergence: whenever the owner function of an upstream changes (health flip, passive
//! ejection, drain, config change, discovery membership change), close exactly the open streams whose key now has another
//! owner, oldest first, at no more than `rebalance.max_per_second` per upstream. Clients
//! reconnect and land on the new owner; no other stream is touched.
//!
//! Also keeps the `split_keys` gauge: keys with open streams on more than one backend.

use crate::metrics::Metrics;
use crate::state::ProxyState;
use crate::streams::{CloseReason, StreamInfo};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The convergence loop: woken by `ProxyState::owner_changed`, and every half second anyway.
pub struct Convergence {
    state: Arc<ProxyState>,
}

/// How often `split_keys` is recomputed when nothing else happens.
const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// Token bucket per upstream: `max_per_second` closes per second, bursts up to one second's worth.
struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate.max(1));
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn wait(&self, rate: u32) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / f64::from(rate.max(1)))
    }
}

impl Convergence {
    /// Convergence over the streams of `state`'s registry, judged by its current router.
    pub fn new(state: Arc<ProxyState>) -> Convergence {
        Convergence { state }
    }

    /// Streams whose key is now owned by another backend, oldest first, with their upstream's
    /// rate limit and close code.
    fn moved_streams<'a>(&self, streams: &'a [StreamInfo]) -> Vec<(&'a StreamInfo, u32)> {
        let installed = self.state.current();
        let router = &installed.router;
        let mut moved = Vec::new();
        for stream in streams {
            let Some(key) = &stream.key else { continue };
            if stream.control.is_closing() {
                continue;
            }
            let Some(index) = router.upstream_index(&stream.upstream) else {
                // Its upstream was removed by a reload: the key has no owner there any more.
                let defaults = tether_config::Rebalance::default();
                moved.push((stream, defaults.max_per_second));
                continue;
            };
            let Some(upstream) = installed.config_upstream(index) else {
                continue;
            };
            if !upstream.rebalance.enabled {
                continue;
            }
            // No owner at all (every backend down): leave streams where they are.
            let Some(owner) = router.owner(index, key) else {
                continue;
            };
            if router.upstreams()[index].backends[owner].address != stream.backend {
                moved.push((stream, upstream.rebalance.max_per_second));
            }
        }
        moved
    }

    /// Closes moved streams within each upstream's budget; returns how long to wait before
    /// more may be closed (None when nothing is left to close).
    fn close_moved(
        &self,
        streams: &[StreamInfo],
        budgets: &mut HashMap<Arc<str>, Budget>,
    ) -> Option<Duration> {
        let now = Instant::now();
        let mut wait: Option<Duration> = None;
        for (stream, rate) in self.moved_streams(streams) {
            let budget = budgets.entry(stream.upstream.clone()).or_insert(Budget {
                tokens: f64::from(rate.max(1)),
                last: now,
            });
            if budget.take(rate, now) {
                tracing::info!(
                    upstream = %stream.upstream,
                    backend = %stream.backend,
                    kind = stream.kind.as_str(),
                    "closing stream whose key moved to another backend"
                );
                stream.control.close(CloseReason::Rebalance);
            } else {
                let w = budget.wait(rate);
                wait = Some(wait.map_or(w, |old| old.min(w)));
            }
        }
        wait
    }

    /// Renews the `bounded_load` placements of documents with open streams, so a placement
    /// holds while its document has streams, and forgets the ones idle past `linger`.
    fn hold_placements(&self, streams: &[StreamInfo]) {
        let installed = self.state.current();
        for upstream in installed.router.upstreams() {
            let keys = streams
                .iter()
                .filter(|s| *s.upstream == *upstream.name)
                .filter_map(|s| s.key.as_deref());
            let expired = upstream.hold_placements(keys);
            if expired.is_empty() || !upstream.shares_placements() {
                continue;
            }
            // The ones this instance made leave etcd too.
            if let Some(fleet) = self.state.fleet(&upstream.name) {
                tokio::spawn(async move { fleet.forget(expired).await });
            }
        }
    }

    /// Sets `split_keys{upstream}`: keys with open streams on more than one backend.
    fn update_split_keys(&self, streams: &[StreamInfo], known_upstreams: &mut HashSet<Arc<str>>) {
        let mut backends_of: HashMap<(Arc<str>, Arc<str>), HashSet<SocketAddr>> = HashMap::new();
        for stream in streams {
            if let Some(key) = &stream.key {
                known_upstreams.insert(stream.upstream.clone());
                backends_of
                    .entry((stream.upstream.clone(), key.clone()))
                    .or_default()
                    .insert(stream.backend);
            }
        }
        let mut split: HashMap<&str, i64> = HashMap::new();
        for ((upstream, _), backends) in &backends_of {
            if backends.len() > 1 {
                *split.entry(upstream).or_default() += 1;
            }
        }
        let gauge = &Metrics::global().split_keys;
        for upstream in known_upstreams.iter() {
            gauge
                .with_label_values(&[upstream])
                .set(split.get(&**upstream).copied().unwrap_or(0));
        }
    }
}

#[async_trait]
impl BackgroundService for Convergence {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut budgets = HashMap::new();
        let mut known_upstreams = HashSet::new();
        for upstream in self.state.current().router.upstreams() {
            known_upstreams.insert(Arc::from(upstream.name.as_str()));
        }
        loop {
            // One copy of the registry per round serves both jobs.
            let streams = self.state.registry.snapshot();
            self.hold_placements(&streams);
            let retry_in = self.close_moved(&streams, &mut budgets);
            self.update_split_keys(&streams, &mut known_upstreams);
            let sleep = retry_in.unwrap_or(GAUGE_INTERVAL).min(GAUGE_INTERVAL);
            tokio::select! {
                _ = self.state.owners_changed() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
