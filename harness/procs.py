"""Start workers, sim fleets and routers as real processes on free 127.0.0.1 ports, wait for them, stop them.
Every wait is bounded; a process that dies while starting raises at once."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port such that base .. base+n-1 are all free on 127.0.0.1 (for a multi-replica sim worker)."""
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


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 240.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} became healthy")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _spawn(args: list[str], env: dict[str, str] | None, log: IO[bytes] | int | None,
           cwd: Path | None = None) -> subprocess.Popen:
    out = subprocess.DEVNULL if log is None else log
    return subprocess.Popen([sys.executable, *args], cwd=cwd or ROOT, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)


def _started(urls: list[str], proc: subprocess.Popen, timeout: float, path: str = "/health") -> None:
    try:
        for u in urls:
            wait_healthy(u, proc, timeout=timeout, path=path)
    except Exception:
        proc.kill()
        raise


def start_worker(*args: str, env: dict[str, str] | None = None, log: IO[bytes] | None = None,
                 timeout: float = 240.0, tree: Path | None = None) -> tuple[str, subprocess.Popen]:
    """A model worker on a free port; `tree`: another checkout's worker (a benchmark's baseline)."""
    port = free_port()
    proc = _spawn(["-m", "worker", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *args], env, log,
                  tree)
    url = f"http://127.0.0.1:{port}"
    _started([url], proc, timeout)
    return url, proc


def start_sim_workers(n: int, *args: str, log: IO[bytes] | None = None,
                      tree: Path | None = None) -> tuple[list[str], subprocess.Popen]:
    """`n` sim workers in one process; `tree`: another checkout's (a benchmark's baseline)."""
    base = free_port_block(n)
    proc = _spawn(["-m", "worker", "--backend", "sim", "--host", "127.0.0.1", "--port", str(base), "--replicas",
                   str(n), *args], None, log, tree)
    urls = [f"http://127.0.0.1:{base + i}" for i in range(n)]
    _started(urls, proc, 120)
    return urls, proc


def start_sim_processes(k: int, *args: str, ports: list[int] | None = None) -> list[tuple[str, subprocess.Popen]]:
    """`k` one-worker sim processes started together (each can be killed alone), on free ports or on `ports`
    (a restart on the port a stopped one had)."""
    started = []
    for i in range(k):
        port = ports[i] if ports else free_port()
        proc = _spawn(["-m", "worker", "--backend", "sim", "--host", "127.0.0.1", "--port", str(port), *args], None,
                      None)
        started.append((f"http://127.0.0.1:{port}", proc))
    for url, proc in started:
        _started([url], proc, 120)
    return started


def start_router(workers: list[str], *args: str, env: dict[str, str] | None = None, wait_path: str = "/health",
                 log: IO[bytes] | None = None, module: str = "router",
                 port: int | None = None) -> tuple[str, subprocess.Popen]:
    port = port or free_port()  # a given port: a restart where a stopped router listened
    if module == "router":
        cmd = ["-m", "router", "--host", "127.0.0.1", "--port", str(port), *args]
        for w in workers:
            cmd += ["--worker", w]
    else:  # a peer router taking SGLang's flags, e.g. sglang_router.launch_router
        cmd = ["-m", module, "--host", "127.0.0.1", "--port", str(port), *args, "--worker-urls", *workers]
    proc = _spawn(cmd, env, log)
    url = f"http://127.0.0.1:{port}"
    _started([url], proc, 120, wait_path)
    return url, proc


VLLM_MODEL_DIR = ROOT / ".models" / "smollm2-135m-instruct"


def vllm_python() -> Path:
    """The python of vLLM's own virtualenv (deploy/vllm.sh installs it, and the model directory, idempotently)."""
    out = subprocess.run(["bash", str(ROOT / "deploy" / "vllm.sh")], cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=1800)
    return ROOT / out.stdout.strip().splitlines()[-1]


def start_vllm(python: Path, served_name: str, *args: str, log: IO[bytes] | None = None, timeout: float = 400.0,
               kv_gib: int = 1) -> tuple[str, subprocess.Popen]:
    """A real vLLM OpenAI server (CPU build) serving the packaged SmolLM2 on a free port; prompt-token details
    on, so its answers carry usage.prompt_tokens_details.cached_tokens. Started with `python -m` because the
    `vllm` command of the CPU wheel cannot read its own package metadata; blocks of 32 tokens (its CPU attention
    takes multiples of 32 only) and eager mode (torch.compile's warm-up took 3 minutes on 2 cores; eager is up in
    about a minute)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_SERVER_DEV_MODE": "1"}
    proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                             str(VLLM_MODEL_DIR), "--served-model-name", served_name, "--host", "127.0.0.1",
                             "--port", str(port), "--enable-prompt-tokens-details", "--max-model-len", "2048",
                             "--block-size", "32", "--enforce-eager", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL if log is None else log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _started([url], proc, timeout)
    return url, proc


def start_sidecar(engine_url: str, *args: str, log: IO[bytes] | None = None) -> tuple[str, subprocess.Popen]:
    """worker.sidecar for an engine on a free port; healthy once it has read the engine's metrics."""
    port = free_port()
    proc = _spawn(["-m", "worker.sidecar", "--engine-url", engine_url, "--host", "127.0.0.1", "--port", str(port),
                   *args], None, log)
    url = f"http://127.0.0.1:{port}"
    _started([url], proc, 60)
    return url, proc


@contextmanager
def sim_cluster(n: int, *worker_args: str, router_args: Sequence[str] = ()) -> Iterator[tuple[list[str], str]]:
    """A router in front of `n` sim workers (one process): yields (worker URLs, router URL), then stops both."""
    urls, workers = start_sim_workers(n, *worker_args)
    try:
        router, rproc = start_router(urls, *router_args)
    except Exception:
        stop_process(workers)
        raise
    try:
        yield urls, router
    finally:
        stop_process(rproc)
        stop_process(workers)


def start_redis(port: int | None = None, data_dir: Path | None = None, timeout: float = 20.0,
                extra: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen]:
    """A real redis-server (Debian's package) on a free 127.0.0.1 port: in memory only, or with an append-only
    file in `data_dir`, so a restart on the same port (pass both back) keeps what was written. `extra`: more
    redis-server options."""
    import shutil

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server; deploy/install.sh test)")
    port = port or free_port()
    persist = ["--dir", str(data_dir), "--appendonly", "yes"] if data_dir else ["--appendonly", "no"]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persist,
                             "--protected-mode", "no", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0", proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("redis-server did not answer PING")
