//! `tether demo`: demo app servers and the proxy in one process, from a config built in.
//!
//! The app servers (`tether-demo`) run on a thread of their own; the proxy then takes the main
//! thread and the process, and its signal handling stops both (SIGINT at once, SIGTERM after
//! the demo's 1 s grace period).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

use anyhow::{anyhow, Context, Result};
use clap::Args;

/// Name of the built-in config in error messages.
const CONFIG_NAME: &str = "<built-in demo config>";

/// `$LISTEN`, `$ADMIN`, `$BACKENDS` are filled in. Long-polls have routes of their own, before
/// the general ones, because `long_poll` is per route.
const TEMPLATE: &str = "\
# The config `tether demo` runs. Every URL of a document carries its id, so `/docs/{key}` pins
# everyone on one document to one app server; `/unpinned/` spreads requests round robin.
server:
  threads: 2
  grace_period: 1s
listeners:
  - address: $LISTEN
admin:
  address: $ADMIN
upstreams:
  app:
    backends:
$BACKENDS
    balance: ketama
  app-round-robin:
    backends:
$BACKENDS
    balance: round_robin
routes:
  - name: docs-long-poll
    match:
      path_prefix: /poll/docs/
    sticky:
      keys:
        - path: /poll/docs/{key}
    upstream: app
    long_poll: true
  - name: docs
    match:
      path_prefix: /docs/
    sticky:
      keys:
        - path: /docs/{key}
    upstream: app
  - name: unpinned-long-poll
    match:
      path_prefix: /unpinned/poll/docs/
    upstream: app-round-robin
    long_poll: true
  - name: unpinned
    match:
      path_prefix: /unpinned/
    upstream: app-round-robin
  - name: home
    match:
      path_prefix: /
    upstream: app-round-robin
";

/// Options of `tether demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the admin listener (/metrics, /upstreams, /route) listens; loopback only.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// How many demo app servers to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub servers: u16,
    /// Port of the first app server on 127.0.0.1 (the others take the next ports); 0 lets the
    /// OS pick each one.
    #[arg(long, default_value_t = 9101)]
    pub app_port: u16,
    /// Print the config the demo runs (YAML that `tether check` accepts) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The demo config for these addresses, as YAML text.
pub fn config_yaml(listen: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("      - address: {b}"))
        .collect();
    TEMPLATE
        .replace("$LISTEN", &listen.to_string())
        .replace("$ADMIN", &admin.to_string())
        .replace("$BACKENDS", &backends.join("\n"))
}

/// Runs `tether demo`; returns only on an error (or after `--print-config`).
pub fn run(args: DemoArgs) -> Result<()> {
    let count = usize::from(args.servers);
    if args.print_config {
        let backends = planned_backends(count, args.app_port)?;
        let yaml = config_yaml(args.listen, args.admin, &backends);
        parse(&yaml)?;
        print!("{yaml}");
        return Ok(());
    }
    // Pingora would only log "in use, will try again" for a taken port: say it plainly instead.
    for (addr, flag) in [(args.listen, "--listen"), (args.admin, "--admin")] {
        TcpListener::bind(addr)
            .with_context(|| format!("{addr} is not free; pick another address with {flag}"))?;
    }
    let servers = tether_demo::spawn_in_background(count, args.app_port)
        .context("starting the demo app servers (--app-port 0 lets the OS pick free ports)")?;
    let backends: Vec<SocketAddr> = servers.iter().map(|(_, addr)| *addr).collect();
    let config = parse(&config_yaml(args.listen, args.admin, &backends))?;
    print_banner(&args, &servers);
    init_tracing();
    match tether_proxy::run(config, tether_proxy::RunOptions::default())? {}
}

fn parse(yaml: &str) -> Result<tether_config::Config> {
    tether_config::parse(yaml, CONFIG_NAME).map_err(|errors| anyhow!("{errors}"))
}

/// The app server addresses a run with these flags would use. With `--app-port 0` the OS
/// picks them at start; here, ports that are free now stand in for them.
fn planned_backends(count: usize, first_port: u16) -> Result<Vec<SocketAddr>> {
    (0..count)
        .map(|i| {
            let port = if first_port == 0 {
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .context("picking a free port")?
            } else {
                u16::try_from(i)
                    .ok()
                    .and_then(|i| first_port.checked_add(i))
                    .ok_or_else(|| {
                        anyhow!("{count} app servers do not fit after port {first_port}")
                    })?
            };
            Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        })
        .collect()
}

fn print_banner(args: &DemoArgs, servers: &[(String, SocketAddr)]) {
    // An unspecified listen address (0.0.0.0) is reachable on loopback too.
    let shown = |addr: SocketAddr| match addr.ip() {
        ip if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        _ => addr,
    };
    let proxy = format!("http://{}", shown(args.listen));
    let list: Vec<String> = servers
        .iter()
        .map(|(name, addr)| format!("{name} {addr}"))
        .collect();
    println!("Tether demo: {} behind the proxy", list.join(", "));
    println!();
    println!("  Editor  {proxy}/docs/notes");
    println!("  Home    {proxy}/");
    println!(
        "  Admin   http://{}/upstreams   (also /metrics)",
        args.admin
    );
    println!();
    println!("Try: open {proxy}/docs/notes in two windows and type in one: the other follows, and both name the same app server.");
    println!("Then open {proxy}/unpinned/docs/notes in two windows (round robin, no sticky routing): they land on different servers and the edits split.");
    println!("Ctrl-C stops the demo.");
}

fn init_tracing() {
    // Quiet by default: the banner is the demo's output. RUST_LOG=info shows the proxy's logs.
    crate::init_tracing("warn");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn the_demo_config_pins_documents_and_spreads_unpinned_requests() {
        let backends = [addr("127.0.0.1:9101"), addr("127.0.0.1:9102")];
        let yaml = config_yaml(addr("127.0.0.1:8080"), addr("127.0.0.1:9901"), &backends);
        let config = parse(&yaml).expect("the built-in config is valid");
        assert_eq!(
            config.summary(),
            "5 routes, 2 upstreams, 4 backends, 1 listener"
        );
        let router = tether_routing::Router::new(&config);
        let headers = http::HeaderMap::new();
        let decide = |path: &str| {
            let view = tether_routing::RequestView {
                method: "GET",
                host: None,
                path,
                query: None,
                headers: (&headers).into(),
                client_ip: None,
            };
            let d = router.decide(&view).expect("routed");
            (
                router.routes()[d.route].name.clone(),
                d.key.clone(),
                d.address,
            )
        };
        let (route, key, page) = decide("/docs/notes");
        assert_eq!((route.as_str(), key.as_deref()), ("docs", Some("notes")));
        for path in [
            "/docs/notes/ws",
            "/docs/notes/events",
            "/docs/notes/ops",
            "/poll/docs/notes",
        ] {
            assert_eq!(decide(path).2, page, "{path} left the document's server");
        }
        assert_eq!(decide("/poll/docs/notes").0, "docs-long-poll");
        let unpinned = decide("/unpinned/docs/notes");
        assert_eq!((unpinned.0.as_str(), unpinned.1), ("unpinned", None));
        assert_eq!(decide("/unpinned/poll/docs/notes").0, "unpinned-long-poll");
        assert_eq!(decide("/").0, "home");
    }
}
