//! Tether's data path and control side: the HTTP/1 engine, the HTTP/2 engine on the h2 crate, the
//! exchange core both call, the swappable routing state, the stream registry, metrics, and the
//! control services (admin, reload, health checks, convergence, discovery, graceful stop).
//!
//! This crate knows sockets; it does not parse YAML (`tether-config` does) and does not decide
//! where a request goes (`tether-routing` does). [`run`] wires them into a Pingora server and
//! never returns. Imports run one way: `listener` → `h1`, `h2` → `core` → `state`, `streams`,
//! `pool`, `closing`, `passive` → `metrics`; `control` → `state`. ARCHITECTURE.md at the
//! repository root draws the path of a request through them.

pub mod access_log;
mod closing;
pub mod control;
pub mod core;
pub mod documents;
pub mod fleet;
pub mod h1;
pub mod h2;
pub mod listener;
pub mod metrics;
pub mod passive;
pub(crate) mod pool;
pub mod state;
pub mod streams;
pub mod tls;

pub use control::{admin, convergence, discovery, health, lifecycle, reload};
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::sync::Arc;
use tether_config::Config;

pub use state::ProxyState;

/// Process-level options that are not part of the YAML config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take over listening sockets from a running Tether (Pingora's zero-downtime upgrade).
    pub upgrade: bool,
    /// The file the config came from: reloaded on SIGHUP and `POST /reload`. None for a
    /// built-in config (reload is then refused).
    pub config_path: Option<PathBuf>,
    /// Also reload when the file changes.
    pub watch: bool,
}

/// Where an old process hands its listening sockets to a new one (`run -u`). Derived from the
/// admin port so that two Tethers on one machine never share it.
pub fn upgrade_socket(config: &Config) -> String {
    format!(
        "{}/tether-upgrade-{}.sock",
        std::env::temp_dir().display(),
        config.admin.address.port()
    )
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `admin.token_file` could not be read.
    #[error("admin.token_file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// `admin.token_file` holds no token.
    #[error("admin.token_file {0}: the file is empty")]
    EmptyToken(PathBuf),
    /// A TLS listener's certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listener's address cannot be listened on (in use, not this host's).
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    /// `server.state_file` exists but cannot be read or is not a state file.
    #[error(transparent)]
    StateFile(#[from] control::pins::StateFileError),
}

/// Starts the proxy, health checks and admin listener for `config` and serves until the
/// process is told to stop; returns only if it cannot start.
pub fn run(config: Config, options: RunOptions) -> Result<std::convert::Infallible, StartError> {
    let server = build_server(config, options)?;
    exit_when_runtimes_shut_down(&server);
    server.run_forever()
}

/// Ends the process as soon as Pingora starts tearing its service runtimes down, which it
/// does once a stop has run its course: at once for SIGINT, after the grace period otherwise
/// (Tether's own [`lifecycle::GracefulExit`] has usually exited before that).
///
/// Why: the runtimes are current-thread ones (`work_stealing: false`), and Pingora shuts them
/// down one after another without telling the accept loops first on SIGINT. An accept loop
/// whose listener was registered with a runtime that is already gone then fails at once,
/// forever, and never yields, so its own runtime never stops and the process hangs. Nothing is
/// left to drain at that point, so exiting is what the teardown would end in anyway. A thread
/// of its own, because the runtimes are what is being torn down.
fn exit_when_runtimes_shut_down(server: &Server) {
    use pingora::server::ExecutionPhase;
    use tokio::sync::broadcast::error::RecvError;
    let mut phases = server.watch_execution_phase();
    let watcher = std::thread::Builder::new()
        .name("tether-exit".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownRuntimes) | Err(RecvError::Closed) => {
                    std::process::exit(0)
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
            }
        });
    if let Err(e) = watcher {
        tracing::warn!("stopping may wait for Pingora's runtimes: {e}");
    }
}

/// The admin bearer token from `admin.token_file`, if one is configured: what the admin
/// listener requires, and what the commands that call it (`tether top`, `tether pin`) send.
pub fn admin_token(config: &Config) -> Result<Option<String>, StartError> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| StartError::TokenFile {
        path: path.clone(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StartError::EmptyToken(path.clone()));
    }
    Ok(Some(token.to_string()))
}

