"""Statistics of a run (percentiles, cached-token ratio, per-worker balance), and its files: summary.json,
requests.csv, summary.md and PNG plots (TTFT CDF, hit ratio over time, requests per worker)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from loadgen.replay import Result


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def load_balance(workers: list[str], fleet_size: int | None = None
                 ) -> tuple[float | None, dict[str, int] | None, int | None]:
    """Max/mean requests per worker over the whole fleet: (max_mean_load, requests per worker, workers counted).

    `workers` names the serving worker of each successful request ("" when the response carried no
    `x-prefixroute-worker` header). Workers that got no request count in the mean when `fleet_size` is given
    (without it, only the workers seen are known, so the figure is a lower bound; workers seen beyond
    `fleet_size`, as when one joined during the run, count too). Unknown (None, None, None) when no request
    names its worker, or when some do not: a request without the header (e.g. sent through another router)
    may have gone to any worker, whether or not the fleet size is known."""
    named = [w for w in workers if w]
    if not named or len(named) < len(workers):
        return None, None, None
    counts = Counter(named)
    n = max(len(counts), fleet_size or 0)  # a fleet that grew during the run: every worker seen counts
    return max(counts.values()) / (len(named) / n), dict(sorted(counts.items())), n


def summarize(results: list[Result], wall_s: float, workers: int | None = None) -> dict[str, Any]:
    """Statistics of one run. `workers` is the fleet size behind the URL, when known: workers that served no
    request then count in max/mean load. Max/mean load and per_worker are None (unknown) when successful
    requests lack the `x-prefixroute-worker` header (see `load_balance`)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [x for r in ok for x in r.itls]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    out_tokens = sum(r.completion_tokens for r in ok)
    max_mean, counts, counted = load_balance([r.worker for r in ok], workers)
    per_worker: dict[str, dict[str, float]] | None = None
    if counts is not None:
        by_worker: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0,
                                                                       "cached_tokens": 0})
        for r in ok:
            w = by_worker[r.worker]
            w["requests"] += 1
            w["prompt_tokens"] += r.prompt_tokens
            w["cached_tokens"] += r.cached_tokens
        per_worker = {}
        for name, w in sorted(by_worker.items()):
            per_worker[name] = {**w, "request_share": w["requests"] / len(ok),
                                "prompt_token_share": w["prompt_tokens"] / prompt if prompt else 0.0,
                                "cached_token_ratio":
                                    w["cached_tokens"] / w["prompt_tokens"] if w["prompt_tokens"] else 0.0}
    summary: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": sum(1 for r in results if not r.ok and not r.refused),
        "errors_by_status": dict(Counter(str(r.status) for r in results if not r.ok and not r.refused)),
        "refused": sum(1 for r in results if r.refused),  # 429: admission control said no, with Retry-After
        "refused_without_retry_after": sum(1 for r in results if r.refused and not r.retry_after),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens_per_s": out_tokens / wall_s if wall_s else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": out_tokens,
        "cached_token_ratio": cached / prompt if prompt else 0.0,
        "fleet_size": workers,
        "workers_counted": counted,  # the mean's denominator; only the workers seen when fleet_size is None
        "requests_without_worker": sum(1 for r in ok if not r.worker),
        "max_mean_load": max_mean,
        "per_worker": per_worker,
        "routes": dict(Counter(r.route for r in ok if r.route)),
    }
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            summary[f"{name}_p{p}_s"] = percentile(xs, p)
    # Open loop: the client's own lag behind the schedule (every request sent; None in closed loop). TTFT counts
    # from the send, so a run whose lag is not small against its TTFT understates what clients would see.
    late = [r.late_s for r in results if r.late_s is not None]
    summary["send_late_p50_s"], summary["send_late_p99_s"] = percentile(late, 50), percentile(late, 99)
    summary["send_late_max_s"] = max(late, default=None)
    return summary


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.1f}"

    lines = ["| run | requests | errors | cached ratio | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | e2e p50 ms | "
             "max/mean load | req/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        mm = "unknown" if s.get("max_mean_load") is None else f"{s['max_mean_load']:.2f}"
        lines.append(f"| {name} | {s['requests']} | {s['errors']} | {s['cached_token_ratio']:.3f} | "
                     f"{ms(s['ttft_p50_s'])} | {ms(s['ttft_p99_s'])} | {ms(s['itl_p50_s'])} | {ms(s['e2e_p50_s'])} | "
                     f"{mm} | {s['throughput_rps']:.1f} |")
    return "\n".join(lines) + "\n"


def write_csv(results: list[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "sent_s", "status", "ttft_s", "e2e_s", "itl_mean_s", "prompt_tokens", "cached_tokens",
                    "completion_tokens", "worker", "route", "error"])
        for r in results:
            itl = sum(r.itls) / len(r.itls) if r.itls else None
            w.writerow([r.index, f"{r.sent_s:.6f}", r.status, r.ttft_s, r.e2e_s, itl, r.prompt_tokens,
                        r.cached_tokens, r.completion_tokens, r.worker, r.route, r.error or ""])


def plot(runs: dict[str, list[Result]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in runs.items():
        xs = sorted(r.ttft_s for r in res if r.ok and r.ttft_s is not None)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set(xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF", xscale="log")
    files.append(_save(fig, ax, out / "ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in runs.items():
        ok = [r for r in res if r.ok]
        if not ok:
            continue
        span = max(r.sent_s for r in ok) or 1.0
        buckets = 20
        pt, ct = [0] * buckets, [0] * buckets
        for r in ok:
            b = min(buckets - 1, int(r.sent_s / span * buckets))
            pt[b] += r.prompt_tokens
            ct[b] += r.cached_tokens
        ax.plot([(b + 0.5) * span / buckets for b in range(buckets)], [c / p if p else 0 for c, p in zip(ct, pt)],
                label=name)
    ax.set(xlabel="time (s)", ylabel="cached / prompt tokens", title="Hit ratio over time", ylim=(0, 1))
    files.append(_save(fig, ax, out / "hit_ratio.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(runs))
    for k, (name, res) in enumerate(runs.items()):
        counts = Counter(r.worker for r in res if r.ok and r.worker)  # unnamed workers: unknown, not drawn
        names = sorted(counts)
        ax.bar([i + k * width for i in range(len(names))], [counts[n] for n in names], width, label=name)
    ax.set(xlabel="worker", ylabel="requests", title="Requests per worker")
    files.append(_save(fig, ax, out / "load_per_worker.png"))
    return files


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(out: Path, runs: dict[str, list[Result]], summaries: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if len(summaries) == 1:
        (name, s), = summaries.items()
        (out / "summary.json").write_text(json.dumps(s, indent=2))
        write_csv(runs[name], out / "requests.csv")
    else:
        (out / "summary.json").write_text(json.dumps(summaries, indent=2))
        for name, res in runs.items():
            write_csv(res, out / f"requests-{name}.csv")
    (out / "summary.md").write_text(markdown(summaries))
    plot(runs, out)
