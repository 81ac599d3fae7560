//! Relaying a backend's response to the client as it arrives: the head checked by the one
//! response-head validation (`tether_http::framing`) and edited by the header policy on the way,
//! interim responses passed on, the body delimited as the head says, a WebSocket's `101`
//! checked against the handshake, and a stream that convergence closes ended at once.

use super::client::ClientStream;
use super::deadline::{LazyDeadline, TimedOut};
use crate::streams::{CloseReason, StreamControl};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;
use tether_http::chunked::ChunkedEnd;
use tether_http::framing::Body;
use tether_http::response::{edit_head, For, Head};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest backend response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for the backend's responses.
pub(crate) const READ_SIZE: usize = 16 * 1024;

/// One request's response, as the relay needs to know it.
pub(crate) struct Exchange<'a> {
    /// What the head's edit needs of the request.
    pub asked: For<'a>,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    /// The stream's handle, for a stream convergence may end.
    pub control: Option<&'a StreamControl>,
    /// Where a backend connection goes that can serve another request: it is handed over as
    /// soon as the response has arrived whole, before its last bytes go to the client, so the
    /// next request (perhaps from another client) finds it in the pool.
    pub keep: Option<&'a (dyn Fn(TcpStream) + Sync)>,
    /// A stream that has to wait for its next bytes is handed back (`Relayed::Waiting`).
    pub hand_off: bool,
}

/// How a relayed response that reached the client ended.
pub(crate) struct Done {
    pub status: u16,
    pub body_bytes: usize,
    /// The client connection cannot be kept (the response ran until the backend closed, or
    /// broke off midway).
    pub close: bool,
}

/// What the relay achieved.
pub(crate) enum Relayed {
    /// A response went to the client (and its backend connection to `keep`, if reusable).
    Response(Done),
    /// The backend switched to the WebSocket protocol: the client's `101` head (`head_len`
    /// bytes) and the bytes the backend sent after it, for the tunnel to send first.
    Switched { to_client: Vec<u8>, head_len: usize },
    /// A stream's head and first bytes went to the client, and it waits for more: the rest is
    /// for `continue_stream` (the backend connection stays in `upstream`).
    Waiting(BodyState),
}

/// A transport or protocol failure of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// Reset or closed; `got_bytes` when part of a response had arrived.
    Io {
        got_bytes: bool,
    },
    Timeout,
    /// Not a usable response.
    Protocol,
}

/// Why the relay stopped early.
pub(crate) enum Relay {
    /// The backend failed before a response head reached the client.
    Upstream(UpstreamError),
    /// The client went away before a response head reached it.
    Client,
    /// Convergence (or shutdown) ended the stream before its response started.
    Closing,
    /// Something broke after the head went out: the client connection must close.
    AfterHead(Done),
}

/// Waits for `work` unless the stream is ended first.
async fn unless_closed<F: Future>(
    control: &StreamControl,
    work: F,
) -> Result<F::Output, CloseReason> {
    let mut work = pin!(work);
    poll_fn(|cx| {
        control.attach_relay(cx.waker());
        if let Some(reason) = control.reason() {
            return Poll::Ready(Err(reason));
        }
        work.as_mut().poll(cx).map(Ok)
    })
    .await
}

