//! `Router::decide` N times (default 100,000) on the benchmark's request at 1,000 backends, to
//! count instructions per call with callgrind (`bench/README.md`, "Profiling"): unlike the
//! criterion timing, the count does not move with the machine's other load.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{decide_headers, decide_request, decide_router};
use std::hint::black_box;

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let router = decide_router(1_000);
    let headers = decide_headers();
    let request = decide_request(&headers);
    let mut sum = 0usize;
    for _ in 0..calls {
        sum += router.decide(black_box(&request)).map_or(0, |d| d.backend);
    }
    println!("{sum}");
}
