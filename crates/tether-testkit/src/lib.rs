//! Support for Tether's end-to-end tests: real backends, the real `tether` process, and clients.
//!
//! Everything runs on `127.0.0.1` with ports picked by the OS, on a tokio runtime:
//!
//! - [`TestBackend`]: an app server that echoes what it received as JSON, echoes WebSocket
//!   messages, streams timestamped SSE, long-polls, answers slowly, toggles its `/healthz`,
//!   counts requests and open WebSockets, and can be stopped like a killed process. Every
//!   response carries `x-backend: <name>`, so a test sees where the proxy sent it.
//! - [`TetherProcess`]: runs `tether run -c <file>` from a temp dir, waits for its admin
//!   `/healthz`, captures its output, sends it signals, and kills it on drop.
//! - Clients, one new connection per call: [`http_get`], [`http_request`], [`ws_connect`],
//!   [`sse_events`] / [`sse_connect`], and [`raw_request`] for malformed bytes.
//! - [`wait_until`] / [`wait_until_async`] to poll with a deadline instead of sleeping, and
//!   [`free_port`] for addresses a config must name before anything listens on them.
//!
//! It does not test the proxy itself; the tests in the workspace's `tests/` do, with this.
//!
//! ```
//! use tether_testkit::{http_get, TestBackend};
//!
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> Result<(), tether_testkit::TestkitError> {
//! let backend = TestBackend::start("a").await;
//! let response = http_get(&backend.url("/docs/abc"), &[("x-doc-id", "abc")]).await?;
//! assert_eq!(response.header("x-backend"), Some("a"));
//! let seen = response.json()?;
//! assert_eq!(seen["path"], "/docs/abc");
//! assert_eq!(seen["headers"]["x-doc-id"], "abc");
//!
//! backend.stop().await;
//! assert!(http_get(&backend.url("/"), &[]).await.is_err());
//! # Ok(())
//! # }
//! ```

mod backend;
mod client;
mod clock;
mod error;
mod process;
mod wait;

pub use backend::TestBackend;
pub use client::{
    http_get, http_request, https_requests, raw_request, raw_request_within, raw_status,
    sse_connect, sse_events, tls_connect, ws_connect, wss_connect, Alpn, HttpResponse, SseEvent,
    SseStream, TlsConnection, WsClient, WssClient, HTTP_TIMEOUT,
};
pub use clock::unix_micros;
pub use error::{Result, TestkitError};
pub use process::{LaunchOptions, TetherProcess, READY_DEADLINE};
pub use wait::{free_addr, free_port, wait_until, wait_until_async};

/// Signals for [`TetherProcess::signal`].
pub use nix::sys::signal::Signal;
/// WebSocket message type, for sending on and matching what a [`WsClient`] receives.
pub use tokio_tungstenite::tungstenite::Message;
