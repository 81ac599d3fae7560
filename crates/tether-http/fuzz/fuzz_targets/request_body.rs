//! A request body's framing, as the HTTP/1 engine reads it: the body found behind the head
//! never reaches past the bytes there are, has exactly its Content-Length, or is one whole
//! chunked body holding at most `max_body` data bytes.
//!
//! Input: 2 bytes of `max_body` (big-endian u16), then a request head and what follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((max_body, data)) = data.split_first_chunk::<2>() else {
        return;
    };
    fuzzing::request_body(data, u64::from(u16::from_be_bytes(*max_body)));
});
