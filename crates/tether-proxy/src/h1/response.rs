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

/// Waits for `work` while watching the client: `None` when it closes its connection (or it
/// breaks) first. A stream's client sends nothing while it listens, so it would otherwise be
/// noticed gone only at the next event, which may be minutes away, holding the stream's
/// memory, its backend connection and its place in the stream counts until then. Bytes it
/// does send are a pipelined request, which the engine never serves: they are dropped and
/// `pipelined` set, so the connection closes after the stream.
async fn unless_client_gone<F: Future>(
    client: &mut ClientStream,
    pipelined: &mut bool,
    work: F,
) -> Option<F::Output> {
    let mut work = pin!(work);
    let mut scratch = [0u8; 64];
    poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            let mut read = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut *client).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => *pipelined = true,
                Poll::Ready(_) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
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
    let mut done = Done {
        status: head.status,
        body_bytes: 0,
        close: matches!(head.body, Body::UntilClose),
    };
    let mut reusable = head.reusable;
    let mut left = match head.body {
        Body::Length(n) => n,
        _ => 0,
    };
    let mut chunks = ChunkedEnd::default();
    let mut finished = head.body == Body::None || head.body == Body::Length(0);
    let mut start = head.len;
    let mut first_write = true;
    // A stream gives its buffer back while it waits for its next event (`held` is None then).
    let mut held = Some(pooled);
    loop {
        let Some(ResponseBuf(buf)) = held.as_mut() else {
            return Err(Relay::AfterHead(done));
        };
        let arrived = &buf[start.min(buf.len())..];
        let take = if finished {
            0
        } else {
            match head.body {
                Body::None => 0,
                Body::Length(_) => {
                    let take = left.min(arrived.len() as u64) as usize;
                    left -= take as u64;
                    finished = left == 0;
                    take
                }
                Body::Chunked => match chunks.feed(arrived) {
                    Ok(Some(end)) => {
                        finished = true;
                        end
                    }
                    Ok(None) => arrived.len(),
                    Err(_) => {
                        done.close = true;
                        reusable = false;
                        finished = true;
                        arrived.len()
                    }
                },
                Body::UntilClose => arrived.len(),
            }
        };
        if take < arrived.len() {
            // The backend sent more than the response: do not trust the connection again.
            reusable = false;
        }
        done.body_bytes += take;
        if finished && reusable && !done.close {
            if let (Some(keep), Some(socket)) = (exchange.keep, upstream.take()) {
                keep(socket);
            }
        }
        // The head goes out with the body bytes that came with it; later bytes straight from
        // the read buffer.
        let bytes: &[u8] = if first_write {
            out.extend_from_slice(&arrived[..take]);
            out
        } else {
            &arrived[..take]
        };
        if !bytes.is_empty() || first_write {
            if write_client(client, bytes, exchange.send_timeout)
                .await
                .is_err()
            {
                done.close = true;
                return if first_write {
                    Err(Relay::Client)
                } else {
                    Err(Relay::AfterHead(done))
                };
            }
            first_write = false;
        }
        if finished {
            return Ok(Relayed::Response(done));
        }
        buf.clear();
        start = 0;
        let Some(socket) = upstream.as_mut() else {
            return Err(Relay::AfterHead(done));
        };
        if let Some(control) = exchange.control {
            drop(held.take());
            let ready = timer.within(exchange.read_timeout, socket.readable());
            let ready = unless_client_gone(client, &mut done.close, unless_closed(control, ready));
            if !matches!(ready.await, Some(Ok(Ok(Ok(()))))) {
                done.close = true;
                return Err(Relay::AfterHead(done));
            }
            held = Some(ResponseBuf::take());
        }
        let Some(ResponseBuf(buf)) = held.as_mut() else {
            return Err(Relay::AfterHead(done));
        };
        if buf.capacity() < 1024 {
            buf.reserve(READ_SIZE);
        }
        match read_more(socket, buf, timer, exchange).await {
            Ok(Ok(Ok(0))) if head.body == Body::UntilClose => return Ok(Relayed::Response(done)),
            Ok(Ok(Ok(n))) if n > 0 => {}
            // Truncated, broken, too slow or ended by convergence after the head went out:
            // the client can only learn by the connection closing.
            _ => {
                done.close = true;
                return Err(Relay::AfterHead(done));
            }
        }
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
