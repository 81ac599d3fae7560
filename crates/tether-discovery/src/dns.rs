//! The DNS membership source: the A and AAAA records of a name, resolved every interval.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tether_config::DnsDiscovery;

use crate::{DiscoveryError, Member, Publisher};

/// Longest a single resolution may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

fn resolver(spec: &DnsDiscovery) -> Result<TokioResolver, DiscoveryError> {
    let dns_error = |reason: String| DiscoveryError::Dns {
        name: spec.name.clone(),
        reason,
    };
    let mut builder = match spec.resolver {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut ns.connections {
                connection.port = server.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| dns_error(e.to_string()))?,
    };
    let options = builder.options_mut();
    // Every interval asks the server again: the records are the membership, a cached
    // answer would hide changes.
    options.cache_size = 0;
    options.timeout = LOOKUP_TIMEOUT;
    options.attempts = 1;
    builder.build().map_err(|e| dns_error(e.to_string()))
}

/// Resolves `spec.name` once: its members, or why not. No records at all is an error too: the
/// last known members are kept rather than emptying the ring on one odd answer.
async fn resolve(
    resolver: &TokioResolver,
    spec: &DnsDiscovery,
) -> Result<Vec<Member>, DiscoveryError> {
    let dns_error = |reason: String| DiscoveryError::Dns {
        name: spec.name.clone(),
        reason,
    };
    let lookup = tokio::time::timeout(LOOKUP_TIMEOUT * 2, resolver.lookup_ip(spec.name.as_str()))
        .await
        .map_err(|_| dns_error("timed out".to_string()))?
        .map_err(|e| dns_error(e.to_string()))?;
    let members: Vec<Member> = lookup
        .iter()
        .map(|ip| Member {
            address: SocketAddr::new(ip, spec.port),
            weight: 1,
        })
        .collect();
    if members.is_empty() {
        return Err(dns_error("no A or AAAA records".to_string()));
    }
    Ok(members)
}

/// Runs the source until the task is aborted.
pub(crate) async fn run(spec: DnsDiscovery, publish: Publisher) {
    let resolver = loop {
        match resolver(&spec) {
            Ok(r) => break r,
            Err(e) => {
                if publish.down(e.to_string()) {
                    tracing::warn!("DNS discovery cannot start: {e}");
                }
                tokio::time::sleep(spec.interval).await;
            }
        }
    };
    let mut ticks = tokio::time::interval(spec.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match resolve(&resolver, &spec).await {
            Ok(members) => publish.members(members, Default::default(), true),
            Err(e) => {
                if publish.down(e.to_string()) {
                    tracing::warn!("DNS discovery: {e}; serving the last known membership");
                }
            }
        }
    }
}
