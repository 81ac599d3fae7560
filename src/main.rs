//! `tether`: the command line. Parsing and wiring only; the work happens in the crates.

mod demo;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use std::net::IpAddr;
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
            Ok(())
        }
        Err(reject) => bail!("{} {reject}", reject.status()),
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
fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