/// Waits until the backend has bytes for a waiting stream: `false` when the stream is ended
/// first (convergence, shutdown), or its client leaves. A stream's client sends nothing while
/// it listens, so without watching it would be noticed gone only at the next event, which may
/// be minutes away, holding the stream's sockets, memory and place in the stream counts until
/// then. Bytes it does send are a pipelined request, which the engine never serves: they are
/// dropped and `pipelined` set, so the connection closes after the stream.
///
/// All three are polled directly, with no future of their own to keep: this is what a held
/// stream's task holds while it waits, which is most of its life.
fn next_bytes<'a>(
    socket: &'a TcpStream,
    client: &'a mut ClientStream,
    control: &'a StreamControl,
    pipelined: &'a mut bool,
) -> impl Future<Output = bool> + 'a {
    poll_fn(move |cx| {
        control.attach_relay(cx.waker());
        if control.reason().is_some() {
            return Poll::Ready(false);
        }
        if let Poll::Ready(ready) = socket.poll_read_ready(cx) {
            return Poll::Ready(ready.is_ok());
        }
        let mut scratch = [0u8; 64];
        loop {
            let mut read = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut *client).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => *pipelined = true,
                Poll::Ready(_) => return Poll::Ready(false),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
}

/// One read of the backend's response into `buf` within the read timeout; a stream's read
/// also ends (`Err`) when convergence closes it. Plain responses skip the closing wrapper.
async fn read_more(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
    timer: &mut LazyDeadline,
    exchange: &Exchange<'_>,
) -> Result<Result<std::io::Result<usize>, TimedOut>, CloseReason> {
    let read = timer.within(exchange.read_timeout, socket.read_buf(buf));
    match exchange.control {
        None => Ok(read.await),
        Some(control) => unless_closed(control, read).await,
    }
}

/// Reads the backend's response and relays it to the client.
pub(crate) async fn relay(
    client: &mut ClientStream,
    upstream: &mut Option<TcpStream>,
    timer: &mut LazyDeadline,
    exchange: &Exchange<'_>,
    out: &mut Vec<u8>,
) -> Result<Relayed, Relay> {
    let Some(socket) = upstream.as_mut() else {
        return Err(Relay::Upstream(UpstreamError::Io { got_bytes: false }));
    };
    let mut pooled = ResponseBuf::take();
    let buf = &mut pooled.0;
    out.clear();
    let head = loop {
        if !buf.is_empty() {
            match edit_head(buf, &exchange.asked, out) {
                Ok(Some(Head::Final(head))) => break head,
                Ok(Some(Head::Switched(len))) => {
                    let mut to_client = std::mem::take(out);
                    let head_len = to_client.len();
                    to_client.extend_from_slice(&buf[len..]);
                    return Ok(Relayed::Switched {
                        to_client,
                        head_len,
                    });
                }
                Ok(Some(Head::Interim(len))) => {
                    // 100 or 103: pass it on (to HTTP/1.1 clients), then look for the final one.
                    if !out.is_empty()
                        && write_client(client, out, exchange.send_timeout)
                            .await
                            .is_err()
                    {
                        return Err(Relay::Client);
                    }
                    out.clear();
                    buf.drain(..len);
                    continue;
                }
                Ok(None) if buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(Relay::Upstream(UpstreamError::Protocol))
                }
                Ok(None) => {}
                Err(_) => return Err(Relay::Upstream(UpstreamError::Protocol)),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_SIZE);
        }
        match read_more(socket, buf, timer, exchange).await {
            Err(_) => return Err(Relay::Closing),
            Ok(Ok(Ok(0))) | Ok(Ok(Err(_))) => {
                return Err(Relay::Upstream(UpstreamError::Io {
                    got_bytes: !buf.is_empty(),
                }))
            }
            Ok(Ok(Ok(_))) => {}
            Ok(Err(_)) => return Err(Relay::Upstream(UpstreamError::Timeout)),
        }
    };

    // The body bytes that came with the head, then the rest as it arrives.
    let body = BodyState {
        done: Done {
            status: head.status,
            body_bytes: 0,
            close: matches!(head.body, Body::UntilClose),
        },
        body: head.body,
        reusable: head.reusable,
        left: match head.body {
            Body::Length(n) => n,
            _ => 0,
        },
        chunks: ChunkedEnd::default(),
        finished: head.body == Body::None || head.body == Body::Length(0),
    };
    let arrived = Arrived {
        buf: pooled,
        start: head.len,
    };
    relay_body(
        client,
        upstream,
        timer,
        exchange,
        body,
        Some(arrived),
        Some(out),
    )
    .await
}

