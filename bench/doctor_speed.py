"""How long the prefix doctor (loadgen.doctor) takes: load and tokenize a log, analyze it (ceiling, findings,
ceiling fixed), and estimate cache_aware's ratio on 8 workers (policy.policy_ratio), on the Mooncake conversation
trace (../shared/traces) and on a built 10,000-request loadgen log: Zipf system prompts, RAG documents,
multi-turn chats and chats with each prefix-cache killer, from three tenants (API keys), prompts of ~200-3000
tokens. Prints JSON and a markdown table; `--out DIR` writes DIR/doctor_speed.json and DIR/doctor_speed.md.

  python bench/doctor_speed.py [--requests 10000] [--workers 8] [--out /tmp/doctor_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from loadgen.doctor import cli  # noqa: E402
from loadgen.synth import generate  # noqa: E402
from protocol.modelfiles import resolve_model_path  # noqa: E402

MOONCAKE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
SPAN_S = 3600.0  # every stream of the built log spreads over the same hour
# (share of the log, generate() kind, its arguments, tenant API key)
MIX: list[tuple[float, str, dict[str, Any], str]] = [
    (0.25, "zipf", {"prompt_words": 200, "prompts": 40}, "sk-bench-alpha"),
    (0.20, "rag", {"prompt_words": 2800, "prompts": 60}, "sk-bench-beta"),
    (0.20, "multiturn", {"prompt_words": 800, "prompts": 30}, "sk-bench-alpha"),
    (0.10, "killers", {"killer": "timestamp"}, "sk-bench-gamma"),
    (0.10, "killers", {"killer": "username"}, "sk-bench-gamma"),
    (0.10, "killers", {"killer": "tools"}, "sk-bench-beta"),
    (0.05, "killers", {"killer": "clean"}, "sk-bench-gamma"),
]


def build_log(path: Path, requests: int) -> None:
    """A loadgen request JSONL of `requests` requests, the MIX's streams interleaved by arrival time."""
    counts = [int(share * requests) for share, *_ in MIX]
    counts[0] += requests - sum(counts)
    recs = []
    for seed, (n, (_, kind, kw, key)) in enumerate(zip(counts, MIX, strict=True)):
        for r in generate(kind, n, n / SPAN_S, seed=100 + seed, **kw):
            d = r.model_dump()
            d["body"]["_api_key"] = key
            recs.append(d)
    recs.sort(key=lambda d: d["timestamp"])
    path.write_text("".join(json.dumps(d) + "\n" for d in recs))


def measure(name: str, path: Path, workers: int) -> dict[str, Any]:
    """`python -m loadgen analyze PATH --workers N --policy cache_aware`, in this process, timed by stage."""
    t0 = time.perf_counter()
    a = cli.run(cli.parse([str(path), "--workers", str(workers), "--policy", "cache_aware"]))
    total = time.perf_counter() - t0
    pol = a.policy[0]
    s = a.seconds
    return {"log": name, "path": str(path), "source": a.source, "requests": a.requests,
            "prompt_tokens": a.prompt_tokens, "tokenize_s": s.get("tokenize", 0.0), "analyze_s": s["analyze"],
            "policy_s": s["policy"], "load_tokenizer_s": s.get("load_tokenizer", 0.0),
            "total_s": total,
            "ceiling": a.ceiling, "ceiling_fixed": a.ceiling_fixed, "findings": len(a.findings),
            "policy": {k: pol[k] for k in ("workers", "policy", "ratio", "pooled", "infinite", "block_tokens")}}


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    out = ["# Prefix doctor speed", "", f"`{doc['command']}`  ", f"{m['platform']}, {m['cpus']} CPUs, Python "
           f"{m['python']}; tokenizer {doc['tokenizer']}; policy: cache_aware on {doc['workers']} workers", "",
           "| log | requests | prompt tokens | tokenize s | analyze s | policy s | total s | ceiling | ceiling fixed "
           "| findings | cache_aware ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        out.append(f"| {r['log']} | {r['requests']:,} | {r['prompt_tokens']:,} | {r['tokenize_s']:.1f} | "
                   f"{r['analyze_s']:.1f} | {r['policy_s']:.1f} | {r['total_s']:.1f} | {r['ceiling']:.3f} | "
                   f"{r['ceiling_fixed']:.3f} | {r['findings']} | {r['policy']['ratio']:.3f} |")
    out += ["", "total s = `python -m loadgen analyze LOG --workers N --policy cache_aware` end to end in one process: "
            "loading the tokenizer (none for a Mooncake trace), reading, parsing and tokenizing the log, the analysis "
            "and the policy simulation."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests in the built loadgen log")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--trace", type=Path, default=MOONCAKE, help="the Mooncake trace")
    p.add_argument("--out", type=Path, help="write DIR/doctor_speed.json and DIR/doctor_speed.md")
    args = p.parse_args()
    model = resolve_model_path(None)
    runs = []
    if args.trace.exists():
        runs.append(measure("Mooncake conversation trace", args.trace, args.workers))
    else:
        print(f"{args.trace} not found: skipping the Mooncake trace", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "mixed.jsonl"
        t0 = time.perf_counter()
        build_log(log, args.requests)
        print(f"built {log.name} ({args.requests:,} requests) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        runs.append(measure(f"built loadgen log ({args.requests:,} requests, 3 tenants)", log, args.workers))
    doc = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
           "tokenizer": Path(str(model)).name, "workers": args.workers, "runs": runs}
    print(json.dumps(doc, indent=2))
    print(markdown(doc))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "doctor_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "doctor_speed.md").write_text(markdown(doc))


if __name__ == "__main__":
    main()
