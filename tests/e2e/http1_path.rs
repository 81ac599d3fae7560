//! End-to-end: Tether's HTTP/1 engine (`crates/tether-proxy/src/h1/`) with the real binary and
//! real backends: backend connections are reused, every response framing reaches the client
//! whole, a backend's silent close of an idle connection costs the client nothing, and every
//! kind of request — with a body, chunked, `Expect: 100-continue`, a WebSocket upgrade — is
//! served on one connection by one engine, which treats the same bytes the same way whatever
//! came before them.

use crate::support::{
    assert_arrived_whole, start_faulty, start_read_counting_backend, RawBackend, Stack, STANDARD,
};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a kept-alive connection.
struct Response {
    status: u16,
    /// Header lines, lower-cased names.
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A client connection that reads responses one at a time (Content-Length, chunked, or
/// until close).
struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.expect("connect"),
            pending: Vec::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        let read = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        self.pending.extend_from_slice(&chunk[..read]);
        read > 0
    }

    async fn send(&mut self, request: &str) -> Response {
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("write");
        self.read_response().await
    }

    async fn read_response(&mut self) -> Response {
        let head_end = loop {
            if let Some(at) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(self.fill().await, "closed before a response head");
        };
        let head = String::from_utf8_lossy(&self.pending[..head_end]).into_owned();
        self.pending.drain(..head_end);
        let status: u16 = head[9..12].parse().expect("status");
        let mut response = Response {
            status,
            head,
            body: Vec::new(),
        };
        if status < 200 {
            // An interim response has no body; after a 101 the rest of the connection is the
            // upgraded protocol's.
            return response;
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().expect("length");
            while self.pending.len() < len {
                assert!(self.fill().await, "closed inside a body");
            }
            response.body = self.pending.drain(..len).collect();
        } else if response
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                if let Some(at) = self.pending.windows(5).position(|w| w == b"0\r\n\r\n") {
                    response.body = self.pending.drain(..at + 5).collect();
                    break;
                }
                assert!(self.fill().await, "closed inside a chunked body");
            }
        } else {
            while self.fill().await {}
            response.body = std::mem::take(&mut self.pending);
        }
        response
    }

    /// True once the proxy has closed the connection (reads EOF).
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.pending.is_empty()
    }
}

