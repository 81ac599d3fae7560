//! Headers the proxy adds or removes on the way through: `X-Forwarded-*`, `X-Request-Id`, and
//! hop-by-hop fields on responses (Pingora strips them from requests itself).

use http::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use pingora::http::{RequestHeader, ResponseHeader};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Hop-by-hop response fields that must not reach the client (RFC 9110 7.6.1). Framing headers
/// (`Transfer-Encoding`, `Content-Length`) are left to Pingora, which re-frames the body.
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
];

/// A process-unique request id: a random 64-bit prefix chosen at start plus a counter, so ids
/// never repeat within a process and rarely across processes, without a syscall per request.
pub fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(random_prefix);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let text = format!("{prefix:016x}-{n:08x}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn random_prefix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; good enough for an id prefix.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Adds the forwarding headers to a request about to go upstream. An incoming
/// `X-Forwarded-For` is appended to only when the client is a trusted proxy; from anyone else
/// it (and `Forwarded`) is replaced, so a client cannot make up the chain a backend believes.
/// Header names with `_` are dropped (as nginx does by default): CGI-style backends read
/// `X_Forwarded_For` and `X-Forwarded-For` as the same variable.
pub fn add_forwarding_headers(
    req: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    client_trusted: bool,
    tls: bool,
    original_host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) -> pingora::Result<()> {
    if !client_trusted {
        req.remove_header(&FORWARDED);
    }
    if req.headers.keys().any(|name| name.as_str().contains('_')) {
        let underscored: Vec<_> = req
            .headers
            .keys()
            .filter(|name| name.as_str().contains('_'))
            .cloned()
            .collect();
        for name in underscored {
            req.remove_header(&name);
        }
    }
    match client_ip {
        Some(ip) => {
            let value = match req.headers.get(&X_FORWARDED_FOR).map(|v| v.to_str()) {
                Some(Ok(prev)) if client_trusted && !prev.trim().is_empty() => {
                    format!("{prev}, {ip}")
                }
                _ => ip.to_string(),
            };
            req.insert_header(X_FORWARDED_FOR, value)?;
        }
        None if !client_trusted => {
            req.remove_header(&X_FORWARDED_FOR);
        }
        None => {}
    }
    req.insert_header(X_FORWARDED_PROTO, if tls { "https" } else { "http" })?;
    if let Some(host) = original_host {
        req.insert_header(X_FORWARDED_HOST, host.clone())?;
    }
    req.insert_header(X_REQUEST_ID, request_id.clone())?;
    Ok(())
}

/// Removes hop-by-hop fields (and the fields `Connection` nominates) from an upstream response.
/// A `101 Switching Protocols` keeps `Connection` and `Upgrade`: the client needs them.
pub fn strip_response_hop_by_hop(resp: &mut ResponseHeader) {
    if resp.status.as_u16() == 101 {
        return;
    }
    let nominated: Vec<String> = resp
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in nominated {
        // Never let a Connection header strip framing fields Pingora relies on.
        if name != "content-length" && name != "transfer-encoding" {
            resp.remove_header(name.as_str());
        }
    }
    for name in HOP_BY_HOP {
        resp.remove_header(name);
    }
    resp.remove_header(&UPGRADE);
}
