#!/usr/bin/env bash
# Brings the CPU compose cluster (docker-compose.cpu.yml) up for real and checks it as a user would: builds the
# images, starts redis, 2 CPU workers, the router and Prometheus with the compose tool, waits for health, runs
# deploy/smoke.py against the published ports (OpenAI SDK plain and streamed, cached_tokens > 0 on a repeated
# prefix, /admin/stats from Redis, every Prometheus target up, a short loadgen run), then `down -v`. Exits non-zero
# on any failure and leaves no container, network or volume behind (the images stay, as a build cache).
#
# Docker Hub is unreachable where this is tested, so the base image is built from Debian's packages (mmdebstrap,
# then `docker import`) and also serves as the redis and Prometheus images, passed in through the image variables
# the compose file reads. Grafana cannot be pulled or installed here and is not started (its dashboards are
# proven against a real Prometheus by tests/integration/test_observability.py). Set PREFIXROUTE_TEST_BASE,
# REDIS_IMAGE and PROMETHEUS_IMAGE to use images you already have. Starts dockerd when none runs (and stops it).
# `deploy/compose-test.sh build` builds the images only (CI builds them while the tests run).
set -euo pipefail
phase=${1:-all}
cd "$(dirname "$0")/.."
t0=$(date +%s)
say() { echo "compose-test [$(( $(date +%s) - t0 )) s]: $*" >&2; }
PY=$(deploy/python.sh)
project="prefixroute-ci-$$"
compose=(docker-compose -p "$project" -f docker-compose.cpu.yml)
services=(redis worker-1 worker-2 router prometheus)
dockerd_pid=""
tmp=$(mktemp -d)

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" != 0 ] && docker info >/dev/null 2>&1; then
    "${compose[@]}" logs --no-color --tail 40 >&2 2>/dev/null || true
  fi
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  local left
  left=$( (docker ps -aq --filter "label=com.docker.compose.project=$project"
           docker network ls -q --filter "label=com.docker.compose.project=$project"
           docker volume ls -q --filter "label=com.docker.compose.project=$project") 2>/dev/null | wc -l)
  if [ "$left" != 0 ]; then
    say "FAILED: $left containers, networks or volumes of $project left behind"
    rc=1
  fi
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
  [ "$rc" = 0 ] && say "$phase: passed in $(( $(date +%s) - t0 )) s" || say "$phase: FAILED (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

apt_install() {
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    say "needs $*: install them (apt-get install $*)"
    exit 1
  fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@") \
    >/dev/null
}

# 1. A Docker engine and the compose tool (Debian's docker-compose 1.29; `docker compose` v2 reads the same file).
command -v docker-compose >/dev/null || apt_install docker-compose
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || apt_install docker.io
  say "starting dockerd"
  dockerd >"$tmp/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$tmp/dockerd.log" >&2; say "dockerd did not start"; exit 1; }
fi

# 2. Base image from Debian's packages: Python (with venv and pip), redis-server, Prometheus, wget for its
#    healthcheck, and this host's CA bundle so that pip reaches the package registries from inside a build.
base=${PREFIXROUTE_TEST_BASE:-prefixroute-ci/debian:bookworm}
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || apt_install mmdebstrap
  ca=$("$PY" -c "import ssl, os; p = ssl.get_default_verify_paths(); print(os.environ.get('SSL_CERT_FILE') or p.cafile or '/etc/ssl/certs/ca-certificates.crt')")
  mkdir -p "$tmp/wheels"
  # A CPU torch wheel where pip's configuration already has one (find-links); the build downloads one otherwise.
  "$PY" -m pip download -q --no-deps --no-index -d "$tmp/wheels" "torch==${PREFIXROUTE_TORCH_VERSION:-2.13.0}" \
    >/dev/null 2>&1 || say "no local torch wheel: the image build downloads one"
  say "building $base with mmdebstrap"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,redis-server,prometheus,wget \
    --customize-hook="upload $ca /etc/ssl/certs/ca-certificates.crt" \
    --customize-hook="copy-in $tmp/wheels /opt" \
    bookworm "$tmp/rootfs.tar"
  docker import \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV PIP_FIND_LINKS=/opt/wheels PIP_DEFAULT_TIMEOUT=60" \
    --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$base" >/dev/null
  rm -f "$tmp/rootfs.tar"
fi
export REDIS_IMAGE=${REDIS_IMAGE:-$base}
if [ -z "${PROMETHEUS_IMAGE:-}" ]; then
  export PROMETHEUS_IMAGE=prefixroute-ci/prometheus:debian
  printf 'FROM %s\nENTRYPOINT ["/usr/bin/prometheus"]\n' "$base" | docker build -q -t "$PROMETHEUS_IMAGE" - >/dev/null
fi

# 3. The prefixroute image, from the Dockerfile the compose file names.
export PREFIXROUTE_CPU_IMAGE=prefixroute-ci/prefixroute:cpu
say "building $PREFIXROUTE_CPU_IMAGE"
# The base's pip finds torch (find-links) where the host had a wheel; then no torch index is asked, which here
# does not resolve and would cost pip's retries on every package.
index=()
[ -n "$(docker run --rm "$base" sh -c 'ls /opt/wheels 2>/dev/null')" ] && index=(--build-arg TORCH_INDEX_URL=)
docker build -q -f deploy/docker/Dockerfile --build-arg "BASE=$base" "${index[@]}" -t "$PREFIXROUTE_CPU_IMAGE" . \
  >/dev/null

[ "$phase" = build ] && exit 0

# 4. Up (everything but grafana), on free ports, then the checks through the published ports.
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
PREFIXROUTE_PORT=$(free_port)
PROMETHEUS_PORT=$(free_port)
PREFIXROUTE_ADMIN_KEY=$("$PY" -c "import secrets; print(secrets.token_hex(16))")
export PREFIXROUTE_PORT PROMETHEUS_PORT PREFIXROUTE_ADMIN_KEY
say "up: ${services[*]} (project $project)"
"${compose[@]}" up -d --no-build "${services[@]}" >"$tmp/up.log" 2>&1 || { tail -20 "$tmp/up.log" >&2; exit 1; }
say "checks against http://127.0.0.1:$PREFIXROUTE_PORT"
"$PY" -m deploy.smoke --router "http://127.0.0.1:$PREFIXROUTE_PORT" --workers 2 \
  --admin-key "$PREFIXROUTE_ADMIN_KEY" --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --out "$tmp/loadgen"
unhealthy=$("${compose[@]}" ps | grep -cE "unhealthy|Exit" || true)
[ "$unhealthy" = 0 ] || { "${compose[@]}" ps >&2; say "a service is unhealthy or exited"; exit 1; }
