//! Request checks made before routing, the same for both engines: size limits (414, 431),
//! methods that are never proxied (TRACE, CONNECT: 405), the request target (400: form, bytes,
//! escapes; a fragment is cut off), `Host` (400: missing, repeated or malformed; an
//! absolute-form target must name the same host), `Expect` (417 unless `100-continue`) and the
//! WebSocket handshake (400, 426). A request that fails is
//! answered by the engine and never reaches a backend.

use crate::policy::is;
use tether_config::Limits;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The status the client gets.
    pub status: u16,
    /// The metric label (`tether_requests_refused_total{reason}`), one of
    /// `metrics::REFUSALS`.
    pub label: &'static str,
    /// A short reason for the response body.
    pub why: &'static str,
}

impl Refusal {
    /// A refusal with its label.
    pub const fn new(status: u16, label: &'static str, why: &'static str) -> Refusal {
        Refusal { status, label, why }
    }
}

const fn bad_target(why: &'static str) -> Refusal {
    Refusal::new(400, "bad_target", why)
}

const fn bad_host(why: &'static str) -> Refusal {
    Refusal::new(400, "bad_host", why)
}

const fn bad_websocket(status: u16, why: &'static str) -> Refusal {
    Refusal::new(status, "bad_websocket", why)
}

/// The request head as both engines see it.
pub struct Head<'a, F> {
    /// The method.
    pub method: &'a str,
    /// The request target as received (origin form, or absolute form on HTTP/1).
    pub target: &'a str,
    /// HTTP/1.1 (a `Host` is required, a WebSocket upgrade possible).
    pub http11: bool,
    /// HTTP/2's `:authority`, which stands in for `Host`.
    pub authority: Option<&'a [u8]>,
    /// The header fields, in order.
    pub fields: F,
}

/// What routing needs of a request that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'a> {
    /// The path (raw, before normalisation).
    pub path: &'a str,
    /// The query, without its `?`.
    pub query: Option<&'a str>,
    /// The host the request names, if any.
    pub host: Option<&'a str>,
    /// The request asks for a WebSocket (a checked handshake).
    pub websocket: bool,
}

/// Checks `head` against `limits` and HTTP's rules.
pub fn check<'a, F>(head: &Head<'a, F>, limits: &Limits) -> Result<Checked<'a>, Refusal>
where
    F: Iterator<Item = (&'a str, &'a [u8])> + Clone,
{
    // One pass over the fields (this runs on every request); the refusals follow in a fixed
    // order below, whatever order the fields came in.
    let mut seen = Seen::default();
    for (name, value) in head.fields.clone() {
        seen.take(name, value);
    }
    if head.target.len() > limits.max_uri {
        return Err(Refusal::new(414, "uri_too_long", "request target too long"));
    }
    let large = |why| Refusal::new(431, "header_too_large", why);
    if seen.count > limits.max_headers {
        return Err(large("too many header fields"));
    }
    if seen.longest_line > limits.max_header_line {
        return Err(large("header field too large"));
    }
    if seen.total > limits.max_header_bytes {
        return Err(large("header block too large"));
    }
    if matches!(head.method, "TRACE" | "CONNECT") {
        return Err(Refusal::new(
            405,
            "method_not_allowed",
            "method not allowed",
        ));
    }
    let (authority, origin) = split_target(head.target)?;
    let authority = authority.map(str::as_bytes);
    // A fragment is never part of a request target; HTTP/2's parser drops it before Tether
    // sees the path, so HTTP/1 drops it too: the router and the backend see the same path
    // whichever protocol carried it, and the fragment is never forwarded.
    let scan = scan_target(origin.as_bytes())?;
    let origin = &origin[..scan.end];
    let (path, query) = match scan.query {
        Some(at) => (&origin[..at], Some(&origin[at + 1..])),
        None => (origin, None),
    };
    if seen.hosts > 1 {
        return Err(bad_host("more than one Host header"));
    }
    let host = match (seen.host, head.authority) {
        (Some(h), _) => Some(h),
        (None, Some(a)) => Some(a),
        (None, None) if head.http11 && authority.is_none() => {
            // RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
            return Err(bad_host("missing Host header"));
        }
        (None, None) => authority,
    };
    if let Some(h) = host {
        if !valid_host(h) {
            return Err(bad_host("malformed Host header"));
        }
    }
    if let (Some(a), Some(h)) = (authority, host) {
        if !a.eq_ignore_ascii_case(h) {
            return Err(bad_host("request target and Host name different hosts"));
        }
    }
    if seen.unknown_expectation {
        // RFC 9110 10.1.1: an expectation the proxy cannot meet.
        return Err(Refusal::new(417, "bad_request", "unknown expectation"));
    }
    let websocket = seen.websocket(head.method, head.http11)?;
    Ok(Checked {
        path,
        query,
        // `valid_host` admits ASCII only.
        host: host.and_then(|h| std::str::from_utf8(h).ok()),
        websocket,
    })
}

