//! `tether`: the command line. Parsing and wiring only; the work happens in the crates.

mod admin_client;
mod demo;
mod pin;
mod top;

use anyhow::{bail, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use tether_routing::described::DescribedRequest;
use tether_routing::Router;

/// mimalloc instead of glibc's malloc: a proxied request makes about 80 allocations (most of
/// them inside Pingora), several above glibc's per-thread cache sizes, and glibc's allocator
/// was a quarter of the user-space instructions per request (BENCHMARKS.md). Built with
/// `no_thp`: with transparent huge pages, the sparsely touched 64 KiB buffers of idle
/// WebSockets pin whole 2 MiB pages (about 234 KB per connection instead of about 50 KB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A sticky Layer-7 HTTP/WebSocket reverse proxy for real-time products.
#[derive(Parser)]
#[command(name = "tether", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run(RunArgs),
    /// Validate a config file: exit 0 with a summary, or 1 with every error.
    Check(CheckArgs),
    /// Show where a described request would go: route, sticky key, its source, backend.
    Route(RouteArgs),
    /// Run a live demo: collaborative-document app servers behind the proxy, on loopback.
    Demo(demo::DemoArgs),
    /// Register an app server in etcd for `discovery.etcd` upstreams, keep its lease alive,
    /// and revoke it on SIGTERM or Ctrl-C so it leaves every proxy's ring at once.
    Announce(AnnounceArgs),
    /// Print the JSON Schema (draft 2020-12) of the config file, for editors and validators.
    Schema,
    /// Print a shell completion script: `tether completions bash > /etc/bash_completion.d/tether`.
    Completions(CompletionsArgs),
    /// Print the man page (roff): `tether man > tether.1 && man ./tether.1`; with `--out-dir`,
    /// write it and one page per subcommand (`tether-run.1`, ...) there.
    Man(ManArgs),
    /// Probe an admin endpoint: exit 0 when `GET URL` answers 200, else 1 (for container
    /// health checks, which have no curl).
    Probe(ProbeArgs),
    /// Show an upstream's hottest documents (by open streams, requests/s or bytes/s) from the
    /// running proxy's admin listener; `--watch` refreshes it like `top`.
    Top(top::TopArgs),
    /// Pin a document to a backend through the running proxy's admin listener: its streams on
    /// the old owner close (1012) and it stays there while the backend is available.
    Pin(pin::PinArgs),
    /// Remove a document's pin: it goes back to its owner on the ring.
    Unpin(pin::UnpinArgs),
}

#[derive(Args)]
struct CompletionsArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

#[derive(Args)]
struct ManArgs {
    /// Write `tether.1` and a page per subcommand into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ProbeArgs {
    /// `http://ip:port/path` (plain HTTP).
    #[arg(default_value = "http://127.0.0.1:9901/healthz")]
    url: String,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Args)]
struct AnnounceArgs {
    /// etcd client endpoint, `http://host:port` or `host:port` (repeatable).
    #[arg(long = "etcd", required = true)]
    etcd: Vec<String>,
    /// The prefix of the upstream's `discovery.etcd.prefix`, e.g. `/tether/upstreams/docs/`.
    #[arg(long)]
    prefix: String,
    /// The app server's `ip:port`, as the proxies should connect to it.
    #[arg(long)]
    address: SocketAddr,
    /// Relative weight, 1..=1000.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    weight: u32,
    /// Lease TTL: how long a crashed server stays a member (etcd's minimum is about 2s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
}

#[derive(Args)]
struct RunArgs {
    /// The YAML config file.
    #[arg(short, long)]
    config: PathBuf,
    /// Take over the listening sockets of a running Tether (zero-downtime upgrade).
    #[arg(short, long)]
    upgrade: bool,
    /// Reload the config when the file changes (SIGHUP and POST /reload always work).
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// The YAML config file.
    #[arg(short, long)]
    config: PathBuf,
    /// Print the config with every default filled in.
    #[arg(long)]
    print_defaults: bool,
    /// Compare with the config now in force: share of keys that change owner, route changes.
    #[arg(long, value_name = "OLD_FILE")]
    against: Option<PathBuf>,
}

#[derive(Args)]
struct RouteArgs {
    /// The YAML config file.
    #[arg(short, long)]
    config: PathBuf,
    /// Request path, optionally with a query (`/docs/a?x=1`).
    #[arg(long)]
    path: String,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Host header.
    #[arg(long)]
    host: Option<String>,
    /// A header as `Name:Value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A cookie as `name=value` (repeatable).
    #[arg(long = "cookie")]
    cookies: Vec<String>,
    /// A query parameter as `name=value` (repeatable).
    #[arg(long = "query")]
    queries: Vec<String>,
    /// Client IP (for `on_missing: client_ip`).
    #[arg(long)]
    client_ip: Option<IpAddr>,
}

fn load(path: &std::path::Path) -> Result<tether_config::Config> {
    tether_config::load(path).map_err(|errors| anyhow::anyhow!("{errors}"))
}

