"""A real Prometheus (Debian's package) scraping processes started here, and the dashboards' PromQL with Grafana's
variables substituted, so tests and the dashboard snapshot query what Grafana would."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from harness.procs import ROOT, free_port

RULES = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS = ROOT / "grafana" / "dashboards"


def start_prometheus(targets: dict[str, list[str]], workdir: Path, scrape_s: float = 1.0,
                     timeout: float = 60.0) -> tuple[str, subprocess.Popen]:
    """Prometheus on a free port scraping `targets` (job -> ["host:port", ...]) with the committed rules."""
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus; deploy/install.sh test)")
    config = {
        "global": {"scrape_interval": f"{int(scrape_s * 1000)}ms", "evaluation_interval": f"{int(scrape_s * 1000)}ms"},
        "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()],
    }
    cfg = workdir / "prometheus.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    proc = subprocess.Popen([exe, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=(workdir / "prometheus.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("prometheus did not become ready")


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
    r = httpx.get(url + "/api/v1/query", params=params, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = httpx.get(url + "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step},
                  timeout=20)
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """Grafana's $__rate_interval and the template variables (All = .*) as Grafana would send them."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$(\w+)", ".*", expr)


def dashboard_targets(path: Path) -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every target of a dashboard JSON."""
    d = json.loads(path.read_text())
    return [(p["title"], t.get("legendFormat", ""), t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
