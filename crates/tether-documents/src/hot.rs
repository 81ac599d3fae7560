//! [`HotKeys`]: the heaviest keys of a stream of weighted events, with weights decaying over
//! time, in bounded memory.
//!
//! The algorithm is *space-saving* (Metwally, Agrawal, El Abbadi, "Efficient computation of
//! frequent and top-k elements in data streams", 2005) over *forward-decayed* weights
//! (Cormode, Shkapenyuk, Srivastava, Xu, "Forward decay", 2009). At most `capacity` keys are
//! tracked. A tracked key's weight grows by each event's weight; an untracked key takes the
//! place of the lightest tracked one and inherits its weight, which is recorded as the new
//! key's possible overestimate (`error`). Guarantees, for a total weight `N` seen:
//! - an estimate is never below the key's true weight and at most `error` above it, and
//!   `error ≤ N / capacity`;
//! - every key whose true weight exceeds `N / capacity` is tracked.
//!
//! Decay: an event of weight `w` at time `t` counts `w·e^((t−L)/τ)` against a landmark `L`,
//! so older events count exponentially less without touching every counter as time passes;
//! divided by `e^((now−L)/τ)·τ`, a weight reads as a rate per second averaged over about the
//! last `τ` (a steady `r` per second reads as `r`). Scaling every counter by the same factor
//! keeps their order, so the landmark moves forward (everything rescaled) before the factors
//! could overflow.
//!
//! Memory: `capacity` entries, each holding its key once (shared by the index and the entry,
//! behind 16 bytes of reference counts), plus the entry and its heap place (40 bytes) and the
//! index's share of its table (at most about 100 bytes an entry, measured with a million
//! distinct keys passing through): for keys of at most `K` bytes, at most
//! `capacity · (K + 176)` bytes beyond the allocator's rounding, whatever the number of
//! distinct keys ([`HotKeys::memory_bytes`] tells what is held).

use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// When the landmark's factor would pass `e^LANDMARK_SPAN`, the landmark moves to now.
const LANDMARK_SPAN: f64 = 64.0;

struct Entry {
    /// Shared with the index: one copy of the key, one allocation when a key comes in.
    key: Arc<str>,
    /// Decayed weight relative to the landmark (an overestimate by at most `error`).
    weight: f64,
    /// What the key may have inherited from the key it replaced.
    error: f64,
}

/// The heaviest keys of a decaying stream of weighted events (see the module's text).
pub struct HotKeys {
    capacity: usize,
    tau: f64,
    landmark: f64,
    /// The tracked keys, in slots that never move (a replaced key's slot is reused).
    slots: Vec<Entry>,
    /// Slot numbers in a min-heap on weight (the root is the lightest).
    heap: Vec<u32>,
    /// Slot → its position in `heap`.
    position: Vec<u32>,
    /// Key → its slot. Hashed with foldhash, seeded per sketch: every request is counted, and
    /// SipHash (the standard hasher) was a third of the cost. Keys come from clients, but a
    /// table of at most `capacity` keys bounds what colliding ones could cost.
    index: HashMap<Arc<str>, u32, RandomState>,
    /// Total decayed weight seen (relative to the landmark).
    total: f64,
}

/// One hot key as read at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Hot {
    /// The key.
    pub key: String,
    /// Its rate per second (an overestimate by at most `error`).
    pub rate: f64,
    /// The most by which `rate` may overestimate.
    pub error: f64,
}

impl HotKeys {
    /// Tracks at most `capacity` keys (at least 1); rates average over about `window`.
    pub fn new(capacity: usize, window: Duration) -> HotKeys {
        let capacity = capacity.max(1);
        HotKeys {
            capacity,
            tau: window.as_secs_f64().max(1e-3),
            landmark: 0.0,
            slots: Vec::with_capacity(capacity),
            heap: Vec::with_capacity(capacity),
            position: Vec::with_capacity(capacity),
            index: HashMap::with_capacity_and_hasher(capacity, RandomState::default()),
            total: 0.0,
        }
    }

