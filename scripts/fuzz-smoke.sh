#!/usr/bin/env bash
# A short run of every cargo-fuzz target (default 30 s each, FUZZ_SECONDS to change), on the
# stable toolchain with RUSTC_BOOTSTRAP=1, starting from the committed seeds. Installs
# cargo-fuzz if it is missing. A crash fails the run and leaves its input in fuzz/artifacts/.
# `.ci/run` calls this after the tests; README "Fuzzing" has the long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz@0.13.2

run() {
  local crate="$1" target="$2"
  echo "fuzz: $crate $target for ${seconds}s" >&2
  mkdir -p "crates/$crate/fuzz/corpus/$target"
  (cd "crates/$crate" && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" \
    "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -12)
}

run tether-config parse
run tether-routing normalize
run tether-routing decide
run tether-http request_head
run tether-http request_body
run tether-http h2_request
run tether-http response_head
run tether-http response_framing
run tether-http chunked
run tether-http frame_cursor
