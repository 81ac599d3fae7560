//! Clients for TLS listeners: HTTP/1.1 or HTTP/2 (chosen by ALPN) and WebSocket over TLS,
//! trusting only the certificate authority the test made.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

use super::http::collect;
use super::{ConnectionTask, HttpResponse, HTTP_TIMEOUT};
use crate::error::{Result, TestkitError};

/// A client-side WebSocket over TLS, as returned by [`wss_connect`].
pub type WssClient = WebSocketStream<TlsStream<TcpStream>>;

/// Which protocol the client offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `http/1.1` only.
    Http1,
    /// `h2` only.
    H2,
}

/// A TLS session to a listener: what was negotiated and which certificate was served.
#[derive(Debug)]
pub struct TlsConnection {
    /// The TLS stream.
    pub stream: TlsStream<TcpStream>,
    /// The ALPN protocol the server chose, if any.
    pub alpn: Option<Vec<u8>>,
    /// The leaf certificate the server presented (DER).
    pub leaf: Option<Vec<u8>>,
}

fn io_error(e: impl std::fmt::Display) -> TestkitError {
    TestkitError::Io(std::io::Error::other(e.to_string()))
}

/// Opens TLS to `addr` for `server_name`, trusting only `ca` (DER) and offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca: &[u8],
    alpn: Alpn,
) -> Result<TlsConnection> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.to_vec()))
        .map_err(io_error)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![match alpn {
        Alpn::Http1 => b"http/1.1".to_vec(),
        Alpn::H2 => b"h2".to_vec(),
    }];
    let name = ServerName::try_from(server_name.to_owned()).map_err(io_error)?;
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    };
    let stream = tokio::time::timeout(HTTP_TIMEOUT, connect)
        .await
        .map_err(|_| TestkitError::Timeout {
            after: HTTP_TIMEOUT,
            during: "a TLS handshake",
        })??;
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.as_ref().to_vec());
    Ok(TlsConnection { stream, alpn, leaf })
}

/// One request for [`https_requests`]: method, origin-form path and extra headers.
pub type HttpsRequest<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>);

/// Sends requests on one TLS connection with the negotiated protocol (HTTP/1.1 or HTTP/2);
/// HTTP/2 requests go out as concurrent streams on the same connection.
pub async fn https_requests(
    connection: TlsConnection,
    authority: &str,
    requests: &[HttpsRequest<'_>],
) -> Result<Vec<HttpResponse>> {
    let h2 = connection.alpn.as_deref() == Some(b"h2");
    let io = TokioIo::new(connection.stream);
    let exchange = async {
        let build = |(method, path, headers): &HttpsRequest<'_>| {
            let mut builder = Request::builder().method(method.clone());
            builder = if h2 {
                builder.uri(format!("https://{authority}{path}"))
            } else {
                builder.uri(*path).header(http::header::HOST, authority)
            };
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            builder.body(Full::new(Bytes::new()))
        };
        let mut out = Vec::new();
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            let _task = ConnectionTask(tokio::spawn(async move {
                let _ = conn.await;
            }));
            let mut pending = Vec::new();
            for request in requests {
                let mut sender = sender.clone();
                let request = build(request)?;
                pending.push(tokio::spawn(
                    async move { sender.send_request(request).await },
                ));
            }
            for task in pending {
                let response = task.await.map_err(io_error)??;
                out.push(collect(response).await?);
            }
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            let _task = ConnectionTask(tokio::spawn(async move {
                let _ = conn.await;
            }));
            for request in requests {
                sender.ready().await?;
                let response = sender.send_request(build(request)?).await?;
                out.push(collect(response).await?);
            }
        }
        Ok(out)
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| TestkitError::Timeout {
            after: HTTP_TIMEOUT,
            during: "HTTPS requests",
        })?
}

/// Opens a WebSocket (`GET path`, HTTP/1.1 by ALPN) over a TLS connection.
pub async fn wss_connect(
    connection: TlsConnection,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(WssClient, HeaderMap)> {
    let mut request = format!("wss://{authority}{path}").into_client_request()?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(http::Error::from)?;
        let value = HeaderValue::from_str(value).map_err(http::Error::from)?;
        request.headers_mut().insert(name, value);
    }
    let handshake = tokio_tungstenite::client_async(request, connection.stream);
    let (socket, response) = tokio::time::timeout(HTTP_TIMEOUT, handshake)
        .await
        .map_err(|_| TestkitError::Timeout {
            after: HTTP_TIMEOUT,
            during: "opening a WebSocket over TLS",
        })??;
    Ok((socket, response.into_parts().0.headers))
}
