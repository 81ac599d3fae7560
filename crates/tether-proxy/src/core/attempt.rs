//! The backend attempt of a routed request, the same for both engines: the owner walk (the
//! decision's backend first, then the next owners while the route's `retries` allow), the
//! connect with its timeout, the `active` count a request holds on its backend, and the one
//! place that decides what a backend did wrong ([`Fault`]) and reports it to passive health.

use crate::passive;
use crate::state::{Active, Installed, ProxyState};
use crate::streams::{AtLimit, Registration, StreamKind};
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_routing::{BackendState, Decision};
use tokio::net::TcpStream;

/// Whether a request with `method` may be sent twice: again on a fresh connection when a kept
/// one turns out stale, or to the next owner when a fresh one is closed unanswered (RFC 9110
/// 9.2.2: the idempotent methods Tether forwards).
pub(crate) fn replayable_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE")
}

/// What went wrong with a backend during an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection was refused, or the connect timed out.
    Connect,
    /// A fresh connection was reset or closed before the response was complete.
    Reset,
    /// The response was not valid HTTP.
    BrokenResponse,
    /// No response within the route's `timeouts.read`.
    Timeout,
    /// A kept-alive connection from the pool turned out closed: the backend closing an idle
    /// connection is its right, not a fault.
    Stale,
}

impl Fault {
    /// Whether the fault counts towards passive ejection. A timeout counts only where
    /// `passive.timeouts` says so: one slow endpoint must not let clients eject a backend.
    pub fn counts(self, passive: &tether_config::Passive) -> bool {
        match self {
            Fault::Connect | Fault::Reset | Fault::BrokenResponse => true,
            Fault::Timeout => passive.timeouts,
            Fault::Stale => false,
        }
    }
}

/// One routed request's way through its backends.
pub struct Attempt {
    /// The routing state the request started on; it finishes on it even across a reload.
    pub installed: Arc<Installed>,
    /// Where the router sent it.
    pub decision: Decision,
    /// Backend indices tried so far (the last one is the current). Inline: most requests try
    /// one backend, and this spares an allocation per request.
    tried: SmallVec<[usize; 4]>,
    /// The `active` count held on the current backend.
    holding: Option<Active>,
    /// When the current connection attempt began.
    connect_started: Option<Instant>,
}

impl Attempt {
    /// The attempt of a request routed by `decision` on `installed`.
    pub fn new(installed: Arc<Installed>, decision: Decision) -> Attempt {
        Attempt {
            installed,
            decision,
            tried: SmallVec::new(),
            holding: None,
            connect_started: None,
        }
    }

    /// Moves to the next backend: the decision's backend first, then (a retry) the next owner
    /// not tried yet. Counts it in the backend's `active` (releasing the previous one). None
    /// when no backend is left.
    pub fn next_backend(&mut self) -> Option<Arc<BackendState>> {
        let router = &self.installed.router;
        let retry = !self.tried.is_empty();
        let index = if retry {
            router.next_backend(&self.decision, &self.tried)?
        } else {
            self.decision.backend
        };
        let backend = router.upstreams()[self.decision.upstream]
            .backends
            .get(index)?
            .clone();
        if retry {
            self.installed
                .counters
                .route(Some(self.decision.route))
                .retried();
        }
        self.tried.push(index);
        self.holding = Some(Active::new(backend.clone()));
        self.connect_started = Some(Instant::now());
        Some(backend)
    }

    /// After a fresh connection to the current backend failed before any byte of a response
    /// (a backend killed or restarting with the request on it): a [`Fault::Reset`], and the
    /// next owner to send a request that may be sent twice to, while the retries allow (as
    /// nginx's `proxy_next_upstream error` does for idempotent requests). None: 502.
    pub fn next_after_reset(&mut self, state: &Arc<ProxyState>) -> Option<Arc<BackendState>> {
        self.fault(state, Fault::Reset);
        if !self.may_retry() {
            return None;
        }
        self.next_backend()
    }

    /// Whether another backend may be tried (the route's `retries`).
    pub fn may_retry(&self) -> bool {
        let retries = self.installed.router.routes()[self.decision.route].retries as usize;
        self.tried.len() <= retries
    }

    /// The index of the backend tried last.
    pub fn backend_index(&self) -> Option<usize> {
        self.tried.last().copied()
    }

    /// The backend tried last.
    pub fn backend(&self) -> Option<&Arc<BackendState>> {
        self.installed.router.upstreams()[self.decision.upstream]
            .backends
            .get(*self.tried.last()?)
    }

