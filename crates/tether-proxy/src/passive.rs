//! Passive ejection: consecutive faults of a backend (what `core::attempt::Fault` counts)
//! take it out of the ring for `passive.eject_for`; a response from it resets the count.

use crate::state::{Availability, ProxyState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_config::Passive;
use tether_routing::BackendState;

/// Records a fault of `backend` in `upstream`; ejects it at the threshold.
pub fn record_failure(
    state: &Arc<ProxyState>,
    upstream: &str,
    passive: Option<Passive>,
    backend: &Arc<BackendState>,
) {
    let Some(passive) = passive else { return };
    let failures = backend.failures.fetch_add(1, Ordering::AcqRel) + 1;
    if failures < passive.failures
        || !state.set_availability(upstream, backend, Availability::Ejected(true))
    {
        return;
    }
    tracing::warn!(
        upstream,
        backend = %backend.address,
        failures,
        eject_for = ?passive.eject_for,
        "backend ejected after consecutive failures"
    );
    let (state, backend, upstream) = (state.clone(), backend.clone(), upstream.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(passive.eject_for).await;
        backend.failures.store(0, Ordering::Release);
        tracing::info!(upstream, backend = %backend.address, "ejection over");
        state.set_availability(&upstream, &backend, Availability::Ejected(false));
    });
}

/// Records that `backend` answered: its consecutive-failure count starts over.
pub fn record_success(backend: &BackendState) {
    // Load first so the common case does not write a shared cache line.
    if backend.failures.load(Ordering::Relaxed) != 0 {
        backend.failures.store(0, Ordering::Relaxed);
    }
}
