"""`python -m loadgen analyze LOG`: the prefix doctor on a traffic log, as markdown or JSON, with files under --out."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadgen.traces import TraceError, detect_format
from router.settings import POLICIES

DEFAULT_POLICIES = ("cache_aware", "round_robin")


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {v}")
    return v


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadgen analyze", description=__doc__)
    ap.add_argument("log", type=Path, help="loadgen request JSONL, an OpenAI request log or a Mooncake trace")
    ap.add_argument("--tokenizer", help="model dir or .gguf whose tokenizer the workers use (default: the packaged "
                                        "model); a Mooncake trace needs none")
    ap.add_argument("--block-tokens", type=_positive, default=16, help="tokens per worker cache block")
    ap.add_argument("--workers", type=_positive, action="append", help="fleet sizes to simulate (repeatable; 8)")
    ap.add_argument("--policy", choices=POLICIES, action="append",
                    help=f"routing policies to simulate (repeatable; {' and '.join(DEFAULT_POLICIES)})")
    ap.add_argument("--no-policy", action="store_true", help="skip the routing simulation")
    ap.add_argument("--max-requests", type=_positive, help="read only the log's first N requests")
    ap.add_argument("--min-requests", type=_positive,
                    help="requests a finding must affect (default: 5, or 0.2%% of the log if more)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    ap.add_argument("--out", type=Path, help="write analysis.json, analysis.md and analysis.png here")
    args = ap.parse_args(argv)
    args.workers = args.workers or [8]
    args.policy = args.policy or list(DEFAULT_POLICIES)
    return args


@functools.lru_cache(maxsize=2)
def _tokenizer(path: Path) -> Any:
    """Loaded once per model path and process (main() called again, as tests do, reuses it)."""
    from protocol import modelfiles

    return modelfiles.load_tokenizer(path)


def run(args: argparse.Namespace) -> Any:
    """The Analysis of args.log, policies simulated unless --no-policy, each stage timed in its `seconds`."""
    from loadgen.doctor.findings import analyze
    from loadgen.doctor.policy import policy_ratio, to_sim_requests
    from loadgen.doctor.report import of_ceiling
    from loadgen.doctor.traffic import load_traffic

    if not args.log.is_file():
        raise FileNotFoundError(f"{args.log}: no such file")
    seconds: dict[str, float] = {}
    tokenizer = None
    if detect_format(args.log) != "mooncake":  # a Mooncake trace has hash ids, not text
        from protocol.modelfiles import resolve_model_path

        t0 = time.perf_counter()
        tokenizer = _tokenizer(resolve_model_path(args.tokenizer))
        seconds["load_tokenizer"] = time.perf_counter() - t0
    traffic = load_traffic(args.log, tokenizer, args.max_requests)
    if not traffic.requests:
        raise TraceError(f"{args.log}: no requests")
    if tokenizer is not None:
        seconds["tokenize"] = traffic.tokenize_s
    t0 = time.perf_counter()
    analysis = analyze(traffic, args.block_tokens, tokenizer, min_requests=args.min_requests)
    seconds["analyze"] = time.perf_counter() - t0
    if not args.no_policy:
        t0 = time.perf_counter()
        tokens_in = traffic.requests[0].tokens is not None
        sim = to_sim_requests(traffic.requests, args.block_tokens, analysis.chains) if tokens_in else None
        for workers in args.workers:
            for policy in args.policy:
                p = policy_ratio(traffic.requests, workers, args.block_tokens, policy=policy, sim=sim,
                                 infinite=analysis.ceiling)
                p["of_ceiling"] = of_ceiling(p["ratio"], analysis.ceiling)
                analysis.policy.append(p)
        seconds["policy"] = time.perf_counter() - t0
    analysis.seconds = seconds
    return analysis


def write(analysis: Any, out: Path) -> None:
    from loadgen.doctor import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(report.to_json(analysis), indent=2) + "\n")
    (out / "analysis.md").write_text(report.markdown(analysis))
    report.plot(analysis, out / "analysis.png")


def main(argv: list[str] | None = None) -> int:
    from loadgen.doctor import report
    from protocol.modelfiles import ModelNotFound

    args = parse(argv)
    try:
        analysis = run(args)
    except (TraceError, ModelNotFound) as exc:
        print(f"loadgen analyze: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"loadgen analyze: {args.log}: not a text log", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"loadgen analyze: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(analysis), indent=2))
    else:
        print(report.markdown(analysis), end="")
    if args.out:
        try:
            write(analysis, args.out)
        except OSError as exc:
            print(f"loadgen analyze: --out: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
