//! The shutdown signal as Tether's HTTP/1 path waits on it: a flag and a waker per connection.
//!
//! Why: an idle keep-alive connection waits for its next request or for the server to shut
//! down. Waiting on Pingora's `ShutdownWatch` (a `tokio::sync::watch`) takes the watch's lock
//! twice per wait, to join and leave its list of waiters: once per request on a busy
//! connection. Here a connection joins the list once, when it opens, and each wait only
//! registers its waker in the connection's own [`AtomicWaker`] (no lock).

use atomic_waker::AtomicWaker;
use pingora::server::ShutdownWatch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Whether the server is shutting down, and who to wake when it starts.
#[derive(Default)]
pub(crate) struct Closing {
    started: AtomicBool,
    /// A task turns the server's shutdown watch into `started` (spawned by the first
    /// connection, on its runtime).
    watching: AtomicBool,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
}

impl Closing {
    /// Whether shutdown has started.
    pub(crate) fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Starts following `shutdown` (once; later calls do nothing).
    pub(crate) fn follow(self: &Arc<Self>, shutdown: &ShutdownWatch) {
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let closing = self.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            // A dropped sender means the server is going away too.
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
            closing.start();
        });
    }

    /// Marks shutdown as started and wakes every connection waiting on it.
    pub(crate) fn start(&self) {
        self.started.store(true, Ordering::Release);
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for waker in waiting.values() {
            waker.wake();
        }
    }

    /// One connection's place in the list, for as long as the connection lives.
    pub(crate) fn join(self: &Arc<Self>) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, waker.clone());
        Waiter {
            closing: self.clone(),
            id,
            waker,
        }
    }
}

/// A connection's registration with [`Closing`]; leaves the list when dropped.
pub(crate) struct Waiter {
    closing: Arc<Closing>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl Waiter {
    /// Whether shutdown has started.
    pub(crate) fn started(&self) -> bool {
        self.closing.started()
    }

    /// Ready once shutdown has started; otherwise wakes `cx` when it does.
    pub(crate) fn poll_started(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.started() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Checked again: `start` may have woken the list between the load and the register.
        if self.started() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.closing
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn a_waiting_connection_wakes_when_the_watch_says_shutdown() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let closing = Arc::new(Closing::default());
        closing.follow(&rx);
        let waiter = closing.join();
        assert!(!waiter.started());
        let waiting = tokio::spawn(async move { poll_fn(|cx| waiter.poll_started(cx)).await });
        tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(closing.started());
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_list() {
        let closing = Arc::new(Closing::default());
        let first = closing.join();
        let second = closing.join();
        drop(first);
        assert_eq!(closing.waiting.lock().unwrap().len(), 1);
        drop(second);
        assert!(closing.waiting.lock().unwrap().is_empty());
    }
}
