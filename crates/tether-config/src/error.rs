//! Errors: every one names the file, the 1-based line and column, and the field path.

use std::fmt;

/// One problem in a config file, printed as `FILE:LINE:COLUMN: field.path: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {path}: {message}")]
pub struct ConfigError {
    /// The file name given to [`crate::parse`] or the path given to [`crate::load`].
    pub file: String,
    /// 1-based line; 0 when the file could not be read at all.
    pub line: usize,
    /// 1-based column; 0 when the file could not be read at all.
    pub column: usize,
    /// Field path such as `routes[1].sticky.keys[0].header`; `(root)` for the whole document.
    pub path: String,
    /// What is wrong, e.g. ``unknown field `upstrem`, did you mean `upstream`?``.
    pub message: String,
}

/// All the problems found in one config file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// The errors as a slice, in file order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}
