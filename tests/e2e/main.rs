//! Tether's end-to-end tests, built as one integration-test binary.
//!
//! Cargo builds every file directly under `tests/` as a test binary of its own, and every
//! one of them links Pingora (and the rest of Tether's dependency tree). Keeping the tests as
//! modules of this one crate links Pingora once, which cuts the test build's link time and the
//! disk the test binaries take; ripgrep and linkerd2-proxy lay out their tests the same way.
//!
//! Run one area with a module filter, for example `cargo test --test e2e -- proxy_http::`.
//! Assets that are not Rust (the browser pages' tests) stay in `tests/browser/`.

mod support;

mod admin;
mod browser_demo;
mod cli;
mod convergence;
mod differential;
mod documents;
mod edge_cases;
mod failback;
mod fleet;
mod hardening;
mod health;
mod http1_path;
mod http2;
mod image;
mod lifecycle;
mod nginx_compat;
mod pins;
mod placement;
mod prometheus;
mod proxy_http;
mod proxy_streams;
mod schema;
mod shell;
mod slow_clients;
mod tls;
mod websocket_conformance;
