//! Request checks made before routing: size limits (414, 431), `Host` (400: missing, repeated or
//! malformed; an absolute-form target must name the same host), and methods that must never be
//! proxied (TRACE: 405). A request that fails is answered here and never reaches a backend.

use http::header::HOST;
use http::{Method, Version};
use pingora::http::RequestHeader;
use tether_config::Limits;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The status the client gets.
    pub status: u16,
    /// The metric label (`tether_requests_refused_total{reason}`), one of [`REASONS`].
    pub label: &'static str,
    /// A short reason for the response body.
    pub why: &'static str,
}

/// Every label a refusal made here can carry.
pub const REASONS: [&str; 6] = [
    "uri_too_long",
    "header_too_large",
    "method_not_allowed",
    "bad_target",
    "bad_websocket",
    "bad_host",
];

fn refuse(status: u16, why: &'static str) -> Refusal {
    let label = match status {
        414 => "uri_too_long",
        431 => "header_too_large",
        405 => "method_not_allowed",
        _ if why.contains("WebSocket") => "bad_websocket",
        _ if why.contains("Host") || why.contains("host") => "bad_host",
        _ => "bad_target",
    };
    Refusal { status, label, why }
}

/// Checks `req` against `limits` and HTTP's rules for `Host`.
pub fn check(req: &RequestHeader, limits: &Limits) -> Result<(), Refusal> {
    let fields = req
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().len(), value.len()));
    check_sizes(req.raw_path().len(), req.headers.len(), fields, limits)?;
    if req.method == Method::TRACE {
        return Err(refuse(405, "TRACE is not allowed"));
    }
    check_target(req.raw_path())?;
    check_websocket(req)?;
    check_host(req)
}

/// The size limits: target length (414), field count, field line and block size (431).
/// `fields` gives each field's name and value length.
pub(crate) fn check_sizes(
    target_len: usize,
    field_count: usize,
    fields: impl Iterator<Item = (usize, usize)>,
    limits: &Limits,
) -> Result<(), Refusal> {
    if target_len > limits.max_uri {
        return Err(refuse(414, "request target too long"));
    }
    if field_count > limits.max_headers {
        return Err(refuse(431, "too many header fields"));
    }
    let mut total = 0usize;
    for (name, value) in fields {
        // ": " and CRLF, as on the wire.
        let line = name + value + 4;
        if line > limits.max_header_line {
            return Err(refuse(431, "header field too large"));
        }
        total += line;
    }
    if total > limits.max_header_bytes {
        return Err(refuse(431, "header block too large"));
    }
    Ok(())
}

/// A fragment never belongs in a request target (RFC 9112 3.2), and the path's
/// percent-escapes must decode to UTF-8: an overlong `%C0%AE` is a classic way to smuggle a `.`
/// past a proxy. (The query is the application's business.)
pub(crate) fn check_target(raw: &[u8]) -> Result<(), Refusal> {
    // Most targets have none of the three: one pass decides.
    if memchr::memchr3(b'#', b'?', b'%', raw).is_none() {
        return Ok(());
    }
    if raw.contains(&b'#') {
        return Err(refuse(400, "fragment in request target"));
    }
    let raw = raw.split(|&b| b == b'?').next().unwrap_or(raw);
    if !raw.contains(&b'%') {
        return Ok(());
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let byte = match (raw[i], raw.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    i += 2;
                    b
                }
                None => return Err(refuse(400, "bad percent-encoding in request target")),
            },
            (b'%', None) => return Err(refuse(400, "bad percent-encoding in request target")),
            (b, _) => b,
        };
        decoded.push(byte);
        i += 1;
    }
    match std::str::from_utf8(&decoded) {
        Ok(_) => Ok(()),
        Err(_) => Err(refuse(400, "request target is not UTF-8 once decoded")),
    }
}

