//! [`Key`]: a sticky key, kept inline when it is short, so routing a request allocates nothing
//! for it.

use std::fmt;
use std::ops::Deref;

use arrayvec::ArrayString;

/// Keys up to this many bytes (UUIDs, numeric and slug ids) are stored inline. Longer ones, up
/// to `MAX_KEY_LEN`, go to the heap. Small enough that a `Decision` stays cheap to move.
const INLINE: usize = 56;

/// A sticky key; derefs to `str`.
#[derive(Clone)]
pub struct Key(Repr);

#[derive(Clone)]
enum Repr {
    Inline(ArrayString<INLINE>),
    Heap(Box<str>),
}

impl Key {
    /// The key `text`.
    pub fn new(text: &str) -> Key {
        match ArrayString::from(text) {
            Ok(inline) => Key(Repr::Inline(inline)),
            Err(_) => Key(Repr::Heap(text.into())),
        }
    }
}

impl Deref for Key {
    type Target = str;

    fn deref(&self) -> &str {
        match &self.0 {
            Repr::Inline(text) => text,
            Repr::Heap(text) => text,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_keys_read_back_the_same() {
        for len in [1, INLINE - 1, INLINE, INLINE + 1, 256] {
            let text = "k".repeat(len);
            let key = Key::new(&text);
            assert_eq!(&*key, text);
            assert_eq!(key, Key::new(&text));
            assert_eq!(key.to_string(), text);
            assert_eq!(matches!(key.0, Repr::Inline(_)), len <= INLINE, "{len}");
        }
    }

    #[test]
    fn a_key_stays_small() {
        assert!(std::mem::size_of::<Option<Key>>() <= 64);
    }
}
