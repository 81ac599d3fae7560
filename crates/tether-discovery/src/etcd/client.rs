//! A small client for etcd's v3 API through its JSON gateway (`POST /v3/...` on the client
//! port), enough for membership: range, watch, put, and leases.
//!
//! Why the gateway and not gRPC: it is served on the same client port by every etcd v3.4+
//! (Debian bookworm ships 3.4.23), it needs only an HTTP/1.1 client that Tether's dependency
//! tree already has, and no `protoc` at build time. Keys and values travel base64-encoded and
//! 64-bit integers as strings; a watch is one long POST whose response streams one JSON object
//! per line. Unary requests reuse idle keep-alive connections (a fleet placing new documents
//! makes one transaction per document, which one connection each would turn into a socket in
//! TIME_WAIT per document); a watch has a connection of its own. A connection that failed is
//! never put back, so a dead one does not poison later requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::DiscoveryError;

/// Time to open a TCP connection to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for a whole unary request (not a watch).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response body read, and largest watch line buffered.
const MAX_BODY: usize = 64 << 20;

/// An etcd v3 client over the JSON gateway, trying its endpoints in turn.
#[derive(Debug)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    /// The endpoint that answered last; tried first next time.
    current: AtomicUsize,
    /// Idle keep-alive connections for unary requests: (endpoint index, sender).
    idle: std::sync::Mutex<Vec<(usize, Sender)>>,
}

/// The sending half of one HTTP/1.1 connection to an endpoint.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Most idle connections kept (per client).
const MAX_IDLE: usize = 16;

/// One key-value pair from a range or a watch event (key and value decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for deletions).
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
}

/// The result of a range read: the pairs and the store revision it reflects.
#[derive(Debug, Clone)]
pub struct Range {
    /// Pairs in key order.
    pub kvs: Vec<KeyValue>,
    /// The revision of the store when read; a watch from `revision + 1` misses nothing.
    pub revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was created or changed.
    Put(KeyValue),
    /// The key was deleted (or its lease expired or was revoked).
    Delete(KeyValue),
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) | Event::Delete(kv) => kv.mod_revision,
        }
    }
}

/// An open watch: call [`WatchStream::next`] for each batch of events.
pub struct WatchStream {
    body: Incoming,
    buffer: BytesMut,
    endpoint: String,
}

/// etcd's int64s are JSON strings in the gateway; accept numbers too.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
}

#[derive(Deserialize)]
struct TxnReply {
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<TxnResponse>,
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(default)]
    response_range: Option<RangeReply>,
}

#[derive(Deserialize)]
struct RangeReply {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<RawKv>,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(default, rename = "type")]
    kind: String,
    kv: RawKv,
}

