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
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Hop-by-hop response fields that must not reach the client (RFC 9110 7.6.1). Framing headers
/// (`Transfer-Encoding`, `Content-Length`) are left to Pingora, which re-frames the body.
/// As `HeaderName`s, so that removing them does not parse a name per call.
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    UPGRADE,
];

/// Whether `name` is one of [`HOP_BY_HOP`], compared without building a `HeaderName`
/// (Tether's HTTP/1 path matches raw field names).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| hop.as_str().len() == name.len() && name.eq_ignore_ascii_case(hop.as_str()))
}

/// Whether a client's `X-Request-Id` value is kept (else Tether makes one up).
pub fn usable_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 200
}

/// A process-unique request id as a header value (see [`GeneratedId`]).
pub fn new_request_id() -> HeaderValue {
    HeaderValue::from_bytes(GeneratedId::new().as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A process-unique request id: a random 64-bit prefix chosen at start plus a counter, so ids
/// never repeat within a process and rarely across processes, without a syscall per request.
/// Written as `{prefix:016x}-{counter:08x}` by hand into a stack buffer: no allocation, no
/// `format!`.
pub struct GeneratedId {
    buf: [u8; 33],
    len: usize,
}

impl GeneratedId {
    /// The next id.
    pub fn new() -> GeneratedId {
        // The prefix and its dash, written out once: each id copies them and adds the counter.
        static PREFIX: OnceLock<[u8; 33]> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut buf = *PREFIX.get_or_init(|| {
            let mut buf = [0u8; 33];
            let dash = push_hex(&mut buf, 0, random_prefix(), 16);
            buf[dash] = b'-';
            buf
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let len = push_hex(&mut buf, 17, n, 8);
        GeneratedId { buf, len }
    }

    /// The id's bytes (lower-case hex and one `-`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Default for GeneratedId {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `value` in lower-case hex with at least `min_digits` digits at `buf[at..]`; returns
/// the end. `buf` must have room for 16 digits after `at`.
fn push_hex(buf: &mut [u8; 33], at: usize, value: u64, min_digits: usize) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let significant = (64 - value.leading_zeros() as usize).div_ceil(4);
    let digits = significant.max(min_digits);
    for i in 0..digits {
        let nibble = (value >> (4 * (digits - 1 - i))) & 0xf;
        buf[at + i] = DIGITS[nibble as usize];
    }
    at + digits
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
                _ => ip_text(ip),
            };
            req.insert_header("X-Forwarded-For", value)?;
        }
        None if !client_trusted => {
            req.remove_header(&X_FORWARDED_FOR);
        }
        None => {}
    }
    // Names as `&'static str` in the case they go out in: Pingora keeps a case-preserving name
    // map beside the header map and would otherwise title-case a `HeaderName` into a fresh
    // buffer on every insert. Static values are not copied either.
    let proto = if tls { "https" } else { "http" };
    req.insert_header("X-Forwarded-Proto", HeaderValue::from_static(proto))?;
    if let Some(host) = original_host {
        req.insert_header("X-Forwarded-Host", host.clone())?;
    }
    req.insert_header("X-Request-Id", request_id.clone())?;
    Ok(())
}

/// The client address as header text.
fn ip_text(ip: IpAddr) -> String {
    let mut text = Vec::with_capacity(15);
    push_ip(&mut text, ip);
    String::from_utf8(text).unwrap_or_default()
}

/// Appends the client address as header text. IPv4 is written by hand: `Display` for an
/// address costs more than all the other forwarding headers together (callgrind,
/// BENCHMARKS.md).
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        out.extend_from_slice(ip.to_string().as_bytes());
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// The field names a `Connection` header nominates as hop-by-hop, lower-cased.
fn nominated(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Makes a client's WebSocket upgrade request fit to send to a backend over Tether's own
/// connection: hop-by-hop fields (and those `Connection` nominates) go, and the upgrade is
/// restated as exactly `Connection: Upgrade` + `Upgrade: websocket`, so that no other protocol
/// offered beside it (h2c, catalogue E6) reaches the backend.
pub fn websocket_upgrade_request(req: &mut RequestHeader) -> pingora::Result<()> {
    for name in nominated(&req.headers) {
        if name != "upgrade" {
            req.remove_header(name.as_str());
        }
    }
    for name in &HOP_BY_HOP {
        req.remove_header(name);
    }
    req.insert_header("Connection", HeaderValue::from_static("Upgrade"))?;
    req.insert_header("Upgrade", HeaderValue::from_static("websocket"))?;
    Ok(())
}

/// Removes hop-by-hop fields (and the fields `Connection` nominates) from an upstream response.
/// A `101 Switching Protocols` keeps `Connection` and `Upgrade`: the client needs them.
pub fn strip_response_hop_by_hop(resp: &mut ResponseHeader) {
    if resp.status.as_u16() == 101 {
        return;
    }
    for name in nominated(&resp.headers) {
        // Never let a Connection header strip framing fields Pingora relies on.
        if name != "content-length" && name != "transfer-encoding" {
            resp.remove_header(name.as_str());
        }
    }
    for name in &HOP_BY_HOP {
        resp.remove_header(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_prefix_dash_counter_in_hex() {
        let a = new_request_id();
        let b = new_request_id();
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        let (prefix_a, n_a) = a.split_once('-').unwrap();
        let (prefix_b, n_b) = b.split_once('-').unwrap();
        assert_eq!(prefix_a, prefix_b);
        assert_eq!(prefix_a.len(), 16);
        assert!(n_a.len() >= 8 && n_b.len() >= 8);
        let (n_a, n_b) = (
            u64::from_str_radix(n_a, 16).unwrap(),
            u64::from_str_radix(n_b, 16).unwrap(),
        );
        assert!(n_b > n_a);
    }

    #[test]
    fn a_websocket_upgrade_goes_upstream_as_exactly_websocket() {
        let mut req = RequestHeader::build("GET", b"/ws", None).unwrap();
        req.insert_header("Connection", "keep-alive, Upgrade, X-Secret")
            .unwrap();
        req.insert_header("Upgrade", "h2c, websocket").unwrap();
        req.insert_header("X-Secret", "1").unwrap();
        req.insert_header("Keep-Alive", "timeout=5").unwrap();
        req.insert_header("TE", "trailers").unwrap();
        req.insert_header("Sec-WebSocket-Key", "k").unwrap();
        websocket_upgrade_request(&mut req).unwrap();
        assert_eq!(req.headers.get("connection").unwrap(), "Upgrade");
        assert_eq!(req.headers.get("upgrade").unwrap(), "websocket");
        for gone in ["x-secret", "keep-alive", "te"] {
            assert!(req.headers.get(gone).is_none(), "{gone} kept");
        }
        assert_eq!(req.headers.get("sec-websocket-key").unwrap(), "k");
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.10.100.200",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn hex_is_padded_to_the_minimum_and_grows_past_it() {
        let mut buf = [0u8; 33];
        let end = push_hex(&mut buf, 0, 0x2a, 8);
        assert_eq!(&buf[..end], b"0000002a");
        let end = push_hex(&mut buf, 0, 0x1_2345_6789, 8);
        assert_eq!(&buf[..end], b"123456789");
        let end = push_hex(&mut buf, 0, u64::MAX, 16);
        assert_eq!(&buf[..end], b"ffffffffffffffff");
    }
}
