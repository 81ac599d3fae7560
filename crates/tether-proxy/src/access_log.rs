//! The access log: one structured line per request (JSON or logfmt) on stdout, optionally
//! sampled. Lines are formatted on the request's worker and written by one background thread,
//! so a slow stdout never blocks a request; if the writer falls behind, lines are dropped and
//! counted rather than queued without bound.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use tether_config::{AccessLog, AccessLogFormat};

/// Lines waiting for the writer thread, at most.
const QUEUE: usize = 16_384;

/// One request, as logged.
pub struct Entry<'a> {
    /// Request id (kept from the client or generated).
    pub request_id: &'a str,
    /// Method.
    pub method: &'a str,
    /// Route name, or "" when no route matched.
    pub route: &'a str,
    /// Where the sticky key came from (`header`, `path`, ... or `none`).
    pub key_source: &'a str,
    /// The key itself; only written with `log_keys: true`.
    pub key: Option<&'a str>,
    /// Upstream name, or "".
    pub upstream: &'a str,
    /// Backend address, or "".
    pub backend: &'a str,
    /// `plain`, `websocket`, `sse` or `long_poll`.
    pub kind: &'a str,
    /// Status sent to the client (0 when none was).
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: usize,
    /// Seconds from request to the end of the response.
    pub duration: f64,
}

fn writer() -> &'static SyncSender<String> {
    static TX: OnceLock<SyncSender<String>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("tether-access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Flush when the queue is drained, so lines appear promptly when idle.
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(more.as_bytes());
                    }
                    let _ = out.flush();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("access log writer did not start: {e}");
        }
        tx
    })
}

/// Writes `entry` if the log is on and the request is sampled.
pub fn log(config: &AccessLog, entry: &Entry<'_>) {
    if config.format == AccessLogFormat::Off
        || (config.sample < 1.0 && fastrand::f64() >= config.sample)
    {
        return;
    }
    let key = if config.log_keys { entry.key } else { None };
    let line = match config.format {
        AccessLogFormat::Json => json_line(entry, key),
        _ => logfmt_line(entry, key),
    };
    if let Err(TrySendError::Full(_)) = writer().try_send(line) {
        crate::metrics::Metrics::global().access_log_dropped.inc();
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn json_line(e: &Entry<'_>, key: Option<&str>) -> String {
    let mut v = serde_json::json!({
        "time": now_rfc3339(),
        "request_id": e.request_id,
        "method": e.method,
        "route": e.route,
        "key_source": e.key_source,
        "upstream": e.upstream,
        "backend": e.backend,
        "kind": e.kind,
        "status": e.status,
        "bytes": e.bytes,
        "duration": e.duration,
    });
    if let (Some(key), Some(map)) = (key, v.as_object_mut()) {
        map.insert("key".into(), key.into());
    }
    let mut line = v.to_string();
    line.push('\n');
    line
}

/// A logfmt value: bare when it is a plain token, else quoted with `"` and `\` escaped.
fn push_value(line: &mut String, value: &str) {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if plain {
        line.push_str(value);
    } else {
        line.push('"');
        for c in value.chars() {
            match c {
                '"' | '\\' => {
                    line.push('\\');
                    line.push(c);
                }
                '\n' => line.push_str("\\n"),
                c if c.is_control() => {}
                c => line.push(c),
            }
        }
        line.push('"');
    }
}

fn logfmt_line(e: &Entry<'_>, key: Option<&str>) -> String {
    let mut line = String::with_capacity(256);
    let text = [
        ("time", now_rfc3339()),
        ("request_id", e.request_id.to_string()),
        ("method", e.method.to_string()),
        ("route", e.route.to_string()),
        ("key_source", e.key_source.to_string()),
    ];
    for (name, value) in &text {
        line.push_str(name);
        line.push('=');
        push_value(&mut line, value);
        line.push(' ');
    }
    if let Some(key) = key {
        line.push_str("key=");
        push_value(&mut line, key);
        line.push(' ');
    }
    for (name, value) in [
        ("upstream", e.upstream),
        ("backend", e.backend),
        ("kind", e.kind),
    ] {
        line.push_str(name);
        line.push('=');
        push_value(&mut line, value);
        line.push(' ');
    }
    let _ = writeln!(
        line,
        "status={} bytes={} duration={:.6}",
        e.status, e.bytes, e.duration
    );
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            request_id: "abc-1",
            method: "GET",
            route: "docs",
            key_source: "path",
            key: Some("doc \"7\""),
            upstream: "docs",
            backend: "127.0.0.1:9101",
            kind: "plain",
            status: 200,
            bytes: 12,
            duration: 0.0015,
        }
    }

    #[test]
    fn a_json_line_has_every_field_and_the_key_only_when_asked() {
        let line = json_line(&entry(), None);
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["route"], "docs");
        assert_eq!(v["status"], 200);
        assert_eq!(v["backend"], "127.0.0.1:9101");
        assert!(v.get("key").is_none());
        let with_key: serde_json::Value =
            serde_json::from_str(&json_line(&entry(), Some("doc-7"))).expect("json");
        assert_eq!(with_key["key"], "doc-7");
    }

    #[test]
    fn logfmt_quotes_values_that_need_it() {
        let line = logfmt_line(&entry(), Some("doc \"7\""));
        assert!(line.contains(r#"key="doc \"7\"""#), "{line}");
        assert!(line.contains("route=docs "), "{line}");
        assert!(
            line.ends_with("status=200 bytes=12 duration=0.001500\n"),
            "{line}"
        );
    }
}