/// Relays the rest of a stream that `relay` handed back (`Relayed::Waiting`), from a task of
/// its own; the client connection closes after it.
pub(crate) async fn continue_stream(
    client: &mut ClientStream,
    upstream: TcpStream,
    st: BodyState,
    control: &StreamControl,
    read_timeout: Duration,
    send_timeout: Duration,
) -> Done {
    let status = st.done.status;
    let exchange = Exchange {
        // Only a head's edit reads these, and the head has gone.
        asked: For {
            head_request: false,
            close: true,
            http11_client: true,
            request_id: b"",
            websocket_key: None,
        },
        read_timeout,
        send_timeout,
        control: Some(control),
        keep: None,
        hand_off: false,
    };
    let mut upstream = Some(upstream);
    let mut timer = LazyDeadline::default();
    match relay_body(client, &mut upstream, &mut timer, &exchange, st, None, None).await {
        Ok(Relayed::Response(done)) | Err(Relay::AfterHead(done)) => done,
        // Not reached: those need a head still to write, or `hand_off`.
        _ => Done {
            status,
            body_bytes: 0,
            close: true,
        },
    }
}

/// Where a response body is: how the head delimits it, and how much of it has gone.
pub(crate) struct BodyState {
    done: Done,
    body: Body,
    reusable: bool,
    left: u64,
    chunks: ChunkedEnd,
    finished: bool,
}

impl BodyState {
    /// How the response went so far, the connection to close.
    pub(crate) fn into_done(self) -> Done {
        Done {
            close: true,
            ..self.done
        }
    }

    /// How many of `arrived` belong to the body; marks the end when they reach it.
    fn take(&mut self, arrived: &[u8]) -> usize {
        if self.finished {
            return 0;
        }
        match self.body {
            Body::None => 0,
            Body::Length(_) => {
                let take = self.left.min(arrived.len() as u64) as usize;
                self.left -= take as u64;
                self.finished = self.left == 0;
                take
            }
            Body::Chunked => match self.chunks.feed(arrived) {
                Ok(Some(end)) => {
                    self.finished = true;
                    end
                }
                Ok(None) => arrived.len(),
                Err(_) => {
                    self.done.close = true;
                    self.reusable = false;
                    self.finished = true;
                    arrived.len()
                }
            },
            Body::UntilClose => arrived.len(),
        }
    }
}

/// Bytes read but not yet relayed: the response buffer from `start`.
struct Arrived {
    buf: ResponseBuf,
    start: usize,
}

