//! A fleet's agreement on where new documents go, for upstreams with `discovery: etcd` and
//! `bounded_load`: several instances must place a new document on the same backend, or it
//! would be split between them.
//!
//! The first request of a document an instance has not seen proposes the placement its own
//! loads suggest, as one etcd transaction that creates `<prefix>/placements/<key>` only if
//! absent; whichever instance wrote first wins and every other one takes its answer, so the
//! request goes where the fleet agreed (one etcd round trip, once per document per instance).
//! Every instance also takes every placement from its watch of the prefix
//! (`control::discovery`). A placement is bound to the lease of the instance that made it
//! (one lease per instance and upstream, renewed every few seconds): when that instance stops,
//! its placements go, and an instance still holding streams of such a document places it
//! again (same backend). An instance deletes the placements it made once they expire locally
//! (`bounded_load.linger` after the document's last stream).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tether_config::EtcdDiscovery;
use tether_discovery::{DiscoveryError, EtcdClient};

/// How long this instance's placements outlive it.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(3);

/// One upstream's side of the agreement.
pub struct Fleet {
    /// The etcd discovery it shares placements through.
    pub spec: EtcdDiscovery,
    client: EtcdClient,
    /// This instance's lease (None until the first placement, or after it was lost).
    lease: tokio::sync::Mutex<Option<i64>>,
    /// The placements this instance made (its to delete).
    mine: Mutex<HashSet<Box<str>>>,
}

impl Fleet {
    /// The agreement through `spec`'s etcd; renews its lease from a task of its own while the
    /// returned value lives.
    pub fn start(spec: &EtcdDiscovery) -> Arc<Fleet> {
        let fleet = Arc::new(Fleet {
            spec: spec.clone(),
            client: EtcdClient::new(spec.endpoints.clone()),
            lease: tokio::sync::Mutex::new(None),
            mine: Mutex::new(HashSet::new()),
        });
        tokio::spawn(renew(Arc::downgrade(&fleet)));
        fleet
    }

    async fn lease(&self) -> Result<i64, DiscoveryError> {
        let mut lease = self.lease.lock().await;
        match *lease {
            Some(id) => Ok(id),
            None => {
                let id = self.client.grant(LEASE_TTL).await?;
                *lease = Some(id);
                Ok(id)
            }
        }
    }

    /// Proposes `backend` for document `key`; returns the placement the fleet agreed on.
    pub async fn place(
        &self,
        key: &str,
        backend: SocketAddr,
    ) -> Result<SocketAddr, DiscoveryError> {
        let lease = self.lease().await?;
        let result =
            tether_discovery::etcd::place(&self.client, &self.spec.prefix, key, backend, lease)
                .await;
        if matches!(result, Err(DiscoveryError::Status { .. })) {
            // Most likely the lease is gone (etcd answers a put on an unknown lease with an
            // error): take a new one next time.
            *self.lease.lock().await = None;
        }
        let agreed = result?;
        if agreed == backend {
            self.mine
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.into());
        }
        Ok(agreed)
    }

    /// Deletes the placements among `keys` that this instance made (they expired here).
    pub async fn forget(&self, keys: Vec<Box<str>>) {
        let ours: Vec<Box<str>> = {
            let mut mine = self.mine.lock().unwrap_or_else(|p| p.into_inner());
            keys.into_iter().filter(|k| mine.remove(k)).collect()
        };
        for key in ours {
            let unplaced = tether_discovery::etcd::unplace(&self.client, &self.spec.prefix, &key);
            if let Err(e) = unplaced.await {
                tracing::debug!(key = %key, "could not delete an expired placement: {e}");
            }
        }
    }
}

/// Renews the lease of `fleet` until it is dropped; a lease found gone is forgotten, so the
/// next placement takes a new one.
async fn renew(fleet: Weak<Fleet>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let Some(fleet) = fleet.upgrade() else {
            return;
        };
        let Some(id) = *fleet.lease.lock().await else {
            continue;
        };
        match fleet.client.keep_alive(id).await {
            Ok(_) => {}
            Err(DiscoveryError::LeaseGone(_)) => {
                tracing::warn!(prefix = %fleet.spec.prefix, "placement lease lost; taking a new one");
                *fleet.lease.lock().await = None;
                fleet.mine.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            Err(e) => {
                tracing::debug!(prefix = %fleet.spec.prefix, "placement lease not renewed: {e}")
            }
        }
    }
}
