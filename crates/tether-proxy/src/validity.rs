//! Request checks made before routing: size limits (414, 431), `Host` (400: missing, repeated or
//! malformed; an absolute-form target must name the same host), and methods that must never be
//! proxied (TRACE: 405). A request that fails is answered here and never reaches a backend.

use http::header::HOST;
use http::{Method, Version};
use pingora::http::RequestHeader;
use tether_config::Limits;

/// Why a request is refused: the status and a short reason for the response body.
pub type Refusal = (u16, &'static str);

/// Checks `req` against `limits` and HTTP's rules for `Host`.
pub fn check(req: &RequestHeader, limits: &Limits) -> Result<(), Refusal> {
    if req.raw_path().len() > limits.max_uri {
        return Err((414, "request target too long"));
    }
    if req.headers.len() > limits.max_headers {
        return Err((431, "too many header fields"));
    }
    let mut total = 0usize;
    for (name, value) in &req.headers {
        // ": " and CRLF, as on the wire.
        let line = name.as_str().len() + value.len() + 4;
        if line > limits.max_header_line {
            return Err((431, "header field too large"));
        }
        total += line;
    }
    if total > limits.max_header_bytes {
        return Err((431, "header block too large"));
    }
    if req.method == Method::TRACE {
        return Err((405, "TRACE is not allowed"));
    }
    check_host(req)
}

fn check_host(req: &RequestHeader) -> Result<(), Refusal> {
    let mut hosts = req.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err((400, "more than one Host header"));
    }
    let Some(host) = host else {
        // RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
        return if req.version == Version::HTTP_11 && req.uri.authority().is_none() {
            Err((400, "missing Host header"))
        } else {
            Ok(())
        };
    };
    if !valid_host(host.as_bytes()) {
        return Err((400, "malformed Host header"));
    }
    if let Some(authority) = req.uri.authority() {
        if !authority
            .as_str()
            .eq_ignore_ascii_case(&String::from_utf8_lossy(host.as_bytes()))
        {
            return Err((400, "request target and Host name different hosts"));
        }
    }
    Ok(())
}

/// `host[:port]` per RFC 3986: a reg-name or IPv4 of unreserved / sub-delim / pct characters,
/// or a bracketed IPv6 literal, then an optional port of at most 5 digits (<= 65535).
fn valid_host(value: &[u8]) -> bool {
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
        let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b);
        if host.is_empty() || !host.iter().all(reg_name) {
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
                && std::str::from_utf8(p)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some_and(|n| n <= 65535)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn host_values() {
        for good in [
            "docs.example.com",
            "127.0.0.1:8080",
            "[::1]:80",
            "[::1]",
            "a-b_c.d:1",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "a b", "a/b", "a@b", "h:99999", "h:", "h:8o", "", "[::1", "[zz]", ":80", "h\tx",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
