//! What a config change does to routing: per upstream, the exact share of keys that change
//! owner (see [`crate::share`]), and which routes were added, removed or changed.

use std::fmt;

use tether_config::Config;

use crate::share::moved_share;

/// The routing effect of replacing one config with another.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    /// Upstreams present in both, with the share (0..=1) of keys whose owner changes.
    pub upstreams: Vec<(String, f64)>,
    /// Upstreams only in the new config.
    pub upstreams_added: Vec<String>,
    /// Upstreams only in the old config.
    pub upstreams_removed: Vec<String>,
    /// Routes only in the new config.
    pub routes_added: Vec<String>,
    /// Routes only in the old config.
    pub routes_removed: Vec<String>,
    /// Routes in both whose settings differ.
    pub routes_changed: Vec<String>,
}

impl ConfigChange {
    /// Compares `old` with `new`.
    pub fn between(old: &Config, new: &Config) -> ConfigChange {
        let mut change = ConfigChange {
            upstreams: Vec::new(),
            upstreams_added: Vec::new(),
            upstreams_removed: Vec::new(),
            routes_added: Vec::new(),
            routes_removed: Vec::new(),
            routes_changed: Vec::new(),
        };
        for up in &new.upstreams {
            match old.upstreams.iter().find(|o| o.name == up.name) {
                Some(o) => change
                    .upstreams
                    .push((up.name.clone(), moved_share(&o.backends, &up.backends))),
                None => change.upstreams_added.push(up.name.clone()),
            }
        }
        for o in &old.upstreams {
            if !new.upstreams.iter().any(|u| u.name == o.name) {
                change.upstreams_removed.push(o.name.clone());
            }
        }
        for route in &new.routes {
            match old.routes.iter().find(|o| o.name == route.name) {
                Some(o) if o != route => change.routes_changed.push(route.name.clone()),
                Some(_) => {}
                None => change.routes_added.push(route.name.clone()),
            }
        }
        for o in &old.routes {
            if !new.routes.iter().any(|r| r.name == o.name) {
                change.routes_removed.push(o.name.clone());
            }
        }
        change
    }
}

impl fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, share) in &self.upstreams {
            writeln!(
                f,
                "upstream {name}: {:.2}% of keys change owner",
                share * 100.0
            )?;
        }
        let lists = [
            ("upstreams added", &self.upstreams_added),
            ("upstreams removed", &self.upstreams_removed),
            ("routes added", &self.routes_added),
            ("routes removed", &self.routes_removed),
            ("routes changed", &self.routes_changed),
        ];
        for (label, names) in lists {
            if !names.is_empty() {
                writeln!(f, "{label}: {}", names.join(", "))?;
            }
        }
        Ok(())
    }
}
