//! The sticky key chain: sources are tried in order and the first one present wins.
//!
//! - **header**: the value of the header, if it is non-empty UTF-8. The header repeated with
//!   different values is a bad key (which one would the application read?).
//! - **cookie**: every `Cookie` header is parsed as `name=value; name=value`. Names and values
//!   are trimmed, a double-quoted value is unquoted, and the value is otherwise opaque (not
//!   percent-decoded). The cookie repeated with different values is a bad key.
//! - **query**: the raw query `a=1&b=2` is split on `&`; the first parameter with exactly the
//!   name wins and its value is decoded as a form value (`%XX` escapes, `+` is a space, as browsers'
//!   `URLSearchParams` encode it).
//! - **path**: a pattern such as `/docs/{key}` is matched segment by segment against the
//!   *normalised* path: literal segments must be equal, `{key}` captures one non-empty segment
//!   (percent-decoded, so `/docs/a%20b` and header `a b` are the same key), and extra trailing
//!   segments are allowed (`/docs/42/ws` yields `42`).
//!
//! An empty value counts as missing, and the chain moves on to the next source. A present value
//! that is not UTF-8, badly percent-encoded, longer than [`MAX_KEY_LEN`] bytes or holding control
//! characters is a bad key: the request is refused (400) rather than routed somewhere arbitrary.

use std::borrow::Cow;

use http::header::COOKIE;
use http::HeaderName;
use tether_config::{KeySource, OnMissing, Sticky};

use crate::percent;
use crate::{Key, KeySourceKind, RequestView, MAX_KEY_LEN};

/// A key source that is present in the request.
enum Found<'a> {
    /// Usable as a key.
    Key(Cow<'a, str>),
    /// Present but unusable.
    Bad,
}

/// Judges a present value: empty is absent; too long or with control characters is bad.
fn judge(value: Cow<'_, str>) -> Option<Found<'_>> {
    if value.is_empty() {
        None
    } else if is_usable_key(&value) {
        Some(Found::Key(value))
    } else {
        Some(Found::Bad)
    }
}

/// Whether `text` can be a sticky key: 1 to [`MAX_KEY_LEN`] bytes without control
/// characters (what a request's key source must hold, and what a pin may name).
pub fn is_usable_key(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_KEY_LEN && !has_control(text)
}

/// True if printable ASCII, the common case, checked a byte at a time.
fn is_printable_ascii(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| (0x20..0x7f).contains(&b))
}

/// `char::is_control` over `text`, without decoding characters when it is printable ASCII.
fn has_control(text: &str) -> bool {
    !is_printable_ascii(text.as_bytes()) && text.chars().any(char::is_control)
}

/// A present source holding a bad key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadKey;

/// A route's sticky policy, prepared once.
#[derive(Debug)]
pub(crate) struct StickyPolicy {
    keys: Vec<Source>,
    pub(crate) on_missing: OnMissing,
}

#[derive(Debug)]
enum Source {
    /// `None` for an invalid header name: never present.
    Header(Option<HeaderName>),
    Cookie(String),
    Query(String),
    Path(String),
}

impl StickyPolicy {
    pub(crate) fn new(sticky: &Sticky) -> StickyPolicy {
        let keys = sticky
            .keys
            .iter()
            .map(|source| match source {
                KeySource::Header(name) => {
                    Source::Header(HeaderName::from_bytes(name.as_bytes()).ok())
                }
                KeySource::Cookie(name) => Source::Cookie(name.clone()),
                KeySource::Query(name) => Source::Query(name.clone()),
                KeySource::Path(pattern) => Source::Path(pattern.clone()),
            })
            .collect();
        StickyPolicy {
            keys,
            on_missing: sticky.on_missing,
        }
    }

    /// The first key present in `req` and where it came from; `Ok(None)` when no source is
    /// present, `Err(BadKey)` when the first present one is unusable.
    pub(crate) fn extract(
        &self,
        req: &RequestView<'_>,
        normalized_path: &str,
    ) -> Result<Option<(Key, KeySourceKind)>, BadKey> {
        for source in &self.keys {
            let (found, kind) = match source {
                Source::Header(name) => match name {
                    Some(name) => (header(req, name), KeySourceKind::Header),
                    None => continue,
                },
                Source::Cookie(name) => (cookie(req, name), KeySourceKind::Cookie),
                Source::Query(name) => match req.query {
                    Some(q) => (query(q, name), KeySourceKind::Query),
                    None => continue,
                },
                Source::Path(pattern) => (path(pattern, normalized_path), KeySourceKind::Path),
            };
            match found {
                None => continue,
                Some(Found::Bad) => return Err(BadKey),
                Some(Found::Key(key)) => return Ok(Some((Key::new(&key), kind))),
            }
        }
        Ok(None)
    }
}

