//! A new document's placement agreed with the fleet before its first request goes anywhere
//! (`bounded_load` over etcd discovery; see `crate::fleet`). Both engines call [`settle`]
//! right after routing.

use crate::state::{Installed, ProxyState};
use std::sync::atomic::{AtomicU64, Ordering};
use tether_routing::{Chosen, Decision};

/// When a failed agreement was last logged (seconds on the routing clock), so an etcd outage
/// logs once a second, not once per new document.
static LAST_WARNING: AtomicU64 = AtomicU64::new(0);

/// Returns `decision` with its backend replaced by the one the fleet agreed on when it placed
/// a new document. Without etcd answering, the placement stays this instance's own (the
/// document may then be placed differently by another instance; logged).
pub async fn settle(state: &ProxyState, installed: &Installed, mut decision: Decision) -> Decision {
    if decision.chosen != Chosen::NewPlacement {
        return decision;
    }
    decision.chosen = Chosen::Placement;
    let (Some(key), Some(upstream)) = (
        decision.key.as_deref(),
        installed.router.upstreams().get(decision.upstream),
    ) else {
        return decision;
    };
    let Some(fleet) = state.fleet(&upstream.name) else {
        return decision;
    };
    let now = tether_routing::clock();
    match fleet.place(key, decision.address).await {
        Ok(agreed) => {
            upstream.placements.adopt(key, agreed, now);
            let at = upstream.backend_index(agreed);
            if let Some(index) = at.filter(|&i| upstream.backends[i].is_available()) {
                decision.backend = index;
                decision.address = agreed;
            }
        }
        Err(e) => {
            upstream.placements.adopt(key, decision.address, now);
            let second = now / 1000;
            if LAST_WARNING.swap(second, Ordering::Relaxed) != second {
                tracing::warn!(
                    upstream = %upstream.name,
                    "placing a new document without the fleet's agreement: {e}"
                );
            }
        }
    }
    decision
}
