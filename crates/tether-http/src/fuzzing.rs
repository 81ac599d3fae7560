//! Entry points for the fuzz targets in `crates/tether-http/fuzz`: every function here that
//! reads bytes from the network, driven with arbitrary input, with the invariants each must
//! keep. Not part of the crate's API.

use crate::chunked::ChunkedEnd;
use crate::policy::{self, Forwarding};
use crate::request::{self, Request};
use crate::websocket::FrameCursor;
use std::mem::MaybeUninit;

/// A request head as the HTTP/1 engine reads it: parsed, its framing read, checked, and the
/// upstream head written. What the backend would get never carries a hop-by-hop field, and
/// its request line is a single line.
pub fn request_head(data: &[u8]) {
    let limits = tether_config::Limits::default();
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(len)) = req.parse_with_uninit_headers(data, &mut fields)
    else {
        return;
    };
    let raw = &data[..len];
    let Ok(facts) = Request::read(raw, &req) else {
        return;
    };
    let Ok(checked) = facts.check(&limits) else {
        return;
    };
    let up = request::Upstream {
        path: checked.path,
        query: checked.query,
        websocket: checked.websocket,
        forwarding: Forwarding {
            client_ip: Some(b"192.0.2.1"),
            trusted: false,
            tls: false,
            host: checked.host.map(str::as_bytes),
            chain: &facts.chain,
            proto: facts.forwarded_proto,
            forwarded_host: facts.forwarded_host,
            request_id: b"fuzz",
        },
    };
    let mut head = Vec::new();
    request::upstream_head(&facts, &up, &mut head, &mut Vec::new());
    let mut out_fields = [httparse::EMPTY_HEADER; 128];
    let mut again = httparse::Request::new(&mut out_fields);
    let reparsed = again.parse(&head);
    assert!(
        matches!(reparsed, Ok(httparse::Status::Complete(n)) if n == head.len()),
        "the upstream head does not parse back whole: {:?}",
        String::from_utf8_lossy(&head)
    );
    for field in again.headers.iter() {
        let hop = policy::is_hop_by_hop(field.name);
        let restated = checked.websocket
            && (policy::is(field.name, "connection") || policy::is(field.name, "upgrade"));
        assert!(
            !hop || restated,
            "hop-by-hop field {} forwarded",
            field.name
        );
        assert!(
            !field.name.contains('_'),
            "underscored field {} forwarded",
            field.name
        );
    }
}

/// A request body's framing as the HTTP/1 engine reads it: the head's framing fields, then
/// how much of the bytes behind the head is this request's body. The body never reaches past
/// the bytes there are, and never holds more data than `max_body`.
pub fn request_body(data: &[u8], max_body: u64) {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(len)) = req.parse_with_uninit_headers(data, &mut fields)
    else {
        return;
    };
    let Ok(facts) = Request::read(&data[..len], &req) else {
        return;
    };
    let after = &data[len..];
    if let Some(body) = facts.body.whole_in(after, max_body) {
        assert!(body.len() <= after.len());
        match facts.body {
            request::ReqBody::None => assert!(body.is_empty()),
            request::ReqBody::Length(n) => assert_eq!(body.len() as u64, n),
            request::ReqBody::Chunked => {
                let mut end = ChunkedEnd::default();
                assert_eq!(end.feed(body), Ok(Some(body.len())));
                assert!(end.data_bytes() <= max_body);
            }
        }
    }
}

