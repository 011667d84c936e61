"""`python -m loadgen replay|synth|compare`: run a workload against OpenAI URLs and write its report;
`python -m loadgen analyze LOG`: the prefix doctor (loadgen.doctor.cli)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from loadgen import report, shapes
from loadgen.replay import Job, Result, replay
from loadgen.synth import KILLERS, KINDS, generate
from loadgen.traces import (
    MooncakeLine,
    PromptBuilder,
    RecordedRequest,
    TraceError,
    detect_format,
    read_mooncake,
    read_requests,
)

SHAPES = ("longdoc", "hotdoc")
_SHAPE_ARGS = ("doc_tokens", "repeat_share", "repeat_window", "hot_share", "hot_doc_tokens", "tail_docs",
               "continue_share", "max_turns")
from protocol.cli import raise_open_files_limit


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speedup", type=float, default=1.0, help="replay recorded times this many times faster")
    p.add_argument("--concurrency", type=int, help="closed loop with this many in flight (ignores timestamps)")
    p.add_argument("--max-requests", type=int)
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--model", help="default: the first model the URL lists")
    p.add_argument("--api-key")
    p.add_argument("--out", type=Path)
    p.add_argument("--record", type=Path, help="also write the requests sent, as loadgen JSONL")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds")
    p.add_argument("--workers", type=int, metavar="N",
                   help="workers behind each URL: those that served no request then count in max/mean load")
    p.add_argument("--quiet", action="store_true")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("analyze", add_help=False, help="the prefix doctor on a traffic log (see analyze --help)")
    for name in ("replay", "compare"):
        p = sub.add_parser(name)
        p.add_argument("trace", type=Path,
                       help="Mooncake JSONL (.gz too), loadgen request JSONL or an OpenAI request log")
        p.add_argument("--url", required=True, action="append",
                       help="the OpenAI base URL" if name == "replay" else "NAME=URL, repeated")
        p.add_argument("--block-tokens", type=int, default=512, help="tokens per 512-token trace block")
        p.add_argument("--max-output-tokens", type=int, help="cap each request's output length")
        p.add_argument("--tokenizer", help="model dir or .gguf whose tokenizer builds trace prompts")
        _common(p)
    p = sub.add_parser("synth")
    p.add_argument("kind", choices=KINDS + SHAPES)
    p.add_argument("--url", required=True, action="append")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=5.0, help="requests per second (Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tenant-key", action="append", help="API keys of the tenants workload")
    p.add_argument("--killer", choices=KILLERS, default="timestamp", help="killers: what breaks the shared prefix")
    p.add_argument("--fixed", action="store_true", help="killers: the killer moved to the end, or the tools sorted")
    g = p.add_argument_group("longdoc and hotdoc (Mooncake-format traces; loadgen.shapes)")
    g.add_argument("--doc-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), help="longdoc document sizes")
    g.add_argument("--repeat-share", type=float, help="longdoc: share of requests repeating an earlier document")
    g.add_argument("--repeat-window", type=int, help="longdoc: a repeat picks one of the last N documents")
    g.add_argument("--hot-share", type=float, help="hotdoc: share of requests on the hot document")
    g.add_argument("--hot-doc-tokens", type=int)
    g.add_argument("--tail-docs", type=int, help="hotdoc: other documents (Zipf-popular)")
    g.add_argument("--continue-share", type=float, help="hotdoc: share of requests continuing a conversation")
    g.add_argument("--max-turns", type=int)
    g.add_argument("--block-tokens", type=int, default=512, help="tokens per 512-token trace block")
    g.add_argument("--tokenizer", help="model dir or .gguf whose tokenizer builds the prompts")
    g.add_argument("--trace-out", type=Path, help="also write the trace (Mooncake JSONL) for replay or policy_sim")
    _common(p)
    args = ap.parse_args(argv)
    if args.cmd != "compare" and len(args.url) > 1:
        ap.error("one --url (use `compare` for several)")
    if args.cmd == "compare" and not all("=" in u for u in args.url):
        ap.error("compare takes --url NAME=URL")
    for name in ("speedup", "concurrency", "max_requests", "duration", "workers"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return args


def first_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def trace_requests(lines: list[MooncakeLine], args: argparse.Namespace, max_output: int | None
                   ) -> list[RecordedRequest]:
    """Completion requests whose prompts share blocks as the trace lines' hash ids do."""
    from protocol.modelfiles import load_tokenizer, resolve_model_path

    builder = PromptBuilder(load_tokenizer(resolve_model_path(args.tokenizer)), args.block_tokens)
    out = []
    for line in lines:
        n = line.output_length if max_output is None else min(line.output_length, max_output)
        out.append(RecordedRequest(timestamp=line.timestamp, endpoint="/v1/completions", body={
            "prompt": builder.prompt(line), "max_tokens": max(1, n), "temperature": 0}))
    return out


