"""The dashboards and rules against a real Prometheus scraping a running router and sim workers under loadgen
traffic: every PromQL expression of every panel returns data; promtool accepts the config and rules; the
dashboard JSON is valid, current and provisioned; a PNG of its panels is drawn from the query results."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from harness.procs import ROOT, start_redis, start_router, start_sim_workers, stop_process
from harness.prom import DASHBOARDS, dashboard_targets, query, start_prometheus, substitute

GRAFANA = ROOT / "grafana"


def hostport(url: str) -> str:
    return url.split("://", 1)[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    procs = []  # stopped whatever fails, a start included
    try:
        redis_url, redis = start_redis()
        procs.append(redis)
        urls, sim = start_sim_workers(3, "--redis-url", redis_url, "--sim-speedup", "50")
        procs.append(sim)
        router, rproc = start_router(urls, "--redis-url", redis_url, "--admin-key", "adm")
        procs.append(rproc)
        prom, pproc = start_prometheus({"prefixroute-router": [hostport(router)],
                                        "prefixroute-worker": [hostport(u) for u in urls]}, tmp)
        procs.append(pproc)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "loadgen", "synth", "multiturn", "--url", router, "--requests", "120",
                        "--rate", "10", "--max-tokens", "8", "--seed", "2", "--out", str(tmp / "run"), "--quiet"],
                       cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
        with httpx.Client(base_url=router, timeout=30) as c:
            for v in ("v1", "v2"):  # a prompt rollout: requests labelled with their prefix version
                for i in range(3):
                    body = {"prompt": f"System prompt {v}. " * 30 + f"Q{i}", "max_tokens": 2,
                            "metadata": {"prefix_version": v}}
                    assert c.post("/v1/completions", json=body).status_code == 200
            assert c.post("/v1/completions", json={"prompt": 3}).status_code == 400  # a rejection to count
        time.sleep(4)  # a few more scrapes and rule evaluations
        yield prom, t0, time.time(), tmp
    finally:
        for p in reversed(procs):
            stop_process(p)


def test_every_dashboard_expression_returns_data(cluster):
    prom, _, end, _ = cluster
    targets = dashboard_targets(DASHBOARDS / "prefixroute.json")
    assert len(targets) >= 20
    empty = []
    for title, legend, expr in targets:
        result = query(prom, substitute(expr), at=end)
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title} / {legend}: {substitute(expr)}")
    assert not empty, "no data:\n" + "\n".join(empty)
    versions = {r["metric"]["prefix_version"] for r in query(
        prom, 'sum by (prefix_version) (prefixroute_worker_tenant_prompt_tokens_total)', at=end)}
    assert {"v1", "v2"} <= versions


def test_recording_rules_evaluate(cluster):
    prom, _, end, _ = cluster
    for rule in yaml.safe_load((ROOT / "deploy/prometheus/rules/recording.yml").read_text())["groups"][0]["rules"]:
        result = query(prom, rule["record"], at=end)
        assert result and any(math.isfinite(float(r["value"][1])) for r in result), rule["record"]
    ratio = float(query(prom, "prefixroute:hit_ratio:rate5m", at=end)[0]["value"][1])
    assert 0 < ratio < 1


def test_a_png_of_the_panels_is_drawn_from_the_queries(cluster):
    prom, start, end, tmp = cluster
    spec = importlib.util.spec_from_file_location("snapshot", GRAFANA / "snapshot.py")
    snapshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snapshot)
    out = tmp / "dashboard.png"
    n = snapshot.render(prom, start, end, out)
    assert n == len({t for t, _, _ in dashboard_targets(DASHBOARDS / "prefixroute.json")})
    assert out.stat().st_size > 20_000


def test_promtool_accepts_the_config_and_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    cfg = ROOT / "deploy/prometheus/prometheus.yml"
    for args in (["check", "config", str(cfg)],
                 ["check", "rules", *map(str, sorted((ROOT / "deploy/prometheus/rules").glob("*.yml")))]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_dashboards_are_valid_current_and_provisioned():
    spec = importlib.util.spec_from_file_location("build", GRAFANA / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    committed = json.loads((DASHBOARDS / "prefixroute.json").read_text())
    assert committed == build.dashboard(), "grafana/dashboards is stale: run python grafana/build.py"
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uids = {s["uid"] for s in sources}
    for path in DASHBOARDS.glob("*.json"):
        d = json.loads(path.read_text())
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in d["panels"]:
            assert p["datasource"]["uid"] in uids
            assert all(t["datasource"]["uid"] in uids for t in p["targets"])
        for v in d["templating"]["list"]:
            assert v["datasource"]["uid"] in uids
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/prefixroute.yml").read_text())["providers"][0]
    # the provider's path is where the compose file mounts grafana/dashboards
    assert os.path.basename(provider["options"]["path"]) == DASHBOARDS.name
