"""A fleet in one process, for routing studies without servers: a Mooncake trace through the router's own
policies and worker pool to simulated workers, each with the worker's own BlockCache and the sim backend's GPU
cost model, in one discrete-event loop; and the offline references (one pooled LRU of the fleet's total size,
an infinite cache). One trace block is one cache entry (a block_size-1 chain over hash ids), so prefix
semantics are the engine's. A block is TRACE_BLOCK tokens (Mooncake's 512) unless `block_tokens` says otherwise
(hash ids of token chains at the worker's block size, as the prefix doctor builds them).

Each simulated worker steps as the engine does (worker.engine.scheduler, the sim backend's costs): a step
decodes one token of every decoding request and gives the rest of its token budget to prefill chunks, the
running requests' oldest first, then queued requests admitted first come first served while budget, the batch
and the KV pool (prompt + output per request) have room, looking the cache up then; so under load every
decode step waits for the prefill chunks beside it. Each chunk's full blocks are cached as it ends; the first
token comes with the last. The router sees in-flight counts (arrival to last token), what WorkerPool counts
live.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any

from loadgen.doctor.tree import cacheable_blocks
from loadgen.report import percentile
from router.admission import Admission
from router.policies import make_policy
from router.policies.random import RandomPolicy
from router.prefix import RouteKeys
from router.settings import RouterSettings
from router.workers import WorkerPool
from worker.engine.cache import BlockCache
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Status
from worker.sim import GpuProfile

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
TRACE_BLOCK = 512  # tokens per Mooncake hash id


def load_trace(path: Path = TRACE, n: int | None = None) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if n is not None and len(out) == n:
                break
    return out


def cached_tokens(req: dict[str, Any], hit_blocks: int, block_tokens: int = TRACE_BLOCK) -> int:
    """Counted like a worker counts: whole blocks only, and never the prompt's last token."""
    return min(hit_blocks, cacheable_blocks(req["input_length"], block_tokens)) * block_tokens


def insert_chain(cache: BlockCache, ids: list[int], chain: list) -> list:
    """Insert the trace blocks after `chain` (the cached prefix); returns the chain as far as it got."""
    parent = chain[-1] if chain else None
    for i in range(len(chain), len(ids)):
        blk = cache.insert(cache.child_hash(parent, None, ids[i:i + 1]), parent, ids[i:i + 1], None, 1)
        if blk is None:
            break
        chain.append(blk)
        parent = blk
    return chain


def per_worker_blocks(profile: GpuProfile, block_tokens: int = TRACE_BLOCK) -> int:
    return profile.kv_capacity_bytes // (profile.kv_bytes_per_token * block_tokens)


def offline_hit_ratio(reqs: list[dict[str, Any]], capacity_blocks: int | None,
                      block_tokens: int = TRACE_BLOCK) -> float:
    """Cached / prompt tokens through one LRU of `capacity_blocks` blocks of `block_tokens` (None: infinite),
    with the worker's own BlockCache."""
    cache = BlockCache(1, capacity_blocks if capacity_blocks is not None else 1 << 62)
    hits = total = 0
    for r in reqs:
        ids = r["hash_ids"]
        chain = cache.acquire_prefix(ids, None, len(ids))
        hits += cached_tokens(r, len(chain), block_tokens)
        total += r["input_length"]
        cache.release(insert_chain(cache, ids, chain))
    return hits / total


def saturation_speed(reqs: list[dict[str, Any]], n: int, pooled_hit: float, profile: GpuProfile,
                     target_util: float = 0.85) -> float:
    """Trace speed-up at which the fleet's estimated GPU work fills `target_util` of N GPUs: prefill of the
    tokens a pooled cache would miss, plus each request's share of batched decode steps (batch of ~32)."""
    span_s = (reqs[-1]["timestamp"] - reqs[0]["timestamp"]) / 1000 or 1.0
    work = 0.0
    for r in reqs:
        new = int(r["input_length"] * (1 - pooled_hit))
        work += profile.prefill_s(new, r["input_length"] - new) + profile.step_overhead_s
        work += r["output_length"] * (profile.decode_weights_s / 32 + profile.decode_s_per_ctx_token *
                                      r["input_length"])
    return target_util * n * span_s / work


