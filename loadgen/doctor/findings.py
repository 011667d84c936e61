"""Findings: spans of tokens that break otherwise shared prefixes, what each costs, and the ceiling once fixed.

A finding starts at a fan-out node of the traffic's prefix tree (loadgen.doctor.tree): many requests share a
run of tokens, then go separate ways. If, a little later, most of them share a long run again (they
re-converge: the same instructions after a timestamp, a user's name or a shuffled tool list), the tokens in
between are the killer. Its fix is to move it to the end of the prompt, or, when the requests' spans hold the
same lines in another order, to sort them; its cost is what the ideal single cache gains on the whole traffic
with the fix applied. Fixed traffic is analysed again (up to `rounds` times), so a killer hidden behind an
earlier one is found too.

Positions are token positions in the prompt as the worker tokenizes it; a reported span starts where the
requests first differ, widened back to the start of the date or name it cuts into.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadgen.doctor import hints
from loadgen.doctor.tree import chain, fan_outs, ideal_hits

KGRAM = 16  # tokens a re-convergence anchor must match exactly
SAMPLE = 64  # requests of a group the anchor is searched in (a first look at SCOUT of them)
SCOUT = 16
AGREE = 0.8  # share of the sample that must hold the anchor
LONG_RUN = 64  # tokens the run after an anchor must reach: shorter common runs are items of a list, not the text
WINDOW = 2048  # tokens after the divergence a re-convergence is looked for in


@dataclass
class Finding:
    tenant: str
    start: int
    end: int
    requests: int
    tokens_lost: int
    ceiling_fixed: float
    fix: str  # "move_to_end" or "sort_items"
    hint: str
    example: str
    versions: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    source: str
    requests: int
    prompt_tokens: int
    block_tokens: int
    ceiling: float
    ceiling_fixed: float
    findings: list[Finding]
    tenants: dict[str, dict]
    versions: dict[str, dict]
    policy: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    chains: list[list[bytes]] | None = field(default=None, repr=False)  # the log's block chains (not reported)


@dataclass
class _Fix:
    kind: str
    spans: dict[int, tuple[int, int]]  # request -> [a, b) in its current tokens
    order: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # sort_items: item ranges, sorted


class _Text:
    """Token texts, decoded once per id."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.memo: dict[int, str] = {}

    def piece(self, t: int) -> str:
        s = self.memo.get(t)
        if s is None:
            s = self.memo[t] = self.tok.decode([int(t)]) if self.tok is not None else ""
        return s

    def text(self, ids: np.ndarray) -> str:
        return self.tok.decode([int(t) for t in ids]) if self.tok is not None else ""


def _lcp(a: np.ndarray, b: np.ndarray, cap: int | None = None) -> int:
    n = min(len(a), len(b)) if cap is None else min(len(a), len(b), cap)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _kgrams(tail: np.ndarray, coef: np.ndarray) -> np.ndarray:
    if len(tail) < KGRAM:
        return np.zeros(0, dtype=np.uint64)
    win = np.lib.stride_tricks.sliding_window_view(tail.astype(np.uint64), KGRAM)
    with np.errstate(over="ignore"):
        return (win * coef).sum(axis=1, dtype=np.uint64)


def _find(tokens: np.ndarray, pattern: np.ndarray, lo: int, hi: int) -> int | None:
    """First position p in [lo, hi) where `pattern` starts in `tokens`."""
    seg = tokens[lo:hi + len(pattern) - 1]
    for p in np.flatnonzero(seg[: max(0, len(seg) - len(pattern) + 1)] == pattern[0]):
        if np.array_equal(seg[p:p + len(pattern)], pattern):
            return lo + int(p)
    return None


