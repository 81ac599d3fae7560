//! A stream's tail: once an SSE or long-poll response's head and first bytes have gone out and
//! it waits for more, the rest is relayed from a task of its own, holding only what a waiting
//! stream needs (its two sockets, its registration and its body's framing), while the
//! connection's task, with its request buffers, ends. A stream held for hours then costs a
//! few kilobytes, not the whole connection's state. The client connection closes after it.

use super::client::ClientStream;
use super::response::{self, BodyState};
use crate::core::record::{record_exchange, ExchangeKind, Finished};
use crate::state::{Active, InFlight, Installed};
use crate::streams::Registration;
use std::sync::Arc;
use std::time::Duration;
use tether_routing::Decision;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What relaying and recording the rest of a stream takes.
pub(crate) struct Tail {
    pub body: BodyState,
    pub backend: TcpStream,
    pub registration: Registration,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    pub active: Option<Active>,
    pub in_flight: Option<InFlight>,
    pub installed: Arc<Installed>,
    pub decision: Decision,
    pub backend_index: usize,
    pub request_id: Vec<u8>,
    pub method: Box<str>,
    pub kind: ExchangeKind,
    pub started: std::time::Instant,
}

/// Relays the rest of the stream in a task of its own, then records the exchange and closes
/// the client connection.
pub(crate) fn start(client: ClientStream, tail: Tail, guard: impl Send + 'static) {
    drop(tokio::spawn(run(client, tail, guard)));
}

async fn run(mut client: ClientStream, tail: Tail, guard: impl Send + 'static) {
    let Tail {
        body,
        backend,
        registration,
        read_timeout,
        send_timeout,
        active,
        in_flight,
        installed,
        decision,
        backend_index,
        request_id,
        method,
        kind,
        started,
    } = tail;
    let done = response::continue_stream(
        &mut client,
        backend,
        body,
        registration.control(),
        read_timeout,
        send_timeout,
    )
    .await;
    // Deregister first, so the stream counts as closed before the exchange is logged.
    drop(registration);
    drop(active);
    drop(in_flight);
    record_exchange(
        &installed,
        &Finished {
            decision: Some(&decision),
            backend: Some(backend_index),
            request_id: Some(&request_id),
            method: &method,
            kind,
            status: done.status,
            bytes: done.body_bytes,
            elapsed: started.elapsed(),
        },
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
    drop(guard);
}
