//! The header policy: which fields cross the proxy, and the ones Tether writes itself. Written
//! once, for both engines: both write the backend's HTTP/1 head with it, on raw field lines,
//! through a [`FieldWriter`].
//!
//! Requests lose the hop-by-hop fields ([`HOP_BY_HOP`]), the fields their `Connection` header
//! nominates (except `Host`, the framing fields and the fields Tether sets, which a client
//! cannot talk it out of), names with `_` (CGI backends read `X_Forwarded_For` as
//! `X-Forwarded-For`), and, unless the peer is in `trusted_proxies`, every client-identity
//! field ([`is_client_identity`]). Tether then writes `X-Forwarded-For` (the trusted chain
//! extended, or the peer alone), `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Request-Id`.
//! Responses lose the hop-by-hop fields, the nominated ones and the backend's `X-Request-Id`,
//! and get Tether's `X-Request-Id`.

use smallvec::SmallVec;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Fields that describe one connection, never the message (RFC 9110 7.6.1), plus those that
/// only mean something to a proxy or to an HTTP/2 upgrade: none is passed on either way. The
/// framing fields (`Content-Length`, `Transfer-Encoding`) are the engines' business.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

/// Whether `a` and the lower-case `lower` are the same name (ASCII, case-insensitive).
pub fn is(a: &str, lower: &str) -> bool {
    a.len() == lower.len() && a.eq_ignore_ascii_case(lower)
}

/// Whether `name` is one of [`HOP_BY_HOP`]. Runs for every field of every message: names
/// are told apart by length first (a unit test checks it against the list).
pub fn is_hop_by_hop(name: &str) -> bool {
    match name.len() {
        2 => is(name, "te"),
        7 => is(name, "upgrade") || is(name, "trailer"),
        10 => is(name, "connection") || is(name, "keep-alive"),
        14 => is(name, "http2-settings"),
        16 => is(name, "proxy-connection"),
        18 => is(name, "proxy-authenticate"),
        19 => is(name, "proxy-authorization"),
        _ => false,
    }
}

/// Fields Tether sets on every request it forwards (whatever the client sent is replaced).
fn is_set_by_tether(name: &str) -> bool {
    match name.len() {
        12 => is(name, "x-request-id"),
        15 => is(name, "x-forwarded-for"),
        16 => is(name, "x-forwarded-host"),
        17 => is(name, "x-forwarded-proto"),
        _ => false,
    }
}

/// Whether `name` is a framing field.
pub fn is_framing(name: &str) -> bool {
    is(name, "content-length") || is(name, "transfer-encoding")
}

/// Fields in which a client says who it is or how it connected. Only a trusted proxy may send
/// them: from anyone else they are dropped, and Tether writes its own `X-Forwarded-*`.
pub fn is_client_identity(name: &str) -> bool {
    const OTHERS: [&str; 7] = [
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
    ];
    (name.len() > 12 && name.as_bytes()[..12].eq_ignore_ascii_case(b"x-forwarded-"))
        || OTHERS.iter().any(|o| is(name, o))
}

/// The names a `Connection` field's value nominates (`close` and `keep-alive` are options,
/// not names), appended to `into`.
pub fn nominated<'v>(value: &'v [u8], into: &mut Nominated<'v>) {
    for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if !token.is_empty()
            && !token.eq_ignore_ascii_case(b"close")
            && !token.eq_ignore_ascii_case(b"keep-alive")
        {
            into.push(token);
        }
    }
}

/// The names nominated by a message's `Connection` fields.
pub type Nominated<'v> = SmallVec<[&'v [u8]; 4]>;

