"""Does the sim backend keep the pace of its GPU cost model? N sim replicas in one process (as the routing
benchmarks run them), each kept busy by `--concurrency` streams of random prompts, for `--seconds`; then per run:

- pace: simulated GPU seconds the cost model charged / (engine seconds in steps x speedup). 1.0 when each step
  takes the profile's time; below it the live fleet is slower than the offline simulation (harness/fleet_sim)
  that the live benchmarks are compared with;
- in steps: engine seconds in steps / wall seconds (the engines were kept busy);
- completions and generated tokens per wall second: the same workload on every tree, so their ratio compares
  trees, including one (`--tree`) whose sim does not report its simulated seconds.

  python bench/sim_pace.py --replicas 8 32 --speed 0.74 --concurrency 8 --seconds 30 [--tree WORKTREE]

The prompts are 150-450 random words (about 10k real tokens at --sim-token-scale 32, the trace's sizes), 64
output tokens each: decode-heavy, where the sim's own CPU work is largest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from routing_quality import scrape  # noqa: E402

from harness.procs import start_sim_workers, stop_process  # noqa: E402
from harness.results import publish  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega").split()
METRICS = {"busy": "prefixroute_worker_busy_seconds_total",
           "simulated": "prefixroute_worker_simulated_busy_seconds_total",
           "completions": "prefixroute_worker_requests_total", "tokens": "prefixroute_worker_generation_tokens_total"}


async def totals(urls: list[str]) -> dict[str, float]:
    """METRICS summed over the workers (routing_quality's scrape, off the event loop the streams run on)."""
    per = await asyncio.gather(*(asyncio.to_thread(scrape, u) for u in urls))
    return {k: sum(m.get(name, 0.0) for m in per) for k, name in METRICS.items()}


async def drive(urls: list[str], model: str, concurrency: int, seconds: float, rnd: random.Random) -> dict:
    stop = False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def client(u: str) -> None:
            while not stop:
                prompt = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(150, 450)))
                async with s.post(u + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 64,
                                                                "ignore_eos": True}) as r:
                    await r.read()

        tasks = [asyncio.create_task(client(u)) for u in urls for _ in range(concurrency)]
        await asyncio.sleep(5)  # warm-up: every engine busy
        a, t0 = await totals(urls), time.monotonic()
        await asyncio.sleep(seconds)
        b, t1 = await totals(urls), time.monotonic()
        stop = True
        await asyncio.wait(tasks, timeout=120)
        for t in tasks:
            t.cancel()
    d = {k: b[k] - a[k] for k in METRICS}
    return {**d, "wall_s": t1 - t0}


def run(n: int, args: argparse.Namespace, tree: Path | None) -> dict:
    urls, proc = start_sim_workers(n, "--sim-speedup", str(args.speed), "--sim-token-scale", "32", "--block-size",
                                   "16", "--no-cache-generated", "--log-level", "warning", tree=tree)
    try:
        import httpx
        model = httpx.get(urls[0] + "/v1/models", timeout=10).json()["data"][0]["id"]
        d = asyncio.run(drive(urls, model, args.concurrency, args.seconds, random.Random(args.seed)))
    finally:
        stop_process(proc)
    wall, busy = d["wall_s"], d["busy"]
    return {"tree": str(tree) if tree else "this checkout", "replicas": n, "speed": args.speed,
            "concurrency": args.concurrency, "wall_s": wall,
            "pace": d["simulated"] / (busy * args.speed) if d["simulated"] and busy else None,
            "in_steps": busy / (n * wall), "completions_per_s": d["completions"] / wall,
            "tokens_per_s": d["tokens"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[8, 32])
    p.add_argument("--speed", type=float, default=0.74, help="--sim-speedup (0.74: the 32-worker overload runs')")
    p.add_argument("--concurrency", type=int, default=8, help="streams per replica")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--tree", type=Path, help="also run this checkout's sim (a git worktree), alternating with ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = []
    for n in args.replicas:
        for tree in ((args.tree, None) if args.tree else (None,)):
            rows.append(run(n, args, tree))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| sim | replicas | pace (simulated / in steps x speed) | in steps / wall | completions/s | "
             "generated tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pace = f"{r['pace']:.3f}" if r["pace"] is not None else "not reported"
        lines.append(f"| {r['tree']} | {r['replicas']} | {pace} | {r['in_steps']:.3f} | {r['completions_per_s']:.2f} "
                     f"| {r['tokens_per_s']:.0f} |")
    cmd = "python bench/sim_pace.py " + " ".join(sys.argv[1:])
    publish({"command": cmd, "machine": platform.platform(), "config": {k: str(v) for k, v in vars(args).items()},
             "runs": rows}, "\n".join(lines) + "\n", args.out, "sim_pace", f"Command: `{cmd}`")


if __name__ == "__main__":
    main()
