//! Readiness helpers: a free port, and polling a condition against a deadline instead of sleeping.

use std::collections::HashSet;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_until`] and [`wait_until_async`] look again.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// A loopback port that was free a moment ago and that no other caller in this process has
/// been given.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), so nothing that
/// binds port 0 or connects out (test backends, clients, Tether's upstream sockets) can take a
/// port between the moment it is handed out and the moment the process under test binds it. A
/// port handed out twice once let a Tether that failed to start look healthy, because another
/// test's Tether answered on "its" admin port.
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
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let (low, high) = port_pool();
    let span = u32::from(high - low);
    // Start where the process id points, so test binaries run side by side rarely meet.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(u32::from(low) + offset) else {
            continue;
        };
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(addr) = TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.local_addr()) {
            handed_out.insert(port);
            return addr;
        }
    }
    // The whole pool is taken: fall back to whatever the kernel gives.
    loop {
        match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) if handed_out.insert(addr.port()) => return addr,
            Ok(_) => continue,
            Err(err) => panic!("cannot bind a loopback port: {err}"),
        }
    }
}

/// The ports [`free_addr`] hands out: from 10000 up to the start of the ephemeral range.
fn port_pool() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOW + 1_000 {
        (LOW, ephemeral_low)
    } else {
        // An unusually wide ephemeral range: the pool overlaps it, and only the in-process
        // de-duplication is left.
        (LOW, u16::MAX)
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

    #[test]
    fn free_ports_are_never_handed_out_twice_and_stay_out_of_the_ephemeral_range() {
        let (low, high) = port_pool();
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|p| (low..high).contains(p)), "{ports:?}");
        if high == u16::MAX {
            return; // the pool overlaps the ephemeral range here (see `port_pool`)
        }
        // While a handed-out port is still unbound, a port-0 bind must not land on it.
        let kernel_picks: Vec<u16> = (0..200)
            .filter_map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .ok()
            })
            .map(|a| a.port())
            .collect();
        assert!(kernel_picks.iter().all(|p| !distinct.contains(p)));
    }
}
