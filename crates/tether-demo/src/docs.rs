//! The documents one app server holds, by id, created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::document::Document;

/// The most documents one server holds; more are refused rather than growing without bound.
pub const MAX_DOCUMENTS: usize = 10_000;
/// The longest document or client id.
pub const MAX_ID_LEN: usize = 64;

/// Every document of one server.
#[derive(Debug, Default)]
pub struct Docs {
    map: Mutex<HashMap<String, Arc<Document>>>,
}

/// A document id or client id: 1 to 64 of `A-Z a-z 0-9 - _`, so it needs no escaping in a
/// path, a query or a page.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Docs {
    /// The document `id`, created empty if new; `None` once [`MAX_DOCUMENTS`] exist.
    pub fn open(&self, id: &str) -> Option<Arc<Document>> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(doc) = map.get(id) {
            return Some(Arc::clone(doc));
        }
        if map.len() >= MAX_DOCUMENTS {
            return None;
        }
        let doc = Arc::new(Document::new());
        map.insert(id.to_owned(), Arc::clone(&doc));
        Some(doc)
    }

    /// Forgets long-poll viewers that stopped polling, in every document.
    pub fn expire_viewers(&self, now: Instant) {
        let docs: Vec<Arc<Document>> = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for doc in docs {
            doc.expire(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_url_safe_words() {
        for good in ["a", "doc-1", "Team_Notes", &"x".repeat(MAX_ID_LEN)] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", "<x>", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn opening_an_id_twice_gives_the_same_document() {
        let docs = Docs::default();
        let a = docs.open("a").expect("room");
        assert!(Arc::ptr_eq(&a, &docs.open("a").expect("room")));
        assert!(!Arc::ptr_eq(&a, &docs.open("b").expect("room")));
    }
}
