#!/usr/bin/env bash
# Installs prefixroute, then runs the local cluster on 127.0.0.1 in the foreground (Ctrl-C stops all of it):
# the router on :8000 in front of ${PREFIXROUTE_LOCAL_WORKERS:-2} workers on :8001, :8002, ...
# Extra arguments go to the router (e.g. --policy round_robin). On a multi-GPU host each worker takes one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install.sh
n=${PREFIXROUTE_LOCAL_WORKERS:-2}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
# Hit stats go to Redis when there is one: PREFIXROUTE_REDIS_URL, else a redis-server started here (in memory).
redis=()
redis_url=${PREFIXROUTE_REDIS_URL:-}
if [ -z "$redis_url" ] && command -v redis-server >/dev/null; then
  rport=${PREFIXROUTE_LOCAL_REDIS_PORT:-6379}
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$rport") 2>/dev/null; then
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    pids+=($!)
  fi
  redis_url="redis://127.0.0.1:$rport/0"
fi
[ -n "$redis_url" ] && redis=(--redis-url "$redis_url")
routes=()
for i in $(seq 1 "$n"); do
  port=$((8000 + i))
  if [ "$gpus" -gt 0 ]; then dev="cuda:$(( (i - 1) % gpus ))"; else dev=cpu; fi
  python3 -m worker --host 127.0.0.1 --port "$port" --worker-id "worker-$i" --device "$dev" "${redis[@]}" &
  pids+=($!)
  routes+=(--worker "http://127.0.0.1:$port")
done
python3 -m router --host 127.0.0.1 --port 8000 "${routes[@]}" "${redis[@]}" "$@" &
pids+=($!)
echo "prefixroute: router on http://127.0.0.1:8000 (ready when /health answers 200, ~30 s)" >&2
wait "${pids[-1]}"
