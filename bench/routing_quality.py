"""Routing quality at 8 to 64 replicas: replay a Mooncake trace through each router policy (and SGLang's
cache_aware router, the peer users would pick instead) to sim workers with finite KV caches, and compare the
block hit ratio with what one pooled cache of the same total size, and an infinite cache, would reach.

For every fleet size N, policy and load (multiples of the rate that keeps the fleet just below saturation):
fresh sim workers (one process, N replicas, H100 / Llama-3-8B cost model, per-worker LRU of the KV the GPU
leaves), a fresh router, then `python -m loadgen replay` at that rate. Hit ratio = cached / prompt tokens from
the workers' own /metrics (so every router is measured the same way); max/mean = the busiest worker's requests
(and engine busy seconds, the GPU time a worker spent) over the mean; TTFT from loadgen. Offline (no servers):
the same trace prefix through one pooled LRU of N x the per-worker capacity, and through an infinite cache
(0.366 on the whole conversation trace).

Prompts are scaled: each 512-token trace block becomes `--block-tokens` tokens and the sim charges each token
as 512/block-tokens tokens (time and KV bytes), so sharing, cache pressure and service times keep the trace's
proportions while the CPU handles ~30x fewer tokens. Each run replays at `--wall-rps` requests per wall-clock
second (the sim's clock runs at whatever multiple of real time that takes), so a 2-core machine keeps up at
every load. Prints JSON and a markdown table; `--out DIR` writes routing_quality.{json,md} and
routing_quality.png (after every run, so a long sweep keeps what it finished); `--append` merges into them.

`--seeds S ...` (or `--seed S`, repeatable) runs every cell once per seed. A seed picks the words behind the
trace's hash ids (loadgen's PromptBuilder(seed=...)): the same sharing between requests, other token ids, so
other routing keys and other places on the hash ring. Seed 0 is the prompt text of the earlier results. Worker
ports, and with them the ring's layout, differ in every run whatever the seed. A cell run at several seeds reads
`median [min-max]` in the markdown; the JSON keeps every run.

  python bench/routing_quality.py --workers 8 32 --loads 0.5 1 2 --max-requests 2000 --out docs/benchmarks
  python bench/routing_quality.py --workers 32 --policies cache_aware --loads 1 2 --seeds 0 1 2 --append --out DIR
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.fleet_sim import (  # noqa: E402
    TRACE,
    TRACE_BLOCK,
    load_trace,
    offline_hit_ratio,
    per_worker_blocks,
    saturation_speed,
)
from harness.procs import free_port, start_router, start_sim_workers, stop_process  # noqa: E402
from router.settings import RouterSettings  # noqa: E402
from worker.sim import GpuProfile  # noqa: E402

DEFAULT_SPILL_RPM = RouterSettings.model_fields["spill_rpm"].default
DEFAULT_RATE_WINDOW_S = RouterSettings.model_fields["rate_window_s"].default

POLICIES = ["cache_aware", "consistent_hash", "round_robin", "least_loaded", "random", "sglang"]


def scrape(url: str) -> dict[str, float]:
    vals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            key = name.split("{")[0]
            vals[key] = vals.get(key, 0.0) + float(v)
    return vals


def write_requests(args: argparse.Namespace, seed: int, path: Path) -> Path:
    """The trace slice as loadgen request JSONL, prompts built with PromptBuilder(seed) and the default model's
    tokenizer (what `loadgen replay TRACE --block-tokens B` builds for seed 0)."""
    from loadgen.traces import PromptBuilder, read_mooncake
    from protocol.modelfiles import load_tokenizer, resolve_model_path

    builder = PromptBuilder(load_tokenizer(resolve_model_path(None)), args.block_tokens, seed=seed)
    with open(path, "w") as f:
        for line in read_mooncake(args.trace, args.max_requests):
            body = {"prompt": builder.prompt(line), "max_tokens": max(1, min(line.output_length,
                                                                              args.max_output_tokens)),
                    "temperature": 0}
            f.write(json.dumps({"timestamp": line.timestamp, "endpoint": "/v1/completions", "body": body}) + "\n")
    return path


def sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang-router")
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> str:
    """The commit and whether the working tree differed from it (other work in progress) when a run started."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_one(trace: Path, n: int, policy: str, speed: float, time_scale: float, args: argparse.Namespace,
            workdir: Path, router_args: tuple[str, ...] = (), tag: str = "") -> dict:
    """One live run; `router_args` go to prefixroute's router as they are, `tag` names the run's files."""
    scale = TRACE_BLOCK / args.block_tokens
    procs = []
    name = f"{policy}{tag}-{n}-{speed:.2f}"
    log = open(workdir / f"{name}.log", "wb")
    git = git_state()
    try:
        urls, sim = start_sim_workers(n, "--sim-speedup", str(time_scale), "--sim-token-scale", str(scale),
                                      "--block-size", str(args.block_tokens), "--no-cache-generated",
                                      "--log-level", "warning", log=log)
        procs.append(sim)
        if policy == "sglang":
            router, rproc = start_router(urls, "--policy", "cache_aware", "--prometheus-port", str(free_port()),
                                         log=log, module="sglang_router.launch_router")
        else:
            prefix = max(1, math.ceil(256 / scale))  # the first 256 real tokens, in scaled tokens
            block = max(16, math.ceil(256 / scale))  # index blocks of ~64 real tokens, in scaled bytes
            # The workers run time_scale x faster than the trace's clock: the router's rates must be counted on
            # the same clock, or every key looks time_scale x hotter than it is and spills (the offline
            # simulation counts on simulated time).
            router, rproc = start_router(urls, "--policy", policy, "--prefix-tokens", str(prefix),
                                         "--index-block-bytes", str(block), "--log-level", "warning",
                                         "--spill-rpm", str(DEFAULT_SPILL_RPM * time_scale),
                                         "--rate-window-s", str(DEFAULT_RATE_WINDOW_S / time_scale), *router_args,
                                         log=log)
        procs.append(rproc)
        out = workdir / name
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "loadgen", "replay", str(trace), "--url", router,
                        "--speedup", str(speed * time_scale), "--block-tokens", str(args.block_tokens),
                        "--max-requests", str(args.max_requests), "--max-output-tokens", str(args.max_output_tokens),
                        "--workers", str(n), "--out", str(out), "--quiet"], cwd=ROOT, check=True, stdout=log,
                       stderr=subprocess.STDOUT, timeout=args.run_timeout)
        wall = time.time() - t0
        summary = json.loads((out / "summary.json").read_text())
        # The router's own accounting once every request has ended: nothing should be left in flight or waiting.
        left = scrape(router) if policy != "sglang" else {}
        per = [scrape(u) for u in urls]
        reqs = [m.get("prefixroute_worker_requests_total", 0.0) for m in per]
        busy = [m.get("prefixroute_worker_busy_seconds_total", 0.0) for m in per]
        prompt = sum(m.get("prefixroute_worker_prompt_tokens_total", 0) for m in per)
        cached = sum(m.get("prefixroute_worker_cached_tokens_total", 0) for m in per)
        simulated = sum(m.get("prefixroute_worker_simulated_busy_seconds_total", 0.0) for m in per)
        mean, busy_mean = sum(reqs) / n, sum(busy) / n
        return {"workers": n, "policy": policy, "load": None, "seed": None, "speed": speed, "time_scale": time_scale,
                "git": git, **({"sglang_router": sglang_version()} if policy == "sglang" else {}),
                "wall_s": wall, "hit_ratio": cached / prompt if prompt else 0.0,
                "max_mean": max(reqs) / mean if mean else None,
                "busy_max_mean": max(busy) / busy_mean if busy_mean else None,
                # 1.0 when the sim's steps take the profile's time: below it, the live fleet is slower than the
                # offline simulation's (a CPU that cannot keep up)
                "sim_pace": simulated / (sum(busy) * time_scale) if sum(busy) else None,
                "router_inflight_after": left.get("prefixroute_router_inflight"),
                "router_queued_prefill_after": left.get("prefixroute_router_queued_prefill_tokens"),
                "router_waiting_after": left.get("prefixroute_router_admission_waiting"),
                "router_held": left.get("prefixroute_router_admission_held_total"),
                "ttft_p50_s": summary.get("ttft_p50_s"), "ttft_p99_s": summary.get("ttft_p99_s"),
                # the load generator's lag behind its schedule (TTFT counts from the send)
                "send_late_p99_s": summary.get("send_late_p99_s"), "send_late_max_s": summary.get("send_late_max_s"),
                "requests": summary.get("requests"), "errors": summary.get("errors"),
                "refused": summary.get("refused", 0),
                "refused_without_retry_after": summary.get("refused_without_retry_after", 0), "out": str(out)}
    finally:
        for p in procs:
            stop_process(p)
        log.close()


