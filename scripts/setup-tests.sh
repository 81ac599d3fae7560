#!/usr/bin/env bash
# Installs what the tests need beyond the build (scripts/setup.sh), on Debian. scripts/test.sh
# runs it; safe to run repeatedly: it installs only what is missing.
#
#   (always)  the JSON Schema validator for tests/e2e/schema.rs: Python's jsonschema and
#             ruamel.yaml (a YAML 1.2 reader), from PyPI into .venv-tests/; the openssl command
#             (tests/e2e/tls.rs: a client that presents an IP address as SNI)
#   (full)    nginx-light (the ketama compatibility test), slowhttptest (the slow-client test),
#             etcd-server and dnsmasq-base (the fleet test's etcd and DNS discovery), kosoku in
#             .venv-ws/ (the WebSocket conformance test, scripts/setup-ws-conformance.sh),
#             Chromium and playwright-core (the browser test, scripts/setup-browser.sh) and
#             Prometheus (the dashboard and alert test, scripts/setup-prometheus.sh)
#
# `--quick` installs only the first group: what `scripts/test.sh --quick` runs needs no more.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# apt_install PACKAGE...: installs the Debian packages given (as root, or with sudo).
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup-tests: installing $*" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

command -v openssl >/dev/null 2>&1 || apt_install openssl

if [ ! -x .venv-tests/bin/python ] || ! .venv-tests/bin/python -c 'import jsonschema, ruamel.yaml' 2>/dev/null; then
  echo "setup-tests: installing jsonschema and ruamel.yaml into .venv-tests" >&2
  python3 -m venv .venv-tests
  .venv-tests/bin/pip install -q jsonschema==4.26.0 ruamel.yaml==0.19.1
fi

[ "${1:-}" = "--quick" ] && exit 0

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v slowhttptest >/dev/null 2>&1 || need+=(slowhttptest)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)

if [ ${#need[@]} -gt 0 ]; then
  apt_install "${need[@]}"
fi

scripts/setup-ws-conformance.sh
scripts/setup-browser.sh
scripts/setup-prometheus.sh
