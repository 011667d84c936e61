"""Writes the compose files: `python -m deploy.compose --gpus 8` (docker-compose.yml: one worker per GPU, each pinned
to its device), `--cpu` (docker-compose.cpu.yml: the same cluster on 2 CPU workers with SmolLM2, for a laptop) and
`--engine vllm` (docker-compose.vllm.yml: vLLM's official image on each GPU instead of the torch worker, each with
a sidecar, worker.sidecar, that publishes its hit stats and heartbeat as a worker does), each with the Prometheus
config that scrapes its workers (deploy/prometheus/prometheus.compose[.cpu|.vllm].yml).

The vLLM variant is its own file rather than a profile of docker-compose.yml: a GPU holds one engine, and compose
profiles can add services to the default set but cannot replace the default workers.

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
VLLM_PORT = 8000
SIDECAR_PORT = 8011
REDIS = "redis://redis:6379/0"
VLLM_IMAGE = "${VLLM_IMAGE:-vllm/vllm-openai:v0.11.0}"


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
        svc["deploy"] = _gpu(i)
    return svc


def _gpu(i: int) -> dict[str, Any]:
    return {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "device_ids": [str(i - 1)], "capabilities": ["gpu"]}]}}}


def vllm(i: int) -> dict[str, Any]:
    """vLLM's OpenAI server on GPU i-1: the model from PREFIXROUTE_VLLM_MODEL (a Hugging Face id, or a path under
    /models), prompt-token details on so answers carry cached_tokens, prefix caching (vLLM's default) on."""
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{VLLM_PORT}/health', timeout=3)"
    return {
        "image": VLLM_IMAGE,
        "command": ["--model", "${PREFIXROUTE_VLLM_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}", "--host", "0.0.0.0",
                    "--port", str(VLLM_PORT), "--enable-prompt-tokens-details"],
        "environment": {"HF_TOKEN": "${HF_TOKEN:-}"},
        "volumes": ["${PREFIXROUTE_MODELS:-models}:/models:ro", "hf-cache:/root/.cache/huggingface"],
        "ipc": "host", "deploy": _gpu(i),
        "healthcheck": {"test": ["CMD", "python3", "-c", probe], "interval": "10s", "timeout": "5s",
                        "retries": 60, "start_period": "120s"},
        "restart": "unless-stopped",
    }


def sidecar(i: int) -> dict[str, Any]:
    engine = f"vllm-{i}"
    cmd = ["python", "-m", "worker.sidecar", "--engine", "vllm", "--engine-url", f"http://{engine}:{VLLM_PORT}",
           "--worker-id", engine, "--host", "0.0.0.0", "--port", str(SIDECAR_PORT), "--redis-url", REDIS]
    return {**_image(False), "command": cmd, "depends_on": {"redis": {"condition": "service_healthy"},
                                                            engine: {"condition": "service_healthy"}},
            "healthcheck": _http_check(SIDECAR_PORT), "restart": "unless-stopped"}


def prometheus_path(gpu: bool, engine: str = "prefixroute") -> str:
    if engine == "vllm":
        return "deploy/prometheus/prometheus.compose.vllm.yml"
    return "deploy/prometheus/prometheus.compose.yml" if gpu else "deploy/prometheus/prometheus.compose.cpu.yml"


def compose(workers: int, gpu: bool, engine: str = "prefixroute") -> dict[str, Any]:
    if engine == "vllm":
        names = [f"vllm-sidecar-{i}" for i in range(1, workers + 1)]
        engines = {**{f"vllm-{i}": vllm(i) for i in range(1, workers + 1)},
                   **{n: sidecar(i) for i, n in enumerate(names, 1)}}
    else:
        names = [f"worker-{i}" for i in range(1, workers + 1)]
        engines = {n: worker(i, gpu) for i, n in enumerate(names, 1)}
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
        **engines,
        "prometheus": {
            "image": "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}",
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
            "volumes": [f"./{prometheus_path(gpu, engine)}:/etc/prometheus/prometheus.yml:ro",
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
    volumes: dict[str, Any] = {"models": {}, "redis-data": {}, "prometheus-data": {}, "grafana-data": {}}
    if engine == "vllm":
        volumes["hf-cache"] = {}
    return {"services": services, "volumes": volumes}


def prometheus_config(workers: int, engine: str = "prefixroute") -> dict[str, Any]:
    n = range(1, workers + 1)
    # The dashboards read prefixroute's worker metrics: for vLLM its sidecars serve them; vLLM's own are kept too.
    targets = [f"vllm-sidecar-{i}:{SIDECAR_PORT}" for i in n] if engine == "vllm" else \
        [f"worker-{i}:{WORKER_PORT}" for i in n]
    jobs = [{"job_name": "prefixroute-router", "static_configs": [{"targets": ["router:8000"]}]},
            {"job_name": "prefixroute-worker", "static_configs": [{"targets": targets}]}]
    if engine == "vllm":
        jobs.append({"job_name": "vllm", "static_configs": [{"targets": [f"vllm-{i}:{VLLM_PORT}" for i in n]}]})
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "15s"},
        "rule_files": ["rules/recording.yml", "rules/alerts.yml"],  # beside the config, in the image and here
        "scrape_configs": jobs,
    }


HEADER = "# Generated by `python -m deploy.compose {args}`; edit deploy/compose.py, not this file.\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="GPU workers, one per device 0..N-1 (default 2)")
    p.add_argument("--cpu", action="store_true", help="write docker-compose.cpu.yml: 2 CPU workers (SmolLM2)")
    p.add_argument("--workers", type=int, default=2, help="with --cpu: how many CPU workers")
    p.add_argument("--engine", choices=["prefixroute", "vllm"], default="prefixroute",
                   help="vllm: write docker-compose.vllm.yml, vLLM's image on each GPU (with a stats sidecar)")
    args = p.parse_args(argv)
    if args.cpu and args.engine != "prefixroute":
        p.error("--engine vllm is for GPUs (vLLM's official image is a CUDA one)")
    n = args.workers if args.cpu else args.gpus
    vl = args.engine == "vllm"
    out = ROOT / ("docker-compose.cpu.yml" if args.cpu else "docker-compose.vllm.yml" if vl else "docker-compose.yml")
    flags = f"--cpu --workers {n}" if args.cpu else f"--engine vllm --gpus {n}" if vl else f"--gpus {n}"
    out.write_text(HEADER.format(args=flags) + yaml.safe_dump(compose(n, not args.cpu, args.engine), sort_keys=False))
    prom = ROOT / prometheus_path(not args.cpu, args.engine)
    prom.write_text(f"# Generated by `python -m deploy.compose {flags}`; edit deploy/compose.py.\n"
                    + yaml.safe_dump(prometheus_config(n, args.engine), sort_keys=False))
    print(out, prom)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
