//! Pins: documents an operator tied to one backend (to move a big document to a bigger server
//! without moving anything else).
//!
//! A pinned key's owner is its pinned backend while that backend is a member of the upstream and
//! available; otherwise the ring's owner, and the pinned backend again once it is back. Pins are
//! runtime state, not config: a [`PinBook`] holds one [`Pins`] table per upstream name, kept
//! across reloads (a router built on a reload takes the same tables), and the proxy persists them
//! (a state file, or etcd for discovery upstreams).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

/// The pins of one upstream: key → backend address.
#[derive(Debug, Default)]
pub struct Pins {
    table: ArcSwap<HashMap<Box<str>, SocketAddr>>,
    /// False while the table is empty, so keyed requests of an upstream without pins (nearly
    /// all) skip the lookup.
    any: AtomicBool,
}

impl Pins {
    /// The backend `key` is pinned to, if any.
    pub fn get(&self, key: &str) -> Option<SocketAddr> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.table.load().get(key).copied()
    }

    /// Pins `key` to `backend` (`None` unpins it); returns whether anything changed.
    pub fn set(&self, key: &str, backend: Option<SocketAddr>) -> bool {
        let mut changed = false;
        self.table.rcu(|table| {
            let mut table = HashMap::clone(table);
            changed = match backend {
                Some(backend) => table.insert(key.into(), backend) != Some(backend),
                None => table.remove(key).is_some(),
            };
            table
        });
        self.any
            .store(!self.table.load().is_empty(), Ordering::Release);
        changed
    }

    /// Replaces every pin (a source such as etcd reported its whole set); returns whether
    /// anything changed.
    pub fn replace(&self, pins: &BTreeMap<String, SocketAddr>) -> bool {
        let table: HashMap<Box<str>, SocketAddr> = pins
            .iter()
            .map(|(key, backend)| (key.as_str().into(), *backend))
            .collect();
        let changed = **self.table.load() != table;
        self.any.store(!table.is_empty(), Ordering::Release);
        self.table.store(Arc::new(table));
        changed
    }

    /// Every pin, sorted by key.
    pub fn all(&self) -> BTreeMap<String, SocketAddr> {
        self.table
            .load()
            .iter()
            .map(|(key, backend)| (key.to_string(), *backend))
            .collect()
    }
}

/// Every upstream's [`Pins`], by upstream name. A table outlives its upstream's removal from
/// the config, so a pin comes back in force when the upstream does.
#[derive(Debug, Default)]
pub struct PinBook {
    upstreams: Mutex<HashMap<String, Arc<Pins>>>,
}

impl PinBook {
    /// The pins of upstream `name` (an empty table the first time).
    pub fn upstream(&self, name: &str) -> Arc<Pins> {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(upstreams.entry(name.to_string()).or_default())
    }

    /// Every pin of every upstream, by upstream name then key (upstreams without pins left out).
    pub fn all(&self) -> BTreeMap<String, BTreeMap<String, SocketAddr>> {
        let upstreams = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        upstreams
            .iter()
            .map(|(name, pins)| (name.clone(), pins.all()))
            .filter(|(_, pins)| !pins.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn set_reports_changes_and_get_follows() {
        let pins = Pins::default();
        assert_eq!(pins.get("doc"), None);
        assert!(pins.set("doc", Some(addr(1))));
        assert!(
            !pins.set("doc", Some(addr(1))),
            "the same pin again changes nothing"
        );
        assert_eq!(pins.get("doc"), Some(addr(1)));
        assert!(pins.set("doc", Some(addr(2))));
        assert_eq!(pins.get("doc"), Some(addr(2)));
        assert_eq!(pins.get("other"), None);
        assert!(pins.set("doc", None));
        assert!(!pins.set("doc", None));
        assert_eq!(pins.get("doc"), None);
    }

    #[test]
    fn replace_sets_the_whole_table() {
        let pins = Pins::default();
        pins.set("gone", Some(addr(1)));
        let new = BTreeMap::from([("a".to_string(), addr(2)), ("b".to_string(), addr(3))]);
        assert!(pins.replace(&new));
        assert!(!pins.replace(&new));
        assert_eq!(pins.all(), new);
        assert_eq!(pins.get("gone"), None);
        assert!(pins.replace(&BTreeMap::new()));
        assert_eq!(pins.get("a"), None);
    }

    #[test]
    fn a_book_hands_out_one_table_per_upstream() {
        let book = PinBook::default();
        book.upstream("docs").set("k", Some(addr(1)));
        assert_eq!(book.upstream("docs").get("k"), Some(addr(1)));
        assert_eq!(book.upstream("other").get("k"), None);
        assert_eq!(book.all().len(), 1, "upstreams without pins are left out");
    }
}
