"""Overload with and without admission control: an open-loop replay at `--load` (default 2x) times the rate that
keeps the sim fleet just below saturation, through `cache_aware` with no bound, with `--max-queue-per-worker Q`
(requests in flight) and with `--max-queued-tokens-per-worker T` (prompt tokens queued for prefill), side by side
in one invocation, on 8 and 32 sim workers; `--hold on off` runs each bound with and without hold_for_cache.

Without admission every worker's queue grows until the replay ends; with it, the router keeps each worker within
its bound, lets a request wait up to `--queue-wait-s` (simulated seconds) for room and then answers 429 with
Retry-After (loadgen counts those as refused, not as errors). Per run: TTFT p50/p99 of the admitted requests,
refusals (and any without Retry-After), errors, the workers' hit ratio against a pooled cache of the fleet's size
fed the same admitted requests (and all requests), max/mean requests and engine-busy seconds per worker. Targets
(issue 13): admitted TTFT p99 bounded, hit ratio >= 90% of pooled, max/mean requests <= 1.25, every refusal a 429
with Retry-After.

The live machinery is bench/routing_quality.py's (`run_one`: sim fleet, router, `loadgen replay`), so cells are
comparable with docs/benchmarks' routing-quality runs.

  python bench/overload.py --workers 8 32 --queues 16 --tokens 100000 --max-requests 2000 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from routing_quality import git_state, run_one, seconds, write_requests  # noqa: E402

from harness.fleet_sim import TRACE, TRACE_BLOCK, load_trace, offline_hit_ratio, per_worker_blocks, saturation_speed  # noqa: E402
from harness.results import publish  # noqa: E402
from worker.sim import GpuProfile  # noqa: E402


def admitted_indices(out: Path) -> set[int]:
    with open(out / "requests.csv") as f:
        return {int(row["index"]) for row in csv.DictReader(f) if row["status"] == "200"}


def measure(r: dict, reqs: list[dict], capacity: int, pooled_all: float, bound: str | None, hold: str,
            args: argparse.Namespace) -> dict:
    admitted = admitted_indices(Path(r.pop("out")))
    pooled_admitted = offline_hit_ratio([x for i, x in enumerate(reqs) if i in admitted], capacity)
    r.update(load=args.load, seed=args.seed, bound=bound, hold_for_cache=hold, admitted=len(admitted),
             pooled_all=pooled_all, pooled_admitted=pooled_admitted,
             queue_wait_s_simulated=args.queue_wait_s if bound is not None else None)
    print(json.dumps(r), file=sys.stderr, flush=True)
    return r


def markdown(rows: list[dict]) -> str:
    lines = ["| workers | load | admission | requests | admitted | refused (429) | without Retry-After | errors "
             "| TTFT p50 s | TTFT p99 s | hit ratio | % of pooled (admitted) | % of pooled (all) "
             "| max/mean requests | max/mean busy |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = "off" if r["bound"] is None else f"{r['bound']}, hold {r['hold_for_cache']}"
        lines.append(f"| {r['workers']} | {r['load']}x | {q} | {r['requests']} | {r['admitted']} | {r['refused']} | "
                     f"{r['refused_without_retry_after']} | {r['errors']} | {seconds(r['ttft_p50_s'])} | "
                     f"{seconds(r['ttft_p99_s'])} | {r['hit_ratio']:.3f} | {r['hit_ratio'] / r['pooled_admitted']:.0%}"
                     f" | {r['hit_ratio'] / r['pooled_all']:.0%} | {r['max_mean']:.2f} | {r['busy_max_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--shape", choices=["longdoc", "hotdoc"], help="a synthetic shape instead of --trace")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--load", type=float, default=2.0)
    p.add_argument("--queues", type=int, nargs="*", default=[], help="max_queue_per_worker values to run")
    p.add_argument("--tokens", type=int, nargs="*", default=[100_000],
                   help="max_queued_tokens_per_worker values to run, in the trace's tokens (the router, which sees "
                        "prompts scaled by --block-tokens / 512, gets them scaled alike)")
    p.add_argument("--queue-wait-s", type=float, default=3.0, help="in simulated seconds")
    p.add_argument("--hold", nargs="+", choices=["on", "off"], default=["on"],
                   help="hold_for_cache modes to run for each queue bound (off: --no-hold-for-cache)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without admission control")
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--wall-rps", type=float, default=20.0)
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path, help="keep each run's logs and loadgen results here")
    args = p.parse_args()
    if args.shape:
        from loadgen.shapes import trace_file

        args.trace = trace_file(args.shape, args.max_requests)
    reqs = load_trace(args.trace, args.max_requests)
    trace_rps = len(reqs) / (((reqs[-1]["timestamp"] - reqs[0]["timestamp"]) / 1000) or 1.0)
    profile = GpuProfile()
    per_worker = per_worker_blocks(profile)
    rows: list[dict] = []
    command = f"python bench/overload.py {' '.join(sys.argv[1:])}"
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        trace = write_requests(args, args.seed, Path(tmp) / "requests.jsonl")
        for n in args.workers:
            pooled_all = offline_hit_ratio(reqs, n * per_worker)
            speed = saturation_speed(reqs, n, pooled_all, profile) * args.load
            time_scale = args.wall_rps / (trace_rps * speed)
            bounds: list[tuple[str, int] | None] = [] if args.no_baseline else [None]
            bounds += [("requests", q) for q in args.queues] + [("tokens", t) for t in args.tokens]
            scale = args.block_tokens / TRACE_BLOCK
            for bound in bounds:
                for hold in ["-"] if bound is None else args.hold:
                    if bound is None:
                        extra: tuple[str, ...] = ()
                    else:
                        kind, value = bound
                        flag = ("--max-queue-per-worker", str(value)) if kind == "requests" else \
                            ("--max-queued-tokens-per-worker", str(max(1, round(value * scale))))
                        extra = (*flag, "--queue-wait-s", str(args.queue_wait_s / time_scale),
                                 *(("--no-hold-for-cache",) if hold == "off" else ()))
                    q = None if bound is None else f"{bound[1]} {bound[0]}"
                    r = run_one(trace, n, "cache_aware", speed, time_scale, args, Path(tmp), extra,
                                tag="" if bound is None else f"-{bound[0][0]}{bound[1]}-{hold}")
                    rows.append(measure(r, reqs, n * per_worker, pooled_all, q, hold, args))
    report = {"command": command, "git": git_state(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": rows}
    publish(report, markdown(rows), args.out, "overload",
            f"Command: `{command}` ({report['machine']['cpus']} CPUs, {report['machine']['platform']}, "
            f"git {report['git']})",
            "TTFT is over admitted requests (refused ones get their 429 within the queue wait). `% of pooled "
            "(admitted)` compares the workers' hit ratio with one pooled cache of the fleet's size fed the "
            "admitted requests in order; `(all)` with the whole replay. The queue wait is given in simulated "
            "seconds (the router gets it divided by the run's time scale).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
