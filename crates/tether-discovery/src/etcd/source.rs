//! The etcd membership source: load the prefix once, then watch it from the next revision,
//! resuming from the last revision seen whenever the connection comes back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tether_config::EtcdDiscovery;

use super::client::{EtcdClient, Event, WatchStream};
use super::{pins_prefix, placements_prefix, BackendValue, MemberValue, PlacementEvent};
use crate::{DiscoveryError, Member, Publisher};

/// How often a live watch is backed by a probe read: a watch on a silent prefix cannot tell a
/// healthy etcd from one that hangs, a failed probe can.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the source holds between connections.
#[derive(Default)]
struct Known {
    /// Member value of every key under the prefix, by key (`Err` for unusable values).
    keys: BTreeMap<Vec<u8>, Result<Member, String>>,
    /// The pins under `<prefix>/pins/`: document key → backend.
    pins: BTreeMap<String, SocketAddr>,
    /// The revision every change up to which is reflected in `keys`; 0 before the first load.
    revision: i64,
}

impl Known {
    fn members(&self) -> Vec<Member> {
        // Key order, so that of two keys naming one address the smaller key wins.
        self.keys
            .values()
            .filter_map(|m| m.as_ref().ok())
            .copied()
            .collect()
    }

    /// Applies one change under the prefix; a placement is not kept but returned, for the
    /// caller to report.
    fn apply(&mut self, prefix: &str, event: &Event) -> Option<PlacementEvent> {
        let kv = match event {
            Event::Put(kv) | Event::Delete(kv) => kv,
        };
        self.revision = self.revision.max(event.revision());
        let pins = pins_prefix(prefix);
        if let Some(key) = kv.key.strip_prefix(pins.as_bytes()) {
            self.apply_pin(prefix, key, event);
            return None;
        }
        let placements = placements_prefix(prefix);
        if let Some(key) = kv.key.strip_prefix(placements.as_bytes()) {
            let key = std::str::from_utf8(key).ok()?.to_string();
            return match event {
                Event::Put(kv) => match BackendValue::parse(&kv.value) {
                    Ok(backend) => Some(PlacementEvent::Placed(key, backend)),
                    Err(reason) => {
                        tracing::warn!(prefix, key, "ignoring etcd placement: {reason}");
                        None
                    }
                },
                Event::Delete(_) => Some(PlacementEvent::Removed(key)),
            };
        }
        match event {
            Event::Put(kv) => {
                let member = MemberValue::parse(&kv.value);
                if let Err(reason) = &member {
                    tracing::warn!(
                        prefix,
                        key = %String::from_utf8_lossy(&kv.key),
                        "ignoring etcd member key: {reason}"
                    );
                }
                self.keys.insert(kv.key.clone(), member);
            }
            Event::Delete(kv) => {
                self.keys.remove(&kv.key);
            }
        }
        None
    }

    /// A put or delete of the pin of document `key`.
    fn apply_pin(&mut self, prefix: &str, key: &[u8], event: &Event) {
        let Ok(key) = std::str::from_utf8(key) else {
            tracing::warn!(prefix, "ignoring an etcd pin whose key is not UTF-8");
            return;
        };
        match event {
            Event::Put(kv) => match BackendValue::parse(&kv.value) {
                Ok(backend) => {
                    self.pins.insert(key.to_string(), backend);
                }
                Err(reason) => {
                    tracing::warn!(prefix, key, "ignoring etcd pin: {reason}");
                    self.pins.remove(key);
                }
            },
            Event::Delete(_) => {
                self.pins.remove(key);
            }
        }
    }
}

/// Runs the source until the task is aborted.
pub(crate) async fn run(spec: EtcdDiscovery, publish: Publisher) {
    let client = EtcdClient::new(spec.endpoints.clone());
    let prefix = spec.prefix.as_bytes();
    let mut known = Known::default();
    let mut backoff = MIN_BACKOFF;
    // Set after the first watch ends, so the next one counts as a resumption.
    let mut disconnected = false;
    loop {
        if known.revision == 0 {
            match client.range_prefix(prefix).await {
                Ok(range) => {
                    known.keys.clear();
                    known.pins.clear();
                    let mut placements = BTreeMap::new();
                    for kv in range.kvs {
                        let event = Event::Put(kv);
                        if let Some(PlacementEvent::Placed(key, backend)) =
                            known.apply(&spec.prefix, &event)
                        {
                            placements.insert(key, backend);
                        }
                    }
                    publish.placement(PlacementEvent::Loaded(placements));
                    known.revision = range.revision.max(known.revision).max(1);
                    publish.members(known.members(), known.pins.clone(), true);
                    tracing::info!(
                        prefix = %spec.prefix,
                        revision = known.revision,
                        members = known.members().len(),
                        "etcd membership loaded"
                    );
                    disconnected = false;
                }
                Err(e) => {
                    fail(&publish, &spec, &e, &mut backoff).await;
                    continue;
                }
            }
        }
        let watch = match client.watch_prefix(prefix, known.revision + 1).await {
            Ok(watch) => watch,
            Err(DiscoveryError::Compacted { compacted, .. }) => {
                tracing::warn!(
                    prefix = %spec.prefix,
                    revision = known.revision,
                    compacted,
                    "etcd compacted past the last seen revision; loading the prefix again"
                );
                known.revision = 0;
                continue;
            }
            Err(e) => {
                fail(&publish, &spec, &e, &mut backoff).await;
                continue;
            }
        };
        if disconnected {
            tracing::info!(
                prefix = %spec.prefix,
                from = known.revision + 1,
                "etcd watch resumed"
            );
        }
        publish.up(disconnected);
        backoff = MIN_BACKOFF;
        let ended = follow(watch, &client, &spec, &mut known, &publish).await;
        disconnected = true;
        match ended {
            Err(DiscoveryError::Compacted { .. }) => known.revision = 0,
            Err(e) => fail(&publish, &spec, &e, &mut backoff).await,
            Ok(()) => {
                let e = DiscoveryError::Http {
                    endpoint: spec.endpoints.join(","),
                    reason: "watch ended".to_string(),
                };
                fail(&publish, &spec, &e, &mut backoff).await;
            }
        }
    }
}

