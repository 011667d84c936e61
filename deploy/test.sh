#!/usr/bin/env bash
# The README's second command: install prefixroute with its test tools, then run the tests with the same Python.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI has just installed (.ci/run sets PREFIXROUTE_INSTALLED): a second, no-op install costs ~30 s.
[ -n "${PREFIXROUTE_INSTALLED:-}" ] || deploy/install.sh test
exec "$(deploy/python.sh)" -m pytest -q "$@"
