//! Readiness helpers: a free port, and polling a condition against a deadline instead of sleeping.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_until`] and [`wait_until_async`] look again.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// A loopback port that was free a moment ago (bound to `127.0.0.1:0`, then released).
///
/// # Panics
/// If no loopback port can be bound at all; no end-to-end test can run then.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free_port()>`.
///
/// # Panics
/// As [`free_port`].
pub fn free_addr() -> SocketAddr {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr,
        Err(err) => panic!("cannot bind a loopback port: {err}"),
    }
}

/// Polls `condition` every 10 ms until it holds (`true`) or `deadline` has passed (`false`).
/// It is checked once more at the deadline, so a slow last step still counts.
pub async fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    wait_until_async(deadline, move || std::future::ready(condition())).await
}

/// [`wait_until`] for a condition that has to await, e.g. an HTTP request.
pub async fn wait_until_async<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = Instant::now() + deadline;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep_until((Instant::now() + POLL_EVERY).min(give_up)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_returns_true_as_soon_as_the_condition_holds() {
        let mut calls = 0;
        let started = Instant::now();
        let held = wait_until(Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        })
        .await;
        assert!(held);
        assert_eq!(calls, 3);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn wait_until_gives_up_at_the_deadline() {
        let started = Instant::now();
        assert!(!wait_until(Duration::from_millis(100), || false).await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[test]
    fn a_free_port_can_be_bound_again() {
        let port = free_port();
        assert_ne!(port, 0);
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    }
}
