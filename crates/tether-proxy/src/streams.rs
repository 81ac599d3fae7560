//! The stream registry: every open WebSocket, SSE response and long-poll response, with its
//! route, key, upstream and backend, so convergence can close exactly the streams whose key
//! moved to another owner.
//!
//! Registration costs one short mutex section on a shard at open and at close; nothing is held
//! across I/O, and plain requests never touch the registry.

use crate::metrics::Metrics;
use atomic_waker::AtomicWaker;
use prometheus::IntGauge;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;
use tether_routing::BackendState;

/// The kind of an open stream (the `kind` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// An upgraded WebSocket connection.
    WebSocket,
    /// A Server-Sent Events response.
    Sse,
    /// A long-poll response.
    LongPoll,
}

impl StreamKind {
    /// The metric label: `websocket`, `sse` or `long_poll`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::WebSocket => "websocket",
            StreamKind::Sse => "sse",
            StreamKind::LongPoll => "long_poll",
        }
    }
}

/// The handle convergence uses to end one stream from outside its request task.
///
/// Every stream (a WebSocket tunnel, an SSE or long-poll response, over HTTP/1 or HTTP/2) is
/// relayed by a task of Tether's that owns its backend connection and registers its waker
/// here: closing marks the stream and wakes the relay, which ends it (a close frame for a
/// WebSocket, 503 for a long-poll still waiting, the end of the response after).
#[derive(Debug, Default)]
pub struct StreamControl {
    /// 0 while open normally, else a `CloseReason` discriminant.
    closing: AtomicU8,
    /// The relay task to wake when closing.
    relay: AtomicWaker,
    relay_attached: AtomicBool,
}

/// Why Tether itself ended a stream (the `reason` label of `streams_closed_total`; streams that
/// end on their own count as `ended`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Its key moved to another backend.
    Rebalance = 1,
    /// The proxy is shutting down.
    Shutdown = 2,
}

impl CloseReason {
    fn label(code: u8) -> &'static str {
        match code {
            1 => "rebalance",
            2 => "shutdown",
            _ => "ended",
        }
    }
}

impl StreamControl {
    /// Registers the waker of the task relaying this stream; `close` wakes it.
    pub fn attach_relay(&self, waker: &Waker) {
        self.relay.register(waker);
        if !self.relay_attached.load(Ordering::Relaxed) {
            self.relay_attached.store(true, Ordering::Release);
        }
    }

    /// True once convergence (or shutdown) asked this stream to end.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) != 0
    }

    /// Why Tether is ending this stream, if it is.
    pub fn reason(&self) -> Option<CloseReason> {
        match self.closing.load(Ordering::Acquire) {
            1 => Some(CloseReason::Rebalance),
            2 => Some(CloseReason::Shutdown),
            _ => None,
        }
    }

    /// Asks the stream to end: marks it closing and wakes its relay. Returns false if nothing
    /// relays the stream yet (it ends when its relay starts and sees the mark).
    pub fn close(&self, reason: CloseReason) -> bool {
        // The first reason wins; a stream is closed once.
        let _ = self
            .closing
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        if self.relay_attached.load(Ordering::Acquire) {
            self.relay.wake();
            return true;
        }
        false
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short critical sections cannot leave the data half-written.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the registry knows about one open stream.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// Registry id (monotonic: lower = older).
    pub id: u64,
    /// Route name.
    pub route: Arc<str>,
    /// Upstream name.
    pub upstream: Arc<str>,
    /// The sticky key, if the route had one.
    pub key: Option<Arc<str>>,
    /// The backend the stream is connected to.
    pub backend: SocketAddr,
    /// WebSocket, SSE or long-poll.
    pub kind: StreamKind,
    /// When it was registered.
    pub opened: Instant,
    /// How to end it.
    pub control: Arc<StreamControl>,
}

const SHARDS: usize = 16;

/// All open streams, sharded by id to keep lock contention negligible.
#[derive(Debug)]
pub struct StreamRegistry {
    next_id: AtomicU64,
    shards: [Mutex<HashMap<u64, StreamInfo>>; SHARDS],
    /// Open streams per document, for `limits.streams_per_key`.
    per_key: Mutex<HashMap<Document, u32>>,
}

/// A document: (upstream, key).
type Document = (Arc<str>, Arc<str>);

/// A stream refused because its document already holds as many as its route allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLimit;

impl Default for StreamRegistry {
    fn default() -> Self {
        StreamRegistry {
            next_id: AtomicU64::new(1),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            per_key: Mutex::new(HashMap::new()),
        }
    }
}

/// Removes its stream from the registry when dropped (the stream ended, however it ended).
#[derive(Debug)]
pub struct Registration {
    registry: Arc<StreamRegistry>,
    id: u64,
    control: Arc<StreamControl>,
    upstream: Arc<str>,
    open_gauge: IntGauge,
    /// The document this stream counts for.
    counted: Option<Document>,
    /// The backend whose open streams it counts in (`BackendState::streams`).
    backend: Arc<BackendState>,
}