def seconds(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def spread(vals: list[float], fmt: str | Callable[[float], str]) -> str:
    """One value, or `median [min-max]` of several (one value where they all print the same)."""
    f = fmt.format if isinstance(fmt, str) else fmt
    lo, mid, hi = f(min(vals)), f(statistics.median(vals)), f(max(vals))
    return mid if len(vals) == 1 or lo == hi else f"{mid} [{lo}-{hi}]"


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["workers"], r["policy"], r["load"]), []).append(r)
    return out


def markdown(rows: list[dict], offline: dict) -> str:
    lines = ["| workers | policy | load | seeds | hit ratio | % of pooled | max/mean requests | max/mean busy "
             "| TTFT p50 s | TTFT p99 s | errors |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (n, policy, load), rs in cells(rows).items():
        pooled = offline[n]["pooled"]
        seeds = ",".join(str(r.get("seed", 0)) for r in rs)
        lines.append(f"| {n} | {policy} | {load}x | {seeds} | {spread([r['hit_ratio'] for r in rs], '{:.3f}')} | "
                     f"{spread([r['hit_ratio'] / pooled for r in rs], '{:.0%}')} | "
                     f"{spread([r['max_mean'] for r in rs], '{:.2f}')} | "
                     f"{spread([r['busy_max_mean'] for r in rs], '{:.2f}')} | "
                     f"{spread([r['ttft_p50_s'] for r in rs], seconds)} | "
                     f"{spread([r['ttft_p99_s'] for r in rs], seconds)} | {sum(r['errors'] or 0 for r in rs)} |")
    lines.append("")
    lines.append("- A cell with one seed is a single run; with several, `median [min-max]` over one run per seed (one "
                 "value where every run printed the same); errors are summed.")
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
            pts = sorted((load, statistics.median(r["hit_ratio"] for r in rs),
                          statistics.median(r["ttft_p99_s"] for r in rs))
                         for (w, pol, load), rs in cells(rows).items() if w == n and pol == policy)
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


def merge(old: dict, config: dict, rows: list[dict], offline: dict, commands: list[str]
          ) -> tuple[list[dict], dict, list[str]]:
    """Earlier results plus these runs, which must replay the same trace slice the same way."""
    same = ("trace", "max_requests", "block_tokens", "max_output_tokens")
    if any(old["config"].get(k) != config[k] for k in same):
        sys.exit(f"--append: the earlier results used other {', '.join(same)}")
    def key(r: dict) -> tuple:
        return r["workers"], r["policy"], r["load"], r.get("seed") or 0

    new = {key(r) for r in rows}
    order = {p: i for i, p in enumerate(POLICIES)}
    rows = sorted([r for r in old["runs"] if key(r) not in new] + rows,
                  key=lambda r: (r["workers"], r["load"], order[r["policy"]], r.get("seed") or 0))
    return rows, {**{int(k): v for k, v in old["offline"].items()}, **offline}, old.get("commands", []) + commands


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--shape", choices=["longdoc", "hotdoc"],
                   help="instead of --trace: a synthetic shape (loadgen.shapes, seed 0) of --max-requests lines")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--max-requests", type=int, default=3000)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--wall-rps", type=float, default=15.0,
                   help="requests per wall-clock second each run replays at: the sim's time scale is set per run "
                        "so that client, router and sim fleet keep up on a small machine")
    p.add_argument("--time-scale", type=float, help="fixed simulated seconds per wall-clock second instead")
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, action="append", default=[], help="a prompt seed to run (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="prompt seeds to run; default 0")
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path,
                   help="keep each run's logs and loadgen results (per-request JSONL) here instead of a temp dir")
    p.add_argument("--append", action="store_true",
                   help="merge these runs into --out's results of the same trace slice (a rerun replaces a row)")
    args = p.parse_args()
    if "sglang" in args.policies and shutil.which("python3") and subprocess.run(
            [sys.executable, "-c", "import sglang_router"], capture_output=True).returncode != 0:
        print("sglang-router is not installed (pip install -e '.[bench]'); skipping it", file=sys.stderr)
        args.policies = [x for x in args.policies if x != "sglang"]
    if args.shape:
        from loadgen.shapes import trace_file

        args.trace = trace_file(args.shape, args.max_requests or 1200)
    reqs = load_trace(args.trace, args.max_requests)
    trace_rps = len(reqs) / (((reqs[-1]["timestamp"] - reqs[0]["timestamp"]) / 1000) or 1.0)
    profile = GpuProfile()
    per_worker = per_worker_blocks(profile)
    offline = {}
    for n in args.workers:
        pooled = offline_hit_ratio(reqs, n * per_worker)
        offline[n] = {"capacity_blocks": n * per_worker, "pooled": pooled,
                      "infinite": offline_hit_ratio(reqs, None), "speed_1x": saturation_speed(reqs, n, pooled, profile)}
    seeds = list(dict.fromkeys(args.seed + args.seeds)) or [0]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    commands = [f"python bench/routing_quality.py {' '.join(sys.argv[1:])}"]
    old = None
    if args.append and args.out and (args.out / "routing_quality.json").exists():
        old = json.loads((args.out / "routing_quality.json").read_text())
        for r in old["runs"]:
            r.setdefault("seed", 0)  # runs from before --seed replayed seed 0's prompts
    rows: list[dict] = []

    def write() -> None:
        all_rows, all_offline, all_commands = (merge(old, config, rows, offline, commands) if old is not None
                                               else (rows, offline, commands))
        report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                  "versions": {"python": platform.python_version(), "sglang-router": sglang_version()},
                  "config": config, "commands": all_commands, "offline": all_offline, "runs": all_rows}
        md = markdown(all_rows, all_offline)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "routing_quality.json").write_text(json.dumps(report, indent=2))
            cmds = "\n".join(f"    {c}" for c in all_commands)
            (args.out / "routing_quality.md").write_text(f"Commands:\n\n{cmds}\n\n{md}")
            plot(all_rows, args.out / "routing_quality.png")
        else:
            print(json.dumps(report, indent=2))
        print(md)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            trace = write_requests(args, seed, Path(tmp) / f"requests-{seed}.jsonl")
            for n in args.workers:
                for load in args.loads:
                    for policy in args.policies:
                        speed = offline[n]["speed_1x"] * load
                        time_scale = args.time_scale or args.wall_rps / (trace_rps * speed)
                        r = run_one(trace, n, policy, speed, time_scale, args, Path(tmp))
                        r["load"], r["seed"] = load, seed
                        rows.append(r)
                        print(json.dumps(r), file=sys.stderr, flush=True)
                        if args.out:
                            write()
    if not args.out:
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
