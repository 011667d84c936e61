"""Synthetic traffic shapes as Mooncake trace lines (512-token hash ids), so one file drives a live replay
(`loadgen replay`, bench/routing_quality.py) and the offline fleet simulation (harness/fleet_sim.py) alike.

- `longdoc`: RAG and agent traffic. Each request is one long document (heavy-tailed, Pareto-sized between a
  minimum and a maximum) plus a short question; most documents are seen once, a `repeat_share` of requests
  repeats a document from the last `repeat_window` ones, deep (all its blocks).
- `hotdoc`: document QA. One long document carries `hot_share` of the requests, each adding its own question;
  the rest pick from a Zipf-popular tail of other documents. A `continue_share` of requests continue an earlier
  conversation on their document: the earlier prompt, its answer and a new question.

Deterministic for a seed. Documents are whole 512-token blocks, so requests sharing a document share exactly
its blocks; a question's tokens, and everything after them, are blocks of their own.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loadgen.traces import TRACE_BLOCK_TOKENS

B = TRACE_BLOCK_TOKENS


@dataclass
class ShapeParams:
    requests: int = 1200
    rate: float = 2.0  # requests per second, Poisson arrivals
    question_tokens: tuple[int, int] = (32, 256)
    output_tokens: tuple[int, int] = (32, 512)
    # longdoc
    doc_tokens: tuple[int, int] = (4000, 40000)
    pareto_alpha: float = 1.1
    repeat_share: float = 0.10
    repeat_window: int = 200
    # hotdoc
    hot_share: float = 0.5
    hot_doc_tokens: int = 16000
    tail_docs: int = 300
    tail_doc_tokens: tuple[int, int] = (2000, 16000)
    tail_zipf_s: float = 1.0
    continue_share: float = 0.3
    max_turns: int = 4

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class _Blocks:
    def __init__(self) -> None:
        self.next = 0

    def new(self, n: int) -> list[int]:
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def _pareto_tokens(rng: random.Random, lo: int, hi: int, alpha: float) -> int:
    """Heavy-tailed length in [lo, hi], rounded to whole blocks."""
    while True:
        x = lo * (1 - rng.random()) ** (-1 / alpha)
        if x <= hi:
            return max(B, round(x / B) * B)


def _line(t_ms: float, doc: list[int], tail_tokens: int, out: int, blocks: _Blocks) -> dict[str, Any]:
    n = len(doc) * B + tail_tokens
    return {"timestamp": int(t_ms), "input_length": n, "output_length": out,
            "hash_ids": doc + blocks.new(math.ceil(tail_tokens / B))}


def generate(kind: str, p: ShapeParams | None = None, seed: int = 0) -> list[dict[str, Any]]:
    p = p or ShapeParams()
    if kind not in ("longdoc", "hotdoc"):
        raise ValueError(f"unknown shape {kind!r}; longdoc or hotdoc")
    rng = random.Random(seed)
    blocks = _Blocks()
    out: list[dict[str, Any]] = []
    t = 0.0

    def question() -> int:
        return rng.randint(*p.question_tokens)

    def answer() -> int:
        return rng.randint(*p.output_tokens)

    if kind == "longdoc":
        docs: list[list[int]] = []
        for _ in range(p.requests):
            t += rng.expovariate(p.rate) * 1000
            if docs and rng.random() < p.repeat_share:
                doc = rng.choice(docs[-p.repeat_window:])
            else:
                doc = blocks.new(_pareto_tokens(rng, *p.doc_tokens, p.pareto_alpha) // B)
                docs.append(doc)
            out.append(_line(t, doc, question(), answer(), blocks))
        return out

    hot = blocks.new(p.hot_doc_tokens // B)
    tail = [blocks.new(_pareto_tokens(rng, *p.tail_doc_tokens, p.pareto_alpha) // B) for _ in range(p.tail_docs)]
    weights = [1 / (k + 1) ** p.tail_zipf_s for k in range(p.tail_docs)]
    # open conversations: (full blocks of the prompt so far incl. the answer, tokens after them, turns taken)
    convs: list[tuple[list[int], int, int]] = []
    for _ in range(p.requests):
        t += rng.expovariate(p.rate) * 1000
        if convs and rng.random() < p.continue_share:
            i = rng.randrange(len(convs))
            prefix, carry, turns = convs[i]
        else:
            i, carry, turns = -1, 0, 0
            prefix = hot if rng.random() < p.hot_share else rng.choices(tail, weights)[0]
        line = _line(t, prefix, carry + question(), answer(), blocks)
        out.append(line)
        # the next turn repeats this prompt's full blocks, then its answer and a new question in new blocks
        full = line["hash_ids"][: line["input_length"] // B]
        state = (full, line["input_length"] - len(full) * B + line["output_length"], turns + 1)
        if i >= 0:
            convs[i] = state
        else:
            convs.append(state)
        convs[:] = [c for c in convs if c[2] < p.max_turns][-1000:]
    return out


def trace_file(kind: str, requests: int, seed: int = 0, directory: Path | None = None) -> Path:
    """The shape (default parameters) as a Mooncake JSONL file of `requests` lines: the same path and content
    for the same arguments, so runs that append to one result set agree on their trace."""
    path = Path(directory or tempfile.gettempdir()) / "prefixroute-shapes" / f"{kind}-{requests}-seed{seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in generate(kind, ShapeParams(requests=requests), seed)))
    return path