fn header<'a>(req: &RequestView<'a>, name: &HeaderName) -> Option<Found<'a>> {
    let mut values = req.headers.values(name);
    let value = values.next()?;
    if values.any(|other| other != value) {
        return Some(Found::Bad);
    }
    // The common case, branch-free over the bytes: visible ASCII, space and tab (what
    // `HeaderValue::to_str` accepts), where tab is the only possible control character.
    let (mut other, mut tab) = (false, false);
    for &b in value {
        other |= !(b' '..=b'~').contains(&b) && b != b'\t';
        tab |= b == b'\t';
    }
    let Ok(text) = std::str::from_utf8(value) else {
        return Some(Found::Bad);
    };
    if !other {
        return if text.is_empty() {
            None
        } else if text.len() > MAX_KEY_LEN || tab {
            Some(Found::Bad)
        } else {
            Some(Found::Key(Cow::Borrowed(text)))
        };
    }
    judge(Cow::Borrowed(text))
}

fn cookie<'a>(req: &RequestView<'a>, name: &str) -> Option<Found<'a>> {
    let mut values = req
        .headers
        .values(&COOKIE)
        .filter_map(|header| std::str::from_utf8(header).ok())
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, value)| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
        });
    let value = values.next()?;
    if values.any(|other| other != value) {
        return Some(Found::Bad);
    }
    judge(Cow::Borrowed(value))
}

/// Percent-decodes a present raw value; oversized input is judged before any allocation.
fn decoded(raw: &str, plus_is_space: bool) -> Option<Found<'static>> {
    if raw.is_empty() {
        return None;
    }
    if raw.len() > 3 * MAX_KEY_LEN {
        return Some(Found::Bad);
    }
    match percent::decode(raw, plus_is_space) {
        Some(text) => judge(Cow::Owned(text)),
        None => Some(Found::Bad),
    }
}

fn query(query: &str, name: &str) -> Option<Found<'static>> {
    let raw = query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)?;
    decoded(raw, true)
}

