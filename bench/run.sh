#!/usr/bin/env bash
# bench/run.sh - Tether against HAProxy and nginx, side by side, on 127.0.0.1.
#
#   bench/run.sh [verify|http|post|tls|churn|churntls|ws|wsrate|idle|sse|fanout|h2|wstls|wsidle|storm|
#                 churntlsresume|flood|all|real|more]   (default: all)
#
#   all  = verify http ws wsrate idle       real = verify post tls churn churntls sse   (traffic
#   closer to real use: POST bodies on the keep-alive connections, the same over TLS 1.3, a new
#   connection per request, plain and TLS with a full handshake each, and SSE streams held)
#   sse    = SSE_CONNS event streams opened, held SSE_HOLD s and closed, in rounds (CPU per
#            stream, first-event latency, RSS per stream), after one run per target on freshly
#            started processes (sse-rss-<target>.txt: RSS per stream without allocator reuse)
#   fanout = FANOUT_CONNS streams of one document, FANOUT_MSGS events published through the
#            proxy 100 ms apart, in rounds (delivery latency, CPU per delivered event); not in
#            `all` or `real`
#   h2     = the post mix over HTTP/2 on TLS 1.3 (ALPN h2), keep-alive: parallel h2load
#            processes, H2_GET_PROCS of GETs and one of POSTs with H2_POST_CONNS of the
#            HTTP_CONNS connections, each process with an X-Doc-Id of its own (CPU per request)
#   wstls  = ws over TLS 1.3 (wss:// to each proxy's TLS port; CPU per message)
#   wsidle = WSIDLE_CONNS WebSockets that first echo WSIDLE_MSGS messages (64 bytes and
#            WSIDLE_SIZE alternately), then idle: RSS per connection on freshly started processes
#   storm  = STORM_CONNS WebSockets; the backends (told directly) close them all with 1012 and
#            every client reconnects at once: time until all are back, errors, CPU per
#            reconnection over the storm, in rounds
#   churntlsresume = churntls with TLS 1.3 session resumption (wsload --mode churn: a session
#            cache per connection loop; CPU per request, resumed fraction)
#   flood  = does one document flooding the proxy with streams hurt the others? Per round and
#            target two runs: victim alone (wsload echo, FLOOD_CONNS WebSockets over the DOC_IDS
#            keys at FLOOD_RATE msgs/s for FLOOD_SECS), then the same victim while a second wsload
#            holds up to FLOOD_STREAMS SSE streams of the one document `flood` (a 429 counted as
#            refused); Tether's route gets limits: { streams_per_key: FLOOD_LIMIT } for this
#            scenario only, the peers run unchanged. Not in `all`, `real` or `more`
#   more   = verify h2 wstls churntlsresume storm, then wsidle on freshly started processes
#
# Builds Tether (the plain `cargo build --release` binary, the headline; TETHER_BUILD=pgo for the
# profile-guided build of scripts/build-pgo.sh) and the two bench tools, renders the peer
# configs, starts 3 backends + nginx + HAProxy + Tether, runs the measurement in rounds that
# visit every target in a freshly randomised order (drawn from SEED, logged and recorded),
# tears everything down by PID, and writes bench/results/<stamp>/ with the raw outputs and
# summary.md. Installs nothing (TETHER_BUILD=pgo: the toolchain's llvm-tools, via
# build-pgo.sh); bench/setup.sh installs the peers and wrk.
#
# Headline figures (BENCHMARKS.md) need REPEATS>=10: summarize.py reports the median over rounds
# of the per-round Tether/peer CPU ratio with a bootstrap 95 % interval, over all rounds and
# over the rounds not disturbed by foreign load or steal time.
#
# All traffic goes to 127.0.0.1. Every load run is bounded by its own duration and
# by `timeout`. Only processes started by this script are signalled, by PID.
#
# Knobs (environment):
#   PIN=1            1: proxies on CPU $PROXY_CPUS (0); backends + load tools on $LOAD_CPUS (1)
#   WORKERS=1        worker processes / threads of every proxy
#   TARGETS="direct nginx haproxy tether"      (any subset/order; tether variants are appended)
#   TETHER_BUILD=plain  plain: `cargo build --release` ($CARGO_TARGET_DIR/release/tether), the headline;
#                    pgo: the profile-guided build of scripts/build-pgo.sh ($CARGO_TARGET_DIR/pgo/tether)
#   PLAIN=0          1: also measure the plain release build, as target "plain", in the same rounds
#                    (meant for TETHER_BUILD=pgo; with the plain default it is an A/A run)
#   TETHER_BIN=...   use this binary instead of building one
#   TETHER_VARIANTS="name=/path/to/bin ..."   extra Tether binaries measured in the same rotation
#   BUILD=1          0: do not run cargo (binaries must exist)
#   SEED=<random>    seed of the per-round target order (printed, in env.txt, order.txt, META);
#                    the same SEED and TARGETS give the same orders
#   REPEATS=3 (headlines: REPEATS>=10) HTTP_SECS=10 HTTP_CONNS=64 WARMUP_SECS=2 DOC_IDS=1000
#                    (http, post and tls alike)
#   POST_EVERY=10 POST_BYTES=1024   post, tls: every POST_EVERY-th request of each wrk thread is a
#                    POST with a POST_BYTES body (lua/post_mix.lua); tls runs it over TLS 1.3
#                    (self-signed P-256 certificate made with openssl into RUN; no `direct`)
#   WS_REPEATS=$REPEATS WS_CONNS=1000 WS_SECS=8 WS_SIZE=64 WS_FIXED_RATE=20000
#   IDLE_CONNS=(what fits in the fd limit; 9000 at 20000) IDLE_HOLD=6
#   SSE_REPEATS=$REPEATS SSE_CONNS=2000 SSE_HOLD=5 (a proxy holds 2 fds per stream)
#   FANOUT_REPEATS=$REPEATS FANOUT_CONNS=1000 FANOUT_MSGS=20
#   H2_GET_PROCS=4 H2_POST_CONNS=HTTP_CONNS/10 H2_STREAMS=1   (h2: rounds, secs, warm-up as http)
#   WSIDLE_CONNS=$IDLE_CONNS WSIDLE_MSGS=20 WSIDLE_SIZE=8192 WSIDLE_HOLD=$IDLE_HOLD
#   STORM_REPEATS=$REPEATS STORM_CONNS=5000 STORM_WAIT=30 (s, the most a storm is waited for)
#   FLOOD_REPEATS=$REPEATS FLOOD_CONNS=500 FLOOD_RATE=5000 FLOOD_SECS=6 FLOOD_STREAMS=3000
#                    FLOOD_LIMIT=100 (Tether's streams_per_key in the flood scenario)
#   CHURN_SESSIONS=8 (churntlsresume: sessions cached per loop; conns, secs, rounds as http)
#   SETTLE_MAX=45 SETTLE_SLACK=16   (sse: a run's CPU is counted until the target holds no more
#                    than SETTLE_SLACK descriptors above what it held before, at most SETTLE_MAX s
#                    after the load tool exits; see do_sse)
#   QUIET_MAX=15 QUIET_WAIT=30 MAX_FOREIGN=8 MAX_STEAL=2 RETRIES=2 EXTRA_SECS=240   (foreign-load guard;
#                    a run above MAX_FOREIGN % foreign CPU or MAX_STEAL % steal is retried, and
#                    summarize.py flags a round as disturbed when any kept run is above either)
#   TARGET_HTTP= TARGET_POST= TARGET_TLS= TARGET_CHURN= TARGET_CHURNTLS= TARGET_WS= TARGET_WSRATE=
#   TARGET_SSE= TARGET_FANOUT= TARGET_H2= TARGET_WSTLS= TARGET_STORM= TARGET_CHURNTLSRESUME=
#   STORM_MAX_SECS=5 WSIDLE_MAX_KB=8   (storm: all back within, 0 errors; wsidle: KB per conn)
#                    e.g. 0.85: summary.md says
#                    whether the upper bound of the 95 % interval of Tether/peer CPU is below it
#   OUT=bench/results/<utc-stamp>-<pinned|unpinned>   RUN=<OUT>/run (rendered configs, logs)

set -uo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
cd "$BENCH" || exit 1

