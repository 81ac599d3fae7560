//! The exchange core: what both engines (HTTP/1 in `crate::h1`, HTTP/2 in `crate::h2`) do
//! the same way, written once and free of sockets' protocol details.
//!
//! - [`checks`]: the request checks before routing (sizes, method, target bytes, `Host`,
//!   WebSocket handshake) and their refusals;
//! - [`policy`]: the header policy (hop-by-hop fields, `Connection` nominations, client
//!   identity, Tether's forwarding fields and request id), written against [`policy::FieldWriter`];
//! - [`framing`]: the one response-head validation; [`chunked`]: the one chunked decoder;
//! - [`admission`]: a router's refusal as a status, the body and rate limits of a route;
//! - [`attempt`]: the backend attempt (owner walk, retry budget, connect, what counts as a
//!   backend's fault for passive health);
//! - [`record`]: the exchange's kind (one classification) and its record (metrics, access log);
//! - [`websocket`]: handshake key and accept, close frame, frame cursor.

pub mod admission;
pub mod attempt;
pub mod checks;
pub mod chunked;
pub mod framing;
pub mod policy;
pub mod record;
pub mod websocket;