def _widen(tokens: np.ndarray, start: int, floor: int, text: _Text) -> int:
    """Move a span's start back to the start of the date/time, word or capitalised name it cuts into."""

    def word_start(i: int) -> int:  # the first token of the word token i is in
        while i > floor and text.piece(tokens[i])[:1].isalnum() and text.piece(tokens[i - 1])[-1:].isalnum():
            i -= 1
        return i

    s = min(start, len(tokens) - 1)
    while s > floor:
        p, cur = text.piece(tokens[s - 1]), text.piece(tokens[s])
        if p and all(c.isdigit() or c in "-:/.T" for c in p) and (cur[:1].isdigit() or cur[:1] in "-:/.TZ"):
            s -= 1  # inside a date or time
        elif cur[:1].isalnum() and p[-1:].isalnum():
            s -= 1  # inside a word: an id, a name cut mid-word
        elif cur[:1] == " " and cur[1:2].isupper() and p[-1:].isalpha():
            w = word_start(s - 1)
            if not text.piece(tokens[w]).strip()[:1].isupper():
                break
            s = w  # a capitalised word before a capitalised word: the first name of a full name
        else:
            break
    return s


def _items(tokens: np.ndarray, a: int, b: int, text: _Text) -> list[tuple[int, int]]:
    """[a, b) cut after each token holding a newline."""
    out, s = [], a
    for p in range(a, b):
        if "\n" in text.piece(tokens[p]):
            out.append((s, p + 1))
            s = p + 1
    if s < b:
        out.append((s, b))
    return out


