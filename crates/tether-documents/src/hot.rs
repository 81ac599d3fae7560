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
//! Memory: `capacity` entries, each holding its key once in a buffer that is reused when the
//! entry passes to another key (so a replacement allocates only for a longer key), plus the
//! entry with its hash (40 bytes), its heap place (20) and the index, a table of slot numbers
//! sized up front so that it never grows (5,136 bytes for the 256 keys Tether tracks, 20 a
//! key): for keys of at most `K` bytes, at most `capacity · (K + 84) + 40` bytes beyond the
//! allocator's rounding, whatever the number of distinct keys ([`HotKeys::memory_bytes`] tells
//! what is held).
//!
//! Cost: every exchange is counted, so `add` is on the request path. It hashes the key once,
//! finds its slot through a table of slot numbers (compared against the slot's key), and moves
//! the key's heap place with a hole rather than swaps, the weights stored in the heap itself.

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use std::hash::BuildHasher;
use std::time::Duration;

/// When the landmark's factor would pass `e^LANDMARK_SPAN`, the landmark moves to now.
const LANDMARK_SPAN: f64 = 64.0;

struct Entry {
    /// The key; its buffer is reused by the next key that takes this slot.
    key: String,
    /// The key's hash, to move it out of the index without hashing it again.
    hash: u64,
    /// What the key may have inherited from the key it replaced.
    error: f64,
}

/// One place of the min-heap: a slot and its weight, side by side so a sift reads no slot.
#[derive(Clone, Copy)]
struct Place {
    /// Decayed weight relative to the landmark (an overestimate by at most `error`).
    weight: f64,
    slot: u32,
}

/// The heaviest keys of a decaying stream of weighted events (see the module's text).
pub struct HotKeys {
    capacity: usize,
    tau: f64,
    landmark: f64,
    /// The tracked keys, in slots that never move (a replaced key's slot is reused).
    slots: Vec<Entry>,
    /// The slots in a min-heap on weight (the root is the lightest).
    heap: Vec<Place>,
    /// Slot → its position in `heap`.
    position: Vec<u32>,
    /// Key → its slot, as slot numbers hashed by their key. foldhash, seeded per sketch: the
    /// standard SipHash was a third of the sketch's cost. Keys come from clients, but a table
    /// of at most `capacity` keys bounds what colliding ones could cost.
    index: HashTable<u32>,
    hasher: RandomState,
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
            // Room for twice the keys and one: a table whose deleted entries use up its room
            // then rehashes in place, as hashbrown does while the entries would fill at most
            // half of it, instead of doubling.
            index: HashTable::with_capacity(2 * capacity + 2),
            hasher: RandomState::default(),
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

    /// Bytes this sketch holds now (entries, heap, index and keys; not the allocator's
    /// rounding).
    pub fn memory_bytes(&self) -> usize {
        let keys: usize = self.slots.iter().map(|e| e.key.capacity()).sum();
        self.slots.capacity() * std::mem::size_of::<Entry>()
            + self.heap.capacity() * std::mem::size_of::<Place>()
            + self.position.capacity() * std::mem::size_of::<u32>()
            + self.index.allocation_size()
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
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        if let Some(&slot) = self.index.find(hash, |&s| slots[s as usize].key == key) {
            let at = self.position[slot as usize] as usize;
            self.heap[at].weight += scaled;
            self.sift_down(at);
            return;
        }
        if self.slots.len() < self.capacity {
            let slot = self.slots.len() as u32;
            self.slots.push(Entry {
                key: key.to_owned(),
                hash,
                error: 0.0,
            });
            self.heap.push(Place {
                weight: scaled,
                slot,
            });
            self.position.push(slot);
            self.index
                .insert_unique(hash, slot, |&s| slots_hash(&self.slots, s));
            self.sift_up(self.heap.len() - 1);
            return;
        }
        // The lightest key gives its place, and its weight as the newcomer's possible error.
        let Place {
            weight: lightest,
            slot,
        } = self.heap[0];
        let entry = &mut self.slots[slot as usize];
        match self.index.find_entry(entry.hash, |&s| s == slot) {
            Ok(found) => drop(found.remove()),
            Err(_) => debug_assert!(false, "slot {slot} is missing from the index"),
        }
        // Exactly the room the key needs, so a buffer never holds more than the longest key.
        entry.key.clear();
        entry.key.reserve_exact(key.len());
        entry.key.push_str(key);
        entry.hash = hash;
        entry.error = lightest;
        self.heap[0].weight = lightest + scaled;
        self.index
            .insert_unique(hash, slot, |&s| slots_hash(&self.slots, s));
        self.sift_down(0);
    }

