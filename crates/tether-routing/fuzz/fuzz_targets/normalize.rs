//! Path normalisation never panics, and what it returns is already normal: it starts with `/`,
//! has no `.`/`..`/empty segments, and normalising it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_routing::normalize::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = normalize_path(raw) {
        assert!(path.starts_with('/'), "{path:?}");
        let inner = path.trim_end_matches('/');
        for segment in inner.split('/').skip(1) {
            assert!(
                !segment.is_empty() && segment != "." && segment != "..",
                "{path:?}"
            );
        }
        assert_eq!(
            normalize_path(&path).as_deref(),
            Ok(path.as_str()),
            "not idempotent"
        );
    }
});
