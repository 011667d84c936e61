#!/usr/bin/env bash
# Prints the Python that prefixroute installs into and runs with: the active virtualenv's; else python3 when pip may
# install into it; else (a Debian/Ubuntu system Python refuses, PEP 668) the project's .venv, created on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  command -v python3
elif [ -z "${PREFIXROUTE_FORCE_VENV:-}" ] && python3 - <<'PY'
import os, sys, sysconfig
sys.exit(1 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 0)
PY
then
  command -v python3
else
  [ -x .venv/bin/python ] || python3 -m venv .venv >&2
  echo "$PWD/.venv/bin/python"
fi
