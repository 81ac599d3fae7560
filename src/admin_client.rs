//! One plain-HTTP/1.1 request with a deadline, for the commands that ask a running Tether's
//! admin listener (`tether probe`, `tether top`, `tether pin`): containers and operators'
//! shells have no curl.

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
    request("GET", address, path, token, None, timeout)
}

/// The status and body of `method path` at `address` with a JSON `body`, if any.
pub fn request(
    method: &str,
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let framing = body.map_or(String::new(), |b| {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )
    });
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}{framing}Connection: close\r\n\r\n"
    )?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
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

/// `text` percent-encoded as one path segment (every byte but unreserved ones escaped).
pub fn encode_segment(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The JSON answer to `method path` (with `body`) at `address`; an error that carries the
/// admin API's own message unless it answered 200.
pub fn json(
    method: &str,
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<serde_json::Value> {
    use anyhow::Context;
    let (status, answer) = request(method, address, path, token, body, timeout)
        .with_context(|| format!("admin listener {address}"))?;
    let answer: serde_json::Value = serde_json::from_slice(&answer).context("admin answer")?;
    if status != 200 {
        bail!(
            "admin listener answered {status}: {}",
            answer["error"].as_str().unwrap_or("")
        );
    }
    Ok(answer)
}
