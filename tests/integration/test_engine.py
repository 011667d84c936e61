"""The engine with the real SmolLM2 model: paged KV gives the model's own greedy tokens (alone, batched, in
chunks, on cache hits, after preemption), salts isolate, eviction respects pins, a shared prefix is held once."""

from __future__ import annotations

import threading

import pytest

from worker.engine.engine import Engine, EngineConfig
from worker.engine.runner import ModelRunner
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import SeqEvent, Sequence

pytestmark = pytest.mark.model
B = 16


class Run:
    """One submitted sequence and the events it produced."""

    def __init__(self, engine: Engine, ids: list[int], salt=None, max_tokens=12, on_event=None, ignore_eos=False):
        self.events: list[SeqEvent] = []
        self.done = threading.Event()

        def sink(ev):
            self.events.append(ev)
            if on_event:
                on_event(ev)
            if ev.finished:
                self.done.set()

        stops = frozenset() if ignore_eos else engine.stop_token_ids
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stops)
        self.seq = Sequence(ids, params, salt, sink)
        engine.submit(self.seq)

    def wait(self, timeout=120) -> Run:
        assert self.done.wait(timeout), "sequence did not finish in time"
        assert self.events[-1].error is None
        return self

    @property
    def last(self) -> SeqEvent:
        return self.events[-1]


@pytest.fixture(scope="module")
def runner(loaded_model):
    return ModelRunner(loaded_model)


def make_engine(runner, **kw) -> Engine:
    e = Engine(runner, EngineConfig(block_size=B, **kw))
    e.start()
    return e


