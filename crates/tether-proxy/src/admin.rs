//! The admin listener: `GET /healthz` and `GET /metrics` (Prometheus text format).

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

/// The admin HTTP application.
pub struct AdminApp;

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    resp
}

fn metrics_text() -> Response<Vec<u8>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&prometheus::gather(), &mut body) {
        Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("metrics encoding failed: {e}\n").into_bytes(),
        ),
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.as_str();
        match (method, req.uri.path()) {
            ("GET" | "HEAD", "/healthz") => reply(
                StatusCode::OK,
                "application/json",
                b"{\"status\":\"ok\"}\n".to_vec(),
            ),
            ("GET" | "HEAD", "/metrics") => metrics_text(),
            (_, "/healthz" | "/metrics") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                b"{\"error\":\"method not allowed\"}\n".to_vec(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                b"{\"error\":\"not found\"}\n".to_vec(),
            ),
        }
    }
}
