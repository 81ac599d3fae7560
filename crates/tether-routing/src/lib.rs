//! # tether-routing
//! Tether's routing decision as a pure function: request in, backend out. No sockets, no Pingora
//! proxy types, no locks.
//!
//! A [`Router`] is built once from a validated [`Config`] and is immutable; the proxy keeps it behind
//! an `ArcSwap` and builds a new one on reload ([`Router::with_previous`] carries backend health and
//! load over). For every request, [`Router::decide`]:
//!
//! 1. normalises the path (dot segments resolved, `//` merged, see [`normalize`] for the exact rules),
//! 2. picks the first route in file order whose host, path, methods and headers all match,
//! 3. extracts the sticky key from the route's chain of sources (header, cookie, query, path
//!    pattern; first present wins) or applies `on_missing`,
//! 4. finds the key's owner on the upstream's ketama ring, walking clockwise past backends that
//!    are down.
//!
//! **The promise:** for the same backend addresses and weights, a key's owner is exactly the
//! server nginx picks with `hash $key consistent` (160 points per weight unit, CRC32 of
//! `ip\0port`; the ring is [`pingora_ketama`]'s port of nginx), so Tether can be A/B tested
//! against nginx. Keyed requests always use the ring, whatever the upstream's `balance`:
//! stickiness is the product. `balance` (round robin, least connections) only spreads requests that
//! carry no key (non-sticky routes; ketama without a key means round robin).
//!
//! ```
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use tether_config::*;
//! use tether_routing::{KeySourceKind, RequestView, Router};
//!
//! let backend = |a: &str| Backend { address: a.parse().unwrap(), weight: 1 };
//! let config = Config {
//!     server: Server::default(),
//!     listeners: vec![Listener { address: "127.0.0.1:8080".parse().unwrap(), tls: None }],
//!     admin: Admin::default(),
//!     upstreams: vec![Upstream {
//!         name: "docs".into(),
//!         backends: vec![backend("10.0.0.1:443"), backend("10.0.0.2:443"), backend("10.0.0.3:443")],
//!         discovery: None,
//!         balance: Balance::Ketama,
//!         connect_timeout: Duration::from_secs(1),
//!         health_check: None,
//!         passive: None,
//!         rebalance: Rebalance::default(),
//!         bounded_load: None,
//!     }],
//!     routes: vec![Route {
//!         name: "doc-live".into(),
//!         matcher: RouteMatch {
//!             path: Some(PathMatch::Prefix("/docs/".into())),
//!             ..RouteMatch::default()
//!         },
//!         sticky: Some(Sticky {
//!             keys: vec![KeySource::Header("x-doc-id".into()), KeySource::Path("/docs/{key}".into())],
//!             on_missing: OnMissing::Reject,
//!         }),
//!         upstream: "docs".into(),
//!         timeouts: Timeouts { read: Duration::from_secs(60), idle: Duration::from_secs(3600) },
//!         retries: 2,
//!         long_poll: false,
//!         max_body: 1 << 20,
//!         rate_limit: None,
//!         limits: Default::default(),
//!     }],
//! };
//! let router = Router::new(&config);
//!
//! let headers = http::HeaderMap::new();
//! let request = RequestView {
//!     method: "GET",
//!     host: Some("docs.example.com"),
//!     path: "/docs/./42//ws",
//!     query: None,
//!     headers: (&headers).into(),
//!     client_ip: None,
//! };
//! let decision = router.decide(&request).unwrap();
//! assert_eq!(decision.path(request.path), "/docs/42/ws");
//! assert_eq!(decision.key.as_deref(), Some("42"));
//! assert_eq!(decision.key_source, KeySourceKind::Path);
//! // The same owner nginx `hash $key consistent` would pick:
//! assert_eq!(decision.address, "10.0.0.3:443".parse::<SocketAddr>().unwrap());
//! assert_eq!(router.owner(0, "42"), Some(decision.backend));
//! ```
//!
//! What it does not do: parse configuration (`tether-config`), talk to backends, run health
//! checks or count connections (the proxy updates [`BackendState`]'s atomics).

use std::net::{IpAddr, SocketAddr};

pub use tether_config::{Balance, Config, OnMissing};

mod balance;
pub mod change;
pub mod described;
mod headers;
mod key;
mod keys;
pub mod normalize;
mod percent;
pub mod pins;
pub mod placements;
mod ring;
mod router;
pub mod share;
mod table;
mod upstream;

pub use headers::{Headers, Values};
pub use key::Key;
pub use keys::is_usable_key;
pub use pins::{PinBook, Pins};
pub use router::Router;
pub use upstream::{clock, BackendState, UpstreamState};

/// A request as the router sees it: borrowed parts, no sockets.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method, e.g. "GET".
    pub method: &'a str,
    /// Host from the Host header or the absolute URI (may include ":port"); None if absent.
    pub host: Option<&'a str>,
    /// Raw path as received (percent-encoded, no query), e.g. "/docs/a%2Fb/../x".
    pub path: &'a str,
    /// Raw query string without '?', if any.
    pub query: Option<&'a str>,
    /// Request headers (Cookie headers are parsed from here).
    pub headers: Headers<'a>,
    /// The client's IP (used by `on_missing: client_ip`).
    pub client_ip: Option<IpAddr>,
}