/// Applies the watch's events until it ends or a probe fails.
async fn follow(
    mut watch: WatchStream,
    client: &EtcdClient,
    spec: &EtcdDiscovery,
    known: &mut Known,
    publish: &Publisher,
) -> Result<(), DiscoveryError> {
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            batch = watch.next() => {
                let Some(events) = batch? else { return Ok(()) };
                for event in &events {
                    // A resumed watch can repeat what a load already reflected.
                    if event.revision() > known.revision || event.revision() == 0 {
                        if let Some(placement) = known.apply(&spec.prefix, event) {
                            publish.placement(placement);
                        }
                    }
                }
                publish.members(known.members(), known.pins.clone(), false);
            }
            _ = probe.tick() => {
                client.probe(spec.prefix.as_bytes()).await?;
            }
        }
    }
}

/// Marks the source down with `error` and waits before the next attempt.
async fn fail(
    publish: &Publisher,
    spec: &EtcdDiscovery,
    error: &DiscoveryError,
    backoff: &mut Duration,
) {
    if publish.down(error.to_string()) {
        tracing::warn!(
            prefix = %spec.prefix,
            "etcd unreachable, serving the last known membership: {error}"
        );
    } else {
        tracing::debug!(prefix = %spec.prefix, "etcd still unreachable: {error}");
    }
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::client::KeyValue;

    fn put(key: &str, value: &str, revision: i64) -> Event {
        Event::Put(KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: revision,
        })
    }

    #[test]
    fn members_follow_puts_and_deletes_and_the_smaller_key_wins_an_address() {
        let mut known = Known::default();
        known.apply(
            "/p/",
            &put("/p/b", r#"{"address":"10.0.0.1:80","weight":5}"#, 3),
        );
        known.apply(
            "/p/",
            &put("/p/a", r#"{"address":"10.0.0.1:80","weight":2}"#, 4),
        );
        known.apply("/p/", &put("/p/c", r#"{"address":"10.0.0.0:80"}"#, 5));
        known.apply("/p/", &put("/p/d", "not json", 6));
        let members = crate::canonical(known.members());
        let shown: Vec<(String, u32)> = members
            .iter()
            .map(|m| (m.address.to_string(), m.weight))
            .collect();
        assert_eq!(
            shown,
            [
                ("10.0.0.0:80".to_string(), 1),
                ("10.0.0.1:80".to_string(), 2)
            ]
        );
        assert_eq!(known.revision, 6);
        known.apply(
            "/p/",
            &Event::Delete(KeyValue {
                key: b"/p/a".to_vec(),
                value: Vec::new(),
                mod_revision: 7,
            }),
        );
        let members = crate::canonical(known.members());
        assert_eq!(members.len(), 2);
        assert_eq!(
            members[1].weight, 5,
            "the other key for the address takes over"
        );
    }

    #[test]
    fn keys_under_pins_are_pins_not_members() {
        let mut known = Known::default();
        known.apply(
            "/p/",
            &put("/p/10.0.0.1:80", r#"{"address":"10.0.0.1:80"}"#, 1),
        );
        known.apply(
            "/p/",
            &put("/p/pins/doc-1", r#"{"backend":"10.0.0.1:80"}"#, 2),
        );
        known.apply(
            "/p/",
            &put("/p/pins/doc 2", r#"{"backend":"10.0.0.2:80"}"#, 3),
        );
        known.apply("/p/", &put("/p/pins/bad", r#"{"backend":"nowhere"}"#, 4));
        assert_eq!(known.members().len(), 1, "a pin is never a member");
        let shown: Vec<(&str, String)> = known
            .pins
            .iter()
            .map(|(k, b)| (k.as_str(), b.to_string()))
            .collect();
        assert_eq!(
            shown,
            [
                ("doc 2", "10.0.0.2:80".to_string()),
                ("doc-1", "10.0.0.1:80".to_string())
            ]
        );
        known.apply(
            "/p/",
            &Event::Delete(KeyValue {
                key: b"/p/pins/doc-1".to_vec(),
                value: Vec::new(),
                mod_revision: 5,
            }),
        );
        assert_eq!(known.pins.len(), 1);
        assert_eq!(known.revision, 5);
        assert_eq!(super::pins_prefix("/p"), "/p/pins/");
        assert_eq!(super::pins_prefix("/p/"), "/p/pins/");
        assert_eq!(super::placements_prefix("/p/"), "/p/placements/");
    }

    #[test]
    fn keys_under_placements_are_reported_as_events_not_kept_as_members() {
        let mut known = Known::default();
        let placed = known.apply(
            "/p/",
            &put("/p/placements/doc-1", r#"{"backend":"10.0.0.1:80"}"#, 1),
        );
        assert_eq!(
            placed,
            Some(PlacementEvent::Placed(
                "doc-1".into(),
                "10.0.0.1:80".parse().unwrap()
            ))
        );
        let removed = known.apply(
            "/p/",
            &Event::Delete(KeyValue {
                key: b"/p/placements/doc-1".to_vec(),
                value: Vec::new(),
                mod_revision: 2,
            }),
        );
        assert_eq!(removed, Some(PlacementEvent::Removed("doc-1".into())));
        assert!(known.members().is_empty() && known.pins.is_empty());
        assert_eq!(known.revision, 2);
    }
}
