"""Shared fixtures: free 127.0.0.1 ports, the real model loaded once, a real worker process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.procs import (  # noqa: F401  (re-exported for the tests)
    free_port,
    start_redis,
    start_router,
    start_sim_workers,
    start_worker,
    stop_process,
    wait_healthy,
)


@pytest.fixture(scope="session")
def loaded_model():
    from worker.engine.loader import load_model

    return load_model(None, device="cpu")


@pytest.fixture(scope="session")
def worker_url(tmp_path_factory) -> Iterator[str]:
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "wb")
    url, proc = start_worker(env={"PREFIXROUTE_WORKER_MAX_BODY_BYTES": str(1 << 20)}, log=log)
    try:
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="session")
def route_of():
    """`route_of(body, {worker_url: weight})`: the worker a fresh router (open mode, default settings,
    cache_aware) sends this chat request to, computed in this process by the router's own code (keyer, tenant,
    ring, policy). Worker URLs carry random ports, so tests use it to pick prompts by the worker they land on
    instead of hoping that random prompts spread over every worker."""
    from protocol.modelfiles import load_tokenizer, resolve_model_path
    from protocol.openai import ChatCompletionRequest
    from router.app import Router
    from router.settings import RouterSettings

    tokenizer = load_tokenizer(resolve_model_path(None))

    def route(body: dict, workers: dict[str, int]) -> str:
        router = Router(RouterSettings(workers=[{"url": u, "weight": w} for u, w in workers.items()]), tokenizer)
        for name in list(router.pool.workers):
            router.pool.mark_ok(name)
        keys = router.keyer.keys(router.tenants.authenticate(None), ChatCompletionRequest.model_validate(body), None)
        return router.policy.choose(keys, router.pool).worker

    return route


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A fresh real redis-server for one test."""
    url, proc = start_redis()
    try:
        yield url
    finally:
        stop_process(proc)
