//! Server-sent events: read a `text/event-stream` response event by event, stamping arrival.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, Method, StatusCode};
use hyper::body::{Body as _, Incoming};
use serde_json::Value;
use tokio::time::Instant;

use super::{build_request, send_on_new_connection, ConnectionTask, HTTP_TIMEOUT};
use crate::clock::unix_micros;
use crate::error::{Result, TestkitError};

/// One event, with when it arrived.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// When the chunk that completed this event was read.
    pub arrived: Instant,
    /// The same moment on the wall clock, comparable with a backend's `sent_unix_micros`.
    pub arrived_unix_micros: u64,
}

impl SseEvent {
    /// The data parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.data)?)
    }

    /// Arrival minus the `sent_unix_micros` in the data, for events from a `TestBackend`.
    pub fn latency(&self) -> Option<Duration> {
        let sent = self.json().ok()?.get("sent_unix_micros")?.as_u64()?;
        Some(Duration::from_micros(
            self.arrived_unix_micros.saturating_sub(sent),
        ))
    }
}

/// An open event stream. Dropping it closes the connection.
#[derive(Debug)]
pub struct SseStream {
    /// The response status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    body: Incoming,
    buffer: Vec<u8>,
    ready: VecDeque<SseEvent>,
    _connection: ConnectionTask,
}

/// `GET url` with `Accept: text/event-stream`; see [`sse_connect`].
pub async fn sse_events(url: &str) -> Result<SseStream> {
    sse_connect(url, &[]).await
}

/// Opens an event stream with extra request headers. Returns once the response head is in,
/// whatever its status, so a test can also assert on a refusal.
pub async fn sse_connect(url: &str, headers: &[(&str, &str)]) -> Result<SseStream> {
    let mut all_headers = vec![("accept", "text/event-stream")];
    all_headers.extend_from_slice(headers);
    let (request, authority) = build_request(Method::GET, url, &all_headers, Bytes::new())?;
    let (response, connection) =
        tokio::time::timeout(HTTP_TIMEOUT, send_on_new_connection(&authority, request))
            .await
            .map_err(|_| TestkitError::Timeout {
                after: HTTP_TIMEOUT,
                during: "waiting for an event-stream response head",
            })??;
    let (parts, body) = response.into_parts();
    Ok(SseStream {
        status: parts.status,
        headers: parts.headers,
        body,
        buffer: Vec::new(),
        ready: VecDeque::new(),
        _connection: connection,
    })
}

impl SseStream {
    /// The next event; `None` once the server has ended the response cleanly, an error if the
    /// connection broke. Waits as long as the server stays silent: wrap it in a timeout.
    pub async fn next_event(&mut self) -> Option<Result<SseEvent>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => return None,
                Some(Err(err)) => return Some(Err(err.into())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.push(&data, Instant::now(), SystemTime::now());
                    }
                }
            }
        }
    }

    /// The events as a `Stream`, ending as [`next_event`](Self::next_event) does.
    pub fn into_stream(self) -> impl Stream<Item = Result<SseEvent>> {
        futures_util::stream::unfold(self, |mut stream| async move {
            let event = stream.next_event().await?;
            Some((event, stream))
        })
    }

    /// Adds a chunk and queues every event it completes.
    fn push(&mut self, chunk: &[u8], arrived: Instant, arrived_wall: SystemTime) {
        // CRLF and LF line ends both appear; dropping CR makes them one case even when a chunk
        // ends between the CR and the LF.
        self.buffer
            .extend(chunk.iter().copied().filter(|&b| b != b'\r'));
        while let Some(end) = find_blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            if let Some(event) =
                parse_block(&String::from_utf8_lossy(&block), arrived, arrived_wall)
            {
                self.ready.push_back(event);
            }
        }
    }
}

fn find_blank_line(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n")
}

/// One event block to an event; comment-only blocks give none.
fn parse_block(block: &str, arrived: Instant, arrived_wall: SystemTime) -> Option<SseEvent> {
    let mut event = None;
    let mut id = None;
    let mut data: Option<String> = None;
    for line in block
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(':'))
    {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match field {
            "event" => event = Some(value),
            "id" => id = Some(value),
            "data" => match &mut data {
                Some(joined) => {
                    joined.push('\n');
                    joined.push_str(&value);
                }
                None => data = Some(value),
            },
            _ => {}
        }
    }
    if data.is_none() && event.is_none() {
        return None;
    }
    Some(SseEvent {
        event,
        id,
        data: data.unwrap_or_default(),
        arrived,
        arrived_unix_micros: unix_micros(arrived_wall),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(block: &str) -> Option<SseEvent> {
        parse_block(block, Instant::now(), SystemTime::now())
    }

    #[test]
    fn data_lines_join_and_fields_lose_one_leading_space() {
        let event = parse("id: 7\nevent: edit\ndata: a\ndata:  b\n\n").unwrap();
        assert_eq!(event.id.as_deref(), Some("7"));
        assert_eq!(event.event.as_deref(), Some("edit"));
        assert_eq!(event.data, "a\n b");
    }

    #[test]
    fn comment_only_blocks_are_not_events() {
        assert!(parse(": keep-alive\n\n").is_none());
    }

    #[test]
    fn latency_is_arrival_minus_the_sent_timestamp() {
        let mut event = parse("data: {\"sent_unix_micros\": 1000}\n\n").unwrap();
        event.arrived_unix_micros = 3500;
        assert_eq!(event.latency(), Some(Duration::from_micros(2500)));
        event.data = "not json".into();
        assert_eq!(event.latency(), None);
    }
}
