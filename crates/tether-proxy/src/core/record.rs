//! What kind of exchange a request is (decided once, for both engines), and how a finished
//! exchange is recorded: the route's metrics and the access log line.

use crate::state::{Active, InFlight, Installed};
use crate::streams::StreamKind;
use std::sync::Arc;
use std::time::Duration;
use tether_routing::Decision;

/// What kind of exchange a request is; streams are governed by `timeouts.idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// An ordinary request/response, governed by `timeouts.read`.
    Plain,
    /// A WebSocket upgrade.
    WebSocket,
    /// A Server-Sent Events stream (`Accept: text/event-stream`).
    Sse,
    /// A request on a `long_poll: true` route.
    LongPoll,
}

impl ExchangeKind {
    /// The one classification: a checked WebSocket handshake, else an `Accept` that names
    /// `text/event-stream`, else the route's `long_poll`, else plain. Other upgrade tokens
    /// (h2c, ...) are not honoured: such a request is plain.
    pub fn of<'a>(
        websocket: bool,
        mut accepts: impl Iterator<Item = &'a [u8]>,
        long_poll_route: bool,
    ) -> ExchangeKind {
        if websocket {
            ExchangeKind::WebSocket
        } else if accepts.any(|v| memchr::memmem::find(v, b"text/event-stream").is_some()) {
            ExchangeKind::Sse
        } else if long_poll_route {
            ExchangeKind::LongPoll
        } else {
            ExchangeKind::Plain
        }
    }

    /// The access log label: `plain`, `websocket`, `sse` or `long_poll`.
    pub fn as_str(self) -> &'static str {
        self.stream_kind().map_or("plain", StreamKind::as_str)
    }

    /// The registry kind of a stream exchange (None for plain requests).
    pub fn stream_kind(self) -> Option<StreamKind> {
        match self {
            ExchangeKind::Plain => None,
            ExchangeKind::WebSocket => Some(StreamKind::WebSocket),
            ExchangeKind::Sse => Some(StreamKind::Sse),
            ExchangeKind::LongPoll => Some(StreamKind::LongPoll),
        }
    }
}

/// The canonical reason phrase of `status`, or "error" for a code without one.
pub fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
}

/// One finished exchange, as recorded.
pub struct Finished<'a> {
    /// The route's decision (None: refused before routing).
    pub decision: Option<&'a Decision>,
    /// The backend index the exchange ended on.
    pub backend: Option<usize>,
    /// The request id.
    pub request_id: Option<&'a [u8]>,
    /// The method.
    pub method: &'a str,
    /// The exchange's kind.
    pub kind: ExchangeKind,
    /// The status the client got (0: none).
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: usize,
    /// From the request's arrival to its end.
    pub elapsed: Duration,
}

/// Records a finished exchange: the route's status and duration metrics, and the access log
/// line (unless the access log is off).
pub fn record_exchange(installed: &Installed, done: &Finished<'_>) {
    let decision = done.decision;
    if done.status > 0 {
        installed
            .counters
            .route(decision.map(|d| d.route))
            .observe(done.status, done.elapsed);
    }
    if let Some(d) = decision {
        if let (Some(key), Some(documents)) =
            (d.key.as_deref(), installed.documents.get(d.upstream))
        {
            documents.record(key, done.bytes);
        }
    }
    let log = &installed.config.server.access_log;
    if log.format == tether_config::AccessLogFormat::Off {
        return;
    }
    let router = &installed.router;
    let backend = match (decision, done.backend) {
        (Some(d), Some(i)) => router.upstreams()[d.upstream]
            .backends
            .get(i)
            .map(|b| b.address.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let entry = crate::access_log::Entry {
        request_id: done
            .request_id
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or(""),
        method: done.method,
        route: decision.map_or("", |d| router.routes()[d.route].name.as_str()),
        key_source: decision.map_or("none", |d| d.key_source.as_str()),
        key: decision.and_then(|d| d.key.as_deref()),
        upstream: decision.map_or("", |d| router.upstreams()[d.upstream].name.as_str()),
        backend: &backend,
        kind: done.kind.as_str(),
        status: done.status,
        bytes: done.bytes,
        duration: done.elapsed.as_secs_f64(),
    };
    crate::access_log::log(log, &entry);
}

/// An exchange that outlives the request's task (a WebSocket tunnel, a waiting stream's tail):
/// what recording it at its end takes, and the counts it holds until then.
pub(crate) struct Ongoing {
    /// The backend's `active` count, taken over from the request.
    pub active: Option<Active>,
    pub in_flight: Option<InFlight>,
    pub installed: Arc<Installed>,
    pub decision: Decision,
    pub backend_index: usize,
    pub request_id: Vec<u8>,
    pub started: std::time::Instant,
}

impl Ongoing {
    /// Lets go of the counts and records the exchange.
    pub(crate) fn finish(self, method: &str, kind: ExchangeKind, status: u16, bytes: usize) {
        let Ongoing {
            active,
            in_flight,
            installed,
            decision,
            backend_index,
            request_id,
            started,
        } = self;
        drop((active, in_flight));
        record_exchange(
            &installed,
            &Finished {
                decision: Some(&decision),
                backend: Some(backend_index),
                request_id: Some(&request_id),
                method,
                kind,
                status,
                bytes,
                elapsed: started.elapsed(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_classification_for_every_engine() {
        let none: [&[u8]; 0] = [];
        let sse: [&[u8]; 2] = [b"text/html", b"application/json, text/event-stream"];
        assert_eq!(
            ExchangeKind::of(true, sse.into_iter(), true),
            ExchangeKind::WebSocket
        );
        assert_eq!(
            ExchangeKind::of(false, sse.into_iter(), true),
            ExchangeKind::Sse
        );
        assert_eq!(
            ExchangeKind::of(false, none.into_iter(), true),
            ExchangeKind::LongPoll
        );
        assert_eq!(
            ExchangeKind::of(false, none.into_iter(), false),
            ExchangeKind::Plain
        );
    }
}
