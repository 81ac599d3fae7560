//! Idle keep-alive connections to backends, for the HTTP/1 engine (`crate::h1`).
//!
//! A stack per backend address: the connection used last is reused first (it is the least
//! likely to have been closed by the backend's idle timeout). Taking one checks that the
//! backend has not closed it or sent anything while it idled; that check costs no syscall
//! unless the reactor saw the socket become readable.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per backend; the oldest goes first beyond this.
const MAX_IDLE_PER_BACKEND: usize = 128;
/// An idle connection older than this is closed instead of reused (backends commonly close
/// theirs after 60 s or less; nginx's upstream keep-alive default is 60 s).
const MAX_IDLE_TIME: Duration = Duration::from_secs(30);

struct Idle {
    socket: TcpStream,
    since: Instant,
}

/// Idle upstream connections by backend address.
#[derive(Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, BuildHasherDefault<AddrHasher>>>,
}

/// FNV-1a: the map is looked up twice per request, and its keys are backend addresses from
/// the config, not attacker-chosen, so SipHash's flood resistance buys nothing here.
struct AddrHasher(u64);

impl Default for AddrHasher {
    fn default() -> AddrHasher {
        AddrHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl UpstreamPool {
    /// An idle connection to `backend` that still looks usable, if there is one. `now` is a
    /// recent clock reading the caller already has (the pool reads no clock of its own).
    pub fn take(&self, backend: SocketAddr, now: Instant) -> Option<TcpStream> {
        loop {
            let idle = {
                let mut pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                pools.get_mut(&backend)?.pop()?
            };
            if now.saturating_duration_since(idle.since) > MAX_IDLE_TIME {
                // Everything under it on the stack is older still.
                self.forget(backend);
                return None;
            }
            // A backend that closed the connection (or sent something unasked) while it
            // idled made it readable; a live idle connection has nothing to read.
            let mut probe = [0u8; 1];
            match idle.socket.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(idle.socket),
                _ => continue,
            }
        }
    }

    /// Keeps `socket`, whose last response ended cleanly, for the next request to `backend`;
    /// it counts as idle from `since`.
    pub fn put(&self, backend: SocketAddr, socket: TcpStream, since: Instant) {
        let evicted = {
            let mut pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let stack = pools.entry(backend).or_default();
            stack.push(Idle { socket, since });
            (stack.len() > MAX_IDLE_PER_BACKEND).then(|| stack.remove(0))
        };
        // Closed outside the lock.
        drop(evicted);
    }

    /// Closes every idle connection to `backend`.
    fn forget(&self, backend: SocketAddr) {
        let stale = {
            let mut pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            pools.remove(&backend)
        };
        drop(stale);
    }

    /// How many idle connections are kept for `backend`.
    #[cfg(test)]
    fn idle_count(&self, backend: SocketAddr) -> usize {
        let pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(&backend).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_live_connection_comes_back_and_one_the_backend_closed_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = UpstreamPool::default();

        let live = TcpStream::connect(addr).await.unwrap();
        let (_live_server, _) = listener.accept().await.unwrap();
        pool.put(addr, live, Instant::now());
        assert_eq!(pool.idle_count(addr), 1);
        let taken = pool
            .take(addr, Instant::now())
            .expect("the live connection");
        assert!(pool.take(addr, Instant::now()).is_none());

        pool.put(addr, taken, Instant::now());
        let dying = TcpStream::connect(addr).await.unwrap();
        let (mut dying_server, _) = listener.accept().await.unwrap();
        pool.put(addr, dying, Instant::now());
        dying_server.shutdown().await.unwrap();
        drop(dying_server);
        // The reactor has to see the close before the pool can; poll until it does.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let readable = {
                let pools = pool.idle.lock().unwrap();
                let top = pools[&addr].last().unwrap();
                let mut probe = [0u8; 1];
                !matches!(top.socket.try_read(&mut probe), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
            };
            if readable || Instant::now() > deadline {
                break;
            }
            tokio::task::yield_now().await;
        }
        // The closed one (on top) is skipped and dropped; the live one under it comes back.
        assert!(pool.take(addr, Instant::now()).is_some());
        assert_eq!(pool.idle_count(addr), 0);
    }

    #[tokio::test]
    async fn a_connection_idle_longer_than_the_limit_is_closed_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = UpstreamPool::default();
        let socket = TcpStream::connect(addr).await.unwrap();
        let (_server, _) = listener.accept().await.unwrap();
        let since = Instant::now();
        pool.put(addr, socket, since);
        assert!(pool
            .take(addr, since + MAX_IDLE_TIME + Duration::from_secs(1))
            .is_none());
        assert_eq!(pool.idle_count(addr), 0);
    }
}
