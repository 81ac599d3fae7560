//! The exchange core: the steps both engines (HTTP/1 in `crate::h1`, HTTP/2 in `crate::h2`)
//! take the same way that need the running state. The pieces that need none (checks, header
//! policy, framing, the chunked decoder, WebSocket frames) are the `tether-http` crate.
//!
//! - [`admission`]: a router's refusal as a status, the body and rate limits of a route;
//! - [`attempt`]: the backend attempt (owner walk, retry budget, connect, what counts as a
//!   backend's fault for passive health);
//! - [`placement`]: a new document's placement agreed with the fleet (bounded load over etcd);
//! - [`record`]: the exchange's kind (one classification) and its record (metrics, access log).

pub mod admission;
pub mod attempt;
pub mod placement;
pub mod record;

/// Largest request body with a declared length that both engines read whole before sending
/// anything, so it leaves with its head in one write (and can be sent again on a fresh
/// connection when a kept one turns out stale), as HAProxy's 16 KiB buffer and nginx's
/// `client_body_buffer_size` hold one. Larger bodies, and bodies behind `Expect:
/// 100-continue`, stream.
pub(crate) const GATHER_LIMIT: u64 = 16 * 1024;
