//! A parsed HTTP/1 request head: the facts the engine needs from it (one pass over the
//! fields), its body framing (RFC 9112 6), and the head the backend gets.

use crate::checks::{self, Refusal};
use crate::chunked::ChunkedEnd;
use crate::framing::content_length;
use crate::policy::{self, is, Forwarding, Nominated};
use smallvec::SmallVec;
use tether_config::Limits;

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqBody {
    /// No body (no framing field, or `Content-Length: 0`).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl ReqBody {
    /// The whole body when it came with the head in `after_head` (and is within `max_body`):
    /// it is then sent with the head in one write, and again on a fresh connection if a
    /// kept-alive one turns out stale. None when more must be read from the client (or the
    /// body is broken or too large: streaming it finds out and answers).
    pub fn whole_in(self, after_head: &[u8], max_body: u64) -> Option<&[u8]> {
        match self {
            ReqBody::None => Some(&after_head[..0]),
            ReqBody::Length(n) => usize::try_from(n)
                .ok()
                .filter(|&n| n <= after_head.len())
                .map(|n| &after_head[..n]),
            ReqBody::Chunked => {
                let mut end = ChunkedEnd::default();
                match end.feed(after_head) {
                    Ok(Some(n)) if end.data_bytes() <= max_body => Some(&after_head[..n]),
                    _ => None,
                }
            }
        }
    }
}

/// What the engine needs of one request head, borrowed from it.
pub struct Request<'h, 'b> {
    /// The whole head, as received.
    pub raw: &'b [u8],
    /// The fields, as parsed.
    pub fields: &'h [httparse::Header<'b>],
    pub method: &'b str,
    /// The target as received.
    pub target: &'b str,
    /// HTTP/1.1 (else 1.0).
    pub http11: bool,
    /// The connection ends after this request (asked for, or HTTP/1.0: Tether keeps no
    /// HTTP/1.0 connection alive, as its responses to them are delimited by the close).
    pub close: bool,
    pub body: ReqBody,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// The first `X-Request-Id` value.
    pub request_id: Option<&'b [u8]>,
    /// Names the `Connection` fields nominate.
    pub nominated: Nominated<'b>,
    /// The `X-Forwarded-For` values (used only from a trusted peer).
    pub chain: SmallVec<[&'b [u8]; 2]>,
    pub forwarded_proto: Option<&'b [u8]>,
    pub forwarded_host: Option<&'b [u8]>,
    /// The `Accept` values (SSE is asked for there).
    pub accepts: SmallVec<[&'b [u8]; 2]>,
}

impl<'h, 'b> Request<'h, 'b> {
    /// The facts of a parsed head, or the refusal its framing earns (400).
    pub fn read(raw: &'b [u8], req: &'h httparse::Request<'_, 'b>) -> Result<Self, Refusal> {
        let framing = |why| Refusal::new(400, "bad_framing", why);
        let method = req.method.unwrap_or("");
        let target = req.path.unwrap_or("");
        let http11 = req.version == Some(1);
        let mut facts = Request {
            raw,
            fields: req.headers,
            method,
            target,
            http11,
            close: !http11,
            body: ReqBody::None,
            expect_continue: false,
            request_id: None,
            nominated: Nominated::new(),
            chain: SmallVec::new(),
            forwarded_proto: None,
            forwarded_host: None,
            accepts: SmallVec::new(),
        };
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut encodings = 0;
        for field in req.headers.iter() {
            let (name, value) = (field.name, field.value);
            match name.len() {
                6 if is(name, "accept") => facts.accepts.push(value),
                // Any other expectation is refused by the checks (417).
                6 if is(name, "expect") => {
                    facts.expect_continue =
                        value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
                }
                10 if is(name, "connection") => {
                    for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                        if token.eq_ignore_ascii_case(b"close") {
                            facts.close = true;
                        }
                    }
                    policy::nominated(value, &mut facts.nominated);
                }
                14 if is(name, "content-length") => {
                    let n = content_length(value).ok_or(framing("malformed Content-Length"))?;
                    if length.is_some_and(|m| m != n) {
                        return Err(framing("conflicting Content-Length"));
                    }
                    length = Some(n);
                }
                12 if is(name, "x-request-id") && facts.request_id.is_none() => {
                    facts.request_id = Some(value);
                }
                15 if is(name, "x-forwarded-for") => facts.chain.push(value),
                16 if is(name, "x-forwarded-host") => facts.forwarded_host = Some(value),
                17 if is(name, "x-forwarded-proto") => facts.forwarded_proto = Some(value),
                17 if is(name, "transfer-encoding") => {
                    encodings += 1;
                    chunked = value.trim_ascii().eq_ignore_ascii_case(b"chunked");
                }
                _ => {}
            }
        }
        if encodings > 0 {
            // Only exactly one `chunked` is unambiguous; with a length beside it, or on
            // HTTP/1.0, which has no chunked coding, two servers may read two requests.
            if encodings > 1 || !chunked {
                return Err(framing("unsupported Transfer-Encoding"));
            }
            if length.is_some() {
                return Err(framing("Content-Length with Transfer-Encoding"));
            }
            if !http11 {
                return Err(framing("Transfer-Encoding on HTTP/1.0"));
            }
            facts.body = ReqBody::Chunked;
        } else if let Some(n) = length.filter(|&n| n > 0) {
            facts.body = ReqBody::Length(n);
        }
        if facts.body == ReqBody::None {
            // Nothing to wait for.
            facts.expect_continue = false;
        }
        Ok(facts)
    }

    /// The fields as name/value pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + Clone + 'h {
        self.fields.iter().map(|f| (f.name, f.value))
    }

    /// The checks both engines make (sizes, method, target, Host, WebSocket).
    pub fn check(&self, limits: &Limits) -> Result<checks::Checked<'b>, Refusal> {
        checks::check(
            &checks::Head {
                method: self.method,
                target: self.target,
                http11: self.http11,
                authority: None,
                fields: self.pairs(),
            },
            limits,
        )
    }
}

