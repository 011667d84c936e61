"""Writes the compose files: `python -m deploy.compose --gpus 8` (docker-compose.yml: one worker per GPU, each pinned
to its device) and `--cpu` (docker-compose.cpu.yml: the same cluster on 2 CPU workers with SmolLM2, for a laptop),
each with the Prometheus config that scrapes its workers (deploy/prometheus/prometheus.compose[.cpu].yml).

Every image is a variable with the official image as default (REDIS_IMAGE, PROMETHEUS_IMAGE, GRAFANA_IMAGE,
PREFIXROUTE_IMAGE), so a site with a private registry sets them without editing the file. The router finds the
workers through their Redis heartbeats; Grafana comes up with the dashboards provisioned, anonymous viewing on and
the admin password GRAFANA_ADMIN_PASSWORD (default "prefixroute").
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKER_PORT = 8001
REDIS = "redis://redis:6379/0"


def _http_check(port: int) -> dict[str, Any]:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=3)"
    return {"test": ["CMD", "python", "-c", probe], "interval": "5s", "timeout": "5s", "retries": 60,
            "start_period": "30s"}


def _image(gpu: bool) -> dict[str, Any]:
    build: dict[str, Any] = {"context": ".", "dockerfile": "deploy/docker/Dockerfile"}
    if gpu:
        build["args"] = {"BASE": "${PREFIXROUTE_GPU_BASE:-pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime}"}
    name = "${PREFIXROUTE_IMAGE:-prefixroute:gpu}" if gpu else "${PREFIXROUTE_CPU_IMAGE:-prefixroute:cpu}"
    return {"image": name, "build": build}


def worker(i: int, gpu: bool) -> dict[str, Any]:
    name = f"worker-{i}"
    cmd = ["python", "-m", "worker", "--host", "0.0.0.0", "--port", str(WORKER_PORT), "--worker-id", name,
           "--advertise-url", f"http://{name}:{WORKER_PORT}", "--redis-url", REDIS,
           "--device", "cuda" if gpu else "cpu"]
    svc: dict[str, Any] = {
        **_image(gpu), "command": cmd,
        "environment": {"PREFIXROUTE_WORKER_MODEL": "${PREFIXROUTE_MODEL:-}"},
        "volumes": ["${PREFIXROUTE_MODELS:-models}:/models:ro"],
        "depends_on": {"redis": {"condition": "service_healthy"}},
        "healthcheck": _http_check(WORKER_PORT), "restart": "unless-stopped",
    }
    if gpu:
        svc["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": [str(i - 1)], "capabilities": ["gpu"]}]}}}
    return svc


def prometheus_path(gpu: bool) -> str:
    return "deploy/prometheus/prometheus.compose.yml" if gpu else "deploy/prometheus/prometheus.compose.cpu.yml"


def compose(workers: int, gpu: bool) -> dict[str, Any]:
    names = [f"worker-{i}" for i in range(1, workers + 1)]
    services: dict[str, Any] = {
        "redis": {
            "image": "${REDIS_IMAGE:-redis:7}",
            # Explicit, not left to the official image's entrypoint: any redis-server image works the same.
            "command": ["redis-server", "--appendonly", "yes", "--dir", "/data", "--protected-mode", "no"],
            "volumes": ["redis-data:/data"],
            "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "2s", "timeout": "3s", "retries": 30},
            "restart": "unless-stopped",
        },
        "router": {
            **_image(gpu),
            "command": ["python", "-m", "router", "--host", "0.0.0.0", "--port", "8000", "--redis-url", REDIS],
            "environment": {"PREFIXROUTE_ROUTER_MODEL": "${PREFIXROUTE_MODEL:-}",
                            "PREFIXROUTE_ROUTER_ADMIN_KEY": "${PREFIXROUTE_ADMIN_KEY:-}"},
            "ports": ["${PREFIXROUTE_PORT:-8000}:8000"], "volumes": ["${PREFIXROUTE_MODELS:-models}:/models:ro"],
            "depends_on": {"redis": {"condition": "service_healthy"},
                           **{n: {"condition": "service_healthy"} for n in names}},
            "healthcheck": _http_check(8000), "restart": "unless-stopped",
        },
        **{n: worker(i, gpu) for i, n in enumerate(names, 1)},
        "prometheus": {
            "image": "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}",
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
            "volumes": [f"./{prometheus_path(gpu)}:/etc/prometheus/prometheus.yml:ro",
                        "./deploy/prometheus/rules:/etc/prometheus/rules:ro", "prometheus-data:/prometheus"],
            "ports": ["${PROMETHEUS_PORT:-9090}:9090"],
            "healthcheck": {"test": ["CMD", "wget", "-q", "--spider", "http://127.0.0.1:9090/-/ready"],
                            "interval": "5s", "timeout": "3s", "retries": 30},
            "restart": "unless-stopped",
        },
        "grafana": {
            "image": "${GRAFANA_IMAGE:-grafana/grafana:11.2.0}",
            "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                            "GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD:-prefixroute}",
                            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/prefixroute.json",
                            "PREFIXROUTE_PROMETHEUS_URL": "http://prometheus:9090"},
            "volumes": ["./grafana/provisioning:/etc/grafana/provisioning:ro",
                        "./grafana/dashboards:/var/lib/grafana/dashboards:ro", "grafana-data:/var/lib/grafana"],
            "ports": ["${GRAFANA_PORT:-3000}:3000"],
            "depends_on": {"prometheus": {"condition": "service_healthy"}},
            "restart": "unless-stopped",
        },
    }
    return {"services": services,
            "volumes": {"models": {}, "redis-data": {}, "prometheus-data": {}, "grafana-data": {}}}


def prometheus_config(workers: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "15s"},
        "rule_files": ["rules/recording.yml", "rules/alerts.yml"],  # beside the config, in the image and here
        "scrape_configs": [
            {"job_name": "prefixroute-router", "static_configs": [{"targets": ["router:8000"]}]},
            {"job_name": "prefixroute-worker", "static_configs": [
                {"targets": [f"worker-{i}:{WORKER_PORT}" for i in range(1, workers + 1)]}]},
        ],
    }


HEADER = "# Generated by `python -m deploy.compose {args}`; edit deploy/compose.py, not this file.\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="GPU workers, one per device 0..N-1 (default 2)")
    p.add_argument("--cpu", action="store_true", help="write docker-compose.cpu.yml: 2 CPU workers (SmolLM2)")
    p.add_argument("--workers", type=int, default=2, help="with --cpu: how many CPU workers")
    args = p.parse_args(argv)
    n = args.workers if args.cpu else args.gpus
    out = ROOT / ("docker-compose.cpu.yml" if args.cpu else "docker-compose.yml")
    flags = f"--cpu --workers {n}" if args.cpu else f"--gpus {n}"
    out.write_text(HEADER.format(args=flags) + yaml.safe_dump(compose(n, not args.cpu), sort_keys=False))
    prom = ROOT / prometheus_path(not args.cpu)
    prom.write_text(f"# Generated by `python -m deploy.compose {flags}`; edit deploy/compose.py.\n"
                    + yaml.safe_dump(prometheus_config(n), sort_keys=False))
    print(out, prom)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