MEASURE=${1:-all}
PIN=${PIN:-1}
WORKERS=${WORKERS:-1}
REPEATS=${REPEATS:-3}
HTTP_SECS=${HTTP_SECS:-10}
HTTP_CONNS=${HTTP_CONNS:-64}
WARMUP_SECS=${WARMUP_SECS:-2}
DOC_IDS=${DOC_IDS:-1000}
POST_EVERY=${POST_EVERY:-10}
POST_BYTES=${POST_BYTES:-1024}
WS_REPEATS=${WS_REPEATS:-$REPEATS}
WS_CONNS=${WS_CONNS:-1000}
WS_SECS=${WS_SECS:-8}
WS_SIZE=${WS_SIZE:-64}
WS_FIXED_RATE=${WS_FIXED_RATE:-20000}
IDLE_HOLD=${IDLE_HOLD:-6}
SSE_REPEATS=${SSE_REPEATS:-$REPEATS}
SSE_CONNS=${SSE_CONNS:-2000}
SSE_HOLD=${SSE_HOLD:-5}
FANOUT_REPEATS=${FANOUT_REPEATS:-$REPEATS}
FANOUT_CONNS=${FANOUT_CONNS:-1000}
FANOUT_MSGS=${FANOUT_MSGS:-20}
H2_GET_PROCS=${H2_GET_PROCS:-4}
H2_POST_CONNS=${H2_POST_CONNS:-$(( (HTTP_CONNS + 5) / 10 ))}
H2_STREAMS=${H2_STREAMS:-1}
WSIDLE_MSGS=${WSIDLE_MSGS:-20}
WSIDLE_SIZE=${WSIDLE_SIZE:-8192}
WSIDLE_HOLD=${WSIDLE_HOLD:-$IDLE_HOLD}
STORM_REPEATS=${STORM_REPEATS:-$REPEATS}
STORM_CONNS=${STORM_CONNS:-5000}
STORM_WAIT=${STORM_WAIT:-30}
CHURN_SESSIONS=${CHURN_SESSIONS:-8}
FLOOD_REPEATS=${FLOOD_REPEATS:-$REPEATS}
FLOOD_CONNS=${FLOOD_CONNS:-500}
FLOOD_RATE=${FLOOD_RATE:-5000}
FLOOD_SECS=${FLOOD_SECS:-6}
FLOOD_STREAMS=${FLOOD_STREAMS:-3000}
FLOOD_LIMIT=${FLOOD_LIMIT:-100}
TARGETS=${TARGETS:-"direct nginx haproxy tether"}
TETHER_VARIANTS=${TETHER_VARIANTS:-}
TETHER_BUILD=${TETHER_BUILD:-plain}
PLAIN=${PLAIN:-0}
BUILD=${BUILD:-1}
SETTLE_MAX=${SETTLE_MAX:-45}
SETTLE_SLACK=${SETTLE_SLACK:-16}
QUIET_MAX=${QUIET_MAX:-15}
QUIET_WAIT=${QUIET_WAIT:-30}
MAX_FOREIGN=${MAX_FOREIGN:-8}
MAX_STEAL=${MAX_STEAL:-2}
SEED=${SEED:-$(( (RANDOM << 15 | RANDOM) ))}
RETRIES=${RETRIES:-2}
EXTRA_SECS=${EXTRA_SECS:-240}
EXTRA_USED=0
LAYOUT=$([ "$PIN" = 1 ] && echo pinned || echo unpinned)
OUT=${OUT:-$BENCH/results/$(date -u +%Y%m%dT%H%M%SZ)-$LAYOUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RUN=${RUN:-$OUT/run}; mkdir -p "$RUN" && RUN=$(cd "$RUN" && pwd)

SCENARIOS="verify|http|post|tls|churn|churntls|ws|wsrate|idle|sse|fanout|h2|wstls|wsidle|storm|churntlsresume|flood|all|real|more"
case "|$SCENARIOS|" in *"|$MEASURE|"*) ;;
  *) echo "usage: $0 [$SCENARIOS]" >&2; exit 2;; esac

# ------------------------------------------------------------------ prerequisites
missing=()
for tool in wrk curl taskset python3 cargo openssl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
case "$MEASURE" in h2|more) command -v h2load >/dev/null || missing+=(h2load) ;; esac
for tool in haproxy nginx; do   # only the peers this run measures
  case " $TARGETS " in *" $tool "*) command -v "$tool" >/dev/null || missing+=("$tool") ;; esac
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]}. Run bench/setup.sh (apt-get installs haproxy nginx wrk h2load openssl) first." >&2
  exit 1
fi

BACKEND_BIN=$BENCH/backend/target/release/bench-backend
WSLOAD_BIN=$BENCH/wsload/target/release/wsload
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
TETHER_BIN_GIVEN=${TETHER_BIN:+1}
case "$TETHER_BUILD" in
  pgo)   TETHER_BIN=${TETHER_BIN:-$TARGET_DIR/pgo/tether} ;;
  plain) TETHER_BIN=${TETHER_BIN:-$TARGET_DIR/release/tether} ;;
  *) echo "TETHER_BUILD must be pgo or plain" >&2; exit 2 ;;
esac
PLAIN_BIN=$TARGET_DIR/release/tether
if [ "$BUILD" = 1 ]; then
  # The tools keep their own target dirs (they are not workspace members).
  (cd "$BENCH/backend" && CARGO_TARGET_DIR=target cargo build --release --locked -q) || exit 1
  (cd "$BENCH/wsload" && CARGO_TARGET_DIR=target cargo build --release --locked -q) || exit 1
  if [ -z "${TETHER_BIN_GIVEN:-}" ] && [ "$TETHER_BUILD" = pgo ]; then
    PGO_DIR="$TARGET_DIR/pgo" "$REPO/scripts/build-pgo.sh" >"$OUT/build-pgo.log" 2>&1 \
      || { echo "scripts/build-pgo.sh failed; see $OUT/build-pgo.log" >&2; exit 1; }
  fi
  if { [ -z "${TETHER_BIN_GIVEN:-}" ] && [ "$TETHER_BUILD" = plain ]; } || [ "$PLAIN" = 1 ]; then
    (cd "$REPO" && cargo build --release --locked -q --bin tether) || exit 1
  fi
fi
[ "$PLAIN" = 1 ] && TETHER_VARIANTS="$TETHER_VARIANTS plain=$PLAIN_BIN"
for b in "$BACKEND_BIN" "$WSLOAD_BIN" "$TETHER_BIN"; do
  [ -x "$b" ] || { echo "missing $b (BUILD=0?)" >&2; exit 1; }
done

# ------------------------------------------------------------------ limits, layout
# The fd hard limit (20000 here, not raisable without CAP_SYS_RESOURCE): a proxy holds 2 fds
# per proxied connection, and nginx needs 1/16 of its worker_connections free.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
MAXCONN=$(( (NOFILE - 200) / 2 ))
DEFAULT_IDLE=$(( (NOFILE * 15 / 16 - 500) / 2 / 1000 * 1000 )); [ "$DEFAULT_IDLE" -gt 10000 ] && DEFAULT_IDLE=10000
IDLE_CONNS=${IDLE_CONNS:-$DEFAULT_IDLE}
WSIDLE_CONNS=${WSIDLE_CONNS:-$IDLE_CONNS}