/// What the upstream request head is made of besides the client's head.
pub struct Upstream<'a> {
    /// The target Tether routed on (normalised path, and the query as received).
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The upgrade is a WebSocket: restated as exactly `Connection: Upgrade` + `Upgrade:
    /// websocket`, so no other protocol offered beside it (h2c) reaches the backend.
    pub websocket: bool,
    pub forwarding: Forwarding<'a>,
}

/// Writes the request head as the backend gets it into `head`: the request line (HTTP/1.0
/// stays 1.0, so the backend answers in a form the client reads), the client's fields the
/// policy keeps (runs of them copied as sent), then Tether's own.
pub fn upstream_head(
    req: &Request<'_, '_>,
    up: &Upstream<'_>,
    head: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) {
    head.clear();
    head.extend_from_slice(req.method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(up.path.as_bytes());
    if let Some(query) = up.query {
        head.push(b'?');
        head.extend_from_slice(query.as_bytes());
    }
    head.extend_from_slice(if req.http11 {
        b" HTTP/1.1\r\n"
    } else {
        b" HTTP/1.0\r\n"
    });
    let trusted = up.forwarding.trusted;
    copy_field_lines(req.raw, req.fields, head, |field| {
        policy::keeps_request_field(field.name, trusted, &req.nominated)
            && !is(field.name, "expect")
    });
    if up.websocket {
        head.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
    }
    policy::write_forwarding(head, &up.forwarding, scratch);
    head.extend_from_slice(b"\r\n");
}

/// Writes the field lines of a parsed head (`raw`, up to and with its blank line) that `keep`
/// keeps to `out`. Runs of consecutive kept lines are copied as the peer sent them, one copy
/// per run (writing each line anew was 5 % of the path's instructions); a head with a bare-LF
/// line end has every kept line written anew as `Name: value` CRLF instead.
pub fn copy_field_lines(
    raw: &[u8],
    fields: &[httparse::Header<'_>],
    out: &mut Vec<u8>,
    mut keep: impl FnMut(&httparse::Header<'_>) -> bool,
) {
    let base = raw.as_ptr() as usize;
    let start = |field: &httparse::Header<'_>| {
        (field.name.as_ptr() as usize)
            .checked_sub(base)
            .filter(|&at| at < raw.len())
    };
    // Every line before a field's line ends in CRLF, and so does the last one.
    let crlf = raw.ends_with(b"\r\n\r\n")
        && fields.iter().all(|field| {
            start(field).is_some_and(|at| at >= 2 && raw.get(at - 2..at) == Some(b"\r\n"))
        });
    if !crlf {
        for field in fields {
            if keep(field) {
                policy::push_field(out, field.name.as_bytes(), field.value);
            }
        }
        return;
    }
    // The field lines end where the blank line starts.
    let end = raw.len() - 2;
    let mut run: Option<usize> = None;
    for field in fields {
        let at = start(field).unwrap_or(end);
        if keep(field) {
            run.get_or_insert(at);
        } else if let Some(from) = run.take() {
            out.extend_from_slice(raw.get(from..at).unwrap_or_default());
        }
    }
    if let Some(from) = run {
        out.extend_from_slice(raw.get(from..end).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed<T>(head: &[u8], f: impl FnOnce(Result<Request<'_, '_>, Refusal>) -> T) -> T {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut fields);
        assert!(req.parse(head).unwrap().is_complete());
        f(Request::read(head, &req))
    }

    /// The field lines `copy_field_lines` writes for `head`, dropping fields named `drop`.
    fn copied(head: &[u8], drop: &[&str]) -> String {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        assert!(req.parse(head).unwrap().is_complete());
        let mut out = Vec::new();
        copy_field_lines(head, req.headers, &mut out, |f| {
            !drop.iter().any(|d| d.eq_ignore_ascii_case(f.name))
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn kept_field_lines_are_copied_as_sent_and_dropped_ones_are_not() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nX-A:1 \r\nX-B: 2\r\nKeep-Alive: 5\r\n\r\n";
        assert_eq!(
            copied(head, &["connection", "keep-alive"]),
            "Host: a\r\nX-A:1 \r\nX-B: 2\r\n"
        );
        assert_eq!(
            copied(head, &["host", "connection", "x-a", "x-b", "keep-alive"]),
            ""
        );
        let bare = b"GET / HTTP/1.1\nHost: a\nX-A: 1\n\n";
        assert_eq!(copied(bare, &[]), "Host: a\r\nX-A: 1\r\n");
    }

    #[test]
    fn request_framing_is_unambiguous_or_refused() {
        let status = |head: &str| parsed(head.as_bytes(), |r| r.err().map(|e| e.status));
        let body = |head: &str| parsed(head.as_bytes(), |r| r.ok().map(|r| r.body));
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Some(ReqBody::Length(5))
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Some(ReqBody::None)
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Some(ReqBody::Chunked)
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(status(bad), Some(400), "{bad}");
        }
    }

    #[test]
    fn http_1_0_always_closes() {
        let close = |head: &str| parsed(head.as_bytes(), |r| r.unwrap().close);
        assert!(close("GET / HTTP/1.0\r\n\r\n"));
        assert!(close("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!close("GET / HTTP/1.1\r\n\r\n"));
        assert!(close("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    }
}