    /// The number of keys tracked at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of keys tracked now.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Bytes this sketch holds now (entries, index and keys; not the allocator's rounding).
    pub fn memory_bytes(&self) -> usize {
        // Each key once, behind its two reference counts.
        let keys: usize = self.slots.iter().map(|e| e.key.len() + 16).sum();
        self.slots.capacity() * (std::mem::size_of::<Entry>() + 8)
            + self.index.capacity() * (std::mem::size_of::<(Arc<str>, u32)>() + 1)
            + keys
    }

    /// True when nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Counts an event of `weight` for `key` at `now` (seconds on the caller's clock, never
    /// going back).
    pub fn add(&mut self, key: &str, weight: f64, now: f64) {
        // Nothing, and nothing that is not a number, is counted.
        if weight.is_nan() || weight <= 0.0 {
            return;
        }
        if (now - self.landmark) / self.tau > LANDMARK_SPAN {
            self.move_landmark(now);
        }
        let scaled = weight * ((now - self.landmark) / self.tau).exp();
        self.total += scaled;
        if let Some(&slot) = self.index.get(key) {
            self.slots[slot as usize].weight += scaled;
            self.sift_down(self.position[slot as usize] as usize);
            return;
        }
        if self.slots.len() < self.capacity {
            let slot = self.slots.len() as u32;
            let key: Arc<str> = Arc::from(key);
            self.slots.push(Entry {
                key: key.clone(),
                weight: scaled,
                error: 0.0,
            });
            self.heap.push(slot);
            self.position.push(slot);
            self.index.insert(key, slot);
            self.sift_up(self.heap.len() - 1);
            return;
        }
        // The lightest key gives its place, and its weight as the newcomer's possible error.
        let slot = self.heap[0];
        let key: Arc<str> = Arc::from(key);
        let entry = &mut self.slots[slot as usize];
        let lightest = entry.weight;
        let old = std::mem::replace(
            entry,
            Entry {
                key: key.clone(),
                weight: lightest + scaled,
                error: lightest,
            },
        );
        self.index.remove(&old.key);
        self.index.insert(key, slot);
        self.sift_down(0);
    }

    /// The `n` heaviest keys at `now`, heaviest first, as rates per second.
    pub fn top(&self, n: usize, now: f64) -> Vec<Hot> {
        let mut entries: Vec<&Entry> = self.slots.iter().collect();
        entries.sort_unstable_by(|a, b| b.weight.total_cmp(&a.weight).then(a.key.cmp(&b.key)));
        let scale = self.rate_scale(now);
        entries
            .into_iter()
            .take(n)
            .map(|e| Hot {
                key: e.key.to_string(),
                rate: e.weight * scale,
                error: e.error * scale,
            })
            .collect()
    }

    /// The total rate per second of every event seen (tracked or not) at `now`.
    pub fn total_rate(&self, now: f64) -> f64 {
        self.total * self.rate_scale(now)
    }

    /// The bound on any estimate's overestimate at `now`: total rate / capacity.
    pub fn error_bound(&self, now: f64) -> f64 {
        self.total_rate(now) / self.capacity as f64
    }

    fn rate_scale(&self, now: f64) -> f64 {
        (-(now - self.landmark) / self.tau).exp() / self.tau
    }

    fn move_landmark(&mut self, now: f64) {
        let factor = (-(now - self.landmark) / self.tau).exp();
        for e in &mut self.slots {
            e.weight *= factor;
            e.error *= factor;
        }
        self.total *= factor;
        self.landmark = now;
    }

