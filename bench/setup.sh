#!/usr/bin/env bash
# bench/setup.sh - install what bench/run.sh needs (Debian bookworm): the peers and the load
# generator from Debian's packages, cmake for Pingora's build, openssl for the `tls` scenario's
# certificate. Asks apt, nothing else.
# The peer packages must not run as system services on the bench ports; in a container
# policy-rc.d normally keeps them from starting, otherwise: systemctl disable --now nginx haproxy
set -euo pipefail
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y nginx haproxy wrk curl util-linux python3 cmake openssl
# Optional, for profiling (bench/README.md, "Profiling"): perf and valgrind, h2load.
if [ "${PROFILING:-0}" = 1 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y linux-perf valgrind nghttp2-client
fi
