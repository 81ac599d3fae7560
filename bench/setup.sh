#!/usr/bin/env bash
# bench/setup.sh - install what bench/run.sh needs (Debian bookworm): the peers and the load
# generators from Debian's packages (wrk; h2load, from nghttp2-client, for the `h2` scenario),
# cmake for Pingora's build, openssl for the TLS scenarios' certificate. Asks apt, nothing else.
# The peer packages must not run as system services on the bench ports; in a container
# policy-rc.d normally keeps them from starting, otherwise: systemctl disable --now nginx haproxy
set -euo pipefail
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y nginx haproxy wrk nghttp2-client curl util-linux python3 cmake openssl
# Optional, for profiling (bench/README.md, "Profiling"): perf and valgrind.
if [ "${PROFILING:-0}" = 1 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y linux-perf valgrind
fi
