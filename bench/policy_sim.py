"""Offline routing simulation (harness/fleet_sim.py): the router's own policies and worker pool, per-worker
BlockCaches and the sim GPU cost model in one discrete-event loop, no servers. Replays the whole Mooncake
conversation trace in seconds, so policies and their settings can be swept before the live benchmark
(bench/routing_quality.py) confirms them with real processes. Prints JSON lines (stderr) and a markdown
table; `--out FILE` writes the table with its command.

  python bench/policy_sim.py --workers 8 32 --loads 0.5 1 2
  python bench/policy_sim.py --workers 32 --set load_factor=1.1 load_slack=2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import fleet_sim as fs  # noqa: E402
from router.settings import RouterSettings  # noqa: E402
from worker.sim import GpuProfile  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=fs.TRACE)
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin", "least_loaded", "random"])
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--max-requests", type=int)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="router settings to override")
    p.add_argument("--out", type=Path, help="markdown file to write the table to")
    args = p.parse_args()
    reqs = fs.load_trace(args.trace, args.max_requests)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    profile = GpuProfile()
    per_worker = fs.per_worker_blocks(profile)
    rows = []
    for n in args.workers:
        pooled = fs.offline_hit_ratio(reqs, n * per_worker)
        speed_1x = fs.saturation_speed(reqs, n, pooled, profile)
        for load in args.loads:
            for policy in args.policies:
                s = RouterSettings(workers=[], policy=policy, **overrides)
                o = fs.simulate(reqs, n, s, speed_1x * load, profile, args.max_output_tokens)
                rows.append({"workers": n, "policy": policy, "load": load, "pooled": pooled,
                             "pct_pooled": o.hit_ratio / pooled, **o.__dict__})
                print(json.dumps(rows[-1]), file=sys.stderr)
    lines = ["| workers | policy | load | hit ratio | % of pooled | max/mean requests | max/mean busy | TTFT p50 s "
             "| TTFT p99 s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['policy']} | {r['load']}x | {r['hit_ratio']:.3f} | "
                     f"{100 * r['pct_pooled']:.0f}% | {r['max_mean']:.2f} | {r['busy_max_mean']:.2f} | "
                     f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} |")
    pooled = {r["workers"]: r["pooled"] for r in rows}
    lines += [""] + [f"- {n} workers: pooled cache of {n * per_worker} blocks reaches {h:.3f}." for n, h in
                     pooled.items()]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.write_text(f"Command: `python bench/policy_sim.py {' '.join(sys.argv[1:])}`\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