impl Registration {
    /// The stream's control handle.
    pub fn control(&self) -> &Arc<StreamControl> {
        &self.control
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(self.registry.shard(self.id)).remove(&self.id);
        self.backend.streams.fetch_sub(1, Ordering::Relaxed);
        if let Some(counted) = self.counted.take() {
            let mut per_key = lock(&self.registry.per_key);
            if let Some(n) = per_key.get_mut(&counted) {
                *n -= 1;
                if *n == 0 {
                    per_key.remove(&counted);
                }
            }
        }
        self.open_gauge.dec();
        let reason = CloseReason::label(self.control.closing.load(Ordering::Acquire));
        Metrics::global()
            .streams_closed
            .with_label_values(&[&self.upstream, reason])
            .inc();
    }
}

impl StreamRegistry {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, StreamInfo>> {
        &self.shards[(id as usize) % SHARDS]
    }

    /// Registers an open stream; it stays registered until the returned guard is dropped.
    /// With a `limit`, a stream whose key already has that many open streams on `upstream` is
    /// refused instead (counting and checking are one step, so racing opens cannot pass it).
    pub fn register(
        self: &Arc<Self>,
        route: Arc<str>,
        upstream: Arc<str>,
        key: Option<Arc<str>>,
        backend: &Arc<BackendState>,
        kind: StreamKind,
        limit: Option<u32>,
    ) -> Result<Registration, AtLimit> {
        let counted = match &key {
            Some(key) => {
                let slot = (upstream.clone(), key.clone());
                let mut per_key = lock(&self.per_key);
                let open = per_key.entry(slot.clone()).or_insert(0);
                if limit.is_some_and(|limit| *open >= limit) {
                    return Err(AtLimit);
                }
                *open += 1;
                Some(slot)
            }
            None => None,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(StreamControl::default());
        backend.streams.fetch_add(1, Ordering::Relaxed);
        let backend_state = Arc::clone(backend);
        let backend = backend.address;
        let backend_label = backend.to_string();
        let open_gauge = Metrics::global().streams_open.with_label_values(&[
            &*route,
            &*upstream,
            &backend_label,
            kind.as_str(),
        ]);
        open_gauge.inc();
        let info = StreamInfo {
            id,
            route,
            upstream: upstream.clone(),
            key,
            backend,
            kind,
            opened: Instant::now(),
            control: control.clone(),
        };
        lock(self.shard(id)).insert(id, info);
        Ok(Registration {
            registry: self.clone(),
            id,
            control,
            upstream,
            open_gauge,
            counted,
            backend: backend_state,
        })
    }

    /// A copy of every open stream, oldest first.
    pub fn snapshot(&self) -> Vec<StreamInfo> {
        let mut all: Vec<StreamInfo> = Vec::new();
        for shard in &self.shards {
            all.extend(lock(shard).values().cloned());
        }
        all.sort_unstable_by_key(|s| s.id);
        all
    }

    /// Open streams of `key` on `upstream`.
    pub fn open_of(&self, upstream: &str, key: &str) -> u32 {
        let slot: Document = (Arc::from(upstream), Arc::from(key));
        lock(&self.per_key).get(&slot).copied().unwrap_or(0)
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// True when no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(reg: &Arc<StreamRegistry>, key: &str) -> Registration {
        reg.register(
            "r".into(),
            "u".into(),
            Some(key.into()),
            &Arc::new(BackendState::new("127.0.0.1:1".parse().expect("addr"), 1)),
            StreamKind::WebSocket,
            None,
        )
        .expect("no limit")
    }

    #[test]
    fn a_stream_is_listed_while_registered_and_gone_after() {
        let reg = Arc::new(StreamRegistry::default());
        let a = register(&reg, "a");
        let b = register(&reg, "b");
        let keys: Vec<_> = reg
            .snapshot()
            .iter()
            .map(|s| s.key.as_deref().unwrap_or("").to_string())
            .collect();
        assert_eq!(keys, ["a", "b"], "oldest first");
        drop(a);
        assert_eq!(reg.len(), 1);
        drop(b);
        assert!(reg.is_empty());
    }

    #[test]
    fn closing_a_stream_nothing_relays_yet_only_marks_it() {
        let reg = Arc::new(StreamRegistry::default());
        let a = register(&reg, "a");
        assert!(!a.control().close(CloseReason::Rebalance));
        assert!(a.control().is_closing());
    }

    #[test]
    fn a_key_at_its_limit_is_refused_until_one_of_its_streams_ends() {
        let reg = Arc::new(StreamRegistry::default());
        let backend = Arc::new(BackendState::new("127.0.0.1:1".parse().expect("addr"), 1));
        let open = |key: &str| {
            reg.register(
                "r".into(),
                "u".into(),
                Some(key.into()),
                &backend,
                StreamKind::Sse,
                Some(2),
            )
        };
        let a1 = open("a").expect("first");
        let _a2 = open("a").expect("second");
        assert_eq!(open("a").err(), Some(AtLimit));
        assert!(open("b").is_ok(), "another key is not limited");
        assert_eq!(reg.open_of("u", "a"), 2);
        assert_eq!(
            backend.streams.load(Ordering::Relaxed),
            2,
            "counted on the backend (the refused one not, the ended one no more)"
        );
        drop(a1);
        assert_eq!(reg.open_of("u", "a"), 1);
        assert_eq!(backend.streams.load(Ordering::Relaxed), 1);
        assert!(open("a").is_ok());
    }
}
