"""Hostile input against real processes: a router (one tenant, so auth is on) in front of one sim worker, and the
worker directly. Hypothesis draws the requests (harness.hostile: wrong types, random JSON, huge and deeply nested
bodies, gzip bombs and broken encodings, invalid UTF-8, garbage request heads, oversized headers, odd header
values, bad Authorization, max_tokens past the limit, truncated bodies, slow senders of a head or a body), after
a few fixed regressions; each must get no 5xx, every 4xx an OpenAI JSON error body (the expected status and code
where the kind fixes one), both servers must stay healthy and their RSS bounded. Also the router's
per-request time limit (408, or an error event in a stream) with the worker's work aborted, and /openapi.json."""

from __future__ import annotations

import json
import os
import time

import httpx
import psutil
import pytest

from harness.hostile import Config, Summary, Target, draw_cases, run_all
from harness.procs import start_router, start_sim_workers, stop_process

CFG = Config()
CASES = int(os.environ.get("PREFIXROUTE_HOSTILE_CASES", "700"))
TENANTS = json.dumps([{"id": "hostile", "api_key": CFG.api_key, "secret": "hostile-secret"}])


def limit_flags(cfg: Config) -> list[str]:
    return ["--max-json-depth", str(cfg.max_json_depth), "--max-header-bytes", str(cfg.max_header_bytes),
            "--body-timeout-s", str(cfg.body_timeout_s), "--max-tokens-limit", str(cfg.max_tokens_limit),
            "--max-prompt-tokens", str(cfg.max_prompt_tokens)]


@pytest.fixture(scope="module")
def fleet():
    with pytest.MonkeyPatch.context() as mp:  # the sim worker process inherits the environment
        mp.setenv("PREFIXROUTE_WORKER_MAX_BODY_BYTES", str(CFG.max_body_bytes))
        workers, wproc = start_sim_workers(1, "--sim-speedup", "100", *limit_flags(CFG))
    try:
        router, rproc = start_router(workers, "--request-time-limit-s", "20", *limit_flags(CFG),
                                     env={"PREFIXROUTE_ROUTER_TENANTS": TENANTS,
                                          "PREFIXROUTE_ROUTER_MAX_BODY_BYTES": str(CFG.max_body_bytes)})
    except Exception:
        stop_process(wproc)
        raise
    yield router, workers[0], rproc, wproc
    stop_process(rproc)
    stop_process(wproc)


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def test_hostile_requests_get_json_4xx_and_leave_both_servers_healthy(fleet):
    router, worker, rproc, wproc = fleet
    batch = draw_cases(CFG, CASES)
    targets = [Target("router", router, CFG.api_key), Target("worker", worker)]
    warm = [c for c in batch if c.kind == "valid"][:4] * 5
    run_all(targets, warm, threads=2)  # first requests allocate caches: measure RSS after them
    rss0 = {"router": rss(rproc), "worker": rss(wproc)}
    t0 = time.monotonic()
    results = run_all(targets, batch, threads=4)
    took = time.monotonic() - t0
    summary = Summary.of(results)
    print(f"\n{summary.requests} hostile requests in {took:.1f} s; by kind {dict(summary.by_kind)}; "
          f"by status {dict(summary.by_status)}")
    assert summary.server_errors == 0
    assert not summary.problems, "\n".join(summary.problems[:15])
    # every kind was drawn, and each kind that must be refused was refused
    assert set(summary.by_kind) >= {"valid", "wrong_types", "random_json", "huge", "deep", "invalid_utf8",
                                    "oversized_headers", "bad_auth", "bad_http", "token_limits", "truncated", "slow",
                                    "odd_headers", "compressed", "slow_head"}
    for kind in ("deep", "invalid_utf8", "oversized_headers", "token_limits", "slow", "slow_head"):
        assert all(r.status is not None and 400 <= r.status < 500 for r in results if r.kind == kind), kind
    for url in (router, worker):
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    ok = httpx.post(router + "/v1/completions", json={"prompt": "Still there?", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {CFG.api_key}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    for name, proc in (("router", rproc), ("worker", wproc)):
        after = rss(proc)
        print(f"{name} RSS {rss0[name] / 2**20:.0f} -> {after / 2**20:.0f} MiB")
        assert after < 1.5 * rss0[name] + (100 << 20), name


@pytest.fixture(scope="module")
def timed_fleet():
    workers, wproc = start_sim_workers(1)  # real-time sim: 5000 tokens take far longer than the limit
    try:
        router, rproc = start_router(workers, "--request-time-limit-s", "1")
    except Exception:
        stop_process(wproc)
        raise
    yield router, workers[0]
    stop_process(rproc)
    stop_process(wproc)


def busy(worker: str) -> int:
    h = httpx.get(worker + "/health", timeout=2).json()
    return h["running"] + h["waiting"]


def wait_idle(worker: str, timeout: float) -> float:
    t0 = time.monotonic()
    while busy(worker):
        assert time.monotonic() - t0 < timeout, "the worker still runs the request"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_request_time_limit_ends_plain_and_streamed_answers_and_aborts_the_worker(timed_fleet):
    router, worker = timed_fleet
    body = {"prompt": "Tell me everything about bread.", "max_tokens": 5000, "temperature": 0}
    t0 = time.monotonic()
    r = httpx.post(router + "/v1/completions", json=body, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert 1.0 <= took < 3.0
    wait_idle(worker, 2.0)
    t0 = time.monotonic()
    with httpx.stream("POST", router + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        assert s.status_code == 200
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    took = time.monotonic() - t0
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert len(events) > 3  # tokens did stream before the cut
    assert 1.0 <= took < 3.0
    wait_idle(worker, 2.0)
    quick = httpx.post(router + "/v1/completions", json={**body, "max_tokens": 3}, timeout=10)
    assert quick.status_code == 200


def test_openapi_json_on_router_and_worker(fleet):
    router, worker, _, _ = fleet
    for url in (router, worker):
        doc = httpx.get(url + "/openapi.json", timeout=5).json()
        assert doc["openapi"] == "3.1.0"
        assert "/v1/chat/completions" in doc["paths"] and "ErrorBody" in doc["components"]["schemas"]
