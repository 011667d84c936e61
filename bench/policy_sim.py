"""Offline routing simulation (harness/fleet_sim.py): the router's own policies and worker pool, per-worker
BlockCaches and the sim GPU cost model in one discrete-event loop, no servers. Replays the whole Mooncake
conversation trace in seconds, so policies and their settings can be swept before the live benchmark
(bench/routing_quality.py) confirms them with real processes. Prints JSON lines (stderr) and a markdown
table; `--out FILE.md` writes the table with its command, and FILE.json beside it with every run.

`--seeds S ...` (or `--seed S`, repeatable) runs every cell once per seed. A seed picks the content behind the
trace's hash ids, so it moves every routing key and block chain to another place on the consistent-hash ring (as
another tenant secret or other prompt words would), and seeds the random policy's RNG; seed 0 is the unsalted
key mapping of earlier results. With several seeds each table cell reads `median [min-max]` over the seeds.
`--per-worker` adds each run's per-worker spread (request counts, mean prompt tokens, busy seconds).

  python bench/policy_sim.py --workers 8 32 --loads 0.5 1 2 --seeds 0 1 2
  python bench/policy_sim.py --workers 32 --loads 2 --policies cache_aware --set load_factor=1.1 --per-worker
  python bench/policy_sim.py --shape hotdoc --max-requests 1200 --shape-seed 1 --shape-set hot_share=0.2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import fleet_sim as fs  # noqa: E402
from router.settings import RouterSettings  # noqa: E402
from worker.sim import GpuProfile  # noqa: E402


def seconds(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


METRICS = [("hit_ratio", "hit ratio", "{:.3f}".format), ("pct_pooled", "% of pooled", "{:.0%}".format),
           ("max_mean", "max/mean requests", "{:.2f}".format), ("busy_max_mean", "max/mean busy", "{:.2f}".format),
           ("ttft_p50_s", "TTFT p50 s", seconds), ("ttft_p99_s", "TTFT p99 s", seconds)]


def spread(vals: list[float], fmt) -> str:
    """One value, or `median [min-max]` of several (one value where they all print the same)."""
    lo, mid, hi = fmt(min(vals)), fmt(statistics.median(vals)), fmt(max(vals))
    return mid if lo == hi else f"{mid} [{lo}-{hi}]"


def worker_summary(r: dict) -> dict:
    """The per-worker figures the docs quote: request count range, and the mean prompt of the workers sent the
    most and the fewest requests."""
    pw = r["per_worker"]
    most, fewest = max(pw, key=lambda w: w["requests"]), min(pw, key=lambda w: w["requests"])
    busy = [w["busy_s"] for w in pw]
    return {"requests_min": fewest["requests"], "requests_max": most["requests"],
            "prompt_tokens_of_most": most["mean_prompt_tokens"],
            "prompt_tokens_of_fewest": fewest["mean_prompt_tokens"],
            "busy_min_s": min(busy), "busy_max_s": max(busy)}


# With admission control (--set max_queue_per_worker=Q): refusals, and the pooled cache fed only the admitted
ADMISSION_METRICS = [("refused", "refused (429)", "{:,}".format),
                     ("pct_pooled_admitted", "% of pooled (admitted)", "{:.0%}".format)]


def markdown(rows: list[dict], seeds: list[int], per_worker_blocks: int, per_worker: bool) -> str:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["workers"], r["policy"], r["load"]), []).append(r)
    metrics = METRICS + (ADMISSION_METRICS if any("pct_pooled_admitted" in r for r in rows) else [])
    head = "| workers | policy | load | " + " | ".join(h for _, h, _ in metrics) + " |"
    lines = [head, "|---:|---|---:|" + "---:|" * len(metrics)]
    for (n, policy, load), rs in cells.items():
        vals = " | ".join(spread([r[k] for r in rs], fmt) for k, _, fmt in metrics)
        lines.append(f"| {n} | {policy} | {load}x | {vals} |")
    pooled = {r["workers"]: r["pooled"] for r in rows}
    lines += [""] + [f"- {n} workers: pooled cache of {n * per_worker_blocks} blocks reaches {h:.3f}." for n, h in
                     pooled.items()]
    if len(seeds) > 1:
        lines.append(f"- Seeds {', '.join(map(str, seeds))}: each cell is the median [min-max] over one run per "
                     "seed; a single value means every seed gave it (round_robin and least_loaded never read the keys; "
                     "consistent_hash sends every request of this trace to one worker, whichever it is).")
    if per_worker:
        lines += ["", "Per worker, one entry per seed (" + ", ".join(map(str, seeds)) + "): requests of the workers "
                  "sent the fewest and the most, the mean prompt tokens of those two workers, and busy seconds "
                  "(fewest-most over all workers).", "",
                  "| workers | policy | load | requests | mean prompt tokens, fewest / most | busy s |",
                  "|---:|---|---:|---|---|---|"]
        for (n, policy, load), rs in cells.items():
            ss = [worker_summary(r) for r in rs]
            reqs = ", ".join(f"{s['requests_min']}-{s['requests_max']}" for s in ss)
            prompt = ", ".join(f"{s['prompt_tokens_of_fewest'] / 1000:.1f}k / {s['prompt_tokens_of_most'] / 1000:.1f}k"
                               for s in ss)
            busy = ", ".join(f"{s['busy_min_s']:,.0f}-{s['busy_max_s']:,.0f}" for s in ss)
            lines.append(f"| {n} | {policy} | {load}x | {reqs} | {prompt} | {busy} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=fs.TRACE)
    p.add_argument("--shape", choices=["longdoc", "hotdoc"],
                   help="instead of --trace: a synthetic shape (loadgen.shapes, seed 0) of --max-requests lines")
    p.add_argument("--shape-seed", type=int, default=0, help="the synthetic shape's seed")
    p.add_argument("--shape-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="the synthetic shape's parameters (loadgen.shapes.ShapeParams, JSON values): hot_share=0.2")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin", "least_loaded", "random"])
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--max-requests", type=int)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, action="append", default=[], help="a seed to run (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="seeds to run; default 0")
    p.add_argument("--step-tokens", type=int, help="the engine's token budget per step (default: the sim worker's, "
                   "GpuProfile.max_batch_tokens, in the trace's real tokens)")
    p.add_argument("--per-worker", action="store_true", help="add each run's per-worker spread to the output")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="router settings to override")
    p.add_argument("--out", type=Path, help="markdown file to write the table to (and .json beside it)")
    args = p.parse_args()
    seeds = list(dict.fromkeys(args.seed + args.seeds)) or [0]
    if args.shape:
        from loadgen.shapes import ShapeParams, generate

        shape = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.shape_set)}
        reqs = generate(args.shape, ShapeParams(requests=args.max_requests or 1200, **shape), args.shape_seed)
    else:
        reqs = fs.load_trace(args.trace, args.max_requests)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    profile = GpuProfile()
    per_worker = fs.per_worker_blocks(profile)
    rows = []
    t_start = time.time()
    for n in args.workers:
        pooled = fs.offline_hit_ratio(reqs, n * per_worker)
        speed_1x = fs.saturation_speed(reqs, n, pooled, profile)
        for load in args.loads:
            for policy in args.policies:
                for seed in seeds:
                    s = RouterSettings(workers=[], policy=policy, **overrides)
                    o = fs.simulate(reqs, n, s, speed_1x * load, profile, args.max_output_tokens, seed=seed,
                                    step_tokens=args.step_tokens)
                    row = {"workers": n, "policy": policy, "load": load, "seed": seed, "pooled": pooled,
                           "pct_pooled": o.hit_ratio / pooled, **o.__dict__}
                    admitted = set(row.pop("admitted"))
                    if s.max_queue_per_worker is not None or s.max_queued_tokens_per_worker is not None:
                        pooled_admitted = fs.offline_hit_ratio([r for i, r in enumerate(reqs) if i in admitted],
                                                               n * per_worker)
                        row |= {"pooled_admitted": pooled_admitted,
                                "pct_pooled_admitted": o.hit_ratio / pooled_admitted}
                    rows.append(row)
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_worker"}), file=sys.stderr)
    md = markdown(rows, seeds, per_worker, args.per_worker)
    print(md)
    command = f"python bench/policy_sim.py {' '.join(sys.argv[1:])}"
    if args.out:
        args.out.write_text(f"Command: `{command}`\n\n{md}")
        report = {"command": command, "seeds": seeds, "settings": overrides, "requests": len(reqs),
                  "wall_s": time.time() - t_start, "runs": [{**r, **worker_summary(r)} for r in rows]}
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