/// Builds the Pingora server with every Tether service, ready to `run_forever`.
pub fn build_server(config: Config, options: RunOptions) -> Result<Server, StartError> {
    let token = admin_token(&config)?;
    let tls = Arc::new(tls::TlsListeners::load(&config)?);
    // SIGHUP's default action kills the process; ignore it until the reload service listens.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    let threads = config.server.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if let Err(e) = h1::tunnel::configure_runtime(threads) {
        tracing::warn!("WebSocket tunnels stay on the proxy's runtime: {e}");
    }
    let mut conf = ServerConf {
        threads,
        // Tether's own GracefulExit ends the process once drained; Pingora's grace period is
        // only the backstop, a little after ours.
        grace_period_seconds: Some(config.server.grace_period.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: upgrade_socket(&config),
        // One current-thread runtime per worker thread (as nginx's and HAProxy's per-thread
        // event loops), instead of tokio's work-stealing scheduler: cheaper task wake-ups and
        // scheduling on every request (BENCHMARKS.md). WebSocket tunnels, which live long and
        // can pile up on one thread, move to Tether's own work-stealing runtime anyway. Their
        // teardown at a stop can hang: see `exit_when_runtimes_shut_down`.
        work_stealing: false,
        ..ServerConf::default()
    };
    // Retries are bounded by each route's `retries`; this is only a ceiling.
    conf.max_retries = 17;
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let state = Arc::new(ProxyState::new(&config));
    if let Some(path) = &config.server.state_file {
        let pins = control::pins::load(&state, path)?;
        tracing::info!(state_file = %path.display(), pins, "state file read");
    }

    let mut endpoints = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        let acceptor = tls.settings(listener.address)?.map(TlsSettings::build);
        endpoints.push(listener::Endpoint::new(
            index,
            listener.address,
            acceptor,
            options.upgrade,
        )?);
    }
    let proxy = listener::Listeners::new(state.clone(), endpoints);

    let reloader = options
        .config_path
        .clone()
        .map(|path| Arc::new(reload::Reloader::new(state.clone(), path, tls)));
    let mut admin = Service::new(
        "tether admin".to_string(),
        admin::AdminApp::new(state.clone(), reloader.clone(), token, &config.admin.public),
    );
    admin.add_tcp(&config.admin.address.to_string());

    let health = background_service(
        "tether health checks",
        health::HealthChecker::new(state.clone()),
    );
    let convergence = background_service(
        "tether convergence",
        convergence::Convergence::new(state.clone()),
    );
    let discovery = background_service(
        "tether discovery",
        discovery::DiscoveryService::new(state.clone()),
    );
    let graceful_exit = background_service(
        "tether graceful exit",
        lifecycle::GracefulExit::new(state, config.server.grace_period),
    );
    if let Some(reloader) = reloader {
        server.add_service(background_service(
            "tether SIGHUP reload",
            reload::SighupReload(reloader.clone()),
        ));
        if options.watch {
            server.add_service(background_service(
                "tether config watch",
                reload::WatchReload::new(reloader),
            ));
        }
    }

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(health);
    server.add_service(convergence);
    server.add_service(discovery);
    server.add_service(graceful_exit);
    Ok(server)
}

/// The crate's layout as its sources say it: imports run one way.
#[cfg(test)]
mod layout {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Every module (by path, `h1::response`) and the source text of its file.
    fn modules() -> BTreeMap<String, String> {
        fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
            for entry in std::fs::read_dir(dir).expect("src dir") {
                let path = entry.expect("entry").path();
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .to_string();
                let join = |n: &str| {
                    if prefix.is_empty() {
                        n.to_string()
                    } else {
                        format!("{prefix}::{n}")
                    }
                };
                if path.is_dir() {
                    walk(&path, &join(&name), out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let module = match name.as_str() {
                        "mod" => prefix.to_string(),
                        "lib" => "crate".to_string(),
                        _ => join(&name),
                    };
                    let text = std::fs::read_to_string(&path).expect("source");
                    // Comments name modules without using them.
                    let code: String = text
                        .lines()
                        .map(|l| l.split("//").next().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join("\n");
                    out.insert(module, code);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            "",
            &mut out,
        );
        out
    }

    /// The modules each module uses: `crate::a::b` and `super::x` paths, resolved to the
    /// longest module they name.
    fn uses(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
        let mut graph = BTreeMap::new();
        for (module, code) in modules {
            let mut used = BTreeSet::new();
            let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
            for (marker, base) in [("crate::", ""), ("super::", parent)] {
                for (at, _) in code.match_indices(marker) {
                    let rest = &code[at + marker.len()..];
                    let path: Vec<&str> = rest
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                        .next()
                        .unwrap_or("")
                        .split("::")
                        .collect();
                    for len in (1..=path.len()).rev() {
                        let name = path[..len].join("::");
                        let full = if base.is_empty() {
                            name
                        } else {
                            format!("{base}::{name}")
                        };
                        if modules.contains_key(&full) {
                            if &full != module && module != "crate" {
                                used.insert(full);
                            }
                            break;
                        }
                    }
                }
            }
            graph.insert(module.clone(), used);
        }
        graph
    }

    #[test]
    fn no_module_imports_one_that_imports_it_back() {
        let modules = modules();
        assert!(modules.contains_key("h1::response") && modules.contains_key("core::attempt"));
        let graph = uses(&modules);
        // Depth-first search for a path back to where it started.
        fn reaches(
            graph: &BTreeMap<String, BTreeSet<String>>,
            from: &str,
            to: &str,
            seen: &mut BTreeSet<String>,
            path: &mut Vec<String>,
        ) -> bool {
            for next in graph.get(from).into_iter().flatten() {
                path.push(next.clone());
                if next == to || (seen.insert(next.clone()) && reaches(graph, next, to, seen, path))
                {
                    return true;
                }
                path.pop();
            }
            false
        }
        let mut cycles = Vec::new();
        for module in graph.keys() {
            let mut path = vec![module.clone()];
            if reaches(&graph, module, module, &mut BTreeSet::new(), &mut path) {
                cycles.push(path.join(" -> "));
            }
        }
        assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
        // The core knows neither engine, and the control side not the data path.
        for (module, used) in &graph {
            if module.starts_with("core") || module.starts_with("control") || module == "state" {
                let wrong: Vec<_> = used
                    .iter()
                    .filter(|u| u.starts_with("h1") || u.starts_with("h2") || *u == "listener")
                    .collect();
                assert!(wrong.is_empty(), "{module} uses {wrong:?}");
            }
        }
    }
}
