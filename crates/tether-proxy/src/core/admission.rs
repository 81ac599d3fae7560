//! What happens between routing and the backend, the same for both engines: a router's
//! refusal becomes a status (and a counted reason), and a routed request is admitted or not
//! by its route's body limit (413) and rate limit (429).

use crate::state::Installed;
use std::net::IpAddr;
use tether_config::RateLimitBy;
use tether_http::checks::Refusal;
use tether_routing::{Decision, Reject};

/// The status for a request the router refused; counts it by reason unless the refusal is
/// not the client's doing (no healthy backend).
pub fn routing_refusal(reject: &Reject) -> u16 {
    let status = reject.status();
    let label = match reject {
        Reject::BadPath(_) => Some("bad_path"),
        Reject::NoRoute => Some("no_route"),
        Reject::MissingKey { .. } => Some("missing_key"),
        Reject::BadKey { .. } => Some("bad_key"),
        Reject::NoHealthyBackend { .. } => None,
    };
    if let Some(label) = label {
        crate::metrics::refused(label, status);
    }
    status
}

/// Admits a routed request: its declared body length within the route's `max_body`, and its
/// key (or client address) within the route's `rate_limit` (a count-min estimate over
/// one-second windows, pingora-limits).
pub fn admit(
    installed: &Installed,
    decision: &Decision,
    declared_body: Option<u64>,
    client_ip: Option<IpAddr>,
) -> Result<(), Refusal> {
    let route = &installed.router.routes()[decision.route];
    if declared_body.is_some_and(|n| n > route.max_body) {
        return Err(Refusal::new(
            413,
            "body_too_large",
            "request body too large",
        ));
    }
    if let (Some(limit), Some(Some(rate))) =
        (route.rate_limit, installed.limiters.get(decision.route))
    {
        let seen = match (limit.by, decision.key.as_deref(), client_ip) {
            (RateLimitBy::Key, Some(key), _) => rate.observe(&key, 1),
            (_, _, Some(ip)) => rate.observe(&ip, 1),
            (_, _, None) => 0,
        };
        if seen > limit.per_second as isize + limit.burst as isize {
            return Err(Refusal::new(429, "rate_limited", "rate limited"));
        }
    }
    Ok(())
}
