//! Request dispatch: which URL is which page or transport, and the small HTTP helpers they share.
//!
//! Every URL also works under `/unpinned` (the demo's round-robin route), so a page can build
//! its transport URLs relative to where it was loaded from.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::docs::valid_id;
use crate::document::{Document, SubmitError};
use crate::ot::TextOperation;
use crate::server::Shared;
use crate::{assets, long_poll, sse, websocket};

/// Response bodies: whole or streamed.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The largest edit accepted, in bytes of JSON.
const MAX_EDIT_BYTES: usize = 1 << 20;

/// What a transport request says about its client, from the query string.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientQuery {
    /// The page's client id.
    pub client: String,
    /// The last revision the client has, if it has one from *this* server.
    pub since: Option<u64>,
    /// The viewer count the client shows (long-poll).
    pub viewers: Option<usize>,
    /// Long-poll: answer at once with a `hello`.
    pub hello: bool,
}

/// Serves one request; every response names the server in `x-app-server`.
pub(crate) async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let mut response = route(req, &shared).await;
    response
        .headers_mut()
        .insert("x-app-server", shared.name_header.clone());
    Ok(response)
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let local = match path.strip_prefix("/unpinned") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => path.as_str(),
    };
    let segments: Vec<&str> = local.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    match segments.as_slice() {
        [] if get => html(assets::INDEX.to_owned()),
        ["healthz"] if get => text(StatusCode::OK, "ok"),
        ["assets", name] if get => match assets::get(name) {
            Some((body, content_type)) => asset(body, content_type),
            None => not_found(),
        },
        ["docs", id] if get => match valid_id(id) {
            true => html(
                assets::DOC
                    .replace("{{server}}", &shared.name)
                    .replace("{{doc}}", id),
            ),
            false => BAD_DOC_ID.response(),
        },
        ["docs", id, "state"] if get => match open(shared, id) {
            Ok(doc) => {
                let (text, rev) = doc.snapshot();
                let viewers = doc.viewers();
                let body = json!({
                    "server": shared.name,
                    "address": shared.addr.to_string(),
                    "rev": rev,
                    "text": text,
                    "viewers": viewers,
                });
                json_response(StatusCode::OK, &body)
            }
            Err(refused) => refused.response(),
        },
        ["docs", id, "ws"] if method == Method::GET => match doc_and_client(shared, id, &req) {
            Ok((doc, q)) => websocket::accept(req, doc, Arc::clone(shared), q),
            Err(refused) => refused.response(),
        },
        ["docs", id, "events"] if method == Method::GET => match doc_and_client(shared, id, &req) {
            Ok((doc, q)) => sse::respond(doc, Arc::clone(shared), q),
            Err(refused) => refused.response(),
        },
        ["docs", id, "ops"] if method == Method::POST => match doc_and_client(shared, id, &req) {
            Ok((doc, q)) => post_edit(req, &doc, &q.client).await,
            Err(refused) => refused.response(),
        },
        ["poll", "docs", id] if method == Method::GET => match doc_and_client(shared, id, &req) {
            Ok((doc, q)) => long_poll::respond(doc, Arc::clone(shared), q).await,
            Err(refused) => refused.response(),
        },
        _ => not_found(),
    }
}

/// Why a request is answered with an error instead.
#[derive(Debug)]
struct Refused(StatusCode, &'static str);

impl Refused {
    fn response(self) -> Response<Body> {
        text(self.0, self.1)
    }
}

const BAD_DOC_ID: Refused = Refused(
    StatusCode::BAD_REQUEST,
    "a document id is 1 to 64 of A-Z a-z 0-9 - _",
);

fn open(shared: &Shared, id: &str) -> Result<Arc<Document>, Refused> {
    if !valid_id(id) {
        return Err(BAD_DOC_ID);
    }
    shared.docs.open(id).ok_or(Refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "this server holds too many documents",
    ))
}

fn doc_and_client(
    shared: &Shared,
    id: &str,
    req: &Request<Incoming>,
) -> Result<(Arc<Document>, ClientQuery), Refused> {
    let q = client(req, shared)?;
    Ok((open(shared, id)?, q))
}

/// Reads `client`, `since`, `server`, `viewers` and `hello` from the query. `since` only counts
/// when `server` is this server: revisions of another server's copy mean nothing here.
fn client(req: &Request<Incoming>, shared: &Shared) -> Result<ClientQuery, Refused> {
    let mut q = ClientQuery::default();
    let mut since = None;
    let mut from_here = false;
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "client" => q.client = value.to_owned(),
            "since" => since = value.parse().ok(),
            "server" => from_here = value == shared.name,
            "viewers" => q.viewers = value.parse().ok(),
            "hello" => q.hello = value == "1",
            _ => {}
        }
    }
    if !valid_id(&q.client) {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            "`client` must be 1 to 64 of A-Z a-z 0-9 - _",
        ));
    }
    q.since = since.filter(|_| from_here);
    Ok(q)
}

/// Applies an edit `{"rev": N, "seq": N, "op": [...]}` from `client` (with `"seed": true`:
/// only if the document is new here, see [`Document::submit_seed`]); returns its revision.
pub(crate) fn submit_edit(doc: &Document, client: &str, body: &[u8]) -> Result<u64, String> {
    let edit: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let (Some(rev), Some(seq)) = (edit["rev"].as_u64(), edit["seq"].as_u64()) else {
        return Err("an edit needs numbers `rev` and `seq`".to_owned());
    };
    let op = TextOperation::from_json(&edit["op"]).map_err(|e| e.to_string())?;
    let applied = match edit["seed"].as_bool() {
        Some(true) if rev == 0 => doc.submit_seed(client, seq, op),
        _ => doc.submit(client, seq, rev, op),
    };
    applied.map_err(|e: SubmitError| e.to_string())
}

/// `POST .../ops`: the edit goes out to every viewer, its author included (that is its ack).
async fn post_edit(req: Request<Incoming>, doc: &Document, client: &str) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_EDIT_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "edit too large"),
    };
    match submit_edit(doc, client, &body) {
        Ok(rev) => json_response(StatusCode::OK, &json!({ "rev": rev })),
        Err(error) => json_response(StatusCode::CONFLICT, &json!({ "error": error })),
    }
}

/// A whole body.
pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn with_type(status: StatusCode, body: Body, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    with_type(status, full(body), "text/plain; charset=utf-8")
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    with_type(status, full(body.to_string()), "application/json")
}

fn html(body: String) -> Response<Body> {
    with_type(StatusCode::OK, full(body), "text/html; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    with_type(StatusCode::OK, full(body), content_type)
}

pub(crate) fn bad_request(why: &'static str) -> Response<Body> {
    text(StatusCode::BAD_REQUEST, why)
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found")
}
