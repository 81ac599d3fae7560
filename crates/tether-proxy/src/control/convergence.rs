//! Convergence: whenever the owner function of an upstream changes (health flip, passive
//! ejection, drain, config change, discovery membership change), close exactly the open streams whose key now has another
//! owner, oldest first, at no more than `rebalance.max_per_second` per upstream. Clients
//! reconnect and land on the new owner; no other stream is touched.
//!
//! Also keeps the `split_keys` gauge: keys with open streams on more than one backend.
//!
//! A round judges only the streams opened since the last one, unless owners may have changed
//! (a signalled change, a backend still ramping back, closes held back by the rate limit), so
//! a proxy holding many idle streams spends nothing on them between changes.

use crate::metrics::Metrics;
use crate::state::{Installed, ProxyState};
use crate::streams::{CloseReason, StreamInfo};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The convergence loop: woken by `ProxyState::owner_changed`, and every half second anyway.
pub struct Convergence {
    state: Arc<ProxyState>,
}

/// How often a round runs when nothing wakes it: new streams are judged and `split_keys` set.
const ROUND_INTERVAL: Duration = Duration::from_millis(500);

/// How often every stream is judged again even with no owner change signalled: a backstop
/// for a change that is not signalled, not the way changes are found.
const ALL_INTERVAL: Duration = Duration::from_secs(10);

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
    /// rate limit: of every open stream with `all`, else of those opened since the last round.
    fn moved_streams(&self, installed: &Installed, all: bool) -> Vec<(StreamInfo, u32)> {
        let router = &installed.router;
        // The rate limit of a stream found moved (None: it stays).
        let moved = |stream: &StreamInfo| -> Option<u32> {
            let key = stream.key.as_ref()?;
            if stream.control.is_closing() {
                return None;
            }
            let Some(index) = router.upstream_index(&stream.upstream) else {
                // Its upstream was removed by a reload: the key has no owner there any more.
                return Some(tether_config::Rebalance::default().max_per_second);
            };
            let upstream = installed.config_upstream(index)?;
            if !upstream.rebalance.enabled {
                return None;
            }
            // No owner at all (every backend down): leave streams where they are.
            let owner = router.owner(index, key)?;
            (router.upstreams()[index].backends[owner].address != stream.backend)
                .then_some(upstream.rebalance.max_per_second)
        };
        self.state.registry.judge(all, moved)
    }

    /// Closes moved streams within each upstream's budget; returns how long to wait before
    /// more may be closed (None when nothing is left to close).
    fn close_moved(
        &self,
        moved: Vec<(StreamInfo, u32)>,
        budgets: &mut HashMap<Arc<str>, Budget>,
    ) -> Option<Duration> {
        let now = Instant::now();
        let mut wait: Option<Duration> = None;
        for (stream, rate) in moved {
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
    fn hold_placements(&self, installed: &Installed) {
        let upstreams = installed.router.upstreams();
        if !upstreams.iter().any(|u| u.places_by_load()) {
            return;
        }
        let streams = self.state.registry.snapshot();
        for upstream in upstreams {
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

    /// Sets `split_keys{upstream}`: keys with open streams on more than one backend (counted
    /// by the registry as streams open and end).
    fn update_split_keys(&self, known_upstreams: &mut HashSet<Arc<str>>) {
        let split: HashMap<Arc<str>, i64> =
            self.state.registry.split_documents().into_iter().collect();
        known_upstreams.extend(split.keys().cloned());
        let gauge = &Metrics::global().split_keys;
        for upstream in known_upstreams.iter() {
            gauge
                .with_label_values(&[upstream])
                .set(split.get(upstream).copied().unwrap_or(0));
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
        // The owner generation the streams were last all judged at (none yet).
        let mut judged_at = None;
        let mut all_since = Instant::now();
        let mut held_back = false;
        loop {
            // Read before judging: a change signalled while judging makes the next round whole.
            let generation = self.state.owner_generation();
            let installed = self.state.current();
            let all = judged_at != Some(generation)
                || held_back
                || installed.router.owners_follow_clock()
                || all_since.elapsed() >= ALL_INTERVAL;
            if all {
                judged_at = Some(generation);
                all_since = Instant::now();
            }
            self.hold_placements(&installed);
            let moved = self.moved_streams(&installed, all);
            let retry_in = self.close_moved(moved, &mut budgets);
            held_back = retry_in.is_some();
            self.update_split_keys(&mut known_upstreams);
            drop(installed);
            let sleep = retry_in.unwrap_or(ROUND_INTERVAL).min(ROUND_INTERVAL);
            tokio::select! {
                _ = self.state.owners_changed() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
