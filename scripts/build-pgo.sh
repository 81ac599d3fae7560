#!/usr/bin/env bash
# scripts/build-pgo.sh - the release binary with profile-guided optimisation (PGO).
#
#   scripts/build-pgo.sh            -> target/pgo/tether
#
# 1. builds an instrumented Tether (-Cprofile-generate),
# 2. trains it with the benchmark's own load on 127.0.0.1 (bench/run.sh: the sticky-routing
#    checks, HTTP keep-alive with 1,000 document keys, WebSocket echo; about a minute),
# 3. merges the counters with the toolchain's llvm-profdata and builds again with
#    -Cprofile-use.
# Why: LLVM then lays out the hot request path together and moves cold code away; the
# request path is small enough to fit in the instruction cache once laid out. BENCHMARKS.md
# ("Profile-guided build") has the measured gain. PGO changes no behaviour: the same code,
# placed and inlined differently.
#
# Needs: wrk and cmake (bench/setup.sh installs them; this script runs it if either is
# missing) and the toolchain's llvm-tools (`rustup component add llvm-tools`, done here if
# missing; it downloads from static.rust-lang.org). Knobs: PGO_DIR (default target/pgo),
# TRAIN_HTTP_SECS=8, TRAIN_WS_SECS=5.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PGO_DIR=${PGO_DIR:-$REPO/target/pgo}
mkdir -p "$PGO_DIR" && PGO_DIR=$(cd "$PGO_DIR" && pwd)
TRAIN_HTTP_SECS=${TRAIN_HTTP_SECS:-8}
TRAIN_WS_SECS=${TRAIN_WS_SECS:-5}

# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
  echo "build-pgo: installing the toolchain's llvm-tools (llvm-profdata)" >&2
  rustup component add llvm-tools
fi
[ -x "$PROFDATA" ] || { echo "build-pgo: no $PROFDATA after installing llvm-tools" >&2; exit 1; }
# bench/setup.sh installs wrk, and cmake for Pingora's zlib-ng build.
{ command -v wrk && command -v cmake; } >/dev/null 2>&1 || "$REPO/bench/setup.sh"

build() { # build RUSTFLAGS
  RUSTFLAGS="$1" CARGO_TARGET_DIR="$PGO_DIR/build" \
    cargo build --release --locked --bin tether --target "$HOST"
}

echo "build-pgo: 1/3 instrumented build" >&2
rm -rf "$PGO_DIR/profiles" "$PGO_DIR/train"
build "-Cprofile-generate=$PGO_DIR/profiles"
cp "$PGO_DIR/build/$HOST/release/tether" "$PGO_DIR/tether-instrumented"

echo "build-pgo: 2/3 training on 127.0.0.1" >&2
for measure in verify http ws; do
  # Each run starts and stops its own Tether; the counters are written when it exits.
  OUT="$PGO_DIR/train/$measure" TARGETS=tether TETHER_BIN="$PGO_DIR/tether-instrumented" \
    REPEATS=1 WARMUP_SECS=1 HTTP_SECS="$TRAIN_HTTP_SECS" WS_SECS="$TRAIN_WS_SECS" \
    "$REPO/bench/run.sh" "$measure" >"$PGO_DIR/train-$measure.log" 2>&1 \
    || { echo "build-pgo: training ($measure) failed; see $PGO_DIR/train-$measure.log" >&2; exit 1; }
done
ls "$PGO_DIR"/profiles/*.profraw >/dev/null 2>&1 \
  || { echo "build-pgo: training wrote no profile (did Tether exit cleanly?)" >&2; exit 1; }
"$PROFDATA" merge -o "$PGO_DIR/tether.profdata" "$PGO_DIR/profiles"

echo "build-pgo: 3/3 optimised build" >&2
build "-Cprofile-use=$PGO_DIR/tether.profdata"
cp "$PGO_DIR/build/$HOST/release/tether" "$PGO_DIR/tether"
echo "build-pgo: $PGO_DIR/tether" >&2
