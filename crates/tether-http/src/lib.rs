//! The HTTP pieces of Tether that know no socket, shared by both engines of `tether-proxy` (its
//! HTTP/1 engine and its HTTP/2 engine) and fuzzed on their own:
//!
//! - [`checks`]: the request checks before routing (sizes, method, target bytes, `Host`,
//!   `Expect`, the WebSocket handshake) and their refusals;
//! - [`policy`]: the header policy (hop-by-hop fields, `Connection` nominations, client
//!   identity, Tether's forwarding fields and request id), written against
//!   [`policy::FieldWriter`];
//! - [`request`]: an HTTP/1 request head's facts and body framing, and the head a backend gets;
//! - [`framing`]: the one response-head validation; [`response`]: a response head edited for
//!   the client; [`chunked`]: the one chunked decoder;
//! - [`websocket`]: handshake key and accept, close frame, frame cursor.
//!
//! Every function here that reads bytes from the network has a fuzz target in `fuzz/`, through
//! [`fuzzing`].

pub mod checks;
pub mod chunked;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod request;
pub mod response;
pub mod websocket;
