#!/usr/bin/env bash
# bench/tools/callgrind.sh - user-space instructions per proxied request (callgrind `Ir`),
# a figure that does not move with the host's load: Tether (target/release/tether) under
# callgrind behind the benchmark's three backends, 2,000 warm-up requests uncounted, then
# N counted ones for each load: `get` (keep-alive GETs) and `post` (the same with every 10th
# request a 1 KiB POST). Prints one line per load. 127.0.0.1 only; everything it starts is
# stopped by PID at the end.
#
#   bench/tools/callgrind.sh [N]          (default 20000)
#
# Needs valgrind and wrk (bench/setup.sh with PROFILING=1), the release build and
# bench/backend built (bench/run.sh builds it).
set -euo pipefail
BENCH=$(cd "$(dirname "$0")/.." && pwd)
REPO=$(cd "$BENCH/.." && pwd)
N=${1:-20000}
TETHER=${TETHER_BIN:-$REPO/target/release/tether}
BACKEND=$BENCH/backend/target/release/bench-backend
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

B=(); for i in 1 2 3; do
  port=$(free_port); "$BACKEND" "$port" "b$i" 1 >"$WORK/b$i.log" 2>&1 & PIDS+=($!); B+=("127.0.0.1:$port")
done
PORT=$(free_port); ADMIN=$(free_port)
sed -e "s/@WORKERS@/1/" -e "s/@PORT@/$PORT/" -e "s/@ADMIN_PORT@/$ADMIN/" \
    -e "s/@B1@/${B[0]}/" -e "s/@B2@/${B[1]}/" -e "s/@B3@/${B[2]}/" -e "s/@LIMITS@//" \
    "$BENCH/tether.yaml.tmpl" | sed '/@TLS_PORT@/,/key:/d' >"$WORK/tether.yaml"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.%p" \
  "$TETHER" run -c "$WORK/tether.yaml" >"$WORK/tether.log" 2>&1 & PIDS+=($!)
for _ in $(seq 1 600); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done

# wrk cannot stop after N requests, h2load cannot mix methods: a small Lua counter does both.
cat >"$WORK/count.lua" <<LUA
local n, every = 0, tonumber(os.getenv("POST_EVERY") or "0")
local body = string.rep("x", 1024)
request = function()
  n = n + 1
  local key = "doc-" .. (n % 1000)
  if every > 0 and n % every == 0 then
    return wrk.format("POST", "/docs/" .. key .. "/x", {["X-Doc-Id"] = key, ["Content-Length"] = "1024"}, body)
  end
  return wrk.format("GET", "/docs/" .. key .. "/x", {["X-Doc-Id"] = key})
end
LUA
load() { # load SECONDS: 8 connections for SECONDS; prints the request count
  timeout $(($1 + 30)) wrk -t1 -c8 -d"${1}s" -s "$WORK/count.lua" "http://127.0.0.1:$PORT/" \
    | awk '/requests in/{print $1}'
}
for mix in get post; do
  export POST_EVERY=0; [ "$mix" = post ] && export POST_EVERY=10
  load 3 >/dev/null                                     # warm-up, not counted
  callgrind_control -z >/dev/null 2>&1; callgrind_control -i on >/dev/null 2>&1
  # Under callgrind a request takes ~50x longer: size the run to about N requests.
  done_n=$(load $(( N / 400 + 2 )))
  callgrind_control -i off >/dev/null 2>&1; callgrind_control -d >/dev/null 2>&1
  sleep 1
  out=$(ls -t "$WORK"/cg.* | head -1)
  ir=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  [ -n "$done_n" ] && [ -n "$ir" ] || { echo "$mix: no count (requests: ${done_n:-none}, Ir: ${ir:-none}); logs in $WORK" >&2; tail -5 "$WORK/tether.log" >&2; exit 1; }
  echo "$mix: $done_n requests, $ir Ir, $(( ir / done_n )) Ir/request ($out)"
done
