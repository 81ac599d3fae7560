//! `tether announce`: register one backend under a prefix with a lease, keep the lease alive,
//! and revoke it on stop so the backend leaves every Tether's ring at once.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use super::client::EtcdClient;
use super::MemberValue;
use crate::DiscoveryError;

/// What to announce, and where.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// etcd endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// The prefix the proxies watch; the key is the prefix followed by the address.
    pub prefix: String,
    /// The backend's `ip:port`, as proxies should connect to it.
    pub address: SocketAddr,
    /// Its weight, 1..=1000.
    pub weight: u32,
    /// Lease TTL: how long after the last renewal (say, a crash) the backend stays a member.
    pub ttl: Duration,
}

impl Announcement {
    /// The etcd key: `prefix` + `address`.
    pub fn key(&self) -> String {
        format!("{}{}", self.prefix, self.address)
    }

    /// The JSON value proxies read.
    pub fn value(&self) -> Vec<u8> {
        let value = MemberValue {
            address: self.address.to_string(),
            weight: self.weight,
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

/// How long revoking may take on stop before giving up (the lease then simply expires).
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait between attempts while etcd is unreachable.
const RETRY: Duration = Duration::from_millis(250);

/// Announces `what` until `stop` resolves, then revokes the lease. Survives etcd outages: it
/// keeps renewing, and grants a new lease and writes the key again if the old lease is gone.
/// Calls `on_registered` each time the key is (re)written, with the lease id.
pub async fn announce(
    what: &Announcement,
    stop: impl Future<Output = ()>,
    mut on_registered: impl FnMut(i64),
) -> Result<(), DiscoveryError> {
    let client = EtcdClient::new(what.endpoints.clone());
    let key = what.key();
    let value = what.value();
    // Renew three times per TTL, so one lost renewal does not drop the member.
    let renew_every = (what.ttl / 3).max(Duration::from_millis(200));
    tokio::pin!(stop);
    let mut lease: Option<i64> = None;
    // Failures are logged once per outage, not once per retry.
    let mut failing = false;
    loop {
        let step = async {
            match lease {
                None => {
                    let id = client.grant(what.ttl).await?;
                    client.put(key.as_bytes(), &value, id).await?;
                    Ok::<_, DiscoveryError>(Some(id))
                }
                Some(id) => {
                    tokio::time::sleep(renew_every).await;
                    match client.keep_alive(id).await {
                        Ok(_) => Ok(Some(id)),
                        Err(DiscoveryError::LeaseGone(_)) => {
                            tracing::warn!(lease = id, "lease expired; registering again");
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            result = step => match result {
                Ok(Some(id)) => {
                    if failing {
                        tracing::info!("etcd answers again");
                        failing = false;
                    }
                    if lease != Some(id) {
                        tracing::info!(key, lease = id, ttl = ?what.ttl, "announced");
                        on_registered(id);
                    }
                    lease = Some(id);
                }
                Ok(None) => lease = None,
                Err(e) => {
                    if failing {
                        tracing::debug!("etcd: {e}; retrying");
                    } else {
                        tracing::warn!("etcd: {e}; retrying until it answers");
                        failing = true;
                    }
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            },
        }
    }
    if let Some(id) = lease {
        match tokio::time::timeout(REVOKE_TIMEOUT, client.revoke(id)).await {
            Ok(Ok(())) => tracing::info!(key, lease = id, "lease revoked; backend left"),
            Ok(Err(e)) => {
                tracing::warn!(
                    key,
                    "could not revoke the lease ({e}); it expires after its TTL"
                );
                return Err(e);
            }
            Err(_) => tracing::warn!(key, "revoke timed out; the lease expires after its TTL"),
        }
    }
    Ok(())
}
