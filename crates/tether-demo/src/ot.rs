//! Operational transformation of plain-text edits, the scheme of ot.js.
//!
//! An operation walks the whole document once: *retain* n characters, *insert* a string,
//! *delete* n characters. Lengths count Unicode scalar values (`char`s), as the browser client
//! counts code points. [`TextOperation::transform`] takes two operations made on the same text and
//! returns versions of each that apply after the other, such that both orders give the same text
//! (`apply(apply(s, a), b') == apply(apply(s, b), a')`). When both insert at one position, the
//! first argument's text comes first; the server always passes the incoming operation first and
//! the browser its own pending one, so every copy agrees.
//!
//! On the wire an operation is a JSON array as in ot.js: a positive number retains, a negative
//! number deletes, a string inserts: `[3, "abc", -2, 5]`.

use serde_json::Value;

/// One step of a [`TextOperation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    /// Keep this many characters.
    Retain(usize),
    /// Insert this (non-empty) text.
    Insert(String),
    /// Remove this many characters.
    Delete(usize),
}

/// An edit of a whole text, in canonical form (no empty or mergeable neighbours, an insert
/// always before an adjacent delete), so equal edits compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextOperation {
    ops: Vec<Component>,
    base_len: usize,
    target_len: usize,
}

/// Why an operation cannot be read, applied or transformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtError {
    /// The operation was made for a text of another length.
    #[error("the operation expects a text of {expected} characters, not {actual}")]
    LengthMismatch {
        /// What the operation spans.
        expected: usize,
        /// What it was given.
        actual: usize,
    },
    /// The JSON is not an operation.
    #[error("malformed operation: {0}")]
    Malformed(&'static str),
}

impl TextOperation {
    /// The empty operation on the empty text.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends "keep `n` characters".
    pub fn retain(&mut self, n: usize) -> &mut Self {
        if n == 0 {
            return self;
        }
        self.base_len += n;
        self.target_len += n;
        if let Some(Component::Retain(last)) = self.ops.last_mut() {
            *last += n;
        } else {
            self.ops.push(Component::Retain(n));
        }
        self
    }

    /// Appends "insert `text`".
    pub fn insert(&mut self, text: &str) -> &mut Self {
        if text.is_empty() {
            return self;
        }
        self.target_len += text.chars().count();
        let len = self.ops.len();
        match self.ops.as_mut_slice() {
            [.., Component::Insert(last)] => last.push_str(text),
            // Canonical order: an insert goes before the delete it touches.
            [.., Component::Insert(before), Component::Delete(_)] => before.push_str(text),
            [.., Component::Delete(_)] => self.ops.insert(len - 1, Component::Insert(text.into())),
            _ => self.ops.push(Component::Insert(text.into())),
        }
        self
    }

    /// Appends "delete `n` characters".
    pub fn delete(&mut self, n: usize) -> &mut Self {
        if n == 0 {
            return self;
        }
        self.base_len += n;
        if let Some(Component::Delete(last)) = self.ops.last_mut() {
            *last += n;
        } else {
            self.ops.push(Component::Delete(n));
        }
        self
    }

    /// Length of the text it applies to, in characters.
    pub fn base_len(&self) -> usize {
        self.base_len
    }

    /// Length of the text it produces, in characters.
    pub fn target_len(&self) -> usize {
        self.target_len
    }

    /// Its steps.
    pub fn components(&self) -> &[Component] {
        &self.ops
    }

    /// True if applying it changes nothing.
    pub fn is_noop(&self) -> bool {
        self.ops.iter().all(|c| matches!(c, Component::Retain(_)))
    }

    /// Applies it to `text`.
    pub fn apply(&self, text: &str) -> Result<String, OtError> {
        let actual = text.chars().count();
        if actual != self.base_len {
            return Err(OtError::LengthMismatch {
                expected: self.base_len,
                actual,
            });
        }
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        for op in &self.ops {
            match op {
                Component::Retain(n) => out.extend(chars.by_ref().take(*n)),
                Component::Insert(s) => out.push_str(s),
                Component::Delete(n) => {
                    chars.by_ref().take(*n).for_each(drop);
                }
            }
        }
        Ok(out)
    }

    /// Given `a` and `b` made on the same text, returns `(a', b')` with
    /// `b.then(a') == a.then(b')`. At one position, `a`'s insert comes first.
    pub fn transform(a: &Self, b: &Self) -> Result<(Self, Self), OtError> {
        if a.base_len != b.base_len {
            return Err(OtError::LengthMismatch {
                expected: a.base_len,
                actual: b.base_len,
            });
        }
        let (mut a_prime, mut b_prime) = (Self::new(), Self::new());
        let (mut ia, mut ib) = (a.ops.iter().cloned(), b.ops.iter().cloned());
        let (mut op_a, mut op_b) = (ia.next(), ib.next());
        loop {
            match (op_a.take(), op_b.take()) {
                (None, None) => break,
                (Some(Component::Insert(s)), rest) => {
                    b_prime.retain(s.chars().count());
                    a_prime.insert(&s);
                    op_a = ia.next();
                    op_b = rest;
                }
                (rest, Some(Component::Insert(s))) => {
                    a_prime.retain(s.chars().count());
                    b_prime.insert(&s);
                    op_a = rest;
                    op_b = ib.next();
                }
                // Equal base lengths make one side run out only when both do.
                (None, Some(_)) | (Some(_), None) => return Err(OtError::Malformed("length")),
                (Some(x), Some(y)) => {
                    let (nx, ny) = (span(&x), span(&y));
                    let n = nx.min(ny);
                    match (&x, &y) {
                        (Component::Retain(_), Component::Retain(_)) => {
                            a_prime.retain(n);
                            b_prime.retain(n);
                        }
                        (Component::Delete(_), Component::Retain(_)) => {
                            a_prime.delete(n);
                        }
                        (Component::Retain(_), Component::Delete(_)) => {
                            b_prime.delete(n);
                        }
                        // Both removed the same characters: nothing left to do on either side.
                        _ => {}
                    }
                    op_a = rest_of(x, n).or_else(|| ia.next());
                    op_b = rest_of(y, n).or_else(|| ib.next());
                }
            }
        }
        Ok((a_prime, b_prime))
    }

