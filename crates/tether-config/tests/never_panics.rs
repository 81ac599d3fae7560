//! Hostile or garbled input gives errors, never a panic.

use proptest::prelude::*;

const REFERENCE: &str = include_str!("../../../conf/tether.yaml");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = tether_config::parse(&text, "t.yaml");
    }

    #[test]
    fn yaml_like_text_never_panics(text in "[a-z_:{}\\[\\],\\-#&*!|>'\" \n0-9./]{0,300}") {
        let _ = tether_config::parse(&text, "t.yaml");
    }

    /// Cutting a slice out of a valid file exercises half-written configs.
    #[test]
    fn a_damaged_reference_config_never_panics(start in 0..REFERENCE.len(), len in 0usize..80) {
        let mut text: String = REFERENCE.chars().take(start).collect();
        text.extend(REFERENCE.chars().skip(start + len));
        if let Err(errors) = tether_config::parse(&text, "t.yaml") {
            for e in &errors.0 {
                prop_assert!(e.line >= 1 && e.column >= 1, "{e}");
            }
        }
    }
}
