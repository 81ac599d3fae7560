//! Path normalisation: the one path every route and path key is matched against.
//!
//! Routes match the *normalised* path, never the raw one, so an encoded or dotted spelling cannot
//! reach a route (or escape a prefix) that the plain spelling would not. The rules, in order:
//!
//! 1. An empty path is `/`. Any other path must start with `/` (else [`Reject::BadPath`]).
//! 2. Every `%` must start a valid escape `%XY` (two hex digits), else `BadPath`. Escapes of
//!    unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3) are decoded, since that never
//!    changes a URI's meaning (`/%64ocs` is `/docs`, `%2e` is `.`); every other escape is kept with
//!    upper-case hex digits (`%2f` becomes `%2F`).
//! 3. The path is split on literal `/` only. Empty segments are dropped, so `//` merges into `/`.
//! 4. Dot segments, plain or encoded (`.`, `%2e`, `..`, `.%2E`, `%2e%2e`, ...), are resolved as in
//!    RFC 3986 §5.2.4: `.` is removed, `..` removes the previous segment; a `..` above the root is
//!    `BadPath`.
//! 5. An encoded slash `%2F` is *not* a separator: `a%2Fb` stays one segment. But a segment that
//!    would contain a dot segment once a backend decodes `%2F`, `%5C` or `\` as a separator
//!    (`..%2F..%2Fadmin`) is `BadPath`: it could escape the matched prefix behind the proxy's back.
//! 6. The result starts with `/`. A trailing slash is preserved, and a path ending in a dot
//!    segment ends with `/` (`/a/b/..` is `/a/`).
//!
//! ```
//! use tether_routing::normalize::normalize_path;
//! assert_eq!(normalize_path("/docs//a/./b/../c/").unwrap(), "/docs/a/c/");
//! assert_eq!(normalize_path("/docs/%2e%2E/admin").unwrap(), "/admin");
//! assert_eq!(normalize_path("/docs/a%2fb").unwrap(), "/docs/a%2Fb");
//! assert!(normalize_path("/docs/../../etc").is_err());
//! ```

use std::borrow::Cow;

use crate::percent::{escape_at, is_unreserved};
use crate::Reject;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Normalises a raw request path (no query) by the rules in the [module docs](self).
pub fn normalize_path(raw: &str) -> Result<String, Reject> {
    normalize_path_cow(raw).map(Cow::into_owned)
}

/// [`normalize_path`] without a copy when `raw` is already normal, as nearly every real
/// request path is: then it is returned borrowed.
pub fn normalize_path_cow(raw: &str) -> Result<Cow<'_, str>, Reject> {
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    normalize_owned(raw).map(Cow::Owned)
}

/// True if the rules leave `raw` unchanged: it starts with `/` and has no `%` or `\\` (rules 2
/// and 5), no empty segment but a trailing one (rule 3) and no dot segment (rule 4).
///
/// This runs on every request. Paths are short, so one branch-free pass over byte pairs (which
/// the compiler vectorises) beats `memchr`-based searching; only a path with a `/.` pair gets
/// the closer look for dot segments.
fn is_normal(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let mut bad = false;
    let mut slash_dot = false;
    for (&prev, &b) in bytes.iter().zip(&bytes[1..]) {
        bad |= (b == b'%') | (b == b'\\') | ((prev == b'/') & (b == b'/'));
        slash_dot |= (prev == b'/') & (b == b'.');
    }
    if bad {
        return false;
    }
    if !slash_dot {
        return true;
    }
    // No empty segment is left but a trailing one; the last may be empty but not a dot segment.
    let mut segments = bytes[1..].split(|&b| b == b'/');
    !matches!(segments.next_back(), Some(b"." | b".."))
        && segments.all(|segment| !matches!(segment, b"." | b".."))
}