    /// Hands the `active` count over to whoever outlives the request (a tunnel).
    pub fn take_active(&mut self) -> Option<Active> {
        self.holding.take()
    }

    /// The upstream's connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.installed
            .config_upstream(self.decision.upstream)
            .map_or(Duration::from_secs(1), |u| u.connect_timeout)
    }

    /// Registers the stream this attempt opens on `backend` (a WebSocket, SSE or long-poll),
    /// within its route's `limits.streams_per_key`.
    pub fn register_stream(
        &self,
        state: &ProxyState,
        kind: StreamKind,
        backend: &Arc<BackendState>,
    ) -> Result<Registration, AtLimit> {
        let router = &self.installed.router;
        let route = &router.routes()[self.decision.route];
        state.registry.register(
            Arc::from(route.name.as_str()),
            Arc::from(router.upstreams()[self.decision.upstream].name.as_str()),
            self.decision.key.as_deref().map(Arc::from),
            backend,
            kind,
            route.limits.streams_per_key,
        )
    }

    /// A kept connection to `backend` from the pool when `reuse` allows and one is there,
    /// else a new one (see [`connect`](Self::connect), which may move `backend` on to the
    /// next owner): the socket, and whether it was kept (a kept one may turn out stale).
    pub async fn take_or_connect(
        &mut self,
        state: &Arc<ProxyState>,
        backend: &mut Arc<BackendState>,
        reuse: bool,
        started: Instant,
    ) -> Option<(TcpStream, bool)> {
        if reuse {
            if let Some(socket) = state.pool.take(backend.address, started) {
                self.connected();
                return Some((socket, true));
            }
        }
        let (socket, connected) = self.connect(state, backend.clone()).await?;
        *backend = connected;
        Some((socket, false))
    }

    /// Opens a new connection, starting with `backend` (the current attempt). A failed
    /// connect is a [`Fault::Connect`] and moves on to the next owner while the retries
    /// allow. None when every attempt failed (the client gets 502).
    pub async fn connect(
        &mut self,
        state: &Arc<ProxyState>,
        mut backend: Arc<BackendState>,
    ) -> Option<(TcpStream, Arc<BackendState>)> {
        let connect_timeout = self.connect_timeout();
        loop {
            let connect = TcpStream::connect(backend.address);
            match tokio::time::timeout(connect_timeout, connect).await {
                Ok(Ok(socket)) => {
                    self.connected();
                    // Requests and WebSocket messages are small and latency-bound.
                    let _ = socket.set_nodelay(true);
                    return Some((socket, backend));
                }
                Ok(Err(e)) => tracing::debug!(backend = %backend.address, "connect failed: {e}"),
                Err(_) => tracing::debug!(backend = %backend.address, "connect timed out"),
            }
            self.fault(state, Fault::Connect);
            if !self.may_retry() {
                return None;
            }
            backend = self.next_backend()?;
        }
    }

    /// Counts the connect time of the current attempt in the route's metrics.
    pub fn connected(&mut self) {
        if let Some(t) = self.connect_started.take() {
            self.installed
                .counters
                .route(Some(self.decision.route))
                .connected_in(t.elapsed());
        }
    }

    /// Reports what the current backend did wrong; passive health decides what follows.
    pub fn fault(&self, state: &Arc<ProxyState>, fault: Fault) {
        let Some(backend) = self.backend() else {
            return;
        };
        let upstream = self.decision.upstream;
        let Some(passive) = self
            .installed
            .config_upstream(upstream)
            .and_then(|u| u.passive)
        else {
            return;
        };
        if fault.counts(&passive) {
            let name = &self.installed.router.upstreams()[upstream].name;
            passive::record_failure(state, name, Some(passive), backend);
        }
    }

    /// Reports that the current backend answered: its consecutive-failure count starts over.
    pub fn answered(&self) {
        if let Some(backend) = self.backend() {
            passive::record_success(backend);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_backend_did_wrong_counts_and_timeouts_only_when_asked() {
        let mut passive = tether_config::Passive::default();
        assert!(Fault::Connect.counts(&passive));
        assert!(Fault::Reset.counts(&passive));
        assert!(Fault::BrokenResponse.counts(&passive));
        assert!(!Fault::Stale.counts(&passive));
        assert!(!Fault::Timeout.counts(&passive));
        passive.timeouts = true;
        assert!(Fault::Timeout.counts(&passive));
    }
}
