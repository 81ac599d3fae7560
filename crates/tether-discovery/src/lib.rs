//! # tether-discovery
//! Where an upstream's backends come from when they are not listed in the file: keys under a
//! prefix in etcd, each kept alive by a lease, or the A/AAAA records of a DNS name. Each source
//! publishes a [`Snapshot`]: the member set, sorted by address, and whether the source is
//! reachable. It knows nothing about the proxy; `tether-proxy` turns snapshots into rings.
//!
//! **The promise:** the member list depends only on the set of members, never on the order in
//! which they were announced or seen, so every Tether instance watching the same source builds
//! the same ring and picks the same owner for every key. A member's identity is its address;
//! when two etcd keys name the same address, the one with the smaller key wins.
//!
//! When the source becomes unreachable, the last known members stay in the snapshot (`up`
//! turns false with the reason), so a proxy keeps serving on them; an etcd watch resumes from
//! the revision after the last one seen when etcd returns, and only a compacted revision
//! causes a full reload of the prefix.
//!
//! [`announce`] is the other side: it registers one backend under a prefix with a lease, keeps
//! the lease alive, and revokes it when told to stop, so the backend leaves every ring at once.

mod dns;
mod error;
pub mod etcd;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tether_config::Discovery;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use error::DiscoveryError;
pub use etcd::announce::{announce, Announcement};
pub use etcd::client::EtcdClient;
pub use etcd::PlacementEvent;

/// One backend as a membership source reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// `ip:port` of the app server; also its identity.
    pub address: SocketAddr,
    /// Relative weight, 1..=1000.
    pub weight: u32,
}

/// What a source knows now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The members, sorted by address, one per address. Empty until `loaded`.
    pub members: Vec<Member>,
    /// Documents pinned to a backend (etcd: the keys under `<prefix>/pins/`; DNS: none).
    pub pins: BTreeMap<String, SocketAddr>,
    /// True once a membership has been read at least once.
    pub loaded: bool,
    /// True while the source answers; when false, `members` is the last known set.
    pub up: bool,
    /// Why the source is not up (or, for DNS, why the last answer was not used).
    pub problem: Option<String>,
    /// Full reads of the member set (etcd: range loads of the prefix; DNS: answers used).
    pub full_loads: u64,
    /// etcd watches resumed from the last seen revision after a disconnect (no full reload).
    pub resumes: u64,
}

/// A running membership source; stops when dropped.
pub struct Source {
    snapshots: watch::Receiver<Snapshot>,
    placements: Option<mpsc::UnboundedReceiver<PlacementEvent>>,
    task: JoinHandle<()>,
}

impl Source {
    /// Starts the source described by `spec` on the current tokio runtime.
    pub fn start(spec: &Discovery) -> Source {
        let (publish, snapshots) = watch::channel(Snapshot::default());
        let (placed, placements) = mpsc::unbounded_channel();
        let publisher = Publisher(publish, placed);
        let task = match spec.clone() {
            Discovery::Etcd(etcd) => tokio::spawn(etcd::source::run(etcd, publisher)),
            Discovery::Dns(dns) => tokio::spawn(dns::run(dns, publisher)),
        };
        Source {
            snapshots,
            placements: Some(placements),
            task,
        }
    }

    /// The placements the source reports (etcd: the keys under `<prefix>/placements/`), as
    /// events in order: unlike members they can be many, so they are never copied whole
    /// into a snapshot. Given to the first caller only.
    pub fn take_placements(&mut self) -> Option<mpsc::UnboundedReceiver<PlacementEvent>> {
        self.placements.take()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshots.clone()
    }

    /// The snapshot now.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshots.borrow().clone()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sending side, with the one rule every source follows: members are sorted and unique.
pub(crate) struct Publisher(
    watch::Sender<Snapshot>,
    mpsc::UnboundedSender<PlacementEvent>,
);

impl Publisher {
    /// Publishes a new member set (and pins) read from a source that answered.
    pub(crate) fn members(
        &self,
        members: Vec<Member>,
        pins: BTreeMap<String, SocketAddr>,
        full_load: bool,
    ) {
        let members = canonical(members);
        self.0.send_if_modified(|s| {
            let before = s.clone();
            s.members = members;
            s.pins = pins;
            s.loaded = true;
            s.up = true;
            s.problem = None;
            if full_load {
                s.full_loads += 1;
            }
            *s != before
        });
    }

    /// Reports a change of the placements.
    pub(crate) fn placement(&self, event: PlacementEvent) {
        // Nobody listening (the proxy did not ask) is fine.
        let _ = self.1.send(event);
    }

    /// The source answered again (e.g. a watch was re-established); members unchanged.
    pub(crate) fn up(&self, resumed: bool) {
        self.0.send_if_modified(|s| {
            let before = s.clone();
            s.up = true;
            s.problem = None;
            if resumed {
                s.resumes += 1;
            }
            *s != before
        });
    }

    /// The source cannot be read: keep the last members, say why. True when it was up until
    /// now (or had not answered yet), so the caller logs the transition once, not every retry.
    pub(crate) fn down(&self, problem: String) -> bool {
        let mut newly = false;
        self.0.send_if_modified(|s| {
            newly = s.up || s.problem.is_none();
            let changed = newly || s.problem.as_deref() != Some(problem.as_str());
            s.up = false;
            s.problem = Some(problem);
            changed
        });
        newly
    }
}

/// Sorted by address with one entry per address (the first one given wins), so the ring
/// built from it is the same whatever order the members arrived in.
pub fn canonical(members: Vec<Member>) -> Vec<Member> {
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<Member> = members
        .into_iter()
        .filter(|m| seen.insert(m.address))
        .collect();
    unique.sort_unstable();
    unique
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(address: &str, weight: u32) -> Member {
        Member {
            address: address.parse().expect("address"),
            weight,
        }
    }

    #[test]
    fn canonical_order_does_not_depend_on_arrival_order() {
        let a = vec![
            m("10.0.0.2:80", 1),
            m("10.0.0.1:80", 2),
            m("10.0.0.3:80", 1),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(canonical(a.clone()), canonical(b));
        assert_eq!(
            canonical(a),
            vec![
                m("10.0.0.1:80", 2),
                m("10.0.0.2:80", 1),
                m("10.0.0.3:80", 1)
            ]
        );
    }

    #[test]
    fn canonical_keeps_the_first_entry_per_address() {
        let members = vec![m("10.0.0.1:80", 3), m("10.0.0.1:80", 1)];
        assert_eq!(canonical(members), vec![m("10.0.0.1:80", 3)]);
    }
}
