//! One plain-HTTP/1.1 `GET` with a deadline, for the commands that ask a running Tether's admin
//! listener (`tether probe`, `tether top`): containers and operators' shells have no curl.

use anyhow::{bail, Result};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// The largest admin answer read.
const MAX_ANSWER: u64 = 4 << 20;

/// The status and body of `GET path` at `address`, with `token` as a bearer token.
pub fn get(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer)?;
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("{address}{path}: no complete response head");
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(status) => Ok((status, answer[end + 4..].to_vec())),
        None => bail!("{address}{path}: {:?}", head.lines().next().unwrap_or("")),
    }
}

/// `http://ip:port/path` → the address and the path.
pub fn split_url(url: &str) -> Result<(SocketAddr, &str)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = authority
        .parse()
        .map_err(|_| anyhow::anyhow!("{url}: expected http://ip:port/path"))?;
    Ok((address, path))
}
