#!/usr/bin/env bash
# Installs what the browser end-to-end test (tests/e2e/browser_demo.rs) needs, on Debian:
# Chromium (the `chromium` package) and, in tests/browser, playwright-core from its lock file.
# Safe to run repeatedly: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup-browser: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "setup-browser: npm ci in tests/browser" >&2
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
