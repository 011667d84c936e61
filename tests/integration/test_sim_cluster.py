"""Sim workers (one process, several replicas) behind the real router: the same OpenAI surface, SGLang's probe
endpoints, and cache-aware routing keeping a shared prefix on one replica."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from harness.procs import start_router, start_sim_workers, start_worker, stop_process


@pytest.fixture(scope="module")
def sim_cluster():
    urls, workers = start_sim_workers(4, "--sim-speedup", "20")
    router, rproc = start_router(urls)
    yield urls, router
    stop_process(rproc)
    stop_process(workers)


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
    import time

    for _ in range(100):
        if httpx.get(worker + "/health", timeout=5).json()["running"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the worker kept generating for a client that left")
