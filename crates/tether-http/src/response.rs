//! A backend's response head as the client gets it: parsed, checked by the one response-head
//! validation ([`crate::framing`]), and edited by the header policy ([`crate::policy`]) into
//! the bytes the client gets; a `101` checked against the WebSocket handshake asked for.

use crate::framing::{self, BadResponse, Body};
use crate::policy::{self, is, Nominated};
use crate::request::copy_field_lines;
use std::mem::MaybeUninit;

/// Most header fields in a backend's response head.
const MAX_RESPONSE_FIELDS: usize = 128;

/// What the edit needs to know of the request the response answers.
#[derive(Debug, Clone, Copy)]
pub struct For<'a> {
    /// The request was HEAD: the response has no body whatever its head says.
    pub head_request: bool,
    /// Tell the client this connection closes after the response.
    pub close: bool,
    /// The client speaks HTTP/1.1 (interim responses and chunked bodies are for it only).
    pub http11_client: bool,
    /// The request id Tether answers with.
    pub request_id: &'a [u8],
    /// The client's `Sec-WebSocket-Key`, for a WebSocket upgrade.
    pub websocket_key: Option<&'a [u8]>,
}

/// A parsed final response head, already rewritten for the client into the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalHead {
    /// The head's length in the backend's bytes.
    pub len: usize,
    /// The status.
    pub status: u16,
    /// How its body is delimited.
    pub body: Body,
    /// The backend connection may serve another request afterwards (as far as the head says).
    pub reusable: bool,
}

/// A response head, parsed and edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A final response.
    Final(FinalHead),
    /// An interim (1xx) response of this many bytes; what goes to the client is in `out`.
    Interim(usize),
    /// A valid `101` to a WebSocket upgrade of this many bytes; the client's head is in `out`.
    Switched(usize),
}

/// Parses the response head at the start of `buf` and writes it, edited for the client, to
/// `out`. `Ok(None)`: the head is not complete yet. `Err`: not a usable response.
pub fn edit_head(
    buf: &[u8],
    exchange: &For<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<Head>, BadResponse> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BadResponse("malformed response head")),
    };
    let status = response.code.ok_or(BadResponse("no status"))?;
    let pairs = response.headers.iter().map(|f| (f.name, f.value));
    let framing = framing::response(
        status,
        response.version == Some(1),
        exchange.head_request,
        pairs.clone(),
    )?;
    let mut nominated = Nominated::new();
    for field in response.headers.iter() {
        if is(field.name, "connection") {
            policy::nominated(field.value, &mut nominated);
        }
    }
    if status == 101 {
        // Only a WebSocket upgrade may be switched, and only with the right accept value.
        let key = exchange
            .websocket_key
            .ok_or(BadResponse("101 to a request that asked for no upgrade"))?;
        let accept = response
            .headers
            .iter()
            .find(|f| is(f.name, "sec-websocket-accept"))
            .map(|f| f.value);
        if !crate::websocket::valid_switch(Some(key), accept) {
            return Err(BadResponse("101 without the right Sec-WebSocket-Accept"));
        }
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
        copy_field_lines(&buf[..len], response.headers, out, |f| {
            policy::keeps_response_field(f.name, &nominated)
        });
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
        policy::push_field(out, b"X-Request-Id", exchange.request_id);
        out.extend_from_slice(b"\r\n");
        return Ok(Some(Head::Switched(len)));
    }
    if status < 200 {
        // RFC 9110 15.2: never to an HTTP/1.0 client.
        if exchange.http11_client {
            write_status_line(out, status, response.reason);
            copy_field_lines(&buf[..len], response.headers, out, |f| {
                policy::keeps_response_field(f.name, &nominated)
            });
            out.extend_from_slice(b"\r\n");
        }
        return Ok(Some(Head::Interim(len)));
    }
    if framing.body == Body::Chunked && !exchange.http11_client {
        return Err(BadResponse(
            "asked in HTTP/1.0, answered with a coding HTTP/1.0 does not have",
        ));
    }
    write_status_line(out, status, response.reason);
    copy_field_lines(&buf[..len], response.headers, out, |f| {
        policy::keeps_response_field(f.name, &nominated)
    });
    policy::push_field(out, b"X-Request-Id", exchange.request_id);
    if exchange.close || framing.body == Body::UntilClose || !exchange.http11_client {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Head::Final(FinalHead {
        len,
        status,
        body: framing.body,
        reusable: framing.reusable,
    })))
}

fn write_status_line(out: &mut Vec<u8>, status: u16, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(http11_client: bool, websocket_key: Option<&'static [u8]>) -> For<'static> {
        For {
            head_request: false,
            close: false,
            http11_client,
            request_id: b"rid",
            websocket_key,
        }
    }

    fn head(raw: &str, ex: &For<'_>) -> (Result<Option<Head>, BadResponse>, String) {
        let mut out = Vec::new();
        let head = edit_head(raw.as_bytes(), ex, &mut out);
        (head, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_heads_are_edited_for_the_client() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
                   X-Request-Id: theirs\r\nContent-Length: 2\r\n\r\nok";
        let (parsed, out) = head(raw, &exchange(true, None));
        let Ok(Some(Head::Final(h))) = parsed else {
            panic!("a final head")
        };
        assert_eq!((h.status, h.body, h.reusable), (200, Body::Length(2), true));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: rid\r\n\r\n"
        );
    }

    #[test]
    fn broken_and_unasked_for_responses_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(head(raw, &exchange(true, None)).0.is_err(), "{raw}");
        }
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(
            head(chunked, &exchange(false, None)).0.is_err(),
            "chunked to HTTP/1.0"
        );
    }

    #[test]
    fn a_101_must_complete_the_websocket_handshake() {
        let key: &'static [u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
        let good =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let (parsed, out) = head(good, &exchange(true, Some(key)));
        assert!(matches!(parsed, Ok(Some(Head::Switched(_)))));
        assert!(
            out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        let wrong = good.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "d3Jvbmc=");
        assert!(head(&wrong, &exchange(true, Some(key))).0.is_err());
    }

    #[test]
    fn interim_responses_reach_http_1_1_clients_only() {
        let raw = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        let (parsed, out) = head(raw, &exchange(true, None));
        assert!(matches!(parsed, Ok(Some(Head::Interim(_)))));
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
        let (_, out) = head(raw, &exchange(false, None));
        assert_eq!(out, "");
    }
}
