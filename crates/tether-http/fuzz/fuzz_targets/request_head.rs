//! A client's request head, as the HTTP/1 engine reads it: parsing, framing and the checks
//! never panic, and the head written for the backend parses back whole, as one request, with
//! no hop-by-hop field (bar a WebSocket's restated Connection/Upgrade) and no underscored name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::request_head(data);
});
