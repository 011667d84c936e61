"""Router replicas share their routing state through a real Redis: a router started after traffic went through
another one makes the same decisions at once, with no warm-up; and workers are found from their heartbeats."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from harness.procs import ROOT, start_redis, start_router, start_sim_workers, stop_process

ADMIN = "adm"


def routes(router: str, requests: list[dict]) -> list[str]:
    out = []
    with httpx.Client(timeout=30) as c:
        for r in requests:
            resp = c.post(router + "/admin/route", params={"path": r["endpoint"]}, json=r["body"],
                          headers={"x-admin-key": ADMIN})
            assert resp.status_code == 200, resp.text
            out.append(resp.json()["worker"])
    return out


def test_a_second_router_agrees_with_the_first_without_warm_up(tmp_path):
    procs = []  # stopped whatever fails, a start included
    try:
        redis_url, redis = start_redis()
        procs.append(redis)
        urls, sim = start_sim_workers(4, "--redis-url", redis_url, "--sim-speedup", "50")
        procs.append(sim)
        a, pa = start_router(urls, "--redis-url", redis_url, "--admin-key", ADMIN)
        procs.append(pa)
        record = tmp_path / "requests.jsonl"
        subprocess.run([sys.executable, "-m", "loadgen", "synth", "hotdoc", "--url", a, "--requests", "150",
                        "--rate", "40", "--max-tokens", "2", "--seed", "5", "--doc-tokens", "200", "600",
                        "--hot-doc-tokens", "400", "--record", str(record), "--out", str(tmp_path / "run"),
                        "--quiet"], cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
        requests = [json.loads(line) for line in record.read_text().splitlines()]
        time.sleep(2.5)  # A's last decisions reach Redis within its sync interval
        b, pb = start_router(urls, "--redis-url", redis_url, "--admin-key", ADMIN)
        procs.append(pb)
        cold, pc = start_router(urls, "--admin-key", ADMIN)  # the same router, no Redis: what sharing buys
        procs.append(pc)
        on_a, on_b, on_cold = routes(a, requests), routes(b, requests), routes(cold, requests)
        shared = sum(x == y for x, y in zip(on_a, on_b)) / len(requests)
        local = sum(x == y for x, y in zip(on_a, on_cold)) / len(requests)
        print(f"agreement with router A: shared state {shared:.3f}, no Redis {local:.3f}")
        assert shared >= 0.99 and shared > local
        assert len(set(on_a)) > 1  # the traffic spread over several workers: agreement is not trivial
    finally:
        for p in reversed(procs):
            stop_process(p)


def test_workers_are_discovered_from_heartbeats_and_leave_when_they_stop(tmp_path):
    procs = []
    try:
        redis_url, redis = start_redis()
        procs.append(redis)
        router, pr = start_router([], "--redis-url", redis_url, wait_path="/v1/models")
        procs.append(pr)
        urls, sim = start_sim_workers(2, "--redis-url", redis_url, "--sim-speedup", "50")
        procs.append(sim)
        def health():
            return httpx.get(router + "/health", timeout=5).json()

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and health()["workers"] != 2:
            time.sleep(0.25)
        assert health()["workers"] == 2
        r = httpx.post(router + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.headers["x-prefixroute-worker"] in urls
        stop_process(sim)  # a clean stop deletes the heartbeats: the workers leave at once
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and health()["workers"] != 0:
            time.sleep(0.25)
        assert health()["workers"] == 0
    finally:
        for p in reversed(procs):
            stop_process(p)
