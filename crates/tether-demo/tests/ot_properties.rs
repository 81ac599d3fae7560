//! Property: any two concurrent edits of any text converge, whichever order they are applied in,
//! and no inserted text is lost.

use proptest::prelude::*;
use tether_demo::ot::TextOperation;

/// One step of a random edit: 0 = retain, 1 = delete, 2 = insert.
type Step = (u8, usize, String);

fn text() -> impl Strategy<Value = String> {
    "[ab🙂é ]{0,20}"
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0u8..3, 1usize..6, "[xyz🚀]{1,4}"), 0..8)
}

/// Builds an operation on a text of `len` characters from random steps.
fn build(len: usize, steps: &[Step]) -> TextOperation {
    let mut op = TextOperation::new();
    let mut left = len;
    for (kind, n, s) in steps {
        match kind {
            0 => {
                let n = (*n).min(left);
                op.retain(n);
                left -= n;
            }
            1 => {
                let n = (*n).min(left);
                op.delete(n);
                left -= n;
            }
            _ => {
                op.insert(s);
            }
        }
    }
    op.retain(left);
    op
}

fn inserted(op: &TextOperation) -> Vec<String> {
    op.components()
        .iter()
        .filter_map(|c| match c {
            tether_demo::ot::Component::Insert(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

proptest! {
    #[test]
    fn concurrent_edits_converge_and_keep_every_insert(
        text in text(),
        steps_a in steps(),
        steps_b in steps(),
    ) {
        let len = text.chars().count();
        let a = build(len, &steps_a);
        let b = build(len, &steps_b);
        let (a2, b2) = TextOperation::transform(&a, &b).expect("same base");
        let a_then_b = b2.apply(&a.apply(&text).expect("a")).expect("b'");
        let b_then_a = a2.apply(&b.apply(&text).expect("b")).expect("a'");
        prop_assert_eq!(&a_then_b, &b_then_a);
        for s in inserted(&a).iter().chain(inserted(&b).iter()) {
            prop_assert!(a_then_b.contains(s.as_str()), "{s:?} lost from {a_then_b:?}");
        }
        prop_assert_eq!(TextOperation::from_json(&a.to_json()).expect("wire"), a);
    }
}