def shape_trace(args: argparse.Namespace) -> list[dict]:
    given = {k: getattr(args, k) for k in _SHAPE_ARGS if getattr(args, k) is not None}
    if "doc_tokens" in given:
        given["doc_tokens"] = tuple(given["doc_tokens"])
    lines = shapes.generate(args.kind, shapes.ShapeParams(requests=args.requests, rate=args.rate, **given),
                            seed=args.seed)
    if args.trace_out:
        with open(args.trace_out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


def build_jobs(args: argparse.Namespace, model: str) -> list[Job]:
    if args.cmd == "synth" and args.kind in SHAPES:
        lines = [MooncakeLine.model_validate(line) for line in shape_trace(args)]
        recorded = trace_requests(lines, args, args.max_tokens)
    elif args.cmd == "synth":
        recorded = generate(args.kind, args.requests, args.rate, seed=args.seed, prompts=args.prompts,
                            max_tokens=args.max_tokens, tenants=args.tenant_key, killer=args.killer,
                            fixed=args.fixed)
    elif (fmt := detect_format(args.trace)) == "requests":
        recorded = read_requests(args.trace, args.max_requests)
    elif fmt == "openai":
        from loadgen.doctor.traffic import read_openai_log

        recorded = read_openai_log(args.trace, args.max_requests)
    else:
        recorded = trace_requests(read_mooncake(args.trace, args.max_requests), args, args.max_output_tokens)
    jobs = []
    for rec in recorded[: args.max_requests]:
        body = dict(rec.body)
        key = body.pop("_api_key", None)
        body.setdefault("model", model)
        jobs.append(Job(rec.timestamp / 1000, rec.endpoint, body, key))
    if args.record:
        with open(args.record, "w") as f:
            for j in jobs:
                f.write(json.dumps({"timestamp": j.at_s * 1000, "endpoint": j.endpoint, "body": j.body}) + "\n")
    return jobs


def run_one(url: str, jobs: list[Job], args: argparse.Namespace, label: str) -> tuple[list[Result], float]:
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=label, unit="req")
    t0 = time.perf_counter()
    results = asyncio.run(replay(url, jobs, speedup=args.speedup, concurrency=args.concurrency,
                                 duration_s=args.duration, api_key=args.api_key, timeout_s=args.timeout,
                                 on_done=(lambda r: bar.update(1)) if bar else None))
    if bar:
        bar.close()
    return results, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyze"]:  # its own parser: loadgen.doctor.cli
        from loadgen.doctor import cli

        return cli.main(argv[1:])
    args = parse(argv)
    raise_open_files_limit()  # open-loop replay past saturation holds a socket per request in flight
    targets = dict(u.split("=", 1) for u in args.url) if args.cmd == "compare" else {"run": args.url[0]}
    try:
        model = args.model or first_model(next(iter(targets.values())), args.api_key)
        jobs = build_jobs(args, model)
    except TraceError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, KeyError, IndexError, ValueError, OSError) as exc:
        print(f"loadgen: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    runs, summaries = {}, {}
    for name, url in targets.items():
        results, wall = run_one(url, jobs, args, name)
        runs[name], summaries[name] = results, report.summarize(results, wall, workers=args.workers)
    print(report.markdown(summaries))
    if args.out:
        report.write(args.out, runs, summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
