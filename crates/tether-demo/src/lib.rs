//! A small collaborative-document app server: the app behind `tether demo`.
//!
//! Each server keeps every document's text and its viewers **in its own memory**. That is the
//! point of the demo: people editing one document only see each other if every one of their
//! requests reaches the same server, which is what Tether's sticky routing does.
//!
//! - `/`: create or open a document; `/docs/{id}`: a shared text editor that shows which server
//!   answered and how many people are on the document. The same URLs work under `/unpinned/`.
//! - Three push transports, picked on the page: WebSocket (`/docs/{id}/ws`), Server-Sent Events
//!   (`/docs/{id}/events`) and long-poll (`/poll/docs/{id}`), the last two with edits sent by
//!   `POST /docs/{id}/ops`. An edit is pushed to every viewer as soon as it is applied.
//! - Merging: operational transformation ([`ot`]). The server applies edits in arrival order,
//!   each numbered by a revision; an edit made on an older revision is first transformed past
//!   the ones applied since, so concurrent edits never lose text.
//! - When Tether moves a document's viewers to a server that has never seen it (their server
//!   was drained or failed), the first client to arrive carries its copy of the text over, so
//!   a rebalance shows up as a move to another server.
//! - `/docs/{id}/state` (JSON, with the server's name and address), `/healthz`; every response
//!   carries `x-app-server: <name>`.
//! - Pages, script and style are embedded in the binary.
//!
//! It is not a product: documents live only in memory, are never removed, and a server holds
//! at most [`docs::MAX_DOCUMENTS`] of at most [`document::MAX_CHARS`] characters.
//!
//! ```
//! use tether_demo::AppServer;
//! use tether_testkit::{http_get, http_request};
//!
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = AppServer::start("app-1", "127.0.0.1:0".parse()?).await?;
//! let base = format!("http://{}", server.addr());
//!
//! let edit = r#"{"rev": 0, "seq": 1, "op": ["hello"]}"#;
//! let posted = http_request(http::Method::POST, &format!("{base}/docs/notes/ops?client=c1"), &[], edit).await?;
//! assert_eq!(posted.json()?["rev"], 1);
//!
//! let state = http_get(&format!("{base}/docs/notes/state"), &[]).await?;
//! assert_eq!(state.header("x-app-server"), Some("app-1"));
//! assert_eq!(state.json()?["text"], "hello");
//! server.stop().await;
//! # Ok(())
//! # }
//! ```

mod assets;
pub mod docs;
pub mod document;
mod error;
mod long_poll;
pub mod ot;
mod routes;
mod server;
mod sse;
mod websocket;

pub use error::DemoError;
pub use long_poll::POLL_WAIT;
pub use server::{spawn_in_background, AppServer};
