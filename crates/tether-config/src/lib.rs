//! Tether's configuration: YAML text in, a validated [`Config`] out.
//!
//! The promise: a `Config` you get back is complete (every default filled in) and consistent
//! (routes name existing upstreams, names and addresses are unique, values are in range), and a
//! file that is wrong in any way is refused with **every** problem listed as
//! `FILE:LINE:COLUMN: field.path: what is wrong`. Parsing is strict: unknown fields are errors
//! (with a "did you mean" for likely typos). This crate opens no sockets and resolves no names:
//! backend addresses are `ip:port` (an upstream with `discovery` gets its backends at run time);
//! TLS certificate files are named here and read by the proxy. [`schema`] describes the file
//! as a JSON Schema for editors (`tether schema`).
//!
//! ```
//! let yaml = "
//! listeners:
//!   - address: 127.0.0.1:8080
//! upstreams:
//!   docs:
//!     backends:
//!       - address: 127.0.0.1:9101
//!       - { address: 127.0.0.1:9102, weight: 2 }
//! routes:
//!   - name: docs
//!     match: { path_prefix: /docs/ }
//!     sticky:
//!       keys:
//!         - path: /docs/{key}
//!     upstream: docs
//! ";
//! let config = tether_config::parse(yaml, "tether.yaml").unwrap();
//! assert_eq!(config.summary(), "1 route, 1 upstream, 2 backends, 1 listener");
//! assert_eq!(config.routes[0].retries, 2); // a default, filled in
//!
//! let errors = tether_config::parse(&yaml.replace("upstream: docs", "upstrem: docs"), "tether.yaml")
//!     .unwrap_err();
//! assert_eq!(
//!     errors.to_string(),
//!     "tether.yaml:10:5: routes[0].upstream: missing required field `upstream`\n\
//!      tether.yaml:15:5: routes[0].upstrem: unknown field `upstrem`, did you mean `upstream`?"
//! );
//! ```
//!
//! [`to_yaml`] writes a `Config` back out with all defaults shown; `parse` reads that text back
//! to an equal `Config`.

mod convert;
pub mod defaults;
mod error;
mod model;
mod names;
mod read;
mod render;
pub mod schema;
mod validate;
mod yaml;

use std::path::Path;

pub use error::{ConfigError, ConfigErrors};
pub use model::*;
pub use render::to_yaml;

/// Reads and parses the config file at `path` (errors name the file as given).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 0,
            column: 0,
            path: read::ROOT.to_string(),
            message: format!("cannot read the config file: {e}"),
        }])),
    }
}

/// Parses config `text`; `file_name` is only used in error messages.
pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigErrors> {
    let mut cx = read::Cx::new(file_name);
    let root = match yaml::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            let message =
                "the file is empty; at least `listeners`, `upstreams` and `routes` are required";
            cx.error(yaml::Mark { line: 1, column: 1 }, "", message);
            return Err(ConfigErrors(cx.errors));
        }
        Err(problems) => {
            for p in problems {
                cx.error(p.mark, &p.path, p.message);
            }
            return Err(ConfigErrors(cx.errors));
        }
    };
    let (config, spots) = convert::config(&mut cx, &root);
    validate::check(&mut cx, &config, &spots);
    if cx.errors.is_empty() {
        Ok(config)
    } else {
        // Stable: errors at one position keep the order in which they were found.
        cx.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(cx.errors))
    }
}

impl Config {
    /// One line for logs and `tether check`: `3 routes, 2 upstreams, 5 backends, 1 listener`,
    /// plus `(1 upstream by discovery)` when some upstreams take their backends from a source.
    pub fn summary(&self) -> String {
        let backends: usize = self.upstreams.iter().map(|u| u.backends.len()).sum();
        let discovered = self
            .upstreams
            .iter()
            .filter(|u| u.discovery.is_some())
            .count();
        let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut line = format!(
            "{}, {}, {}, {}",
            count(self.routes.len(), "route"),
            count(self.upstreams.len(), "upstream"),
            count(backends, "backend"),
            count(self.listeners.len(), "listener")
        );
        if discovered > 0 {
            line.push_str(&format!(
                " ({} by discovery)",
                count(discovered, "upstream")
            ));
        }
        line
    }
}
