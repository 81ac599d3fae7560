//! End-to-end "proof of sameness": one corpus of requests, normal, odd and hostile, each sent
//! through HTTP/1.1 over TCP, HTTP/1.1 over TLS and HTTP/2 over TLS (one Tether with a plain
//! and a TLS listener). For every entry the client must get the same status on every protocol,
//! and when the request reaches a backend it must reach it on every protocol, as the same
//! request: the same backend, route and sticky key, method, target, header fields and body
//! (the test backend's echo says what it received; its `seen_targets` says where and with which
//! target, HEAD included; the proxy's access log says how it routed it).
//!
//! The HTTP/1.1 legs are raw bytes, one request per connection with `Connection: close`. The
//! HTTP/2 leg is a small client written here (frames and HPACK literals by hand): the `h2`
//! crate's client builds its `:path` through `http::Uri`, which drops a fragment and refuses
//! `<` or a connection-specific field, so it could not send half of the corpus, and its own
//! normalisation would hide the very differences this test looks for.
//!
//! The corpus is a table ([`corpus`]); to add an entry, add a line. `{id}` in a target or a
//! header value becomes the entry's token (`id007`), which also tells which entry a request
//! that reached a backend belongs to. Set `TETHER_DIFFERENTIAL_ALL=1` to print every entry's
//! outcome, not only the differences, and `TETHER_DIFFERENTIAL_SHOW=<entry number>` to print all
//! that entry's legs saw.

use crate::support::tls::Ca;
use crate::support::Stack;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tether_testkit::{free_addr, tls_connect, wait_until_async, Alpn, LaunchOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plain and a TLS listener on one proxy; one sticky route per key source, all with a small
/// `max_body`; limits small enough for the corpus to cross each of them. The access log names
/// each request's route and sticky key, so a key read differently on one protocol is seen even
/// when it happens to hash to the same backend.
const CONFIG: &str = r#"
listeners:
  - address: $PROXY
  - address: $TLS_PROXY
    tls: { cert: cert.pem, key: key.pem }
admin: { address: $ADMIN }
server:
  limits: { max_uri: 1024, max_header_bytes: 8192, max_header_line: 4096, max_headers: 30 }
  access_log: { format: json, log_keys: true }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: by-header
    match: { path_prefix: /h/ }
    sticky: { keys: [ { header: X-Doc-Id } ] }
    upstream: docs
    max_body: 1000
  - name: by-cookie
    match: { path_prefix: /c/ }
    sticky: { keys: [ { cookie: doc_id } ] }
    upstream: docs
    max_body: 1000
  - name: by-query
    match: { path_prefix: /q/ }
    sticky: { keys: [ { query: doc } ] }
    upstream: docs
    max_body: 1000
  - name: by-path
    match: { path_prefix: /docs/ }
    sticky:
      keys:
        - header: X-Doc-Id
        - path: /docs/{key}
    upstream: docs
    max_body: 1000
"#;

/// The route's `max_body`.
const MAX_BODY: usize = 1000;
/// The host every request names (the certificate's name, so also the TLS server name).
const AUTHORITY: &str = "localhost";
/// Everything one leg does (connect, handshake, request, response) happens within this.
const LEG_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The corpus.

/// How the HTTP/1.1 legs delimit the body. The HTTP/2 leg sends it in DATA frames either way,
/// with a `content-length` field when the HTTP/1.1 legs declare one (`Length`) and without one
/// when they stream it (`Chunked`), so both have a declared and an undeclared length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No framing field at all.
    None,
    /// `Content-Length` (also for an empty body: `Content-Length: 0`).
    Length,
    /// `Transfer-Encoding: chunked`, in chunks of 300 bytes.
    Chunked,
}

