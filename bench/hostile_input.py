"""Hostile input at volume: the generators of tests/integration/test_hostile_input.py (harness.hostile) for
`--requests` requests (default 10,000), half to a router (one tenant, so auth is on) and half to the sim worker
behind it, directly. Reports requests by kind, status counts (overall and by kind), 5xx count, answers that break
the contract (5xx, a 4xx without an OpenAI JSON error body, the wrong status or code for a kind that fixes one),
and the RSS of router and worker before, during (after each tenth) and after. Both servers must stay healthy.

Prints JSON, then a markdown table; `--out DIR` writes hostile_input.{json,md}.

  python bench/hostile_input.py [--requests 10000] [--threads 4] [--seed 0] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.hostile import Config, Result, Summary, Target, draw_cases, run_all  # noqa: E402
from harness.procs import start_router, start_sim_workers, stop_process  # noqa: E402


def limit_flags(cfg: Config) -> list[str]:
    return ["--max-json-depth", str(cfg.max_json_depth), "--max-header-bytes", str(cfg.max_header_bytes),
            "--body-timeout-s", str(cfg.body_timeout_s), "--max-tokens-limit", str(cfg.max_tokens_limit),
            "--max-prompt-tokens", str(cfg.max_prompt_tokens)]


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config()
    t0 = time.monotonic()
    batch = draw_cases(cfg, args.requests, seed=args.seed)
    gen_s = time.monotonic() - t0
    os.environ["PREFIXROUTE_WORKER_MAX_BODY_BYTES"] = str(cfg.max_body_bytes)
    workers, wproc = start_sim_workers(1, "--sim-speedup", "100", *limit_flags(cfg))
    rproc = None
    try:
        tenants = json.dumps([{"id": "hostile", "api_key": cfg.api_key, "secret": "hostile-secret"}])
        env = {"PREFIXROUTE_ROUTER_TENANTS": tenants, "PREFIXROUTE_ROUTER_MAX_BODY_BYTES": str(cfg.max_body_bytes)}
        router, rproc = start_router(workers, "--request-time-limit-s", "20", "--log-level", "warning",
                                     *limit_flags(cfg), env=env)
        procs = {"router": psutil.Process(rproc.pid), "worker": psutil.Process(wproc.pid)}
        targets = [Target("router", router, cfg.api_key), Target("worker", workers[0])]
        warm = [c for c in batch if c.kind == "valid"][:4] * 5
        run_all(targets, warm, threads=2)
        rss = {name: [p.memory_info().rss] for name, p in procs.items()}
        results: list[Result] = []
        tenth = max(1, len(batch) // 10)
        t1 = time.monotonic()
        for i in range(0, len(batch), tenth):
            results += run_all(targets, batch[i:i + tenth], threads=args.threads)
            for name, p in procs.items():
                rss[name].append(p.memory_info().rss)
        send_s = time.monotonic() - t1
        healthy = {name: httpx.get(url + "/health", timeout=5).status_code == 200
                   for name, url in (("router", router), ("worker", workers[0]))}
    finally:
        if rproc is not None:
            stop_process(rproc)
        stop_process(wproc)
    s = Summary.of(results)
    by_target: dict[str, dict[str, int]] = {}
    for r in results:
        st = "none" if r.status is None else str(r.status)
        by_target.setdefault(r.target, {}).setdefault(st, 0)
        by_target[r.target][st] += 1
    return {
        "requests": s.requests, "generate_s": round(gen_s, 1), "send_s": round(send_s, 1),
        "requests_per_s": round(s.requests / send_s, 1) if send_s else None,
        "by_kind": dict(sorted(s.by_kind.items())),
        "by_status": dict(sorted(s.by_status.items())),
        "by_target_status": {t: dict(sorted(v.items())) for t, v in by_target.items()},
        "by_kind_status": {k: dict(sorted(v.items())) for k, v in sorted(s.by_kind_status.items())},
        "server_errors_5xx": s.server_errors,
        "contract_violations": len(s.problems),
        "violations_sample": s.problems[:20],
        "healthy_after": healthy,
        "rss_mib": {name: {"before": mib(v[0]), "after": mib(v[-1]), "max": mib(max(v)),
                           "per_tenth": [mib(x) for x in v[1:]]} for name, v in rss.items()},
        "limits": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "api_key"},
    }


def markdown(r: dict[str, Any]) -> str:
    statuses = sorted({st for v in r["by_kind_status"].values() for st in v}, key=lambda x: (x == "none", x))
    lines = [f"{r['requests']} requests ({r['requests_per_s']}/s, {r['send_s']} s), 5xx: **{r['server_errors_5xx']}**, "
             f"contract violations: **{r['contract_violations']}**, healthy after: {r['healthy_after']}", "",
             "| kind | requests | " + " | ".join(statuses) + " |",
             "|---|---:|" + "---:|" * len(statuses)]
    for kind, counts in r["by_kind_status"].items():
        lines.append(f"| {kind} | {r['by_kind'][kind]} | " + " | ".join(str(counts.get(st, "")) for st in statuses)
                     + " |")
    total = r["by_status"]
    lines.append(f"| **all** | {r['requests']} | " + " | ".join(str(total.get(st, "")) for st in statuses) + " |")
    lines += ["", "`none`: no answer, as intended (a truncated body: the client closed first).", "",
              "| process | RSS before (MiB) | after | max | after each tenth |", "|---|---:|---:|---:|---|"]
    for name, m in r["rss_mib"].items():
        lines.append(f"| {name} | {m['before']} | {m['after']} | {m['max']} | {', '.join(map(str, m['per_tenth']))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=4, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed of the generated requests")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = run(args)
    report = {"command": f"python bench/hostile_input.py {' '.join(sys.argv[1:])}",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}, **result}
    md = markdown(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hostile_input.json").write_text(json.dumps(report, indent=2))
        m = report["machine"]
        (args.out / "hostile_input.md").write_text(
            f"Command: `{report['command']}`\n\nMachine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}\n\n"
            f"{md}\n")
    print(json.dumps(report, indent=2))
    print(md)
    return 0 if result["server_errors_5xx"] == 0 and all(result["healthy_after"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
