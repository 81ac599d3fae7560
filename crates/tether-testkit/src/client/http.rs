//! Plain HTTP requests: send, read the whole body, hand back status, headers and body.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use super::{build_request, send_on_new_connection};
use crate::error::{Result, TestkitError};

/// How long [`http_get`] and [`http_request`] wait for the whole response.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The first value of a header, if it is present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `GET url` with extra request headers, on a new connection.
pub async fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    http_request(Method::GET, url, headers, Bytes::new()).await
}

/// Any method, with headers and a body, on a new connection; gives up after [`HTTP_TIMEOUT`].
pub async fn http_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<HttpResponse> {
    let (request, authority) = build_request(method, url, headers, body.into())?;
    let exchange = async {
        let (response, _connection) = send_on_new_connection(&authority, request).await?;
        collect(response).await
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| TestkitError::Timeout {
            after: HTTP_TIMEOUT,
            during: "waiting for an HTTP response",
        })?
}

/// Reads a whole response.
pub(super) async fn collect(
    response: http::Response<hyper::body::Incoming>,
) -> Result<HttpResponse> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(HttpResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