def _digest(*parts: Any) -> bytes:
    return blake2b(repr(parts).encode(), digest_size=16).digest()


def route_keys(req: dict[str, Any], prefix_tokens: int = 256, seed: int = 0,
               block_tokens: int = TRACE_BLOCK) -> RouteKeys:
    """What the router computes for a completion prompt built from this trace line: the routing key over the
    first P tokens, and the prompt's block chain: the trace's own hash ids (equal ids mean equal prefixes), with
    their token counts.

    `seed` stands for the content behind the trace's hash ids (the trace gives only which blocks are equal, not
    their tokens; loadgen's PromptBuilder(seed=...) picks them), and so for where each key lands on the ring:
    another seed is another, equally valid, assignment of keys to workers. 0 is the unsalted historical one."""
    n = req["input_length"]
    p = min(n, prefix_tokens)
    ids = req["hash_ids"]
    salt = (seed,) if seed else ()
    blocks = [(seed << 48) | i for i in ids] if seed else ids
    return RouteKeys(_digest(*salt, ids[:-(-p // block_tokens)], p), None, p, 0.0, blocks,
                     [min(n, block_tokens * (i + 1)) for i in range(len(ids))], n)


@dataclass(eq=False)
class SimSeq:
    """A request on a simulated worker, as the engine's scheduler (worker.engine.scheduler) sees a Sequence: its
    prompt to compute (the cache hit counts as computed at admission), then its decode steps."""

    i: int
    num_prompt: int
    kv_reserve: int  # prompt + output, as the engine reserves at admission
    decode_left: int  # decode steps after its first token
    context: int  # tokens in its KV while decoding
    num_computed: int = 0
    num_prefill: int = 0
    output_ids: tuple = ()  # never preempted: nothing to recompute
    status: Status = Status.WAITING

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prefill


@dataclass
class SimWorker:
    name: str
    cache: BlockCache
    scheduler: Scheduler  # the engine's own: waiting, running, KV reserved
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    busy_s: float = 0.0
    version: int = 0  # of its next "step" event; a stale one is skipped
    # a run of decode-only steps in progress: (start, seconds per step, steps); None when none
    decoding_run: tuple[float, float, int] | None = None
    next_t: float | None = None  # when its step in progress ends (None: idle)


@dataclass
class Outcome:
    hit_ratio: float
    max_mean: float
    ttft_p50_s: float
    ttft_p99_s: float
    reasons: dict[str, int]
    busy_max_mean: float
    per_worker: list[dict[str, Any]] = field(default_factory=list)  # requests, mean prompt tokens, busy s, hits
    refused: int = 0  # 429s of admission control (settings.max_queue_per_worker)
    admitted: list[int] = field(default_factory=list)  # indices of the requests served, in arrival order


def simulate(reqs: list[dict[str, Any]], n: int, settings: RouterSettings, speed: float,
             profile: GpuProfile = GpuProfile(), max_output: int = 64, seed: int = 0,
             block_tokens: int = TRACE_BLOCK, step_tokens: int | None = None) -> Outcome:
    """Replay `reqs` at `speed` x trace time through `settings.policy` to n simulated workers. `seed` salts the
    routing keys and block chains (see route_keys) and seeds the random policy's RNG; each hash id stands for
    `block_tokens` tokens. `step_tokens`: the engine's token budget per step (default: the sim worker's,
    profile.max_batch_tokens, in real tokens as the trace's)."""
    clock = [0.0]
    policy = RandomPolicy(seed) if settings.policy == "random" else make_policy(settings, clock=lambda: clock[0])
    pool = WorkerPool(vnodes=settings.vnodes)
    cap = per_worker_blocks(profile, block_tokens)
    kv_cap = profile.kv_capacity_bytes // profile.kv_bytes_per_token
    step_tokens = step_tokens if step_tokens is not None else profile.max_batch_tokens
    workers = {}
    for i in range(n):
        w = pool.add(f"http://w{i}:8000")
        pool.mark_ok(w.url)
        workers[w.url] = SimWorker(w.url, BlockCache(1, cap), Scheduler(profile.max_num_seqs, step_tokens, kv_cap))
        if hasattr(policy, "index"):  # what a live worker reports on /health
            policy.index.set_budget(w.url, cap * block_tokens)
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    t0 = reqs[0]["timestamp"]
    for i, r in enumerate(reqs):
        push((r["timestamp"] - t0) / 1000 / speed, "arrive", i)
    # Admission control as the router runs it (router.admission, Router._forward): a request waits up to
    # queue_wait_s for any worker below the bound (FIFO), or, held, for its full best worker; then 429.
    admission = Admission.from_settings(settings, pool, lambda reason: None)
    admission.clock = lambda: clock[0]
    hold_ok = settings.hold_for_cache and admission.enabled
    waiting: deque[int] = deque()  # for any worker with room
    held: dict[str, deque[int]] = {}  # for one full worker
    parked: dict[int, tuple[float, Any]] = {}  # request -> (its deadline, its held decision or None)
    refused: list[int] = []
    admitted: list[int] = []
    ttft: list[float] = []
    arrive_t: dict[int, float] = {}
    reasons: dict[str, int] = {}
    pins: dict[int, list] = {}
    work: dict[int, tuple[int, int]] = {}  # request -> (prefill, context) the router charged its worker
    steps: dict[str, tuple[float, list, list]] = {}  # worker -> its step in progress: start, chunks, decoding

    def plan(w: SimWorker, now: float) -> None:
        """The worker's next engine step from `now`, planned by the engine's scheduler; the cache is looked up as
        it admits a request. A stretch of decode-only steps runs as one event until the first request ends or a
        new one arrives."""
        def admit(x: SimSeq, alone: bool) -> bool:
            r = reqs[x.i]
            ids = r["hash_ids"]
            chain = w.cache.acquire_prefix(ids, None, len(ids))
            x.num_computed = cached_tokens(r, len(chain), block_tokens)
            w.prompt_tokens += x.num_prompt
            w.cached_tokens += x.num_computed
            pins[x.i] = chain
            return True

        sp = w.scheduler.plan(admit)
        if not w.scheduler.running:
            w.next_t = None
            return
        overhead = profile.step_overhead_s
        w.version += 1
        if not sp.prefill:
            st = overhead + profile.decode_s([x.context for x in sp.decode])
            m = min(x.decode_left for x in sp.decode)
            w.decoding_run, w.next_t = (now, st, m), now + m * st
        else:
            dt, chunks = 0.0, []
            for x, n in sp.prefill:
                dt += overhead + profile.prefill_s(n, x.num_computed)
                chunks.append((x, n, now + dt))
            if sp.decode:
                dt += overhead + profile.decode_s([x.context for x in sp.decode])
            w.decoding_run, w.next_t = None, now + dt
            steps[w.name] = (now, chunks, sp.decode)
        push(w.next_t, "step", (w.name, w.version))

    def step(w: SimWorker, now: float) -> None:
        """The step (or run of decode-only steps) planned for `now` ends: first tokens, ends, the next step."""
        ended = []
        if w.decoding_run is not None:
            t0, st, m = w.decoding_run
            w.busy_s += m * st
            for x in w.scheduler.running:
                x.decode_left -= m
                x.context += m
                if x.decode_left == 0:
                    ended.append(x)
        else:
            start, chunks, decode = steps.pop(w.name)
            w.busy_s += now - start
            for x, n, t in chunks:
                x.num_computed += n
                ids = reqs[x.i]["hash_ids"]
                if x.prefilling:  # a chunk's full blocks are cached as it ends
                    pins[x.i] = insert_chain(w.cache, ids[:x.num_computed // block_tokens], pins[x.i])
                else:  # its first token: blocks cached, the router sees prefill done
                    pins[x.i] = insert_chain(w.cache, ids, pins[x.i])
                    ttft.append(t - arrive_t[x.i])
                    pool.prefilled(w.name, work[x.i][0])
                    if x.decode_left == 0:
                        ended.append(x)
            for x in decode:
                x.decode_left -= 1
                x.context += 1
                if x.decode_left == 0:
                    ended.append(x)
        for x in ended:
            w.scheduler.remove(x)
            w.cache.release(pins.pop(x.i))
            pool.release(w.name, 0, work.pop(x.i)[1])
        w.decoding_run = None
        plan(w, now)
        for _ in ended:
            wake(w.name, now)

    def arrived(w: SimWorker, now: float) -> None:
        """A request joins the worker's queue: an idle worker plans a step; a run of decode-only steps ends with
        the step in progress, so the next one admits it."""
        if w.next_t is None:
            plan(w, now)
        elif w.decoding_run is not None:
            t0, st, m = w.decoding_run
            k = min(m, int((now - t0) / st) + 1)
            if k < m:
                w.version += 1
                w.decoding_run, w.next_t = (t0, st, k), t0 + k * st
                push(w.next_t, "step", (w.name, w.version))

    def place(i: int, d: Any, now: float) -> None:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
        pool.acquire(d.worker, d.prefill, d.context)
        work[i] = (d.prefill, d.context)
        w = workers[d.worker]
        w.requests += 1
        admitted.append(i)
        r = reqs[i]
        out = min(r["output_length"], max_output)
        w.scheduler.add(SimSeq(i, r["input_length"], r["input_length"] + out, max(0, out - 1), r["input_length"]))
        arrived(w, now)

    def admit(i: int, now: float, deadline: float) -> None:
        """Place request i, or park it until a slot frees (or its deadline), or refuse it."""
        keys = route_keys(reqs[i], settings.prefix_tokens, seed, block_tokens)
        if admission.enabled and (not admission.has_room() or (waiting and i not in parked)):
            if len(parked) >= admission.max_waiting and i not in parked:
                refused.append(i)
                return
            waiting.append(i)
            if i not in parked:
                push(deadline, "deadline", i)
            parked[i] = (deadline, None)
            return
        d = policy.choose(keys, pool, hold=hold_ok)
        if d.hold:
            held.setdefault(d.worker, deque()).append(i)
            if i not in parked:
                push(deadline, "deadline", i)
            parked[i] = (deadline, d)
            return
        parked.pop(i, None)
        place(i, d, now)

    def wake(name: str, now: float) -> None:
        """A request on `name` ended: the first request held for it, else the first waiting for any worker."""
        for queue in (held.get(name), waiting):
            while queue:
                i = queue.popleft()
                if i in parked:
                    admit(i, now, parked[i][0])
                    return

    while events:
        now, _, kind, data = heapq.heappop(events)
        clock[0] = now
        if kind == "arrive":
            arrive_t[data] = now
            admit(data, now, now + admission.wait_s)
        elif kind == "deadline":
            if data not in parked:
                continue
            _, d = parked.pop(data)
            keys = route_keys(reqs[data], settings.prefix_tokens, seed, block_tokens)
            if d is None or admission.refuses_after_hold(d.prefill,
                                                         lambda: policy.choose(keys, pool, dry_run=True).prefill):
                refused.append(data)
            else:
                place(data, policy.choose(keys, pool), now)
        else:
            name, version = data
            w = workers[name]
            if version == w.version:
                step(w, now)
    ws = list(workers.values())
    mean = sum(w.requests for w in ws) / n
    busy_mean = sum(w.busy_s for w in ws) / n
    per_worker = [{"worker": w.name, "requests": w.requests, "busy_s": w.busy_s,
                   "mean_prompt_tokens": w.prompt_tokens / w.requests if w.requests else 0.0,
                   "hit_ratio": w.cached_tokens / w.prompt_tokens if w.prompt_tokens else 0.0} for w in ws]
    return Outcome(sum(w.cached_tokens for w in ws) / sum(w.prompt_tokens for w in ws),
                   max(w.requests for w in ws) / mean, percentile(ttft, 50) or 0.0, percentile(ttft, 99) or 0.0,
                   reasons, max(w.busy_s for w in ws) / busy_mean if busy_mean else 0.0, per_worker, len(refused),
                   admitted)