/// Relays a response body: `arrived` first (after the client's `head`, in one write), then
/// reads as they come. A stream (`exchange.control`) that has to wait for its next bytes is
/// handed back as `Relayed::Waiting` when `exchange.hand_off`, to wait in a task of its own
/// (`continue_stream`).
async fn relay_body(
    client: &mut ClientStream,
    upstream: &mut Option<TcpStream>,
    timer: &mut LazyDeadline,
    exchange: &Exchange<'_>,
    mut st: BodyState,
    mut arrived: Option<Arrived>,
    mut head: Option<&mut Vec<u8>>,
) -> Result<Relayed, Relay> {
    loop {
        if let Some(Arrived { buf, start }) = arrived.as_mut() {
            let bytes = &buf.0[(*start).min(buf.0.len())..];
            let take = st.take(bytes);
            if take < bytes.len() {
                // The backend sent more than the response: do not trust the connection again.
                st.reusable = false;
            }
            st.done.body_bytes += take;
            if st.finished && st.reusable && !st.done.close {
                if let (Some(keep), Some(socket)) = (exchange.keep, upstream.take()) {
                    keep(socket);
                }
            }
            // The head goes out with the body bytes that came with it; later bytes straight
            // from the read buffer.
            let first_write = head.is_some();
            let bytes: &[u8] = match head.take() {
                Some(head) => {
                    head.extend_from_slice(&bytes[..take]);
                    head
                }
                None => &bytes[..take],
            };
            if (!bytes.is_empty() || first_write)
                && write_client(client, bytes, exchange.send_timeout)
                    .await
                    .is_err()
            {
                st.done.close = true;
                return if first_write {
                    Err(Relay::Client)
                } else {
                    Err(Relay::AfterHead(st.done))
                };
            }
            if st.finished {
                return Ok(Relayed::Response(st.done));
            }
            buf.0.clear();
            *start = 0;
        }
        let Some(socket) = upstream.as_mut() else {
            return Err(Relay::AfterHead(st.done));
        };
        let mut buf = match (exchange.control, arrived.take()) {
            // A stream gives its buffer back while it waits for its next event, and waits in
            // a task of its own unless it already does.
            (Some(_), Some(_)) if exchange.hand_off => return Ok(Relayed::Waiting(st)),
            (Some(control), held) => {
                drop(held);
                let ready = next_bytes(socket, client, control, &mut st.done.close);
                if !matches!(timer.within(exchange.read_timeout, ready).await, Ok(true)) {
                    st.done.close = true;
                    return Err(Relay::AfterHead(st.done));
                }
                ResponseBuf::take()
            }
            (None, Some(held)) => held.buf,
            (None, None) => ResponseBuf::take(),
        };
        if buf.0.capacity() < 1024 {
            buf.0.reserve(READ_SIZE);
        }
        match read_more(socket, &mut buf.0, timer, exchange).await {
            Ok(Ok(Ok(0))) if st.body == Body::UntilClose => return Ok(Relayed::Response(st.done)),
            Ok(Ok(Ok(n))) if n > 0 => {}
            // Truncated, broken, too slow or ended by convergence after the head went out:
            // the client can only learn by the connection closing.
            _ => {
                st.done.close = true;
                return Err(Relay::AfterHead(st.done));
            }
        }
        arrived = Some(Arrived { buf, start: 0 });
    }
}

/// Writes all of `bytes` to the client within `send_timeout`.
pub(crate) async fn write_client(
    client: &mut ClientStream,
    bytes: &[u8],
    send_timeout: Duration,
) -> Result<(), ()> {
    let write = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    // Most writes finish at once and never touch a timer; a blocked one arms its own.
    match LazyDeadline::default().within(send_timeout, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// A buffer for a backend's response, from a per-thread stack of recently used ones.
///
/// Why: a fresh 16 KB buffer per exchange took the allocator's slow path on every request
/// (about 300 instructions), and a recently used buffer is still in the CPU's cache when the
/// kernel copies the response into it (HAProxy's buffer pools work the same way). Buffers
/// are held only while a response is relayed, so idle keep-alive connections keep none.
pub(crate) struct ResponseBuf(pub Vec<u8>);

thread_local! {
    static RESPONSE_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ResponseBuf {
    /// Most buffers kept per thread.
    const KEPT: usize = 64;

    /// A buffer from the thread's stack, or a new one.
    pub(crate) fn take() -> ResponseBuf {
        let reused = RESPONSE_BUFS
            .try_with(|bufs| bufs.try_borrow_mut().ok().and_then(|mut bufs| bufs.pop()))
            .ok()
            .flatten();
        ResponseBuf(reused.unwrap_or_else(|| Vec::with_capacity(READ_SIZE)))
    }
}

impl Drop for ResponseBuf {
    fn drop(&mut self) {
        // A buffer a large response grew is let go.
        if self.0.capacity() > 2 * READ_SIZE {
            return;
        }
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        let _ = RESPONSE_BUFS.try_with(|bufs| {
            if let Ok(mut bufs) = bufs.try_borrow_mut() {
                if bufs.len() < Self::KEPT {
                    bufs.push(buf);
                }
            }
        });
    }
}
