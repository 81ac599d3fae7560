//! `tether top`: an upstream's hottest documents, read from the running proxy's admin listener
//! (`GET /documents/top`) and printed as a table; `--watch` redraws it like `top`.

use crate::admin_client;
use anyhow::Result;
use clap::{Args, ValueEnum};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// What to rank documents by.
#[derive(Clone, Copy, ValueEnum)]
pub enum By {
    /// Open WebSocket, SSE and long-poll streams (exact).
    Streams,
    /// Requests per second over about the last 10 s (estimated, with its error).
    Requests,
    /// Response bytes per second over about the last 10 s (estimated, with its error).
    Bytes,
}

impl By {
    fn as_str(self) -> &'static str {
        match self {
            By::Streams => "streams",
            By::Requests => "requests",
            By::Bytes => "bytes",
        }
    }
}

#[derive(Args)]
pub struct TopArgs {
    /// The YAML config file of the running proxy (for its admin address and token).
    #[arg(short, long)]
    config: PathBuf,
    /// What to rank by.
    #[arg(long, value_enum, default_value = "streams")]
    by: By,
    /// The upstream (may be left out when the config has one).
    #[arg(long)]
    upstream: Option<String>,
    /// How many documents.
    #[arg(short, default_value_t = 20)]
    n: usize,
    /// Redraw until interrupted.
    #[arg(long)]
    watch: bool,
    /// Between redraws.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

/// Prints the table once, or redraws it every `interval` with `--watch`.
pub fn run(args: &TopArgs) -> Result<()> {
    let config = tether_config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let token = tether_proxy::admin_token(&config)?;
    let mut path = format!("/documents/top?by={}&n={}", args.by.as_str(), args.n);
    if let Some(upstream) = &args.upstream {
        let _ = write!(path, "&upstream={upstream}");
    }
    loop {
        let answer = admin_client::json(
            "GET",
            config.admin.address,
            &path,
            token.as_deref(),
            None,
            Duration::from_secs(2),
        )?;
        let table = render(&answer);
        if !args.watch {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen and draw from the top left, as `top` does.
        print!("\x1b[2J\x1b[H{table}");
        std::thread::sleep(args.interval);
    }
}

/// The table for one `/documents/top` answer.
fn render(answer: &Value) -> String {
    let mut out = String::new();
    let by = answer["by"].as_str().unwrap_or("");
    let upstream = answer["upstream"].as_str().unwrap_or("");
    let total = answer["total"].as_f64().unwrap_or(0.0);
    let empty = Vec::new();
    let docs = answer["documents"].as_array().unwrap_or(&empty);
    match by {
        "streams" => {
            let _ = writeln!(
                out,
                "upstream {upstream}: {total} open streams; top {} documents by streams",
                docs.len()
            );
            let _ = writeln!(
                out,
                "{:>3}  {:<40} {:>8} {:>7}  {:<22} BACKENDS",
                "#", "DOCUMENT", "STREAMS", "SHARE", "OWNER"
            );
            for (i, d) in docs.iter().enumerate() {
                let backends: Vec<String> = d["backends"]
                    .as_object()
                    .map(|m| m.iter().map(|(b, n)| format!("{b}={n}")).collect())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:>3}  {:<40} {:>8} {:>6.1}%  {:<22} {}",
                    i + 1,
                    d["key"].as_str().unwrap_or(""),
                    d["streams"].as_u64().unwrap_or(0),
                    d["share"].as_f64().unwrap_or(0.0) * 100.0,
                    d["owner"].as_str().unwrap_or("-"),
                    backends.join(" ")
                );
            }
        }
        _ => {
            let unit = answer["unit"].as_str().unwrap_or("");
            let short = if by == "bytes" { "BYTES/S" } else { "REQ/S" };
            let _ = writeln!(
                out,
                "upstream {upstream}: {total:.1} {} in all (over ~{} s); top {} documents by {by}, \
                 each within ±{:.1}",
                unit.replace('_', " "),
                answer["window_seconds"].as_u64().unwrap_or(0),
                docs.len(),
                answer["error_bound"].as_f64().unwrap_or(0.0)
            );
            let _ = writeln!(
                out,
                "{:>3}  {:<40} {:>12} {:>10} {:>7}  OWNER",
                "#", "DOCUMENT", short, "±", "SHARE"
            );
            for (i, d) in docs.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{:>3}  {:<40} {:>12.1} {:>10.1} {:>6.1}%  {}",
                    i + 1,
                    d["key"].as_str().unwrap_or(""),
                    d[unit].as_f64().unwrap_or(0.0),
                    d["error"].as_f64().unwrap_or(0.0),
                    d["share"].as_f64().unwrap_or(0.0) * 100.0,
                    d["owner"].as_str().unwrap_or("-")
                );
            }
        }
    }
    out
}
