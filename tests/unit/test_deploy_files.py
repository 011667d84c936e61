"""The deployment files: compose files current with their generator and valid for the compose tool, one GPU per
worker, images overridable; the Dockerfile passes hadolint; each compose file's Prometheus config passes promtool."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from deploy import compose
from harness.procs import ROOT


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (deploy/install.sh test installs it)"
    return path


@pytest.mark.parametrize("args,path,prom_path", [
    (["--gpus", "2"], "docker-compose.yml", "deploy/prometheus/prometheus.compose.yml"),
    (["--cpu", "--workers", "2"], "docker-compose.cpu.yml", "deploy/prometheus/prometheus.compose.cpu.yml"),
    (["--engine", "vllm", "--gpus", "2"], "docker-compose.vllm.yml", "deploy/prometheus/prometheus.compose.vllm.yml")])
def test_compose_files_are_current_and_valid(args, path, prom_path, tmp_path, monkeypatch):
    committed = (ROOT / path).read_text()
    prom = (ROOT / prom_path).read_text()
    monkeypatch.setattr(compose, "ROOT", tmp_path)
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    compose.main(args)
    assert (tmp_path / path).read_text() == committed, f"{path} is stale: run python -m deploy.compose {' '.join(args)}"
    assert (tmp_path / prom_path).read_text() == prom
    r = subprocess.run([tool("docker-compose"), "-f", str(ROOT / path), "config", "-q"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([tool("promtool"), "check", "config", str(ROOT / prom_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_each_gpu_worker_is_pinned_to_its_own_device_and_images_are_variables():
    gpu = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    cpu = yaml.safe_load((ROOT / "docker-compose.cpu.yml").read_text())["services"]
    workers = {n: s for n, s in gpu.items() if n.startswith("worker-")}
    ids = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in workers.values()]
    assert sorted(map(tuple, ids)) == [("0",), ("1",)]
    assert all(s["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia" for s in workers.values())
    assert not any("deploy" in s for n, s in cpu.items())
    for services in (gpu, cpu):
        assert all(s["image"].startswith("${") and ":-" in s["image"] for s in services.values())
        router_deps = services["router"]["depends_on"]
        assert all(router_deps[n]["condition"] == "service_healthy" for n in services if n.startswith("worker-"))
        assert "--redis-url" in services["router"]["command"] and "--worker" not in services["router"]["command"]


def test_vllm_variant_runs_vllm_on_each_gpu_with_a_stats_sidecar():
    services = yaml.safe_load((ROOT / "docker-compose.vllm.yml").read_text())["services"]
    engines = {n: s for n, s in services.items() if n.startswith("vllm-") and not n.startswith("vllm-sidecar-")}
    assert sorted(engines) == ["vllm-1", "vllm-2"] and not any(n.startswith("worker-") for n in services)
    ids = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in engines.values()]
    assert sorted(map(tuple, ids)) == [("0",), ("1",)]
    assert all("--enable-prompt-tokens-details" in s["command"] for s in engines.values())
    for i in (1, 2):
        cmd = services[f"vllm-sidecar-{i}"]["command"]
        assert cmd[:3] == ["python", "-m", "worker.sidecar"] and f"http://vllm-{i}:8000" in cmd
        assert services[f"vllm-sidecar-{i}"]["depends_on"][f"vllm-{i}"]["condition"] == "service_healthy"
    assert all(s["image"].startswith("${") and ":-" in s["image"] for s in services.values())
    jobs = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.compose.vllm.yml").read_text())["scrape_configs"]
    assert jobs[1]["static_configs"][0]["targets"] == ["vllm-sidecar-1:8011", "vllm-sidecar-2:8011"]


def test_more_gpus_is_one_command(tmp_path, monkeypatch):
    monkeypatch.setattr(compose, "ROOT", tmp_path)
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    compose.main(["--gpus", "8"])
    services = yaml.safe_load((tmp_path / "docker-compose.yml").read_text())["services"]
    assert sum(n.startswith("worker-") for n in services) == 8
    targets = yaml.safe_load((tmp_path / "deploy/prometheus/prometheus.compose.yml").read_text())
    assert len(targets["scrape_configs"][1]["static_configs"][0]["targets"]) == 8


def test_dockerfile_passes_hadolint():
    r = subprocess.run([tool("hadolint"), str(ROOT / "deploy/docker/Dockerfile")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr



def test_kubernetes_manifests_render_and_validate(tmp_path):
    rendered = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "deploy/k8s")], capture_output=True,
                              text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "router"), ("StatefulSet", "worker"), ("Deployment", "redis"),
            ("ConfigMap", "grafana-dashboards")} <= kinds
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "router")
    assert router["spec"]["replicas"] == 2
    assert router["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"
    worker = next(d for d in docs if d["kind"] == "StatefulSet")
    assert worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    out = tmp_path / "k8s.yaml"
    out.write_text(rendered.stdout)
    r = subprocess.run([tool("kubernetes-validate"), "--strict", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    dashboard = (ROOT / "grafana/dashboards/prefixroute.json").read_text()
    assert (ROOT / "deploy/k8s/dashboards/prefixroute.json").read_text() == dashboard  # python grafana/build.py


def test_readme_configuration_reference_is_current_and_covers_every_setting():
    from deploy import settings_doc
    from router.settings import RouterSettings
    from worker.settings import WorkerSettings

    readme = (ROOT / "README.md").read_text()
    assert settings_doc.render(readme) == readme, "stale: python -m deploy.settings_doc"
    ref = settings_doc.reference()
    for model in (RouterSettings, WorkerSettings):
        prefix = model.model_config["env_prefix"]
        assert all(f"`{prefix}{name.upper()}`" in ref for name in model.model_fields)
    assert "| `prefix_tokens` | `--prefix-tokens` | `PREFIXROUTE_ROUTER_PREFIX_TOKENS` | `256` |" in ref
