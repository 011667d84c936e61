"""Routing quality at 8 to 64 replicas: replay a Mooncake trace through each router policy (and SGLang's
cache_aware router, the peer users would pick instead) to sim workers with finite KV caches, and compare the
block hit ratio with what one pooled cache of the same total size, and an infinite cache, would reach.

For every fleet size N, policy and load (multiples of the rate that keeps the fleet just below saturation):
fresh sim workers (one process, N replicas, H100 / Llama-3-8B cost model, per-worker LRU of the KV the GPU
leaves), a fresh router, then `python -m loadgen replay` at that rate. Hit ratio = cached / prompt tokens from
the workers' own /metrics (so every router is measured the same way); max/mean = the busiest worker's requests
over the mean; TTFT from loadgen. Offline (no servers): the same trace prefix through one pooled LRU of N x the
per-worker capacity, and through an infinite cache (0.366 on the whole conversation trace).

Prompts are scaled: each 512-token trace block becomes `--block-tokens` tokens and the sim charges each token
as 512/block-tokens tokens (time and KV bytes), so sharing, cache pressure and service times keep the trace's
proportions while the CPU handles ~30x fewer tokens. Prints JSON and a markdown table; `--out DIR` writes
routing_quality.{json,md} and routing_quality.png.

  python bench/routing_quality.py --workers 8 32 --loads 0.5 1 2 --max-requests 3000 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.procs import free_port, start_router, start_sim_workers, stop_process  # noqa: E402
from worker.engine.cache import BlockCache  # noqa: E402
from worker.sim import GpuProfile  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
POLICIES = ["cache_aware", "consistent_hash", "round_robin", "least_loaded", "random", "sglang"]
TRACE_BLOCK = 512


def load_trace(path: Path, n: int) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def offline_hit_ratio(reqs: list[dict[str, Any]], capacity_blocks: int | None) -> float:
    """Cached / prompt tokens through one LRU of `capacity_blocks` trace blocks (None: infinite), with the
    worker's own BlockCache: a trace block is one 'token' of a block_size-1 chain, so prefix semantics are the
    engine's. Counted like a worker counts: whole blocks only, and never the prompt's last token."""
    cache = BlockCache(1, capacity_blocks if capacity_blocks is not None else 1 << 62)
    hits = total = 0
    for r in reqs:
        ids = r["hash_ids"]
        chain = cache.acquire_prefix(ids, None, len(ids))
        hits += min(len(chain), (r["input_length"] - 1) // TRACE_BLOCK) * TRACE_BLOCK
        total += r["input_length"]
        parent = chain[-1] if chain else None
        for i in range(len(chain), len(ids)):
            blk = cache.insert(cache.child_hash(parent, None, ids[i:i + 1]), parent, ids[i:i + 1], None, 1)
            if blk is None:
                break
            chain.append(blk)
            parent = blk
        cache.release(chain)
    return hits / total


def saturation_speed(reqs: list[dict[str, Any]], n: int, pooled_hit: float, profile: GpuProfile,
                     target_util: float = 0.85) -> float:
    """Trace speed-up at which the fleet's estimated GPU work fills `target_util` of N GPUs: prefill of the
    tokens a pooled cache would miss, plus each request's share of batched decode steps (batch of ~32)."""
    span_s = (reqs[-1]["timestamp"] - reqs[0]["timestamp"]) / 1000 or 1.0
    work = 0.0
    for r in reqs:
        new = int(r["input_length"] * (1 - pooled_hit))
        work += profile.prefill_s(new, r["input_length"] - new) + profile.step_overhead_s
        work += r["output_length"] * (profile.decode_weights_s / 32 + profile.decode_s_per_ctx_token *
                                      r["input_length"])
    return target_util * n * span_s / work


def scrape(url: str) -> dict[str, float]:
    vals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            key = name.split("{")[0]
            vals[key] = vals.get(key, 0.0) + float(v)
    return vals