/// A backend's response head as the HTTP/1 engine reads it, for an HTTP/1.1 and an HTTP/1.0
/// client: never a panic, and what goes to the client parses as a response.
pub fn response_head(data: &[u8]) {
    for http11_client in [true, false] {
        let mut out = Vec::new();
        let asked = crate::response::For {
            head_request: false,
            close: false,
            http11_client,
            request_id: b"fuzz",
            websocket_key: Some(b"dGhlIHNhbXBsZSBub25jZQ=="),
        };
        if matches!(
            crate::response::edit_head(data, &asked, &mut out),
            Ok(Some(_))
        ) && !out.is_empty()
        {
            let mut fields = [httparse::EMPTY_HEADER; 160];
            let mut response = httparse::Response::new(&mut fields);
            assert!(
                matches!(response.parse(&out), Ok(httparse::Status::Complete(_))),
                "the client's head does not parse: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
}

/// The response framing decision over arbitrary fields: never a panic.
pub fn response_framing(status: u16, fields: &[(String, Vec<u8>)]) {
    let _ = crate::framing::response(
        status,
        true,
        false,
        fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
    );
}

/// The chunked decoder: where a body ends, and how many data bytes it held, do not depend on
/// how the bytes are cut into reads.
pub fn chunked(data: &[u8], cut: usize) {
    let whole = {
        let mut end = ChunkedEnd::default();
        (end.feed(data), end.data_bytes())
    };
    let cut = cut.min(data.len());
    let mut end = ChunkedEnd::default();
    let first = end.feed(&data[..cut]);
    let split = match first {
        Ok(Some(n)) => (Ok(Some(n)), end.data_bytes()),
        Err(e) => (Err(e), end.data_bytes()),
        Ok(None) => {
            let second = end.feed(&data[cut..]).map(|r| r.map(|n| n + cut));
            (second, end.data_bytes())
        }
    };
    match (&whole.0, &split.0) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the end moved with the cut"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("whole {a:?} but split {b:?}"),
    }
    if let (Ok(Some(end)), Some(data_bytes)) = (whole.0, Some(whole.1)) {
        assert!(data_bytes <= end as u64);
        assert_eq!(data_bytes, split.1);
    }
    // Decoding finds the same end, and the same data however the reads are cut.
    let mut decoded = Vec::new();
    let mut end = ChunkedEnd::default();
    let decoded_whole = end.decode(data, &mut decoded);
    assert_eq!(decoded_whole.is_ok(), whole.0.is_ok());
    if let (Ok(a), Ok(b)) = (&decoded_whole, &whole.0) {
        assert_eq!(a, b, "decode and feed disagree on the end");
        assert_eq!(decoded.len() as u64, end.data_bytes());
    }
    let mut pieces = Vec::new();
    let mut end = ChunkedEnd::default();
    if let Ok(None) = end.decode(&data[..cut], &mut pieces) {
        let _ = end.decode(&data[cut..], &mut pieces);
    }
    if let Ok(Some(_)) = decoded_whole {
        assert_eq!(pieces, decoded, "the data moved with the cut");
    }
}

/// The WebSocket frame cursor: the boundaries it finds do not depend on how the bytes are cut.
pub fn frame_cursor(data: &[u8], cut: usize) {
    let mut whole = FrameCursor::default();
    whole.advance(data);
    let cut = cut.min(data.len());
    let mut split = FrameCursor::default();
    split.advance(&data[..cut]);
    let taken = split.finish_frame(&data[cut..]);
    assert!(taken <= data.len() - cut);
    split.advance(&data[cut + taken..]);
    assert_eq!(whole.at_boundary(), split.at_boundary());
}

/// An HTTP/2 request's pseudo-headers and fields (after HPACK) as the HTTP/2 engine checks them
/// on accepting the stream: the first line is `:path`, the second `:authority` (none if
/// empty), each further line a `name:value` field. Never a panic; a request let through has a
/// `:path` that cannot split an HTTP/1 request line, and at most one `Host`.
pub fn h2_request(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let path = lines.next().unwrap_or_default();
    let authority = lines.next().filter(|a| !a.is_empty());
    let fields: Vec<(&str, &[u8])> = lines
        .filter_map(|line| {
            let at = line.iter().position(|&b| b == b':')?;
            let name = std::str::from_utf8(&line[..at]).ok()?;
            Some((name, &line[at + 1..]))
        })
        .collect();
    for connect in [false, true] {
        let refused = crate::checks::h2_malformed(connect, path, authority, fields.iter().copied());
        if refused.is_none() {
            assert!(!path.iter().any(|b| matches!(b, 0 | b'\r' | b'\n' | b' ')));
            let hosts = fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
                .count();
            assert!(hosts <= 1);
        }
    }
}
