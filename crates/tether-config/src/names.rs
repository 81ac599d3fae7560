//! The YAML spellings of the model's enums, shared by parsing and rendering.

use crate::model::{Balance, KeySource, OnMissing};

/// Every `balance:` value with its spelling.
pub(crate) const BALANCES: [(&str, Balance); 3] = [
    ("ketama", Balance::Ketama),
    ("round_robin", Balance::RoundRobin),
    ("least_connections", Balance::LeastConnections),
];

/// Every `on_missing:` value with its spelling.
pub(crate) const ON_MISSING: [(&str, OnMissing); 3] = [
    ("reject", OnMissing::Reject),
    ("random", OnMissing::Random),
    ("client_ip", OnMissing::ClientIp),
];

/// The keys that name a sticky key source.
pub(crate) const KEY_SOURCES: [&str; 4] = ["header", "cookie", "query", "path"];

impl Balance {
    /// The config spelling: `ketama`, `round_robin` or `least_connections`.
    pub fn as_str(self) -> &'static str {
        BALANCES
            .iter()
            .find(|(_, b)| *b == self)
            .map_or("ketama", |(name, _)| name)
    }
}

impl OnMissing {
    /// The config spelling: `reject`, `random` or `client_ip`.
    pub fn as_str(self) -> &'static str {
        ON_MISSING
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("reject", |(name, _)| name)
    }
}

impl KeySource {
    /// The source kind as written in config and metrics: `header`, `cookie`, `query` or `path`.
    pub fn kind(&self) -> &'static str {
        match self {
            KeySource::Header(_) => "header",
            KeySource::Cookie(_) => "cookie",
            KeySource::Query(_) => "query",
            KeySource::Path(_) => "path",
        }
    }

    /// The header/cookie/query name or the path pattern.
    pub fn value(&self) -> &str {
        match self {
            KeySource::Header(v)
            | KeySource::Cookie(v)
            | KeySource::Query(v)
            | KeySource::Path(v) => v,
        }
    }
}
