//! A stream's tail: once an SSE or long-poll response's head and first bytes have gone out and
//! it waits for more, the rest is relayed from a task of its own, holding only what a waiting
//! stream needs (its two sockets, its registration and its body's framing), while the
//! connection's task, with its request buffers, ends. A stream held for hours then costs a
//! few kilobytes, not the whole connection's state. The client connection closes after it.

use super::client::ClientStream;
use super::response::{self, BodyState};
use crate::core::record::{ExchangeKind, Ongoing};
use crate::streams::Registration;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What relaying and recording the rest of a stream takes.
pub(crate) struct Tail {
    pub body: BodyState,
    pub backend: TcpStream,
    pub registration: Registration,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    pub method: Box<str>,
    pub kind: ExchangeKind,
    pub ongoing: Ongoing,
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
        method,
        kind,
        ongoing,
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
    ongoing.finish(&method, kind, done.status, done.body_bytes);
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
    drop(guard);
}
