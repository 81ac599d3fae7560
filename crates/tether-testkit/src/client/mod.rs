//! Clients for driving the proxy (or a backend) from a test: one fresh connection per call,
//! so every call is a new downstream connection and nothing is pooled behind the test's back.

mod http;
mod raw;
mod sse;
mod tls;
mod websocket;

pub use self::http::{http_get, http_request, HttpResponse, HTTP_TIMEOUT};
pub use self::raw::{raw_request, raw_request_within, raw_status};
pub use self::sse::{sse_connect, sse_events, SseEvent, SseStream};
pub use self::tls::{https_requests, tls_connect, wss_connect, Alpn, TlsConnection, WssClient};
pub use self::websocket::{ws_connect, WsClient};

use ::http::{Request, Response, Uri};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::error::{Result, TestkitError};

/// Aborts the connection task when the response (or its stream) is dropped, so dropping a
/// client-side stream closes its TCP connection.
#[derive(Debug)]
struct ConnectionTask(JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Splits an `http://host:port/path?q` URL into the authority to dial and the origin-form target.
fn parse_http_url(url: &str) -> Result<(Uri, String)> {
    let invalid = |reason| TestkitError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URI"))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid("only http:// is supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("no host"))?
        .as_str()
        .to_owned();
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let target: Uri = target.parse().map_err(|_| invalid("bad path"))?;
    Ok((target, authority))
}

/// Sends one request on a new HTTP/1.1 connection to `authority`.
async fn send_on_new_connection(
    authority: &str,
    request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, ConnectionTask)> {
    let dial = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let stream = TcpStream::connect(dial).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let task = ConnectionTask(tokio::spawn(async move {
        // Its error, if any, surfaces through the response or body instead.
        let _ = connection.await;
    }));
    let response = sender.send_request(request).await?;
    Ok((response, task))
}

/// Builds a request with `Host` from the URL unless the caller sets one.
fn build_request(
    method: ::http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(Request<Full<Bytes>>, String)> {
    let (target, authority) = parse_http_url(url)?;
    let mut builder = Request::builder().method(method).uri(target);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        builder = builder.header(::http::header::HOST, authority.as_str());
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok((builder.body(Full::new(body))?, authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_url_splits_into_authority_and_origin_form_target() {
        let (target, authority) = parse_http_url("http://127.0.0.1:8080/docs/a?x=1").unwrap();
        assert_eq!(authority, "127.0.0.1:8080");
        assert_eq!(target.to_string(), "/docs/a?x=1");
        let (target, _) = parse_http_url("http://example.test").unwrap();
        assert_eq!(target.to_string(), "/");
    }

    #[test]
    fn non_http_urls_are_refused() {
        assert!(parse_http_url("https://127.0.0.1/").is_err());
        assert!(parse_http_url("/just/a/path").is_err());
    }

    #[test]
    fn a_caller_host_header_replaces_the_url_authority() {
        let (req, _) = build_request(
            ::http::Method::GET,
            "http://127.0.0.1:1/",
            &[("Host", "docs.example.com")],
            Bytes::new(),
        )
        .unwrap();
        let hosts: Vec<_> = req.headers().get_all("host").iter().collect();
        assert_eq!(hosts, ["docs.example.com"]);
    }
}
