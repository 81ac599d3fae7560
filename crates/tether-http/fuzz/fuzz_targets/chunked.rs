//! The chunked decoder: never a panic, and where a body ends (or that it is broken), and how
//! many data bytes it held, do not depend on how its bytes are cut into two reads.
//!
//! Input: 2 bytes of cut offset (big-endian u16), then the body's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((cut, data)) = data.split_first_chunk::<2>() else {
        return;
    };
    fuzzing::chunked(data, usize::from(u16::from_be_bytes(*cut)));
});
