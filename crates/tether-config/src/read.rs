//! Typed readers over marked YAML nodes; each failure becomes an error at the node's position.
//!
//! Readers return `None` after recording an error so that conversion can go on and report
//! every problem in the file, not just the first.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ConfigError;
use crate::yaml::{Entry, Mark, Node, Value};

/// Printed as the field path of errors about the whole document.
pub(crate) const ROOT: &str = "(root)";

/// `parent.key`, or just `key` at the root.
pub(crate) fn field(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(crate) fn item(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The closest candidate to a misspelled word, if it is close enough to be a likely typo
/// (a small edit distance) or a shortened form (`grace` for `grace_period`).
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let close = candidates
        .iter()
        .map(|c| (strsim::osa_distance(&word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(3) / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    close.or_else(|| {
        let mut prefixed = candidates
            .iter()
            .filter(|c| word.len() >= 4 && c.starts_with(&word));
        // Only a unique completion is a useful hint.
        match (prefixed.next(), prefixed.next()) {
            (Some(c), None) => Some(*c),
            _ => None,
        }
    })
}

fn one_of(candidates: &[&str]) -> String {
    let quoted: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
    quoted.join(", ")
}

/// Collects errors while reading one file.
pub(crate) struct Cx {
    file: String,
    pub errors: Vec<ConfigError>,
}

/// A mapping whose keys have been checked against the schema.
#[derive(Clone, Copy)]
pub(crate) struct Fields<'a> {
    pub mark: Mark,
    pub entries: &'a [Entry],
}

impl<'a> Fields<'a> {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a Node> {
        self.entry(key).map(|e| &e.value)
    }

    /// The whole entry of `key` (to point at the key itself), if present.
    pub fn entry(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

impl Cx {
    pub fn new(file: &str) -> Self {
        Cx {
            file: file.to_string(),
            errors: Vec::new(),
        }
    }

    /// Records an error at `mark` for the field `path`.
    pub fn error(&mut self, mark: Mark, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: mark.line,
            column: mark.column,
            path: if path.is_empty() {
                ROOT.to_string()
            } else {
                path.to_string()
            },
            message: message.into(),
        });
    }

    /// Reads a mapping with free-form keys (null counts as empty).
    pub fn any_map<'a>(&mut self, node: &'a Node, path: &str) -> Option<Fields<'a>> {
        let entries: &[Entry] = match &node.value {
            Value::Map(entries) => entries,
            _ if node.is_null() => &[],
            _ => {
                self.error(
                    node.mark,
                    path,
                    format!("expected a mapping, found {}", describe(node)),
                );
                return None;
            }
        };
        Some(Fields {
            mark: node.mark,
            entries,
        })
    }

    /// Reads a mapping (null counts as empty), reporting keys outside `known`.
    ///
    /// `later` lists keys of features not built yet, each with its error message, so they are
    /// refused loudly rather than silently ignored.
    pub fn map<'a>(
        &mut self,
        node: &'a Node,
        path: &str,
        known: &[&str],
        later: &[(&str, &str)],
    ) -> Option<Fields<'a>> {
        let fields = self.any_map(node, path)?;
        for entry in fields.entries {
            if known.contains(&entry.key.as_str()) {
                continue;
            }
            let key_path = field(path, &entry.key);
            if let Some((_, message)) = later.iter().find(|(k, _)| *k == entry.key) {
                self.error(entry.key_mark, &key_path, *message);
            } else if let Some(close) = suggest(&entry.key, known) {
                let message = format!("unknown field `{}`, did you mean `{close}`?", entry.key);
                self.error(entry.key_mark, &key_path, message);
            } else {
                let message = format!(
                    "unknown field `{}`, expected one of {}",
                    entry.key,
                    one_of(known)
                );
                self.error(entry.key_mark, &key_path, message);
            }
        }
        Some(fields)
    }

    /// The value of a required field, or an error at the enclosing mapping.
    pub fn required<'a>(&mut self, fields: Fields<'a>, path: &str, key: &str) -> Option<&'a Node> {
        let value = fields.get(key);
        if value.is_none() {
            self.error(
                fields.mark,
                &field(path, key),
                format!("missing required field `{key}`"),
            );
        }
        value
    }

    /// Reads a list; `what` names an item for the "must not be empty" error.
    pub fn list<'a>(&mut self, node: &'a Node, path: &str, what: &str) -> Option<&'a [Node]> {
        match &node.value {
            Value::Seq(items) if items.is_empty() => {
                self.error(node.mark, path, format!("at least one {what} is required"));
                None
            }
            Value::Seq(items) => Some(items),
            _ if node.is_null() => {
                self.error(node.mark, path, format!("at least one {what} is required"));
                None
            }
            _ => {
                self.error(
                    node.mark,
                    path,
                    format!("expected a list, found {}", describe(node)),
                );
                None
            }
        }
    }

    /// Reads any non-null scalar as text (`name: 404` is the string "404").
    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            _ if node.is_null() => {
                self.error(node.mark, path, "expected a string, found nothing");
                None
            }
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.error(
                    node.mark,
                    path,
                    format!("expected a string, found {}", describe(node)),
                );
                None
            }
        }
    }

    /// Reads a decimal integer within `min..=max`.
    /// Reads a number from `min` to `max` (say so otherwise).
    pub fn number(&mut self, node: &Node, path: &str, min: f64, max: f64) -> Option<f64> {
        match self.string(node, path).as_deref().map(str::parse::<f64>) {
            Some(Ok(v)) if (min..=max).contains(&v) => Some(v),
            Some(_) => {
                self.error(
                    node.mark,
                    path,
                    format!("must be a number from {min:?} to {max:?}"),
                );
                None
            }
            None => None,
        }
    }

    pub fn integer(&mut self, node: &Node, path: &str, min: u64, max: u64) -> Option<u64> {
        let parsed = match &node.value {
            Value::Scalar { text, plain: true } => text.parse::<i128>().ok(),
            _ => None,
        };
        let Some(value) = parsed else {
            self.error(
                node.mark,
                path,
                format!("expected an integer, found {}", describe(node)),
            );
            return None;
        };
        if value < i128::from(min) {
            self.error(node.mark, path, format!("must be >= {min}, found {value}"));
            None
        } else if value > i128::from(max) {
            self.error(node.mark, path, format!("must be <= {max}, found {value}"));
            None
        } else {
            u64::try_from(value).ok()
        }
    }

    /// Reads `true` or `false`.
    pub fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Scalar { text, plain: true } if text == "true" => Some(true),
            Value::Scalar { text, plain: true } if text == "false" => Some(false),
            _ => {
                self.error(
                    node.mark,
                    path,
                    format!("expected true or false, found {}", describe(node)),
                );
                None
            }
        }
    }

    /// Reads a duration string with units (`500ms`, `2s`, `1m30s`).
    pub fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let text = match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => text.trim(),
            _ => {
                self.error(
                    node.mark,
                    path,
                    format!("expected a duration such as 5s, found {}", describe(node)),
                );
                return None;
            }
        };
        if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.') {
            self.error(node.mark, path, "duration needs a unit, e.g. 5s");
            return None;
        }
        match humantime::parse_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(node.mark, path, format!("invalid duration `{text}`: {e}"));
                None
            }
        }
    }

    /// Reads a duration that must be longer than zero (timeouts, probe intervals).
    pub fn positive_duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let d = self.duration(node, path)?;
        if d.is_zero() {
            self.error(node.mark, path, "must be longer than 0s");
            return None;
        }
        Some(d)
    }

    /// Reads an `ip:port` socket address; host names are refused, never resolved.
    pub fn address(&mut self, node: &Node, path: &str) -> Option<SocketAddr> {
        let text = self.string(node, path)?;
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(addr);
        }
        let message = match text.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && !host.starts_with('[')
                    && host.parse::<std::net::IpAddr>().is_err()
                    && host.chars().any(|c| c.is_ascii_alphabetic())
                    && !host.contains(':')
                    && port.parse::<u16>().is_ok() =>
            {
                format!("expected ip:port; hostnames are not resolved, found `{text}`")
            }
            _ if text.parse::<std::net::IpAddr>().is_ok() => {
                format!("expected ip:port, found `{text}` (missing port)")
            }
            _ => format!("expected ip:port such as 127.0.0.1:8080 or [::1]:8080, found `{text}`"),
        };
        self.error(node.mark, path, message);
        None
    }

    /// Reads one of a fixed set of words.
    pub fn choice<T: Copy>(&mut self, node: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, path)?;
        if let Some((_, value)) = options.iter().find(|(name, _)| *name == text) {
            return Some(*value);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        let message = match suggest(&text, &names) {
            Some(close) => format!("unknown value `{text}`, did you mean `{close}`?"),
            None => format!("unknown value `{text}`, expected one of {}", one_of(&names)),
        };
        self.error(node.mark, path, message);
        None
    }
}

/// Names a node's type (and short value) for "expected X, found Y" messages.
pub(crate) fn describe(node: &Node) -> String {
    match &node.value {
        Value::Map(_) => "a mapping".to_string(),
        Value::Seq(_) => "a list".to_string(),
        _ if node.is_null() => "nothing".to_string(),
        Value::Scalar { text, plain } => {
            let shown: String = text.chars().take(40).collect();
            if *plain && text.parse::<f64>().is_ok() {
                format!("the number `{shown}`")
            } else if *plain && (text == "true" || text == "false") {
                format!("the boolean `{shown}`")
            } else {
                format!("the string `{shown}`")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_but_not_unrelated_words() {
        let known = crate::names::fields::ROUTE;
        assert_eq!(suggest("upstrem", known), Some("upstream"));
        assert_eq!(suggest("Upstream", known), Some("upstream"));
        assert_eq!(suggest("timeout", known), Some("timeouts"));
        assert_eq!(
            suggest("hedaer", &["header", "cookie", "query", "path"]),
            Some("header")
        );
        assert_eq!(
            suggest("grace", &["threads", "grace_period"]),
            Some("grace_period")
        );
        assert_eq!(suggest("backend", known), None);
        assert_eq!(suggest("x", known), None);
    }
}
