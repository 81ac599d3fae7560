#!/usr/bin/env bash
# Installs what building and testing Tether needs beyond Rust and gcc, on Debian:
# cmake (Pingora's zlib-ng build), nginx-light (the ketama compatibility test), slowhttptest
# (the slow-client test), etcd-server and dnsmasq-base (the fleet test's etcd and DNS
# discovery, tests/e2e/fleet.rs), then the
# browser test's Chromium and playwright-core (scripts/setup-browser.sh), and Prometheus for
# the dashboard and alert test (scripts/setup-prometheus.sh), and kosoku for the WebSocket
# conformance test (scripts/setup-ws-conformance.sh).
# Safe to run repeatedly: it installs only what is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v slowhttptest >/dev/null 2>&1 || need+=(slowhttptest)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

"$(dirname "$0")/setup-ws-conformance.sh"
"$(dirname "$0")/setup-browser.sh"
"$(dirname "$0")/setup-prometheus.sh"
