//! Minimal benchmark backend for bench/run.sh (started from the shared kit's backend).
//!
//! Usage: bench-backend <port> <name> [worker_threads]
//!
//! * `GET /ws/...` with `Upgrade: websocket` -> WebSocket echo server.
//! * `POST /ws-close-all` (sent to the backend directly, not through a proxy) -> every open
//!   WebSocket whose path starts with `/ws/storm` is closed with close code 1012 (service
//!   restart), as a backend being restarted would; answers 200 with `x-closed: <sockets told>`.
//!   Only `/ws/storm` sockets watch for it, so the other echo sockets' loop is unchanged.
//! * `GET /sse/...` -> text/event-stream: a few events, then the stream stays
//!   open (a comment line every 15 s) until the client goes away. Each stream is registered
//!   under its `x-doc-id` (the empty id when none) for `/publish/`.
//! * `POST /publish/...` with `x-doc-id: D` -> the request body, read to its end, is sent as one
//!   SSE event (`data: <body>\n\n`, one `data:` line per body line) to every open `/sse/` stream
//!   of document D on this backend; answers 200 with `x-delivered: <streams it was queued to>`
//!   (a stream whose queue is full is skipped, not counted; closed streams are pruned).
//! * anything else -> small 200 response, sent after the request body (if any) has been read
//!   to its end and discarded; a request that had a body gets `x-body-bytes: <length read>`.
//!
//! Every HTTP response carries `x-backend: <name>`, echoes `x-doc-id`, and says in
//! `x-forwarding-seen` which of X-Forwarded-For, -Proto, -Host and X-Request-Id the request
//! carried (`for,proto,host,id` when all four): bench/run.sh's `verify` checks that every proxy
//! does the same header work.
//! Listens on 127.0.0.1 only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, Infallible>;

struct Ctx {
    name: HeaderValue,
    body: Bytes,
}

const SSE_EVENTS: usize = 3;
/// Events queued per SSE stream before a publish skips it (a client that does not read).
const SSE_QUEUE: usize = 64;

type Subscribers = HashMap<Bytes, Vec<tokio::sync::mpsc::Sender<Frame<Bytes>>>>;

/// Open `/sse/` streams by document id, for `/publish/`.
static HUB: Mutex<Option<Subscribers>> = Mutex::new(None);

fn subscribe(doc: Bytes, tx: tokio::sync::mpsc::Sender<Frame<Bytes>>) {
    let mut hub = HUB.lock().unwrap();
    let subs = hub.get_or_insert_with(HashMap::new).entry(doc).or_default();
    // Prune here too, so that a document nobody publishes to does not collect dead senders.
    if subs.len() >= 64 && subs.len().is_power_of_two() {
        subs.retain(|s| !s.is_closed());
    }
    subs.push(tx);
}

/// Queue `event` to every open stream of `doc`; the number it was queued to.
fn publish(doc: &[u8], event: Bytes) -> usize {
    let mut hub = HUB.lock().unwrap();
    let Some(subs) = hub.as_mut().and_then(|h| h.get_mut(doc)) else {
        return 0;
    };
    let mut delivered = 0;
    subs.retain(|s| match s.try_send(Frame::data(event.clone())) {
        Ok(()) => {
            delivered += 1;
            true
        }
        Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => true,
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
    });
    delivered
}

/// `/ws-close-all`: bumped once per request; every open `/ws/storm` socket watches it.
fn storm() -> &'static tokio::sync::watch::Sender<u64> {
    static STORM: OnceLock<tokio::sync::watch::Sender<u64>> = OnceLock::new();
    STORM.get_or_init(|| tokio::sync::watch::channel(0).0)
}

/// Open `/ws/storm` sockets (what `/ws-close-all` reports as closed).
static STORM_OPEN: AtomicUsize = AtomicUsize::new(0);

type ServerWs = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The echo loop of a `/ws/storm` socket: as the plain one, until `/ws-close-all`, which closes
/// it with 1012 and waits (bounded) for the client's close reply.
async fn storm_echo(mut ws: ServerWs) {
    let mut rx = storm().subscribe();
    rx.borrow_and_update();
    STORM_OPEN.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    if ws.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = rx.changed() => {
                STORM_OPEN.fetch_sub(1, Ordering::Relaxed);
                let frame = CloseFrame { code: CloseCode::Restart, reason: "".into() };
                let _ = ws.close(Some(frame)).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return;
            }
        }
    }
    STORM_OPEN.fetch_sub(1, Ordering::Relaxed);
}

fn sse_event(body: &[u8]) -> Bytes {
    let mut ev = Vec::with_capacity(body.len() + 16);
    for line in body.split(|b| *b == b'\n') {
        ev.extend_from_slice(b"data: ");
        ev.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        ev.push(b'\n');
    }
    ev.push(b'\n');
    Bytes::from(ev)
}

fn ws_config() -> WebSocketConfig {
    // Small eager read buffer: keeps per-connection memory low so that the
    // backends stay cheap when tens of thousands of idle sockets are held.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

/// The small constant 200 (`ok <name>`) with its content type, length and `x-backend`.
#[inline]
fn ok_response(ctx: &Ctx) -> Response<Body> {
    let mut r = Response::new(full(ctx.body.clone()));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(ctx.body.len()));
    h.insert("x-backend", ctx.name.clone());
    r
}

