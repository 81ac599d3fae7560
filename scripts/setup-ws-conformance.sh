#!/usr/bin/env bash
# Installs kosoku (the Autobahn WebSocket test cases as a Rust/PyO3 client, from PyPI) into
# .venv-ws/ for tests/e2e/websocket_conformance.rs (scripts/setup-tests.sh runs it). Safe to run
# repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-ws/bin/kosoku ]; then
  echo "setup: installing kosoku into .venv-ws" >&2
  python3 -m venv .venv-ws
  .venv-ws/bin/pip install -q kosoku==0.1.0
fi
