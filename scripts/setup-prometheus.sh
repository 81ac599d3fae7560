#!/usr/bin/env bash
# Installs what the Prometheus end-to-end test (tests/e2e/prometheus.rs) needs, on Debian:
# the Prometheus server and promtool, both from Debian's `prometheus` package.
# Safe to run repeatedly: it installs only what is missing.
set -euo pipefail

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup-prometheus: installing prometheus" >&2
  $sudo apt-get update -qq
  # No recommends: the test needs only the server and promtool, not the node exporter.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