/// What one pass over a request's fields found.
#[derive(Default)]
struct Seen<'a> {
    count: usize,
    /// The longest field line and the whole block, counted as on the wire (`: ` and CRLF).
    longest_line: usize,
    total: usize,
    hosts: usize,
    host: Option<&'a [u8]>,
    /// `Upgrade` names `websocket`.
    upgrade: bool,
    version: Option<&'a [u8]>,
    keys: usize,
    key_ok: bool,
    /// A body is declared (a non-zero length, or any transfer coding).
    body: bool,
    /// An `Expect` other than `100-continue`.
    unknown_expectation: bool,
}

impl<'a> Seen<'a> {
    fn take(&mut self, name: &'a str, value: &'a [u8]) {
        self.count += 1;
        let line = name.len() + value.len() + 4;
        self.longest_line = self.longest_line.max(line);
        self.total += line;
        match name.len() {
            6 if is(name, "expect") => {
                self.unknown_expectation |=
                    !value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            4 if is(name, "host") => {
                self.hosts += 1;
                self.host.get_or_insert(value);
            }
            7 if is(name, "upgrade") => self.upgrade |= names_websocket(value),
            14 if is(name, "content-length") => self.body |= value.trim_ascii() != b"0",
            17 if is(name, "transfer-encoding") => self.body = true,
            17 if is(name, "sec-websocket-key") => {
                self.keys += 1;
                self.key_ok = crate::websocket::valid_key(value);
            }
            21 if is(name, "sec-websocket-version") => self.version = Some(value),
            _ => {}
        }
    }

    /// A WebSocket upgrade must be an HTTP/1.1 GET with version 13 and one well-formed
    /// `Sec-WebSocket-Key` (RFC 6455 4.1), and declare no body: anything else could only be
    /// completed by a lax backend, so it is refused. True for a checked upgrade.
    fn websocket(&self, method: &str, http11: bool) -> Result<bool, Refusal> {
        if !self.upgrade {
            return Ok(false);
        }
        if method != "GET" || !http11 {
            return Err(bad_websocket(
                400,
                "WebSocket upgrade must be an HTTP/1.1 GET",
            ));
        }
        if self.body {
            return Err(bad_websocket(400, "WebSocket upgrade with a request body"));
        }
        if self.version != Some(b"13") {
            return Err(bad_websocket(426, "WebSocket version 13 required"));
        }
        if self.keys != 1 || !self.key_ok {
            return Err(bad_websocket(
                400,
                "WebSocket upgrade without a valid Sec-WebSocket-Key",
            ));
        }
        Ok(true)
    }
}

fn names_websocket(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// The size limits: target length (414), field count, field line and block size (431).
/// `fields` gives each field's name and value length.
pub fn check_sizes(
    target_len: usize,
    field_count: usize,
    fields: impl Iterator<Item = (usize, usize)>,
    limits: &Limits,
) -> Result<(), Refusal> {
    let large = |why| Refusal::new(431, "header_too_large", why);
    if target_len > limits.max_uri {
        return Err(Refusal::new(414, "uri_too_long", "request target too long"));
    }
    if field_count > limits.max_headers {
        return Err(large("too many header fields"));
    }
    let mut total = 0usize;
    for (name, value) in fields {
        // ": " and CRLF, as on the wire.
        let line = name + value + 4;
        if line > limits.max_header_line {
            return Err(large("header field too large"));
        }
        total += line;
    }
    if total > limits.max_header_bytes {
        return Err(large("header block too large"));
    }
    Ok(())
}

/// Splits an absolute-form target (`http://host/path`) into its authority and origin form;
/// an origin-form target has no authority. Any other form is refused.
fn split_target(raw: &str) -> Result<(Option<&str>, &str), Refusal> {
    if raw.as_bytes().first() == Some(&b'/') {
        return Ok((None, raw));
    }
    let rest = strip_prefix_ignore_case(raw, "http://")
        .or_else(|| strip_prefix_ignore_case(raw, "https://"))
        .ok_or(bad_target("request target must be a path"))?;
    let end = rest
        .bytes()
        .position(|b| matches!(b, b'/' | b'?'))
        .unwrap_or(rest.len());
    let (authority, origin) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return Err(bad_target("bad authority in request target"));
    }
    match origin.as_bytes().first() {
        Some(b'/') => Ok((Some(authority), origin)),
        // `http://h` and `http://h?q` mean the root.
        _ => Err(bad_target("absolute-form target without a path")),
    }
}

fn strip_prefix_ignore_case<'a>(raw: &'a str, prefix: &str) -> Option<&'a str> {
    raw.get(..prefix.len())
        .filter(|start| start.eq_ignore_ascii_case(prefix))
        .map(|_| &raw[prefix.len()..])
}

