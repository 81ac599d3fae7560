//! `tether`: the command line. Parsing and wiring only; the work happens in the crates.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use http::header::{HeaderName, HeaderValue, COOKIE};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tether_routing::{RequestView, Router};

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
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            bail!("--header {h:?}: expected Name:Value");
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header {h:?}: bad header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header {h:?}: bad header value"))?;
        headers.append(name, value);
    }
    if !args.cookies.is_empty() {
        let cookie = HeaderValue::from_str(&args.cookies.join("; "))
            .context("--cookie: bad cookie value")?;
        headers.append(COOKIE, cookie);
    }
    let (path, mut query) = match args.path.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (args.path.clone(), String::new()),
    };
    for q in &args.queries {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(q);
    }
    let view = RequestView {
        method: &args.method.to_ascii_uppercase(),
        host: args.host.as_deref(),
        path: &path,
        query: (!query.is_empty()).then_some(query.as_str()),
        headers: &headers,
        client_ip: args.client_ip,
    };
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
                init_tracing();
                tracing::info!(config = %args.config.display(), "starting: {}", config.summary());
                tether_proxy::run(
                    config,
                    tether_proxy::RunOptions {
                        upgrade: args.upgrade,
                        config_path: Some(args.config.clone()),
                        watch: args.watch,
                    },
                )
            }
            Err(e) => Err(e),
        },
        Command::Check(args) => check(args),
        Command::Route(args) => route(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
