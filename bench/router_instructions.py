"""Router CPU per request as instructions, counted by valgrind's callgrind: deterministic to ~0.1% where timings
on a shared 2-core VM move by 30% from run to run (bench/router_overhead.py's CPU per request), so a change to the
hot path can be measured before it is merged.

Each router runs under callgrind with instrumentation off (it starts at a few times its normal speed), takes
`--warmup` requests, then counts the instructions (all its threads) of `--requests` requests sent at concurrency
`--concurrency` to the fast upstreams of bench/router_overhead.py. Side by side: prefixroute (this tree, and
`--tree DIR` for another checkout, e.g. a git worktree of the commit before a change), the two pass-through
floors of bench/router_overhead.py (on aiohttp's client, and on router.upstream) and, with `--sglang`, SGLang's
router from PyPI (its Rust threads counted too). Instructions are not time (cache misses and syscalls are not in
them), but for one interpreter and one machine they rank changes reliably.

Needs `valgrind` (Debian: apt-get install valgrind). Prints JSON, then a markdown table; `--out DIR` writes
router_instructions.{json,md}.

  python bench/router_instructions.py [--sizes 200 20000] [--tree /tmp/before] [--sglang] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from router_overhead import fast_upstreams, free_port, prompt_of, router_command, wait_ok  # noqa: E402

from harness.results import publish  # noqa: E402


def _python() -> str:
    return os.path.realpath(sys.executable)  # not a pyenv shim: callgrind follows no exec


async def _send(session: aiohttp.ClientSession, url: str, payload: bytes, n: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            async with session.post(url + "/v1/chat/completions", data=payload,
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")

    await asyncio.gather(*(one() for _ in range(n)))


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _instructions(out_dir: Path, pid: int) -> int:
    """The instructions of the last dump (after the zeroing): the largest `totals:` of the pid's dump files."""
    best = 0
    for f in out_dir.glob(f"cg.{pid}*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                best = max(best, int(line.split()[1]))
    return best


async def measure(kind: str, cwd: Path, upstreams: list[str], payloads: dict[int, bytes],
                  args: argparse.Namespace) -> dict[int, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = router_command(kind, port, upstreams, 1)
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                 f"--callgrind-out-file={d}/cg.%p", _python(), *cmd], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as s:
                await wait_ok(s, url + ("/health" if kind != "sglang" else "/v1/models"), timeout=600)
                for n, payload in payloads.items():
                    await _send(s, url, payload, args.warmup, args.concurrency)
                    _control(proc.pid, "-i", "on")
                    _control(proc.pid, "-z")
                    await _send(s, url, payload, args.requests, args.concurrency)
                    _control(proc.pid, "-d")
                    _control(proc.pid, "-i", "off")
                    time.sleep(1)
                    out[n] = _instructions(d, proc.pid) / args.requests
                    for f in d.glob(f"cg.{proc.pid}.*"):  # the next size's dump must not read this one's
                        f.unlink()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    payloads = {n: json.dumps({"model": "fast", "messages": prompt_of(n), "max_tokens": 16}).encode()
                for n in args.sizes}
    routers: list[tuple[str, str, Path]] = [("prefixroute", "prefixroute", ROOT)]
    if args.tree:
        routers.append((f"prefixroute ({args.tree})", "prefixroute", Path(args.tree)))
    routers += [("aiohttp-floor", "aiohttp-floor", ROOT), ("upstream-floor", "upstream-floor", ROOT)]
    if args.sglang:
        routers.append(("sglang", "sglang", ROOT))
    results: dict[str, Any] = {}
    async with fast_upstreams(args.upstreams) as upstreams:
        for name, kind, cwd in routers:
            results[name] = await measure(kind, cwd, upstreams, payloads, args)
    return results


def markdown(results: dict[str, Any], sizes: list[int]) -> str:
    floor = results.get("aiohttp-floor", {})
    lines = ["| router | " + " | ".join(f"{n} tokens: instructions/request | x floor" for n in sizes) + " |",
             "|---|" + "---:|---:|" * len(sizes)]
    for name, per in results.items():
        cells = []
        for n in sizes:
            v = per[n]
            cells += [f"{v / 1e3:.0f}k", f"{v / floor[n]:.2f}" if floor.get(n) else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200], help="prompt tokens of the measured requests")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--upstreams", type=int, default=4)
    p.add_argument("--tree", help="another checkout of prefixroute to measure beside this one")
    p.add_argument("--sglang", action="store_true", help="also SGLang's router (sglang-router from PyPI)")
    p.add_argument("--out")
    args = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    results = asyncio.run(run(args))
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "config": vars(args), "results": {k: {str(n): v for n, v in r.items()} for k, r in results.items()}}
    publish(report, markdown(results, args.sizes), Path(args.out) if args.out else None, "router_instructions",
            f"Command: `python bench/router_instructions.py {' '.join(sys.argv[1:])}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
