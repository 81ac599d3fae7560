//! Errors of the membership sources and the etcd client.

/// What went wrong talking to a membership source.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No TCP connection to the etcd endpoint (refused, unreachable, timed out).
    #[error("cannot connect to etcd at {endpoint}: {reason}")]
    Connect {
        /// `host:port` tried.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The HTTP exchange with etcd failed midway.
    #[error("etcd at {endpoint}: {reason}")]
    Http {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// etcd answered, but not with success.
    #[error("etcd at {endpoint} answered {status}: {body}")]
    Status {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// The start of the body (etcd's error message).
        body: String,
    },
    /// etcd's answer could not be understood.
    #[error("unexpected answer from etcd at {endpoint}: {reason}")]
    Decode {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The request took longer than allowed.
    #[error("etcd at {endpoint} did not answer within {after:?}")]
    Timeout {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// The limit.
        after: std::time::Duration,
    },
    /// The watched revision was compacted away: a full load is needed.
    #[error("watch revision {requested} was compacted (oldest kept: {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// etcd's compaction revision.
        compacted: i64,
    },
    /// The lease is gone (expired or revoked).
    #[error("lease {0} no longer exists")]
    LeaseGone(i64),
    /// A DNS lookup failed.
    #[error("DNS lookup of {name}: {reason}")]
    Dns {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
}