/// Where the sticky key of a decision came from (the metric label `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySourceKind {
    /// A request header.
    Header,
    /// A cookie.
    Cookie,
    /// A query parameter.
    Query,
    /// The `{key}` segment of a path pattern.
    Path,
    /// `on_missing: client_ip`: the client's IP address.
    ClientIp,
    /// `on_missing: random` (or `client_ip` without a client IP): no key.
    Random,
    /// route is not sticky
    None,
}

impl KeySourceKind {
    /// Lower-case label: header|cookie|query|path|client_ip|random|none.
    pub fn as_str(self) -> &'static str {
        match self {
            KeySourceKind::Header => "header",
            KeySourceKind::Cookie => "cookie",
            KeySourceKind::Query => "query",
            KeySourceKind::Path => "path",
            KeySourceKind::ClientIp => "client_ip",
            KeySourceKind::Random => "random",
            KeySourceKind::None => "none",
        }
    }
}

/// What chose a decision's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// An operator pinned the key to it.
    Pin,
    /// `bounded_load` placed the document there.
    Placement,
    /// `bounded_load` placed the document there just now, and the upstream's fleet has yet to
    /// agree (see [`UpstreamState::shares_placements`]).
    NewPlacement,
    /// The key's owner on the ring.
    Ring,
    /// No key: the upstream's balance.
    Balance,
}

impl Chosen {
    /// `pinned`, `placed`, `ring` or `balance`: the `reason` of `/route` and `tether route`.
    pub fn as_str(self) -> &'static str {
        match self {
            Chosen::Pin => "pinned",
            Chosen::Placement | Chosen::NewPlacement => "placed",
            Chosen::Ring => "ring",
            Chosen::Balance => "balance",
        }
    }
}

/// Keys longer than this many bytes are bad keys (400).
pub const MAX_KEY_LEN: usize = 256;

/// The outcome of routing one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index into `Router::routes()`.
    pub route: usize,
    /// The sticky key, if any (None for non-sticky routes and `random`).
    pub key: Option<Key>,
    /// Where the key came from.
    pub key_source: KeySourceKind,
    /// Index into `Router::upstreams()`.
    pub upstream: usize,
    /// Index of the chosen backend within the upstream.
    pub backend: usize,
    /// What chose the backend: a pin, a placement, the ring or the balance.
    pub chosen: Chosen,
    /// The chosen backend's address (same as `upstreams()[upstream].backends[backend].address`).
    pub address: SocketAddr,
    /// The normalised path the route matched on, when normalising changed the request's path;
    /// `None` when the request's path was already normal (nearly always), which spares a copy
    /// per request. [`Decision::path`] gives the path either way.
    pub normalized_path: Option<String>,
}

impl Decision {
    /// The normalised path the route matched on, given the request's raw `path`.
    pub fn path<'a>(&'a self, raw_path: &'a str) -> &'a str {
        self.normalized_path.as_deref().unwrap_or(raw_path)
    }

    /// Why this backend: `pinned`, `placed`, `ring` or `balance` (see [`Chosen`]).
    pub fn reason(&self) -> &'static str {
        self.chosen.as_str()
    }
}

/// Why a request cannot be routed; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Path cannot be normalised safely (e.g. `..` above root, encoded `/` or `..` escaping the prefix): 400.
    #[error("bad path: {0}")]
    BadPath(&'static str),
    /// No route matches: 404.
    #[error("no route matches")]
    NoRoute,
    /// Sticky route, no key, `on_missing: reject`: 400. Carries the route index.
    #[error("missing sticky key")]
    MissingKey {
        /// Index into `Router::routes()`.
        route: usize,
    },
    /// Sticky route, a key source is present but its value is unusable (too long, control
    /// characters, bad encoding): 400. Carries the route index.
    #[error("invalid sticky key")]
    BadKey { route: usize },
    /// Every backend of the upstream is down: 503.
    #[error("no healthy backend")]
    NoHealthyBackend {
        /// Index into `Router::routes()`.
        route: usize,
        /// Index into `Router::upstreams()`.
        upstream: usize,
    },
}

impl Reject {
    /// The HTTP status code for this rejection (400/404/503).
    pub fn status(&self) -> u16 {
        match self {
            Reject::BadPath(_) | Reject::MissingKey { .. } | Reject::BadKey { .. } => 400,
            Reject::NoRoute => 404,
            Reject::NoHealthyBackend { .. } => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_can_be_shared_across_worker_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Router>();
    }

    #[test]
    fn rejections_map_to_their_http_status() {
        assert_eq!(Reject::BadPath("x").status(), 400);
        assert_eq!(Reject::NoRoute.status(), 404);
        assert_eq!(Reject::MissingKey { route: 0 }.status(), 400);
        assert_eq!(
            Reject::NoHealthyBackend {
                route: 0,
                upstream: 0
            }
            .status(),
            503
        );
    }

    #[test]
    fn key_source_labels_are_the_metric_labels() {
        let all = [
            (KeySourceKind::Header, "header"),
            (KeySourceKind::Cookie, "cookie"),
            (KeySourceKind::Query, "query"),
            (KeySourceKind::Path, "path"),
            (KeySourceKind::ClientIp, "client_ip"),
            (KeySourceKind::Random, "random"),
            (KeySourceKind::None, "none"),
        ];
        for (kind, label) in all {
            assert_eq!(kind.as_str(), label);
        }
    }
}
