"""The README's first command, as a newcomer runs it: `deploy/local.sh` in a fresh copy of the checkout (inside a
virtualenv, so its install cannot touch this environment's), then the OpenAI SDK, a short loadgen run, SIGTERM,
and no process of it left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import venv

import psutil

from deploy import smoke
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
        exited = lambda: None if proc.poll() is None else (tmp_path / "local.log").read_text()[-3000:]  # noqa: E731
        health = smoke.wait_healthy(url, workers=2, timeout_s=400, gone=exited)
        assert health["redis"] == "ok"
        chat = smoke.check_chat(url)
        assert chat["cached_tokens"][1] > 0 and chat["streamed_tokens"] > 0
        assert smoke.run_loadgen(url, tmp_path / "run")["errors"] == 0
        smoke.check_prometheus(f"http://127.0.0.1:{pport}", targets=3)  # the router and both workers, scraped
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
