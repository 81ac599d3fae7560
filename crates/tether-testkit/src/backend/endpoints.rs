//! Request dispatch for [`TestBackend`](super::TestBackend): which endpoint, and the plain ones.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::{sse, websocket, Shared};

/// The response body every endpoint returns.
pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    WebSocket,
    Health,
    Sse,
    Poll,
    Slow,
    Echo,
}

/// Answers one request and stamps `x-backend` on whatever comes back.
pub(super) async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut seen) = shared.seen_targets.lock() {
        seen.push(
            req.uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_string(), |p| p.to_string()),
        );
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let mut response = match classify(&req) {
        Endpoint::WebSocket => websocket::accept(req, Arc::clone(&shared)),
        Endpoint::Health => health(&shared),
        Endpoint::Sse => sse::respond(&query, Arc::clone(&shared)),
        Endpoint::Poll => {
            let waited_ms = query_u64(&query, "wait_ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(waited_ms)).await;
            json_response(&json!({"backend": shared.name, "waited_ms": waited_ms}))
        }
        Endpoint::Slow => {
            let ms = query_u64(&query, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(req, &shared).await
        }
        Endpoint::Echo => echo(req, &shared).await,
    };
    response
        .headers_mut()
        .insert("x-backend", shared.name_header.clone());
    Ok(response)
}

fn classify<B>(req: &Request<B>) -> Endpoint {
    if is_websocket_upgrade(req.headers()) {
        return Endpoint::WebSocket;
    }
    let last_segment = req.uri().path().rsplit('/').next().unwrap_or("");
    let query = req.uri().query().unwrap_or("");
    let flagged = |name: &str| query_param(query, name) == Some("1");
    match last_segment {
        "healthz" => Endpoint::Health,
        "sse" => Endpoint::Sse,
        "poll" => Endpoint::Poll,
        "slow" => Endpoint::Slow,
        _ if flagged("sse") => Endpoint::Sse,
        _ if flagged("poll") => Endpoint::Poll,
        _ if flagged("slow") => Endpoint::Slow,
        _ => Endpoint::Echo,
    }
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
}

fn health(shared: &Shared) -> Response<Body> {
    shared.health_checks.fetch_add(1, Ordering::SeqCst);
    if shared.healthy.load(Ordering::SeqCst) {
        text_response(StatusCode::OK, "ok")
    } else {
        text_response(StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    }
}

/// The default answer: what the backend saw, so tests can check routing and forwarded headers.
async fn echo(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.to_string());
    let body = match body.collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(_) => return text_response(StatusCode::BAD_REQUEST, "unreadable body"),
    };
    json_response(&json!({
        "backend": shared.name,
        "method": parts.method.as_str(),
        "path": path,
        "headers": headers_json(&parts.headers),
        "body": body,
    }))
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut map = Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), Value::String(joined));
    }
    Value::Object(map)
}

pub(super) fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub(super) fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full_body(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

fn json_response(value: &Value) -> Response<Body> {
    let mut response = Response::new(full_body(value.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The first value of `name` in a raw query string (no percent-decoding: values are numbers).
pub(super) fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

pub(super) fn query_u64(query: &str, name: &str) -> Option<u64> {
    query_param(query, name).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint_of(uri: &str) -> Endpoint {
        classify(&Request::get(uri).body(()).unwrap())
    }

    #[test]
    fn the_last_path_segment_picks_the_endpoint_wherever_the_key_sits() {
        assert_eq!(endpoint_of("/docs/abc/sse"), Endpoint::Sse);
        assert_eq!(endpoint_of("/docs/abc/poll?wait_ms=5"), Endpoint::Poll);
        assert_eq!(endpoint_of("/x/slow?ms=5"), Endpoint::Slow);
        assert_eq!(endpoint_of("/healthz"), Endpoint::Health);
        assert_eq!(endpoint_of("/docs/sse/abc"), Endpoint::Echo);
    }

    #[test]
    fn a_query_flag_picks_the_endpoint_when_the_path_is_taken() {
        assert_eq!(endpoint_of("/docs/abc?sse=1&count=2"), Endpoint::Sse);
        assert_eq!(endpoint_of("/docs/abc?doc=1&poll=1"), Endpoint::Poll);
        assert_eq!(endpoint_of("/docs/abc?sse=0"), Endpoint::Echo);
    }

    #[test]
    fn an_upgrade_header_wins_over_the_path() {
        let req = Request::get("/docs/abc/sse")
            .header("upgrade", "WebSocket")
            .body(())
            .unwrap();
        assert_eq!(classify(&req), Endpoint::WebSocket);
    }

    #[test]
    fn query_param_takes_the_first_exact_key() {
        assert_eq!(query_param("count=3&count=4", "count"), Some("3"));
        assert_eq!(query_param("xcount=3", "count"), None);
        assert_eq!(query_u64("hold=1&ms=250", "ms"), Some(250));
    }
}