    /// The `n` heaviest keys at `now`, heaviest first, as rates per second.
    pub fn top(&self, n: usize, now: f64) -> Vec<Hot> {
        let mut places: Vec<&Place> = self.heap.iter().collect();
        places.sort_unstable_by(|a, b| {
            b.weight.total_cmp(&a.weight).then_with(|| {
                let (ka, kb) = (
                    &self.slots[a.slot as usize].key,
                    &self.slots[b.slot as usize].key,
                );
                ka.cmp(kb)
            })
        });
        let scale = self.rate_scale(now);
        places
            .into_iter()
            .take(n)
            .map(|p| {
                let e = &self.slots[p.slot as usize];
                Hot {
                    key: e.key.clone(),
                    rate: p.weight * scale,
                    error: e.error * scale,
                }
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
        for p in &mut self.heap {
            p.weight *= factor;
        }
        for e in &mut self.slots {
            e.error *= factor;
        }
        self.total *= factor;
        self.landmark = now;
    }

    /// Puts `place` at heap position `at` and records where its slot now is.
    fn put(&mut self, at: usize, place: Place) {
        self.heap[at] = place;
        self.position[place.slot as usize] = at as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        let moving = self.heap[at];
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[parent].weight <= moving.weight {
                break;
            }
            self.put(at, self.heap[parent]);
            at = parent;
        }
        self.put(at, moving);
    }

    fn sift_down(&mut self, mut at: usize) {
        let moving = self.heap[at];
        let len = self.heap.len();
        loop {
            let left = 2 * at + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.heap[right].weight < self.heap[left].weight {
                right
            } else {
                left
            };
            if self.heap[child].weight >= moving.weight {
                break;
            }
            self.put(at, self.heap[child]);
            at = child;
        }
        self.put(at, moving);
    }
}

/// The hash of slot `slot`'s key, as recorded when the key came in (for the index's rehashes,
/// which its deleted entries call for now and then).
fn slots_hash(slots: &[Entry], slot: u32) -> u64 {
    slots[slot as usize].hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const WINDOW: Duration = Duration::from_secs(10);

    /// The sketch's own bookkeeping agrees: every slot is in the index under its key, at the
    /// heap place its position says, and the heap is ordered.
    fn assert_consistent(hot: &HotKeys) {
        assert_eq!(hot.index.len(), hot.slots.len());
        for (slot, entry) in hot.slots.iter().enumerate() {
            let hash = hot.hasher.hash_one(entry.key.as_str());
            assert_eq!(hash, entry.hash);
            let found = hot
                .index
                .find(hash, |&s| hot.slots[s as usize].key == entry.key);
            assert_eq!(found, Some(&(slot as u32)), "{}", entry.key);
            assert_eq!(hot.heap[hot.position[slot] as usize].slot, slot as u32);
        }
        for at in 1..hot.heap.len() {
            assert!(hot.heap[(at - 1) / 2].weight <= hot.heap[at].weight);
        }
    }

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
        assert_consistent(&hot);
        // 256 entries of 21-byte keys: within the bound the module's text gives.
        assert!(most <= 256 * (21 + 84) + 40, "{most} bytes");
        // The index never grew past what it was given at the start.
        assert_eq!(
            hot.index.allocation_size(),
            HotKeys::new(256, WINDOW).index.allocation_size()
        );
        eprintln!("1,000,000 distinct keys, capacity 256: {most} bytes at most");
    }

    #[test]
    fn memory_stays_within_the_bound_at_every_capacity() {
        for capacity in [1, 2, 3, 6, 7, 13, 27, 55, 100, 256, 1000] {
            let mut hot = HotKeys::new(capacity, WINDOW);
            let start = hot.index.allocation_size();
            // Ten times as many distinct 8-byte keys as tracked, each seen a few times.
            for i in 0..capacity * 30 {
                hot.add(&format!("k{:07}", i / 3), 1.0, i as f64 / 1e3);
            }
            assert_consistent(&hot);
            let bytes = hot.memory_bytes();
            assert!(
                bytes <= capacity * (8 + 84) + 40,
                "capacity {capacity}: {bytes} bytes"
            );
            assert_eq!(
                hot.index.allocation_size(),
                start,
                "capacity {capacity}: index grew"
            );
        }
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
            assert_consistent(&hot);
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
