//! Raw bytes over TCP, for requests no well-behaved client would send.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::Result;

/// How long [`raw_request`] reads before it returns what it has.
const RAW_READ_FOR: Duration = Duration::from_secs(5);

/// Writes `bytes` to `addr` and returns everything read until the server closes (or resets)
/// the connection, or 5 s have passed. Send `Connection: close` to not wait out the 5 s.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    raw_request_within(addr, bytes, RAW_READ_FOR).await
}

/// [`raw_request`] with its own reading deadline.
pub async fn raw_request_within(
    addr: SocketAddr,
    bytes: &[u8],
    deadline: Duration,
) -> Result<Vec<u8>> {
    let give_up = Instant::now() + deadline;
    let mut stream = TcpStream::connect(addr).await?;
    match stream.write_all(bytes).await {
        // The server may answer and close before it has read everything; read what it said.
        Err(err) if !is_reset(err.kind()) => return Err(err.into()),
        _ => {}
    }
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(give_up, stream.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => return Ok(received),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            // A server that rejects a request may reset instead of closing.
            Ok(Err(err)) if is_reset(err.kind()) => return Ok(received),
            Ok(Err(err)) => return Err(err.into()),
        }
    }
}

fn is_reset(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// The status code of the first status line in raw response bytes (`HTTP/1.1 400 ...` → 400).
pub fn raw_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_status_reads_the_status_line() {
        assert_eq!(raw_status(b"HTTP/1.1 400 Bad Request\r\n\r\n"), Some(400));
        assert_eq!(raw_status(b"HTTP/1.0 502\r\n"), Some(502));
        assert_eq!(raw_status(b"garbage"), None);
        assert_eq!(raw_status(b""), None);
    }
}
