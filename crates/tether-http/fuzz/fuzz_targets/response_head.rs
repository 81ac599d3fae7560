//! A backend's response head, as the HTTP/1 engine reads it for an HTTP/1.1 and an HTTP/1.0
//! client: never a panic, and the head written for the client parses as a response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::response_head(data);
});
