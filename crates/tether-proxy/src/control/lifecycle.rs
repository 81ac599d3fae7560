//! Graceful stop: once Pingora stops accepting (SIGTERM, or SIGQUIT after the listening sockets
//! went to the new process), end every stream — WebSockets get close code 1001 "going away" —
//! let requests in flight finish, and exit as soon as nothing is left, or at `grace_period`.
//!
//! Pingora by itself sleeps the whole grace period even when idle; exiting here, once the
//! process is quiet, is what makes a stop take as long as the work left and no longer.

use crate::state::ProxyState;
use crate::streams::CloseReason;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long the proxy must have had nothing in flight before it exits: covers a request that
/// was already on its way over an idle keep-alive connection when the stop began.
const QUIET_FOR: Duration = Duration::from_millis(250);
const POLL: Duration = Duration::from_millis(20);

/// The background service that ends the process when a graceful stop has drained.
pub struct GracefulExit {
    state: Arc<ProxyState>,
    grace_period: Duration,
}

impl GracefulExit {
    /// Drains `state` for at most `grace_period` after a graceful stop begins.
    pub fn new(state: Arc<ProxyState>, grace_period: Duration) -> GracefulExit {
        GracefulExit {
            state,
            grace_period,
        }
    }

    fn close_streams(&self) -> usize {
        let streams = self.state.registry.snapshot();
        for stream in &streams {
            stream.control.close(CloseReason::Shutdown);
        }
        streams.len()
    }
}

#[async_trait]
impl BackgroundService for GracefulExit {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() || !*shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let streams = self.close_streams();
        tracing::info!(
            streams,
            in_flight = self.state.in_flight(),
            "stopping: no new connections; ending streams and waiting for requests in flight"
        );
        let mut quiet_since: Option<Instant> = None;
        loop {
            // Streams opened by requests that were already being routed get closed too.
            if !self.state.registry.is_empty() {
                self.close_streams();
            }
            let idle = self.state.in_flight() == 0 && self.state.registry.is_empty();
            let now = Instant::now();
            quiet_since = if idle {
                quiet_since.or(Some(now))
            } else {
                None
            };
            if quiet_since.is_some_and(|t| now - t >= QUIET_FOR) {
                tracing::info!(after = ?started.elapsed(), "drained, exiting");
                std::process::exit(0);
            }
            if now - started >= self.grace_period {
                tracing::warn!(
                    in_flight = self.state.in_flight(),
                    "grace period over, exiting with requests in flight"
                );
                std::process::exit(0);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
