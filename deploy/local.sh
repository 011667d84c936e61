#!/usr/bin/env bash
# Installs prefixroute, then runs the local cluster on 127.0.0.1 in the foreground; Ctrl-C or SIGTERM stops all of
# it. The router on :8000 (PREFIXROUTE_LOCAL_PORT) in front of PREFIXROUTE_LOCAL_WORKERS workers on the next ports
# (default: one per visible GPU, else 2 on the CPU with SmolLM2); redis-server (hit stats, shared routing state)
# and Prometheus (with prefixroute's rules) when they are installed. Extra arguments go to the router.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install.sh
PY=$(deploy/python.sh)
port=${PREFIXROUTE_LOCAL_PORT:-8000}
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
default_n=2
[ "$gpus" -gt 0 ] && default_n=$gpus
n=${PREFIXROUTE_LOCAL_WORKERS:-$default_n}
pids=()
pdir=""
cleanup() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$pdir" ] && rm -rf "$pdir"
}
trap cleanup EXIT
trap 'exit 143' INT TERM
free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
say() { echo "prefixroute: $*" >&2; }

redis=()
redis_url=${PREFIXROUTE_REDIS_URL:-}
if [ -z "$redis_url" ] && command -v redis-server >/dev/null; then
  rport=${PREFIXROUTE_LOCAL_REDIS_PORT:-6379}
  if free "$rport"; then
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    pids+=($!)
  fi
  redis_url="redis://127.0.0.1:$rport/0"
fi
if [ -n "$redis_url" ]; then
  redis=(--redis-url "$redis_url")
else
  say "no redis-server installed: no hit stats (/admin/stats) and no shared routing state (apt-get install redis-server)"
fi

routes=()
targets=()
for i in $(seq 1 "$n"); do
  wport=$((port + i))
  if [ "$gpus" -gt 0 ]; then dev="cuda:$(( (i - 1) % gpus ))"; else dev=cpu; fi
  "$PY" -m worker --host 127.0.0.1 --port "$wport" --worker-id "worker-$i" --device "$dev" "${redis[@]}" &
  pids+=($!)
  routes+=(--worker "http://127.0.0.1:$wport")
  targets+=("\"127.0.0.1:$wport\"")
done
"$PY" -m router --host 127.0.0.1 --port "$port" "${routes[@]}" "${redis[@]}" "$@" &
router_pid=$!
pids+=($router_pid)

prom_url=""
if command -v prometheus >/dev/null; then
  pport=${PREFIXROUTE_LOCAL_PROMETHEUS_PORT:-9090}
  pdir=$(mktemp -d)
  cp -r deploy/prometheus/rules "$pdir/rules"
  workers_json=$(IFS=,; echo "${targets[*]}")
  cat > "$pdir/prometheus.yml" <<EOF
global: {scrape_interval: 5s, evaluation_interval: 15s}
rule_files: [rules/recording.yml, rules/alerts.yml]
scrape_configs:
  - {job_name: prefixroute-router, static_configs: [{targets: ["127.0.0.1:$port"]}]}
  - {job_name: prefixroute-worker, static_configs: [{targets: [$workers_json]}]}
EOF
  if free "$pport"; then
    prometheus --config.file="$pdir/prometheus.yml" --storage.tsdb.path="$pdir/data" \
      --web.listen-address="127.0.0.1:$pport" >"$pdir/prometheus.log" 2>&1 &
    pids+=($!)
    prom_url="http://127.0.0.1:$pport"
  else
    say "port $pport is taken: Prometheus not started"
  fi
else
  say "no prometheus installed: no metrics history (apt-get install prometheus); /metrics still answers"
fi

say "router http://127.0.0.1:$port/v1 (ready when /health answers 200, ~30 s on a CPU), $n worker(s)"
[ -n "$redis_url" ] && say "redis $redis_url"
[ -n "$prom_url" ] && say "prometheus $prom_url (Grafana: docker compose up, or import grafana/dashboards/)"
wait "$router_pid"