fn normalize_owned(raw: &str) -> Result<String, Reject> {
    if raw.is_empty() {
        return Ok("/".to_owned());
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(Reject::BadPath("path does not start with '/'"));
    };
    let mut out = String::with_capacity(raw.len() + 1);
    // Whether the output must end with '/': the last raw segment was empty or a dot segment.
    let mut trailing_slash = false;
    for segment in rest.split('/') {
        if segment.is_empty() {
            trailing_slash = true;
            continue;
        }
        let start = out.len();
        out.push('/');
        push_segment(segment, &mut out)?;
        match &out[start + 1..] {
            "." => {
                out.truncate(start);
                trailing_slash = true;
            }
            ".." => {
                out.truncate(start);
                let Some(parent) = out.rfind('/') else {
                    return Err(Reject::BadPath("'..' above the root"));
                };
                out.truncate(parent);
                trailing_slash = true;
            }
            normalized => {
                if hides_dot_segment(normalized) {
                    return Err(Reject::BadPath("dot segment behind an encoded slash"));
                }
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Appends `segment` with unreserved escapes decoded and the rest upper-cased (rule 2).
fn push_segment(segment: &str, out: &mut String) -> Result<(), Reject> {
    let bytes = segment.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + offset;
        out.push_str(&segment[copied..at]);
        let Some(byte) = escape_at(bytes, at) else {
            return Err(Reject::BadPath("invalid percent-encoding"));
        };
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        i = at + 3;
        copied = i;
    }
    out.push_str(&segment[copied..]);
    Ok(())
}

/// True if a piece of `segment` between encoded slashes or backslashes is `.` or `..` (rule 5).
fn hides_dot_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let mut piece_start = 0;
    let mut i = 0;
    while i <= bytes.len() {
        let separator_len = match &bytes[i..] {
            [] => 0,
            [b'\\', ..] => 1,
            [b'%', b'2', b'F', ..] | [b'%', b'5', b'C', ..] => 3,
            _ => {
                i += 1;
                continue;
            }
        };
        if matches!(&bytes[piece_start..i], b"." | b"..") {
            return true;
        }
        if separator_len == 0 {
            return false;
        }
        i += separator_len;
        piece_start = i;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        normalize_path(raw).unwrap_or_else(|e| panic!("{raw} rejected: {e}"))
    }

    #[test]
    fn empty_path_and_root_are_root() {
        assert_eq!(ok(""), "/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("//"), "/");
    }

    #[test]
    fn double_slashes_merge() {
        assert_eq!(ok("//docs///a//b"), "/docs/a/b");
    }

    #[test]
    fn single_dot_segments_are_removed() {
        assert_eq!(ok("/./docs/./a/."), "/docs/a/");
    }

    #[test]
    fn double_dot_removes_the_previous_segment() {
        assert_eq!(ok("/docs/a/../b"), "/docs/b");
        assert_eq!(ok("/docs/a/b/../.."), "/docs/");
        assert_eq!(ok("/docs/.."), "/");
    }

    #[test]
    fn double_dot_above_the_root_is_a_bad_path() {
        assert!(matches!(normalize_path("/.."), Err(Reject::BadPath(_))));
        assert!(matches!(
            normalize_path("/docs/../../x"),
            Err(Reject::BadPath(_))
        ));
        assert!(matches!(
            normalize_path("/%2e%2e/x"),
            Err(Reject::BadPath(_))
        ));
    }

    #[test]
    fn trailing_slash_is_preserved() {
        assert_eq!(ok("/docs/"), "/docs/");
        assert_eq!(ok("/docs"), "/docs");
    }

    #[test]
    fn encoded_dot_segments_resolve_like_plain_ones() {
        for dots in ["%2e%2e", "%2E%2E", ".%2e", "%2e.", ".%2E", "%2E."] {
            assert_eq!(ok(&format!("/docs/{dots}/admin")), "/admin", "{dots}");
        }
        for dot in ["%2e", "%2E"] {
            assert_eq!(ok(&format!("/docs/{dot}/a")), "/docs/a", "{dot}");
        }
    }

    #[test]
    fn encoded_slash_stays_inside_its_segment() {
        assert_eq!(ok("/docs/a%2Fb/c"), "/docs/a%2Fb/c");
        assert_eq!(ok("/docs/a%2fb"), "/docs/a%2Fb");
        // `..` after an encoded-slash segment removes the whole segment.
        assert_eq!(ok("/docs/a%2Fb/../c"), "/docs/c");
    }

    #[test]
    fn dot_segment_behind_an_encoded_slash_is_a_bad_path() {
        for raw in [
            "/docs/..%2F..%2Fadmin",
            "/docs/a%2f..",
            "/docs/.%2Fx",
            "/docs/..%5Cx",
            "/docs/..\\x",
        ] {
            assert!(
                matches!(normalize_path(raw), Err(Reject::BadPath(_))),
                "{raw}"
            );
        }
        // Dots that are not whole pieces are ordinary characters.
        assert_eq!(ok("/docs/a..%2Fb"), "/docs/a..%2Fb");
        assert_eq!(ok("/docs/...%2Fb"), "/docs/...%2Fb");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_upper_cased() {
        assert_eq!(ok("/%64ocs/%7Euser"), "/docs/~user");
        assert_eq!(ok("/a%20b/%3f"), "/a%20b/%3F");
    }

    #[test]
    fn invalid_percent_encoding_is_a_bad_path() {
        for raw in ["/100%", "/a%2", "/a%zz"] {
            assert!(
                matches!(normalize_path(raw), Err(Reject::BadPath(_))),
                "{raw}"
            );
        }
    }

    #[test]
    fn relative_paths_are_bad_paths() {
        assert!(matches!(normalize_path("docs/a"), Err(Reject::BadPath(_))));
        assert!(matches!(normalize_path("*"), Err(Reject::BadPath(_))));
    }

    #[test]
    fn the_borrowed_fast_path_agrees_with_the_full_rules() {
        for raw in [
            "",
            "/",
            "//",
            "/a",
            "/a/",
            "/a//",
            "/a/b/c",
            "/a/./b",
            "/a/../b",
            "/.",
            "/..",
            "/a/.",
            "/a/..",
            "/.a/..b/a.",
            "/a%20b",
            "/a\\b",
            "/docs/café",
            "a/b",
            "/a/b/",
            "/a//b",
        ] {
            let fast = normalize_path_cow(raw);
            assert_eq!(
                fast.as_ref().map(|c| c.as_ref()),
                normalize_owned(raw).as_deref(),
                "{raw}"
            );
            if let Ok(Cow::Borrowed(b)) = fast {
                assert_eq!(b, raw, "borrowed only when unchanged");
            }
        }
        assert!(matches!(
            normalize_path_cow("/docs/42/ws"),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn non_ascii_segments_pass_through() {
        assert_eq!(ok("/docs/café/./x"), "/docs/café/x");
    }
}
