//! The `.../sse` endpoint: timestamped server-sent events, streamed without buffering.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderValue, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;

use crate::clock::unix_micros;

use super::endpoints::{query_param, query_u64, Body};
use super::{OpenGuard, Shared};

/// Where one event stream is: the next sequence number, and what it was asked for.
struct Progress {
    seq: u64,
    count: u64,
    interval: Duration,
    hold: bool,
    shared: Arc<Shared>,
    _open: OpenGuard,
}

/// `count` events (default 3), `interval_ms` apart (default 100, the first at once); with
/// `hold=1` the response then stays open, silent, until the client or `stop()` ends it.
pub(super) fn respond(query: &str, shared: Arc<Shared>) -> Response<Body> {
    let progress = Progress {
        seq: 0,
        count: query_u64(query, "count").unwrap_or(3),
        interval: Duration::from_millis(query_u64(query, "interval_ms").unwrap_or(100)),
        hold: query_param(query, "hold") == Some("1"),
        _open: OpenGuard::new(Arc::clone(&shared), |s| &s.open_event_streams),
        shared,
    };
    let events = stream::unfold(progress, next_event);
    let mut response = Response::new(StreamBody::new(events).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer; harmless elsewhere.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

async fn next_event(
    mut progress: Progress,
) -> Option<(Result<Frame<Bytes>, std::convert::Infallible>, Progress)> {
    if progress.seq >= progress.count {
        if progress.hold {
            // Never resolves: the stream ends only when the connection is dropped.
            std::future::pending::<()>().await;
        }
        return None;
    }
    if progress.seq > 0 {
        tokio::time::sleep(progress.interval).await;
    }
    let data = json!({
        "backend": progress.shared.name,
        "seq": progress.seq,
        "sent_unix_micros": unix_micros(SystemTime::now()),
    });
    let event = format!("id: {}\ndata: {}\n\n", progress.seq, data);
    progress.seq += 1;
    Some((Ok(Frame::data(Bytes::from(event))), progress))
}
