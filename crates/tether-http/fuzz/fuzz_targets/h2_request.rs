//! An HTTP/2 request's `:path`, `:authority` and fields as the HTTP/2 engine checks them on
//! accepting the stream: never a panic, and nothing let through could split an HTTP/1 request
//! line or name two hosts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::h2_request(data);
});