def run_one(trace: Path, n: int, policy: str, speed: float, args: argparse.Namespace, workdir: Path) -> dict:
    scale = TRACE_BLOCK / args.block_tokens
    procs = []
    log = open(workdir / f"{policy}-{n}-{speed:.2f}.log", "wb")
    try:
        urls, sim = start_sim_workers(n, "--sim-speedup", str(args.time_scale), "--sim-token-scale", str(scale),
                                      "--block-size", str(args.block_tokens), "--no-cache-generated",
                                      "--log-level", "warning", log=log)
        procs.append(sim)
        if policy == "sglang":
            router, rproc = start_router(urls, "--policy", "cache_aware", "--prometheus-port", str(free_port()),
                                         log=log, module="sglang_router.launch_router")
        else:
            prefix = max(1, math.ceil(256 / scale))  # the first 256 real tokens, in scaled tokens
            session = max(1, math.ceil(1024 / scale))
            router, rproc = start_router(urls, "--policy", policy, "--prefix-tokens", str(prefix),
                                         "--session-tokens", str(session),
                                         "--log-level", "warning", log=log)
        procs.append(rproc)
        out = workdir / f"{policy}-{n}-{speed:.2f}"
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "loadgen", "replay", str(trace), "--url", router,
                        "--speedup", str(speed * args.time_scale), "--block-tokens", str(args.block_tokens),
                        "--max-requests", str(args.max_requests), "--max-output-tokens", str(args.max_output_tokens),
                        "--out", str(out), "--quiet"], cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                       timeout=args.run_timeout)
        wall = time.time() - t0
        summary = json.loads((out / "summary.json").read_text())
        per = [scrape(u) for u in urls]
        reqs = [m.get("prefixroute_worker_requests_total", 0.0) for m in per]
        prompt = sum(m.get("prefixroute_worker_prompt_tokens_total", 0) for m in per)
        cached = sum(m.get("prefixroute_worker_cached_tokens_total", 0) for m in per)
        mean = sum(reqs) / n
        return {"workers": n, "policy": policy, "load": None, "speed": speed, "wall_s": wall,
                "hit_ratio": cached / prompt if prompt else 0.0, "max_mean": max(reqs) / mean if mean else None,
                "ttft_p50_s": summary.get("ttft_p50_s"), "ttft_p99_s": summary.get("ttft_p99_s"),
                "requests": summary.get("requests"), "errors": summary.get("errors")}
    finally:
        for p in procs:
            stop_process(p)
        log.close()


def markdown(rows: list[dict], offline: dict) -> str:
    lines = ["| workers | policy | load | hit ratio | % of pooled | max/mean | TTFT p50 s | TTFT p99 s | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pooled = offline[r["workers"]]["pooled"]
        lines.append(f"| {r['workers']} | {r['policy']} | {r['load']}x | {r['hit_ratio']:.3f} | "
                     f"{100 * r['hit_ratio'] / pooled:.0f}% | {r['max_mean']:.2f} | {r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p99_s']:.3f} | {r['errors']} |")
    lines.append("")
    for n, o in offline.items():
        lines.append(f"- {n} workers: pooled cache of {o['capacity_blocks']} blocks reaches {o['pooled']:.3f}; "
                     f"infinite cache {o['infinite']:.3f}; 1x load = trace speed x{o['speed_1x']:.2f}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["workers"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for col, n in enumerate(sizes):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["load"], r["hit_ratio"], r["ttft_p99_s"]) for r in rows
                         if r["workers"] == n and r["policy"] == policy)
            if pts:
                axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
                axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=policy)
        axes[0][col].set_title(f"{n} workers: hit ratio")
        axes[1][col].set_title(f"{n} workers: TTFT p99 (s)")
        axes[1][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xlabel("load (x saturation-safe rate)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--max-requests", type=int, default=3000)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=10.0, help="simulated seconds per wall-clock second")
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if "sglang" in args.policies and shutil.which("python3") and subprocess.run(
            [sys.executable, "-c", "import sglang_router"], capture_output=True).returncode != 0:
        print("sglang-router is not installed (pip install sglang-router); skipping it", file=sys.stderr)
        args.policies = [x for x in args.policies if x != "sglang"]
    reqs = load_trace(args.trace, args.max_requests)
    profile = GpuProfile()
    per_worker_blocks = profile.kv_capacity_bytes // (profile.kv_bytes_per_token * TRACE_BLOCK)
    offline = {}
    for n in args.workers:
        pooled = offline_hit_ratio(reqs, n * per_worker_blocks)
        offline[n] = {"capacity_blocks": n * per_worker_blocks, "pooled": pooled,
                      "infinite": offline_hit_ratio(reqs, None), "speed_1x": saturation_speed(reqs, n, pooled, profile)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            for load in args.loads:
                for policy in args.policies:
                    r = run_one(args.trace, n, policy, offline[n]["speed_1x"] * load, args, Path(tmp))
                    r["load"] = load
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "config": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "offline": offline, "runs": rows}
    md = markdown(rows, offline)
    print(json.dumps(report, indent=2))
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routing_quality.json").write_text(json.dumps(report, indent=2))
        (args.out / "routing_quality.md").write_text(f"Command: `python bench/routing_quality.py "
                                                     f"{' '.join(sys.argv[1:])}`\n\n{md}")
        plot(rows, args.out / "routing_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
