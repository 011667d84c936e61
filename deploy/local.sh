#!/usr/bin/env bash
# Installs prefixroute, then starts the local system on 127.0.0.1 in the foreground (Ctrl-C stops it).
# Now: one worker with the default model on port ${PREFIXROUTE_WORKER_PORT:-8001}.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install.sh
exec python3 -m worker --host 127.0.0.1 --port "${PREFIXROUTE_WORKER_PORT:-8001}" "$@"