/// Which host a request names, on each protocol.
#[derive(Debug, Clone, Copy)]
enum HostField {
    /// `Host: localhost`; HTTP/2 `:authority: localhost`.
    Normal,
    /// `Host: <value>`; HTTP/2 `:authority: <value>`.
    Value(&'static str),
    /// No `Host`; HTTP/2 neither `:authority` nor `host`.
    Missing,
    /// `Host: localhost`; HTTP/2 no `:authority` but a `host` field (RFC 9113 8.3.1).
    HeaderOnly,
    /// Two hosts at once. HTTP/1.1: the entry's absolute-form target names one, `Host:
    /// localhost` the other; HTTP/2: `:authority: <value>` and `host: localhost`.
    Conflict(&'static str),
}

/// What the HTTP/2 leg must show, compared with the HTTP/1.1 legs.
#[derive(Debug, Clone, Copy)]
enum H2 {
    /// Exactly what the HTTP/1.1 legs show.
    Same,
    /// The same, or a refusal by the HTTP/2 layer itself (RST_STREAM or GOAWAY before any
    /// response) that never reaches a backend. The reason says why that is legitimate.
    SameOrReset(&'static str),
    /// The request is malformed in HTTP/2 (RFC 9113): it must be refused (reset, GOAWAY or a
    /// 4xx) and never reach a backend, whatever the HTTP/1.1 legs got.
    Refused(&'static str),
    /// Not sent over HTTP/2; the reason says why.
    Skip(&'static str),
}

impl H2 {
    /// Why the HTTP/2 leg is allowed to differ, if it is.
    fn note(self) -> Option<&'static str> {
        match self {
            H2::Same => None,
            H2::SameOrReset(why) | H2::Refused(why) | H2::Skip(why) => Some(why),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            H2::Same => "same",
            H2::SameOrReset(_) => "same or reset",
            H2::Refused(_) => "refused",
            H2::Skip(_) => "skipped",
        }
    }
}

/// One corpus entry.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    method: &'static str,
    /// The request target as sent on HTTP/1.1 (and as HTTP/2's `:path`, unless `h2_path`).
    target: String,
    /// HTTP/2's `:path` when it cannot be the HTTP/1.1 target (an absolute-form target).
    h2_path: Option<String>,
    host: HostField,
    /// Extra fields, in order, names as written (lower-cased on HTTP/2).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
    h2: H2,
    /// The status the RFCs (or the configuration) call for, when there is one.
    expect: Option<u16>,
    /// Text the target forwarded to a backend must still contain (e.g. an escape that must
    /// stay escaped).
    forwarded_has: Option<&'static str>,
    /// The entry's token (`id007`), and the `X-Request-Id` every leg sends (the same on each).
    token: String,
    request_id: String,
}

fn req(name: &'static str, method: &'static str, target: &str) -> Case {
    Case {
        name,
        method,
        target: target.to_string(),
        h2_path: None,
        host: HostField::Normal,
        headers: Vec::new(),
        body: Vec::new(),
        framing: Framing::None,
        h2: H2::Same,
        expect: None,
        forwarded_has: None,
        token: String::new(),
        request_id: String::new(),
    }
}

fn get(name: &'static str, target: &str) -> Case {
    req(name, "GET", target)
}

impl Case {
    fn header(mut self, name: &str, value: &str) -> Case {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn headers(mut self, fields: impl IntoIterator<Item = (String, String)>) -> Case {
        self.headers.extend(fields);
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>, framing: Framing) -> Case {
        self.body = body.into();
        self.framing = framing;
        self
    }

    fn host(mut self, host: HostField) -> Case {
        self.host = host;
        self
    }

    fn h2(mut self, h2: H2) -> Case {
        self.h2 = h2;
        self
    }

    fn h2_path(mut self, path: &str) -> Case {
        self.h2_path = Some(path.to_string());
        self
    }

    fn expect(mut self, status: u16) -> Case {
        self.expect = Some(status);
        self
    }

    fn forwards(mut self, text: &'static str) -> Case {
        self.forwarded_has = Some(text);
        self
    }

    /// Replaces `{id}` with the entry's token and gives it its request id.
    fn bind(&mut self, token: &str) {
        self.target = self.target.replace("{id}", token);
        self.h2_path = self.h2_path.as_ref().map(|p| p.replace("{id}", token));
        for (_, value) in &mut self.headers {
            *value = value.replace("{id}", token);
        }
        self.token = token.to_string();
        self.request_id = format!("differential-{token}");
    }
}

/// The token of entry `i`: unique, alphanumeric (no normalisation touches it), and not a
/// substring of any other entry's token.
fn token(i: usize) -> String {
    format!("id{i:03}")
}

/// `n` fields `X-<prefix>-<i>: <value>`.
fn fields(prefix: &str, n: usize, value: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("X-{prefix}-{i}"), value.to_string()))
        .collect()
}

// Why the HTTP/2 leg of some entries may or must differ.
const BAD_PATH_BYTE: &str = "RFC 3986 allows no such byte in a target; the h2 library may \
     reset a :path holding it as malformed (RFC 9113 8.3.1) before Tether sees it";
const CONNECTION_SPECIFIC: &str = "a connection-specific field makes an HTTP/2 request \
     malformed (RFC 9113 8.2.2)";
const TE_NOT_TRAILERS: &str = "TE other than \"trailers\" makes an HTTP/2 request malformed \
     (RFC 9113 8.2.2)";
const FIELD_WHITESPACE: &str = "an HTTP/2 field value must not start or end with whitespace \
     (RFC 9113 8.2.1): the h2 library may reset it";
const BAD_FIELD_NAME: &str = "an HTTP/2 field name must be a token (RFC 9113 8.2.1): the h2 \
     library may reset it";
const HEADER_LIST_LIMIT: &str = "over SETTINGS_MAX_HEADER_LIST_SIZE (= max_header_bytes) the h2 \
     library answers 431 or resets the stream itself (RFC 9113 10.5.1)";
const EMPTY_AUTHORITY: &str = "an empty :authority is not a valid authority; the h2 library \
     may reset the stream";

/// The corpus: normal, odd and hostile requests. See the module comment for `{id}`.
fn corpus() -> Vec<Case> {
    use Framing::{Chunked, Length};
    let long_target = format!("/docs/{{id}}/{}", "l".repeat(1000 - "/docs/id000/".len()));
    let oversized_target = format!("/docs/{{id}}/{}", "o".repeat(2000));
    let exactly_max = "m".repeat(MAX_BODY);
    let one_over = "n".repeat(MAX_BODY + 1);
    vec![
        // Plain requests, one per sticky key source.
        get("path key", "/docs/{id}/edit").expect(200),
        get("header key", "/h/{id}/x")
            .header("X-Doc-Id", "doc-{id}")
            .expect(200),
        get("cookie key", "/c/{id}/page")
            .header("Cookie", "theme=dark; doc_id=doc-{id}")
            .expect(200),
        get("query key", "/q/{id}/page?x=1&doc=doc-{id}").expect(200),
        get("header key wins over path key", "/docs/{id}/x")
            .header("X-Doc-Id", "other-{id}")
            .expect(200),
        get(
            "query key repeated, empty params",
            "/q/{id}?doc=a{id}&doc=b&flag&=x",
        )
        .expect(200),
        get("cookie key in the second Cookie field", "/c/{id}/page")
            .header("Cookie", "theme=dark")
            .header("Cookie", "doc_id=doc-{id}"),
        get("two X-Doc-Id fields", "/h/{id}/x")
            .header("X-Doc-Id", "first-{id}")
            .header("X-Doc-Id", "second-{id}"),
        get("header key with surrounding spaces", "/h/{id}/x")
            .header("X-Doc-Id", "  doc-{id}  ")
            .h2(H2::SameOrReset(FIELD_WHITESPACE)),
        get("query key percent-encoded", "/q/{id}/p?doc=a%20b%2F{id}"),
        get(
            "query key with plus and bad escape",
            "/q/{id}/p?doc=a+b%zz{id}",
        ),
        // Methods.
        req("HEAD", "HEAD", "/docs/{id}/x").expect(200),
        req("OPTIONS", "OPTIONS", "/docs/{id}/x"),
        req("OPTIONS *", "OPTIONS", "*"),
        req("DELETE", "DELETE", "/docs/{id}/x").expect(200),
        req("PATCH with a body", "PATCH", "/docs/{id}/x")
            .body(r#"{"op":"add"}"#, Length)
            .expect(200),
        req("extension method PURGE", "PURGE", "/docs/{id}/x"),
        req("lower-case method get", "get", "/docs/{id}/x"),
        req("TRACE", "TRACE", "/docs/{id}/x").expect(405),
        req("CONNECT", "CONNECT", "localhost:443").expect(405),
        // Hosts.
        get("absolute-form target", "http://localhost/docs/{id}/x")
            .h2_path("/docs/{id}/x")
            .expect(200),
        get(
            "absolute-form target and Host disagree",
            "http://other.example/docs/{id}/x",
        )
        .h2_path("/docs/{id}/x")
        .host(HostField::Conflict("other.example"))
        .expect(400),
        get("Host with a port", "/docs/{id}/x").host(HostField::Value("localhost:8443")),
        get("Host in upper case", "/docs/{id}/x").host(HostField::Value("LOCALHOST")),
        get("Host an IPv6 literal", "/docs/{id}/x").host(HostField::Value("[::1]:8080")),
        get("Host with a bad port", "/docs/{id}/x")
            .host(HostField::Value("localhost:99999"))
            .expect(400),
        get("Host with userinfo", "/docs/{id}/x")
            .host(HostField::Value("user@localhost"))
            .expect(400),
        get("empty Host", "/docs/{id}/x")
            .host(HostField::Value(""))
            .h2(H2::SameOrReset(EMPTY_AUTHORITY)),
        get("missing Host", "/docs/{id}/x")
            .host(HostField::Missing)
            .expect(400)
            .h2(H2::Skip(
                "HTTP/1.1 requires Host (RFC 9112 3.2) but HTTP/2 may omit :authority \
                 (RFC 9113 8.3.1): no HTTP/2 twin; see 'Host field instead of :authority'",
            )),
        get("Host field instead of :authority", "/docs/{id}/x")
            .host(HostField::HeaderOnly)
            .expect(200),
        // Targets: dot segments, escapes, slashes.
        get("dot segments", "/docs/{id}/a/./b/../c").expect(200),
        get("dot-dot into the route", "/other/../docs/{id}/x").expect(200),
        get("dot-dot out of the route", "/docs/{id}/../../nowhere"),
        get("dot-dot above the root", "/docs/{id}/../../../etc/passwd").expect(400),
        get("encoded dot-dot %2e%2E", "/docs/{id}/a/%2e%2E/x"),
        get("encoded dot %2e", "/docs/{id}/%2e/x"),
        get("encoded slash stays escaped", "/docs/{id}/a%2Fb/x")
            .forwards("%2F")
            .expect(200),
        get("encoded slash in the key", "/docs/a%2F{id}/x"),
        get("double slashes", "/docs//{id}//x").expect(200),
        get("leading double slash", "//docs/{id}/x"),
        get("unreserved escapes %41%7e", "/docs/{id}/%41%7e").expect(200),
        get("bad escape %zz", "/docs/{id}/%zz").expect(400),
        get("truncated escape", "/docs/{id}/a%2").expect(400),
        get("overlong UTF-8 dot %C0%AE", "/docs/{id}/%C0%AE%C0%AE/x").expect(400),
        get("encoded NUL", "/docs/{id}/a%00b"),
        get("encoded CR LF", "/docs/{id}/a%0d%0aX-Injected:%20yes"),
        get("control char in the key", "/docs/a%0A{id}/x").expect(400),
        get("semicolon parameters", "/docs/{id};jsessionid=1/x"),
        get(
            "square brackets and sub-delims",
            "/docs/{id}/[a]!$&'()*+,;=:@",
        ),
        get("empty query", "/docs/{id}/x?"),
        // No status is expected of a fragment: RFC 9112 3.2 has none in a target, and a server
        // SHOULD (not MUST) answer 400 to an invalid request line; Tether cuts it off on every
        // protocol (http's parser drops it on HTTP/2). Sameness still applies.
        get("fragment", "/docs/{id}/x#frag"),
        get("fragment after a query", "/q/{id}/x?doc=a{id}#frag"),
        get("less-than and greater-than", "/docs/{id}/<script>")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("backtick", "/docs/{id}/a`b")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("double quote", "/docs/{id}/\"q\"")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("braces", "/docs/{id}/{x}")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("pipe", "/docs/{id}/a|b")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("backslash", "/docs/{id}/a\\b")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("caret", "/docs/{id}/a^b")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("non-ASCII in the path", "/docs/{id}/café")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("non-ASCII in the query", "/q/{id}/x?doc=ü")
            .expect(400)
            .h2(H2::SameOrReset(BAD_PATH_BYTE)),
        get("long legal target (1000 bytes)", &long_target).expect(200),
        get("oversized target (2000 bytes)", &oversized_target).expect(414),
        // Routing and keys.
        get("unknown route", "/nowhere/{id}").expect(404),
        get("root", "/").expect(404),
        get("prefix without its slash", "/docsx/{id}").expect(404),
        get("missing header key", "/h/{id}/x").expect(400),
        get("missing cookie key", "/c/{id}/x")
            .header("Cookie", "theme=dark")
            .expect(400),
        get("missing query key", "/q/{id}/x?other=1").expect(400),
        get("empty header key", "/h/{id}/x")
            .header("X-Doc-Id", "")
            .expect(400),
        get("key too long (300 bytes)", "/h/{id}/x")
            .header("X-Doc-Id", &"k".repeat(300))
            .expect(400),
        get("key with non-ASCII bytes", "/h/{id}/x").header("X-Doc-Id", "café-{id}"),
        get("key field name with underscores", "/h/{id}/x")
            .header("X_Doc_Id", "doc-{id}")
            .expect(400),
        // Hop-by-hop and connection fields.
        get("Connection nominates a custom field", "/docs/{id}/x")
            .header("Connection", "keep-alive, X-Secret")
            .header("X-Secret", "must-not-pass")
            .h2(H2::Refused(CONNECTION_SPECIFIC)),
        get("Connection nominates Host and X-Request-Id", "/docs/{id}/x")
            .header("Connection", "Host, X-Request-Id, X-Doc-Id")
            .h2(H2::Refused(CONNECTION_SPECIFIC)),
        get("Keep-Alive", "/docs/{id}/x")
            .header("Keep-Alive", "timeout=5, max=100")
            .h2(H2::Refused(CONNECTION_SPECIFIC)),
        get("Proxy-Connection", "/docs/{id}/x")
            .header("Proxy-Connection", "keep-alive")
            .h2(H2::Refused(CONNECTION_SPECIFIC)),
        get("TE: trailers", "/docs/{id}/x").header("TE", "trailers"),
        get("TE: gzip", "/docs/{id}/x")
            .header("TE", "gzip")
            .h2(H2::Refused(TE_NOT_TRAILERS)),
        get("Trailer", "/docs/{id}/x").header("Trailer", "X-Checksum"),
        get("Proxy-Authorization", "/docs/{id}/x")
            .header("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        get("HTTP2-Settings alone", "/docs/{id}/x")
            .header("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        get("Upgrade: h2c", "/docs/{id}/x")
            .header("Connection", "Upgrade, HTTP2-Settings")
            .header("Upgrade", "h2c")
            .header("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA")
            .h2(H2::Refused(CONNECTION_SPECIFIC)),
        get("Upgrade: websocket without a key", "/docs/{id}/x")
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .h2(H2::Refused(CONNECTION_SPECIFIC)),
        // Client identity, from a client that is not a trusted proxy.
        get("X-Forwarded-For", "/docs/{id}/x").header("X-Forwarded-For", "203.0.113.7"),
        get("X-Forwarded-Host", "/docs/{id}/x").header("X-Forwarded-Host", "evil.example"),
        get("X-Forwarded-Proto", "/docs/{id}/x").header("X-Forwarded-Proto", "https"),
        get("X-Forwarded-Port and -Prefix", "/docs/{id}/x")
            .header("X-Forwarded-Port", "443")
            .header("X-Forwarded-Prefix", "/admin"),
        get("Forwarded", "/docs/{id}/x").header("Forwarded", "for=1.2.3.4;proto=https"),
        get("X-Real-IP and True-Client-IP", "/docs/{id}/x")
            .header("X-Real-IP", "1.2.3.4")
            .header("True-Client-IP", "1.2.3.4")
            .header("CF-Connecting-IP", "1.2.3.4"),
        get("X_Forwarded_For with underscores", "/docs/{id}/x")
            .header("X_Forwarded_For", "1.2.3.4")
            .header("X_Custom", "v"),
        // Header fields: sizes, counts, odd values.
        get("long but legal field (3000 bytes)", "/docs/{id}/x")
            .header("X-Long", &"a".repeat(3000))
            .expect(200),
        get("field line over max_header_line", "/docs/{id}/x")
            .header("X-Big", &"b".repeat(4500))
            .expect(431),
        get("block over max_header_bytes", "/docs/{id}/x")
            .headers(fields("Block", 3, &"c".repeat(3000)))
            .expect(431)
            .h2(H2::SameOrReset(HEADER_LIST_LIMIT)),
        get("many fields within max_headers", "/docs/{id}/x")
            .headers(fields("Many", 20, "v"))
            .expect(200),
        get("too many fields", "/docs/{id}/x")
            .headers(fields("Lot", 40, "v"))
            .expect(431),
        get("empty field value", "/docs/{id}/x").header("X-Empty", ""),
        get("non-ASCII field value", "/docs/{id}/x").header("X-Name", "café ü"),
        get("mixed-case field name", "/docs/{id}/x").header("X-MiXeD-CaSe", "Value"),
        get("field name not a token", "/docs/{id}/x")
            .header("X@Bad", "v")
            .expect(400)
            .h2(H2::SameOrReset(BAD_FIELD_NAME)),
        get("Expect: unknown", "/docs/{id}/x")
            .header("Expect", "magic")
            .expect(417),
        // Bodies.
        req("POST small body (Content-Length)", "POST", "/docs/{id}/x")
            .body("hello", Length)
            .expect(200),
        req(
            "POST exactly max_body (Content-Length)",
            "POST",
            "/docs/{id}/x",
        )
        .body(exactly_max.as_bytes(), Length)
        .expect(200),
        req("POST max_body + 1 (Content-Length)", "POST", "/docs/{id}/x")
            .body(one_over.as_bytes(), Length)
            .expect(413),
        req(
            "POST far over max_body (Content-Length)",
            "POST",
            "/docs/{id}/x",
        )
        .body("f".repeat(5000), Length)
        .expect(413),
        req("PUT small body (chunked)", "PUT", "/docs/{id}/x")
            .body("hello chunks", Chunked)
            .expect(200),
        req("POST exactly max_body (chunked)", "POST", "/docs/{id}/x")
            .body(exactly_max.as_bytes(), Chunked)
            .expect(200),
        req("POST over max_body (chunked)", "POST", "/docs/{id}/x")
            .body("g".repeat(1500), Chunked)
            .expect(413),
        req(
            "POST empty body (Content-Length: 0)",
            "POST",
            "/docs/{id}/x",
        )
        .body("", Length)
        .expect(200),
        req("POST without a body", "POST", "/docs/{id}/x").expect(200),
        req("POST with Expect: 100-continue", "POST", "/docs/{id}/x")
            .header("Expect", "100-continue")
            .body("continued", Length)
            .expect(200),
        req("POST binary body", "POST", "/docs/{id}/x")
            .body(b"a\0b\xffc\r\n\r\nGET / HTTP/1.1\r\n".to_vec(), Length)
            .expect(200),
        req("PUT to the header-keyed route", "PUT", "/h/{id}/x")
            .header("X-Doc-Id", "doc-{id}")
            .header("Content-Type", "application/json")
            .body(r#"{"k":"v"}"#, Length)
            .expect(200),
        get("GET with a body", "/docs/{id}/x").body("get-body", Length),
        req("DELETE with a chunked body", "DELETE", "/docs/{id}/x").body("bye", Chunked),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running the legs.

/// The three ways in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    /// HTTP/1.1 over TCP.
    Tcp,
    /// HTTP/1.1 over TLS (ALPN `http/1.1`).
    Tls,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
}

const LEGS: [Leg; 3] = [Leg::Tcp, Leg::Tls, Leg::H2];

impl Leg {
    fn label(self) -> &'static str {
        match self {
            Leg::Tcp => "h1",
            Leg::Tls => "h1+tls",
            Leg::H2 => "h2",
        }
    }

    fn proto(self) -> &'static str {
        match self {
            Leg::Tcp => "http",
            Leg::Tls | Leg::H2 => "https",
        }
    }
}

/// What the client got.
#[derive(Debug, Clone)]
enum Outcome {
    /// A final response with this status.
    Status(u16),
    /// HTTP/2: RST_STREAM before any final response, with this error code.
    Reset(u32),
    /// HTTP/2: GOAWAY not covering the stream, before any response, with this error code.
    GoAway(u32),
    /// No response (connection closed, unreadable answer, deadline).
    Failed(String),
    /// The leg was not run.
    Skipped,
}

impl Outcome {
    fn cell(&self) -> String {
        match self {
            Outcome::Status(s) => s.to_string(),
            Outcome::Reset(code) => format!("RST:{}", h2_error(*code)),
            Outcome::GoAway(code) => format!("GOAWAY:{}", h2_error(*code)),
            Outcome::Failed(_) => "no-answer".to_string(),
            Outcome::Skipped => "skip".to_string(),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Outcome::Status(s) => Some(*s),
            _ => None,
        }
    }

    /// Refused by the HTTP/2 layer itself.
    fn is_protocol_refusal(&self) -> bool {
        matches!(self, Outcome::Reset(_) | Outcome::GoAway(_))
    }

    fn same_as(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Status(a), Outcome::Status(b)) => a == b,
            (Outcome::Reset(a), Outcome::Reset(b)) | (Outcome::GoAway(a), Outcome::GoAway(b)) => {
                a == b
            }
            (Outcome::Failed(_), Outcome::Failed(_)) | (Outcome::Skipped, Outcome::Skipped) => true,
            _ => false,
        }
    }
}

fn h2_error(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xd => "HTTP_1_1_REQUIRED",
        other => return format!("0x{other:x}"),
    };
    name.to_string()
}

/// A leg's response: the outcome and the body bytes.
struct Reply {
    outcome: Outcome,
    body: Vec<u8>,
}

impl Reply {
    fn failed(why: impl Into<String>) -> Reply {
        Reply {
            outcome: Outcome::Failed(why.into()),
            body: Vec::new(),
        }
    }
}

/// Where the proxy listens, and the CA its certificate chains to.
struct Target {
    plain: SocketAddr,
    tls: SocketAddr,
    ca: Vec<u8>,
}

/// Runs one leg of `case` within [`LEG_DEADLINE`].
async fn run_leg(target: &Target, case: &Case, leg: Leg) -> Reply {
    let head = case.method == "HEAD";
    let work = async {
        match leg {
            Leg::Tcp => match TcpStream::connect(target.plain).await {
                Ok(stream) => h1_exchange(stream, &h1_request(case), head).await,
                Err(e) => Reply::failed(format!("connect: {e}")),
            },
            Leg::Tls | Leg::H2 => {
                let (alpn, wanted): (Alpn, &[u8]) = if leg == Leg::H2 {
                    (Alpn::H2, b"h2")
                } else {
                    (Alpn::Http1, b"http/1.1")
                };
                let connection = match tls_connect(target.tls, AUTHORITY, &target.ca, alpn).await {
                    Ok(c) => c,
                    Err(e) => return Reply::failed(format!("TLS: {e}")),
                };
                if connection.alpn.as_deref() != Some(wanted) {
                    return Reply::failed(format!("ALPN chose {:?}", connection.alpn));
                }
                if leg == Leg::H2 {
                    h2_exchange(connection.stream, &h2_request(case)).await
                } else {
                    h1_exchange(connection.stream, &h1_request(case), head).await
                }
            }
        }
    };
    match tokio::time::timeout(LEG_DEADLINE, work).await {
        Ok(reply) => reply,
        Err(_) => Reply::failed(format!("no complete response within {LEG_DEADLINE:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, raw.

/// The entry as HTTP/1.1 bytes: the fields as written, then `X-Request-Id`, `Connection:
/// close` and the framing field.
fn h1_request(case: &Case) -> Vec<u8> {
    let mut head = format!("{} {} HTTP/1.1\r\n", case.method, case.target);
    match case.host {
        HostField::Normal | HostField::HeaderOnly | HostField::Conflict(_) => {
            head.push_str(&format!("Host: {AUTHORITY}\r\n"));
        }
        HostField::Value(v) => head.push_str(&format!("Host: {v}\r\n")),
        HostField::Missing => {}
    }
    for (name, value) in &case.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("X-Request-Id: {}\r\n", case.request_id));
    head.push_str("Connection: close\r\n");
    match case.framing {
        Framing::None => {}
        Framing::Length => head.push_str(&format!("Content-Length: {}\r\n", case.body.len())),
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    match case.framing {
        Framing::None => {}
        Framing::Length => bytes.extend_from_slice(&case.body),
        Framing::Chunked => {
            for chunk in case.body.chunks(300) {
                bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                bytes.extend_from_slice(chunk);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
    }
    bytes
}

/// Writes `request`, reads the response (skipping interim 1xx) until it is complete by its
/// framing or the server closes.
async fn h1_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
    head: bool,
) -> Reply {
    // A refusal may come, and the connection close, before all of the request is written:
    // read what the server said either way.
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 16384];
    loop {
        if let Some(reply) = parse_h1(&received, head, false) {
            return reply;
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => received.extend_from_slice(&chunk[..n]),
            // EOF, or a reset / TLS close without close_notify: what came is all there is.
            _ => {
                return parse_h1(&received, head, true).unwrap_or_else(|| {
                    Reply::failed(format!(
                        "closed after {} bytes: {:?}",
                        received.len(),
                        clip(&String::from_utf8_lossy(&received))
                    ))
                })
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete response in `data`, or None if more is needed (`eof`: no more will come, so take
/// a body delimited by the close, or cut short, as it is).
fn parse_h1(data: &[u8], head_request: bool, eof: bool) -> Option<Reply> {
    let mut rest = data;
    loop {
        let end = find(rest, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.split(' ');
        let status = match (
            parts.next(),
            parts.next().and_then(|s| s.parse::<u16>().ok()),
        ) {
            (Some(v), Some(s)) if v.starts_with("HTTP/1.") => s,
            _ => return Some(Reply::failed(format!("bad status line {status_line:?}"))),
        };
        let body = &rest[end + 4..];
        if (100..200).contains(&status) && status != 101 {
            rest = body;
            continue;
        }
        let field = |name: &str| {
            lines.clone().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let done = |body: &[u8]| {
            Some(Reply {
                outcome: Outcome::Status(status),
                body: body.to_vec(),
            })
        };
        if head_request || status == 204 || status == 304 {
            return done(&[]);
        }
        if field("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            return match dechunk(body) {
                Some(decoded) => done(&decoded),
                None if eof => done(body),
                None => None,
            };
        }
        if let Some(length) = field("content-length").and_then(|l| l.parse::<usize>().ok()) {
            return if body.len() >= length {
                done(&body[..length])
            } else if eof {
                done(body)
            } else {
                None
            };
        }
        return if eof { done(body) } else { None };
    }
}

/// A complete chunked body, decoded (trailers ignored), or None if incomplete or malformed.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let line = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2, by hand: frames (RFC 9113 4, 6) and HPACK literals (RFC 7541 6.2.2), no Huffman on
// the way out; on the way in only `:status` is decoded, the body comes from DATA frames.

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's initial value: no frame we send is larger.
const MAX_FRAME: usize = 16384;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK integer with a `prefix`-bit prefix, the first byte's other bits from `first`.
fn hpack_int(out: &mut Vec<u8>, prefix: u32, first: u8, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// "Literal Header Field without Indexing — New Name", both strings raw (no Huffman).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, 0x00, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 7, 0x00, value.len());
    out.extend_from_slice(value);
}

/// An HPACK integer at the start of `data`: (value, bytes used).
fn hpack_read_int(data: &[u8], prefix: u32) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(*data.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0;
    let mut used = 1;
    loop {
        let byte = *data.get(used)?;
        used += 1;
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Some((value, used));
        }
        if shift > 28 {
            return None;
        }
    }
}

/// Decodes a Huffman-coded string of digits (RFC 7541 Appendix B: `0`-`2` are 5-bit codes
/// 0b00000-0b00010, `3`-`9` 6-bit codes 0b011001-0b011111; padding is up to 7 one bits).
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let total = raw.len() * 8;
    let bit = |at: usize| u32::from((raw[at / 8] >> (7 - at % 8)) & 1);
    let take = |at: usize, n: usize| (0..n).fold(0u32, |acc, k| (acc << 1) | bit(at + k));
    let mut at = 0;
    let mut out = String::new();
    while at < total {
        let left = total - at;
        if left >= 5 && take(at, 5) <= 2 {
            out.push(char::from(b'0' + take(at, 5) as u8));
            at += 5;
            continue;
        }
        if left >= 6 && (0x19..=0x1f).contains(&take(at, 6)) {
            out.push(char::from(b'3' + (take(at, 6) - 0x19) as u8));
            at += 6;
            continue;
        }
        if left < 8 && take(at, left) == (1 << left) - 1 {
            break;
        }
        return None;
    }
    Some(out)
}

/// The `:status` of a response header block: its first field (RFC 9113 8.3: pseudo-fields
/// first), which on a connection's first response is a static-table entry or a literal with
/// the static `:status` name (indices 8-14).
fn hpack_status(block: &[u8]) -> Option<u16> {
    let mut at = 0;
    loop {
        let first = *block.get(at)?;
        if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            at += hpack_read_int(&block[at..], 5)?.1;
            continue;
        }
        if first & 0x80 != 0 {
            return match hpack_read_int(&block[at..], 7)?.0 {
                8 => Some(200),
                9 => Some(204),
                10 => Some(206),
                11 => Some(304),
                12 => Some(400),
                13 => Some(404),
                14 => Some(500),
                _ => None,
            };
        }
        let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
        let (index, used) = hpack_read_int(&block[at..], prefix)?;
        if !(8..=14).contains(&index) {
            return None;
        }
        at += used;
        let huffman = block.get(at)? & 0x80 != 0;
        let (len, used) = hpack_read_int(&block[at..], 7)?;
        let raw = block.get(at + used..at + used + len)?;
        let text = if huffman {
            huffman_digits(raw)?
        } else {
            String::from_utf8(raw.to_vec()).ok()?
        };
        return text.parse().ok();
    }
}

/// The entry as an HTTP/2 connection's first bytes: preface, SETTINGS, HEADERS (and
/// CONTINUATION) on stream 1, DATA.
fn h2_request(case: &Case) -> Vec<u8> {
    let mut fields: Vec<(String, String)> = vec![(":method".into(), case.method.into())];
    let connect = case.method == "CONNECT" && !case.target.starts_with('/');
    if connect {
        // RFC 9113 8.5: CONNECT names only the authority.
        fields.push((":authority".into(), case.target.clone()));
    } else {
        fields.push((":scheme".into(), "https".into()));
        match case.host {
            HostField::Normal => fields.push((":authority".into(), AUTHORITY.into())),
            HostField::Value(v) => fields.push((":authority".into(), v.into())),
            HostField::Missing | HostField::HeaderOnly => {}
            HostField::Conflict(a) => fields.push((":authority".into(), a.into())),
        }
        let path = case.h2_path.clone().unwrap_or_else(|| case.target.clone());
        fields.push((":path".into(), path));
        if matches!(case.host, HostField::HeaderOnly | HostField::Conflict(_)) {
            fields.push(("host".into(), AUTHORITY.into()));
        }
    }
    for (name, value) in &case.headers {
        fields.push((name.to_ascii_lowercase(), value.clone()));
    }
    fields.push(("x-request-id".into(), case.request_id.clone()));
    if case.framing == Framing::Length {
        fields.push(("content-length".into(), case.body.len().to_string()));
    }
    let mut block = Vec::new();
    for (name, value) in &fields {
        hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    let end_stream = case.body.is_empty();
    let pieces: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i + 1 == pieces.len() {
            END_HEADERS
        } else {
            0
        };
        if i == 0 && end_stream {
            flags |= END_STREAM;
        }
        frame(&mut out, kind, flags, 1, piece);
    }
    let size = if case.framing == Framing::Chunked {
        300
    } else {
        MAX_FRAME
    };
    let pieces: Vec<&[u8]> = case.body.chunks(size).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let flags = if i + 1 == pieces.len() { END_STREAM } else { 0 };
        frame(&mut out, DATA, flags, 1, piece);
    }
    out
}

/// A frame's payload without its padding (and priority fields, for HEADERS).
fn unpadded(kind: u8, flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*p.first()?);
        p = &p[1..];
    }
    if kind == HEADERS && flags & PRIORITY != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

/// Writes the connection's first bytes and reads stream 1's response: its final status and
/// body, or the refusal.
async fn h2_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8]) -> Reply {
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    let mut received: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16384];
    let mut status: Option<u16> = None;
    let mut body = Vec::new();
    // A header block being assembled from HEADERS and CONTINUATION, and its END_STREAM.
    let mut block: Option<(Vec<u8>, bool)> = None;
    let finished = |status: Option<u16>, body: Vec<u8>| Reply {
        outcome: status.map_or_else(
            || Outcome::Failed("stream ended without a response".into()),
            Outcome::Status,
        ),
        body,
    };
    loop {
        while received.len() >= 9 {
            let len = (usize::from(received[0]) << 16)
                | (usize::from(received[1]) << 8)
                | usize::from(received[2]);
            if received.len() < 9 + len {
                break;
            }
            let (kind, flags) = (received[3], received[4]);
            let id = u32::from_be_bytes([received[5], received[6], received[7], received[8]])
                & 0x7fff_ffff;
            let payload: Vec<u8> = received[9..9 + len].to_vec();
            received.drain(..9 + len);
            let mut answer = Vec::new();
            match kind {
                SETTINGS if flags & ACK == 0 => frame(&mut answer, SETTINGS, ACK, 0, &[]),
                PING if flags & ACK == 0 => frame(&mut answer, PING, ACK, 0, &payload),
                GOAWAY if payload.len() >= 8 => {
                    let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff;
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    if status.is_none() && last < 1 {
                        return Reply {
                            outcome: Outcome::GoAway(code),
                            body,
                        };
                    }
                }
                RST_STREAM if id == 1 && payload.len() >= 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    return match status {
                        Some(_) => finished(status, body),
                        None => Reply {
                            outcome: Outcome::Reset(code),
                            body,
                        },
                    };
                }
                HEADERS | CONTINUATION if id == 1 => {
                    let Some(fragment) = unpadded(kind, flags, &payload) else {
                        return Reply::failed("malformed HEADERS frame");
                    };
                    if kind == CONTINUATION {
                        if let Some((pending, _)) = block.as_mut() {
                            pending.extend_from_slice(fragment);
                        }
                    } else {
                        block = Some((fragment.to_vec(), flags & END_STREAM != 0));
                    }
                    if flags & END_HEADERS != 0 {
                        let (whole, end) = block.take().unwrap_or_default();
                        if status.is_none() {
                            match hpack_status(&whole) {
                                // Interim (100 Continue): the final response follows.
                                Some(s) if (100..200).contains(&s) => {}
                                Some(s) => status = Some(s),
                                None => return Reply::failed("undecodable :status"),
                            }
                        }
                        if end {
                            return finished(status, body);
                        }
                    }
                }
                DATA if id == 1 => {
                    let Some(data) = unpadded(kind, flags, &payload) else {
                        return Reply::failed("malformed DATA frame");
                    };
                    body.extend_from_slice(data);
                    if flags & END_STREAM != 0 {
                        return finished(status, body);
                    }
                    if !payload.is_empty() {
                        let credit = (payload.len() as u32).to_be_bytes();
                        frame(&mut answer, WINDOW_UPDATE, 0, 0, &credit);
                        frame(&mut answer, WINDOW_UPDATE, 0, 1, &credit);
                    }
                }
                _ => {}
            }
            if !answer.is_empty() {
                let _ = stream.write_all(&answer).await;
                let _ = stream.flush().await;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => received.extend_from_slice(&chunk[..n]),
            _ => {
                return match status {
                    Some(_) => finished(status, body),
                    None => Reply::failed("connection closed before a response"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What reached the backends, and the comparison.

/// One request a backend received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arrival {
    backend: String,
    target: String,
}

/// What the backend's echo says it received.
#[derive(Debug, Clone)]
struct Echo {
    method: String,
    headers: BTreeMap<String, String>,
    body: String,
}

fn echo_of(body: &[u8]) -> Option<Echo> {
    let seen: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |key: &str| seen.get(key)?.as_str().map(str::to_string);
    let headers = seen
        .get("headers")?
        .as_object()?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    Some(Echo {
        method: text("method")?,
        headers,
        body: text("body")?,
    })
}

/// One leg's observations.
struct Seen {
    leg: Leg,
    outcome: Outcome,
    /// The requests the backends received while the leg ran (this entry's only).
    arrivals: Vec<Arrival>,
    echo: Option<Echo>,
    /// How the proxy routed it, from its access log line (legs that reached a backend).
    routing: Option<String>,
}

impl Seen {
    fn reached(&self) -> bool {
        !self.arrivals.is_empty()
    }

    fn cell(&self) -> String {
        let backends: Vec<&str> = self.arrivals.iter().map(|a| a.backend.as_str()).collect();
        if backends.is_empty() {
            self.outcome.cell()
        } else {
            format!("{}>{}", self.outcome.cell(), backends.join("+"))
        }
    }
}

/// How many requests each backend has received so far.
fn seen_counts(stack: &Stack) -> Vec<usize> {
    stack
        .backends
        .iter()
        .map(|b| b.seen_targets().len())
        .collect()
}

/// The requests received since `before` (all of them with `before` empty).
fn arrivals_since(stack: &Stack, before: &[usize]) -> Vec<Arrival> {
    let mut out = Vec::new();
    for (i, backend) in stack.backends.iter().enumerate() {
        let from = before.get(i).copied().unwrap_or(0);
        for target in backend.seen_targets().into_iter().skip(from) {
            out.push(Arrival {
                backend: backend.name().to_string(),
                target,
            });
        }
    }
    out
}

/// The proxy's access log lines (JSON, on its stdout) for request id `id`, in order.
fn access_log(stack: &Stack, id: &str) -> Vec<serde_json::Value> {
    stack
        .tether
        .stdout()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["request_id"] == id)
        .collect()
}

/// Route, key source and key of the access log line after the first `logged` lines of
/// request id `id`, waiting for it (it is written when the exchange ends, off the request's
/// path, so it may trail the response by a moment).
async fn routing(stack: &Stack, id: &str, logged: usize) -> String {
    let appeared = wait_until_async(Duration::from_secs(5), || async move {
        access_log(stack, id).len() > logged
    })
    .await;
    match access_log(stack, id).get(logged) {
        Some(line) if appeared => format!(
            "route={} key_source={} key={}",
            line["route"], line["key_source"], line["key"]
        ),
        _ => "no access log line".to_string(),
    }
}

/// Header fields left out of the comparison, because they differ between the legs for reasons
/// of protocol or connection, not of the request:
/// - `x-forwarded-proto`: `http` from the plain listener, `https` from the TLS one; each leg's
///   value is checked against that instead ([`Leg::proto`]).
/// - `content-length`, `transfer-encoding`: the framing of the hop to the backend. HTTP/2 has
///   no chunked coding and a body needs no declared length there, so the proxy may frame the
///   same body either way; the bodies themselves are compared.
///
/// Everything else is compared, values included: `host` (the hop to the backend is HTTP/1.1
/// on every leg, and the proxy must make it from `:authority`, RFC 9113 8.3.1),
/// `x-forwarded-host`, `x-forwarded-for` (127.0.0.1, without a port, on every leg),
/// `x-request-id` (every leg sends the same, valid one) and `te` (the corpus sends TE only where
/// it tests it, the same on every leg, and `te: trailers` is legal on HTTP/2).
const NOT_COMPARED: [&str; 3] = ["x-forwarded-proto", "content-length", "transfer-encoding"];

fn compared_headers(echo: &Echo) -> BTreeMap<String, String> {
    echo.headers
        .iter()
        .filter(|(name, _)| !NOT_COMPARED.contains(&name.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

fn clip(text: &str) -> String {
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text.to_string()
    }
}

fn shown(value: Option<&String>) -> String {
    value.map_or_else(|| "(absent)".to_string(), |v| format!("{:?}", clip(v)))
}

/// Where leg `b` differs from leg `a`.
fn differences(a: &Seen, b: &Seen) -> Vec<String> {
    let (la, lb) = (a.leg.label(), b.leg.label());
    let mut out = Vec::new();
    if !a.outcome.same_as(&b.outcome) {
        out.push(format!(
            "status: {la} {} | {lb} {}",
            a.outcome.cell(),
            b.outcome.cell()
        ));
    }
    let describe = |s: &Seen| {
        s.arrivals
            .iter()
            .map(|x| format!("{} {}", x.backend, clip(&x.target)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (a.reached(), b.reached()) {
        (true, false) => out.push(format!(
            "reached a backend on {la} ({}) but not on {lb}",
            describe(a)
        )),
        (false, true) => out.push(format!(
            "reached a backend on {lb} ({}) but not on {la}",
            describe(b)
        )),
        (true, true) => {
            let backends = |s: &Seen| {
                s.arrivals
                    .iter()
                    .map(|x| x.backend.clone())
                    .collect::<Vec<_>>()
            };
            if backends(a) != backends(b) {
                out.push(format!(
                    "backend: {la} {:?} | {lb} {:?}",
                    backends(a),
                    backends(b)
                ));
            }
            if a.routing != b.routing {
                out.push(format!(
                    "routing: {la} {} | {lb} {}",
                    a.routing.as_deref().unwrap_or("-"),
                    b.routing.as_deref().unwrap_or("-")
                ));
            }
            let targets = |s: &Seen| {
                s.arrivals
                    .iter()
                    .map(|x| x.target.clone())
                    .collect::<Vec<_>>()
            };
            if targets(a) != targets(b) {
                out.push(format!(
                    "target: {la} {:?} | {lb} {:?}",
                    targets(a).iter().map(|t| clip(t)).collect::<Vec<_>>(),
                    targets(b).iter().map(|t| clip(t)).collect::<Vec<_>>()
                ));
            }
        }
        (false, false) => {}
    }
    match (&a.echo, &b.echo) {
        (Some(x), Some(y)) => {
            if x.method != y.method {
                out.push(format!("method: {la} {:?} | {lb} {:?}", x.method, y.method));
            }
            let (hx, hy) = (compared_headers(x), compared_headers(y));
            let names: BTreeSet<&String> = hx.keys().chain(hy.keys()).collect();
            for name in names {
                let (vx, vy) = (hx.get(name), hy.get(name));
                if vx != vy {
                    out.push(format!(
                        "header {name}: {la} {} | {lb} {}",
                        shown(vx),
                        shown(vy)
                    ));
                }
            }
            if x.body != y.body {
                out.push(format!(
                    "body: {la} {} bytes {:?} | {lb} {} bytes {:?}",
                    x.body.len(),
                    clip(&x.body),
                    y.body.len(),
                    clip(&y.body)
                ));
            }
        }
        (Some(_), None) if a.reached() && b.reached() && a.outcome.same_as(&b.outcome) => {
            out.push(format!("{la} got the backend's echo, {lb} did not"));
        }
        (None, Some(_)) if a.reached() && b.reached() && a.outcome.same_as(&b.outcome) => {
            out.push(format!("{lb} got the backend's echo, {la} did not"));
        }
        _ => {}
    }
    out
}

/// Checks of one leg on its own: the expected status, `X-Forwarded-Proto`, the forwarded
/// target's required text.
fn leg_checks(case: &Case, seen: &Seen) -> Vec<String> {
    let label = seen.leg.label();
    let mut out = Vec::new();
    if let Some(expected) = case.expect {
        if seen.outcome.status() != Some(expected) {
            out.push(format!(
                "{label}: got {}, expected {expected}",
                seen.outcome.cell()
            ));
        }
    }
    if let Some(echo) = &seen.echo {
        let proto = echo.headers.get("x-forwarded-proto");
        if proto.map(String::as_str) != Some(seen.leg.proto()) {
            out.push(format!(
                "{label}: x-forwarded-proto {}, expected {:?}",
                shown(proto),
                seen.leg.proto()
            ));
        }
    }
    if let Some(text) = case.forwarded_has {
        for arrival in &seen.arrivals {
            if !arrival.target.contains(text) {
                out.push(format!(
                    "{label}: forwarded target {:?} lost {text:?}",
                    arrival.target
                ));
            }
        }
    }
    out
}

/// Every difference of one entry.
fn judge(case: &Case, legs: &[Seen]) -> Vec<String> {
    let (tcp, tls, h2) = (&legs[0], &legs[1], &legs[2]);
    let mut out = differences(tcp, tls);
    out.extend(leg_checks(case, tcp));
    out.extend(leg_checks(case, tls));
    match case.h2 {
        H2::Same => {
            out.extend(differences(tcp, h2));
            out.extend(leg_checks(case, h2));
        }
        H2::SameOrReset(_) => {
            if h2.outcome.is_protocol_refusal() {
                if h2.reached() {
                    out.push(format!(
                        "h2 was reset ({}) yet reached a backend",
                        h2.outcome.cell()
                    ));
                }
            } else {
                out.extend(differences(tcp, h2));
                out.extend(leg_checks(case, h2));
            }
        }
        H2::Refused(why) => {
            let refused = h2.outcome.is_protocol_refusal()
                || h2.outcome.status().is_some_and(|s| (400..500).contains(&s));
            if !refused {
                out.push(format!(
                    "h2: got {}, expected a refusal ({why})",
                    h2.outcome.cell()
                ));
            }
            if h2.reached() {
                out.push(format!("h2: reached a backend, though malformed ({why})"));
            }
        }
        H2::Skip(_) => {}
    }
    for seen in legs {
        if let Outcome::Failed(why) = &seen.outcome {
            out.push(format!("{}: no answer: {why}", seen.leg.label()));
        }
    }
    out
}

/// How long a leg of an entry run again waits for its request to reach a backend.
const SETTLE: Duration = Duration::from_secs(1);

/// Runs the legs of entry `i`, one after the other. With `settle`, each leg waits (up to that
/// long) for a request of this entry to reach a backend before the next leg starts.
async fn run_case(
    stack: &Stack,
    target: &Target,
    case: &Case,
    tokens: &[String],
    i: usize,
    settle: Option<Duration>,
) -> Vec<Seen> {
    let own = tokens[i].as_str();
    let mut legs = Vec::new();
    for leg in LEGS {
        if let (Leg::H2, H2::Skip(_)) = (leg, case.h2) {
            legs.push(Seen {
                leg,
                outcome: Outcome::Skipped,
                arrivals: Vec::new(),
                echo: None,
                routing: None,
            });
            continue;
        }
        let before = seen_counts(stack);
        let logged = access_log(stack, &case.request_id).len();
        let reply = run_leg(target, case, leg).await;
        if let Some(deadline) = settle {
            let before = &before;
            wait_until_async(deadline, || async move {
                arrivals_since(stack, before)
                    .iter()
                    .any(|a| a.target.contains(own))
            })
            .await;
        }
        // Requests of other entries arriving late carry another token: not this leg's.
        let arrivals: Vec<Arrival> = arrivals_since(stack, &before)
            .into_iter()
            .filter(|a| {
                a.target.contains(own) || !tokens.iter().any(|t| a.target.contains(t.as_str()))
            })
            .collect();
        let echo = match reply.outcome {
            Outcome::Status(_) => echo_of(&reply.body),
            _ => None,
        };
        let routing = if arrivals.is_empty() {
            None
        } else {
            Some(routing(stack, &case.request_id, logged).await)
        };
        legs.push(Seen {
            leg,
            outcome: reply.outcome,
            arrivals,
            echo,
            routing,
        });
    }
    legs
}

/// The requests in `arrived` that carry `token` and that no leg claimed.
fn unclaimed_of(arrived: &[Arrival], token: &str, legs: &[Seen]) -> Vec<Arrival> {
    let mut left: Vec<Arrival> = arrived
        .iter()
        .filter(|a| a.target.contains(token))
        .cloned()
        .collect();
    for claimed in legs.iter().flat_map(|s| &s.arrivals) {
        if let Some(at) = left.iter().position(|a| a == claimed) {
            left.remove(at);
        }
    }
    left
}

/// Whether the legs' arrivals may be misattributed: the legs whose reaching a backend must
/// agree (the HTTP/2 leg unless it may or must be refused and was) disagree, one leg saw more
/// than one request, or some request was claimed by no leg.
fn suspicious(case: &Case, legs: &[Seen], unclaimed: &[Arrival]) -> bool {
    let compared: Vec<&Seen> = legs
        .iter()
        .filter(|s| match (s.leg, case.h2) {
            (Leg::Tcp | Leg::Tls, _) | (Leg::H2, H2::Same) => true,
            (Leg::H2, H2::SameOrReset(_)) => !s.outcome.is_protocol_refusal(),
            (Leg::H2, H2::Refused(_) | H2::Skip(_)) => false,
        })
        .collect();
    !unclaimed.is_empty()
        || legs.iter().any(|s| s.arrivals.len() > 1)
        || compared
            .iter()
            .any(|s| s.reached() != compared[0].reached())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_corpus_gets_the_same_treatment_over_http1_tls_and_http2() {
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf();
    let files: &[(&str, &[u8])] = &[("cert.pem", cert.as_bytes()), ("key.pem", key.as_bytes())];
    let tls_addr = free_addr();
    let config = CONFIG.replace("$TLS_PROXY", &tls_addr.to_string());
    let stack = Stack::start_with(
        &config,
        LaunchOptions {
            files,
            ..LaunchOptions::default()
        },
    )
    .await;
    let listening = wait_until_async(Duration::from_secs(10), || async move {
        TcpStream::connect(tls_addr).await.is_ok()
    })
    .await;
    assert!(listening, "TLS listener {tls_addr} never accepted");
    let target = Target {
        plain: stack.proxy,
        tls: tls_addr,
        ca: ca.cert.der().to_vec(),
    };

    let mut cases = corpus();
    let tokens: Vec<String> = (0..cases.len()).map(token).collect();
    for (case, token) in cases.iter_mut().zip(&tokens) {
        case.bind(token);
    }
    assert!(cases.len() >= 60, "the corpus has {} entries", cases.len());

    let mut results: Vec<Vec<Seen>> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        results.push(run_case(&stack, &target, case, &tokens, i, None).await);
    }

    // A request can reach a backend after the proxy has answered its leg (a body refused
    // half-way, after the head went on), so after the leg's window, or in the next leg's. An
    // entry whose legs disagree on reaching a backend, or with requests no leg claimed, is
    // run again with every leg waiting for its own request to arrive: that run is the one
    // judged.
    let everything = arrivals_since(&stack, &[]);
    let mut unclaimed: Vec<Vec<Arrival>> = cases
        .iter()
        .zip(&results)
        .map(|(case, legs)| unclaimed_of(&everything, &case.token, legs))
        .collect();
    let mut settled = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if !suspicious(case, &results[i], &unclaimed[i]) {
            continue;
        }
        let before = seen_counts(&stack);
        results[i] = run_case(&stack, &target, case, &tokens, i, Some(SETTLE)).await;
        unclaimed[i] = unclaimed_of(&arrivals_since(&stack, &before), &case.token, &results[i]);
        settled.push(i);
    }

    let mut failing = Vec::new();
    for (i, (case, legs)) in cases.iter().zip(&results).enumerate() {
        let mut diffs = judge(case, legs);
        if !unclaimed[i].is_empty() {
            diffs.push(format!(
                "{} request(s) of this entry reached a backend after the proxy had answered, \
                 from an unknown leg: {:?}",
                unclaimed[i].len(),
                unclaimed[i]
            ));
        }
        failing.push((i, diffs));
    }
    if !settled.is_empty() {
        println!(
            "\nentries run again, each leg waiting up to {SETTLE:?} for its request: {:?}",
            settled
                .iter()
                .map(|&i| format!("{i} {}", cases[i].name))
                .collect::<Vec<_>>()
        );
    }

    let row = |i: usize, case: &Case, legs: &[Seen]| {
        format!(
            "{:>3} {:<44} {:<12} {:<12} {:<22}",
            i,
            clip(case.name),
            legs[0].cell(),
            legs[1].cell(),
            legs[2].cell()
        )
    };
    let header = format!(
        "{:>3} {:<44} {:<12} {:<12} {:<22}",
        "#", "entry", "h1", "h1+tls", "h2"
    );
    if std::env::var_os("TETHER_DIFFERENTIAL_ALL").is_some() {
        println!("\nevery entry (status>backend that received it):\n{header}");
        for (i, (case, legs)) in cases.iter().zip(&results).enumerate() {
            println!("{}", row(i, case, legs));
            if let Some(why) = case.h2.note() {
                println!("      (h2 {}: {why})", case.h2.kind());
            }
        }
    }
    // TETHER_DIFFERENTIAL_SHOW=<entry number>: everything each leg of that entry saw.
    let show = std::env::var("TETHER_DIFFERENTIAL_SHOW").ok();
    if let Some(i) = show.and_then(|v| v.parse::<usize>().ok()) {
        for seen in results.get(i).into_iter().flatten() {
            println!(
                "\n{} {}: {} arrivals {:?}\n  routing {:?}\n  echo {:#?}",
                i,
                seen.leg.label(),
                seen.outcome.cell(),
                seen.arrivals,
                seen.routing,
                seen.echo
            );
        }
    }
    let failing: Vec<(usize, Vec<String>)> =
        failing.into_iter().filter(|(_, d)| !d.is_empty()).collect();
    if !failing.is_empty() {
        println!(
            "\ndifferential: {} of {} entries differ (status>backend that received it)\n{header}",
            failing.len(),
            cases.len()
        );
        for (i, diffs) in &failing {
            println!("{}", row(*i, &cases[*i], &results[*i]));
            for diff in diffs {
                println!("      - {diff}");
            }
            if let Some(why) = cases[*i].h2.note() {
                println!("      (h2 {}: {why})", cases[*i].h2.kind());
            }
        }
    }
    assert!(
        failing.is_empty(),
        "{} of {} corpus entries are not treated alike: {:?}",
        failing.len(),
        cases.len(),
        failing
            .iter()
            .map(|(i, _)| cases[*i].name)
            .collect::<Vec<_>>()
    );
}

#[test]
fn the_hand_written_hpack_reads_status_and_writes_integers() {
    // Indexed static entries.
    assert_eq!(hpack_status(&[0x88]), Some(200));
    assert_eq!(hpack_status(&[0x8d]), Some(404));
    // A table size update first, then a literal with incremental indexing of :status (8),
    // value "405" Huffman-coded: 011010 00000 011011 + seven padding ones.
    assert_eq!(
        hpack_status(&[0x3f, 0xe1, 0x1f, 0x48, 0x83, 0x68, 0x0d, 0xff]),
        Some(405)
    );
    // The same without indexing, value raw.
    assert_eq!(hpack_status(&[0x08, 0x03, b'4', b'1', b'3']), Some(413));
    // Integers: 10 fits a 5-bit prefix, 1337 does not (RFC 7541 C.1).
    let mut out = Vec::new();
    hpack_int(&mut out, 5, 0, 1337);
    assert_eq!(out, [31, 154, 10]);
    assert_eq!(hpack_read_int(&out, 5), Some((1337, 3)));
    assert_eq!(
        dechunk(b"5\r\nhello\r\n1;x=y\r\n!\r\n0\r\n\r\n").as_deref(),
        Some(&b"hello!"[..])
    );
}