/// The bytes a request target may hold: RFC 3986's URI characters (unreserved, reserved but
/// `#`, which starts the fragment that is cut off, and `%`). Everything else (`<`, `>`, `"`, `\`, `^`, `` ` ``, `{`, `|`, `}`, controls, spaces,
/// non-ASCII) is refused on every protocol alike, so a backend never sees a target that one
/// path would have forwarded and another refused.
static TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~:/?[]@!$&'()*+,;=%";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

/// The origin-form target's bytes (`TARGET_BYTES`, the fragment already cut off); the
/// path's percent-escapes well formed and decoding to UTF-8: an overlong `%C0%AE` is a
/// classic way to smuggle a `.` past a proxy. (The query's escapes are the application's
/// business.)
pub fn check_target(raw: &[u8]) -> Result<(), Refusal> {
    scan_target(raw).map(|_| ())
}

/// Where an origin-form target's parts are, from [`scan_target`].
struct Scanned {
    /// Where the target ends: its length, or the `#` that starts a fragment.
    end: usize,
    /// Where the `?` that starts the query is.
    query: Option<usize>,
}

/// One pass over the target (this runs on every request): every byte before a fragment is
/// one `TARGET_BYTES` allows, and the path's escapes are checked when it has any.
fn scan_target(raw: &[u8]) -> Result<Scanned, Refusal> {
    let mut query = None;
    let mut escapes = false;
    let mut end = raw.len();
    for (at, &b) in raw.iter().enumerate() {
        match b {
            b'#' => {
                end = at;
                break;
            }
            b'?' if query.is_none() => query = Some(at),
            b'%' if query.is_none() => escapes = true,
            _ if !TARGET_BYTES[usize::from(b)] => {
                return Err(bad_target("request target has a byte URIs do not allow"))
            }
            _ => {}
        }
    }
    let scanned = Scanned { end, query };
    if !escapes {
        return Ok(scanned);
    }
    let raw = &raw[..query.unwrap_or(end)];
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
                None => return Err(bad_target("bad percent-encoding in request target")),
            },
            (b'%', None) => return Err(bad_target("bad percent-encoding in request target")),
            (b, _) => b,
        };
        decoded.push(byte);
        i += 1;
    }
    match std::str::from_utf8(&decoded) {
        Ok(_) => Ok(scanned),
        Err(_) => Err(bad_target("request target is not UTF-8 once decoded")),
    }
}