    /// Reads the wire form `[3, "abc", -2, 5]`.
    pub fn from_json(value: &Value) -> Result<Self, OtError> {
        let items = value.as_array().ok_or(OtError::Malformed("not an array"))?;
        let mut op = Self::new();
        for item in items {
            match item {
                Value::String(s) if !s.is_empty() => {
                    op.insert(s);
                }
                Value::Number(n) => match n.as_i64() {
                    Some(k) if k > 0 => {
                        op.retain(usize::try_from(k).map_err(|_| OtError::Malformed("size"))?);
                    }
                    Some(k) if k < 0 => {
                        let k = usize::try_from(k.unsigned_abs())
                            .map_err(|_| OtError::Malformed("size"))?;
                        op.delete(k);
                    }
                    _ => return Err(OtError::Malformed("zero or fractional count")),
                },
                _ => return Err(OtError::Malformed("not a number or a non-empty string")),
            }
        }
        Ok(op)
    }

    /// The wire form.
    pub fn to_json(&self) -> Value {
        let items = self.ops.iter().map(|op| match op {
            Component::Retain(n) => Value::from(*n),
            Component::Insert(s) => Value::from(s.as_str()),
            Component::Delete(n) => Value::from(-i64::try_from(*n).unwrap_or(i64::MAX)),
        });
        Value::Array(items.collect())
    }
}

/// How many base characters a retain or delete covers.
fn span(op: &Component) -> usize {
    match op {
        Component::Retain(n) | Component::Delete(n) => *n,
        Component::Insert(_) => 0,
    }
}

/// What is left of a retain or delete after `n` characters, if anything.
fn rest_of(op: Component, n: usize) -> Option<Component> {
    match op {
        Component::Retain(m) if m > n => Some(Component::Retain(m - n)),
        Component::Delete(m) if m > n => Some(Component::Delete(m - n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(wire: Value) -> TextOperation {
        TextOperation::from_json(&wire).expect("valid op")
    }

    /// Applies `a` then `b'`, and `b` then `a'`; both must give the same text, which is returned.
    fn converge(text: &str, a: &TextOperation, b: &TextOperation) -> String {
        let (a2, b2) = TextOperation::transform(a, b).expect("transform");
        let ab = b2.apply(&a.apply(text).expect("a")).expect("b'");
        let ba = a2.apply(&b.apply(text).expect("b")).expect("a'");
        assert_eq!(ab, ba, "diverged for {a:?} / {b:?}");
        ab
    }

    #[test]
    fn concurrent_inserts_at_one_position_keep_both_texts_first_argument_first() {
        let a = op(json!([5, " brave", 6]));
        let b = op(json!([5, " new", 6]));
        assert_eq!(converge("hello world", &a, &b), "hello brave new world");
        assert_eq!(converge("hello world", &b, &a), "hello new brave world");
    }

    #[test]
    fn an_insert_inside_a_concurrently_deleted_range_survives() {
        let insert = op(json!([3, "XY", 8]));
        let delete = op(json!([1, -6, 4]));
        assert_eq!(converge("abcdefghijk", &insert, &delete), "aXYhijk");
        assert_eq!(converge("abcdefghijk", &delete, &insert), "aXYhijk");
    }

    #[test]
    fn overlapping_deletes_remove_each_character_once() {
        let a = op(json!([1, -4, 3]));
        let b = op(json!([3, -4, 1]));
        assert_eq!(converge("abcdefgh", &a, &b), "ah");
    }

    #[test]
    fn multi_byte_characters_count_as_one() {
        let a = op(json!([1, "é", 2]));
        assert_eq!(a.apply("🙂ab").expect("apply"), "🙂éab");
        assert_eq!(
            a.apply("abcd"),
            Err(OtError::LengthMismatch {
                expected: 3,
                actual: 4
            })
        );
    }

    #[test]
    fn wire_form_round_trips_in_canonical_order() {
        let mut built = TextOperation::new();
        built.retain(2).delete(1).insert("x").retain(1).retain(2);
        assert_eq!(built.to_json(), json!([2, "x", -1, 3]));
        assert_eq!(op(built.to_json()), built);
        assert_eq!((built.base_len(), built.target_len()), (6, 6));
    }

    #[test]
    fn malformed_wire_forms_are_refused() {
        for bad in [
            json!({"a": 1}),
            json!([0]),
            json!([1.5]),
            json!([""]),
            json!([null]),
        ] {
            assert!(TextOperation::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn transforming_operations_on_different_lengths_fails() {
        assert!(TextOperation::transform(&op(json!([3])), &op(json!([4]))).is_err());
    }
}
