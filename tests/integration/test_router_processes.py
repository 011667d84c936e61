"""`--processes 2`: two router processes share the port (SO_REUSEPORT), both serve, and both go with the parent."""

from __future__ import annotations

import time

import httpx
import psutil

from harness.procs import start_router, start_sim_workers, stop_process


def listeners(pid: int, port: int) -> set[int]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = set()
    for p in procs:
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in p.net_connections("tcp")):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_two_router_processes_share_the_port_and_serve():
    urls, workers = start_sim_workers(1)
    url, router = start_router(urls, "--processes", "2")
    port = int(url.rsplit(":", 1)[1])
    try:
        deadline = time.monotonic() + 120
        while len(listeners(router.pid, port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # polling: the second process binds once it has loaded the tokenizer
        serving = listeners(router.pid, port)
        assert len(serving) == 2 and router.pid in serving
        for i in range(20):  # a new connection each time: the kernel spreads them over both
            r = httpx.post(url + "/v1/completions", json={"prompt": f"hello {i}", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        children = [psutil.Process(p) for p in serving if p != router.pid]
    finally:
        stop_process(router)
        stop_process(workers)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
