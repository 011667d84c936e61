"""Shared fixtures: free 127.0.0.1 ports, the real model loaded once, a real worker process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.procs import (  # noqa: F401  (re-exported for the tests)
    free_port,
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
