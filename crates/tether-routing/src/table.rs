//! The route table: the first route, in file order, whose conditions all hold.
//!
//! - **host**: compared case-insensitively without the port (and without a trailing dot).
//!   `*.example.com` matches any subdomain, at any depth (`a.example.com`, `a.b.example.com`),
//!   but not `example.com` itself. A route with a host never matches a request without one.
//! - **path**: `Prefix` is a string prefix of the normalised path, `Exact` is equality.
//! - **methods**: exact (methods are case-sensitive); empty means any method.
//! - **headers**: every listed header has a value exactly equal to the configured one (when a
//!   header is repeated, any of its values may match).
//!
//! A route naming an upstream that does not exist (impossible after config validation) never
//! matches.

use http::HeaderName;
use tether_config::{PathMatch, Route};

use crate::keys::StickyPolicy;
use crate::upstream::UpstreamState;
use crate::RequestView;

/// Routes in file order with what each needs precomputed for matching.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) routes: Vec<Route>,
    compiled: Vec<CompiledRoute>,
}

/// The parts of a route that are prepared once instead of per request.
#[derive(Debug)]
pub(crate) struct CompiledRoute {
    host: HostMatch,
    /// `None` for an invalid header name: the condition can never hold.
    headers: Vec<(Option<HeaderName>, String)>,
    /// Index of the route's upstream; `None` if the name is unknown.
    upstream: Option<usize>,
    /// The sticky policy; `None` for a non-sticky route.
    pub(crate) sticky: Option<StickyPolicy>,
}

#[derive(Debug)]
enum HostMatch {
    Any,
    /// Lower-cased host.
    Exact(String),
    /// Lower-cased suffix including the leading dot, e.g. `.example.com`.
    Subdomain(String),
}

impl Table {
    pub(crate) fn new(routes: &[Route], upstreams: &[UpstreamState]) -> Table {
        let compiled = routes
            .iter()
            .map(|route| CompiledRoute {
                host: match route.matcher.host.as_deref().map(str::to_ascii_lowercase) {
                    None => HostMatch::Any,
                    Some(host) => match host.strip_prefix('*') {
                        Some(suffix) => HostMatch::Subdomain(suffix.to_owned()),
                        None => HostMatch::Exact(host),
                    },
                },
                headers: route
                    .matcher
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        (HeaderName::from_bytes(name.as_bytes()).ok(), value.clone())
                    })
                    .collect(),
                upstream: upstreams.iter().position(|u| u.name == route.upstream),
                sticky: route.sticky.as_ref().map(StickyPolicy::new),
            })
            .collect();
        Table {
            routes: routes.to_vec(),
            compiled,
        }
    }

    /// The first matching route: its index, prepared parts and upstream index.
    pub(crate) fn find(
        &self,
        req: &RequestView<'_>,
        normalized_path: &str,
    ) -> Option<(usize, &CompiledRoute, usize)> {
        // Stripped once, and only if some route looks at the host (most tables do not).
        let host = std::cell::OnceCell::new();
        let host = || *host.get_or_init(|| req.host.map(bare_host));
        self.routes
            .iter()
            .zip(&self.compiled)
            .enumerate()
            .find_map(|(index, (route, compiled))| {
                let upstream = compiled.upstream?;
                let matches = compiled.host.matches(host)
                    && path_matches(route.matcher.path.as_ref(), normalized_path)
                    && (route.matcher.methods.is_empty()
                        || route.matcher.methods.iter().any(|m| m == req.method))
                    && compiled.headers.iter().all(|(name, value)| {
                        name.as_ref().is_some_and(|name| {
                            req.headers.values(name).any(|v| v == value.as_bytes())
                        })
                    });
                matches.then_some((index, compiled, upstream))
            })
    }
}

impl HostMatch {
    /// Whether the request's bare host (computed by `host` only when needed) matches.
    fn matches<'a>(&self, host: impl FnOnce() -> Option<&'a str>) -> bool {
        if matches!(self, HostMatch::Any) {
            return true;
        }
        match (self, host()) {
            (HostMatch::Any, _) => true,
            (_, None) => false,
            (HostMatch::Exact(expected), Some(host)) => host.eq_ignore_ascii_case(expected),
            (HostMatch::Subdomain(suffix), Some(host)) => {
                let (host, suffix) = (host.as_bytes(), suffix.as_bytes());
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

fn path_matches(condition: Option<&PathMatch>, path: &str) -> bool {
    match condition {
        None => true,
        Some(PathMatch::Prefix(prefix)) => path.starts_with(prefix.as_str()),
        Some(PathMatch::Exact(exact)) => path == exact,
    }
}

/// The host without its port and trailing dot: `Docs.Example.com.:8080` -> `Docs.Example.com`.
fn bare_host(host: &str) -> &str {
    let host = if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop what follows `]`.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_strips_port_and_trailing_dot() {
        assert_eq!(bare_host("docs.example.com:8080"), "docs.example.com");
        assert_eq!(bare_host("docs.example.com."), "docs.example.com");
        assert_eq!(bare_host("docs.example.com"), "docs.example.com");
        assert_eq!(bare_host("[::1]:8080"), "[::1]");
    }

    #[test]
    fn exact_host_ignores_case() {
        let m = HostMatch::Exact("docs.example.com".into());
        assert!(m.matches(|| Some("Docs.EXAMPLE.com")));
        assert!(!m.matches(|| Some("other.example.com")));
        assert!(!m.matches(|| None));
    }

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        let m = HostMatch::Subdomain(".example.com".into());
        assert!(m.matches(|| Some("a.example.com")));
        assert!(m.matches(|| Some("a.b.Example.COM")));
        assert!(!m.matches(|| Some("example.com")));
        assert!(!m.matches(|| Some("badexample.com")));
        assert!(!m.matches(|| Some(".example.com")));
        assert!(!m.matches(|| None));
    }

    #[test]
    fn path_conditions_use_prefix_or_equality() {
        let prefix = PathMatch::Prefix("/docs/".into());
        let exact = PathMatch::Exact("/docs".into());
        assert!(path_matches(Some(&prefix), "/docs/a"));
        assert!(!path_matches(Some(&prefix), "/docs"));
        assert!(path_matches(Some(&exact), "/docs"));
        assert!(!path_matches(Some(&exact), "/docs/"));
        assert!(path_matches(None, "/anything"));
    }
}
