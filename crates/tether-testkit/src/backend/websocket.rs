//! WebSocket upgrades: the 101 handshake and the echo loop behind it.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::endpoints::{full_body, text_response, Body};
use super::{OpenGuard, Shared};

/// Answers 101 and starts echoing once hyper hands over the connection.
pub(super) fn accept(mut req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text_response(StatusCode::BAD_REQUEST, "missing sec-websocket-key");
    };
    let accept_key = derive_accept_key(key.as_bytes());
    // A client that offers subprotocols fails the handshake unless one is chosen.
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|p| HeaderValue::from_str(p.trim()).ok());

    let upgrade = hyper::upgrade::on(&mut req);
    let task_state = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let _open = OpenGuard::new(Arc::clone(&task_state), |s| &s.open_websockets);
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Dropping the socket on shutdown is the "killed backend" the tests want.
        tokio::select! {
            _ = task_state.shutdown.cancelled() => {}
            _ = echo(ws) => {}
        }
    });

    let mut response = Response::new(full_body(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// Echoes text and binary messages in order. Pings are answered and a close is echoed by
/// tungstenite itself while the stream is being read.
async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = ws.next().await {
        let sent = match message {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => ws.send(message).await,
            // Push the queued pong out now rather than with the next read.
            Ok(Message::Ping(_)) => ws.flush().await,
            Ok(_) => Ok(()),
            Err(_) => return,
        };
        if sent.is_err() {
            return;
        }
    }
}
