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
