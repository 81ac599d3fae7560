//! Hot documents: per upstream, the documents (sticky keys) with the most open streams, requests
//! per second and bytes per second.
//!
//! Requests and bytes are counted by `core::record` as each exchange ends (a stream's bytes
//! when it ends), into one [`UpstreamDocuments`] per upstream name that outlives reloads (the
//! [`DocumentBook`] in `ProxyState` owns them); each holds two bounded sketches
//! ([`tether_documents::HotKeys`], [`TRACKED`] keys each, rates over about [`WINDOW`]). Open
//! streams are counted exactly from the stream registry when asked. Keys never become metric
//! labels: the gauges here say how concentrated the load is, not on which document.

use crate::metrics::Metrics;
use crate::streams::StreamInfo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_documents::{Hot, HotKeys};
use tether_routing::Router;

/// Keys tracked per upstream and measure.
pub const TRACKED: usize = 256;
/// The span rates are averaged over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What documents are ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Open WebSocket, SSE and long-poll streams (exact).
    Streams,
    /// Requests per second (estimated).
    Requests,
    /// Response bytes per second (estimated).
    Bytes,
}

impl Measure {
    /// `streams`, `requests` or `bytes`.
    pub fn parse(text: &str) -> Option<Measure> {
        match text {
            "streams" => Some(Measure::Streams),
            "requests" => Some(Measure::Requests),
            "bytes" => Some(Measure::Bytes),
            _ => None,
        }
    }
}

struct Sketches {
    requests: HotKeys,
    bytes: HotKeys,
}

/// The request and byte sketches of one upstream.
pub struct UpstreamDocuments {
    started: Instant,
    sketches: Mutex<Sketches>,
}

/// A ranking read from a sketch.
#[derive(Debug, Clone)]
pub struct Ranking {
    /// The hottest documents, hottest first.
    pub top: Vec<Hot>,
    /// The rate of everything counted, tracked or not.
    pub total: f64,
    /// No estimate overstates by more than this.
    pub error_bound: f64,
    /// Bytes the sketch holds.
    pub memory_bytes: usize,
}

impl UpstreamDocuments {
    fn new() -> UpstreamDocuments {
        UpstreamDocuments {
            started: Instant::now(),
            sketches: Mutex::new(Sketches {
                requests: HotKeys::new(TRACKED, WINDOW),
                bytes: HotKeys::new(TRACKED, WINDOW),
            }),
        }
    }

    /// Counts one finished exchange of document `key` that sent `bytes` of response body.
    pub fn record(&self, key: &str, bytes: usize) {
        let now = self.started.elapsed().as_secs_f64();
        let mut sketches = self.sketches.lock().unwrap_or_else(|p| p.into_inner());
        sketches.requests.add(key, 1.0, now);
        sketches.bytes.add(key, bytes as f64, now);
    }

    /// The `n` hottest documents by requests or bytes per second (None for `Streams`, which
    /// the registry answers).
    pub fn ranking(&self, by: Measure, n: usize) -> Option<Ranking> {
        let now = self.started.elapsed().as_secs_f64();
        let sketches = self.sketches.lock().unwrap_or_else(|p| p.into_inner());
        let sketch = match by {
            Measure::Requests => &sketches.requests,
            Measure::Bytes => &sketches.bytes,
            Measure::Streams => return None,
        };
        Some(Ranking {
            top: sketch.top(n, now),
            total: sketch.total_rate(now),
            error_bound: sketch.error_bound(now),
            memory_bytes: sketch.memory_bytes(),
        })
    }
}

/// Every upstream's documents, by upstream name, kept across reloads.
#[derive(Default)]
pub struct DocumentBook {
    upstreams: Mutex<HashMap<String, Arc<UpstreamDocuments>>>,
}

impl DocumentBook {
    /// The documents of upstream `name` (made on first use).
    pub fn upstream(&self, name: &str) -> Arc<UpstreamDocuments> {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        upstreams
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(UpstreamDocuments::new()))
            .clone()
    }
}

/// One document's open streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCount {
    /// The document.
    pub key: String,
    /// Its open streams.
    pub streams: usize,
    /// Where they are: backend and count, most first.
    pub backends: Vec<(SocketAddr, usize)>,
}

/// The `n` documents of `upstream` with the most open streams, most first (ties by key), and
/// the upstream's open streams in all (with and without a key).
pub fn by_streams(streams: &[StreamInfo], upstream: &str, n: usize) -> (Vec<StreamCount>, usize) {
    let mut per_key: HashMap<&str, HashMap<SocketAddr, usize>> = HashMap::new();
    let mut total = 0;
    for s in streams.iter().filter(|s| &*s.upstream == upstream) {
        total += 1;
        if let Some(key) = &s.key {
            *per_key
                .entry(key)
                .or_default()
                .entry(s.backend)
                .or_default() += 1;
        }
    }
    let mut counts: Vec<StreamCount> = per_key
        .into_iter()
        .map(|(key, backends)| {
            let mut backends: Vec<(SocketAddr, usize)> = backends.into_iter().collect();
            backends.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            StreamCount {
                key: key.to_string(),
                streams: backends.iter().map(|b| b.1).sum(),
                backends,
            }
        })
        .collect();
    counts.sort_unstable_by(|a, b| b.streams.cmp(&a.streams).then(a.key.cmp(&b.key)));
    counts.truncate(n);
    (counts, total)
}

/// Sets the concentration gauges of every upstream from the open streams:
/// `tether_busiest_document_stream_share{upstream}` (the busiest document's share of the
/// upstream's streams) and `tether_backend_stream_spread{upstream}` (the busiest backend's open
/// streams over the mean of the upstream's backends; 1 is perfectly even).
pub fn update_gauges(streams: &[StreamInfo], router: &Router) {
    let metrics = Metrics::global();
    for upstream in router.upstreams() {
        let (top, total) = by_streams(streams, &upstream.name, 1);
        let share = match (top.first(), total) {
            (Some(busiest), total) if total > 0 => busiest.streams as f64 / total as f64,
            _ => 0.0,
        };
        metrics
            .busiest_document_share
            .with_label_values(&[&upstream.name])
            .set(share);
        let mut per_backend: HashMap<SocketAddr, usize> =
            upstream.backends.iter().map(|b| (b.address, 0)).collect();
        for s in streams.iter().filter(|s| *s.upstream == *upstream.name) {
            *per_backend.entry(s.backend).or_default() += 1;
        }
        let max = per_backend.values().copied().max().unwrap_or(0);
        let mean = if per_backend.is_empty() {
            0.0
        } else {
            per_backend.values().sum::<usize>() as f64 / per_backend.len() as f64
        };
        let spread = if mean > 0.0 { max as f64 / mean } else { 0.0 };
        metrics
            .backend_stream_spread
            .with_label_values(&[&upstream.name])
            .set(spread);
    }
}
