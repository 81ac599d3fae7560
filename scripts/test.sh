#!/usr/bin/env bash
# README.md's test command. Installs what the tests need (scripts/setup-tests.sh), then:
#
#   scripts/test.sh           every test of the workspace: what CI (.ci/run) runs
#   scripts/test.sh --quick   unit and property tests of every crate, and the end-to-end tests
#                             but the modules that drive outside programs (nginx, slowhttptest,
#                             etcd and dnsmasq, kosoku, Chromium, Prometheus); for everyday
#                             work.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end modules (tests/e2e/*.rs) --quick leaves out: those that need the programs
# scripts/setup-tests.sh installs beyond the Python packages.
SLOW=(browser_demo fleet nginx_compat prometheus slow_clients websocket_conformance)

case "${1:-}" in
  "")
    scripts/setup-tests.sh
    cargo test --workspace --all-targets --locked
    ;;
  --quick)
    scripts/setup-tests.sh --quick
    # Every crate but the root one, in full; then the root crate's tests (the CLI's unit tests
    # and the end-to-end binary) without the slow modules.
    cargo test --workspace --exclude tether --all-targets --locked
    skips=()
    for module in "${SLOW[@]}"; do skips+=(--skip "$module::"); done
    cargo test --locked -p tether --all-targets -- "${skips[@]}"
    ;;
  *)
    echo "usage: scripts/test.sh [--quick]" >&2
    exit 2
    ;;
esac