fn named(nominated: &Nominated<'_>, name: &str) -> bool {
    nominated
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// Whether a request field is passed to the backend (before Tether adds its own).
pub fn keeps_request_field(name: &str, trusted: bool, nominated: &Nominated<'_>) -> bool {
    // A byte loop: names are short, and `contains` calls memchr.
    if is_hop_by_hop(name)
        || is_set_by_tether(name)
        || name.bytes().any(|b| b == b'_')
        || (!trusted && is_client_identity(name))
    {
        return false;
    }
    // A client cannot nominate `Host` or the framing away.
    nominated.is_empty() || is(name, "host") || is_framing(name) || !named(nominated, name)
}

/// Whether a response field is passed to the client (before Tether adds its own).
pub fn keeps_response_field(name: &str, nominated: &Nominated<'_>) -> bool {
    !is_hop_by_hop(name)
        && !is(name, "x-request-id")
        && (nominated.is_empty() || is_framing(name) || !named(nominated, name))
}

/// Where the fields Tether writes go: a raw HTTP/1 head, or a header map.
pub trait FieldWriter {
    /// Appends the field `name: value`.
    fn push(&mut self, name: &'static str, value: &[u8]);
}

impl FieldWriter for Vec<u8> {
    fn push(&mut self, name: &'static str, value: &[u8]) {
        push_field(self, name.as_bytes(), value);
    }
}

/// Writes one field line.
#[inline]
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // One capacity check for the four pieces.
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the forwarding fields of one request are made from.
pub struct Forwarding<'a> {
    /// The peer's address as text (None when it is not an IP peer).
    pub client_ip: Option<&'a [u8]>,
    /// The peer is in `trusted_proxies`.
    pub trusted: bool,
    /// The client connection is TLS.
    pub tls: bool,
    /// The request's host (`Host`, or the HTTP/2 authority).
    pub host: Option<&'a [u8]>,
    /// The `X-Forwarded-For` values a trusted peer sent, in order.
    pub chain: &'a [&'a [u8]],
    /// A trusted peer's `X-Forwarded-Proto` and `X-Forwarded-Host`, kept as it sent them.
    pub proto: Option<&'a [u8]>,
    /// See `proto`.
    pub forwarded_host: Option<&'a [u8]>,
    /// The request id.
    pub request_id: &'a [u8],
}

/// Writes the fields Tether sets on a forwarded request.
pub fn write_forwarding(out: &mut impl FieldWriter, f: &Forwarding<'_>, scratch: &mut Vec<u8>) {
    if let Some(ip) = f.client_ip {
        scratch.clear();
        if f.trusted {
            for prev in f.chain.iter().map(|v| v.trim_ascii()) {
                if !prev.is_empty() {
                    scratch.extend_from_slice(prev);
                    scratch.extend_from_slice(b", ");
                }
            }
        }
        scratch.extend_from_slice(ip);
        out.push("X-Forwarded-For", scratch);
    } else if f.trusted && !f.chain.is_empty() {
        scratch.clear();
        for (i, prev) in f.chain.iter().enumerate() {
            if i > 0 {
                scratch.extend_from_slice(b", ");
            }
            scratch.extend_from_slice(prev.trim_ascii());
        }
        out.push("X-Forwarded-For", scratch);
    }
    let proto: &[u8] = if f.tls { b"https" } else { b"http" };
    out.push(
        "X-Forwarded-Proto",
        f.proto.filter(|_| f.trusted).unwrap_or(proto),
    );
    if let Some(host) = f.forwarded_host.filter(|_| f.trusted).or(f.host) {
        out.push("X-Forwarded-Host", host);
    }
    out.push("X-Request-Id", f.request_id);
}

/// Whether a client's `X-Request-Id` value is kept (else Tether makes one up).
pub fn usable_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 200 && value.iter().all(|&b| b.is_ascii_graphic())
}

/// A process-unique request id: a random 64-bit prefix chosen at start plus a counter, so ids
/// never repeat within a process and rarely across processes, without a syscall per request.
/// Written as `{prefix:016x}-{counter:08x}` by hand into a stack buffer: no allocation.
pub struct GeneratedId {
    buf: [u8; 33],
    len: usize,
}