#[derive(Deserialize, Default)]
struct WatchResult {
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
struct WatchEnvelope {
    #[serde(default)]
    result: Option<WatchResult>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct GrantReply {
    #[serde(rename = "ID", deserialize_with = "int64")]
    id: i64,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize, Default)]
struct KeepAliveResult {
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    ttl: i64,
}

#[derive(Deserialize)]
struct KeepAliveEnvelope {
    #[serde(default)]
    result: Option<KeepAliveResult>,
    #[serde(default)]
    error: Option<Value>,
}

fn decode_kv(raw: RawKv, endpoint: &str) -> Result<KeyValue, DiscoveryError> {
    let decode = |text: &str| {
        B64.decode(text).map_err(|e| DiscoveryError::Decode {
            endpoint: endpoint.to_string(),
            reason: format!("bad base64: {e}"),
        })
    };
    Ok(KeyValue {
        key: decode(&raw.key)?,
        value: decode(&raw.value)?,
        mod_revision: raw.mod_revision,
    })
}

fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    endpoint: &str,
) -> Result<T, DiscoveryError> {
    serde_json::from_slice(bytes).map_err(|e| DiscoveryError::Decode {
        endpoint: endpoint.to_string(),
        reason: format!(
            "{e}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ),
    })
}

impl EtcdClient {
    /// A client for `endpoints` (`host:port`, plain HTTP). At least one is needed to do anything.
    pub fn new(endpoints: Vec<String>) -> EtcdClient {
        EtcdClient {
            endpoints,
            current: AtomicUsize::new(0),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The endpoints, starting with the one that answered last.
    fn rotation(&self) -> impl Iterator<Item = (usize, &str)> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        (0..n).map(move |i| {
            let at = (start + i) % n.max(1);
            (at, self.endpoints[at].as_str())
        })
    }

    /// Sends `body` to `path` on each endpoint in turn until one answers; the last error
    /// otherwise. Only failures to reach an endpoint move on to the next one: an endpoint that
    /// answered with an error speaks for the cluster.
    async fn post_any(&self, path: &str, body: &Value) -> Result<(Bytes, String), DiscoveryError> {
        let mut last = DiscoveryError::Connect {
            endpoint: "(none)".to_string(),
            reason: "no etcd endpoints configured".to_string(),
        };
        for (at, endpoint) in self.rotation() {
            let attempt = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut sender = match self.take_idle(at) {
                    Some(sender) => sender,
                    None => connect(endpoint).await?,
                };
                let response = send(&mut sender, endpoint, path, body).await?;
                let bytes = read_all(response, endpoint).await?;
                self.put_idle(at, sender);
                Ok(bytes)
            })
            .await
            .unwrap_or_else(|_| {
                Err(DiscoveryError::Timeout {
                    endpoint: endpoint.to_string(),
                    after: REQUEST_TIMEOUT,
                })
            });
            match attempt {
                Ok(bytes) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok((bytes, endpoint.to_string()));
                }
                Err(e @ DiscoveryError::Status { .. }) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// An idle connection to endpoint `at` that can take a request, if one is kept.
    fn take_idle(&self, at: usize) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.iter().position(|(e, _)| *e == at) {
            let (_, sender) = idle.swap_remove(i);
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose response was read to the end for the next request.
    fn put_idle(&self, at: usize, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push((at, sender));
        }
    }

    /// Every key starting with `prefix`, and the revision of the read.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<Range, DiscoveryError> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(super::prefix_range_end(prefix)),
        });
        let (bytes, endpoint) = self.post_any("/v3/kv/range", &body).await?;
        let reply: RangeReply = parse(&bytes, &endpoint)?;
        let kvs = reply
            .kvs
            .into_iter()
            .map(|kv| decode_kv(kv, &endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Range {
            kvs,
            revision: reply.header.revision,
        })
    }

    /// A cheap linearizable read (count only) that shows the cluster answers; returns the
    /// store revision.
    pub async fn probe(&self, prefix: &[u8]) -> Result<i64, DiscoveryError> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(super::prefix_range_end(prefix)),
            "count_only": true,
        });
        let (bytes, endpoint) = self.post_any("/v3/kv/range", &body).await?;
        let reply: RangeReply = parse(&bytes, &endpoint)?;
        Ok(reply.header.revision)
    }

    /// Watches every key starting with `prefix` from `start_revision` on. Returns once etcd
    /// confirmed the watch; a compacted `start_revision` is [`DiscoveryError::Compacted`].
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<WatchStream, DiscoveryError> {
        let body = json!({
            "create_request": {
                "key": B64.encode(prefix),
                "range_end": B64.encode(super::prefix_range_end(prefix)),
                "start_revision": start_revision.to_string(),
            }
        });
        let mut last = DiscoveryError::Connect {
            endpoint: "(none)".to_string(),
            reason: "no etcd endpoints configured".to_string(),
        };
        for (at, endpoint) in self.rotation() {
            let opened = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let response = open(endpoint, "/v3/watch", &body).await?;
                let mut stream = WatchStream {
                    body: response.into_body(),
                    buffer: BytesMut::new(),
                    endpoint: endpoint.to_string(),
                };
                // The first message confirms the watch (or says why not).
                match stream.next_result().await? {
                    Some(result) if result.created && !result.canceled => Ok(stream),
                    Some(result) => Err(cancel_error(result, start_revision, endpoint)),
                    None => Err(DiscoveryError::Http {
                        endpoint: endpoint.to_string(),
                        reason: "watch ended before it was created".to_string(),
                    }),
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err(DiscoveryError::Timeout {
                    endpoint: endpoint.to_string(),
                    after: REQUEST_TIMEOUT,
                })
            });
            match opened {
                Ok(stream) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(stream);
                }
                Err(e @ (DiscoveryError::Compacted { .. } | DiscoveryError::Status { .. })) => {
                    return Err(e)
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may raise it to its minimum).
    pub async fn grant(&self, ttl: Duration) -> Result<i64, DiscoveryError> {
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let (bytes, endpoint) = self
            .post_any("/v3/lease/grant", &json!({ "TTL": seconds.to_string() }))
            .await?;
        let reply: GrantReply = parse(&bytes, &endpoint)?;
        if !reply.error.is_empty() {
            return Err(DiscoveryError::Decode {
                endpoint,
                reason: reply.error,
            });
        }
        Ok(reply.id)
    }

    /// Writes `key` = `value`, bound to `lease` (0 = no lease).
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<(), DiscoveryError> {
        let body = json!({
            "key": B64.encode(key),
            "value": B64.encode(value),
            "lease": lease.to_string(),
        });
        self.post_any("/v3/kv/put", &body).await.map(|_| ())
    }

    /// Writes `key` = `value` bound to `lease` if `key` does not exist (one transaction).
    /// Returns None when it was written, else the value already there.
    pub async fn create_if_absent(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<Option<Vec<u8>>, DiscoveryError> {
        let key = B64.encode(key);
        let body = json!({
            "compare": [{
                "key": key,
                "result": "EQUAL",
                "target": "CREATE",
                "create_revision": "0",
            }],
            "success": [{ "request_put": {
                "key": key,
                "value": B64.encode(value),
                "lease": lease.to_string(),
            }}],
            "failure": [{ "request_range": { "key": key } }],
        });
        let (bytes, endpoint) = self.post_any("/v3/kv/txn", &body).await?;
        let reply: TxnReply = parse(&bytes, &endpoint)?;
        if reply.succeeded {
            return Ok(None);
        }
        let existing = reply
            .responses
            .into_iter()
            .filter_map(|r| r.response_range)
            .flat_map(|r| r.kvs)
            .next();
        match existing {
            Some(kv) => Ok(Some(decode_kv(kv, &endpoint)?.value)),
            // Deleted between the compare and the read: nobody holds it now.
            None => Ok(Some(Vec::new())),
        }
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &[u8]) -> Result<(), DiscoveryError> {
        self.post_any("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))
            .await
            .map(|_| ())
    }

    /// Renews `lease` once; returns the remaining TTL in seconds, or
    /// [`DiscoveryError::LeaseGone`] when it expired or was revoked.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, DiscoveryError> {
        let (bytes, endpoint) = self
            .post_any("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        // A streaming reply: the first line is the answer to our one request.
        let line = bytes.split(|b| *b == b'\n').next().unwrap_or(&[]);
        let reply: KeepAliveEnvelope = parse(line, &endpoint)?;
        if let Some(error) = reply.error {
            return Err(DiscoveryError::Decode {
                endpoint,
                reason: error.to_string(),
            });
        }
        match reply.result.map(|r| r.ttl) {
            Some(ttl) if ttl > 0 => Ok(ttl),
            _ => Err(DiscoveryError::LeaseGone(lease)),
        }
    }

    /// Revokes `lease`, deleting every key bound to it at once. A lease already gone is fine.
    pub async fn revoke(&self, lease: i64) -> Result<(), DiscoveryError> {
        match self
            .post_any("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(DiscoveryError::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn cancel_error(result: WatchResult, requested: i64, endpoint: &str) -> DiscoveryError {
    if result.compact_revision > 0 {
        DiscoveryError::Compacted {
            requested,
            compacted: result.compact_revision,
        }
    } else {
        DiscoveryError::Http {
            endpoint: endpoint.to_string(),
            reason: format!("watch canceled: {}", result.cancel_reason),
        }
    }
}

impl WatchStream {
    /// The next batch of events, `Ok(None)` when etcd ended the watch, or an error (the
    /// connection broke, or etcd canceled the watch because the revision was compacted).
    pub async fn next(&mut self) -> Result<Option<Vec<Event>>, DiscoveryError> {
        loop {
            let Some(result) = self.next_result().await? else {
                return Ok(None);
            };
            if result.canceled {
                return Err(cancel_error(result, 0, &self.endpoint));
            }
            if result.events.is_empty() {
                // Progress notifications and the like: nothing changed.
                continue;
            }
            let mut events = Vec::with_capacity(result.events.len());
            for raw in result.events {
                let kv = decode_kv(raw.kv, &self.endpoint)?;
                events.push(if raw.kind == "DELETE" {
                    Event::Delete(kv)
                } else {
                    Event::Put(kv)
                });
            }
            return Ok(Some(events));
        }
    }

    /// The next JSON line of the stream as a watch result.
    async fn next_result(&mut self) -> Result<Option<WatchResult>, DiscoveryError> {
        loop {
            if let Some(at) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(at + 1);
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let envelope: WatchEnvelope = parse(line, &self.endpoint)?;
                if let Some(error) = envelope.error {
                    return Err(DiscoveryError::Http {
                        endpoint: self.endpoint.clone(),
                        reason: format!("watch error: {error}"),
                    });
                }
                return Ok(Some(envelope.result.unwrap_or_default()));
            }
            if self.buffer.len() > MAX_BODY {
                return Err(DiscoveryError::Decode {
                    endpoint: self.endpoint.clone(),
                    reason: "watch message too large".to_string(),
                });
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(DiscoveryError::Http {
                        endpoint: self.endpoint.clone(),
                        reason: format!("watch stream broke: {e}"),
                    })
                }
                None => {
                    // A last line without its newline still counts.
                    if self.buffer.trim_ascii().is_empty() {
                        return Ok(None);
                    }
                    self.buffer.extend_from_slice(b"\n");
                }
            }
        }
    }
}

/// Connects to `endpoint`, sends `POST path` with the JSON `body`, and returns the response
/// head once it arrived (status checked; the body still streaming).
/// A request on a connection of its own (a watch).
async fn open(
    endpoint: &str,
    path: &str,
    body: &Value,
) -> Result<http::Response<Incoming>, DiscoveryError> {
    let mut sender = connect(endpoint).await?;
    send(&mut sender, endpoint, path, body).await
}

/// A new HTTP/1.1 connection to `endpoint`.
async fn connect(endpoint: &str) -> Result<Sender, DiscoveryError> {
    let connect_error = |reason: String| DiscoveryError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .map_err(|_| connect_error(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| connect_error(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| DiscoveryError::Http {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    // The connection task ends when either side closes or every sender is dropped.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// `POST path` with `body` on `sender`'s connection; an error unless the status is 2xx.
async fn send(
    sender: &mut Sender,
    endpoint: &str,
    path: &str,
    body: &Value,
) -> Result<http::Response<Incoming>, DiscoveryError> {
    let connect_error = |reason: String| DiscoveryError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    let http_error = |e: hyper::Error| DiscoveryError::Http {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    };
    sender.ready().await.map_err(http_error)?;
    let request = http::Request::post(path)
        .header(http::header::HOST, endpoint)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| connect_error(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http_error)?;
    let status = response.status();
    if !status.is_success() {
        let text = read_all(response, endpoint).await.unwrap_or_default();
        return Err(DiscoveryError::Status {
            endpoint: endpoint.to_string(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned(),
        });
    }
    Ok(response)
}

async fn read_all(
    response: http::Response<Incoming>,
    endpoint: &str,
) -> Result<Bytes, DiscoveryError> {
    let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| DiscoveryError::Http {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })
}