fn path(pattern: &str, normalized_path: &str) -> Option<Found<'static>> {
    let mut segments = normalized_path.split('/').filter(|s| !s.is_empty());
    let mut captured = None;
    for expected in pattern.split('/').filter(|s| !s.is_empty()) {
        let segment = segments.next()?;
        if expected == "{key}" {
            captured = Some(segment);
        } else if expected != segment {
            return None;
        }
    }
    decoded(captured?, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn request<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: None,
            path: "/",
            query,
            headers: headers.into(),
            client_ip: None,
        }
    }

    fn policy(keys: Vec<KeySource>) -> StickyPolicy {
        StickyPolicy::new(&Sticky {
            keys,
            on_missing: OnMissing::Reject,
        })
    }

    fn chain() -> StickyPolicy {
        policy(vec![
            KeySource::Header("x-doc-id".into()),
            KeySource::Cookie("doc_id".into()),
            KeySource::Query("doc".into()),
            KeySource::Path("/docs/{key}".into()),
        ])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn key(kind: KeySourceKind, key: &str) -> Result<Option<(Key, KeySourceKind)>, BadKey> {
        Ok(Some((Key::new(key), kind)))
    }

    #[test]
    fn header_key_is_its_value() {
        let h = headers(&[("x-doc-id", "doc-1"), ("x-other", "doc-2")]);
        assert_eq!(
            chain().extract(&request(&h, None), "/"),
            key(KeySourceKind::Header, "doc-1")
        );
    }

    #[test]
    fn empty_header_falls_through_to_the_next_source() {
        let h = headers(&[("x-doc-id", ""), ("cookie", "doc_id=c1")]);
        assert_eq!(
            chain().extract(&request(&h, None), "/"),
            key(KeySourceKind::Cookie, "c1")
        );
    }

    #[test]
    fn cookie_key_is_found_in_any_cookie_header() {
        let h = headers(&[
            ("cookie", "a=1; b=2"),
            ("cookie", "theme=dark;  doc_id = \"d-7\" ; doc_id=d-7"),
        ]);
        assert_eq!(
            chain().extract(&request(&h, None), "/"),
            key(KeySourceKind::Cookie, "d-7")
        );
    }

    #[test]
    fn a_key_repeated_with_different_values_is_bad() {
        let cookies = headers(&[("cookie", "doc_id=a"), ("cookie", "doc_id=b")]);
        assert_eq!(chain().extract(&request(&cookies, None), "/"), Err(BadKey));
        let twice = headers(&[("x-doc-id", "a"), ("x-doc-id", "b")]);
        assert_eq!(chain().extract(&request(&twice, None), "/"), Err(BadKey));
        let same = headers(&[("x-doc-id", "a"), ("x-doc-id", "a")]);
        assert_eq!(
            chain().extract(&request(&same, None), "/"),
            key(KeySourceKind::Header, "a")
        );
    }

    #[test]
    fn cookie_name_must_match_exactly() {
        let h = headers(&[("cookie", "my_doc_id=x; doc_id_old=y")]);
        assert_eq!(chain().extract(&request(&h, None), "/"), Ok(None));
    }

    #[test]
    fn query_key_is_form_decoded() {
        let h = HeaderMap::new();
        let req = request(&h, Some("x=1&doc=a%2Fb+c&doc=second"));
        assert_eq!(
            chain().extract(&req, "/"),
            key(KeySourceKind::Query, "a/b c")
        );
    }

    #[test]
    fn query_key_that_is_empty_or_badly_encoded_is_missing() {
        let h = HeaderMap::new();
        assert_eq!(chain().extract(&request(&h, Some("doc=")), "/"), Ok(None));
        assert_eq!(chain().extract(&request(&h, Some("doc")), "/"), Ok(None));
        assert_eq!(
            chain().extract(&request(&h, Some("doc=%zz")), "/"),
            Err(BadKey)
        );
        assert_eq!(chain().extract(&request(&h, Some("xdoc=1")), "/"), Ok(None));
    }

    #[test]
    fn path_key_is_the_captured_segment() {
        let h = HeaderMap::new();
        let req = request(&h, None);
        assert_eq!(
            chain().extract(&req, "/docs/42"),
            key(KeySourceKind::Path, "42")
        );
        assert_eq!(
            chain().extract(&req, "/docs/42/ws/extra"),
            key(KeySourceKind::Path, "42")
        );
        assert_eq!(
            chain().extract(&req, "/docs/a%2Fb%20c"),
            key(KeySourceKind::Path, "a/b c")
        );
    }

    #[test]
    fn path_key_needs_literal_segments_and_a_key_segment() {
        let h = HeaderMap::new();
        let req = request(&h, None);
        assert_eq!(chain().extract(&req, "/docs/"), Ok(None));
        assert_eq!(chain().extract(&req, "/docs"), Ok(None));
        assert_eq!(chain().extract(&req, "/doc/42"), Ok(None));
        assert_eq!(chain().extract(&req, "/v1/docs/42"), Ok(None));
        let nested = policy(vec![KeySource::Path("/api/{key}/live".into())]);
        assert_eq!(
            nested.extract(&req, "/api/7/live"),
            key(KeySourceKind::Path, "7")
        );
        assert_eq!(nested.extract(&req, "/api/7/dead"), Ok(None));
    }

    #[test]
    fn first_present_source_wins_in_chain_order() {
        let h = headers(&[
            ("cookie", "doc_id=from-cookie"),
            ("x-doc-id", "from-header"),
        ]);
        let req = request(&h, Some("doc=from-query"));
        assert_eq!(
            chain().extract(&req, "/docs/from-path"),
            key(KeySourceKind::Header, "from-header")
        );
        let reversed = policy(vec![
            KeySource::Path("/docs/{key}".into()),
            KeySource::Header("x-doc-id".into()),
        ]);
        assert_eq!(
            reversed.extract(&req, "/docs/from-path"),
            key(KeySourceKind::Path, "from-path")
        );
    }

    #[test]
    fn an_oversized_or_control_character_key_is_bad_not_missing() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        let h = headers(&[("x-doc-id", &long)]);
        let req = request(&h, Some("doc=q"));
        assert_eq!(chain().extract(&req, "/"), Err(BadKey));
        let exact = "k".repeat(MAX_KEY_LEN);
        let h = headers(&[("x-doc-id", &exact)]);
        assert_eq!(
            chain().extract(&request(&h, None), "/"),
            key(KeySourceKind::Header, &exact)
        );
        let h = HeaderMap::new();
        assert_eq!(
            chain().extract(&request(&h, Some("doc=a%0Ab")), "/"),
            Err(BadKey),
            "a decoded newline"
        );
        assert_eq!(
            chain().extract(&request(&h, Some("doc=%zz")), "/"),
            Err(BadKey),
            "bad percent-encoding"
        );
    }
}