def chat_ids(tok, system: str, user: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


SYSTEM = "You are a careful assistant for a shipping company. " + " ".join(
    f"Rule {i}: parcels of class {i} travel by route {i * 7 % 13}." for i in range(40))
QUESTIONS = ["Which route does class 3 take?", "Summarize rule 12.", "What is a parcel?",
             "Which route does class 3 take?"]


def shared_full_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // B * B


def test_cached_outputs_match_uncached_and_count_shared_blocks(runner):
    tok = runner.loaded.tokenizer
    prompts = [chat_ids(tok, SYSTEM, q) for q in QUESTIONS]
    assert len(prompts[0]) > 400
    cold = make_engine(runner, cache_bytes=1 << 30, prefix_caching=False)  # every request a full prefill
    try:
        reference = [Run(cold, p).wait() for p in prompts]
    finally:
        cold.stop()
    assert all(r.last.cached_tokens == 0 for r in reference)

    warm = make_engine(runner, cache_bytes=1 << 30, cache_generated=False)
    try:
        seen: list[list[int]] = []
        for p, ref in zip(prompts, reference):
            run = Run(warm, p).wait()
            expected = max([shared_full_blocks(p, s) for s in seen] or [0])
            expected = min(expected, (len(p) - 1) // B * B)
            assert run.last.cached_tokens == expected
            assert run.seq.output_ids == ref.seq.output_ids  # greedy tokens identical with and without cache
            seen.append(p)
        assert expected > 0  # the repeated question hits almost its whole prompt
        assert reference[0].seq.output_ids == reference[3].seq.output_ids
    finally:
        warm.stop()


def test_salt_isolates_and_generated_tokens_are_cached(runner):
    tok = runner.loaded.tokenizer
    ids = chat_ids(tok, SYSTEM, "Name one route.")
    e = make_engine(runner, cache_bytes=1 << 30)
    try:
        first = Run(e, ids, salt="tenant-a", max_tokens=40).wait()
        assert Run(e, ids, salt="tenant-b").wait().last.cached_tokens == 0
        assert Run(e, ids, salt="tenant-a").wait().last.cached_tokens == (len(ids) - 1) // B * B
        # The follow-up turn contains the first answer: its blocks were cached from the generated tokens.
        follow = ids + first.seq.output_ids[:-1]
        got = Run(e, follow, salt="tenant-a").wait().last.cached_tokens
        assert got > len(ids) // B * B
    finally:
        e.stop()


def test_eviction_under_pool_pressure_spares_running_requests(runner):
    """A pool of 100 pages: prompts that need room evict unpinned cached blocks, never a running request's."""
    tok = runner.loaded.tokenizer
    e = make_engine(runner, cache_bytes=100 * runner.kv_bytes_per_token * B, cache_generated=False)
    try:
        assert e.runner.pool.num_pages == 100
        a = chat_ids(tok, "Alpha. " + SYSTEM, "q")
        b = chat_ids(tok, "Beta. " + SYSTEM[::-1], "q")
        assert len(a) // B > 30 and len(b) // B > 30 and len(a) // B + len(b) // B > 100
        Run(e, a).wait()
        Run(e, b).wait()
        assert e.cache.stats.evicted_blocks > 0
        assert Run(e, a).wait().last.cached_tokens < (len(a) - 1) // B * B  # a was evicted (partly)

        # A long-running request pins its blocks; another prompt that needs room cannot evict them.
        long = Run(e, b, max_tokens=400, ignore_eos=True)
        while not long.events:
            assert not long.done.wait(0.05)
        pinned = [blk.hash for blk in long.seq.blocks]
        assert len(pinned) == len(b) // B  # all its prompt blocks, cached at prefill and pinned
        checks = []

        def pins_survive(ev):  # runs on the engine thread after every step of gamma
            if not long.done.is_set():
                checks.append(all(h in e.cache for h in pinned)
                              and all(e.runner.pool.refs(p) > 0 for p in long.seq.pages))

        gamma = chat_ids(tok, "Gamma. " + SYSTEM.upper()[:400], "q")  # fits beside it by evicting a's blocks
        Run(e, gamma, on_event=pins_survive).wait()
        assert checks and all(checks)
        assert not long.done.is_set()
        e.abort(long.seq)
    finally:
        e.stop()
    assert e.cache.used_bytes <= e.cache.capacity_bytes


def test_preempted_request_is_recomputed_to_the_same_tokens(runner):
    """Two requests whose decodes outgrow the pool together: the younger is preempted, resumes after the older
    finishes, and both produce exactly the tokens they produce alone."""
    tok = runner.loaded.tokenizer
    b = 8
    prompts = [tok(f"List {w} animals, one per line:", add_special_tokens=False).input_ids for w in ("ten", "six")]
    new_tokens = 64
    pages_each = -(-(max(map(len, prompts)) + new_tokens) // b)
    e = Engine(runner, EngineConfig(block_size=b, cache_bytes=(pages_each + 6) * runner.kv_bytes_per_token * b))
    e.start()
    try:
        alone = [Run(e, p, max_tokens=new_tokens, ignore_eos=True).wait().seq.output_ids for p in prompts]
        e.cache.clear()
        runs = [Run(e, p, max_tokens=new_tokens, ignore_eos=True) for p in prompts]
        together = [r.wait().seq.output_ids for r in runs]
        assert e.preemptions >= 1
        assert e.runner.pool.num_used == len(e.cache)  # only cached blocks hold pages once nothing runs
    finally:
        e.stop()
    assert together == alone


def test_batched_decode_matches_sequences_decoded_alone(runner):
    tok = runner.loaded.tokenizer
    # Unequal lengths and staggered ends: block tables of different sizes, members leaving mid-batch.
    prompts = [chat_ids(tok, SYSTEM[: 200 * (i + 1)], q) for i, q in enumerate(QUESTIONS[:3])] + [
        tok("Count: 1, 2, 3,", add_special_tokens=False).input_ids]
    lengths = [10, 25, 40, 30]
    e = make_engine(runner, cache_bytes=1 << 30)
    try:
        alone = [Run(e, p, max_tokens=n, ignore_eos=True).wait().seq.output_ids for p, n in zip(prompts, lengths)]
        steps_before = runner.batched_steps
        runs = [Run(e, p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)]
        together = [r.wait().seq.output_ids for r in runs]
    finally:
        e.stop()
    assert runner.batched_steps - steps_before >= 10  # decoding really was batched
    assert together == alone


def test_a_failed_engine_step_ends_its_request_not_the_worker(runner, monkeypatch):
    """One forward raises (a stand-in for a CUDA error, an OOM...): that request ends with an error, its cache
    pins are released, and the engine thread goes on serving the next request exactly as before."""
    tok = runner.loaded.tokenizer
    ids = chat_ids(tok, SYSTEM, "Which route does class 5 take?")
    e = make_engine(runner, cache_bytes=1 << 30, cache_generated=False)
    try:
        reference = Run(e, ids).wait()  # also caches the prompt, so the failing request pins blocks
        real_forward, calls = runner.forward, []

        def forward_fails_once(seq, token_ids):
            calls.append(seq.id)
            if len(calls) == 1:
                raise RuntimeError("simulated device failure")
            return real_forward(seq, token_ids)

        monkeypatch.setattr(runner, "forward", forward_fails_once)
        failed = Run(e, ids)
        assert failed.done.wait(120), "the failed request never ended"
        assert failed.last.error and "RuntimeError" in failed.last.error
        assert failed.last.finish_reason is None and failed.seq.blocks == []
        assert calls == [failed.seq.id]
        assert e.alive and e.num_running == 0 and e.num_waiting == 0
        assert len(e.cache) > 0 and all(blk.refcount == 0 for blk in e.cache._index.values())  # pins released

        after = Run(e, ids).wait()  # the engine thread survived and serves the next request normally
        assert e.alive and len(calls) >= 2
        assert after.seq.output_ids == reference.seq.output_ids
        assert reference.last.cached_tokens == 0 and after.last.cached_tokens == (len(ids) - 1) // B * B
    finally:
        e.stop()