    fn weight_at(&self, at: usize) -> f64 {
        self.slots[self.heap[at] as usize].weight
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.position[self.heap[a] as usize] = a as u32;
        self.position[self.heap[b] as usize] = b as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.weight_at(parent) <= self.weight_at(at) {
                break;
            }
            self.swap(parent, at);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let (left, right) = (2 * at + 1, 2 * at + 2);
            let mut least = at;
            if left < self.heap.len() && self.weight_at(left) < self.weight_at(least) {
                least = left;
            }
            if right < self.heap.len() && self.weight_at(right) < self.weight_at(least) {
                least = right;
            }
            if least == at {
                return;
            }
            self.swap(at, least);
            at = least;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn a_steady_rate_reads_as_that_rate() {
        let mut hot = HotKeys::new(8, WINDOW);
        // 50 events a second for a minute: the 10 s average is 50/s.
        for i in 0..3000 {
            hot.add("doc", 1.0, i as f64 / 50.0);
        }
        let top = hot.top(1, 60.0);
        assert_eq!(top[0].key, "doc");
        assert!((top[0].rate - 50.0).abs() < 1.0, "{top:?}");
        assert_eq!(top[0].error, 0.0);
    }

    #[test]
    fn old_traffic_fades() {
        let mut hot = HotKeys::new(8, WINDOW);
        for i in 0..1000 {
            hot.add("old", 1.0, i as f64 / 100.0);
        }
        for i in 0..100 {
            hot.add("new", 1.0, 100.0 + i as f64 / 10.0);
        }
        let top = hot.top(2, 110.0);
        assert_eq!(top[0].key, "new", "{top:?}");
        assert!(top[1].rate < 0.01, "{top:?}");
    }

    #[test]
    fn the_landmark_moves_without_changing_the_reading() {
        let mut hot = HotKeys::new(4, Duration::from_secs(1));
        // Far past e^64 of the first landmark: rates must still read right.
        for i in 0..100_000 {
            hot.add("k", 1.0, i as f64 / 100.0);
        }
        let top = hot.top(1, 1000.0);
        assert!((top[0].rate - 100.0).abs() < 2.0, "{top:?}");
        assert!(top[0].rate.is_finite());
    }

    #[test]
    fn memory_stays_at_capacity_with_a_million_keys() {
        use std::fmt::Write;
        let mut hot = HotKeys::new(256, WINDOW);
        let mut key = String::new();
        let mut most = 0;
        for i in 0..1_000_000u32 {
            key.clear();
            let _ = write!(key, "document-{i:012}");
            hot.add(&key, 1.0, f64::from(i) / 1e5);
            most = most.max(hot.memory_bytes());
        }
        assert_eq!(hot.len(), 256);
        assert_eq!(hot.index.len(), 256);
        // 256 entries of 21-byte keys: within the bound the module's text gives.
        assert!(most <= 256 * (21 + 176), "{most} bytes");
        eprintln!("1,000,000 distinct keys, capacity 256: {most} bytes at most");
    }

    proptest! {
        /// Space-saving's guarantees, without decay (one instant): every estimate is at least
        /// the true weight and at most `error` above it, `error ≤ N / capacity`, and a key
        /// heavier than `N / capacity` is tracked.
        #[test]
        fn estimates_are_bounded_and_heavy_keys_are_kept(
            events in prop::collection::vec((0u8..40, 1u32..5), 1..2000),
            capacity in 1usize..20,
        ) {
            let mut hot = HotKeys::new(capacity, WINDOW);
            let mut truth: HashMap<String, f64> = HashMap::new();
            let mut total = 0.0;
            for (k, w) in &events {
                let key = format!("k{k}");
                hot.add(&key, f64::from(*w), 0.0);
                *truth.entry(key).or_default() += f64::from(*w);
                total += f64::from(*w);
            }
            let tau = WINDOW.as_secs_f64();
            let top = hot.top(capacity, 0.0);
            for h in &top {
                let estimate = h.rate * tau;
                let error = h.error * tau;
                let real = truth[&h.key];
                prop_assert!(estimate + 1e-6 >= real, "{h:?} real {real}");
                prop_assert!(estimate - error <= real + 1e-6, "{h:?} real {real}");
                prop_assert!(error <= total / capacity as f64 + 1e-6);
            }
            for (key, real) in &truth {
                if *real > total / capacity as f64 {
                    prop_assert!(top.iter().any(|h| &h.key == key), "{key} ({real} of {total}) lost");
                }
            }
        }
    }
}
