//! Relaying a backend's response to the client as it arrives: the head checked by the one
//! response-head validation (`core::framing`) and edited by the header policy on the way,
//! interim responses passed on, the body delimited as the head says, a WebSocket's `101`
//! checked against the handshake, and a stream that convergence closes ended at once.

use super::client::ClientStream;
use super::deadline::LazyDeadline;
use super::request::copy_field_lines;
use crate::core::chunked::ChunkedEnd;
use crate::core::framing::{self, Body};
use crate::core::policy::{self, is, Nominated};
use crate::streams::{CloseReason, StreamControl};
use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most header fields in a backend's response head.
const MAX_RESPONSE_FIELDS: usize = 128;
/// Largest backend response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for the backend's responses.
pub(crate) const READ_SIZE: usize = 16 * 1024;

/// One request's response, as the relay needs to know it.
pub(crate) struct Exchange<'a> {
    /// The request was HEAD: the response has no body whatever its head says.
    pub head_request: bool,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    /// Tell the client this connection closes after the response.
    pub close: bool,
    /// The client speaks HTTP/1.1 (interim responses and chunked bodies are for it only).
    pub http11_client: bool,
    pub request_id: &'a [u8],
    /// The client's `Sec-WebSocket-Key`, for a WebSocket upgrade.
    pub websocket_key: Option<&'a [u8]>,
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
    /// The backend switched to the WebSocket protocol: the client's `101` head and the bytes
    /// the backend sent after it, for the tunnel to send first.
    Switched(Vec<u8>),
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
    control: Option<&StreamControl>,
    work: F,
) -> Result<F::Output, CloseReason> {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Some(control) = control {
            control.attach_relay(cx.waker());
            if let Some(reason) = control.reason() {
                return Poll::Ready(Err(reason));
            }
        }
        work.as_mut().poll(cx).map(Ok)
    })
    .await
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
            match response_head(buf, exchange, out) {
                Ok(Some(Head::Final(head))) => break head,
                Ok(Some(Head::Switched(len))) => {
                    let mut to_client = std::mem::take(out);
                    to_client.extend_from_slice(&buf[len..]);
                    return Ok(Relayed::Switched(to_client));
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
                Err(()) => return Err(Relay::Upstream(UpstreamError::Protocol)),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_SIZE);
        }
        let read = timer.within(exchange.read_timeout, socket.read_buf(buf));
        match unless_closed(exchange.control, read).await {
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
        if exchange.control.is_some() {
            drop(held.take());
            let ready = timer.within(exchange.read_timeout, socket.readable());
            if !matches!(unless_closed(exchange.control, ready).await, Ok(Ok(Ok(())))) {
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
        let read = timer.within(exchange.read_timeout, socket.read_buf(buf));
        match unless_closed(exchange.control, read).await {
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

/// A parsed final response head, already rewritten for the client into the output buffer.
struct FinalHead {
    len: usize,
    status: u16,
    body: Body,
    reusable: bool,
}

enum Head {
    /// A final response.
    Final(FinalHead),
    /// An interim (1xx) response of this many bytes; what goes to the client is in `out`.
    Interim(usize),
    /// A valid `101` to a WebSocket upgrade of this many bytes; the client's head is in `out`.
    Switched(usize),
}

/// Parses the response head at the start of `buf` and writes it, edited for the client, to
/// `out`. `Ok(None)`: the head is not complete yet. `Err`: not a usable response.
fn response_head(
    buf: &[u8],
    exchange: &Exchange<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<Head>, ()> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = response.code.ok_or(())?;
    let pairs = response.headers.iter().map(|f| (f.name, f.value));
    let framing = framing::response(
        status,
        response.version == Some(1),
        exchange.head_request,
        pairs.clone(),
    )
    .map_err(|_| ())?;
    let mut nominated = Nominated::new();
    for field in response.headers.iter() {
        if is(field.name, "connection") {
            policy::nominated(field.value, &mut nominated);
        }
    }
    if status == 101 {
        // Only a WebSocket upgrade may be switched, and only with the right accept value.
        let key = exchange.websocket_key.ok_or(())?;
        let accept = response
            .headers
            .iter()
            .find(|f| is(f.name, "sec-websocket-accept"))
            .map(|f| f.value);
        if !crate::core::websocket::valid_switch(Some(key), accept) {
            return Err(());
        }
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
        copy_field_lines(&buf[..len], response.headers, out, |f| {
            policy::keeps_response_field(f.name, &nominated)
        });
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
        policy::push_field(out, b"X-Request-Id", exchange.request_id);
        out.extend_from_slice(b"\r\n");
        return Ok(Some(Head::Switched(len)));
    }
    if status < 200 {
        // RFC 9110 15.2: never to an HTTP/1.0 client.
        if exchange.http11_client {
            write_status_line(out, status, response.reason);
            copy_field_lines(&buf[..len], response.headers, out, |f| {
                policy::keeps_response_field(f.name, &nominated)
            });
            out.extend_from_slice(b"\r\n");
        }
        return Ok(Some(Head::Interim(len)));
    }
    if framing.body == Body::Chunked && !exchange.http11_client {
        // Asked in HTTP/1.0, answered with a coding HTTP/1.0 does not have.
        return Err(());
    }
    write_status_line(out, status, response.reason);
    copy_field_lines(&buf[..len], response.headers, out, |f| {
        policy::keeps_response_field(f.name, &nominated)
    });
    policy::push_field(out, b"X-Request-Id", exchange.request_id);
    if exchange.close || framing.body == Body::UntilClose || !exchange.http11_client {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Head::Final(FinalHead {
        len,
        status,
        body: framing.body,
        reusable: framing.reusable,
    })))
}

/// [`response_head`] for the fuzz targets: true when the head was complete and usable.
pub(crate) fn head_for_fuzzing(buf: &[u8], http11_client: bool, out: &mut Vec<u8>) -> bool {
    let exchange = Exchange {
        head_request: false,
        read_timeout: Duration::from_secs(1),
        send_timeout: Duration::from_secs(1),
        close: false,
        http11_client,
        request_id: b"fuzz",
        websocket_key: Some(b"dGhlIHNhbXBsZSBub25jZQ=="),
        control: None,
        keep: None,
    };
    matches!(response_head(buf, &exchange, out), Ok(Some(_)))
}

fn write_status_line(out: &mut Vec<u8>, status: u16, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(http11_client: bool, websocket_key: Option<&'static [u8]>) -> Exchange<'static> {
        Exchange {
            head_request: false,
            read_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
            close: false,
            http11_client,
            request_id: b"rid",
            websocket_key,
            control: None,
            keep: None,
        }
    }

    fn head(raw: &str, ex: &Exchange<'_>) -> (Result<Option<Head>, ()>, String) {
        let mut out = Vec::new();
        let head = response_head(raw.as_bytes(), ex, &mut out);
        (head, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_heads_are_edited_for_the_client() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
                   X-Request-Id: theirs\r\nContent-Length: 2\r\n\r\nok";
        let (parsed, out) = head(raw, &exchange(true, None));
        let Ok(Some(Head::Final(h))) = parsed else {
            panic!("a final head")
        };
        assert_eq!((h.status, h.body, h.reusable), (200, Body::Length(2), true));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: rid\r\n\r\n"
        );
    }

    #[test]
    fn broken_and_unasked_for_responses_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(head(raw, &exchange(true, None)).0.is_err(), "{raw}");
        }
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(
            head(chunked, &exchange(false, None)).0.is_err(),
            "chunked to HTTP/1.0"
        );
    }

    #[test]
    fn a_101_must_complete_the_websocket_handshake() {
        let key: &'static [u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
        let good =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let (parsed, out) = head(good, &exchange(true, Some(key)));
        assert!(matches!(parsed, Ok(Some(Head::Switched(_)))));
        assert!(
            out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        let wrong = good.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "d3Jvbmc=");
        assert!(head(&wrong, &exchange(true, Some(key))).0.is_err());
    }

    #[test]
    fn interim_responses_reach_http_1_1_clients_only() {
        let raw = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        let (parsed, out) = head(raw, &exchange(true, None));
        assert!(matches!(parsed, Ok(Some(Head::Interim(_)))));
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
        let (_, out) = head(raw, &exchange(false, None));
        assert_eq!(out, "");
    }
}
