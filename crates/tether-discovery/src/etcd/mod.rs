//! etcd: the v3 JSON gateway client, the watching membership source and the announcer.

pub mod announce;
pub mod client;
pub(crate) mod source;

use std::net::SocketAddr;

use crate::{DiscoveryError, Member};
use client::EtcdClient;

/// The JSON value of one backend key: `{"address": "ip:port", "weight": 1}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberValue {
    /// `ip:port` of the backend.
    pub address: String,
    /// Relative weight, 1..=1000; 1 when absent.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Largest weight a member may announce (the config's limit too).
pub const MAX_WEIGHT: u32 = tether_config::defaults::MAX_WEIGHT;

impl MemberValue {
    /// The member this value describes, or why it is unusable.
    pub fn parse(bytes: &[u8]) -> Result<Member, String> {
        let value: MemberValue =
            serde_json::from_slice(bytes).map_err(|e| format!("not a member value: {e}"))?;
        let address = value
            .address
            .trim()
            .parse()
            .map_err(|_| format!("address `{}` is not ip:port", value.address))?;
        if !(1..=MAX_WEIGHT).contains(&value.weight) {
            return Err(format!(
                "weight {} is not in 1..={MAX_WEIGHT}",
                value.weight
            ));
        }
        Ok(Member {
            address,
            weight: value.weight,
        })
    }
}

/// Where the pins of the upstream watching `prefix` live: `<prefix>/pins/` (one `/` between
/// them). Keys there are not members: each is `<pins prefix><document key>` with a
/// [`BackendValue`], so every proxy watching the prefix sees every pin.
pub fn pins_prefix(prefix: &str) -> String {
    under(prefix, "pins")
}

/// `<prefix>/<part>/`, with one `/` between them whether or not `prefix` ends with one.
fn under(prefix: &str, part: &str) -> String {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    format!("{prefix}/{part}/")
}

/// The JSON value of one pin or placement: `{"backend": "ip:port"}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendValue {
    /// `ip:port` of the backend the document is pinned to.
    pub backend: String,
}

impl BackendValue {
    /// The stored value naming `backend`.
    pub fn encode(backend: SocketAddr) -> Vec<u8> {
        let value = BackendValue {
            backend: backend.to_string(),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// The backend this value names, or why it is unusable.
    pub fn parse(bytes: &[u8]) -> Result<SocketAddr, String> {
        let value: BackendValue =
            serde_json::from_slice(bytes).map_err(|e| format!("not a backend value: {e}"))?;
        value
            .backend
            .trim()
            .parse()
            .map_err(|_| format!("backend `{}` is not ip:port", value.backend))
    }
}

/// Where the bounded-load placements of the upstream watching `prefix` live:
/// `<prefix>/placements/`, one key per document with a [`BackendValue`], each bound to the
/// lease of the instance that placed it.
pub fn placements_prefix(prefix: &str) -> String {
    under(prefix, "placements")
}

/// What the watch saw of an upstream's placements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementEvent {
    /// The whole set, after a full read of the prefix.
    Loaded(std::collections::BTreeMap<String, SocketAddr>),
    /// A document was placed (or placed again).
    Placed(String, SocketAddr),
    /// A placement was deleted (or its lease ended).
    Removed(String),
}

/// Places document `key` of the upstream watching `prefix` on `backend` unless another
/// instance placed it first: one etcd transaction (create if absent, bound to `lease`).
/// Returns the placement in force: `backend`, or the one that was there.
pub async fn place(
    client: &EtcdClient,
    prefix: &str,
    key: &str,
    backend: SocketAddr,
    lease: i64,
) -> Result<SocketAddr, DiscoveryError> {
    let name = format!("{}{key}", placements_prefix(prefix));
    match client
        .create_if_absent(name.as_bytes(), &BackendValue::encode(backend), lease)
        .await?
    {
        None => Ok(backend),
        Some(existing) => BackendValue::parse(&existing).map_err(|reason| DiscoveryError::Decode {
            endpoint: name,
            reason,
        }),
    }
}

/// Deletes the placement of document `key` of the upstream watching `prefix`.
pub async fn unplace(client: &EtcdClient, prefix: &str, key: &str) -> Result<(), DiscoveryError> {
    let name = format!("{}{key}", placements_prefix(prefix));
    client.delete(name.as_bytes()).await
}

/// Pins `key` of the upstream watching `prefix` to `backend` in etcd (no lease: a pin stays
/// until it is removed), or removes its pin (`None`).
pub async fn set_pin(
    client: &EtcdClient,
    prefix: &str,
    key: &str,
    backend: Option<SocketAddr>,
) -> Result<(), DiscoveryError> {
    let name = format!("{}{key}", pins_prefix(prefix));
    match backend {
        Some(backend) => {
            let value = BackendValue::encode(backend);
            client.put(name.as_bytes(), &value, 0).await
        }
        None => client.delete(name.as_bytes()).await,
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's rule: the
/// prefix with its last byte below 0xff incremented and the rest cut off; `\0` = to the end).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_end_of_a_prefix_covers_exactly_its_keys() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn member_values_are_checked() {
        let ok = MemberValue::parse(br#"{"address":"127.0.0.1:80"}"#).expect("valid");
        assert_eq!(ok.weight, 1);
        assert!(MemberValue::parse(br#"{"address":"host:80"}"#).is_err());
        assert!(MemberValue::parse(br#"{"address":"127.0.0.1:80","weight":0}"#).is_err());
        assert!(MemberValue::parse(br#"{"address":"127.0.0.1:80","wieght":2}"#).is_err());
        assert!(MemberValue::parse(b"127.0.0.1:80").is_err());
    }
}
