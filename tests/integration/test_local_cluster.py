"""The README's first command, as a newcomer runs it: `deploy/local.sh` in a fresh copy of the checkout (inside a
virtualenv, so its install cannot touch this environment's), then the OpenAI SDK, a short loadgen run, SIGTERM,
and no process of it left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv

import httpx
import psutil
from openai import OpenAI

from harness.procs import ROOT, free_port, free_port_block


def fresh_copy(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def leftovers(markers: list[str]) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(m in cmd for m in markers):
            found.append(f"{p.info['pid']}: {cmd[:160]}")
    return found


def test_readme_first_command_starts_a_working_cluster_and_stops_clean(tmp_path):
    clone = tmp_path / "prefixroute"
    fresh_copy(clone)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    port = free_port_block(3)
    rport, pport = free_port(), free_port()
    env = {**os.environ, "VIRTUAL_ENV": str(env_dir), "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
           "PREFIXROUTE_LOCAL_PORT": str(port), "PREFIXROUTE_LOCAL_REDIS_PORT": str(rport),
           "PREFIXROUTE_LOCAL_PROMETHEUS_PORT": str(pport), "PREFIXROUTE_LOCAL_WORKERS": "2"}
    env.pop("PYTHONPATH", None)
    log = (tmp_path / "local.log").open("wb")
    proc = subprocess.Popen(["deploy/local.sh"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    markers = [str(clone), str(env_dir), f"--port {rport}", f"127.0.0.1:{pport}"]
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "local.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["workers"] == 2 and health["redis"] == "ok"
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        system = {"role": "system", "content": "You answer questions about a small bakery. " * 20}
        cached = []
        for q in ("What does bread cost?", "When do you open?"):
            r = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0,
                                               messages=[system, {"role": "user", "content": q}])
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
        assert cached[0] == 0 and cached[1] > 0
        out = tmp_path / "run"
        subprocess.run([sys.executable, "-m", "loadgen", "synth", "zipf", "--url", url, "--requests", "12",
                        "--rate", "4", "--max-tokens", "4", "--out", str(out), "--quiet"], cwd=ROOT, check=True,
                       timeout=300, stdout=subprocess.DEVNULL)
        assert '"errors": 0' in (out / "summary.json").read_text()
        assert httpx.get(f"http://127.0.0.1:{pport}/-/ready", timeout=5).status_code == 200  # Prometheus too
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    deadline = time.monotonic() + 20
    while leftovers(markers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert leftovers(markers) == []