/// A WebSocket upgrade must be an HTTP/1.1 GET with a well-formed `Sec-WebSocket-Key`
/// (RFC 6455 4.1); anything else could only be completed by a lax backend, so it is refused.
fn check_websocket(req: &RequestHeader) -> Result<(), Refusal> {
    if !crate::exchange::asks_for_websocket(req) {
        return Ok(());
    }
    // RFC 6455 4.1: the opening handshake is an HTTP/1.1 GET.
    if req.method != Method::GET || req.version != Version::HTTP_11 {
        return Err(refuse(400, "WebSocket upgrade must be an HTTP/1.1 GET"));
    }
    if req
        .headers
        .get(http::header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(refuse(426, "WebSocket version 13 required"));
    }
    let mut keys = req.headers.get_all(http::header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) if crate::exchange::valid_websocket_key(key.as_bytes()) => Ok(()),
        _ => Err(refuse(
            400,
            "WebSocket upgrade without a valid Sec-WebSocket-Key",
        )),
    }
}

fn check_host(req: &RequestHeader) -> Result<(), Refusal> {
    let mut hosts = req.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(refuse(400, "more than one Host header"));
    }
    let Some(host) = host else {
        // RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
        return if req.version == Version::HTTP_11 && req.uri.authority().is_none() {
            Err(refuse(400, "missing Host header"))
        } else {
            Ok(())
        };
    };
    if !valid_host(host.as_bytes()) {
        return Err(refuse(400, "malformed Host header"));
    }
    if let Some(authority) = req.uri.authority() {
        if !authority
            .as_str()
            .eq_ignore_ascii_case(&String::from_utf8_lossy(host.as_bytes()))
        {
            return Err(refuse(400, "request target and Host name different hosts"));
        }
    }
    Ok(())
}

/// The bytes of a reg-name or IPv4 address (RFC 3986: unreserved, sub-delims, `%`), as a
/// table: this runs on every request.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=%";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

/// `host[:port]` per RFC 3986: a reg-name or IPv4 of unreserved / sub-delim / pct characters,
/// or a bracketed IPv6 literal, then an optional port of at most 5 digits (<= 65535).
pub(crate) fn valid_host(value: &[u8]) -> bool {
    let port = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &value[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return false,
        }
    } else {
        let (host, port) = match value.iter().rposition(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        };
        if host.is_empty() || !host.iter().all(|&b| REG_NAME[usize::from(b)]) {
            return false;
        }
        port
    };
    match port {
        None => true,
        Some(p) => {
            !p.is_empty()
                && p.len() <= 5
                && p.iter().all(u8::is_ascii_digit)
                && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values() {
        for good in [
            "docs.example.com",
            "127.0.0.1:8080",
            "[::1]:80",
            "[::1]",
            "a-b_c.d:1",
            "h:65535",
            "h:00080",
            "x~y!$&'()*+,;=%41.z",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "a b", "a/b", "a@b", "h:99999", "h:", "h:8o", "", "[::1", "[zz]", ":80", "h\tx",
            "h:65536", "h:123456", "h\u{e9}", "a\"b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn request_targets() {
        for good in [
            "/",
            "/docs/doc-1/x",
            "/a?b=c",
            "/a?%zz",
            "/%41b",
            "/caf%C3%A9",
        ] {
            assert!(check_target(good.as_bytes()).is_ok(), "{good}");
        }
        for bad in ["/a#b", "/a?x#y", "/%zz", "/%4", "/%FF", "#"] {
            assert!(check_target(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_refusal_gets_a_known_label() {
        let cases = [
            (414, "request target too long", "uri_too_long"),
            (431, "header block too large", "header_too_large"),
            (405, "TRACE is not allowed", "method_not_allowed"),
            (400, "fragment in request target", "bad_target"),
            (426, "WebSocket version 13 required", "bad_websocket"),
            (400, "missing Host header", "bad_host"),
            (
                400,
                "request target and Host name different hosts",
                "bad_host",
            ),
        ];
        for (status, why, label) in cases {
            let r = refuse(status, why);
            assert_eq!(r.label, label, "{why}");
            assert!(REASONS.contains(&r.label));
        }
    }
}
