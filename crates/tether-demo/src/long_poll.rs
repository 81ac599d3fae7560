//! The long-poll transport: each `GET .../poll/docs/{id}` answers a JSON array of messages as
//! soon as there is one (or `[]` after [`POLL_WAIT`]). Edits come back by `POST .../ops`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;

use crate::document::{Cursor, Document};
use crate::routes::{json_response, Body, ClientQuery};
use crate::server::Shared;

/// How long a poll waits for something to happen before answering `[]`.
pub const POLL_WAIT: Duration = Duration::from_secs(20);

/// Answers one poll. With `hello=1` or without `since` it is a `hello` at once; otherwise
/// what happened after `since` (and the viewer count if it is not `viewers`).
pub(crate) async fn respond(
    doc: Arc<Document>,
    shared: Arc<Shared>,
    q: ClientQuery,
) -> http::Response<Body> {
    doc.touch_poll(&q.client, Instant::now());
    let messages = match q.since {
        Some(since) if !q.hello => {
            let cursor = Cursor::new(since, q.viewers.unwrap_or(usize::MAX));
            wait(&doc, &shared, cursor).await
        }
        since => vec![doc.hello(&shared.name, since).0],
    };
    // The client polls again at once; it stays a viewer until it stops.
    doc.touch_poll(&q.client, Instant::now());
    json_response(StatusCode::OK, &Value::Array(messages))
}

async fn wait(doc: &Document, shared: &Shared, mut cursor: Cursor) -> Vec<Value> {
    let mut changes = doc.subscribe();
    let give_up = tokio::time::Instant::now() + POLL_WAIT;
    loop {
        changes.borrow_and_update();
        let messages = doc.pending(&shared.name, &mut cursor);
        if !messages.is_empty() {
            return messages;
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Vec::new(),
            _ = tokio::time::sleep_until(give_up) => return Vec::new(),
            changed = changes.changed() => {
                if changed.is_err() {
                    return Vec::new();
                }
            }
        }
    }
}
