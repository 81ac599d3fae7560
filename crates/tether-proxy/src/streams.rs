//! The stream registry: every open WebSocket, SSE response and long-poll response, with its
//! route, key, upstream and backend, so convergence can close exactly the streams whose key
//! moved to another owner.
//!
//! Registration costs one short mutex section on a shard at open and at close; nothing is held
//! across I/O, and plain requests never touch the registry. What convergence needs per round
//! is kept as streams come and go, so a round costs nothing per idle stream: each stream is
//! judged once (again only after an owner change), and the documents split over backends are
//! counted as their streams register and end.

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
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    /// Open streams per document, for `limits.streams_per_key` and `split_keys`.
    documents: Mutex<Documents>,
}

/// A registered stream and whether convergence has judged it since the last owner change.
#[derive(Debug)]
struct Entry {
    info: StreamInfo,
    judged: bool,
}

/// A document: (upstream, key).
type Document = (Arc<str>, Arc<str>);

/// The open streams of every document with any, and how many documents are split.
#[derive(Debug, Default)]
struct Documents {
    open: HashMap<Document, DocumentStreams>,
    /// Per upstream, documents with open streams on more than one backend.
    split: HashMap<Arc<str>, i64>,
}

/// One document's open streams, in all and per backend (almost always one backend).
#[derive(Debug, Default)]
struct DocumentStreams {
    total: u32,
    on: Vec<(SocketAddr, u32)>,
}

impl Documents {
    /// Counts a stream of `document` on `backend`, unless the document already holds `limit`.
    fn open(
        &mut self,
        document: &Document,
        backend: SocketAddr,
        limit: Option<u32>,
    ) -> Result<(), AtLimit> {
        let streams = self.open.entry(document.clone()).or_default();
        if limit.is_some_and(|limit| streams.total >= limit) {
            if streams.total == 0 {
                self.open.remove(document);
            }
            return Err(AtLimit);
        }
        streams.total += 1;
        match streams.on.iter_mut().find(|(at, _)| *at == backend) {
            Some((_, n)) => *n += 1,
            None => {
                streams.on.push((backend, 1));
                if streams.on.len() == 2 {
                    *self.split.entry(document.0.clone()).or_default() += 1;
                }
            }
        }
        Ok(())
    }

    /// Uncounts a stream [`Documents::open`] counted.
    fn close(&mut self, document: &Document, backend: SocketAddr) {
        let Some(streams) = self.open.get_mut(document) else {
            return;
        };
        streams.total -= 1;
        if let Some(at) = streams.on.iter().position(|(a, _)| *a == backend) {
            streams.on[at].1 -= 1;
            if streams.on[at].1 == 0 {
                streams.on.swap_remove(at);
                if streams.on.len() == 1 {
                    if let Some(n) = self.split.get_mut(&document.0) {
                        *n -= 1;
                    }
                }
            }
        }
        if streams.total == 0 {
            self.open.remove(document);
        }
    }
}

/// A stream refused because its document already holds as many as its route allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLimit;

impl Default for StreamRegistry {
    fn default() -> Self {
        StreamRegistry {
            next_id: AtomicU64::new(1),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            documents: Mutex::new(Documents::default()),
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
            lock(&self.registry.documents).close(&counted, self.backend.address);
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
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Entry>> {
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
                let document = (upstream.clone(), key.clone());
                lock(&self.documents).open(&document, backend.address, limit)?;
                Some(document)
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
        lock(self.shard(id)).insert(
            id,
            Entry {
                info,
                judged: false,
            },
        );
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
            all.extend(lock(shard).values().map(|e| e.info.clone()));
        }
        all.sort_unstable_by_key(|s| s.id);
        all
    }

    /// Judges streams with `verdict` and returns copies of those it had something to say of,
    /// oldest first: with `all`, every open stream; otherwise only those registered since the
    /// last judging (a verdict holds until owners change, which calls for `all`).
    pub fn judge<T>(
        &self,
        all: bool,
        mut verdict: impl FnMut(&StreamInfo) -> Option<T>,
    ) -> Vec<(StreamInfo, T)> {
        let mut found = Vec::new();
        for shard in &self.shards {
            for entry in lock(shard).values_mut() {
                if all || !entry.judged {
                    entry.judged = true;
                    if let Some(v) = verdict(&entry.info) {
                        found.push((entry.info.clone(), v));
                    }
                }
            }
        }
        found.sort_unstable_by_key(|(s, _)| s.id);
        found
    }

    /// Open streams of `key` on `upstream`.
    pub fn open_of(&self, upstream: &str, key: &str) -> u32 {
        let document: Document = (Arc::from(upstream), Arc::from(key));
        lock(&self.documents)
            .open
            .get(&document)
            .map_or(0, |d| d.total)
    }

    /// Per upstream with any, the documents with open streams on more than one backend.
    pub fn split_documents(&self) -> Vec<(Arc<str>, i64)> {
        lock(&self.documents)
            .split
            .iter()
            .map(|(upstream, n)| (upstream.clone(), *n))
            .collect()
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
    fn a_document_counts_as_split_while_its_streams_are_on_two_backends() {
        let reg = Arc::new(StreamRegistry::default());
        let backend = |port| {
            Arc::new(BackendState::new(
                SocketAddr::from(([127, 0, 0, 1], port)),
                1,
            ))
        };
        let (b1, b2) = (backend(1), backend(2));
        let open = |key: &str, on: &Arc<BackendState>| {
            reg.register(
                "r".into(),
                "u".into(),
                Some(key.into()),
                on,
                StreamKind::Sse,
                None,
            )
            .expect("no limit")
        };
        let split = || {
            reg.split_documents()
                .into_iter()
                .find(|(u, _)| &**u == "u")
                .map_or(0, |(_, n)| n)
        };
        let a1 = open("a", &b1);
        let a1_again = open("a", &b1);
        let _b = open("b", &b2);
        assert_eq!(split(), 0, "two streams of one document on one backend");
        let a2 = open("a", &b2);
        assert_eq!(split(), 1);
        drop(a1);
        assert_eq!(split(), 1, "a still has a stream on each backend");
        drop(a1_again);
        assert_eq!(split(), 0);
        drop(a2);
        assert_eq!(reg.open_of("u", "a"), 0);
        assert_eq!(split(), 0);
    }

    #[test]
    fn a_stream_is_judged_once_until_all_are_judged_again() {
        let reg = Arc::new(StreamRegistry::default());
        let _a = register(&reg, "a");
        let _b = register(&reg, "b");
        let judged = |all: bool| {
            let mut seen = Vec::new();
            let found = reg.judge(all, |s| {
                seen.push(s.key.as_deref().unwrap_or("").to_string());
                (s.key.as_deref() == Some("b")).then_some(7)
            });
            seen.sort();
            let found: Vec<_> = found
                .iter()
                .map(|(s, v)| (s.key.as_deref().unwrap_or("").to_string(), *v))
                .collect();
            (seen, found)
        };
        assert_eq!(
            judged(false),
            (vec!["a".into(), "b".into()], vec![("b".into(), 7)])
        );
        assert_eq!(judged(false), (vec![], vec![]), "nothing new");
        let _c = register(&reg, "c");
        assert_eq!(
            judged(false),
            (vec!["c".into()], vec![]),
            "only the new one"
        );
        assert_eq!(
            judged(true),
            (
                vec!["a".into(), "b".into(), "c".into()],
                vec![("b".into(), 7)]
            )
        );
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
