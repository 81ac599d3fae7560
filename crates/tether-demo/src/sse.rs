//! The Server-Sent Events transport: `hello`, then every change of the document as it happens.
//! Edits come back by `POST .../ops`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderValue, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::watch;

use crate::document::{Cursor, Document, Joined};
use crate::routes::{Body, ClientQuery};
use crate::server::Shared;

/// A comment line this often keeps idle streams (and the proxy's idle timer) alive.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// One open event stream.
struct Stream {
    doc: Arc<Document>,
    shared: Arc<Shared>,
    changes: watch::Receiver<u64>,
    cursor: Cursor,
    first: Option<Value>,
    keepalive: tokio::time::Interval,
    _joined: Joined,
}

/// `text/event-stream` of the document's messages, one `data:` line each.
pub(crate) fn respond(doc: Arc<Document>, shared: Arc<Shared>, q: ClientQuery) -> Response<Body> {
    let joined = doc.join(&q.client);
    let changes = doc.subscribe();
    let (hello, cursor) = doc.hello(&shared.name, q.since);
    let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
    keepalive.reset();
    let state = Stream {
        doc,
        shared,
        changes,
        cursor,
        first: Some(hello),
        keepalive,
        _joined: joined,
    };
    let events = stream::unfold(state, next_chunk);
    let mut response = Response::new(StreamBody::new(events).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

type Chunk = Result<Frame<Bytes>, Infallible>;

async fn next_chunk(mut s: Stream) -> Option<(Chunk, Stream)> {
    if let Some(hello) = s.first.take() {
        return Some((Ok(Frame::data(events(&[hello]))), s));
    }
    loop {
        tokio::select! {
            _ = s.shared.shutdown.cancelled() => return None,
            changed = s.changes.changed() => {
                changed.ok()?;
                s.changes.borrow_and_update();
                let messages = s.doc.pending(&s.shared.name, &mut s.cursor);
                if !messages.is_empty() {
                    return Some((Ok(Frame::data(events(&messages))), s));
                }
            }
            _ = s.keepalive.tick() => {
                return Some((Ok(Frame::data(Bytes::from_static(b": keepalive\n\n"))), s));
            }
        }
    }
}

fn events(messages: &[Value]) -> Bytes {
    let mut out = String::new();
    for message in messages {
        // JSON text has no raw newlines, so one `data:` line holds it.
        out.push_str("data: ");
        out.push_str(&message.to_string());
        out.push_str("\n\n");
    }
    Bytes::from(out)
}
