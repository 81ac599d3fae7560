//! Percent-encoding helpers shared by path normalisation and key extraction.

/// The value of one ASCII hex digit.
pub(crate) fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// The byte encoded by `%XY` at `bytes[at..at + 3]`, if that is a valid escape.
pub(crate) fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    match bytes.get(at..at + 3) {
        Some([b'%', hi, lo]) => Some(hex_value(*hi)? << 4 | hex_value(*lo)?),
        _ => None,
    }
}

/// Unreserved characters (RFC 3986 §2.3): decoding them never changes a URI's meaning.
pub(crate) fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Fully percent-decodes `raw` (and `+` as a space when `plus_is_space`) into UTF-8.
/// None for an invalid escape or a result that is not UTF-8.
pub(crate) fn decode(raw: &str, plus_is_space: bool) -> Option<String> {
    let bytes = raw.as_bytes();
    if !bytes
        .iter()
        .any(|&b| b == b'%' || (plus_is_space && b == b'+'))
    {
        return Some(raw.to_owned());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(escape_at(bytes, i)?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_turns_escapes_into_utf8() {
        assert_eq!(decode("a%20b%2Fc", false).as_deref(), Some("a b/c"));
        assert_eq!(decode("caf%C3%A9", false).as_deref(), Some("café"));
    }

    #[test]
    fn decode_maps_plus_to_space_only_for_forms() {
        assert_eq!(decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(decode("a%2Bb", true).as_deref(), Some("a+b"));
    }

    #[test]
    fn decode_refuses_broken_escapes_and_non_utf8() {
        assert_eq!(decode("100%", false), None);
        assert_eq!(decode("%zz", false), None);
        assert_eq!(decode("%FF", false), None);
    }
}
