"""Sim workers (one process, several replicas) behind the real router: the same OpenAI surface, SGLang's probe
endpoints, and cache-aware routing keeping a shared prefix on one replica."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import openai
import pytest

from harness import procs
from harness.procs import start_router, start_sim_workers, stop_process


@pytest.fixture(scope="module")
def sim_cluster():
    with procs.sim_cluster(4, "--sim-speedup", "20") as cluster:
        yield cluster


def test_sim_serves_the_openai_api_and_sglang_probes(sim_cluster):
    urls, router = sim_cluster
    for path in ("/health", "/get_model_info", "/get_server_info", "/model_info", "/server_info", "/v1/models"):
        assert httpx.get(urls[0] + path, timeout=10).status_code == 200
    info = httpx.get(urls[1] + "/server_info", timeout=10).json()
    assert info["backend"] == "sim" and info["max_total_num_tokens"] > 400_000
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    chunks = list(client.completions.create(model=model, prompt=[1000] * 50, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == 50


def test_cache_aware_keeps_a_shared_prefix_on_one_sim_replica(sim_cluster):
    urls, router = sim_cluster
    system = f"[{uuid.uuid4().hex}] " + "policy text " * 300
    served, cached = set(), []
    for i in range(8):
        r = httpx.post(router + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}],
            "max_tokens": 2})
        assert r.status_code == 200
        served.add(r.headers["x-prefixroute-worker"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(served) == 1 and cached[0] == 0 and min(cached[1:]) > 500


def test_client_leaving_a_routed_stream_aborts_it_on_the_worker(sim_cluster):
    urls, router = sim_cluster
    body = {"prompt": [1000] * 40, "max_tokens": 50_000, "stream": True}
    with httpx.stream("POST", router + "/v1/completions", json=body, timeout=30) as r:
        worker = r.headers["x-prefixroute-worker"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    for _ in range(100):
        if httpx.get(worker + "/health", timeout=5).json()["running"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the worker kept generating for a client that left")


def test_a_full_upstream_pool_queues_requests_instead_of_failing_workers():
    # Two upstream connections for eight concurrent 1-2 s requests, and a 0.3 s connect timeout: requests must
    # wait for a free connection. Counting that wait as a failed connect would take both workers out.
    urls, workers = start_sim_workers(2, "--sim-speedup", "1")
    router, rproc = start_router(urls, env={"PREFIXROUTE_ROUTER_MAX_CONNECTIONS": "2",
                                            "PREFIXROUTE_ROUTER_CONNECT_TIMEOUT_S": "0.3"})
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(router + "/v1/completions", json={
                    "prompt": [1000 + i] * 40, "max_tokens": 200}) for i in range(8)))

        t0 = time.monotonic()
        out = asyncio.run(burst())
        assert [r.status_code for r in out] == [200] * 8, [r.text for r in out if r.status_code != 200]
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in out)
        assert time.monotonic() - t0 > 2.0  # they did queue: 8 requests through 2 connections
        metrics = httpx.get(router + "/metrics", timeout=10).text
        assert "prefixroute_router_upstream_errors_total{" not in metrics
    finally:
        stop_process(rproc)
        stop_process(workers)
