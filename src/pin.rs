//! `tether pin` / `tether unpin`: pin a document to a backend, or unpin it, through the running
//! proxy's admin listener (`POST`/`DELETE /upstreams/{name}/keys/{key}/pin`). The proxy
//! stores the pin (etcd or its state file) and closes the document's streams on its old owner.

use crate::admin_client;
use anyhow::{bail, Result};
use clap::Args;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct PinArgs {
    /// The YAML config file of the running proxy (for its admin address and token).
    #[arg(short, long)]
    config: PathBuf,
    /// The upstream (may be left out when the config has one).
    #[arg(long)]
    upstream: Option<String>,
    /// The document's sticky key.
    key: String,
    /// The backend to pin it to, `ip:port` (a member of the upstream).
    backend: SocketAddr,
}

#[derive(Args)]
pub struct UnpinArgs {
    /// The YAML config file of the running proxy (for its admin address and token).
    #[arg(short, long)]
    config: PathBuf,
    /// The upstream (may be left out when the config has one).
    #[arg(long)]
    upstream: Option<String>,
    /// The document's sticky key.
    key: String,
}

/// `tether pin`.
pub fn pin(args: &PinArgs) -> Result<()> {
    let body = serde_json::json!({ "backend": args.backend.to_string() }).to_string();
    send(
        "POST",
        &args.config,
        args.upstream.as_deref(),
        &args.key,
        Some(body.as_bytes()),
    )
}

/// `tether unpin`.
pub fn unpin(args: &UnpinArgs) -> Result<()> {
    send(
        "DELETE",
        &args.config,
        args.upstream.as_deref(),
        &args.key,
        None,
    )
}

fn send(
    method: &str,
    config: &std::path::Path,
    upstream: Option<&str>,
    key: &str,
    body: Option<&[u8]>,
) -> Result<()> {
    let config = tether_config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let upstream = match upstream {
        Some(name) => name.to_string(),
        None => match config.upstreams.as_slice() {
            [only] => only.name.clone(),
            _ => bail!("--upstream: the config has several upstreams; name one"),
        },
    };
    let token = tether_proxy::admin_token(&config)?;
    let path = format!(
        "/upstreams/{}/keys/{}/pin",
        admin_client::encode_segment(&upstream),
        admin_client::encode_segment(key)
    );
    // An etcd pin is answered once this proxy's own watch has seen it (up to 2 s).
    let answer = admin_client::json(
        method,
        config.admin.address,
        &path,
        token.as_deref(),
        body,
        Duration::from_secs(5),
    )?;
    let stored = answer["stored"].as_str().unwrap_or("?");
    match answer["pinned"].as_str() {
        Some(backend) => println!("{upstream}: {key} pinned to {backend} (stored in {stored})"),
        None => println!("{upstream}: {key} unpinned (stored in {stored})"),
    }
    if answer["in_force"] == Value::Bool(false) {
        println!("not yet in force on this proxy: its etcd watch has not reported the change");
    }
    Ok(())
}
