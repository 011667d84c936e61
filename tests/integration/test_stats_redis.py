"""Hit stats through a real Redis: sim workers publish, the router reads them back on /admin/stats; Redis
stopped and restarted mid-replay loses no request and no count; /admin/route answers without counting."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from harness.procs import ROOT, start_redis, start_router, start_sim_workers, stop_process

ADMIN = "admin-secret"


def replay(router: str, out: Path, requests: int, rate: float) -> dict:
    subprocess.run([sys.executable, "-m", "loadgen", "synth", "multiturn", "--url", router, "--requests",
                    str(requests), "--rate", str(rate), "--max-tokens", "4", "--seed", "3", "--out", str(out),
                    "--quiet"], cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def stats(router: str) -> dict:
    r = httpx.get(router + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.25)
    return False


def test_admin_stats_equal_what_loadgen_saw_and_survive_a_redis_restart(tmp_path):
    data = tmp_path / "redis"
    data.mkdir()
    procs: dict = {}  # stopped whatever fails, a start included
    try:
        redis_url, procs["redis"] = start_redis(data_dir=data)
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        urls, procs["sim"] = start_sim_workers(3, "--redis-url", redis_url, "--stats-interval-s", "0.2",
                                               "--sim-speedup", "50")
        router, procs["router"] = start_router(urls, "--redis-url", redis_url, "--admin-key", ADMIN)
        assert httpx.get(router + "/health").json()["redis"] == "ok"
        first = replay(router, tmp_path / "a", 60, 30)
        assert first["ok"] == 60 and first["cached_tokens"] > 0
        assert wait_for(lambda: stats(router)["cluster"]["requests"] == 60, 10)
        s = stats(router)
        c = s["cluster"]
        assert abs(c["prompt_tokens"] - first["prompt_tokens"]) <= 0.01 * first["prompt_tokens"]
        assert abs(c["cached_tokens"] - first["cached_tokens"]) <= 0.01 * first["cached_tokens"]
        assert sum(w["requests"] for w in s["workers"]) == 60 and len(s["workers"]) == 3
        assert {w["url"] for w in s["workers"]} == set(urls)
        (t,) = s["tenants"]
        assert t["tenant"] == "open" and t["requests"] == 60 and 0 < t["routing_accuracy"] <= 1
        assert s["top_prefixes"] and sum(k["requests"] for k in s["top_prefixes"]) <= 60

        # Redis goes away in the middle of a replay and comes back (its append-only file kept what it had):
        # no request fails, and within 15 s its totals hold every request, those sent while it was down too.
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(replay(router, tmp_path / "b", 80, 16)))
        th.start()
        time.sleep(1.5)
        stop_process(procs.pop("redis"))
        assert wait_for(lambda: httpx.get(router + "/health").json()["redis"] == "down", 10)
        assert httpx.get(router + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 503
        assert httpx.get(router + "/health").status_code == 200  # routing goes on without Redis
        time.sleep(1.5)
        _, procs["redis"] = start_redis(port, data)
        th.join(120)
        assert result["ok"] == 80 and result["errors"] == 0
        assert wait_for(lambda: httpx.get(router + "/health").json()["redis"] == "ok", 15)
        assert wait_for(lambda: stats(router)["cluster"]["requests"] == 140, 15), stats(router)["cluster"]
        c = stats(router)["cluster"]
        want = first["prompt_tokens"] + result["prompt_tokens"]
        assert abs(c["prompt_tokens"] - want) <= 0.01 * want
    finally:
        for p in reversed(list(procs.values())):
            stop_process(p)