if [ "$PIN" = 1 ]; then PROXY_CPUS=${PROXY_CPUS:-0}; LOAD_CPUS=${LOAD_CPUS:-1}
else PROXY_CPUS=${PROXY_CPUS:-}; LOAD_CPUS=${LOAD_CPUS:-}; fi
count_cpus() { # "0-2,5" -> 4 ; "" -> nproc
  [ -z "$1" ] && { nproc; return; }
  local n=0 part a b; IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then a=${part%-*}; b=${part#*-}; n=$((n + b - a + 1)); else n=$((n + 1)); fi
  done; echo "$n"
}
LOAD_THREADS=${LOAD_THREADS:-$(count_cpus "$LOAD_CPUS")}
LOADPIN=(); [ -n "$LOAD_CPUS" ] && LOADPIN=(taskset -c "$LOAD_CPUS")
BACKEND_THREADS=${BACKEND_THREADS:-$LOAD_THREADS}
BACKEND_PORTS=(18101 18102 18103)
B1=127.0.0.1:18101 B2=127.0.0.1:18102 B3=127.0.0.1:18103

# ------------------------------------------------------------------ proxy registry
# "name port admin_port command". Tether gets its own admin port (metrics on). Every proxy also
# has a TLS listener on port + TLS_OFFSET (the `tls` scenario; nginx 18401, haproxy 18402, ...).
TLS_OFFSET=400
PROXIES=(
  "nginx 18001 - nginx -p $RUN -c $RUN/nginx.conf -e $RUN/nginx-error.log"
  "haproxy 18002 - haproxy -db -f $RUN/haproxy.cfg"
)
tether_cmd() { # tether_cmd NAME BIN: raise the soft fd limit in Tether's own process too
  echo "env MIMALLOC_ALLOW_THP=0 $2 run -c $RUN/$1.yaml"
}
PROXIES+=("tether 18004 18904 $(tether_cmd tether "$TETHER_BIN")")
vport=18005
for v in $TETHER_VARIANTS; do
  PROXIES+=("${v%%=*} $vport $((vport + 900)) $(tether_cmd "${v%%=*}" "${v#*=}")")
  TARGETS="$TARGETS ${v%%=*}"; vport=$((vport + 1))
done

declare -A PORT_OF TLS_PORT_OF CMD_OF ADMIN_OF PID_OF REST_FDS
for entry in "${PROXIES[@]}"; do
  read -r n p a c <<<"$entry"; PORT_OF[$n]=$p; TLS_PORT_OF[$n]=$((p + TLS_OFFSET)); ADMIN_OF[$n]=$a; CMD_OF[$n]=$c
done
PORT_OF[direct]=${BACKEND_PORTS[0]}

PIDS=()
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$OUT/driver.log" >&2; }

start_bg() { # start_bg NAME CPUS cmd...   (the recorded PID is the command itself)
  local name=$1 cpus=$2; shift 2
  if [ -n "$cpus" ]; then taskset -c "$cpus" "$@" >"$RUN/$name.log" 2>&1 &
  else "$@" >"$RUN/$name.log" 2>&1 &
  fi
  local pid=$!
  PIDS+=("$pid"); PID_OF[$name]=$pid; echo "$pid" >"$RUN/$name.pid"
}

tree_pids() { # PID and all of its descendants
  local p=$1 c; echo "$p"
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}

fd_count() { # open descriptors of a process tree
  local n=0 p; for p in $(tree_pids "$1"); do n=$((n + $(ls -U /proc/"$p"/fd 2>/dev/null | wc -l))); done
  echo "$n"
}

# settle PID LIMIT: wait (polling, at most SETTLE_MAX s) until the process tree holds no more
# than LIMIT descriptors; sets SETTLE_MS (the wait) and SETTLED (1, or 0 when the bound ran out).
settle() {
  local t0 now; t0=$(date +%s%N); SETTLED=1
  while [ "$(fd_count "$1")" -gt "$2" ]; do
    now=$(date +%s%N)
    [ $(( (now - t0) / 1000000000 )) -ge "$SETTLE_MAX" ] && { SETTLED=0; break; }
    sleep 0.1
  done
  SETTLE_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
}

cpu_ticks() { # user+system clock ticks of a process tree
  local t=0 p s f
  for p in $(tree_pids "$1"); do
    s=$(cat /proc/"$p"/stat 2>/dev/null) || continue
    s=${s##*) }; read -ra f <<<"$s"; t=$((t + f[11] + f[12]))
  done; echo "$t"
}

busy_pct() { # whole-machine CPU busy % over $1 seconds
  local a b; read -ra a < <(head -1 /proc/stat); sleep "$1"; read -ra b < <(head -1 /proc/stat)
  local i ta=0 tb=0; for i in 1 2 3 4 5 6 7 8; do ta=$((ta + a[i])); tb=$((tb + b[i])); done
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) tot=$((tb - ta))
  [ "$tot" -le 0 ] && { echo 0; return; }; echo $(( 100 * (tot - idle) / tot ))
}

quiet() { # wait (bounded) until the machine is quiet; sets BUSY
  local t0=$SECONDS
  BUSY=$(busy_pct 1)
  while [ "$BUSY" -gt "$QUIET_MAX" ] && [ $((SECONDS - t0)) -lt "$QUIET_WAIT" ] \
        && [ $((EXTRA_USED + SECONDS - t0)) -lt "$EXTRA_SECS" ]; do
    BUSY=$(busy_pct 1)
  done
  local w=$((SECONDS - t0 - 1)); [ "$w" -gt 0 ] && EXTRA_USED=$((EXTRA_USED + w))
  [ "$BUSY" -gt "$QUIET_MAX" ] && log "warning: machine still ${BUSY}% busy before run (foreign load)"
  return 0
}

# Foreign load: machine user+nice+system ticks minus those of our processes and of this
# shell's reaped children (load generators, helpers). Steal: the hypervisor's steal ticks
# (/proc/stat, 8th value of the cpu line), time our vCPUs wanted to run and could not.
snap() { # sets S_WALL S_MACH S_STEAL S_OURS S_KIDS (in this shell, not a subshell)
  local a p; S_WALL=$(date +%s%N); read -ra a </proc/stat; S_MACH=$((a[1] + a[2] + a[3])); S_STEAL=${a[8]:-0}
  S_OURS=0; for p in "${PIDS[@]}"; do S_OURS=$((S_OURS + $(cpu_ticks "$p"))); done
  times >"$RUN/times.txt"
  S_KIDS=$(awk -v hz="$CLK_TCK" 'NR==2 { t=0; for (i=1;i<=2;i++) { split($i, x, /[ms]/); t += x[1]*60 + x[2] } printf "%d", t*hz }' "$RUN/times.txt")
}
foreign_since() { # foreign CPU % of the whole machine since the last snap (stdout); also sets
  # STEAL10 (steal ticks in tenths of a % of the machine's ticks) and STEAL_PCT ("1.5")
  local w0=$S_WALL m0=$S_MACH s0=$S_STEAL o0=$S_OURS k0=$S_KIDS; snap
  local wall_ticks=$(( (S_WALL - w0) * CLK_TCK / 1000000000 * NCPU ))
  STEAL10=0; STEAL_PCT=0.0
  [ "$wall_ticks" -le 0 ] && { echo 0; return; }
  local st=$(( S_STEAL - s0 )); [ "$st" -lt 0 ] && st=0
  STEAL10=$(( 1000 * st / wall_ticks )); STEAL_PCT="$((STEAL10 / 10)).$((STEAL10 % 10))"
  local f=$(( (S_MACH - m0) - (S_OURS - o0) - (S_KIDS - k0) )); [ "$f" -lt 0 ] && f=0
  echo $(( 100 * f / wall_ticks ))
}
CLK_TCK=$(getconf CLK_TCK); NCPU=$(nproc)

cleanup() {
  local pid all=() p i
  for pid in "${PIDS[@]}"; do all+=($(tree_pids "$pid")); done
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
  for i in $(seq 50); do
    local alive=0; for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # wait_port PORT PID [SCHEME]   (https: any certificate)
  local i
  for i in $(seq 150); do
    kill -0 "$2" 2>/dev/null || return 1
    curl -sk -o /dev/null --max-time 1 "${3:-http}://127.0.0.1:$1/" && return 0
    sleep 0.1
  done; return 1
}

render() { # render TEMPLATE OUT PORT [ADMIN_PORT]   (@TLS_PORT@ = PORT + TLS_OFFSET)
  sed -e "s|@RUN@|$RUN|g; s|@WORKERS@|$WORKERS|g; s|@NOFILE@|$NOFILE|g; s|@MAXCONN@|$MAXCONN|g" \
      -e "s|@B1@|$B1|g; s|@B2@|$B2|g; s|@B3@|$B3|g; s|@PORT@|$3|g; s|@TLS_PORT@|$(($3 + TLS_OFFSET))|g" \
      -e "s|@ADMIN_PORT@|${4:-}|g; s|@LIMITS@|$TETHER_LIMITS|g" "$1" >"$2"
}
# Tether's per-route limits: only the flood scenario has one (peers: no such setting).
TETHER_LIMITS=""
[ "$MEASURE" = flood ] && TETHER_LIMITS="limits: { streams_per_key: $FLOOD_LIMIT }"

make_cert() { # one self-signed P-256 certificate for every TLS listener, fresh for each run
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -keyout "$RUN/tls-key.pem" -out "$RUN/tls-cert.pem" >"$RUN/openssl.log" 2>&1 \
    || { log "openssl req failed; see $RUN/openssl.log"; exit 1; }
  cat "$RUN/tls-cert.pem" "$RUN/tls-key.pem" >"$RUN/tls.pem"   # HAProxy: cert + key in one file
  chmod 600 "$RUN/tls-key.pem" "$RUN/tls.pem"
}

render_configs() {
  local n
  mkdir -p "$RUN/nginx-tmp"
  make_cert
  render peers/nginx.conf.tmpl "$RUN/nginx.conf" "${PORT_OF[nginx]}"
  render peers/haproxy.cfg.tmpl "$RUN/haproxy.cfg" "${PORT_OF[haproxy]}"
  for n in "${!ADMIN_OF[@]}"; do
    [ "${ADMIN_OF[$n]}" = - ] || render tether.yaml.tmpl "$RUN/$n.yaml" "${PORT_OF[$n]}" "${ADMIN_OF[$n]}"
  done
}

port_busy() { # port_busy PORT: true when something accepts connections on 127.0.0.1:PORT
  timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

start_all() {
  local i name p busy=""
  # Another bench run (or anything else) on our ports would answer wait_port's probes for
  # processes of ours that failed to bind: refuse to start instead of measuring someone else's.
  for p in "${BACKEND_PORTS[@]}"; do port_busy "$p" && busy+="$p "; done
  for name in $TARGETS; do
    [ "$name" = direct ] && continue
    for p in "${PORT_OF[$name]}" "${TLS_PORT_OF[$name]}" "${ADMIN_OF[$name]}"; do
      [ "$p" = - ] || ! port_busy "$p" || busy+="$p "
    done
  done
  [ -z "$busy" ] || { log "ports already in use: $busy(another bench run?); not starting"; exit 1; }
  for i in 0 1 2; do
    start_bg "b$((i+1))" "$LOAD_CPUS" "$BACKEND_BIN" "${BACKEND_PORTS[i]}" "b$((i+1))" "$BACKEND_THREADS"
  done
  for i in 0 1 2; do wait_port "${BACKEND_PORTS[i]}" "${PID_OF[b$((i+1))]}" || { log "backend b$((i+1)) failed"; exit 1; }; done
  PID_OF[direct]=${PID_OF[b1]}
  for name in $TARGETS; do
    [ "$name" = direct ] && continue
    [ -n "${CMD_OF[$name]:-}" ] || { log "unknown target $name"; exit 1; }
    start_bg "$name" "$PROXY_CPUS" bash -c "ulimit -n $NOFILE; exec ${CMD_OF[$name]}"
    { wait_port "${PORT_OF[$name]}" "${PID_OF[$name]}" && wait_port "${TLS_PORT_OF[$name]}" "${PID_OF[$name]}" https; } \
      || { log "$name failed to start; see $RUN/$name.log"; tail -5 "$RUN/$name.log" >&2; exit 1; }
  done
  for name in $TARGETS; do [ "$name" = direct ] || REST_FDS[$name]=$(fd_count "${PID_OF[$name]}"); done
  log "started: $(for n in b1 b2 b3 $TARGETS; do [ $n = direct ] || printf '%s=%s ' "$n" "${PID_OF[$n]}"; done)"
}

meta() { # meta FILE key=value...  -> appends a META json line
  local f=$1; shift; local kv s="" first=1
  for kv in "$@"; do [ $first = 1 ] || s+=","; first=0; s+="\"${kv%%=*}\":\"${kv#*=}\""; done
  echo "META {$s}" >>"$f"
}

# ------------------------------------------------------------------ measurements
post_probe() { # post_probe URL DOC_ID: "<status> <x-backend> <x-body-bytes> <x-forwarding-seen>" of one POST with
  # the POST_BYTES body (as wrk sends it: Content-Length, no Expect), HTTP/1.1, TLS 1.3 for https
  curl -sk --http1.1 --tlsv1.3 -o /dev/null -D - --max-time 2 -H 'Expect:' -H "X-Doc-Id: $2" \
       --data-binary @"$RUN/post-body.bin" "$1" | tr -d '\r' \
    | awk -F': ' 'NR==1{split($0, a, " "); st=a[2]} tolower($1)=="x-backend"{b=$2}
                  tolower($1)=="x-body-bytes"{n=$2} tolower($1)=="x-forwarding-seen"{f=$2}
                  END{print (st ? st : "-"), (b ? b : "-"), (n ? n : "-"), (f ? f : "-")}'
}

h2_probe() { # h2_probe URL DOC_ID [post]: "<protocol> <status> <x-backend> <x-body-bytes> <x-forwarding-seen>"
  # of one HTTP/2 request over TLS 1.3 (a POST with the POST_BYTES body with `post`)
  local data=(); [ "${3:-}" = post ] && data=(--data-binary @"$RUN/post-body.bin")
  curl -sk --http2 --tlsv1.3 -o /dev/null -D - --max-time 2 -H "X-Doc-Id: $2" "${data[@]}" "$1" | tr -d '\r' \
    | awk -F': ' 'NR==1{split($0, a, " "); p=a[1]; st=a[2]} tolower($1)=="x-backend"{b=$2}
                  tolower($1)=="x-body-bytes"{n=$2} tolower($1)=="x-forwarding-seen"{f=$2}
                  END{print (p ? p : "-"), (st ? st : "-"), (b ? b : "-"), (n ? n : "-"), (f ? f : "-")}'
}

tls_probe() { # tls_probe PORT [OPTION]: "<protocol> <cipher suite>" of a handshake ("- -": none);
  # SNI 127.0.0.1, as wrk sends it
  timeout 5 openssl s_client -connect "127.0.0.1:$1" -servername 127.0.0.1 -brief ${2:-} </dev/null 2>&1 \
    | awk -F': ' '$1=="Protocol version"{p=$2} $1=="Ciphersuite"{c=$2} END{print (p ? p : "-"), (c ? c : "-")}'
}

do_verify() {
  local fail=0 name port id b k ids seen
  head -c "$POST_BYTES" /dev/zero | tr '\0' x >"$RUN/post-body.bin"
  for name in $TARGETS; do
    [ "$name" = direct ] && continue
    port=${PORT_OF[$name]}; declare -A where=(); seen=""
    for id in $(seq 1 60); do
      ids=""
      for k in 1 2 3; do
        b=$(curl -s -o /dev/null -D - --max-time 2 -H "X-Doc-Id: doc-$id" "http://127.0.0.1:$port/docs/doc-$id/x" \
            | tr -d '\r' | awk -F': ' 'tolower($1)=="x-backend"{print $2}')
        ids+="$b "
      done
      read -ra arr <<<"$ids"
      if [ "${arr[0]:-}" = "" ] || [ "${arr[0]}" != "${arr[1]:-}" ] || [ "${arr[0]}" != "${arr[2]:-}" ]; then
        log "FAIL $name: doc-$id not sticky: $ids"; fail=1
      fi
      where[doc-$id]=${arr[0]:-}; seen+="${arr[0]:-} "
    done
    local dist; dist=$(tr ' ' '\n' <<<"$seen" | grep -v '^$' | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')
    if [ "$(tr ' ' '\n' <<<"$seen" | grep -v '^$' | sort -u | wc -l)" -ne 3 ]; then log "FAIL $name: ids do not spread over 3 backends: $dist"; fail=1
    else log "ok   $name: 60 ids x3 requests sticky; spread $dist"; fi
    local wsb mism=0
    for id in 1 2 3 4 5 6 7 8 9 10; do
      wsb=$(curl -s -o /dev/null -D - --max-time 0.5 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
            -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
            -H "X-Doc-Id: doc-$id" "http://127.0.0.1:$port/ws/x" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-backend"{print $2}')
      [ "$wsb" = "${where[doc-$id]}" ] || mism=$((mism + 1))
    done
    if [ $mism = 0 ]; then log "ok   $name: WS upgrade for 10 ids routed like HTTP"; else log "FAIL $name: $mism/10 WS upgrades routed differently from HTTP"; fail=1; fi
    # post and tls: a POST with a POST_BYTES body answers 200, its whole body reaches the backend
    # (x-body-bytes) and it is routed like the GETs of its key; then the same on the TLS port.
    # The backend also saw the same header work from every proxy: X-Forwarded-For, -Proto, -Host
    # and X-Request-Id (x-forwarding-seen).
    local scheme p st got fwd bad
    for scheme in http https; do
      if [ $scheme = http ]; then p=$port; else p=${TLS_PORT_OF[$name]}; fi
      bad=""
      for id in 1 2 3 4 5 6 7 8 9 10; do
        read -r st b got fwd < <(post_probe "$scheme://127.0.0.1:$p/docs/doc-$id/content" "doc-$id")
        [ "$st" = 200 ] && [ "$got" = "$POST_BYTES" ] && [ "$b" = "${where[doc-$id]}" ] && [ "$fwd" = for,proto,host,id ] \
          || bad+="doc-$id:status=$st,backend=$b(GET:${where[doc-$id]}),body=$got,forwarding=$fwd "
      done
      if [ -z "$bad" ]; then log "ok   $name: $scheme POST x10 with a $POST_BYTES-byte body: 200, body delivered, routed like GET, forwarding headers for,proto,host,id"
      else log "FAIL $name: $scheme POST: $bad"; fail=1; fi
    done
    local proto suite
    read -r proto suite < <(tls_probe "${TLS_PORT_OF[$name]}")
    if [ "$proto" = TLSv1.3 ]; then log "ok   $name: TLS port ${TLS_PORT_OF[$name]} negotiates $proto $suite"
    else log "FAIL $name: TLS port ${TLS_PORT_OF[$name]} negotiated '$proto' (TLSv1.3 expected)"; fail=1; fi
    read -r proto suite < <(tls_probe "${TLS_PORT_OF[$name]}" -tls1_2)
    if [ "$proto" = - ]; then log "ok   $name: TLS 1.2 refused"
    elif [ "${ADMIN_OF[$name]:--}" != - ]; then   # Tether: no setting restricts its TLS versions
      log "note $name: TLS 1.2 accepted ($suite): Tether has no TLS version setting; wrk negotiates 1.3"
    else log "FAIL $name: TLS 1.2 accepted ($suite), the peer's config should refuse it"; fail=1; fi
    # h2: the TLS port speaks HTTP/2 (ALPN h2); a GET and a POST are routed like HTTP/1.1's,
    # the POST's body reaches the backend, and the backend sees the same forwarding headers.
    local proto st2 b2 got2 fwd2 bad2=""
    for id in 1 2 3; do
      read -r proto st2 b2 got2 fwd2 < <(h2_probe "https://127.0.0.1:${TLS_PORT_OF[$name]}/docs/doc-$id/content" "doc-$id")
      [ "$proto" = HTTP/2 ] && [ "$st2" = 200 ] && [ "$b2" = "${where[doc-$id]}" ] && [ "$fwd2" = for,proto,host,id ] \
        || bad2+="GET doc-$id:$proto,status=$st2,backend=$b2(GET:${where[doc-$id]}),forwarding=$fwd2 "
      read -r proto st2 b2 got2 fwd2 < <(h2_probe "https://127.0.0.1:${TLS_PORT_OF[$name]}/docs/doc-$id/content" "doc-$id" post)
      [ "$proto" = HTTP/2 ] && [ "$st2" = 200 ] && [ "$b2" = "${where[doc-$id]}" ] && [ "$got2" = "$POST_BYTES" ] \
        || bad2+="POST doc-$id:$proto,status=$st2,backend=$b2(GET:${where[doc-$id]}),body=$got2 "
    done
    if [ -z "$bad2" ]; then log "ok   $name: HTTP/2 over TLS (ALPN h2): GET and POST x3, 200, routed like HTTP/1.1, body delivered, forwarding for,proto,host,id"
    else log "FAIL $name: HTTP/2: $bad2"; fail=1; fi
    local r; r=$(timeout 30 "$WSLOAD_BIN" --url "ws://127.0.0.1:$port/ws/verify" --conns 20 --msgs 5 --duration 5 --max-secs 15 --label "$name" 2>/dev/null | grep '^RESULT')
    if grep -q '"connected":20,"conn_err":0,"msg_err":0,"msgs":100' <<<"$r"; then log "ok   $name: WS echo 20 conns x 5 msgs"; else log "FAIL $name: WS echo: $r"; fail=1; fi
    r=$(timeout 30 "$WSLOAD_BIN" --url "wss://127.0.0.1:${TLS_PORT_OF[$name]}/ws/verify" --conns 20 --msgs 5 --duration 5 --max-secs 15 --label "$name" 2>/dev/null | grep '^RESULT')
    if grep -q '"connected":20,"conn_err":0,"msg_err":0,"msgs":100' <<<"$r"; then log "ok   $name: WS echo over TLS (wss) 20 conns x 5 msgs"; else log "FAIL $name: wss echo: $r"; fail=1; fi
    # churntlsresume: does the TLS port resume TLS 1.3 sessions? 4 loops for 1 s.
    r=$(timeout 30 "$WSLOAD_BIN" --url "https://127.0.0.1:${TLS_PORT_OF[$name]}/" --mode churn --conns 4 --duration 1 --ids "$DOC_IDS" \
        --sessions "$CHURN_SESSIONS" --max-secs 15 --label "$name" 2>/dev/null | grep '^RESULT')
    local req res; req=$(grep -o '"requests":[0-9]*' <<<"$r" | cut -d: -f2); res=$(grep -o '"resumed":[0-9]*' <<<"$r" | cut -d: -f2)
    if [ -n "$req" ] && [ "$req" -gt 4 ] && [ "$((res * 10))" -ge "$((req * 9))" ] && grep -q '"errors":0' <<<"$r"; then
      log "ok   $name: TLS 1.3 session resumption: $res of $req handshakes resumed"
    elif [ "${ADMIN_OF[$name]:--}" != - ]; then log "note $name: TLS 1.3 session resumption: ${res:-?} of ${req:-?} handshakes resumed ($r)"
    else log "FAIL $name: TLS 1.3 session resumption: ${res:-?} of ${req:-?} handshakes resumed ($r)"; fail=1; fi
    local n; n=$(curl -s -N --max-time 1 -H 'X-Doc-Id: doc-1' "http://127.0.0.1:$port/sse/x" | grep -c '^event: tick')
    if [ "$n" -ge 3 ]; then log "ok   $name: SSE $n events streamed within 1 s"; else log "FAIL $name: SSE only $n events within 1 s (buffered?)"; fail=1; fi
    if [ "${ADMIN_OF[$name]:--}" != - ]; then
      # Read the page first: with pipefail, `curl | grep -q` fails when grep exits before curl.
      local page; page=$(curl -s --max-time 2 "http://127.0.0.1:${ADMIN_OF[$name]}/metrics")
      if grep -q '^tether_http_requests_total' <<<"$page"; then log "ok   $name: metrics served"
      else log "FAIL $name: no tether_http_requests_total on /metrics"; fail=1; fi
    fi
    unset where
  done
  return $fail
}

# measured TARGET FILE cmd...: one bounded load command (output -> FILE), then a META line
# with the target's CPU ticks, the foreign load and the steal time over the run, and the
# caller's RUN_TAGS (round, position in the round's order, seed). A run that saw more than
# MAX_FOREIGN % foreign load or MAX_STEAL % steal is repeated (RETRIES, within EXTRA_SECS);
# the output of the attempt it replaces is kept as FILE-without-.txt.tryN.log with its own META.
RUN_TAGS=()
measured() {
  local t=$1 f=$2; shift 2
  local pid=${PID_OF[$t]} try=0 c0 c1 foreign t0 fd0 settled=()
  while :; do
    if [ -n "${SETTLE:-}" ]; then
      # What an earlier run left open is let go of before this run is counted.
      settle "$pid" $((REST_FDS[$t] + SETTLE_SLACK))
      [ "$SETTLED" = 1 ] || log "warning: $t still holds $(fd_count "$pid") descriptors before its run"
      fd0=$(fd_count "$pid")
    fi
    quiet; c0=$(cpu_ticks "$pid"); snap; t0=$SECONDS
    "$@" >"$f" 2>&1
    if [ -n "${SETTLE:-}" ]; then
      settle "$pid" $((fd0 + SETTLE_SLACK)); settled=(settle_ms="$SETTLE_MS" settled="$SETTLED")
    fi
    foreign_since >"$RUN/foreign.txt"; c1=$(cpu_ticks "$pid"); foreign=$(cat "$RUN/foreign.txt")
    if { [ "$foreign" -le "$MAX_FOREIGN" ] && [ "$STEAL10" -le $((MAX_STEAL * 10)) ]; } \
       || [ "$try" -ge "$RETRIES" ] || [ "$EXTRA_USED" -ge "$EXTRA_SECS" ]; then break; fi
    meta "$f" target="$t" cpu_ticks=$((c1 - c0)) clk_tck="$CLK_TCK" busy_before="$BUSY" foreign_cpu_pct="$foreign" \
      steal_pct="$STEAL_PCT" max_foreign="$MAX_FOREIGN" max_steal="$MAX_STEAL" retries="$try" layout="$LAYOUT" "${RUN_TAGS[@]}" "${settled[@]}" replaced=1
    mv "$f" "${f%.txt}.try$try.log"
    try=$((try + 1)); EXTRA_USED=$((EXTRA_USED + SECONDS - t0))
    log "foreign load ${foreign}%, steal ${STEAL_PCT}% during $(basename "$f"); retry $try/$RETRIES"
  done
  meta "$f" target="$t" cpu_ticks=$((c1 - c0)) clk_tck="$CLK_TCK" busy_before="$BUSY" foreign_cpu_pct="$foreign" \
    steal_pct="$STEAL_PCT" max_foreign="$MAX_FOREIGN" max_steal="$MAX_STEAL" retries="$try" layout="$LAYOUT" "${RUN_TAGS[@]}" "${settled[@]}"
}

# round_order SCENARIO ROUND [TARGET...]: the targets ($TARGETS if none given) shuffled by a
# generator seeded with "SEED/SCENARIO/ROUND" (deterministic for a given SEED: str seeds are
# hashed alike since Python 3.2), logged and appended to $OUT/order.txt so the order actually
# used is on record.
round_order() {
  local order s=$1 r=$2; shift 2
  [ $# -gt 0 ] || set -- $TARGETS
  order=$(python3 -c 'import random, sys; t = sys.argv[2:]; random.Random(sys.argv[1]).shuffle(t); print(" ".join(t))' \
          "$SEED/$s/$r" "$@") || { log "round_order failed"; exit 1; }
  echo "$s $r $order" >>"$OUT/order.txt"
  log "$s round $r order (seed $SEED): $order"
  echo "$order"
}

# The wrk scenarios: the same 64 keep-alive connections and X-Doc-Id keys, the same rounds.
#   http  GETs only (lua/docids.lua), plain HTTP/1.1
#   post  every POST_EVERY-th request a POST with a POST_BYTES body (lua/post_mix.lua)
#   tls   the post mix over TLS 1.3 (each proxy's TLS port); not `direct` (no TLS on the backends)
#   churn     GETs with `Connection: close`: a new client connection per request (the proxies
#             keep their backend connections)
#   churntls  the same over TLS 1.3: a full handshake per request (wrk resumes no session)
wrk_targets() { # wrk_targets SCENARIO
  local t; for t in $TARGETS; do
    case $1 in tls|churntls) [ "$t" = direct ] && continue ;; esac
    printf '%s ' "$t"
  done
}

wrk_one() { # wrk_one SCENARIO TARGET SECS OUTFILE
  local script=lua/post_mix.lua url="http://127.0.0.1:${PORT_OF[$2]}/" churn=0
  case $1 in http|churn|churntls) script=lua/docids.lua ;; esac
  case $1 in churn|churntls) churn=1 ;; esac
  case $1 in tls|churntls) url="https://127.0.0.1:${TLS_PORT_OF[$2]}/" ;; esac
  measured "$2" "$4" env DOC_IDS="$DOC_IDS" POST_EVERY="$POST_EVERY" POST_BYTES="$POST_BYTES" CHURN="$churn" \
    timeout $(($3 + 30)) "${LOADPIN[@]}" wrk -t"$LOAD_THREADS" -c"$HTTP_CONNS" -d"$3s" --latency -s "$script" "$url"
}

wrk_errors() { # wrk_errors FILE: socket errors + non-2xx/3xx responses of one wrk run
  awk '/Socket errors/{gsub(/,/, ""); e += $4 + $6 + $8 + $10} /Non-2xx or 3xx/{e += $NF} END{print e + 0}' "$1"
}

do_wrk() { # do_wrk SCENARIO: http, post, tls, churn or churntls
  local s=$1 t r i order targets
  targets=$(wrk_targets "$s")
  RUN_TAGS=(round=0 seed="$SEED")
  for t in $targets; do wrk_one "$s" "$t" "$WARMUP_SECS" "$OUT/warmup-$s-$t.txt"; done
  for r in $(seq 1 "$REPEATS"); do
    # Every round visits every target, in a fresh random order: drift and any position
    # effect (the run after a warm-up, the one after a busy peer) hit all targets alike.
    order=$(round_order "$s" "$r" $targets) || exit 1; i=0
    for t in $order; do
      i=$((i + 1)); RUN_TAGS=(round="$r" pos="$i" seed="$SEED")
      wrk_one "$s" "$t" "$HTTP_SECS" "$OUT/$s-$t-$r.txt"
      log "$s $t rep $r: $(awk '/Requests\/sec/{print $2}' "$OUT/$s-$t-$r.txt") req/s, $(wrk_errors "$OUT/$s-$t-$r.txt") errors"
    done
  done
}

do_ws() { # do_ws PREFIX RATE   (PREFIX wstls: wss:// to the TLS ports, no direct, and wsload
  # counts the target's CPU over the send window, without the 1,000 TLS handshakes before it)
  local t r f i order targets=$TARGETS url cpu
  [ "$1" = wstls ] && targets=$(wrk_targets tls)
  for r in $(seq 1 "$WS_REPEATS"); do
    order=$(round_order "$1" "$r" $targets) || exit 1; i=0
    for t in $order; do
      i=$((i + 1)); RUN_TAGS=(round="$r" pos="$i" seed="$SEED")
      f=$OUT/$1-$t-$r.txt
      url="ws://127.0.0.1:${PORT_OF[$t]}/ws/bench"; cpu=()
      [ "$1" = wstls ] && url="wss://127.0.0.1:${TLS_PORT_OF[$t]}/ws/bench" && cpu=(--rss-pid "${PID_OF[$t]}")
      measured "$t" "$f" timeout $((WS_SECS + 60)) "${LOADPIN[@]}" "$WSLOAD_BIN" "${cpu[@]}" \
        --url "$url" --mode echo --conns "$WS_CONNS" --duration "$WS_SECS" \
        --rate "$2" --size "$WS_SIZE" --ids "$DOC_IDS" --threads "$LOAD_THREADS" \
        --max-secs $((WS_SECS + 40)) --timeout-ms 10000 --label "$t"
      log "$1 $t rep $r: $(grep -o '"msgs_per_s":[0-9.]*' "$f") $(grep -o '"p99_us":[0-9]*' "$f")"
      sleep 1
    done
  done
}

# idle_runs SCENARIO CONNS HOLD [WSLOAD_ARG...]: on the processes as started (fresh), one run per
# target in a seeded random order: CONNS WebSockets opened and held HOLD s, VmRSS of the
# target's process tree before and while holding ($OUT/SCENARIO-TARGET.txt); the extra
# arguments go to wsload after the others (a repeated option wins).
idle_runs() {
  local s=$1 conns=$2 hold=$3 t f order; shift 3
  order=$(round_order "$s" 1) || exit 1
  for t in $order; do
    f=$OUT/$s-$t.txt; quiet
    timeout 250 "${LOADPIN[@]}" "$WSLOAD_BIN" --url "ws://127.0.0.1:${PORT_OF[$t]}/ws/idle" --mode idle \
      --conns "$conns" --hold "$hold" --ids "$DOC_IDS" --threads "$LOAD_THREADS" \
      --rss-pid "${PID_OF[$t]}" --connect-concurrency 128 --timeout-ms 10000 --max-secs 100 --label "$t" "$@" >"$f" 2>&1
    meta "$f" target="$t" busy_before="$BUSY" layout="$LAYOUT" seed="$SEED"
    log "$s $t: $(grep -o '"connected":[0-9]*\|"still_open":[0-9]*\|"kb_per_conn":[0-9.]*\|"warm_err":[0-9]*\|"warm_secs":[0-9.]*' "$f" | tr '\n' ' ')"
    sleep 3   # let the closed sockets drain before the next target
  done
}
do_idle() { idle_runs idle "$IDLE_CONNS" "$IDLE_HOLD"; }

# wsidle: as idle, but every connection first echoes WSIDLE_MSGS messages (64 bytes and
# WSIDLE_SIZE alternately), so that whatever buffers a proxy grows for a busy connection have
# grown; RSS is sampled once all are idle.
do_wsidle() {
  idle_runs wsidle "$WSIDLE_CONNS" "$WSIDLE_HOLD" --warm-msgs "$WSIDLE_MSGS" --warm-size "$WSIDLE_SIZE" \
    --timeout-ms 20000 --max-secs 200
}

# sse_one TARGET FILE: one `wsload --mode sse` run against TARGET (SSE_CONNS streams, SSE_HOLD s),
# RSS of the target's process tree sampled by wsload before connecting and while holding.
sse_one() {
  timeout $((SSE_HOLD + 90)) "${LOADPIN[@]}" "$WSLOAD_BIN" --url "http://127.0.0.1:${PORT_OF[$1]}/sse/bench" \
    --mode sse --conns "$SSE_CONNS" --ids "$DOC_IDS" --hold "$SSE_HOLD" --threads "$LOAD_THREADS" \
    --rss-pid "${PID_OF[$1]}" --connect-concurrency 128 --timeout-ms 10000 --max-secs $((SSE_HOLD + 60)) --label "$1"
}

sse_log() { # sse_log FILE: the figures of one sse run for driver.log
  grep -o '"connected":[0-9]*\|"errors":[0-9]*\|"first_event_p99_ms":[0-9.a-z]*\|"kb_per_stream":[0-9.a-z-]*' "$1" | tr '\n' ' '
}

# sse memory on freshly started processes: the increase of RSS while SSE_CONNS streams are
# held, before the allocator has memory of earlier runs to reuse (the per-round runs of
# do_sse report the same figure on long-lived processes). One run per target, seeded order.
do_sse_rss() {
  local t f order
  order=$(round_order sse-rss 1) || exit 1
  for t in $order; do
    f=$OUT/sse-rss-$t.txt; quiet
    sse_one "$t" >"$f" 2>&1
    meta "$f" target="$t" busy_before="$BUSY" layout="$LAYOUT" seed="$SEED"
    log "sse-rss $t: $(sse_log "$f")"
    sleep 3   # let the closed sockets drain before the next target
  done
}

# in_rounds SCENARIO REPEATS FUNC: REPEATS rounds, every target once per round in a fresh
# random order, each run `FUNC TARGET FILE ROUND` (FILE = $OUT/SCENARIO-TARGET-ROUND.txt), 3 s
# apart for the closed sockets to drain.
in_rounds() {
  local s=$1 n=$2 fn=$3 t r i order
  for r in $(seq 1 "$n"); do
    order=$(round_order "$s" "$r") || exit 1; i=0
    for t in $order; do
      i=$((i + 1)); RUN_TAGS=(round="$r" pos="$i" seed="$SEED")
      "$fn" "$t" "$OUT/$s-$t-$r.txt" "$r"
      sleep 3
    done
  done
}

# sse: rounds of SSE_CONNS streams opened (first event awaited), held SSE_HOLD s and closed;
# CPU per stream = the target's CPU over the whole run / streams connected. The run lasts until
# the target has let go of the streams (its descriptors back to where they were, at most
# SETTLE_MAX s): a proxy that reads the client's close as a half-close (HAProxy) keeps each
# backend connection until a write to the departed client fails, here at the backend's
# heartbeat 15-30 s later, and that teardown is part of a stream's cost; before, it fell outside
# the proxy's own window (META settle_ms says how long the target took).
sse_run() {
  SETTLE=1 measured "$1" "$2" sse_one "$1"
  log "sse $1 rep $3: $(sse_log "$2")"
}
do_sse() { in_rounds sse "$SSE_REPEATS" sse_run; }

# fanout: FANOUT_CONNS streams of one document (one backend), then FANOUT_MSGS events
# published through the proxy 100 ms apart; wsload times every delivery and counts the CPU
# the target spent from the first publish until the deliveries were in (schedstat).
fanout_run() {
  measured "$1" "$2" timeout 120 "${LOADPIN[@]}" "$WSLOAD_BIN" --url "http://127.0.0.1:${PORT_OF[$1]}/sse/fanout" \
    --mode fanout --conns "$FANOUT_CONNS" --msgs "$FANOUT_MSGS" --interval-ms 100 --threads "$LOAD_THREADS" \
    --rss-pid "${PID_OF[$1]}" --connect-concurrency 128 --timeout-ms 10000 --max-secs 80 --label "$1"
  log "fanout $1 rep $3: $(grep -o '"connected":[0-9]*\|"errors":[0-9]*\|"missed":[0-9]*\|"delivery_p99_ms":[0-9.a-z]*' "$2" | tr '\n' ' ')"
}
do_fanout() { in_rounds fanout "$FANOUT_REPEATS" fanout_run; }

# warm_rounds SCENARIO FUNC LOGFUNC TARGET...: as do_wrk: a WARMUP_SECS run per target, then
# REPEATS rounds of HTTP_SECS runs, every target once per round in a fresh random order; each
# run is `FUNC TARGET SECS FILE`, and `LOGFUNC FILE` says what driver.log gets.
warm_rounds() {
  local s=$1 fn=$2 lg=$3 t r i order; shift 3
  RUN_TAGS=(round=0 seed="$SEED")
  for t in "$@"; do "$fn" "$t" "$WARMUP_SECS" "$OUT/warmup-$s-$t.txt"; done
  for r in $(seq 1 "$REPEATS"); do
    order=$(round_order "$s" "$r" "$@") || exit 1; i=0
    for t in $order; do
      i=$((i + 1)); RUN_TAGS=(round="$r" pos="$i" seed="$SEED")
      "$fn" "$t" "$HTTP_SECS" "$OUT/$s-$t-$r.txt"
      log "$s $t rep $r: $("$lg" "$OUT/$s-$t-$r.txt")"
    done
  done
}

# h2: the post mix over HTTP/2 (TLS 1.3, ALPN h2, keep-alive). h2load sends the same headers
# on every request of a process, so the mix is H2_GET_PROCS GET processes and one POST process
# (H2_POST_CONNS of the HTTP_CONNS connections, the POST_BYTES body), run side by side; each
# process has an X-Doc-Id of its own (doc-1, doc-2, ...), the paths cycle over
# /docs/doc-<k>/content (GETs: the DOC_IDS keys; POSTs: every POST_EVERY-th, as post_mix.lua).
# The warm-up runs for WARMUP_SECS (-D); a round's run then asks each process for a number of
# requests (-n) that makes the mix exact (1 in POST_EVERY a POST) and lasts about HTTP_SECS at
# the target's best rate so far. CPU per request = the target's CPU over the run / the 2xx
# responses of all processes.
h2_uris() { # h2_uris PORT: the URI files of a target (once per run)
  local f=$RUN/h2-get-$1.txt
  [ -s "$f" ] && return 0
  seq 1 "$DOC_IDS" | awk -v u="https://127.0.0.1:$1" '{print u "/docs/doc-" $1 "/content"}' >"$f"
  seq "$POST_EVERY" "$POST_EVERY" "$DOC_IDS" | awk -v u="https://127.0.0.1:$1" '{print u "/docs/doc-" $1 "/content"}' >"$RUN/h2-post-$1.txt"
}
h2_load() { # h2_load PORT SECS [RATE]: the h2load processes of one run, for SECS (-D), or with
  # RATE (req/s) the request counts (-n) of about SECS at that rate, 1 in POST_EVERY a POST;
  # their outputs, one after the other
  local port=$1 secs=$2 rate=${3:-} j c left n pids=() total posts gets stop
  h2_uris "$port"
  if [ -n "$rate" ]; then
    total=$(( rate * secs )); posts=$(( total / POST_EVERY )); gets=$(( (total - posts) / H2_GET_PROCS ))
    [ "$posts" -ge "$H2_POST_CONNS" ] || posts=$H2_POST_CONNS
    [ "$gets" -ge "$HTTP_CONNS" ] || gets=$HTTP_CONNS
  fi
  left=$((HTTP_CONNS - H2_POST_CONNS))
  for j in $(seq 1 "$H2_GET_PROCS"); do
    n=$((H2_GET_PROCS - j + 1)); c=$(( (left + n - 1) / n )); left=$((left - c))
    stop=(-D"$secs"); [ -n "$rate" ] && stop=(-n"$gets")
    timeout $((secs * 3 + 30)) "${LOADPIN[@]}" h2load -t1 -c"$c" -m"$H2_STREAMS" "${stop[@]}" -H "X-Doc-Id: doc-$j" \
      -i "$RUN/h2-get-$port.txt" >"$RUN/h2-part-$j.txt" 2>&1 &
    pids+=($!)
  done
  stop=(-D"$secs"); [ -n "$rate" ] && stop=(-n"$posts")
  timeout $((secs * 3 + 30)) "${LOADPIN[@]}" h2load -t1 -c"$H2_POST_CONNS" -m"$H2_STREAMS" "${stop[@]}" \
    -H "X-Doc-Id: doc-$((H2_GET_PROCS + 1))" -d "$RUN/post-body.bin" -i "$RUN/h2-post-$port.txt" >"$RUN/h2-part-post.txt" 2>&1 &
  pids+=($!)
  for j in "${pids[@]}"; do wait "$j"; done
  for j in $(seq 1 "$H2_GET_PROCS") post; do
    echo "### h2load $([ "$j" = post ] && echo "POST X-Doc-Id: doc-$((H2_GET_PROCS + 1))" || echo "GET X-Doc-Id: doc-$j")"
    cat "$RUN/h2-part-$j.txt"
  done
}
h2_one() { # h2_one TARGET SECS FILE: the warm-up (-D), or a round's run at the highest rate the
  # target has shown so far in this run (warm-up and earlier rounds: 2xx responses / the longest
  # process's time), so that one disturbed run does not shorten the next
  local f rate="" best=0
  if [ "$3" != "$OUT/warmup-h2-$1.txt" ]; then
    for f in "$OUT/warmup-h2-$1.txt" "$OUT"/h2-"$1"-*.txt; do
      [ -s "$f" ] && [ "$f" != "$3" ] || continue
      rate=$(awk '/^finished in/{t = $3; m_ = (t ~ /ms,?$/) ? 0.001 : 1; t = (t + 0) * m_; if (t > m) m = t}
                  /^status codes:/{gsub(/,/, ""); ok += $3} END{printf "%d", (ok > 0 && m > 0) ? ok / m : 0}' "$f")
      [ "$rate" -gt "$best" ] && best=$rate
    done
    rate=""; [ "$best" -gt 0 ] && rate=$best
  fi
  measured "$1" "$3" h2_load "${TLS_PORT_OF[$1]}" "$2" $rate
}
h2_log() { # the requests/s, 2xx and errors of one h2 run
  awk '/^finished in/{gsub(/,/, ""); r += $4} /^requests:/{gsub(/,/, ""); d += $8; f += $12 + $14 + $16}
       /^status codes:/{gsub(/,/, ""); ok += $3; bad += $7 + $9}
       END{printf "%.0f req/s, %d 2xx, %d failed/errored/timeout, %d 4xx/5xx", r, ok, f, bad}' "$1"
}
do_h2() {
  head -c "$POST_BYTES" /dev/zero | tr '\0' x >"$RUN/post-body.bin"
  warm_rounds h2 h2_one h2_log $(wrk_targets tls)
}

# churntlsresume: churntls (a new TLS 1.3 connection per GET, `Connection: close`) with session
# resumption: wsload --mode churn, HTTP_CONNS loops, each with a session cache of its own.
churnres_one() {
  measured "$1" "$3" timeout $(($2 + 40)) "${LOADPIN[@]}" "$WSLOAD_BIN" --url "https://127.0.0.1:${TLS_PORT_OF[$1]}/" \
    --mode churn --conns "$HTTP_CONNS" --duration "$2" --ids "$DOC_IDS" --sessions "$CHURN_SESSIONS" \
    --threads "$LOAD_THREADS" --timeout-ms 10000 --max-secs $(($2 + 30)) --label "$1"
}
churnres_log() {
  grep -o '"requests":[0-9]*\|"errors":[0-9]*\|"resumed_frac":[0-9.]*\|"req_per_s":[0-9.]*' "$1" | tr '\n' ' '
}
do_churnres() { warm_rounds churntlsresume churnres_one churnres_log $(wrk_targets tls); }

# storm: STORM_CONNS WebSockets through the target (one echo each); then wsload tells every
# backend directly (POST /ws-close-all) to close its /ws/storm sockets with 1012, and every
# client reconnects at once and echoes once. The time until all are back, the errors, and the
# target's CPU ns (schedstat) from the close until all were back, per reconnection.
storm_run() {
  measured "$1" "$2" timeout $((STORM_WAIT + 150)) "${LOADPIN[@]}" "$WSLOAD_BIN" \
    --url "ws://127.0.0.1:${PORT_OF[$1]}/ws/storm" --mode storm --conns "$STORM_CONNS" --ids "$DOC_IDS" \
    --close-urls "http://$B1/ws-close-all,http://$B2/ws-close-all,http://$B3/ws-close-all" --wait "$STORM_WAIT" \
    --threads "$LOAD_THREADS" --rss-pid "${PID_OF[$1]}" --connect-concurrency 128 --timeout-ms 10000 \
    --max-secs $((STORM_WAIT + 120)) --label "$1"
  log "storm $1 rep $3: $(grep -o '"back":[0-9]*\|"errors":[0-9]*\|"all_back_ms":[0-9.a-z]*\|"back_p99_ms":[0-9.a-z]*' "$2" | tr '\n' ' ')"
}
do_storm() { in_rounds storm "$STORM_REPEATS" storm_run; }

# flood: does one document flooding the proxy with streams hurt the other documents? Per round,
# every target (fresh random order) gets two runs: the victim alone (floodalone-T-R.txt), then
# the victim while a flooder holds streams of one document (flood-T-R.txt). Victim: wsload echo,
# FLOOD_CONNS WebSockets, X-Doc-Id doc-<i % DOC_IDS>, FLOOD_RATE msgs/s in total for FLOOD_SECS
# (latency below saturation), the target's CPU over the send window (schedstat). Flooder: wsload
# sse, FLOOD_STREAMS streams all with X-Doc-Id `flood`, a 429 counted as refused (not retried),
# started first; the victim starts once the flooder's connect phase is over, and the flooder
# holds its streams FLOOD_SECS + 5 s (past the victim's window); its RESULT line is appended to
# the run's file as `FLOODER {...}`.
flood_one() { # flood_one TARGET 0|1 (1: with the flooder); the outputs on stdout
  local t=$1 ff=$RUN/flooder.out fp="" i
  if [ "$2" = 1 ]; then
    : >"$ff"
    timeout $((FLOOD_SECS + 90)) "${LOADPIN[@]}" "$WSLOAD_BIN" --url "http://127.0.0.1:${PORT_OF[$t]}/sse/flood" \
      --mode sse --conns "$FLOOD_STREAMS" --doc flood --refused-ok 1 --hold $((FLOOD_SECS + 5)) \
      --threads "$LOAD_THREADS" --connect-concurrency 128 --timeout-ms 10000 --max-secs $((FLOOD_SECS + 70)) \
      --label "$t-flooder" >"$ff" 2>&1 &
    fp=$!
    for i in $(seq 600); do   # at most 60 s for the flooder's connect phase
      grep -q 'streams up' "$ff" && break
      kill -0 "$fp" 2>/dev/null || break
      sleep 0.1
    done
  fi
  timeout $((FLOOD_SECS + 60)) "${LOADPIN[@]}" "$WSLOAD_BIN" --url "ws://127.0.0.1:${PORT_OF[$t]}/ws/bench" \
    --mode echo --conns "$FLOOD_CONNS" --duration "$FLOOD_SECS" --rate "$FLOOD_RATE" --size "$WS_SIZE" \
    --ids "$DOC_IDS" --threads "$LOAD_THREADS" --rss-pid "${PID_OF[$t]}" --max-secs $((FLOOD_SECS + 40)) \
    --timeout-ms 10000 --label "$t"
  if [ -n "$fp" ]; then
    wait "$fp"
    echo "### flooder (X-Doc-Id: flood)"
    sed 's/^RESULT /FLOODER /' "$ff"
  fi
}
flood_log() { # the victim's p99 (and the flooder's figures) of one run for driver.log
  grep -o '"p99_us":[0-9]*\|"conn_err":[0-9]*\|"msg_err":[0-9]*' "$1" | tr '\n' ' '
  grep '^FLOODER ' "$1" | grep -o '"connected":[0-9]*\|"refused":[0-9]*\|"errors":[0-9]*' | sed 's/^"\([a-z_]*\)":/flooder_\1=/' | tr '\n' ' '
}
flood_run() { # flood_run TARGET FILE ROUND: alone, then with the flooder
  local alone=$OUT/floodalone-$1-$3.txt
  measured "$1" "$alone" flood_one "$1" 0
  log "flood $1 rep $3 alone: $(flood_log "$alone")"
  sleep 3
  measured "$1" "$2" flood_one "$1" 1
  log "flood $1 rep $3 flooded: $(flood_log "$2")"
}
do_flood() { in_rounds flood "$FLOOD_REPEATS" flood_run; }

# ------------------------------------------------------------------------ main
export DOC_IDS
[ "$PLAIN" = 1 ] && [ "$TETHER_BUILD" = plain ] && [ -z "${TETHER_BIN_GIVEN:-}" ] \
  && log "note: PLAIN=1 with TETHER_BUILD=plain measures the same binary twice (tether and plain: an A/A run)"
log "seed=$SEED (SEED=$SEED reproduces this run's target orders)"
log "measure=$MEASURE layout=$LAYOUT proxy_cpus=${PROXY_CPUS:-any} load_cpus=${LOAD_CPUS:-any} workers=$WORKERS nofile=$NOFILE targets='$TARGETS' out=$OUT"
{
  echo "--- measure=$MEASURE date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ) seed=$SEED targets='$TARGETS'"; echo "layout=$LAYOUT workers=$WORKERS nofile=$NOFILE"
  echo "tether=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet 2>/dev/null || echo '+dirty') build=$TETHER_BUILD bin=$TETHER_BIN variants='$TETHER_VARIANTS'"
  echo "nginx=$(nginx -v 2>&1)"; echo "haproxy=$(haproxy -v | head -1)"
  echo "wrk=$(wrk -v 2>&1 | head -1)"; echo "kernel=$(uname -r) cpus=$(nproc) cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
  echo "post/tls: post_every=$POST_EVERY post_bytes=$POST_BYTES (conns, secs, repeats as http); tls: TLS 1.3, self-signed P-256 certificate, $(openssl version)"
  echo "http: conns=$HTTP_CONNS secs=$HTTP_SECS repeats=$REPEATS doc_ids=$DOC_IDS; ws: conns=$WS_CONNS secs=$WS_SECS repeats=$WS_REPEATS fixed_rate=$WS_FIXED_RATE size=$WS_SIZE; idle: conns=$IDLE_CONNS hold=$IDLE_HOLD"
  echo "sse: conns=$SSE_CONNS hold=$SSE_HOLD repeats=$SSE_REPEATS; fanout: conns=$FANOUT_CONNS msgs=$FANOUT_MSGS interval_ms=100 repeats=$FANOUT_REPEATS"
  echo "h2: get_procs=$H2_GET_PROCS post_conns=$H2_POST_CONNS streams=$H2_STREAMS ($(h2load --version 2>/dev/null | head -1)); wsidle: conns=$WSIDLE_CONNS msgs=$WSIDLE_MSGS size=$WSIDLE_SIZE hold=$WSIDLE_HOLD"
  echo "storm: conns=$STORM_CONNS wait=$STORM_WAIT repeats=$STORM_REPEATS max_secs=${STORM_MAX_SECS:-5}; churntlsresume: sessions=$CHURN_SESSIONS (conns, secs, repeats as http)"
  echo "flood: conns=$FLOOD_CONNS rate=$FLOOD_RATE secs=$FLOOD_SECS streams=$FLOOD_STREAMS tether_streams_per_key=$FLOOD_LIMIT repeats=$FLOOD_REPEATS"
  echo "guard: max_foreign=$MAX_FOREIGN max_steal=$MAX_STEAL retries=$RETRIES extra_secs=$EXTRA_SECS"
} >>"$OUT/env.txt"
render_configs
start_all
rc=0
case "$MEASURE" in
  verify) do_verify || rc=1 ;;
  http|post|tls|churn|churntls) do_wrk "$MEASURE" ;;
  ws)     do_ws ws 0 ;;
  wsrate) do_ws wsrate "$WS_FIXED_RATE" ;;
  idle)   do_idle ;;
  sse)    do_sse_rss; do_sse ;;   # processes just started: the first run per target is fresh
  fanout) do_fanout ;;
  h2)     do_h2 ;;
  wstls)  do_ws wstls 0 ;;
  wsidle) do_wsidle ;;
  storm)  do_storm ;;
  churntlsresume) do_churnres ;;
  flood)  do_flood ;;
  more)   do_verify || rc=1; do_h2; do_ws wstls 0; do_churnres; do_storm
          cleanup; start_all; do_wsidle ;;   # wsidle memory on freshly started processes
  all)    do_verify || rc=1; do_wrk http; do_ws ws 0; do_ws wsrate "$WS_FIXED_RATE"
          cleanup; start_all; do_idle ;;   # idle memory on freshly started processes
  real)   do_verify || rc=1; do_wrk post; do_wrk tls; do_wrk churn; do_wrk churntls
          cleanup; start_all; do_sse_rss; do_sse ;;   # sse memory on freshly started processes
esac
cleanup
python3 tools/summarize.py "$OUT" | tee "$OUT/summary.md"
log "done (rc=$rc); results in $OUT"
exit $rc
