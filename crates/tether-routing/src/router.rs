//! [`Router`]: the immutable routing table built from a config, and the decision for one request.

use tether_config::{Config, OnMissing, Route};

use std::borrow::Cow;
use std::fmt::Write;

use crate::normalize::normalize_path_cow;
use crate::pins::PinBook;
use crate::table::Table;
use crate::upstream::{Owner, UpstreamState};
use crate::{balance, Chosen, Decision, Key, KeySourceKind, Reject, RequestView};

/// The immutable routing table built from a `Config`.
#[derive(Debug)]
pub struct Router {
    table: Table,
    upstreams: Vec<UpstreamState>,
}

impl Router {
    /// Builds a router with fresh backend states (all up).
    pub fn new(config: &Config) -> Router {
        Router::build(config, None, &PinBook::default())
    }

    /// Builds a router reusing `BackendState`s of `previous` for backends (same upstream name and
    /// address) that remain, so health and load survive a reload.
    ///
    /// A backend whose weight changed gets a new state with the new weight that keeps its `up`
    /// flag (its `active` count starts again at 0).
    pub fn with_previous(config: &Config, previous: &Router) -> Router {
        let pins = PinBook::default();
        for upstream in &previous.upstreams {
            pins.upstream(&upstream.name).replace(&upstream.pins.all());
        }
        Router::build(config, Some(previous), &pins)
    }

    /// Builds a router whose upstreams keep their pins in `pins` (the proxy's book, which
    /// outlives every router), reusing `previous`'s backend states as
    /// [`Router::with_previous`] does.
    pub fn with_pins(config: &Config, previous: Option<&Router>, pins: &PinBook) -> Router {
        Router::build(config, previous, pins)
    }

    fn build(config: &Config, previous: Option<&Router>, pins: &PinBook) -> Router {
        let upstreams: Vec<UpstreamState> = config
            .upstreams
            .iter()
            .map(|upstream| {
                let old =
                    previous.and_then(|p| p.upstreams.iter().find(|u| u.name == upstream.name));
                UpstreamState::new(upstream, old, pins.upstream(&upstream.name))
            })
            .collect();
        Router {
            table: Table::new(&config.routes, &upstreams),
            upstreams,
        }
    }

    /// Routes one request: normalise path, first matching route, sticky key chain, owner lookup
    /// skipping backends that are down.
    ///
    /// Keyed requests (including `on_missing: client_ip`) go to the key's owner on the ketama
    /// ring whatever the upstream's balance; `random` picks a random up backend; non-sticky
    /// routes use the upstream's balance.
    pub fn decide(&self, req: &RequestView<'_>) -> Result<Decision, Reject> {
        let normalized_path = normalize_path_cow(req.path)?;
        let (route, compiled, upstream_index) = self
            .table
            .find(req, &normalized_path)
            .ok_or(Reject::NoRoute)?;
        let upstream = &self.upstreams[upstream_index];
        let up = |i: usize| upstream.backends.get(i).is_some_and(|b| b.is_available());

        let (key, key_source, backend) = match &compiled.sticky {
            None => (
                None,
                KeySourceKind::None,
                unpinned(balance::keyless(upstream, up)),
            ),
            Some(sticky) => match sticky
                .extract(req, &normalized_path)
                .map_err(|_| Reject::BadKey { route })?
            {
                Some((key, source)) => {
                    let owner = upstream.owner(&key, up);
                    (Some(key), source, owner)
                }
                None => match (sticky.on_missing, req.client_ip) {
                    (OnMissing::Reject, _) => return Err(Reject::MissingKey { route }),
                    (OnMissing::ClientIp, Some(ip)) => {
                        // Formatted on the stack: an address is at most 45 characters.
                        let mut text = arrayvec::ArrayString::<64>::new();
                        let _ = write!(text, "{ip}");
                        let key = Key::new(&text);
                        let owner = upstream.owner(&key, up);
                        (Some(key), KeySourceKind::ClientIp, owner)
                    }
                    // `client_ip` without a client IP behaves as `random`.
                    (OnMissing::Random | OnMissing::ClientIp, _) => (
                        None,
                        KeySourceKind::Random,
                        unpinned(balance::random(upstream, up)),
                    ),
                },
            },
        };

        let Owner { backend, chosen } = backend.ok_or(Reject::NoHealthyBackend {
            route,
            upstream: upstream_index,
        })?;
        Ok(Decision {
            route,
            key,
            key_source,
            upstream: upstream_index,
            backend,
            chosen,
            address: upstream.backends[backend].address,
            normalized_path: match normalized_path {
                Cow::Borrowed(_) => None,
                Cow::Owned(path) => Some(path),
            },
        })
    }

    /// The next backend for a retry of `decision`, skipping backends that are down or listed in
    /// `exclude` (backend indices already tried). For ketama with a key: the next distinct owner
    /// clockwise on the ring from the key's point. None if no backend is left.
    ///
    /// `decision.backend` itself is always skipped, listed in `exclude` or not. Keyless decisions
    /// use the upstream's balance (`random` ones a random backend).
    pub fn next_backend(&self, decision: &Decision, exclude: &[usize]) -> Option<usize> {
        let upstream = self.upstreams.get(decision.upstream)?;
        let usable = |i: usize| {
            i != decision.backend
                && !exclude.contains(&i)
                && upstream.backends.get(i).is_some_and(|b| b.is_available())
        };
        match (&decision.key, decision.key_source) {
            (Some(key), _) => upstream.owner(key, usable).map(|owner| owner.backend),
            (None, KeySourceKind::Random) => balance::random(upstream, usable),
            (None, _) => balance::keyless(upstream, usable),
        }
    }

    /// Owner of `key` in upstream `upstream` considering health (ketama: ring walk past down
    /// backends). None if every backend is down. Used by the CLI and convergence.
    ///
    /// This is the pinned backend or the ring owner for every balance, since keyed requests
    /// always use the ring.
    pub fn owner(&self, upstream: usize, key: &str) -> Option<usize> {
        let upstream = self.upstreams.get(upstream)?;
        upstream
            .owner(key, |i| {
                upstream.backends.get(i).is_some_and(|b| b.is_available())
            })
            .map(|owner| owner.backend)
    }

    /// Routes in file order (the validated config entries).
    pub fn routes(&self) -> &[Route] {
        &self.table.routes
    }

    /// The index of the upstream named `name`.
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamState> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Upstreams in file order.
    pub fn upstreams(&self) -> &[UpstreamState] {
        &self.upstreams
    }

    /// True while some key's owner may change with time alone: a returned backend is still
    /// taking its keys back (`failback_after`, `ramp`). Every other change of an owner comes
    /// from an event the proxy signals (health, drain, pins, reloads, membership).
    pub fn owners_follow_clock(&self) -> bool {
        self.upstreams
            .iter()
            .flat_map(|u| &u.backends)
            .any(|b| b.returned_at().is_some())
    }
}

/// A backend chosen without a key, by the upstream's balance.
fn unpinned(backend: Option<usize>) -> Option<Owner> {
    backend.map(|backend| Owner {
        backend,
        chosen: Chosen::Balance,
    })
}
