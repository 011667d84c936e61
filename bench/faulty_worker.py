"""One bad worker among four: what the router's failover and circuit breaker leave the client to see.

Three runs side by side, each on fresh processes: 3 good sim workers (one process, 3 replicas) and a 4th worker
started as its own process, behind a fresh `cache_aware` router (default settings: breaker on), driven by
`python -m loadgen synth zipf` (open loop, Poisson arrivals) through the router:
- baseline: the 4th worker is good too;
- slow: the 4th waits `--slow-delay-s` (2 s) before scheduling each request (`--fault-delay-s`);
- flaky: the 4th answers `--flaky-error-rate` (0.3) of its requests with an immediate 500 (`--fault-error-rate`).

Per run, from loadgen's per-request results (requests.csv: status, TTFT, serving worker): requests, errors the
client saw, the share of requests the 4th worker served, TTFT p50/p99 of the requests the 3 good workers served
and its p99 over the baseline's p99 of the same 3 workers (target: within 1.2x), failovers; from the router's and
the 4th worker's /metrics: breaker opens and the requests the 4th worker was sent (answered or not).

`--runs` adds `slow_breaker` (the slow worker, the router with `--breaker-slow-s`) and `baseline_repeat` (the
baseline again, last: how far identical runs differ on this machine).

  python bench/faulty_worker.py --out docs/benchmarks
  python bench/faulty_worker.py --runs baseline slow slow_breaker flaky baseline_repeat --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.procs import start_router, start_sim_processes, start_sim_workers, stop_process  # noqa: E402
from loadgen.report import percentile  # noqa: E402

RUNS = ["baseline", "slow", "slow_breaker", "flaky", "baseline_repeat"]


def scrape(url: str, name: str, worker: str | None = None) -> float:
    """The sum of a metric's samples (those labelled worker="..." when `worker` is given)."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and (worker is None or f'worker="{worker}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_one(name: str, fault: list[str], extra: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    procs = []
    log = open(workdir / f"{name}.log", "wb")
    try:
        good, gproc = start_sim_workers(3, "--log-level", "warning", log=log)
        procs.append(gproc)
        (bad, bproc), = start_sim_processes(1, "--log-level", "warning", *fault)
        procs.append(bproc)
        router_args = ["--policy", "cache_aware", "--log-level", "warning", *args.router_arg, *extra]
        router, rproc = start_router([*good, bad], *router_args, log=log)
        procs.append(rproc)
        out = workdir / name
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "loadgen", "synth", "zipf", "--url", router,
                        "--requests", str(args.requests), "--rate", str(args.rate), "--seed", str(args.seed),
                        "--max-tokens", str(args.max_tokens), "--workers", "4", "--out", str(out), "--quiet"],
                       cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=args.run_timeout)
        wall = time.time() - t0
        with open(out / "requests.csv") as f:
            rows = list(csv.DictReader(f))
        ok = [r for r in rows if r["status"] == "200" and not r["error"]]
        good_ttft = [float(r["ttft_s"]) for r in ok if r["worker"] != bad and r["ttft_s"]]
        all_ttft = [float(r["ttft_s"]) for r in ok if r["ttft_s"]]
        return {
            "run": name, "fault": " ".join(fault) or None, "router_args": " ".join(extra) or None,
            "wall_s": round(wall, 1), "requests": len(rows),
            "errors": len(rows) - len(ok),
            "bad_share": sum(r["worker"] == bad for r in ok) / len(ok) if ok else None,
            "bad_sent": int(scrape(bad, "prefixroute_worker_requests_total")),
            "failovers": sum(r["route"] == "failover" for r in ok),
            "breaker_opens": int(scrape(router, "prefixroute_router_breaker_opens_total", bad)),
            "good_requests": len(good_ttft),
            "good_ttft_p50_s": percentile(good_ttft, 50), "good_ttft_p99_s": percentile(good_ttft, 99),
            "all_ttft_p50_s": percentile(all_ttft, 50), "all_ttft_p99_s": percentile(all_ttft, 99),
        }
    finally:
        for p in reversed(procs):
            stop_process(p)
        log.close()


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| run | 4th worker | requests | client errors | served by the 4th | sent to the 4th | failovers | "
             "breaker opens | good workers' TTFT p50 ms | p99 ms | p99 / baseline p99 | all TTFT p50 ms | p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r.get("good_p99_ratio")
        bad = (r["fault"] or "good") + (f" (router {r['router_args']})" if r.get("router_args") else "")
        lines.append(f"| {r['run']} | {bad} | {r['requests']} | {r['errors']} | "
                     f"{r['bad_share']:.1%} | {r['bad_sent']} | {r['failovers']} | {r['breaker_opens']} | "
                     f"{ms(r['good_ttft_p50_s'])} | {ms(r['good_ttft_p99_s'])} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {ms(r['all_ttft_p50_s'])} | "
                     f"{ms(r['all_ttft_p99_s'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=360)
    p.add_argument("--rate", type=float, default=12.0, help="requests per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow-delay-s", type=float, default=2.0)
    p.add_argument("--flaky-error-rate", type=float, default=0.3)
    p.add_argument("--runs", nargs="+", default=["baseline", "slow", "flaky"], choices=RUNS,
                   help="slow_breaker: the slow worker with the router's --breaker-slow-s; baseline_repeat: the "
                        "baseline again, last (how much the figures move between identical runs)")
    p.add_argument("--breaker-slow-s", type=float, default=1.0, help="the router's, in the slow_breaker run")
    p.add_argument("--router-arg", action="append", default=[],
                   help="an extra router flag for every run, e.g. --router-arg=--breaker-slow-s=1 (repeatable)")
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path, help="keep each run's logs and loadgen results here")
    args = p.parse_args()
    slow = ["--fault-delay-s", str(args.slow_delay_s)]
    runs = {"baseline": ([], []), "slow": (slow, []),
            "slow_breaker": (slow, ["--breaker-slow-s", str(args.breaker_slow_s)]),
            "flaky": (["--fault-error-rate", str(args.flaky_error_rate)], []), "baseline_repeat": ([], [])}
    command = f"python bench/faulty_worker.py {' '.join(sys.argv[1:])}".rstrip()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.runs:
            r = run_one(name, *runs[name], args, tmp)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["run"] == "baseline"), None)
    for r in rows:
        if base and base["good_ttft_p99_s"] and r["good_ttft_p99_s"] is not None:
            r["good_p99_ratio"] = r["good_ttft_p99_s"] / base["good_ttft_p99_s"]
    report = {"command": command, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": rows}
    md = markdown(rows)
    print(json.dumps(report, indent=2))
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "faulty_worker.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "faulty_worker.md").write_text(
            f"Command: `{command}`\n\nMachine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs\n\n"
            f"{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
