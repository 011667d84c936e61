"""prefixroute in front of real vLLM servers: the same synthetic workload (Zipf-popular shared system prompts,
`loadgen synth zipf`) through prefixroute's `cache_aware` and `round_robin` policies, `cache_aware` with its
per-key spill off, and (with --sglang) SGLang's cache_aware router, over two vLLM CPU servers, side by side in
one run.

Hit ratio comes from vLLM's own counters (prefix_cache_hits / prefix_cache_queries, the deltas over each run),
so every router is measured the same way, and so is balance (max/mean of vLLM's own request counts); TTFT from
loadgen. Before each run both vLLM servers drop their prefix caches (POST /reset_prefix_cache, vLLM's dev-mode
endpoint), so no run inherits another's cache, and each router first answers one request (so none is timed
while it is still finding its workers). Policies alternate over `--passes` rounds (this machine is
noisy: compare ratios).

  python bench/engines.py --requests 120 --rate 3 --passes 3 --sglang --out docs/benchmarks/engines

Needs vLLM's CPU build (deploy/vllm.sh installs it into .venv-vllm). Prints JSON and a markdown table; --out DIR
writes engines.json and engines.md there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.procs import start_router, start_vllm, stop_process, vllm_python  # noqa: E402
from harness.results import publish  # noqa: E402
from protocol.engines import VLLM, parse  # noqa: E402

MODEL = "smollm2"


# Router variants, each a router module and its flags: prefixroute's policies, prefixroute's cache_aware with its
# per-key spill off (to show what the spill costs and buys), and SGLang's cache_aware router.
VARIANTS = {"cache_aware": ("router", ("--policy", "cache_aware")),
            "round_robin": ("router", ("--policy", "round_robin")),
            "cache_aware_no_spill": ("router", ("--policy", "cache_aware", "--spill-rpm", "1000000"))}
SGLANG = "sglang_cache_aware"
SGLANG_VARIANT = ("sglang_router.launch_router", ("--policy", "cache_aware"))


def counters(urls: list[str]) -> dict[str, dict[str, int]]:
    return {u: parse(httpx.get(u + "/metrics", timeout=10).text, VLLM).counters for u in urls}


def wait_routing(router: str, timeout: float = 60.0) -> None:
    """Until the router answers a request: SGLang's answers /health before its own checks have found the workers
    (measured: half of the first requests refused with 503 no_available_workers), and no router is timed before."""
    deadline = time.monotonic() + timeout
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1}
    while httpx.post(router + "/v1/chat/completions", json=body, timeout=60).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{router} routes no request after {timeout:.0f} s")
        time.sleep(1)


def run_once(router: str, urls: list[str], args: argparse.Namespace, seed: int, tmp: Path) -> dict:
    for u in urls:
        r = httpx.post(u + "/reset_prefix_cache", timeout=30)
        r.raise_for_status()
    before = counters(urls)
    out = tmp / f"run-{time.monotonic_ns()}"
    subprocess.run([sys.executable, "-m", "loadgen", "synth", "zipf", "--url", router, "--model", MODEL,
                    "--requests", str(args.requests), "--rate", str(args.rate), "--prompts", str(args.prompts),
                    "--max-tokens", str(args.max_tokens), "--seed", str(seed), "--workers", str(len(urls)),
                    "--out", str(out), "--quiet"], cwd=ROOT, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    after = counters(urls)
    d = {k: sum(after[u].get(k, 0) - before[u].get(k, 0) for u in urls) for k in after[urls[0]]}
    served = [after[u].get("requests", 0) - before[u].get("requests", 0) for u in urls]  # vLLM's own count
    s = json.loads((out / "summary.json").read_text())  # one run: its summary
    with open(out / "requests.csv", newline="") as f:
        messages = Counter(row["error"] for row in csv.DictReader(f) if row["error"])
    return {"seed": seed, "ok": s["ok"], "errors": s["errors"], "errors_by_status": s["errors_by_status"],
            "error_messages": dict(messages.most_common(3)),
            "vllm_hit_ratio": d["cached_tokens"] / d["cache_queries"] if d.get("cache_queries") else None,
            "vllm_cached_tokens": d.get("cached_tokens"), "vllm_queried_tokens": d.get("cache_queries"),
            "client_cached_ratio": s["cached_token_ratio"], "ttft_p50_s": s["ttft_p50_s"],
            "ttft_p99_s": s["ttft_p99_s"], "e2e_p50_s": s["e2e_p50_s"], "vllm_requests": served,
            "max_mean_load": max(served) / (sum(served) / len(served)) if sum(served) else None}


def median(rows: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def markdown(result: dict) -> str:
    lines = ["| router | vLLM hit ratio (hits/queries) | TTFT p50 | TTFT p99 | e2e p50 | max/mean requests (vLLM's) "
             "| ok |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in result["runs"].items():
        m = {k: median(rows, k) for k in ("vllm_hit_ratio", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s",
                                           "max_mean_load")}
        lines.append(f"| {name} | {m['vllm_hit_ratio']:.3f} | {m['ttft_p50_s'] * 1000:.0f} ms | "
                     f"{m['ttft_p99_s'] * 1000:.0f} ms | {m['e2e_p50_s'] * 1000:.0f} ms | {m['max_mean_load']:.2f} | "
                     f"{sum(r['ok'] for r in rows)}/{sum(r['ok'] + r['errors'] for r in rows)} |")
    ca = result["runs"].get("cache_aware")
    for other in ("round_robin", "cache_aware_no_spill", SGLANG):
        base = result["runs"].get(other)
        if not (ca and base):
            continue

        def r(key: str) -> float:
            return median(ca, key) / median(base, key)

        lines += ["", f"cache_aware / {other} (medians): hit ratio {r('vllm_hit_ratio'):.3f}x, "
                  f"TTFT p50 {r('ttft_p50_s'):.2f}x, TTFT p99 {r('ttft_p99_s'):.2f}x, e2e p50 {r('e2e_p50_s'):.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--rate", type=float, default=3.0, help="requests per second (Poisson)")
    p.add_argument("--prompts", type=int, default=8, help="distinct system prompts (Zipf-popular)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--kv-gib", type=int, default=1, help="each vLLM server's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--sglang", action="store_true", help="also SGLang's router (pip install -e '.[bench]')")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    python = vllm_python()
    procs = []
    result: dict = {"command": "python bench/engines.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": {}}
    variants = {**VARIANTS, **({SGLANG: SGLANG_VARIANT} if args.sglang else {})}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        try:
            urls = []
            for i in range(2):
                u, proc = start_vllm(python, MODEL, kv_gib=args.kv_gib, log=open(tmp / f"vllm{i}.log", "wb"))
                procs.append(proc)
                urls.append(u)
            for n in range(args.passes):
                for policy, (module, flags) in variants.items():
                    router, rp = start_router(urls, *flags, module=module)
                    try:
                        wait_routing(router)
                        row = run_once(router, urls, args, seed=n, tmp=tmp)
                    finally:
                        stop_process(rp)
                    result["runs"].setdefault(policy, []).append(row)
                    print(json.dumps({"pass": n, "policy": policy, **row}), file=sys.stderr)
        finally:
            for proc in procs:
                stop_process(proc)
    publish(result, markdown(result), args.out, "engines", f"`{result['command']}` on {result['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
