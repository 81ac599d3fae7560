//! [`DemoError`]: why demo app servers could not start.

use std::net::SocketAddr;

/// Why demo app servers could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The server name cannot be sent as a header value.
    #[error("{0:?} cannot be an app server name")]
    InvalidName(String),
    /// The listening address is taken or not allowed.
    #[error("an app server cannot listen on {addr}")]
    Bind {
        /// Where it tried to listen.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `first_port + count` goes past port 65535.
    #[error("{count} app servers do not fit in the ports from {first_port}")]
    PortRange {
        /// The first port asked for.
        first_port: u16,
        /// How many servers.
        count: usize,
    },
    /// The runtime or its thread could not be created.
    #[error("cannot start the app servers' runtime")]
    Runtime(#[source] std::io::Error),
    /// The app servers' thread ended before it said whether they started.
    #[error("the app servers' thread ended while starting")]
    ThreadDied,
}
