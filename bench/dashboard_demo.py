"""Draws docs/observability.png: a real cluster (redis-server, 4 sim workers, the router, Prometheus scraping
them) under loadgen traffic with a prompt rollout in the middle (prefix version v1 -> v2), then every dashboard
panel from Prometheus' query results (grafana/snapshot.py). Grafana is not installable here; this is what its
panels would show. `python bench/dashboard_demo.py --out docs/observability.png` (about 3 minutes)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.procs import start_redis, start_router, start_sim_workers, stop_process  # noqa: E402
from harness.prom import query, start_prometheus  # noqa: E402

sys.path.insert(0, str(ROOT / "grafana"))
from snapshot import render  # noqa: E402


def rollout(router: str, seconds: float, stop: threading.Event) -> None:
    """Requests on a versioned system prompt: v1 for the first half, then v2 (a cold prefix at first)."""
    t0 = time.time()
    i = 0
    with httpx.Client(base_url=router, timeout=60) as c:
        while not stop.is_set() and time.time() - t0 < seconds:
            v = "v1" if time.time() - t0 < seconds / 2 else "v2"
            body = {"prompt": f"You are assistant {v}. " * 60 + f"Question {i}?", "max_tokens": 8,
                    "metadata": {"prefix_version": v}}
            c.post("/v1/completions", json=body)
            i += 1
            time.sleep(0.3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "observability.png")
    p.add_argument("--seconds", type=float, default=120)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_url, redis = start_redis()
        urls, sim = start_sim_workers(4, "--redis-url", redis_url, "--sim-speedup", "20")
        router, rproc = start_router(urls, "--redis-url", redis_url)
        prom, pproc = start_prometheus({"prefixroute-router": [router.split("://")[1]],
                                        "prefixroute-worker": [u.split("://")[1] for u in urls]}, Path(tmp))
        try:
            start = time.time()
            stop = threading.Event()
            th = threading.Thread(target=rollout, args=(router, args.seconds, stop))
            th.start()
            subprocess.run([sys.executable, "-m", "loadgen", "synth", "hotdoc", "--url", router, "--requests",
                            str(int(args.seconds * 4)), "--rate", "4", "--max-tokens", "16", "--seed", "1",
                            "--doc-tokens", "300", "1500", "--hot-doc-tokens", "1200", "--out",
                            str(Path(tmp) / "run"), "--quiet"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            stop.set()
            th.join()
            time.sleep(3)
            end = time.time()
            n = render(prom, start, end, args.out)
            ratio = query(prom, "prefixroute:hit_ratio:rate5m", at=end)
            print(f"{args.out}: {n} panels with data over {end - start:.0f} s; cluster hit ratio (5 min) "
                  f"{float(ratio[0]['value'][1]):.3f}" if ratio else "")
        finally:
            for proc in (pproc, rproc, sim, redis):
                stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
