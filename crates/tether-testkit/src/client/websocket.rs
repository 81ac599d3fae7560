//! WebSocket client connections with extra request headers (cookies, keys, Host).

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::HTTP_TIMEOUT;
use crate::error::{Result, TestkitError};

/// A client-side WebSocket, as returned by [`ws_connect`].
pub type WsClient = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens `ws://...` with extra request headers; returns the socket and the 101's headers.
/// A non-101 answer is [`TestkitError::UpgradeRejected`] with its status and body.
pub async fn ws_connect(url: &str, headers: &[(&str, &str)]) -> Result<(WsClient, HeaderMap)> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(http::Error::from)?;
        let value = HeaderValue::from_str(value).map_err(http::Error::from)?;
        // `insert` so a caller's Host replaces the one derived from the URL.
        request.headers_mut().insert(name, value);
    }
    let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
    let (socket, response) =
        tokio::time::timeout(HTTP_TIMEOUT, connect)
            .await
            .map_err(|_| TestkitError::Timeout {
                after: HTTP_TIMEOUT,
                during: "opening a WebSocket",
            })??;
    Ok((socket, response.into_parts().0.headers))
}