fn is_ws_upgrade(req: &Request<Incoming>) -> bool {
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.eq_ignore_ascii_case("websocket"))
        .unwrap_or(false);
    let conn = req
        .headers()
        .get(CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        .unwrap_or(false);
    upgrade && conn
}

/// Which forwarding headers a request carried, as a static list (no allocation per request).
fn forwarding_seen(req: &Request<Incoming>) -> &'static str {
    const NAMES: [&str; 4] = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ];
    const LISTS: [&str; 16] = [
        "",
        "for",
        "proto",
        "for,proto",
        "host",
        "for,host",
        "proto,host",
        "for,proto,host",
        "id",
        "for,id",
        "proto,id",
        "for,proto,id",
        "host,id",
        "for,host,id",
        "proto,host,id",
        "for,proto,host,id",
    ];
    let mut bits = 0;
    for (i, n) in NAMES.iter().enumerate() {
        if req.headers().contains_key(*n) {
            bits |= 1 << i;
        }
    }
    LISTS[bits]
}

async fn handle(
    ctx: &'static Ctx,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let doc_id = req.headers().get("x-doc-id").cloned();
    let seen = forwarding_seen(&req);

    if path.starts_with("/ws/") && is_ws_upgrade(&req) {
        let key = match req.headers().get("sec-websocket-key") {
            Some(k) => derive_accept_key(k.as_bytes()),
            None => {
                let mut r = Response::new(full(Bytes::from_static(b"missing key\n")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            }
        };
        let storm_socket = path.starts_with("/ws/storm");
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(_) => return,
            };
            let mut ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(ws_config()),
            )
            .await;
            if storm_socket {
                return storm_echo(ws).await;
            }
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                        if ws.send(m).await.is_err() {
                            break;
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {} // ping/pong: tungstenite answers pings itself
                }
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert("sec-websocket-accept", HeaderValue::from_str(&key).unwrap());
        h.insert("x-backend", ctx.name.clone());
        if let Some(d) = doc_id {
            h.insert("x-doc-id", d);
        }
        return Ok(r);
    }

    if path.starts_with("/sse/") {
        let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(SSE_QUEUE);
        let key = doc_id
            .as_ref()
            .map_or(Bytes::new(), |d| Bytes::copy_from_slice(d.as_bytes()));
        subscribe(key, tx.clone());
        let name = ctx.name.to_str().unwrap_or("?").to_owned();
        tokio::spawn(async move {
            for i in 0..SSE_EVENTS {
                let ev =
                    format!("id: {i}\nevent: tick\ndata: {{\"backend\":\"{name}\",\"n\":{i}}}\n\n");
                if tx.send(Frame::data(Bytes::from(ev))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Stay open; a heartbeat comment lets us notice a departed client.
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                if tx
                    .send(Frame::data(Bytes::from_static(b": hb\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        h.insert("x-backend", ctx.name.clone());
        if let Some(d) = doc_id {
            h.insert("x-doc-id", d);
        }
        return Ok(r);
    }

    if path == "/ws-close-all" && req.method() == hyper::Method::POST {
        let closed = STORM_OPEN.load(Ordering::Relaxed);
        storm().send_modify(|g| *g += 1);
        let mut r = ok_response(ctx);
        let h = r.headers_mut();
        h.insert("x-closed", HeaderValue::from(closed));
        return Ok(r);
    }

    if path.starts_with("/publish/") && req.method() == hyper::Method::POST {
        let mut body = Vec::new();
        let b = req.body_mut();
        while let Some(frame) = b.frame().await {
            match frame {
                Ok(f) => body.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
                Err(_) => break,
            }
        }
        let doc = doc_id.as_ref().map_or(&[][..], |d| d.as_bytes());
        let delivered = publish(doc, sse_event(&body));
        let mut r = ok_response(ctx);
        let h = r.headers_mut();
        h.insert("x-delivered", HeaderValue::from(delivered));
        if let Some(d) = doc_id {
            h.insert("x-doc-id", d);
        }
        return Ok(r);
    }

    // Default: read the request body to its end (a POST's), discarding it, then a small,
    // constant 200 response: a backend that consumes what it is sent, so every proxy has
    // streamed the whole body before the response starts.
    let mut body_bytes = 0usize;
    let body = req.body_mut();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break, // the client went away; hyper ends the connection
        }
    }
    let mut r = ok_response(ctx);
    let h = r.headers_mut();
    if let Some(d) = doc_id {
        h.insert("x-doc-id", d);
    }
    if body_bytes > 0 {
        h.insert("x-body-bytes", HeaderValue::from(body_bytes));
    }
    h.insert("x-forwarding-seen", HeaderValue::from_static(seen));
    Ok(r)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {} <port> <name> [worker_threads]", args[0]);
        std::process::exit(2);
    }
    let port: u16 = args[1].parse().expect("port");
    let name = args[2].clone();
    let threads: usize = args
        .get(3)
        .map(|s| s.parse().expect("threads"))
        .unwrap_or(1);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");

    let ctx: &'static Ctx = Box::leak(Box::new(Ctx {
        name: HeaderValue::from_str(&name).expect("name must be a valid header value"),
        body: Bytes::from(format!("ok {name}\n")),
    }));

    rt.block_on(async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(addr).await.expect("bind");
        eprintln!("backend {name} listening on {addr} ({threads} worker threads)");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // e.g. EMFILE: back off briefly instead of spinning.
                    eprintln!("accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(ctx, req));
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
}
