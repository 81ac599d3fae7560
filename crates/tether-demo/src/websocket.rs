//! The WebSocket transport: `hello`, then every change of the document as it happens, on one
//! connection that also carries the client's edits.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use crate::document::Document;
use crate::routes::{bad_request, full, submit_edit, Body, ClientQuery};
use crate::server::Shared;

/// A ping this often keeps idle connections (and the proxy's idle timer) alive.
const PING_EVERY: Duration = Duration::from_secs(30);

/// Answers 101 and serves the document on the upgraded connection.
pub(crate) fn accept(
    mut req: Request<Incoming>,
    doc: Arc<Document>,
    shared: Arc<Shared>,
    query: ClientQuery,
) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return bad_request("a WebSocket upgrade needs sec-websocket-key");
    };
    let accept_key = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    let task_shared = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tokio::select! {
            _ = task_shared.shutdown.cancelled() => {}
            _ = serve(ws, doc, &task_shared, query) => {}
        }
    });
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

async fn serve<S>(mut ws: WebSocketStream<S>, doc: Arc<Document>, shared: &Shared, q: ClientQuery)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _joined = doc.join(&q.client);
    let mut changes = doc.subscribe();
    let (hello, mut cursor) = doc.hello(&shared.name, q.since);
    if send(&mut ws, &hello).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(edit))) => {
                    if let Err(error) = submit_edit(&doc, &q.client, edit.as_bytes()) {
                        // The client starts over from a fresh copy after this.
                        let _ = send(&mut ws, &json!({"type": "error", "message": error})).await;
                        let _ = ws.close(None).await;
                        return;
                    }
                }
                // Push the queued pong out now rather than with the next write.
                Some(Ok(Message::Ping(_))) => {
                    if ws.flush().await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                changes.borrow_and_update();
                for message in doc.pending(&shared.name, &mut cursor) {
                    if send(&mut ws, &message).await.is_err() {
                        return;
                    }
                }
            }
            _ = ping.tick() => {
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn send<S>(ws: &mut WebSocketStream<S>, message: &Value) -> Result<(), ()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(message.to_string()))
        .await
        .map_err(|_| ())
}
