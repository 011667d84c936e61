"""Shared fixtures: free 127.0.0.1 ports, the real model loaded once, a real worker process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port such that base .. base+n-1 are all free on 127.0.0.1 (for a multi-replica sim worker)."""
    import random

    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def start_sim_workers(n: int, *args: str) -> tuple[list[str], subprocess.Popen]:
    base = free_port_block(n)
    cmd = [sys.executable, "-m", "worker", "--backend", "sim", "--host", "127.0.0.1", "--port", str(base),
           "--replicas", str(n), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = [f"http://127.0.0.1:{base + i}" for i in range(n)]
    try:
        for u in urls:
            wait_healthy(u, proc, timeout=120)
    except Exception:
        proc.kill()
        raise
    return urls, proc


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def start_worker(*args: str, env: dict[str, str] | None = None, log_path: Path | None = None) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "worker", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *args]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except Exception:
        proc.kill()
        raise
    return url, proc


def start_router(workers: list[str], *args: str, env: dict[str, str] | None = None,
                 wait_path: str = "/health") -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port), *args]
    for w in workers:
        cmd += ["--worker", w]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=120, path=wait_path)
    except Exception:
        proc.kill()
        raise
    return url, proc


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def loaded_model():
    from worker.engine.loader import load_model

    return load_model(None, device="cpu")


@pytest.fixture(scope="session")
def worker_url(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    url, proc = start_worker(env={"PREFIXROUTE_WORKER_MAX_BODY_BYTES": str(1 << 20)}, log_path=log)
    try:
        yield url
    finally:
        stop_process(proc)