class _Doctor:
    def __init__(self, reqs: list[Any], block_tokens: int, tokenizer: Any, min_requests: int | None, min_run: int):
        self.B = block_tokens
        self.text = _Text(tokenizer)
        self.m = min_requests if min_requests is not None else max(5, math.ceil(0.002 * len(reqs)))
        self.min_run = min_run
        self.tokens = [np.asarray(r.tokens, dtype=np.int64) for r in reqs]
        self.salts = [r.salt for r in reqs]
        self.chains = [chain(t, self.B, s) for t, s in zip(self.tokens, self.salts)]
        self.lengths = [len(t) for t in self.tokens]
        self.moves: list[list[tuple[int, int]]] = [[] for _ in reqs]  # move_to_end spans applied, in order
        rng = np.random.default_rng(0)
        self.coef = rng.integers(1, 2**63, size=KGRAM, dtype=np.uint64) | np.uint64(1)

    def hits(self) -> np.ndarray:
        return ideal_hits(self.chains, self.lengths, self.B)

    def fixed(self, fix: _Fix) -> dict[int, tuple[np.ndarray, list[bytes]]]:
        """The tokens and chains of the requests `fix` touches, fixed."""
        out = {}
        for i, (a, b) in fix.spans.items():
            t = self.tokens[i]
            if fix.kind == "move_to_end":
                new = np.concatenate([t[:a], t[b:], t[a:b]])
            else:
                new = np.concatenate([t[:a]] + [t[x:y] for x, y in fix.order[i]] + [t[b:]])
            out[i] = new, chain(new, self.B, self.salts[i], a // self.B, self.chains[i])
        return out

    def original(self, i: int, p: int) -> int:
        """A position in request i's current (fixed) tokens, in its original prompt."""
        for a, n in reversed(self.moves[i]):
            if p >= a:
                p += n
        return p

    def group(self, members: list[int], depth: int) -> _Fix | None:
        """The span that breaks the prefix these requests share through `depth` blocks, if they re-converge."""
        tok = self.tokens
        base = depth * self.B
        ref = members[0]
        lcps = np.array([_lcp(tok[i][base:], tok[ref][base:], WINDOW) for i in members[1:]])
        if not len(lcps):
            return None
        s = base + int(np.percentile(lcps, 10))
        starts = {i: min(s, base + int(l)) for i, l in zip(members[1:], lcps)}
        starts[ref] = s
        rng = np.random.default_rng(len(members))
        sample = members if len(members) <= SAMPLE else [ref] + list(
            rng.choice(members[1:], SAMPLE - 1, replace=False))
        ref_k = _kgrams(tok[ref][s:s + WINDOW], self.coef)
        if not len(ref_k):
            return None
        held = np.zeros(len(ref_k), dtype=np.int64)  # sampled requests holding each of ref's k-grams
        for n, i in enumerate(sample):
            if i != ref:
                held += np.isin(ref_k, _kgrams(tok[i][starts[i]:starts[i] + WINDOW], self.coef))
            if n + 1 == SCOUT and not (held >= AGREE * (SCOUT - 1)).any():
                return None  # a first look finds nothing most of them share again: no re-convergence
        anchor = None
        for j in np.flatnonzero(held >= AGREE * (len(sample) - 1)):
            pat = tok[ref][s + j:s + j + KGRAM]
            runs = []
            for i in sample[1:]:
                p = _find(tok[i], pat, starts[i], starts[i] + WINDOW)
                if p is not None:
                    runs.append(_lcp(tok[i][p:], tok[ref][s + j:], LONG_RUN))
            if runs and np.median(runs) >= min(LONG_RUN, len(tok[ref]) - s - j - 1):
                anchor = int(j)
                break
        if anchor is None or anchor == 0:
            return None
        pat = tok[ref][s + anchor:s + anchor + KGRAM]
        spans: dict[int, tuple[int, int]] = {}
        for i in members:
            p = _find(tok[i], pat, starts[i], starts[i] + WINDOW)
            if p is None or p <= starts[i] or _lcp(tok[i][p:], tok[ref][s + anchor:]) < self.min_run:
                continue
            spans[i] = (starts[i], p)
        if len(spans) < self.m:
            return None
        w = _widen(tok[ref], s, max(0, s - KGRAM * 4), self.text)  # tokens before s are the whole group's
        spans = {i: (a - (s - w) if a == s else a, b) for i, (a, b) in spans.items()}
        return self._order(spans) or _Fix("move_to_end", spans)

    def _order(self, spans: dict[int, tuple[int, int]]) -> _Fix | None:
        """A sort fix when the requests' spans, cut into lines, hold the same lines in different orders."""
        if self.text.tok is None:
            return None
        tok = self.tokens
        keys, ranges = {}, {}
        for i, (a, b) in spans.items():
            while a > 0 and "\n" not in self.text.piece(tok[i][a - 1]):
                a -= 1  # whole lines: back to the start of the first one
            while b < len(tok[i]) and "\n" not in self.text.piece(tok[i][b - 1]):
                b += 1
            items = _items(tok[i], a, b, self.text)
            if len(items) < 2:
                return None
            keys[i] = [tuple(tok[i][x:y].tolist()) for x, y in items]
            ranges[i] = (a, b, items)
        bags = Counter(tuple(sorted(k)) for k in keys.values())
        bag, n = bags.most_common(1)[0]
        orders = {tuple(k) for k in keys.values() if tuple(sorted(k)) == bag}
        if n < AGREE * len(keys) or len(orders) < 2:
            return None
        fix = _Fix("sort_items", {})
        for i, k in keys.items():
            if tuple(sorted(k)) != bag:
                continue
            a, b, items = ranges[i]
            fix.spans[i] = (a, b)
            fix.order[i] = [items[j] for j in sorted(range(len(items)), key=lambda j: k[j])]
        return fix

    def describe(self, fix: _Fix, ref: int) -> tuple[str, str]:
        t = self.tokens[ref]
        a, b = fix.spans[ref]
        texts = [self.text.text(self.tokens[i][x:y]) for i, (x, y) in list(fix.spans.items())[:SAMPLE]]
        h = hints.hint(texts, ordered=fix.kind == "sort_items")
        ex = hints.example(self.text.text(t[max(0, a - 8):a]), self.text.text(t[a:b]),
                           self.text.text(t[b:b + 8]))
        return h, ex


def _ratio(hits: np.ndarray, lengths: np.ndarray, idx: np.ndarray) -> float:
    return float(hits[idx].sum() / max(1, lengths[idx].sum()))


def analyze(traffic: Any, block_tokens: int = 16, tokenizer: Any = None, rounds: int = 3,
            min_requests: int | None = None, min_run: int = 32) -> Analysis:
    """The ideal ceiling of `traffic` (loadgen.doctor.traffic.Traffic), its findings, and the ceiling with them
    fixed, overall, per tenant and per prefix version. A Mooncake trace carries no tokens: its ceiling is
    counted over its 512-token hash ids and no span can be seen (its ids chain, so traffic never
    re-converges after a divergence)."""
    t0 = time.perf_counter()
    reqs = traffic.requests
    if reqs and reqs[0].tokens is None:
        return _mooncake(traffic, t0)
    doc = _Doctor(reqs, block_tokens, tokenizer, min_requests, min_run)
    original_chains = list(doc.chains)
    lengths = np.array(doc.lengths)
    now = doc.hits()
    base_hits = now
    findings: list[Finding] = []
    for _ in range(rounds):
        taken: set[int] = set()
        round_fixes = []
        for fo in fan_outs(doc.chains, doc.salts, doc.m):
            members = [i for i in fo.members if i not in taken]
            if len(members) < doc.m:
                continue
            fix = doc.group(members, fo.depth)
            if fix is None:
                continue
            taken.update(fix.spans)
            round_fixes.append(fix)
        if not round_fixes:
            break
        results = [doc.fixed(fix) for fix in round_fixes]
        for fix, got in zip(round_fixes, results):
            chains = list(doc.chains)
            for i, (_, c) in got.items():
                chains[i] = c
            gained = ideal_hits(chains, doc.lengths, doc.B)
            ref = next(iter(fix.spans))
            h, ex = doc.describe(fix, ref)
            idx = np.array(sorted(fix.spans))
            a = doc.original(ref, fix.spans[ref][0])
            ends = sorted(doc.original(i, b) for i, (_, b) in fix.spans.items())
            findings.append(Finding(
                tenant=reqs[ref].tenant, start=a, end=ends[len(ends) // 2], requests=len(fix.spans),
                tokens_lost=int(gained.sum() - now.sum()), ceiling_fixed=float(gained.sum() / lengths.sum()),
                fix=fix.kind, hint=h, example=ex,
                versions=sorted({reqs[i].version for i in idx if reqs[i].version})))
        for fix, got in zip(round_fixes, results):  # every fix of the round; the next round looks behind them
            for i, (a, b) in fix.spans.items():
                if fix.kind == "move_to_end":
                    doc.moves[i].append((a, b - a))
                doc.tokens[i], doc.chains[i] = got[i]
        now = doc.hits()
    findings.sort(key=lambda f: -f.tokens_lost)

    def summary(key) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for name in sorted({key(r) for r in reqs if key(r) is not None}):
            idx = np.array([i for i, r in enumerate(reqs) if key(r) == name])
            out[name] = {"requests": len(idx), "prompt_tokens": int(lengths[idx].sum()),
                         "ceiling": _ratio(base_hits, lengths, idx), "ceiling_fixed": _ratio(now, lengths, idx)}
        return out

    total = max(1, int(lengths.sum()))
    return Analysis(source=traffic.source, requests=len(reqs), prompt_tokens=int(lengths.sum()),
                    block_tokens=block_tokens, ceiling=float(base_hits.sum() / total),
                    ceiling_fixed=float(now.sum() / total), findings=findings,
                    tenants=summary(lambda r: r.tenant), versions=summary(lambda r: r.version),
                    seconds={"analyze": time.perf_counter() - t0}, chains=original_chains)


def _mooncake(traffic: Any, t0: float) -> Analysis:
    from harness.fleet_sim import TRACE_BLOCK, offline_hit_ratio

    reqs = traffic.requests
    lines = [{"input_length": r.input_length, "hash_ids": r.hash_ids} for r in reqs]
    ratio = offline_hit_ratio(lines, None)
    total = sum(x["input_length"] for x in lines)
    stats = {"requests": len(reqs), "prompt_tokens": total, "ceiling": ratio, "ceiling_fixed": ratio}
    return Analysis(source=traffic.source, requests=len(reqs), prompt_tokens=total, block_tokens=TRACE_BLOCK,
                    ceiling=ratio, ceiling_fixed=ratio, findings=[], tenants={"": stats}, versions={},
                    seconds={"analyze": time.perf_counter() - t0},
                    notes=["A Mooncake trace has no tokens, only 512-token block hashes chained over the prefix: "
                           "the ceiling is exact, but no span can be located (after a divergence its ids never "
                           "re-converge)."])
