//! The WebSocket frame cursor: never a panic, and the frame boundaries it finds do not depend
//! on how the stream is cut into reads.
//!
//! Input: 2 bytes of cut offset (big-endian u16), then the stream's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_http::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((cut, data)) = data.split_first_chunk::<2>() else {
        return;
    };
    fuzzing::frame_cursor(data, usize::from(u16::from_be_bytes(*cut)));
});