impl GeneratedId {
    /// The next id.
    pub fn new() -> GeneratedId {
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
    let digits = ((64 - value.leading_zeros() as usize).div_ceil(4)).max(min_digits);
    for i in 0..digits {
        buf[at + digits - 1 - i] = DIGITS[((value >> (4 * i)) & 0xf) as usize];
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

/// Appends the client address as header text. IPv4 is written by hand: `Display` for an
/// address costs more than all the other forwarding fields together (callgrind).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nom(value: &str) -> Nominated<'_> {
        let mut n = Nominated::new();
        nominated(value.as_bytes(), &mut n);
        n
    }

    #[test]
    fn hop_by_hop_and_proxy_fields_never_reach_a_backend() {
        let none = Nominated::new();
        for name in [
            "Connection",
            "Keep-Alive",
            "Proxy-Authorization",
            "Proxy-Authenticate",
            "HTTP2-Settings",
            "TE",
            "Trailer",
            "Upgrade",
            "X_Forwarded_For",
            "X-Request-Id",
        ] {
            assert!(!keeps_request_field(name, true, &none), "{name}");
        }
        for name in [
            "Host",
            "Content-Length",
            "Transfer-Encoding",
            "Accept",
            "Cookie",
        ] {
            assert!(keeps_request_field(name, false, &none), "{name}");
        }
    }

    #[test]
    fn the_length_switch_drops_exactly_the_hop_by_hop_list_and_tethers_fields() {
        let none = Nominated::new();
        for name in HOP_BY_HOP {
            assert!(
                is_hop_by_hop(name) && is_hop_by_hop(&name.to_uppercase()),
                "{name}"
            );
        }
        assert!(!is_hop_by_hop("host") && !is_hop_by_hop("tE-x"));
        for name in HOP_BY_HOP.iter().chain(&[
            "x-request-id",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
        ]) {
            assert!(!keeps_request_field(name, true, &none), "{name}");
            assert!(
                !keeps_request_field(&name.to_uppercase(), true, &none),
                "{name}"
            );
        }
        for name in HOP_BY_HOP.iter().chain(&["x-request-id"]) {
            assert!(!keeps_response_field(name, &none), "{name}");
            assert!(!keeps_response_field(&name.to_uppercase(), &none), "{name}");
        }
        assert!(keeps_response_field("Content-Length", &none));
    }

    #[test]
    fn connection_cannot_nominate_host_framing_or_tethers_own_fields_away() {
        let n = nom("close, Host, Content-Length, X-Secret, keep-alive");
        assert!(keeps_request_field("Host", false, &n));
        assert!(keeps_request_field("Content-Length", false, &n));
        assert!(!keeps_request_field("x-secret", false, &n));
        assert!(keeps_request_field("X-Other", false, &n));
        assert!(!keeps_response_field("X-Secret", &n));
        assert!(keeps_response_field("Content-Length", &n));
    }

    #[test]
    fn client_identity_fields_pass_only_from_trusted_peers() {
        let none = Nominated::new();
        for name in [
            "Forwarded",
            "X-Real-IP",
            "X-Forwarded-Port",
            "True-Client-IP",
        ] {
            assert!(!keeps_request_field(name, false, &none), "{name}");
            assert!(keeps_request_field(name, true, &none), "{name}");
        }
    }

    #[test]
    fn forwarding_fields_extend_a_trusted_chain_and_replace_an_untrusted_one() {
        let chain: [&[u8]; 2] = [b"1.1.1.1", b" 2.2.2.2 "];
        let mut f = Forwarding {
            client_ip: Some(b"10.0.0.9"),
            trusted: true,
            tls: true,
            host: Some(b"h"),
            chain: &chain,
            proto: Some(b"http"),
            forwarded_host: None,
            request_id: b"id-1",
        };
        let mut out = Vec::new();
        write_forwarding(&mut out, &f, &mut Vec::new());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\nX-Forwarded-Proto: http\r\n\
             X-Forwarded-Host: h\r\nX-Request-Id: id-1\r\n"
        );
        f.trusted = false;
        let mut out = Vec::new();
        write_forwarding(&mut out, &f, &mut Vec::new());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: h\r\n\
             X-Request-Id: id-1\r\n"
        );
    }

    #[test]
    fn request_ids_are_prefix_dash_counter_in_hex() {
        let a = GeneratedId::new();
        let b = GeneratedId::new();
        let (a, b) = (
            std::str::from_utf8(a.as_bytes()).unwrap(),
            std::str::from_utf8(b.as_bytes()).unwrap(),
        );
        let (prefix_a, n_a) = a.split_once('-').unwrap();
        let (prefix_b, n_b) = b.split_once('-').unwrap();
        assert_eq!(prefix_a, prefix_b);
        assert_eq!(prefix_a.len(), 16);
        assert!(u64::from_str_radix(n_b, 16).unwrap() > u64::from_str_radix(n_a, 16).unwrap());
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
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }
}
