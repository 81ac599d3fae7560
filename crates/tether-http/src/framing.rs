//! The one response-head validation: how a backend's response body is delimited, and whether
//! the response is usable at all. Both engines call it (through `response::edit_head`, on the
//! backend's raw fields), so a response one would pass the other does too.

use crate::policy::is;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

/// A response head's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// How the body is delimited.
    pub body: Body,
    /// The backend connection may serve another request afterwards (as far as the head says).
    pub reusable: bool,
}

/// A response no client should get (the engine answers 502 instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadResponse(pub &'static str);

/// Validates a response head and says how its body is delimited. `http11`: the backend spoke
/// HTTP/1.1; `head_request`: the request was HEAD. Refused: a `Content-Length` that is not
/// one plain decimal number (`+5`, `5, 5`), two different lengths, and a length together with
/// `Transfer-Encoding` (how responses get smuggled, RFC 9112 6.3).
pub fn response<'a>(
    status: u16,
    http11: bool,
    head_request: bool,
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<Framing, BadResponse> {
    if !(100..=599).contains(&status) {
        return Err(BadResponse("status out of range"));
    }
    let mut reusable = http11;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for (name, value) in fields {
        if is(name, "connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    reusable = true;
                }
            }
        } else if is(name, "content-length") {
            let n = content_length(value).ok_or(BadResponse("malformed Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(BadResponse("conflicting Content-Length"));
            }
            length = Some(n);
        } else if is(name, "transfer-encoding") {
            // The last coding decides; only `chunked` delimits the body.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .map(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    if chunked.is_some() && length.is_some() {
        return Err(BadResponse("Content-Length with Transfer-Encoding"));
    }
    let body = if status < 200 || status == 204 || status == 304 || head_request {
        Body::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Body::Chunked,
            (Some(false), _) => Body::UntilClose,
            (None, Some(n)) => Body::Length(n),
            (None, None) => Body::UntilClose,
        }
    };
    if body == Body::UntilClose {
        reusable = false;
    }
    Ok(Framing { body, reusable })
}

/// A `Content-Length` value: one plain decimal number of at most 19 digits (no overflow, and
/// no body is that long).
pub fn content_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(status: u16, fields: &[(&str, &str)]) -> Result<Framing, BadResponse> {
        response(
            status,
            true,
            false,
            fields.iter().map(|(n, v)| (*n, v.as_bytes())),
        )
    }

    #[test]
    fn bodies_are_delimited_as_rfc_9112_says() {
        assert_eq!(
            frame(200, &[("Content-Length", "5")]).unwrap().body,
            Body::Length(5)
        );
        assert_eq!(
            frame(200, &[("Transfer-Encoding", "gzip, chunked")])
                .unwrap()
                .body,
            Body::Chunked
        );
        assert_eq!(
            frame(200, &[]).unwrap(),
            Framing {
                body: Body::UntilClose,
                reusable: false
            }
        );
        assert_eq!(
            frame(204, &[("Content-Length", "5")]).unwrap().body,
            Body::None
        );
        assert_eq!(frame(304, &[]).unwrap().body, Body::None);
        assert!(
            !frame(200, &[("Connection", "close"), ("Content-Length", "0")])
                .unwrap()
                .reusable
        );
        assert_eq!(
            response(200, true, true, [("Content-Length", &b"9"[..])].into_iter())
                .unwrap()
                .body,
            Body::None
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for fields in [
            &[("Content-Length", "5, 5")][..],
            &[("Content-Length", "+5")],
            &[("Content-Length", "5"), ("Content-Length", "6")],
            &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            &[("Content-Length", "99999999999999999999")],
        ] {
            assert!(frame(200, fields).is_err(), "{fields:?}");
        }
        assert!(frame(200, &[("Content-Length", "5"), ("content-length", "5")]).is_ok());
        assert!(frame(99, &[]).is_err());
    }
}
