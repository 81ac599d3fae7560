#!/usr/bin/env bash
# Installs what building Tether needs beyond Rust and gcc, on Debian: cmake, for the zlib-ng
# that Pingora's compression support builds from source. Nothing else: README's demo command
# runs this; the tests' tools are installed by scripts/setup-tests.sh, which scripts/test.sh
# runs itself. Safe to run repeatedly: it installs only what is missing.
set -euo pipefail

if ! command -v cmake >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing cmake" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake >/dev/null
fi
