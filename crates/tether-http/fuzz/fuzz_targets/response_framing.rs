//! The response framing decision (shared by the HTTP/1 engine and the HTTP/2 adapter) never
//! panics, whatever the status and fields.
//!
//! Input: 2 bytes of status (big-endian u16, mapped onto 100..=999, so out-of-range statuses
//! too), then one field a line (split on `\n`). A line starting with byte 0, 1 or 2 is a
//! `content-length`, `transfer-encoding` or `connection` field whose value is the rest of
//! the line; any other line is `name:value`, split at its first `:` (a line without one is a
//! name with an empty value), the name taken as lossy UTF-8.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

const NAMED: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

fuzz_target!(|data: &[u8]| {
    let Some((status, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = 100 + u16::from_be_bytes(*status) % 900;
    let fields: Vec<(String, Vec<u8>)> = rest
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| match NAMED.get(usize::from(line[0])) {
            Some(name) => (name.to_string(), line[1..].to_vec()),
            None => {
                let (name, value) = match line.iter().position(|&b| b == b':') {
                    Some(colon) => (&line[..colon], &line[colon + 1..]),
                    None => (line, &[][..]),
                };
                (String::from_utf8_lossy(name).into_owned(), value.to_vec())
            }
        })
        .collect();
    fuzzing::response_framing(status, &fields);
});