/// The bytes of a reg-name or IPv4 address (RFC 3986: unreserved, sub-delims, `%`), as a
/// table: this runs on every request.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
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
pub fn valid_host(value: &[u8]) -> bool {
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

/// How HTTP/2 refuses a request its framing layer (the h2 crate) let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Malformed {
    /// A framing or target error: the stream is reset (RFC 9113 8.1.1).
    Reset,
    /// The request names its host in ways that disagree: 400.
    BadRequest,
}

/// The checks an HTTP/2 request gets as its stream is accepted, before [`check`]: what the h2
/// crate lets through and an HTTP/1 backend must not see (Pingora's HTTP/2 session made the
/// same ones). `path` is `:path`, `authority` `:authority`; `connect`: the method is CONNECT.
/// Bytes that would split an HTTP/1 request line, `Transfer-Encoding`, or `Content-Length`
/// values that disagree reset the stream; a host named twice, with userinfo, differently in
/// `Host` and `:authority`, or not at all, or a `:path` that is not origin form, is a 400.
pub fn h2_malformed<'a>(
    connect: bool,
    path: &[u8],
    authority: Option<&[u8]>,
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Option<H2Malformed> {
    if path
        .iter()
        .any(|b| matches!(b, 0x00 | b'\n' | b'\r' | b' '))
    {
        return Some(H2Malformed::Reset);
    }
    let mut length = None;
    let mut hosts = 0usize;
    let mut host = None;
    for (name, value) in fields {
        if is(name, "content-length") {
            for token in value.split(|&b| b == b',') {
                match crate::framing::content_length(token) {
                    Some(n) if length.is_none_or(|m| m == n) => length = Some(n),
                    _ => return Some(H2Malformed::Reset),
                }
            }
        } else if is(name, "transfer-encoding") {
            return Some(H2Malformed::Reset);
        } else if is(name, "host") {
            hosts += 1;
            host = Some(value);
        }
    }
    let bad = hosts > 1
        || host.is_some_and(|h| h.contains(&b'@'))
        || authority.is_some_and(|a| a.contains(&b'@'))
        || matches!((host, authority), (Some(h), Some(a)) if h != a)
        || (host.is_none() && authority.is_none())
        || (!connect && !path.is_empty() && !path.starts_with(b"/") && path != b"*");
    bad.then_some(H2Malformed::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn run(
        method: &str,
        target: &str,
        fields: &[(&'static str, &'static str)],
    ) -> Result<Checked<'static>, Refusal> {
        let target: &'static str = Box::leak(target.to_string().into_boxed_str());
        let method: &'static str = Box::leak(method.to_string().into_boxed_str());
        let fields: &'static [(&'static str, &'static str)] =
            Box::leak(fields.to_vec().into_boxed_slice());
        let head = Head {
            method,
            target,
            http11: true,
            authority: None,
            fields: fields.iter().map(|(n, v)| (*n, v.as_bytes())),
        };
        check(&head, &limits())
    }

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
            "/a?x[]=1",
        ] {
            assert!(check_target(good.as_bytes()).is_ok(), "{good}");
        }
        for bad in [
            "/%zz",
            "/%4",
            "/%FF",
            "/<script>",
            "/a`b",
            "/a\"b",
            "/a{b}",
            "/a|b",
            "/a\\b",
            "/a^b",
            "/caf\u{e9}",
        ] {
            assert!(check_target(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn heads_are_checked_as_http_says() {
        let ok = run("GET", "/docs/a?x=1", &[("Host", "h")]).unwrap();
        assert_eq!(
            (ok.path, ok.query, ok.host),
            ("/docs/a", Some("x=1"), Some("h"))
        );
        let abs = run("GET", "http://h/docs/a", &[("Host", "H")]).unwrap();
        assert_eq!(abs.path, "/docs/a");
        let fragment = run("GET", "/docs/a?q#frag", &[("Host", "h")]).unwrap();
        assert_eq!((fragment.path, fragment.query), ("/docs/a", Some("q")));
        let status = |r: Result<Checked<'_>, Refusal>| r.err().map(|r| (r.status, r.label));
        assert_eq!(status(run("GET", "/a", &[])), Some((400, "bad_host")));
        assert_eq!(
            status(run("GET", "/a", &[("Host", "a"), ("host", "b")])),
            Some((400, "bad_host"))
        );
        assert_eq!(
            status(run("GET", "http://o/a", &[("Host", "h")])),
            Some((400, "bad_host"))
        );
        assert_eq!(
            status(run("TRACE", "/a", &[("Host", "h")])),
            Some((405, "method_not_allowed"))
        );
        assert_eq!(
            status(run("CONNECT", "h:443", &[("Host", "h")])),
            Some((405, "method_not_allowed"))
        );
        assert_eq!(
            status(run("OPTIONS", "*", &[("Host", "h")])),
            Some((400, "bad_target"))
        );
        assert_eq!(
            status(run("GET", "http://u@h/a", &[("Host", "h")])),
            Some((400, "bad_target"))
        );
        let ws = [
            ("Host", "h"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(run("GET", "/ws", &ws).unwrap().websocket);
        assert_eq!(
            status(run("POST", "/ws", &ws)),
            Some((400, "bad_websocket"))
        );
        assert_eq!(
            status(run("POST", "/a", &[("Host", "h"), ("Expect", "magic")])),
            Some((417, "bad_request"))
        );
        assert!(run("POST", "/a", &[("Host", "h"), ("Expect", "100-Continue")]).is_ok());
        let mut with_body = ws.to_vec();
        with_body.push(("Content-Length", "3"));
        assert_eq!(
            status(run("GET", "/ws", &with_body)),
            Some((400, "bad_websocket"))
        );
        let old = [ws[0], ws[1], ("Sec-WebSocket-Version", "8"), ws[3]];
        assert_eq!(
            status(run("GET", "/ws", &old)),
            Some((426, "bad_websocket"))
        );
    }

    #[test]
    fn http2_refuses_what_its_framing_let_through() {
        let f = |fields: &[(&'static str, &'static str)]| {
            fields
                .iter()
                .map(|(n, v)| (*n, v.as_bytes()))
                .collect::<Vec<_>>()
        };
        let m = |path: &str, authority: Option<&str>, fields: &[(&'static str, &'static str)]| {
            h2_malformed(
                false,
                path.as_bytes(),
                authority.map(str::as_bytes),
                f(fields).into_iter(),
            )
        };
        let (reset, bad) = (Some(H2Malformed::Reset), Some(H2Malformed::BadRequest));
        assert_eq!(m("/docs/a?x=1", Some("h"), &[]), None);
        assert_eq!(m("/a", None, &[("host", "h")]), None);
        assert_eq!(m("*", Some("h"), &[]), None);
        assert_eq!(m("/a b", Some("h"), &[]), reset);
        assert_eq!(m("/a\r\nX: y", Some("h"), &[]), reset);
        assert_eq!(
            m(
                "/a",
                Some("h"),
                &[("content-length", "5"), ("content-length", "5")]
            ),
            None
        );
        assert_eq!(m("/a", Some("h"), &[("content-length", "5, 5")]), None);
        assert_eq!(
            m(
                "/a",
                Some("h"),
                &[("content-length", "5"), ("content-length", "6")]
            ),
            reset
        );
        assert_eq!(m("/a", Some("h"), &[("content-length", "5,")]), reset);
        assert_eq!(m("/a", Some("h"), &[("content-length", "-5")]), reset);
        assert_eq!(
            m("/a", Some("h"), &[("transfer-encoding", "chunked")]),
            reset
        );
        assert_eq!(m("/a", Some("h"), &[("host", "other")]), bad);
        assert_eq!(m("/a", None, &[("host", "h"), ("host", "h")]), bad);
        assert_eq!(m("/a", Some("u@h"), &[]), bad);
        assert_eq!(m("/a", None, &[("host", "u@h")]), bad);
        assert_eq!(m("/a", None, &[]), bad);
        assert_eq!(m("http://h/a", Some("h"), &[]), bad);
    }
}