fn check(args: CheckArgs) -> Result<()> {
    let config = load(&args.config)?;
    if args.print_defaults {
        print!("{}", tether_config::to_yaml(&config));
        return Ok(());
    }
    // Certificates are files the proxy reads at start; a config naming a bad one would not run.
    tether_proxy::tls::TlsListeners::load(&config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    // So is the state file: one the proxy could not read would stop it at start.
    if let Some(path) = &config.server.state_file {
        let state = tether_proxy::control::pins::read(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
        let pins: usize = state.pins.values().map(|p| p.len()).sum();
        println!("{}: {pins} pinned documents", path.display());
    }
    println!("{}: ok: {}", args.config.display(), config.summary());
    if let Some(old_path) = &args.against {
        let old = load(old_path)?;
        print!(
            "{}",
            tether_routing::change::ConfigChange::between(&old, &config)
        );
    }
    Ok(())
}

fn route(args: RouteArgs) -> Result<()> {
    let config = load(&args.config)?;
    let router = Router::new(&config);
    // Pins in the state file are in force on a proxy running this config (etcd upstreams take
    // their members, and so their pins, from etcd: the file cannot route those anyway).
    if let Some(path) = &config.server.state_file {
        let state = tether_proxy::control::pins::read(path)?;
        for upstream in router.upstreams() {
            if let Some(pins) = state.pins.get(&upstream.name) {
                upstream.pins.replace(pins);
            }
        }
    }
    let mut request = DescribedRequest::new(&args.method, args.host.as_deref(), &args.path);
    for h in &args.headers {
        request.header(h).map_err(anyhow::Error::msg)?;
    }
    for c in &args.cookies {
        request.cookie(c).map_err(anyhow::Error::msg)?;
    }
    for q in &args.queries {
        request.query(q);
    }
    request.client_ip(args.client_ip);
    let view = request.view();
    match router.decide(&view) {
        Ok(d) => {
            let route = &router.routes()[d.route];
            let upstream = &router.upstreams()[d.upstream];
            println!("route: {}", route.name);
            match &d.key {
                Some(key) => println!("key: {key}"),
                None => println!("key: (none)"),
            }
            println!("key_source: {}", d.key_source.as_str());
            println!("upstream: {}", upstream.name);
            println!("backend: {}", d.address);
            println!("reason: {}", d.reason());
            Ok(())
        }
        Err(reject) => bail!("{} {reject}", reject.status()),
    }
}

fn announce(args: AnnounceArgs) -> Result<()> {
    init_tracing("info");
    let mut endpoints = Vec::new();
    for e in &args.etcd {
        let bare = e.trim().strip_prefix("http://").unwrap_or(e.trim());
        if e.trim().starts_with("https://") {
            bail!("--etcd {e}: TLS to etcd is not supported yet; use http://");
        }
        endpoints.push(bare.trim_end_matches('/').to_string());
    }
    if args.prefix.is_empty() {
        bail!("--prefix must not be empty");
    }
    let what = tether_discovery::Announcement {
        endpoints,
        prefix: args.prefix,
        address: args.address,
        weight: args.weight,
        ttl: args.ttl,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tether_discovery::announce(&what, stop, |_| {}).await
    })?;
    Ok(())
}

fn man(args: &ManArgs) -> Result<()> {
    let command = Cli::command();
    match &args.out_dir {
        Some(dir) => clap_mangen::generate_to(command, dir).map_err(Into::into),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            std::io::Write::write_all(&mut std::io::stdout(), &page).map_err(Into::into)
        }
    }
}

/// One `GET` with a deadline; Ok when the status is 200.
fn probe(args: &ProbeArgs) -> Result<()> {
    let (address, path) = admin_client::split_url(&args.url)?;
    match admin_client::get(address, path, None, args.timeout)? {
        (200, _) => Ok(()),
        (status, _) => bail!("{}: status {status}", args.url),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => match load(&args.config) {
            Ok(config) => {
                init_tracing("info");
                tracing::info!(config = %args.config.display(), "starting: {}", config.summary());
                let options = tether_proxy::RunOptions {
                    upgrade: args.upgrade,
                    config_path: Some(args.config.clone()),
                    watch: args.watch,
                };
                match tether_proxy::run(config, options) {
                    Ok(never) => match never {},
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e),
        },
        Command::Check(args) => check(args),
        Command::Route(args) => route(args),
        Command::Demo(args) => demo::run(args),
        Command::Announce(args) => announce(args),
        Command::Schema => {
            print!("{}", tether_config::schema::to_json());
            Ok(())
        }
        Command::Completions(args) => {
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "tether", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).map_err(Into::into)
        }
        Command::Man(args) => man(&args),
        Command::Probe(args) => probe(&args),
        Command::Top(args) => top::run(&args),
        Command::Pin(args) => pin::pin(&args),
        Command::Unpin(args) => pin::unpin(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise (stdout is the access log's).
/// rustls only from errors up: it warns about what one client sent (an IP address as SNI, as
/// wrk and `openssl s_client -servername` send it), a line per connection that is the client's
/// doing, not the operator's.
fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},rustls=error"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
