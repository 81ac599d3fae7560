//! The one error type of the testkit.

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use http::StatusCode;

/// Everything that can go wrong while starting backends or processes, or talking to them.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A socket, file or process operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The URL could not be used (not `http://` / `ws://`, or no host).
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A header name or value, or another part of a request, was invalid.
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
    /// The HTTP exchange failed (connection closed, malformed response, ...).
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The WebSocket handshake or stream failed.
    #[error("WebSocket error: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    /// The server answered a WebSocket upgrade with something other than 101.
    #[error("WebSocket upgrade rejected with {status}: {body}")]
    UpgradeRejected {
        /// The status the server sent instead of 101.
        status: StatusCode,
        /// The response body, lossily decoded.
        body: String,
    },
    /// An operation did not finish within its deadline.
    #[error("timed out after {after:?} while {during}")]
    Timeout {
        /// How long was waited.
        after: Duration,
        /// What was being waited for.
        during: &'static str,
    },
    /// A body was not the JSON it was expected to be.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A backend name cannot be sent as the `x-backend` header value.
    #[error("backend name {0:?} is not a valid header value")]
    InvalidBackendName(String),
    /// The config passed to `TetherProcess` does not mention the admin port it was told to poll.
    #[error("the config does not mention the admin address {0} (admin.address)")]
    AdminNotInConfig(SocketAddr),
    /// The tether process exited before its admin `/healthz` answered 200.
    #[error("tether exited before it was healthy ({status}); stderr:\n{stderr}")]
    ProcessExited {
        /// How it exited.
        status: ExitStatus,
        /// Everything it wrote to stderr.
        stderr: String,
    },
    /// The tether process did not answer 200 on its admin `/healthz` in time.
    #[error(
        "tether was not healthy at http://{admin}/healthz within {waited:?}; stderr:\n{stderr}"
    )]
    ProcessNotReady {
        /// The admin address that was polled.
        admin: SocketAddr,
        /// How long was waited.
        waited: Duration,
        /// Everything it wrote to stderr.
        stderr: String,
    },
    /// The process has already been reaped, so it has no pid to signal.
    #[error("the process has already exited")]
    ProcessGone,
    /// Sending a signal failed.
    #[error("could not send the signal: {0}")]
    Signal(#[from] nix::errno::Errno),
}

impl From<tokio_tungstenite::tungstenite::Error> for TestkitError {
    fn from(err: tokio_tungstenite::tungstenite::Error) -> Self {
        use tokio_tungstenite::tungstenite::Error;
        match err {
            Error::Http(response) => {
                let status = response.status();
                let body = response
                    .into_body()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                TestkitError::UpgradeRejected { status, body }
            }
            other => TestkitError::WebSocket(Box::new(other)),
        }
    }
}

/// Result with the testkit's error.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;
