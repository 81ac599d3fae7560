//! Pins as an operator sets them (`POST`/`DELETE /upstreams/{name}/keys/{key}/pin`): checked,
//! stored where they survive a restart, and put in force through [`ProxyState::set_pin`].
//!
//! Where a pin is stored depends on its upstream:
//! - with `discovery: etcd`, in etcd under `<prefix>/pins/<key>` (no lease). etcd is then the
//!   only source: the pin comes into force on every instance (this one included) when the
//!   upstream's watch reports it, so a fleet agrees as fast as its watches are;
//! - otherwise in `server.state_file`, rewritten whole (a temporary file renamed over it) after
//!   each change and read back at start; without a state file, in memory only.

use crate::state::ProxyState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tether_config::Discovery;
use tether_discovery::EtcdClient;

/// Where a pin was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// In etcd, for every instance watching the upstream's prefix.
    Etcd,
    /// In `server.state_file`.
    StateFile,
    /// Nowhere: no state file is configured, so the pin ends with the process.
    Memory,
}

impl Stored {
    /// The word the admin API answers with.
    pub fn as_str(self) -> &'static str {
        match self {
            Stored::Etcd => "etcd",
            Stored::StateFile => "state_file",
            Stored::Memory => "memory",
        }
    }
}

/// Why a pin was not set.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// No upstream of that name in the config in force.
    #[error("no upstream named {0:?}")]
    NoUpstream(String),
    /// The key could never be a sticky key.
    #[error("key must be 1 to {max} bytes without control characters", max = tether_routing::MAX_KEY_LEN)]
    BadKey,
    /// The backend is not a member of the upstream now.
    #[error("{backend} is not a backend of upstream {upstream:?}")]
    NotABackend {
        /// The upstream.
        upstream: String,
        /// The address asked for.
        backend: SocketAddr,
    },
    /// etcd did not take the change.
    #[error("etcd: {0}")]
    Etcd(#[from] tether_discovery::DiscoveryError),
    /// The state file could not be written; the pin was not changed.
    #[error("state file {path}: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

impl PinError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            PinError::NoUpstream(_) => 404,
            PinError::BadKey | PinError::NotABackend { .. } => 400,
            PinError::Etcd(_) => 503,
            PinError::StateFile { .. } => 500,
        }
    }
}

/// How long an etcd pin may take to come back through this instance's own watch before the
/// answer says it is stored but not yet in force here.
const SEEN_WITHIN: Duration = Duration::from_secs(2);

/// Serialises state-file rewrites, so two admin requests cannot interleave theirs.
static STATE_FILE: Mutex<()> = Mutex::new(());

/// Pins `key` of `upstream` to `backend`, or unpins it (`None`). Returns where it is stored
/// and whether it is in force on this instance now.
pub async fn set(
    state: &ProxyState,
    upstream: &str,
    key: &str,
    backend: Option<SocketAddr>,
) -> Result<(Stored, bool), PinError> {
    if !tether_routing::is_usable_key(key) {
        return Err(PinError::BadKey);
    }
    let installed = state.current();
    let index = installed
        .router
        .upstream_index(upstream)
        .ok_or_else(|| PinError::NoUpstream(upstream.to_string()))?;
    if let Some(backend) = backend {
        let members = &installed.router.upstreams()[index];
        if members.backend_index(backend).is_none() {
            return Err(PinError::NotABackend {
                upstream: upstream.to_string(),
                backend,
            });
        }
    }
    if let Some(Discovery::Etcd(etcd)) = &installed.config.upstreams[index].discovery {
        let client = EtcdClient::new(etcd.endpoints.clone());
        tether_discovery::etcd::set_pin(&client, &etcd.prefix, key, backend).await?;
        let deadline = tokio::time::Instant::now() + SEEN_WITHIN;
        loop {
            if state.pins(upstream).get(key) == backend.as_ref() {
                return Ok((Stored::Etcd, true));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok((Stored::Etcd, false));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let Some(path) = installed.config.server.state_file.clone() else {
        state.set_pin(upstream, key, backend);
        return Ok((Stored::Memory, true));
    };
    let _writing = STATE_FILE.lock().unwrap_or_else(|p| p.into_inner());
    let before = state.pins(upstream).get(key).copied();
    state.set_pin(upstream, key, backend);
    if let Err(source) = write(&path, &file_pins(state)) {
        state.set_pin(upstream, key, before);
        return Err(PinError::StateFile { path, source });
    }
    Ok((Stored::StateFile, true))
}

/// The pins the state file holds: every upstream's except those etcd keeps.
fn file_pins(state: &ProxyState) -> BTreeMap<String, BTreeMap<String, SocketAddr>> {
    let installed = state.current();
    let mut pins = state.all_pins();
    pins.retain(|name, _| {
        !installed
            .config
            .upstreams
            .iter()
            .any(|u| u.name == *name && matches!(u.discovery, Some(Discovery::Etcd(_))))
    });
    pins
}

/// The state file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// The format's version; 1.
    pub version: u32,
    /// Pins by upstream name, then document key.
    #[serde(default)]
    pub pins: BTreeMap<String, BTreeMap<String, SocketAddr>>,
}

/// Why the state file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {reason}")]
pub struct StateFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads the state file at `path`; a file that does not exist yet holds nothing.
pub fn read(path: &Path) -> Result<StateFile, StateFileError> {
    let fail = |reason: String| StateFileError {
        path: path.to_path_buf(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::default()),
        Err(e) => return Err(fail(e.to_string())),
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if file.version != 1 {
        return Err(fail(format!(
            "version {} (this Tether reads 1)",
            file.version
        )));
    }
    Ok(file)
}

/// Puts the pins of the state file at `path` in force (at start).
pub fn load(state: &ProxyState, path: &Path) -> Result<usize, StateFileError> {
    let file = read(path)?;
    let mut count = 0;
    for (upstream, pins) in &file.pins {
        count += pins.len();
        state.replace_pins(upstream, pins);
    }
    Ok(count)
}

/// Writes `pins` to `path` whole: a temporary file beside it, synced, then renamed over it, so
/// a crash leaves the old file or the new one, never half of one.
fn write(
    path: &Path,
    pins: &BTreeMap<String, BTreeMap<String, SocketAddr>>,
) -> std::io::Result<()> {
    use std::io::Write;
    let file = StateFile {
        version: 1,
        pins: pins.clone(),
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    text.push(b'\n');
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    {
        let mut out = std::fs::File::create(&temporary)?;
        out.write_all(&text)?;
        out.sync_all()?;
    }
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_state_file_reads_back_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.json");
        assert!(read(&path).expect("missing").pins.is_empty());
        let pins = BTreeMap::from([(
            "docs".to_string(),
            BTreeMap::from([("doc 1".to_string(), "127.0.0.1:9".parse().unwrap())]),
        )]);
        write(&path, &pins).expect("write");
        assert_eq!(read(&path).expect("read").pins, pins);
        std::fs::write(&path, "{\"version\": 2}").expect("write");
        let error = read(&path).expect_err("version 2").to_string();
        assert!(error.contains("version 2"), "{error}");
        std::fs::write(&path, "not json").expect("write");
        assert!(read(&path).is_err());
    }
}