fn get(path: &str, doc: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: h\r\nX-Doc-Id: {doc}\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_alive_requests_reuse_one_backend_connection_and_get_their_own_responses() {
    let stack = Stack::start(STANDARD).await;
    for round in 0..2 {
        let mut client = Client::connect(stack.proxy).await;
        for i in 0..25 {
            let response = client
                .send(&get(&format!("/h/n?round={round}&i={i}"), "doc-7"))
                .await;
            assert_eq!(response.status, 200);
            let body = String::from_utf8_lossy(&response.body);
            assert!(
                body.contains(&format!("\"path\":\"/h/n?round={round}&i={i}\"")),
                "request {i} got another request's response: {body}"
            );
            assert!(response.header("x-request-id").is_some());
            assert!(body.contains("\"x-forwarded-for\":\"127.0.0.1\""), "{body}");
        }
    }
    // 50 requests from two client connections, one after the other: one backend connection.
    let connections: u64 = stack.backends.iter().map(|b| b.connections()).sum();
    let requests: u64 = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(requests, 50);
    assert_eq!(connections, 1, "backend connections were not reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_response_is_relayed_whole_and_the_connection_goes_on() {
    let stack = Stack::start(STANDARD).await;
    let mut client = Client::connect(stack.proxy).await;
    // Without `Accept: text/event-stream` this is a plain request with a streamed body.
    let streamed = client
        .send(&get("/h/sse?count=3&interval_ms=10", "doc-c"))
        .await;
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.header("transfer-encoding"), Some("chunked"));
    let text = String::from_utf8_lossy(&streamed.body);
    assert_eq!(text.matches("\"seq\":").count(), 3, "{text}");
    let after = client.send(&get("/h/after", "doc-c")).await;
    assert_eq!(after.status, 200);
    assert!(String::from_utf8_lossy(&after.body).contains("/h/after"));
    let connections: u64 = stack.backends.iter().map(|b| b.connections()).sum();
    assert_eq!(
        connections, 1,
        "the connection after a chunked body was not reused"
    );
}

/// A request with a body after two kept-alive requests (by when the engine has taken the
/// socket off Pingora's stream, `h1/client.rs`) is served on the same connection, the client's
/// address still reaches the backend, and the connection goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_a_body_is_served_on_the_same_kept_alive_connection() {
    let stack = Stack::start(STANDARD).await;
    let mut client = Client::connect(stack.proxy).await;
    assert_eq!(client.send(&get("/h/first", "doc-b")).await.status, 200);
    assert_eq!(client.send(&get("/h/second", "doc-b")).await.status, 200);
    let post = client
        .send("POST /h/posted HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-b\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_eq!(post.status, 200);
    let body = String::from_utf8_lossy(&post.body);
    assert!(body.contains("\"body\":\"hello\""), "{body}");
    assert!(body.contains("\"x-forwarded-for\":\"127.0.0.1\""), "{body}");
    let last = client.send(&get("/h/last", "doc-b")).await;
    assert_eq!(last.status, 200);
    assert!(String::from_utf8_lossy(&last.body).contains("/h/last"));
}

/// A WebSocket upgrade on a connection that served plain requests first (its socket already
/// the engine's own) becomes a working tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_upgrade_after_kept_alive_requests_becomes_a_tunnel() {
    let stack = Stack::start(STANDARD).await;
    let mut client = Client::connect(stack.proxy).await;
    for i in 0..3 {
        let response = client.send(&get(&format!("/h/before-{i}"), "doc-w")).await;
        assert_eq!(response.status, 200);
    }
    let upgraded = client
        .send(
            "GET /h/ws HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-w\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await;
    assert_eq!(upgraded.status, 101, "{}", upgraded.head);
    // A masked text frame "ping"; the backend echoes it unmasked.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 4];
    frame.extend_from_slice(&mask);
    frame.extend(b"ping".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    client.stream.write_all(&frame).await.expect("write frame");
    while client.pending.len() < 6 {
        assert!(client.fill().await, "closed before the echo");
    }
    assert_eq!(&client.pending[..6], b"\x81\x04ping");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_closes_kept_connections_costs_the_client_nothing() {
    // Answers one request per connection with a length-delimited response and then closes
    // without saying so, as a backend's idle timeout does: every pooled connection is dead.
    let backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        false,
    )
    .await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    let mut client = Client::connect(proxy).await;
    for _ in 0..10 {
        let response = client.send("GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"ok");
    }
    assert_eq!(backend.accepted(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_delimited_by_close_arrives_whole_and_closes_the_client_connection() {
    let backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec(),
        false,
    )
    .await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    let mut client = Client::connect(proxy).await;
    let response = client.send("GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.body, b"until the end");
    assert!(client.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_fields_are_dropped_both_ways() {
    let backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Request-Id: backend-id\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        true,
    )
    .await;
    let (_tether, proxy) = start_faulty(backend.addr, "").await;
    let mut client = Client::connect(proxy).await;
    let response = client
        .send("GET /x HTTP/1.1\r\nHost: h\r\nKeep-Alive: 300\r\nTE: trailers\r\nX-Forwarded-Proto: https\r\nX-Request-Id: client-id\r\n\r\n")
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-private"), None, "{}", response.head);
    assert_eq!(response.header("keep-alive"), None);
    assert_eq!(response.header("connection"), None);
    // The client's request id is the one that goes both ways.
    assert_eq!(response.header("x-request-id"), Some("client-id"));
    let seen = backend.received();
    assert!(!seen.to_ascii_lowercase().contains("keep-alive"), "{seen}");
    assert!(!seen.to_ascii_lowercase().contains("\r\nte:"), "{seen}");
    assert!(seen.contains("X-Forwarded-Proto: http\r\n"), "{seen}");
    assert!(!seen.contains("https"), "{seen}");
    assert!(seen.contains("X-Request-Id: client-id\r\n"), "{seen}");
}

/// GETs, a POST with a length, a chunked POST, a POST that waits for `100 Continue`, and GETs
/// again, all on one connection: each answered in turn, and the connection stays open.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_chunks_and_expect_continue_share_one_kept_alive_connection() {
    let stack = Stack::start(STANDARD).await;
    let mut client = Client::connect(stack.proxy).await;
    assert_eq!(client.send(&get("/h/one", "doc-m")).await.status, 200);
    let posted = client
        .send("POST /h/len HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-m\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    assert_eq!(posted.status, 200);
    assert!(String::from_utf8_lossy(&posted.body).contains("\"body\":\"abc\""));
    let chunked = client
        .send(
            "POST /h/chunked HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-m\r\n\
             Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
        )
        .await;
    assert_eq!(chunked.status, 200);
    assert!(String::from_utf8_lossy(&chunked.body).contains("\"body\":\"abcde\""));
    // The head alone; the proxy says 100 Continue before the client sends the body.
    client
        .stream
        .write_all(
            b"POST /h/expect HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-m\r\nExpect: 100-continue\r\n\
              Content-Length: 5\r\n\r\n",
        )
        .await
        .expect("write head");
    let interim = client.read_response().await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    client.stream.write_all(b"hello").await.expect("write body");
    let expected = client.read_response().await;
    assert_eq!(expected.status, 200, "{}", expected.head);
    assert!(String::from_utf8_lossy(&expected.body).contains("\"body\":\"hello\""));
    let body = String::from_utf8_lossy(&expected.body).to_lowercase();
    assert!(
        !body.contains("\"expect\""),
        "Expect reached the backend: {body}"
    );
    let last = client.send(&get("/h/last", "doc-m")).await;
    assert_eq!(last.status, 200);
    assert!(last.header("connection").is_none(), "{}", last.head);
}

/// The same bytes get the same answer whether they come first on a connection or after a
/// POST: a target with `<` is 400 both times, never forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_request_gets_the_same_answer_whatever_came_before_it() {
    let stack = Stack::start(STANDARD).await;
    let odd = "GET /h/a<b HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-s\r\n\r\n";
    let mut first = Client::connect(stack.proxy).await;
    let alone = first.send(odd).await;
    let mut second = Client::connect(stack.proxy).await;
    let posted = second
        .send("POST /h/p HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-s\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    assert_eq!(posted.status, 200);
    let after_post = second.send(odd).await;
    assert_eq!(alone.status, 400, "{}", alone.head);
    assert_eq!(after_post.status, alone.status, "{}", after_post.head);
    for b in &stack.backends {
        assert!(
            !b.seen_targets()
                .iter()
                .any(|t| t.contains("a<b") || t.contains("a%3Cb")),
            "the odd target reached a backend"
        );
    }
}

/// A head with more fields than the engine parses without allocating (48) is served, and one
/// past `max_headers` (100 by default) is refused with 431 by the proxy itself. (The test
/// backend, hyper, takes at most 100 fields, forwarding fields included.)
#[tokio::test(flavor = "multi_thread")]
async fn heads_with_many_fields_are_served_up_to_max_headers() {
    let stack = Stack::start(STANDARD).await;
    for (count, expected) in [(60, 200), (101, 431)] {
        // Host, X-Doc-Id and Connection plus `count` more.
        let fields: String = (0..count).map(|i| format!("X-F{i}: v\r\n")).collect();
        let request = format!(
            "GET /h/many HTTP/1.1\r\nHost: h\r\nX-Doc-Id: doc-f\r\n{fields}Connection: close\r\n\r\n"
        );
        let mut client = Client::connect(stack.proxy).await;
        let response = client.send(&request).await;
        assert_eq!(
            response.status, expected,
            "{count} extra fields: {}",
            response.head
        );
        if expected == 431 {
            assert!(
                response.head.contains("text/plain"),
                "not the proxy's: {}",
                response.head
            );
        }
    }
}

/// A client sends each POST's head and 3 KB body in one write; the proxy's first read of a
/// connection is sized for heads and small bodies (2 KiB) and cuts it. The body is read whole before anything
/// goes out, so the backend gets head and body together, as the client sent them, not a write
/// per read (three writes and three TCP segments per POST before).
#[tokio::test(flavor = "multi_thread")]
async fn a_small_body_cut_by_the_heads_read_reaches_the_backend_with_its_head() {
    let (backend, seen) = start_read_counting_backend().await;
    let (_tether, proxy) = start_faulty(backend, "").await;
    let body = "x".repeat(3000);
    let post = format!("POST /edit HTTP/1.1\r\nHost: h\r\nContent-Length: 3000\r\n\r\n{body}");
    for _ in 0..5 {
        // A fresh connection each time: its first read is the smallest.
        let mut client = Client::connect(proxy).await;
        for _ in 0..4 {
            let response = client.send(&post).await;
            assert_eq!(response.status, 200);
            assert_eq!(response.body, b"ok");
        }
    }
    assert_arrived_whole(&seen, 20, 3000);
}
